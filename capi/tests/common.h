/* Shared helpers of the C tests: checks that name the failing line and errno. */
#ifndef ZCIO_TEST_COMMON_H
#define ZCIO_TEST_COMMON_H
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "zcio.h"

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "%s:%d: CHECK(%s) failed (errno %d: %s; last error: %s)\n", \
                    __FILE__, __LINE__, #cond, errno, strerror(errno), zcio_last_error()); \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

#define CHECK_ERRNO(expr, value, err)                                                 \
    do {                                                                              \
        errno = 0;                                                                    \
        long long r_ = (long long)(expr);                                             \
        if (r_ != (long long)(value) || errno != (err)) {                             \
            fprintf(stderr, "%s:%d: %s = %lld errno %d (%s), want %lld errno %d\n",    \
                    __FILE__, __LINE__, #expr, r_, errno, zcio_last_error(),          \
                    (long long)(value), (err));                                       \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

static inline void fill(unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i * 31u + seed);
}

static inline int matches(const unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)(i * 31u + seed)) return 0;
    return 1;
}

/* Transport from ZCIO_TEST_TRANSPORT (default: the configuration's, tcp), RDMA device
 * from ZCIO_RDMA_DEVICE (set in the rxe guest). */
static inline zcio_t *connect_or_die(const char *addr) {
    zcio_t *z = zcio_new(NULL);
    CHECK(z != NULL);
    CHECK(zcio_set(z, "client.timeout_ms", "60000") == 0);
    const char *t = getenv("ZCIO_TEST_TRANSPORT"), *dev = getenv("ZCIO_RDMA_DEVICE");
    if (t && *t) CHECK(zcio_set(z, "transport", t) == 0);
    if (dev && *dev) CHECK(zcio_set(z, "rdma.device", dev) == 0);
    CHECK(zcio_connect(z, addr) == 0);
    return z;
}
#endif
