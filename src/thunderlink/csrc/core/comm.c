/*
 * Communicator life cycle: creation, endpoints, connection (the bootstrap,
 * then each link's transport), split, closing, reference counting,
 * statistics and the function table for the MLX shim.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "internal.h"

/* Process-wide counters: the sum of every communicator's, added as each
 * operation ends. */
static struct {
  _Atomic uint64_t calls[TL_NUM_OPS];
  _Atomic uint64_t bytes_sent;
  _Atomic uint64_t bytes_received;
  _Atomic uint64_t last_in;
  _Atomic uint64_t last_out;
} g_stats;

int tl_comm_create(tl_comm_t **out, int rank, int size,
                   const tl_options_t *opts) {
  if (!out) return TL_ERR_INVALID;
  *out = NULL;
  if (size < 1 || rank < 0 || rank >= size) return TL_ERR_INVALID;
  tl_options_t o;
  if (opts) o = *opts; else tl_options_default(&o);
  if (tl_options_check(&o, NULL, 0)) return TL_ERR_CONFIG;

  tl_comm_t *c = calloc(1, sizeof *c);
  if (!c) return TL_ERR_NOMEM;
  c->rank = rank;
  c->size = size;
  c->opts = o;
  c->comm_id = o.job_id;
  c->host_id = tl__host_id();
  atomic_init(&c->refs, 1);
  pthread_mutex_init(&c->lock, NULL);
  c->links = calloc((size_t)size, sizeof *c->links);
  c->ring = malloc((size_t)size * sizeof *c->ring);
  if (!c->links || !c->ring) {
    free(c->links);
    free(c->ring);
    free(c);
    return TL_ERR_NOMEM;
  }
  for (int i = 0; i < size; i++) c->ring[i] = i;
  c->ring_pos = rank;
  *out = c;
  return TL_OK;
}

const char *tl_comm_last_error(tl_comm_t *c) { return c ? c->err : ""; }

int tl_comm_add_endpoint(tl_comm_t *c, int owner, int facing, const char *host,
                         int port, const char *ifname, const char *device,
                         double weight) {
  if (!c) return TL_ERR_INVALID;
  if (c->connected)
    return tl__error(c, TL_ERR_INVALID, "endpoints must be declared before "
                     "tl_comm_connect");
  if (owner < 0 || owner >= c->size)
    return tl__error(c, TL_ERR_CONFIG, "endpoint owner rank %d is out of range "
                     "(world size %d)", owner, c->size);
  if (facing < -1 || facing >= c->size || facing == owner)
    return tl__error(c, TL_ERR_CONFIG, "endpoint of rank %d faces rank %d, which "
                     "is not another rank of this world of %d", owner, facing,
                     c->size);
  if (!host || !*host || strlen(host) >= TL_HOST_LEN)
    return tl__error(c, TL_ERR_CONFIG, "endpoint of rank %d has an empty or "
                     "overlong host", owner);
  if (port < 0 || port > 65535)
    return tl__error(c, TL_ERR_CONFIG, "endpoint %s of rank %d has port %d, "
                     "outside 0..65535", host, owner, port);
  if (ifname && strlen(ifname) >= TL_IFNAME_LEN)
    return tl__error(c, TL_ERR_CONFIG, "interface name '%s' is too long", ifname);
  if (device && strlen(device) >= TL_DEVICE_LEN)
    return tl__error(c, TL_ERR_CONFIG, "RDMA device name '%s' is too long", device);
  if (!(weight > 0))
    return tl__error(c, TL_ERR_CONFIG, "endpoint %s of rank %d has weight %g; "
                     "weights must be positive", host, owner, weight);
  for (int i = 0; i < c->neps; i++) {
    tl_endpoint_t *e = &c->eps[i];
    if (port != 0 && e->port == port && strcmp(e->host, host) == 0 &&
        e->owner != owner)
      return tl__error(c, TL_ERR_CONFIG, "ranks %d and %d both listen on %s "
                       "port %d: every rank needs its own address or port",
                       e->owner, owner, host, port);
  }
  if (c->neps == c->eps_cap) {
    int cap = c->eps_cap ? 2 * c->eps_cap : 8;
    tl_endpoint_t *n = realloc(c->eps, (size_t)cap * sizeof *n);
    if (!n) return tl__error(c, TL_ERR_NOMEM, "out of memory adding an endpoint");
    c->eps = n;
    c->eps_cap = cap;
  }
  tl_endpoint_t *e = &c->eps[c->neps++];
  memset(e, 0, sizeof *e);
  e->owner = owner;
  e->facing = facing;
  snprintf(e->host, sizeof e->host, "%s", host);
  e->port = port;
  if (ifname) snprintf(e->ifname, sizeof e->ifname, "%s", ifname);
  if (device) snprintf(e->device, sizeof e->device, "%s", device);
  e->weight = weight;
  return TL_OK;
}

