/*
 * TCP transport.
 *
 * Every pair of ranks that shares a link is joined by conns_per_peer TCP
 * connections per cable (see compute_shares); the rank without an address
 * for the other one dials (see link_plan). Every connection starts with a handshake
 * (hello / ack) that carries the protocol version, the job id, both ranks,
 * the connection index and a digest of the options that decide how messages
 * are cut, so that a stranger, another job, another version or a rank with
 * other settings is refused with a message that says which.
 *
 * Data moves as frames (a 32-byte header, then the payload) queued per
 * connection, one FIFO for each direction. All sockets are non-blocking; the
 * calling thread drives them with poll(2). poll rather than epoll/kqueue: the
 * set of sockets with pending work changes at almost every wait and holds a
 * handful of descriptors, so rebuilding a pollfd array is cheaper than the
 * epoll_ctl/kevent calls needed to keep a kernel-side set up to date.
 *
 * Connections without queued receives are still watched for input, so that
 * a peer's abort notice, or a frame showing that the peer called another
 * collective, is seen at once instead of after a timeout.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sched.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

#include "../core/internal.h"

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is set on every socket instead */
#endif

#define HELLO_MAGIC 0x4b4e4c54u /* "TLNK" */
#define ACK_MAGIC 0x4b414c54u   /* "TLAK" */
#define ABORT_MAX 900           /* bytes of reason carried by an abort frame */
/* An accepted connection that has not said hello by then is dropped. */
#define STRANGER_TIMEOUT_NS (10ll * 1000000000)

enum {
  ACK_OK = 0,
  ACK_WRONG_JOB = 1,
  ACK_WRONG_VERSION = 2,
  ACK_WRONG_RANK = 3,
  ACK_WRONG_SIZE = 4,
  ACK_WRONG_OPTIONS = 5,
  ACK_DUPLICATE = 6,
};

/* The handshake. Fixed layout, little-endian; magic and version stay at the
 * same offsets in every protocol version so that any version can refuse any
 * other one cleanly. */
typedef struct hello {
  uint32_t magic;
  uint16_t version;
  uint16_t flags;
  uint64_t job_id;
  uint64_t options_digest;
  uint32_t src_rank;
  uint32_t dst_rank;
  uint32_t conn_index;
  uint32_t nconns;
  uint32_t world_size;
  uint32_t reserved;
  uint64_t host_id;  /* reserved for same-host detection (shared memory) */
  uint8_t proof[32]; /* reserved for the job-token proof (HMAC challenge) */
} hello_t;

typedef struct ack {
  uint32_t magic;
  uint16_t version;
  uint16_t status; /* ACK_* */
  uint32_t rank;
  uint32_t reserved;
} ack_t;

_Static_assert(sizeof(hello_t) == 88, "hello layout");
_Static_assert(sizeof(ack_t) == 16, "ack layout");

typedef struct conn {
  int fd;
  int peer;
  int index;
  tl_slice_t *sq, *sq_tail; /* frames to send, in order */
  tl_slice_t *rq, *rq_tail; /* frames to receive, in order */
  int peeked;               /* next inbound frame already checked */
  int eof;                  /* peer closed or reset (seen while idle) */
  char remote[TL_HOST_LEN + 16]; /* "host:port" for messages */
} conn_t;

/* A connection being set up. */
enum { P_WAIT, P_CONNECTING, P_SEND_HELLO, P_RECV_ACK, P_RECV_HELLO, P_SEND_ACK };

typedef struct pending {
  int fd;
  int state;
  int outgoing;
  int peer, index; /* outgoing: target; incoming: from the hello */
  int ep;          /* outgoing: endpoint index in c->eps */
  int src_ep;      /* outgoing: our endpoint to bind to, or -1 */
  union {
    hello_t hello;
    ack_t ack;
    char raw[sizeof(hello_t)];
  } buf;
  size_t done;
  uint16_t refuse; /* incoming: ack status being sent */
  int64_t retry_at;
  int64_t started;
  int attempts;
  int last_errno;
  char remote[TL_HOST_LEN + 16];
} pending_t;

typedef struct listener {
  int fd;
  int ep; /* first endpoint served */
} listener_t;

typedef struct tcp {
  listener_t *ls;
  int nls;
  conn_t *conns; /* [size * nconns] */
  int nconns;
  int nconn_total;
  struct pollfd *pfds;
  conn_t **pconn;
  int pcap;
} tcp_t;

static tcp_t *T(tl_comm_t *c) { return (tcp_t *)c->tstate; }

static conn_t *conn_at(tl_comm_t *c, int peer, int k) {
  tcp_t *t = T(c);
  return &t->conns[peer * t->nconns + k];
}

/* Signals interrupt waits on the main thread only (so that Ctrl-C reaches
 * Python); threads such as MLX's stream worker just retry. */
static int on_main_thread(void) {
#if defined(__linux__)
  return getpid() == (pid_t)syscall(SYS_gettid);
#elif defined(__APPLE__)
  return pthread_main_np() != 0;
#else
  return 0;
#endif
}

/* ---- addresses ----------------------------------------------------------------- */

static int resolve(const char *host, int port, int passive, struct sockaddr_storage *ss,
                   socklen_t *len, char *why, size_t cap) {
  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  char ps[16];
  snprintf(ps, sizeof ps, "%d", port);
  int rc = getaddrinfo(host, ps, &hints, &res);
  if (rc != 0 || !res) {
    snprintf(why, cap, "cannot resolve '%s': %s", host, gai_strerror(rc));
    return -1;
  }
  memcpy(ss, res->ai_addr, res->ai_addrlen);
  *len = res->ai_addrlen;
  freeaddrinfo(res);
  return 0;
}

static void host_port(const tl_endpoint_t *e, int port, char *buf, size_t cap) {
  if (strchr(e->host, ':'))
    snprintf(buf, cap, "[%s]:%d", e->host, port);
  else
    snprintf(buf, cap, "%s:%d", e->host, port);
}

