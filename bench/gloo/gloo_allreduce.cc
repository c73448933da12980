// bench/gloo/gloo_allreduce.cc: Gloo's all-reduce behind a small C API, for
// the benchmarks where PyTorch is not installed (bench/gloo/README.md).
//
// It does what PyTorch's ProcessGroupGloo does for all_reduce of a dense CPU
// tensor (torch/csrc/distributed/c10d/ProcessGroupGlooDetail.hpp,
// AsyncAllreduceWork::allreduce), minus PyTorch's own dispatch and its
// hand-off of the work to a worker thread:
//   - a gloo::rendezvous::Context over a gloo::transport::tcp device made for
//     an interface (GLOO_SOCKET_IFNAME) or a hostname, as
//     c10d::GlooDeviceFactory's makeTCPDevice does, connected as a full mesh;
//   - gloo::AllreduceOptions with the buffer as the only output (in place:
//     no input), gloo::sum<T> (or gloo::max<T>) as the reduction, a fresh tag
//     per collective and the context's timeout, and no algorithm set: Gloo
//     then runs its ring (gloo/allreduce.cc), as it does for PyTorch;
//   - gloo::barrier for the harness's barriers.
// The rendezvous is a gloo::rendezvous::FileStore in a directory that the
// launcher creates for the job (ranks on one host) and removes afterwards.
//
// Nothing here prints or exits: every function returns 0 or -1 with the
// message (Gloo's exception text) in the caller's buffer. Every wait has
// Gloo's timeout (tlg_open's timeout_s).

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <string>

#include "gloo/allreduce.h"
#include "gloo/barrier.h"
#include "gloo/math.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/file_store.h"
#include "gloo/transport/tcp/device.h"

#include <sys/random.h>

#ifndef TLG_GLOO_COMMIT
#define TLG_GLOO_COMMIT "unknown"
#endif

#define TLG_API extern "C" __attribute__((visibility("default")))

namespace {

// Must match src/thunderlink/bench/gloo.py.
enum { TLG_FLOAT32 = 0, TLG_FLOAT64 = 1, TLG_INT64 = 2 };
enum { TLG_SUM = 0, TLG_MAX = 1 };

struct Comm {
  std::shared_ptr<gloo::rendezvous::Context> context;
  std::shared_ptr<gloo::transport::Device> device;
  uint32_t tag = 0;  // one per collective, as ProcessGroupGloo's nextTag()
};

void set_error(char* err, size_t errlen, const std::string& what) {
  if (err == nullptr || errlen == 0) return;
  std::snprintf(err, errlen, "%s", what.c_str());
}

template <typename T>
gloo::AllreduceOptions::Func reduction(int op) {
  using Fn = void (*)(void*, const void*, const void*, size_t);
  return op == TLG_MAX ? Fn(&gloo::max<T>) : Fn(&gloo::sum<T>);
}

template <typename T>
void allreduce(Comm* c, void* buf, size_t count, int op) {
  gloo::AllreduceOptions opts(c->context);
  opts.setReduceFunction(reduction<T>(op));
  opts.setTag(c->tag++);
  opts.setTimeout(c->context->getTimeout());
  opts.setOutput(static_cast<T*>(buf), count);  // in place: the output is the input
  gloo::allreduce(opts);
}

}  // namespace

// GCC 12's libstdc++.a, built on glibc >= 2.36, seeds std::random_device with
// arc4random, a glibc 2.36 function, and its random.o comes into the link
// although nothing here calls it; with this definition (hidden, from
// getrandom(2), glibc 2.25) the library needs no glibc newer than 2.35
// (_dl_find_object, for libgcc's unwinder), so it also loads on a 2.35 host.
extern "C" uint32_t arc4random(void) {
  uint32_t v = 0;
  while (getrandom(&v, sizeof v, 0) != static_cast<ssize_t>(sizeof v)) {
  }
  return v;
}

// One line on what this library is: Gloo's commit and the compiler.
TLG_API const char* tlg_version(void) {
  return "gloo " TLG_GLOO_COMMIT " (transport tcp), driver built with g++ " __VERSION__;
}

