/*
 * vfmig.h: the soft VF of a vfmig guest, for C programs (MPI runtimes and the like).
 *
 * Link with libvfmig_guest.a (target/.../release/libvfmig_guest.a) and -lpthread -ldl -lm.
 * Run as root: buffers are pinned and their guest-physical pages read from
 * /proc/self/pagemap; the device is an AF_PACKET socket on the NIC.
 *
 * Functions return 0 (or a pointer / count) on success and -1 (or NULL) on error;
 * vfmig_last_error() then says why. Data never travels in frames: the companion reads and
 * writes registered buffers directly. Addresses in work requests are in the region's address
 * space (register at addr 0 and they are offsets into the buffer).
 *
 * Numbering: region keys and QP numbers are assigned from 1 per VM in call order, so a job
 * that registers and creates QPs in a fixed order knows its peers' numbers (guest/README.md).
 */
#ifndef VFMIG_H
#define VFMIG_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct VfmigDev vfmig_dev; /* an open device */
typedef struct VfmigBuf vfmig_buf; /* a pinned buffer */

/* Region access flags. */
#define VFMIG_ACCESS_LOCAL_WRITE 1  /* receives may land here */
#define VFMIG_ACCESS_REMOTE_WRITE 2 /* peers may RDMA WRITE here */

/* Completion opcodes. */
#define VFMIG_WC_WRITE 0
#define VFMIG_WC_SEND 1
#define VFMIG_WC_RECV 2
#define VFMIG_WC_RECV_RDMA_WITH_IMM 3

/* Completion status: 0 success, else an error. */
#define VFMIG_WC_SUCCESS 0
#define VFMIG_WC_LOCAL_PROTECTION 1
#define VFMIG_WC_LOCAL_LENGTH 2
#define VFMIG_WC_REMOTE_ACCESS 3
#define VFMIG_WC_REMOTE_INVALID_REQUEST 4
#define VFMIG_WC_RNR_RETRY_EXCEEDED 5
#define VFMIG_WC_RETRY_EXCEEDED 6
#define VFMIG_WC_UNKNOWN_PEER 7
#define VFMIG_WC_FLUSHED 8
#define VFMIG_WC_REMOTE_LOST 9 /* the peer's VF state is gone: its VM stopped or its companion restarted */

/* Migration events. */
#define VFMIG_EVENT_SUSPEND 1  /* stop communicating, then vfmig_ack_event(SUSPEND) */
#define VFMIG_EVENT_RESUME 2   /* communication may resume */
#define VFMIG_EVENT_MIGRATED 3 /* the VM now runs at its destination */

/* A local buffer of a work request. */
struct vfmig_sge {
    uint64_t addr; /* in the region's address space */
    uint32_t len;
    uint32_t lkey;
};

/* A work completion (24 bytes). */
struct vfmig_wc {
    uint64_t wr_id;
    uint32_t qp;
    uint8_t opcode;  /* VFMIG_WC_WRITE ... */
    uint8_t status;  /* VFMIG_WC_SUCCESS or an error */
    uint8_t has_imm; /* 1 when imm is valid */
    uint8_t pad;
    uint32_t byte_len;
    uint32_t imm;
};

/* The message of this thread's last failed call ("" if none); the string stays valid for at
 * least the next 7 failing calls on the same thread. */
const char *vfmig_last_error(void);

/* Opens the soft VF behind interface `ifname` ("eth0"): waits (10 s, or VFMIG_OPEN_TIMEOUT
 * seconds) for the companion's reply. NULL on error. */
vfmig_dev *vfmig_open(const char *ifname);
/* Closes the device (NULL is ignored). */
void vfmig_close(vfmig_dev *dev);

/* A zeroed, pinned buffer (hugepages when available). NULL on error, e.g. when it would
 * need more than 80 physically discontiguous ranges: reserve hugepages then. */
vfmig_buf *vfmig_buf_alloc(size_t size);
void vfmig_buf_free(vfmig_buf *buf);
void *vfmig_buf_ptr(const vfmig_buf *buf);
size_t vfmig_buf_len(const vfmig_buf *buf);

/* Registers `buf` with its address space starting at `addr`; the key goes to *key. */
int vfmig_reg_mr(const vfmig_dev *dev, const vfmig_buf *buf, uint64_t addr, uint8_t access,
                 uint32_t *key);
int vfmig_dereg_mr(const vfmig_dev *dev, uint32_t key);

/* Creates a QP (its number goes to *qp) and connects it to QP `peer_qp` of VM `peer`. */
int vfmig_create_qp(const vfmig_dev *dev, uint32_t *qp);
int vfmig_connect_qp(const vfmig_dev *dev, uint32_t qp, const char *peer, uint32_t peer_qp);
/* Destroys a QP: its posted work requests are dropped without completions. The VF keeps a QP
 * (and carries it through every migration) until it is destroyed. */
int vfmig_destroy_qp(const vfmig_dev *dev, uint32_t qp);

/* Work requests: fire and forget; the outcome is a completion carrying wr_id.
 * A WRITE with immediate (has_imm != 0) consumes one of the peer's receives. */
int vfmig_post_write(const vfmig_dev *dev, uint32_t qp, uint64_t wr_id,
                     const struct vfmig_sge *sge, uint64_t remote_addr, uint32_t rkey,
                     int has_imm, uint32_t imm);
int vfmig_post_send(const vfmig_dev *dev, uint32_t qp, uint64_t wr_id,
                    const struct vfmig_sge *sge, int has_imm, uint32_t imm);
int vfmig_post_recv(const vfmig_dev *dev, uint32_t qp, uint64_t wr_id,
                    const struct vfmig_sge *sge);

/* Up to `max` completions into `out`: returns how many (0 if none), -1 on error.
 * vfmig_wait_cq waits up to timeout_ms for the first one. */
int vfmig_poll_cq(const vfmig_dev *dev, struct vfmig_wc *out, int max);
int vfmig_wait_cq(const vfmig_dev *dev, struct vfmig_wc *out, int max, int timeout_ms);

/* Event callback, run on the library's receiver thread: it may post work requests and call
 * vfmig_ack_event, but must not call reg_mr/create_qp/connect_qp (they wait for that
 * thread). Without a callback events are logged and not acknowledged. */
int vfmig_on_event(const vfmig_dev *dev, void (*cb)(int event, void *arg), void *arg);
int vfmig_ack_event(const vfmig_dev *dev, int event);

#ifdef __cplusplus
}
#endif
#endif /* VFMIG_H */
