/*
 * The bootstrap: how every link starts, whatever its transport.
 *
 * Every pair of ranks that shares a link is joined by TCP connections: the
 * rank without an address for the other one dials (tl__link_plan), and every
 * connection starts with a handshake (hello / ack) that carries the protocol
 * version, the job id, both ranks, the connection index, a digest of the
 * options that decide how messages are cut, and each side's host identity,
 * so that a stranger, another job, another version or a rank with other
 * settings is refused with a message that says which. When the job has a
 * token (THUNDERLINK_TOKEN), both ends also prove they hold it (see "the
 * token proof" below) before anything the dialler says can end the job. A
 * link gets conns_per_peer connections per cable (what TCP stripes over), or
 * one when the job runs on shared memory only. Once every link has its
 * connections, comm.c hands them to each link's transport, which exchanges
 * its own connection data over them (shared memory: the segment) and keeps
 * what it needs. A transport never opens a listening socket of its own.
 *
 * Everything is non-blocking and driven by poll(2) from the calling thread,
 * under the connect deadline.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif
#if defined(__APPLE__)
#include <pthread.h>
#endif

#include "internal.h"

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is set on every socket instead */
#endif

#define HELLO_MAGIC 0x4b4e4c54u /* "TLNK" */
#define ACK_MAGIC 0x4b414c54u   /* "TLAK" */
#define PROOF_MAGIC 0x46504c54u /* "TLPF" */
#define HELLO_TOKEN 1u          /* hello.flags: the dialler holds a job token */
/* An accepted connection that has not said hello by then is dropped: a real
 * rank sends its hello as soon as its connection is up, and one that lost
 * its connection this way dials again (see P_RECV_ACK). Kept short so that
 * silent connections cannot hold the pending slots for long. */
#define STRANGER_TIMEOUT_NS (2ll * 1000000000)
/* Connections accepted per listening socket per turn of the loop, so that a
 * stream of new connections cannot keep the loop from the others. */
#define ACCEPT_BURST 64

enum {
  ACK_OK = 0,
  ACK_WRONG_JOB = 1,
  ACK_WRONG_VERSION = 2,
  ACK_WRONG_RANK = 3,
  ACK_WRONG_SIZE = 4,
  ACK_WRONG_OPTIONS = 5,
  ACK_DUPLICATE = 6,
  ACK_AUTH_FAILED = 7, /* the dialler's proof of the token is wrong */
  ACK_NEED_TOKEN = 8,  /* this job has a token; the dialler offers none */
  ACK_NO_TOKEN = 9,    /* the dialler offers a token; this rank has none */
};

/* The handshake. Fixed layout, little-endian; magic and version stay at the
 * same offsets in every protocol version so that any version can refuse any
 * other one cleanly (an ack's first 16 bytes never change). */
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
  uint64_t host_id;  /* see tl__host_id: same value, same host */
  uint8_t nonce[32]; /* the dialler's challenge (random; zero without a token) */
} hello_t;

typedef struct ack {
  uint32_t magic;
  uint16_t version;
  uint16_t status; /* ACK_* */
  uint32_t rank;
  uint32_t reserved;
  /* From version 2 on. */
  uint64_t host_id;
  uint8_t nonce[32]; /* the listener's challenge (random; zero without a token) */
} ack_t;

/* With a token, after hello and ack: the dialler's proof, then the
 * listener's verdict (status) with its own proof. */
typedef struct proof {
  uint32_t magic;
  uint16_t version;
  uint16_t status; /* the verdict: ACK_OK or ACK_AUTH_FAILED; 0 in the dialler's */
  uint8_t mac[32];
} proof_t;

#define ACK_V1_BYTES 16

_Static_assert(sizeof(hello_t) == 88, "hello layout");
_Static_assert(sizeof(ack_t) == 56, "ack layout");
_Static_assert(sizeof(proof_t) == 40, "proof layout");

/* A connection being set up. Dialler: CONNECTING, SEND_HELLO, RECV_ACK, then
 * with a token SEND_PROOF, RECV_VERDICT. Listener: RECV_HELLO, SEND_ACK, then
 * with a token RECV_PROOF, SEND_VERDICT. */
enum {
  P_WAIT, P_CONNECTING, P_SEND_HELLO, P_RECV_ACK, P_SEND_PROOF, P_RECV_VERDICT,
  P_RECV_HELLO, P_SEND_ACK, P_RECV_PROOF, P_SEND_VERDICT
};

