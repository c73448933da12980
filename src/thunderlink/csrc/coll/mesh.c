/*
 * The mesh: all_reduce, reduce_scatter and all_gather by direct exchange, for
 * groups in which every pair of ranks shares a link (four Macs with a
 * Thunderbolt cable between every pair).
 *
 * The data is cut into n blocks, block b owned by rank b. Reduce-scatter:
 * every rank sends block p to rank p, to every peer at once, each over its
 * own link, and reduces what it receives into its own block. All-gather:
 * every rank sends its reduced block to every peer. Each rank sends and
 * receives 2(n-1)/n of the buffer, as in the ring, but over n-1 links instead
 * of the ring's 2, so with four ranks every cable carries 1.5x less than in
 * the bidirectional ring; and it takes 2 steps instead of 2(n-1).
 *
 * Like the ring it is pipelined: blocks are cut into K chunks (the ring's
 * tl_ring_nchunks), and towards each peer the units are the K reduce-scatter
 * chunks, then the K all-gather chunks, in that order on the wire (frame
 * unit = index, lane 0). Up to pipeline_depth receives per peer are in
 * flight. Reduce-scatter chunks land in a slot of scratch memory and are
 * reduced into the output in a fixed order (this rank's data, then the peers
 * rank+1, rank+2, ...), so a result never depends on arrival order; a chunk
 * of this rank's block goes out in the all-gather as soon as it is fully
 * reduced. Every block is reduced once, by its owner, and then copied to the
 * others, so all ranks end with the same bits.
 *
 * In place (all_reduce with in == out), block p's chunk j is overwritten by
 * the all-gather from p only after it has been sent to p.
 */
#include <stdlib.h>
#include <string.h>

#include "../core/internal.h"

enum { M_IDLE = 0, M_POSTED = 1, M_DONE = 2 };

typedef struct peer {
  int rank;
  int64_t rnext, rlow; /* next receive to post; first not yet done */
  int64_t snext, slow; /* the same for sends */
  int routstanding;
  uint8_t *rst, *sst; /* per unit: M_* */
  tl_req_t *rreq, *sreq;
  int32_t *slot; /* per reduce-scatter unit: its scratch slot, or -1 */
  int32_t *freeslot;
  int nfree;
  char *slots;
} peer_t;

typedef struct mesh {
  tl_comm_t *c;
  int kind; /* TL_RING_* */
  const char *in;
  char *out;
  uint64_t count; /* all_reduce: the whole buffer; otherwise per rank */
  int dtype, redop;
  size_t es;
  int n, depth, inplace;
  int K;     /* chunks per block */
  int krs;   /* reduce-scatter units per peer: K or 0 */
  int64_t U; /* units per peer */
  int jred;  /* first chunk of this rank's block not fully reduced */
  int32_t *nred; /* per chunk: contributions of peers reduced so far */
  size_t slot_bytes;
  peer_t *peers; /* [n - 1]: peers[k - 1] is rank + k */
} mesh_t;

/* Block b, in elements: for all_reduce a part of the buffer (the same place
 * in and out), for reduce_scatter a block of in, for all_gather of out. */
static void block_range(const mesh_t *M, int b, uint64_t *off, uint64_t *len) {
  if (M->kind == TL_RING_ALL_REDUCE) {
    tl_chunk_range(M->count, M->n, b, off, len);
  } else {
    *off = (uint64_t)b * M->count;
    *len = M->count;
  }
}

/* Chunk j of block b: *off in the block space, *rel from the block's start. */
static void chunk_at(const mesh_t *M, int b, int j, uint64_t *off, uint64_t *len,
                     uint64_t *rel) {
  uint64_t bo, bl;
  block_range(M, b, &bo, &bl);
  tl_chunk_range(bl, M->K, j, rel, len);
  *off = bo + *rel;
}

static char *slot_mem(peer_t *P, int s, size_t bytes) {
  return P->slots + (size_t)s * bytes;
}

/* Reduce, in the fixed order, every arrived reduce-scatter chunk whose turn
 * has come; free its slot. */
