/*
 * Internal declarations shared by the core's C files (never installed as an
 * API). Names with the tl__ prefix cross files; file-local helpers are static.
 */
#ifndef THUNDERLINK_INTERNAL_H
#define THUNDERLINK_INTERNAL_H

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>

#include "../tl.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "thunderlink's wire format is little-endian; big-endian hosts are not supported"
#endif

#define TL_ERRMSG_LEN 1024
#define TL_HOST_LEN 256
#define TL_IFNAME_LEN 64
#define TL_DEVICE_LEN 64 /* an RDMA device name (IBV_SYSFS_NAME_MAX) */
/* A frame's payload is at most this (the header's len field is 32 bits, and
 * send(2)/recv(2) reject lengths above INT_MAX on some systems). */
#define TL_MAX_FRAME ((size_t)1 << 30)

static inline size_t tl__min(size_t a, size_t b) { return a < b ? a : b; }
static inline size_t tl__max(size_t a, size_t b) { return a > b ? a : b; }

/* ---- time ---------------------------------------------------------------- */

int64_t tl__now_ns(void); /* monotonic */

/* ---- endpoints ------------------------------------------------------------ */

typedef struct tl_endpoint {
  int owner;  /* rank listening there */
  int facing; /* rank expected to connect there, or -1 for any */
  char host[TL_HOST_LEN];
  int port;
  char ifname[TL_IFNAME_LEN];
  char device[TL_DEVICE_LEN]; /* RDMA device of this end, "" = found */
  double weight;
} tl_endpoint_t;

/* ---- frames (the wire header of every message slice) --------------------- */

#define TL_FRAME_MAGIC 0x31464c54u /* "TLF1" little-endian */
#define TL_FRAME_DATA 1
#define TL_FRAME_ABORT 2
#define TL_FRAME_WAKE 3 /* control channels only: the peer may have work */
/* Single bytes that travel on control channels between frames: a wake-up
 * (shared memory: the peer left work in a ring) and a heartbeat (the peer is
 * alive; heartbeat.c). The reader skips both. */
#define TL_WAKE_BYTE 'w'
#define TL_HEARTBEAT_BYTE 'h'

typedef struct tl_frame {
  uint32_t magic;
  uint8_t type;  /* TL_FRAME_* */
  uint8_t op;    /* TL_OP_* */
  uint8_t dtype; /* TL_* dtype, 0xff when none */
  uint8_t redop; /* TL_SUM ..., 0xff when none */
  uint32_t seq;  /* collective sequence number, or per-peer p2p counter */
  uint32_t len;  /* payload bytes that follow this header */
  uint64_t total; /* bytes of the whole operation on the sender */
  uint32_t unit; /* position of this frame in the operation's schedule */
  uint32_t lane; /* ring instance (or root for broadcast) */
} tl_frame_t;

_Static_assert(sizeof(tl_frame_t) == 32, "frame header must be 32 bytes");

/* ---- requests and slices -------------------------------------------------
 * A request is one message to or from one peer. The core cuts it into
 * slices, one per channel of a lane, each preceded by a frame header on the
 * wire. Channels complete slices; a request is done when all its slices are. */

typedef struct tl_req {
  int pending; /* slices not yet complete */
  int peer;
  int is_send;
  uint64_t bytes;
} tl_req_t;

typedef struct tl_slice {
  struct tl_slice *next;
  tl_req_t *req;
  tl_frame_t hdr; /* send: written first; recv: expected header */
  tl_frame_t got; /* recv: header as read */
  char *buf;
  size_t len;  /* payload bytes */
  size_t done; /* header + payload bytes transferred so far */
  /* recv only, when other is set: buf = payload op other, element-wise,
   * reduced straight out of the channel (see tl__irecv_reduce). */
  const char *other;
  int dtype, redop;
} tl_slice_t;

/* Channels {first, first + step, ...} of a link carry one stream of
 * messages. Distinct concurrent streams must use disjoint lanes, so that
 * both ends see frames in the same order on each channel. */
typedef struct tl_lane {
  int first;
  int step;
} tl_lane_t;