static int set_nonblocking(int fd) {
  int fl = fcntl(fd, F_GETFL, 0);
  return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static int bind_to_device(int fd, int family, const char *ifname) {
  if (!ifname || !*ifname) return 0;
#if defined(__linux__)
  (void)family;
  return setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, ifname,
                    (socklen_t)strlen(ifname));
#elif defined(__APPLE__)
  unsigned idx = if_nametoindex(ifname);
  if (!idx) return -1;
  if (family == AF_INET6)
    return setsockopt(fd, IPPROTO_IPV6, IPV6_BOUND_IF, &idx, sizeof idx);
  return setsockopt(fd, IPPROTO_IP, IP_BOUND_IF, &idx, sizeof idx);
#else
  errno = ENOTSUP;
  return -1;
#endif
}

static int new_socket(int family) {
  int fd = socket(family, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  fcntl(fd, F_SETFD, FD_CLOEXEC);
#ifdef SO_NOSIGPIPE
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
#endif
  return fd;
}

/* Digest of the options both ends must share (tl.h marks them). */
static uint64_t options_digest(const tl_options_t *o) {
  int64_t v[] = {o->conns_per_peer, o->chunk_bytes, o->algo_threshold, o->algo,
                 o->stripe_min_bytes};
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
    for (int b = 0; b < 8; b++) h = (h ^ (uint8_t)(v[i] >> (8 * b))) * 1099511628211ull;
  return h;
}

/* ---- listen --------------------------------------------------------------------- */

static int tcp_alloc(tl_comm_t *c) {
  if (c->tstate) return TL_OK;
  tcp_t *t = calloc(1, sizeof *t);
  if (!t) return tl__error(c, TL_ERR_NOMEM, "out of memory");
  c->tstate = t;
  return TL_OK;
}

static int tcp_listen(tl_comm_t *c) {
  int rc = tcp_alloc(c);
  if (rc) return rc;
  tcp_t *t = T(c);
  t->ls = calloc((size_t)(c->neps ? c->neps : 1), sizeof *t->ls);
  if (!t->ls) return tl__error(c, TL_ERR_NOMEM, "out of memory");
  int own = 0;
  for (int i = 0; i < c->neps; i++) {
    tl_endpoint_t *e = &c->eps[i];
    if (e->owner != c->rank) continue;
    own++;
    /* One socket per distinct host:port of this rank. */
    int dup = -1;
    for (int j = 0; j < t->nls; j++) {
      tl_endpoint_t *o = &c->eps[t->ls[j].ep];
      if (strcmp(o->host, e->host) == 0 && (e->port == 0 || o->port == e->port)) dup = j;
    }
    if (dup >= 0) {
      if (e->port == 0) e->port = c->eps[t->ls[dup].ep].port;
      continue;
    }
    struct sockaddr_storage ss;
    socklen_t sl;
    char why[300], where[TL_HOST_LEN + 16];
    host_port(e, e->port, where, sizeof where);
    if (resolve(e->host, e->port, 1, &ss, &sl, why, sizeof why))
      return tl__error(c, TL_ERR_CONFIG, "cannot listen on %s: %s", where, why);
    int fd = new_socket(ss.ss_family);
    if (fd < 0)
      return tl__error(c, TL_ERR_SYSTEM, "socket() for %s: %s", where, strerror(errno));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ss.ss_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind_to_device(fd, ss.ss_family, e->ifname) < 0) {
      int err = errno;
      close(fd);
      return tl__error(c, TL_ERR_CONFIG, "cannot bind %s to interface '%s': %s%s",
                       where, e->ifname, strerror(err),
                       err == EPERM ? " (binding to an interface needs root "
                                      "or CAP_NET_RAW on Linux)" : "");
    }
    if (bind(fd, (struct sockaddr *)&ss, sl) < 0) {
      int err = errno;
      close(fd);
      if (err == EADDRINUSE)
        return tl__error(c, TL_ERR_CONFIG,
                         "port %d on %s is already in use (another job, or a "
                         "previous run still exiting): free it or give rank %d "
                         "another port in the hostfile", e->port, e->host, c->rank);
      if (err == EADDRNOTAVAIL)
        return tl__error(c, TL_ERR_CONFIG,
                         "address %s is not an address of this host, but the "
                         "hostfile gives it to rank %d: is this process the "
                         "right rank, on the right host? (thunderlink doctor "
                         "lists this host's interfaces)", e->host, c->rank);
      return tl__error(c, TL_ERR_SYSTEM, "bind %s: %s", where, strerror(err));
    }
    if (listen(fd, 128) < 0 || set_nonblocking(fd) < 0) {
      int err = errno;
      close(fd);
      return tl__error(c, TL_ERR_SYSTEM, "listen %s: %s", where, strerror(err));
    }
    if (e->port == 0) {
      struct sockaddr_storage b;
      socklen_t bl = sizeof b;
      getsockname(fd, (struct sockaddr *)&b, &bl);
      e->port = ntohs(b.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&b)->sin6_port
                                              : ((struct sockaddr_in *)&b)->sin_port);
    }
    t->ls[t->nls].fd = fd;
    t->ls[t->nls].ep = i;
    t->nls++;
  }
  if (own == 0 && c->size > 1)
    return tl__error(c, TL_ERR_CONFIG, "the hostfile gives rank %d no address to "
                     "listen on", c->rank);
  return TL_OK;
}

/* ---- connect -------------------------------------------------------------------- */

/* Endpoints of `owner` that `from` should connect to: those facing `from`,
 * else those facing any rank. Returns how many (indices into out). */
static int targets(tl_comm_t *c, int owner, int from, int *out, int cap) {
  int n = 0;
  for (int pass = 0; pass < 2 && n == 0; pass++)
    for (int i = 0; i < c->neps && n < cap; i++)
      if (c->eps[i].owner == owner && c->eps[i].facing == (pass == 0 ? from : -1))
        out[n++] = i;
  return n;
}

/* Our endpoint on the same cable as target number `which` of peer: the
 * `which`-th of our endpoints facing peer, if we have that many. */
static int source_ep(tl_comm_t *c, int peer, int which) {
  int n = 0;
  for (int i = 0; i < c->neps; i++)
    if (c->eps[i].owner == c->rank && c->eps[i].facing == peer && n++ == which) return i;
  return -1;
}

