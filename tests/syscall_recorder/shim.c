/* LD_PRELOAD shim for crash-cut tests: logs every write-like call the process makes on
 * one file (the image), whichever module makes it (CPython's os module, the compiled fast
 * path, ctypes through the global namespace), then does the real call.
 *
 * Inert until fvd_recorder_start(image, log) is called (tests/syscall_recorder/__init__.py
 * does it through ctypes.CDLL(None)). Records, appended to the log in completion order:
 *   struct { uint64 kind; uint64 a; uint64 b; } then, for 'w', the b bytes written.
 *   'w' off len data   bytes that reached the file (a short write logs what was written)
 *   't' size 0         the file's size set (ftruncate / truncate)
 *   'p' off len        the range reads as zeros, size unchanged (punch hole, zero range)
 *   'a' off len        the size grows to at least off+len (fallocate without KEEP_SIZE)
 *   's' 0 0            fsync / fdatasync (a durability barrier; no content change)
 *   'x' mode 0         an fallocate mode this recorder cannot model (the replay fails)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static volatile int active;
static int log_fd = -1;
static char image[4096];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

#define REAL(name) ((__typeof__(&name))real_sym(#name))

static void *real_sym(const char *name) {
    void *p = dlsym(RTLD_NEXT, name);
    if (!p) abort();
    return p;
}

static int is_image(int fd) {
    struct stat a, b;
    if (!active || fd == log_fd) return 0;
    if (fstat(fd, &a) != 0 || stat(image, &b) != 0) return 0;
    return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

static void put(const void *p, size_t n) {
    const char *c = p;
    while (n > 0) {
        long k = syscall(SYS_write, log_fd, c, n);
        if (k <= 0) abort(); /* a lost record would make every cut after it a lie */
        c += k;
        n -= (size_t)k;
    }
}

static void record(char kind, uint64_t a, uint64_t b, const struct iovec *iov, int cnt) {
    uint64_t head[3] = {(uint64_t)kind, a, b};
    pthread_mutex_lock(&lock);
    put(head, sizeof head);
    for (int i = 0; i < cnt && b > 0; i++) {
        size_t n = iov[i].iov_len < b ? iov[i].iov_len : b;
        put(iov[i].iov_base, n);
        b -= n;
    }
    pthread_mutex_unlock(&lock);
}

static void record_range(char kind, uint64_t a, uint64_t b) { record(kind, a, b, NULL, 0); }

static void record_written(const struct iovec *iov, int cnt, off_t off, ssize_t n) {
    if (n > 0) record('w', (uint64_t)off, (uint64_t)n, iov, cnt);
}

int fvd_recorder_start(const char *path, const char *log_path) {
    if (strlen(path) >= sizeof image) return -1;
    strcpy(image, path);
    log_fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (log_fd < 0) return -1;
    active = 1;
    return 0;
}

int fvd_recorder_stop(void) {
    active = 0;
    pthread_mutex_lock(&lock);
    int rc = close(log_fd);
    log_fd = -1;
    pthread_mutex_unlock(&lock);
    return rc;
}

/* ----- positioned writes ----- */
ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    ssize_t r = REAL(pwrite)(fd, buf, n, off);
    if (is_image(fd)) record_written(&(struct iovec){(void *)buf, n}, 1, off, r);
    return r;
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    ssize_t r = REAL(pwrite64)(fd, buf, n, off);
    if (is_image(fd)) record_written(&(struct iovec){(void *)buf, n}, 1, off, r);
    return r;
}
ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    ssize_t r = REAL(pwritev)(fd, iov, cnt, off);
    if (is_image(fd)) record_written(iov, cnt, off, r);
    return r;
}
ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) {
    ssize_t r = REAL(pwritev64)(fd, iov, cnt, off);
    if (is_image(fd)) record_written(iov, cnt, off, r);
    return r;
}

static off_t position(int fd) { return lseek(fd, 0, SEEK_CUR); }

ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    off_t at = off == -1 ? position(fd) : off;
    ssize_t r = REAL(pwritev2)(fd, iov, cnt, off, flags);
    if (is_image(fd)) record_written(iov, cnt, at, r);
    return r;
}
ssize_t pwritev64v2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    off_t at = off == -1 ? position(fd) : off;
    ssize_t r = REAL(pwritev64v2)(fd, iov, cnt, off, flags);
    if (is_image(fd)) record_written(iov, cnt, at, r);
    return r;
}

