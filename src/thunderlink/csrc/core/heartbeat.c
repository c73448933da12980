/*
 * Heartbeats: how a process shows its peers that it is alive while its
 * program is busy elsewhere (computing in MLX or numpy for an hour, say).
 *
 * One thread per process, not per communicator: it starts with the first
 * communicator that has heartbeats (tl_options_t.heartbeat_ms > 0) and
 * stops with the last one closed. Woken by a timer every fifth of a
 * communicator's bound, it writes one byte (HEARTBEAT_BYTE, between frames)
 * on the control connection of each of that communicator's links. Every
 * transport keeps such a connection beside its data channels: shared memory
 * (and RDMA) the first bootstrap connection, TCP one extra bootstrap
 * connection made for the purpose (tl__boot_conns). The thread:
 *
 *  - never blocks: MSG_DONTWAIT. A full socket buffer means the peer has not
 *    read for a long while (it is idle, between collectives); the bytes
 *    already there say what this one would, so it is dropped.
 *  - never reads. The only reader of a channel is the thread running the
 *    communicator's operation: its progress loop consumes heartbeats with
 *    wake-up bytes, notes when it last heard from each peer, and fails the
 *    operation with TL_ERR_PEER when a peer it waits on has been silent for
 *    the bound (progress.c). Between operations the bytes wait in the
 *    socket buffer, a few per minute.
 *  - touches no communicator state but the control descriptors, which do
 *    not change between tl__hb_register and tl__hb_unregister (the close
 *    path unregisters before it closes them). After a failure the
 *    connection may be shut down; a send then fails (EPIPE), harmlessly.
 *
 * A stopped process (SIGSTOP, a frozen machine) stops its heartbeats with
 * everything else, and a pulled cable stops them in the wire; a process
 * whose kernel still acknowledges TCP (SIGSTOP) is why kernel keepalives
 * would not do. A forked child does not inherit the thread: it sends
 * nothing for the communicators it inherited (pthread_atfork below).
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "internal.h"

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is set on every socket instead */
#endif

typedef struct hb_entry {
  tl_comm_t *c;
  int64_t every_ns; /* a fifth of the bound */
  int64_t next_ns;  /* when its next heartbeats are due */
} hb_entry_t;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static hb_entry_t *g_list;
static int g_n, g_cap;
static pthread_t g_thread;
static int g_running;     /* g_thread is started and not yet joined */
static uint64_t g_gen;    /* a thread runs while g_gen is the value it started with */

static void make_cv(void) {
  pthread_condattr_t a;
  pthread_condattr_init(&a);
#if defined(__linux__)
  pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
#endif
  pthread_cond_init(&g_cv, &a);
  pthread_condattr_destroy(&a);
}

static void after_fork_child(void) {
  /* The thread does not exist in the child (it may have held the lock or
   * waited on the condition when the parent forked): forget it and every
   * entry, and start the lock and the condition afresh. */
  pthread_mutex_init(&g_mu, NULL);
  make_cv();
  g_n = 0;
  g_running = 0;
  g_gen++;
}

static void init_once(void) {
  make_cv();
  pthread_atfork(NULL, NULL, after_fork_child);
}

static void beat(hb_entry_t *e) {
  tl_comm_t *c = e->c;
  char b = TL_HEARTBEAT_BYTE;
  for (int p = 0; p < c->size; p++) {
    tl_chan_t *k = c->links[p].ctl;
    if (!k || k->fd < 0) continue;
    ssize_t w = send(k->fd, &b, 1, MSG_NOSIGNAL | MSG_DONTWAIT);
    (void)w; /* EAGAIN: the buffer holds heartbeats; EPIPE: failed already */
  }
}