/*
 * Who listens for the link between a and b: the lower rank if it has an
 * address the higher one may use (the usual case), else the higher rank
 * (an MLX ring hostfile lists, for each rank, the addresses its left
 * neighbour dials). Returns the acceptor, or -1 when the two share no link,
 * and the acceptor's endpoints to dial in tg (nt of them). Both ends derive the same
 * answer from the common endpoint table.
 */
static int link_plan(tl_comm_t *c, int a, int b, int *tg, int *nt) {
  int lo = a < b ? a : b, hi = a < b ? b : a;
  if ((*nt = targets(c, lo, hi, tg, TL_MAX_CONNS))) return lo;
  if ((*nt = targets(c, hi, lo, tg, TL_MAX_CONNS))) return hi;
  return -1;
}

/*
 * The connections of a link: conns_per_peer for each cable (each endpoint
 * the dialling rank uses), at most TL_MAX_CONNS. Connection k goes to cable
 * (k / lanes) % ncables, where lanes is the number of concurrent streams the
 * collectives run on a link (2 when conns_per_peer >= 2: the ring's two
 * directions, lanes {0, 2, ...} and {1, 3, ...}). So every lane has a
 * connection on every cable, and striping within a lane follows the cables'
 * rates: each connection's share is its cable's weight divided by the
 * connections on that cable. Both ends compute this from the common table.
 */
static int lanes(const tl_comm_t *c) { return c->opts.conns_per_peer >= 2 ? 2 : 1; }

static int conn_cable(const tl_comm_t *c, int k, int ncables) {
  return (k / lanes(c)) % ncables;
}

static int compute_shares(tl_comm_t *c, int peer) {
  int tg[TL_MAX_CONNS];
  int nt;
  link_plan(c, c->rank, peer, tg, &nt);
  tl_link_t *l = &c->links[peer];
  int n = c->opts.conns_per_peer * nt;
  l->nconns = n > TL_MAX_CONNS ? TL_MAX_CONNS : n; /* 0: no shared cable, no link */
  for (int k = 0; k < l->nconns; k++) {
    int per = 0;
    for (int j = 0; j < l->nconns; j++) per += conn_cable(c, j, nt) == conn_cable(c, k, nt);
    double s = c->eps[tg[conn_cable(c, k, nt)]].weight / per * 1000.0;
    l->share[k] = s < 1 ? 1 : s > 1000000 ? 1000000 : (uint32_t)s;
  }
  return l->nconns;
}

static void pending_close(pending_t *p) {
  if (p->fd >= 0) close(p->fd);
  p->fd = -1;
}

static int retryable(int err) {
  return err == ECONNREFUSED || err == ETIMEDOUT || err == EHOSTUNREACH ||
         err == ENETUNREACH || err == ECONNRESET || err == ECONNABORTED ||
         err == EAGAIN || err == EINTR || err == ENETDOWN || err == EHOSTDOWN;
}

/* Start (or restart) an outgoing connection attempt. 0 = in progress,
 * 1 = retry later, <0 = fatal (message recorded). */
static int start_connect(tl_comm_t *c, pending_t *p) {
  tl_endpoint_t *e = &c->eps[p->ep];
  struct sockaddr_storage ss;
  socklen_t sl;
  char why[300];
  if (resolve(e->host, e->port, 0, &ss, &sl, why, sizeof why))
    return tl__error(c, TL_ERR_CONFIG, "cannot reach rank %d at %s: %s", p->peer,
                     p->remote, why);
  int fd = new_socket(ss.ss_family);
  if (fd < 0)
    return tl__error(c, TL_ERR_SYSTEM, "socket(): %s", strerror(errno));
  set_nonblocking(fd);
  if (p->src_ep >= 0) {
    tl_endpoint_t *s = &c->eps[p->src_ep];
    struct sockaddr_storage src;
    socklen_t srcl;
    if (bind_to_device(fd, ss.ss_family, s->ifname) < 0) {
      int err = errno;
      close(fd);
      return tl__error(c, TL_ERR_CONFIG, "cannot bind to interface '%s' to reach "
                       "rank %d: %s", s->ifname, p->peer, strerror(err));
    }
    if (resolve(s->host, 0, 1, &src, &srcl, why, sizeof why) == 0 &&
        src.ss_family == ss.ss_family &&
        bind(fd, (struct sockaddr *)&src, srcl) < 0) {
      int err = errno;
      close(fd);
      return tl__error(c, TL_ERR_CONFIG, "cannot use local address %s to reach "
                       "rank %d: %s%s", s->host, p->peer, strerror(err),
                       err == EADDRNOTAVAIL ? " (that address is not on this host)" : "");
    }
  }
  p->attempts++;
  if (connect(fd, (struct sockaddr *)&ss, sl) == 0 || errno == EINPROGRESS) {
    p->fd = fd;
    p->state = P_CONNECTING;
    return 0;
  }
  int err = errno;
  close(fd);
  p->last_errno = err;
  if (retryable(err)) return 1;
  return tl__error(c, TL_ERR_SYSTEM, "connect to rank %d at %s: %s", p->peer,
                   p->remote, strerror(err));
}

static void schedule_retry(pending_t *p, int64_t now) {
  int64_t backoff = 10000000ll << (p->attempts < 7 ? p->attempts : 7); /* 10 ms .. 1.28 s */
  if (backoff > 1000000000ll) backoff = 1000000000ll;
  p->retry_at = now + backoff;
  p->state = P_WAIT;
  pending_close(p);
}

static void fill_hello(tl_comm_t *c, pending_t *p) {
  hello_t *h = &p->buf.hello;
  memset(h, 0, sizeof *h);
  h->magic = HELLO_MAGIC;
  h->version = TL_PROTOCOL_VERSION;
  h->job_id = c->comm_id;
  h->options_digest = options_digest(&c->opts);
  h->src_rank = (uint32_t)c->rank;
  h->dst_rank = (uint32_t)p->peer;
  h->conn_index = (uint32_t)p->index;
  h->nconns = (uint32_t)c->links[p->peer].nconns;
  h->world_size = (uint32_t)c->size;
  p->done = 0;
}

/* Non-blocking partial I/O on a pending connection: 1 done, 0 again later,
 * -1 closed, -2 error (errno). */