/* ----- writes at the file position ----- */
ssize_t write(int fd, const void *buf, size_t n) {
    int mine = is_image(fd);
    off_t at = mine ? position(fd) : 0;
    ssize_t r = REAL(write)(fd, buf, n);
    if (mine) record_written(&(struct iovec){(void *)buf, n}, 1, at, r);
    return r;
}
ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    int mine = is_image(fd);
    off_t at = mine ? position(fd) : 0;
    ssize_t r = REAL(writev)(fd, iov, cnt);
    if (mine) record_written(iov, cnt, at, r);
    return r;
}

/* ----- copies into the image: log the bytes that landed ----- */
ssize_t copy_file_range(int in, off_t *in_off, int out, off_t *out_off, size_t n,
                        unsigned flags) {
    int mine = is_image(out);
    off_t at = mine ? (out_off ? *out_off : position(out)) : 0;
    ssize_t r = REAL(copy_file_range)(in, in_off, out, out_off, n, flags);
    if (mine && r > 0) {
        char *copy = malloc((size_t)r);
        if (!copy || REAL(pread)(out, copy, (size_t)r, at) != r) abort();
        record_written(&(struct iovec){copy, (size_t)r}, 1, at, r);
        free(copy);
    }
    return r;
}

/* ----- size and space ----- */
int ftruncate(int fd, off_t size) {
    int r = REAL(ftruncate)(fd, size);
    if (r == 0 && is_image(fd)) record_range('t', (uint64_t)size, 0);
    return r;
}
int ftruncate64(int fd, off_t size) {
    int r = REAL(ftruncate64)(fd, size);
    if (r == 0 && is_image(fd)) record_range('t', (uint64_t)size, 0);
    return r;
}

static int names_image(const char *path) {
    struct stat a, b;
    if (!active || stat(path, &a) != 0 || stat(image, &b) != 0) return 0;
    return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

int truncate(const char *path, off_t size) {
    int mine = names_image(path);
    int r = REAL(truncate)(path, size);
    if (r == 0 && mine) record_range('t', (uint64_t)size, 0);
    return r;
}
int truncate64(const char *path, off_t size) {
    int mine = names_image(path);
    int r = REAL(truncate64)(path, size);
    if (r == 0 && mine) record_range('t', (uint64_t)size, 0);
    return r;
}

static void record_fallocate(int mode, off_t off, off_t len) {
    int keep = mode & FALLOC_FL_KEEP_SIZE;
    int rest = mode & ~FALLOC_FL_KEEP_SIZE;
    if (rest == FALLOC_FL_PUNCH_HOLE || rest == FALLOC_FL_ZERO_RANGE)
        record_range('p', (uint64_t)off, (uint64_t)len);
    else if (rest != 0)
        record_range('x', (uint64_t)mode, 0);
    if (!keep && rest != FALLOC_FL_PUNCH_HOLE)
        record_range('a', (uint64_t)off, (uint64_t)len);
}

int fallocate(int fd, int mode, off_t off, off_t len) {
    int r = REAL(fallocate)(fd, mode, off, len);
    if (r == 0 && is_image(fd)) record_fallocate(mode, off, len);
    return r;
}
int fallocate64(int fd, int mode, off_t off, off_t len) {
    int r = REAL(fallocate64)(fd, mode, off, len);
    if (r == 0 && is_image(fd)) record_fallocate(mode, off, len);
    return r;
}
int posix_fallocate(int fd, off_t off, off_t len) {
    int r = REAL(posix_fallocate)(fd, off, len);
    if (r == 0 && is_image(fd)) record_range('a', (uint64_t)off, (uint64_t)len);
    return r;
}
int posix_fallocate64(int fd, off_t off, off_t len) {
    int r = REAL(posix_fallocate64)(fd, off, len);
    if (r == 0 && is_image(fd)) record_range('a', (uint64_t)off, (uint64_t)len);
    return r;
}

/* ----- durability barriers ----- */
int fsync(int fd) {
    int r = REAL(fsync)(fd);
    if (r == 0 && is_image(fd)) record_range('s', 0, 0);
    return r;
}
int fdatasync(int fd) {
    int r = REAL(fdatasync)(fd);
    if (r == 0 && is_image(fd)) record_range('s', 0, 0);
    return r;
}