static inline tl_lane_t tl__lane_all(void) { tl_lane_t l = {0, 1}; return l; }

/* ---- links, channels and transports ----------------------------------------
 *
 * A link joins this rank to one peer that it shares a cable or an address
 * with. Every link starts as TCP connections made by the bootstrap
 * (bootstrap.c: listen, dial, handshake); then the link's transport turns
 * them into channels. A channel is an ordered byte stream in each direction
 * (a TCP connection; a pair of rings in a shared segment): the core queues
 * slices on it, writes and checks frame headers, and reads peers' abort
 * notices (progress.c); the transport only moves bytes and says when to
 * sleep. A shared-memory link keeps one bootstrap connection beside its
 * segment, as its control channel: it carries wake-ups and abort notices, and
 * shows a dead peer at once.
 */

typedef struct tl_link tl_link_t;
typedef struct tl_chan tl_chan_t;
struct pollfd;
struct iovec;

/* Transport ids (tl.h: TL_TRANSPORT_TCP ...) index the per-transport
 * statistics. */

typedef struct tl_transport_ops {
  const char *name;
  int id; /* TL_TRANSPORT_* */
  /* Spin before sleeping whatever the operation's size, this many times
   * spin_us (0: only for small operations): where the peer moves the bytes
   * itself (shared memory), waiting for it is short, and waking a sleeper
   * costs the peer a system call and the sleeper a wake-up (tens of
   * microseconds in a virtual machine). */
  int spin_factor;
  /* arm's descriptor only says that something happened (a completion
   * channel): when it fires, try the channel both ways. */
  int wake_fd;
  /* Can this process use the transport at all (library, kernel support)?
   * 0 when not, with the reason in why. */
  int (*available)(char *why, size_t cap);
  /*
   * Turn the link's bootstrap connections (l->boot_fds, l->nboot) into
   * channels. Runs in phases 0..TL_SETUP_PHASES-1; every link finishes a
   * phase before any link starts the next, so a transport may send in one
   * phase what its peer reads in the next without deadlock. Blocks at most
   * until c's connect deadline. A transport takes ownership of the fds it
   * keeps and sets the ones it closes to -1. Returns a status (message
   * recorded with tl__error); TL_ERR_UNSUPPORTED asks for a fallback to TCP,
   * with the reason recorded.
   */
  int (*setup)(tl_comm_t *c, tl_link_t *l, int phase);
  /* Move bytes without blocking. Return the bytes moved, 0 when the channel
   * can take or give nothing now, or -errno (-EPIPE: the peer closed). A
   * recv with peek leaves the bytes in place. */
  long (*send)(tl_chan_t *ch, const struct iovec *iov, int n);
  long (*recv)(tl_chan_t *ch, const struct iovec *iov, int n, int peek);
  /* Optional (NULL when the bytes cannot be read in place): the readable
   * bytes that lie contiguous at *p (0 when none, -EPIPE when the peer is
   * gone and nothing is left), and consuming n of them. */
  long (*view)(tl_chan_t *ch, const char **p);
  void (*consume)(tl_chan_t *ch, size_t n);
  /* About to sleep waiting for the channel to become readable (want_in) or
   * writable (want_out): fill *pfd with a descriptor to poll (fd -1 for
   * none) and return 0, or return 1 if it is ready now (don't sleep), or
   * TL_ARM_SOON when it has no descriptor that would wake the loop (RDMA
   * without completion channels) or must be looked at again soon whatever
   * happens: the loop then sleeps a short while, growing from
   * TL_ARM_SOON_MIN_NS to TL_ARM_SOON_MAX_NS, and tries it again. */
  int (*arm)(tl_chan_t *ch, int want_in, int want_out, struct pollfd *pfd);
  /* Woken: undo arm. */
  void (*disarm)(tl_chan_t *ch);
  /* Best effort, never blocks long: send the abort frame f (and len bytes of
   * reason) where the peer will read it, then stop sending. */
  void (*abort)(tl_chan_t *ch, const tl_frame_t *f, const char *why, size_t len);
  /* Close the channel and free its state. */
  void (*close)(tl_chan_t *ch);
  /* After every channel is closed: free the link's state (l->t). May be NULL. */
  void (*close_link)(tl_link_t *l);
  /* Optional (NULL: nothing to do). The operation begun by tl__op_begin
   * ended, well or not (tl__op_end): release what the link held for the
   * call's buffers (RDMA: their memory registrations). */
  void (*op_end)(tl_link_t *l);
  /* Optional: tl_comm_register_memory (add 1) / _deregister_memory (add 0)
   * of [addr, addr + len), between operations. Returns a status, with the
   * message recorded (tl__error); TL_ERR_INVALID from a removal means the
   * link had no such range. */
  int (*register_memory)(tl_link_t *l, void *addr, size_t len, int add);
} tl_transport_ops_t;