static int pio(pending_t *p, size_t want, int is_send) {
  while (p->done < want) {
    ssize_t n = is_send ? send(p->fd, p->buf.raw + p->done, want - p->done, MSG_NOSIGNAL)
                        : recv(p->fd, p->buf.raw + p->done, want - p->done, 0);
    if (n > 0) { p->done += (size_t)n; continue; }
    if (n == 0 && !is_send) return -1;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    return -2;
  }
  return 1;
}

static const char *refusal(int status) {
  switch (status) {
  case ACK_WRONG_JOB: return "it belongs to another job (different job id; is another job using that port, or does the hostfile differ between hosts?)";
  case ACK_WRONG_VERSION: return "it runs another thunderlink protocol version (install the same thunderlink version on every host)";
  case ACK_WRONG_RANK: return "the ranks do not match (two processes started with the same rank, or hostfiles differ between hosts)";
  case ACK_WRONG_SIZE: return "the world sizes differ (hostfiles differ between hosts)";
  case ACK_WRONG_OPTIONS: return "tuning options differ (set THUNDERLINK_CONNS, THUNDERLINK_CHUNK_BYTES, THUNDERLINK_ALGO* and THUNDERLINK_STRIPE_MIN_BYTES the same on every rank)";
  case ACK_DUPLICATE: return "it already has that connection (two processes started with the same rank?)";
  default: return "unknown reason";
  }
}

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
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  int v = c->opts.sockbuf_bytes;
  if (v > 0 && sockbuf_takes(v)) {
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof v);
  }
}

static void describe_peer(int fd, char *buf, size_t cap) {
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  char h[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (getpeername(fd, (struct sockaddr *)&ss, &sl) == 0) {
    if (ss.ss_family == AF_INET6) {
      inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, h, sizeof h);
      port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
      snprintf(buf, cap, "[%s]:%d", h, port);
      return;
    }
    inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, h, sizeof h);
    port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
  }
  snprintf(buf, cap, "%s:%d", h, port);
}

/* Check an incoming hello. Returns ACK_OK, or a refusal; *fatal is set when
 * the refusal means this job cannot run (one of our own ranks disagrees). */
static int check_hello(tl_comm_t *c, const hello_t *h, int *fatal) {
  *fatal = 0;
  if (h->version != TL_PROTOCOL_VERSION) return *fatal = 1, ACK_WRONG_VERSION;
  if (h->job_id != c->comm_id) return ACK_WRONG_JOB;
  *fatal = 1;
  if (h->world_size != (uint32_t)c->size) return ACK_WRONG_SIZE;
  int tg[TL_MAX_CONNS], nt;
  if (h->dst_rank != (uint32_t)c->rank || h->src_rank >= (uint32_t)c->size ||
      h->src_rank == (uint32_t)c->rank ||
      link_plan(c, c->rank, (int)h->src_rank, tg, &nt) != c->rank)
    return ACK_WRONG_RANK;
  if (h->options_digest != options_digest(&c->opts) ||
      h->nconns != (uint32_t)c->links[h->src_rank].nconns ||
      h->conn_index >= h->nconns)
    return ACK_WRONG_OPTIONS;
  if (conn_at(c, (int)h->src_rank, (int)h->conn_index)->fd >= 0) return ACK_DUPLICATE;
  *fatal = 0;
  return ACK_OK;
}

static void adopt(tl_comm_t *c, int peer, int index, int fd, const char *remote) {
  conn_t *k = conn_at(c, peer, index);
  k->fd = fd;
  snprintf(k->remote, sizeof k->remote, "%s", remote);
  conn_setup(c, fd);
  tl__log(c, TL_LOG_TRACE, "connection %d with rank %d up (%s)", index, peer, remote);
}

/* Advance one pending connection after poll said it is ready. Returns 1 when
 * it became a connection, 0 to keep waiting, <0 fatal. */
static int advance(tl_comm_t *c, pending_t *p, int64_t now) {
  if (p->state == P_CONNECTING) {
    int err = 0;
    socklen_t el = sizeof err;
    getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &err, &el);
    if (err) {
      p->last_errno = err;
      if (retryable(err)) { schedule_retry(p, now); return 0; }
      return tl__error(c, TL_ERR_SYSTEM, "connect to rank %d at %s: %s", p->peer,
                       p->remote, strerror(err));
    }
    fill_hello(c, p);
    p->state = P_SEND_HELLO;
  }
  if (p->state == P_SEND_HELLO) {
    int r = pio(p, sizeof(hello_t), 1);
    if (r < 0) { p->last_errno = errno; schedule_retry(p, now); return 0; }
    if (r == 0) return 0;
    p->done = 0;
    p->state = P_RECV_ACK;
    return 0;
  }
  if (p->state == P_RECV_ACK) {
    int r = pio(p, sizeof(ack_t), 0);
    if (r == 0) return 0;
    if (r < 0)
      return tl__error(c, TL_ERR_PEER, "rank %d at %s closed the connection during "
                       "the handshake (is something other than rank %d listening "
                       "there?)", p->peer, p->remote, p->peer);
    ack_t *a = &p->buf.ack;
    if (a->magic != ACK_MAGIC)
      return tl__error(c, TL_ERR_PROTOCOL, "%s answered the handshake with bytes "
                       "that are not thunderlink's: something other than rank %d "
                       "listens there", p->remote, p->peer);
    if (a->status != ACK_OK)
      return tl__error(c, TL_ERR_CONFIG, "rank %d at %s refused our connection: %s",
                       p->peer, p->remote, refusal(a->status));
    adopt(c, p->peer, p->index, p->fd, p->remote);
    p->fd = -1;
    return 1;
  }
  if (p->state == P_RECV_HELLO) {
    int r = pio(p, sizeof(hello_t), 0);
    if (r == 0) return 0;
    if (r < 0 || p->buf.hello.magic != HELLO_MAGIC) {
      tl__log(c, TL_LOG_WARN, "refused a connection from %s: %s", p->remote,
              r < 0 ? "it closed before saying hello" :
                      "not a thunderlink peer (bad magic)");
      pending_close(p);
      return 0;
    }
    int fatal;
    hello_t h = p->buf.hello;
    int st = check_hello(c, &h, &fatal);
    p->peer = (int)h.src_rank;
    p->index = (int)h.conn_index;
    memset(&p->buf.ack, 0, sizeof p->buf.ack);
    p->buf.ack.magic = ACK_MAGIC;
    p->buf.ack.version = TL_PROTOCOL_VERSION;
    p->buf.ack.status = (uint16_t)st;
    p->buf.ack.rank = (uint32_t)c->rank;
    p->done = 0;
    p->refuse = (uint16_t)st;
    p->state = P_SEND_ACK;
    if (st != ACK_OK) {
      /* Best effort: tell it why, then drop it. */
      pio(p, sizeof(ack_t), 1);
      pending_close(p);
      if (!fatal) {
        tl__log(c, TL_LOG_WARN, "refused a connection from %s: %s", p->remote, refusal(st));
        return 0;
      }
      return tl__error(c, TL_ERR_CONFIG, "rank %u connected from %s but %s",
                       h.src_rank, p->remote, refusal(st));
    }
  }
  if (p->state == P_SEND_ACK) {
    int r = pio(p, sizeof(ack_t), 1);
    if (r == 0) return 0;
    if (r < 0) {
      tl__log(c, TL_LOG_WARN, "connection from rank %d (%s) dropped during the "
              "handshake", p->peer, p->remote);
      pending_close(p);
      return 0;
    }
    adopt(c, p->peer, p->index, p->fd, p->remote);
    p->fd = -1;
    return 1;
  }
  return 0;
}

