/*
 * softverbs: a software ibverbs provider, for testing RDMA code on machines
 * without RDMA hardware.
 *
 * It is a shared library that exports the verbs a dlopen-based user looks
 * up (ibv_get_device_list ... ibv_destroy_qp) and fills the context's op
 * table with post_send, post_recv, poll_cq and req_notify_cq, so a program
 * that dlopens it instead of libibverbs.so.1 / librdma.dylib runs unchanged.
 * Queue pairs of separate processes on one machine talk to each other; the
 * "wire" is one Unix stream socket per queue pair and direction.
 *
 * What it models, and enforces (a violation is the error real verbs give,
 * never a crash, an abort or a print):
 *   - Devices: one per IPv4 address of the host's interfaces that are up
 *     (named sv_<ifname>), or those listed in SOFTVERBS_DEVICES. Port 1,
 *     RoCE (link layer Ethernet, a GRH is required). GID table: index 0 is
 *     fe80::<ipv4>, index 1 is ::ffff:<ipv4>, indexes 2-3 are empty.
 *   - QP types RC and UC (UD, SRQ, RDMA READ and atomics: EOPNOTSUPP or
 *     EINVAL). A device can be UC only, as Apple's are: creating an RC QP
 *     then fails with EOPNOTSUPP.
 *   - The QP state machine RESET -> INIT -> RTR -> RTS (and any -> RESET,
 *     any -> ERR), with the attribute masks the IB spec requires and allows
 *     per transition and QP type; anything else is EINVAL.
 *   - Addressing by (dgid, dest_qp_num); a connection from any other QP is
 *     dropped. The first message must carry the responder's rq_psn, and PSNs
 *     advance by the packets of each message (path MTU).
 *   - Memory keys: lkey and rkey (distinct random values), protection
 *     domain, access flags and bounds are checked when the data moves, so a
 *     key used after ibv_dereg_mr fails; ibv_dereg_mr waits for a transfer
 *     in progress to step off the region. Buffers are read when transmitted,
 *     not when posted (except IBV_SEND_INLINE).
 *   - RC: a message that finds no receive waits for one for the RNR window
 *     (responder's min_rnr_timer x requester's rnr_retry + 1; 7 is forever)
 *     and then fails IBV_WC_RNR_RETRY_EXC_ERR; a bad rkey is
 *     IBV_WC_REM_ACCESS_ERR; a peer that is gone, or that does not reach
 *     RTR, is IBV_WC_RETRY_EXC_ERR after (retry_cnt + 1) x 4.096 us x
 *     2^timeout (timeout 0: forever, as on hardware). The first error moves
 *     the QP to ERR and flushes every outstanding WR (IBV_WC_WR_FLUSH_ERR).
 *   - UC: a SEND or WRITE_WITH_IMM that finds no receive, a bad rkey, a PSN
 *     out of sequence, a responder not in RTR/RTS or a peer that is gone:
 *     the message is dropped and the sender still completes successfully.
 *     (Whether Apple's UC drops a message that finds no receive, as the IB
 *     spec says, or holds it, is not documented; JACCL's own examples need
 *     it held. SOFTVERBS_UC_NORECV=wait models that: the message waits for
 *     a receive, forever.)
 *   - Resource limits as Apple's devices have them: 10 QPs per device (the
 *     next ibv_create_qp fails with EBUSY) and 100 memory regions (ENOMEM).
 *   - Queue limits: posting past max_send_wr / max_recv_wr is ENOMEM; a
 *     slot is free again only once the completion of its WR, or of a later
 *     signaled WR of the same queue, has been polled (so unsignaled WRs hold
 *     slots). A CQ that overflows enters an error state: ibv_poll_cq returns
 *     -1 (errno EOVERFLOW) from then on, and the QPs that complete into it
 *     move to ERR.
 *   - Completion channels: a pipe; ibv_req_notify_cq arms the CQ for the
 *     next completion added to it; ibv_get_cq_event reads the event;
 *     ibv_destroy_cq with events not acknowledged is EBUSY (rdma-core would
 *     block forever there).
 *   - Teardown: ibv_dealloc_pd, ibv_destroy_cq and ibv_destroy_comp_channel
 *     of an object still in use are EBUSY.
 *   - Jitter (SOFTVERBS_JITTER_US=N): each WR is transmitted up to N us
 *     after it was posted and each completion is delivered up to N us late,
 *     independently per QP and per queue, so completions of different QPs
 *     (and the send and receive queues of one QP) interleave in any order
 *     verbs allow, while the order within one queue is kept.
 *
 * Not modelled: RDMA READ, atomics, SRQ, UD, memory windows, alternate
 * paths, async events, fork safety, hardware timing and performance.
 *
 * Environment:
 *   SOFTVERBS_DEVICES   name=ipv4[/uc],... : the devices this process sees
 *   SOFTVERBS_UC_ONLY   1: every device offers UC only
 *   SOFTVERBS_JITTER_US delay and reorder, see above (0..1000000)
 *   SOFTVERBS_MAX_MR    memory regions per device (default 100, as Apple's)
 *   SOFTVERBS_MAX_QP    queue pairs per device (default 10, as Apple's; <= 256)
 *   SOFTVERBS_UC_NORECV drop (default) or wait: UC message without a receive
 *   SOFTVERBS_DROP_EVERY N: a lossy link: every Nth message a UC QP transmits
 *                       is lost (the sender completes it successfully, the
 *                       receiver never sees it; later ones arrive). RC QPs
 *                       are unaffected (RC retransmits). 0: none (default)
 *   SOFTVERBS_DROP_WRITES 1: ... counting (and losing) RDMA writes only, so
 *                       that a test can lose a zero-copy write for sure
 *   SOFTVERBS_DROP_AFTER K: ... counting from the Kth message of each QP on,
 *                       so that a set-up exchange can get through (default 0)
 *   SOFTVERBS_NO_COMP_CHANNEL 1: ibv_create_comp_channel fails (ENOSYS), as it
 *                       does in the real libibverbs without a kernel driver:
 *                       a program must poll its completion queues
 *   SOFTVERBS_DIR       directory of the QPs' sockets (/tmp/softverbs-<uid>)
 *   SOFTVERBS_SEED      seed of the jitter's random numbers
 *   SOFTVERBS_LOG       1: say on stderr why a message was dropped or failed;
 *                       2: also every message and completion
 *
 * Threads: one per QP (an event loop over its sockets, non-blocking), from
 * ibv_create_qp to ibv_destroy_qp. Nothing a peer sends makes this library
 * allocate: lengths are checked before data is placed, and a message that
 * cannot be placed is read into a fixed scratch buffer and dropped.
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE
#endif

#include "ibv_abi.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define SV_EXPORT __attribute__((visibility("default")))

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is set on each socket instead */
#endif

enum {
    SV_MAX_DEVICES = 16,
    SV_GID_TBL_LEN = 4,
    SV_MAX_QP = 256,    /* per device at most (one thread each) */
    SV_MAX_QP_WR = 4096,
    SV_MAX_SGE = 8,
    SV_MAX_CQ = 256,
    SV_MAX_CQE = 65536,
    SV_MAX_PD = 64,
    SV_MAX_INLINE = 256,
    SV_MAX_RD_ATOMIC = 16,
    SV_CHUNK = 256 * 1024,     /* bytes moved per system call */
    SV_SCRATCH = 64 * 1024,    /* where dropped payload goes */
    SV_RESP_RING = 64,         /* RC responses waiting to be written */
    SV_MR_BUCKETS = 256,
    SV_SOCKBUF = 4 << 20,
    SV_WIRE_MAGIC = 0x53567662, /* "SVvb" */
    SV_WIRE_VERSION = 1,
};
#define SV_MAX_MSG 0x80000000u /* port max_msg_sz: 2 GiB */
#define SV_PSN_MASK 0xffffffu
#define SV_FOREVER UINT64_MAX

/* ---- wire -------------------------------------------------------------- */

/* First bytes of a connection, requester -> responder. */
struct sv_hello {
    uint32_t magic, version, qp_type, src_qpn, dst_qpn, path_mtu;
    uint8_t src_gid[16], dst_gid[16];
    uint8_t timeout, retry_cnt, rnr_retry, pad;
    uint32_t pad2;
};

/* One message, requester -> responder; its payload follows. */
struct sv_msg {
    uint8_t opcode, solicited, lost, pad; /* lost: SOFTVERBS_DROP_EVERY chose it */
    uint32_t psn, len, imm, rkey, pad2;
    uint64_t raddr, seq;
};

/* RC only, responder -> requester; about the oldest message not answered. */
enum { SV_ACK = 1, SV_RNR_WAIT, SV_NAK_RNR, SV_NAK_ACCESS, SV_NAK_INV_REQ, SV_NAK_REM_OP, SV_NAK_SEQ, SV_NAK_RETRY };
struct sv_resp {
    uint8_t type, pad[3];
    uint32_t psn;
    uint64_t seq;
};

/* ---- objects ----------------------------------------------------------- */

struct sv_device {
    struct ibv_device dev; /* first: the user's pointer is ours */
    union ibv_gid gid[SV_GID_TBL_LEN];
    uint32_t ip; /* network order */
    int uc_only;
    int nqp, nmr; /* in this process, under G.lock */
};

struct sv_ctx {
    struct ibv_context ctx; /* first */
    struct sv_device *dev;
    int async_pipe[2];
    int npd, nmr, ncq, nqp, nchan; /* under G.lock */
};

struct sv_pd {
    struct ibv_pd pd;
    struct sv_ctx *c;
    int refs; /* MRs and QPs, under G.lock */
};

struct sv_mr {
    struct ibv_mr mr;
    struct sv_pd *pd;
    unsigned access;
    int busy; /* transfers in progress, under G.mr_lock */
    struct sv_mr *next_l, *next_r;
};

struct sv_chan {
    struct ibv_comp_channel ch;
    struct sv_ctx *c;
    int wfd;
    int refs; /* CQs, under G.lock */
};

struct sv_qp;

struct sv_cqe {
    struct ibv_wc wc;
    struct sv_qp *qp;
    uint64_t seq;
    int is_send;
};

struct sv_cq {
    struct ibv_cq cq;
    struct sv_ctx *c;
    struct sv_chan *chan;
    pthread_mutex_t lock; /* ring, arming, events */
    struct sv_cqe *ring;
    uint32_t cap, head, count;
    int armed, solicited_only, overrun;
    unsigned events_reported, events_acked;
    int refs; /* QPs, under G.lock */
};

struct sv_swr {
    uint64_t wr_id, seq, due_ns;
    int opcode, nsge;
    unsigned flags;
    uint32_t imm, rkey, len, psn;
    uint64_t raddr;
    int rnr_waiting;
    struct ibv_sge sge[SV_MAX_SGE];
};

struct sv_rwr {
    uint64_t wr_id, seq;
    int nsge;
    struct ibv_sge sge[SV_MAX_SGE];
};

/* A completion waiting out its jitter delay. */
struct sv_pend {
    struct sv_cqe e;
    uint64_t due_ns;
};

struct sv_fifo {
    struct sv_pend *v;
    uint32_t cap, head, count;
    uint64_t last_due;
};

enum { RX_HELLO, RX_HDR, RX_HELD, RX_RNR, RX_PAYLOAD, RX_DISCARD, RX_DRAIN };

struct sv_qp {
    struct ibv_qp qp; /* first */
    struct sv_ctx *c;
    struct sv_pd *pd;
    struct sv_cq *scq, *rcq;
    pthread_mutex_t lock; /* everything below, but for the atomics */
    int type, state;
    uint32_t max_send_wr, max_recv_wr, max_send_sge, max_recv_sge, max_inline;
    int sig_all;

    /* attributes */
    unsigned access;
    int path_mtu;
    union ibv_gid dgid;
    int sgid_index;
    uint32_t dest_qpn, rq_psn, sq_psn;
    uint8_t timeout, retry_cnt, rnr_retry, min_rnr_timer, max_rd_atomic, max_dest_rd_atomic;
    uint16_t pkey_index;

    /* send queue: posted > tx (next to transmit) >= acked (next to complete) */
    struct sv_swr *sq;
    uint8_t *inl; /* max_inline bytes per slot */
    uint64_t sq_posted, sq_tx, sq_acked;
    _Atomic uint64_t sq_retired; /* slots up to here were polled */
    struct sv_rwr *rq;
    uint64_t rq_posted, rq_used;
    _Atomic uint64_t rq_retired;
    struct sv_fifo pend_send, pend_recv;
    uint32_t next_sq_psn;

    /* requester side of the wire */
    int out_fd;
    int out_failed;           /* RC: connection lost or refused */
    uint64_t out_down_ns;     /* when */
    struct sv_hello out_hello;
    size_t out_hello_off;     /* bytes of the hello sent */
    struct sv_msg out_hdr;
    size_t out_hdr_off;       /* bytes of the current header sent */
    uint64_t out_pay_off;     /* bytes of the current payload sent */
    int out_started;          /* the current WR passed its checks */
    uint64_t out_msgs;        /* UC: messages transmitted (SOFTVERBS_DROP_EVERY) */
    struct sv_resp out_resp;
    size_t out_resp_off;

    /* responder side */
    int listen_fd;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    int in_fd;
    int rx_phase;
    struct sv_hello in_hello;
    size_t in_hello_off;
    int in_hello_ok;         /* validated against the QP's attributes */
    struct sv_msg in_hdr;
    size_t in_hdr_off;
    uint64_t rx_off, rx_left; /* payload placed / still to read */
    uint64_t rx_since_ns;     /* RX_HELD / RX_RNR: since when */
    int rx_need_recv, rx_status;
    struct sv_rwr rx_rwr;     /* the receive the payload goes to */
    uint32_t rq_expect_psn;
    struct sv_resp resp[SV_RESP_RING];
    uint32_t resp_head, resp_count;
    size_t resp_off;

    uint8_t *scratch;
    int wake_r, wake_w;
    atomic_int wake_pending;
    int stop;
    pthread_t thread;
    uint64_t rng;
};

