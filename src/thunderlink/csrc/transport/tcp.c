/*
 * TCP transport: the data path over the bootstrap's connections.
 *
 * A TCP link keeps every bootstrap connection as a channel: conns_per_peer
 * per cable, connection k on cable tl__boot_cable(k). Striping follows the
 * cables' rates: each connection's share is its cable's weight divided by
 * the connections on that cable, so a message cut over a lane (one
 * connection per cable and direction of the ring) splits in proportion to
 * the cables' speeds. Both ends compute the shares from the common endpoint
 * table.
 *
 * With heartbeats on (THUNDERLINK_HEARTBEAT), the link has one bootstrap
 * connection more, kept as its control channel (heartbeat.c).
 *
 * All sockets are non-blocking; the core's progress loop sleeps in poll(2)
 * on them. poll rather than epoll/kqueue: the set of sockets with pending
 * work changes at almost every wait and holds a handful of descriptors, so
 * rebuilding a pollfd array is cheaper than the epoll_ctl/kevent calls
 * needed to keep a kernel-side set up to date.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../core/internal.h"

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is set on every socket instead */
#endif

static int tcp_available(char *why, size_t cap) { return 1; }

/*
 * Does asking for `bytes` of socket buffer get at least that? Linux caps
 * SO_SNDBUF/SO_RCVBUF at net.core.wmem_max/rmem_max (often 208 KiB), and
 * setting them switches the kernel's autotuning off; where the cap is lower
 * than the request, autotuning does better than a capped buffer. Probed once
 * per size on a throwaway socket.
 */
static int sockbuf_takes(int bytes) {
  static _Atomic int probed_bytes = -1, probed_ok = 0;
  if (atomic_load(&probed_bytes) == bytes) return atomic_load(&probed_ok);
  int ok = 0, fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd >= 0) {
    int v = bytes, snd = 0, rcv = 0;
    socklen_t l = sizeof snd;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof v);
    getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &snd, &l);
    l = sizeof rcv;
    getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, &l);
    ok = snd >= bytes && rcv >= bytes;
    close(fd);
  }
  atomic_store(&probed_ok, ok);
  atomic_store(&probed_bytes, bytes);
  return ok;
}

static void conn_setup(tl_comm_t *c, int fd) {
  int v = c->opts.sockbuf_bytes;
  if (v > 0 && sockbuf_takes(v)) {
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof v);
  }
}

static int tcp_setup(tl_comm_t *c, tl_link_t *l, int phase) {
  if (phase != 0) return TL_OK;
  /* With heartbeats, the last bootstrap connection is the link's control
   * channel: heartbeats and abort notices, never data. */
  int ctl = -1, ndata = l->nboot;
  if (tl__tcp_has_ctl(c) && l->nboot > 1) {
    ctl = l->boot_fds[--ndata];
    l->boot_fds[ndata] = -1;
  }
  int rc = tl__link_init(c, l, &tl__tcp_ops, ndata, ctl);
  if (rc) {
    if (ctl >= 0 && !l->ctl) close(ctl);
    return rc;
  }
  int tg[TL_MAX_CONNS], nt;
  tl__link_plan(c->eps, c->neps, c->rank, l->peer, tg, &nt);
  for (int k = 0; k < l->nchans; k++) {
    l->chans[k].fd = l->boot_fds[k];
    l->boot_fds[k] = -1;
    conn_setup(c, l->chans[k].fd);
    int per = 0, cable = tl__boot_cable(c, k, nt);
    for (int j = 0; j < l->nchans; j++) per += tl__boot_cable(c, j, nt) == cable;
    double s = c->eps[tg[cable]].weight / per * 1000.0;
    l->share[k] = s < 1 ? 1 : s > 1000000 ? 1000000 : (uint32_t)s;
  }
  return TL_OK;
}

/*
 * Acknowledge at once. Linux treats a connection whose traffic alternates
 * direction as interactive and delays its ACKs (up to 40 ms, "ato"), hoping
 * to piggyback them on the reply; a collective's sender then stalls on a
 * full window. TCP_QUICKACK is not sticky, so it is renewed after each read
 * of a bulk transfer (small replies carry their ACKs).
 */
static void quickack(int fd) {
#ifdef TCP_QUICKACK
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
#else
  (void)fd;
#endif
}

static long tcp_send(tl_chan_t *ch, const struct iovec *iov, int n) {
  struct msghdr m;
  memset(&m, 0, sizeof m);
  m.msg_iov = (struct iovec *)iov;
  m.msg_iovlen = (size_t)n;
  for (;;) {
    ssize_t w = sendmsg(ch->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w >= 0) return (long)w;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    return -errno;
  }
}

static long tcp_recv(tl_chan_t *ch, const struct iovec *iov, int n, int peek) {
  struct msghdr m;
  memset(&m, 0, sizeof m);
  m.msg_iov = (struct iovec *)iov;
  m.msg_iovlen = (size_t)n;
  for (;;) {
    ssize_t r = recvmsg(ch->fd, &m, MSG_DONTWAIT | (peek ? MSG_PEEK : 0));
    if (r > 0) {
      if (!peek && ch->index >= 0 && !ch->link->comm->cur.plan.spin_ns) quickack(ch->fd);
      return (long)r;
    }
    if (r == 0) return -EPIPE;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    return -errno;
  }
}

static int tcp_arm(tl_chan_t *ch, int want_in, int want_out, struct pollfd *pfd) {
  pfd->fd = ch->fd;
  pfd->events = (short)((want_in ? POLLIN : 0) | (want_out ? POLLOUT : 0));
  return 0;
}

static void tcp_disarm(tl_chan_t *ch) {}

static void tcp_abort(tl_chan_t *ch, const tl_frame_t *f, const char *why, size_t len) {
  if (ch->fd < 0) return;
  if (f) {
    struct iovec iov[2] = {{(void *)f, sizeof *f}, {(void *)why, len}};
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = iov;
    m.msg_iovlen = 2;
    ssize_t w = sendmsg(ch->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    (void)w;
  }
  /* FIN after the notice; the descriptor stays open until close so that
   * the peer reads the notice rather than a reset. */
  shutdown(ch->fd, SHUT_WR);
}

static void tcp_close(tl_chan_t *ch) {
  if (ch->fd >= 0) close(ch->fd);
  ch->fd = -1;
}

const tl_transport_ops_t tl__tcp_ops = {
    .name = "tcp",
    .id = TL_TRANSPORT_TCP,
    .available = tcp_available,
    .setup = tcp_setup,
    .send = tcp_send,
    .recv = tcp_recv,
    .arm = tcp_arm,
    .disarm = tcp_disarm,
    .abort = tcp_abort,
    .close = tcp_close,
    .close_link = NULL,
};
