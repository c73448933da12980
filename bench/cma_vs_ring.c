/*
 * Same-host copy paths for large messages, measured between two processes:
 * one copy with cross-memory attach (process_vm_readv, reading the peer's
 * buffer) against two copies through a shared ring (what thunderlink's shm
 * transport does), with 4 KiB pages and with transparent huge pages.
 *
 *   cc -O2 -o /tmp/cma_vs_ring bench/cma_vs_ring.c && /tmp/cma_vs_ring
 *
 * Prints GB/s (10^9 B/s) per path, best of 5 runs of 32 MiB each.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BYTES ((size_t)32 << 20)
#define CHUNK ((size_t)512 << 10)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static char *region(size_t n, int huge, int shared) {
  char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) { perror("mmap"); exit(1); }
  if (huge) madvise(p, n, MADV_HUGEPAGE);
  memset(p, 1, n);
  return p;
}

int main(void) {
  for (int huge = 0; huge < 2; huge++) {
    char *src = region(BYTES, huge, 1), *dst = region(BYTES, huge, 0), *ring = region(CHUNK, 0, 1);
    pid_t child = fork();
    if (child == 0) { pause(); _exit(0); }
    double best[3] = {0, 0, 0};
    for (int rep = 0; rep < 5; rep++) {
      double t = now();
      for (size_t o = 0; o < BYTES; o += CHUNK) {
        struct iovec l = {dst + o, CHUNK}, r = {src + o, CHUNK};
        if (process_vm_readv(child, &l, 1, &r, 1, 0) != (ssize_t)CHUNK) { perror("process_vm_readv"); return 1; }
      }
      double cma = BYTES / (now() - t) / 1e9;
      t = now();
      for (size_t o = 0; o < BYTES; o += CHUNK) {
        memcpy(ring, src + o, CHUNK);
        memcpy(dst + o, ring, CHUNK);
      }
      double two = BYTES / (now() - t) / 1e9;
      t = now();
      memcpy(dst, src, BYTES);
      double one = BYTES / (now() - t) / 1e9;
      if (cma > best[0]) best[0] = cma;
      if (two > best[1]) best[1] = two;
      if (one > best[2]) best[2] = one;
    }
    printf("%s pages: CMA (1 copy, 512 KiB calls) %.2f GB/s; ring (2 copies) %.2f GB/s; memcpy %.2f GB/s\n",
           huge ? "huge" : "4 KiB", best[0], best[1], best[2]);
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    munmap(src, BYTES);
    munmap(dst, BYTES);
    munmap(ring, CHUNK);
  }
  return 0;
}
