/*
 * Channels: queues of frames, and the loop that drives every transport.
 *
 * Each channel has a FIFO of slices to send and one to receive. The core
 * writes and checks the frame headers; the channel's transport only moves
 * bytes (tl_transport_ops_t.send / .recv) and says how to sleep (.arm). One
 * loop serves every transport of a job at once: it spins briefly on the
 * channels with work, then sleeps in poll(2) on every descriptor the
 * transports armed (TCP connections; a shared-memory link's control
 * connection, which its peer rings when it leaves work).
 *
 * The rules that are not a transport's business live here: a frame that
 * shows a peer called another collective is an error at once, even on a
 * channel this rank is not reading yet; a peer's abort notice fails this
 * rank's collective, unless the peer failed in a later one (then this one
 * can still complete and the next call reports it); a channel that closes
 * while idle is an error only once this rank needs it.
 */
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is set on every socket instead */
#endif

#define ABORT_MAX 900    /* bytes of reason carried by an abort frame */
/* A Ctrl-C lets a collective that is about to finish finish (see
 * interrupted()). */
#define INTERRUPT_GRACE_NS 250000000ll

static void push(tl_slice_t **head, tl_slice_t **tail, tl_slice_t *s) {
  s->next = NULL;
  if (*tail) (*tail)->next = s; else *head = s;
  *tail = s;
}

static tl_slice_t *pop(tl_slice_t **head, tl_slice_t **tail) {
  tl_slice_t *s = *head;
  *head = s->next;
  if (!*head) *tail = NULL;
  return s;
}

/* "10.0.0.2:32323, tcp connection 1" */
static void where(const tl_chan_t *k, char *buf, size_t cap) {
  if (k->index < 0)
    snprintf(buf, cap, "%s, control connection", k->link->remote);
  else if (k->ops->id == TL_TRANSPORT_TCP)
    snprintf(buf, cap, "%s, connection %d", k->link->remote, k->index);
  else
    snprintf(buf, cap, "%s channel %d", k->ops->name, k->index);
}

/* A channel failed while we needed it. `what` is "sending to" or
 * "receiving from"; err 0 means the peer closed it. */
static int told(tl_comm_t *c, tl_chan_t *k);
static int io_reclaim(tl_comm_t *c, tl_chan_t *k);

static int lost(tl_comm_t *c, tl_chan_t *k, const char *what, int err) {
  io_reclaim(c, k); /* told() reads the channel: its threads must not */
  int said = told(c, k);
  if (said) return said;
  char w[TL_HOST_LEN + 64];
  where(k, w, sizeof w);
  int peer = k->link->peer;
  if (err == 0)
    return tl__fail(c, TL_ERR_PEER, "rank %d (%s) closed the connection: it exited "
                    "or failed (see its own error)", peer, w);
  if (err == EPIPE || err == ECONNRESET)
    return tl__fail(c, TL_ERR_PEER, "%s rank %d (%s) failed: %s; rank %d exited or "
                    "failed (see its own error)", what, peer, w, strerror(err), peer);
  return tl__fail(c, TL_ERR_PEER, "%s rank %d (%s) failed: %s", what, peer, w,
                  strerror(err));
}

/* The rest of a frame, as an iovec over its header (hdr: what is sent, or
 * where the received header goes) and its payload; both move in one call. */
int tl__frame_iov(tl_slice_t *s, tl_frame_t *hdr, struct iovec *iov) {
  const size_t H = sizeof(tl_frame_t);
  int n = 0;
  if (s->done < H) {
    iov[n].iov_base = (char *)hdr + s->done;
    iov[n++].iov_len = H - s->done;
  }
  size_t pdone = s->done > H ? s->done - H : 0;
  if (pdone < s->len) {
    iov[n].iov_base = s->buf + pdone;
    iov[n++].iov_len = s->len - pdone;
  }
  return n;
}

/* Payload bytes among the first `done` bytes of a frame. */
static size_t payload(size_t done) {
  return done > sizeof(tl_frame_t) ? done - sizeof(tl_frame_t) : 0;
}

/* ---- I/O threads (tcpio.c) ------------------------------------------------------
 *
 * Where c's TCP data channels have threads, the large slices at the head of
 * a channel's queues move on its thread: io_offload hands over the longest
 * prefix of not-yet-started large slices, io_collect retires what the thread
 * finished (in queue order) and judges a stop, io_reclaim takes back what it
 * holds. While the thread holds slices of a direction, this loop neither
 * polls nor reads nor writes that direction of the socket. */

static int header_in(tl_comm_t *c, tl_chan_t *k, tl_slice_t *s);

static unsigned io_held(const tl_chan_t *k, int d) {
  const tl_io_t *io = k->io[d];
  return io ? atomic_load(&io->tail) - io->seen : 0;
}

/* Hand direction d's eligible slices to k's thread for it (starting it).
 * Returns whether the thread now holds the head of the queue. */
