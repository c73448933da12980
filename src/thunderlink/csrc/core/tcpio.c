/*
 * I/O threads of TCP data channels (THUNDERLINK_TCP_THREADS).
 *
 * Over a fast link (loopback, a Thunderbolt bridge at 40-80 Gbit/s) TCP is
 * bound by the CPU: every byte is copied into the kernel by the sender and
 * out of it by the receiver. With one thread driving every channel
 * (progress.c) those copies and the ring's reductions share one core. Where
 * the machine has cores to spare, each TCP data channel gets two threads,
 * one per direction, that move the bytes of the large frames the core
 * queued on it, while the calling thread reduces and does the bookkeeping.
 * (One thread for both directions of a connection, as MLX's ring has, left
 * its busiest thread with about twice the calling thread's CPU time per
 * all_sum: bench/tcp_threads_cpu.py.)
 *
 * The division of labour:
 *
 *  - The progress loop (the calling thread) still owns every queue, every
 *    rule and every failure. It hands a thread a prefix of its channel's
 *    send or receive queue (tl__io_* below; io_offload in progress.c): large
 *    slices not yet started, in queue order, so that the bytes on the wire
 *    keep the queue's order. It does not touch that direction of the socket
 *    while the thread has slices of it, and retires the slices the thread
 *    finished (their number, io->fin) in order.
 *  - A thread only moves bytes: header and payload of each slice, with the
 *    transport's own non-blocking send/recv, sleeping in poll(2) on the
 *    socket and its wake-up pipe when the socket can take or give nothing
 *    (never spinning: a machine without spare cores pays a sleep and a
 *    wake-up, not a burnt core). A received header that differs from the
 *    expected one by one byte (a peer's abort notice, another collective)
 *    stops the thread; so does any error of the socket. The thread
 *    records why (io->err) and tells the progress loop, which takes the
 *    slices back (tl__io_halt) and judges the case with the same code as
 *    without threads (lost(), the header checks, abort notices).
 *  - It tells the progress loop of every finished slice and every stop by a
 *    byte on the communicator's note pipe, which the loop polls with its
 *    other descriptors; it notes when bytes last came from the peer
 *    (io->heard_ns), for the hung-peer rule.
 *  - A halt (failure, deadline, abort, close) stops it between two system
 *    calls: it acknowledges, and the slices it held, with what they moved
 *    (s->done), are the progress loop's again. Closing joins it.
 *
 * Threads start with the first large slice of their direction, block all
 * signals (Ctrl-C reaches the program's threads), are named tl-io and end
 * with the communicator.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#if defined(__linux__)
#include <sched.h>
#endif

#include "internal.h"

static int set_flags(int fd) {
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -1;
  return fcntl(fd, F_SETFD, FD_CLOEXEC);
}

static int make_pipe(int p[2]) {
  if (pipe(p) != 0) return -errno;
  if (set_flags(p[0]) || set_flags(p[1])) {
    int e = errno;
    close(p[0]);
    close(p[1]);
    p[0] = p[1] = -1;
    return -e;
  }
  return 0;
}

static void ping(int fd) {
  char b = 1;
  ssize_t w = write(fd, &b, 1);
  (void)w; /* a full pipe already holds a wake-up */
}

static void drain(int fd) {
  char b[64];
  while (read(fd, b, sizeof b) > 0) {
  }
}

void tl__io_drain_note(tl_comm_t *c) {
  if (c->io_started) drain(c->io_note[0]);
}

/* CPUs this process may run on. */
static int usable_cpus(void) {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? (int)n : 1;
}

int tl__io_wanted(tl_comm_t *c) {
  if (c->io_state) return c->io_state == 2;
  int on;
  if (c->opts.tcp_threads == TL_TCP_THREADS_ON) {
    on = 1;
  } else if (c->opts.tcp_threads == TL_TCP_THREADS_OFF) {
    on = 0;
  } else {
    /* Spare cores. With threads, a rank's all_sum took about 3.7-5
     * times as much CPU as its busiest thread (bench/tcp_threads_cpu.py:
     * calling thread plus four tl-io threads): it gains in full where each
     * rank on the host has four cores, and where fewer, the threads only
     * add hand-overs to a machine already busy. */
    int local = 1;
    for (int p = 0; p < c->size; p++)
      if (p != c->rank && c->links[p].ops && c->links[p].host_id == c->host_id) local++;
    int cpus = usable_cpus();
    on = cpus >= 4 * local;
    tl__log(c, TL_LOG_INFO, "TCP I/O threads %s (auto: %d usable CPUs, %d ranks on this "
            "host)", on ? "on" : "off", cpus, local);
  }
  c->io_state = on ? 2 : 1;
  return on;
}

/* ---- the thread ------------------------------------------------------------ */

/* Move bytes of the current slice. Returns 1 when something moved, 0 when
 * the socket would block, or -1 when the thread stopped (err set). */
static int step(tl_io_t *io) {
  tl_chan_t *k = io->k;
  unsigned f = atomic_load(&io->fin);
  tl_slice_t *s = io->job[f % TL_IO_QCAP];
  const size_t H = sizeof(tl_frame_t);
  struct iovec iov[2];
  int n = tl__frame_iov(s, io->dir ? &s->got : &s->hdr, iov);
  long r = n == 0 ? 0 : io->dir ? k->ops->recv(k, iov, n, 0) : k->ops->send(k, iov, n);
  if (r < 0) {
    atomic_store(&io->err, (int)r);
    ping(io->note);
    return -1;
  }
  size_t before = s->done;
  s->done += (size_t)r;
  if (io->dir && r > 0) atomic_store(&io->heard_ns, tl__now_ns());
  if (io->dir && before < H && s->done >= H && memcmp(&s->got, &s->hdr, H) != 0) {
    /* Not the frame expected: the progress loop says what it is. */
    atomic_store(&io->err, TL_IO_MISMATCH);
    ping(io->note);
    return -1;
  }
  if (s->done == H + s->len) {
    atomic_store(&io->fin, f + 1);
    ping(io->note);
    return 1;
  }
  return r > 0;
}

