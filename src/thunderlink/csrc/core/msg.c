/*
 * Messages: operation bookkeeping, striping a message over the connections
 * of a lane, waiting, and checking received frame headers.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int tl__op_begin(tl_comm_t *c, int op, int dtype, int redop, uint64_t total,
                 const char *name) {
  if (c->status) return c->status;
  if (c->closed)
    return tl__error(c, TL_ERR_CLOSED,
                     "%s: the communicator was closed (tl_comm_close)", name);
  if (!c->connected && c->size > 1)
    return tl__error(c, TL_ERR_INVALID,
                     "%s: the communicator is not connected yet (call "
                     "tl_comm_connect first)", name);
  if (c->pending_abort[0]) {
    c->cur.op = op;
    c->cur.name = name;
    c->cur.seq = c->coll_seq + 1;
    c->cur.dtype = dtype;
    c->cur.total = total;
    return tl__fail(c, TL_ERR_PEER, "%s", c->pending_abort);
  }
  c->cur.op = op;
  c->cur.dtype = dtype;
  c->cur.redop = redop;
  c->cur.total = total;
  c->cur.name = name;
  c->cur.root = -1;
  if (tl_select(&c->opts, op, total, dtype, c->size, c->mesh, c->transport, &c->cur.plan))
    return tl__error(c, TL_ERR_INVALID, "internal error: %s: no algorithm for op %d, dtype %d",
                     name, op, dtype);
  c->cur.seq = op == TL_OP_SEND ? 0 : ++c->coll_seq;
  c->deadline_ns = tl__now_ns() + (int64_t)c->opts.timeout_ms * 1000000;
  c->intr_gen = tl__intr_count(); /* only later interrupts concern it */
  c->intr_ns = 0;
  /* Paired with tl_comm_close: either it sees this call in flight and wakes
   * it, or this call sees the close and does not start. */
  atomic_store(&c->in_op, 1);
  if (atomic_load(&c->closing)) {
    int rc = tl__error(c, TL_ERR_CLOSED, "the communicator is being closed "
                       "(close() on another thread)");
    tl__op_end(c);
    return rc;
  }
  if (op >= 0 && op < TL_NUM_OPS) c->stats.calls[op]++;
  return TL_OK;
}

void tl__op_end(tl_comm_t *c) {
  /* Transports let go of the call's buffers (see tl_transport_ops_t.op_end). */
  for (int p = 0; c->links && p < c->size; p++)
    if (c->links[p].ops && c->links[p].ops->op_end) c->links[p].ops->op_end(&c->links[p]);
  c->cur.op = 0;
  atomic_store(&c->in_op, 0);
}

tl_frame_t tl__frame(tl_comm_t *c, uint32_t unit, uint32_t lane) {
  tl_frame_t f;
  memset(&f, 0, sizeof f);
  f.magic = TL_FRAME_MAGIC;
  f.type = TL_FRAME_DATA;
  f.op = (uint8_t)c->cur.op;
  f.dtype = (uint8_t)c->cur.dtype;
  f.redop = (uint8_t)c->cur.redop;
  f.seq = c->cur.seq;
  f.total = c->cur.total;
  f.unit = unit;
  f.lane = lane;
  return f;
}

/* ---- slice pool ------------------------------------------------------------ */

static tl_slice_t *slice_get(tl_comm_t *c) {
  tl_slice_t *s = c->free_slices;
  if (s) {
    c->free_slices = s->next;
  } else {
    s = malloc(sizeof *s);
    if (!s) return NULL;
  }
  memset(s, 0, sizeof *s);
  return s;
}

void tl__slice_free(tl_comm_t *c, tl_slice_t *s) {
  s->next = c->free_slices;
  c->free_slices = s;
}

void tl__slice_done(tl_comm_t *c, tl_slice_t *s) {
  s->req->pending--;
  tl__slice_free(c, s);
}

/* ---- striping -------------------------------------------------------------- */