int tl_comm_set_ring(tl_comm_t *c, const int32_t *order, int n) {
  if (!c || !order) return TL_ERR_INVALID;
  if (n != c->size)
    return tl__error(c, TL_ERR_CONFIG, "ring order lists %d ranks, world size is "
                     "%d", n, c->size);
  char *seen = calloc((size_t)n, 1);
  if (!seen) return TL_ERR_NOMEM;
  for (int i = 0; i < n; i++) {
    if (order[i] < 0 || order[i] >= n || seen[order[i]]) {
      free(seen);
      return tl__error(c, TL_ERR_CONFIG, "ring order must list each rank 0..%d "
                       "exactly once (entry %d is %d)", n - 1, i, order[i]);
    }
    seen[order[i]] = 1;
  }
  free(seen);
  for (int i = 0; i < n; i++) {
    c->ring[i] = order[i];
    if (order[i] == c->rank) c->ring_pos = i;
  }
  c->ring_set = 1;
  return TL_OK;
}

int tl_comm_link_plan(tl_comm_t *c, int a, int b, int *acceptor, int32_t *cables,
                      int32_t *sources, int cap, int *ncables) {
  if (!c || !acceptor || !ncables || (cap > 0 && !cables)) return TL_ERR_INVALID;
  if (a < 0 || a >= c->size || b < 0 || b >= c->size)
    return tl__error(c, TL_ERR_INVALID, "ranks %d and %d: out of range (world size %d)",
                     a, b, c->size);
  int tg[TL_MAX_CONNS], nt;
  *acceptor = tl__link_plan(c->eps, c->neps, a, b, tg, &nt);
  *ncables = nt;
  int dialler = *acceptor == a ? b : a;
  for (int i = 0; i < nt && i < cap; i++) {
    cables[i] = tg[i];
    if (sources) sources[i] = tl__source_ep(c->eps, c->neps, dialler, *acceptor, i);
  }
  return TL_OK;
}

int tl_comm_find_ring(tl_comm_t *c, int32_t *order, int n) {
  if (!c || !order) return TL_ERR_INVALID;
  if (n != c->size)
    return tl__error(c, TL_ERR_INVALID, "ring order of %d ranks asked for a world of %d",
                     n, c->size);
  /* The same for every rank: the message names no rank of its own. */
  int rc = tl__find_ring(c->eps, c->neps, n, order, c->err, sizeof c->err);
  if (!rc) c->err[0] = 0;
  return rc;
}

int tl_comm_link_info(tl_comm_t *c, int peer, int *transport, int *nchannels) {
  if (!c || !transport || !nchannels) return TL_ERR_INVALID;
  if (peer < 0 || peer >= c->size) return TL_ERR_INVALID;
  const tl_link_t *l = &c->links[peer];
  *transport = l->nchans ? l->ops->id : 0;
  *nchannels = l->nchans;
  return TL_OK;
}

/* Ring neighbours must share a link; other pairs may not (a Thunderbolt ring
 * has cables between neighbours only), which rules out the one-round
 * algorithms that need every pair. */
