/*
 * The pipelined ring: all_reduce (reduce-scatter then all-gather),
 * reduce_scatter and all_gather.
 *
 * The data is cut into n blocks, one per ring position (schedule.c names
 * blocks by position). To use both directions of every link, the ring runs
 * as up to two instances at once: instance 0 goes round the ring one way with
 * the first part of every block, instance 1 the other way with the rest,
 * each on its own connections (its lane). Every instance cuts its part of a
 * block into chunks and walks its (step, chunk) units in the order of
 * tl_ring_unit, keeping up to pipeline_depth receives in flight: while one
 * chunk is being reduced, the next ones are arriving and the previous ones
 * are leaving.
 *
 * Where chunks land:
 *  - all-gather steps, and reduce-scatter steps of an out-of-place
 *    all_reduce, receive straight into the output, which is then reduced
 *    with the input in place: no copy and no scratch memory;
 *  - an in-place all_reduce receives reduce-scatter chunks into a slot of
 *    scratch memory and reduces them into the output;
 *  - reduce_scatter keeps partial sums in slots until they have been
 *    forwarded; only the last step writes the output;
 *  - where the link can be read in place (shared memory), reduce-scatter
 *    chunks are combined with this rank's data as they arrive, straight out
 *    of the channel (tl__irecv_reduce): no copy, and no slot for all_reduce.
 * Every block is reduced once, by its final owner, and then copied around,
 * so all ranks end with the same bits.
 */
#include <stdlib.h>
#include <string.h>

#include "../core/internal.h"

enum { U_IDLE = 0, U_POSTED = 1, U_DONE = 2 };

typedef struct inst {
  int id;
  int dir;  /* +1: base ring order; -1: reversed */
  int ipos; /* this rank's position in the instance's ring */
  tl_lane_t lane;
  int left, right;
  int T, t0; /* local steps 0..T-1 are tl_ring_step steps t0.. */
  int K, G;  /* chunks per block part; chunk columns per group */
  int direct; /* reduce-scatter chunks combined on arrival (tl__irecv_reduce) */
  int64_t nunits;
  int64_t rnext, rhead, snext, shead;
  int routstanding;
  uint8_t *rst, *sst;
  tl_req_t *rreq, *sreq;
  int32_t *slot;     /* per unit: scratch slot holding its data, or -1 */
  int32_t *freeslot; /* stack of free slots */
  int nfree;
  char *slots;
  size_t slot_bytes;
} inst_t;

typedef struct ring {
  tl_comm_t *c;
  int kind;
  const char *in;
  char *out;
  uint64_t count; /* all_reduce: whole buffer; otherwise per rank */
  int dtype, redop;
  size_t es;
  int n, ninst, depth;
  int inplace;
  inst_t inst[2];
} ring_t;

/* Base ring position of the block at instance position q. */
static int base_pos(const ring_t *R, const inst_t *I, int q) {
  return I->dir > 0 ? q : (R->n - q) % R->n;
}

/* Element range of a block (in base naming) in the block space: the whole
 * buffer for all_reduce, in[] for reduce_scatter, out[] for all_gather. */
static void block_range(const ring_t *R, int p, uint64_t *off, uint64_t *len) {
  if (R->kind == TL_RING_ALL_REDUCE) {
    tl_chunk_range(R->count, R->n, p, off, len);
  } else {
    *off = (uint64_t)R->c->ring[p] * R->count;
    *len = R->count;
  }
}

/* Elements of chunk j of instance I's part of the block at instance position
 * q: *off in the block space, *own_off relative to the block's start. */
static void chunk_at(const ring_t *R, const inst_t *I, int q, int j, uint64_t *off,
                     uint64_t *len, uint64_t *own_off) {
  uint64_t bo, bl, so, sl, co, cl;
  block_range(R, base_pos(R, I, q), &bo, &bl);
  tl_chunk_range(bl, R->ninst, I->id, &so, &sl);
  tl_chunk_range(sl, I->K, j, &co, &cl);
  *off = bo + so + co;
  *len = cl;
  *own_off = so + co;
}

