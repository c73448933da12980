/*
 * Shared-memory transport, for ranks on one host.
 *
 * The lower rank of a link creates one segment (memfd_create on Linux,
 * shm_open on macOS) and offers it over the link's first bootstrap
 * connection; the other rank maps it and answers; then the creator drops
 * its descriptor (macOS: unlinks the name), so that once both have mapped
 * it the segment has no name anywhere and a crash leaves nothing behind.
 * The bootstrap connection stays open beside the segment as the link's
 * control channel: a peer that dies closes it, which the core sees at once.
 *
 * The segment holds, for each direction, TL_SHM_STREAMS rings: one per
 * channel, so the ring's two directions (lanes) never share one. A ring is
 * a single-producer, single-consumer byte stream (head and tail count bytes
 * written and read), carrying the same frames as a TCP connection, so the
 * core's frame rules apply unchanged.
 *
 * Waiting: the core spins on the rings first, then sleeps in poll on the
 * control connection. A side about to sleep raises its flag in the ring it
 * waits on (rx_sleep for data, tx_sleep for space) and looks again; the
 * other side, after moving the head or the tail, checks the flag and, if
 * raised, takes it down and writes one byte on the control connection.
 * Both sides order the flag and the counter with sequentially consistent
 * operations, so one of them always sees the other (no lost wake-up), and
 * no byte is written while the peer is awake. (A futex would wake faster,
 * but cannot be waited on together with the TCP links of the same job, nor
 * exists on macOS; the control connection serves both systems alike.)
 *
 * The peer is not trusted further than the handshake proved it: the opener
 * opens only a name of the kind this transport makes, maps it only if it
 * is a memfd of the announced size holding a segment header (never a file
 * on a disk that the name could lead to), and a ring that claims more bytes
 * than it holds is a protocol error; every index is masked into the ring.
 *
 * Large messages are copied twice (into the ring and out of it). A single
 * copy with cross-memory attach (process_vm_readv) was measured against it
 * and lost on the machines at hand (bench/cma_vs_ring.c, BENCHMARKS.md); on
 * the receiving side of a reduce-scatter the copy out is skipped anyway:
 * the core reduces straight out of the ring (view / consume).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../core/internal.h"

#define TL_SHM_STREAMS 2
#define OFFER_MAGIC 0x4d534c54u /* "TLSM" */
#define SEG_MAGIC 0x47534c54u   /* "TLSG" */
/* Each ring holds at least this, and at least two of the ring's chunks, so
 * that a pipelined chunk never waits for the previous one to be read. */
#define RING_MIN_BYTES ((uint64_t)1 << 20)
#define RING_MAX_BYTES ((uint64_t)1 << 26)
/* The writer moves the head after each piece of this many bytes. */
#define PUBLISH_BYTES ((size_t)64 << 10)

typedef struct ring {
  _Alignas(64) _Atomic uint64_t head; /* bytes written (producer) */
  _Atomic uint32_t rx_sleep;          /* the consumer sleeps until head moves */
  _Alignas(64) _Atomic uint64_t tail; /* bytes read (consumer) */
  _Atomic uint32_t tx_sleep;          /* the producer sleeps until tail moves */
  _Alignas(64) char data[];
} ring_t;

typedef struct seg_hdr {
  uint32_t magic;
  uint32_t streams;
  uint64_t ring_bytes; /* a power of two */
} seg_hdr_t;

/* Sent by the creator on bootstrap connection 0, then the opener's answer. */
typedef struct offer {
  uint32_t magic;
  int32_t status; /* 0, or the errno that kept the creator from making it */
  uint64_t bytes;
  uint64_t ring_bytes;
  char name[112]; /* what the opener opens */
} offer_t;

typedef struct answer {
  uint32_t magic;
  int32_t status; /* 0: mapped; else the opener's errno */
} answer_t;

/* Per link: the mapping, and the set-up in progress. */
typedef struct shm_link {
  char *base;
  size_t bytes;
  uint64_t ring_bytes;
  int creator;
  int fd; /* the creator's, until the opener has mapped the segment */
  char name[112];
} shm_link_t;