static int check_links(tl_comm_t *c) {
  /* From the endpoint table, so that every rank sees the same (a rank
   * linked to all others is no mesh while two others share no link). */
  c->mesh = tl__mesh_kind(c->eps, c->neps, c->size);
  for (int p = 0; p < c->size; p++)
    if (p != c->rank && c->links[p].nchans == 0) c->mesh = 0;
  int n = c->size;
  int left = c->ring[(c->ring_pos + n - 1) % n], right = c->ring[(c->ring_pos + 1) % n];
  int bad = c->links[left].nchans == 0 ? left : c->links[right].nchans == 0 ? right : -1;
  if (bad >= 0)
    return tl__error(c, TL_ERR_CONFIG, "ranks %d and %d are neighbours in the ring "
                     "but the hostfile gives neither an address the other can "
                     "reach: add one, or order the ring along the cables", c->rank,
                     bad);
  return TL_OK;
}

/* ---- connecting ---------------------------------------------------------------- */

const tl_transport_ops_t *tl__transport(int id) {
  switch (id) {
  case TL_TRANSPORT_TCP: return &tl__tcp_ops;
  case TL_TRANSPORT_SHM: return &tl__shm_ops;
  case TL_TRANSPORT_RDMA: return &tl__rdma_ops;
  default: return NULL;
  }
}

int tl_transport_available(int id, char *why, size_t cap) {
  char scratch[8];
  if (!why || cap == 0) {
    why = scratch;
    cap = sizeof scratch;
  }
  why[0] = 0;
  const tl_transport_ops_t *t = tl__transport(id);
  if (!t) {
    snprintf(why, cap, "transport %d is not part of this build", id);
    return TL_ERR_UNSUPPORTED;
  }
  return t->available(why, cap) ? TL_OK : TL_ERR_UNSUPPORTED;
}

/* The transport of the link to l->peer, from the mode every rank shares
 * (it is in the handshake's digest) and the host ids both ends know, so
 * both ends choose the same. In auto mode a link between two hosts is
 * offered to RDMA, whose set-up asks both ends whether they have a device
 * and falls back to TCP together when either has none (rdma.c). */
static int choose(tl_comm_t *c, const tl_link_t *l, const tl_transport_ops_t **out) {
  char why[512] = "";
  int same_host = l->host_id == c->host_id;
  *out = &tl__tcp_ops;
  if (c->opts.transport == TL_TRANSPORT_TCP) return TL_OK;
  if (c->opts.transport == TL_TRANSPORT_RDMA) {
    if (!tl__rdma_ops.available(why, sizeof why))
      return tl__error(c, TL_ERR_CONFIG, "THUNDERLINK_TRANSPORT=rdma, but RDMA is not "
                       "available here: %s. Use THUNDERLINK_TRANSPORT=auto (RDMA where both "
                       "ends of a link have a device, else shared memory or TCP)", why);
    *out = &tl__rdma_ops;
    return TL_OK;
  }
  if (c->opts.transport == TL_TRANSPORT_SHM) {
    if (!same_host)
      return tl__error(c, TL_ERR_CONFIG, "THUNDERLINK_TRANSPORT=shm, but rank %d (%s) "
                       "runs on another host (or in another network namespace, or as "
                       "another user): shared memory joins ranks of one host only. Use "
                       "THUNDERLINK_TRANSPORT=auto (shared memory where ranks share a "
                       "host, TCP elsewhere) or tcp", l->peer, l->remote);
    if (!tl__shm_ops.available(why, sizeof why))
      return tl__error(c, TL_ERR_UNSUPPORTED, "THUNDERLINK_TRANSPORT=shm, but shared "
                       "memory is not available here: %s", why);
  } else if (!same_host) {
    *out = &tl__rdma_ops;
    return TL_OK;
  } else if (!tl__shm_ops.available(why, sizeof why)) {
    return TL_OK;
  }
  *out = &tl__shm_ops;
  return TL_OK;
}

/* Bootstrap every link, then let each link's transport take its
 * connections over, phase by phase (see tl_transport_ops_t.setup). Where
 * shared memory cannot be set up and the mode is auto, the link falls back
 * to TCP over the same connections. */