static int rs_step(const ring_t *R, const inst_t *I, int t) {
  return R->kind != TL_RING_ALL_GATHER && I->t0 + t < R->n - 1;
}

static int slot_get(inst_t *I) { return I->nfree ? I->freeslot[--I->nfree] : -1; }

static void slot_put(inst_t *I, int64_t u) {
  if (I->slot[u] >= 0) I->freeslot[I->nfree++] = I->slot[u];
  I->slot[u] = -1;
}

static char *slot_mem(inst_t *I, int s) { return I->slots + (size_t)s * I->slot_bytes; }

/* A receive finished: reduce it if it belongs to the reduce-scatter. */
static void on_recv_done(ring_t *R, inst_t *I, int64_t u) {
  int t, j;
  tl_ring_unit(I->K, I->G, I->T, u, &t, &j);
  if (rs_step(R, I, t) && !I->direct) {
    int sb, rb;
    tl_ring_step(R->n, I->ipos, I->t0 + t, &sb, &rb);
    uint64_t off, len, own;
    chunk_at(R, I, rb, j, &off, &len, &own);
    size_t es = R->es;
    if (len) {
      if (R->kind == TL_RING_ALL_REDUCE) {
        char *o = R->out + off * es;
        tl_reduce(o, o, R->inplace ? slot_mem(I, I->slot[u]) : R->in + off * es,
                  len, R->dtype, R->redop);
        slot_put(I, u);
      } else if (I->t0 + t == R->n - 2) { /* reduce_scatter, own block */
        tl_reduce(R->out + own * es, slot_mem(I, I->slot[u]), R->in + off * es, len,
                  R->dtype, R->redop);
        slot_put(I, u);
      } else {
        char *s = slot_mem(I, I->slot[u]);
        tl_reduce(s, s, R->in + off * es, len, R->dtype, R->redop);
      }
    }
  }
  I->rst[u] = U_DONE;
}

static void on_send_done(ring_t *R, inst_t *I, int64_t u) {
  I->sst[u] = U_DONE;
  if (R->kind != TL_RING_REDUCE_SCATTER) return;
  int t, j;
  tl_ring_unit(I->K, I->G, I->T, u, &t, &j);
  if (t > 0) slot_put(I, tl_ring_unit_index(I->K, I->G, I->T, t - 1, j));
}

/* Retire finished units and post what has become possible, until nothing
 * changes (a send can finish as it is posted, and an empty chunk finishes
 * at once, either of which can enable more). Returns a status. */
static int pump_once(ring_t *R, inst_t *I, int *changed);

static int pump(ring_t *R, inst_t *I) {
  int changed;
  do {
    changed = 0;
    int rc = pump_once(R, I, &changed);
    if (rc) return rc;
  } while (changed);
  return TL_OK;
}