static int io_offload(tl_comm_t *c, tl_chan_t *k, int d) {
  if (k->index < 0 || k->ops != &tl__tcp_ops || k->eof || k->fd < 0 || c->status ||
      c->cur.total < (uint64_t)c->opts.tcp_threads_min_bytes)
    return io_held(k, d) > 0;
  unsigned held = io_held(k, d), handed = 0;
  tl_slice_t *s = d ? k->rq : k->sq;
  for (unsigned i = 0; i < held && s; i++) s = s->next;
  for (; s && held < TL_IO_QCAP; s = s->next, held++) {
    if (s->other || s->done || s->len < TL_IO_MIN_BYTES) break;
    if (!k->io[d]) {
      if (!tl__io_wanted(c)) break;
      if (tl__io_start(c, k, d)) {
        tl__log(c, TL_LOG_WARN, "%s; moving TCP bytes on the calling thread", c->err);
        c->io_state = 1;
        break;
      }
    }
    tl_io_t *io = k->io[d];
    unsigned t = atomic_load(&io->tail);
    io->job[t % TL_IO_QCAP] = s;
    atomic_store(&io->tail, t + 1);
    handed++;
  }
  if (handed) tl__io_kick(k->io[d]);
  return io_held(k, d) > 0;
}

static void io_heard(tl_chan_t *k) {
  tl_io_t *io = k->io[1];
  int64_t h = io ? atomic_load(&io->heard_ns) : 0;
  if (h > k->link->heard_ns) k->link->heard_ns = h;
}

/* Retire the slices k's threads finished. Returns how many. */
static int io_retire(tl_comm_t *c, tl_chan_t *k) {
  int completed = 0;
  for (int d = 0; d < 2; d++) {
    tl_io_t *io = k->io[d];
    if (!io) continue;
    unsigned f = atomic_load(&io->fin);
    while (io->seen != f) {
      tl_slice_t *s = d ? pop(&k->rq, &k->rq_tail) : pop(&k->sq, &k->sq_tail);
      io->seen++;
      if (d) {
        k->peeked = 0;
        c->stats.bytes_received += s->len;
        c->stats.bytes_received_by[k->ops->id] += s->len;
      } else {
        c->stats.bytes_sent += s->len;
        c->stats.bytes_sent_by[k->ops->id] += s->len;
      }
      tl__slice_done(c, s);
      completed++;
    }
  }
  if (completed) io_heard(k);
  return completed;
}

/* Park k's threads and take back what they hold: afterwards the slices,
 * with the bytes the threads moved of them (s->done), are this loop's
 * alone. Returns the slices they had finished (retired here). */
static int io_reclaim(tl_comm_t *c, tl_chan_t *k) {
  if (!k->io[0] && !k->io[1]) return 0;
  for (int d = 0; d < 2; d++)
    if (k->io[d]) tl__io_halt(k->io[d]);
  int completed = io_retire(c, k);
  for (int d = 0; d < 2; d++) {
    tl_io_t *io = k->io[d];
    if (!io) continue;
    unsigned t = atomic_load(&io->tail);
    tl_slice_t *s = d ? k->rq : k->sq;
    for (unsigned i = io->seen; i != t && s; i++, s = s->next) {
      size_t moved = payload(s->done);
      if (d) {
        c->stats.bytes_received += moved;
        c->stats.bytes_received_by[k->ops->id] += moved;
      } else {
        c->stats.bytes_sent += moved;
        c->stats.bytes_sent_by[k->ops->id] += moved;
      }
    }
    atomic_store(&io->fin, io->seen);
    atomic_store(&io->tail, io->seen);
    atomic_store(&io->err, 0);
    tl__io_resume(io);
  }
  io_heard(k);
  return completed;
}

static void io_reclaim_all(tl_comm_t *c) {
  for (int i = 0; i < c->nchans; i++) io_reclaim(c, c->chans[i]);
}

/* Retire what k's threads finished, and judge why one stopped, if one did,
 * as the calling thread would have: the same messages, the same rules.
 * Returns slices completed, or a status. */
static int io_collect(tl_comm_t *c, tl_chan_t *k) {
  int completed = io_retire(c, k);
  int es = k->io[0] ? atomic_load(&k->io[0]->err) : 0;
  int er = k->io[1] ? atomic_load(&k->io[1]->err) : 0;
  if (!es && !er) return completed;
  completed += io_reclaim(c, k);
  if (er == TL_IO_MISMATCH && k->rq) {
    int rc = header_in(c, k, k->rq);
    if (rc) return rc > 0 ? completed : rc;
  } else if (er) {
    return lost(c, k, "receiving from", er == -EPIPE ? 0 : -er);
  }
  if (es) return lost(c, k, "sending to", -es);
  return completed;
}

/* Write queued frames until the channel takes no more. Returns the number of
 * slices completed, or a negative status. */
