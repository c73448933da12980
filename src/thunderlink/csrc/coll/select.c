/*
 * The algorithm choice: which algorithm runs an operation, cut how, on how
 * many lanes, spinning how long, as one pure function of the operation, its
 * size, the group and the options. tl__op_begin asks it once per operation
 * (c->cur.plan); the collectives and broadcast follow the plan. A tuning
 * profile will steer this function, and nothing else.
 */
#include "../core/internal.h"

/* Operations at or below this size spin briefly before sleeping in poll:
 * their replies come back within microseconds, and a sleep/wake-up costs
 * more than the wait. Larger ones sleep at once so no core burns. (Over
 * shared memory every operation spins: the channel's transport says so,
 * and progress.c applies it to the channels that have work.) */
#define TL_SPIN_MAX_BYTES ((uint64_t)256 << 10)

int tl__ring_lanes(const tl_options_t *o) { return o->conns_per_peer >= 2 ? 2 : 1; }

/*
 * The ring or one round of messages? `traffic` is what one round makes each
 * rank send: for all_reduce its whole buffer to every other rank, (n-1) x
 * bytes, against 2(n-1)/n x bytes for the ring; all_gather and the direct
 * reduce_scatter send what the ring sends, in one step instead of n-1. One
 * round wins while latency dominates: up to algo_threshold bytes of traffic
 * (on loopback between 2 ranks the one-shot all_reduce stays ahead of the
 * ring up to 512 KiB-1 MiB). It needs a link between every pair of ranks,
 * and the ring at least one element per rank.
 */
static int use_ring(const tl_options_t *o, uint64_t traffic, uint64_t elements, int n,
                    int mesh) {
  if (o->algo == TL_ALGO_RING || !mesh) return 1;
  if (o->algo == TL_ALGO_ONESHOT) return 0;
  return traffic > (uint64_t)o->algo_threshold && elements >= (uint64_t)n;
}

int tl_select(const tl_options_t *o, int op, uint64_t bytes, int dtype, int nranks,
              int mesh, int transport, tl_plan_t *out) {
  size_t es = tl_dtype_size(dtype);
  if (!o || !out || !es || nranks < 1 || op < 1 || op >= TL_NUM_OPS) return TL_ERR_INVALID;
  (void)transport; /* no choice depends on it yet: profiles will key on it */
  uint64_t n = (uint64_t)nranks;
  tl_plan_t p;
  p.how = TL_HOW_LOCAL;
  p.lanes = tl__ring_lanes(o);
  p.depth = o->pipeline_depth;
  p.chunk_bytes = o->chunk_bytes;
  p.spin_ns = bytes <= TL_SPIN_MAX_BYTES ? (int64_t)o->spin_us * 1000 : 0;
  int ring = TL_HOW_RING, one = TL_HOW_ONE_ROUND;
  switch (op) {
  case TL_OP_ALL_REDUCE: /* bytes: the buffer */
    p.how = use_ring(o, bytes * (n - 1), bytes / es, nranks, mesh) ? ring : one;
    break;
  case TL_OP_ALL_GATHER: /* bytes: this rank's input */
    p.how = use_ring(o, bytes * n, bytes / es * n, nranks, mesh) ? ring : one;
    break;
  case TL_OP_REDUCE_SCATTER: /* bytes: the whole input, n blocks */
    p.how = use_ring(o, bytes, bytes / es, nranks, mesh) ? ring : one;
    break;
  case TL_OP_BROADCAST:
    /* Small buffers go from the root to every rank directly; large ones
     * down the ring in chunks (p2p.c). Two ranks: direct is the chain. */
    p.how = mesh && bytes <= TL_MAX_FRAME &&
                    (bytes <= (uint64_t)o->algo_threshold || nranks == 2)
                ? one
                : TL_HOW_CHAIN;
    break;
  case TL_OP_BARRIER:
  case TL_OP_SPLIT: /* an all_gather of a few bytes: latency only */
    p.how = mesh ? one : ring;
    break;
  case TL_OP_SEND:
    p.how = TL_HOW_FRAMES;
    break;
  }
  if (nranks == 1 && op != TL_OP_SEND) p.how = TL_HOW_LOCAL;
  *out = p;
  return TL_OK;
}
