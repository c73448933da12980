/*
 * thunderlink C core: public API.
 *
 * One communicator (tl_comm_t) connects `size` ranks. Every function returns
 * an int status: TL_OK (0) or a negative TL_ERR_* code. When a function that
 * takes a communicator fails, tl_comm_last_error() returns a message naming
 * the rank, the peer, the operation and the cause.
 *
 * Rules every function follows:
 *  - Buffers belong to the caller. The core reads and writes them only for the
 *    duration of the call and keeps no pointer afterwards.
 *  - Every blocking call has a deadline (tl_options_t.timeout_ms for
 *    collectives, connect_timeout_ms for tl_comm_connect). Waiting is done in
 *    poll(2), after at most a short spin (spin_us).
 *  - The first failure of a collective poisons the communicator: the peers are
 *    told (best effort) and every later call fails fast with the same status
 *    and message. A poisoned communicator can only be closed and released.
 *  - Calls on one communicator are serialised by an internal lock; distinct
 *    communicators (for example the children of tl_comm_split) are
 *    independent and may be used from different threads at the same time.
 *  - The core never prints to stdout, never exits and never aborts. Warnings
 *    (a refused stranger connection, for instance) go to stderr as one line
 *    each, filtered by tl_options_t.log_level.
 */
#ifndef THUNDERLINK_TL_H
#define THUNDERLINK_TL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever tl_vtable_t or the meaning of a function changes. */
#define TL_ABI_VERSION 2

/* Wire protocol version, sent in every handshake. */
#define TL_PROTOCOL_VERSION 3

/* ---- status codes ------------------------------------------------------ */

#define TL_OK 0
#define TL_ERR_INVALID (-1)     /* bad argument: wrong rank, dtype, size ... */
#define TL_ERR_CONFIG (-2)      /* bad configuration: addresses, ports ...  */
#define TL_ERR_SYSTEM (-3)      /* an OS call failed (errno in the message) */
#define TL_ERR_TIMEOUT (-4)     /* a deadline passed                         */
#define TL_ERR_PEER (-5)        /* a peer closed, reset, aborted or fell
                                   silent (tl_options_t.heartbeat_ms)       */
#define TL_ERR_PROTOCOL (-6)    /* bad handshake or frame on the wire        */
#define TL_ERR_MISMATCH (-7)    /* ranks called different collectives        */
#define TL_ERR_UNSUPPORTED (-8) /* operation not available in this build     */
#define TL_ERR_NOMEM (-9)       /* out of memory                             */
#define TL_ERR_CLOSED (-10)     /* the communicator was closed               */
#define TL_ERR_INTERRUPTED (-11) /* a signal interrupted the main thread     */

/* ---- data types (same order as mlx::core::Dtype::Val) ------------------ */

#define TL_BOOL 0
#define TL_UINT8 1
#define TL_UINT16 2
#define TL_UINT32 3
#define TL_UINT64 4
#define TL_INT8 5
#define TL_INT16 6
#define TL_INT32 7
#define TL_INT64 8
#define TL_FLOAT16 9
#define TL_FLOAT32 10
#define TL_FLOAT64 11
#define TL_BFLOAT16 12
#define TL_COMPLEX64 13
#define TL_NUM_DTYPES 14

/* ---- reduction operators ---------------------------------------------- */

#define TL_SUM 0
#define TL_PROD 1
#define TL_MAX 2
#define TL_MIN 3
#define TL_NUM_REDOPS 4

/* ---- collective kinds (for statistics and wire headers) ---------------- */

#define TL_OP_ALL_REDUCE 1
#define TL_OP_ALL_GATHER 2
#define TL_OP_REDUCE_SCATTER 3
#define TL_OP_SEND 4
#define TL_OP_BROADCAST 5
#define TL_OP_BARRIER 6
#define TL_OP_SPLIT 7
#define TL_NUM_OPS 8

/* ---- algorithm choice for all_reduce ----------------------------------- */

#define TL_ALGO_AUTO 0    /* by size: one round up to algo_threshold, ring above */
#define TL_ALGO_RING 1    /* pipelined ring: reduce-scatter + all-gather */
#define TL_ALGO_ONESHOT 2 /* every rank sends its buffer to every other rank */
#define TL_ALGO_MESH 3    /* every pair linked: direct reduce-scatter + all-gather */

