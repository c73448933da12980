/*
 * The latency path: collectives in one round of messages.
 *
 * For small buffers a ring's 2(n-1) steps cost 2(n-1) latencies; here every
 * rank sends its buffer to every other rank at once and reduces locally, in
 * rank order, so that every rank computes exactly the same bits.
 */
#include <stdlib.h>
#include <string.h>

#include "../core/internal.h"

#define STACK_REQS 16

typedef struct reqs {
  tl_req_t *r;
  tl_req_t stack[STACK_REQS];
} reqs_t;

static int reqs_init(tl_comm_t *c, reqs_t *q, int n) {
  q->r = n <= STACK_REQS ? q->stack : calloc((size_t)n, sizeof(tl_req_t));
  if (!q->r) return tl__fail(c, TL_ERR_NOMEM, "out of memory");
  memset(q->r, 0, (size_t)n * sizeof(tl_req_t));
  return TL_OK;
}

static void reqs_free(reqs_t *q) {
  if (q->r != q->stack) free(q->r);
}

/*
 * Exchange with every peer: receive `bytes` from rank p into recv_at(p) and
 * send send_at(p) to rank p. Peers are visited from rank+1 upwards so that
 * not everyone writes to rank 0 first.
 */
static int exchange(tl_comm_t *c, char *rbase, size_t rstride, const char *sbase,
                    size_t sstride, size_t bytes) {
  int n = c->size;
  reqs_t q;
  int rc = reqs_init(c, &q, 2 * n);
  if (rc) return rc;
  tl_frame_t h = tl__frame(c, 0, 0);
  for (int i = 1; i < n && !rc; i++) {
    int p = (c->rank + i) % n;
    rc = tl__irecv(c, p, tl__lane_all(), &h, rbase + (size_t)p * rstride, bytes, &q.r[p]);
  }
  for (int i = 1; i < n && !rc; i++) {
    int p = (c->rank + i) % n;
    rc = tl__isend(c, p, tl__lane_all(), &h, sbase + (size_t)p * sstride, bytes,
                   &q.r[n + p]);
  }
  if (!rc) rc = tl__wait_all(c, q.r, 2 * n);
  reqs_free(&q);
  return rc;
}

/*
 * out = x(0) op x(1) op ... op x(n-1), in rank order, where x(p) is the
 * block rank p sent us (at scratch + p * bytes) and x(rank) is `own`. If
 * `own` is the output itself (in place), it is copied aside first unless it
 * is used before the output is first written (rank 0 or 1).
 */
static int combine(tl_comm_t *c, char *out, const char *own, char *scratch,
                   uint64_t count, int dtype, int redop) {
  size_t bytes = count * tl_dtype_size(dtype);
  int n = c->size;
  char *stack_src[STACK_REQS], **src = stack_src;
  if (n > STACK_REQS && !(src = malloc((size_t)n * sizeof *src)))
    return tl__fail(c, TL_ERR_NOMEM, "out of memory");
  for (int p = 0; p < n; p++) src[p] = scratch + (size_t)p * bytes;
  if (own == out && c->rank >= 2) memcpy(src[c->rank], own, bytes);
  else src[c->rank] = (char *)own;
  tl_reduce(out, src[0], src[1], count, dtype, redop);
  for (int p = 2; p < n; p++) tl_reduce(out, out, src[p], count, dtype, redop);
  if (src != stack_src) free(src);
  return TL_OK;
}

int tl__oneshot_all_reduce(tl_comm_t *c, const void *in, void *out,
                           uint64_t count, int dtype, int redop) {
  size_t bytes = count * tl_dtype_size(dtype);
  char *scratch;
  int rc = tl__scratch(c, (size_t)c->size * bytes, &scratch);
  if (!rc) rc = exchange(c, scratch, bytes, in, 0, bytes);
  return rc ? rc : combine(c, out, in, scratch, count, dtype, redop);
}

int tl__oneshot_all_gather(tl_comm_t *c, const void *in, void *out, size_t bytes) {
  char *mine = (char *)out + (size_t)c->rank * bytes;
  if (bytes && mine != in) memcpy(mine, in, bytes);
  return exchange(c, out, bytes, in, 0, bytes);
}

int tl__direct_reduce_scatter(tl_comm_t *c, const void *in, void *out,
                              uint64_t count, int dtype, int redop) {
  size_t bytes = count * tl_dtype_size(dtype);
  char *scratch;
  int rc = tl__scratch(c, (size_t)c->size * bytes, &scratch);
  /* Block p of our input goes to rank p; rank p's block for us lands at p. */
  if (!rc) rc = exchange(c, scratch, bytes, in, bytes, bytes);
  return rc ? rc : combine(c, out, (const char *)in + (size_t)c->rank * bytes, scratch,
                           count, dtype, redop);
}