// Join the job: rank in [0, size), size >= 1; store_dir an existing directory
// that every rank of the job names (a FileStore); iface (e.g. "lo") or, if
// iface is NULL or empty, hostname (e.g. "127.0.0.1") for the TCP device;
// timeout_s > 0 for the rendezvous' connections and every collective.
TLG_API int tlg_open(int rank, int size, const char* store_dir, const char* iface, const char* hostname,
                     double timeout_s, void** out, char* err, size_t errlen) {
  if (out == nullptr) {
    set_error(err, errlen, "tlg_open: out is NULL");
    return -1;
  }
  *out = nullptr;
  if (size < 1 || rank < 0 || rank >= size) {
    set_error(err, errlen, "tlg_open: rank " + std::to_string(rank) + " of " + std::to_string(size) +
                               ": need 0 <= rank < size");
    return -1;
  }
  if (store_dir == nullptr || !*store_dir) {
    set_error(err, errlen, "tlg_open: no store directory given");
    return -1;
  }
  if (!(timeout_s > 0) || timeout_s > 86400) {
    set_error(err, errlen, "tlg_open: timeout must be in (0, 86400] seconds");
    return -1;
  }
  try {
    gloo::transport::tcp::attr attr;
    if (iface != nullptr && *iface) {
      attr.iface = iface;
    } else if (hostname != nullptr && *hostname) {
      attr.hostname = hostname;
    } else {
      set_error(err, errlen, "tlg_open: give an interface (e.g. lo) or a hostname (e.g. 127.0.0.1)");
      return -1;
    }
    auto c = std::make_unique<Comm>();
    c->device = gloo::transport::tcp::CreateDevice(attr);
    c->context = std::make_shared<gloo::rendezvous::Context>(rank, size);
    c->context->setTimeout(std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
    auto store = std::make_shared<gloo::rendezvous::FileStore>(store_dir);
    c->context->connectFullMesh(store, c->device);
    *out = c.release();
    return 0;
  } catch (const std::exception& e) {
    set_error(err, errlen, std::string("gloo: ") + e.what());
    return -1;
  }
}

// All-reduce count elements of buf in place, on every rank at once.
TLG_API int tlg_allreduce(void* comm, void* buf, size_t count, int dtype, int op, char* err, size_t errlen) {
  auto* c = static_cast<Comm*>(comm);
  if (c == nullptr || (buf == nullptr && count > 0)) {
    set_error(err, errlen, "tlg_allreduce: NULL communicator or buffer");
    return -1;
  }
  if (op != TLG_SUM && op != TLG_MAX) {
    set_error(err, errlen, "tlg_allreduce: unknown op " + std::to_string(op));
    return -1;
  }
  try {
    switch (dtype) {
      case TLG_FLOAT32:
        allreduce<float>(c, buf, count, op);
        return 0;
      case TLG_FLOAT64:
        allreduce<double>(c, buf, count, op);
        return 0;
      case TLG_INT64:
        allreduce<int64_t>(c, buf, count, op);
        return 0;
      default:
        set_error(err, errlen, "tlg_allreduce: unknown dtype " + std::to_string(dtype));
        return -1;
    }
  } catch (const std::exception& e) {
    set_error(err, errlen, std::string("gloo: ") + e.what());
    return -1;
  }
}

TLG_API int tlg_barrier(void* comm, char* err, size_t errlen) {
  auto* c = static_cast<Comm*>(comm);
  if (c == nullptr) {
    set_error(err, errlen, "tlg_barrier: NULL communicator");
    return -1;
  }
  try {
    gloo::BarrierOptions opts(c->context);
    opts.setTag(c->tag++);
    opts.setTimeout(c->context->getTimeout());
    gloo::barrier(opts);
    return 0;
  } catch (const std::exception& e) {
    set_error(err, errlen, std::string("gloo: ") + e.what());
    return -1;
  }
}

// Leave the job: closes the connections; comm is freed (NULL is fine).
TLG_API void tlg_close(void* comm) {
  auto* c = static_cast<Comm*>(comm);
  if (c == nullptr) return;
  try {
    c->context->closeConnections();
  } catch (const std::exception&) {
    // The peers may be gone already; nothing is left to report to.
  }
  delete c;
}