static int tcp_connect(tl_comm_t *c) {
  int rc = tcp_alloc(c);
  if (rc) return rc;
  tcp_t *t = T(c);
  int nout = 0, nin = 0; /* we dial the peers that listen for our link */
  int C = 1;               /* the most connections of any link */
  for (int p = 0; p < c->size; p++) {
    if (p == c->rank) continue;
    int n = compute_shares(c, p);
    if (n == 0) continue;
    int tg[TL_MAX_CONNS], nt;
    if (link_plan(c, c->rank, p, tg, &nt) == p) nout += n; else nin += n;
    if (n > C) C = n;
  }
  t->nconns = C;
  t->nconn_total = c->size * C; /* size <= INT_MAX / TL_MAX_CONNS in practice */
  t->conns = calloc((size_t)c->size * (size_t)C, sizeof *t->conns);
  if (!t->conns) return tl__error(c, TL_ERR_NOMEM, "out of memory");
  for (int i = 0; i < t->nconn_total; i++) {
    t->conns[i].fd = -1;
    t->conns[i].peer = i / C;
    t->conns[i].index = i % C;
  }
  int cap = nout + nin + 64;
  pending_t *ps = calloc((size_t)cap, sizeof *ps);
  struct pollfd *pf = calloc((size_t)cap + (size_t)t->nls, sizeof *pf);
  int *pidx = calloc((size_t)cap + (size_t)t->nls, sizeof *pidx);
  if (!ps || !pf || !pidx) {
    free(ps); free(pf); free(pidx);
    return tl__error(c, TL_ERR_NOMEM, "out of memory");
  }
  int np = 0;
  for (int p = 0; p < c->size; p++) {
    int tg[TL_MAX_CONNS], nt;
    if (p == c->rank || link_plan(c, c->rank, p, tg, &nt) != p) continue;
    for (int k = 0; k < c->links[p].nconns; k++) {
      pending_t *q = &ps[np++];
      q->fd = -1;
      q->outgoing = 1;
      q->state = P_WAIT;
      q->peer = p;
      q->index = k;
      q->ep = tg[conn_cable(c, k, nt)];
      q->src_ep = source_ep(c, p, conn_cable(c, k, nt));
      host_port(&c->eps[q->ep], c->eps[q->ep].port, q->remote, sizeof q->remote);
    }
  }
  int64_t start = tl__now_ns();
  int64_t deadline = start + (int64_t)c->opts.connect_timeout_ms * 1000000;
  int up = 0, want = nout + nin;
  rc = TL_OK;
  while (up < want) {
    int64_t now = tl__now_ns();
    if (now >= deadline) break;
    int64_t wake = deadline;
    int n = 0;
    for (int i = 0; i < t->nls; i++) {
      pf[n].fd = t->ls[i].fd;
      pf[n].events = POLLIN;
      pidx[n++] = -1 - i;
    }
    for (int i = 0; i < np; i++) {
      pending_t *q = &ps[i];
      if (q->outgoing && q->state == P_WAIT && q->fd < 0 && q->retry_at <= now &&
          q->retry_at >= 0) {
        int r = start_connect(c, q);
        if (r < 0) { rc = r; goto out; }
        if (r == 1) schedule_retry(q, now);
      }
      if (q->state == P_WAIT && q->outgoing && q->retry_at > now && q->retry_at < wake)
        wake = q->retry_at;
      if (!q->outgoing && q->fd >= 0 && now - q->started > STRANGER_TIMEOUT_NS) {
        tl__log(c, TL_LOG_WARN, "dropped a connection from %s that did not complete "
                "the handshake within 10 s", q->remote);
        pending_close(q);
      }
      if (q->fd < 0) continue;
      pf[n].fd = q->fd;
      pf[n].events = (q->state == P_CONNECTING || q->state == P_SEND_HELLO ||
                      q->state == P_SEND_ACK) ? POLLOUT : POLLIN;
      pidx[n++] = i;
    }
    int64_t ms = (wake - now + 999999) / 1000000;
    if (ms > 1000) ms = 1000;
    int r = poll(pf, (nfds_t)n, (int)ms);
    if (r < 0) {
      if (errno == EINTR) {
        if (on_main_thread()) {
          rc = tl__error(c, TL_ERR_INTERRUPTED, "interrupted while connecting");
          goto out;
        }
        continue;
      }
      rc = tl__error(c, TL_ERR_SYSTEM, "poll: %s", strerror(errno));
      goto out;
    }
    now = tl__now_ns();
    for (int i = 0; i < n && r > 0; i++) {
      if (!pf[i].revents) continue;
      if (pidx[i] < 0) {
        int fd;
        while ((fd = accept(pf[i].fd, NULL, NULL)) >= 0) {
          fcntl(fd, F_SETFD, FD_CLOEXEC);
          set_nonblocking(fd);
#ifdef SO_NOSIGPIPE
          int one = 1;
          setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
#endif
          int slot = -1;
          for (int j = 0; j < np; j++)
            if (!ps[j].outgoing && ps[j].fd < 0) { slot = j; break; }
          if (slot < 0 && np < cap) slot = np++;
          if (slot < 0) { close(fd); continue; }
          pending_t *q = &ps[slot];
          memset(q, 0, sizeof *q);
          q->fd = fd;
          q->state = P_RECV_HELLO;
          q->started = now;
          q->ep = q->src_ep = -1;
          describe_peer(fd, q->remote, sizeof q->remote);
        }
        continue;
      }
      pending_t *q = &ps[pidx[i]];
      if (q->fd < 0) continue;
      int a = advance(c, q, now);
      if (a < 0) { rc = a; goto out; }
      if (a == 1) {
        up++;
        q->retry_at = -1; /* done */
        if (!q->outgoing) q->state = P_WAIT;
      }
    }
  }
  if (up < want) {
    /* Name what is missing: the first outgoing connection not up, else the
     * first peer that never dialled in. */
    double secs = (double)c->opts.connect_timeout_ms / 1000.0;
    for (int i = 0; i < np; i++) {
      pending_t *q = &ps[i];
      if (!q->outgoing || q->retry_at == -1) continue;
      rc = tl__error(c, TL_ERR_TIMEOUT,
                     "could not connect to rank %d at %s within %.0f s (%d attempts, "
                     "last error: %s). Is rank %d running, and is %s its address "
                     "on a link this host can reach? (thunderlink doctor checks "
                     "a hostfile)", q->peer, q->remote, secs, q->attempts,
                     q->last_errno ? strerror(q->last_errno) : "still connecting",
                     q->peer, q->remote);
      goto out;
    }
    for (int p = 0; p < c->size; p++)
      for (int k = 0; k < c->links[p].nconns; k++)
        if (p != c->rank && conn_at(c, p, k)->fd < 0) {
          char where[TL_HOST_LEN + 16] = "?";
          if (t->nls) host_port(&c->eps[t->ls[0].ep], c->eps[t->ls[0].ep].port, where, sizeof where);
          rc = tl__error(c, TL_ERR_TIMEOUT,
                         "rank %d never connected to this rank (listening at %s) "
                         "within %.0f s: is rank %d running, and can it reach "
                         "this address?", p, where, secs, p);
          goto out;
        }
    rc = tl__error(c, TL_ERR_TIMEOUT, "connection set-up did not finish in time");
  }
out:
  for (int i = 0; i < np; i++) pending_close(&ps[i]);
  free(ps);
  free(pf);
  free(pidx);
  if (!rc) {
    /* Listening sockets are no longer needed: every connection is up. */
    for (int i = 0; i < t->nls; i++) close(t->ls[i].fd);
    t->nls = 0;
    tl__log(c, TL_LOG_INFO, "connected to %d peers, %d connections each, in %.1f ms",
            c->size - 1, C, (double)(tl__now_ns() - start) / 1e6);
  }
  return rc;
}