static struct {
    pthread_once_t once;
    pthread_mutex_t lock;    /* object counts and references */
    pthread_mutex_t mr_lock; /* the key tables */
    pthread_cond_t mr_idle;
    int init_errno;
    struct sv_device devs[SV_MAX_DEVICES];
    int ndev;
    int uc_only, log, uc_wait;
    int max_qp;
    uint64_t drop_every, drop_after; /* UC loss injection; 0: none */
    int drop_writes;                 /* ... counting RDMA writes only */
    int no_comp_channel;             /* SOFTVERBS_NO_COMP_CHANNEL */
    uint64_t jitter_ns;
    int max_mr;
    char dir[80], lodir[96];
    uint64_t rng;
    struct sv_mr *by_lkey[SV_MR_BUCKETS], *by_rkey[SV_MR_BUCKETS];
} G = {.once = PTHREAD_ONCE_INIT,
       .lock = PTHREAD_MUTEX_INITIALIZER,
       .mr_lock = PTHREAD_MUTEX_INITIALIZER,
       .mr_idle = PTHREAD_COND_INITIALIZER};

/* ---- small helpers ----------------------------------------------------- */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t rng_next(uint64_t *s)
{
    /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void sv_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void sv_log(const char *fmt, ...)
{
    if (!G.log)
        return;
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(buf, sizeof buf, "softverbs[%d]: ", (int)getpid());
    vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
    va_end(ap);
    size_t len = strlen(buf);
    if (len < sizeof buf - 1)
        buf[len++] = '\n';
    ssize_t w = write(2, buf, len);
    (void)w;
}

static int set_nonblock_cloexec(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -1;
    return fcntl(fd, F_SETFD, FD_CLOEXEC);
}

static void sock_setup(int fd)
{
    int sz = SV_SOCKBUF;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
#ifdef SO_NOSIGPIPE
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
#endif
}

static uint32_t mtu_bytes(int mtu)
{
    return mtu >= IBV_MTU_256 && mtu <= IBV_MTU_4096 ? 128u << mtu : 1024u;
}

static uint32_t npackets(uint32_t len, int mtu)
{
    uint32_t m = mtu_bytes(mtu);
    return len == 0 ? 1 : (len + m - 1) / m;
}

/* Local ACK timeout x retries: how long a requester keeps trying. */
static uint64_t retry_window_ns(uint8_t timeout, uint8_t retry_cnt)
{
    if (timeout == 0)
        return SV_FOREVER;
    return (uint64_t)(retry_cnt + 1) * 4096ull * (1ull << timeout);
}

/* The IB encoding of min_rnr_timer, in microseconds. */
static const uint32_t rnr_timer_us[32] = {
    655360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1280, 1920,
    2560, 3840, 5120, 7680, 10240, 15360, 20480, 30720, 40960, 61440, 81920, 122880, 163840, 245760, 327680, 491520,
};

static uint64_t rnr_window_ns(uint8_t min_rnr_timer, uint8_t rnr_retry)
{
    if (rnr_retry >= 7)
        return SV_FOREVER;
    return (uint64_t)(rnr_retry + 1) * rnr_timer_us[min_rnr_timer & 31] * 1000ull;
}

/* The IPv4 address a GID routes to, or 0: ::ffff:a.b.c.d or fe80::a.b.c.d. */
static uint32_t gid_to_ip(const union ibv_gid *g)
{
    static const uint8_t zero[10];
    uint32_t ip;
    memcpy(&ip, g->raw + 12, 4);
    if (!memcmp(g->raw, zero, 10) && g->raw[10] == 0xff && g->raw[11] == 0xff)
        return ip;
    if (g->raw[0] == 0xfe && g->raw[1] == 0x80 && !memcmp(g->raw + 2, zero, 10))
        return ip;
    return 0;
}

static int ip_is_loopback(uint32_t ip)
{
    return (ntohl(ip) >> 24) == 127;
}

/* The socket of QP qpn on the device with address ip. Loopback addresses
 * are reachable only from the same network namespace, as on a real host. */
static int qp_path(char *out, size_t size, uint32_t ip, uint32_t qpn)
{
    char a[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &ip, a, sizeof a);
    int n = snprintf(out, size, "%s/%s_%u", ip_is_loopback(ip) ? G.lodir : G.dir, a, qpn);
    return n > 0 && (size_t)n < size ? 0 : ENAMETOOLONG;
}

/* ---- configuration ----------------------------------------------------- */

static int env_uint(const char *name, uint64_t dflt, uint64_t max, uint64_t *out)
{
    const char *s = getenv(name);
    *out = dflt;
    if (!s || !*s)
        return 0;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || v > max || s[0] == '-') {
        fprintf(stderr, "softverbs: %s=%s is not a number from 0 to %llu\n", name, s, (unsigned long long)max);
        return EINVAL;
    }
    *out = v;
    return 0;
}

static void add_device(const char *name, uint32_t ip, int uc_only)
{
    if (G.ndev >= SV_MAX_DEVICES)
        return;
    struct sv_device *d = &G.devs[G.ndev++];
    memset(d, 0, sizeof *d);
    d->dev.node_type = IBV_NODE_CA;
    d->dev.transport_type = IBV_TRANSPORT_IB;
    snprintf(d->dev.name, sizeof d->dev.name, "%s", name);
    snprintf(d->dev.dev_name, sizeof d->dev.dev_name, "uverbs%d", G.ndev - 1);
    snprintf(d->dev.dev_path, sizeof d->dev.dev_path, "/sys/class/infiniband_verbs/uverbs%d", G.ndev - 1);
    snprintf(d->dev.ibdev_path, sizeof d->dev.ibdev_path, "/sys/class/infiniband/%s", name);
    d->ip = ip;
    d->uc_only = uc_only || G.uc_only;
    d->gid[0].raw[0] = 0xfe;
    d->gid[0].raw[1] = 0x80;
    memcpy(d->gid[0].raw + 12, &ip, 4);
    d->gid[1].raw[10] = d->gid[1].raw[11] = 0xff;
    memcpy(d->gid[1].raw + 12, &ip, 4);
}

/* SOFTVERBS_DEVICES=name=ipv4[/uc],... */
static int parse_devices(const char *spec)
{
    char buf[1024];
    if (strlen(spec) >= sizeof buf)
        return EINVAL;
    strcpy(buf, spec);
    char *save = NULL;
    for (char *item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(item, '=');
        if (!eq || eq == item || eq - item >= IBV_SYSFS_NAME_MAX || G.ndev >= SV_MAX_DEVICES)
            return EINVAL;
        *eq = 0;
        for (char *p = item; *p; p++)
            if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_'))
                return EINVAL;
        char *addr = eq + 1;
        int uc = 0;
        char *slash = strchr(addr, '/');
        if (slash) {
            if (strcmp(slash, "/uc"))
                return EINVAL;
            *slash = 0;
            uc = 1;
        }
        struct in_addr in;
        if (inet_pton(AF_INET, addr, &in) != 1 || in.s_addr == 0)
            return EINVAL;
        for (int i = 0; i < G.ndev; i++)
            if (!strcmp(G.devs[i].dev.name, item) || G.devs[i].ip == in.s_addr)
                return EINVAL;
        add_device(item, in.s_addr, uc);
    }
    return 0;
}

static void scan_interfaces(void)
{
    struct ifaddrs *ifa = NULL;
    if (getifaddrs(&ifa) != 0)
        return;
    for (struct ifaddrs *i = ifa; i; i = i->ifa_next) {
        if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET || !(i->ifa_flags & IFF_UP))
            continue;
        uint32_t ip = ((struct sockaddr_in *)i->ifa_addr)->sin_addr.s_addr;
        int dup = 0, same_if = 0;
        for (int k = 0; k < G.ndev; k++) {
            dup |= G.devs[k].ip == ip;
            char want[IBV_SYSFS_NAME_MAX];
            snprintf(want, sizeof want, "sv_%s", i->ifa_name);
            same_if += !strncmp(G.devs[k].dev.name, want, strlen(want));
        }
        if (dup)
            continue;
        char name[IBV_SYSFS_NAME_MAX];
        if (same_if)
            snprintf(name, sizeof name, "sv_%s_%d", i->ifa_name, same_if);
        else
            snprintf(name, sizeof name, "sv_%s", i->ifa_name);
        for (char *p = name; *p; p++)
            if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9')))
                *p = '_';
        add_device(name, ip, 0);
    }
    freeifaddrs(ifa);
}

static int make_dir(const char *d)
{
    if (mkdir(d, 0700) != 0 && errno != EEXIST)
        return errno;
    struct stat st;
    if (stat(d, &st) != 0 || !S_ISDIR(st.st_mode))
        return ENOTDIR;
    return 0;
}

static void sv_init(void)
{
    uint64_t v;
    int err = 0;
    err |= env_uint("SOFTVERBS_JITTER_US", 0, 1000000, &v);
    G.jitter_ns = v * 1000;
    err |= env_uint("SOFTVERBS_MAX_MR", 100, 1 << 20, &v);
    G.max_mr = (int)v;
    err |= env_uint("SOFTVERBS_MAX_QP", 10, SV_MAX_QP, &v);
    G.max_qp = v ? (int)v : 1;
    const char *norecv = getenv("SOFTVERBS_UC_NORECV");
    if (norecv && *norecv && strcmp(norecv, "drop") && strcmp(norecv, "wait")) {
        fprintf(stderr, "softverbs: SOFTVERBS_UC_NORECV=%s: expected drop or wait\n", norecv);
        err = EINVAL;
    }
    G.uc_wait = norecv && !strcmp(norecv, "wait");
    err |= env_uint("SOFTVERBS_UC_ONLY", 0, 1, &v);
    G.uc_only = (int)v;
    err |= env_uint("SOFTVERBS_DROP_EVERY", 0, UINT32_MAX, &v);
    G.drop_every = v;
    err |= env_uint("SOFTVERBS_DROP_AFTER", 0, UINT64_MAX, &v);
    G.drop_after = v;
    err |= env_uint("SOFTVERBS_DROP_WRITES", 0, 1, &v);
    G.drop_writes = (int)v;
    err |= env_uint("SOFTVERBS_NO_COMP_CHANNEL", 0, 1, &v);
    G.no_comp_channel = (int)v;
    err |= env_uint("SOFTVERBS_LOG", 0, 2, &v);
    G.log = (int)v;
    err |= env_uint("SOFTVERBS_SEED", 0, UINT64_MAX, &v);
    G.rng = v ? v : (now_ns() ^ ((uint64_t)getpid() << 32));

    const char *dir = getenv("SOFTVERBS_DIR");
    if (dir && *dir)
        snprintf(G.dir, sizeof G.dir, "%s", dir);
    else
        snprintf(G.dir, sizeof G.dir, "/tmp/softverbs-%u", (unsigned)getuid());
    unsigned long long ns = 0;
#ifdef __linux__
    struct stat st;
    if (stat("/proc/self/ns/net", &st) == 0)
        ns = (unsigned long long)st.st_ino;
#endif
    snprintf(G.lodir, sizeof G.lodir, "%s/lo%llu", G.dir, ns);
    if (strlen(G.dir) > 60) {
        fprintf(stderr, "softverbs: SOFTVERBS_DIR=%s is too long for socket names (60 bytes at most)\n", G.dir);
        err = EINVAL;
    } else if (make_dir(G.dir) || make_dir(G.lodir)) {
        fprintf(stderr, "softverbs: cannot make the socket directory %s: %s\n", G.lodir, strerror(errno));
        err = EACCES;
    }

    const char *spec = getenv("SOFTVERBS_DEVICES");
    if (spec && *spec) {
        if (parse_devices(spec)) {
            fprintf(stderr, "softverbs: SOFTVERBS_DEVICES=%s: expected name=ipv4[/uc],... with distinct names "
                    "([A-Za-z0-9_]) and addresses, at most %d\n", spec, SV_MAX_DEVICES);
            err = EINVAL;
        }
    } else {
        scan_interfaces();
    }
    G.init_errno = err ? EINVAL : 0;
}

static int sv_ready(void)
{
    pthread_once(&G.once, sv_init);
    if (G.init_errno) {
        errno = G.init_errno;
        return 0;
    }
    return 1;
}

/* ---- devices ------------------------------------------------------------ */

SV_EXPORT struct ibv_device **ibv_get_device_list(int *num_devices)
{
    if (!sv_ready())
        return NULL;
    struct ibv_device **list = calloc((size_t)G.ndev + 1, sizeof *list);
    if (!list) {
        errno = ENOMEM;
        return NULL;
    }
    for (int i = 0; i < G.ndev; i++)
        list[i] = &G.devs[i].dev;
    if (num_devices)
        *num_devices = G.ndev;
    return list;
}

SV_EXPORT void ibv_free_device_list(struct ibv_device **list)
{
    free(list);
}

static struct sv_device *as_dev(struct ibv_device *d)
{
    for (int i = 0; i < G.ndev; i++)
        if (d == &G.devs[i].dev)
            return &G.devs[i];
    return NULL;
}

SV_EXPORT const char *ibv_get_device_name(struct ibv_device *device)
{
    return device ? device->name : NULL;
}

static int sv_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr);
static int sv_post_recv(struct ibv_qp *qp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad_wr);
static int sv_poll_cq(struct ibv_cq *cq, int num_entries, struct ibv_wc *wc);
static int sv_req_notify_cq(struct ibv_cq *cq, int solicited_only);

SV_EXPORT struct ibv_context *ibv_open_device(struct ibv_device *device)
{
    if (!sv_ready())
        return NULL;
    struct sv_device *d = device ? as_dev(device) : NULL;
    if (!d) {
        errno = ENODEV;
        return NULL;
    }
    struct sv_ctx *c = calloc(1, sizeof *c);
    if (!c) {
        errno = ENOMEM;
        return NULL;
    }
    if (pipe(c->async_pipe) != 0) {
        int e = errno;
        free(c);
        errno = e;
        return NULL;
    }
    set_nonblock_cloexec(c->async_pipe[0]);
    set_nonblock_cloexec(c->async_pipe[1]);
    c->dev = d;
    c->ctx.device = &d->dev;
    c->ctx.ops.poll_cq = sv_poll_cq;
    c->ctx.ops.req_notify_cq = sv_req_notify_cq;
    c->ctx.ops.post_send = sv_post_send;
    c->ctx.ops.post_recv = sv_post_recv;
    c->ctx.cmd_fd = -1;
    c->ctx.async_fd = c->async_pipe[0];
    c->ctx.num_comp_vectors = 1;
    pthread_mutex_init(&c->ctx.mutex, NULL);
    return &c->ctx;
}