static int connect_links(tl_comm_t *c) {
  c->deadline_ns = tl__now_ns() + (int64_t)c->opts.connect_timeout_ms * 1000000;
  int rc = tl__boot_connect(c);
  for (int p = 0; p < c->size && !rc; p++)
    if (c->links[p].nboot) rc = choose(c, &c->links[p], &c->links[p].ops);
  for (int phase = 0; phase < TL_SETUP_PHASES && !rc; phase++) {
    for (int p = 0; p < c->size && !rc; p++) {
      tl_link_t *l = &c->links[p];
      if (!l->nboot || (phase > 0 && l->ops == &tl__tcp_ops)) continue;
      rc = l->ops->setup(c, l, phase);
      if (rc == TL_ERR_UNSUPPORTED && c->opts.transport == TL_TRANSPORT_AUTO &&
          l->ops != &tl__tcp_ops) {
        /* No RDMA device at either end is the usual case, not a warning. */
        tl__log(c, l->ops == &tl__rdma_ops ? TL_LOG_INFO : TL_LOG_WARN,
                "link to rank %d: %s not possible (%s); using tcp", p, l->ops->name, c->err);
        if (l->ops->close_link) l->ops->close_link(l);
        l->ops = &tl__tcp_ops;
        rc = l->ops->setup(c, l, 0);
      }
    }
  }
  if (!rc) rc = check_links(c);
  if (!rc) rc = tl__hb_register(c);
  if (rc) return rc;
  c->transport = TL_TRANSPORT_AUTO;
  for (int p = 0, first = 1; p < c->size; p++) {
    tl_link_t *l = &c->links[p];
    if (!l->nchans) continue;
    tl__log(c, TL_LOG_INFO, "link to rank %d: %s, %d channel%s (%s)", p, l->ops->name,
            l->nchans, l->nchans == 1 ? "" : "s", l->remote);
    c->transport = first || c->transport == l->ops->id ? l->ops->id : TL_TRANSPORT_AUTO;
    first = 0;
  }
  return TL_OK;
}

int tl_comm_connect(tl_comm_t *c) {
  if (!c) return TL_ERR_INVALID;
  pthread_mutex_lock(&c->lock);
  int rc = TL_OK;
  if (c->connected || c->closed) {
    rc = tl__error(c, TL_ERR_INVALID, "tl_comm_connect called twice, or after "
                   "close");
  } else if (c->size > 1) {
    if (!c->ring_set) {
      rc = tl_comm_find_ring(c, c->ring, c->size);
      for (int i = 0; i < c->size; i++)
        if (c->ring[i] == c->rank) c->ring_pos = i;
    }
    /* Before waiting for any peer: RDMA asked for but impossible here. */
    char why[512];
    if (!rc && c->opts.transport == TL_TRANSPORT_RDMA && !tl__rdma_ops.available(why, sizeof why))
      rc = tl__error(c, TL_ERR_CONFIG, "THUNDERLINK_TRANSPORT=rdma, but RDMA is not available "
                     "here: %s. Use THUNDERLINK_TRANSPORT=auto (RDMA where both ends of a "
                     "link have a device, else shared memory or TCP)", why);
    if (!rc) rc = tl__boot_listen(c);
    if (!rc) rc = connect_links(c);
  }
  if (!rc) c->connected = 1;
  pthread_mutex_unlock(&c->lock);
  return rc;
}

/* tl_comm_close found the lock held. If a call is in flight (another thread
 * holds a reference, see tl_comm_release), wake it: shutting the reading
 * side of every connection makes its poll return and its channels report
 * end-of-stream, and tl__vfail turns that into "closed". Only the first
 * closer does this, before taking the lock, and the channels are freed only
 * under the lock, so the table read here stays valid. A call that has not
 * begun yet sees `closing` in tl__op_begin. */
static void interrupt_call(tl_comm_t *c) {
  if (atomic_exchange(&c->closing, 1) || !atomic_load(&c->in_op)) return;
  for (int i = 0; i < c->nchans; i++)
    if (c->chans[i]->fd >= 0) shutdown(c->chans[i]->fd, SHUT_RD);
}