/* Sleep until `until` (monotonic ns) or a signal on g_cv; g_mu held. */
static void sleep_until(int64_t until) {
#if defined(__linux__)
  struct timespec ts = {(time_t)(until / 1000000000), (long)(until % 1000000000)};
  pthread_cond_timedwait(&g_cv, &g_mu, &ts);
#elif defined(__APPLE__)
  int64_t left = until - tl__now_ns();
  if (left < 0) left = 0;
  struct timespec ts = {(time_t)(left / 1000000000), (long)(left % 1000000000)};
  pthread_cond_timedwait_relative_np(&g_cv, &g_mu, &ts);
#else
  (void)until;
  pthread_mutex_unlock(&g_mu);
  struct timespec ts = {0, 10000000};
  nanosleep(&ts, NULL);
  pthread_mutex_lock(&g_mu);
#endif
}

static void *run(void *arg) {
  uint64_t gen = (uint64_t)(uintptr_t)arg;
#if defined(__APPLE__)
  pthread_setname_np("tl-heartbeat"); /* macOS names only the calling thread */
#endif
  pthread_mutex_lock(&g_mu);
  while (g_gen == gen) {
    int64_t now = tl__now_ns(), wake = now + 1000000000;
    for (int i = 0; i < g_n; i++) {
      hb_entry_t *e = &g_list[i];
      if (e->next_ns <= now) {
        beat(e);
        /* On multiples of the interval, so that communicators with the
         * same bound share wake-ups; missed beats are not caught up. */
        e->next_ns = (now / e->every_ns + 1) * e->every_ns;
      }
      if (e->next_ns < wake) wake = e->next_ns;
    }
    sleep_until(wake);
  }
  pthread_mutex_unlock(&g_mu);
  return NULL;
}

int tl__hb_register(tl_comm_t *c) {
  if (c->opts.heartbeat_ms <= 0) return TL_OK;
  int any = 0;
  for (int p = 0; p < c->size; p++) any |= c->links[p].ctl != NULL;
  if (!any) return TL_OK;
  pthread_once(&g_once, init_once);
  pthread_mutex_lock(&g_mu);
  int rc = TL_OK;
  if (g_n == g_cap) {
    int cap = g_cap ? 2 * g_cap : 8;
    hb_entry_t *n = realloc(g_list, (size_t)cap * sizeof *n);
    if (!n) {
      rc = tl__error(c, TL_ERR_NOMEM, "out of memory starting heartbeats");
      goto out;
    }
    g_list = n;
    g_cap = cap;
  }
  int64_t every = (int64_t)c->opts.heartbeat_ms * 1000000 / 5;
  if (every < 1000000) every = 1000000;
  /* The first heartbeat at once: the peer's clock for this link starts
   * with its first wait, and a fresh process has said nothing yet. */
  g_list[g_n++] = (hb_entry_t){c, every, tl__now_ns()};
  if (!g_running) {
    uint64_t gen = ++g_gen;
    /* The thread takes no signals (it inherits the mask it starts with):
     * Ctrl-C must reach the program's threads, the main one first. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int e = pthread_create(&g_thread, NULL, run, (void *)(uintptr_t)gen);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
#if defined(__linux__)
    /* Named, for `top -H`, gdb and the tests (which count it). */
    if (!e) pthread_setname_np(g_thread, "tl-heartbeat");
#endif
    if (e) {
      g_n--;
      rc = tl__error(c, TL_ERR_SYSTEM, "cannot start the heartbeat thread: %s "
                     "(THUNDERLINK_HEARTBEAT=0 turns heartbeats off)", strerror(e));
      goto out;
    }
    g_running = 1;
  }
  c->hb_registered = 1;
  pthread_cond_signal(&g_cv);
out:
  pthread_mutex_unlock(&g_mu);
  return rc;
}

void tl__hb_unregister(tl_comm_t *c) {
  if (!c->hb_registered) return;
  c->hb_registered = 0;
  pthread_mutex_lock(&g_mu);
  for (int i = 0; i < g_n; i++) {
    if (g_list[i].c != c) continue;
    g_list[i] = g_list[--g_n];
    break;
  }
  int join = 0;
  pthread_t t = g_thread;
  if (g_n == 0 && g_running) {
    g_gen++; /* the thread sees it and ends */
    g_running = 0;
    join = 1;
    pthread_cond_broadcast(&g_cv);
  }
  pthread_mutex_unlock(&g_mu);
  if (join) pthread_join(t, NULL);
}