typedef struct pending {
  int fd;
  int state;
  int outgoing;
  int peer, index; /* outgoing: target; incoming: from the hello */
  int ep;          /* outgoing: endpoint index in c->eps */
  int src_ep;      /* outgoing: our endpoint to bind to, or -1 */
  hello_t hello; /* sent (dialler) or received (listener) */
  ack_t ack;     /* received (dialler) or sent (listener) */
  proof_t proof; /* the message of the token proof in flight */
  int status;    /* listener with a token: its answer to the hello, until proven */
  size_t done;
  int64_t retry_at;
  int64_t started;
  int attempts;
  int last_errno;
  const char *last_why; /* outgoing: why the last attempt failed, when not an errno */
  uint64_t peer_host; /* incoming: the dialler's host id, from its hello */
  char remote[TL_HOST_LEN + 16];
} pending_t;

typedef struct listener {
  int fd;
  int ep; /* first endpoint served */
} listener_t;

typedef struct boot {
  listener_t *ls;
  int nls;
  int auth_failures;                  /* connections refused for their token */
  char auth_from[TL_HOST_LEN + 16];   /* the latest one's address */
} boot_t;

static boot_t *B(tl_comm_t *c) { return (boot_t *)c->boot; }

int tl__on_main_thread(void) {
#if defined(__linux__)
  return getpid() == (pid_t)syscall(SYS_gettid);
#elif defined(__APPLE__)
  return pthread_main_np() != 0;
#else
  return 0;
#endif
}

/* ---- host identity ---------------------------------------------------------------
 *
 * Two processes may share memory when they run on one kernel, under one user,
 * and see each other's processes: Linux: the boot id, the network namespace
 * (so that hosts emulated with namespaces count as different hosts, and
 * their ranks keep talking over their cables), the pid namespace and the
 * user; macOS: the host UUID and the user.
 */

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

uint64_t tl__host_id(void) {
  uint64_t h = 1469598103934665603ull;
  uid_t uid = getuid();
  h = fnv(h, &uid, sizeof uid);
#if defined(__linux__)
  char boot[64] = "";
  FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
  if (f) {
    if (!fgets(boot, sizeof boot, f)) boot[0] = 0;
    fclose(f);
  }
  h = fnv(h, boot, strlen(boot));
  static const char *const ns[] = {"/proc/self/ns/net", "/proc/self/ns/pid"};
  for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
    struct stat st;
    if (stat(ns[i], &st) == 0) {
      h = fnv(h, &st.st_dev, sizeof st.st_dev);
      h = fnv(h, &st.st_ino, sizeof st.st_ino);
    }
  }
#elif defined(__APPLE__)
  uuid_t u;
  struct timespec wait = {1, 0};
  if (gethostuuid(u, &wait) == 0) h = fnv(h, u, sizeof u);
#endif
  return h ? h : 1;
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


/* ---- listen --------------------------------------------------------------------- */

