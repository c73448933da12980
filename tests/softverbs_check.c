/*
 * Checks of the softverbs provider on its own, as two processes.
 *
 *   softverbs_check LIBRARY SCENARIO
 *
 * The parent forks rank 0 and rank 1 (joined by a socketpair, the side
 * channel for QP numbers, GIDs and keys); each dlopens LIBRARY the way a
 * verbs user does (dlsym of the exported verbs, the data path through the
 * context's op table, via ibv_abi.h) and runs its half of SCENARIO. Every
 * wait has a deadline; the parent kills both ranks after 40 s. Exit status
 * 0 when both ranks passed. Ranks print "rank N: ..." lines, and measured
 * numbers as "METRIC name value".
 *
 * Rank 0 sees device sv_a (10.77.0.1), rank 1 device sv_b (10.77.0.2),
 * unless the scenario says otherwise (SOFTVERBS_DEVICES is set per rank).
 */
#define _GNU_SOURCE
#include "ibv_abi.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static struct {
#define V(name) __typeof__(&ibv_##name) name;
    V(get_device_list) V(free_device_list) V(get_device_name) V(open_device) V(close_device) V(query_device)
    V(query_port) V(query_gid) V(alloc_pd) V(dealloc_pd) V(reg_mr) V(dereg_mr) V(create_comp_channel)
    V(destroy_comp_channel) V(create_cq) V(destroy_cq) V(get_cq_event) V(ack_cq_events) V(create_qp)
    V(modify_qp) V(query_qp) V(destroy_qp) V(wc_status_str)
#undef V
} ibv;

