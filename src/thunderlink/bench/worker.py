"""The benchmark's body, run by every rank.

For each size, every backend in turn (interleaved, so that each sees the same
machine), out of place and in place: warm up, time every iteration on every
rank, take the slowest rank of each iteration, and report the mean, median
(p50) and p99 time, the CPU time of all ranks over the timed loop relative
to their wall time, and then check one result (#wrong: elements that differ
from the exact expected value, summed over ranks).

Backends:
  thunderlink   the C core through cffi, with buffers prepared once: the loop
                calls the core directly, so the time is the core's.
  thunderlink/mlx  thunderlink's mx.distributed.Group (--via mlx): MLX's own
                overhead (graph, eval, stream dispatch) included.
  mlx-ring      MLX's ring backend over the same hosts (--vs mlx-ring).
  gloo          Gloo over loopback TCP (--vs gloo; local ranks), in place:
                torch.distributed's where torch is installed, else bench/gloo's
                driver library (--gloo-lib, THUNDERLINK_GLOO_LIB), which calls
                the same gloo::allreduce without PyTorch; --vs gloo-torch and
                --vs gloo-lib name one (both: the two side by side). In place
                only: torch.distributed has no out-of-place all_reduce.

The MLX series run out of place (a fresh output per call, as
``y = all_sum(x)``) and in place (``x = all_sum(x)``: MLX donates the input
buffer to the output, so nothing is allocated).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from .ops import DTYPES, OPS

__all__ = ["Settings", "Measurement", "run", "CoreBackend", "MLXBackend"]

# Across a hostfile, MLX's ring listens on each of our addresses' port + this.
MLX_RING_PORT_OFFSET = 100


@dataclass
class Settings:
    op: str = "all_sum"
    sizes: tuple = ()
    dtype: str = "float32"
    warmup: int = 5
    iters: int = 0          # 0: enough for about `budget` seconds, 10..2000
    budget: float = 0.2
    check: bool = True
    inplace: str = "both"   # both | in | out
    json_path: str | None = None
    plot_path: str | None = None
    vs: tuple = ()          # ("mlx-ring", "gloo")
    via_mlx: bool = False
    skip_core: bool = False  # measure only the --vs/--via series (the core still runs the harness)
    gloo_port: int = 0      # --vs gloo (torch): rank 0's rendezvous port on 127.0.0.1
    gloo_impl: str = ""     # --vs gloo: "torch" or "lib", as the launcher resolved it for every rank
    gloo_lib: str = ""      # the Gloo driver library (bench/gloo), for "lib"
    gloo_store: str = ""    # "lib": the rendezvous directory the launcher made for the job


@dataclass
class Measurement:
    backend: str
    op: str
    size: int
    count: int
    dtype: str
    inplace: bool
    iters: int
    time_us: float
    p50_us: float
    p99_us: float
    algbw: float
    busbw: float
    wrong: int
    ranks: int
    cpu: float = float("nan")  # CPU seconds of all ranks / (wall seconds x ranks)
    supported: bool = True


# ---- backends ---------------------------------------------------------------------


class CoreBackend:
    """The C core through cffi; buffers are turned into cdata once, so that
    the timed loop is one call into the core per iteration."""

    name = "thunderlink"
    variants = (False, True)

    def __init__(self, comm):
        from ..bindings import ffi, lib
        from ..bindings.comm import dtype_code

        self.comm, self.ffi, self.lib, self.dtype_code = comm, ffi, lib, dtype_code

    def supports(self, op: str) -> bool:
        return True

    def prepare(self, op, x, out, dtype):
        ffi, lib, h = self.ffi, self.lib, self.comm.handle
        code = self.dtype_code(dtype)
        px = ffi.from_buffer(x, require_writable=op == "broadcast") if x.nbytes else ffi.NULL
        po = ffi.from_buffer(out, require_writable=True) if out.nbytes else ffi.NULL
        n, rank, last = self.comm.size, self.comm.rank, self.comm.size - 1
        count = x.size
        from ..errors import check

        if op == "all_sum":
            call = lambda: lib.tl_all_reduce(h, px, po, count, code, lib.TL_SUM)  # noqa: E731
        elif op == "all_gather":
            call = lambda: lib.tl_all_gather(h, px, po, count, code)  # noqa: E731
        elif op == "sum_scatter":
            call = lambda: lib.tl_reduce_scatter(h, px, po, count // n, code, lib.TL_SUM)  # noqa: E731
        elif op == "broadcast":
            call = lambda: lib.tl_broadcast(h, px, count, code, 0)  # noqa: E731
        elif op == "sendrecv":
            if rank == 0:
                call = lambda: lib.tl_send(h, px, count, code, last) or lib.tl_recv(h, po, count, code, last)  # noqa: E731
            elif rank == last:
                call = lambda: lib.tl_recv(h, po, count, code, 0) or lib.tl_send(h, px, count, code, 0)  # noqa: E731
            else:
                call = lambda: 0  # noqa: E731
        else:
            raise ValueError(op)

        def run():
            rc = call()
            if rc:
                check(rc, h)

        return {"run": run, "x": x, "out": out, "op": op}

    def run(self, prepared) -> None:
        prepared["run"]()

    def result(self, prepared) -> np.ndarray:
        return prepared["x"] if prepared["op"] == "broadcast" else prepared["out"]


class MLXBackend:
    """An mx.distributed.Group: thunderlink's (--via mlx) or MLX's ring."""

    variants = (False, True)  # in place: the input is donated (x = all_sum(x))

    def __init__(self, name: str, group, ring: bool):
        import mlx.core as mx

        self.mx, self.name, self.group, self.ring = mx, name, group, ring

    def supports(self, op: str) -> bool:
        if op == "broadcast":
            return False  # MLX has no broadcast
        if op == "sum_scatter" and self.ring:
            return False  # "[ring] sum_scatter not supported"
        return True

    def prepare(self, op, x, out, dtype):
        mx = self.mx
        a = mx.array(x)
        if dtype == "bfloat16":
            a = mx.array(x.view(np.uint16)).view(mx.bfloat16)
        mx.eval(a)
        # In place: only the dict holds the input, so that MLX may donate its
        # buffer to the output (x = all_sum(x)); the output replaces it.
        return {"x": a, "op": op, "y": None, "dtype": dtype, "donate": out is x and op == "all_sum"}

    def run(self, prepared) -> None:
        mx, g, d = self.mx, self.group, self.mx.distributed
        op = prepared["op"]
        if prepared["donate"]:
            # Nothing but the graph may hold the input while it runs, or MLX
            # allocates an output instead of donating (no copy in "y").
            prepared["x"] = d.all_sum(prepared.pop("x"), group=g)
            mx.eval(prepared["x"])
            return
        x = prepared["x"]
        if op == "all_sum":
            y = d.all_sum(x, group=g)
        elif op == "all_gather":
            y = d.all_gather(x, group=g)
        elif op == "sum_scatter":
            y = d.sum_scatter(x, group=g)
        elif op == "sendrecv":
            rank, last = g.rank(), g.size() - 1
            y = None
            if rank == 0:
                mx.eval(d.send(x, last, group=g))
                y = d.recv_like(x, last, group=g)
            elif rank == last:
                y = d.recv_like(x, 0, group=g)
                mx.eval(y)
                mx.eval(d.send(x, 0, group=g))
        else:
            raise ValueError(op)
        if y is not None:
            mx.eval(y)
        prepared["y"] = y

    def result(self, prepared) -> np.ndarray:
        y = prepared["x"] if prepared["donate"] else prepared["y"]
        if y is None:
            return None
        if prepared["dtype"] == "bfloat16":
            return np.array(y.view(self.mx.uint16))
        return np.array(y)


class GlooBackend:
    """Gloo (--vs gloo), in place (torch.distributed has no all_reduce out of
    place), over loopback TCP, with a context of its own next to
    thunderlink's communicator in the same processes, through either
    torch.distributed (impl "torch": all_reduce of a CPU tensor that shares
    the numpy buffer) or bench/gloo's driver library (impl "lib": the same
    gloo::allreduce on the numpy buffer, one ctypes call)."""

    name = "gloo"
    variants = (True,)

    def __init__(self, rank: int, n: int, port: int = 0, timeout: float = 300, *, impl: str = "torch",
                 lib: str = "", store: str = "", name: str = "gloo"):
        self.name, self.impl = name, impl
        if impl == "lib":
            from .gloo import GlooLib

            self.g = GlooLib(lib, rank, n, store, iface="lo", timeout=timeout)
            self.describe = (f"{name}: Gloo driver library {lib} ({self.g.version}), gloo::allreduce "
                             f"(ring), in place, on lo; no PyTorch")
            return
        import datetime

        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                                timeout=datetime.timedelta(seconds=timeout))
        self.describe = f"{name}: torch {torch.__version__} torch.distributed.all_reduce, in place"

    def supports(self, op: str) -> bool:
        return op == "all_sum"

    def prepare(self, op, x, out, dtype):
        if self.impl == "lib":
            return {"run": self.g.caller(x), "x": x}
        t = self.torch.from_numpy(x)  # shares x's memory
        return {"t": t, "x": x}

    def run(self, prepared) -> None:
        if self.impl == "lib":
            prepared["run"]()
            return
        self.dist.all_reduce(prepared["t"])

    def result(self, prepared) -> np.ndarray:
        return prepared["x"]

    def close(self) -> None:
        if self.impl == "lib":
            self.g.close()  # torch's group is left to the process's exit, as before


# ---- measuring ----------------------------------------------------------------------


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(comm, backend, s: Settings, size: int, inplace: bool) -> Measurement:
    op = OPS[s.op]
    n, rank = comm.size, comm.rank
    storage, _ = DTYPES[s.dtype]
    itemsize = np.dtype(storage).itemsize
    count = op.count(size, itemsize, n)
    nbytes = count * itemsize * (n if s.op in ("all_gather", "sum_scatter") else 1)
    if not backend.supports(s.op):
        nan = float("nan")
        return Measurement(backend=backend.name, op=s.op, size=nbytes, count=count, dtype=s.dtype,
                           inplace=inplace, iters=0, time_us=nan, p50_us=nan, p99_us=nan, algbw=nan,
                           busbw=nan, wrong=0, ranks=n, supported=False)
    x, out = op.buffers(count, s.dtype, rank, n, inplace)
    prepared = backend.prepare(s.op, x, out, s.dtype)
    for _ in range(s.warmup):
        backend.run(prepared)
    iters = s.iters
    if not iters:
        t = time.perf_counter()
        backend.run(prepared)
        est = comm.all_max(np.array([time.perf_counter() - t]))[0]
        iters = int(min(2000, max(10, s.budget / max(est, 1e-7))))
    comm.barrier()
    times = np.empty(iters)
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    for i in range(iters):
        t = time.perf_counter()
        backend.run(prepared)
        times[i] = time.perf_counter() - t
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    slowest = comm.all_max(times)  # per iteration, the slowest rank
    totals = comm.all_sum(np.array([cpu, wall]))
    mean, p50, p99 = float(slowest.mean()), float(np.percentile(slowest, 50)), float(np.percentile(slowest, 99))
    if s.op == "sendrecv":
        mean, p50, p99 = mean / 2, p50 / 2, p99 / 2
    wrong = 0
    if s.check:
        x, out = op.buffers(count, s.dtype, rank, n, inplace)
        prepared = backend.prepare(s.op, x, out, s.dtype)
        backend.run(prepared)
        want = op.expected(count, s.dtype, rank, n)
        got = backend.result(prepared)
        if want is not None and got is not None:
            wrong = op.wrong(np.asarray(got).reshape(-1), want.reshape(-1))
        wrong = int(comm.all_sum(np.array([wrong], dtype=np.int64))[0])
    algbw = nbytes / mean / 1e9 if mean > 0 else 0.0
    return Measurement(
        backend=backend.name, op=s.op, size=nbytes, count=count, dtype=s.dtype, inplace=inplace,
        iters=iters, time_us=mean * 1e6, p50_us=p50 * 1e6, p99_us=p99 * 1e6, algbw=algbw,
        busbw=algbw * op.bus_factor(n), wrong=wrong, ranks=n,
        cpu=float(totals[0] / totals[1]) if totals[1] > 0 else float("nan"),
    )


def make_backends(comm, s: Settings) -> list:
    backends = [] if s.skip_core and (s.via_mlx or s.vs) else [CoreBackend(comm)]
    if s.via_mlx:
        from ..mlx_backend import group_from_comm

        backends.append(MLXBackend("thunderlink/mlx", group_from_comm(comm), ring=False))
    if "mlx-ring" in s.vs:
        import mlx.core as mx

        if not os.environ.get("MLX_HOSTFILE") or os.environ.get("THUNDERLINK_HOSTFILE") == os.environ.get("MLX_HOSTFILE"):
            # Across a hostfile: MLX's ring over the same links, on ports next to ours.
            import tempfile

            from ..config import from_env
            from ..hosts.hostfile import load, mlx_ring_hostfile

            cfg = from_env()
            ring_file = mlx_ring_hostfile(load(cfg.hostfile), MLX_RING_PORT_OFFSET)
            fd, path = tempfile.mkstemp(prefix="thunderlink-mlx-ring-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(ring_file, f)
            os.environ["MLX_HOSTFILE"] = path
        os.environ["MLX_RANK"] = str(comm.rank)  # MLX's ring reads its rank here
        ring = mx.distributed.init(strict=True, backend="ring")
        backends.append(MLXBackend("mlx-ring", ring, ring=True))
    for name in [v for v in s.vs if v.startswith("gloo")]:
        impl = s.gloo_impl if name == "gloo" else name.removeprefix("gloo-")
        if not (s.gloo_port if impl == "torch" else (s.gloo_store and s.gloo_lib)):
            raise SystemExit(f"thunderlink bench: --vs {name} needs local ranks started by the bench: "
                             f"thunderlink bench -n N --vs {name}")
        backends.append(GlooBackend(comm.rank, comm.size, s.gloo_port, impl=impl, lib=s.gloo_lib,
                                    store=s.gloo_store, name=name))
    return backends


def run(comm, s: Settings, backends=None, out=sys.stdout, *, title: str = "thunderlink bench",
        notes=()) -> list[Measurement]:
    """Sweep the sizes; rank 0 writes the table to ``out`` (``title`` and
    ``notes`` head it: see report.header).

    ``comm`` is anything with ``rank``, ``size``, ``barrier()``, ``all_max``,
    ``all_sum`` (numpy arrays) and ``links()``; each backend has ``name``,
    ``variants`` (False: out of place, True: in place), ``supports(op)``,
    ``prepare(op, x, out, dtype)``, ``run(prepared)`` and ``result(prepared)``.
    bench/peers.py measures Gloo and Open MPI through this same loop."""
    from . import report

    own = not backends
    backends = backends or make_backends(comm, s)
    notes = list(notes) + _notes(backends)
    wanted = {"both": (False, True), "out": (False,), "in": (True,)}[s.inplace]
    # A backend with none of the wanted variants runs its own (Gloo: in place only).
    series = [(b, v) for b in backends for v in ([v for v in b.variants if v in wanted] or b.variants[:1])]
    rank0 = comm.rank == 0
    results: list[Measurement] = []
    if rank0:
        report.header(out, s, comm.size, series, comm.links(), title=title, notes=notes)
    for size in s.sizes:
        row = [measure(comm, b, s, size, v) for b, v in series]
        results += row
        if rank0:
            report.row(out, row)
    if rank0:
        report.footer(out, results, series)
        _rdma_note(comm, out)
        if s.json_path:
            with open(s.json_path, "w", encoding="utf-8") as f:
                json.dump([_jsonable(asdict(m)) for m in results], f, indent=1)
        if s.plot_path:
            from .plot import plot

            plot(results, s, s.plot_path)
    gloos = [b for b in backends if isinstance(b, GlooBackend)] if own else []
    if gloos:
        comm.barrier()  # every rank is done with Gloo before any closes its connections
        for b in gloos:
            b.close()
    return results


def _rdma_note(comm, out) -> None:
    """Over RDMA links: which path the bytes took (rank 0's counters of the
    whole run), so a table says whether zero copy ran."""
    stats = getattr(comm, "stats", None)
    if not stats or "rdma" not in [kind for kind, _ in comm.links().values()]:
        return
    z = stats().get("rdma")
    if not z:
        return
    out.write(f"# rdma (rank 0, whole run): zero copy {z['zcopy_sent']} writes sent "
              f"({z['zcopy_sent_bytes'] / 1e6:.1f} MB), {z['zcopy_received']} received "
              f"({z['zcopy_received_bytes'] / 1e6:.1f} MB); {z['zcopy_staged']} large messages through the "
              f"staging slots; regions registered {z['mr_registered']}, cache hits {z['mr_hits']}, "
              f"evicted {z['mr_evicted']} (THUNDERLINK_IBV_ZCOPY=0: all through the slots)\n")
    out.flush()


def _notes(backends) -> list[str]:
    """Header lines on what the backends measured run under."""
    notes = [b.describe for b in backends if getattr(b, "describe", None) and isinstance(b, GlooBackend)]
    if any(isinstance(b, MLXBackend) for b in backends):
        from .. import mlx_backend

        notes.append(f"malloc (THUNDERLINK_MALLOC_HEAP, set by thunderlink's MLX group for the whole process, "
                     f"MLX's ring included): {mlx_backend.malloc_state or 'left alone: no thunderlink group here'}")
    return notes


def _jsonable(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