static int send_some(tl_comm_t *c, tl_chan_t *k) {
  int completed = 0;
  if (k->io[0] || k->io[1]) {
    int x = io_collect(c, k);
    if (x < 0) return x;
    completed += x;
  }
  while (k->sq) {
    if (io_offload(c, k, 0)) break; /* the channel's thread has the head */
    tl_slice_t *s = k->sq;
    struct iovec iov[2];
    int n = tl__frame_iov(s, &s->hdr, iov);
    long w = n ? k->ops->send(k, iov, n) : 0;
    if (w < 0) return lost(c, k, "sending to", (int)-w);
    if (w == 0 && n) break;
    size_t moved = payload(s->done + (size_t)w) - payload(s->done);
    s->done += (size_t)w;
    c->stats.bytes_sent += moved;
    c->stats.bytes_sent_by[k->ops->id] += moved;
    if (s->done == sizeof(tl_frame_t) + s->len) {
      pop(&k->sq, &k->sq_tail);
      tl__slice_done(c, s);
      completed++;
    }
  }
  return completed;
}

/*
 * A peer's abort notice: its header is in `got`, the first `have` bytes of
 * its reason at `buf`; read the rest of the reason. The peer failed during
 * the operation the header names. If that is a later collective than ours,
 * ours can still complete (every rank finished it, or the peer could not
 * have moved on), so the failure is kept for this rank's next call;
 * otherwise it fails now.
 */
/* A peer's text, made safe to print: bytes outside printable ASCII (terminal
 * escapes, say) become \xNN. */
static void printable(const char *in, size_t n, char *out, size_t cap) {
  size_t o = 0;
  for (size_t i = 0; i < n && o + 5 < cap; i++) {
    unsigned char b = (unsigned char)in[i];
    if (b >= 0x20 && b < 0x7f) out[o++] = (char)b;
    else o += (size_t)snprintf(out + o, cap - o, "\\x%02x", b);
  }
  out[o] = 0;
}

static int peer_aborted(tl_comm_t *c, tl_chan_t *k, const tl_frame_t *got,
                        const char *buf, size_t have) {
  char raw[ABORT_MAX], msg[4 * ABORT_MAX + 1];
  size_t len = tl__min(got->len, ABORT_MAX);
  size_t n = tl__min(have, len);
  memcpy(raw, buf, n);
  int64_t until = tl__now_ns() + 200000000; /* 200 ms for the rest */
  while (n < len && tl__now_ns() < until) {
    struct iovec iov = {raw + n, len - n};
    long r = k->ops->recv(k, &iov, 1, 0);
    if (r > 0) { n += (size_t)r; continue; }
    if (r < 0) break;
    struct pollfd p = {k->fd, POLLIN, 0};
    poll(&p, 1, 20);
  }
  printable(raw, n, msg, sizeof msg);
  k->eof = 1;
  int later = got->op && got->op != TL_OP_SEND && c->cur.op && c->cur.op != TL_OP_SEND &&
              (int32_t)(got->seq - c->cur.seq) > 0;
  int peer = k->link->peer;
  if (later && !k->rq) {
    if (!c->pending_abort[0])
      snprintf(c->pending_abort, sizeof c->pending_abort, "rank %d failed: %s", peer,
               n ? msg : "(no reason given)");
    return 0;
  }
  return tl__fail(c, TL_ERR_PEER, "rank %d failed: %s", peer, n ? msg : "(no reason given)");
}

/* Combine payload bytes of a reduce-on-receive slice straight out of the
 * channel. Returns the bytes consumed (whole elements), or -errno. */
static long reduce_some(tl_chan_t *k, tl_slice_t *s) {
  const size_t H = sizeof(tl_frame_t), es = tl_dtype_size(s->dtype);
  size_t pdone = s->done - H, moved = 0;
  while (pdone + moved < s->len) {
    const char *p;
    long avail = k->ops->view(k, &p);
    if (avail < 0) return moved ? (long)moved : avail;
    size_t n = tl__min((size_t)avail, s->len - pdone - moved), at = pdone + moved;
    n -= n % es; /* an element split by the writer waits for its rest */
    if (!n) {
      /* An element that the end of a ring splits in two (after a frame of
       * another element size): through a copy. */
      char tmp[16];
      struct iovec iov = {tmp, es};
      if (k->ops->recv(k, &iov, 1, 1) < (long)es) break;
      k->ops->recv(k, &iov, 1, 0);
      tl_reduce(s->buf + at, tmp, s->other + at, 1, s->dtype, s->redop);
      moved += es;
      continue;
    }
    tl_reduce(s->buf + at, p, s->other + at, n / es, s->dtype, s->redop);
    k->ops->consume(k, n);
    moved += n;
  }
  return (long)moved;
}

/* The header of s has arrived (in s->got; the first s->done - H bytes of
 * the payload are in s->buf): an abort notice, or the frame expected?
 * Returns 0 when it is, 1 when a peer's abort notice concerns a later
 * collective (kept for the next call), or the failure. */