int tl__boot_listen(tl_comm_t *c) {
  if (!c->boot && !(c->boot = calloc(1, sizeof(boot_t))))
    return tl__error(c, TL_ERR_NOMEM, "out of memory");
  boot_t *t = B(c);
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
      /* Listening on every interface: one socket per port. */
      if (c->opts.listen_all && e->port != 0 && o->port == e->port) dup = j;
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
    /* Only on the hostfile's address, unless asked for every interface
     * (THUNDERLINK_LISTEN_ALL): the port is then open on every network this
     * host is on. */
    if (c->opts.listen_all) {
      if (ss.ss_family == AF_INET6)
        ((struct sockaddr_in6 *)&ss)->sin6_addr = in6addr_any;
      else
        ((struct sockaddr_in *)&ss)->sin_addr.s_addr = htonl(INADDR_ANY);
    }
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


void tl__boot_close(tl_comm_t *c) {
  boot_t *t = B(c);
  if (!t) return;
  for (int i = 0; i < t->nls; i++) close(t->ls[i].fd);
  free(t->ls);
  free(t);
  c->boot = NULL;
}

/* ---- connect -------------------------------------------------------------------- */

/* Connection k of a link goes to cable (k / lanes) % ncables, where lanes is
 * the number of concurrent streams the collectives run on a link (2 when
 * conns_per_peer >= 2: the ring's two directions, lanes {0, 2, ...} and
 * {1, 3, ...}), so that every lane has a connection on every cable. */
int tl__boot_cable(const tl_comm_t *c, int k, int ncables) {
  return (k / tl__ring_lanes(&c->opts)) % ncables;
}

int tl__boot_conns(const tl_comm_t *c, int peer) {
  int tg[TL_MAX_CONNS], nt;
  if (peer == c->rank || tl__link_plan(c->eps, c->neps, c->rank, peer, tg, &nt) < 0) return 0;
  if (c->opts.transport == TL_TRANSPORT_SHM) return 1;
  int n = c->opts.conns_per_peer * nt;
  /* and, with heartbeats, a control connection (tcp.c, heartbeat.c) */
  return (n > TL_MAX_CONNS ? TL_MAX_CONNS : n) + tl__tcp_has_ctl(c);
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
  p->last_why = NULL;
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

static int fill_hello(tl_comm_t *c, pending_t *p) {
  hello_t *h = &p->hello;
  memset(h, 0, sizeof *h);
  h->magic = HELLO_MAGIC;
  h->version = TL_PROTOCOL_VERSION;
  if (c->opts.token_set) {
    h->flags = HELLO_TOKEN;
    if (tl__random(h->nonce, sizeof h->nonce) < 0)
      return tl__error(c, TL_ERR_SYSTEM, "cannot read random bytes for the handshake's "
                       "challenge: %s", strerror(errno));
  }
  h->job_id = c->comm_id;
  h->options_digest = tl__options_digest(&c->opts);
  h->src_rank = (uint32_t)c->rank;
  h->dst_rank = (uint32_t)p->peer;
  h->conn_index = (uint32_t)p->index;
  h->nconns = (uint32_t)c->links[p->peer].nboot;
  h->world_size = (uint32_t)c->size;
  h->host_id = c->host_id;
  p->done = 0;
  return TL_OK;
}

/* Non-blocking partial I/O on a pending connection: 1 done, 0 again later,
 * -1 closed, -2 error (errno). */
static int pio(pending_t *p, void *buf, size_t want, int is_send) {
  char *raw = buf;
  while (p->done < want) {
    ssize_t n = is_send ? send(p->fd, raw + p->done, want - p->done, MSG_NOSIGNAL)
                        : recv(p->fd, raw + p->done, want - p->done, 0);
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
  case ACK_WRONG_OPTIONS: return tl__options_differ;
  case ACK_DUPLICATE: return "it already has that connection (two processes started with the same rank?)";
  case ACK_AUTH_FAILED: return "authentication failed: it does not hold this job's token";
  case ACK_NEED_TOKEN: return "authentication failed: the job has a token (THUNDERLINK_TOKEN) and the dialler has none";
  case ACK_NO_TOKEN: return "authentication failed: the dialler has a token (THUNDERLINK_TOKEN) and this rank has none";
  default: return "unknown reason";
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
  /* Nothing past the version can be read in another version's layout, so
   * this says nothing about who sent it: refused and logged, not fatal (a
   * rank of this job running another version fails on its own side, with
   * the refusal's reason). */
  if (h->version != TL_PROTOCOL_VERSION) return ACK_WRONG_VERSION;
  if (h->job_id != c->comm_id) return ACK_WRONG_JOB;
  /* Token or none: the listener does not know yet whether this is one of
   * its ranks, so neither is fatal here (the dialler's side fails). */
  int offers = (h->flags & HELLO_TOKEN) != 0;
  if (c->opts.token_set && !offers) return ACK_NEED_TOKEN;
  if (!c->opts.token_set && offers) return ACK_NO_TOKEN;
  *fatal = 1;
  if (h->world_size != (uint32_t)c->size) return ACK_WRONG_SIZE;
  int tg[TL_MAX_CONNS], nt;
  if (h->dst_rank != (uint32_t)c->rank || h->src_rank >= (uint32_t)c->size ||
      h->src_rank == (uint32_t)c->rank ||
      tl__link_plan(c->eps, c->neps, c->rank, (int)h->src_rank, tg, &nt) != c->rank)
    return ACK_WRONG_RANK;
  tl_link_t *l = &c->links[h->src_rank];
  if (h->options_digest != tl__options_digest(&c->opts) || h->nconns != (uint32_t)l->nboot ||
      h->conn_index >= h->nconns)
    return ACK_WRONG_OPTIONS;
  if (l->boot_fds[h->conn_index] >= 0) return ACK_DUPLICATE;
  *fatal = 0;
  return ACK_OK;
}

static void adopt(tl_comm_t *c, int peer, int index, int fd, const char *remote,
                  uint64_t host_id) {
  tl_link_t *l = &c->links[peer];
  /* Every transport sends small messages on these (frames, wake-ups). */
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  l->boot_fds[index] = fd;
  l->host_id = host_id;
  if (index == 0 || !l->remote[0]) snprintf(l->remote, sizeof l->remote, "%s", remote);
  tl__log(c, TL_LOG_TRACE, "bootstrap connection %d with rank %d up (%s)", index, peer,
          remote);
}

/* ---- the token proof --------------------------------------------------------------
 *
 * With a job token (c->opts.token_set; the key is a hash of
 * THUNDERLINK_TOKEN), a connection is set up in four messages:
 *
 *   dialler  -> hello   (its ranks, the job id, connection index, nonce Nd)
 *   listener -> ack     (its answer, host id, nonce Nl)
 *   dialler  -> proof   HMAC(key, "dialler" | hello | ack)
 *   listener -> verdict ACK_OK and HMAC(key, "listener" | hello | ack),
 *                       or ACK_AUTH_FAILED and no proof
 *
 * Both proofs cover both nonces (fresh from the kernel on each side, for
 * every connection), the job id, both ranks and the connection index, so a
 * proof recorded on one connection is worth nothing on another, and the
 * labels keep one side's proof from being reflected as the other's. The
 * listener proves itself only to a dialler that has proved itself first: a
 * stranger gets no MAC of anything. Proofs are compared in constant time.
 *
 * Nothing a dialler says counts before its proof: a failed proof, a missing
 * token or any refusal from an unproven dialler is dropped and logged (and
 * counted: the connect deadline's error names the address the failures came
 * from), never fatal, so that a stranger cannot end a starting job. A rank
 * of the job holding another token learns from the verdict that its proof
 * was refused and fails at once, saying that authentication failed. Without
 * a token the handshake is hello and ack, as in protocol version 2.
 */

static void token_mac(const tl_comm_t *c, const char *role, const hello_t *h, const ack_t *a,
                      uint8_t out[32]) {
  tl_hmac_t m;
  tl__hmac_init(&m, c->opts.token_key, sizeof c->opts.token_key);
  tl__hmac_update(&m, "thunderlink v3 ", 15);
  tl__hmac_update(&m, role, strlen(role) + 1);
  tl__hmac_update(&m, h, sizeof *h);
  tl__hmac_update(&m, a, sizeof *a);
  tl__hmac_final(&m, out);
}

static void fill_proof(pending_t *p, int status) {
  memset(&p->proof, 0, sizeof p->proof);
  p->proof.magic = PROOF_MAGIC;
  p->proof.version = TL_PROTOCOL_VERSION;
  p->proof.status = (uint16_t)status;
  p->done = 0;
}

/* A connection refused for its token, on the listener's side: logged,
 * counted, dropped. */
static void auth_refused(tl_comm_t *c, pending_t *p, const char *why) {
  boot_t *t = B(c);
  t->auth_failures++;
  snprintf(t->auth_from, sizeof t->auth_from, "%s", p->remote);
  tl__log(c, TL_LOG_WARN, "refused a connection from %s (it says it is rank %u): "
          "authentication failed: %s", p->remote, p->hello.src_rank, why);
  pending_close(p);
}

static const char *const token_hint =
    "every rank of a job needs the same THUNDERLINK_TOKEN (or THUNDERLINK_TOKEN_FILE); "
    "thunderlink launch gives its ranks one";

/* What the connect deadline's error adds when tokens were refused: a
 * prefix and a note. */
static void auth_note(tl_comm_t *c, const char **prefix, char *buf, size_t cap) {
  boot_t *t = B(c);
  buf[0] = 0;
  *prefix = "";
  if (t && t->auth_failures) {
    *prefix = "authentication failed: ";
    snprintf(buf, cap, "; %d connection%s to this rank, the latest from %s, did not prove "
             "this job's token (%s)", t->auth_failures, t->auth_failures == 1 ? "" : "s",
             t->auth_from, token_hint);
  }
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
      p->last_why = NULL;
      if (retryable(err)) { schedule_retry(p, now); return 0; }
      return tl__error(c, TL_ERR_SYSTEM, "connect to rank %d at %s: %s", p->peer,
                       p->remote, strerror(err));
    }
    int rc = fill_hello(c, p);
    if (rc) return rc;
    p->state = P_SEND_HELLO;
  }
  if (p->state == P_SEND_HELLO) {
    int r = pio(p, &p->hello, sizeof(hello_t), 1);
    if (r < 0) {
      p->last_errno = errno;
      p->last_why = NULL;
      schedule_retry(p, now);
      return 0;
    }
    if (r == 0) return 0;
    p->done = 0;
    memset(&p->ack, 0, sizeof p->ack);
    p->state = P_RECV_ACK;
    return 0;
  }
  if (p->state == P_RECV_ACK) {
    int r = pio(p, &p->ack, sizeof(ack_t), 0);
    if (r == 0) return 0;
    ack_t *a = &p->ack;
    if (p->done >= sizeof a->magic && a->magic != ACK_MAGIC)
      return tl__error(c, TL_ERR_PROTOCOL, "%s answered the handshake with bytes "
                       "that are not thunderlink's: something other than rank %d "
                       "listens there", p->remote, p->peer);
    /* Closed or reset before a whole answer (a refusal from another protocol
     * version is only ACK_V1_BYTES long): the listener may have dropped us
     * to make room (a flood of silent connections) or given up on a slow
     * hello, so dial again until the connect deadline; the final error says
     * what happened. */
    if (r < 0 && (p->done < ACK_V1_BYTES || a->status == ACK_OK)) {
      p->last_errno = r == -2 ? errno : 0;
      p->last_why = "it closed the connection during the handshake (is "
                    "something other than thunderlink listening there, or is that "
                    "port flooded with connections?)";
      tl__log(c, TL_LOG_TRACE, "rank %d at %s closed connection %d during the "
              "handshake: dialling again", p->peer, p->remote, p->index);
      schedule_retry(p, now);
      return 0;
    }
    if (a->status == ACK_NEED_TOKEN || a->status == ACK_NO_TOKEN)
      return tl__error(c, TL_ERR_CONFIG, "authentication failed with rank %d at %s: %s "
                       "(%s)", p->peer, p->remote,
                       a->status == ACK_NEED_TOKEN
                           ? "that rank has a job token and this one has none"
                           : "this rank has a job token and that one has none",
                       token_hint);
    if (c->opts.token_set && r == 1 && a->version == TL_PROTOCOL_VERSION) {
      /* Prove the token, even to a refusal: the listener counts a refusal
       * as this job's problem only from a rank that proved itself. */
      fill_proof(p, 0);
      token_mac(c, "dialler", &p->hello, a, p->proof.mac);
      if (a->status != ACK_OK) {
        pio(p, &p->proof, sizeof(proof_t), 1); /* best effort: we fail anyway */
        return tl__error(c, TL_ERR_CONFIG, "rank %d at %s refused our connection: %s",
                         p->peer, p->remote, refusal(a->status));
      }
      p->state = P_SEND_PROOF;
    } else {
      if (a->status != ACK_OK)
        return tl__error(c, TL_ERR_CONFIG, "rank %d at %s refused our connection: %s",
                         p->peer, p->remote, refusal(a->status));
      if (c->opts.token_set)
        return tl__error(c, TL_ERR_PROTOCOL, "authentication failed with rank %d at %s: it "
                         "accepted the connection without asking this rank to prove the "
                         "job token (not a thunderlink rank of this version?)", p->peer,
                         p->remote);
      adopt(c, p->peer, p->index, p->fd, p->remote, a->host_id);
      p->fd = -1;
      return 1;
    }
  }
  if (p->state == P_SEND_PROOF) {
    int r = pio(p, &p->proof, sizeof(proof_t), 1);
    if (r < 0) {
      p->last_errno = errno;
      p->last_why = "it closed the connection during the handshake";
      schedule_retry(p, now);
      return 0;
    }
    if (r == 0) return 0;
    memset(&p->proof, 0, sizeof p->proof);
    p->done = 0;
    p->state = P_RECV_VERDICT;
    return 0;
  }
  if (p->state == P_RECV_VERDICT) {
    int r = pio(p, &p->proof, sizeof(proof_t), 0);
    if (r == 0) return 0;
    proof_t *v = &p->proof;
    if (p->done >= sizeof v->magic && v->magic != PROOF_MAGIC)
      return tl__error(c, TL_ERR_PROTOCOL, "%s answered this rank's proof of the job token "
                       "with bytes that are not thunderlink's", p->remote);
    if (p->done >= 8 && v->status == ACK_AUTH_FAILED)
      return tl__error(c, TL_ERR_CONFIG, "authentication failed: rank %d at %s refused this "
                       "rank's proof of the job token, so the two hold different tokens (%s)",
                       p->peer, p->remote, token_hint);
    if (r < 0) {
      p->last_errno = r == -2 ? errno : 0;
      p->last_why = "it closed the connection during the handshake";
      schedule_retry(p, now);
      return 0;
    }
    uint8_t want[32];
    token_mac(c, "listener", &p->hello, &p->ack, want);
    int ok = v->status == ACK_OK && tl__ct_equal(want, v->mac, sizeof want);
    tl__wipe(want, sizeof want);
    if (!ok)
      return tl__error(c, TL_ERR_CONFIG, "authentication failed: rank %d at %s accepted "
                       "this rank but did not prove that it holds the job token (%s)",
                       p->peer, p->remote, token_hint);
    adopt(c, p->peer, p->index, p->fd, p->remote, p->ack.host_id);
    p->fd = -1;
    return 1;
  }
  if (p->state == P_RECV_HELLO) {
    int r = pio(p, &p->hello, sizeof(hello_t), 0);
    /* Nothing here has proved anything: whatever is wrong is the sender's
     * problem, dropped and logged, never this job's. Bytes that are not a
     * hello are dropped as soon as the magic shows it. */
    if (p->done >= sizeof p->hello.magic && p->hello.magic != HELLO_MAGIC) {
      tl__log(c, TL_LOG_WARN, "refused a connection from %s: not a thunderlink peer "
              "(bad magic)", p->remote);
      pending_close(p);
      return 0;
    }
    if (r == 0) return 0;
    if (r < 0) {
      if (p->done == 0)
        tl__log(c, TL_LOG_WARN, "refused a connection from %s: it closed before saying "
                "hello", p->remote);
      else
        tl__log(c, TL_LOG_WARN, "refused a connection from %s: truncated hello (%zu of "
                "%zu bytes, then the connection closed)", p->remote, p->done,
                sizeof(hello_t));
      pending_close(p);
      return 0;
    }
    int fatal;
    const hello_t *h = &p->hello;
    int st = check_hello(c, h, &fatal);
    p->peer = (int)h->src_rank;
    p->index = (int)h->conn_index;
    memset(&p->ack, 0, sizeof p->ack);
    p->ack.magic = ACK_MAGIC;
    p->ack.version = TL_PROTOCOL_VERSION;
    p->ack.status = (uint16_t)st;
    p->ack.rank = (uint32_t)c->rank;
    p->ack.host_id = c->host_id;
    p->done = 0;
    p->state = P_SEND_ACK;
    p->peer_host = h->host_id;
    p->status = st;
    if (st == ACK_NEED_TOKEN || st == ACK_NO_TOKEN) {
      pio(p, &p->ack, sizeof(ack_t), 1); /* best effort: tell it why */
      auth_refused(c, p, st == ACK_NEED_TOKEN ? "it has no token"
                                              : "it has a token and this rank has none");
      return 0;
    }
    /* With a token, a refusal that would end the job waits for the proof:
     * from a stranger it is only dropped. */
    if (st != ACK_OK && !(fatal && c->opts.token_set)) {
      /* Best effort: tell it why, then drop it. */
      pio(p, &p->ack, sizeof(ack_t), 1);
      pending_close(p);
      if (!fatal) {
        tl__log(c, TL_LOG_WARN, "refused a connection from %s: %s", p->remote, refusal(st));
        return 0;
      }
      return tl__error(c, TL_ERR_CONFIG, "rank %u connected from %s but %s",
                       h->src_rank, p->remote, refusal(st));
    }
    if (c->opts.token_set && tl__random(p->ack.nonce, sizeof p->ack.nonce) < 0)
      return tl__error(c, TL_ERR_SYSTEM, "cannot read random bytes for the handshake's "
                       "challenge: %s", strerror(errno));
  }
  if (p->state == P_SEND_ACK) {
    int r = pio(p, &p->ack, sizeof(ack_t), 1);
    if (r == 0) return 0;
    if (r < 0) {
      tl__log(c, TL_LOG_WARN, "connection from rank %d (%s) dropped during the "
              "handshake", p->peer, p->remote);
      pending_close(p);
      return 0;
    }
    if (!c->opts.token_set) {
      adopt(c, p->peer, p->index, p->fd, p->remote, p->peer_host);
      p->fd = -1;
      return 1;
    }
    memset(&p->proof, 0, sizeof p->proof);
    p->done = 0;
    p->state = P_RECV_PROOF;
  }
  if (p->state == P_RECV_PROOF) {
    int r = pio(p, &p->proof, sizeof(proof_t), 0);
    if (p->done >= sizeof p->proof.magic && p->proof.magic != PROOF_MAGIC) {
      auth_refused(c, p, "it sent no proof of the job token");
      return 0;
    }
    if (r == 0) return 0;
    if (r < 0) {
      tl__log(c, TL_LOG_WARN, "refused a connection from %s (it says it is rank %u): it "
              "closed before proving the job token", p->remote, p->hello.src_rank);
      pending_close(p);
      return 0;
    }
    uint8_t want[32];
    token_mac(c, "dialler", &p->hello, &p->ack, want);
    int ok = tl__ct_equal(want, p->proof.mac, sizeof want);
    tl__wipe(want, sizeof want);
    if (!ok) {
      fill_proof(p, ACK_AUTH_FAILED);
      pio(p, &p->proof, sizeof(proof_t), 1); /* best effort: the verdict */
      auth_refused(c, p, "its proof of the job token is wrong");
      return 0;
    }
    /* Proven: one of this job's ranks. What was wrong with its hello is now
     * this job's problem, as without a token. */
    if (p->status == ACK_OK && c->links[p->peer].boot_fds[p->index] >= 0)
      p->status = ACK_DUPLICATE;
    if (p->status != ACK_OK) {
      pending_close(p);
      return tl__error(c, TL_ERR_CONFIG, "rank %u connected from %s but %s",
                       p->hello.src_rank, p->remote, refusal(p->status));
    }
    fill_proof(p, ACK_OK);
    token_mac(c, "listener", &p->hello, &p->ack, p->proof.mac);
    p->state = P_SEND_VERDICT;
  }
  if (p->state == P_SEND_VERDICT) {
    int r = pio(p, &p->proof, sizeof(proof_t), 1);
    if (r == 0) return 0;
    if (r < 0) {
      tl__log(c, TL_LOG_WARN, "connection from rank %d (%s) dropped during the "
              "handshake", p->peer, p->remote);
      pending_close(p);
      return 0;
    }
    adopt(c, p->peer, p->index, p->fd, p->remote, p->peer_host);
    p->fd = -1;
    return 1;
  }
  return 0;
}
/* Make room for a newcomer: drop the incoming connection that has waited
 * longest without completing its hello or, with a token, its proof (one
 * that has, is one of our ranks being answered, and stays). Returns its
 * slot, or -1 when none can go. */
static int evict_oldest(tl_comm_t *c, pending_t *ps, int np, int *evicted) {
  int old = -1;
  for (int j = 0; j < np; j++) {
    pending_t *q = &ps[j];
    if (q->outgoing || q->fd < 0 || (q->state != P_RECV_HELLO && q->state != P_RECV_PROOF))
      continue;
    if (old < 0 || q->started < ps[old].started) old = j;
  }
  if (old < 0) return -1;
  if ((*evicted)++ == 0)
    tl__log(c, TL_LOG_WARN, "more connections are waiting to say hello than this rank "
            "keeps (a flood of silent connections?): dropping the oldest ones, "
            "starting with one from %s", ps[old].remote);
  else
    tl__log(c, TL_LOG_TRACE, "dropped a silent connection from %s to make room",
            ps[old].remote);
  pending_close(&ps[old]);
  return old;
}

int tl__boot_connect(tl_comm_t *c) {
  boot_t *t = B(c);
  int rc;
  int nout = 0, nin = 0; /* we dial the peers that listen for our link */
  for (int p = 0; p < c->size; p++) {
    tl_link_t *l = &c->links[p];
    l->peer = p;
    int n = tl__boot_conns(c, p);
    if (n == 0) continue;
    l->boot_fds = malloc((size_t)n * sizeof *l->boot_fds);
    if (!l->boot_fds) return tl__error(c, TL_ERR_NOMEM, "out of memory");
    for (int k = 0; k < n; k++) l->boot_fds[k] = -1;
    l->nboot = n;
    int tg[TL_MAX_CONNS], nt;
    if (tl__link_plan(c->eps, c->neps, c->rank, p, tg, &nt) == p) nout += n; else nin += n;
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
    if (p == c->rank || tl__link_plan(c->eps, c->neps, c->rank, p, tg, &nt) != p) continue;
    for (int k = 0; k < c->links[p].nboot; k++) {
      pending_t *q = &ps[np++];
      q->fd = -1;
      q->outgoing = 1;
      q->state = P_WAIT;
      q->peer = p;
      q->index = k;
      q->ep = tg[tl__boot_cable(c, k, nt)];
      q->src_ep = tl__source_ep(c->eps, c->neps, c->rank, p, tl__boot_cable(c, k, nt));
      host_port(&c->eps[q->ep], c->eps[q->ep].port, q->remote, sizeof q->remote);
    }
  }
  int64_t start = tl__now_ns();
  int64_t deadline = start + (int64_t)c->opts.connect_timeout_ms * 1000000;
  int up = 0, want = nout + nin;
  int evicted = 0;            /* silent connections dropped to make room */
  int64_t listen_after = 0;   /* out of descriptors: leave the listeners alone until then */
  rc = TL_OK;
  while (up < want) {
    int64_t now = tl__now_ns();
    if (now >= deadline) break;
    int64_t wake = deadline;
    int n = 0;
    for (int i = 0; i < t->nls && now >= listen_after; i++) {
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
      if (!q->outgoing && q->fd >= 0 && now - q->started >= STRANGER_TIMEOUT_NS) {
        tl__log(c, TL_LOG_WARN, "dropped a connection from %s that did not complete "
                "the handshake within %.0f s", q->remote, STRANGER_TIMEOUT_NS / 1e9);
        pending_close(q);
      }
      if (q->fd < 0) continue;
      if (!q->outgoing && q->started + STRANGER_TIMEOUT_NS < wake)
        wake = q->started + STRANGER_TIMEOUT_NS;
      pf[n].fd = q->fd;
      pf[n].events = (q->state == P_CONNECTING || q->state == P_SEND_HELLO ||
                      q->state == P_SEND_ACK || q->state == P_SEND_PROOF ||
                      q->state == P_SEND_VERDICT) ? POLLOUT : POLLIN;
      pidx[n++] = i;
    }
    if (t->nls && listen_after > now && listen_after < wake) wake = listen_after;
    int64_t ms = (wake - now + 999999) / 1000000;
    if (ms > 1000) ms = 1000;
    int r = poll(pf, (nfds_t)n, (int)ms);
    if (r < 0) {
      if (errno == EINTR) {
        if (tl__on_main_thread()) {
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
        for (int burst = 0; burst < ACCEPT_BURST; burst++) {
          int fd = accept(pf[i].fd, NULL, NULL);
          if (fd < 0) {
            if (errno == EINTR) continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
              /* Out of descriptors: a silent connection makes way, or, when
               * none can, the listeners wait a little (they would otherwise
               * stay readable and spin this loop). */
              if (evict_oldest(c, ps, np, &evicted) >= 0) continue;
              if (listen_after == 0)
                tl__log(c, TL_LOG_WARN, "cannot accept connections: %s (raise the "
                        "limit on open files, ulimit -n)", strerror(errno));
              listen_after = now + 100000000ll;
            }
            break; /* EAGAIN, or an aborted connection: nothing more now */
          }
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
          /* The table is full (bounded: cap entries, whatever arrives). */
          if (slot < 0) slot = evict_oldest(c, ps, np, &evicted);
          if (slot < 0) { close(fd); continue; }
          pending_t *q = &ps[slot];
          memset(q, 0, sizeof *q);
          q->fd = fd;
          q->state = P_RECV_HELLO;
          q->started = now;
          q->ep = q->src_ep = -1;
          describe_peer(fd, q->remote, sizeof q->remote);
          /* A real rank sends its hello at once: read it now, before more
           * newcomers can push this one out. */
          int a = advance(c, q, now);
          if (a < 0) { rc = a; goto out; }
          if (a == 1) {
            up++;
            q->retry_at = -1;
            q->state = P_WAIT;
          }
        }
        continue;
      }
      pending_t *q = &ps[pidx[i]];
      /* Gone (or its slot given to a newcomer) since the poll. */
      if (q->fd < 0 || q->fd != pf[i].fd) continue;
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
    char note[TL_HOST_LEN + 300];
    const char *prefix;
    auth_note(c, &prefix, note, sizeof note);
    for (int i = 0; i < np; i++) {
      pending_t *q = &ps[i];
      if (!q->outgoing || q->retry_at == -1) continue;
      rc = tl__error(c, TL_ERR_TIMEOUT,
                     "%scould not connect to rank %d at %s within %.0f s (%d attempts, "
                     "last error: %s). Is rank %d running, and is %s its address "
                     "on a link this host can reach? (thunderlink doctor checks "
                     "a hostfile)%s", prefix, q->peer, q->remote, secs, q->attempts,
                     q->last_why ? q->last_why
                     : q->last_errno ? strerror(q->last_errno) : "still connecting",
                     q->peer, q->remote, note);
      goto out;
    }
    for (int p = 0; p < c->size; p++)
      for (int k = 0; k < c->links[p].nboot; k++)
        if (c->links[p].boot_fds[k] < 0) {
          char where[TL_HOST_LEN + 16] = "?";
          if (t->nls) host_port(&c->eps[t->ls[0].ep], c->eps[t->ls[0].ep].port, where, sizeof where);
          rc = tl__error(c, TL_ERR_TIMEOUT,
                         "%srank %d never connected to this rank (listening at %s) "
                         "within %.0f s: is rank %d running, and can it reach "
                         "this address?%s", prefix, p, where, secs, p, note);
          goto out;
        }
    rc = tl__error(c, TL_ERR_TIMEOUT, "%sconnection set-up did not finish in time%s", prefix,
                   note);
  }
out:
  for (int i = 0; i < np; i++) pending_close(&ps[i]);
  free(ps);
  free(pf);
  free(pidx);
  if (evicted > 1)
    tl__log(c, TL_LOG_WARN, "dropped %d silent connections during set-up to make room "
            "for the job's own", evicted);
  if (!rc) {
    /* Listening sockets are no longer needed: every connection is up. */
    for (int i = 0; i < t->nls; i++) close(t->ls[i].fd);
    t->nls = 0;
    tl__log(c, TL_LOG_TRACE, "bootstrap: %d connections made, %d accepted, in %.1f ms",
            nout, nin, (double)(tl__now_ns() - start) / 1e6);
  }
  return rc;
}

int tl__boot_xfer(tl_comm_t *c, tl_link_t *l, int fd, void *buf, size_t len, int is_send,
                  int64_t deadline_ns) {
  char *p = buf;
  size_t done = 0;
  while (done < len) {
    ssize_t n = is_send ? send(fd, p + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT)
                        : recv(fd, p + done, len - done, MSG_DONTWAIT);
    if (n > 0) { done += (size_t)n; continue; }
    if (n == 0)
      return tl__error(c, TL_ERR_PEER, "rank %d (%s) closed the connection while "
                       "setting up the link: it exited or failed (see its own error)",
                       l->peer, l->remote);
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
      return tl__error(c, TL_ERR_PEER, "setting up the link to rank %d (%s): %s", l->peer,
                       l->remote, strerror(errno));
    int64_t left = deadline_ns - tl__now_ns();
    if (left <= 0)
      return tl__error(c, TL_ERR_TIMEOUT, "rank %d (%s) did not complete the link's "
                       "set-up in time", l->peer, l->remote);
    struct pollfd pfd = {fd, (short)(is_send ? POLLOUT : POLLIN), 0};
    int ms = (int)tl__min((size_t)((left + 999999) / 1000000), 1000);
    if (poll(&pfd, 1, ms) < 0 && errno == EINTR && tl__on_main_thread())
      return tl__error(c, TL_ERR_INTERRUPTED, "interrupted while connecting");
  }
  return TL_OK;
}