SV_EXPORT int ibv_close_device(struct ibv_context *context)
{
    struct sv_ctx *c = (struct sv_ctx *)context;
    if (!c)
        return EINVAL;
    pthread_mutex_lock(&G.lock);
    int busy = c->npd || c->nmr || c->ncq || c->nqp || c->nchan;
    pthread_mutex_unlock(&G.lock);
    if (busy) {
        /* rdma-core would let the kernel clean up; we keep the objects
         * alive (their threads may be running) and say so. */
        sv_log("ibv_close_device(%s): %d PDs, %d MRs, %d CQs, %d QPs, %d channels still open",
               c->dev->dev.name, c->npd, c->nmr, c->ncq, c->nqp, c->nchan);
        return EBUSY;
    }
    close(c->async_pipe[0]);
    close(c->async_pipe[1]);
    pthread_mutex_destroy(&c->ctx.mutex);
    free(c);
    return 0;
}

SV_EXPORT int ibv_query_device(struct ibv_context *context, struct ibv_device_attr *a)
{
    struct sv_ctx *c = (struct sv_ctx *)context;
    if (!c || !a)
        return EINVAL;
    memset(a, 0, sizeof *a);
    snprintf(a->fw_ver, sizeof a->fw_ver, "softverbs-1");
    /* GUIDs are big-endian (__be64 in rdma-core): 02:00:5e:00 then the address */
    uint8_t guid[8] = {0x02, 0x00, 0x5e, 0x00};
    memcpy(guid + 4, &c->dev->ip, 4);
    memcpy(&a->node_guid, guid, 8);
    memcpy(&a->sys_image_guid, guid, 8);
    a->max_mr_size = 1ull << 40;
    a->page_size_cap = 4096;
    a->vendor_id = 0x5356; /* not a registered vendor */
    a->vendor_part_id = 1;
    a->hw_ver = 1;
    a->max_qp = G.max_qp;
    a->max_qp_wr = SV_MAX_QP_WR;
    a->max_sge = SV_MAX_SGE;
    a->max_sge_rd = 0;
    a->max_cq = SV_MAX_CQ;
    a->max_cqe = SV_MAX_CQE;
    a->max_mr = G.max_mr;
    a->max_pd = SV_MAX_PD;
    a->max_qp_rd_atom = SV_MAX_RD_ATOMIC;
    a->max_qp_init_rd_atom = SV_MAX_RD_ATOMIC;
    a->max_res_rd_atom = SV_MAX_RD_ATOMIC * G.max_qp;
    a->atomic_cap = IBV_ATOMIC_NONE;
    a->max_pkeys = 1;
    a->local_ca_ack_delay = 16;
    a->phys_port_cnt = 1;
    return 0;
}

/* The exported symbol of rdma-core is the compatibility entry, which fills
 * the struct only up to link_layer; so does this one. */
SV_EXPORT int ibv_query_port(struct ibv_context *context, uint8_t port_num, struct ibv_port_attr *a)
{
    if (!context || !a)
        return EINVAL;
    if (port_num != 1)
        return EINVAL;
    memset(a, 0, offsetof(struct ibv_port_attr, link_layer));
    a->state = IBV_PORT_ACTIVE;
    a->max_mtu = IBV_MTU_4096;
    a->active_mtu = IBV_MTU_4096;
    a->gid_tbl_len = SV_GID_TBL_LEN;
    a->max_msg_sz = SV_MAX_MSG;
    a->pkey_tbl_len = 1;
    a->active_width = 2;  /* 4x */
    a->active_speed = 32; /* 25 Gb/s per lane */
    a->phys_state = 5;    /* link up */
    a->max_vl_num = 1;    /* VL0 only (0 is not a valid value) */
    a->link_layer = IBV_LINK_LAYER_ETHERNET;
    return 0;
}

SV_EXPORT int ibv_query_gid(struct ibv_context *context, uint8_t port_num, int index, union ibv_gid *gid)
{
    struct sv_ctx *c = (struct sv_ctx *)context;
    if (!c || !gid || port_num != 1 || index < 0 || index >= SV_GID_TBL_LEN) {
        errno = EINVAL;
        return -1;
    }
    *gid = c->dev->gid[index];
    return 0;
}

SV_EXPORT const char *ibv_wc_status_str(enum ibv_wc_status status)
{
    static const char *const names[] = {
        "success", "local length error", "local QP operation error", "local EE context operation error",
        "local protection error", "Work Request Flushed Error", "memory management operation error",
        "bad response error", "local access error", "remote invalid request error", "remote access error",
        "remote operation error", "transport retry counter exceeded", "RNR retry counter exceeded",
        "local RDD violation error", "remote invalid RD request", "aborted error", "invalid EE context number",
        "invalid EE context state", "fatal error", "response timeout error", "general error",
    };
    if ((unsigned)status < sizeof names / sizeof names[0])
        return names[status];
    return "unknown";
}

/* ---- protection domains and memory regions ---------------------------- */

SV_EXPORT struct ibv_pd *ibv_alloc_pd(struct ibv_context *context)
{
    struct sv_ctx *c = (struct sv_ctx *)context;
    if (!c) {
        errno = EINVAL;
        return NULL;
    }
    pthread_mutex_lock(&G.lock);
    if (c->npd >= SV_MAX_PD) {
        pthread_mutex_unlock(&G.lock);
        errno = ENOMEM;
        return NULL;
    }
    struct sv_pd *pd = calloc(1, sizeof *pd);
    if (pd) {
        c->npd++;
        pd->c = c;
        pd->pd.context = context;
        pd->pd.handle = (uint32_t)c->npd;
    }
    pthread_mutex_unlock(&G.lock);
    if (!pd)
        errno = ENOMEM;
    return pd ? &pd->pd : NULL;
}

SV_EXPORT int ibv_dealloc_pd(struct ibv_pd *ibpd)
{
    struct sv_pd *pd = (struct sv_pd *)ibpd;
    if (!pd)
        return EINVAL;
    pthread_mutex_lock(&G.lock);
    if (pd->refs) {
        pthread_mutex_unlock(&G.lock);
        sv_log("ibv_dealloc_pd: %d MRs or QPs still use it", pd->refs);
        return EBUSY;
    }
    pd->c->npd--;
    pthread_mutex_unlock(&G.lock);
    free(pd);
    return 0;
}

static struct sv_mr *mr_find(uint32_t key, int remote)
{
    struct sv_mr *m = remote ? G.by_rkey[key % SV_MR_BUCKETS] : G.by_lkey[key % SV_MR_BUCKETS];
    while (m && (remote ? m->mr.rkey : m->mr.lkey) != key)
        m = remote ? m->next_r : m->next_l;
    return m;
}

/* Is [addr, addr + len) mapped? (A real HCA pins it: EFAULT if not.) */
static int range_mapped(void *addr, size_t len)
{
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)addr & ~((uintptr_t)page - 1);
    uintptr_t end = (uintptr_t)addr + len;
    if (end < (uintptr_t)addr)
        return 0;
#if defined(__linux__)
    unsigned char vec[4096];
#else
    char vec[4096];
#endif
    while (start < end) {
        size_t n = (end - start + (size_t)page - 1) / (size_t)page;
        if (n > sizeof vec)
            n = sizeof vec;
        if (mincore((void *)start, n * (size_t)page, vec) != 0 && errno == ENOMEM)
            return 0;
        start += n * (size_t)page;
    }
    return 1;
}

#define SV_ACCESS_KNOWN                                                                                        \
    (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_ATOMIC | \
     IBV_ACCESS_RELAXED_ORDERING)

SV_EXPORT struct ibv_mr *ibv_reg_mr_iova2(struct ibv_pd *ibpd, void *addr, size_t length, uint64_t iova,
                                          unsigned int access)
{
    struct sv_pd *pd = (struct sv_pd *)ibpd;
    if (!pd || length == 0 || (access & ~(unsigned)SV_ACCESS_KNOWN) || iova != (uintptr_t)addr) {
        errno = EINVAL;
        return NULL;
    }
    if ((access & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC)) && !(access & IBV_ACCESS_LOCAL_WRITE)) {
        errno = EINVAL; /* the IB spec requires local write with remote write */
        return NULL;
    }
    if (!addr || !range_mapped(addr, length)) {
        errno = EFAULT;
        return NULL;
    }
    struct sv_mr *m = calloc(1, sizeof *m);
    if (!m) {
        errno = ENOMEM;
        return NULL;
    }
    pthread_mutex_lock(&G.lock);
    if (pd->c->dev->nmr >= G.max_mr) {
        pthread_mutex_unlock(&G.lock);
        free(m);
        sv_log("ibv_reg_mr: the device's %d memory regions are all in use (SOFTVERBS_MAX_MR)", G.max_mr);
        errno = ENOMEM;
        return NULL;
    }
    pd->c->nmr++;
    pd->c->dev->nmr++;
    pd->refs++;
    pthread_mutex_unlock(&G.lock);

    m->pd = pd;
    m->access = access;
    m->mr.context = pd->pd.context;
    m->mr.pd = ibpd;
    m->mr.addr = addr;
    m->mr.length = length;
    pthread_mutex_lock(&G.mr_lock);
    /* Distinct random keys, lkey != rkey: using one for the other fails. */
    do
        m->mr.lkey = (uint32_t)rng_next(&G.rng);
    while (m->mr.lkey == 0 || mr_find(m->mr.lkey, 0) || mr_find(m->mr.lkey, 1));
    do
        m->mr.rkey = (uint32_t)rng_next(&G.rng);
    while (m->mr.rkey == 0 || m->mr.rkey == m->mr.lkey || mr_find(m->mr.rkey, 0) || mr_find(m->mr.rkey, 1));
    m->mr.handle = m->mr.lkey;
    m->next_l = G.by_lkey[m->mr.lkey % SV_MR_BUCKETS];
    G.by_lkey[m->mr.lkey % SV_MR_BUCKETS] = m;
    m->next_r = G.by_rkey[m->mr.rkey % SV_MR_BUCKETS];
    G.by_rkey[m->mr.rkey % SV_MR_BUCKETS] = m;
    pthread_mutex_unlock(&G.mr_lock);
    return &m->mr;
}

SV_EXPORT struct ibv_mr *ibv_reg_mr(struct ibv_pd *pd, void *addr, size_t length, int access)
{
    return ibv_reg_mr_iova2(pd, addr, length, (uintptr_t)addr, (unsigned)access);
}

SV_EXPORT int ibv_dereg_mr(struct ibv_mr *ibmr)
{
    struct sv_mr *m = (struct sv_mr *)ibmr;
    if (!m)
        return EINVAL;
    pthread_mutex_lock(&G.mr_lock);
    struct sv_mr **pp = &G.by_lkey[m->mr.lkey % SV_MR_BUCKETS];
    while (*pp && *pp != m)
        pp = &(*pp)->next_l;
    if (!*pp) {
        pthread_mutex_unlock(&G.mr_lock);
        return EINVAL;
    }
    *pp = m->next_l;
    pp = &G.by_rkey[m->mr.rkey % SV_MR_BUCKETS];
    while (*pp && *pp != m)
        pp = &(*pp)->next_r;
    if (*pp)
        *pp = m->next_r;
    /* A transfer that is reading or writing it finishes its chunk first;
     * after this returns nothing touches the memory. */
    while (m->busy)
        pthread_cond_wait(&G.mr_idle, &G.mr_lock);
    pthread_mutex_unlock(&G.mr_lock);
    pthread_mutex_lock(&G.lock);
    m->pd->c->nmr--;
    m->pd->c->dev->nmr--;
    m->pd->refs--;
    pthread_mutex_unlock(&G.lock);
    free(m);
    return 0;
}

enum { MR_OK = 0, MR_NOKEY = 0x51, MR_PD = 0x52, MR_ACCESS = 0x53, MR_BOUNDS = 0x54 };

/* Takes the region of key for [addr, addr + len), marked busy; NULL and
 * *why when the key, its protection domain, access or bounds do not fit. */
static struct sv_mr *mr_get(uint32_t key, int remote, struct sv_pd *pd, unsigned need, uint64_t addr, uint64_t len,
                            int *why)
{
    pthread_mutex_lock(&G.mr_lock);
    struct sv_mr *m = mr_find(key, remote);
    int w = MR_OK;
    if (!m)
        w = MR_NOKEY;
    else if (m->pd != pd)
        w = MR_PD;
    else if ((m->access & need) != need)
        w = MR_ACCESS;
    else if (addr < (uintptr_t)m->mr.addr || addr + len < addr ||
             addr + len > (uintptr_t)m->mr.addr + m->mr.length)
        w = MR_BOUNDS;
    if (w == MR_OK)
        m->busy++;
    pthread_mutex_unlock(&G.mr_lock);
    *why = w;
    return w == MR_OK ? m : NULL;
}

static void mr_put(struct sv_mr *m)
{
    pthread_mutex_lock(&G.mr_lock);
    if (--m->busy == 0)
        pthread_cond_broadcast(&G.mr_idle);
    pthread_mutex_unlock(&G.mr_lock);
}

static const char *mr_why(int why)
{
    switch (why) {
    case MR_NOKEY: return "no region has this key (never registered, or deregistered)";
    case MR_PD: return "the region belongs to another protection domain";
    case MR_ACCESS: return "the region was not registered with the access this needs";
    case MR_BOUNDS: return "the range is not inside the region";
    default: return "ok";
    }
}

/* ---- completion channels and CQs --------------------------------------- */

SV_EXPORT struct ibv_comp_channel *ibv_create_comp_channel(struct ibv_context *context)
{
    struct sv_ctx *c = (struct sv_ctx *)context;
    if (!c) {
        errno = EINVAL;
        return NULL;
    }
    if (G.no_comp_channel) {
        errno = ENOSYS;
        return NULL;
    }
    struct sv_chan *ch = calloc(1, sizeof *ch);
    int fds[2];
    if (!ch || pipe(fds) != 0) {
        int e = ch ? errno : ENOMEM;
        free(ch);
        errno = e;
        return NULL;
    }
    fcntl(fds[0], F_SETFD, FD_CLOEXEC);
    set_nonblock_cloexec(fds[1]);
    ch->c = c;
    ch->ch.context = context;
    ch->ch.fd = fds[0];
    ch->ch.refcnt = 0;
    ch->wfd = fds[1];
    pthread_mutex_lock(&G.lock);
    c->nchan++;
    pthread_mutex_unlock(&G.lock);
    return &ch->ch;
}