static int header_in(tl_comm_t *c, tl_chan_t *k, tl_slice_t *s) {
  const size_t H = sizeof(tl_frame_t);
  if (s->got.magic == TL_FRAME_MAGIC && s->got.type == TL_FRAME_ABORT) {
    int rc = peer_aborted(c, k, &s->got, s->buf, s->done - H);
    return rc ? rc : 1;
  }
  char w[TL_HOST_LEN + 64];
  where(k, w, sizeof w);
  return tl__check_frame(c, k->link->peer, &s->hdr, &s->got, w);
}

static int recv_some(tl_comm_t *c, tl_chan_t *k) {
  int completed = 0;
  const size_t H = sizeof(tl_frame_t);
  if (k->io[0] || k->io[1]) {
    int x = io_collect(c, k);
    if (x < 0) return x;
    completed += x;
  }
  while (k->rq) {
    if (io_offload(c, k, 1)) break; /* the channel's thread has the head */
    tl_slice_t *s = k->rq;
    struct iovec iov[2];
    int n = tl__frame_iov(s, &s->got, iov);
    /* Reduce-on-receive: the header is read, the payload combined in place. */
    if (s->other && n) n = s->done < H ? 1 : 0;
    long r = n ? k->ops->recv(k, iov, n, 0) : s->other && s->done < H + s->len
                                                  ? reduce_some(k, s) : 0;
    if (r < 0) return lost(c, k, "receiving from", r == -EPIPE ? 0 : (int)-r);
    if (r == 0 && s->done < H + s->len) break;
    size_t before = s->done;
    size_t moved = payload(before + (size_t)r) - payload(before);
    s->done += (size_t)r;
    c->stats.bytes_received += moved;
    c->stats.bytes_received_by[k->ops->id] += moved;
    if (before < H && s->done >= H) {
      int rc = header_in(c, k, s);
      if (rc) return rc > 0 ? 0 : rc;
    }
    if (s->done == H + s->len) {
      pop(&k->rq, &k->rq_tail);
      k->peeked = 0;
      tl__slice_done(c, s);
      completed++;
    }
  }
  return completed;
}

/* Consume the wake-up and heartbeat bytes at the head of a control
 * channel. */
static void skip_wakes(tl_chan_t *k) {
  char b[256];
  for (;;) {
    struct iovec iov = {b, sizeof b};
    long r = k->ops->recv(k, &iov, 1, 1);
    if (r <= 0) return;
    long w = 0;
    while (w < r && (b[w] == TL_WAKE_BYTE || b[w] == TL_HEARTBEAT_BYTE)) w++;
    if (w == 0) return;
    iov.iov_len = (size_t)w;
    k->ops->recv(k, &iov, 1, 0);
    if (w < r) return;
  }
}

/*
 * A peer that fails sends its reason before it shuts its connections
 * (tl__abort_all: the control channel first, then every socket at a frame
 * boundary). When a channel breaks, that reason says more than "closed" or
 * "broken pipe": look for it where the next bytes start a frame -- the
 * control channel (waiting up to 50 ms for it), and this channel if no
 * frame is half read there. Returns the failure, or 0 when the peer said
 * nothing (or failed in a later collective: kept for the next call).
 */
static int told(tl_comm_t *c, tl_chan_t *k) {
  tl_chan_t *at[2] = {k->link->ctl, k};
  for (int i = 0; i < 2; i++) {
    tl_chan_t *w = at[i];
    if (!w || w->fd < 0 || (i == 1 && (w == at[0] || w->peeked || (w->rq && w->rq->done))))
      continue;
    tl_frame_t f;
    struct iovec iov = {&f, sizeof f};
    long r = 0;
    for (int tries = 0; tries < 2; tries++) {
      if (w->index < 0) skip_wakes(w);
      r = w->ops->recv(w, &iov, 1, 1);
      if (r == (long)sizeof f || r < 0 || i == 1 || tries) break;
      struct pollfd p = {w->fd, POLLIN, 0};
      poll(&p, 1, 50);
    }
    if (r != (long)sizeof f || f.magic != TL_FRAME_MAGIC || f.type != TL_FRAME_ABORT) continue;
    w->ops->recv(w, &iov, 1, 0);
    int rc = peer_aborted(c, w, &f, NULL, 0);
    if (rc) return rc;
  }
  return 0;
}