static int pump_once(ring_t *R, inst_t *I, int *changed) {
  tl_comm_t *c = R->c;
  size_t es = R->es;
  int64_t rhead0 = I->rhead, shead0 = I->shead, rnext0 = I->rnext, snext0 = I->snext;
  for (int64_t u = I->rhead; u < I->rnext; u++) {
    if (I->rst[u] != U_POSTED || I->rreq[u].pending) continue;
    on_recv_done(R, I, u);
    I->routstanding--;
  }
  while (I->rhead < I->rnext && I->rst[I->rhead] == U_DONE) I->rhead++;
  for (int64_t u = I->shead; u < I->snext; u++)
    if (I->sst[u] == U_POSTED && !I->sreq[u].pending) on_send_done(R, I, u);
  while (I->shead < I->snext && I->sst[I->shead] == U_DONE) I->shead++;

  /* Sends, in unit order, as soon as the chunk they forward is ready. */
  while (I->snext < I->nunits) {
    int64_t u = I->snext;
    int t, j, sb, rb;
    tl_ring_unit(I->K, I->G, I->T, u, &t, &j);
    int64_t dep = t > 0 ? tl_ring_unit_index(I->K, I->G, I->T, t - 1, j) : -1;
    if (dep >= 0 && I->rst[dep] != U_DONE) break;
    tl_ring_step(R->n, I->ipos, I->t0 + t, &sb, &rb);
    uint64_t off, len, own;
    chunk_at(R, I, sb, j, &off, &len, &own);
    I->snext++;
    if (!len) {
      on_send_done(R, I, u);
      continue;
    }
    const char *src;
    if (R->kind == TL_RING_REDUCE_SCATTER)
      src = dep < 0 ? R->in + off * es : slot_mem(I, I->slot[dep]);
    else if (R->kind == TL_RING_ALL_REDUCE && I->t0 + t == 0)
      src = R->in + off * es;
    else
      src = R->out + off * es;
    tl_frame_t h = tl__frame(c, (uint32_t)u, (uint32_t)I->id);
    I->sst[u] = U_POSTED;
    int rc = tl__isend(c, I->right, I->lane, &h, src, len * es, &I->sreq[u]);
    if (rc) return rc;
  }

  /* Receives, in unit order, up to the pipeline depth. */
  while (I->rnext < I->nunits && I->routstanding < R->depth) {
    int64_t u = I->rnext;
    int t, j, sb, rb;
    tl_ring_unit(I->K, I->G, I->T, u, &t, &j);
    tl_ring_step(R->n, I->ipos, I->t0 + t, &sb, &rb);
    uint64_t off, len, own;
    chunk_at(R, I, rb, j, &off, &len, &own);
    if (!len) {
      I->rnext++;
      I->rst[u] = U_DONE;
      continue;
    }
    char *dst;
    const char *other = NULL; /* combine on arrival with this */
    int rs = rs_step(R, I, t);
    int last = I->t0 + t == R->n - 2; /* reduce_scatter: this rank's own block */
    int staged = rs && (R->kind == TL_RING_REDUCE_SCATTER ? !(I->direct && last)
                                                          : R->inplace && !I->direct);
    if (rs && I->direct) other = R->in + off * es;
    if (staged) {
      int s = slot_get(I);
      if (s < 0) break;
      I->slot[u] = s;
      dst = slot_mem(I, s);
    } else {
      dst = R->out + (R->kind == TL_RING_REDUCE_SCATTER ? own : off) * es;
    }
    I->rnext++;
    tl_frame_t h = tl__frame(c, (uint32_t)u, (uint32_t)I->id);
    I->rst[u] = U_POSTED;
    I->routstanding++;
    int rc = other ? tl__irecv_reduce(c, I->left, I->lane, &h, dst, other, len * es, R->dtype,
                                      R->redop, &I->rreq[u])
                   : tl__irecv(c, I->left, I->lane, &h, dst, len * es, &I->rreq[u]);
    if (rc) return rc;
  }
  *changed = I->rhead != rhead0 || I->shead != shead0 || I->rnext != rnext0 ||
             I->snext != snext0;
  return TL_OK;
}

static int inst_done(const inst_t *I) {
  return I->rhead == I->nunits && I->shead == I->nunits;
}

