/*
 * Entry points of the reducing and gathering collectives: argument checks,
 * the communicator lock, and the algorithm the operation's plan names
 * (select.c).
 */
#include <string.h>

#include "../core/internal.h"

static int check_args(tl_comm_t *c, int dtype, int redop, uint64_t count,
                      uint64_t blocks, const void *in, const void *out,
                      const char *what) {
  size_t es = tl_dtype_size(dtype);
  if (!es)
    return tl__error(c, TL_ERR_INVALID, "%s: unsupported dtype %d (thunderlink "
                     "supports the 14 MLX dtypes)", what, dtype);
  if (redop != 0xff && (redop < 0 || redop >= TL_NUM_REDOPS))
    return tl__error(c, TL_ERR_INVALID, "%s: unknown reduction %d", what, redop);
  if (count > ((uint64_t)1 << 60) / es / blocks)
    return tl__error(c, TL_ERR_INVALID, "%s: %llu elements is too many", what,
                     (unsigned long long)count);
  if (count && (!in || !out))
    return tl__error(c, TL_ERR_INVALID, "%s: NULL buffer", what);
  return TL_OK;
}

/* Do [a, a+an) and [b, b+bn) overlap without being the same buffer? */
static int partial_overlap(const void *a, size_t an, const void *b, size_t bn) {
  const char *x = a, *y = b;
  if (!an || !bn || x == y) return 0;
  return x < y + bn && y < x + an;
}

#define BEGIN(op, dtype, redop, total, name)                                     \
  pthread_mutex_lock(&c->lock);                                                  \
  tl_stats_t before_ = c->stats;                                                 \
  int rc = tl__op_begin(c, op, dtype, redop, total, name);                       \
  if (!rc) {                                                                     \
    c->stats.last_in = (uintptr_t)in;                                            \
    c->stats.last_out = (uintptr_t)out;

#define END                                                                      \
  }                                                                              \
  tl__op_end(c);                                                                 \
  tl__stats_publish(c, &before_);                                                \
  pthread_mutex_unlock(&c->lock);                                                \
  return rc;

int tl_all_reduce(tl_comm_t *c, const void *in, void *out, uint64_t count,
                  int dtype, int op) {
  if (!c) return TL_ERR_INVALID;
  const char *name = tl__op_name(TL_OP_ALL_REDUCE, op);
  int bad = check_args(c, dtype, op, count, 1, in, out, name);
  if (bad) return bad;
  size_t bytes = count * tl_dtype_size(dtype);
  if (partial_overlap(in, bytes, out, bytes))
    return tl__error(c, TL_ERR_INVALID, "%s: input and output overlap without "
                     "being the same buffer", name);
  BEGIN(TL_OP_ALL_REDUCE, dtype, op, bytes, name)
  if (c->cur.plan.how == TL_HOW_LOCAL) {
    if (in != out && bytes) memcpy(out, in, bytes);
  } else if (c->cur.plan.how == TL_HOW_RING) {
    rc = tl__ring_run(c, TL_RING_ALL_REDUCE, in, out, count, dtype, op);
  } else if (c->cur.plan.how == TL_HOW_MESH) {
    rc = tl__mesh_run(c, TL_RING_ALL_REDUCE, in, out, count, dtype, op);
  } else {
    rc = tl__oneshot_all_reduce(c, in, out, count, dtype, op);
  }
  END
}

int tl_all_gather(tl_comm_t *c, const void *in, void *out, uint64_t count,
                  int dtype) {
  if (!c) return TL_ERR_INVALID;
  int bad = check_args(c, dtype, 0xff, count, (uint64_t)c->size, in, out, "all_gather");
  if (bad) return bad;
  size_t bytes = count * tl_dtype_size(dtype);
  size_t total = bytes * (size_t)c->size;
  const char *mine = (const char *)out + (size_t)c->rank * bytes;
  if (in != mine && partial_overlap(in, bytes, out, total))
    return tl__error(c, TL_ERR_INVALID, "all_gather: the input overlaps the output "
                     "other than as this rank's block");
  BEGIN(TL_OP_ALL_GATHER, dtype, 0xff, bytes, "all_gather")
  if (c->cur.plan.how == TL_HOW_LOCAL) {
    if (in != out && bytes) memcpy(out, in, bytes);
  } else if (c->cur.plan.how == TL_HOW_RING) {
    rc = tl__ring_run(c, TL_RING_ALL_GATHER, in, out, count, dtype, 0xff);
  } else if (c->cur.plan.how == TL_HOW_MESH) {
    rc = tl__mesh_run(c, TL_RING_ALL_GATHER, in, out, count, dtype, 0xff);
  } else {
    rc = tl__oneshot_all_gather(c, in, out, bytes);
  }
  END
}

int tl_reduce_scatter(tl_comm_t *c, const void *in, void *out, uint64_t count,
                      int dtype, int op) {
  if (!c) return TL_ERR_INVALID;
  int bad = check_args(c, dtype, op, count, (uint64_t)c->size, in, out, "reduce_scatter");
  if (bad) return bad;
  size_t bytes = count * tl_dtype_size(dtype);
  size_t total = bytes * (size_t)c->size;
  if (partial_overlap(in, total, out, bytes) || (in == out && c->size > 1 && bytes))
    return tl__error(c, TL_ERR_INVALID, "reduce_scatter: the output must not overlap "
                     "the input");
  BEGIN(TL_OP_REDUCE_SCATTER, dtype, op, total, "reduce_scatter")
  if (c->cur.plan.how == TL_HOW_LOCAL) {
    if (in != out && bytes) memcpy(out, in, bytes);
  } else if (c->cur.plan.how == TL_HOW_RING) {
    rc = tl__ring_run(c, TL_RING_REDUCE_SCATTER, in, out, count, dtype, op);
  } else if (c->cur.plan.how == TL_HOW_MESH) {
    rc = tl__mesh_run(c, TL_RING_REDUCE_SCATTER, in, out, count, dtype, op);
  } else {
    rc = tl__direct_reduce_scatter(c, in, out, count, dtype, op);
  }
  END
}

int tl__gather_bytes(tl_comm_t *c, const void *in, void *out, size_t bytes) {
  if (c->cur.plan.how == TL_HOW_ONE_ROUND) return tl__oneshot_all_gather(c, in, out, bytes);
  return tl__ring_run(c, TL_RING_ALL_GATHER, in, out, bytes, TL_UINT8, 0xff);
}