/* tl_options_t.tcp_threads: who moves the bytes of TCP connections */
#define TL_TCP_THREADS_AUTO 0 /* threads where the host has cores to spare       */
#define TL_TCP_THREADS_OFF 1  /* the calling thread drives every connection        */
#define TL_TCP_THREADS_ON 2   /* threads per connection move its large frames      */

/* ---- transports ---------------------------------------------------------
 * tl_options_t.transport picks them: AUTO uses shared memory between ranks
 * of one host and TCP otherwise; TCP forces TCP; SHM requires every linked
 * pair of ranks to share a host. The ids also index per-transport counters. */

#define TL_TRANSPORT_AUTO 0
#define TL_TRANSPORT_TCP 1
#define TL_TRANSPORT_SHM 2
#define TL_TRANSPORT_RDMA 3
#define TL_NUM_TRANSPORTS 4

/* ---- option kinds (tl_option_info_t.kind) ----------------------------- */

#define TL_OPT_INT 0    /* a plain integer                                 */
#define TL_OPT_BYTES 1  /* a size in bytes                                 */
#define TL_OPT_MS 2     /* milliseconds (given in seconds by people)       */
#define TL_OPT_CHOICE 3 /* an index into tl_option_info_t.choices          */

/* ---- algorithms (tl_plan_t.how) ------------------------------------------ */

#define TL_HOW_LOCAL 0     /* one rank: copy, no communication              */
#define TL_HOW_ONE_ROUND 1 /* every rank sends to every other rank at once   */
#define TL_HOW_RING 2      /* the pipelined ring (ring.c)                   */
#define TL_HOW_CHAIN 3     /* broadcast: chunks flow down the ring          */
#define TL_HOW_FRAMES 4    /* send/recv: the message, in frames              */
#define TL_HOW_MESH 5      /* every pair at once, pipelined (mesh.c)        */

/* ---- log levels --------------------------------------------------------- */

#define TL_LOG_NONE 0
#define TL_LOG_WARN 1
#define TL_LOG_INFO 2
#define TL_LOG_TRACE 3

typedef struct tl_comm tl_comm_t;

/*
 * One row of a tuning profile (thunderlink tune writes them; Python's
 * thunderlink.tune.profile reads and checks them). For operation `op`
 * (TL_OP_*) of min_bytes <= bytes < max_bytes (bytes as tl_select counts
 * them) among `nranks` ranks over `transport`, the row's values replace the
 * options' choice. The first row that matches applies. 0 (how: -1) keeps the
 * options' choice.
 */
typedef struct tl_tune_row {
  int32_t op;          /* TL_OP_*                                           */
  int32_t nranks;      /* group size; 0: any                                */
  int32_t transport;   /* TL_TRANSPORT_TCP, _SHM ...; 0 (AUTO): any          */
  int32_t how;         /* TL_HOW_ONE_ROUND, _RING or _MESH; -1: by size     */
  uint64_t min_bytes;  /* band, inclusive                                   */
  uint64_t max_bytes;  /* band, exclusive; 0: no upper end                  */
  int32_t depth;       /* pipeline depth; 0: pipeline_depth                 */
  int32_t lanes;       /* ring instances (1 or 2); 0: from conns_per_peer   */
  int64_t chunk_bytes; /* largest chunk; 0: chunk_bytes                     */
} tl_tune_row_t;

#define TL_MAX_TUNE_ROWS 64

/*
 * Knobs of one communicator. Fill with tl_options_default() and override.
 * Every knob but job_id is declared once, in core/options.h: its default,
 * range, environment variable and whether every rank must use the same
 * value (the handshake refuses a rank that differs in those).
 */
