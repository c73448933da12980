/*
 * RDMA transport over ibverbs: RoCE and InfiniBand NICs on Linux
 * (libibverbs.so.1), Thunderbolt 5 on macOS 26.2+ (librdma.dylib).
 *
 * Loading. The library is never linked: dlopen (THUNDERLINK_IBV_LIB, passed
 * in through tl_rdma_configure, overrides the name) and dlsym into a table
 * of function pointers. The data path (post_send, post_recv, poll_cq,
 * req_notify_cq) is not exported by any verbs library: the inline functions
 * of ibv_abi.h call through the op table of the context, which the provider
 * that opened the device filled in. A software provider (the tests'
 * thunderlink.testing.softverbs) is loaded through the very same path.
 *
 * Set-up over the link's first bootstrap connection, which then stays open
 * as the link's control channel, as with shared memory: abort notices travel
 * there, and a peer that dies closes it, which the core sees at once.
 *   phase 0  open the device, create the queue pairs, register the buffers,
 *            post every receive, move to INIT; send our connection data
 *            (QP numbers, PSNs, GID, LID, MTU), or why we cannot.
 *   phase 1  read the peer's; if either side cannot, both fall back (auto)
 *            or fail (rdma). Move to RTR; send whether that worked.
 *   phase 2  read the peer's RTR answer (so that nobody sends to a queue pair
 *            not yet ready to receive: on UC that message would be lost);
 *            move to RTS.
 * In auto mode every link between two hosts goes through phase 0 and 1, so
 * that both ends decide together: RDMA where both have a device, else TCP.
 *
 * Channels. Like a shared-memory ring, each channel is an ordered byte
 * stream in each direction carrying the core's frames, over one queue pair
 * (RC where the device offers it, UC on Apple's devices). Bytes travel in
 * messages of at most SLOT bytes, two-sided (SEND into a posted receive),
 * through registered staging slots: the sender copies into a send slot,
 * the receiver's core reads (or reduces) straight out of the receive slot
 * and the slot's receive is posted again. Every message starts with a
 * header: a sequence number, and the count of the peer's messages this side
 * has consumed (credits, carried back on every message).
 *
 * Flow control. A sender has at most WINDOW data messages that the peer has
 * not reported consumed. The receiver keeps 2 x WINDOW receives posted: the
 * other WINDOW take credit-only messages, which the receiver sends when it
 * has consumed WINDOW/2 messages it has not reported yet and which are
 * reposted as soon as they are polled. So no message ever finds no receive
 * (on UC it would be dropped silently; on RC it would stall in RNR retries).
 *
 * Loss. UC does not retransmit. A data message that arrives out of sequence
 * while the one before it stays missing for LOST_NS is a lost message: the
 * communicator fails with an error saying so (never a hang); a credit
 * message lost is made good by the next one (the counts are cumulative).
 * Credit messages also carry the count of data messages their sender has
 * sent, so that a lost message with no data message after it (the last of a
 * collective) is seen too; and a side that waits with data messages the
 * peer has not reported consumed, and has sent nothing for PROBE_NS, sends a
 * probe (a credit message the peer answers with its own credit message), at
 * most MAX_PROBES until the peer is heard from again. Without probes a lost
 * last message, or a lost credit message while the sender's window is full,
 * would leave both sides waiting until THUNDERLINK_TIMEOUT.
 *
 * Completions are matched by wr_id (slot and kind), never by arrival
 * order. Waiting: the core spins briefly, then sleeps in poll(2) on each
 * channel's completion channel (armed with req_notify_cq, then polled once
 * more so no completion slips between), together with every other
 * transport's descriptors, under the operation's deadline.
 *
 * Zero copy. Bytes of at least the link's zcopy size (THUNDERLINK_IBV_ZCOPY;
 * the two ends agree on it in set-up: the larger of their sizes, off if
 * either is off) that the core offers as one piece (a frame's payload) go
 * by rendezvous instead of through the slots:
 *   sender    registers the source through the cache and sends an RTS, a
 *             data message (it has a sequence number and takes a credit)
 *             saying how many stream bytes follow (at most RDV_MAX, and the
 *             port's largest message); then posts nothing more on the
 *             channel until the answer.
 *   receiver  answers when the RTS reaches the head of its stream and the
 *             core reads there: CTS (address, rkey) when the core's
 *             destination holds all those bytes contiguously and registers
 *             (a recv's buffer; or, for a reduce-on-receive, the receive's
 *             own buffer when it is not the other operand: the reduction
 *             then runs in place there), else NACK. The RTS is consumed.
 *   sender    on CTS: RDMA_WRITE_WITH_IMM from the source straight into the
 *             destination, as the channel's next data message (imm: its
 *             sequence number; it takes one of the peer's receives and a
 *             credit, like a SEND, and a lost one is found like any lost
 *             message). On NACK (or when no region can be had): the same
 *             bytes through the slots, next in the stream; nothing was
 *             posted after the RTS, so the order holds.
 * A send is reported to the core only once complete, in stream order
 * (tx_advance: a write can finish after later messages); a write into the
 * receiver only once it has landed and is consumed. A lost CTS or NACK (a
 * control message) is sent again when the waiting sender probes.
 * Pipelining: one RTS awaits its answer per channel at a time (a NACK's
 * bytes must come next in the stream), so a channel's wire idles about one
 * round trip between two writes (the next RTS travels behind the write
 * before it); the ring's two lanes (one channel each) and its pipelined
 * chunks keep the link busy meanwhile, and larger chunks
 * (THUNDERLINK_CHUNK_BYTES) make the gap a smaller share. A send of at least
 * the zcopy size waits for the receiver to post the matching receive (as a
 * TCP send larger than the socket buffers, or an MPI rendezvous).
 *
 * Registration cache. Per protection domain (one per link today), at most
 * THUNDERLINK_IBV_MR_CACHE regions for the call's buffers (Apple's devices
 * allow about 100 regions and 10 queue pairs: at most 5 links of 2 queue
 * pairs, each with 1 staging region and 8 cached by default, leaves half
 * for the program's declared memory). A region covers whole pages of the
 * whole buffer a chunk belongs to (the call's input, output or scratch: its
 * chunks share one registration), is found by any range it covers, and is
 * counted in use (refs) from the RTS or CTS to the completion or
 * consumption of the write: the least recently used region not in use is
 * evicted for a new one, and when every one is in use (or the device
 * refuses: ENOMEM) the message goes through the slots instead of failing.
 *
 * SAFETY. A registration pins the pages behind a virtual range. If the
 * program frees that memory and a later allocation reuses the addresses
 * with new pages, a registration kept in a cache still points at the old
 * pages: the NIC would move data to or from memory nobody sees (silently
 * wrong results on hardware; softverbs, which reads by address, cannot show
 * it). No cheap portable check exists (UCX and libfabric intercept munmap;
 * NCCL registers only memory the user declared). So registrations of the
 * call's buffers live for one call: tl_transport_ops_t.op_end drops them
 * when the call ends (the cache and its bound work within the call, where
 * the buffers cannot be freed); only memory the program declares stable
 * with tl_comm_register_memory (it promises not to free it until
 * tl_comm_deregister_memory) stays registered across calls. The core's
 * scratch memory is allocated at the start of an operation, never grown
 * during one, so it is no exception. After a failure the call's regions
 * are dropped all the same: a peer's write then fails instead of landing
 * in memory the call no longer owns.
 */
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "../core/internal.h"
#include "ibv_abi.h"

#define RDMA_STREAMS 2            /* channels per link, as shared memory */
#define SLOT ((size_t)64 << 10)   /* bytes per message, header included */
#define WINDOW 16                 /* data messages in flight per direction */
#define NRECV (2 * WINDOW)        /* receives posted per channel */
#define NCTL 8                    /* send slots for credit-only messages */
#define CTL_BYTES 64
#define LOST_NS ((int64_t)1000000000) /* a gap in the sequence this long: lost */
#define INFO_MAGIC 0x4d44524cu    /* "LRDM" */
#define MSG_MAGIC 0x4d4c54u       /* "TLM" in the low 24 bits */
#define KIND_DATA 1u
#define KIND_CREDIT 2u
#define KIND_PROBE 3u             /* a credit message that asks for one back */
#define KIND_RTS 4u               /* data: the next bytes come by RDMA write (see "Zero copy") */
#define KIND_CTS 5u               /* control: write them there */
#define KIND_NACK 6u              /* control: send them through the slots */
#define KIND_WRITE 7u             /* (receive slots only) an RDMA write landed in place */
#define RDV_MAX ((size_t)64 << 20) /* bytes of one rendezvous at most */
#define PROBE_NS ((int64_t)250000000) /* quiet this long with data unreported: probe */
#define MAX_PROBES 4              /* probes unanswered (they take the peer's receives) */

/* wr_id: kind in the top bits, slot below. */
#define WR_TX_DATA ((uint64_t)1 << 32)
#define WR_TX_CTL ((uint64_t)2 << 32)
#define WR_RX ((uint64_t)3 << 32)
#define WR_TX_WRITE ((uint64_t)4 << 32) /* slot: the write's sequence number % WINDOW */

/* ---- the library ---------------------------------------------------------- */

typedef struct ibv_api {
  char path[512];
  void *handle;
  __typeof__(ibv_get_device_list) *get_device_list;
  __typeof__(ibv_free_device_list) *free_device_list;
  __typeof__(ibv_get_device_name) *get_device_name;
  __typeof__(ibv_open_device) *open_device;
  __typeof__(ibv_close_device) *close_device;
  __typeof__(ibv_query_device) *query_device;
  __typeof__(ibv_query_port) *query_port;
  __typeof__(ibv_query_gid) *query_gid;
  __typeof__(ibv_alloc_pd) *alloc_pd;
  __typeof__(ibv_dealloc_pd) *dealloc_pd;
  __typeof__(ibv_reg_mr) *reg_mr;
  __typeof__(ibv_dereg_mr) *dereg_mr;
  __typeof__(ibv_create_comp_channel) *create_comp_channel;
  __typeof__(ibv_destroy_comp_channel) *destroy_comp_channel;
  __typeof__(ibv_create_cq) *create_cq;
  __typeof__(ibv_destroy_cq) *destroy_cq;
  __typeof__(ibv_get_cq_event) *get_cq_event;
  __typeof__(ibv_ack_cq_events) *ack_cq_events;
  __typeof__(ibv_create_qp) *create_qp;
  __typeof__(ibv_modify_qp) *modify_qp;
  __typeof__(ibv_destroy_qp) *destroy_qp;
  __typeof__(ibv_wc_status_str) *wc_status_str; /* optional */
  struct ibv_api *next;
} ibv_api_t;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static char g_lib[512];    /* configured library ("" = the system's) */
static char g_device[64];  /* configured device ("" = per link) */
static ibv_api_t *g_apis;  /* every library loaded (never unloaded: contexts
                              may outlive a reconfiguration) */

static const char *default_lib(void) {
#if defined(__APPLE__)
  return "librdma.dylib";
#else
  return "libibverbs.so.1";
#endif
}