/*
 * Cut len bytes over the lane's channels in proportion to their shares.
 * Both ends compute this from the same inputs (len, the lane, and the shares
 * fixed at connect time from the common endpoint table), so the slices match
 * byte for byte. Messages below stripe_min_bytes, and empty ones, travel
 * whole on the lane's first channel. Slice boundaries are rounded to 4 KiB.
 */
static int post(tl_comm_t *c, int peer, tl_lane_t lane, const tl_frame_t *hdr,
                char *buf, size_t len, tl_req_t *req, int is_send, const tl_slice_t *red) {
  tl_link_t *l = &c->links[peer];
  int conns[TL_MAX_CONNS];
  int n = 0;
  for (int k = lane.first; k < l->nchans && n < TL_MAX_CONNS; k += lane.step)
    conns[n++] = k;
  if (n == 0)
    return tl__fail(c, TL_ERR_INVALID,
                    "internal error: lane %d/%d is empty on the link to rank %d "
                    "(%d channels)", lane.first, lane.step, peer, l->nchans);
  if (len == 0 || len < (size_t)c->opts.stripe_min_bytes) n = 1;

  uint64_t total_share = 0;
  for (int i = 0; i < n; i++) total_share += l->share[conns[i]];

  req->pending = 0;
  req->peer = peer;
  req->is_send = is_send;
  req->bytes = len;
  size_t off = 0;
  for (int i = 0; i < n; i++) {
    size_t part;
    if (i == n - 1) {
      part = len - off;
    } else {
      part = (size_t)((uint64_t)len * l->share[conns[i]] / total_share);
      part &= ~(size_t)4095;
    }
    if (part == 0 && !(len == 0 && i == 0)) continue;
    tl_slice_t *s = slice_get(c);
    if (!s) return tl__fail(c, TL_ERR_NOMEM, "out of memory queueing a message");
    s->req = req;
    s->hdr = *hdr;
    s->hdr.len = (uint32_t)part;
    s->buf = buf + off;
    s->len = part;
    if (red) {
      s->other = red->other + off;
      s->dtype = red->dtype;
      s->redop = red->redop;
    }
    req->pending++;
    int rc = tl__chan_post(c, &l->chans[conns[i]], s, is_send);
    if (rc) return rc;
    off += part;
  }
  return TL_OK;
}

int tl__isend(tl_comm_t *c, int peer, tl_lane_t lane, const tl_frame_t *hdr,
              const void *buf, size_t len, tl_req_t *req) {
  if (len > TL_MAX_FRAME)
    return tl__fail(c, TL_ERR_INVALID, "internal error: message of %zu B exceeds "
                    "the frame limit", len);
  return post(c, peer, lane, hdr, (char *)buf, len, req, 1, NULL);
}

int tl__irecv(tl_comm_t *c, int peer, tl_lane_t lane, const tl_frame_t *hdr,
              void *buf, size_t len, tl_req_t *req) {
  if (len > TL_MAX_FRAME)
    return tl__fail(c, TL_ERR_INVALID, "internal error: message of %zu B exceeds "
                    "the frame limit", len);
  return post(c, peer, lane, hdr, (char *)buf, len, req, 0, NULL);
}

int tl__irecv_reduce(tl_comm_t *c, int peer, tl_lane_t lane, const tl_frame_t *hdr,
                     void *buf, const void *other, size_t len, int dtype, int redop,
                     tl_req_t *req) {
  if (len > TL_MAX_FRAME || !tl__can_reduce_in_place(c, peer))
    return tl__fail(c, TL_ERR_INVALID, "internal error: reduce-on-receive of %zu B from "
                    "rank %d", len, peer);
  tl_slice_t red;
  memset(&red, 0, sizeof red);
  red.other = other;
  red.dtype = dtype;
  red.redop = redop;
  return post(c, peer, lane, hdr, (char *)buf, len, req, 0, &red);
}

