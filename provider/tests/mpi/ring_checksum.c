/* A deterministic MPI job for vfmig's tests: ITERS rounds of messages around a ring (sizes
 * cycling from 1 byte to 1 MiB, so eager and multi-segment messages both travel), each checked
 * byte for byte against what its sender made, then an MPI_Allreduce of every rank's checksum.
 * Usage: ring_checksum [ITERS] [MAX_BYTES] [HOLD_MS] [DIRTY_MIB]. With HOLD_MS, each rank
 * sleeps that long between posting a round's receive and send and waiting for them, so that
 * most of the time the round's message lies in the receiver's buffers (the provider's receive
 * slots) unread: what a migration that loses device writes corrupts. With DIRTY_MIB, each
 * rank keeps rewriting a buffer of that many MiB while it holds (1 MiB every 2 ms), so that
 * a migration's pre-copy always has pages to send. Neither changes what is sent. Prints, on rank 0, one JSON
 * line:
 *   {"tool":"mpi-ring","ranks":N,"iters":I,"checksum":"<hex>","errors":E}
 * and one line per rank every 50 rounds ({"tool":"mpi-ring","rank":r,"iter":i}). The checksum
 * is the same on every run with the same arguments; exit 0 when no message differed. */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static size_t len_of(long i, size_t max) {
    static const size_t sizes[] = {1, 100, 4096, 65536, 200000, 1 << 20};
    size_t n = sizes[i % 6];
    return n < max ? n : max;
}

static void fill(unsigned char *b, size_t n, int from, long i) {
    uint64_t s = (uint64_t)from * 0x9e3779b97f4a7c15ULL ^ (uint64_t)i * 0xbf58476d1ce4e5b9ULL;
    for (size_t k = 0; k < n; k++) b[k] = (unsigned char)((s + k * 0x2545f491ULL) >> 11);
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* Sleeps ms milliseconds in 2 ms steps, rewriting 1 MiB of scratch (dirty bytes) each step. */
static void hold_for(long ms, unsigned char *scratch, size_t dirty, int value) {
    const struct timespec step = {0, 2000000L};
    size_t at = 0;
    double end = now_ms() + ms;
    do {
        if (dirty) {
            size_t n = dirty - at < (1u << 20) ? dirty - at : (1u << 20);
            memset(scratch + at, value, n);
            at = (at + n) % dirty;
        }
        nanosleep(&step, NULL);
    } while (now_ms() < end);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    long iters = argc > 1 ? atol(argv[1]) : 300;
    size_t max = argc > 2 ? (size_t)atol(argv[2]) : (1 << 20);
    long hold_ms = argc > 3 ? atol(argv[3]) : 0;
    size_t dirty = argc > 4 ? (size_t)atol(argv[4]) << 20 : 0;
    unsigned char *scratch = dirty ? malloc(dirty) : NULL;
    if (dirty && !scratch) MPI_Abort(MPI_COMM_WORLD, 2);
    unsigned char *out = malloc(max), *in = malloc(max), *want = malloc(max);
    if (!out || !in || !want) MPI_Abort(MPI_COMM_WORLD, 2);
    int next = (rank + 1) % size, prev = (rank + size - 1) % size;
    uint64_t h = 0xcbf29ce484222325ULL;
    long errors = 0;
    for (long i = 0; i < iters; i++) {
        size_t n = len_of(i, max);
        fill(out, n, rank, i);
        MPI_Request rq[2];
        MPI_Irecv(in, (int)n, MPI_BYTE, prev, (int)(i & 0x7fff), MPI_COMM_WORLD, &rq[0]);
        MPI_Isend(out, (int)n, MPI_BYTE, next, (int)(i & 0x7fff), MPI_COMM_WORLD, &rq[1]);
        if (hold_ms > 0) {
            /* Said as each hold begins, so that a test can stop the VM inside one. */
            printf("{\"tool\":\"mpi-ring\",\"rank\":%d,\"hold\":%ld}\n", rank, i);
            fflush(stdout);
            hold_for(hold_ms, scratch, dirty, (int)i);
        }
        MPI_Waitall(2, rq, MPI_STATUSES_IGNORE);
        fill(want, n, prev, i);
        if (memcmp(in, want, n) != 0) errors++;
        for (size_t k = 0; k < n; k++) { h ^= in[k]; h *= 0x100000001b3ULL; }
        if (i % 50 == 0 || (hold_ms > 0 && i % 5 == 0)) {
            printf("{\"tool\":\"mpi-ring\",\"rank\":%d,\"iter\":%ld}\n", rank, i);
            fflush(stdout);
        }
    }
    uint64_t all = 0;
    long all_errors = 0;
    MPI_Allreduce(&h, &all, 1, MPI_UINT64_T, MPI_BXOR, MPI_COMM_WORLD);
    MPI_Allreduce(&errors, &all_errors, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) {
        printf("{\"tool\":\"mpi-ring\",\"ranks\":%d,\"iters\":%ld,\"checksum\":\"%016llx\","
               "\"errors\":%ld}\n", size, iters, (unsigned long long)all, all_errors);
        fflush(stdout);
    }
    MPI_Finalize();
    free(out); free(in); free(want); free(scratch);
    return all_errors == 0 ? 0 : 1;
}