SV_EXPORT int ibv_destroy_comp_channel(struct ibv_comp_channel *channel)
{
    struct sv_chan *ch = (struct sv_chan *)channel;
    if (!ch)
        return EINVAL;
    pthread_mutex_lock(&G.lock);
    if (ch->refs) {
        pthread_mutex_unlock(&G.lock);
        sv_log("ibv_destroy_comp_channel: %d CQs still use it", ch->refs);
        return EBUSY;
    }
    ch->c->nchan--;
    pthread_mutex_unlock(&G.lock);
    close(ch->ch.fd);
    close(ch->wfd);
    free(ch);
    return 0;
}

SV_EXPORT struct ibv_cq *ibv_create_cq(struct ibv_context *context, int cqe, void *cq_context,
                                       struct ibv_comp_channel *channel, int comp_vector)
{
    struct sv_ctx *c = (struct sv_ctx *)context;
    struct sv_chan *ch = (struct sv_chan *)channel;
    if (!c || cqe < 1 || cqe > SV_MAX_CQE || comp_vector < 0 || comp_vector >= c->ctx.num_comp_vectors ||
        (ch && ch->c != c)) {
        errno = EINVAL;
        return NULL;
    }
    struct sv_cq *cq = calloc(1, sizeof *cq);
    struct sv_cqe *ring = calloc((size_t)cqe, sizeof *ring);
    if (!cq || !ring) {
        free(cq);
        free(ring);
        errno = ENOMEM;
        return NULL;
    }
    pthread_mutex_lock(&G.lock);
    if (c->ncq >= SV_MAX_CQ) {
        pthread_mutex_unlock(&G.lock);
        free(cq);
        free(ring);
        errno = ENOMEM;
        return NULL;
    }
    c->ncq++;
    if (ch) {
        ch->refs++;
        ch->ch.refcnt++;
    }
    pthread_mutex_unlock(&G.lock);
    cq->c = c;
    cq->chan = ch;
    cq->ring = ring;
    cq->cap = (uint32_t)cqe;
    cq->cq.context = context;
    cq->cq.channel = channel;
    cq->cq.cq_context = cq_context;
    cq->cq.cqe = cqe;
    pthread_mutex_init(&cq->cq.mutex, NULL);
    pthread_cond_init(&cq->cq.cond, NULL);
    pthread_mutex_init(&cq->lock, NULL);
    return &cq->cq;
}

SV_EXPORT int ibv_destroy_cq(struct ibv_cq *ibcq)
{
    struct sv_cq *cq = (struct sv_cq *)ibcq;
    if (!cq)
        return EINVAL;
    pthread_mutex_lock(&G.lock);
    pthread_mutex_lock(&cq->lock);
    int refs = cq->refs;
    unsigned unacked = cq->events_reported - cq->events_acked;
    pthread_mutex_unlock(&cq->lock);
    if (refs || unacked) {
        pthread_mutex_unlock(&G.lock);
        sv_log("ibv_destroy_cq: %d QPs still use it, %u events not acknowledged", refs, unacked);
        return EBUSY;
    }
    cq->c->ncq--;
    if (cq->chan) {
        cq->chan->refs--;
        cq->chan->ch.refcnt--;
    }
    pthread_mutex_unlock(&G.lock);
    pthread_mutex_destroy(&cq->lock);
    pthread_mutex_destroy(&cq->cq.mutex);
    pthread_cond_destroy(&cq->cq.cond);
    free(cq->ring);
    free(cq);
    return 0;
}

/* Adds a completion; -1 when the CQ overflows (it is in error from then). */
static int cq_push(struct sv_cq *cq, const struct sv_cqe *e, int solicited)
{
    pthread_mutex_lock(&cq->lock);
    if (cq->overrun || cq->count == cq->cap) {
        if (!cq->overrun)
            sv_log("CQ overrun: %u completions not polled; the CQ is in error", cq->count);
        cq->overrun = 1;
        pthread_mutex_unlock(&cq->lock);
        return -1;
    }
    cq->ring[(cq->head + cq->count++) % cq->cap] = *e;
    if (cq->armed && (!cq->solicited_only || solicited || e->wc.status != IBV_WC_SUCCESS)) {
        cq->armed = 0;
        if (cq->chan) {
            struct ibv_cq *p = &cq->cq;
            if (write(cq->chan->wfd, &p, sizeof p) == (ssize_t)sizeof p)
                cq->events_reported++;
            else
                sv_log("completion channel full: event of CQ %p lost", (void *)cq);
        }
    }
    pthread_mutex_unlock(&cq->lock);
    return 0;
}

static void retire(_Atomic uint64_t *counter, uint64_t upto)
{
    uint64_t cur = atomic_load(counter);
    while (cur < upto && !atomic_compare_exchange_weak(counter, &cur, upto))
        ;
}

static int sv_poll_cq(struct ibv_cq *ibcq, int num_entries, struct ibv_wc *wc)
{
    struct sv_cq *cq = (struct sv_cq *)ibcq;
    if (num_entries < 0)
        return -1;
    pthread_mutex_lock(&cq->lock);
    if (cq->overrun) {
        pthread_mutex_unlock(&cq->lock);
        errno = EOVERFLOW;
        return -1;
    }
    int n = 0;
    while (n < num_entries && cq->count) {
        struct sv_cqe *e = &cq->ring[cq->head];
        wc[n++] = e->wc;
        /* The WR's queue slots (and those of the unsignaled WRs before it)
         * are free once its completion is polled. */
        retire(e->is_send ? &e->qp->sq_retired : &e->qp->rq_retired, e->seq + 1);
        cq->head = (cq->head + 1) % cq->cap;
        cq->count--;
    }
    pthread_mutex_unlock(&cq->lock);
    if (n == 0)
        sched_yield(); /* a busy poller must not starve the QP threads */
    return n;
}

static int sv_req_notify_cq(struct ibv_cq *ibcq, int solicited_only)
{
    struct sv_cq *cq = (struct sv_cq *)ibcq;
    pthread_mutex_lock(&cq->lock);
    cq->armed = 1;
    cq->solicited_only = solicited_only != 0;
    pthread_mutex_unlock(&cq->lock);
    return 0;
}

SV_EXPORT int ibv_get_cq_event(struct ibv_comp_channel *channel, struct ibv_cq **cq, void **cq_context)
{
    if (!channel || !cq || !cq_context) {
        errno = EINVAL;
        return -1;
    }
    struct ibv_cq *p;
    ssize_t n = read(channel->fd, &p, sizeof p);
    if (n != (ssize_t)sizeof p) {
        if (n >= 0)
            errno = EIO;
        return -1;
    }
    *cq = p;
    *cq_context = p->cq_context;
    return 0;
}

SV_EXPORT void ibv_ack_cq_events(struct ibv_cq *ibcq, unsigned int nevents)
{
    struct sv_cq *cq = (struct sv_cq *)ibcq;
    if (!cq)
        return;
    pthread_mutex_lock(&cq->lock);
    cq->events_acked += nevents;
    cq->cq.comp_events_completed += nevents;
    pthread_mutex_unlock(&cq->lock);
}

/* Removes the completions of qp from cq (destroy or reset of the QP). */
static void cq_clean(struct sv_cq *cq, struct sv_qp *qp)
{
    pthread_mutex_lock(&cq->lock);
    uint32_t kept = 0;
    for (uint32_t i = 0; i < cq->count; i++) {
        struct sv_cqe *e = &cq->ring[(cq->head + i) % cq->cap];
        if (e->qp != qp)
            cq->ring[(cq->head + kept++) % cq->cap] = *e;
    }
    cq->count = kept;
    pthread_mutex_unlock(&cq->lock);
}

/* ---- queue pairs: completions ------------------------------------------ */

static void qp_wake(struct sv_qp *qp)
{
    if (atomic_exchange(&qp->wake_pending, 1) == 0) {
        char b = 1;
        ssize_t w = write(qp->wake_w, &b, 1);
        (void)w;
    }
}

static void qp_to_err(struct sv_qp *qp);
static int flush_responses(struct sv_qp *qp);
static int recv_ready(struct sv_qp *qp);

static void deliver(struct sv_qp *qp, const struct sv_cqe *e, int solicited)
{
    if (G.log > 1)
        sv_log("QP %u: %s CQE wr_id %llu status %d", qp->qp.qp_num, e->is_send ? "send" : "recv",
               (unsigned long long)e->wc.wr_id, e->wc.status);
    struct sv_cq *cq = e->is_send ? qp->scq : qp->rcq;
    if (cq_push(cq, e, solicited) != 0)
        qp_to_err(qp);
}

static void fifo_push(struct sv_qp *qp, struct sv_fifo *f, const struct sv_cqe *e)
{
    uint64_t due = now_ns() + rng_next(&qp->rng) % G.jitter_ns;
    if (due < f->last_due)
        due = f->last_due; /* one queue's completions stay in order */
    f->last_due = due;
    if (f->count == f->cap) { /* cannot happen: one per outstanding WR */
        deliver(qp, e, 0);
        return;
    }
    struct sv_pend *p = &f->v[(f->head + f->count++) % f->cap];
    p->e = *e;
    p->due_ns = due;
}

/* Delivers the delayed completions that are due; returns the next due time. */
static uint64_t fifo_flush(struct sv_qp *qp, struct sv_fifo *f)
{
    uint64_t now = now_ns();
    while (f->count) {
        struct sv_pend *p = &f->v[f->head];
        if (p->due_ns > now)
            return p->due_ns;
        struct sv_cqe e = p->e;
        f->head = (f->head + 1) % f->cap;
        f->count--;
        deliver(qp, &e, 0);
    }
    return SV_FOREVER;
}

static void complete(struct sv_qp *qp, int is_send, uint64_t wr_id, uint64_t seq, int status, int opcode,
                     uint32_t len, int with_imm, uint32_t imm, int vendor_err)
{
    struct sv_cqe e;
    memset(&e, 0, sizeof e);
    e.wc.wr_id = wr_id;
    e.wc.status = (enum ibv_wc_status)status;
    e.wc.opcode = (enum ibv_wc_opcode)opcode;
    e.wc.vendor_err = (uint32_t)vendor_err;
    e.wc.byte_len = len;
    e.wc.qp_num = qp->qp.qp_num;
    e.wc.src_qp = qp->dest_qpn;
    if (with_imm) {
        e.wc.imm_data = imm;
        e.wc.wc_flags = IBV_WC_WITH_IMM;
    }
    e.qp = qp;
    e.seq = seq;
    e.is_send = is_send;
    if (G.jitter_ns)
        fifo_push(qp, is_send ? &qp->pend_send : &qp->pend_recv, &e);
    else
        deliver(qp, &e, 0);
}

static int wc_opcode_of(int wr_opcode)
{
    return wr_opcode == IBV_WR_RDMA_WRITE || wr_opcode == IBV_WR_RDMA_WRITE_WITH_IMM ? IBV_WC_RDMA_WRITE
                                                                                      : IBV_WC_SEND;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void out_reset(struct sv_qp *qp)
{
    close_fd(&qp->out_fd);
    qp->out_hello_off = qp->out_hdr_off = qp->out_resp_off = 0;
    qp->out_pay_off = 0;
    qp->out_started = 0;
}

static void in_reset(struct sv_qp *qp, const char *why)
{
    if (why && qp->in_fd >= 0)
        sv_log("QP %u: inbound connection closed: %s", qp->qp.qp_num, why);
    close_fd(&qp->in_fd);
    qp->rx_phase = RX_HELLO;
    qp->in_hello_off = qp->in_hdr_off = 0;
    qp->in_hello_ok = 0;
    qp->resp_head = qp->resp_count = 0;
    qp->resp_off = 0;
}

/* The QP enters the error state: every outstanding WR completes with
 * IBV_WC_WR_FLUSH_ERR (signaled or not), and its connections close. */
static void qp_to_err(struct sv_qp *qp)
{
    if (qp->state == IBV_QPS_ERR)
        return;
    qp->state = IBV_QPS_ERR;
    for (uint64_t s = qp->sq_acked; s < qp->sq_posted; s++) {
        struct sv_swr *w = &qp->sq[s % qp->max_send_wr];
        complete(qp, 1, w->wr_id, s, IBV_WC_WR_FLUSH_ERR, wc_opcode_of(w->opcode), 0, 0, 0, 0);
    }
    qp->sq_acked = qp->sq_tx = qp->sq_posted;
    for (uint64_t s = qp->rq_used; s < qp->rq_posted; s++)
        complete(qp, 0, qp->rq[s % qp->max_recv_wr].wr_id, s, IBV_WC_WR_FLUSH_ERR, IBV_WC_RECV, 0, 0, 0, 0);
    qp->rq_used = qp->rq_posted;
    out_reset(qp);
    if (qp->in_fd >= 0)
        flush_responses(qp); /* a NAK that says why goes out first */
    in_reset(qp, "the QP was reset or went to ERR");
}

/* The WR at sq_acked failed: it completes with status, the QP goes to ERR. */
static void send_failed(struct sv_qp *qp, int status, int vendor_err)
{
    if (qp->sq_acked < qp->sq_posted) {
        struct sv_swr *w = &qp->sq[qp->sq_acked % qp->max_send_wr];
        complete(qp, 1, w->wr_id, qp->sq_acked, status, wc_opcode_of(w->opcode), 0, 0, 0, vendor_err);
        qp->sq_acked++;
        if (qp->sq_tx < qp->sq_acked)
            qp->sq_tx = qp->sq_acked;
    }
    qp_to_err(qp);
}

/* The WR at sq_acked succeeded. */
static void send_done(struct sv_qp *qp)
{
    struct sv_swr *w = &qp->sq[qp->sq_acked % qp->max_send_wr];
    if ((w->flags & IBV_SEND_SIGNALED) || qp->sig_all)
        complete(qp, 1, w->wr_id, qp->sq_acked, IBV_WC_SUCCESS, wc_opcode_of(w->opcode), w->len, 0, 0, 0);
    qp->sq_acked++;
}

/* ---- queue pairs: requester -------------------------------------------- */

static void out_lost(struct sv_qp *qp, const char *why)
{
    if (qp->type == IBV_QPT_RC) {
        if (!qp->out_failed) {
            sv_log("QP %u -> %u: %s; RC retries until its retry window ends", qp->qp.qp_num, qp->dest_qpn, why);
            qp->out_failed = 1;
            qp->out_down_ns = now_ns();
        }
        close_fd(&qp->out_fd);
    } else {
        sv_log("QP %u -> %u: %s; UC messages are lost", qp->qp.qp_num, qp->dest_qpn, why);
        out_reset(qp);
    }
}

static void out_connect(struct sv_qp *qp)
{
    char path[sizeof qp->path];
    if (qp_path(path, sizeof path, gid_to_ip(&qp->dgid), qp->dest_qpn) != 0) {
        out_lost(qp, "no route to the destination GID");
        return;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) {
        out_lost(qp, "no socket");
        return;
    }
    set_nonblock_cloexec(fd);
    sock_setup(fd);
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, path, strlen(path) + 1);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0 && errno != EINPROGRESS) {
        int e = errno;
        close(fd);
        if (e == EAGAIN)
            return; /* backlog full: try again on the next turn */
        char why[160];
        snprintf(why, sizeof why, "no QP %u at the destination GID (%s)", qp->dest_qpn, strerror(e));
        out_lost(qp, why);
        return;
    }
    qp->out_fd = fd;
    struct sv_hello *h = &qp->out_hello;
    memset(h, 0, sizeof *h);
    h->magic = SV_WIRE_MAGIC;
    h->version = SV_WIRE_VERSION;
    h->qp_type = (uint32_t)qp->type;
    h->src_qpn = qp->qp.qp_num;
    h->dst_qpn = qp->dest_qpn;
    h->path_mtu = (uint32_t)qp->path_mtu;
    memcpy(h->src_gid, qp->c->dev->gid[qp->sgid_index].raw, 16);
    memcpy(h->dst_gid, qp->dgid.raw, 16);
    h->timeout = qp->timeout;
    h->retry_cnt = qp->retry_cnt;
    h->rnr_retry = qp->rnr_retry;
    qp->out_hello_off = 0;
}

