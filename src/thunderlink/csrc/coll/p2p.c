/*
 * Point to point between any two ranks, broadcast and barrier.
 */
#include <stdlib.h>
#include <string.h>

#include "../core/internal.h"

static int check_peer(tl_comm_t *c, int peer, const char *what) {
  if (peer < 0 || peer >= c->size)
    return tl__error(c, TL_ERR_INVALID, "%s: rank %d is out of range (world size %d)",
                     what, peer, c->size);
  if (peer == c->rank)
    return tl__error(c, TL_ERR_INVALID, "%s: rank %d cannot %s itself", what, peer,
                     what);
  return TL_OK;
}

static int check_dtype(tl_comm_t *c, int dtype, uint64_t count, const char *what) {
  if (!tl_dtype_size(dtype))
    return tl__error(c, TL_ERR_INVALID, "%s: unsupported dtype %d (thunderlink "
                     "supports the 14 MLX dtypes)", what, dtype);
  if (count > ((uint64_t)1 << 60) / tl_dtype_size(dtype))
    return tl__error(c, TL_ERR_INVALID, "%s: %llu elements is too many", what,
                     (unsigned long long)count);
  return TL_OK;
}

/*
 * A message to or from one peer, cut into frames of at most TL_MAX_FRAME
 * bytes (each striped over the link's connections); frames carry the
 * link's message counter as their sequence number, so a send and a recv of
 * different sizes are caught.
 */
static int p2p(tl_comm_t *c, char *buf, uint64_t count, int dtype, int peer,
               int is_send) {
  const char *what = is_send ? "send" : "recv";
  if (!c) return TL_ERR_INVALID;
  int rc = check_dtype(c, dtype, count, what);
  if (!rc) rc = check_peer(c, peer, what);
  if (!rc && c->connected && c->links[peer].nchans == 0)
    rc = tl__error(c, TL_ERR_CONFIG, "%s: ranks %d and %d share no link (no address "
                   "of one is reachable from the other); give them a common "
                   "address in the hostfile", what, c->rank, peer);
  if (rc) return rc;
  size_t bytes = count * tl_dtype_size(dtype);
  if (bytes && !buf) return tl__error(c, TL_ERR_INVALID, "%s: NULL buffer", what);

  pthread_mutex_lock(&c->lock);
  tl_stats_t before = c->stats;
  rc = tl__op_begin(c, TL_OP_SEND, dtype, 0xff, bytes, what);
  if (!rc) {
    tl_link_t *l = &c->links[peer];
    c->cur.seq = is_send ? l->send_seq++ : l->recv_seq++;
    if (is_send) c->stats.last_in = (uintptr_t)buf;
    else c->stats.last_out = (uintptr_t)buf;
    size_t nframes = bytes ? (bytes + TL_MAX_FRAME - 1) / TL_MAX_FRAME : 1;
    tl_req_t *reqs = calloc(nframes, sizeof *reqs);
    if (!reqs) rc = tl__fail(c, TL_ERR_NOMEM, "out of memory");
    for (size_t f = 0; f < nframes && !rc; f++) {
      size_t off = f * TL_MAX_FRAME;
      size_t len = tl__min(TL_MAX_FRAME, bytes - off);
      tl_frame_t h = tl__frame(c, (uint32_t)f, 0);
      rc = is_send ? tl__isend(c, peer, tl__lane_all(), &h, buf + off, len, &reqs[f])
                   : tl__irecv(c, peer, tl__lane_all(), &h, buf + off, len, &reqs[f]);
    }
    if (!rc) rc = tl__wait_all(c, reqs, (int)nframes);
    free(reqs);
  }
  tl__op_end(c);
  tl__stats_publish(c, &before);
  pthread_mutex_unlock(&c->lock);
  return rc;
}

int tl_send(tl_comm_t *c, const void *buf, uint64_t count, int dtype, int peer) {
  return p2p(c, (char *)buf, count, dtype, peer, 1);
}

int tl_recv(tl_comm_t *c, void *buf, uint64_t count, int dtype, int peer) {
  return p2p(c, buf, count, dtype, peer, 0);
}

/*
 * Broadcast, as the plan says (select.c): small buffers go from the root to
 * every rank directly (flat); large ones flow down the ring from the root in
 * chunks (chain), each rank forwarding a chunk as soon as it has it, so
 * every link carries the data once and the time is about that of one
 * transfer, whatever the number of ranks.
 */