static int has_job(tl_io_t *io) {
  return !atomic_load(&io->err) && atomic_load(&io->fin) != atomic_load(&io->tail);
}

static void *run(void *arg) {
  tl_io_t *io = arg;
#if defined(__APPLE__)
  pthread_setname_np("tl-io");
#endif
  while (!atomic_load(&io->quit)) {
    if (atomic_load(&io->halt)) {
      pthread_mutex_lock(&io->mu);
      atomic_store(&io->halted, 1);
      pthread_cond_broadcast(&io->cv);
      while (atomic_load(&io->halt) && !atomic_load(&io->quit))
        pthread_cond_wait(&io->cv, &io->mu);
      atomic_store(&io->halted, 0);
      pthread_mutex_unlock(&io->mu);
      continue;
    }
    int want = 0;
    if (has_job(io)) {
      int x = step(io);
      if (x) continue;
      want = 1; /* the socket is full (sends) or empty (receives) */
    }
    /* Sleep: announce it, then look again, so that a hand-over published
     * after the look is followed by a wake-up (tl__io_kick). */
    atomic_store(&io->sleeping, 1);
    if (atomic_load(&io->halt) || atomic_load(&io->quit) || (!want && has_job(io))) {
      atomic_store(&io->sleeping, 0);
      continue;
    }
    struct pollfd p[2] = {{io->wake[0], POLLIN, 0},
                          {io->k->fd, (short)(io->dir ? POLLIN : POLLOUT), 0}};
    /* Idle: until the next hand-over, halt or close. Busy: the progress
     * loop keeps the operation's deadline and halts us at it. */
    poll(p, want ? 2 : 1, want ? 1000 : -1);
    atomic_store(&io->sleeping, 0);
    if (p[0].revents) drain(io->wake[0]);
  }
  return NULL;
}

int tl__io_start(tl_comm_t *c, tl_chan_t *k, int d) {
  if (!c->io_started) {
    int e = make_pipe(c->io_note);
    if (e) return tl__error(c, TL_ERR_SYSTEM, "cannot make the I/O threads' pipe: %s",
                            strerror(-e));
    c->io_started = 1;
  }
  tl_io_t *io = calloc(1, sizeof *io);
  if (!io) return tl__error(c, TL_ERR_NOMEM, "out of memory starting an I/O thread");
  io->k = k;
  io->dir = d;
  io->note = c->io_note[1];
  io->pid = getpid();
  int e = make_pipe(io->wake);
  if (e) {
    free(io);
    return tl__error(c, TL_ERR_SYSTEM, "cannot make an I/O thread's pipe: %s", strerror(-e));
  }
  pthread_mutex_init(&io->mu, NULL);
  pthread_cond_init(&io->cv, NULL);
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  e = pthread_create(&io->thread, NULL, run, io);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (e) {
    close(io->wake[0]);
    close(io->wake[1]);
    pthread_mutex_destroy(&io->mu);
    pthread_cond_destroy(&io->cv);
    free(io);
    return tl__error(c, TL_ERR_SYSTEM, "cannot start an I/O thread: %s", strerror(e));
  }
#if defined(__linux__)
  pthread_setname_np(io->thread, "tl-io");
#endif
  k->io[d] = io;
  return TL_OK;
}

void tl__io_kick(tl_io_t *io) {
  if (atomic_load(&io->sleeping)) ping(io->wake[1]);
}

/* Waits without a deadline, and need none: the thread is between two system
 * calls that do not block, or in a poll(2) that the wake-up ends, so it
 * parks within microseconds. */
void tl__io_halt(tl_io_t *io) {
  if (getpid() != io->pid) return; /* a forked child: no thread to park */
  pthread_mutex_lock(&io->mu);
  atomic_store(&io->halt, 1);
  ping(io->wake[1]);
  while (!atomic_load(&io->halted)) pthread_cond_wait(&io->cv, &io->mu);
  pthread_mutex_unlock(&io->mu);
}

void tl__io_resume(tl_io_t *io) {
  pthread_mutex_lock(&io->mu);
  atomic_store(&io->halt, 0);
  pthread_cond_broadcast(&io->cv);
  pthread_mutex_unlock(&io->mu);
}

void tl__io_stop(tl_comm_t *c, tl_chan_t *k) {
  for (int d = 0; d < 2; d++) {
    tl_io_t *io = k->io[d];
    if (!io) continue;
    k->io[d] = NULL;
    pthread_mutex_lock(&io->mu);
    atomic_store(&io->quit, 1);
    pthread_cond_broadcast(&io->cv);
    pthread_mutex_unlock(&io->mu);
    ping(io->wake[1]);
    /* A forked child has the communicator but not the thread. */
    if (getpid() == io->pid) pthread_join(io->thread, NULL);
    close(io->wake[0]);
    close(io->wake[1]);
    pthread_mutex_destroy(&io->mu);
    pthread_cond_destroy(&io->cv);
    free(io);
  }
  (void)c;
}

void tl__io_close_comm(tl_comm_t *c) {
  if (!c->io_started) return;
  close(c->io_note[0]);
  close(c->io_note[1]);
  c->io_note[0] = c->io_note[1] = -1;
  c->io_started = 0;
}