/* Checks the local buffers of w (at transmit time); 0 or the WC status. */
static int check_local(struct sv_qp *qp, struct sv_swr *w, int *vendor_err)
{
    uint64_t total = 0;
    if (!(w->flags & IBV_SEND_INLINE)) {
        for (int i = 0; i < w->nsge; i++) {
            int why;
            struct sv_mr *m = mr_get(w->sge[i].lkey, 0, qp->pd, 0, w->sge[i].addr, w->sge[i].length, &why);
            if (!m) {
                sv_log("QP %u: send WR %llu, sge %d, lkey 0x%x: %s", qp->qp.qp_num,
                       (unsigned long long)w->wr_id, i, w->sge[i].lkey, mr_why(why));
                *vendor_err = why;
                return IBV_WC_LOC_PROT_ERR;
            }
            mr_put(m);
            total += w->sge[i].length;
        }
    } else {
        total = w->len;
    }
    if (total > SV_MAX_MSG) {
        *vendor_err = 0x60;
        return IBV_WC_LOC_LEN_ERR;
    }
    w->len = (uint32_t)total;
    return 0;
}

/* Sends what it can of w's header and payload; 1 when all is sent, 0 when
 * the socket is full, -1 when the stream is broken (out_lost called) and
 * -2 when a local region vanished under the transfer (QP in ERR). */
static int send_some(struct sv_qp *qp, struct sv_swr *w)
{
    for (;;) {
        struct iovec iov[2];
        int n = 0;
        struct sv_mr *m = NULL;
        if (qp->out_hdr_off < sizeof qp->out_hdr) {
            iov[n].iov_base = (char *)&qp->out_hdr + qp->out_hdr_off;
            iov[n++].iov_len = sizeof qp->out_hdr - qp->out_hdr_off;
        }
        if (qp->out_pay_off < w->len) {
            /* the piece of payload at out_pay_off */
            if (w->flags & IBV_SEND_INLINE) {
                iov[n].iov_base = qp->inl + (size_t)(w->seq % qp->max_send_wr) * qp->max_inline + qp->out_pay_off;
                iov[n++].iov_len = w->len - qp->out_pay_off;
            } else {
                uint64_t off = qp->out_pay_off;
                int i = 0;
                while (off >= w->sge[i].length)
                    off -= w->sge[i++].length;
                uint64_t take = w->sge[i].length - off;
                if (take > SV_CHUNK)
                    take = SV_CHUNK;
                int why;
                m = mr_get(w->sge[i].lkey, 0, qp->pd, 0, w->sge[i].addr + off, take, &why);
                if (!m) {
                    sv_log("QP %u: send WR %llu: local region gone during the transfer: %s", qp->qp.qp_num,
                           (unsigned long long)w->wr_id, mr_why(why));
                    send_failed(qp, IBV_WC_LOC_PROT_ERR, why);
                    return -2;
                }
                iov[n].iov_base = (void *)(uintptr_t)(w->sge[i].addr + off);
                iov[n++].iov_len = take;
            }
        }
        if (n == 0)
            return 1;
        struct msghdr mh;
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = iov;
        mh.msg_iovlen = n;
        ssize_t r = sendmsg(qp->out_fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (m)
            mr_put(m);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (errno == EINTR)
                continue;
            out_lost(qp, "the connection broke while sending");
            return -1;
        }
        size_t hdr_left = sizeof qp->out_hdr - qp->out_hdr_off;
        if ((size_t)r <= hdr_left) {
            qp->out_hdr_off += (size_t)r;
        } else {
            qp->out_hdr_off = sizeof qp->out_hdr;
            qp->out_pay_off += (size_t)r - hdr_left;
        }
    }
}

static void handle_resp(struct sv_qp *qp, const struct sv_resp *r)
{
    if (qp->sq_acked >= qp->sq_tx) {
        sv_log("QP %u: response to nothing; connection dropped", qp->qp.qp_num);
        out_lost(qp, "a response to no request");
        return;
    }
    struct sv_swr *w = &qp->sq[qp->sq_acked % qp->max_send_wr];
    switch (r->type) {
    case SV_ACK:
        send_done(qp);
        break;
    case SV_RNR_WAIT:
        w->rnr_waiting = 1;
        break;
    case SV_NAK_RNR:
        send_failed(qp, IBV_WC_RNR_RETRY_EXC_ERR, 0);
        break;
    case SV_NAK_ACCESS:
        send_failed(qp, IBV_WC_REM_ACCESS_ERR, 0);
        break;
    case SV_NAK_INV_REQ:
        send_failed(qp, IBV_WC_REM_INV_REQ_ERR, 0);
        break;
    case SV_NAK_REM_OP:
        send_failed(qp, IBV_WC_REM_OP_ERR, 0);
        break;
    case SV_NAK_SEQ:
    case SV_NAK_RETRY:
        send_failed(qp, IBV_WC_RETRY_EXC_ERR, 0);
        break;
    default:
        out_lost(qp, "a malformed response");
    }
}

/* Reads the responses (RC) or notices the end of the connection (UC). */
static void read_responses(struct sv_qp *qp)
{
    while (qp->out_fd >= 0) {
        char *p = (char *)&qp->out_resp + qp->out_resp_off;
        ssize_t r = recv(qp->out_fd, p, sizeof qp->out_resp - qp->out_resp_off, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            out_lost(qp, "the responder closed the connection");
            return;
        }
        if (r < 0)
            return;
        if (qp->type != IBV_QPT_RC) {
            out_lost(qp, "a response on a UC connection");
            return;
        }
        qp->out_resp_off += (size_t)r;
        if (qp->out_resp_off == sizeof qp->out_resp) {
            qp->out_resp_off = 0;
            struct sv_resp resp = qp->out_resp;
            handle_resp(qp, &resp);
        }
    }
}

/* Moves the send queue; returns the time it next needs to run (jitter). */
static uint64_t progress_tx(struct sv_qp *qp, int *want_pollout)
{
    *want_pollout = 0;
    if (qp->state != IBV_QPS_RTS)
        return SV_FOREVER;
    if (qp->out_fd >= 0)
        read_responses(qp);
    if (qp->state != IBV_QPS_RTS)
        return SV_FOREVER;
    if (qp->type == IBV_QPT_RC && qp->out_failed) {
        if (qp->sq_acked == qp->sq_posted)
            return SV_FOREVER;
        uint64_t window = retry_window_ns(qp->timeout, qp->retry_cnt);
        if (window == SV_FOREVER)
            return SV_FOREVER;
        uint64_t now = now_ns();
        uint64_t start = qp->out_down_ns;
        if (now - start >= window) {
            send_failed(qp, IBV_WC_RETRY_EXC_ERR, 0);
            return SV_FOREVER;
        }
        return start + window;
    }
    while (qp->sq_tx < qp->sq_posted && qp->state == IBV_QPS_RTS) {
        struct sv_swr *w = &qp->sq[qp->sq_tx % qp->max_send_wr];
        if (!qp->out_started) {
            if (w->due_ns && w->due_ns > now_ns())
                return w->due_ns;
            int vendor = 0;
            int st = check_local(qp, w, &vendor);
            if (st) {
                /* A local error fails this WR; the ones before it that are
                 * still unacknowledged are flushed, in order, as are the
                 * ones after it. */
                while (qp->sq_acked < qp->sq_tx) {
                    struct sv_swr *f = &qp->sq[qp->sq_acked % qp->max_send_wr];
                    complete(qp, 1, f->wr_id, qp->sq_acked, IBV_WC_WR_FLUSH_ERR, wc_opcode_of(f->opcode), 0, 0, 0, 0);
                    qp->sq_acked++;
                }
                send_failed(qp, st, vendor);
                return SV_FOREVER;
            }
            if (qp->out_fd < 0) {
                out_connect(qp);
                if (qp->out_fd < 0) {
                    if (qp->type == IBV_QPT_RC)
                        return qp->out_failed ? now_ns() : now_ns() + 1000000;
                    /* UC: nobody there; the message is lost, the send completes */
                    if (qp->sq_acked == qp->sq_tx) {
                        qp->sq_tx++;
                        send_done(qp);
                        continue;
                    }
                    return SV_FOREVER;
                }
            }
            memset(&qp->out_hdr, 0, sizeof qp->out_hdr);
            qp->out_hdr.opcode = (uint8_t)w->opcode;
            qp->out_hdr.solicited = (w->flags & IBV_SEND_SOLICITED) != 0;
            qp->out_hdr.psn = w->psn;
            qp->out_hdr.len = w->len;
            qp->out_hdr.imm = w->imm;
            qp->out_hdr.rkey = w->rkey;
            qp->out_hdr.raddr = w->raddr;
            qp->out_hdr.seq = w->seq;
            /* A lossy link (UC only: RC would retransmit): every Nth message
             * after the first K is lost on the way. It still crosses the
             * socket, marked, so that the responder discards it as a lost
             * message's packets: its PSN advances and the next message is
             * taken; the requester completes it successfully, as UC does. */
            if (qp->type == IBV_QPT_UC && G.drop_every &&
                (!G.drop_writes || w->opcode == IBV_WR_RDMA_WRITE || w->opcode == IBV_WR_RDMA_WRITE_WITH_IMM)) {
                uint64_t n = ++qp->out_msgs;
                qp->out_hdr.lost = n > G.drop_after && (n - G.drop_after) % G.drop_every == 0;
            }
            qp->out_hdr_off = 0;
            qp->out_pay_off = 0;
            qp->out_started = 1;
        }
        /* the hello goes first on a new connection */
        while (qp->out_hello_off < sizeof qp->out_hello) {
            ssize_t r = send(qp->out_fd, (char *)&qp->out_hello + qp->out_hello_off,
                             sizeof qp->out_hello - qp->out_hello_off, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                *want_pollout = 1;
                return SV_FOREVER;
            }
            if (r < 0) {
                out_lost(qp, "the connection broke while sending");
                break;
            }
            qp->out_hello_off += (size_t)r;
        }
        int r = qp->out_fd < 0 ? -1 : send_some(qp, w);
        if (r == 0) {
            *want_pollout = 1;
            return SV_FOREVER;
        }
        if (r == -2)
            return SV_FOREVER;
        qp->out_started = 0;
        if (r == -1) {
            if (qp->type == IBV_QPT_RC)
                return now_ns();
            /* UC: whatever was on the way is lost; the send completes */
        }
        if (G.log > 1)
            sv_log("QP %u: sent seq %llu psn %u len %u", qp->qp.qp_num, (unsigned long long)w->seq, w->psn, w->len);
        qp->sq_tx++;
        if (qp->type == IBV_QPT_UC) {
            while (qp->sq_acked < qp->sq_tx)
                send_done(qp);
        }
    }
    return SV_FOREVER;
}

/* ---- queue pairs: responder -------------------------------------------- */

static void respond(struct sv_qp *qp, int type, const struct sv_msg *m)
{
    if (qp->type != IBV_QPT_RC || qp->resp_count == SV_RESP_RING)
        return;
    struct sv_resp *r = &qp->resp[(qp->resp_head + qp->resp_count++) % SV_RESP_RING];
    memset(r, 0, sizeof *r);
    r->type = (uint8_t)type;
    r->psn = m->psn;
    r->seq = m->seq;
}

/* Writes queued responses; 0 when the socket is full, -1 when broken. */
static int flush_responses(struct sv_qp *qp)
{
    while (qp->resp_count) {
        struct sv_resp *r = &qp->resp[qp->resp_head];
        ssize_t n = send(qp->in_fd, (char *)r + qp->resp_off, sizeof *r - qp->resp_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (errno == EINTR)
                continue;
            return -1;
        }
        qp->resp_off += (size_t)n;
        if (qp->resp_off == sizeof *r) {
            qp->resp_off = 0;
            qp->resp_head = (qp->resp_head + 1) % SV_RESP_RING;
            qp->resp_count--;
        }
    }
    return 1;
}

/* Reads up to len bytes into buf; the count, 0 when nothing is there, -1
 * at the end of the stream or an error. */
static ssize_t read_in(struct sv_qp *qp, void *buf, size_t len)
{
    for (;;) {
        ssize_t n = recv(qp->in_fd, buf, len, MSG_DONTWAIT);
        if (n > 0)
            return n;
        if (n == 0)
            return -1;
        if (errno == EINTR)
            continue;
        return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
    }
}

static int hello_matches(struct sv_qp *qp)
{
    const struct sv_hello *h = &qp->in_hello;
    const union ibv_gid *mine = qp->c->dev->gid;
    return h->qp_type == (uint32_t)qp->type && h->dst_qpn == qp->qp.qp_num && h->src_qpn == qp->dest_qpn &&
           !memcmp(h->src_gid, qp->dgid.raw, 16) &&
           (!memcmp(h->dst_gid, mine[0].raw, 16) || !memcmp(h->dst_gid, mine[1].raw, 16));
}

