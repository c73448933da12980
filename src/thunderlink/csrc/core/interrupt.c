/*
 * Interrupting waits: Ctrl-C for collectives that do not run on the main
 * thread.
 *
 * A collective called from Python's main thread (the numpy API) sleeps in
 * poll(2) there; SIGINT interrupts the poll (EINTR), the call fails with
 * TL_ERR_INTERRUPTED, and Python's handler raises KeyboardInterrupt. An MLX
 * collective runs on MLX's stream thread while the main thread waits in
 * mx.eval: the signal interrupts neither, so the wait would last until
 * THUNDERLINK_TIMEOUT.
 *
 * tl_interrupt() counts an interrupt and writes a byte to a pipe that every
 * waiting progress loop polls (progress.c: the operation fails once it has
 * not completed within a short grace). It is async-signal-safe: an atomic
 * add and a write(2). tl_interrupt_hook() makes SIGINT call it: it installs a
 * handler that calls tl_interrupt() and then the handler it replaced
 * (Python's, which schedules KeyboardInterrupt or the program's own Python
 * handler), keeping that handler's mask and flags.
 *
 * Why not signal.set_wakeup_fd: a process has one wake-up descriptor, and
 * asyncio (or the program) may own it. Why a chained handler is safe for
 * programs with handlers of their own: it only adds a wake-up, and calls
 * theirs. When Python (signal.signal) or a library later replaces the
 * handler, the hook is gone until the next tl_interrupt_hook(), which the
 * MLX shim calls before every collective it dispatches; it then chains to
 * the new handler. It never hooks SIG_DFL (SIGINT ends the process anyway)
 * or SIG_IGN (the program chose to ignore Ctrl-C). A handler that chains
 * back to ours is cut short by a re-entry guard.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

static _Atomic uint64_t g_count;
static int g_pipe[2] = {-1, -1};
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction g_prev; /* the handler ours calls after itself */
static volatile sig_atomic_t g_inside;

void tl_interrupt(void) {
  int saved = errno;
  atomic_fetch_add(&g_count, 1);
  if (g_pipe[1] >= 0) {
    ssize_t w = write(g_pipe[1], "i", 1);
    (void)w; /* full: the waiters have bytes to wake them already */
  }
  errno = saved;
}

uint64_t tl__intr_count(void) { return atomic_load(&g_count); }

int tl__intr_fd(void) { return g_pipe[0]; }

void tl__intr_drain(void) {
  char b[64];
  while (read(g_pipe[0], b, sizeof b) > 0) {
  }
}

static void on_sigint(int sig, siginfo_t *si, void *uc) {
  if (g_inside) return; /* a handler that chains back to this one */
  g_inside = 1;
  tl_interrupt();
  if (g_prev.sa_flags & SA_SIGINFO) {
    if (g_prev.sa_sigaction) g_prev.sa_sigaction(sig, si, uc);
  } else if (g_prev.sa_handler != SIG_DFL && g_prev.sa_handler != SIG_IGN) {
    g_prev.sa_handler(sig);
  }
  g_inside = 0;
}

static int is_ours(const struct sigaction *a) {
  return (a->sa_flags & SA_SIGINFO) && a->sa_sigaction == on_sigint;
}

static int make_pipe(void) {
  int p[2];
  if (pipe(p) < 0) return errno;
  for (int i = 0; i < 2; i++) {
    fcntl(p[i], F_SETFD, FD_CLOEXEC);
    fcntl(p[i], F_SETFL, fcntl(p[i], F_GETFL) | O_NONBLOCK);
  }
  g_pipe[0] = p[0];
  g_pipe[1] = p[1];
  return 0;
}

int tl_interrupt_hook(void) {
  struct sigaction cur;
  if (sigaction(SIGINT, NULL, &cur) < 0) return TL_ERR_SYSTEM;
  if (is_ours(&cur)) return TL_OK; /* the usual case: one system call */
  if (!(cur.sa_flags & SA_SIGINFO) && (cur.sa_handler == SIG_DFL || cur.sa_handler == SIG_IGN))
    return TL_OK;
  pthread_mutex_lock(&g_mu);
  int rc = TL_OK;
  if (g_pipe[0] < 0 && make_pipe()) {
    rc = TL_ERR_SYSTEM;
    goto out;
  }
  /* Look again under the lock: another thread may have hooked it. */
  if (sigaction(SIGINT, NULL, &cur) < 0) {
    rc = TL_ERR_SYSTEM;
    goto out;
  }
  if (is_ours(&cur)) goto out;
  /* Ours is not installed, so nothing reads g_prev while it changes. */
  g_prev = cur;
  struct sigaction mine = cur;
  mine.sa_sigaction = on_sigint;
  mine.sa_flags = (cur.sa_flags | SA_SIGINFO) & ~SA_RESETHAND;
  if (sigaction(SIGINT, &mine, NULL) < 0) rc = TL_ERR_SYSTEM;
out:
  pthread_mutex_unlock(&g_mu);
  return rc;
}