int tl_rdma_configure(const char *library, const char *device) {
  if ((library && strlen(library) >= sizeof g_lib) || (device && strlen(device) >= sizeof g_device))
    return TL_ERR_INVALID;
  pthread_mutex_lock(&g_lock);
  snprintf(g_lib, sizeof g_lib, "%s", library ? library : "");
  snprintf(g_device, sizeof g_device, "%s", device ? device : "");
  pthread_mutex_unlock(&g_lock);
  return TL_OK;
}

/* The loaded library of the configured name, or NULL with why. */
static ibv_api_t *load(char *why, size_t cap) {
  pthread_mutex_lock(&g_lock);
  const char *name = g_lib[0] ? g_lib : default_lib();
  ibv_api_t *a;
  for (a = g_apis; a; a = a->next)
    if (!strcmp(a->path, name)) break;
  if (a) {
    pthread_mutex_unlock(&g_lock);
    return a;
  }
  void *h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char *e = dlerror();
    if (g_lib[0])
      snprintf(why, cap, "cannot load %s (THUNDERLINK_IBV_LIB): %s", name, e ? e : "not found");
    else
      snprintf(why, cap, "%s not found (%s; or set THUNDERLINK_IBV_LIB)", name,
#if defined(__APPLE__)
               "RDMA over Thunderbolt needs macOS 26.2 or later"
#else
               "install libibverbs1 and the NIC's provider, e.g. ibverbs-providers"
#endif
      );
    pthread_mutex_unlock(&g_lock);
    return NULL;
  }
  a = calloc(1, sizeof *a);
  if (!a) {
    dlclose(h);
    snprintf(why, cap, "out of memory");
    pthread_mutex_unlock(&g_lock);
    return NULL;
  }
  snprintf(a->path, sizeof a->path, "%s", name);
  a->handle = h;
  const char *missing = NULL;
#define SYM(f)                                                   \
  do {                                                           \
    *(void **)&a->f = dlsym(h, "ibv_" #f);                       \
    if (!a->f && !missing) missing = "ibv_" #f;                  \
  } while (0)
  SYM(get_device_list);
  SYM(free_device_list);
  SYM(get_device_name);
  SYM(open_device);
  SYM(close_device);
  SYM(query_device);
  SYM(query_port);
  SYM(query_gid);
  SYM(alloc_pd);
  SYM(dealloc_pd);
  SYM(reg_mr);
  SYM(dereg_mr);
  SYM(create_comp_channel);
  SYM(destroy_comp_channel);
  SYM(create_cq);
  SYM(destroy_cq);
  SYM(get_cq_event);
  SYM(ack_cq_events);
  SYM(create_qp);
  SYM(modify_qp);
  SYM(destroy_qp);
#undef SYM
  *(void **)&a->wc_status_str = dlsym(h, "ibv_wc_status_str");
  if (missing) {
    snprintf(why, cap, "%s does not export %s: not an ibverbs library", name, missing);
    dlclose(h);
    free(a);
    pthread_mutex_unlock(&g_lock);
    return NULL;
  }
  a->next = g_apis;
  g_apis = a;
  pthread_mutex_unlock(&g_lock);
  return a;
}

static const char *status_str(const ibv_api_t *a, int st) {
  const char *s = a && a->wc_status_str ? a->wc_status_str((enum ibv_wc_status)st) : NULL;
  return s ? s : "work completion error";
}

/* ---- devices ------------------------------------------------------------------ */

typedef struct port_pick {
  char dev[64];
  int port;
  int gid_index;
  union ibv_gid gid;
  uint16_t lid;
  int link_layer;
  enum ibv_mtu mtu;
  uint32_t max_msg; /* the port's largest message (0: not said) */
} port_pick_t;

static int gid_zero(const union ibv_gid *g) {
  for (int i = 0; i < 16; i++)
    if (g->raw[i]) return 0;
  return 1;
}