static int reduce_ready(mesh_t *M) {
  int changed = 0, me = M->c->rank;
  size_t es = M->es;
  int64_t posted = 0; /* no chunk at or past every peer's next receive can be ready */
  for (int k = 0; k < M->n - 1; k++)
    if (M->peers[k].rnext > posted) posted = M->peers[k].rnext;
  for (int j = M->jred; j < M->K && j < posted; j++) {
    while (M->nred[j] < M->n - 1) {
      peer_t *P = &M->peers[M->nred[j]];
      if (P->rst[j] != M_DONE) break;
      uint64_t off, len, rel;
      chunk_at(M, me, j, &off, &len, &rel);
      if (len) {
        char *dst = M->out + (M->kind == TL_RING_REDUCE_SCATTER ? rel : off) * es;
        const char *a = M->nred[j] == 0 ? M->in + off * es : dst;
        tl_reduce(dst, a, slot_mem(P, P->slot[j], M->slot_bytes), len, M->dtype, M->redop);
        P->freeslot[P->nfree++] = P->slot[j];
        P->slot[j] = -1;
      }
      M->nred[j]++;
      changed = 1;
    }
    if (j == M->jred && M->nred[j] == M->n - 1) M->jred++;
  }
  return changed;
}

/* Retire finished requests and post what has become possible towards one
 * peer. Sets *changed when anything moved. */
static int pump_peer(mesh_t *M, peer_t *P, int *changed) {
  tl_comm_t *c = M->c;
  size_t es = M->es;
  int me = c->rank;
  int64_t before = P->rlow + P->slow + P->rnext + P->snext;
  for (int64_t u = P->rlow; u < P->rnext; u++)
    if (P->rst[u] == M_POSTED && !P->rreq[u].pending) {
      P->rst[u] = M_DONE;
      P->routstanding--;
      *changed = 1; /* a reduction may be possible */
    }
  while (P->rlow < P->rnext && P->rst[P->rlow] == M_DONE) P->rlow++;
  for (int64_t u = P->slow; u < P->snext; u++)
    if (P->sst[u] == M_POSTED && !P->sreq[u].pending) P->sst[u] = M_DONE;
  while (P->slow < P->snext && P->sst[P->slow] == M_DONE) P->slow++;

  /* Sends, in unit order: reduce-scatter chunks of the peer's block at once,
   * all-gather chunks of this rank's block once fully reduced. */
  while (P->snext < M->U) {
    int64_t u = P->snext;
    int rs = u < M->krs;
    int j = (int)(rs ? u : u - M->krs);
    if (!rs && M->kind == TL_RING_ALL_REDUCE && M->nred[j] < M->n - 1) break;
    uint64_t off, len, rel;
    chunk_at(M, rs ? P->rank : me, j, &off, &len, &rel);
    P->snext++;
    if (!len) {
      P->sst[u] = M_DONE;
      continue;
    }
    const char *src = (rs ? M->in : M->out) + off * es;
    tl_frame_t h = tl__frame(c, (uint32_t)u, 0);
    P->sst[u] = M_POSTED;
    int rc = tl__isend(c, P->rank, tl__lane_all(), &h, src, len * es, &P->sreq[u]);
    if (rc) return rc;
  }

  /* Receives, in unit order, up to the pipeline depth. */
  while (P->rnext < M->U && P->routstanding < M->depth) {
    int64_t u = P->rnext;
    int rs = u < M->krs;
    int j = (int)(rs ? u : u - M->krs);
    uint64_t off, len, rel;
    chunk_at(M, rs ? me : P->rank, j, &off, &len, &rel);
    if (!len) {
      P->rnext++;
      P->rst[u] = M_DONE;
      continue;
    }
    char *dst;
    if (rs) {
      if (!P->nfree) break;
      P->slot[u] = P->freeslot[--P->nfree];
      dst = slot_mem(P, P->slot[u], M->slot_bytes);
    } else {
      /* In place, block P's chunk j is the input sent to P: not before. */
      if (M->inplace && M->krs && P->sst[j] != M_DONE) break;
      dst = M->out + off * es;
    }
    P->rnext++;
    tl_frame_t h = tl__frame(c, (uint32_t)u, 0);
    P->rst[u] = M_POSTED;
    P->routstanding++;
    int rc = tl__irecv(c, P->rank, tl__lane_all(), &h, dst, len * es, &P->rreq[u]);
    if (rc) return rc;
  }
  if (P->rlow + P->slow + P->rnext + P->snext != before) *changed = 1;
  return TL_OK;
}

static int all_done(const mesh_t *M) {
  if (M->krs && M->jred < M->K) return 0;
  for (int k = 0; k < M->n - 1; k++)
    if (M->peers[k].rlow < M->U || M->peers[k].slow < M->U) return 0;
  return 1;
}

