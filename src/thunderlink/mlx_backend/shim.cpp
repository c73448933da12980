// thunderlink's MLX backend: a GroupImpl over the C core.
//
// MLX has no registry for distributed backends, but a GroupImpl subclass
// wrapped in mlx::core::distributed::Group is a genuine mx.distributed.Group:
// MLX's own primitives call it when a graph is evaluated, under mx.compile
// and autodiff alike. This module is built with nanobind in MLX's domain
// (NB_DOMAIN mlx, same ABI as mlx.core), so a Group returned from here is the
// Python type mlx.core already knows.
//
// The shim does not link the C core. Python hands it the core's function
// table (tl_get_vtable) and a communicator as integers; the same compiled
// core serves cffi and MLX.
//
// Rules that MLX imposes (see DESIGN.md, "Facts about MLX"):
//  - An op must not communicate when MLX calls it: it runs at encoding time,
//    possibly before the input exists. It dispatches a task on the stream's
//    CPU command encoder; the task captures raw pointers, sizes and a
//    shared_ptr to the group, which keeps the communicator alive.
//  - MLX may donate the input, so input and output can be the same buffer.
//  - Collectives run on a CPU stream, also on Apple GPUs.
//  - An exception thrown by the task reaches Python as RuntimeError at
//    mx.eval, and the stream stays usable.

#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/distributed/distributed.h"
#include "mlx/distributed/distributed_impl.h"
#include "mlx/stream.h"

#include "tl.h"

namespace nb = nanobind;
namespace mx = mlx::core;
namespace md = mlx::core::distributed;

#ifndef TL_BUILT_MLX_VERSION
#define TL_BUILT_MLX_VERSION "unknown"
#endif

namespace {

int tl_dtype(mx::Dtype dt) {
  switch (dt.val()) {
    case mx::Dtype::Val::bool_: return TL_BOOL;
    case mx::Dtype::Val::uint8: return TL_UINT8;
    case mx::Dtype::Val::uint16: return TL_UINT16;
    case mx::Dtype::Val::uint32: return TL_UINT32;
    case mx::Dtype::Val::uint64: return TL_UINT64;
    case mx::Dtype::Val::int8: return TL_INT8;
    case mx::Dtype::Val::int16: return TL_INT16;
    case mx::Dtype::Val::int32: return TL_INT32;
    case mx::Dtype::Val::int64: return TL_INT64;
    case mx::Dtype::Val::float16: return TL_FLOAT16;
    case mx::Dtype::Val::float32: return TL_FLOAT32;
    case mx::Dtype::Val::float64: return TL_FLOAT64;
    case mx::Dtype::Val::bfloat16: return TL_BFLOAT16;
    case mx::Dtype::Val::complex64: return TL_COMPLEX64;
  }
  throw std::invalid_argument("[thunderlink] unsupported MLX dtype");
}

// A collective that Ctrl-C interrupted (TL_ERR_INTERRUPTED) fails with a
// message that starts with this. MLX carries a task's exception from its
// stream thread to mx.eval as a RuntimeError with the same text (not the
// same C++ type); the translator registered below turns it into what the
// program's SIGINT handler raises.
constexpr const char kInterrupted[] = "[thunderlink] interrupted: ";

class ThunderlinkGroup : public md::detail::GroupImpl,
                         public std::enable_shared_from_this<ThunderlinkGroup> {
 public:
  // Takes over one reference to comm.
  ThunderlinkGroup(const tl_vtable_t* vt, tl_comm_t* comm)
      : vt_(vt), comm_(comm), rank_(vt->comm_rank(comm)), size_(vt->comm_size(comm)) {}

  ~ThunderlinkGroup() override { vt_->comm_release(comm_); }

  mx::Stream communication_stream(mx::StreamOrDevice s) override {
    return mx::to_stream(s, mx::Device::cpu);
  }

  void close() { vt_->comm_close(comm_); }

  int rank() override { return rank_; }
  int size() override { return size_; }

  std::shared_ptr<md::detail::GroupImpl> split(int color, int key) override {
    if (color < 0)
      throw std::invalid_argument("[thunderlink] split: color must be non-negative");
    tl_comm_t* child = nullptr;
    check(vt_->comm_split(comm_, color, key, &child));
    return std::make_shared<ThunderlinkGroup>(vt_, child);
  }

  void all_sum(const mx::array& in, mx::array& out, mx::Stream s) override {
    reduce(in, out, s, TL_SUM);
  }
  void all_max(const mx::array& in, mx::array& out, mx::Stream s) override {
    reduce(in, out, s, TL_MAX);
  }
  void all_min(const mx::array& in, mx::array& out, mx::Stream s) override {
    reduce(in, out, s, TL_MIN);
  }

  void all_gather(const mx::array& in, mx::array& out, mx::Stream s) override {
    auto& enc = begin(in, out, s);
    enc.dispatch([self = shared_from_this(), src = in.data<char>(), dst = out.data<char>(),
                  n = in.size(), dt = tl_dtype(in.dtype())]() {
      self->check(self->vt_->all_gather(self->comm_, src, dst, n, dt));
    });
  }

  void sum_scatter(const mx::array& in, mx::array& out, mx::Stream s) override {
    auto& enc = begin(in, out, s);
    enc.dispatch([self = shared_from_this(), src = in.data<char>(), dst = out.data<char>(),
                  n = out.size(), dt = tl_dtype(in.dtype())]() {
      self->check(self->vt_->reduce_scatter(self->comm_, src, dst, n, dt, TL_SUM));
    });
  }

  void send(const mx::array& in, int dst, mx::Stream s) override {
    hook_sigint();
    auto& enc = mx::cpu::get_command_encoder(s);
    enc.set_input_array(in);
    enc.dispatch([self = shared_from_this(), src = in.data<char>(), n = in.size(),
                  dt = tl_dtype(in.dtype()), dst]() {
      self->check(self->vt_->send(self->comm_, src, n, dt, dst));
    });
  }

  void recv(mx::array& out, int src, mx::Stream s) override {
    hook_sigint();
    auto& enc = mx::cpu::get_command_encoder(s);
    enc.set_output_array(out);
    enc.dispatch([self = shared_from_this(), dst = out.data<char>(), n = out.size(),
                  dt = tl_dtype(out.dtype()), src]() {
      self->check(self->vt_->recv(self->comm_, dst, n, dt, src));
    });
  }

 private:
  mx::cpu::CommandEncoder& begin(const mx::array& in, mx::array& out, mx::Stream s) {
    hook_sigint();
    auto& enc = mx::cpu::get_command_encoder(s);
    enc.set_input_array(in);
    enc.set_output_array(out);
    return enc;
  }

  void reduce(const mx::array& in, mx::array& out, mx::Stream s, int op) {
    auto& enc = begin(in, out, s);
    // Pointers, not arrays: MLX keeps the buffers alive until the stream has
    // run this task; in == out when MLX donated the input.
    enc.dispatch([self = shared_from_this(), src = in.data<char>(), dst = out.data<char>(),
                  n = in.size(), dt = tl_dtype(in.dtype()), op]() {
      self->check(self->vt_->all_reduce(self->comm_, src, dst, n, dt, op));
    });
  }

  // The task runs on MLX's stream thread, which SIGINT does not interrupt;
  // the core's hook makes Ctrl-C wake it (tl_interrupt_hook, in tl.h). Called
  // at every dispatch, on the thread that evaluates: it hooks again if the
  // program replaced the SIGINT handler since (one sigaction call when not).
  void hook_sigint() { vt_->interrupt_hook(); }

  void check(int rc) {
    if (rc == TL_ERR_INTERRUPTED)
      throw std::runtime_error(std::string(kInterrupted) + vt_->comm_last_error(comm_));
    if (rc != TL_OK)
      throw std::runtime_error(std::string("[thunderlink] ") + vt_->comm_last_error(comm_));
  }

  const tl_vtable_t* vt_;
  tl_comm_t* comm_;
  int rank_;
  int size_;
};

const tl_vtable_t* checked_vtable(uintptr_t addr) {
  auto vt = reinterpret_cast<const tl_vtable_t*>(addr);
  if (!vt || vt->abi_version != TL_ABI_VERSION || vt->size < sizeof(tl_vtable_t))
    throw std::runtime_error(
        "[thunderlink] the MLX shim and the C core come from different builds "
        "(function table version mismatch): reinstall thunderlink");
  return vt;
}

}  // namespace