static int recv_ready(struct sv_qp *qp)
{
    return qp->state == IBV_QPS_RTR || qp->state == IBV_QPS_RTS;
}

/* The message in in_hdr cannot be delivered: RC answers type and stops
 * taking messages from this connection (the requester's QP goes to ERR);
 * UC drops the message quietly. */
static void rx_reject(struct sv_qp *qp, int nak, const char *why)
{
    const struct sv_msg *m = &qp->in_hdr;
    sv_log("QP %u <- %u: message psn %u (%u bytes) %s: %s", qp->qp.qp_num, qp->in_hello.src_qpn, m->psn, m->len,
           qp->type == IBV_QPT_RC ? "refused" : "dropped", why);
    if (qp->type == IBV_QPT_RC) {
        respond(qp, nak, m);
        qp->rx_phase = RX_DRAIN;
    } else {
        /* the packets arrived in sequence; only the message is lost */
        if (m->psn == qp->rq_expect_psn && recv_ready(qp))
            qp->rq_expect_psn = (m->psn + npackets(m->len, (int)qp->in_hello.path_mtu)) & SV_PSN_MASK;
        qp->rx_phase = RX_DISCARD;
        qp->rx_left = m->len;
    }
}

/* Starts placing the message in in_hdr, or rejects it. */
static void rx_begin(struct sv_qp *qp)
{
    struct sv_msg *m = &qp->in_hdr;
    int op = m->opcode;
    int is_write = op == IBV_WR_RDMA_WRITE || op == IBV_WR_RDMA_WRITE_WITH_IMM;
    qp->rx_need_recv = op != IBV_WR_RDMA_WRITE;
    qp->rx_off = 0;
    qp->rx_left = m->len;
    qp->rx_status = 0;
    if (is_write && m->len > 0) {
        int why = 0;
        struct sv_mr *mr = NULL;
        if (!(qp->access & IBV_ACCESS_REMOTE_WRITE))
            why = MR_ACCESS;
        else
            mr = mr_get(m->rkey, 1, qp->pd, IBV_ACCESS_REMOTE_WRITE, m->raddr, m->len, &why);
        if (!mr) {
            char msg[160];
            snprintf(msg, sizeof msg, "RDMA WRITE to 0x%llx, rkey 0x%x: %s%s", (unsigned long long)m->raddr, m->rkey,
                     mr_why(why), qp->access & IBV_ACCESS_REMOTE_WRITE ? "" : " (the QP lacks remote write access)");
            rx_reject(qp, SV_NAK_ACCESS, msg);
            if (qp->type == IBV_QPT_RC)
                qp_to_err(qp); /* a responder access violation ends the QP */
            return;
        }
        mr_put(mr);
    }
    if (qp->rx_need_recv) {
        if (qp->rq_used == qp->rq_posted) {
            if (qp->type == IBV_QPT_UC && !G.uc_wait) {
                rx_reject(qp, 0, "no receive posted");
                return;
            }
            qp->rx_phase = RX_RNR;
            qp->rx_since_ns = now_ns();
            respond(qp, SV_RNR_WAIT, m);
            return;
        }
        qp->rx_rwr = qp->rq[qp->rq_used % qp->max_recv_wr];
        qp->rq_used++;
        if (!is_write) {
            uint64_t room = 0;
            for (int i = 0; i < qp->rx_rwr.nsge; i++) {
                int why;
                struct ibv_sge *s = &qp->rx_rwr.sge[i];
                struct sv_mr *mr = mr_get(s->lkey, 0, qp->pd, IBV_ACCESS_LOCAL_WRITE, s->addr, s->length, &why);
                if (!mr) {
                    sv_log("QP %u: receive WR %llu, sge %d, lkey 0x%x: %s", qp->qp.qp_num,
                           (unsigned long long)qp->rx_rwr.wr_id, i, s->lkey, mr_why(why));
                    complete(qp, 0, qp->rx_rwr.wr_id, qp->rx_rwr.seq, IBV_WC_LOC_PROT_ERR, IBV_WC_RECV, 0, 0, 0, why);
                    rx_reject(qp, SV_NAK_REM_OP, "the receive buffer is not a valid local region");
                    qp_to_err(qp);
                    return;
                }
                mr_put(mr);
                room += s->length;
            }
            if (room < m->len) {
                complete(qp, 0, qp->rx_rwr.wr_id, qp->rx_rwr.seq, IBV_WC_LOC_LEN_ERR, IBV_WC_RECV, 0, 0, 0, 0x61);
                rx_reject(qp, SV_NAK_INV_REQ, "the message is longer than the receive buffers");
                qp_to_err(qp);
                return;
            }
        }
    }
    qp->rx_phase = RX_PAYLOAD;
}

/* The message is placed: complete the receive, acknowledge, advance PSN. */
static void rx_end(struct sv_qp *qp)
{
    struct sv_msg *m = &qp->in_hdr;
    if (G.log > 1)
        sv_log("QP %u: received seq %llu psn %u len %u", qp->qp.qp_num, (unsigned long long)m->seq, m->psn, m->len);
    qp->rq_expect_psn = (m->psn + npackets(m->len, (int)qp->in_hello.path_mtu)) & SV_PSN_MASK;
    if (qp->rx_need_recv) {
        int op = m->opcode == IBV_WR_RDMA_WRITE_WITH_IMM ? IBV_WC_RECV_RDMA_WITH_IMM : IBV_WC_RECV;
        int imm = m->opcode == IBV_WR_RDMA_WRITE_WITH_IMM || m->opcode == IBV_WR_SEND_WITH_IMM;
        complete(qp, 0, qp->rx_rwr.wr_id, qp->rx_rwr.seq, IBV_WC_SUCCESS, op, m->len, imm, m->imm, 0);
    }
    respond(qp, SV_ACK, m);
    qp->rx_phase = RX_HDR;
    qp->in_hdr_off = 0;
}

/* Reads payload into its place; 1 done, 0 waiting for bytes, -1 broken. */
static int rx_place(struct sv_qp *qp)
{
    struct sv_msg *m = &qp->in_hdr;
    int is_write = m->opcode == IBV_WR_RDMA_WRITE || m->opcode == IBV_WR_RDMA_WRITE_WITH_IMM;
    while (qp->rx_left) {
        uint64_t addr, take;
        uint32_t key;
        int remote = is_write;
        unsigned need = is_write ? IBV_ACCESS_REMOTE_WRITE : IBV_ACCESS_LOCAL_WRITE;
        if (is_write) {
            addr = m->raddr + qp->rx_off;
            key = m->rkey;
            take = qp->rx_left;
        } else {
            uint64_t off = qp->rx_off;
            int i = 0;
            while (off >= qp->rx_rwr.sge[i].length)
                off -= qp->rx_rwr.sge[i++].length;
            addr = qp->rx_rwr.sge[i].addr + off;
            key = qp->rx_rwr.sge[i].lkey;
            take = qp->rx_rwr.sge[i].length - off;
            if (take > qp->rx_left)
                take = qp->rx_left;
        }
        if (take > SV_CHUNK)
            take = SV_CHUNK;
        int why;
        struct sv_mr *mr = mr_get(key, remote, qp->pd, need, addr, take, &why);
        if (!mr) {
            /* deregistered while the message arrived */
            sv_log("QP %u: region gone while placing a message: %s", qp->qp.qp_num, mr_why(why));
            if (qp->rx_need_recv)
                complete(qp, 0, qp->rx_rwr.wr_id, qp->rx_rwr.seq,
                         is_write ? IBV_WC_REM_ACCESS_ERR : IBV_WC_LOC_PROT_ERR, IBV_WC_RECV, 0, 0, 0, why);
            rx_reject(qp, is_write ? SV_NAK_ACCESS : SV_NAK_REM_OP, "region deregistered during the transfer");
            if (qp->type == IBV_QPT_RC)
                qp_to_err(qp);
            else
                qp->rx_left = m->len - qp->rx_off; /* discard the rest */
            return 1;
        }
        ssize_t n = read_in(qp, (void *)(uintptr_t)addr, take);
        mr_put(mr);
        if (n <= 0)
            return (int)n;
        qp->rx_off += (uint64_t)n;
        qp->rx_left -= (uint64_t)n;
    }
    rx_end(qp);
    return 1;
}

/* A complete header, in in_hdr, reaches a QP in RTR or RTS: check where it
 * comes from and its PSN, and start on it. -1 when the connection closed. */
static int rx_header(struct sv_qp *qp)
{
    struct sv_msg *m = &qp->in_hdr;
    if (!qp->in_hello_ok) {
        if (!hello_matches(qp)) {
            sv_log("QP %u: a connection from QP %u, which is not this QP's destination (QP %u); closed",
                   qp->qp.qp_num, qp->in_hello.src_qpn, qp->dest_qpn);
            in_reset(qp, NULL);
            return -1;
        }
        qp->in_hello_ok = 1;
    }
    if (m->psn != qp->rq_expect_psn) {
        char why[96];
        snprintf(why, sizeof why, "PSN %u where %u was expected", m->psn, qp->rq_expect_psn);
        rx_reject(qp, SV_NAK_SEQ, why);
        return 0;
    }
    if (m->lost && qp->type == IBV_QPT_UC) {
        rx_reject(qp, 0, "lost on the link (SOFTVERBS_DROP_EVERY)");
        return 0;
    }
    rx_begin(qp);
    return 0;
}

/* Moves the receive side; returns when it next needs to run. */
static uint64_t progress_rx(struct sv_qp *qp, int *want_pollin, int *want_pollout)
{
    *want_pollin = *want_pollout = 0;
    uint64_t next = SV_FOREVER;
    while (qp->in_fd >= 0) {
        int fr = flush_responses(qp);
        if (fr < 0) {
            in_reset(qp, "the connection broke while writing responses");
            break;
        }
        if (fr == 0 && qp->resp_count >= SV_RESP_RING - 2) {
            *want_pollout = 1; /* stop reading until the requester reads */
            break;
        }
        if (fr == 0)
            *want_pollout = 1;
        ssize_t n;
        switch (qp->rx_phase) {
        case RX_HELLO:
            n = read_in(qp, (char *)&qp->in_hello + qp->in_hello_off, sizeof qp->in_hello - qp->in_hello_off);
            if (n < 0) {
                in_reset(qp, "end of stream in the hello");
                continue;
            }
            if (n == 0) {
                *want_pollin = 1;
                return next;
            }
            qp->in_hello_off += (size_t)n;
            if (qp->in_hello_off == sizeof qp->in_hello) {
                if (qp->in_hello.magic != SV_WIRE_MAGIC || qp->in_hello.version != SV_WIRE_VERSION) {
                    sv_log("QP %u: a connection that is not softverbs %d; closed", qp->qp.qp_num, SV_WIRE_VERSION);
                    in_reset(qp, NULL);
                    continue;
                }
                qp->rx_phase = RX_HDR;
                qp->in_hdr_off = 0;
            }
            break;
        case RX_HDR:
            n = read_in(qp, (char *)&qp->in_hdr + qp->in_hdr_off, sizeof qp->in_hdr - qp->in_hdr_off);
            if (n < 0) {
                in_reset(qp, "end of stream between messages");
                continue;
            }
            if (n == 0) {
                *want_pollin = 1;
                return next;
            }
            qp->in_hdr_off += (size_t)n;
            if (qp->in_hdr_off < sizeof qp->in_hdr)
                break;
            {
                struct sv_msg *m = &qp->in_hdr;
                if (m->len > SV_MAX_MSG || m->opcode > IBV_WR_SEND_WITH_IMM) {
                    sv_log("QP %u: malformed message (opcode %u, %u bytes); connection closed", qp->qp.qp_num,
                           m->opcode, m->len);
                    in_reset(qp, NULL);
                    continue;
                }
                if (!recv_ready(qp)) {
                    if (qp->type == IBV_QPT_UC) {
                        rx_reject(qp, 0, "the QP is not ready to receive (not in RTR or RTS)");
                        break;
                    }
                    /* RC: the requester retries until we are in RTR */
                    qp->rx_phase = RX_HELD;
                    qp->rx_since_ns = now_ns();
                    break;
                }
                if (rx_header(qp) < 0)
                    continue;
            }
            break;
        case RX_HELD: {
            if (recv_ready(qp)) {
                if (rx_header(qp) < 0)
                    continue;
                break;
            }
            uint64_t w = retry_window_ns(qp->in_hello.timeout, qp->in_hello.retry_cnt);
            if (w != SV_FOREVER && now_ns() - qp->rx_since_ns >= w) {
                rx_reject(qp, SV_NAK_RETRY, "the QP did not reach RTR within the requester's retry window");
                break;
            }
            return w == SV_FOREVER ? next : qp->rx_since_ns + w;
        }
        case RX_RNR: {
            if (qp->rq_used < qp->rq_posted) {
                rx_begin(qp);
                break;
            }
            /* UC in SOFTVERBS_UC_NORECV=wait: the link holds the message */
            uint64_t w = qp->type == IBV_QPT_UC ? SV_FOREVER : rnr_window_ns(qp->min_rnr_timer, qp->in_hello.rnr_retry);
            if (w != SV_FOREVER && now_ns() - qp->rx_since_ns >= w) {
                rx_reject(qp, SV_NAK_RNR, "no receive posted within the RNR retry window");
                break;
            }
            return w == SV_FOREVER ? next : qp->rx_since_ns + w;
        }
        case RX_PAYLOAD: {
            int r = rx_place(qp);
            if (r < 0) {
                in_reset(qp, "end of stream inside a message");
                continue;
            }
            if (r == 0) {
                *want_pollin = 1;
                return next;
            }
            break;
        }
        case RX_DISCARD:
        case RX_DRAIN: {
            size_t want = qp->rx_phase == RX_DRAIN || qp->rx_left > SV_SCRATCH ? SV_SCRATCH : (size_t)qp->rx_left;
            if (qp->rx_phase == RX_DISCARD && qp->rx_left == 0) {
                qp->rx_phase = RX_HDR;
                qp->in_hdr_off = 0;
                break;
            }
            n = read_in(qp, qp->scratch, want);
            if (n < 0) {
                in_reset(qp, "end of stream while dropping a message");
                continue;
            }
            if (n == 0) {
                *want_pollin = 1;
                return next;
            }
            if (qp->rx_phase == RX_DISCARD)
                qp->rx_left -= (uint64_t)n;
            break;
        }
        }
        if (qp->state == IBV_QPS_ERR && qp->in_fd < 0)
            break;
    }
    return next;
}