static int RANK = -1, SIDE = -1, FAILS = 0;

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("rank %d: ", RANK);
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
}

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (!(cond)) {                                                       \
            say("FAIL %s:%d: %s", __FILE__, __LINE__, #cond);                \
            say(__VA_ARGS__);                                                \
            if (getenv("SVCHECK_PAUSE")) { /* time to attach a debugger */   \
                say("pid %d paused", (int)getpid());                         \
                sleep(60);                                                   \
            }                                                                \
            FAILS++;                                                         \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void load(const char *lib)
{
    void *h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    CHECK(h, "dlopen %s: %s", lib, dlerror());
#define V(name)                                                              \
    ibv.name = (__typeof__(ibv.name))dlsym(h, "ibv_" #name);                 \
    CHECK(ibv.name, "dlsym ibv_" #name);
    V(get_device_list) V(free_device_list) V(get_device_name) V(open_device) V(close_device) V(query_device)
    V(query_port) V(query_gid) V(alloc_pd) V(dealloc_pd) V(reg_mr) V(dereg_mr) V(create_comp_channel)
    V(destroy_comp_channel) V(create_cq) V(destroy_cq) V(get_cq_event) V(ack_cq_events) V(create_qp)
    V(modify_qp) V(query_qp) V(destroy_qp) V(wc_status_str)
#undef V
}

/* ---- side channel ------------------------------------------------------ */

static void xchg(const void *mine, void *theirs, size_t n)
{
    CHECK(write(SIDE, mine, n) == (ssize_t)n, "side channel write");
    size_t got = 0;
    while (got < n) {
        struct pollfd p = {SIDE, POLLIN, 0};
        CHECK(poll(&p, 1, 20000) == 1, "side channel: peer silent for 20 s");
        ssize_t r = read(SIDE, (char *)theirs + got, n - got);
        CHECK(r > 0, "side channel: peer gone");
        got += (size_t)r;
    }
}

static void barrier(void)
{
    int a = RANK, b;
    xchg(&a, &b, sizeof a);
}

/* ---- one end of a connection ------------------------------------------- */

struct info {
    union ibv_gid gid;
    uint32_t qpn, psn, rkey, pad;
    uint64_t addr;
};

struct end {
    struct ibv_context *ctx;
    struct ibv_pd *pd;
    struct ibv_comp_channel *chan;
    struct ibv_cq *scq, *rcq;
    struct ibv_qp *qp;
    struct ibv_mr *mr;
    char *buf;
    size_t size;
    int type;
    union ibv_gid gid;
};

struct opts {
    int type, send_wr, recv_wr, cqe, channel, inline_max;
    uint8_t timeout, retry_cnt, rnr_retry, min_rnr_timer;
    int psn_skew; /* added to the peer's PSN as our rq_psn */
};

static struct opts defaults(int type)
{
    struct opts o = {type, 64, 64, 256, 0, 0, 12, 3, 7, 1, 0};
    return o;
}

static struct ibv_context *open_first(void)
{
    int n = 0;
    struct ibv_device **list = ibv.get_device_list(&n);
    CHECK(list && n >= 1, "no device: %s", strerror(errno));
    struct ibv_context *ctx = ibv.open_device(list[0]);
    CHECK(ctx, "open_device: %s", strerror(errno));
    ibv.free_device_list(list);
    return ctx;
}

static void make_end(struct end *e, const struct opts *o, size_t size)
{
    memset(e, 0, sizeof *e);
    e->type = o->type;
    e->ctx = open_first();
    e->pd = ibv.alloc_pd(e->ctx);
    CHECK(e->pd, "alloc_pd");
    if (o->channel) {
        e->chan = ibv.create_comp_channel(e->ctx);
        CHECK(e->chan, "create_comp_channel");
    }
    e->scq = ibv.create_cq(e->ctx, o->cqe, e, e->chan, 0);
    e->rcq = ibv.create_cq(e->ctx, o->cqe, e, e->chan, 0);
    CHECK(e->scq && e->rcq, "create_cq");
    e->size = size;
    e->buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(e->buf != MAP_FAILED, "mmap");
    e->mr = ibv.reg_mr(e->pd, e->buf, size, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
    CHECK(e->mr, "reg_mr: %s", strerror(errno));
    struct ibv_qp_init_attr ia;
    memset(&ia, 0, sizeof ia);
    ia.send_cq = e->scq;
    ia.recv_cq = e->rcq;
    ia.qp_type = (enum ibv_qp_type)o->type;
    ia.cap.max_send_wr = (uint32_t)o->send_wr;
    ia.cap.max_recv_wr = (uint32_t)o->recv_wr;
    ia.cap.max_send_sge = ia.cap.max_recv_sge = 2;
    ia.cap.max_inline_data = (uint32_t)o->inline_max;
    e->qp = ibv.create_qp(e->pd, &ia);
    CHECK(e->qp, "create_qp: %s", strerror(errno));
    CHECK(ibv.query_gid(e->ctx, 1, 1, &e->gid) == 0, "query_gid");
}

static struct info my_info(struct end *e)
{
    struct info i;
    memset(&i, 0, sizeof i);
    i.gid = e->gid;
    i.qpn = e->qp->qp_num;
    i.psn = 1000u * (unsigned)(RANK + 1) + 7u;
    i.rkey = e->mr->rkey;
    i.addr = (uintptr_t)e->buf;
    return i;
}

static int to_init(struct end *e)
{
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    a.qp_state = IBV_QPS_INIT;
    a.port_num = 1;
    a.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE;
    return ibv.modify_qp(e->qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
}

static void rtr_attr(struct ibv_qp_attr *a, const struct info *peer, const struct opts *o)
{
    memset(a, 0, sizeof *a);
    a->qp_state = IBV_QPS_RTR;
    a->path_mtu = IBV_MTU_1024;
    a->dest_qp_num = peer->qpn;
    a->rq_psn = (peer->psn + (uint32_t)o->psn_skew) & 0xffffff;
    a->max_dest_rd_atomic = 1;
    a->min_rnr_timer = o->min_rnr_timer;
    a->ah_attr.is_global = 1;
    a->ah_attr.grh.dgid = peer->gid;
    a->ah_attr.grh.sgid_index = 1;
    a->ah_attr.grh.hop_limit = 1;
    a->ah_attr.port_num = 1;
}

static int rtr_mask(int type)
{
    int m = IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN;
    return type == IBV_QPT_RC ? m | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER : m;
}

static void rts_attr(struct ibv_qp_attr *a, const struct info *me, const struct opts *o)
{
    memset(a, 0, sizeof *a);
    a->qp_state = IBV_QPS_RTS;
    a->sq_psn = me->psn;
    a->timeout = o->timeout;
    a->retry_cnt = o->retry_cnt;
    a->rnr_retry = o->rnr_retry;
    a->max_rd_atomic = 1;
}

static int rts_mask(int type)
{
    return type == IBV_QPT_RC ? IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                                    IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC
                              : IBV_QP_STATE | IBV_QP_SQ_PSN;
}

/* INIT, exchange, RTR, barrier, RTS: both ends are in RTR before either
 * sends. Receives posted by pre() go in before the barrier. */
static struct info connect_end(struct end *e, const struct opts *o, void (*pre)(struct end *))
{
    CHECK(to_init(e) == 0, "to INIT");
    struct info me = my_info(e), peer;
    xchg(&me, &peer, sizeof me);
    if (pre)
        pre(e);
    struct ibv_qp_attr a;
    rtr_attr(&a, &peer, o);
    int r = ibv.modify_qp(e->qp, &a, rtr_mask(o->type));
    CHECK(r == 0, "to RTR: %s", strerror(r));
    barrier();
    rts_attr(&a, &me, o);
    r = ibv.modify_qp(e->qp, &a, rts_mask(o->type));
    CHECK(r == 0, "to RTS: %s", strerror(r));
    return peer;
}

static int post_send(struct end *e, int opcode, uint64_t wr_id, size_t off, uint32_t len, int signaled,
                     uint32_t imm, const struct info *peer, size_t roff, uint32_t rkey)
{
    struct ibv_sge sge = {(uintptr_t)(e->buf + off), len, e->mr->lkey};
    struct ibv_send_wr wr, *bad = NULL;
    memset(&wr, 0, sizeof wr);
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = (enum ibv_wr_opcode)opcode;
    wr.send_flags = signaled ? IBV_SEND_SIGNALED : 0;
    wr.imm_data = imm;
    if (peer) {
        wr.wr.rdma.remote_addr = peer->addr + roff;
        wr.wr.rdma.rkey = rkey;
    }
    return ibv_post_send(e->qp, &wr, &bad);
}

static int post_recv(struct end *e, uint64_t wr_id, size_t off, uint32_t len)
{
    struct ibv_sge sge = {(uintptr_t)(e->buf + off), len, e->mr->lkey};
    struct ibv_recv_wr wr, *bad = NULL;
    memset(&wr, 0, sizeof wr);
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = len ? 1 : 0;
    return ibv_post_recv(e->qp, &wr, &bad);
}

/* One completion within ms milliseconds: 1, or 0 on timeout. */
static int poll1(struct ibv_cq *cq, struct ibv_wc *wc, int ms)
{
    double end = now_s() + ms / 1000.0;
    for (;;) {
        int n = ibv_poll_cq(cq, 1, wc);
        CHECK(n >= 0, "poll_cq returned %d (%s)", n, strerror(errno));
        if (n == 1)
            return 1;
        if (now_s() > end)
            return 0;
    }
}

static struct ibv_wc expect(struct ibv_cq *cq, int status, const char *what)
{
    struct ibv_wc wc;
    CHECK(poll1(cq, &wc, 10000), "%s: no completion within 10 s", what);
    CHECK((int)wc.status == status, "%s: status %s (%d), vendor_err 0x%x, wr_id %llu; wanted %s", what,
          ibv.wc_status_str(wc.status), wc.status, wc.vendor_err, (unsigned long long)wc.wr_id,
          ibv.wc_status_str((enum ibv_wc_status)status));
    return wc;
}

static void no_completion(struct ibv_cq *cq, int ms, const char *what)
{
    struct ibv_wc wc;
    CHECK(!poll1(cq, &wc, ms), "%s: unexpected completion wr_id %llu status %s", what, (unsigned long long)wc.wr_id,
          ibv.wc_status_str(wc.status));
}

static enum ibv_qp_state qp_state(struct end *e)
{
    struct ibv_qp_attr a;
    struct ibv_qp_init_attr ia;
    CHECK(ibv.query_qp(e->qp, &a, IBV_QP_STATE, &ia) == 0, "query_qp");
    return a.qp_state;
}

static void destroy_end(struct end *e)
{
    CHECK(ibv.destroy_qp(e->qp) == 0, "destroy_qp");
    CHECK(ibv.dereg_mr(e->mr) == 0, "dereg_mr");
    CHECK(ibv.destroy_cq(e->scq) == 0 && ibv.destroy_cq(e->rcq) == 0, "destroy_cq");
    if (e->chan)
        CHECK(ibv.destroy_comp_channel(e->chan) == 0, "destroy_comp_channel");
    CHECK(ibv.dealloc_pd(e->pd) == 0, "dealloc_pd");
    CHECK(ibv.close_device(e->ctx) == 0, "close_device");
    munmap(e->buf, e->size);
}

/* ---- scenarios ---------------------------------------------------------- */

enum { MSG = 4096 };

static enum ibv_qp_state qp_state(struct end *e);

/* Waits for the send completion of wr_id and the receive of 1000 + wr_id,
 * matched by wr_id, in whatever order they come. */
static void wait_pair(struct end *e, int i, int want_send, int want_recv, double t0)
{
    while (want_send || want_recv) {
        struct ibv_wc wc;
        if (want_recv && poll1(e->rcq, &wc, 0)) {
            CHECK(wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_RECV && wc.wr_id == 1000u + (unsigned)i &&
                      wc.byte_len == MSG,
                  "iteration %d: recv wc status %s opcode %d id %llu len %u", i, ibv.wc_status_str(wc.status),
                  wc.opcode, (unsigned long long)wc.wr_id, wc.byte_len);
            int got;
            memcpy(&got, e->buf, sizeof got);
            CHECK(got == i && e->buf[MSG - 1] == 'a' + i % 26, "iteration %d: received the data of %d", i, got);
            want_recv = 0;
        }
        if (want_send && poll1(e->scq, &wc, 0)) {
            CHECK(wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_SEND && wc.wr_id == (uint64_t)i,
                  "iteration %d: send wc status %s id %llu", i, ibv.wc_status_str(wc.status),
                  (unsigned long long)wc.wr_id);
            want_send = 0;
        }
        CHECK(now_s() - t0 < (getenv("SVCHECK_PAUSE") ? 8 : 30), "iteration %d: stuck waiting for the%s%s completion, QP state %d", i,
              want_send ? " send" : "", want_recv ? " receive" : "", qp_state(e));
    }
}

/* 4 KiB SEND/RECV ping-pong, data checked; rank 0 reports the round trip. */
static void pingpong(int type)
{
    struct end e;
    struct opts o = defaults(type);
    make_end(&e, &o, 1 << 20);
    connect_end(&e, &o, NULL);
    int iters = 500;
    if (RANK == 1)
        CHECK(post_recv(&e, 1000, 0, MSG) == 0, "post_recv");
    barrier(); /* UC: the first receive is up before anyone sends */
    double t0 = now_s();
    for (int i = 0; i < iters; i++) {
        if (RANK == 0) {
            CHECK(post_recv(&e, 1000 + (uint64_t)i, 0, MSG) == 0, "post_recv");
            memset(e.buf + MSG, 'a' + i % 26, MSG);
            memcpy(e.buf + MSG, &i, sizeof i);
            CHECK(post_send(&e, IBV_WR_SEND, (uint64_t)i, MSG, MSG, 1, 0, NULL, 0, 0) == 0, "post_send");
            wait_pair(&e, i, 1, 1, t0);
        } else {
            wait_pair(&e, i, 0, 1, t0);
            /* the next receive is up before the pong goes out */
            if (i + 1 < iters)
                CHECK(post_recv(&e, 1000 + (uint64_t)i + 1, 0, MSG) == 0, "post_recv");
            memcpy(e.buf + MSG, e.buf, MSG);
            CHECK(post_send(&e, IBV_WR_SEND, (uint64_t)i, MSG, MSG, 1, 0, NULL, 0, 0) == 0, "post_send");
            wait_pair(&e, i, 1, 0, t0);
        }
    }
    double dt = now_s() - t0;
    if (RANK == 0)
        printf("METRIC %s_pingpong_rtt_us %.1f\n", type == IBV_QPT_RC ? "rc" : "uc", dt / iters * 1e6);
    barrier();
    destroy_end(&e);
}

/* 64 MiB from rank 0 into rank 1's buffer: RC WRITE_WITH_IMM, 1 MiB chunks,
 * 16 in flight, imm = chunk index; rank 1 checks order and bytes. */
static void write_imm_pipeline(void)
{
    enum { CHUNK = 1 << 20, NCHUNK = 64, DEPTH = 16 };
    struct end e;
    struct opts o = defaults(IBV_QPT_RC);
    make_end(&e, &o, (size_t)CHUNK * NCHUNK);
    if (RANK == 0)
        for (size_t i = 0; i < (size_t)CHUNK * NCHUNK; i += 8) {
            uint64_t v = i * 2654435761u;
            memcpy(e.buf + i, &v, 8);
        }
    struct info peer = connect_end(&e, &o, NULL);
    double t0 = now_s();
    if (RANK == 1) {
        for (int i = 0; i < NCHUNK && i < 64; i++)
            CHECK(post_recv(&e, (uint64_t)i, 0, 0) == 0, "post_recv");
        barrier();
        for (int i = 0; i < NCHUNK; i++) {
            struct ibv_wc wc = expect(e.rcq, IBV_WC_SUCCESS, "recv of write-with-imm");
            CHECK(wc.opcode == IBV_WC_RECV_RDMA_WITH_IMM && (wc.wc_flags & IBV_WC_WITH_IMM) &&
                      wc.imm_data == (uint32_t)i && wc.byte_len == CHUNK && wc.wr_id == (uint64_t)i,
                  "chunk %d: opcode %d imm %u len %u id %llu", i, wc.opcode, wc.imm_data, wc.byte_len,
                  (unsigned long long)wc.wr_id);
        }
        for (size_t i = 0; i < (size_t)CHUNK * NCHUNK; i += 8) {
            uint64_t v = i * 2654435761u, got;
            memcpy(&got, e.buf + i, 8);
            CHECK(got == v, "byte %zu differs", i);
        }
    } else {
        barrier();
        int posted = 0, done = 0;
        while (done < NCHUNK) {
            while (posted < NCHUNK && posted - done < DEPTH) {
                CHECK(post_send(&e, IBV_WR_RDMA_WRITE_WITH_IMM, (uint64_t)posted, (size_t)posted * CHUNK, CHUNK, 1,
                                (uint32_t)posted, &peer, (size_t)posted * CHUNK, peer.rkey) == 0,
                      "post_send");
                posted++;
            }
            struct ibv_wc wc = expect(e.scq, IBV_WC_SUCCESS, "write-with-imm");
            CHECK(wc.wr_id == (uint64_t)done && wc.opcode == IBV_WC_RDMA_WRITE, "completion %llu, wanted %d",
                  (unsigned long long)wc.wr_id, done);
            done++;
        }
    }
    barrier();
    double dt = now_s() - t0;
    if (RANK == 1)
        printf("METRIC rc_write_imm_64MiB_GBps %.2f\n", (double)CHUNK * NCHUNK / dt / 1e9);
    destroy_end(&e);
}

/* RC: a wrong rkey is REM_ACCESS_ERR, then the QP is in ERR and the next
 * WR is flushed; the responder's QP goes to ERR too (its receive flushes).
 * Using the lkey as the rkey, and an rkey after ibv_dereg_mr, fail alike. */
static void bad_rkey_rc(int variant)
{
    struct end e;
    struct opts o = defaults(IBV_QPT_RC);
    /* The responder's NAK must come back within the requester's retry
     * window, or the requester rightly reports RETRY_EXC_ERR: the default
     * 67 ms is too short for a responder process descheduled on a loaded
     * 2-core host. timeout 18: 1.07 s x 4. */
    o.timeout = 18;
    make_end(&e, &o, 1 << 16);
    struct info peer = connect_end(&e, &o, NULL);
    if (RANK == 1) {
        CHECK(post_recv(&e, 77, 0, 64) == 0, "post_recv");
        struct ibv_mr *old = e.mr;
        if (variant == 2) {
            /* register again, drop the first: the peer still has the old key */
            e.mr = ibv.reg_mr(e.pd, e.buf, e.size, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
            CHECK(e.mr && ibv.dereg_mr(old) == 0, "re-register");
        }
        barrier();
        struct ibv_wc wc = expect(e.rcq, IBV_WC_WR_FLUSH_ERR, "responder's receive after the access error");
        CHECK(wc.wr_id == 77, "wr_id");
        CHECK(qp_state(&e) == IBV_QPS_ERR, "responder QP state %d", qp_state(&e));
        CHECK(e.buf[100] == 0, "the bad write placed data");
    } else {
        barrier();
        uint32_t key = variant == 0 ? peer.rkey ^ 0x5a5a : variant == 1 ? 0 : peer.rkey;
        if (variant == 1) {
            /* the peer's lkey is not sent; our own lkey is as wrong */
            key = e.mr->lkey;
        }
        memset(e.buf, 'x', 4096);
        CHECK(post_send(&e, IBV_WR_RDMA_WRITE, 1, 0, 4096, 1, 0, &peer, 0, key) == 0, "post");
        CHECK(post_send(&e, IBV_WR_RDMA_WRITE, 2, 0, 4096, 0, 0, &peer, 0, key) == 0, "post");
        struct ibv_wc wc = expect(e.scq, IBV_WC_REM_ACCESS_ERR, "write with a bad rkey");
        CHECK(wc.wr_id == 1, "first completion is WR %llu", (unsigned long long)wc.wr_id);
        wc = expect(e.scq, IBV_WC_WR_FLUSH_ERR, "the unsignaled WR after it is flushed");
        CHECK(wc.wr_id == 2, "flushed WR %llu", (unsigned long long)wc.wr_id);
        CHECK(qp_state(&e) == IBV_QPS_ERR, "requester QP state %d", qp_state(&e));
        /* posting on a QP in ERR completes at once, flushed */
        CHECK(post_send(&e, IBV_WR_SEND, 3, 0, 8, 0, 0, NULL, 0, 0) == 0, "post on ERR");
        wc = expect(e.scq, IBV_WC_WR_FLUSH_ERR, "post on a QP in ERR");
        CHECK(wc.wr_id == 3, "wr_id");
    }
    barrier();
    destroy_end(&e);
}

/* UC: a bad rkey and a SEND without a receive are dropped quietly: the
 * sender completes successfully, the receiver sees nothing; the next
 * message that finds a receive arrives. WRITE_WITH_IMM as well. */
static void uc_drop(void)
{
    struct end e;
    struct opts o = defaults(IBV_QPT_UC);
    make_end(&e, &o, 1 << 16);
    struct info peer = connect_end(&e, &o, NULL);
    if (RANK == 0) {
        for (int i = 0; i < 3; i++) {
            memset(e.buf, 'A' + i, 256);
            CHECK(post_send(&e, IBV_WR_SEND, (uint64_t)i, 0, 256, 1, 0, NULL, 0, 0) == 0, "post");
            struct ibv_wc wc = expect(e.scq, IBV_WC_SUCCESS, "UC send into no receive");
            CHECK(wc.wr_id == (uint64_t)i, "wr_id");
        }
        CHECK(post_send(&e, IBV_WR_RDMA_WRITE, 10, 0, 256, 1, 0, &peer, 1024, peer.rkey ^ 1) == 0, "post");
        expect(e.scq, IBV_WC_SUCCESS, "UC write with a bad rkey");
        CHECK(post_send(&e, IBV_WR_RDMA_WRITE_WITH_IMM, 11, 0, 256, 1, 5, &peer, 2048, peer.rkey) == 0, "post");
        expect(e.scq, IBV_WC_SUCCESS, "UC write-with-imm into no receive");
        /* a plain write behind them: once it has landed, they were dropped */
        memset(e.buf + 8192, 'M', 16);
        CHECK(post_send(&e, IBV_WR_RDMA_WRITE, 12, 8192, 16, 1, 0, &peer, 8192, peer.rkey) == 0, "post");
        expect(e.scq, IBV_WC_SUCCESS, "UC write");
        barrier(); /* rank 1 has seen nothing, and posts a receive */
        barrier();
        memset(e.buf, 'Z', 256);
        CHECK(post_send(&e, IBV_WR_SEND, 4, 0, 256, 1, 0, NULL, 0, 0) == 0, "post");
        expect(e.scq, IBV_WC_SUCCESS, "UC send");
    } else {
        barrier();
        double t0 = now_s();
        while (((volatile char *)e.buf)[8192 + 15] != 'M' && now_s() - t0 < 20)
            usleep(1000);
        CHECK(e.buf[8192 + 15] == 'M', "the write behind the dropped messages did not land");
        no_completion(e.rcq, 100, "nothing was delivered");
        CHECK(e.buf[1024] == 0 && e.buf[2048] == 0, "a dropped write placed data");
        CHECK(post_recv(&e, 99, 0, 4096) == 0, "post_recv");
        barrier();
        struct ibv_wc wc = expect(e.rcq, IBV_WC_SUCCESS, "the message after the drops");
        CHECK(wc.wr_id == 99 && wc.byte_len == 256 && e.buf[0] == 'Z' && e.buf[255] == 'Z',
              "received %u bytes of '%c'", wc.byte_len, e.buf[0]);
        CHECK(qp_state(&e) == IBV_QPS_RTS, "UC drops leave the QP in RTS");
    }
    barrier();
    destroy_end(&e);
}

/* SOFTVERBS_DROP_EVERY=3, SOFTVERBS_DROP_AFTER=2: of 10 sends, the 5th
 * and 8th are lost on UC (their sends complete successfully, the later ones
 * arrive, into the next receives); RC delivers all 10. */
static void drop_every(int type)
{
    enum { N = 10, LEN = 512 };
    struct end e;
    struct opts o = defaults(type);
    make_end(&e, &o, 1 << 16);
    connect_end(&e, &o, NULL);
    if (RANK == 1)
        for (int i = 0; i < N; i++)
            CHECK(post_recv(&e, 100 + (uint64_t)i, (size_t)i * LEN, LEN) == 0, "post_recv");
    barrier();
    if (RANK == 0) {
        for (int i = 0; i < N; i++) {
            memset(e.buf + (size_t)i * LEN, 'a' + i, LEN);
            CHECK(post_send(&e, IBV_WR_SEND, (uint64_t)i, (size_t)i * LEN, LEN, 1, 0, NULL, 0, 0) == 0, "post");
            struct ibv_wc wc = expect(e.scq, IBV_WC_SUCCESS, "send (lost or not, it completes)");
            CHECK(wc.wr_id == (uint64_t)i, "wr_id %llu, expected %d", (unsigned long long)wc.wr_id, i);
        }
    } else {
        int got = 0;
        for (int i = 0; i < N; i++) {
            int n = i + 1; /* the sender's nth message */
            if (type == IBV_QPT_UC && n > 2 && (n - 2) % 3 == 0)
                continue;
            struct ibv_wc wc = expect(e.rcq, IBV_WC_SUCCESS, "a message that was not lost");
            char *b = e.buf + (size_t)got * LEN;
            CHECK(wc.wr_id == 100 + (uint64_t)got && wc.byte_len == LEN && b[0] == 'a' + i && b[LEN - 1] == 'a' + i,
                  "receive %d: wr_id %llu, %u bytes of '%c', expected message %d", got,
                  (unsigned long long)wc.wr_id, wc.byte_len, b[0], i);
            got++;
        }
        no_completion(e.rcq, 200, "nothing more was delivered");
        CHECK(qp_state(&e) == IBV_QPS_RTS, "losses leave the QP in RTS");
    }
    barrier();
    destroy_end(&e);
}

/* RC without a receive: rnr_retry 1 gives up (RNR_RETRY_EXC_ERR); with
 * rnr_retry 7 the message waits until a receive is posted. */
static void rnr(void)
{
    struct end e;
    struct opts o = defaults(IBV_QPT_RC);
    o.rnr_retry = RANK == 0 ? 1 : 7;
    o.min_rnr_timer = 12; /* 0.64 ms */
    make_end(&e, &o, 1 << 16);
    connect_end(&e, &o, NULL);
    if (RANK == 0) {
        CHECK(post_send(&e, IBV_WR_SEND, 1, 0, 64, 1, 0, NULL, 0, 0) == 0, "post");
        expect(e.scq, IBV_WC_RNR_RETRY_EXC_ERR, "send with no receive, rnr_retry 1");
        barrier();
        /* rank 1 (rnr_retry 7) sends to us; we post the receive late */
        usleep(300000);
        struct ibv_qp_attr a;
        memset(&a, 0, sizeof a);
        CHECK(qp_state(&e) == IBV_QPS_ERR, "our QP is in ERR after the RNR error");
    } else {
        barrier();
        CHECK(qp_state(&e) == IBV_QPS_RTS, "the responder's QP stays in RTS after RNR");
    }
    barrier();
    destroy_end(&e);

    /* infinite RNR retry: the sender waits for the late receive */
    barrier();
    o.rnr_retry = 7;
    make_end(&e, &o, 1 << 16);
    connect_end(&e, &o, NULL);
    if (RANK == 0) {
        memset(e.buf, 'q', 64);
        CHECK(post_send(&e, IBV_WR_SEND, 1, 0, 64, 1, 0, NULL, 0, 0) == 0, "post");
        no_completion(e.scq, 300, "the send waits for a receive");
        barrier();
        expect(e.scq, IBV_WC_SUCCESS, "the send, once a receive is posted");
    } else {
        usleep(300000);
        barrier();
        CHECK(post_recv(&e, 5, 1024, 64) == 0, "post_recv");
        struct ibv_wc wc = expect(e.rcq, IBV_WC_SUCCESS, "the late receive");
        CHECK(wc.byte_len == 64 && e.buf[1024] == 'q', "data");
    }
    barrier();
    destroy_end(&e);
}

/* The send buffer is read when the message is transmitted, not when it is
 * posted: the receiver gets what the buffer held later (SOFTVERBS_JITTER_US
 * delays the transmission). IBV_SEND_INLINE copies at post time. */
static void reuse(void)
{
    struct end e;
    struct opts o = defaults(IBV_QPT_RC);
    o.inline_max = 64;
    make_end(&e, &o, 1 << 20);
    connect_end(&e, &o, NULL);
    if (RANK == 1) {
        CHECK(post_recv(&e, 1, 0, 65536) == 0 && post_recv(&e, 2, 65536, 64) == 0, "post_recv");
        barrier();
        struct ibv_wc wc = expect(e.rcq, IBV_WC_SUCCESS, "recv");
        CHECK(wc.wr_id == 1, "order");
        int later = 0;
        for (int i = 0; i < 65536; i++)
            later += e.buf[i] == 'B';
        say("received %d of 65536 bytes of the value written after the post", later);
        printf("METRIC reuse_later_bytes %d\n", later);
        CHECK(later == 65536, "the provider read the buffer at post time");
        wc = expect(e.rcq, IBV_WC_SUCCESS, "inline recv");
        CHECK(wc.wr_id == 2 && e.buf[65536] == 'I' && e.buf[65536 + 63] == 'I', "inline data is the posted value");
    } else {
        barrier();
        memset(e.buf, 'A', 65536);
        CHECK(post_send(&e, IBV_WR_SEND, 1, 0, 65536, 1, 0, NULL, 0, 0) == 0, "post");
        memset(e.buf, 'B', 65536); /* a bug: reusing the buffer before the completion */
        memset(e.buf + 131072, 'I', 64);
        struct ibv_sge sge = {(uintptr_t)(e.buf + 131072), 64, 0 /* inline: lkey unused */};
        struct ibv_send_wr wr, *bad;
        memset(&wr, 0, sizeof wr);
        wr.wr_id = 2;
        wr.sg_list = &sge;
        wr.num_sge = 1;
        wr.opcode = IBV_WR_SEND;
        wr.send_flags = IBV_SEND_SIGNALED | IBV_SEND_INLINE;
        CHECK(ibv_post_send(e.qp, &wr, &bad) == 0, "post inline");
        memset(e.buf + 131072, 'J', 64); /* allowed with inline */
        expect(e.scq, IBV_WC_SUCCESS, "send");
        expect(e.scq, IBV_WC_SUCCESS, "inline send");
    }
    barrier();
    destroy_end(&e);
}

/* Verbs usage errors, in one process (rank 1 only waits). */
static void usage_errors(void)
{
    if (RANK == 1)
        return;
    struct ibv_context *ctx = open_first();
    struct ibv_port_attr pa;
    memset(&pa, 0xab, sizeof pa);
    CHECK(ibv.query_port(ctx, 1, &pa) == 0, "query_port");
    CHECK(pa.state == IBV_PORT_ACTIVE && pa.link_layer == IBV_LINK_LAYER_ETHERNET && pa.gid_tbl_len >= 2,
          "port attributes");
    CHECK(pa.flags == 0xab && pa.port_cap_flags2 == 0xabab,
          "the compat ibv_query_port wrote past link_layer, as rdma-core's does not");
    CHECK(ibv.query_port(ctx, 2, &pa) != 0, "port 2 exists");
    union ibv_gid g;
    CHECK(ibv.query_gid(ctx, 1, 1, &g) == 0 && g.raw[10] == 0xff && g.raw[11] == 0xff && g.raw[12] == 10 &&
              g.raw[13] == 77,
          "GID 1 is ::ffff:10.77.0.x");
    CHECK(ibv.query_gid(ctx, 1, 99, &g) == -1 && errno == EINVAL, "GID 99");
    struct ibv_device_attr da;
    CHECK(ibv.query_device(ctx, &da) == 0 && da.max_mr == 4 && da.phys_port_cnt == 1, "query_device max_mr %d",
          da.max_mr);

    struct ibv_pd *pd = ibv.alloc_pd(ctx);
    static char mem[1 << 16];
    CHECK(!ibv.reg_mr(pd, mem, sizeof mem, IBV_ACCESS_REMOTE_WRITE) && errno == EINVAL,
          "REMOTE_WRITE without LOCAL_WRITE");
    char *hole = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(hole, 8192);
    CHECK(!ibv.reg_mr(pd, hole, 8192, IBV_ACCESS_LOCAL_WRITE) && errno == EFAULT, "unmapped memory");
    struct ibv_mr *mrs[5];
    for (int i = 0; i < 4; i++)
        CHECK((mrs[i] = ibv.reg_mr(pd, mem + i * 16, 16, IBV_ACCESS_LOCAL_WRITE)) != NULL, "reg_mr %d", i);
    CHECK(!ibv.reg_mr(pd, mem, 16, IBV_ACCESS_LOCAL_WRITE) && errno == ENOMEM, "past SOFTVERBS_MAX_MR");
    CHECK(ibv.dealloc_pd(pd) == EBUSY, "dealloc_pd with regions");
    for (int i = 1; i < 4; i++)
        ibv.dereg_mr(mrs[i]);

    struct ibv_comp_channel *ch = ibv.create_comp_channel(ctx);
    struct ibv_cq *cq = ibv.create_cq(ctx, 16, NULL, ch, 0);
    CHECK(cq && !ibv.create_cq(ctx, 0, NULL, NULL, 0) && !ibv.create_cq(ctx, 16, NULL, NULL, 1), "create_cq");
    CHECK(ibv.destroy_comp_channel(ch) == EBUSY, "destroy a channel with a CQ");
    struct ibv_qp_init_attr ia;
    memset(&ia, 0, sizeof ia);
    ia.send_cq = ia.recv_cq = cq;
    ia.cap.max_send_wr = ia.cap.max_recv_wr = 4;
    ia.cap.max_send_sge = ia.cap.max_recv_sge = 1;
    ia.qp_type = IBV_QPT_UD;
    CHECK(!ibv.create_qp(pd, &ia) && errno == EOPNOTSUPP, "UD");
    ia.qp_type = IBV_QPT_RC;
    ia.cap.max_send_wr = 100000;
    CHECK(!ibv.create_qp(pd, &ia) && errno == EINVAL, "max_send_wr past the device's");
    ia.cap.max_send_wr = 4;
    struct ibv_qp *qp = ibv.create_qp(pd, &ia);
    CHECK(qp && qp->state == IBV_QPS_RESET && qp->qp_num, "create RC");
    CHECK(ibv.destroy_cq(cq) == EBUSY, "destroy a CQ with a QP");

    struct ibv_qp_attr a;
    memset(&a, 0, sizeof a);
    struct ibv_recv_wr rwr, *rbad;
    memset(&rwr, 0, sizeof rwr);
    CHECK(ibv_post_recv(qp, &rwr, &rbad) == EINVAL, "post_recv in RESET");
    a.qp_state = IBV_QPS_RTR;
    CHECK(ibv.modify_qp(qp, &a, IBV_QP_STATE) == EINVAL, "RESET -> RTR");
    a.qp_state = IBV_QPS_INIT;
    a.port_num = 1;
    CHECK(ibv.modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_ACCESS_FLAGS) == EINVAL,
          "INIT without PORT");
    CHECK(ibv.modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS |
                                    IBV_QP_SQ_PSN) == EINVAL,
          "INIT with SQ_PSN");
    a.port_num = 2;
    CHECK(ibv.modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS) == EINVAL,
          "port 2");
    CHECK(to_init(&(struct end){.qp = qp}) == 0, "to INIT");
    CHECK(ibv_post_recv(qp, &rwr, &rbad) == 0, "post_recv in INIT");
    struct ibv_send_wr swr, *sbad;
    memset(&swr, 0, sizeof swr);
    swr.opcode = IBV_WR_SEND;
    CHECK(ibv_post_send(qp, &swr, &sbad) == EINVAL && sbad == &swr, "post_send in INIT");
    struct info peer;
    memset(&peer, 0, sizeof peer);
    peer.gid = g;
    peer.qpn = 4242;
    struct opts o = defaults(IBV_QPT_RC);
    rtr_attr(&a, &peer, &o);
    CHECK(ibv.modify_qp(qp, &a, rtr_mask(IBV_QPT_UC)) == EINVAL, "RC RTR without MAX_DEST_RD_ATOMIC");
    a.ah_attr.is_global = 0;
    CHECK(ibv.modify_qp(qp, &a, rtr_mask(IBV_QPT_RC)) == EINVAL, "RTR without a GRH");
    a.ah_attr.is_global = 1;
    memset(a.ah_attr.grh.dgid.raw, 0x11, 16);
    CHECK(ibv.modify_qp(qp, &a, rtr_mask(IBV_QPT_RC)) == EINVAL, "RTR to a GID nobody has");
    a.ah_attr.grh.dgid = g;
    CHECK(ibv.modify_qp(qp, &a, rtr_mask(IBV_QPT_RC)) == 0, "to RTR");
    CHECK(ibv_post_send(qp, &swr, &sbad) == EINVAL, "post_send in RTR");
    struct info me = {.psn = 1};
    rts_attr(&a, &me, &o);
    CHECK(ibv.modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_SQ_PSN) == EINVAL, "RC RTS without TIMEOUT etc.");
    a.retry_cnt = 8;
    CHECK(ibv.modify_qp(qp, &a, rts_mask(IBV_QPT_RC)) == EINVAL, "retry_cnt 8");
    a.retry_cnt = 3;
    CHECK(ibv.modify_qp(qp, &a, rts_mask(IBV_QPT_RC)) == 0, "to RTS");
    CHECK(qp->state == IBV_QPS_RTS, "qp->state follows modify_qp");
    swr.num_sge = 3;
    CHECK(ibv_post_send(qp, &swr, &sbad) == EINVAL, "num_sge past max_send_sge");
    swr.num_sge = 0;
    swr.opcode = IBV_WR_RDMA_READ;
    CHECK(ibv_post_send(qp, &swr, &sbad) == EINVAL, "RDMA READ is not modelled");
    swr.opcode = IBV_WR_SEND;
    swr.send_flags = IBV_SEND_INLINE;
    struct ibv_sge big = {(uintptr_t)mem, 1000, 0};
    swr.sg_list = &big;
    swr.num_sge = 1;
    CHECK(ibv_post_send(qp, &swr, &sbad) == EINVAL, "inline past max_inline_data");
    a.qp_state = IBV_QPS_RESET;
    CHECK(ibv.modify_qp(qp, &a, IBV_QP_STATE) == 0, "to RESET");
    CHECK(ibv.destroy_qp(qp) == 0, "destroy_qp");
    /* UC: RTR must not carry RC's attributes */
    ia.qp_type = IBV_QPT_UC;
    qp = ibv.create_qp(pd, &ia);
    CHECK(qp && to_init(&(struct end){.qp = qp}) == 0, "UC to INIT");
    rtr_attr(&a, &peer, &o);
    CHECK(ibv.modify_qp(qp, &a, rtr_mask(IBV_QPT_RC)) == EINVAL, "UC RTR with MIN_RNR_TIMER");
    CHECK(ibv.modify_qp(qp, &a, rtr_mask(IBV_QPT_UC)) == 0, "UC to RTR");
    CHECK(ibv.destroy_qp(qp) == 0 && ibv.destroy_cq(cq) == 0 && ibv.destroy_comp_channel(ch) == 0, "teardown");
    CHECK(ibv.close_device(ctx) == EBUSY, "close_device with a PD and a region open");
    CHECK(ibv.dereg_mr(mrs[0]) == 0 && ibv.dealloc_pd(pd) == 0 && ibv.close_device(ctx) == 0, "teardown");
}

/* A device that offers UC only, as Apple's. */
static void uc_only(void)
{
    if (RANK == 1)
        return;
    struct ibv_context *ctx = open_first();
    struct ibv_pd *pd = ibv.alloc_pd(ctx);
    struct ibv_cq *cq = ibv.create_cq(ctx, 4, NULL, NULL, 0);
    struct ibv_qp_init_attr ia;
    memset(&ia, 0, sizeof ia);
    ia.send_cq = ia.recv_cq = cq;
    ia.cap.max_send_wr = ia.cap.max_recv_wr = 4;
    ia.qp_type = IBV_QPT_RC;
    CHECK(!ibv.create_qp(pd, &ia) && errno == EOPNOTSUPP, "RC on a UC-only device");
    ia.qp_type = IBV_QPT_UC;
    struct ibv_qp *qp = ibv.create_qp(pd, &ia);
    CHECK(qp, "UC on a UC-only device");
    CHECK(ibv.destroy_qp(qp) == 0 && ibv.destroy_cq(cq) == 0 && ibv.dealloc_pd(pd) == 0 && ibv.close_device(ctx) == 0,
          "teardown");
}

/* A message that reaches a QP not yet in RTR: RC holds it within the
 * requester's retry window (delivered once the responder is in RTR, or
 * RETRY_EXC_ERR when the window is shorter); UC drops it. */
static void early(void)
{
    for (int round = 0; round < 3; round++) {
        int type = round == 2 ? IBV_QPT_UC : IBV_QPT_RC;
        struct end e;
        struct opts o = defaults(type);
        o.timeout = round == 0 ? 20 : 10; /* 4.3 s or 4.2 ms, x (retry_cnt 3 + 1) */
        make_end(&e, &o, 1 << 16);
        CHECK(to_init(&e) == 0, "INIT");
        struct info me = my_info(&e), peer;
        xchg(&me, &peer, sizeof me);
        struct ibv_qp_attr a;
        if (RANK == 0) {
            rtr_attr(&a, &peer, &o);
            CHECK(ibv.modify_qp(e.qp, &a, rtr_mask(type)) == 0, "RTR");
            rts_attr(&a, &me, &o);
            CHECK(ibv.modify_qp(e.qp, &a, rts_mask(type)) == 0, "RTS");
            memset(e.buf, 'e', 64);
            CHECK(post_send(&e, IBV_WR_SEND, 1, 0, 64, 1, 0, NULL, 0, 0) == 0, "post");
            double t0 = now_s();
            expect(e.scq, round == 1 ? IBV_WC_RETRY_EXC_ERR : IBV_WC_SUCCESS, "send to a QP still in INIT");
            if (round == 0)
                CHECK(now_s() - t0 > 0.2, "the RC send completed before the responder was in RTR");
            barrier();
        } else {
            usleep(round == 2 ? 1000000 : 300000); /* UC: time for the message to arrive and go */
            CHECK(post_recv(&e, 3, 0, 64) == 0, "post_recv in INIT");
            rtr_attr(&a, &peer, &o);
            CHECK(ibv.modify_qp(e.qp, &a, rtr_mask(type)) == 0, "RTR");
            if (round == 0) {
                struct ibv_wc wc = expect(e.rcq, IBV_WC_SUCCESS, "the held message");
                CHECK(wc.byte_len == 64 && e.buf[0] == 'e', "data");
            } else {
                no_completion(e.rcq, 300, round == 1 ? "a message refused after the retry window"
                                                     : "a UC message that came before RTR");
            }
            barrier();
        }
        barrier();
        destroy_end(&e);
    }
}

/* Apple's devices have 10 queue pairs: the eleventh fails with EBUSY
 * (SOFTVERBS_MAX_QP, default 10), counted per device across contexts. */
static void qp_limit(void)
{
    if (RANK == 1)
        return;
    struct ibv_context *c1 = open_first(), *c2 = open_first();
    struct ibv_device_attr da;
    CHECK(ibv.query_device(c1, &da) == 0 && da.max_qp == 10, "max_qp %d", da.max_qp);
    struct ibv_pd *p1 = ibv.alloc_pd(c1), *p2 = ibv.alloc_pd(c2);
    struct ibv_cq *q1 = ibv.create_cq(c1, 4, NULL, NULL, 0), *q2 = ibv.create_cq(c2, 4, NULL, NULL, 0);
    struct ibv_qp_init_attr ia;
    memset(&ia, 0, sizeof ia);
    ia.cap.max_send_wr = ia.cap.max_recv_wr = 1;
    ia.qp_type = IBV_QPT_UC;
    struct ibv_qp *qps[10];
    for (int i = 0; i < 10; i++) {
        ia.send_cq = ia.recv_cq = i % 2 ? q2 : q1;
        qps[i] = ibv.create_qp(i % 2 ? p2 : p1, &ia);
        CHECK(qps[i], "QP %d: %s", i, strerror(errno));
    }
    ia.send_cq = ia.recv_cq = q1;
    CHECK(!ibv.create_qp(p1, &ia) && errno == EBUSY, "an eleventh QP on the device");
    CHECK(ibv.destroy_qp(qps[0]) == 0, "destroy");
    qps[0] = ibv.create_qp(p1, &ia);
    CHECK(qps[0], "a QP again after one was destroyed");
    for (int i = 0; i < 10; i++)
        CHECK(ibv.destroy_qp(qps[i]) == 0, "destroy");
    CHECK(ibv.destroy_cq(q1) == 0 && ibv.destroy_cq(q2) == 0 && ibv.dealloc_pd(p1) == 0 && ibv.dealloc_pd(p2) == 0 &&
              ibv.close_device(c1) == 0 && ibv.close_device(c2) == 0,
          "teardown");
}

/* SOFTVERBS_UC_NORECV=wait: a UC message that finds no receive waits for
 * one (as JACCL's examples need of Apple's devices) instead of vanishing. */
static void uc_wait(void)
{
    struct end e;
    struct opts o = defaults(IBV_QPT_UC);
    make_end(&e, &o, 1 << 16);
    connect_end(&e, &o, NULL);
    if (RANK == 0) {
        memset(e.buf, 'w', 128);
        CHECK(post_send(&e, IBV_WR_SEND, 1, 0, 128, 1, 0, NULL, 0, 0) == 0, "post");
        expect(e.scq, IBV_WC_SUCCESS, "UC send (complete once transmitted)");
        barrier();
    } else {
        usleep(300000);
        barrier();
        CHECK(post_recv(&e, 9, 0, 4096) == 0, "post_recv");
        struct ibv_wc wc = expect(e.rcq, IBV_WC_SUCCESS, "the held message");
        CHECK(wc.wr_id == 9 && wc.byte_len == 128 && e.buf[127] == 'w', "data");
    }
    barrier();
    destroy_end(&e);
}

/* Queue limits: max_send_wr counts unsignaled WRs until a later signaled
 * completion is polled; max_recv_wr likewise; a CQ that overflows is an
 * error (poll_cq < 0) and its QP goes to ERR. */
static void limits(void)
{
    struct end e;
    struct opts o = defaults(IBV_QPT_RC);
    o.send_wr = 4;
    o.recv_wr = 2;
    o.cqe = 3;
    make_end(&e, &o, 1 << 16);
    struct info peer = connect_end(&e, &o, NULL);
    if (RANK == 0) {
        for (int i = 0; i < 3; i++)
            CHECK(post_send(&e, IBV_WR_RDMA_WRITE, (uint64_t)i, 0, 64, 0, 0, &peer, 0, peer.rkey) == 0, "post %d", i);
        CHECK(post_send(&e, IBV_WR_RDMA_WRITE, 3, 0, 64, 1, 0, &peer, 0, peer.rkey) == 0, "post 3");
        CHECK(post_send(&e, IBV_WR_RDMA_WRITE, 4, 0, 64, 1, 0, &peer, 0, peer.rkey) == ENOMEM, "5th WR on 4 slots");
        usleep(100000);
        CHECK(post_send(&e, IBV_WR_RDMA_WRITE, 4, 0, 64, 1, 0, &peer, 0, peer.rkey) == ENOMEM,
              "slots free before the completion is polled");
        struct ibv_wc wc = expect(e.scq, IBV_WC_SUCCESS, "signaled write");
        CHECK(wc.wr_id == 3, "only the signaled WR completes");
        for (int i = 0; i < 4; i++)
            CHECK(post_send(&e, IBV_WR_RDMA_WRITE, 10 + (uint64_t)i, 0, 64, 1, 0, &peer, 0, peer.rkey) == 0,
                  "all four slots free after the poll");
        /* 4 completions into a CQ of 3: the fourth puts the QP in ERR */
        double t0 = now_s();
        while (qp_state(&e) != IBV_QPS_ERR && now_s() - t0 < 20)
            usleep(1000);
        struct ibv_wc w4[4];
        int n = ibv_poll_cq(e.scq, 4, w4);
        CHECK(n < 0 && errno == EOVERFLOW, "an overflowed CQ polls %d", n);
        CHECK(qp_state(&e) == IBV_QPS_ERR, "the QP of an overflowed CQ is in ERR");
        barrier();
    } else {
        CHECK(post_recv(&e, 1, 0, 8) == 0 && post_recv(&e, 2, 0, 8) == 0, "two receives");
        CHECK(post_recv(&e, 3, 0, 8) == ENOMEM, "a third receive on 2 slots");
        barrier();
    }
    barrier();
    /* the overflowed CQ and the QP in ERR still tear down */
    CHECK(ibv.destroy_qp(e.qp) == 0 && ibv.dereg_mr(e.mr) == 0 && ibv.destroy_cq(e.scq) == 0 &&
              ibv.destroy_cq(e.rcq) == 0 && ibv.dealloc_pd(e.pd) == 0 && ibv.close_device(e.ctx) == 0,
          "teardown");
}

/* Completion channel: an armed CQ wakes a poll() on the channel's fd; an
 * unarmed one does not; destroy_cq refuses while an event is unacked. */
static void channel(void)
{
    struct end e;
    struct opts o = defaults(IBV_QPT_RC);
    o.channel = 1;
    make_end(&e, &o, 1 << 16);
    connect_end(&e, &o, NULL);
    if (RANK == 1) {
        CHECK(post_recv(&e, 1, 0, 64) == 0 && post_recv(&e, 2, 0, 64) == 0, "post_recv");
        barrier();
        /* not armed: the first message wakes nobody */
        struct pollfd p = {e.chan->fd, POLLIN, 0};
        CHECK(poll(&p, 1, 400) == 0, "an event without req_notify_cq");
        struct ibv_wc wc = expect(e.rcq, IBV_WC_SUCCESS, "first message");
        CHECK(ibv_req_notify_cq(e.rcq, 0) == 0, "arm");
        barrier();
        double t0 = now_s();
        CHECK(poll(&p, 1, 5000) == 1, "no event within 5 s");
        printf("METRIC channel_wakeup_ms %.1f\n", (now_s() - t0) * 1e3);
        struct ibv_cq *cq;
        void *cqctx;
        CHECK(ibv.get_cq_event(e.chan, &cq, &cqctx) == 0 && cq == e.rcq && cqctx == &e, "get_cq_event");
        wc = expect(e.rcq, IBV_WC_SUCCESS, "second message");
        CHECK(wc.wr_id == 2, "wr_id");
        CHECK(poll(&p, 1, 100) == 0, "one arm, one event");
        barrier();
        CHECK(ibv.destroy_qp(e.qp) == 0, "destroy_qp");
        CHECK(ibv.destroy_cq(e.rcq) == EBUSY, "destroy_cq with an event not acknowledged");
        ibv.ack_cq_events(e.rcq, 1);
        CHECK(ibv.dereg_mr(e.mr) == 0 && ibv.destroy_cq(e.rcq) == 0 && ibv.destroy_cq(e.scq) == 0 &&
                  ibv.destroy_comp_channel(e.chan) == 0 && ibv.dealloc_pd(e.pd) == 0 && ibv.close_device(e.ctx) == 0,
              "teardown");
    } else {
        barrier();
        CHECK(post_send(&e, IBV_WR_SEND, 1, 0, 64, 1, 0, NULL, 0, 0) == 0, "post");
        expect(e.scq, IBV_WC_SUCCESS, "send 1");
        barrier();
        usleep(200000); /* rank 1 is asleep in poll() */
        CHECK(post_send(&e, IBV_WR_SEND, 2, 0, 64, 1, 0, NULL, 0, 0) == 0, "post");
        expect(e.scq, IBV_WC_SUCCESS, "send 2");
        barrier();
        destroy_end(&e);
    }
}

/* Jitter: completions of two QPs on one CQ come in both orders, those of
 * one QP always in order. First a burst of N WRs on each QP, then ROUNDS
 * rounds of one WR on each (a posted before b), whose order under jitter
 * is a coin toss each time. */
static void jitter(void)
{
    enum { N = 200, ROUNDS = 100, TOTAL = N + ROUNDS };
    struct end a, b;
    struct opts o = defaults(IBV_QPT_RC);
    o.send_wr = o.recv_wr = TOTAL;
    o.cqe = 2 * TOTAL + 8;
    make_end(&a, &o, 1 << 16);
    /* b shares a's context, PD, region and CQs */
    b = a;
    struct ibv_qp_init_attr ia;
    memset(&ia, 0, sizeof ia);
    ia.send_cq = a.scq;
    ia.recv_cq = a.rcq;
    ia.qp_type = IBV_QPT_RC;
    ia.cap.max_send_wr = ia.cap.max_recv_wr = TOTAL;
    ia.cap.max_send_sge = ia.cap.max_recv_sge = 1;
    b.qp = ibv.create_qp(a.pd, &ia);
    CHECK(b.qp, "second QP");
    connect_end(&a, &o, NULL);
    connect_end(&b, &o, NULL);
    struct ibv_cq *cq = RANK == 0 ? a.scq : a.rcq;
    if (RANK == 1)
        for (int i = 0; i < TOTAL; i++)
            CHECK(post_recv(&a, (uint64_t)i, 0, 64) == 0 && post_recv(&b, 1000 + (uint64_t)i, 0, 64) == 0, "recv");
    barrier();
    int next_a = 0, next_b = 1000, b_first = 0, a_first = 0;
    for (int k = 0; k < 2 * TOTAL; k++) {
        if (RANK == 0 && k == 0)
            for (int i = 0; i < N; i++) {
                CHECK(post_send(&a, IBV_WR_SEND, (uint64_t)i, 0, 64, 1, 0, NULL, 0, 0) == 0, "post a");
                CHECK(post_send(&b, IBV_WR_SEND, 1000 + (uint64_t)i, 0, 64, 1, 0, NULL, 0, 0) == 0, "post b");
            }
        if (RANK == 0 && k >= 2 * N && k % 2 == 0) {
            int i = k / 2;
            CHECK(post_send(&a, IBV_WR_SEND, (uint64_t)i, 0, 64, 1, 0, NULL, 0, 0) == 0, "post a");
            CHECK(post_send(&b, IBV_WR_SEND, 1000 + (uint64_t)i, 0, 64, 1, 0, NULL, 0, 0) == 0, "post b");
        }
        struct ibv_wc wc = expect(cq, IBV_WC_SUCCESS, "completion");
        if (wc.wr_id < 1000) {
            CHECK((int)wc.wr_id == next_a, "QP a out of order: %llu, wanted %d", (unsigned long long)wc.wr_id, next_a);
            if (next_a + 1000 >= next_b)
                a_first++; /* a(j) before b(j) */
            next_a++;
        } else {
            CHECK((int)wc.wr_id == next_b, "QP b out of order: %llu, wanted %d", (unsigned long long)wc.wr_id, next_b);
            if (next_b - 1000 >= next_a)
                b_first++; /* b(j) before a(j), though a(j) was posted first */
            next_b++;
        }
    }
    const char *q = RANK == 0 ? "send" : "recv";
    say("%s CQ: of %d pairs, QP b's completion came first %d times, QP a's %d", q, TOTAL, b_first, a_first);
    printf("METRIC jitter_b_first_%s %d\n", q, b_first);
    CHECK(b_first > 0 && a_first > 0, "jitter did not reorder completions across QPs");
    barrier();
    CHECK(ibv.destroy_qp(b.qp) == 0, "destroy b");
    destroy_end(&a);
}

/* A peer that dies: RC completes with RETRY_EXC_ERR within the retry window;
 * UC completes successfully (the loss is silent). */
static void dead_peer(int type)
{
    struct end e;
    struct opts o = defaults(type);
    o.timeout = 10;  /* 4.2 ms */
    o.retry_cnt = 3; /* x 4 = 17 ms */
    make_end(&e, &o, 1 << 16);
    connect_end(&e, &o, NULL);
    if (RANK == 1) {
        CHECK(post_recv(&e, 1, 0, 64) == 0, "post_recv");
        barrier();
        expect(e.rcq, IBV_WC_SUCCESS, "first message");
        barrier();
        _exit(0); /* dies without tearing anything down */
    }
    barrier();
    CHECK(post_send(&e, IBV_WR_SEND, 1, 0, 64, 1, 0, NULL, 0, 0) == 0, "post");
    expect(e.scq, IBV_WC_SUCCESS, "first message");
    barrier();
    /* wait until the peer process is gone */
    char c;
    struct pollfd p = {SIDE, POLLIN, 0};
    CHECK(poll(&p, 1, 10000) == 1 && read(SIDE, &c, 1) == 0, "peer did not exit");
    usleep(50000);
    double t0 = now_s();
    CHECK(post_send(&e, IBV_WR_SEND, 2, 0, 64, 1, 0, NULL, 0, 0) == 0, "post");
    CHECK(post_send(&e, IBV_WR_SEND, 3, 0, 64, 1, 0, NULL, 0, 0) == 0, "post");
    if (type == IBV_QPT_RC) {
        struct ibv_wc wc = expect(e.scq, IBV_WC_RETRY_EXC_ERR, "send to a dead peer");
        double dt = now_s() - t0;
        printf("METRIC rc_dead_peer_ms %.1f\n", dt * 1e3);
        CHECK(wc.wr_id == 2 && dt < 2.0, "wr %llu after %.3f s", (unsigned long long)wc.wr_id, dt);
        expect(e.scq, IBV_WC_WR_FLUSH_ERR, "the WR behind it");
    } else {
        expect(e.scq, IBV_WC_SUCCESS, "UC send to a dead peer");
        expect(e.scq, IBV_WC_SUCCESS, "UC send to a dead peer");
    }
    destroy_end(&e);
}

/* PSNs: a responder whose rq_psn is not the requester's sq_psn refuses (RC:
 * RETRY_EXC_ERR at the sender) or drops (UC) the messages. */
static void psn(int type)
{
    struct end e;
    struct opts o = defaults(type);
    o.psn_skew = RANK == 1 ? 5 : 0;
    make_end(&e, &o, 1 << 16);
    connect_end(&e, &o, NULL);
    if (RANK == 1) {
        CHECK(post_recv(&e, 1, 0, 64) == 0, "post_recv");
        barrier();
        if (type == IBV_QPT_UC)
            no_completion(e.rcq, 400, "UC message with the wrong PSN");
        barrier();
    } else {
        barrier();
        CHECK(post_send(&e, IBV_WR_SEND, 1, 0, 64, 1, 0, NULL, 0, 0) == 0, "post");
        expect(e.scq, type == IBV_QPT_RC ? IBV_WC_RETRY_EXC_ERR : IBV_WC_SUCCESS, "send with a PSN the peer does not expect");
        barrier();
    }
    barrier();
    destroy_end(&e);
}

/* A stranger that connects to a QP's socket and writes garbage, and one
 * that sends a valid hello from the wrong QP, change nothing. */
static void stranger(void)
{
    struct end e;
    struct opts o = defaults(IBV_QPT_RC);
    make_end(&e, &o, 1 << 16);
    struct info peer = connect_end(&e, &o, NULL);
    if (RANK == 0) {
        const char *dir = getenv("SOFTVERBS_DIR");
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s/%u.%u.%u.%u_%u", dir, peer.gid.raw[12], peer.gid.raw[13],
                 peer.gid.raw[14], peer.gid.raw[15], peer.qpn);
        for (int i = 0; i < 50; i++) {
            int fd = socket(AF_UNIX, SOCK_STREAM, 0);
            CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect to %s: %s", sa.sun_path,
                  strerror(errno));
            char junk[512];
            memset(junk, i, sizeof junk);
            ssize_t w = write(fd, junk, (size_t)(i * 10 % 512));
            (void)w;
            close(fd);
        }
        usleep(100000);
        barrier();
        memset(e.buf, 's', 64);
        CHECK(post_send(&e, IBV_WR_SEND, 1, 0, 64, 1, 0, NULL, 0, 0) == 0, "post");
        expect(e.scq, IBV_WC_SUCCESS, "send after the strangers");
    } else {
        CHECK(post_recv(&e, 1, 0, 64) == 0, "post_recv");
        barrier();
        struct ibv_wc wc = expect(e.rcq, IBV_WC_SUCCESS, "message after the strangers");
        CHECK(wc.byte_len == 64 && e.buf[0] == 's', "data");
    }
    barrier();
    destroy_end(&e);
}

/* ---- driver -------------------------------------------------------------- */

static const struct {
    const char *name;
    void (*run)(void);
    const char *env; /* extra NAME=VALUE;... for both ranks */
} SCENARIOS[] = {
    {"rc_pingpong", NULL, ""},
    {"uc_pingpong", NULL, ""},
    {"write_imm", write_imm_pipeline, ""},
    {"bad_rkey", NULL, ""},
    {"bad_rkey_lkey", NULL, ""},
    {"use_after_dereg", NULL, ""},
    {"uc_drop", uc_drop, ""},
    {"rnr", rnr, ""},
    {"reuse", reuse, "SOFTVERBS_JITTER_US=20000;SOFTVERBS_SEED=7"},
    {"usage_errors", usage_errors, "SOFTVERBS_MAX_MR=4"},
    {"uc_only", uc_only, "SOFTVERBS_UC_ONLY=1"},
    {"uc_only_device", uc_only, "SOFTVERBS_DEVICES=sv_uc=10.77.0.9/uc"},
    {"limits", limits, ""},
    {"qp_limit", qp_limit, ""},
    {"early", early, ""},
    {"uc_wait", uc_wait, "SOFTVERBS_UC_NORECV=wait"},
    {"channel", channel, ""},
    {"jitter", jitter, "SOFTVERBS_JITTER_US=2000"},
    {"dead_peer_rc", NULL, ""},
    {"dead_peer_uc", NULL, ""},
    {"psn_rc", NULL, ""},
    {"psn_uc", NULL, ""},
    {"stranger", stranger, ""},
    {"rc_pingpong_jitter", NULL, "SOFTVERBS_JITTER_US=200"},
    {"uc_drop_every", NULL, "SOFTVERBS_DROP_EVERY=3;SOFTVERBS_DROP_AFTER=2"},
    {"rc_drop_every", NULL, "SOFTVERBS_DROP_EVERY=3;SOFTVERBS_DROP_AFTER=2"},
};

static void run_named(const char *name)
{
    if (!strcmp(name, "rc_pingpong") || !strcmp(name, "rc_pingpong_jitter"))
        pingpong(IBV_QPT_RC);
    else if (!strcmp(name, "uc_pingpong"))
        pingpong(IBV_QPT_UC);
    else if (!strcmp(name, "bad_rkey"))
        bad_rkey_rc(0);
    else if (!strcmp(name, "bad_rkey_lkey"))
        bad_rkey_rc(1);
    else if (!strcmp(name, "use_after_dereg"))
        bad_rkey_rc(2);
    else if (!strcmp(name, "dead_peer_rc"))
        dead_peer(IBV_QPT_RC);
    else if (!strcmp(name, "dead_peer_uc"))
        dead_peer(IBV_QPT_UC);
    else if (!strcmp(name, "psn_rc"))
        psn(IBV_QPT_RC);
    else if (!strcmp(name, "psn_uc"))
        psn(IBV_QPT_UC);
    else if (!strcmp(name, "uc_drop_every"))
        drop_every(IBV_QPT_UC);
    else if (!strcmp(name, "rc_drop_every"))
        drop_every(IBV_QPT_RC);
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "--list")) {
        for (size_t i = 0; i < sizeof SCENARIOS / sizeof SCENARIOS[0]; i++)
            printf("%s\n", SCENARIOS[i].name);
        return 0;
    }
    if (argc != 3) {
        fprintf(stderr, "usage: %s LIBRARY SCENARIO | --list\n", argv[0]);
        return 2;
    }
    int idx = -1;
    for (size_t i = 0; i < sizeof SCENARIOS / sizeof SCENARIOS[0]; i++)
        if (!strcmp(SCENARIOS[i].name, argv[2]))
            idx = (int)i;
    if (idx < 0) {
        fprintf(stderr, "no scenario %s\n", argv[2]);
        return 2;
    }
    char env[256];
    snprintf(env, sizeof env, "%s", SCENARIOS[idx].env);
    for (char *save = NULL, *kv = strtok_r(env, ";", &save); kv; kv = strtok_r(NULL, ";", &save))
        putenv(strdup(kv));
    int sp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) != 0)
        return 2;
    pid_t pids[2];
    for (int r = 0; r < 2; r++) {
        pids[r] = fork();
        if (pids[r] == 0) {
            RANK = r;
            SIDE = sp[r];
            close(sp[1 - r]);
            setenv("SOFTVERBS_DEVICES", r == 0 ? "sv_a=10.77.0.1" : "sv_b=10.77.0.2", 0);
            alarm(60);
            load(argv[1]);
            if (SCENARIOS[idx].run)
                SCENARIOS[idx].run();
            else
                run_named(argv[2]);
            say("passed");
            fflush(stdout);
            _exit(FAILS ? 1 : 0);
        }
    }
    close(sp[0]);
    close(sp[1]);
    int ok = 1;
    double end = now_s() + 40;
    for (int left = 2; left;) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);
        if (p > 0) {
            left--;
            int r = p == pids[0] ? 0 : 1;
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                printf("rank %d ended with %s %d\n", r, WIFEXITED(st) ? "status" : "signal",
                       WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
                ok = 0;
            }
            continue;
        }
        if (now_s() > end) {
            printf("timeout: killing the ranks\n");
            kill(pids[0], SIGKILL);
            kill(pids[1], SIGKILL);
            ok = 0;
            end = now_s() + 1e9;
        }
        usleep(10000);
    }
    printf("%s %s\n", argv[2], ok ? "PASSED" : "FAILED");
    return ok ? 0 : 1;
}
