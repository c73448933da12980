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
  if (o->algo == TL_ALGO_RING || o->algo == TL_ALGO_MESH || !mesh) return 1;
  if (o->algo == TL_ALGO_ONESHOT) return 0;
  return traffic > (uint64_t)o->algo_threshold && elements >= (uint64_t)n;
}

/*
 * Above the one-round sizes: the ring, or the mesh (mesh.c) where every pair
 * of ranks shares a link. Both send 2(n-1)/n of the buffer per rank; the mesh
 * spreads it over the n-1 links instead of the ring's 2, which pays where
 * each link is its own cable (TL_MESH_CABLED: four Macs cabled in a full
 * mesh). Over one shared path (loopback, one switch port) or shared memory it
 * gains nothing, and the ring's on-arrival reduction wins. Two ranks: the
 * same traffic, and the ring already uses both directions.
 */
static int use_mesh(const tl_options_t *o, int n, int mesh) {
  if (!mesh || n < 2) return 0;
  if (o->algo == TL_ALGO_MESH) return 1;
  return o->algo == TL_ALGO_AUTO && mesh == TL_MESH_CABLED && n >= 3;
}

/*
 * A tuning profile's first row for this operation, size band, group size and
 * transport replaces the options' choice where it says something. An
 * algorithm the group cannot run (one round or the mesh without a link
 * between every pair) is ignored, and so is an algorithm for operations that
 * have no choice of it; lanes never exceed what the connections allow.
 */
static void apply_profile(const tl_options_t *o, int op, uint64_t bytes, int nranks, int mesh,
                          int transport, tl_plan_t *p) {
  for (int i = 0; i < o->ntune && i < TL_MAX_TUNE_ROWS; i++) {
    const tl_tune_row_t *r = &o->tune[i];
    if (r->op != op || (r->nranks && r->nranks != nranks) ||
        (r->transport && r->transport != transport) || bytes < r->min_bytes ||
        (r->max_bytes && bytes >= r->max_bytes))
      continue;
    int choosable = op == TL_OP_ALL_REDUCE || op == TL_OP_ALL_GATHER ||
                    op == TL_OP_REDUCE_SCATTER;
    if (choosable && (r->how == TL_HOW_RING || (mesh && r->how != -1))) p->how = r->how;
    if (r->depth) p->depth = r->depth;
    if (r->chunk_bytes) p->chunk_bytes = r->chunk_bytes;
    if (r->lanes) p->lanes = r->lanes < tl__ring_lanes(o) ? r->lanes : tl__ring_lanes(o);
    return;
  }
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
  int ring = use_mesh(o, nranks, mesh) ? TL_HOW_MESH : TL_HOW_RING, one = TL_HOW_ONE_ROUND;
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
  if (nranks > 1) apply_profile(o, op, bytes, nranks, mesh, transport, &p);
  *out = p;
  return TL_OK;
}

int tl_comm_plan(tl_comm_t *c, int op, uint64_t bytes, int dtype, tl_plan_t *out) {
  if (!c || !out) return TL_ERR_INVALID;
  pthread_mutex_lock(&c->lock);
  int rc = c->connected ? tl_select(&c->opts, op, bytes, dtype, c->size, c->mesh, c->transport, out)
                        : tl__error(c, TL_ERR_INVALID, "tl_comm_plan before tl_comm_connect");
  pthread_mutex_unlock(&c->lock);
  return rc;
}