#define TL_SETUP_PHASES 3
#define TL_ARM_SOON 2
#define TL_ARM_SOON_MIN_NS 10000ll   /* 10 us */
#define TL_ARM_SOON_MAX_NS 1000000ll /* 1 ms */

extern const tl_transport_ops_t tl__tcp_ops;
extern const tl_transport_ops_t tl__shm_ops;
extern const tl_transport_ops_t tl__rdma_ops;

/* The registry: every transport, by id (NULL where none is built). */
const tl_transport_ops_t *tl__transport(int id);

#define TL_MAX_CONNS 64

struct tl_chan {
  tl_link_t *link;
  const tl_transport_ops_t *ops;
  int index;                /* within the link; -1 for a control channel */
  tl_slice_t *sq, *sq_tail; /* frames to send, in order */
  tl_slice_t *rq, *rq_tail; /* frames to receive, in order */
  int peeked;               /* next inbound frame already checked */
  int eof;                  /* peer closed or reset (seen while idle) */
  int fd;                   /* socket, or -1 */
  void *t;                  /* the transport's state */
  struct tl_io *io[2];      /* its I/O threads (tcpio.c): sends, receives; or NULL */
};

struct tl_link {
  tl_comm_t *comm;
  int peer;
  const tl_transport_ops_t *ops; /* its channels' transport; NULL: no link */
  int nchans;
  tl_chan_t *chans;
  tl_chan_t *ctl; /* control channel (a TCP connection), or NULL */
  /* Relative speed of each channel as an integer share (1..1000000), so
   * that both ends cut a message into exactly the same slices. */
  uint32_t share[TL_MAX_CONNS];
  uint32_t send_seq;            /* p2p messages sent to this peer */
  uint32_t recv_seq;            /* p2p messages received from this peer */
  uint64_t host_id;             /* the peer's, from the handshake */
  /* Bootstrap connections, by index, before setup; -1 once taken. */
  int nboot;
  int *boot_fds;
  char remote[TL_HOST_LEN + 16]; /* "host:port" of connection 0, for messages */
  void *t;                       /* the transport's per-link state */
  /* When the progress loop last saw bytes from the peer (any channel,
   * heartbeats included); see tl_options_t.heartbeat_ms. */
  int64_t heard_ns;
};

/* What the communicator is doing now, for error messages and for checking
 * frames that arrive early. */
typedef struct tl_opctx {
  int op;             /* TL_OP_*, 0 when idle */
  uint32_t seq;
  int dtype;
  int redop;
  uint64_t total;     /* bytes on this rank */
  int root;           /* broadcast root, else -1 */
  const char *name;   /* "all_sum", "send", ... */
  tl_plan_t plan;     /* how it runs (tl_select) */
} tl_opctx_t;

struct tl_comm {
  int rank;
  int size;
  tl_options_t opts;
  uint64_t comm_id;   /* job id, or derived for split children */
  uint64_t host_id;   /* this process's host (see tl__host_id) */
  atomic_int refs;
  pthread_mutex_t lock;
  /* Set by tl_comm_close when it finds the lock held: a call in flight on
   * another thread fails at once (closed) instead of at its deadline. */
  atomic_int closing;
  atomic_int in_op;   /* between tl__op_begin and tl__op_end */