int tl__wait(tl_comm_t *c, tl_req_t *req) {
  while (req->pending > 0) {
    int rc = tl__progress(c);
    if (rc) return rc;
  }
  return TL_OK;
}

int tl__wait_all(tl_comm_t *c, tl_req_t *reqs, int n) {
  for (int i = 0; i < n; i++) {
    int rc = tl__wait(c, &reqs[i]);
    if (rc) return rc;
  }
  return TL_OK;
}

/* ---- frame checks ------------------------------------------------------------ */

static void describe(const tl_frame_t *f, char *buf, size_t cap) {
  if (f->op == TL_OP_SEND)
    snprintf(buf, cap, "send #%u (%s, %llu B)", f->seq, tl__dtype_name(f->dtype),
             (unsigned long long)f->total);
  else
    snprintf(buf, cap, "%s #%u (%s, %llu B)", tl__op_name(f->op, f->redop),
             f->seq, tl__dtype_name(f->dtype), (unsigned long long)f->total);
}

int tl__check_frame(tl_comm_t *c, int peer, const tl_frame_t *want,
                    const tl_frame_t *got, const char *where) {
  if (got->magic != TL_FRAME_MAGIC)
    return tl__fail(c, TL_ERR_PROTOCOL,
                    "rank %d (%s) sent bytes that are not a thunderlink frame "
                    "(magic 0x%08x); the stream is corrupt", peer, where,
                    got->magic);
  if (got->type != TL_FRAME_DATA)
    return tl__fail(c, TL_ERR_PROTOCOL,
                    "rank %d (%s) sent a frame of type %u where data was expected; "
                    "the stream is corrupt", peer, where, got->type);
  if (got->op == want->op && got->seq == want->seq && got->dtype == want->dtype &&
      got->redop == want->redop && got->total == want->total) {
    if (got->len == want->len && got->unit == want->unit &&
        got->lane == want->lane)
      return TL_OK;
    if (want->op == TL_OP_BROADCAST && got->lane != want->lane)
      return tl__fail(c, TL_ERR_MISMATCH,
                      "rank %d called broadcast #%u from root %u while this rank "
                      "called it from root %u: every rank must name the same root",
                      peer, got->seq, got->lane, want->lane);
    return tl__fail(c, TL_ERR_PROTOCOL,
                    "rank %d (%s) sent frame unit %u lane %u of %u B where unit "
                    "%u lane %u of %u B was expected; are THUNDERLINK_* tuning "
                    "variables the same on every rank?", peer, where, got->unit,
                    got->lane, got->len, want->unit, want->lane, want->len);
  }
  char theirs[160], ours[160];
  describe(got, theirs, sizeof theirs);
  describe(want, ours, sizeof ours);
  if (want->op == TL_OP_SEND && got->op == TL_OP_SEND && got->seq == want->seq)
    return tl__fail(c, TL_ERR_MISMATCH,
                    "rank %d sent %s but this rank called recv for %s: sizes or "
                    "dtypes of send and recv differ", peer, theirs, ours);
  return tl__fail(c, TL_ERR_MISMATCH,
                  "rank %d called %s while this rank called %s: every rank must "
                  "call the same collectives, with the same sizes and dtypes, "
                  "in the same order", peer, theirs, ours);
}

/* ---- scratch ----------------------------------------------------------------- */

int tl__scratch(tl_comm_t *c, size_t bytes, char **out) {
  if (bytes > c->scratch_cap) {
    size_t cap = tl__max(bytes, (size_t)1 << 16);
    cap = (cap + 4095) & ~(size_t)4095;
    char *p = aligned_alloc(4096, cap);
    if (!p)
      return tl__fail(c, TL_ERR_NOMEM, "cannot allocate %zu B of scratch", cap);
    free(c->scratch);
    c->scratch = p;
    c->scratch_cap = cap;
  }
  *out = c->scratch;
  return TL_OK;
}