typedef struct tl_options {
  uint64_t job_id;            /* both ends of every connection must agree  */
  /* The job token's key (a hash of THUNDERLINK_TOKEN, see
   * thunderlink.config): with token_set, every connection proves it in the
   * handshake (HMAC-SHA256 challenge-response, both ways). A secret: never
   * logged, printed or sent. */
  uint8_t token_key[32];
  int32_t token_set;
  int32_t connect_timeout_ms; /* deadline of tl_comm_connect               */
  int32_t timeout_ms;         /* deadline of every collective call         */
  int32_t conns_per_peer;     /* TCP connections per cable to a peer   */
  int32_t pipeline_depth;     /* chunks in flight per ring direction   */
  int64_t chunk_bytes;        /* largest pipelined chunk               */
  int64_t algo_threshold;     /* one round of messages while each rank
                                 sends at most this (all_reduce: bytes x (n-1)) */
  int32_t algo;               /* TL_ALGO_*                              */
  int32_t spin_us;            /* busy-poll this long before sleeping        */
  int64_t stripe_min_bytes;   /* messages below go on one connection    */
  int32_t sockbuf_bytes;      /* SO_SNDBUF/SO_RCVBUF where the kernel grants
                                 it in full, else autotuning; 0 = autotuning */
  int32_t log_level;          /* TL_LOG_*                                   */
  int32_t transport;          /* TL_TRANSPORT_AUTO, _TCP, _SHM or _RDMA */
  int32_t heartbeat_ms;       /* a peer silent this long while awaited is
                                 lost; heartbeats every fifth; 0 = off      */
  int32_t listen_all;         /* listen on every interface, not just the hostfile's addresses */
  int64_t ibv_zcopy_bytes;    /* RDMA: zero copy from this message size; 0 = off */
  int32_t ibv_mr_cache;       /* RDMA: regions a link's registration cache holds */
  int32_t tcp_threads;        /* TL_TCP_THREADS_*: I/O threads for TCP connections */
  int64_t tcp_threads_min_bytes; /* operations below this: no I/O threads */
  /* A tuning profile's rows (not in the options table: not knobs of their
   * own). Checked by tl_options_check; in the handshake digest. */
  int32_t ntune;
  tl_tune_row_t tune[TL_MAX_TUNE_ROWS];
} tl_options_t;

/* Process-wide counters, also kept per communicator. */
typedef struct tl_stats {
  uint64_t calls[TL_NUM_OPS]; /* indexed by TL_OP_*                      */
  uint64_t bytes_sent;        /* payload bytes written to the wire       */
  uint64_t bytes_received;    /* payload bytes read from the wire        */
  uint64_t last_in;           /* input pointer of the latest collective  */
  uint64_t last_out;          /* output pointer of the latest collective */
  /* Payload bytes by transport (indexed by TL_TRANSPORT_*). */
  uint64_t bytes_sent_by[TL_NUM_TRANSPORTS];
  uint64_t bytes_received_by[TL_NUM_TRANSPORTS];
  /* RDMA zero copy (transport/rdma.c): messages written straight from the
   * sender's buffer into the receiver's, and their bytes; memory regions
   * registered for it, lookups the cache served, regions evicted to make
   * room; rendezvous that went through the staging slots instead (no region
   * to be had, or a destination that cannot take it in place). */
  uint64_t zcopy_sent, zcopy_sent_bytes;
  uint64_t zcopy_received, zcopy_received_bytes;
  uint64_t mr_registered, mr_hits, mr_evicted, zcopy_staged;
} tl_stats_t;

/* ---- errors -------------------------------------------------------------- */

/* Static, one-line description of a status code. Never NULL. */
const char *tl_strerror(int status);

/* The communicator's latest error message ("" when none). Valid until the next
 * call on that communicator. */
const char *tl_comm_last_error(tl_comm_t *comm);

/* ---- communicator life cycle -------------------------------------------- */

void tl_options_default(tl_options_t *opts);

/* TL_OK, or TL_ERR_CONFIG with the reason written to why (cap bytes). */
int tl_options_check(const tl_options_t *opts, char *why, size_t cap);

/* One row of the options table (core/options.h); strings are static. */
typedef struct tl_option_info {
  const char *field;   /* member of tl_options_t: "timeout_ms"          */
  const char *name;    /* Python's keyword: "timeout"                    */
  const char *env;     /* "THUNDERLINK_TIMEOUT"                          */
  int32_t kind;        /* TL_OPT_*                                       */
  const char *unit;    /* of the stored value: "ms", "B", "us" or ""     */
  int64_t def, min, max; /* default and inclusive range, stored units    */
  int32_t shared;      /* every rank must agree (in the handshake digest) */
  const char *choices; /* TL_OPT_CHOICE: "auto,ring,oneshot"; else ""    */
  const char *help;    /* one line, Markdown                             */
} tl_option_info_t;

/* Number of rows in the options table. */
int tl_option_count(void);
/* Row i (0 <= i < tl_option_count()), or TL_ERR_INVALID. */
int tl_option_info(int i, tl_option_info_t *out);

/* Allocate a communicator for `rank` of `size` (size >= 1). Nothing is
 * connected yet: declare every rank's endpoints, then call tl_comm_connect.
 * The new communicator holds one reference. */
