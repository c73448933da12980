/*
 * The ring schedule as pure functions: which block a ring position sends and
 * receives at each step, how blocks are cut into chunks, and in which order a
 * rank walks through its (step, chunk) units. No I/O here; tests call these
 * directly, and ring.c executes them.
 */
#include "../core/internal.h"

/* Chunks below this size cost more in per-frame overhead than pipelining
 * gains, so a block is cut finer than chunk_bytes only down to it. */
#define TL_MIN_PIPELINE_CHUNK ((uint64_t)64 << 10)

int tl_ring_nchunks(uint64_t block_count, size_t elem_size, int64_t chunk_bytes,
                    int pipeline_depth) {
  if (block_count == 0 || elem_size == 0) return 1;
  uint64_t bytes = block_count * elem_size;
  uint64_t cb = chunk_bytes > 0 ? (uint64_t)chunk_bytes : bytes;
  uint64_t n = (bytes + cb - 1) / cb;
  /* Cut medium blocks into at least pipeline_depth chunks, so that the
   * transfer of one chunk overlaps the reduction of the previous one. */
  uint64_t fine = bytes / TL_MIN_PIPELINE_CHUNK;
  uint64_t want = pipeline_depth > 0 ? (uint64_t)pipeline_depth : 1;
  if (fine > want) fine = want;
  if (n < fine) n = fine;
  if (n > block_count) n = block_count; /* at least one element a chunk */
  if (n < 1) n = 1;
  if (n > (1u << 30)) n = 1u << 30;
  return (int)n;
}

void tl_chunk_range(uint64_t len, int nchunks, int j, uint64_t *off,
                    uint64_t *clen) {
  /* The first len % nchunks chunks get one element more; no product can
   * overflow. */
  uint64_t n = (uint64_t)nchunks, q = len / n, r = len % n, uj = (uint64_t)j;
  *off = q * uj + (uj < r ? uj : r);
  *clen = q + (uj < r ? 1 : 0);
}

static int mod(int a, int n) { return ((a % n) + n) % n; }

/*
 * Steps 0 .. n-2 are the reduce-scatter: position pos sends block pos-t-1 and
 * receives block pos-t-2, which it reduces with its own contribution; after
 * step n-2 it holds block pos fully reduced. Steps n-1 .. 2n-3 are the
 * all-gather: with s = t-(n-1), it sends block pos-s (its own at s = 0) and
 * receives block pos-s-1. What a position sends at step t is what it received
 * at step t-1, and what it sends is what its right neighbour receives.
 */
void tl_ring_step(int n, int pos, int t, int *send, int *recv) {
  if (t < n - 1) {
    *send = mod(pos - t - 1, n);
    *recv = mod(pos - t - 2, n);
  } else {
    int s = t - (n - 1);
    *send = mod(pos - s, n);
    *recv = mod(pos - s - 1, n);
  }
}

/*
 * Unit order. A rank walks its steps x chunks in groups of `group` chunk
 * columns: for each group, for each step, for each chunk of the group. Within
 * a group the next step of a chunk waits for the previous step of that same
 * chunk, so with several columns per group the reduction of one chunk
 * overlaps the transfer of the others; groups keep the memory that a chunk
 * occupies between its steps bounded. Both ends of a connection derive the
 * same order, which is the order of frames on the wire.
 */
void tl_ring_unit(int nchunks, int group, int steps, int64_t u, int *t, int *j) {
  int64_t per = (int64_t)group * steps;
  int g = (int)(u / per);
  int64_t r = u - (int64_t)g * per;
  int w = nchunks - g * group < group ? nchunks - g * group : group;
  *t = (int)(r / w);
  *j = g * group + (int)(r % w);
}

int64_t tl_ring_unit_index(int nchunks, int group, int steps, int t, int j) {
  int g = j / group;
  int w = nchunks - g * group < group ? nchunks - g * group : group;
  return (int64_t)g * group * steps + (int64_t)t * w + (j - g * group);
}
