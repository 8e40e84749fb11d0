/* 32 asynchronous requests in flight, with callbacks and with reaping, through every
 * asynchronous call of libzcio; bytes checked. Usage: async ADDR */
#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>
#include "common.h"

#define DEPTH 32
#define BS (64 * 1024)

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int done, failed;

/* Runs on the transport's thread: only records the result and signals. */
static void on_done(zcio_fd_t *fd, ssize_t ret, void *data) {
    (void)fd;
    ssize_t *slot = data;
    pthread_mutex_lock(&mu);
    *slot = ret;
    if (ret != BS) failed++;
    done++;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
}

static void wait_all(void) {
    pthread_mutex_lock(&mu);
    while (done < DEPTH) pthread_cond_wait(&cv, &mu);
    CHECK(failed == 0);
    done = 0;
    pthread_mutex_unlock(&mu);
}

static void reap_all(zcio_t *z, zcio_fd_t *fd, int *seen) {
    zcio_event ev[DEPTH];
    int got = 0;
    memset(seen, 0, DEPTH * sizeof *seen);
    while (got < DEPTH) {
        int n = zcio_reap(z, ev, 1, DEPTH, 60000);
        CHECK(n >= 1);
        for (int i = 0; i < n; i++) {
            CHECK(ev[i].fd == fd && ev[i].ret == BS && ev[i].error == 0);
            int k = (int)(intptr_t)ev[i].data;
            CHECK(k >= 0 && k < DEPTH && !seen[k]);
            seen[k] = 1;
        }
        got += n;
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s ADDR\n", argv[0]);
        return 2;
    }
    zcio_t *z = connect_or_die(argv[1]);
    zcio_fd_t *fd = zcio_creat(z, "async", O_RDWR | O_TRUNC, 0644);
    CHECK(fd != NULL);
    static unsigned char mem[DEPTH][BS];
    static ssize_t res[DEPTH];
    int seen[DEPTH];

    /* Callbacks: 32 pwritev in flight from the caller's memory, then 32 preadv. */
    for (int i = 0; i < DEPTH; i++) {
        fill(mem[i], BS, i);
        struct iovec v = {mem[i], BS};
        CHECK(zcio_pwritev_async(fd, &v, 1, (off_t)i * BS, 0, on_done, &res[i]) == 0);
    }
    wait_all();
    memset(mem, 0, sizeof mem);
    for (int i = 0; i < DEPTH; i++) {
        struct iovec v = {mem[i], BS};
        CHECK(zcio_preadv_async(fd, &v, 1, (off_t)i * BS, 0, on_done, &res[i]) == 0);
    }
    wait_all();
    for (int i = 0; i < DEPTH; i++) CHECK(matches(mem[i], BS, i));

    /* Callbacks, zero-copy: 32 zero_readv into lent pool buffers, then written back one
     * block further on with zero_writev. */
    static struct iovec outs[DEPTH][4];
    static int cnts[DEPTH];
    for (int i = 0; i < DEPTH; i++) {
        cnts[i] = 4;
        CHECK(zcio_zero_readv_async(fd, BS, (off_t)i * BS, outs[i], &cnts[i], on_done, &res[i]) == 0);
    }
    wait_all();
    for (int i = 0; i < DEPTH; i++) {
        CHECK(cnts[i] == 1 && outs[i][0].iov_len == BS);
        CHECK(matches(outs[i][0].iov_base, BS, i));
    }
    for (int i = 0; i < DEPTH; i++) {
        off_t off = (off_t)((i + 1) % DEPTH) * BS;
        CHECK(zcio_zero_writev_async(fd, outs[i], cnts[i], off, on_done, &res[i]) == 0);
    }
    wait_all();
    for (int i = 0; i < DEPTH; i++) zcio_free_buffer(z, outs[i][0].iov_base);
    for (int i = 0; i < DEPTH; i++) {
        unsigned char b[BS];
        CHECK(zcio_pread(fd, b, BS, (off_t)((i + 1) % DEPTH) * BS) == BS);
        CHECK(matches(b, BS, i));
    }

    /* Reaping: 32 zero_writev from pool buffers, then 32 preadv into them. */
    void *bufs[DEPTH];
    for (int i = 0; i < DEPTH; i++) {
        bufs[i] = zcio_get_buffer(z, BS);
        CHECK(bufs[i] != NULL);
        fill(bufs[i], BS, 100 + i);
    }
    for (int i = 0; i < DEPTH; i++) {
        struct iovec v = {bufs[i], BS};
        CHECK(zcio_zero_writev_async(fd, &v, 1, (off_t)i * BS, NULL, (void *)(intptr_t)i) == 0);
    }
    reap_all(z, fd, seen);
    for (int i = 0; i < DEPTH; i++) memset(bufs[i], 0, BS);
    for (int i = 0; i < DEPTH; i++) {
        struct iovec v = {bufs[i], BS};
        CHECK(zcio_preadv_async(fd, &v, 1, (off_t)i * BS, 0, NULL, (void *)(intptr_t)i) == 0);
    }
    reap_all(z, fd, seen);
    for (int i = 0; i < DEPTH; i++) CHECK(matches(bufs[i], BS, 100 + i));
    /* A buffer in flight cannot be freed; one reaped can. */
    struct iovec v0 = {bufs[0], BS};
    CHECK(zcio_zero_writev_async(fd, &v0, 1, 0, NULL, (void *)0) == 0);
    zcio_event ev[1];
    CHECK(zcio_reap(z, ev, 1, 1, 60000) == 1 && ev[0].ret == BS);
    for (int i = 0; i < DEPTH; i++) CHECK_ERRNO((zcio_free_buffer(z, bufs[i]), 0), 0, 0);
    /* Nothing outstanding: asking for one returns none at once. */
    CHECK(zcio_reap(z, ev, 1, 1, -1) == 0);

    CHECK(zcio_close(fd) == 0);
    CHECK(zcio_unlink(z, "async") == 0);
    zcio_fini(z);
    printf("async: ok\n");
    return 0;
}