int tl_comm_close(tl_comm_t *c) {
  if (!c) return TL_ERR_INVALID;
  if (pthread_mutex_trylock(&c->lock) != 0) {
    interrupt_call(c);
    pthread_mutex_lock(&c->lock);
  }
  if (!c->closed) {
    c->closed = 1;
    tl__hb_unregister(c); /* before its control connections close */
    tl__links_close(c);
    tl__boot_close(c);
  }
  pthread_mutex_unlock(&c->lock);
  return TL_OK;
}

int tl_comm_retain(tl_comm_t *c) {
  if (!c) return TL_ERR_INVALID;
  atomic_fetch_add(&c->refs, 1);
  return TL_OK;
}

int tl_comm_release(tl_comm_t *c) {
  if (!c) return TL_ERR_INVALID;
  if (atomic_fetch_sub(&c->refs, 1) != 1) return TL_OK;
  tl_comm_close(c);
  while (c->free_slices) {
    tl_slice_t *s = c->free_slices;
    c->free_slices = s->next;
    free(s);
  }
  pthread_mutex_destroy(&c->lock);
  free(c->scratch);
  free(c->eps);
  free(c->links);
  free(c->ring);
  tl__wipe(c->opts.token_key, sizeof c->opts.token_key); /* the job's secret */
  free(c);
  return TL_OK;
}

int tl_comm_rank(tl_comm_t *c) { return c ? c->rank : TL_ERR_INVALID; }
int tl_comm_size(tl_comm_t *c) { return c ? c->size : TL_ERR_INVALID; }

/* Memory the caller declares stable (tl.h): every link whose transport
 * registers memory (RDMA) takes it, or none does. */
static int register_memory(tl_comm_t *c, void *addr, size_t len, int add) {
  const char *what = add ? "register_memory" : "deregister_memory";
  if (!c) return TL_ERR_INVALID;
  if (!addr || !len) return tl__error(c, TL_ERR_INVALID, "%s: empty or NULL buffer", what);
  pthread_mutex_lock(&c->lock);
  int rc = c->status, found = 0, any = 0;
  if (!rc && !c->connected && c->size > 1)
    rc = tl__error(c, TL_ERR_INVALID, "%s: the communicator is not connected yet", what);
  for (int p = 0; !rc && c->links && p < c->size; p++) {
    tl_link_t *l = &c->links[p];
    if (!l->ops || !l->ops->register_memory) continue;
    any = 1;
    int r = l->ops->register_memory(l, addr, len, add);
    if (r == TL_OK) found = 1;
    else if (add || r != TL_ERR_INVALID) rc = r;
  }
  if (rc && add) /* all or nothing */
    for (int p = 0; c->links && p < c->size; p++)
      if (c->links[p].ops && c->links[p].ops->register_memory)
        c->links[p].ops->register_memory(&c->links[p], addr, len, 0);
  if (!rc && !add && any && !found)
    rc = tl__error(c, TL_ERR_INVALID, "deregister_memory: %zu B at %p were not registered "
                   "(register_memory takes exactly the same range)", len, addr);
  pthread_mutex_unlock(&c->lock);
  return rc;
}

int tl_comm_register_memory(tl_comm_t *c, void *addr, size_t len) {
  return register_memory(c, addr, len, 1);
}

int tl_comm_deregister_memory(tl_comm_t *c, void *addr, size_t len) {
  return register_memory(c, addr, len, 0);
}

int tl_comm_stats(tl_comm_t *c, tl_stats_t *out) {
  if (!out) return TL_ERR_INVALID;
  if (c) {
    pthread_mutex_lock(&c->lock);
    *out = c->stats;
    pthread_mutex_unlock(&c->lock);
    return TL_OK;
  }
  for (int i = 0; i < TL_NUM_OPS; i++) out->calls[i] = atomic_load(&g_stats.calls[i]);
  out->bytes_sent = atomic_load(&g_stats.bytes_sent);
  out->bytes_received = atomic_load(&g_stats.bytes_received);
  out->last_in = atomic_load(&g_stats.last_in);
  out->last_out = atomic_load(&g_stats.last_out);
  return TL_OK;
}

/* Add what this operation did to the process-wide counters. `before` is the
 * communicator's counters at the start of the operation. */