int tl_comm_create(tl_comm_t **out, int rank, int size,
                   const tl_options_t *opts);

/*
 * Declare that rank `owner` listens on host:port. `facing` is the rank that
 * should use this endpoint to reach `owner` (a per-cable address), or -1 when
 * any rank may. `ifname` (may be NULL or "") binds sockets to that interface.
 * `device` (may be NULL or "") is the RDMA device of this end (the owner's):
 * the RDMA transport opens it for the owner's links that leave from this
 * endpoint; without one it tries "rdma_<ifname>", then the first device
 * with an active port. THUNDERLINK_IBV_DEVICE overrides both.
 * `weight` (> 0) is the endpoint's relative speed: traffic striped over
 * several endpoints to one peer is split in proportion to it.
 * `host` may be an IPv4 or IPv6 literal (a link-local "fe80::1%en0" too) or a
 * name. Every rank must declare the same endpoints in the same order.
 */
int tl_comm_add_endpoint(tl_comm_t *comm, int owner, int facing,
                         const char *host, int port, const char *ifname,
                         const char *device, double weight);

/*
 * Set the order of the ring used by ring collectives. `order` holds each
 * rank once. Without it, tl_comm_connect uses tl_comm_find_ring's order.
 */
int tl_comm_set_ring(tl_comm_t *comm, const int32_t *order, int n);

/*
 * Topology of the endpoints declared so far; no connection needed, so tools
 * can ask before (or without) connecting. tl_comm_link_plan: who listens
 * for the link between ranks a and b (*acceptor, -1 when they share no link)
 * and which of the acceptor's endpoints the other dials, one per cable
 * (indices in declaration order, at most cap, their number in *ncables),
 * and for each cable the dialling rank's own endpoint it leaves from
 * (sources, may be NULL; -1 where it has none and its routes decide).
 */
int tl_comm_link_plan(tl_comm_t *comm, int a, int b, int *acceptor,
                      int32_t *cables, int32_t *sources, int cap, int *ncables);

/*
 * A ring order (n = world size entries) in which neighbours share links:
 * 0..n-1 when that works, else found by a bounded search.
 * TL_ERR_CONFIG, with the reason in tl_comm_last_error, when there is none
 * or the search gives up (then set the order explicitly).
 */
int tl_comm_find_ring(tl_comm_t *comm, int32_t *order, int n);

/*
 * After tl_comm_connect: the link to `peer` (TL_TRANSPORT_*, or 0 when the
 * two share no link) and its number of channels (TCP connections; rings).
 */
int tl_comm_link_info(tl_comm_t *comm, int peer, int *transport, int *nchannels);

/* Whether this process can use a transport at all: TL_OK, or
 * TL_ERR_UNSUPPORTED with the reason in why. */
int tl_transport_available(int transport, char *why, size_t cap);

/*
 * RDMA (ibverbs), process-wide, for communicators connected afterwards:
 * the library to dlopen (a name or a path; NULL or "": libibverbs.so.1 on
 * Linux, librdma.dylib on macOS) and the device to use (NULL or "": on each
 * link, the device named rdma_<interface> of the link's interface if there
 * is one, else the first with an active port). TL_ERR_INVALID if too long.
 */
int tl_rdma_configure(const char *library, const char *device);
/* The RDMA devices, for people: one line per port, tab-separated (device,
 * port, state, link layer, active MTU, LID, GID index, GID), or one line
 * "unavailable<TAB>why". TL_ERR_INVALID if cap is too small. */
int tl_rdma_describe(char *buf, size_t cap);

/*
 * Listen on this rank's endpoints, open conns_per_peer connections per cable
 * to every rank this one shares a link with, and complete the handshakes.
 * Blocks until every connection of this rank is up or connect_timeout_ms
 * passes.
 */
int tl_comm_connect(tl_comm_t *comm);

/* Close every connection (idempotent). Later calls fail with TL_ERR_CLOSED;
 * the peers see this rank leave. Memory is kept until the last release. */
int tl_comm_close(tl_comm_t *comm);

/* Reference counting: the last release closes and frees the communicator. */
int tl_comm_retain(tl_comm_t *comm);
int tl_comm_release(tl_comm_t *comm);

int tl_comm_rank(tl_comm_t *comm);
int tl_comm_size(tl_comm_t *comm);