NB_MODULE(_shim, m) {
  m.doc() = "thunderlink's MLX distributed backend (GroupImpl over the C core)";

  // An interrupted collective (kInterrupted) reaches mx.eval as whatever the
  // program's SIGINT handler raises: Python has the signal pending (the
  // core's hook ran before Python's C handler), so running the handlers now
  // raises KeyboardInterrupt by default -- once, not a RuntimeError and then
  // a KeyboardInterrupt at the next line. A handler of the program's own
  // that does not raise has run; the error is then the RuntimeError. Off the
  // main thread Python runs no handlers: RuntimeError as well. Every other
  // exception goes on to the next translator untouched.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const std::runtime_error& e) {
      if (std::strncmp(e.what(), kInterrupted, sizeof kInterrupted - 1) != 0) throw;
      if (PyErr_CheckSignals() < 0) return;  // the handler's exception is set
      throw;
    }
  });

  m.def("abi_ok", []() { return nb::type<md::Group>().is_valid(); },
        "True when mx.distributed.Group is visible from this module, i.e. the "
        "module was built for the running mlx (import mlx.core first).");

  m.def("built_mlx_version", []() { return std::string(TL_BUILT_MLX_VERSION); });

  m.def("abi_version", []() { return TL_ABI_VERSION; });

  m.def(
      "make_group",
      [](uintptr_t vtable, uintptr_t comm) {
        auto vt = checked_vtable(vtable);
        auto c = reinterpret_cast<tl_comm_t*>(comm);
        if (!c) throw std::invalid_argument("[thunderlink] make_group: null communicator");
        return md::Group(std::make_shared<ThunderlinkGroup>(vt, c));
      },
      nb::arg("vtable"), nb::arg("comm"),
      "An mx.distributed.Group over a core communicator; takes over one "
      "reference to it (released when the group, and every graph using it, is gone).");

  m.def(
      "close_group",
      [](const md::Group& g) {
        auto tg = dynamic_cast<ThunderlinkGroup*>(g.raw_group().get());
        if (!tg) throw std::invalid_argument("[thunderlink] not a thunderlink group");
        tg->close();
      },
      nb::arg("group"),
      "Close the group's connections now; later operations on it fail.");

  m.def(
      "is_thunderlink_group",
      [](const md::Group& g) {
        return dynamic_cast<ThunderlinkGroup*>(g.raw_group().get()) != nullptr;
      },
      nb::arg("group"));
}