void tl__stats_publish(tl_comm_t *c, const tl_stats_t *before) {
  for (int i = 0; i < TL_NUM_OPS; i++)
    if (c->stats.calls[i] != before->calls[i])
      atomic_fetch_add(&g_stats.calls[i], c->stats.calls[i] - before->calls[i]);
  atomic_fetch_add(&g_stats.bytes_sent, c->stats.bytes_sent - before->bytes_sent);
  atomic_fetch_add(&g_stats.bytes_received,
                   c->stats.bytes_received - before->bytes_received);
  atomic_store(&g_stats.last_in, c->stats.last_in);
  atomic_store(&g_stats.last_out, c->stats.last_out);
}

/* ---- split --------------------------------------------------------------------
 *
 * The child listens on the parent's addresses on fresh ports before anything
 * is exchanged, so no rank can connect to a port that is not open yet. One
 * all_gather over the parent shares every rank's (color, key, ports); each
 * member then builds the child's endpoint table from the parent's, renumbered.
 */

typedef struct split_rec {
  int32_t color;
  int32_t key;
  int32_t ports[]; /* one per endpoint owned by this rank, in table order */
} split_rec_t;

static uint64_t mix64(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  h *= 0xff51afd7ed558ccdull;
  return h ^ (h >> 33);
}

/* Build the child's endpoints and ring from the parent's, keeping members. */
static int reshape_child(tl_comm_t *parent, tl_comm_t *child, const int *newrank,
                         const char *recs, size_t rec_size, int max_own) {
  int k = 0;
  int *seen_own = calloc((size_t)parent->size, sizeof *seen_own);
  if (!seen_own) return TL_ERR_NOMEM;
  for (int i = 0; i < parent->neps; i++) {
    const tl_endpoint_t *e = &parent->eps[i];
    int idx = seen_own[e->owner]++;
    if (newrank[e->owner] < 0) continue;
    if (e->facing >= 0 && newrank[e->facing] < 0) continue;
    const split_rec_t *r = (const split_rec_t *)(recs + (size_t)e->owner * rec_size);
    tl_endpoint_t *d = &child->eps[k++];
    *d = *e;
    d->owner = newrank[e->owner];
    d->facing = e->facing >= 0 ? newrank[e->facing] : -1;
    d->port = idx < max_own ? r->ports[idx] : 0;
  }
  free(seen_own);
  child->neps = k;
  int p = 0;
  for (int i = 0; i < parent->size; i++) {
    int r = parent->ring[i];
    if (newrank[r] < 0) continue;
    child->ring[p] = newrank[r];
    if (newrank[r] == child->rank) child->ring_pos = p;
    p++;
  }
  child->ring_set = 1;
  return TL_OK;
}