/* ---- data path --------------------------------------------------------------------- */

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

/* A connection failed while we needed it. `what` is "sending to" or
 * "receiving from"; err 0 means the peer closed it. */
static int lost(tl_comm_t *c, conn_t *k, const char *what, int err) {
  if (err == 0)
    return tl__fail(c, TL_ERR_PEER, "rank %d (%s, connection %d) closed the "
                    "connection: it exited or failed (see its own error)",
                    k->peer, k->remote, k->index);
  if (err == EPIPE || err == ECONNRESET)
    return tl__fail(c, TL_ERR_PEER, "%s rank %d (%s, connection %d) failed: %s; "
                    "rank %d exited or failed (see its own error)", what, k->peer,
                    k->remote, k->index, strerror(err), k->peer);
  return tl__fail(c, TL_ERR_PEER, "%s rank %d (%s, connection %d) failed: %s", what,
                  k->peer, k->remote, k->index, strerror(err));
}

/* The rest of a frame, as an iovec over its header (hdr: what is sent, or
 * where the received header goes) and its payload; both move in one
 * system call. Returns the number of iovec entries. */
static int frame_iov(tl_slice_t *s, tl_frame_t *hdr, struct iovec iov[2], struct msghdr *m) {
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
  memset(m, 0, sizeof *m);
  m->msg_iov = iov;
  m->msg_iovlen = (size_t)n;
  return n;
}

/* Write queued frames until the socket would block. Returns the number of
 * slices completed, or a negative status. */
static int send_some(tl_comm_t *c, conn_t *k) {
  int completed = 0;
  const size_t H = sizeof(tl_frame_t);
  while (k->sq) {
    tl_slice_t *s = k->sq;
    struct iovec iov[2];
    struct msghdr m;
    int n = frame_iov(s, &s->hdr, iov, &m);
    ssize_t w = n ? sendmsg(k->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT) : 0;
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      return lost(c, k, "sending to", errno);
    }
    size_t before = s->done;
    s->done += (size_t)w;
    c->stats.bytes_sent += (s->done > H ? s->done - H : 0) - (before > H ? before - H : 0);
    if (s->done == H + s->len) {
      pop(&k->sq, &k->sq_tail);
      tl__slice_done(c, s);
      completed++;
    }
  }
  return completed;
}

/*
 * Acknowledge at once. Linux treats a connection whose traffic alternates
 * direction as interactive and delays its ACKs (up to 40 ms, "ato"), hoping
 * to piggyback them on the reply; a collective's sender then stalls on a
 * full window. TCP_QUICKACK is not sticky, so it is renewed after each read.
 */
static void quickack(int fd) {
#ifdef TCP_QUICKACK
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
#else
  (void)fd;
#endif
}

/*
 * A peer's abort notice: its header is in `got`, the first `have` bytes of
 * its reason at `buf`; read the rest of the reason. The peer failed during
 * the operation the header names. If that is a later collective than ours,
 * ours can still complete (every rank finished it, or the peer could not
 * have moved on), so the failure is kept for this rank's next call;
 * otherwise it fails now.
 */
