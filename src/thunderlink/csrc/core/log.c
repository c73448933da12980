/* Error messages, logging, names and time. */
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

int64_t tl__now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

const char *tl_strerror(int status) {
  switch (status) {
  case TL_OK: return "success";
  case TL_ERR_INVALID: return "invalid argument";
  case TL_ERR_CONFIG: return "invalid configuration";
  case TL_ERR_SYSTEM: return "system call failed";
  case TL_ERR_TIMEOUT: return "timed out";
  case TL_ERR_PEER: return "peer lost";
  case TL_ERR_PROTOCOL: return "protocol error";
  case TL_ERR_MISMATCH: return "ranks called mismatched collectives";
  case TL_ERR_UNSUPPORTED: return "not supported";
  case TL_ERR_NOMEM: return "out of memory";
  case TL_ERR_CLOSED: return "communicator closed";
  case TL_ERR_INTERRUPTED: return "interrupted by a signal";
  default: return "unknown status";
  }
}

const char *tl__dtype_name(int dtype) {
  static const char *const names[TL_NUM_DTYPES] = {
      "bool",    "uint8",   "uint16",  "uint32", "uint64",
      "int8",    "int16",   "int32",   "int64",  "float16",
      "float32", "float64", "bfloat16", "complex64"};
  if (dtype >= 0 && dtype < TL_NUM_DTYPES) return names[dtype];
  return "?";
}

const char *tl__op_name(int op, int redop) {
  switch (op) {
  case TL_OP_ALL_REDUCE:
    switch (redop) {
    case TL_SUM: return "all_sum";
    case TL_PROD: return "all_prod";
    case TL_MAX: return "all_max";
    case TL_MIN: return "all_min";
    default: return "all_reduce";
    }
  case TL_OP_ALL_GATHER: return "all_gather";
  case TL_OP_REDUCE_SCATTER: return "reduce_scatter";
  case TL_OP_SEND: return "send/recv";
  case TL_OP_BROADCAST: return "broadcast";
  case TL_OP_BARRIER: return "barrier";
  case TL_OP_SPLIT: return "split";
  default: return "operation";
  }
}

/* "rank R: all_sum #S (float32, 4096 B): " or "rank R: " when idle. */
static int prefix(tl_comm_t *c, char *buf, size_t cap) {
  if (!c) return 0;
  if (c->cur.op)
    return snprintf(buf, cap, "rank %d: %s #%u (%s, %llu B): ", c->rank,
                    c->cur.name, c->cur.seq, tl__dtype_name(c->cur.dtype),
                    (unsigned long long)c->cur.total);
  return snprintf(buf, cap, "rank %d: ", c->rank);
}

static void vrecord(tl_comm_t *c, const char *fmt, va_list ap) {
  int n = prefix(c, c->err, sizeof c->err);
  if (n < 0 || (size_t)n >= sizeof c->err) n = 0;
  vsnprintf(c->err + n, sizeof c->err - (size_t)n, fmt, ap);
}

static void record(tl_comm_t *c, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vrecord(c, fmt, ap);
  va_end(ap);
}

int tl__error(tl_comm_t *c, int status, const char *fmt, ...) {
  if (!c) return status;
  va_list ap;
  va_start(ap, fmt);
  vrecord(c, fmt, ap);
  va_end(ap);
  return status;
}

int tl__vfail(tl_comm_t *c, int status, const char *fmt, va_list ap) {
  if (c->status) return c->status; /* keep the first failure */
  if (atomic_load(&c->closing)) {
    /* tl_comm_close woke this call by shutting its connections: that, not
     * what the channels saw, is why it fails (and what the peers are told). */
    status = TL_ERR_CLOSED;
    record(c, "the communicator was closed (close() on another thread) while "
           "this call was in flight");
  } else {
    vrecord(c, fmt, ap);
  }
  c->status = status;
  tl__log(c, TL_LOG_INFO, "communicator failed: %s", c->err);
  tl__abort_all(c, c->err);
  return status;
}

int tl__fail(tl_comm_t *c, int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int rc = tl__vfail(c, status, fmt, ap);
  va_end(ap);
  return rc;
}

void tl__log(tl_comm_t *c, int level, const char *fmt, ...) {
  int threshold = c ? c->opts.log_level : TL_LOG_WARN;
  if (level > threshold) return;
  static const char *const tags[] = {"", "WARN", "INFO", "TRACE"};
  char line[TL_ERRMSG_LEN + 128];
  int n = snprintf(line, sizeof line, "thunderlink[rank %d] %s: ",
                   c ? c->rank : -1, tags[level]);
  if (n < 0 || (size_t)n >= sizeof line) return;
  va_list ap;
  va_start(ap, fmt);
  int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
  va_end(ap);
  if (m < 0) return;
  size_t len = tl__min((size_t)(n + m), sizeof line - 2);
  line[len++] = '\n';
  /* One write(2) per line so that lines of different ranks never interleave. */
  ssize_t w = write(STDERR_FILENO, line, len);
  (void)w;
}