  int status;         /* sticky failure; 0 while healthy */
  int closed;
  int connected;
  char err[TL_ERRMSG_LEN];
  /* A peer's failure in a later collective than the one this rank was in:
   * reported by this rank's next call (see progress.c, peer_aborted). */
  char pending_abort[TL_ERRMSG_LEN];

  tl_endpoint_t *eps;
  int neps;
  int eps_cap;

  int mesh;           /* every pair of ranks shares a link */
  int transport;      /* of every link, or TL_TRANSPORT_AUTO when they mix */
  int ring_set;       /* the ring order was given (tl_comm_set_ring) */
  int32_t *ring;      /* ring order of ranks */
  int ring_pos;       /* this rank's position in it */

  tl_link_t *links;   /* [size], links[rank] unused */
  tl_chan_t **chans;  /* every channel of every link, control ones too */
  int nchans;
  uint32_t coll_seq;  /* collectives called so far */
  uint32_t split_count;
  tl_opctx_t cur;
  int64_t deadline_ns;

  void *boot;         /* bootstrap state (listening sockets) */

  struct pollfd *pfds; /* progress's poll set, [nchans] */
  tl_chan_t **pchan;

  tl_slice_t *free_slices;
  char *scratch;
  size_t scratch_cap;

  tl_stats_t stats;

  int hb_registered;  /* heartbeat.c sends on this communicator's links */
  uint64_t intr_gen;  /* tl_interrupt()s counted when the operation began */
  int64_t intr_ns;    /* when the operation first saw a later one, or 0 */

  /* TCP I/O threads (tcpio.c): 0 not decided yet, 1 off, 2 on; the pipe
   * on which they tell the progress loop (made with the first of them). */
  int io_state;
  int io_started;
  int io_note[2];
};

/* ---- options (options.c, from the table in options.h) ---------------------- */

/* Digest of the options every rank must share, sent in every handshake. */
uint64_t tl__options_digest(const tl_options_t *o);
/* Why a peer refuses a handshake whose digest differs: names them. */
extern const char tl__options_differ[];

/* ---- topology (topo.c): pure functions of the endpoint table ---------------- */

/* Who listens for the link between a and b: the lower rank if it has an
 * address the higher one may use (the usual case), else the higher rank (an
 * MLX ring hostfile lists, for each rank, the addresses its left neighbour
 * dials). Returns the acceptor, or -1 when the two share no link, and the
 * acceptor's endpoints to dial (one per cable) in tg (*nt of them, at most
 * TL_MAX_CONNS). */
int tl__link_plan(const tl_endpoint_t *eps, int neps, int a, int b, int *tg, int *nt);
/* Whether every pair of the n ranks shares a link: 0 when not, 1 when they
 * do, TL_MESH_CABLED when moreover every pair's link runs over addresses
 * that face the other rank (its own cables). The same on every rank. */
int tl__mesh_kind(const tl_endpoint_t *eps, int neps, int n);
/* `rank`'s own endpoint on cable `which` to `peer` (its which-th endpoint
 * facing peer), or -1. */
int tl__source_ep(const tl_endpoint_t *eps, int neps, int rank, int peer, int which);
/* A ring order in which neighbours share links: rank order when it works,
 * else searched (bounded). TL_ERR_CONFIG with the reason when none. */
int tl__find_ring(const tl_endpoint_t *eps, int neps, int n, int32_t *order, char *why,
                  size_t cap);

/* ---- the job token's proof (auth.c) --------------------------------------------- */

typedef struct tl_sha256 {
  uint32_t h[8];
  uint64_t len;
  uint8_t buf[64];
  size_t nbuf;
} tl_sha256_t;

typedef struct tl_hmac {
  tl_sha256_t inner, outer;
} tl_hmac_t;

void tl__sha256_init(tl_sha256_t *s);
void tl__sha256_update(tl_sha256_t *s, const void *data, size_t n);
void tl__sha256_final(tl_sha256_t *s, uint8_t out[32]); /* wipes s */
void tl__hmac_init(tl_hmac_t *m, const void *key, size_t klen);
void tl__hmac_update(tl_hmac_t *m, const void *data, size_t n);
void tl__hmac_final(tl_hmac_t *m, uint8_t out[32]); /* wipes m */
/* 1 when the n bytes at a and b are equal, in a time that does not depend
 * on where they differ. */