/* Look at the next frame on a channel with no receive queued. */
static int peek_idle(tl_comm_t *c, tl_chan_t *k) {
  if (k->index < 0) skip_wakes(k);
  tl_frame_t f;
  struct iovec iov = {&f, sizeof f};
  long r = k->ops->recv(k, &iov, 1, 1);
  if (r < 0) {
    /* Closed or reset while idle: an error only once we need this peer. */
    k->eof = 1;
    if (r == -EPIPE)
      tl__log(c, TL_LOG_INFO, "rank %d closed %s channel %d", k->link->peer,
              k->ops->name, k->index);
    else
      tl__log(c, TL_LOG_INFO, "%s channel %d to rank %d: %s", k->ops->name, k->index,
              k->link->peer, strerror((int)-r));
    return 0;
  }
  if ((size_t)r < sizeof f) return 0; /* the rest of the header is on its way */
  char w[TL_HOST_LEN + 64];
  where(k, w, sizeof w);
  int peer = k->link->peer;
  if (f.magic != TL_FRAME_MAGIC)
    return tl__fail(c, TL_ERR_PROTOCOL, "rank %d (%s) sent bytes that are not a "
                    "thunderlink frame; the stream is corrupt", peer, w);
  if (f.type == TL_FRAME_ABORT) {
    k->ops->recv(k, &iov, 1, 0); /* consume the header */
    return peer_aborted(c, k, &f, NULL, 0);
  }
  if (k->index < 0)
    return tl__fail(c, TL_ERR_PROTOCOL, "rank %d (%s) sent a data frame on the "
                    "control connection", peer, w);
  if (f.op != TL_OP_SEND && c->cur.op && c->cur.op != TL_OP_SEND) {
    if (f.seq == c->cur.seq) {
      tl_frame_t want = tl__frame(c, f.unit, c->cur.root >= 0 ? (uint32_t)c->cur.root : f.lane);
      want.len = f.len;
      int rc = tl__check_frame(c, peer, &want, &f, w);
      if (rc) return rc;
    } else if ((int32_t)(f.seq - c->cur.seq) < 0) {
      return tl__fail(c, TL_ERR_PROTOCOL, "rank %d (%s) sent a frame of %s #%u, "
                      "which this rank finished already", peer, w,
                      tl__op_name(f.op, f.redop), f.seq);
    }
  }
  k->peeked = 1; /* legitimate, for a later receive */
  return 0;
}

int tl__chan_post(tl_comm_t *c, tl_chan_t *k, tl_slice_t *s, int is_send) {
  if (!is_send) {
    push(&k->rq, &k->rq_tail, s);
    k->peeked = 0;
    if (k->io[1] || k->rq == s) io_offload(c, k, 1);
    return TL_OK;
  }
  int was_empty = k->sq == NULL;
  push(&k->sq, &k->sq_tail, s);
  if (!was_empty) {
    if (k->io[0]) io_offload(c, k, 0);
    return TL_OK;
  }
  /* Start at once: small messages leave without a trip through poll. */
  int r = send_some(c, k);
  return r < 0 ? r : TL_OK;
}

static void describe_wait(tl_comm_t *c, char *buf, size_t cap) {
  size_t n = 0;
  int listed = 0;
  for (int i = 0; i < c->nchans && listed < 3; i++) {
    tl_chan_t *k = c->chans[i];
    char w[TL_HOST_LEN + 64];
    where(k, w, sizeof w);
    if (k->rq && n < cap) {
      n += (size_t)snprintf(buf + n, cap - n, "%s to receive %zu B from rank %d (%s; "
                            "%zu B arrived)", listed ? ";" : "", k->rq->len,
                            k->link->peer, w, payload(k->rq->done));
      listed++;
    }
    if (k->sq && n < cap && listed < 3) {
      n += (size_t)snprintf(buf + n, cap - n, "%s to send %zu B to rank %d (%s; %zu B "
                            "sent)", listed ? ";" : "", k->sq->len, k->link->peer, w,
                            payload(k->sq->done));
      listed++;
    }
  }
}

/* Move what can move on one channel; events as poll reports them. Returns
 * slices completed, or a negative status. */
static int service(tl_comm_t *c, tl_chan_t *k, short re) {
  int completed = 0;
  if (k->sq && (re & (POLLOUT | POLLERR | POLLHUP))) {
    int x = send_some(c, k);
    if (x < 0) return x;
    completed += x;
  }
  if (re & (POLLIN | POLLERR | POLLHUP)) {
    int x = k->rq ? recv_some(c, k) : peek_idle(c, k);
    if (x < 0) return x;
    completed += x;
  }
  return completed;
}

/* ---- hung peers and interrupts -------------------------------------------------
 *
 * A peer this rank waits on (a channel of its link has a slice queued) must
 * show signs of life: bytes on any of the link's sockets, heartbeats on its
 * control channel (heartbeat.c: a fifth of the bound apart, sent while the
 * peer is alive, whatever its program is doing). Silence is counted from
 * the later of the last sign and the start of this operation: heartbeats
 * that waited in the buffer between operations say nothing about now, and
 * the first poll of a wait reads them all. Only links with a control
 * channel are judged (every link, when heartbeats are on), and not one whose
 * control channel the peer has shut (it failed, and said why there).
 */

static int64_t op_start(const tl_comm_t *c) {
  return c->deadline_ns - (int64_t)c->opts.timeout_ms * 1000000;
}