int tl_comm_split(tl_comm_t *c, int color, int key, tl_comm_t **out) {
  if (!c || !out) return TL_ERR_INVALID;
  *out = NULL;
  pthread_mutex_lock(&c->lock);
  tl_stats_t before = c->stats;
  int rc = tl__op_begin(c, TL_OP_SPLIT, TL_INT32, 0xff, 0, "split");
  if (rc) goto unlock;

  int max_own = 0;
  {
    int *own = calloc((size_t)c->size, sizeof *own);
    if (!own) { rc = tl__fail(c, TL_ERR_NOMEM, "out of memory"); goto end; }
    for (int i = 0; i < c->neps; i++) own[c->eps[i].owner]++;
    for (int i = 0; i < c->size; i++) max_own = own[i] > max_own ? own[i] : max_own;
    free(own);
  }
  size_t rec_size = sizeof(split_rec_t) + (size_t)max_own * sizeof(int32_t);
  c->cur.total = rec_size;

  /* The child starts as a copy of the parent's world so that it can listen on
   * this rank's addresses; it is renumbered once the members are known. */
  tl_comm_t *child = NULL;
  rc = tl_comm_create(&child, c->rank, c->size, &c->opts);
  if (rc) { rc = tl__fail(c, rc, "cannot create the child communicator"); goto end; }
  child->eps = malloc((size_t)(c->neps ? c->neps : 1) * sizeof *child->eps);
  if (!child->eps) {
    tl_comm_release(child);
    rc = tl__fail(c, TL_ERR_NOMEM, "out of memory");
    goto end;
  }
  memcpy(child->eps, c->eps, (size_t)c->neps * sizeof *child->eps);
  child->neps = child->eps_cap = c->neps;
  for (int i = 0; i < child->neps; i++)
    if (child->eps[i].owner == c->rank) child->eps[i].port = 0;

  char *recs = calloc((size_t)c->size + 1, rec_size);
  int *newrank = malloc((size_t)c->size * sizeof *newrank);
  if (!recs || !newrank) {
    free(recs);
    free(newrank);
    tl_comm_release(child);
    rc = tl__fail(c, TL_ERR_NOMEM, "out of memory");
    goto end;
  }
  split_rec_t *mine = (split_rec_t *)(recs + (size_t)c->size * rec_size);
  mine->color = color;
  mine->key = key < 0 ? c->rank : key;
  if (color >= 0) {
    rc = tl__boot_listen(child);
    if (rc) {
      /* Tell the peers through the parent rather than leaving them waiting. */
      rc = tl__fail(c, rc, "cannot listen for the child communicator: %s",
                    child->err);
    }
    int j = 0;
    for (int i = 0; i < child->neps; i++)
      if (child->eps[i].owner == c->rank) mine->ports[j++] = child->eps[i].port;
  }
  if (!rc) rc = tl__gather_bytes(c, mine, recs, rec_size);

  if (!rc && color >= 0) {
    /* Members ordered by (key, parent rank). */
    int n = 0;
    for (int i = 0; i < c->size; i++) {
      const split_rec_t *r = (const split_rec_t *)(recs + (size_t)i * rec_size);
      newrank[i] = -1;
      if (r->color != color) continue;
      int pos = 0;
      for (int j = 0; j < c->size; j++) {
        const split_rec_t *q = (const split_rec_t *)(recs + (size_t)j * rec_size);
        if (q->color != color) continue;
        if (q->key < r->key || (q->key == r->key && j < i)) pos++;
      }
      newrank[i] = pos;
      n++;
    }
    child->rank = newrank[c->rank];
    child->size = n;
    child->comm_id = mix64(mix64(c->comm_id, ++c->split_count), (uint64_t)color);
    rc = reshape_child(c, child, newrank, recs, rec_size, max_own);
    if (rc) rc = tl__fail(c, rc, "out of memory");
  } else {
    c->split_count++;
  }
  free(recs);
  free(newrank);
  tl__op_end(c);
  tl__stats_publish(c, &before);
  pthread_mutex_unlock(&c->lock);

  if (rc || color < 0) {
    tl_comm_release(child);
    return rc;
  }
  /* Connecting the child needs no lock on the parent. */
  if (child->size > 1) {
    rc = connect_links(child);
    if (rc) {
      pthread_mutex_lock(&c->lock);
      snprintf(c->err, sizeof c->err, "%s", child->err);
      pthread_mutex_unlock(&c->lock);
      tl_comm_release(child);
      return rc;
    }
  }
  child->connected = 1;
  *out = child;
  return TL_OK;

end:
  tl__op_end(c);
  tl__stats_publish(c, &before);
unlock:
  pthread_mutex_unlock(&c->lock);
  return rc;
}

/* ---- function table for the MLX shim --------------------------------------- */

static const tl_vtable_t g_vtable = {
    .abi_version = TL_ABI_VERSION,
    .size = sizeof(tl_vtable_t),
    .comm_retain = tl_comm_retain,
    .comm_release = tl_comm_release,
    .comm_close = tl_comm_close,
    .comm_rank = tl_comm_rank,
    .comm_size = tl_comm_size,
    .comm_split = tl_comm_split,
    .comm_last_error = tl_comm_last_error,
    .all_reduce = tl_all_reduce,
    .all_gather = tl_all_gather,
    .reduce_scatter = tl_reduce_scatter,
    .send = tl_send,
    .recv = tl_recv,
    .interrupt_hook = tl_interrupt_hook,
};

const tl_vtable_t *tl_get_vtable(void) { return &g_vtable; }
