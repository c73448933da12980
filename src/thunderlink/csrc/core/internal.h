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
  double weight;
} tl_endpoint_t;

/* ---- frames (the wire header of every message slice) --------------------- */

#define TL_FRAME_MAGIC 0x31464c54u /* "TLF1" little-endian */
#define TL_FRAME_DATA 1
#define TL_FRAME_ABORT 2

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
 * slices, one per connection of a lane, each preceded by a frame header on
 * the wire. The transport completes slices; a request is done when all its
 * slices are. */

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
} tl_slice_t;

/* Connections {first, first + step, ...} of a link carry one stream of
 * messages. Distinct concurrent streams must use disjoint lanes, so that
 * both ends see frames in the same order on each connection. */
typedef struct tl_lane {
  int first;
  int step;
} tl_lane_t;

static inline tl_lane_t tl__lane_all(void) { tl_lane_t l = {0, 1}; return l; }

/* ---- transport ops table --------------------------------------------------
 * The collectives use this table only; they never see sockets. A transport
 * fills c->links[p].nconns and .share[] in connect. */

typedef struct tl_transport_ops {
  const char *name;
  /* Open this rank's listening endpoints (port 0 = pick one and write it back
   * into c->eps). Does not block. */
  int (*listen)(tl_comm_t *c);
  /* Connect to every peer and complete the handshakes; blocks until every
   * connection is up, or the connect deadline, or an error. */
  int (*connect)(tl_comm_t *c);
  /* Queue a slice on connection k of the link to peer. Never blocks. */
  int (*post_send)(tl_comm_t *c, int peer, int k, tl_slice_t *s);
  int (*post_recv)(tl_comm_t *c, int peer, int k, tl_slice_t *s);
  /* Transfer bytes until at least one slice completes (returns TL_OK), the
   * communicator's deadline passes, or an error (both poison the comm). */
  int (*progress)(tl_comm_t *c);
  /* Best effort, never blocks long: tell every peer `why`, then shut every
   * connection down and drop every queued slice. */
  void (*abort)(tl_comm_t *c, const char *why);
  /* Close everything and free the transport's state. Idempotent. */
  void (*shutdown)(tl_comm_t *c);
} tl_transport_ops_t;

extern const tl_transport_ops_t tl__tcp_ops;

/* ---- the communicator ----------------------------------------------------- */

#define TL_MAX_CONNS 64

typedef struct tl_link {
  int nconns;
  /* Relative speed of each connection as an integer share (1..1000000), so
   * that both ends cut a message into exactly the same slices. */
  uint32_t share[TL_MAX_CONNS];
  uint32_t send_seq;           /* p2p messages sent to this peer */
  uint32_t recv_seq;           /* p2p messages received from this peer */
} tl_link_t;

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
} tl_opctx_t;

struct tl_comm {
  int rank;
  int size;
  tl_options_t opts;
  uint64_t comm_id;   /* job id, or derived for split children */
  atomic_int refs;
  pthread_mutex_t lock;

  int status;         /* sticky failure; 0 while healthy */
  int closed;
  int connected;
  char err[TL_ERRMSG_LEN];
  /* A peer's failure in a later collective than the one this rank was in:
   * reported by this rank's next call (see tcp.c, peer_aborted). */
  char pending_abort[TL_ERRMSG_LEN];

  tl_endpoint_t *eps;
  int neps;
  int eps_cap;

  int mesh;           /* every pair of ranks shares a link */
  int32_t *ring;      /* ring order of ranks */
  int ring_pos;       /* this rank's position in it */

  tl_link_t *links;   /* [size], links[rank] unused */
  uint32_t coll_seq;  /* collectives called so far */
  uint32_t split_count;
  tl_opctx_t cur;
  int64_t deadline_ns;
  int64_t spin_ns;

  const tl_transport_ops_t *ops;
  void *tstate;

  tl_slice_t *free_slices;
  char *scratch;
  size_t scratch_cap;

  tl_stats_t stats;
};

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

/* Drive the transport until req completes. */
int tl__wait(tl_comm_t *c, tl_req_t *req);
int tl__wait_all(tl_comm_t *c, tl_req_t *reqs, int n);

/* A header template for the current operation. */
tl_frame_t tl__frame(tl_comm_t *c, uint32_t unit, uint32_t lane);

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

/* The pipelined ring (ring.c). */
enum { TL_RING_ALL_REDUCE, TL_RING_REDUCE_SCATTER, TL_RING_ALL_GATHER };
int tl__ring_run(tl_comm_t *c, int kind, const void *in, void *out,
                 uint64_t count, int dtype, int redop);

#endif /* THUNDERLINK_INTERNAL_H */