int tl__ct_equal(const void *a, const void *b, size_t n);
/* Zero memory in a way the compiler keeps (keys, pads). */
void tl__wipe(void *p, size_t n);
/* n bytes from the kernel's random generator; 0, or -1 with errno. */
int tl__random(void *buf, size_t n);

/* ---- bootstrap (bootstrap.c) ---------------------------------------------------- */

/* Open this rank's listening sockets (port 0: pick one, written back into
 * c->eps). Does not block. */
int tl__boot_listen(tl_comm_t *c);
/* Bootstrap connections the link to peer needs, from the options and the
 * topology (0 when the two share no link). */
int tl__boot_conns(const tl_comm_t *c, int peer);
/* The cable (index among the acceptor's endpoints for the link) that
 * bootstrap connection k of a link with ncables cables runs over. */
int tl__boot_cable(const tl_comm_t *c, int k, int ncables);
/* Dial and accept until every link has its bootstrap connections, each
 * through the handshake; fills links[p].boot_fds, .host_id, .remote. Blocks
 * until done or the connect deadline. Closes the listening sockets. */
int tl__boot_connect(tl_comm_t *c);
void tl__boot_close(tl_comm_t *c);
/* Blocking exchange on a bootstrap connection during set-up: all of buf, by
 * the deadline. For transports' connection data. */
int tl__boot_xfer(tl_comm_t *c, tl_link_t *l, int fd, void *buf, size_t len, int is_send,
                  int64_t deadline_ns);
/* Signals interrupt waits on the main thread only (so that Ctrl-C reaches
 * Python); threads such as MLX's stream worker just retry. */
int tl__on_main_thread(void);
/* An identity shared by the processes that can map each other's memory. */
uint64_t tl__host_id(void);

/* ---- channels (progress.c) --------------------------------------------------- */

/* Make l's channels (nchans of ops, plus a control channel on fd ctl_fd if
 * >= 0) and register them for progress. */
int tl__link_init(tl_comm_t *c, tl_link_t *l, const tl_transport_ops_t *ops, int nchans,
                  int ctl_fd);
/* Queue a slice on a channel (starting a send at once). */
int tl__chan_post(tl_comm_t *c, tl_chan_t *ch, tl_slice_t *s, int is_send);
/* Drive every channel until at least one slice completes (TL_OK), the
 * deadline passes, or an error (both poison the communicator). */
int tl__progress(tl_comm_t *c);
/* Tell every peer why this rank failed, stop every channel and drop every
 * queued slice. Best effort, never blocks long. */
void tl__abort_all(tl_comm_t *c, const char *why);
/* Close every link and free the channels. Idempotent. */
void tl__links_close(tl_comm_t *c);
/* Wake the peer of a shared-memory channel through the link's control
 * channel. */
void tl__ctl_wake(tl_link_t *l);

/* ---- heartbeats (heartbeat.c) and interrupts (progress.c) --------------------
 *
 * A link with a control channel (tl__link_init's ctl_fd: TCP's extra
 * bootstrap connection, shared memory's first; an RDMA link should keep its
 * first bootstrap connection the same way) gets heartbeats and hung-peer
 * detection with nothing more to do: the heartbeat thread writes
 * TL_HEARTBEAT_BYTE on it, and the progress loop, which polls every control
 * channel while it waits, reads them and fails a wait on a peer silent for
 * heartbeat_ms. A transport whose data channels have no descriptor should
 * wake a sleeping peer through the control channel (tl__ctl_wake). */

/* Start sending heartbeats on c's control channels (no-op when heartbeats
 * are off or c has none); tl__hb_unregister before they close. */
int tl__hb_register(tl_comm_t *c);
void tl__hb_unregister(tl_comm_t *c);
/* Does a TCP link keep a control connection (one bootstrap connection more
 * than its data channels)? Both ends agree: heartbeat_ms is shared. */