static void accept_new(struct sv_qp *qp)
{
    for (;;) {
        int fd = accept(qp->listen_fd, NULL, NULL);
        if (fd < 0)
            return;
        if (qp->in_fd >= 0) {
            /* One requester per QP: a second connection is refused, unless
             * the first one has ended (the peer reconnected). */
            char b;
            ssize_t n = recv(qp->in_fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
            if (!(n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK))) {
                close(fd);
                continue;
            }
        }
        set_nonblock_cloexec(fd);
        sock_setup(fd);
        in_reset(qp, "the requester reconnected");
        qp->in_fd = fd;
    }
}

static void *qp_thread(void *arg)
{
    struct sv_qp *qp = arg;
    pthread_mutex_lock(&qp->lock);
    while (!qp->stop) {
        int tx_out, rx_in, rx_out;
        uint64_t next = progress_tx(qp, &tx_out);
        uint64_t t = progress_rx(qp, &rx_in, &rx_out);
        if (t < next)
            next = t;
        if (G.jitter_ns) {
            t = fifo_flush(qp, &qp->pend_send);
            if (t < next)
                next = t;
            t = fifo_flush(qp, &qp->pend_recv);
            if (t < next)
                next = t;
        }
        struct pollfd pf[4];
        int n = 0;
        pf[n].fd = qp->wake_r;
        pf[n++].events = POLLIN;
        pf[n].fd = qp->listen_fd;
        pf[n++].events = POLLIN;
        if (qp->in_fd >= 0) {
            pf[n].fd = qp->in_fd;
            pf[n++].events = (short)((rx_in ? POLLIN : 0) | (rx_out ? POLLOUT : 0));
        }
        if (qp->out_fd >= 0) {
            pf[n].fd = qp->out_fd;
            pf[n++].events = (short)(POLLIN | (tx_out ? POLLOUT : 0));
        }
        uint64_t wait_ns = 1000000000u; /* nothing to time: look again in 1 s */
        if (next != SV_FOREVER) {
            uint64_t now = now_ns();
            wait_ns = next <= now ? 0 : next - now;
            if (wait_ns > 1000000000u)
                wait_ns = 1000000000u;
        }
        pthread_mutex_unlock(&qp->lock);
#ifdef __linux__
        struct timespec ts = {(time_t)(wait_ns / 1000000000u), (long)(wait_ns % 1000000000u)};
        ppoll(pf, (nfds_t)n, &ts, NULL);
#else
        poll(pf, (nfds_t)n, (int)((wait_ns + 999999) / 1000000));
#endif
        if (pf[0].revents & POLLIN) {
            /* Drain, then clear: a wake that comes after the clear writes
             * a new byte; one between the drain and the clear is seen
             * anyway, as the loop looks at the queues next. */
            char buf[64];
            while (read(qp->wake_r, buf, sizeof buf) > 0)
                ;
            atomic_store(&qp->wake_pending, 0);
        }
        pthread_mutex_lock(&qp->lock);
        if (pf[1].revents & POLLIN)
            accept_new(qp);
    }
    pthread_mutex_unlock(&qp->lock);
    return NULL;
}

/* ---- queue pairs: verbs ------------------------------------------------- */

static int qp_bind(struct sv_qp *qp)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0)
        return errno;
    set_nonblock_cloexec(fd);
    for (int tries = 0; tries < 64; tries++) {
        uint32_t qpn;
        pthread_mutex_lock(&G.lock);
        qpn = (uint32_t)(rng_next(&G.rng) % (SV_PSN_MASK - 16)) + 16;
        pthread_mutex_unlock(&G.lock);
        struct sockaddr_un sa;
        memset(&sa, 0, sizeof sa);
        sa.sun_family = AF_UNIX;
        if (qp_path(sa.sun_path, sizeof sa.sun_path, qp->c->dev->ip, qpn) != 0)
            break;
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
            if (listen(fd, 16) != 0)
                break;
            qp->listen_fd = fd;
            qp->qp.qp_num = qpn;
            memcpy(qp->path, sa.sun_path, sizeof qp->path);
            return 0;
        }
        if (errno != EADDRINUSE)
            break;
        /* taken; if by a process that died, take the name over */
        int probe = socket(AF_UNIX, SOCK_STREAM, 0);
        if (probe >= 0) {
            if (connect(probe, (struct sockaddr *)&sa, sizeof sa) != 0 && errno == ECONNREFUSED)
                unlink(sa.sun_path);
            close(probe);
        }
    }
    int e = errno ? errno : EADDRINUSE;
    close(fd);
    return e;
}

static void qp_free(struct sv_qp *qp)
{
    if (qp->listen_fd >= 0) {
        close(qp->listen_fd);
        unlink(qp->path);
    }
    close_fd(&qp->in_fd);
    close_fd(&qp->out_fd);
    if (qp->wake_r >= 0)
        close(qp->wake_r);
    if (qp->wake_w >= 0)
        close(qp->wake_w);
    pthread_mutex_destroy(&qp->lock);
    pthread_mutex_destroy(&qp->qp.mutex);
    pthread_cond_destroy(&qp->qp.cond);
    free(qp->sq);
    free(qp->rq);
    free(qp->inl);
    free(qp->pend_send.v);
    free(qp->pend_recv.v);
    free(qp->scratch);
    free(qp);
}

SV_EXPORT struct ibv_qp *ibv_create_qp(struct ibv_pd *ibpd, struct ibv_qp_init_attr *a)
{
    struct sv_pd *pd = (struct sv_pd *)ibpd;
    if (!pd || !a || !a->send_cq || !a->recv_cq) {
        errno = EINVAL;
        return NULL;
    }
    struct sv_cq *scq = (struct sv_cq *)a->send_cq, *rcq = (struct sv_cq *)a->recv_cq;
    if (scq->c != pd->c || rcq->c != pd->c || a->srq) {
        errno = EINVAL; /* SRQ is not modelled */
        return NULL;
    }
    if (a->qp_type != IBV_QPT_RC && a->qp_type != IBV_QPT_UC) {
        errno = EOPNOTSUPP;
        return NULL;
    }
    if (a->qp_type == IBV_QPT_RC && pd->c->dev->uc_only) {
        sv_log("ibv_create_qp: device %s offers UC queue pairs only", pd->c->dev->dev.name);
        errno = EOPNOTSUPP;
        return NULL;
    }
    struct ibv_qp_cap *cap = &a->cap;
    if (cap->max_send_wr > SV_MAX_QP_WR || cap->max_recv_wr > SV_MAX_QP_WR || cap->max_send_sge > SV_MAX_SGE ||
        cap->max_recv_sge > SV_MAX_SGE || cap->max_inline_data > SV_MAX_INLINE) {
        errno = EINVAL;
        return NULL;
    }
    struct sv_qp *qp = calloc(1, sizeof *qp);
    if (!qp) {
        errno = ENOMEM;
        return NULL;
    }
    qp->listen_fd = qp->in_fd = qp->out_fd = qp->wake_r = qp->wake_w = -1;
    pthread_mutex_init(&qp->lock, NULL);
    pthread_mutex_init(&qp->qp.mutex, NULL);
    pthread_cond_init(&qp->qp.cond, NULL);
    qp->c = pd->c;
    qp->pd = pd;
    qp->scq = scq;
    qp->rcq = rcq;
    qp->type = a->qp_type;
    qp->state = IBV_QPS_RESET;
    qp->max_send_wr = cap->max_send_wr ? cap->max_send_wr : 1;
    qp->max_recv_wr = cap->max_recv_wr ? cap->max_recv_wr : 1;
    qp->max_send_sge = cap->max_send_sge;
    qp->max_recv_sge = cap->max_recv_sge;
    qp->max_inline = cap->max_inline_data;
    qp->sig_all = a->sq_sig_all != 0;
    qp->sgid_index = 1;
    qp->path_mtu = IBV_MTU_1024;
    qp->sq = calloc(qp->max_send_wr, sizeof *qp->sq);
    qp->rq = calloc(qp->max_recv_wr, sizeof *qp->rq);
    qp->inl = qp->max_inline ? calloc(qp->max_send_wr, qp->max_inline) : NULL;
    qp->pend_send.cap = qp->max_send_wr + 1;
    qp->pend_recv.cap = qp->max_recv_wr + 1;
    qp->pend_send.v = calloc(qp->pend_send.cap, sizeof *qp->pend_send.v);
    qp->pend_recv.v = calloc(qp->pend_recv.cap, sizeof *qp->pend_recv.v);
    qp->scratch = malloc(SV_SCRATCH);
    int fds[2] = {-1, -1};
    int err = 0;
    if (!qp->sq || !qp->rq || (qp->max_inline && !qp->inl) || !qp->pend_send.v || !qp->pend_recv.v || !qp->scratch)
        err = ENOMEM;
    else if (pipe(fds) != 0)
        err = errno;
    qp->wake_r = fds[0];
    qp->wake_w = fds[1];
    if (!err) {
        set_nonblock_cloexec(fds[0]);
        set_nonblock_cloexec(fds[1]);
        err = qp_bind(qp);
    }
    pthread_mutex_lock(&G.lock);
    qp->rng = rng_next(&G.rng);
    if (!err && pd->c->dev->nqp >= G.max_qp) {
        /* as Apple's devices do once their queue pairs are all in use */
        sv_log("ibv_create_qp: the device's %d queue pairs are all in use (SOFTVERBS_MAX_QP)", G.max_qp);
        err = EBUSY;
    }
    if (!err) {
        pd->c->nqp++;
        pd->c->dev->nqp++;
        pd->refs++;
        pthread_mutex_lock(&scq->lock);
        scq->refs++;
        pthread_mutex_unlock(&scq->lock);
        pthread_mutex_lock(&rcq->lock);
        rcq->refs++;
        pthread_mutex_unlock(&rcq->lock);
    }
    pthread_mutex_unlock(&G.lock);
    if (!err) {
        pthread_attr_t ta;
        pthread_attr_init(&ta);
        pthread_attr_setstacksize(&ta, 256 * 1024);
        err = pthread_create(&qp->thread, &ta, qp_thread, qp);
        pthread_attr_destroy(&ta);
        if (err) {
            pthread_mutex_lock(&G.lock);
            pd->c->nqp--;
            pd->c->dev->nqp--;
            pd->refs--;
            scq->refs--;
            rcq->refs--;
            pthread_mutex_unlock(&G.lock);
        }
    }
    if (err) {
        qp_free(qp);
        errno = err;
        return NULL;
    }
    qp->qp.context = &pd->c->ctx;
    qp->qp.qp_context = a->qp_context;
    qp->qp.pd = ibpd;
    qp->qp.send_cq = a->send_cq;
    qp->qp.recv_cq = a->recv_cq;
    qp->qp.srq = NULL;
    qp->qp.handle = qp->qp.qp_num;
    qp->qp.state = IBV_QPS_RESET;
    qp->qp.qp_type = (enum ibv_qp_type)a->qp_type;
    /* granted exactly what was asked */
    return &qp->qp;
}

SV_EXPORT int ibv_destroy_qp(struct ibv_qp *ibqp)
{
    struct sv_qp *qp = (struct sv_qp *)ibqp;
    if (!qp)
        return EINVAL;
    pthread_mutex_lock(&qp->lock);
    qp->stop = 1;
    pthread_mutex_unlock(&qp->lock);
    qp_wake(qp);
    pthread_join(qp->thread, NULL);
    /* as mlx5 does: the CQs forget the QP's completions */
    cq_clean(qp->scq, qp);
    if (qp->rcq != qp->scq)
        cq_clean(qp->rcq, qp);
    pthread_mutex_lock(&G.lock);
    qp->c->nqp--;
    qp->c->dev->nqp--;
    qp->pd->refs--;
    pthread_mutex_lock(&qp->scq->lock);
    qp->scq->refs--;
    pthread_mutex_unlock(&qp->scq->lock);
    pthread_mutex_lock(&qp->rcq->lock);
    qp->rcq->refs--;
    pthread_mutex_unlock(&qp->rcq->lock);
    pthread_mutex_unlock(&G.lock);
    qp_free(qp);
    return 0;
}

/* Attribute masks per transition (IB spec 1.4, 11.2.4.2; the kernel's
 * qp_state_table), for RC and UC. */
struct sv_transition {
    int from, to;
    int rc_req, rc_opt, uc_req, uc_opt;
};

static const struct sv_transition transitions[] = {
    {IBV_QPS_RESET, IBV_QPS_INIT, IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS, 0,
     IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS, 0},
    {IBV_QPS_INIT, IBV_QPS_INIT, 0, IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS, 0,
     IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS},
    {IBV_QPS_INIT, IBV_QPS_RTR,
     IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER,
     IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX,
     IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN,
     IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX},
    {IBV_QPS_RTR, IBV_QPS_RTS,
     IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC,
     IBV_QP_CUR_STATE | IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_MIN_RNR_TIMER | IBV_QP_PATH_MIG_STATE,
     IBV_QP_SQ_PSN, IBV_QP_CUR_STATE | IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_PATH_MIG_STATE},
    {IBV_QPS_RTS, IBV_QPS_RTS, 0,
     IBV_QP_CUR_STATE | IBV_QP_ACCESS_FLAGS | IBV_QP_ALT_PATH | IBV_QP_PATH_MIG_STATE | IBV_QP_MIN_RNR_TIMER, 0,
     IBV_QP_CUR_STATE | IBV_QP_ACCESS_FLAGS | IBV_QP_ALT_PATH | IBV_QP_PATH_MIG_STATE},
};