typedef struct shm_chan {
  ring_t *tx, *rx;
  uint64_t mask;
  int armed_in, armed_out;
} shm_chan_t;

static size_t ring_stride(uint64_t ring_bytes) { return sizeof(ring_t) + (size_t)ring_bytes; }

static ring_t *ring_at(shm_link_t *s, int dir, int stream) {
  size_t off = 4096 + ((size_t)dir * TL_SHM_STREAMS + (size_t)stream) * ring_stride(s->ring_bytes);
  return (ring_t *)(s->base + off);
}

static int shm_available(char *why, size_t cap) {
#if defined(__linux__)
  static _Atomic int probed = -1;
  int ok = atomic_load(&probed);
  if (ok < 0) {
    int fd = memfd_create("thunderlink-probe", MFD_CLOEXEC);
    ok = fd >= 0;
    if (ok) close(fd);
    else snprintf(why, cap, "memfd_create: %s", strerror(errno));
    atomic_store(&probed, ok);
  } else if (!ok) {
    snprintf(why, cap, "memfd_create is not available");
  }
  return ok;
#elif defined(__APPLE__)
  return 1;
#else
  snprintf(why, cap, "no shared-memory support on this platform");
  return 0;
#endif
}

/* Make the segment; 0 or an errno. */
static int create_segment(tl_comm_t *c, shm_link_t *s) {
  uint64_t rb = RING_MIN_BYTES;
  while (rb < 2 * (uint64_t)c->opts.chunk_bytes && rb < RING_MAX_BYTES) rb <<= 1;
  s->ring_bytes = rb;
  s->bytes = 4096 + 2 * TL_SHM_STREAMS * ring_stride(rb);
  s->bytes = (s->bytes + 4095) & ~(size_t)4095;
#if defined(__linux__)
  s->fd = memfd_create("thunderlink", MFD_CLOEXEC);
  if (s->fd < 0) return errno;
  snprintf(s->name, sizeof s->name, "/proc/%d/fd/%d", (int)getpid(), s->fd);
#elif defined(__APPLE__)
  static _Atomic unsigned counter;
  /* macOS limits names to 31 characters. */
  snprintf(s->name, sizeof s->name, "/tl%d.%x", (int)getpid(), atomic_fetch_add(&counter, 1));
  s->fd = shm_open(s->name, O_RDWR | O_CREAT | O_EXCL, 0600);
  if (s->fd < 0) return errno;
#else
  return ENOTSUP;
#endif
  if (ftruncate(s->fd, (off_t)s->bytes) < 0) return errno;
  void *p = mmap(NULL, s->bytes, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
  if (p == MAP_FAILED) return errno;
  s->base = p;
  seg_hdr_t *h = (seg_hdr_t *)p;
  h->magic = SEG_MAGIC;
  h->streams = TL_SHM_STREAMS;
  h->ring_bytes = rb;
  return 0;
}

/* Does the offer name a segment of the kind create_segment makes (Linux:
 * /proc/PID/fd/N; macOS: /tlPID.N), rather than some other file a peer would
 * like this process to open and write? */
static int segment_name(const char *name) {
  unsigned a, b;
  int end = -1;
#if defined(__linux__)
  if (strncmp(name, "/proc/", 6) || name[6] < '0' || name[6] > '9') return 0;
  sscanf(name, "/proc/%u/fd/%u%n", &a, &b, &end);
#elif defined(__APPLE__)
  if (strncmp(name, "/tl", 3) || name[3] < '0' || name[3] > '9') return 0;
  sscanf(name, "/tl%u.%x%n", &a, &b, &end);
#endif
  return end > 0 && (size_t)end == strlen(name);
}

static int open_segment(shm_link_t *s, const offer_t *o) {
  if (o->bytes < 4096 + 2 * TL_SHM_STREAMS * ring_stride(o->ring_bytes) ||
      o->ring_bytes == 0 || (o->ring_bytes & (o->ring_bytes - 1)) ||
      o->ring_bytes > RING_MAX_BYTES)
    return EPROTO;
  char name[sizeof o->name + 1];
  memcpy(name, o->name, sizeof o->name);
  name[sizeof o->name] = 0;
  if (!segment_name(name)) return EPROTO;
#if defined(__linux__)
  int fd = open(name, O_RDWR | O_CLOEXEC);
#elif defined(__APPLE__)
  int fd = shm_open(name, O_RDWR, 0600);
#else
  int fd = -1;
  errno = ENOTSUP;
#endif
  if (fd < 0) return errno;
  int e = 0;
  struct stat st;
  if (fstat(fd, &st) < 0) e = errno;
  else if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != o->bytes) e = EPROTO;
#if defined(F_GET_SEALS)
  /* Only memfds (and shmem files) answer this: not a file on a disk. */
  else if (fcntl(fd, F_GET_SEALS) < 0) e = EPROTO;
#endif
  if (e) {
    close(fd);
    return e;
  }
  void *p = mmap(NULL, (size_t)o->bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  e = errno;
  close(fd);
  if (p == MAP_FAILED) return e;
  seg_hdr_t *h = (seg_hdr_t *)p;
  if (h->magic != SEG_MAGIC || h->streams != TL_SHM_STREAMS || h->ring_bytes != o->ring_bytes) {
    munmap(p, (size_t)o->bytes);
    return EPROTO;
  }
  s->base = p;
  s->bytes = (size_t)o->bytes;
  s->ring_bytes = o->ring_bytes;
  return 0;
}

static void drop_name(shm_link_t *s) {
  if (s->fd >= 0) close(s->fd);
  s->fd = -1;
#if defined(__APPLE__)
  if (s->creator && s->name[0]) shm_unlink(s->name);
#endif
  s->name[0] = 0;
}

static void unmap(tl_link_t *l) {
  shm_link_t *s = l->t;
  if (!s) return;
  drop_name(s);
  if (s->base) munmap(s->base, s->bytes);
  free(s);
  l->t = NULL;
}

/* The link's channels over the mapped segment; bootstrap connection 0
 * becomes the control channel and the others are closed. */
static int make_channels(tl_comm_t *c, tl_link_t *l) {
  shm_link_t *s = l->t;
  int ctl = l->boot_fds[0];
  l->boot_fds[0] = -1;
  for (int k = 1; k < l->nboot; k++) {
    close(l->boot_fds[k]);
    l->boot_fds[k] = -1;
  }
  int rc = tl__link_init(c, l, &tl__shm_ops, TL_SHM_STREAMS, ctl);
  if (rc) return rc;
  int mine = s->creator ? 0 : 1;
  for (int k = 0; k < TL_SHM_STREAMS; k++) {
    shm_chan_t *sc = calloc(1, sizeof *sc);
    if (!sc) return tl__error(c, TL_ERR_NOMEM, "out of memory");
    sc->tx = ring_at(s, mine, k);
    sc->rx = ring_at(s, 1 - mine, k);
    sc->mask = s->ring_bytes - 1;
    l->chans[k].t = sc;
    l->share[k] = 1000;
  }
  return TL_OK;
}

/* Read the peer's offer or answer (both start with OFFER_MAGIC). */
static int recv_msg(tl_comm_t *c, tl_link_t *l, void *buf, size_t len, const char *what) {
  int rc = tl__boot_xfer(c, l, l->boot_fds[0], buf, len, 0, c->deadline_ns);
  uint32_t magic;
  memcpy(&magic, buf, sizeof magic);
  if (!rc && magic != OFFER_MAGIC)
    rc = tl__error(c, TL_ERR_PROTOCOL, "rank %d (%s) sent a malformed %s", l->peer,
                   l->remote, what);
  return rc;
}

static int shm_setup(tl_comm_t *c, tl_link_t *l, int phase) {
  shm_link_t *s = l->t;
  if (phase == 0) {
    if (!(s = l->t = calloc(1, sizeof *s))) return tl__error(c, TL_ERR_NOMEM, "out of memory");
    s->fd = -1;
    s->creator = c->rank < l->peer;
    if (!s->creator) return TL_OK;
    offer_t o;
    memset(&o, 0, sizeof o);
    o.magic = OFFER_MAGIC;
    o.status = create_segment(c, s);
    if (!o.status) {
      o.bytes = s->bytes;
      o.ring_bytes = s->ring_bytes;
      memcpy(o.name, s->name, sizeof o.name);
    }
    int rc = tl__boot_xfer(c, l, l->boot_fds[0], &o, sizeof o, 1, c->deadline_ns);
    if (rc) return rc;
    if (o.status)
      return tl__error(c, TL_ERR_UNSUPPORTED, "cannot create a shared-memory segment "
                       "for rank %d: %s", l->peer, strerror(o.status));
    return TL_OK;
  }
  if (phase == 1 && !s->creator) {
    offer_t o;
    int rc = recv_msg(c, l, &o, sizeof o, "shared-memory offer");
    if (rc) return rc;
    if (o.status)
      return tl__error(c, TL_ERR_UNSUPPORTED, "rank %d could not create a shared-memory "
                       "segment: %s", l->peer, strerror(o.status));
    answer_t a = {OFFER_MAGIC, open_segment(s, &o)};
    rc = tl__boot_xfer(c, l, l->boot_fds[0], &a, sizeof a, 1, c->deadline_ns);
    if (rc) return rc;
    if (a.status)
      return tl__error(c, TL_ERR_UNSUPPORTED, "cannot map rank %d's shared-memory "
                       "segment: %s%s", l->peer, strerror(a.status),
                       a.status == EACCES || a.status == EPERM
                           ? " (the two processes must run as the same user)" : "");
    return TL_OK;
  }
  if (phase == 2) {
    if (s->creator) {
      answer_t a;
      int rc = recv_msg(c, l, &a, sizeof a, "answer to the shared-memory offer");
      if (rc) return rc;
      drop_name(s); /* the peer has it mapped, or gave up */
      if (a.status)
        return tl__error(c, TL_ERR_UNSUPPORTED, "rank %d cannot map this rank's "
                         "shared-memory segment: %s", l->peer, strerror(a.status));
    }
    return make_channels(c, l);
  }
  return TL_OK;
}

static int peer_gone(const tl_chan_t *ch) { return ch->link->ctl && ch->link->ctl->eof; }

static void copy_in(ring_t *r, uint64_t mask, uint64_t pos, const char *src, size_t n) {
  size_t at = (size_t)(pos & mask), first = tl__min(n, (size_t)(mask + 1) - at);
  memcpy(r->data + at, src, first);
  if (first < n) memcpy(r->data, src + first, n - first);
}

static void copy_out(const ring_t *r, uint64_t mask, uint64_t pos, char *dst, size_t n) {
  size_t at = (size_t)(pos & mask), first = tl__min(n, (size_t)(mask + 1) - at);
  memcpy(dst, r->data + at, first);
  if (first < n) memcpy(dst + first, r->data, n - first);
}

static long shm_send(tl_chan_t *ch, const struct iovec *iov, int n) {
  shm_chan_t *sc = ch->t;
  ring_t *r = sc->tx;
  if (peer_gone(ch)) return -EPIPE;
  uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
  uint64_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
  if (head - tail > sc->mask + 1) return -EPROTO; /* the peer wrote nonsense */
  size_t space = (size_t)(sc->mask + 1 - (head - tail)), moved = 0;
  /* Published a piece at a time, so that the reader copies (or reduces)
   * one piece while this side writes the next. */
  for (int i = 0; i < n && moved < space; i++) {
    size_t done = 0, len = tl__min(iov[i].iov_len, space - moved);
    while (done < len) {
      size_t m = tl__min(len - done, PUBLISH_BYTES);
      copy_in(r, sc->mask, head + moved, (const char *)iov[i].iov_base + done, m);
      done += m;
      moved += m;
      atomic_store_explicit(&r->head, head + moved, memory_order_release);
      atomic_thread_fence(memory_order_seq_cst);
      if (atomic_load_explicit(&r->rx_sleep, memory_order_relaxed) &&
          atomic_exchange(&r->rx_sleep, 0))
        tl__ctl_wake(ch->link);
    }
  }
  return (long)moved;
}

/* Bytes waiting in the receive ring (its tail in *tail): -EPIPE when none
 * and the peer is gone, -EPROTO when the peer's head is nonsense. */
static long readable(tl_chan_t *ch, uint64_t *tail) {
  shm_chan_t *sc = ch->t;
  *tail = atomic_load_explicit(&sc->rx->tail, memory_order_relaxed);
  uint64_t head = atomic_load_explicit(&sc->rx->head, memory_order_acquire);
  if (head - *tail > sc->mask + 1) return -EPROTO;
  if (head == *tail) return peer_gone(ch) ? -EPIPE : 0;
  return (long)(head - *tail);
}

static void shm_consume(tl_chan_t *ch, size_t n) {
  shm_chan_t *sc = ch->t;
  ring_t *r = sc->rx;
  uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
  atomic_store_explicit(&r->tail, tail + n, memory_order_release);
  atomic_thread_fence(memory_order_seq_cst);
  if (atomic_load_explicit(&r->tx_sleep, memory_order_relaxed) &&
      atomic_exchange(&r->tx_sleep, 0))
    tl__ctl_wake(ch->link);
}

static long shm_recv(tl_chan_t *ch, const struct iovec *iov, int n, int peek) {
  shm_chan_t *sc = ch->t;
  uint64_t tail;
  long avail = readable(ch, &tail);
  if (avail <= 0) return avail;
  size_t moved = 0;
  for (int i = 0; i < n && moved < (size_t)avail; i++) {
    size_t m = tl__min(iov[i].iov_len, (size_t)avail - moved);
    copy_out(sc->rx, sc->mask, tail + moved, iov[i].iov_base, m);
    moved += m;
  }
  if (!peek && moved) shm_consume(ch, moved);
  return (long)moved;
}

static long shm_view(tl_chan_t *ch, const char **p) {
  shm_chan_t *sc = ch->t;
  uint64_t tail;
  long avail = readable(ch, &tail);
  if (avail <= 0) return avail;
  size_t at = (size_t)(tail & sc->mask);
  *p = sc->rx->data + at;
  return (long)tl__min((size_t)avail, (size_t)(sc->mask + 1) - at);
}

static int shm_arm(tl_chan_t *ch, int want_in, int want_out, struct pollfd *pfd) {
  shm_chan_t *sc = ch->t;
  int ready = peer_gone(ch);
  pfd->fd = -1; /* the control channel is polled for the wake-up */
  if (want_in) {
    atomic_store(&sc->rx->rx_sleep, 1);
    sc->armed_in = 1;
    ready |= atomic_load(&sc->rx->head) != atomic_load_explicit(&sc->rx->tail,
                                                                memory_order_relaxed);
  }
  if (want_out) {
    atomic_store(&sc->tx->tx_sleep, 1);
    sc->armed_out = 1;
    uint64_t head = atomic_load_explicit(&sc->tx->head, memory_order_relaxed);
    ready |= head - atomic_load(&sc->tx->tail) <= sc->mask;
  }
  return ready;
}

static void shm_disarm(tl_chan_t *ch) {
  shm_chan_t *sc = ch->t;
  if (sc->armed_in) atomic_store(&sc->rx->rx_sleep, 0);
  if (sc->armed_out) atomic_store(&sc->tx->tx_sleep, 0);
  sc->armed_in = sc->armed_out = 0;
}

/* The notice goes over the control channel (see tl__abort_all). */
static void shm_abort(tl_chan_t *ch, const tl_frame_t *f, const char *why, size_t len) {}

static void shm_close(tl_chan_t *ch) {
  free(ch->t);
  ch->t = NULL;
}

const tl_transport_ops_t tl__shm_ops = {
    .name = "shm",
    .id = TL_TRANSPORT_SHM,
    .spin_factor = 4,
    .available = shm_available,
    .setup = shm_setup,
    .send = shm_send,
    .recv = shm_recv,
    .view = shm_view,
    .consume = shm_consume,
    .arm = shm_arm,
    .disarm = shm_disarm,
    .abort = shm_abort,
    .close = shm_close,
    .close_link = unmap,
};