static int judged(const tl_chan_t *k) {
  return (k->sq || k->rq) && k->link->ctl && !k->link->ctl->eof;
}

/* When the first awaited peer's silence reaches the bound (INT64_MAX: never). */
static int64_t quiet_until(const tl_comm_t *c) {
  int64_t bound = (int64_t)c->opts.heartbeat_ms * 1000000, t = INT64_MAX, start = op_start(c);
  if (bound <= 0) return t;
  for (int i = 0; i < c->nchans; i++) {
    const tl_chan_t *k = c->chans[i];
    if (!judged(k)) continue;
    int64_t since = k->link->heard_ns > start ? k->link->heard_ns : start;
    if (since + bound < t) t = since + bound;
  }
  return t;
}

static int silent_peer(tl_comm_t *c, int64_t now) {
  int64_t bound = (int64_t)c->opts.heartbeat_ms * 1000000, start = op_start(c);
  if (bound <= 0) return TL_OK;
  for (int i = 0; i < c->nchans; i++) {
    tl_chan_t *k = c->chans[i];
    if (!judged(k)) continue;
    tl_link_t *l = k->link;
    int64_t since = l->heard_ns > start ? l->heard_ns : start;
    if (now - since < bound) continue;
    return tl__fail(c, TL_ERR_PEER, "rank %d (%s) silent for %.1f s while this rank waits "
                    "on it: it is stopped or hung, its machine froze, or the cable to it "
                    "was pulled (no heartbeat within THUNDERLINK_HEARTBEAT=%g s)", l->peer,
                    l->remote, (double)(now - since) / 1e9, c->opts.heartbeat_ms / 1000.0);
  }
  return TL_OK;
}

/* A tl_interrupt() (Ctrl-C, through tl_interrupt_hook) since the operation
 * began fails it, unless it completes within INTERRUPT_GRACE_NS: the program
 * asked to stop, and a collective a moment from done is worth finishing
 * (the program's own handler then decides), one whose peer hangs is not. */
static int interrupted(tl_comm_t *c, int64_t now) {
  if (tl__intr_count() == c->intr_gen) return TL_OK;
  if (!c->intr_ns) c->intr_ns = now;
  if (now - c->intr_ns < INTERRUPT_GRACE_NS) return TL_OK;
  return tl__fail(c, TL_ERR_INTERRUPTED, "Ctrl-C (SIGINT) while waiting: the collective "
                  "did not finish, and the communicator is no longer usable");
}