static int gid_v4(const union ibv_gid *g) {
  static const uint8_t pre[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  return !memcmp(g->raw, pre, 12);
}

/* The GID to use on a port: an IPv4-mapped one (::ffff:a.b.c.d: RoCE v2 on
 * an address, and what Thunderbolt ports publish), else the first non-zero.
 * -1 when none. */
static int pick_gid(ibv_api_t *a, struct ibv_context *ctx, int port, int tbl,
                    union ibv_gid *out) {
  int first = -1;
  union ibv_gid g, gf;
  memset(&gf, 0, sizeof gf);
  for (int i = 0; i < tbl && i < 32; i++) {
    memset(&g, 0, sizeof g);
    if (a->query_gid(ctx, (uint8_t)port, i, &g) || gid_zero(&g)) continue;
    if (gid_v4(&g)) {
      *out = g;
      return i;
    }
    if (first < 0) {
      first = i;
      gf = g;
    }
  }
  *out = gf;
  return first;
}

/* The first active port of ctx, with its GID: 0 or -1 with why. */
static int pick_port(ibv_api_t *a, struct ibv_context *ctx, port_pick_t *p, char *why,
                     size_t cap) {
  struct ibv_device_attr da;
  memset(&da, 0, sizeof da);
  if (a->query_device(ctx, &da)) {
    snprintf(why, cap, "%s: ibv_query_device: %s", p->dev, strerror(errno));
    return -1;
  }
  int nports = da.phys_port_cnt ? da.phys_port_cnt : 1;
  for (int port = 1; port <= nports; port++) {
    struct ibv_port_attr pa;
    memset(&pa, 0, sizeof pa); /* the compat entry leaves the tail alone */
    if (a->query_port(ctx, (uint8_t)port, &pa)) continue;
    if (pa.state != IBV_PORT_ACTIVE) continue;
    p->port = port;
    p->lid = pa.lid;
    p->link_layer = pa.link_layer;
    p->max_msg = pa.max_msg_sz;
    p->mtu = pa.active_mtu >= IBV_MTU_256 && pa.active_mtu <= IBV_MTU_4096 ? pa.active_mtu
                                                                            : IBV_MTU_1024;
    p->gid_index = pick_gid(a, ctx, port, pa.gid_tbl_len, &p->gid);
    if (p->gid_index < 0 && (pa.link_layer == IBV_LINK_LAYER_ETHERNET || !pa.lid)) {
      snprintf(why, cap, "%s port %d has no GID (a Thunderbolt or RoCE port publishes one "
               "once its interface has an IP address)", p->dev, port);
      continue;
    }
    return 0;
  }
  if (!why[0]) snprintf(why, cap, "%s has no active port", p->dev);
  return -1;
}

/* Open the device for a link: `want` by name if given (`by` says who asked
 * for it, for the error), else "rdma_<hint>" (JACCL's naming: the device of
 * a Thunderbolt interface) if there is one, else the first device with an
 * active port. Returns the open context, or NULL with why. */
static struct ibv_context *open_device(ibv_api_t *a, const char *want, const char *by,
                                       const char *hint, port_pick_t *p, char *why, size_t cap) {
  int n = 0;
  errno = 0;
  struct ibv_device **list = a->get_device_list(&n);
  if (!list) {
    snprintf(why, cap, "ibv_get_device_list: %s", strerror(errno ? errno : ENODEV));
    return NULL;
  }
  char hinted[80] = "";
  if (hint && hint[0]) snprintf(hinted, sizeof hinted, "rdma_%s", hint);
  int pick = -1;
  for (int i = 0; i < n && pick < 0; i++) {
    const char *name = a->get_device_name(list[i]);
    if (want && want[0] ? !strcmp(name, want) : hinted[0] && !strcmp(name, hinted)) pick = i;
  }
  if (want && want[0] && pick < 0) {
    size_t o = (size_t)snprintf(why, cap, "%s%s: no such device (found:", by, want);
    for (int i = 0; i < n && o < cap; i++)
      o += (size_t)snprintf(why + o, cap - o, " %s", a->get_device_name(list[i]));
    if (o < cap) snprintf(why + o, cap - o, "%s)", n ? "" : " none");
    a->free_device_list(list);
    return NULL;
  }
  struct ibv_context *ctx = NULL;
  why[0] = 0;
  for (int i = pick >= 0 ? pick : 0; i < n && !ctx; i++) {
    memset(p, 0, sizeof *p);
    snprintf(p->dev, sizeof p->dev, "%s", a->get_device_name(list[i]));
    errno = 0;
    ctx = a->open_device(list[i]);
    if (!ctx) {
      snprintf(why, cap, "ibv_open_device(%s): %s", p->dev, strerror(errno ? errno : ENODEV));
    } else if (pick_port(a, ctx, p, why, cap)) {
      a->close_device(ctx);
      ctx = NULL;
    }
    if (pick >= 0) break;
  }
  if (!n) snprintf(why, cap, "no RDMA device (%s lists none)", a->path);
  a->free_device_list(list);
  return ctx;
}

static int rdma_available(char *why, size_t cap) {
  ibv_api_t *a = load(why, cap);
  if (!a) return 0;
  port_pick_t p;
  char dev[64];
  pthread_mutex_lock(&g_lock);
  snprintf(dev, sizeof dev, "%s", g_device);
  pthread_mutex_unlock(&g_lock);
  why[0] = 0;
  struct ibv_context *ctx = open_device(a, dev, "THUNDERLINK_IBV_DEVICE=", NULL, &p, why, cap);
  if (!ctx) return 0;
  a->close_device(ctx);
  return 1;
}

/* For doctor: one line per port, tab-separated: device, port, state,
 * link layer, active MTU, LID, GID index, GID; or "unavailable\t<why>". */
int tl_rdma_describe(char *buf, size_t cap) {
  if (!buf || !cap) return TL_ERR_INVALID;
  char why[512] = "";
  buf[0] = 0;
  ibv_api_t *a = load(why, sizeof why);
  if (!a) {
    snprintf(buf, cap, "unavailable\t%s\n", why);
    return TL_OK;
  }
  int n = 0;
  errno = 0;
  struct ibv_device **list = a->get_device_list(&n);
  if (!list) {
    snprintf(buf, cap, "unavailable\t%s: ibv_get_device_list: %s\n", a->path,
             strerror(errno ? errno : ENODEV));
    return TL_OK;
  }
  size_t o = 0;
  if (!n) o += (size_t)snprintf(buf, cap, "unavailable\tno RDMA device (%s lists none)\n", a->path);
  static const char *states[] = {"nop", "down", "init", "armed", "active", "active_defer"};
  static const char *layers[] = {"unspecified", "infiniband", "ethernet"};
  for (int i = 0; i < n && o < cap; i++) {
    const char *name = a->get_device_name(list[i]);
    struct ibv_context *ctx = a->open_device(list[i]);
    if (!ctx) {
      o += (size_t)snprintf(buf + o, cap - o, "%s\t-\terror\tibv_open_device: %s\n", name,
                            strerror(errno ? errno : ENODEV));
      continue;
    }
    struct ibv_device_attr da;
    memset(&da, 0, sizeof da);
    int nports = a->query_device(ctx, &da) == 0 && da.phys_port_cnt ? da.phys_port_cnt : 1;
    for (int port = 1; port <= nports && o < cap; port++) {
      struct ibv_port_attr pa;
      memset(&pa, 0, sizeof pa);
      if (a->query_port(ctx, (uint8_t)port, &pa)) {
        o += (size_t)snprintf(buf + o, cap - o, "%s\t%d\terror\tibv_query_port: %s\n", name,
                              port, strerror(errno));
        continue;
      }
      union ibv_gid g;
      int gi = pick_gid(a, ctx, port, pa.gid_tbl_len, &g);
      char gs[48] = "-";
      if (gi >= 0) {
        size_t k = 0;
        for (int b = 0; b < 16; b += 2)
          k += (size_t)snprintf(gs + k, sizeof gs - k, "%s%02x%02x", b ? ":" : "", g.raw[b],
                                g.raw[b + 1]);
      }
      o += (size_t)snprintf(
          buf + o, cap - o, "%s\t%d\t%s\t%s\t%d\t%u\t%d\t%s\n", name, port,
          (unsigned)pa.state < 6 ? states[pa.state] : "unknown",
          pa.link_layer < 3 ? layers[pa.link_layer] : "unknown",
          pa.active_mtu >= IBV_MTU_256 && pa.active_mtu <= IBV_MTU_4096 ? 128 << pa.active_mtu : 0,
          (unsigned)pa.lid, gi, gs);
    }
    a->close_device(ctx);
  }
  a->free_device_list(list);
  return o >= cap ? TL_ERR_INVALID : TL_OK;
}

/* ---- per link and per channel state -------------------------------------------- */

typedef struct msg_hdr {
  uint32_t magic_kind; /* MSG_MAGIC | kind << 24 */
  uint32_t seq;        /* data: its number on this channel; credit, probe: data sent */
  uint32_t ack;        /* data messages of the peer this side consumed */
  uint32_t len;        /* payload bytes after the header */
} msg_hdr_t;

#define HDR sizeof(msg_hdr_t)

typedef struct rdma_link rdma_link_t;

/* A memory region of the registration cache (see "Registration cache"). */
typedef struct mr_entry {
  struct mr_entry *next;
  struct ibv_mr *mr;
  uintptr_t lo, hi;  /* the registered range, whole pages */
  unsigned access;   /* IBV_ACCESS_* it was registered with */
  int refs;          /* work requests (ours, or the peer's through a CTS) using it */
  int declared;      /* tl_comm_register_memory's, times: kept across calls */
  void *daddr;       /* ... of this exact range */
  size_t dlen;
  uint64_t used;     /* LRU clock */
} mr_entry_t;

/* Body of a KIND_RTS message, and of KIND_CTS / KIND_NACK. */
typedef struct rts_body {
  uint64_t len;      /* stream bytes that follow by RDMA write */
} rts_body_t;

typedef struct cts_body {
  uint32_t rts_seq;  /* the RTS it answers */
  uint32_t rkey;     /* CTS: where to write */
  uint64_t addr;
} cts_body_t;

typedef struct rdma_chan {
  rdma_link_t *rl;
  tl_chan_t *ch;
  int index;
  struct ibv_comp_channel *cc;
  struct ibv_cq *cq;
  struct ibv_qp *qp;
  uint32_t psn;
  unsigned events; /* completion events taken, to ack before destroy_cq */
  char *tx, *rx, *ctl; /* slots: WINDOW send, NRECV receive, NCTL credit */
  /* sending */
  uint32_t tx_seq;    /* data messages sent */
  uint32_t tx_acked;  /* of them, consumed by the peer (as it last said) */
  int tx_free[WINDOW], ntx_free;
  uint32_t tx_slot_seq[WINDOW]; /* sequence number of the message in each send slot */
  /* Completion, in stream order, by sequence number % WINDOW: stream bytes
   * each message carries, whether it completed, and the region a write
   * reads. Bytes count as moved only up to the first incomplete message. */
  uint32_t tx_bytes[WINDOW];
  uint8_t tx_isdone[WINDOW];
  mr_entry_t *tx_mr[WINDOW];
  uint32_t tx_done_seq; /* messages complete in order */
  /* zero copy, sending: one rendezvous at a time (nothing is posted after
   * an RTS until the peer answers, so that a NACK can be followed by the
   * same bytes through the slots, in stream order) */
  int rdv;              /* RDV_NONE, _WAIT (RTS posted), _GO (CTS came: write) */
  uint32_t rdv_seq;     /* the RTS's sequence number */
  const char *rdv_src;
  size_t rdv_len;
  mr_entry_t *rdv_mr;
  uint64_t rdv_raddr;
  uint32_t rdv_rkey;
  size_t stream_left;   /* bytes to send through the slots before the next RTS */
  size_t tx_unreported; /* bytes posted and not yet reported to the core */
  size_t tx_completed;  /* of them, those whose send completed */
  int tx_more;          /* the core offered bytes not posted yet */
  int ctl_free[NCTL], nctl_free;
  int credit_due;     /* a credit message waits for a free slot */
  int64_t last_tx_ns; /* when this side last posted a message */
  int probes;         /* probes sent since the peer was last heard from */
  int closing;        /* rdma_close is draining: no more probes */
  /* receiving */
  uint32_t rx_next;   /* the data message to read next */
  uint32_t rx_reported; /* rx_next as the peer last heard it */
  size_t rx_off;      /* bytes of message rx_next read already */
  int ready[WINDOW];  /* receive slot holding data message seq, by seq % WINDOW */
  uint32_t rx_len[NRECV];  /* stream bytes the message in each receive slot stands for */
  uint8_t rx_kind[NRECV];  /* KIND_DATA, KIND_RTS or KIND_WRITE */
  /* zero copy, receiving: the rendezvous accepted (its write is message
   * wr_seq, landing at wr_dest), and the answer to the latest RTS, sent
   * again when the peer probes until its next message shows it was heard */
  int wr_on;
  uint32_t wr_seq;
  char *wr_dest;
  size_t wr_len;
  mr_entry_t *wr_mr;
  uint32_t ans_kind;       /* KIND_CTS, KIND_NACK, or 0: none owed */
  cts_body_t ans;
  int ans_due;             /* to send when a control slot comes back */
  int64_t gap_since;  /* a later message is here, rx_next is not: since then */
  int64_t gone_since; /* the control channel closed: since then */
  int failed;         /* a verbs error was recorded: -errno for the core */
  int armed;
} rdma_chan_t;

struct rdma_link {
  ibv_api_t *api;
  struct ibv_context *ctx;
  struct ibv_pd *pd;
  struct ibv_mr *mr;
  char *mem;
  size_t mem_bytes;
  tl_link_t *link;
  port_pick_t port;
  int qpt; /* IBV_QPT_RC or _UC */
  size_t zcopy;     /* rendezvous from this size (agreed with the peer); 0: off */
  size_t max_msg;   /* the port's largest message */
  /* The registration cache of this link's protection domain. */
  mr_entry_t *mrs;
  int ncall;        /* entries for the call's buffers (not declared) */
  uint64_t clock;
  int status; /* phase 0/1 local result: 0, or a TL_ERR_* with why */
  char why[256];
  rdma_chan_t ch[RDMA_STREAMS];
};

/* The connection data, sent in phase 0 on bootstrap connection 0. */
typedef struct conn_info {
  uint32_t magic;
  int32_t status; /* 0: ready; else this side cannot (why says) */
  uint32_t qpt;
  uint32_t mtu;
  uint32_t lid;
  uint32_t gid_index;
  uint8_t gid[16];
  uint32_t qpn[RDMA_STREAMS];
  uint32_t psn[RDMA_STREAMS];
  uint32_t slot, window, nrecv;
  uint32_t zcopy; /* rendezvous from this size; 0: this side does not (older sides send 0) */
  char dev[64];
  char why[192];
} conn_info_t;

typedef struct rtr_answer {
  uint32_t magic;
  int32_t status;
  char why[192];
} rtr_answer_t;

static size_t chan_bytes(void) { return (size_t)(WINDOW + NRECV) * SLOT + NCTL * CTL_BYTES; }

static int peer_gone(const tl_chan_t *ch) { return ch->link->ctl && ch->link->ctl->eof; }

/* The peer closed its control channel, or sent an abort notice there; its
 * last messages, sent before, may still be on their way: the channel ends
 * once none has arrived for this long. */
#define GONE_GRACE_NS ((int64_t)200000000)

static int qp_type(void) {
#if defined(__APPLE__)
  return IBV_QPT_UC; /* Apple's Thunderbolt devices offer UC only */
#else
  return IBV_QPT_RC;
#endif
}

static const char *qpt_name(int t) { return t == IBV_QPT_RC ? "RC" : "UC"; }

static int post_recv(rdma_link_t *rl, rdma_chan_t *rc, int slot) {
  struct ibv_sge sge = {(uint64_t)(uintptr_t)(rc->rx + (size_t)slot * SLOT), (uint32_t)SLOT,
                        rl->mr->lkey};
  struct ibv_recv_wr wr, *bad = NULL;
  memset(&wr, 0, sizeof wr);
  wr.wr_id = WR_RX | (uint64_t)slot;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  return ibv_post_recv(rc->qp, &wr, &bad);
}

/* ---- the registration cache ------------------------------------------------------ */

static size_t page_size(void) {
  static size_t pg;
  if (!pg) {
    long v = sysconf(_SC_PAGESIZE);
    pg = v > 0 ? (size_t)v : 4096;
  }
  return pg;
}

static void mr_drop(rdma_link_t *rl, mr_entry_t **pp) {
  mr_entry_t *e = *pp;
  *pp = e->next;
  if (!e->declared) rl->ncall--;
  rl->api->dereg_mr(e->mr);
  free(e);
}

/* Evict the least recently used region that nothing uses: 1, or 0 if
 * every one is busy (or declared). */
static int mr_evict(rdma_link_t *rl) {
  mr_entry_t **victim = NULL;
  for (mr_entry_t **pp = &rl->mrs; *pp; pp = &(*pp)->next)
    if (!(*pp)->declared && !(*pp)->refs && (!victim || (*pp)->used < (*victim)->used))
      victim = pp;
  if (!victim) return 0;
  mr_drop(rl, victim);
  rl->link->comm->stats.mr_evicted++;
  return 1;
}

/* The call's buffer that holds [p, p + len): the input, the output (as the
 * operation sizes them) or the communicator's scratch, so that the chunks
 * of one buffer share one registration; [p, p + len) itself if none does.
 * A receive (dest) of a point-to-point call looks only at its buffer, a
 * send only at its own (the other pointer is an older call's). */
static void call_extent(const tl_comm_t *c, uintptr_t p, size_t len, int dest, uintptr_t *lo,
                        uintptr_t *hi) {
  uint64_t t = c->cur.total, in_b = t, out_b = t;
  if (c->cur.op == TL_OP_ALL_GATHER) out_b = t * (uint64_t)c->size;
  else if (c->cur.op == TL_OP_REDUCE_SCATTER) out_b = t / (uint64_t)c->size;
  else if (c->cur.op == TL_OP_SEND) in_b = dest ? 0 : t, out_b = dest ? t : 0;
  else if (c->cur.op != TL_OP_ALL_REDUCE && c->cur.op != TL_OP_BROADCAST) in_b = out_b = 0;
  uintptr_t cand[3][2] = {{(uintptr_t)c->stats.last_in, (uintptr_t)c->stats.last_in + in_b},
                          {(uintptr_t)c->stats.last_out, (uintptr_t)c->stats.last_out + out_b},
                          {(uintptr_t)c->scratch, (uintptr_t)c->scratch + c->scratch_cap}};
  *lo = p;
  *hi = p + len;
  for (int i = 0; i < 3; i++)
    if (cand[i][0] && cand[i][0] <= p && p + len <= cand[i][1] && cand[i][1] > cand[i][0]) {
      *lo = cand[i][0];
      *hi = cand[i][1];
      break;
    }
}

static struct ibv_mr *reg_pages(rdma_link_t *rl, uintptr_t lo, uintptr_t hi, unsigned access) {
  size_t pg = page_size();
  lo &= ~(uintptr_t)(pg - 1);
  hi = (hi + pg - 1) & ~(uintptr_t)(pg - 1);
  return rl->api->reg_mr(rl->pd, (void *)lo, hi - lo, (int)access);
}

/* Fill e with mr, registered by reg_pages over [lo, hi) (the whole pages),
 * and put it on the link's list. */
static void mr_insert(rdma_link_t *rl, mr_entry_t *e, struct ibv_mr *mr, uintptr_t lo,
                      uintptr_t hi, unsigned access) {
  size_t pg = page_size();
  e->mr = mr;
  e->lo = lo & ~(uintptr_t)(pg - 1);
  e->hi = (hi + pg - 1) & ~(uintptr_t)(pg - 1);
  e->access = access;
  e->next = rl->mrs;
  rl->mrs = e;
}

/*
 * A region holding [ptr, ptr + len) for a write from it (dest 0: local
 * read) or into it by the peer (dest 1), with a reference taken; NULL when
 * none can be had (every region busy, or the device refuses): the bytes
 * then go through the slots.
 */
static mr_entry_t *mr_get(rdma_link_t *rl, const void *ptr, size_t len, int dest) {
  tl_comm_t *c = rl->link->comm;
  unsigned need = dest ? IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE : 0;
  uintptr_t p = (uintptr_t)ptr;
  for (mr_entry_t *e = rl->mrs; e; e = e->next)
    if (e->lo <= p && p + len <= e->hi && (e->access & need) == need) {
      e->refs++;
      e->used = ++rl->clock;
      c->stats.mr_hits++;
      return e;
    }
  while (rl->ncall >= c->opts.ibv_mr_cache)
    if (!mr_evict(rl)) return NULL;
  mr_entry_t *e = calloc(1, sizeof *e);
  if (!e) return NULL;
  uintptr_t lo, hi;
  call_extent(c, p, len, dest, &lo, &hi);
  /* One access for both directions, so that a buffer sent from and written
   * into (the ring's output) takes one region; read-only memory refuses
   * local write, and can still be sent from. */
  unsigned access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE;
  struct ibv_mr *mr = NULL;
  for (int tries = 0; !mr && tries < 64; tries++) {
    mr = reg_pages(rl, lo, hi, access);
    if (mr) break;
    int err = errno;
    if (err == ENOMEM && mr_evict(rl)) continue; /* the device's regions: make room */
    if (lo != p || hi != p + len) {
      lo = p, hi = p + len; /* the whole buffer may reach unmapped or read-only pages */
      continue;
    }
    if (!dest && access) {
      access = 0;
      continue;
    }
    tl__log(c, TL_LOG_INFO, "rdma to rank %d: ibv_reg_mr of %zu B: %s; through the staging "
            "slots", rl->link->peer, len, strerror(err));
    break;
  }
  if (!mr) {
    free(e);
    return NULL;
  }
  mr_insert(rl, e, mr, lo, hi, access);
  e->refs = 1;
  e->used = ++rl->clock;
  rl->ncall++;
  c->stats.mr_registered++;
  return e;
}

static void mr_put(mr_entry_t *e) {
  if (e && e->refs > 0) e->refs--;
}

static void free_link(rdma_link_t *rl) {
  if (!rl) return;
  ibv_api_t *a = rl->api;
  for (int k = 0; k < RDMA_STREAMS; k++) {
    rdma_chan_t *rc = &rl->ch[k];
    if (rc->qp) a->destroy_qp(rc->qp);
    if (rc->cq) {
      /* Every event raised must be taken and acknowledged first. */
      struct ibv_cq *ev_cq;
      void *ev_ctx;
      while (rc->cc && a->get_cq_event(rc->cc, &ev_cq, &ev_ctx) == 0) rc->events++;
      if (rc->events) a->ack_cq_events(rc->cq, rc->events);
      a->destroy_cq(rc->cq);
    }
    if (rc->cc) a->destroy_comp_channel(rc->cc);
  }
  while (rl->mrs) mr_drop(rl, &rl->mrs); /* after the queue pairs: nothing uses them */
  if (rl->mr) a->dereg_mr(rl->mr);
  if (rl->pd) a->dealloc_pd(rl->pd);
  if (rl->ctx) a->close_device(rl->ctx);
  free(rl->mem);
  free(rl);
}

static void rdma_close_link(tl_link_t *l) {
  free_link(l->t);
  l->t = NULL;
}

/* Phase 0's local work: 0, or -1 with rl->why. */
static int open_link(tl_comm_t *c, tl_link_t *l, rdma_link_t *rl) {
  char dev[64];
  pthread_mutex_lock(&g_lock);
  snprintf(dev, sizeof dev, "%s", g_device);
  pthread_mutex_unlock(&g_lock);
  if (!(rl->api = load(rl->why, sizeof rl->why))) return -1;
  ibv_api_t *a = rl->api;
  /* The device: THUNDERLINK_IBV_DEVICE; else the one the hostfile names for
   * this rank's end of the cable to the peer, or for one of its addresses
   * open to every rank; else open_device's guess from the interface. */
  int src = tl__source_ep(c->eps, c->neps, c->rank, l->peer, 0);
  const char *hint = src >= 0 ? c->eps[src].ifname : NULL;
  int named = src >= 0 && c->eps[src].device[0] ? src : -1;
  for (int i = 0; i < c->neps && named < 0 && src < 0; i++)
    if (c->eps[i].owner == c->rank && c->eps[i].facing < 0 && c->eps[i].device[0]) named = i;
  int from_file = !dev[0] && named >= 0;
  if (from_file) snprintf(dev, sizeof dev, "%s", c->eps[named].device);
  const char *by = from_file ? "the hostfile's \"rdma\": " : "THUNDERLINK_IBV_DEVICE=";
  if (!(rl->ctx = open_device(a, dev, by, hint, &rl->port, rl->why, sizeof rl->why))) return -1;
  const char *dn = rl->port.dev;
  if (!(rl->pd = a->alloc_pd(rl->ctx))) {
    snprintf(rl->why, sizeof rl->why, "%s: ibv_alloc_pd: %s", dn, strerror(errno));
    return -1;
  }
  rl->mem_bytes = RDMA_STREAMS * chan_bytes();
  if (posix_memalign((void **)&rl->mem, 4096, rl->mem_bytes)) {
    rl->mem = NULL;
    snprintf(rl->why, sizeof rl->why, "out of memory");
    return -1;
  }
  memset(rl->mem, 0, rl->mem_bytes);
  /* One region for every slot of the link: devices allow few regions. */
  if (!(rl->mr = a->reg_mr(rl->pd, rl->mem, rl->mem_bytes, IBV_ACCESS_LOCAL_WRITE))) {
    snprintf(rl->why, sizeof rl->why, "%s: ibv_reg_mr of %zu bytes: %s%s", dn, rl->mem_bytes,
             strerror(errno), errno == ENOMEM ? " (the device's memory regions are used up: Apple's "
                                                    "allow about 100, and each link takes 1; or the "
                                                    "locked-memory limit is too low: ulimit -l)"
                             : errno == EPERM ? " (raise the locked-memory limit: ulimit -l)" : "");
    return -1;
  }
  rl->qpt = qp_type();
  for (int k = 0; k < RDMA_STREAMS; k++) {
    rdma_chan_t *rc = &rl->ch[k];
    rc->rl = rl;
    rc->index = k;
    char *base = rl->mem + (size_t)k * chan_bytes();
    rc->tx = base;
    rc->rx = base + (size_t)WINDOW * SLOT;
    rc->ctl = rc->rx + (size_t)NRECV * SLOT;
    for (int i = 0; i < WINDOW; i++) rc->tx_free[i] = WINDOW - 1 - i, rc->ready[i] = -1;
    rc->ntx_free = WINDOW;
    for (int i = 0; i < NCTL; i++) rc->ctl_free[i] = NCTL - 1 - i;
    rc->nctl_free = NCTL;
    rc->cc = a->create_comp_channel(rl->ctx); /* NULL: poll without sleeping */
    if (rc->cc) {
      int fl = fcntl(rc->cc->fd, F_GETFL);
      if (fl < 0 || fcntl(rc->cc->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        a->destroy_comp_channel(rc->cc);
        rc->cc = NULL;
      }
    }
    int depth = WINDOW + NCTL + NRECV;
    if (!(rc->cq = a->create_cq(rl->ctx, depth, rc, rc->cc, 0))) {
      snprintf(rl->why, sizeof rl->why, "%s: ibv_create_cq(%d): %s", dn, depth, strerror(errno));
      return -1;
    }
    struct ibv_qp_init_attr ia;
    memset(&ia, 0, sizeof ia);
    ia.qp_context = rc;
    ia.send_cq = ia.recv_cq = rc->cq;
    ia.cap.max_send_wr = WINDOW + NCTL;
    ia.cap.max_recv_wr = NRECV;
    ia.cap.max_send_sge = ia.cap.max_recv_sge = 1;
    ia.qp_type = (enum ibv_qp_type)rl->qpt;
    rc->qp = a->create_qp(rl->pd, &ia);
    if (!rc->qp && rl->qpt == IBV_QPT_RC && k == 0 && (errno == EOPNOTSUPP || errno == EINVAL)) {
      rl->qpt = IBV_QPT_UC; /* a device without RC (Apple's): UC, and its loss checks */
      ia.qp_type = IBV_QPT_UC;
      rc->qp = a->create_qp(rl->pd, &ia);
    }
    if (!rc->qp) {
      int e = errno;
      snprintf(rl->why, sizeof rl->why, "%s: ibv_create_qp(%s): %s%s", dn, qpt_name(rl->qpt),
               strerror(e), e == EBUSY || e == ENOMEM
                                ? " (the device's queue pairs are used up: Apple's allow 10, "
                                  "and each link takes 2)" : "");
      return -1;
    }
    struct ibv_qp_attr at;
    memset(&at, 0, sizeof at);
    at.qp_state = IBV_QPS_INIT;
    at.pkey_index = 0;
    at.port_num = (uint8_t)rl->port.port;
    /* Zero copy: the peer writes into this side's registered buffers. */
    at.qp_access_flags = IBV_ACCESS_LOCAL_WRITE |
                         (c->opts.ibv_zcopy_bytes > 0 ? IBV_ACCESS_REMOTE_WRITE : 0);
    int e = a->modify_qp(rc->qp, &at, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT |
                                           IBV_QP_ACCESS_FLAGS);
    if (e) {
      snprintf(rl->why, sizeof rl->why, "%s: ibv_modify_qp to INIT: %s", dn, strerror(e));
      return -1;
    }
    for (int i = 0; i < NRECV; i++) {
      if ((e = post_recv(rl, rc, i))) {
        snprintf(rl->why, sizeof rl->why, "%s: ibv_post_recv: %s", dn, strerror(e));
        return -1;
      }
    }
    /* Any start will do; different per queue pair, to catch crossed wires. */
    uint64_t r = (uint64_t)tl__now_ns() ^ ((uint64_t)getpid() << 20) ^ (uint64_t)(uintptr_t)rc;
    rc->psn = (uint32_t)(r ^ (r >> 24) ^ (r >> 48)) & 0xffffff;
  }
  return 0;
}

static int fail_status(tl_comm_t *c) {
  return c->opts.transport == TL_TRANSPORT_RDMA ? TL_ERR_CONFIG : TL_ERR_UNSUPPORTED;
}

static int to_rtr(rdma_link_t *rl, const conn_info_t *pi) {
  ibv_api_t *a = rl->api;
  for (int k = 0; k < RDMA_STREAMS; k++) {
    rdma_chan_t *rc = &rl->ch[k];
    struct ibv_qp_attr at;
    memset(&at, 0, sizeof at);
    at.qp_state = IBV_QPS_RTR;
    at.path_mtu = (enum ibv_mtu)(pi->mtu < (uint32_t)rl->port.mtu ? pi->mtu : (uint32_t)rl->port.mtu);
    at.dest_qp_num = pi->qpn[k];
    at.rq_psn = pi->psn[k];
    at.ah_attr.port_num = (uint8_t)rl->port.port;
    at.ah_attr.dlid = (uint16_t)pi->lid;
    if (rl->port.link_layer == IBV_LINK_LAYER_ETHERNET || !pi->lid || !rl->port.lid) {
      at.ah_attr.is_global = 1;
      memcpy(at.ah_attr.grh.dgid.raw, pi->gid, 16);
      at.ah_attr.grh.sgid_index = (uint8_t)rl->port.gid_index;
      at.ah_attr.grh.hop_limit = 64;
    }
    int mask = IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN;
    if (rl->qpt == IBV_QPT_RC) {
      at.max_dest_rd_atomic = 1;
      at.min_rnr_timer = 12;
      mask |= IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
    }
    int e = a->modify_qp(rc->qp, &at, mask);
    if (e) {
      snprintf(rl->why, sizeof rl->why, "%s: ibv_modify_qp to RTR (%s, peer QP %u): %s",
               rl->port.dev, qpt_name(rl->qpt), pi->qpn[k], strerror(e));
      return -1;
    }
  }
  return 0;
}

static int to_rts(rdma_link_t *rl) {
  for (int k = 0; k < RDMA_STREAMS; k++) {
    struct ibv_qp_attr at;
    memset(&at, 0, sizeof at);
    at.qp_state = IBV_QPS_RTS;
    at.sq_psn = rl->ch[k].psn;
    int mask = IBV_QP_STATE | IBV_QP_SQ_PSN;
    if (rl->qpt == IBV_QPT_RC) {
      at.timeout = 14;
      at.retry_cnt = 7;
      at.rnr_retry = 7;
      at.max_rd_atomic = 1;
      mask |= IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC;
    }
    int e = rl->api->modify_qp(rl->ch[k].qp, &at, mask);
    if (e) {
      snprintf(rl->why, sizeof rl->why, "%s: ibv_modify_qp to RTS: %s", rl->port.dev, strerror(e));
      return -1;
    }
  }
  return 0;
}

static int make_channels(tl_comm_t *c, tl_link_t *l) {
  rdma_link_t *rl = l->t;
  int ctl = l->boot_fds[0];
  l->boot_fds[0] = -1;
  for (int k = 1; k < l->nboot; k++) {
    close(l->boot_fds[k]);
    l->boot_fds[k] = -1;
  }
  int rc = tl__link_init(c, l, &tl__rdma_ops, RDMA_STREAMS, ctl);
  if (rc) return rc;
  for (int k = 0; k < RDMA_STREAMS; k++) {
    l->chans[k].t = &rl->ch[k];
    rl->ch[k].ch = &l->chans[k];
    l->share[k] = 1000;
  }
  char zc[64] = "zero copy off";
  if (rl->zcopy) snprintf(zc, sizeof zc, "zero copy from %zu B", rl->zcopy);
  tl__log(c, TL_LOG_INFO, "link to rank %d: rdma on %s port %d (%s, MTU %d, %s)", l->peer,
          rl->port.dev, rl->port.port, qpt_name(rl->qpt), 128 << rl->port.mtu, zc);
  return TL_OK;
}

static int rdma_setup(tl_comm_t *c, tl_link_t *l, int phase) {
  rdma_link_t *rl = l->t;
  int fd = l->boot_fds[0];
  if (phase == 0) {
    if (!(rl = l->t = calloc(1, sizeof *rl))) return tl__error(c, TL_ERR_NOMEM, "out of memory");
    rl->link = l;
    conn_info_t mi;
    memset(&mi, 0, sizeof mi);
    mi.magic = INFO_MAGIC;
    if (open_link(c, l, rl)) {
      mi.status = 1;
      snprintf(mi.why, sizeof mi.why, "%.191s", rl->why);
    } else {
      mi.qpt = (uint32_t)rl->qpt;
      mi.mtu = (uint32_t)rl->port.mtu;
      mi.lid = rl->port.lid;
      mi.gid_index = (uint32_t)rl->port.gid_index;
      memcpy(mi.gid, rl->port.gid.raw, 16);
      for (int k = 0; k < RDMA_STREAMS; k++) {
        mi.qpn[k] = rl->ch[k].qp->qp_num;
        mi.psn[k] = rl->ch[k].psn;
      }
      mi.slot = (uint32_t)SLOT;
      mi.window = WINDOW;
      mi.nrecv = NRECV;
      mi.zcopy = (uint32_t)c->opts.ibv_zcopy_bytes;
      snprintf(mi.dev, sizeof mi.dev, "%s", rl->port.dev);
    }
    rl->status = mi.status;
    return tl__boot_xfer(c, l, fd, &mi, sizeof mi, 1, c->deadline_ns);
  }
  if (phase == 1) {
    conn_info_t pi;
    int rc = tl__boot_xfer(c, l, fd, &pi, sizeof pi, 0, c->deadline_ns);
    if (rc) return rc;
    pi.why[sizeof pi.why - 1] = 0;
    pi.dev[sizeof pi.dev - 1] = 0;
    if (pi.magic != INFO_MAGIC)
      return tl__error(c, TL_ERR_PROTOCOL, "rank %d (%s) sent malformed RDMA connection data",
                       l->peer, l->remote);
    if (rl->status)
      return tl__error(c, fail_status(c), "rdma to rank %d: %s", l->peer, rl->why);
    if (pi.status)
      return tl__error(c, fail_status(c), "rdma to rank %d: rank %d cannot: %s", l->peer,
                       l->peer, pi.why);
    if (pi.qpt != (uint32_t)rl->qpt || pi.slot != SLOT || pi.window != WINDOW ||
        pi.nrecv != NRECV)
      return tl__error(c, fail_status(c), "rdma to rank %d: its queue pairs (%s, %u-byte "
                       "slots, window %u) differ from this rank's (%s, %zu, %d): are both "
                       "running the same thunderlink on the same kind of system?", l->peer,
                       qpt_name((int)pi.qpt), pi.slot, pi.window, qpt_name(rl->qpt), SLOT, WINDOW);
    /* Zero copy where both ends offer it, from the larger size either asks. */
    rl->zcopy = c->opts.ibv_zcopy_bytes > 0 && pi.zcopy
                    ? tl__max((size_t)c->opts.ibv_zcopy_bytes, pi.zcopy) : 0;
    rl->max_msg = tl__min(RDV_MAX, rl->port.max_msg ? rl->port.max_msg : RDV_MAX);
    rtr_answer_t ans;
    memset(&ans, 0, sizeof ans);
    ans.magic = INFO_MAGIC;
    if (to_rtr(rl, &pi)) {
      ans.status = 1;
      snprintf(ans.why, sizeof ans.why, "%.191s", rl->why);
      rl->status = 1;
    }
    tl__log(c, TL_LOG_TRACE, "rdma to rank %d: %s port %d, peer device %s", l->peer,
            rl->port.dev, rl->port.port, pi.dev);
    return tl__boot_xfer(c, l, fd, &ans, sizeof ans, 1, c->deadline_ns);
  }
  if (phase == 2) {
    rtr_answer_t pa;
    int rc = tl__boot_xfer(c, l, fd, &pa, sizeof pa, 0, c->deadline_ns);
    if (rc) return rc;
    pa.why[sizeof pa.why - 1] = 0;
    if (pa.magic != INFO_MAGIC)
      return tl__error(c, TL_ERR_PROTOCOL, "rank %d (%s) sent a malformed RDMA answer",
                       l->peer, l->remote);
    if (rl->status)
      return tl__error(c, fail_status(c), "rdma to rank %d: %s", l->peer, rl->why);
    if (pa.status)
      return tl__error(c, fail_status(c), "rdma to rank %d: rank %d cannot: %s", l->peer,
                       l->peer, pa.why);
    if (to_rts(rl)) return tl__error(c, TL_ERR_SYSTEM, "rdma to rank %d: %s", l->peer, rl->why);
    return make_channels(c, l);
  }
  return TL_OK;
}

/* ---- the data path ------------------------------------------------------------- */

enum { RDV_NONE = 0, RDV_WAIT = 1, RDV_GO = 2 };

/* Record a verbs failure on the channel's communicator (it fails). */
static int chan_fail(rdma_chan_t *rc, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int chan_fail(rdma_chan_t *rc, int err, const char *fmt, ...) {
  tl_link_t *l = rc->ch->link;
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (!rc->failed) {
    rc->failed = -err;
    /* While the link closes (rdma_close drains its last sends: a peer that
     * left first fails them), the channel just stops: failing the
     * communicator then would abort channels already closed. */
    if (rc->closing) return rc->failed;
    tl__fail(l->comm, err == EPROTO ? TL_ERR_PROTOCOL : TL_ERR_PEER,
             "rdma to rank %d (%s port %d, %s channel %d): %s", l->peer, rc->rl->port.dev,
             rc->rl->port.port, qpt_name(rc->rl->qpt), rc->index, msg);
  }
  return rc->failed;
}

static tl_stats_t *stats_of(rdma_chan_t *rc) { return &rc->ch->link->comm->stats; }

static int post_send(rdma_chan_t *rc, uint64_t wr_id, char *buf, size_t len) {
  struct ibv_sge sge = {(uint64_t)(uintptr_t)buf, (uint32_t)len, rc->rl->mr->lkey};
  struct ibv_send_wr wr, *bad = NULL;
  memset(&wr, 0, sizeof wr);
  wr.wr_id = wr_id;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  wr.send_flags = IBV_SEND_SIGNALED;
  rc->last_tx_ns = tl__now_ns();
  int e = ibv_post_send(rc->qp, &wr, &bad);
  if (e) return chan_fail(rc, e, "ibv_post_send: %s", strerror(e));
  return 0;
}

/* A control message: how many of the peer's messages this side consumed
 * (and how many it sent), with a body (CTS, NACK). Every control message
 * carries the counts, so any of them pays a credit owed. */
static int send_ctl(rdma_chan_t *rc, uint32_t kind, const void *body, size_t n) {
  int answer = kind == KIND_CTS || kind == KIND_NACK;
  if (!rc->nctl_free) {
    if (answer) rc->ans_due = 1; else rc->credit_due = 1; /* when a slot comes back */
    return 0;
  }
  rc->credit_due = 0;
  if (answer) rc->ans_due = 0;
  int slot = rc->ctl_free[--rc->nctl_free];
  char *b = rc->ctl + (size_t)slot * CTL_BYTES;
  msg_hdr_t h = {MSG_MAGIC | kind << 24, rc->tx_seq, rc->rx_next, (uint32_t)n};
  memcpy(b, &h, HDR);
  if (n) memcpy(b + HDR, body, n);
  rc->rx_reported = rc->rx_next;
  return post_send(rc, WR_TX_CTL | (uint64_t)slot, b, HDR + n);
}

static int send_credit_kind(rdma_chan_t *rc, uint32_t kind) { return send_ctl(rc, kind, NULL, 0); }

static int send_credit(rdma_chan_t *rc) { return send_credit_kind(rc, KIND_CREDIT); }

/* The answer to the peer's latest RTS (again, when it probes: the first may
 * be lost on UC). */
static int send_answer(rdma_chan_t *rc) {
  return send_ctl(rc, rc->ans_kind, &rc->ans, sizeof rc->ans);
}

/* Sends complete in stream order: bytes count as moved up to the first
 * message not complete (a write may finish after later sends). */
static void tx_advance(rdma_chan_t *rc) {
  while (rc->tx_done_seq != rc->tx_seq && rc->tx_isdone[rc->tx_done_seq % WINDOW]) {
    uint32_t i = rc->tx_done_seq % WINDOW;
    rc->tx_completed += rc->tx_bytes[i];
    rc->tx_isdone[i] = 0;
    rc->tx_done_seq++;
  }
}

/* Room for one more data message (or write) in flight. */
static int tx_room(const rdma_chan_t *rc) {
  return rc->tx_seq - rc->tx_acked < WINDOW && rc->tx_seq - rc->tx_done_seq < WINDOW;
}

/* The peer answered CTS: write the rendezvous' bytes straight from the
 * sender's buffer into the peer's, as the next message of the stream (the
 * immediate carries its sequence number; it takes one of the peer's
 * receives, as a SEND would). */
static int post_write(rdma_chan_t *rc) {
  uint32_t seq = rc->tx_seq, i = seq % WINDOW;
  struct ibv_sge sge = {(uint64_t)(uintptr_t)rc->rdv_src, (uint32_t)rc->rdv_len,
                        rc->rdv_mr->mr->lkey};
  struct ibv_send_wr wr, *bad = NULL;
  memset(&wr, 0, sizeof wr);
  wr.wr_id = WR_TX_WRITE | (uint64_t)i;
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_RDMA_WRITE_WITH_IMM;
  wr.send_flags = IBV_SEND_SIGNALED;
  wr.imm_data = htonl(seq);
  wr.wr.rdma.remote_addr = rc->rdv_raddr;
  wr.wr.rdma.rkey = rc->rdv_rkey;
  rc->tx_bytes[i] = (uint32_t)rc->rdv_len;
  rc->tx_isdone[i] = 0;
  rc->tx_mr[i] = rc->rdv_mr;
  rc->rdv_mr = NULL;
  rc->rdv = RDV_NONE;
  rc->last_tx_ns = tl__now_ns();
  int e = ibv_post_send(rc->qp, &wr, &bad);
  if (e) return chan_fail(rc, e, "ibv_post_send (RDMA write): %s", strerror(e));
  rc->tx_seq++;
  stats_of(rc)->zcopy_sent++;
  stats_of(rc)->zcopy_sent_bytes += rc->rdv_len;
  return 0;
}

/* The peer's answer to this side's RTS (a duplicate, or one for an RTS
 * answered already, is ignored). */
static void got_answer(rdma_chan_t *rc, uint32_t kind, const cts_body_t *b) {
  if (rc->rdv != RDV_WAIT || b->rts_seq != rc->rdv_seq) return;
  if (kind == KIND_CTS) {
    rc->rdv = RDV_GO;
    rc->rdv_raddr = b->addr;
    rc->rdv_rkey = b->rkey;
    return;
  }
  /* The peer cannot take them in place: the same bytes go through the
   * slots, next in the stream (nothing was posted after the RTS). */
  rc->rdv = RDV_NONE;
  rc->tx_unreported -= rc->rdv_len;
  rc->stream_left = rc->rdv_len;
  mr_put(rc->rdv_mr);
  rc->rdv_mr = NULL;
  rc->tx_more = 1;
  stats_of(rc)->zcopy_staged++;
}

/* A data message (or write) with sequence number seq is in slot. */
static int got_data(rdma_chan_t *rc, int slot, uint32_t seq, uint32_t kind, uint32_t len) {
  uint32_t d = seq - rc->rx_next;
  if (d >= WINDOW || rc->ready[seq % WINDOW] >= 0)
    return chan_fail(rc, EPROTO, "message %u arrived while %u was expected next (window %d)",
                     seq, rc->rx_next, WINDOW);
  rc->ready[seq % WINDOW] = (int)slot;
  rc->rx_len[slot] = len;
  rc->rx_kind[slot] = (uint8_t)kind;
  /* A message after an RTS: the peer heard the answer. */
  if (rc->ans_kind && (int32_t)(seq - rc->ans.rts_seq) > 0) rc->ans_kind = 0;
  rc->probes = 0;
  if (rc->gone_since) rc->gone_since = tl__now_ns(); /* still arriving */
  if (d > 0 && rc->ready[rc->rx_next % WINDOW] < 0 && !rc->gap_since) rc->gap_since = tl__now_ns();
  return 0;
}

static int got_write(rdma_chan_t *rc, int slot, uint32_t bytes, uint32_t seq) {
  if (!rc->wr_on || seq != rc->wr_seq || bytes != rc->wr_len)
    return chan_fail(rc, EPROTO, "an RDMA write of %u B arrived as message %u, which this "
                     "side did not ask for (it expects %s%u)", bytes, seq,
                     rc->wr_on ? "one as message " : "none; ", rc->wr_on ? rc->wr_seq : 0);
  return got_data(rc, slot, seq, KIND_WRITE, bytes);
}

static int got_message(rdma_chan_t *rc, int slot, uint32_t bytes) {
  msg_hdr_t h;
  if (bytes < HDR || bytes > SLOT)
    return chan_fail(rc, EPROTO, "a message of %u bytes arrived (a thunderlink message has "
                     "%zu to %zu)", bytes, HDR, SLOT);
  const char *m = rc->rx + (size_t)slot * SLOT;
  memcpy(&h, m, HDR);
  uint32_t kind = h.magic_kind >> 24;
  size_t body = kind == KIND_RTS ? sizeof(rts_body_t)
                : kind == KIND_CTS || kind == KIND_NACK ? sizeof(cts_body_t) : 0;
  if ((h.magic_kind & 0xffffff) != MSG_MAGIC || kind < KIND_DATA || kind > KIND_NACK ||
      h.len != bytes - HDR || (kind != KIND_DATA && h.len != body))
    return chan_fail(rc, EPROTO, "a message that is not thunderlink's arrived; the stream is "
                     "corrupt");
  /* Credits: cumulative, so a later count supersedes a lost or late one. */
  uint32_t adv = h.ack - rc->tx_acked;
  if ((int32_t)adv > 0) {
    if (adv > rc->tx_seq - rc->tx_acked)
      return chan_fail(rc, EPROTO, "the peer reports %u messages consumed, %u were sent",
                       h.ack, rc->tx_seq);
    rc->tx_acked = h.ack;
  }
  rc->probes = 0; /* the peer is heard from */
  if (kind != KIND_DATA && kind != KIND_RTS) {
    cts_body_t b;
    memset(&b, 0, sizeof b);
    if (body) memcpy(&b, m + HDR, sizeof b);
    int e = post_recv(rc->rl, rc, slot);
    if (e) return chan_fail(rc, e, "ibv_post_recv: %s", strerror(e));
    /* The peer has sent h.seq data messages, all before this one on the
     * same queue pair (which keeps order): one not here is lost. */
    uint32_t sent = h.seq - rc->rx_next;
    if (sent > WINDOW)
      return chan_fail(rc, EPROTO, "the peer reports %u messages sent, %u were consumed (window %d)",
                       h.seq, rc->rx_next, WINDOW);
    if (sent > 0 && rc->ready[rc->rx_next % WINDOW] < 0 && !rc->gap_since) rc->gap_since = tl__now_ns();
    if (body) got_answer(rc, kind, &b);
    if (kind != KIND_PROBE) return 0;
    return rc->ans_kind ? send_answer(rc) : send_credit(rc);
  }
  if (kind == KIND_DATA) {
    if (h.len == 0) return chan_fail(rc, EPROTO, "an empty data message arrived");
    return got_data(rc, slot, h.seq, KIND_DATA, h.len);
  }
  rts_body_t r;
  memcpy(&r, m + HDR, sizeof r);
  if (!rc->rl->zcopy || !r.len || r.len > RDV_MAX)
    return chan_fail(rc, EPROTO, "a rendezvous of %llu B arrived (%s)", (unsigned long long)r.len,
                     rc->rl->zcopy ? "more than a rendezvous carries" : "zero copy is off on this link");
  return got_data(rc, slot, h.seq, KIND_RTS, (uint32_t)r.len);
}

/* Take every completion the CQ holds. 0, or -errno after recording why. */
static int drain(rdma_chan_t *rc) {
  if (rc->failed) return rc->failed;
  struct ibv_wc wc[16];
  for (;;) {
    int n = ibv_poll_cq(rc->cq, 16, wc);
    if (n < 0) return chan_fail(rc, EIO, "ibv_poll_cq failed (%d)", n);
    for (int i = 0; i < n; i++) {
      uint64_t kind = wc[i].wr_id & ~(uint64_t)0xffffffff;
      int slot = (int)(wc[i].wr_id & 0xffffffff);
      if (wc[i].status != IBV_WC_SUCCESS) {
        if (peer_gone(rc->ch)) return rc->failed = -EPIPE;
        return chan_fail(rc, EIO, "%s failed: %s (status %d, vendor error 0x%x)%s",
                         kind == WR_RX ? "a receive" : kind == WR_TX_WRITE ? "a zero-copy RDMA write"
                                                                          : "a send",
                         status_str(rc->rl->api, wc[i].status), (int)wc[i].status,
                         wc[i].vendor_err,
                         wc[i].status == IBV_WC_RNR_RETRY_EXC_ERR ||
                                 wc[i].status == IBV_WC_RETRY_EXC_ERR
                             ? "; the peer stopped receiving or the cable is down" : "");
      }
      if (kind == WR_TX_DATA && slot < WINDOW) {
        rc->tx_free[rc->ntx_free++] = slot;
        rc->tx_isdone[rc->tx_slot_seq[slot] % WINDOW] = 1;
        tx_advance(rc);
        if (rc->gone_since) rc->gone_since = tl__now_ns(); /* still completing */
      } else if (kind == WR_TX_WRITE && slot < WINDOW) {
        rc->tx_isdone[slot] = 1;
        mr_put(rc->tx_mr[slot]);
        rc->tx_mr[slot] = NULL;
        tx_advance(rc);
        if (rc->gone_since) rc->gone_since = tl__now_ns();
      } else if (kind == WR_TX_CTL && slot < NCTL) {
        rc->ctl_free[rc->nctl_free++] = slot;
        int e = rc->ans_due && rc->ans_kind ? send_answer(rc) : rc->credit_due ? send_credit(rc) : 0;
        if (e) return e;
      } else if (kind == WR_RX && slot < NRECV) {
        int e = wc[i].opcode == IBV_WC_RECV_RDMA_WITH_IMM
                    ? got_write(rc, slot, wc[i].byte_len, ntohl(wc[i].imm_data))
                    : got_message(rc, slot, wc[i].byte_len);
        if (e) return e;
      } else {
        return chan_fail(rc, EPROTO, "a completion with an unknown wr_id 0x%llx",
                         (unsigned long long)wc[i].wr_id);
      }
    }
    if (n < 16) break;
  }
  if (rc->rdv == RDV_GO && tx_room(rc)) {
    int e = post_write(rc);
    if (e) return e;
  }
  if (rc->gap_since) {
    if (rc->ready[rc->rx_next % WINDOW] >= 0) {
      rc->gap_since = 0;
    } else if (tl__now_ns() - rc->gap_since > LOST_NS) {
      char what[96] = "";
      if (rc->wr_on && rc->rx_next == rc->wr_seq)
        snprintf(what, sizeof what, " (the zero-copy RDMA write of %zu B)", rc->wr_len);
      return chan_fail(rc, EIO, "message %u%s was lost: the peer sent it (a later message or "
                       "its count says so) and it did not arrive within %.1f s (%s queue pairs "
                       "do not retransmit)", rc->rx_next, what,
                       (double)LOST_NS / 1e9, qpt_name(rc->rl->qpt));
    }
  }
  /* Data the peer has not reported consumed, or an RTS it has not answered,
   * and a quiet queue pair: ask (see "Loss" above). The core's wait wakes
   * at least once a second. */
  if (!rc->gap_since && !rc->closing && (rc->tx_seq != rc->tx_acked || rc->rdv == RDV_WAIT) &&
      rc->probes < MAX_PROBES && rc->nctl_free && tl__now_ns() - rc->last_tx_ns > PROBE_NS) {
    rc->probes++;
    return send_credit_kind(rc, KIND_PROBE);
  }
  return 0;
}

/* Nothing more will come from the peer: it is gone, and the grace for its
 * last messages is over. */
static int drained_gone(rdma_chan_t *rc) {
  if (!peer_gone(rc->ch)) return 0;
  int64_t now = tl__now_ns();
  if (!rc->gone_since) rc->gone_since = now;
  return now - rc->gone_since > GONE_GRACE_NS;
}

static int can_send(const rdma_chan_t *rc) {
  return rc->rdv == RDV_NONE && rc->ntx_free > 0 && tx_room(rc);
}

/* Post a message from send slot `slot` (header written by the caller). */
static int post_data(rdma_chan_t *rc, int slot, size_t len, uint32_t stream_bytes) {
  uint32_t i = rc->tx_seq % WINDOW;
  rc->tx_slot_seq[slot] = rc->tx_seq;
  rc->tx_bytes[i] = stream_bytes;
  rc->tx_isdone[i] = 0;
  rc->tx_mr[i] = NULL;
  int e = post_send(rc, WR_TX_DATA | (uint64_t)slot, rc->tx + (size_t)slot * SLOT, HDR + len);
  if (e) return e;
  rc->tx_seq++;
  rc->rx_reported = rc->rx_next;
  return 0;
}

static long rdma_send(tl_chan_t *ch, const struct iovec *iov, int n) {
  rdma_chan_t *rc = ch->t;
  int e = drain(rc);
  if (e) return e;
  if (peer_gone(ch)) {
    /* The peer may have left right after taking our last bytes: their
     * completions can still be on the way. Nothing new is posted. */
    if (rc->tx_completed) {
      long moved = (long)rc->tx_completed;
      rc->tx_unreported -= rc->tx_completed;
      rc->tx_completed = 0;
      return moved;
    }
    return rc->tx_unreported && !drained_gone(rc) ? 0 : -EPIPE;
  }
  /* The first tx_unreported bytes of iov are posted already (the core
   * offers the same bytes until this reports them moved). */
  size_t skip = rc->tx_unreported;
  int i = 0;
  size_t off = 0;
  while (i < n && skip >= iov[i].iov_len - off) skip -= iov[i].iov_len - off, i++;
  off += skip;
  size_t zc = rc->rl->zcopy;
  while (i < n && can_send(rc)) {
    size_t rest = iov[i].iov_len - off;
    if (zc && !rc->stream_left && rest >= zc) {
      /* Large: a rendezvous (see "Zero copy"), from a registered source. */
      size_t len = tl__min(rest, rc->rl->max_msg);
      const char *src = (const char *)iov[i].iov_base + off;
      mr_entry_t *mr = mr_get(rc->rl, src, len, 0);
      if (mr) {
        int slot = rc->tx_free[--rc->ntx_free];
        char *b = rc->tx + (size_t)slot * SLOT;
        rts_body_t body = {len};
        msg_hdr_t h = {MSG_MAGIC | KIND_RTS << 24, rc->tx_seq, rc->rx_next, sizeof body};
        memcpy(b, &h, HDR);
        memcpy(b + HDR, &body, sizeof body);
        rc->rdv = RDV_WAIT;
        rc->rdv_seq = rc->tx_seq;
        rc->rdv_src = src;
        rc->rdv_len = len;
        rc->rdv_mr = mr;
        if ((e = post_data(rc, slot, sizeof body, 0))) return e;
        rc->tx_unreported += len;
        off += len;
        if (off == iov[i].iov_len) i++, off = 0;
        break; /* nothing more until the peer answers */
      }
      rc->stream_left = len; /* no region to be had: through the slots */
      stats_of(rc)->zcopy_staged++;
    }
    int slot = rc->tx_free[--rc->ntx_free];
    char *b = rc->tx + (size_t)slot * SLOT;
    size_t len = 0;
    while (i < n && len < SLOT - HDR) {
      size_t r = iov[i].iov_len - off;
      if (zc && !rc->stream_left && r >= zc) break; /* a rendezvous: a message of its own */
      size_t m = tl__min(r, SLOT - HDR - len);
      if (rc->stream_left) {
        m = tl__min(m, rc->stream_left);
        rc->stream_left -= m;
      }
      memcpy(b + HDR + len, (const char *)iov[i].iov_base + off, m);
      len += m;
      off += m;
      if (off == iov[i].iov_len) i++, off = 0;
    }
    if (!len) {
      rc->tx_free[rc->ntx_free++] = slot;
      if (i < n) continue; /* the next bytes start a rendezvous */
      break;
    }
    msg_hdr_t h = {MSG_MAGIC | KIND_DATA << 24, rc->tx_seq, rc->rx_next, (uint32_t)len};
    memcpy(b, &h, HDR);
    if ((e = post_data(rc, slot, len, (uint32_t)len))) return e;
    rc->tx_unreported += len;
  }
  /* Bytes count as moved once their send completed (on RC: the peer has
   * them), in order: a queue pair dies with its process, so a rank that
   * leaves right after a collective must not leave its last bytes behind;
   * and the core reuses a buffer once its bytes are reported, so a write
   * from it must have finished. */
  rc->tx_more = i < n;
  long moved = (long)rc->tx_completed;
  rc->tx_unreported -= rc->tx_completed;
  rc->tx_completed = 0;
  return moved;
}

/* A message consumed to its end: post its receive again, owe a credit. */
static int release(rdma_chan_t *rc) {
  int slot = rc->ready[rc->rx_next % WINDOW];
  rc->ready[rc->rx_next % WINDOW] = -1;
  if (rc->rx_kind[slot] == KIND_WRITE) {
    stats_of(rc)->zcopy_received++;
    stats_of(rc)->zcopy_received_bytes += rc->wr_len;
    mr_put(rc->wr_mr);
    rc->wr_mr = NULL;
    rc->wr_on = 0;
  }
  rc->rx_next++;
  rc->rx_off = 0;
  int e = post_recv(rc->rl, rc, slot);
  if (e) return chan_fail(rc, e, "ibv_post_recv: %s", strerror(e));
  if (rc->rx_next - rc->rx_reported >= WINDOW / 2) return send_credit(rc);
  return 0;
}

/* The RTS at the head of the stream: take its bytes in place at dest
 * (registered through the cache), or, with dest NULL or no region to be
 * had, ask for them through the slots; the RTS is consumed either way. */
static int rdv_answer(rdma_chan_t *rc, char *dest) {
  int slot = rc->ready[rc->rx_next % WINDOW];
  uint32_t rts = rc->rx_next;
  size_t len = rc->rx_len[slot];
  mr_entry_t *mr = dest ? mr_get(rc->rl, dest, len, 1) : NULL;
  memset(&rc->ans, 0, sizeof rc->ans);
  rc->ans.rts_seq = rts;
  if (mr) {
    rc->wr_on = 1;
    rc->wr_seq = rts + 1; /* the sender posts nothing between the RTS and the write */
    rc->wr_dest = dest;
    rc->wr_len = len;
    rc->wr_mr = mr;
    rc->ans_kind = KIND_CTS;
    rc->ans.rkey = mr->mr->rkey;
    rc->ans.addr = (uint64_t)(uintptr_t)dest;
  } else {
    rc->ans_kind = KIND_NACK;
    stats_of(rc)->zcopy_staged++;
  }
  int e = release(rc);
  return e ? e : send_answer(rc);
}

/* Where the message in slot keeps its bytes. */
static const char *rx_bytes(const rdma_chan_t *rc, int slot) {
  return rc->rx_kind[slot] == KIND_WRITE ? rc->wr_dest : rc->rx + (size_t)slot * SLOT + HDR;
}

static void rdma_consume(tl_chan_t *ch, size_t n) {
  rdma_chan_t *rc = ch->t;
  while (n) {
    int slot = rc->ready[rc->rx_next % WINDOW];
    if (slot < 0 || rc->rx_kind[slot] == KIND_RTS) return; /* the core consumes only what it saw */
    size_t m = tl__min(n, rc->rx_len[slot] - rc->rx_off);
    rc->rx_off += m;
    n -= m;
    if (rc->rx_off == rc->rx_len[slot] && release(rc)) return;
  }
}

static long rdma_recv(tl_chan_t *ch, const struct iovec *iov, int n, int peek) {
  rdma_chan_t *rc = ch->t;
  int e = drain(rc);
  if (e) return e;
  size_t moved = 0, off = rc->rx_off;
  uint32_t seq = rc->rx_next;
  for (int i = 0; i < n; i++) {
    size_t done = 0;
    while (done < iov[i].iov_len) {
      int slot = rc->ready[seq % WINDOW];
      if (slot < 0 || seq - rc->rx_next >= WINDOW) goto out;
      char *dst = (char *)iov[i].iov_base + done;
      if (rc->rx_kind[slot] == KIND_RTS) {
        /* Answered at the head of the stream, by a read that takes the
         * bytes: in place if this destination holds them all. */
        if (peek || moved || seq != rc->rx_next) goto out;
        e = rdv_answer(rc, iov[i].iov_len - done >= rc->rx_len[slot] ? dst : NULL);
        if (e) return e;
        seq = rc->rx_next;
        off = 0;
        continue;
      }
      size_t m = tl__min(iov[i].iov_len - done, rc->rx_len[slot] - off);
      const char *src = rx_bytes(rc, slot) + off;
      if (src != dst) memmove(dst, src, m); /* a write landed where it belongs: no copy */
      done += m;
      moved += m;
      off += m;
      if (off == rc->rx_len[slot]) seq++, off = 0;
    }
  }
out:
  if (!moved) return rc->failed ? rc->failed : drained_gone(rc) ? -EPIPE : 0;
  if (!peek) rdma_consume(ch, moved);
  return rc->failed ? rc->failed : (long)moved;
}

/* Reduce-on-receive (progress.c's reduce_some) reads in place. An RTS at
 * the head is taken into the receive's own buffer when that buffer is not
 * the other operand (an out-of-place all_reduce): the reduction then runs
 * in place there, dst = dst op other. */
static long rdma_view(tl_chan_t *ch, const char **p) {
  rdma_chan_t *rc = ch->t;
  int e = drain(rc);
  if (e) return e;
  int slot = rc->ready[rc->rx_next % WINDOW];
  if (slot >= 0 && rc->rx_kind[slot] == KIND_RTS) {
    const tl_slice_t *s = ch->rq;
    const size_t H = sizeof(tl_frame_t), len = rc->rx_len[slot];
    char *dest = NULL;
    if (s && s->other && s->done >= H) {
      size_t pdone = s->done - H, es = tl_dtype_size(s->dtype);
      char *d = s->buf + pdone;
      const char *o = s->other + pdone;
      if (es && pdone % es == 0 && len % es == 0 && s->len - pdone >= len &&
          (d + len <= o || o + len <= d))
        dest = d;
    }
    if ((e = rdv_answer(rc, dest))) return e;
    slot = rc->ready[rc->rx_next % WINDOW];
  }
  if (slot < 0) return drained_gone(rc) ? -EPIPE : 0;
  *p = rx_bytes(rc, slot) + rc->rx_off;
  return (long)(rc->rx_len[slot] - rc->rx_off);
}

static int ready_now(rdma_chan_t *rc, int want_in, int want_out) {
  if (rc->failed || peer_gone(rc->ch)) return 1;
  if (want_in && rc->ready[rc->rx_next % WINDOW] >= 0) return 1;
  if (want_out && (rc->tx_completed || (rc->tx_more && can_send(rc)))) return 1;
  return 0;
}

static int rdma_arm(tl_chan_t *ch, int want_in, int want_out, struct pollfd *pfd) {
  rdma_chan_t *rc = ch->t;
  pfd->fd = -1;
  drain(rc);
  if (ready_now(rc, want_in, want_out)) return 1;
  /* No completion channel (the provider has none): poll again soon. */
  if (!rc->cc || ibv_req_notify_cq(rc->cq, 0)) return TL_ARM_SOON;
  /* A completion that came before the request raises no event. */
  drain(rc);
  if (ready_now(rc, want_in, want_out)) return 1;
  /* Waiting for a lost message's successor: wake in time to call it lost. */
  if (rc->gap_since) return TL_ARM_SOON;
  pfd->fd = rc->cc->fd;
  pfd->events = POLLIN;
  rc->armed = 1;
  tl__log(ch->link->comm, TL_LOG_TRACE, "rdma to rank %d channel %d sleeps (%s%s): sent %u, "
          "acked %u, free slots %d+%d, read %u, credit due %d", ch->link->peer, rc->index,
          want_in ? "in" : "", want_out ? "out" : "", rc->tx_seq, rc->tx_acked, rc->ntx_free,
          rc->nctl_free, rc->rx_next, rc->credit_due);
  return 0;
}

static void rdma_disarm(tl_chan_t *ch) {
  rdma_chan_t *rc = ch->t;
  if (!rc->armed) return;
  rc->armed = 0;
  struct ibv_cq *cq;
  void *ctx;
  while (rc->rl->api->get_cq_event(rc->cc, &cq, &ctx) == 0) rc->events++;
  if (rc->events >= 64) {
    rc->rl->api->ack_cq_events(rc->cq, rc->events);
    rc->events = 0;
  }
}

/* The notice goes over the control channel (see tl__abort_all). */
static void rdma_abort(tl_chan_t *ch, const tl_frame_t *f, const char *why, size_t len) {}

/* Sends posted but not complete would die with the queue pair: a rank that
 * leaves right after its last collective must not take its last bytes with
 * it (a TCP socket's kernel buffer outlives the process; a queue pair does
 * not). Wait for them, a bounded time, unless the link failed. */
#define CLOSE_WAIT_NS ((int64_t)5000000000)

static void rdma_close(tl_chan_t *ch) {
  rdma_chan_t *rc = ch->t;
  ch->t = NULL; /* the state is freed with the link */
  if (!rc || rc->failed || peer_gone(ch)) return;
  rc->closing = 1;
  int64_t until = tl__now_ns() + CLOSE_WAIT_NS;
#define BUSY (rc->ntx_free < WINDOW || rc->nctl_free < NCTL || rc->tx_done_seq != rc->tx_seq)
  while (BUSY && tl__now_ns() < until) {
    if (drain(rc)) return;
    if (BUSY) {
      struct timespec ts = {0, 100000};
      nanosleep(&ts, NULL);
    }
  }
#undef BUSY
}

/* The call ended: its buffers' registrations go (see "Registration cache":
 * the program may free that memory next). Nothing holds them on a healthy
 * link (every write of the call has completed, every one into it has been
 * consumed); after a failure they go all the same, so that no write of the
 * peer lands in memory the call no longer owns (the peer's fails instead). */
static void rdma_op_end(tl_link_t *l) {
  rdma_link_t *rl = l->t;
  if (!rl) return;
  int failed = l->comm->status != 0;
  if (failed)
    for (int k = 0; k < RDMA_STREAMS; k++) {
      rdma_chan_t *rc = &rl->ch[k];
      rc->rdv_mr = rc->wr_mr = NULL;
      rc->wr_on = 0;
      memset(rc->tx_mr, 0, sizeof rc->tx_mr);
    }
  for (mr_entry_t **pp = &rl->mrs; *pp;) {
    if (!(*pp)->declared && (!(*pp)->refs || failed)) mr_drop(rl, pp);
    else pp = &(*pp)->next;
  }
}

/* tl_comm_register_memory: a region kept across calls (the caller promised
 * not to free the memory while it is registered). Counted once per
 * register call, so that registering twice needs two deregisters. */
static int rdma_register_memory(tl_link_t *l, void *addr, size_t len, int add) {
  rdma_link_t *rl = l->t;
  if (!rl || !rl->pd || !rl->zcopy) return TL_OK; /* zero copy is off: nothing to keep */
  for (mr_entry_t **pp = &rl->mrs; *pp; pp = &(*pp)->next) {
    mr_entry_t *e = *pp;
    if (!e->declared || e->daddr != addr || e->dlen != len) continue;
    if (add) e->declared++;
    else if (e->declared > 1) e->declared--;
    else mr_drop(rl, pp);
    return TL_OK;
  }
  if (!add) return TL_ERR_INVALID;
  mr_entry_t *e = calloc(1, sizeof *e);
  if (!e) return tl__error(l->comm, TL_ERR_NOMEM, "out of memory");
  unsigned access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE;
  uintptr_t lo = (uintptr_t)addr, hi = lo + len;
  struct ibv_mr *mr = reg_pages(rl, lo, hi, access);
  if (!mr) {
    access = 0; /* read-only memory: it can still be sent from */
    mr = reg_pages(rl, lo, hi, access);
  }
  if (!mr) {
    int err = errno;
    free(e);
    return tl__error(l->comm, err == ENOMEM ? TL_ERR_CONFIG : TL_ERR_SYSTEM,
                     "register_memory: rdma to rank %d: ibv_reg_mr of %zu B at %p on %s: %s%s",
                     l->peer, len, addr, rl->port.dev, strerror(err),
                     err == ENOMEM ? " (the device's memory regions are used up: Apple's allow "
                                     "about 100; or raise the locked-memory limit: ulimit -l)"
                     : err == EFAULT ? " (the range is not mapped memory)" : "");
  }
  mr_insert(rl, e, mr, lo, hi, access);
  e->declared = 1;
  e->daddr = addr;
  e->dlen = len;
  l->comm->stats.mr_registered++;
  return TL_OK;
}

const tl_transport_ops_t tl__rdma_ops = {
    .name = "rdma",
    .id = TL_TRANSPORT_RDMA,
    .spin_factor = 1,
    .wake_fd = 1,
    .available = rdma_available,
    .setup = rdma_setup,
    .send = rdma_send,
    .recv = rdma_recv,
    .view = rdma_view,
    .consume = rdma_consume,
    .arm = rdma_arm,
    .disarm = rdma_disarm,
    .abort = rdma_abort,
    .close = rdma_close,
    .close_link = rdma_close_link,
    .op_end = rdma_op_end,
    .register_memory = rdma_register_memory,
};