static int bcast_chain(tl_comm_t *c, char *buf, size_t bytes, int root) {
  int n = c->size;
  int rpos = 0;
  for (int i = 0; i < n; i++)
    if (c->ring[i] == root) rpos = i;
  int d = (c->ring_pos - rpos + n) % n; /* hops from the root */
  int prev = c->ring[(c->ring_pos + n - 1) % n];
  int next = c->ring[(c->ring_pos + 1) % n];
  int forwards = d < n - 1;
  int depth = c->cur.plan.depth;
  int K = tl_ring_nchunks(bytes, 1, c->cur.plan.chunk_bytes, depth);
  tl_req_t *rr = calloc((size_t)K * 2, sizeof *rr);
  if (!rr) return tl__fail(c, TL_ERR_NOMEM, "out of memory");
  tl_req_t *sr = rr + K;
  int rc = TL_OK;
  int rnext = 0, rdone = 0, snext = 0;
  if (d == 0) rdone = rnext = K; /* the root has everything */
  while (!rc) {
    /* Retire receives in order, forward, and keep `depth` receives queued. */
    while (rdone < rnext && rr[rdone].pending == 0) rdone++;
    while (forwards && snext < rdone) {
      uint64_t off, len;
      tl_chunk_range(bytes, K, snext, &off, &len);
      tl_frame_t h = tl__frame(c, (uint32_t)snext, (uint32_t)root);
      rc = tl__isend(c, next, tl__lane_all(), &h, buf + off, len, &sr[snext]);
      snext++;
      if (rc) break;
    }
    while (!rc && rnext < K && rnext - rdone < depth) {
      uint64_t off, len;
      tl_chunk_range(bytes, K, rnext, &off, &len);
      tl_frame_t h = tl__frame(c, (uint32_t)rnext, (uint32_t)root);
      rc = tl__irecv(c, prev, tl__lane_all(), &h, buf + off, len, &rr[rnext]);
      rnext++;
    }
    if (rc) break;
    int sends_done = 1;
    for (int j = 0; j < snext; j++) sends_done &= sr[j].pending == 0;
    if (rdone == K && (!forwards || (snext == K && sends_done))) break;
    rc = tl__progress(c);
  }
  free(rr);
  return rc;
}

static int bcast_flat(tl_comm_t *c, char *buf, size_t bytes, int root) {
  tl_frame_t h = tl__frame(c, 0, (uint32_t)root);
  if (c->rank != root) {
    tl_req_t r;
    int rc = tl__irecv(c, root, tl__lane_all(), &h, buf, bytes, &r);
    return rc ? rc : tl__wait(c, &r);
  }
  tl_req_t *reqs = calloc((size_t)c->size, sizeof *reqs);
  if (!reqs) return tl__fail(c, TL_ERR_NOMEM, "out of memory");
  int rc = TL_OK;
  for (int i = 1; i < c->size && !rc; i++) {
    int p = (root + i) % c->size;
    rc = tl__isend(c, p, tl__lane_all(), &h, buf, bytes, &reqs[p]);
  }
  if (!rc) rc = tl__wait_all(c, reqs, c->size);
  free(reqs);
  return rc;
}

int tl_broadcast(tl_comm_t *c, void *buf, uint64_t count, int dtype, int root) {
  if (!c) return TL_ERR_INVALID;
  int rc = check_dtype(c, dtype, count, "broadcast");
  if (rc) return rc;
  if (root < 0 || root >= c->size)
    return tl__error(c, TL_ERR_INVALID, "broadcast: root %d is out of range (world "
                     "size %d)", root, c->size);
  size_t bytes = count * tl_dtype_size(dtype);
  if (bytes && !buf) return tl__error(c, TL_ERR_INVALID, "broadcast: NULL buffer");
  pthread_mutex_lock(&c->lock);
  tl_stats_t before = c->stats;
  rc = tl__op_begin(c, TL_OP_BROADCAST, dtype, 0xff, bytes, "broadcast");
  c->cur.root = root;
  if (!rc && c->size > 1) {
    c->stats.last_in = c->stats.last_out = (uintptr_t)buf;
    rc = c->cur.plan.how == TL_HOW_ONE_ROUND ? bcast_flat(c, buf, bytes, root)
                                              : bcast_chain(c, buf, bytes, root);
  }
  tl__op_end(c);
  tl__stats_publish(c, &before);
  pthread_mutex_unlock(&c->lock);
  return rc;
}

int tl_barrier(tl_comm_t *c) {
  if (!c) return TL_ERR_INVALID;
  pthread_mutex_lock(&c->lock);
  tl_stats_t before = c->stats;
  int rc = tl__op_begin(c, TL_OP_BARRIER, TL_UINT8, 0xff, 0, "barrier");
  if (!rc && c->size > 1) {
    /* One byte each: a ring all_gather of nothing would exchange nothing. */
    char *buf;
    rc = tl__scratch(c, (size_t)c->size, &buf);
    if (!rc) rc = tl__gather_bytes(c, buf + c->rank, buf, c->mesh ? 0 : 1);
  }
  tl__op_end(c);
  tl__stats_publish(c, &before);
  pthread_mutex_unlock(&c->lock);
  return rc;
}