static inline int tl__tcp_has_ctl(const tl_comm_t *c) { return c->opts.heartbeat_ms > 0; }
/* tl_interrupt()s so far; the pipe a wait polls to hear of the next (-1
 * until tl_interrupt_hook made it), and emptying it (interrupt.c). */
uint64_t tl__intr_count(void);
int tl__intr_fd(void);
void tl__intr_drain(void);

/* ---- I/O threads of TCP data channels (tcpio.c) ----------------------------
 *
 * Two threads per TCP data channel, one per direction, move the bytes of
 * large slices the progress loop hands them (a prefix of the channel's send
 * or receive queue, in order); the loop keeps the queues, the rules and the
 * failures. The hand-over is one-producer one-consumer: the loop writes
 * job[i % CAP] then tail; the thread moves slice fin and then advances fin;
 * the loop retires slices seen .. fin-1. */

#define TL_IO_QCAP 64
#define TL_IO_MIN_BYTES ((size_t)64 << 10) /* smaller slices move inline, and
                                             so does every slice of an operation
                                             below opts.tcp_threads_min_bytes */
#define TL_IO_MISMATCH (-1000000)         /* a received header differs */

typedef struct tl_io {
  tl_chan_t *k;
  int dir;                      /* 0: sends, 1: receives */
  pthread_t thread;
  int pid;                      /* that started it (a forked child has no thread) */
  int wake[2];                  /* the loop wakes a sleeping thread here */
  int note;                     /* c->io_note[1] */
  pthread_mutex_t mu;           /* with cv: halting and resuming */
  pthread_cond_t cv;
  tl_slice_t *job[TL_IO_QCAP];
  atomic_uint tail;             /* slices handed over */
  atomic_uint fin;              /* slices finished by the thread */
  unsigned seen;                /* finished slices the loop retired */
  atomic_int err;               /* why it stopped: -errno, TL_IO_MISMATCH */
  atomic_int halt, halted, quit, sleeping;
  _Atomic int64_t heard_ns;     /* bytes last came from the peer */
} tl_io_t;

/* Should large slices of c's TCP data channels move on I/O threads
 * (tl_options_t.tcp_threads; auto: usable CPUs >= 4 x ranks on this host)?
 * Decided once, at the first large slice. */
int tl__io_wanted(tl_comm_t *c);
/* Start k's thread for direction d (k->io[d]). A status, with the message
 * recorded. */
int tl__io_start(tl_comm_t *c, tl_chan_t *k, int d);
/* New slices were handed over: wake the thread if it sleeps. */
void tl__io_kick(tl_io_t *io);
/* Park the thread (returns once it has: it then touches no slice and no
 * socket), and let it go on. */
void tl__io_halt(tl_io_t *io);
void tl__io_resume(tl_io_t *io);
/* End and join k's threads (before its socket closes); free their state. */
void tl__io_stop(tl_comm_t *c, tl_chan_t *k);
/* Empty / close the communicator's note pipe. */
void tl__io_drain_note(tl_comm_t *c);
void tl__io_close_comm(tl_comm_t *c);

/* ---- errors and logging --------------------------------------------------- */

/* Record a message on c (formatted after the "rank R: op #seq: " prefix) and
 * return status. Does not poison. */
