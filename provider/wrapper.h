/* The libfabric 1.17 headers (libfabric-dev) the provider is written against. */
#include <rdma/fabric.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_tagged.h>
#include <rdma/providers/fi_prov.h>