static int peer_aborted(tl_comm_t *c, conn_t *k, const tl_frame_t *got,
                        const char *buf, size_t have) {
  char msg[ABORT_MAX + 1];
  size_t len = tl__min(got->len, ABORT_MAX);
  size_t n = tl__min(have, len);
  memcpy(msg, buf, n);
  int64_t until = tl__now_ns() + 200000000; /* 200 ms for the rest */
  while (n < len && tl__now_ns() < until) {
    ssize_t r = recv(k->fd, msg + n, len - n, MSG_DONTWAIT);
    if (r > 0) { n += (size_t)r; continue; }
    if (r == 0 || (errno != EAGAIN && errno != EINTR)) break;
    struct pollfd p = {k->fd, POLLIN, 0};
    poll(&p, 1, 20);
  }
  msg[n] = 0;
  k->eof = 1;
  int later = got->op && got->op != TL_OP_SEND && c->cur.op && c->cur.op != TL_OP_SEND &&
              (int32_t)(got->seq - c->cur.seq) > 0;
  if (later && !k->rq) {
    if (!c->pending_abort[0])
      snprintf(c->pending_abort, sizeof c->pending_abort, "rank %d failed: %s", k->peer,
               n ? msg : "(no reason given)");
    return 0;
  }
  return tl__fail(c, TL_ERR_PEER, "rank %d failed: %s", k->peer, n ? msg : "(no reason given)");
}