static int setup(ring_t *R, inst_t *I, int id, char **mem, size_t *need) {
  tl_comm_t *c = R->c;
  int n = R->n;
  I->id = id;
  I->dir = id % 2 == 0 ? 1 : -1;
  I->ipos = I->dir > 0 ? c->ring_pos : (n - c->ring_pos) % n;
  I->lane.first = id;
  I->lane.step = R->ninst;
  I->left = c->ring[base_pos(R, I, (I->ipos + n - 1) % n)];
  I->right = c->ring[base_pos(R, I, (I->ipos + 1) % n)];
  I->direct = R->kind != TL_RING_ALL_GATHER && tl__can_reduce_in_place(c, I->left);
  I->T = R->kind == TL_RING_ALL_REDUCE ? 2 * (n - 1) : n - 1;
  I->t0 = R->kind == TL_RING_ALL_GATHER ? n - 1 : 0;
  /* The longest part of any block decides the chunk count. */
  uint64_t longest = 0;
  for (int p = 0; p < n; p++) {
    uint64_t bo, bl, so, sl;
    block_range(R, p, &bo, &bl);
    tl_chunk_range(bl, R->ninst, id, &so, &sl);
    if (sl > longest) longest = sl;
  }
  I->K = tl_ring_nchunks(longest, R->es, c->cur.plan.chunk_bytes, R->depth);
  I->G = I->K < R->depth ? I->K : R->depth;
  I->nunits = (int64_t)I->T * I->K;
  I->slot_bytes = (size_t)((longest + (uint64_t)I->K - 1) / (uint64_t)I->K) * R->es;
  I->slot_bytes = (I->slot_bytes + 63) & ~(size_t)63;
  int nslots = 0;
  if (R->kind == TL_RING_REDUCE_SCATTER) nslots = R->depth + I->G;
  else if (R->kind == TL_RING_ALL_REDUCE && R->inplace) nslots = R->depth;
  size_t nu = (size_t)I->nunits;
  size_t bytes = nu * (2 * sizeof(tl_req_t) + sizeof(int32_t) + 2) +
                 (size_t)nslots * sizeof(int32_t) + 64;
  *mem = calloc(1, bytes);
  if (!*mem) return TL_ERR_NOMEM;
  char *m = *mem;
  I->rreq = (tl_req_t *)m; m += nu * sizeof(tl_req_t);
  I->sreq = (tl_req_t *)m; m += nu * sizeof(tl_req_t);
  I->slot = (int32_t *)m; m += nu * sizeof(int32_t);
  I->freeslot = (int32_t *)m; m += (size_t)nslots * sizeof(int32_t);
  I->rst = (uint8_t *)m; m += nu;
  I->sst = (uint8_t *)m;
  for (size_t u = 0; u < nu; u++) I->slot[u] = -1;
  for (int s = 0; s < nslots; s++) I->freeslot[s] = nslots - 1 - s;
  I->nfree = nslots;
  *need = (size_t)nslots * I->slot_bytes;
  return TL_OK;
}

int tl__ring_run(tl_comm_t *c, int kind, const void *in, void *out,
                 uint64_t count, int dtype, int redop) {
  ring_t R;
  memset(&R, 0, sizeof R);
  R.c = c;
  R.kind = kind;
  R.in = in;
  R.out = out;
  R.count = count;
  R.dtype = dtype;
  R.redop = redop;
  R.es = tl_dtype_size(dtype);
  R.n = c->size;
  R.depth = c->cur.plan.depth;
  R.inplace = in == out;
  /* One instance per lane: two (one per direction) need two disjoint lanes,
   * which the plan gives only with two or more connections. */
  R.ninst = c->cur.plan.lanes;

  if (kind == TL_RING_ALL_GATHER) {
    char *mine = R.out + (size_t)c->rank * count * R.es;
    if (mine != R.in) memcpy(mine, R.in, count * R.es);
  }

  char *mem[2] = {NULL, NULL};
  size_t need[2] = {0, 0};
  int rc = TL_OK;
  for (int i = 0; i < R.ninst && !rc; i++)
    if (setup(&R, &R.inst[i], i, &mem[i], &need[i]))
      rc = tl__fail(c, TL_ERR_NOMEM, "out of memory planning the ring");
  if (!rc && need[0] + need[1]) {
    char *s;
    rc = tl__scratch(c, need[0] + need[1], &s);
    if (!rc) {
      R.inst[0].slots = s;
      R.inst[1].slots = s + need[0];
    }
  }
  while (!rc) {
    int done = 1;
    for (int i = 0; i < R.ninst && !rc; i++) {
      rc = pump(&R, &R.inst[i]);
      done &= inst_done(&R.inst[i]);
    }
    if (rc || done) break;
    rc = tl__progress(c);
  }
  free(mem[0]);
  free(mem[1]);
  return rc;
}
