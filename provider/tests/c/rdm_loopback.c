/* Two endpoints of the vfmig provider in one process, driven through libfabric's own API
 * (the inline wrappers Open MPI's mtl/ofi uses), over VFMIG_FI_TRANSPORT=loopback.
 * Exit 0 and "ok" when every check passed; otherwise the failed check on stderr, exit 1. */
#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_tagged.h>
#include <rdma/fi_errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(cond, ...) do { if (!(cond)) { \
    fprintf(stderr, "line %d: check failed: %s: ", __LINE__, #cond); \
    fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); exit(1); } } while (0)
#define CALL(expr) do { long rc_ = (long)(expr); \
    CHECK(rc_ == 0, "%s returned %ld (%s)", #expr, rc_, fi_strerror((int)-rc_)); } while (0)

struct rank {
    struct fid_ep *ep;
    struct fid_cq *cq;
    struct fid_av *av;
    char name[FI_NAME_MAX];
    size_t namelen;
    fi_addr_t peer[2];
};

/* One completion from cq, progressing until it comes; -FI_EAVAIL is returned as such. */
static long wait_cq(struct fid_cq *cq, struct fi_cq_tagged_entry *e) {
    for (int i = 0; i < 100000; i++) {
        long n = fi_cq_read(cq, e, 1);
        if (n != -FI_EAGAIN) return n;
    }
    return -FI_EAGAIN;
}

static void no_completion(struct fid_cq *cq, const char *why) {
    struct fi_cq_tagged_entry e;
    long n = fi_cq_read(cq, &e, 1);
    CHECK(n == -FI_EAGAIN, "%s: fi_cq_read gave %ld", why, n);
}

static struct fi_cq_err_entry wait_err(struct fid_cq *cq) {
    struct fi_cq_tagged_entry e;
    struct fi_cq_err_entry err;
    memset(&err, 0, sizeof err);
    long n = wait_cq(cq, &e);
    CHECK(n == -FI_EAVAIL, "expected an error entry, fi_cq_read gave %ld", n);
    n = fi_cq_readerr(cq, &err, 0);
    CHECK(n == 1, "fi_cq_readerr gave %ld", n);
    return err;
}

int main(void) {
    struct fi_info *hints = fi_allocinfo(), *info = NULL;
    /* Open MPI 4.1's mtl/ofi hints, with FI_REMOTE_CQ_DATA as its second call asks. */
    hints->caps = FI_TAGGED | FI_LOCAL_COMM | FI_REMOTE_COMM | FI_DIRECTED_RECV | FI_REMOTE_CQ_DATA;
    hints->mode = FI_CONTEXT | FI_CONTEXT2;
    hints->ep_attr->type = FI_EP_RDM;
    hints->tx_attr->msg_order = FI_ORDER_SAS;
    hints->rx_attr->msg_order = FI_ORDER_SAS;
    hints->tx_attr->op_flags = FI_COMPLETION;
    hints->rx_attr->op_flags = FI_COMPLETION;
    hints->domain_attr->threading = FI_THREAD_DOMAIN;
    hints->domain_attr->av_type = FI_AV_MAP;
    hints->domain_attr->resource_mgmt = FI_RM_ENABLED;
    hints->domain_attr->cq_data_size = 4;
    hints->fabric_attr->prov_name = strdup("vfmig");
    CALL(fi_getinfo(FI_VERSION(1, 5), NULL, NULL, 0, hints, &info));
    CHECK(strcmp(info->fabric_attr->prov_name, "vfmig") == 0, "provider %s", info->fabric_attr->prov_name);

    struct fid_fabric *fabric;
    struct fid_domain *domain;
    CALL(fi_fabric(info->fabric_attr, &fabric, NULL));
    CALL(fi_domain(fabric, info, &domain, NULL));

    struct rank r[2];
    for (int i = 0; i < 2; i++) {
        struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_TAGGED };
        struct fi_av_attr av_attr = { .type = FI_AV_MAP };
        CALL(fi_endpoint(domain, info, &r[i].ep, NULL));
        CALL(fi_cq_open(domain, &cq_attr, &r[i].cq, NULL));
        CALL(fi_av_open(domain, &av_attr, &r[i].av, NULL));
        CALL(fi_ep_bind(r[i].ep, &r[i].cq->fid, FI_TRANSMIT | FI_RECV | FI_SELECTIVE_COMPLETION));
        CALL(fi_ep_bind(r[i].ep, &r[i].av->fid, 0));
        CALL(fi_enable(r[i].ep));
        r[i].namelen = sizeof r[i].name;
        CALL(fi_getname(&r[i].ep->fid, r[i].name, &r[i].namelen));
    }
    /* Each AV gets both names in one packed array, as Open MPI's add_procs inserts them. */
    CHECK(r[0].namelen == r[1].namelen, "name lengths %zu %zu", r[0].namelen, r[1].namelen);
    size_t len = r[0].namelen;
    char *names = malloc(2 * len);
    memcpy(names, r[0].name, len);
    memcpy(names + len, r[1].name, len);
    for (int i = 0; i < 2; i++) {
        int n = fi_av_insert(r[i].av, names, 2, r[i].peer, 0, NULL);
        CHECK(n == 2, "fi_av_insert gave %d", n);
    }
    struct fid_ep *a = r[0].ep, *b = r[1].ep;
    struct fid_cq *acq = r[0].cq, *bcq = r[1].cq;
    fi_addr_t to_b = r[0].peer[1], from_a = r[1].peer[0], from_b_self = r[1].peer[1];
    struct fi_context ctx[16];
    struct fi_cq_tagged_entry e;
    char buf[64];

    /* 1. A posted receive gets a tagged message; the send completes on A. */
    memset(buf, 0, sizeof buf);
    CALL(fi_trecv(b, buf, sizeof buf, NULL, FI_ADDR_UNSPEC, 0x10, 0, &ctx[0]));
    CALL(fi_tsend(a, "hello", 5, NULL, to_b, 0x10, &ctx[1]));
    CHECK(wait_cq(acq, &e) == 1 && e.op_context == &ctx[1] && (e.flags & FI_SEND), "send completion");
    CHECK(wait_cq(bcq, &e) == 1, "receive completion");
    CHECK(e.op_context == &ctx[0] && e.len == 5 && e.tag == 0x10 && (e.flags & FI_RECV) && (e.flags & FI_TAGGED),
          "entry ctx=%p len=%zu tag=%#lx flags=%#lx", e.op_context, e.len, (unsigned long)e.tag, (unsigned long)e.flags);
    CHECK(memcmp(buf, "hello", 5) == 0, "payload %.5s", buf);

    /* 2. An unexpected message with CQ data, matched through the ignore mask; fi_cq_readfrom
     *    names its source. */
    CALL(fi_tsenddata(a, "data", 4, NULL, 0xbeef, to_b, 0x2ab, &ctx[2]));
    CHECK(wait_cq(acq, &e) == 1 && e.op_context == &ctx[2], "senddata completion");
    CALL(fi_trecv(b, buf, sizeof buf, NULL, FI_ADDR_UNSPEC, 0x200, 0xff, &ctx[3]));
    fi_addr_t src = 12345;
    long n = 0;
    for (int i = 0; i < 1000 && (n = fi_cq_readfrom(bcq, &e, 1, &src)) == -FI_EAGAIN; i++) {}
    CHECK(n == 1 && e.op_context == &ctx[3] && e.tag == 0x2ab && e.data == 0xbeef && (e.flags & FI_REMOTE_CQ_DATA),
          "n=%ld tag=%#lx data=%#lx", n, (unsigned long)e.tag, (unsigned long)e.data);
    CHECK(src == from_a, "source %lu, A is %lu", (unsigned long)src, (unsigned long)from_a);

    /* 3. Directed receive: a receive for B's own address does not take A's message. */
    CALL(fi_trecv(b, buf, sizeof buf, NULL, from_b_self, 0x30, 0, &ctx[4]));
    CALL(fi_tinject(a, "inj", 3, to_b, 0x30));
    no_completion(acq, "fi_tinject");
    no_completion(bcq, "a directed receive took another source's message");
    CALL(fi_trecv(b, buf, sizeof buf, NULL, from_a, 0x30, 0, &ctx[5]));
    CHECK(wait_cq(bcq, &e) == 1 && e.op_context == &ctx[5] && e.len == 3, "directed receive from A");

    /* 4. fi_cancel of the receive left waiting for B's own address. */
    CALL(fi_cancel(&b->fid, &ctx[4]));
    struct fi_cq_err_entry err = wait_err(bcq);
    CHECK(err.err == FI_ECANCELED && err.op_context == &ctx[4], "cancel err=%d", err.err);
    CHECK(fi_cancel(&b->fid, &ctx[4]) == -FI_ENOENT, "cancelled twice");

    /* 5. Truncation: 10 bytes into a 4-byte buffer. */
    memset(buf, 0, sizeof buf);
    CALL(fi_trecv(b, buf, 4, NULL, FI_ADDR_UNSPEC, 0x50, 0, &ctx[6]));
    CALL(fi_tsend(a, "0123456789", 10, NULL, to_b, 0x50, &ctx[7]));
    CHECK(wait_cq(acq, &e) == 1, "send completion");
    err = wait_err(bcq);
    CHECK(err.err == FI_ETRUNC && err.len == 4 && err.olen == 6 && err.op_context == &ctx[6],
          "err=%d len=%zu olen=%zu", err.err, err.len, err.olen);
    CHECK(memcmp(buf, "0123", 4) == 0 && buf[4] == 0, "truncated payload %s", buf);

    /* 6. FI_PEEK finds nothing, then FI_PEEK|FI_CLAIM and FI_CLAIM take the message. */
    struct iovec iov = { .iov_base = buf, .iov_len = sizeof buf };
    struct fi_msg_tagged msg = { .msg_iov = &iov, .iov_count = 1, .addr = FI_ADDR_UNSPEC,
                                 .tag = 0x60, .ignore = 0, .context = &ctx[8] };
    CALL(fi_trecvmsg(b, &msg, FI_PEEK | FI_COMPLETION));
    err = wait_err(bcq);
    CHECK(err.err == FI_ENOMSG && err.op_context == &ctx[8], "empty peek err=%d", err.err);
    CALL(fi_tsend(a, "claimed", 7, NULL, to_b, 0x60, &ctx[9]));
    CHECK(wait_cq(acq, &e) == 1, "send completion");
    msg.context = &ctx[10];
    CALL(fi_trecvmsg(b, &msg, FI_PEEK | FI_CLAIM | FI_COMPLETION));
    CHECK(wait_cq(bcq, &e) == 1 && e.op_context == &ctx[10] && e.len == 7, "peek len=%zu", e.len);
    /* A plain receive does not see the claimed message. */
    CALL(fi_trecv(b, buf, sizeof buf, NULL, FI_ADDR_UNSPEC, 0x60, 0, &ctx[11]));
    no_completion(bcq, "a receive took a claimed message");
    memset(buf, 0, sizeof buf);
    CALL(fi_trecvmsg(b, &msg, FI_CLAIM | FI_COMPLETION));
    CHECK(wait_cq(bcq, &e) == 1 && e.op_context == &ctx[10] && e.len == 7, "claim");
    CHECK(memcmp(buf, "claimed", 7) == 0, "claimed payload %s", buf);
    CALL(fi_cancel(&b->fid, &ctx[11]));
    CHECK(wait_err(bcq).err == FI_ECANCELED, "cancel");

    /* 7. FI_PEEK|FI_DISCARD drops a message. */
    CALL(fi_tsend(a, "dropped", 7, NULL, to_b, 0x70, &ctx[12]));
    CHECK(wait_cq(acq, &e) == 1, "send completion");
    msg.tag = 0x70; msg.context = &ctx[13];
    CALL(fi_trecvmsg(b, &msg, FI_PEEK | FI_DISCARD | FI_COMPLETION));
    CHECK(wait_cq(bcq, &e) == 1 && e.op_context == &ctx[13] && e.len == 7, "peek-discard");
    CALL(fi_trecvmsg(b, &msg, FI_PEEK | FI_COMPLETION));
    CHECK(wait_err(bcq).err == FI_ENOMSG, "the discarded message is gone");

    /* 8. What the provider does not have says so. */
    /* Refused before a byte of it is read. */
    CHECK(info->ep_attr->max_msg_size >= (1 << 20), "max_msg_size %zu", info->ep_attr->max_msg_size);
    CHECK(fi_tsend(a, buf, info->ep_attr->max_msg_size + 1, NULL, to_b, 0, NULL) == -FI_EMSGSIZE,
          "a send longer than max_msg_size");
    CHECK(fi_tsend(a, "x", 1, NULL, 99, 0, NULL) == -FI_ENOENT, "send to an unknown fi_addr");

    for (int i = 0; i < 2; i++) {
        CALL(fi_close(&r[i].ep->fid));
        CALL(fi_close(&r[i].av->fid));
        CALL(fi_close(&r[i].cq->fid));
    }
    CALL(fi_close(&domain->fid));
    CALL(fi_close(&fabric->fid));
    fi_freeinfo(info);
    fi_freeinfo(hints);
    free(names);
    printf("ok\n");
    return 0;
}