int tl__progress(tl_comm_t *c) {
  /* Spin first (small operations, and anything over shared memory): try the
   * channels directly, without poll, and yield the core between tries, so
   * that a peer sharing this core (more ranks than cores) gets to run
   * instead of being spun out. The spin lasts spin_us past the last byte
   * that moved: a peer in the middle of writing a chunk is worth waiting
   * for, one that went quiet is not. */
  int64_t spin = c->cur.plan.spin_ns;
  for (int i = 0; i < c->nchans && !spin; i++) {
    tl_chan_t *k = c->chans[i];
    if ((k->sq || k->rq) && k->ops->spin_factor)
      spin = (int64_t)c->opts.spin_us * 1000 * k->ops->spin_factor;
  }
  int64_t spin_end = spin ? tl__now_ns() + spin : 0;
  uint64_t moved = c->stats.bytes_sent + c->stats.bytes_received;
  while (spin_end && tl__now_ns() < spin_end) {
    int completed = 0;
    for (int i = 0; i < c->nchans; i++) {
      tl_chan_t *k = c->chans[i];
      if (!k->sq && !k->rq) continue;
      int x = service(c, k, POLLIN | POLLOUT);
      if (x < 0) return x;
      completed += x;
    }
    if (completed) return TL_OK;
    uint64_t now_moved = c->stats.bytes_sent + c->stats.bytes_received;
    if (now_moved != moved) {
      moved = now_moved;
      spin_end = tl__now_ns() + spin;
    }
    sched_yield();
  }
  int64_t soon_ns = TL_ARM_SOON_MIN_NS;
  for (;;) {
    int n = 0, busy = 0, ready = 0, soon = 0;
    for (int i = 0; i < c->nchans; i++) {
      tl_chan_t *k = c->chans[i];
      /* A direction whose slices the channel's thread holds is its own. */
      int want_in = !io_held(k, 1) && (k->rq || (!k->peeked && !k->eof));
      int want_out = k->sq != NULL && !io_held(k, 0);
      if (k->sq || k->rq) busy++;
      if (!want_in && !want_out) continue;
      c->pfds[n].fd = -1;
      c->pfds[n].events = c->pfds[n].revents = 0;
      int a = k->ops->arm(k, want_in, want_out, &c->pfds[n]);
      if (a == TL_ARM_SOON) soon = 1; else ready |= a;
      c->pchan[n++] = k;
    }
    if (!busy) {
      for (int i = 0; i < n; i++) c->pchan[i]->ops->disarm(c->pchan[i]);
      return tl__fail(c, TL_ERR_INVALID, "internal error: waiting with nothing queued");
    }
    /* Sleep until the deadline, a peer's silence reaches the bound, or an
     * interrupt's grace ends, whichever comes first (at most 1 s). */
    int64_t now = tl__now_ns(), wake = c->deadline_ns;
    int64_t q = quiet_until(c), g = c->intr_ns ? c->intr_ns + INTERRUPT_GRACE_NS : wake;
    wake = q < wake ? q : wake;
    wake = g < wake ? g : wake;
    int64_t left = wake - now;
    int timeout = ready || left <= 0 ? 0
                                     : (int)tl__min((size_t)((left + 999999) / 1000000), 1000);
    if (soon && timeout) {
      /* A channel that cannot wake us: sleep a little (poll counts only
       * whole milliseconds), growing while nothing happens, then look at
       * every descriptor and channel without waiting. Never a busy loop:
       * on a loaded host that would also starve the peer we wait for. */
      int64_t d = soon_ns < left ? soon_ns : left;
      struct timespec ts = {(time_t)(d / 1000000000), (long)(d % 1000000000)};
      nanosleep(&ts, NULL);
      soon_ns = soon_ns * 2 < TL_ARM_SOON_MAX_NS ? soon_ns * 2 : TL_ARM_SOON_MAX_NS;
      timeout = 0;
    }
    int npoll = n, ipipe = tl__intr_fd(), inote = -1;
    if (ipipe >= 0) {
      c->pfds[npoll].fd = ipipe;
      c->pfds[npoll].events = POLLIN;
      c->pfds[npoll++].revents = 0;
    }
    if (c->io_started) { /* the I/O threads' news */
      inote = npoll;
      c->pfds[npoll].fd = c->io_note[0];
      c->pfds[npoll].events = POLLIN;
      c->pfds[npoll++].revents = 0;
    }
    int r = poll(c->pfds, (nfds_t)npoll, timeout);
    int err = errno;
    for (int i = 0; i < n; i++) c->pchan[i]->ops->disarm(c->pchan[i]);
    if (r < 0) {
      if (err != EINTR) return tl__fail(c, TL_ERR_SYSTEM, "poll: %s", strerror(err));
      if (tl__on_main_thread())
        return tl__fail(c, TL_ERR_INTERRUPTED, "interrupted by a signal");
      continue;
    }
    now = tl__now_ns();
    if (ipipe >= 0 && c->pfds[n].revents) tl__intr_drain();
    int completed = 0;
    if (inote >= 0) {
      /* Empty the pipe first: news after this leaves a byte for the next
       * poll. Then every thread's finished slices and stops. */
      if (c->pfds[inote].revents) tl__io_drain_note(c);
      for (int i = 0; i < c->nchans; i++) {
        tl_chan_t *k = c->chans[i];
        if (!k->io[0] && !k->io[1]) continue;
        int x = io_collect(c, k);
        if (x < 0) return x;
        completed += x;
        io_heard(k);
      }
    }
    for (int i = 0; i < n; i++) {
      /* A channel without a descriptor (shared memory) is simply tried. */
      short re = c->pfds[i].fd < 0 || (c->pfds[i].revents && c->pchan[i]->ops->wake_fd)
                     ? (POLLIN | POLLOUT) : c->pfds[i].revents;
      if (!re) continue;
      /* Bytes from the peer, heartbeats included: it is alive. (A channel
       * without a descriptor shows it by the bytes it gave.) */
      tl_link_t *l = c->pchan[i]->link;
      uint64_t got = c->stats.bytes_received;
      if (c->pfds[i].fd >= 0 && (re & POLLIN)) l->heard_ns = now;
      int x = service(c, c->pchan[i], re);
      if (x < 0) return x;
      if (c->stats.bytes_received != got) l->heard_ns = now;
      completed += x;
    }
    if (completed) return TL_OK;
    int rc = silent_peer(c, now);
    if (!rc) rc = interrupted(c, now);
    if (rc) return rc;
    if (now >= c->deadline_ns) {
      char what[600] = "";
      io_reclaim_all(c); /* what each slice moved, exactly */
      describe_wait(c, what, sizeof what);
      return tl__fail(c, TL_ERR_TIMEOUT, "timed out after %.1f s waiting%s. A peer "
                      "may be stopped, hung or still busy elsewhere, or a cable is "
                      "down (THUNDERLINK_TIMEOUT sets the limit)",
                      (double)c->opts.timeout_ms / 1000.0, what);
    }
  }
}

/* ---- links ----------------------------------------------------------------------- */