static int recv_some(tl_comm_t *c, conn_t *k) {
  int completed = 0;
  const size_t H = sizeof(tl_frame_t);
  while (k->rq) {
    tl_slice_t *s = k->rq;
    struct iovec iov[2];
    struct msghdr m;
    frame_iov(s, &s->got, iov, &m);
    ssize_t r = recvmsg(k->fd, &m, MSG_DONTWAIT);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      return lost(c, k, "receiving from", errno);
    }
    if (r == 0) return lost(c, k, "receiving from", 0);
    if (!c->spin_ns) quickack(k->fd); /* bulk transfers; small replies carry their ACKs */
    size_t before = s->done;
    s->done += (size_t)r;
    c->stats.bytes_received += (s->done > H ? s->done - H : 0) - (before > H ? before - H : 0);
    if (before < H && s->done >= H) {
      if (s->got.magic == TL_FRAME_MAGIC && s->got.type == TL_FRAME_ABORT)
        return peer_aborted(c, k, &s->got, s->buf, s->done - H);
      char where[TL_HOST_LEN + 64];
      snprintf(where, sizeof where, "%s, connection %d", k->remote, k->index);
      int rc = tl__check_frame(c, k->peer, &s->hdr, &s->got, where);
      if (rc) return rc;
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

/* Look at the next frame on a connection with no receive queued. */
static int peek_idle(tl_comm_t *c, conn_t *k) {
  tl_frame_t f;
  ssize_t r = recv(k->fd, &f, sizeof f, MSG_PEEK | MSG_DONTWAIT);
  if (r < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
    k->eof = 1; /* reset while idle: an error only if we need this peer */
    tl__log(c, TL_LOG_INFO, "connection %d to rank %d: %s", k->index, k->peer,
            strerror(errno));
    return 0;
  }
  if (r == 0) {
    k->eof = 1;
    tl__log(c, TL_LOG_INFO, "rank %d closed connection %d", k->peer, k->index);
    return 0;
  }
  if ((size_t)r < sizeof f) return 0; /* the rest of the header is on its way */
  char where[TL_HOST_LEN + 64];
  snprintf(where, sizeof where, "%s, connection %d", k->remote, k->index);
  if (f.magic != TL_FRAME_MAGIC)
    return tl__fail(c, TL_ERR_PROTOCOL, "rank %d (%s) sent bytes that are not a "
                    "thunderlink frame; the stream is corrupt", k->peer, where);
  if (f.type == TL_FRAME_ABORT) {
    recv(k->fd, &f, sizeof f, MSG_DONTWAIT); /* consume the header */
    return peer_aborted(c, k, &f, NULL, 0);
  }
  if (f.op != TL_OP_SEND && c->cur.op && c->cur.op != TL_OP_SEND) {
    if (f.seq == c->cur.seq) {
      tl_frame_t want = tl__frame(c, f.unit, c->cur.root >= 0 ? (uint32_t)c->cur.root : f.lane);
      want.len = f.len;
      int rc = tl__check_frame(c, k->peer, &want, &f, where);
      if (rc) return rc;
    } else if ((int32_t)(f.seq - c->cur.seq) < 0) {
      return tl__fail(c, TL_ERR_PROTOCOL, "rank %d (%s) sent a frame of %s #%u, "
                      "which this rank finished already", k->peer, where,
                      tl__op_name(f.op, f.redop), f.seq);
    }
  }
  k->peeked = 1; /* legitimate, for a later receive */
  return 0;
}

static int tcp_post_send(tl_comm_t *c, int peer, int k, tl_slice_t *s) {
  conn_t *cn = conn_at(c, peer, k);
  int was_empty = cn->sq == NULL;
  push(&cn->sq, &cn->sq_tail, s);
  if (!was_empty) return TL_OK;
  /* Start at once: small messages leave without a trip through poll. */
  int r = send_some(c, cn);
  return r < 0 ? r : TL_OK;
}

static int tcp_post_recv(tl_comm_t *c, int peer, int k, tl_slice_t *s) {
  conn_t *cn = conn_at(c, peer, k);
  push(&cn->rq, &cn->rq_tail, s);
  cn->peeked = 0;
  return TL_OK;
}

static int describe_wait(tl_comm_t *c, char *buf, size_t cap) {
  tcp_t *t = T(c);
  size_t n = 0;
  int listed = 0;
  const size_t H = sizeof(tl_frame_t);
  for (int i = 0; i < t->nconn_total && listed < 3; i++) {
    conn_t *k = &t->conns[i];
    if (k->rq && n < cap) {
      size_t got = k->rq->done > H ? k->rq->done - H : 0;
      n += (size_t)snprintf(buf + n, cap - n, "%s to receive %zu B from rank %d (%s, "
                            "connection %d; %zu B arrived)", listed ? ";" : "",
                            k->rq->len, k->peer, k->remote, k->index, got);
      listed++;
    }
    if (k->sq && n < cap && listed < 3) {
      size_t sent = k->sq->done > H ? k->sq->done - H : 0;
      n += (size_t)snprintf(buf + n, cap - n, "%s to send %zu B to rank %d (%s, "
                            "connection %d; %zu B sent)", listed ? ";" : "",
                            k->sq->len, k->peer, k->remote, k->index, sent);
      listed++;
    }
  }
  return listed;
}

static int tcp_progress(tl_comm_t *c) {
  tcp_t *t = T(c);
  if (t->pcap < t->nconn_total) {
    free(t->pfds);
    free(t->pconn);
    t->pfds = calloc((size_t)t->nconn_total, sizeof *t->pfds);
    t->pconn = calloc((size_t)t->nconn_total, sizeof *t->pconn);
    if (!t->pfds || !t->pconn) {
      t->pcap = 0;
      return tl__fail(c, TL_ERR_NOMEM, "out of memory");
    }
    t->pcap = t->nconn_total;
  }
  /* Spin first (small operations only): try the sockets directly, without
   * poll, and yield the core between tries, so that a peer sharing this
   * core (more ranks than cores) gets to run instead of being spun out. */
  int64_t spin_end = c->spin_ns ? tl__now_ns() + c->spin_ns : 0;
  while (spin_end && tl__now_ns() < spin_end) {
    int completed = 0;
    for (int i = 0; i < t->nconn_total; i++) {
      conn_t *k = &t->conns[i];
      if (k->fd < 0) continue;
      int x = k->sq ? send_some(c, k) : 0;
      if (x < 0) return x;
      completed += x;
      x = k->rq ? recv_some(c, k) : 0;
      if (x < 0) return x;
      completed += x;
    }
    if (completed) return TL_OK;
    sched_yield();
  }
  for (;;) {
    int n = 0, busy = 0;
    for (int i = 0; i < t->nconn_total; i++) {
      conn_t *k = &t->conns[i];
      if (k->fd < 0) continue;
      short ev = 0;
      if (k->sq) ev |= POLLOUT;
      if (k->rq || (!k->peeked && !k->eof)) ev |= POLLIN;
      if (k->sq || k->rq) busy++;
      if (!ev) continue;
      t->pfds[n].fd = k->fd;
      t->pfds[n].events = ev;
      t->pfds[n].revents = 0;
      t->pconn[n++] = k;
    }
    if (!busy)
      return tl__fail(c, TL_ERR_INVALID, "internal error: waiting with nothing "
                      "queued");
    int64_t left = c->deadline_ns - tl__now_ns();
    int timeout = left <= 0 ? 0 : (int)tl__min((size_t)((left + 999999) / 1000000), 1000);
    int r = poll(t->pfds, (nfds_t)n, timeout);
    if (r < 0) {
      if (errno != EINTR) return tl__fail(c, TL_ERR_SYSTEM, "poll: %s", strerror(errno));
      if (on_main_thread())
        return tl__fail(c, TL_ERR_INTERRUPTED, "interrupted by a signal");
      continue;
    }
    int completed = 0;
    for (int i = 0; i < n && r > 0; i++) {
      short re = t->pfds[i].revents;
      if (!re) continue;
      conn_t *k = t->pconn[i];
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
    }
    if (completed) return TL_OK;
    if (tl__now_ns() >= c->deadline_ns) {
      char what[600] = "";
      describe_wait(c, what, sizeof what);
      return tl__fail(c, TL_ERR_TIMEOUT, "timed out after %.1f s waiting%s. A peer "
                      "may be stopped, hung or still busy elsewhere, or a cable is "
                      "down (THUNDERLINK_TIMEOUT sets the limit)",
                      (double)c->opts.timeout_ms / 1000.0, what);
    }
  }
}

static void drop_queues(tl_comm_t *c, conn_t *k) {
  while (k->sq) tl__slice_free(c, pop(&k->sq, &k->sq_tail));
  while (k->rq) tl__slice_free(c, pop(&k->rq, &k->rq_tail));
}

static void tcp_abort(tl_comm_t *c, const char *why) {
  tcp_t *t = T(c);
  if (!t || !t->conns) return;
  size_t len = tl__min(strlen(why), ABORT_MAX);
  tl_frame_t f;
  memset(&f, 0, sizeof f);
  f.magic = TL_FRAME_MAGIC;
  f.type = TL_FRAME_ABORT;
  f.op = (uint8_t)c->cur.op; /* where we failed: see peer_aborted */
  f.seq = c->cur.seq;
  f.len = (uint32_t)len;
  for (int i = 0; i < t->nconn_total; i++) {
    conn_t *k = &t->conns[i];
    if (k->fd < 0) continue;
    /* Only at a frame boundary: a half-sent frame cannot be interrupted. */
    if (!k->eof && (!k->sq || k->sq->done == 0)) {
      struct iovec iov[2] = {{&f, sizeof f}, {(void *)why, len}};
      struct msghdr m;
      memset(&m, 0, sizeof m);
      m.msg_iov = iov;
      m.msg_iovlen = 2;
      ssize_t w = sendmsg(k->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
      (void)w;
    }
    /* FIN after the notice; the descriptor stays open until shutdown so that
     * the peer reads the notice rather than a reset. */
    shutdown(k->fd, SHUT_WR);
    k->eof = 1;
    drop_queues(c, k);
  }
}

static void tcp_shutdown(tl_comm_t *c) {
  tcp_t *t = T(c);
  if (!t) return;
  for (int i = 0; i < t->nls; i++) close(t->ls[i].fd);
  for (int i = 0; i < t->nconn_total; i++) {
    conn_t *k = &t->conns[i];
    drop_queues(c, k);
    if (k->fd >= 0) close(k->fd);
  }
  free(t->ls);
  free(t->conns);
  free(t->pfds);
  free(t->pconn);
  free(t);
  c->tstate = NULL;
}

const tl_transport_ops_t tl__tcp_ops = {
    .name = "tcp",
    .listen = tcp_listen,
    .connect = tcp_connect,
    .post_send = tcp_post_send,
    .post_recv = tcp_post_recv,
    .progress = tcp_progress,
    .abort = tcp_abort,
    .shutdown = tcp_shutdown,
};