int tl__mesh_run(tl_comm_t *c, int kind, const void *in, void *out, uint64_t count,
                 int dtype, int redop) {
  mesh_t M;
  memset(&M, 0, sizeof M);
  M.c = c;
  M.kind = kind;
  M.in = in;
  M.out = out;
  M.count = count;
  M.dtype = dtype;
  M.redop = redop;
  M.es = tl_dtype_size(dtype);
  M.n = c->size;
  M.depth = c->cur.plan.depth;
  M.inplace = in == out;
  if (M.n < 2) return tl__error(c, TL_ERR_INVALID, "internal error: mesh of %d ranks", M.n);
  for (int p = 0; p < M.n; p++)
    if (p != c->rank && !c->links[p].nchans)
      return tl__error(c, TL_ERR_CONFIG, "the mesh algorithm needs a link between every "
                       "pair of ranks, and ranks %d and %d share none: use "
                       "THUNDERLINK_ALGO=ring (or auto)", c->rank, p);

  if (kind == TL_RING_ALL_GATHER) {
    char *mine = M.out + (size_t)c->rank * count * M.es;
    if (mine != M.in) memcpy(mine, M.in, count * M.es);
  }
  uint64_t longest = kind == TL_RING_ALL_REDUCE ? (count + (uint64_t)M.n - 1) / (uint64_t)M.n
                                                : count;
  M.K = tl_ring_nchunks(longest, M.es, c->cur.plan.chunk_bytes, M.depth);
  M.krs = kind == TL_RING_ALL_GATHER ? 0 : M.K;
  M.U = (int64_t)M.krs + (kind == TL_RING_REDUCE_SCATTER ? 0 : M.K);
  M.slot_bytes = (size_t)((longest + (uint64_t)M.K - 1) / (uint64_t)M.K) * M.es;
  M.slot_bytes = (M.slot_bytes + 63) & ~(size_t)63;
  int nslots = M.krs ? M.depth : 0;

  size_t np = (size_t)M.n - 1, nu = (size_t)M.U;
  size_t per = nu * (2 * sizeof(tl_req_t) + sizeof(int32_t) + 2) +
               (size_t)nslots * sizeof(int32_t) + 16;
  char *mem = calloc(1, np * (sizeof(peer_t) + per) + (size_t)M.K * sizeof(int32_t) + 64);
  if (!mem) return tl__fail(c, TL_ERR_NOMEM, "out of memory planning the mesh");
  char *m = mem;
  M.peers = (peer_t *)m; m += np * sizeof(peer_t);
  M.nred = (int32_t *)m; m += (size_t)M.K * sizeof(int32_t);
  m = (char *)(((uintptr_t)m + 15) & ~(uintptr_t)15);
  char *scratch = NULL;
  int rc = TL_OK;
  if (nslots) rc = tl__scratch(c, np * (size_t)nslots * M.slot_bytes, &scratch);
  for (size_t k = 0; k < np && !rc; k++) {
    peer_t *P = &M.peers[k];
    P->rank = (c->rank + (int)k + 1) % M.n;
    P->rreq = (tl_req_t *)m; m += nu * sizeof(tl_req_t);
    P->sreq = (tl_req_t *)m; m += nu * sizeof(tl_req_t);
    P->slot = (int32_t *)m; m += nu * sizeof(int32_t);
    P->freeslot = (int32_t *)m; m += (size_t)nslots * sizeof(int32_t);
    P->rst = (uint8_t *)m; m += nu;
    P->sst = (uint8_t *)m; m += nu;
    m = (char *)(((uintptr_t)m + 15) & ~(uintptr_t)15);
    for (size_t u = 0; u < nu; u++) P->slot[u] = -1;
    for (int s = 0; s < nslots; s++) P->freeslot[s] = nslots - 1 - s;
    P->nfree = nslots;
    P->slots = scratch ? scratch + k * (size_t)nslots * M.slot_bytes : NULL;
  }
  while (!rc) {
    int changed;
    do {
      changed = 0;
      for (size_t k = 0; k < np && !rc; k++) rc = pump_peer(&M, &M.peers[k], &changed);
      if (!rc && M.krs && reduce_ready(&M)) changed = 1;
    } while (changed && !rc);
    if (rc || all_done(&M)) break;
    rc = tl__progress(c);
  }
  free(mem);
  return rc;
}