static int add_chan(tl_comm_t *c, tl_chan_t *k) {
  tl_chan_t **all = realloc(c->chans, (size_t)(c->nchans + 1) * sizeof *all);
  if (!all) return TL_ERR_NOMEM;
  c->chans = all;
  /* two slots more than channels: the interrupt pipe, the I/O threads' */
  struct pollfd *pf = realloc(c->pfds, (size_t)(c->nchans + 3) * sizeof *pf);
  if (!pf) return TL_ERR_NOMEM;
  c->pfds = pf;
  tl_chan_t **pc = realloc(c->pchan, (size_t)(c->nchans + 1) * sizeof *pc);
  if (!pc) return TL_ERR_NOMEM;
  c->pchan = pc;
  c->chans[c->nchans++] = k;
  return TL_OK;
}

int tl__link_init(tl_comm_t *c, tl_link_t *l, const tl_transport_ops_t *ops, int nchans,
                  int ctl_fd) {
  l->comm = c;
  l->ops = ops;
  l->chans = calloc((size_t)nchans, sizeof *l->chans);
  if (!l->chans) return tl__error(c, TL_ERR_NOMEM, "out of memory");
  l->nchans = nchans;
  for (int k = 0; k < nchans; k++) {
    tl_chan_t *ch = &l->chans[k];
    ch->link = l;
    ch->ops = ops;
    ch->index = k;
    ch->fd = -1;
    if (add_chan(c, ch)) return tl__error(c, TL_ERR_NOMEM, "out of memory");
  }
  if (ctl_fd >= 0) {
    if (!(l->ctl = calloc(1, sizeof *l->ctl)))
      return tl__error(c, TL_ERR_NOMEM, "out of memory");
    l->ctl->link = l;
    l->ctl->ops = &tl__tcp_ops;
    l->ctl->index = -1;
    l->ctl->fd = ctl_fd;
    if (add_chan(c, l->ctl)) return tl__error(c, TL_ERR_NOMEM, "out of memory");
  }
  return TL_OK;
}

void tl__ctl_wake(tl_link_t *l) {
  char b = TL_WAKE_BYTE;
  if (l->ctl && l->ctl->fd >= 0) {
    ssize_t w = send(l->ctl->fd, &b, 1, MSG_NOSIGNAL | MSG_DONTWAIT);
    (void)w; /* a full buffer already holds a wake-up */
  }
}

static void drop_queues(tl_comm_t *c, tl_chan_t *k) {
  while (k->sq) tl__slice_free(c, pop(&k->sq, &k->sq_tail));
  while (k->rq) tl__slice_free(c, pop(&k->rq, &k->rq_tail));
}

void tl__abort_all(tl_comm_t *c, const char *why) {
  size_t len = tl__min(strlen(why), ABORT_MAX);
  tl_frame_t f;
  memset(&f, 0, sizeof f);
  f.magic = TL_FRAME_MAGIC;
  f.type = TL_FRAME_ABORT;
  f.op = (uint8_t)c->cur.op; /* where we failed: see peer_aborted */
  f.seq = c->cur.seq;
  f.len = (uint32_t)len;
  io_reclaim_all(c); /* no thread touches a socket or a slice from here */
  for (int i = 0; i < 2 * c->nchans; i++) {
    /* Control channels first: the peer looks there for the reason when
     * another channel breaks (see told()). */
    tl_chan_t *k = c->chans[i % c->nchans];
    if ((i < c->nchans) != (k->index < 0)) continue;
    /* The notice goes where the peer reads frames between operations: the
     * control channel if the link has one, and every channel that is a
     * socket (the peer may read one of those first), only at a frame
     * boundary (a half-sent frame cannot be interrupted). */
    int tell = !k->eof && (!k->sq || k->sq->done == 0) &&
               (k->index < 0 || !k->link->ctl || k->fd >= 0);
    k->ops->abort(k, tell ? &f : NULL, why, len);
    k->eof = 1;
    drop_queues(c, k);
  }
}

void tl__links_close(tl_comm_t *c) {
  if (!c->links) return;
  /* Threads first: they may be using the sockets and the slices. */
  for (int i = 0; i < c->nchans; i++) tl__io_stop(c, c->chans[i]);
  tl__io_close_comm(c);
  for (int p = 0; p < c->size; p++) {
    tl_link_t *l = &c->links[p];
    for (int k = 0; k < l->nchans; k++) {
      drop_queues(c, &l->chans[k]);
      l->ops->close(&l->chans[k]);
    }
    if (l->ctl) {
      drop_queues(c, l->ctl);
      l->ctl->ops->close(l->ctl);
      free(l->ctl);
      l->ctl = NULL;
    }
    if (l->ops && l->ops->close_link) l->ops->close_link(l);
    for (int k = 0; k < l->nboot; k++)
      if (l->boot_fds[k] >= 0) close(l->boot_fds[k]);
    free(l->boot_fds);
    l->boot_fds = NULL;
    l->nboot = 0;
    free(l->chans);
    l->chans = NULL;
    l->nchans = 0;
  }
  free(c->chans);
  free(c->pfds);
  free(c->pchan);
  c->chans = NULL;
  c->pfds = NULL;
  c->pchan = NULL;
  c->nchans = 0;
}
