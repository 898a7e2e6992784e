/* One MPI rank talking to itself through Open MPI's cm PML and ofi MTL, which sends even a
 * rank's own messages through the libfabric provider: a posted receive, an unexpected message
 * found by MPI_Iprobe (FI_PEEK) and taken by MPI_Mprobe/MPI_Mrecv (FI_PEEK|FI_CLAIM, FI_CLAIM),
 * and a collective. Prints one line; exit 0 when every value arrived. */
#include <mpi.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size; MPI_Comm_rank(MPI_COMM_WORLD, &rank); MPI_Comm_size(MPI_COMM_WORLD, &size);
    char out[32] = "to myself", in[32] = {0};
    MPI_Request rq[2];
    MPI_Irecv(in, sizeof in, MPI_CHAR, 0, 7, MPI_COMM_WORLD, &rq[0]);
    MPI_Isend(out, sizeof out, MPI_CHAR, 0, 7, MPI_COMM_WORLD, &rq[1]);
    MPI_Waitall(2, rq, MPI_STATUSES_IGNORE);
    /* unexpected + probe (FI_PEEK) + mprobe (FI_CLAIM) */
    int x = 42, y = 0, flag = 0; MPI_Status st; MPI_Message m;
    MPI_Isend(&x, 1, MPI_INT, 0, 9, MPI_COMM_WORLD, &rq[0]);
    while (!flag) MPI_Iprobe(0, 9, MPI_COMM_WORLD, &flag, &st);
    MPI_Mprobe(0, 9, MPI_COMM_WORLD, &m, &st);
    MPI_Mrecv(&y, 1, MPI_INT, &m, &st);
    MPI_Wait(&rq[0], MPI_STATUS_IGNORE);
    int sum = 0; MPI_Allreduce(&x, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("size=%d in='%s' y=%d sum=%d\n", size, in, y, sum);
    MPI_Finalize();
    return (strcmp(in, "to myself") == 0 && y == 42 && sum == 42) ? 0 : 1;
}
