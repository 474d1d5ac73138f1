/*
 * The guest's benchmark program, compiled on the host with `gcc -static` into the
 * initramfs (tests/vm/kit.py). Prints one "FVD-RESULT key value" line per figure.
 *
 *   workload smallfiles DIR COUNT FSYNC SEED
 *       PostMark-like: creates COUNT files of random sizes 512..10240 bytes spread over
 *       a directory tree (FSYNC=1: fsync each file), then deletes them. The no-fsync
 *       pass ends each phase with sync() inside the timed region, so both passes
 *       measure data reaching the disk.
 *   workload syncwrite DEVICE COUNT END_OFFSET
 *       COUNT 4 KiB O_DIRECT|O_DSYNC writes 1 MiB apart, the last ending at END_OFFSET:
 *       each write lands in a chunk/cluster no earlier write touched.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define DIRS 64
#define MIN_SIZE 512
#define MAX_SIZE 10240

static uint64_t rng_state;

static uint64_t next_random(void)
{
    /* xorshift64*: reproducible file sizes and contents for a given seed */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *path)
{
    printf("FVD-ERROR %s %s: %s\n", what, path, strerror(errno));
    fflush(stdout);
    exit(1);
}

static void file_path(char *out, size_t len, const char *dir, long i)
{
    snprintf(out, len, "%s/d%02ld/f%06ld", dir, i % DIRS, i);
}

static void write_file(const char *path, const char *buf, size_t size, int do_fsync)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        die("open", path);
    if (write(fd, buf, size) != (ssize_t)size)
        die("write", path);
    if (do_fsync && fsync(fd) != 0)
        die("fsync", path);
    if (close(fd) != 0)
        die("close", path);
}

static void report(const char *name, long ops, double seconds)
{
    printf("FVD-RESULT %s_ops_per_s %.1f\n", name, ops / seconds);
    printf("FVD-RESULT %s_seconds %.3f\n", name, seconds);
}

static int small_files(const char *dir, long count, int do_fsync, uint64_t seed)
{
    static char buf[MAX_SIZE];
    char path[512];
    const char *tag = do_fsync ? "fsync" : "nofsync";
    char name[64];

    rng_state = seed | 1;
    for (long d = 0; d < DIRS; d++) {
        snprintf(path, sizeof path, "%s/d%02ld", dir, d);
        if (mkdir(path, 0755) != 0 && errno != EEXIST)
            die("mkdir", path);
    }
    double start = now();
    for (long i = 0; i < count; i++) {
        size_t size = MIN_SIZE + next_random() % (MAX_SIZE - MIN_SIZE + 1);
        for (size_t j = 0; j < size; j += 8) {
            uint64_t word = next_random();
            memcpy(buf + j, &word, size - j < 8 ? size - j : 8);
        }
        file_path(path, sizeof path, dir, i);
        write_file(path, buf, size, do_fsync);
    }
    sync();
    snprintf(name, sizeof name, "create_%s", tag);
    report(name, count, now() - start);

    start = now();
    for (long i = 0; i < count; i++) {
        file_path(path, sizeof path, dir, i);
        if (unlink(path) != 0)
            die("unlink", path);
    }
    sync();
    snprintf(name, sizeof name, "delete_%s", tag);
    report(name, count, now() - start);
    return 0;
}

static int sync_writes(const char *device, long count, long long end_offset)
{
    const long long step = 1LL << 20;
    void *buf;
    if (posix_memalign(&buf, 4096, 4096) != 0)
        die("posix_memalign", device);
    memset(buf, 0xa5, 4096);
    int fd = open(device, O_WRONLY | O_DIRECT | O_DSYNC);
    if (fd < 0)
        die("open", device);
    double start = now();
    for (long i = 0; i < count; i++) {
        long long offset = end_offset - (count - i) * step;
        if (pwrite(fd, buf, 4096, offset) != 4096)
            die("pwrite", device);
    }
    report("syncwrite_4k", count, now() - start);
    close(fd);
    free(buf);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 6 && strcmp(argv[1], "smallfiles") == 0)
        return small_files(argv[2], atol(argv[3]), atoi(argv[4]), strtoull(argv[5], 0, 10));
    if (argc == 5 && strcmp(argv[1], "syncwrite") == 0)
        return sync_writes(argv[2], atol(argv[3]), atoll(argv[4]));
    fprintf(stderr, "usage: workload smallfiles DIR COUNT FSYNC SEED\n"
                    "       workload syncwrite DEVICE COUNT END_OFFSET\n");
    return 2;
}