/*
 * Collective over `comm`: ranks with the same color form a new communicator,
 * ordered by key (ties by parent rank; key < 0 means the parent rank). The
 * child listens on the same addresses as the parent, on new ports, and has
 * its own connections. A rank whose color is negative gets *out = NULL.
 */
int tl_comm_split(tl_comm_t *comm, int color, int key, tl_comm_t **out);

/*
 * Declare [addr, addr + len) stable: the caller will not free it while it is
 * registered (NCCL's ncclCommRegister). RDMA links register it now, once, and
 * keep it registered across calls, so zero copy from and into it costs no
 * registration; without this, registrations last one call (a buffer freed
 * and its addresses reused would otherwise be moved to the old pages). A
 * no-op on other transports. tl_comm_deregister_memory takes the same
 * range back (TL_ERR_INVALID if it was not registered).
 */
int tl_comm_register_memory(tl_comm_t *comm, void *addr, size_t len);
int tl_comm_deregister_memory(tl_comm_t *comm, void *addr, size_t len);

/* Copy the communicator's counters, or the process-wide ones if comm is NULL. */
int tl_comm_stats(tl_comm_t *comm, tl_stats_t *out);

/* ---- collectives ---------------------------------------------------------
 * `count` is in elements of `dtype`. `in` may equal `out` (in place); other
 * overlaps are invalid. Every rank must call the same collective with the
 * same count and dtype in the same order; if not, every rank gets an error. */

/* out[i] = op over ranks of in[i]. Every rank ends with identical bits. */
int tl_all_reduce(tl_comm_t *comm, const void *in, void *out, uint64_t count,
                  int dtype, int op);

/* out = concatenation over ranks of in (count elements each). */
int tl_all_gather(tl_comm_t *comm, const void *in, void *out, uint64_t count,
                  int dtype);

/* in holds size blocks of `count` elements; out = op over ranks of block[rank]. */
int tl_reduce_scatter(tl_comm_t *comm, const void *in, void *out,
                      uint64_t count, int dtype, int op);

/* Point to point, between any two ranks. Sizes and dtypes must match. */
int tl_send(tl_comm_t *comm, const void *buf, uint64_t count, int dtype,
            int peer);
int tl_recv(tl_comm_t *comm, void *buf, uint64_t count, int dtype, int peer);

/* buf on `root` is copied to buf on every other rank. */
int tl_broadcast(tl_comm_t *comm, void *buf, uint64_t count, int dtype,
                 int root);

int tl_barrier(tl_comm_t *comm);

/* ---- local helpers (no communication) ---------------------------------- */

/* Size in bytes of one element of dtype, or 0 if dtype is invalid. */
size_t tl_dtype_size(int dtype);

/* dst[i] = a[i] op b[i]; dst may equal a or b. The kernel the collectives use. */
int tl_reduce(void *dst, const void *a, const void *b, uint64_t count,
              int dtype, int op);

/* Which kernels tl_reduce uses, process-wide: "auto" (the best this CPU
 * runs, the default), "generic" (portable C) or "avx2" (x86-64). For tests
 * and benchmarks; TL_ERR_UNSUPPORTED if this CPU or build lacks it. */
int tl_reduce_select_isa(const char *name);

/*
 * The ring schedule, as a pure function (used by the collectives, exposed for
 * tests). For a ring of n positions, the data is cut into n blocks of
 * `count` elements (block b starts at block_off[b]); each block is cut into
 * `nchunks` chunks. tl_chunk_range gives chunk j of a block of `len`
 * elements: [*off, *off + *len).
 */
int tl_ring_nchunks(uint64_t block_count, size_t elem_size, int64_t chunk_bytes,
                    int pipeline_depth);
void tl_chunk_range(uint64_t len, int nchunks, int j, uint64_t *off,
                    uint64_t *clen);

/* Block sent (*send) and received (*recv) by ring position `pos` (of n) at
 * step t of a ring all_reduce (t < 2(n-1): reduce-scatter, then
 * all-gather). Blocks are named by ring position: position p ends the
 * reduce-scatter owning block p. */
void tl_ring_step(int n, int pos, int t, int *send, int *recv);

/* The order in which a rank walks its (step, chunk) units: unit u of a
 * schedule of `steps` steps and `nchunks` chunks per block, in groups of
 * `group` chunk columns, is (t, j); tl_ring_unit_index is the inverse. */