int tl__error(tl_comm_t *c, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Record the message, poison c (sticky), tell the peers and drop every queued
 * slice. Returns status. A second failure keeps the first message. */
int tl__fail(tl_comm_t *c, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int tl__vfail(tl_comm_t *c, int status, const char *fmt, va_list ap);

void tl__log(tl_comm_t *c, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

const char *tl__dtype_name(int dtype);
const char *tl__op_name(int op, int redop);

/* ---- messages (msg.c) -------------------------------------------------------- */

/* Start an operation: checks the communicator is usable, takes a sequence
 * number and sets the deadline. `name` is what error messages call it. */
int tl__op_begin(tl_comm_t *c, int op, int dtype, int redop, uint64_t total,
                 const char *name);
void tl__op_end(tl_comm_t *c);

/* Add what the current operation did to the process-wide counters. */
void tl__stats_publish(tl_comm_t *c, const tl_stats_t *before);

/* Queue one message of len bytes to/from peer over the connections of lane,
 * split by the links' weights. hdr supplies op, seq, dtype, redop, total,
 * unit and lane; magic, type and len are filled in. req must stay valid
 * until it completes or the communicator fails. */
int tl__isend(tl_comm_t *c, int peer, tl_lane_t lane, const tl_frame_t *hdr,
              const void *buf, size_t len, tl_req_t *req);
int tl__irecv(tl_comm_t *c, int peer, tl_lane_t lane, const tl_frame_t *hdr,
              void *buf, size_t len, tl_req_t *req);

/* A receive whose payload is combined on arrival: buf = payload op other,
 * element-wise, read straight out of the channel, without a copy; buf may
 * equal other. Only where tl__can_reduce_in_place(c, peer). */
int tl__irecv_reduce(tl_comm_t *c, int peer, tl_lane_t lane, const tl_frame_t *hdr,
                     void *buf, const void *other, size_t len, int dtype, int redop,
                     tl_req_t *req);
static inline int tl__can_reduce_in_place(const tl_comm_t *c, int peer) {
  return c->links[peer].ops && c->links[peer].ops->view != NULL;
}

/* Drive the channels until req completes. */
int tl__wait(tl_comm_t *c, tl_req_t *req);
int tl__wait_all(tl_comm_t *c, tl_req_t *reqs, int n);

/* A header template for the current operation. */
tl_frame_t tl__frame(tl_comm_t *c, uint32_t unit, uint32_t lane);

/* The rest of slice s's frame as iovecs over its header (hdr: s->hdr to
 * send, &s->got to receive) and payload, from s->done on: how many (0-2). */
int tl__frame_iov(tl_slice_t *s, tl_frame_t *hdr, struct iovec *iov);

/* Called by transports when a slice is finished (it goes back to the pool). */
void tl__slice_done(tl_comm_t *c, tl_slice_t *s);
void tl__slice_free(tl_comm_t *c, tl_slice_t *s);

/* Check a received header against the expected one. On mismatch, poison c
 * with a message describing both, and return the status. */
int tl__check_frame(tl_comm_t *c, int peer, const tl_frame_t *want,
                    const tl_frame_t *got, const char *where);

/* Scratch memory owned by the communicator, grown on demand. */
int tl__scratch(tl_comm_t *c, size_t bytes, char **out);

/* ---- collectives ----------------------------------------------------------- */

int tl__oneshot_all_reduce(tl_comm_t *c, const void *in, void *out,
                           uint64_t count, int dtype, int redop);
int tl__oneshot_all_gather(tl_comm_t *c, const void *in, void *out,
                           size_t bytes);
int tl__direct_reduce_scatter(tl_comm_t *c, const void *in, void *out,
                              uint64_t count, int dtype, int redop);

/* all_gather of `bytes` per rank for internal use (split, barrier): one
 * round where every pair shares a link, else round the ring. */
int tl__gather_bytes(tl_comm_t *c, const void *in, void *out, size_t bytes);

/* The pipelined ring (ring.c), as the current operation's plan says
 * (c->cur.plan: lanes, depth, chunk size). */
enum { TL_RING_ALL_REDUCE, TL_RING_REDUCE_SCATTER, TL_RING_ALL_GATHER };
int tl__ring_run(tl_comm_t *c, int kind, const void *in, void *out,
                 uint64_t count, int dtype, int redop);
/* The same operations by direct exchange with every peer at once (mesh.c),
 * where every pair of ranks shares a link. */
int tl__mesh_run(tl_comm_t *c, int kind, const void *in, void *out,
                 uint64_t count, int dtype, int redop);

/* The algorithm choice (select.c; tl_select in tl.h). Ring instances, each
 * on its own lane: the bootstrap spreads connections over cables by it. */
int tl__ring_lanes(const tl_options_t *o);

#endif /* THUNDERLINK_INTERNAL_H */
