/* Every synchronous call and the zero-copy family of libzcio, against a real server.
 * Usage: calls ADDR EXPORT_DIR DIR  (works in DIR, a new directory of the export; bytes
 * are also checked in the export on disk). */
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include "common.h"

static char export_dir[4096];

static void check_disk(const char *rel, size_t off, size_t n, unsigned seed) {
    char path[8192];
    snprintf(path, sizeof path, "%s/%s", export_dir, rel);
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0);
    unsigned char *b = malloc(n);
    CHECK(pread(fd, b, n, (off_t)off) == (ssize_t)n);
    CHECK(matches(b, n, seed));
    free(b);
    close(fd);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s ADDR EXPORT_DIR DIR\n", argv[0]);
        return 2;
    }
    snprintf(export_dir, sizeof export_dir, "%s", argv[2]);
    zcio_t *z = connect_or_die(argv[1]);

    char file[1024];
    snprintf(file, sizeof file, "%s/file", argv[3]);
    CHECK(zcio_mkdir(z, argv[3], 0750) == 0);
    zcio_fd_t *fd = zcio_creat(z, file, O_RDWR, 0640);
    CHECK(fd != NULL);

    /* pwrite / pread, 300000 bytes (several requests' worth of segments). */
    size_t n = 300000;
    unsigned char *a = malloc(n), *b = malloc(n);
    fill(a, n, 5);
    CHECK(zcio_pwrite(fd, a, n, 0) == (ssize_t)n);
    memset(b, 0, n);
    CHECK(zcio_pread(fd, b, n, 0) == (ssize_t)n);
    CHECK(memcmp(a, b, n) == 0);
    check_disk(file, 0, n, 5);

    /* pwritev / preadv: three segments (one empty) at an offset. */
    unsigned char s1[5000], s2[70000];
    fill(s1, sizeof s1, 1);
    fill(s2, sizeof s2, 2);
    struct iovec wv[3] = {{s1, sizeof s1}, {NULL, 0}, {s2, sizeof s2}};
    CHECK(zcio_pwritev(fd, wv, 3, 1000, 0) == 75000);
    unsigned char r1[5000], r2[70000];
    struct iovec rv[2] = {{r1, sizeof r1}, {r2, sizeof r2}};
    CHECK(zcio_preadv(fd, rv, 2, 1000, 0) == 75000);
    CHECK(matches(r1, sizeof r1, 1) && matches(r2, sizeof r2, 2));
    check_disk(file, 6000, sizeof s2, 2);

    /* Short read at end of file. */
    CHECK(zcio_pread(fd, b, 100, (off_t)n - 50) == 50);

    /* fstat, ftruncate, fsync. */
    struct stat st;
    CHECK(zcio_fstat(fd, &st) == 0);
    CHECK(st.st_size == (off_t)n);
    CHECK((st.st_mode & 0777) == 0640 && S_ISREG(st.st_mode));
    CHECK(zcio_ftruncate(fd, 4096) == 0);
    CHECK(zcio_fstat(fd, &st) == 0 && st.st_size == 4096);
    CHECK(zcio_fsync(fd) == 0);

    /* Zero-copy: pool buffers written without a copy, still the caller's afterwards. */
    ssize_t max = zcio_max_buffer_size(z);
    CHECK(max >= 131072);
    size_t sizes[3] = {131072, 4096, 65536};
    struct iovec zv[3];
    size_t total = 0;
    for (int i = 0; i < 3; i++) {
        void *p = zcio_get_buffer(z, sizes[i]);
        CHECK(p != NULL);
        CHECK(zcio_buffer_size(z, p) >= (ssize_t)sizes[i]);
        fill(p, sizes[i], 40 + i);
        zv[i].iov_base = p;
        zv[i].iov_len = sizes[i];
        total += sizes[i];
    }
    CHECK(zcio_zero_writev(fd, zv, 3, 0) == (ssize_t)total);
    check_disk(file, 0, sizes[0], 40);
    check_disk(file, sizes[0], sizes[1], 41);
    check_disk(file, sizes[0] + sizes[1], sizes[2], 42);
    CHECK(zcio_zero_writev(fd, zv, 1, (off_t)total) == (ssize_t)sizes[0]); /* reused */
    for (int i = 0; i < 3; i++) CHECK_ERRNO((zcio_free_buffer(z, zv[i].iov_base), 0), 0, 0);

    /* Zero-copy read: the transport fills pool buffers we are lent. */
    struct iovec out[8];
    int cnt = 8;
    CHECK(zcio_zero_readv(fd, total, 0, out, &cnt) == (ssize_t)total);
    CHECK(cnt >= 1 && cnt <= 8);
    size_t pos = 0;
    unsigned char *all = malloc(total);
    for (int i = 0; i < cnt; i++) {
        memcpy(all + pos, out[i].iov_base, out[i].iov_len);
        pos += out[i].iov_len;
    }
    CHECK(pos == total);
    CHECK(matches(all, sizes[0], 40) && matches(all + sizes[0], sizes[1], 41) &&
          matches(all + sizes[0] + sizes[1], sizes[2], 42));
    free(all);
    for (int i = 0; i < cnt; i++) CHECK_ERRNO((zcio_free_buffer(z, out[i].iov_base), 0), 0, 0);
    cnt = 8;
    CHECK(zcio_zero_readv(fd, 4096, 1 << 30, out, &cnt) == 0 && cnt == 0);

    /* Misuse: each an errno, nothing broken. */
    unsigned char local[64];
    struct iovec foreign = {local, sizeof local};
    CHECK_ERRNO(zcio_zero_writev(fd, &foreign, 1, 0), -1, EINVAL);
    CHECK_ERRNO((zcio_free_buffer(z, local), 0), 0, EINVAL);
    void *p = zcio_get_buffer(z, 4096);
    CHECK(p != NULL);
    CHECK_ERRNO((zcio_free_buffer(z, p), 0), 0, 0);
    CHECK_ERRNO((zcio_free_buffer(z, p), 0), 0, EINVAL); /* double free */
    CHECK_ERRNO(zcio_pwritev(fd, wv, ZCIO_IOV_MAX + 1, 0, 0), -1, EINVAL);
    CHECK_ERRNO(zcio_pread(fd, b, 10, -1), -1, EINVAL);
    CHECK_ERRNO(zcio_open(z, NULL, O_RDONLY), 0, EINVAL);
    CHECK_ERRNO(zcio_get_buffer(z, 0), 0, EINVAL);

    CHECK(zcio_close(fd) == 0);
    CHECK_ERRNO(zcio_close(fd), -1, EBADF);
    CHECK_ERRNO(zcio_pread(fd, b, 10, 0), -1, EBADF);

    /* Read-only open, unlink, then the file is gone. */
    fd = zcio_open(z, file, O_RDONLY);
    CHECK(fd != NULL);
    CHECK(zcio_pread(fd, b, 4096, 0) == 4096);
    CHECK(zcio_pwrite(fd, b, 10, 0) == -1);
    CHECK(zcio_close(fd) == 0);
    CHECK(zcio_unlink(z, file) == 0);
    CHECK_ERRNO(zcio_open(z, file, O_RDONLY), 0, ENOENT);

    free(a);
    free(b);
    zcio_fini(z);
    printf("calls: ok\n");
    return 0;
}