void tl_ring_unit(int nchunks, int group, int steps, int64_t u, int *t, int *j);
int64_t tl_ring_unit_index(int nchunks, int group, int steps, int t, int j);

/*
 * The algorithm choice, as a pure function (used by the collectives, exposed
 * for tests and, later, tuning profiles). For operation `op` (TL_OP_*) of
 * `bytes` on this rank, as the operation counts them (all_reduce, broadcast,
 * send: the buffer; all_gather: the input; reduce_scatter: the whole input;
 * barrier and split: 0), of elements of `dtype`, among `nranks` ranks,
 * where every pair of ranks shares a link (`mesh`) or not, over `transport`
 * (TL_TRANSPORT_*, TL_TRANSPORT_AUTO when the links mix transports).
 */
typedef struct tl_plan {
  int32_t how;         /* TL_HOW_*                                        */
  int32_t lanes;       /* ring: instances, one per direction, each on its
                          own connections                                 */
  int32_t depth;       /* ring, chain: chunks in flight per instance      */
  int64_t chunk_bytes; /* ring, chain: largest chunk (tl_ring_nchunks)    */
  int64_t spin_ns;     /* poll this long before sleeping; 0: sleep at once */
} tl_plan_t;

/* mesh: 0 when some pair of ranks shares no link, 1 when every pair does,
 * TL_MESH_CABLED when every pair does over its own cables (addresses that
 * face the other rank), where the mesh algorithm pays. */
#define TL_MESH_CABLED 2

int tl_select(const tl_options_t *opts, int op, uint64_t bytes, int dtype,
              int nranks, int mesh, int transport, tl_plan_t *out);

/* After tl_comm_connect: the plan this communicator's options, profile and
 * links give operation `op` of `bytes` of `dtype` (what it would run now). */
int tl_comm_plan(tl_comm_t *comm, int op, uint64_t bytes, int dtype, tl_plan_t *out);
/* ---- interrupting waits (Ctrl-C) -------------------------------------------
 *
 * A collective waiting on the main thread fails with TL_ERR_INTERRUPTED when
 * a signal interrupts its wait. One waiting on another thread (MLX runs
 * collectives on its stream thread) is interrupted by tl_interrupt(): every
 * collective of the process that is waiting then, and does not complete
 * within 0.25 s, fails with TL_ERR_INTERRUPTED and poisons its
 * communicator. tl_interrupt is async-signal-safe. tl_interrupt_hook makes
 * SIGINT call it before the handler installed now (Python's), unless SIGINT
 * is ignored or has its default action; cheap when already hooked, and
 * hooks again when the handler was replaced since. */
void tl_interrupt(void);
int tl_interrupt_hook(void);

/* ---- function table for the MLX shim ----------------------------------- */

typedef struct tl_vtable {
  uint32_t abi_version; /* TL_ABI_VERSION */
  uint32_t size;        /* sizeof(tl_vtable_t) */
  int (*comm_retain)(tl_comm_t *);
  int (*comm_release)(tl_comm_t *);
  int (*comm_close)(tl_comm_t *);
  int (*comm_rank)(tl_comm_t *);
  int (*comm_size)(tl_comm_t *);
  int (*comm_split)(tl_comm_t *, int, int, tl_comm_t **);
  const char *(*comm_last_error)(tl_comm_t *);
  int (*all_reduce)(tl_comm_t *, const void *, void *, uint64_t, int, int);
  int (*all_gather)(tl_comm_t *, const void *, void *, uint64_t, int);
  int (*reduce_scatter)(tl_comm_t *, const void *, void *, uint64_t, int, int);
  int (*send)(tl_comm_t *, const void *, uint64_t, int, int);
  int (*recv)(tl_comm_t *, void *, uint64_t, int, int);
  int (*interrupt_hook)(void);
} tl_vtable_t;

/* The core's table; lives as long as the process. */
const tl_vtable_t *tl_get_vtable(void);

/* ---- hashes (the handshake's token proof; exported for tests) ------------ */

/* SHA-256 (FIPS 180-4) of n bytes at data into out. */
int tl_sha256(const void *data, size_t n, uint8_t out[32]);
/* HMAC-SHA256 (RFC 2104) of n bytes at data under a key of klen bytes. */
int tl_hmac_sha256(const void *key, size_t klen, const void *data, size_t n, uint8_t out[32]);

#ifdef __cplusplus
}
#endif
#endif /* THUNDERLINK_TL_H */