static int check_attrs(struct sv_qp *qp, const struct ibv_qp_attr *a, int mask)
{
    if ((mask & IBV_QP_PORT) && a->port_num != 1)
        return EINVAL;
    if ((mask & IBV_QP_PKEY_INDEX) && a->pkey_index != 0)
        return EINVAL;
    if ((mask & IBV_QP_ACCESS_FLAGS) &&
        (a->qp_access_flags & ~(unsigned)(IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ |
                                          IBV_ACCESS_REMOTE_ATOMIC)))
        return EINVAL;
    if (mask & IBV_QP_ALT_PATH)
        return EINVAL; /* automatic path migration is not modelled */
    if ((mask & IBV_QP_PATH_MTU) && (a->path_mtu < IBV_MTU_256 || a->path_mtu > IBV_MTU_4096))
        return EINVAL;
    if (mask & IBV_QP_AV) {
        const struct ibv_ah_attr *ah = &a->ah_attr;
        if (!ah->is_global) {
            sv_log("ibv_modify_qp: RoCE needs a GRH (ah_attr.is_global = 1)");
            return EINVAL;
        }
        if (ah->port_num != 1 || ah->grh.sgid_index >= 2) {
            sv_log("ibv_modify_qp: ah_attr port %u, sgid_index %u: the device has port 1 and GIDs 0 and 1",
                   ah->port_num, ah->grh.sgid_index);
            return EINVAL;
        }
        if (!gid_to_ip(&ah->grh.dgid)) {
            sv_log("ibv_modify_qp: the dgid is not a GID any softverbs device has");
            return EINVAL;
        }
    }
    if ((mask & IBV_QP_DEST_QPN) && a->dest_qp_num > SV_PSN_MASK)
        return EINVAL;
    if ((mask & IBV_QP_RQ_PSN) && a->rq_psn > SV_PSN_MASK)
        return EINVAL;
    if ((mask & IBV_QP_SQ_PSN) && a->sq_psn > SV_PSN_MASK)
        return EINVAL;
    if ((mask & IBV_QP_TIMEOUT) && a->timeout > 31)
        return EINVAL;
    if ((mask & IBV_QP_RETRY_CNT) && a->retry_cnt > 7)
        return EINVAL;
    if ((mask & IBV_QP_RNR_RETRY) && a->rnr_retry > 7)
        return EINVAL;
    if ((mask & IBV_QP_MIN_RNR_TIMER) && a->min_rnr_timer > 31)
        return EINVAL;
    if ((mask & IBV_QP_MAX_QP_RD_ATOMIC) && a->max_rd_atomic > SV_MAX_RD_ATOMIC)
        return EINVAL;
    if ((mask & IBV_QP_MAX_DEST_RD_ATOMIC) && a->max_dest_rd_atomic > SV_MAX_RD_ATOMIC)
        return EINVAL;
    (void)qp;
    return 0;
}

static void qp_reset(struct sv_qp *qp)
{
    out_reset(qp);
    in_reset(qp, "the QP was reset or went to ERR");
    qp->out_failed = 0;
    qp->sq_tx = qp->sq_acked = qp->sq_posted;
    qp->rq_used = qp->rq_posted;
    retire(&qp->sq_retired, qp->sq_posted);
    retire(&qp->rq_retired, qp->rq_posted);
    qp->pend_send.count = qp->pend_recv.count = 0;
    cq_clean(qp->scq, qp);
    if (qp->rcq != qp->scq)
        cq_clean(qp->rcq, qp);
}

SV_EXPORT int ibv_modify_qp(struct ibv_qp *ibqp, struct ibv_qp_attr *a, int mask)
{
    struct sv_qp *qp = (struct sv_qp *)ibqp;
    if (!qp || !a)
        return EINVAL;
    pthread_mutex_lock(&qp->lock);
    int cur = qp->state;
    if ((mask & IBV_QP_CUR_STATE) && (int)a->cur_qp_state != cur) {
        pthread_mutex_unlock(&qp->lock);
        return EINVAL;
    }
    int to = (mask & IBV_QP_STATE) ? (int)a->qp_state : cur;
    int req = -1, opt = 0;
    if (to == IBV_QPS_RESET || to == IBV_QPS_ERR) {
        if (mask & IBV_QP_STATE)
            req = 0;
    } else {
        for (size_t i = 0; i < sizeof transitions / sizeof transitions[0]; i++)
            if (transitions[i].from == cur && transitions[i].to == to) {
                req = qp->type == IBV_QPT_RC ? transitions[i].rc_req : transitions[i].uc_req;
                opt = qp->type == IBV_QPT_RC ? transitions[i].rc_opt : transitions[i].uc_opt;
            }
    }
    int extra = mask & ~(req | opt | IBV_QP_STATE | IBV_QP_CUR_STATE);
    int missing = req >= 0 ? req & ~mask : 0;
    if (req < 0 || missing || extra) {
        pthread_mutex_unlock(&qp->lock);
        if (req < 0)
            sv_log("ibv_modify_qp(QP %u): no transition from state %d to %d", qp->qp.qp_num, cur, to);
        else
            sv_log("ibv_modify_qp(QP %u) %d -> %d: attribute mask 0x%x lacks 0x%x, has 0x%x not allowed", qp->qp.qp_num,
                   cur, to, (unsigned)mask, (unsigned)missing, (unsigned)extra);
        return EINVAL;
    }
    int err = check_attrs(qp, a, mask);
    if (err) {
        pthread_mutex_unlock(&qp->lock);
        return err;
    }
    if (mask & IBV_QP_ACCESS_FLAGS)
        qp->access = a->qp_access_flags;
    if (mask & IBV_QP_PKEY_INDEX)
        qp->pkey_index = a->pkey_index;
    if (mask & IBV_QP_PATH_MTU)
        qp->path_mtu = a->path_mtu;
    if (mask & IBV_QP_AV) {
        qp->dgid = a->ah_attr.grh.dgid;
        qp->sgid_index = a->ah_attr.grh.sgid_index;
    }
    if (mask & IBV_QP_DEST_QPN)
        qp->dest_qpn = a->dest_qp_num;
    if (mask & IBV_QP_RQ_PSN)
        qp->rq_psn = qp->rq_expect_psn = a->rq_psn;
    if (mask & IBV_QP_SQ_PSN)
        qp->sq_psn = qp->next_sq_psn = a->sq_psn;
    if (mask & IBV_QP_TIMEOUT)
        qp->timeout = a->timeout;
    if (mask & IBV_QP_RETRY_CNT)
        qp->retry_cnt = a->retry_cnt;
    if (mask & IBV_QP_RNR_RETRY)
        qp->rnr_retry = a->rnr_retry;
    if (mask & IBV_QP_MIN_RNR_TIMER)
        qp->min_rnr_timer = a->min_rnr_timer;
    if (mask & IBV_QP_MAX_QP_RD_ATOMIC)
        qp->max_rd_atomic = a->max_rd_atomic;
    if (mask & IBV_QP_MAX_DEST_RD_ATOMIC)
        qp->max_dest_rd_atomic = a->max_dest_rd_atomic;
    if (to == IBV_QPS_RESET)
        qp_reset(qp);
    if (to == IBV_QPS_ERR)
        qp_to_err(qp);
    qp->state = to;
    if (mask & IBV_QP_STATE)
        qp->qp.state = (enum ibv_qp_state)to;
    pthread_mutex_unlock(&qp->lock);
    qp_wake(qp);
    return 0;
}

SV_EXPORT int ibv_query_qp(struct ibv_qp *ibqp, struct ibv_qp_attr *a, int mask, struct ibv_qp_init_attr *init)
{
    struct sv_qp *qp = (struct sv_qp *)ibqp;
    if (!qp || !a || !init)
        return EINVAL;
    (void)mask;
    pthread_mutex_lock(&qp->lock);
    memset(a, 0, sizeof *a);
    a->qp_state = a->cur_qp_state = (enum ibv_qp_state)qp->state;
    a->path_mtu = (enum ibv_mtu)qp->path_mtu;
    a->rq_psn = qp->rq_psn;
    a->sq_psn = qp->sq_psn;
    a->dest_qp_num = qp->dest_qpn;
    a->qp_access_flags = qp->access;
    a->cap.max_send_wr = qp->max_send_wr;
    a->cap.max_recv_wr = qp->max_recv_wr;
    a->cap.max_send_sge = qp->max_send_sge;
    a->cap.max_recv_sge = qp->max_recv_sge;
    a->cap.max_inline_data = qp->max_inline;
    a->ah_attr.grh.dgid = qp->dgid;
    a->ah_attr.grh.sgid_index = (uint8_t)qp->sgid_index;
    a->ah_attr.is_global = 1;
    a->ah_attr.port_num = 1;
    a->pkey_index = qp->pkey_index;
    a->max_rd_atomic = qp->max_rd_atomic;
    a->max_dest_rd_atomic = qp->max_dest_rd_atomic;
    a->min_rnr_timer = qp->min_rnr_timer;
    a->port_num = 1;
    a->timeout = qp->timeout;
    a->retry_cnt = qp->retry_cnt;
    a->rnr_retry = qp->rnr_retry;
    memset(init, 0, sizeof *init);
    init->qp_context = qp->qp.qp_context;
    init->send_cq = qp->qp.send_cq;
    init->recv_cq = qp->qp.recv_cq;
    init->cap = a->cap;
    init->qp_type = (enum ibv_qp_type)qp->type;
    init->sq_sig_all = qp->sig_all;
    pthread_mutex_unlock(&qp->lock);
    return 0;
}

static int sv_post_send(struct ibv_qp *ibqp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr)
{
    struct sv_qp *qp = (struct sv_qp *)ibqp;
    int err = 0;
    pthread_mutex_lock(&qp->lock);
    uint64_t now = G.jitter_ns ? now_ns() : 0;
    uint64_t first_new = qp->sq_posted;
    for (; wr; wr = wr->next) {
        if (qp->state != IBV_QPS_RTS && qp->state != IBV_QPS_ERR) {
            err = EINVAL;
            break;
        }
        if (wr->opcode != IBV_WR_RDMA_WRITE && wr->opcode != IBV_WR_RDMA_WRITE_WITH_IMM && wr->opcode != IBV_WR_SEND &&
            wr->opcode != IBV_WR_SEND_WITH_IMM) {
            err = EINVAL; /* READ and atomics are not modelled (and UC has neither) */
            break;
        }
        if (wr->num_sge < 0 || (uint32_t)wr->num_sge > qp->max_send_sge ||
            (wr->send_flags & ~(unsigned)(IBV_SEND_FENCE | IBV_SEND_SIGNALED | IBV_SEND_SOLICITED | IBV_SEND_INLINE))) {
            err = EINVAL;
            break;
        }
        if (qp->sq_posted - atomic_load(&qp->sq_retired) >= qp->max_send_wr) {
            err = ENOMEM;
            break;
        }
        struct sv_swr *w = &qp->sq[qp->sq_posted % qp->max_send_wr];
        memset(w, 0, sizeof *w);
        w->wr_id = wr->wr_id;
        w->seq = qp->sq_posted;
        w->opcode = wr->opcode;
        w->flags = wr->send_flags;
        w->imm = wr->imm_data;
        w->rkey = wr->wr.rdma.rkey;
        w->raddr = wr->wr.rdma.remote_addr;
        w->nsge = wr->num_sge;
        uint64_t len = 0;
        for (int i = 0; i < wr->num_sge; i++) {
            w->sge[i] = wr->sg_list[i];
            len += wr->sg_list[i].length;
        }
        if (wr->send_flags & IBV_SEND_INLINE) {
            if (len > qp->max_inline) {
                err = EINVAL;
                break;
            }
            /* inline data is read now; the buffers can be reused at once */
            uint8_t *dst = qp->inl + (size_t)(w->seq % qp->max_send_wr) * qp->max_inline;
            for (int i = 0; i < wr->num_sge; i++) {
                memcpy(dst, (void *)(uintptr_t)wr->sg_list[i].addr, wr->sg_list[i].length);
                dst += wr->sg_list[i].length;
            }
        }
        w->len = len > SV_MAX_MSG ? SV_MAX_MSG + 1u : (uint32_t)len; /* checked at transmit */
        w->psn = qp->next_sq_psn;
        qp->next_sq_psn = (qp->next_sq_psn + npackets(w->len, qp->path_mtu)) & SV_PSN_MASK;
        w->due_ns = G.jitter_ns ? now + rng_next(&qp->rng) % G.jitter_ns : 0;
        qp->sq_posted++;
    }
    if (qp->state == IBV_QPS_ERR) {
        /* a QP in error completes what is posted at once, flushed */
        for (uint64_t s = qp->sq_acked; s < qp->sq_posted; s++) {
            struct sv_swr *w = &qp->sq[s % qp->max_send_wr];
            complete(qp, 1, w->wr_id, s, IBV_WC_WR_FLUSH_ERR, wc_opcode_of(w->opcode), 0, 0, 0, 0);
        }
        qp->sq_acked = qp->sq_tx = qp->sq_posted;
    } else if (qp->out_failed && qp->sq_acked == first_new) {
        /* RC, connection lost while idle: the retries start now */
        qp->out_down_ns = now_ns();
    }
    pthread_mutex_unlock(&qp->lock);
    if (err && bad_wr)
        *bad_wr = wr;
    qp_wake(qp);
    return err;
}

static int sv_post_recv(struct ibv_qp *ibqp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad_wr)
{
    struct sv_qp *qp = (struct sv_qp *)ibqp;
    int err = 0;
    pthread_mutex_lock(&qp->lock);
    for (; wr; wr = wr->next) {
        if (qp->state == IBV_QPS_RESET) {
            err = EINVAL;
            break;
        }
        if (wr->num_sge < 0 || (uint32_t)wr->num_sge > qp->max_recv_sge) {
            err = EINVAL;
            break;
        }
        if (qp->rq_posted - atomic_load(&qp->rq_retired) >= qp->max_recv_wr) {
            err = ENOMEM;
            break;
        }
        struct sv_rwr *r = &qp->rq[qp->rq_posted % qp->max_recv_wr];
        r->wr_id = wr->wr_id;
        r->seq = qp->rq_posted;
        r->nsge = wr->num_sge;
        for (int i = 0; i < wr->num_sge; i++)
            r->sge[i] = wr->sg_list[i];
        qp->rq_posted++;
    }
    if (qp->state == IBV_QPS_ERR) {
        for (uint64_t s = qp->rq_used; s < qp->rq_posted; s++)
            complete(qp, 0, qp->rq[s % qp->max_recv_wr].wr_id, s, IBV_WC_WR_FLUSH_ERR, IBV_WC_RECV, 0, 0, 0, 0);
        qp->rq_used = qp->rq_posted;
    }
    int waiting = qp->rx_phase == RX_RNR;
    pthread_mutex_unlock(&qp->lock);
    if (err && bad_wr)
        *bad_wr = wr;
    if (waiting || G.jitter_ns)
        qp_wake(qp);
    return err;
}
