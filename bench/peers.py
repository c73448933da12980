#!/usr/bin/env python3
"""Peer benchmark: float32 all_sum (all-reduce) through Gloo or Open MPI, measured
the way `thunderlink bench` measures thunderlink, so the two can be put side by side.

    python bench/peers.py --peer gloo [--sizes 4:256M] [--iters N] [--warmup N] [--json out.json] [-n 2]
    python bench/peers.py --peer gloo-lib --gloo-lib build/gloo/libgloo_allreduce.so ...   (Gloo without PyTorch)
    python bench/peers.py --peer ompi [--sizes 4:256M] [--iters N] [--warmup N] [--json out.json] [-n 2]
    python bench/peers.py --peer ompi-shm ...                  (Open MPI over its shared memory)
    python bench/peers.py --peer ompi --with-thunderlink ...   (thunderlink bench first, then both side by side)
    python bench/peers.py --compare thunderlink.json gloo.json ompi.json [--json all.json] [--plot all.png]

  gloo  Gloo over TCP on loopback, in place (torch.distributed has no
        out-of-place all_reduce), through gloo-torch where torch is installed,
        else through gloo-lib; the header's "peer:" line says which.
  gloo-torch  PyTorch's torch.distributed, backend "gloo"
        (GLOO_SOCKET_IFNAME=lo, init_method tcp://127.0.0.1:PORT); all_reduce of a
        float32 CPU tensor. Ranks are started by this script, one process each.
  gloo-lib  bench/gloo's driver library (--gloo-lib PATH or
        THUNDERLINK_GLOO_LIB; bench/gloo/build.sh builds it from a Gloo
        checkout): the gloo::allreduce that torch.distributed calls (ring, the
        buffer as its only output), on the numpy buffer through ctypes, a
        Gloo TCP device on lo, rendezvous in a FileStore directory this script
        makes and removes. For machines without PyTorch.
  ompi  Open MPI's MPI_Allreduce through mpi4py on numpy buffers, under
        `mpirun --mca pml ob1 --mca btl tcp,self --mca btl_tcp_if_include lo`:
        the TCP BTL over loopback (no shared memory, no UCX). Out of place
        (Allreduce(x, y)) and in place (Allreduce(IN_PLACE, x)).
  ompi-shm  the same over Open MPI's shared memory between the ranks
        (`--mca pml ob1 --mca btl vader,self`: the vader BTL, Open MPI 4's
        shared memory with single-copy CMA where the kernel allows it), to
        compare with thunderlink's shared-memory transport
        (--with-thunderlink then runs thunderlink with --transport shm).
  mlx-ring  MLX's own `ring` backend over loopback TCP, alone in its
        processes (nothing of thunderlink's loaded or connected; the harness's
        barrier and reductions of timings go through the ring itself):
        mx.distributed.all_sum on a fresh MLX array, out of place, and in
        place (the input donated), with malloc as MLX leaves it. This is the
        stand-alone run that `thunderlink bench --vs mlx-ring` is checked
        against.
  mlx-mpi  MLX's own `mpi` backend over that same Open MPI shared memory:
        mx.distributed.all_sum on a fresh MLX array, out of place (MLX
        allocates every output), as users call it (--with-thunderlink then
        runs thunderlink with --transport shm --via mlx).

Method: thunderlink bench's own loop and table (thunderlink.bench.worker.run
and .report), with the peer as the backend measured: per size, `--warmup` untimed
iterations; then, unless --iters is given, one timed iteration (slowest rank)
picks the count for about 0.2 s, clamped to 10..2000; a barrier; then every
iteration is timed on every rank with perf_counter. After the loop the
per-iteration times are all-reduced with MAX (the slowest rank of each
iteration); time is their mean, p50 and p99 their percentiles; algbw =
bytes / mean, busbw = algbw * 2(n-1)/n (nccl-tests); cpu = CPU seconds of all
ranks (getrusage RUSAGE_SELF, every thread) / (wall seconds x ranks) over the
timed loop. #wrong: fresh buffers x[i] = (i % 7) + (rank % 8), one more
all-reduce, and the elements whose bytes differ from (i % 7) * n + sum(r % 8),
summed over ranks.

The JSON is a list of dicts with the keys `thunderlink bench --json` writes.
Exit status: 0 ok, 1 wrong results, 2 peer not installed, 3 failed or timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np

PEERS = ("gloo", "gloo-torch", "gloo-lib", "ompi", "ompi-shm", "mlx-mpi", "mlx-ring")
INSTALL = {
    "ompi": "Open MPI / mpi4py is not installed: apt-get install -y openmpi-bin libopenmpi-dev "
            "&& pip install mpi4py  (see bench/PEERS.md)",
}
INSTALL["ompi-shm"] = INSTALL["mlx-mpi"] = INSTALL["ompi"]
INSTALL["mlx-ring"] = "MLX is not installed: pip install mlx"
# mpirun options: the TCP BTL over loopback only. pml ob1 is pinned because
# Debian's Open MPI also has the UCX pml, which would ignore the btl list and
# move the bytes through shared memory.
MPIRUN_MCA = {
    "ompi": ["--mca", "pml", "ob1", "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", "lo"],
    "ompi-shm": ["--mca", "pml", "ob1", "--mca", "btl", "vader,self"],
}
MPIRUN_MCA["mlx-mpi"] = MPIRUN_MCA["ompi-shm"]

# ---- sizes: thunderlink bench's own, so that both measure the same ------------------


def parse_sizes(text: str) -> tuple[int, ...]:
    """'4:64M' (x2 steps), '4:64M:x4' (factor), '1M:8M:+1M' (step), or '4,1K,1M'."""
    from thunderlink.bench.__main__ import parse_sizes as bench_sizes

    return bench_sizes(text)


# ---- the peers: each is both the job's communicator and the backend measured --------
# (the interfaces of thunderlink.bench.worker.run, whose loop and table measure them)


class _Peer:
    def links(self) -> dict:
        return {}  # no thunderlink links to report

    def supports(self, op: str) -> bool:
        return op == "all_sum"

    def run(self, prepared) -> None:
        prepared["run"]()

    def result(self, prepared) -> np.ndarray:
        return np.asarray(prepared["result"])


class GlooComm(_Peer):
    """torch.distributed with backend gloo; the timed call is dist.all_reduce (in place)."""

    name = "gloo"
    variants = (True,)  # in place only

    def __init__(self, rank: int, n: int, port: int, timeout: float):
        import datetime

        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                                timeout=datetime.timedelta(seconds=timeout))
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.describe = f"gloo via torch {torch.__version__} torch.distributed, GLOO_SOCKET_IFNAME={os.environ.get('GLOO_SOCKET_IFNAME', '')}"

    def barrier(self) -> None:
        self.dist.barrier()

    def _reduce(self, a: np.ndarray, op) -> np.ndarray:
        t = self.torch.from_numpy(np.array(a))  # a copy
        self.dist.all_reduce(t, op=op)
        return t.numpy()

    def all_max(self, a: np.ndarray) -> np.ndarray:
        return self._reduce(a, self.dist.ReduceOp.MAX)

    def all_sum(self, a: np.ndarray) -> np.ndarray:
        return self._reduce(a, self.dist.ReduceOp.SUM)

    def prepare(self, op: str, x: np.ndarray, out: np.ndarray, dtype: str):
        t = self.torch.from_numpy(x)  # shares x's memory (out is x: in place only)
        all_reduce = self.dist.all_reduce
        return {"run": lambda: all_reduce(t), "result": x}

    def close(self) -> None:
        self.dist.destroy_process_group()


class GlooLibComm(_Peer):
    """bench/gloo's driver library (thunderlink.bench.gloo.GlooLib); the timed
    call is one ctypes call of gloo::allreduce, in place on the numpy buffer."""

    name = "gloo-lib"
    variants = (True,)  # in place only, as torch.distributed

    def __init__(self, rank: int, n: int, lib: str, store: str, timeout: float):
        from thunderlink.bench.gloo import MAX, SUM, GlooLib

        self.g, self.SUM, self.MAX = GlooLib(lib, rank, n, store, iface="lo", timeout=timeout), SUM, MAX
        self.rank, self.size = rank, n
        self.describe = (f"Gloo driver library {lib} ({self.g.version}): gloo::allreduce (ring), in place, "
                         f"on lo; no PyTorch")

    def barrier(self) -> None:
        self.g.barrier()

    def _reduce(self, a: np.ndarray, op) -> np.ndarray:
        a = np.array(a)  # a copy
        self.g.allreduce(a, op)
        return a

    def all_max(self, a: np.ndarray) -> np.ndarray:
        return self._reduce(a, self.MAX)

    def all_sum(self, a: np.ndarray) -> np.ndarray:
        return self._reduce(a, self.SUM)

    def prepare(self, op: str, x: np.ndarray, out: np.ndarray, dtype: str):
        return {"run": self.g.caller(x), "result": x}

    def close(self) -> None:
        self.g.close()


class MPIComm(_Peer):
    """mpi4py on numpy buffers; the timed call is comm.Allreduce."""

    name = "ompi"
    variants = (False, True)

    def __init__(self):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        lib = MPI.Get_library_version().strip().splitlines()[0].split(",")[0]
        import mpi4py

        self.describe = f"{lib} via mpi4py {mpi4py.__version__}, MPI_Allreduce"

    def barrier(self) -> None:
        self.comm.Barrier()

    def all_max(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=self.MPI.MAX)
        return out

    def all_sum(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=self.MPI.SUM)
        return out

    def prepare(self, op: str, x: np.ndarray, out: np.ndarray, dtype: str):
        MPI, allreduce = self.MPI, self.comm.Allreduce
        sx = [x, x.size, MPI.FLOAT]
        if out is x:  # in place
            return {"run": lambda: allreduce(MPI.IN_PLACE, sx, op=MPI.SUM), "result": x}
        sy = [out, out.size, MPI.FLOAT]
        return {"run": lambda: allreduce(sx, sy, op=MPI.SUM), "result": out}

    def close(self) -> None:
        pass


class MLXMPIComm(MPIComm):
    """MLX's `mpi` backend: MLX initialises MPI itself, so mpi4py (for the
    harness's barrier and reductions of timings) attaches to it afterwards."""

    variants = (False,)  # MLX decides when to work in place (donation)

    def __init__(self):
        import mlx.core as mx

        self.mx = mx
        self.group = mx.distributed.init(backend="mpi", strict=True)
        import mpi4py

        mpi4py.rc.initialize = mpi4py.rc.finalize = False
        super().__init__()
        self.describe = f"MLX {mx.__version__} mpi backend on {self.describe.split(' via ')[0]}"

    def prepare(self, op: str, x: np.ndarray, out: np.ndarray, dtype: str):
        mx, g = self.mx, self.group
        a = mx.array(x)
        mx.eval(a)
        box = {}

        def run():
            y = mx.distributed.all_sum(a, group=g)
            mx.eval(y)
            box["y"] = y

        class Result:
            def __array__(self, dtype=None, copy=None):
                return np.array(box["y"])

        return {"run": run, "result": Result()}


class MLXRingComm(_Peer):
    """MLX's ring backend alone: the measured backend is thunderlink bench's
    own MLX series (thunderlink.bench.worker.MLXBackend, which imports
    nothing of thunderlink's core); the harness's barrier and reductions of
    timings run on the ring too."""

    name = "mlx-ring"

    def __init__(self):
        import mlx.core as mx

        from thunderlink.bench.worker import MLXBackend

        self.mx = mx
        self.group = mx.distributed.init(strict=True, backend="ring")
        self.rank, self.size = self.group.rank(), self.group.size()
        self.backend = MLXBackend("mlx-ring", self.group, ring=True)
        self.describe = f"MLX {mx.__version__} ring backend alone (loopback TCP), malloc as MLX leaves it"

    def _reduce(self, a: np.ndarray, fn) -> np.ndarray:
        y = fn(self.mx.array(np.ascontiguousarray(a)), group=self.group)
        self.mx.eval(y)
        return np.array(y)

    def barrier(self) -> None:
        self._reduce(np.zeros(1, np.float32), self.mx.distributed.all_sum)

    def all_max(self, a: np.ndarray) -> np.ndarray:
        return self._reduce(a, self.mx.distributed.all_max)

    def all_sum(self, a: np.ndarray) -> np.ndarray:
        return self._reduce(a, self.mx.distributed.all_sum)

    def close(self) -> None:
        pass


def run_rank(args) -> int:
    """One rank of the job: thunderlink bench's loop and table over the sizes, with the
    peer as its backend; rank 0 prints and writes the JSON."""
    from thunderlink.bench.worker import Settings, run

    if args.peer.startswith("gloo"):
        if args.gloo_impl == "lib":
            comm = GlooLibComm(args.rank, args.ranks, args.gloo_lib, args.gloo_store, timeout=min(args.timeout, 300))
        else:
            comm = GlooComm(args.rank, args.ranks, args.port, timeout=min(args.timeout, 300))
        comm.name = args.peer
    elif args.peer == "mlx-mpi":
        comm = MLXMPIComm()
        comm.name = args.peer
    elif args.peer == "mlx-ring":
        comm = MLXRingComm()
    else:
        comm = MPIComm()
        comm.name = args.peer  # ompi or ompi-shm: which BTL mpirun gave it
    s = Settings(op="all_sum", sizes=parse_sizes(args.sizes), dtype="float32", warmup=args.warmup,
                 iters=args.iters, check=True, inplace=args.inplace, json_path=args.json_path)
    results = run(comm, s, backends=[getattr(comm, "backend", comm)], title="peers bench",
                  notes=[f"peer: {comm.describe}"])
    comm.close()
    return 1 if any(m.wrong for m in results) else 0


# ---- side by side: thunderlink's JSON and the peers' --------------------------------


def _label(m: dict) -> str:
    b = m["backend"]
    if b == "thunderlink":
        return "tl-in" if m.get("inplace") else "tl"
    if b.startswith("ompi"):
        return f"{b}-in" if m.get("inplace") else b
    return b


def compare(results: list[dict], out=sys.stdout) -> None:
    """p50 time and busbw per size, one column pair per series (backend, in place)."""
    keys = []
    for m in results:
        k = (m["backend"], bool(m.get("inplace")))
        if k not in keys and m.get("supported", True):
            keys.append(k)
    at = {(m["backend"], bool(m.get("inplace")), m["size"]): m for m in results if m.get("supported", True)}
    sizes = sorted({m["size"] for m in results})
    labels = {k: _label({"backend": k[0], "inplace": k[1]}) for k in keys}
    out.write("# side by side: p50 time (us) and busbw (GB/s, from the mean time) per series; tl = thunderlink "
              "out-of-place, tl-in = in place, ompi-in = Open MPI in place; gloo is in place\n")
    w = {k: (max(10, len(labels[k]) + 4), max(8, len(labels[k]) + 3)) for k in keys}
    out.write(f"# {'size':>12}" + "".join(f"  {labels[k] + ' p50':>{w[k][0]}} {labels[k] + ' bw':>{w[k][1]}}"
                                          for k in keys) + "\n")
    for size in sizes:
        line = f"  {size:>12}"
        for k in keys:
            m = at.get((k[0], k[1], size))
            line += (f"  {m['p50_us']:>{w[k][0]}.1f} {m['busbw']:>{w[k][1]}.2f}" if m
                     else f"  {'-':>{w[k][0]}} {'-':>{w[k][1]}}")
        out.write(line + "\n")
    out.flush()


def run_thunderlink(args, json_path: str) -> int:
    """`python -m thunderlink bench` with the same sizes, warm-up, iterations and ranks."""
    cmd = [sys.executable, "-m", "thunderlink", "bench", "-n", str(args.ranks), "--sizes", args.sizes,
           "--warmup", str(args.warmup), "--iters", str(args.iters), "--json", json_path,
           "--timeout", str(int(args.timeout)),
           "--transport", {"ompi-shm": "shm", "mlx-mpi": "shm", "mlx-ring": "auto"}.get(args.peer, "tcp")]
    if args.peer in ("mlx-mpi", "mlx-ring"):
        cmd += ["--via", "mlx"]
    print("# " + " ".join(cmd[1:]), flush=True)
    p = subprocess.Popen(cmd, start_new_session=True)
    return _supervise([p], args.timeout + 15)


# ---- starting the ranks ---------------------------------------------------------------


def resolve_gloo(peer: str, lib: str | None) -> tuple[str, str]:
    """(implementation, library path or "") for --peer gloo, gloo-torch or
    gloo-lib; thunderlink.bench.gloo.GlooUnavailable when none can run."""
    from thunderlink.bench.gloo import resolve

    impl, path = resolve({"gloo": "auto", "gloo-torch": "torch", "gloo-lib": "lib"}[peer], lib)
    return impl, path or ""


def installed(peer: str) -> bool:
    import importlib.util

    if peer == "mlx-ring":
        return importlib.util.find_spec("mlx") is not None
    return importlib.util.find_spec("mpi4py") is not None and shutil.which("mpirun") is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs) -> None:
    """End our children and whatever they started (each leads its own session)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _supervise(procs, timeout: float) -> int:
    """Wait for every rank; on a failure or past the deadline, end them all."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                bad = [c for c in codes if c not in (0, 1)]
                return 3 if bad else max(codes)
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0, 1)]
            if failed:
                time.sleep(2)  # let the others report their side of it
                _kill(procs)
                sys.stderr.write(f"peers.py: rank {failed[0][0]} failed (exit status {failed[0][1]}); stopped the job\n")
                return 3
            if time.monotonic() > deadline:
                _kill(procs)
                sys.stderr.write(f"peers.py: still running {timeout:.0f} s after the start (--timeout); stopped the job\n")
                return 3
            time.sleep(0.1)
    except KeyboardInterrupt:
        _kill(procs)
        return 130
    finally:
        _kill(procs)


def worker_args(args) -> list[str]:
    gloo = (["--gloo-impl", args.gloo_impl] + (["--gloo-lib", args.gloo_lib] if args.gloo_lib else [])
            if args.peer.startswith("gloo") else [])
    return gloo + ["--peer", args.peer, "--sizes", args.sizes, "--iters", str(args.iters), "--warmup", str(args.warmup),
            "--inplace", args.inplace, "--timeout", str(args.timeout), "-n", str(args.ranks)] + (
            ["--json", os.path.abspath(args.json_path)] if args.json_path else [])


def launch(args) -> int:
    script = os.path.abspath(__file__)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.peer.startswith("gloo"):
        import tempfile

        env["GLOO_SOCKET_IFNAME"] = "lo"
        port = _free_port()
        with tempfile.TemporaryDirectory(prefix="peers-gloo-") as store:  # gloo-lib's FileStore, removed after
            procs = [subprocess.Popen([sys.executable, script, "--rank-worker", "--rank", str(r), "--port", str(port),
                                       "--gloo-store", store] + worker_args(args), env=env, start_new_session=True)
                     for r in range(args.ranks)]
            return _supervise(procs, args.timeout + 15)
    elif args.peer == "mlx-ring":
        import tempfile

        fd, path = tempfile.mkstemp(prefix="peers-mlx-ring-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump([[f"127.0.0.1:{_free_port()}"] for _ in range(args.ranks)], f)
        env["MLX_HOSTFILE"] = path
        try:
            procs = [subprocess.Popen([sys.executable, script, "--rank-worker"] + worker_args(args),
                                      env=dict(env, MLX_RANK=str(r)), start_new_session=True)
                     for r in range(args.ranks)]
            return _supervise(procs, args.timeout + 15)
        finally:
            os.unlink(path)
    else:
        cmd = (["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(args.ranks)] + MPIRUN_MCA[args.peer]
               + ["--timeout", str(int(args.timeout) + 5), sys.executable, script, "--rank-worker"] + worker_args(args))
        procs = [subprocess.Popen(cmd, env=env, start_new_session=True)]
    return _supervise(procs, args.timeout + 15)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/peers.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", choices=PEERS,
                   help="gloo (torch.distributed where torch is installed, else gloo-lib), gloo-torch, gloo-lib "
                        "(bench/gloo's driver library, no PyTorch), ompi (Open MPI over TCP, mpi4py), ompi-shm "
                        "(its shared memory), mlx-mpi or mlx-ring")
    p.add_argument("--gloo-lib", metavar="PATH",
                   help="gloo-lib, and gloo without torch: the driver library libgloo_allreduce.so "
                        "(bench/gloo/build.sh; default: THUNDERLINK_GLOO_LIB)")
    p.add_argument("--gloo-impl", choices=("torch", "lib"), default="", help=argparse.SUPPRESS)
    p.add_argument("--gloo-store", default="", help=argparse.SUPPRESS)
    p.add_argument("-n", "--ranks", type=int, default=2, help="local ranks (default 2)")
    p.add_argument("--sizes", default="4:256M", help="MIN:MAX[:xF|:+STEP] or a list, bytes (default 4:256M)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up iterations per size (default 5)")
    p.add_argument("--iters", type=int, default=0, help="timed iterations per size (default: about 0.2 s worth, 10..2000)")
    p.add_argument("--inplace", choices=("both", "in", "out"), default="both",
                   help="ompi: which variants (default both; out-of-place is the main series). gloo is in place only")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write every measurement as JSON")
    p.add_argument("--timeout", type=float, default=1200, help="stop the whole job after this many seconds (default 1200)")
    p.add_argument("--with-thunderlink", action="store_true",
                   help="first run `python -m thunderlink bench` with the same sizes, warm-up, iterations and "
                        "ranks (thunderlink importable: PYTHONPATH=src), then the peer, then print both side by "
                        "side; --json then gets both")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="run nothing: merge these JSON files (thunderlink bench --json, peers.py --json) and "
                        "print them side by side; --json writes the merged list, --plot draws it")
    p.add_argument("--plot", dest="plot_path", metavar="PNG",
                   help="with --compare or --with-thunderlink: draw busbw and p50 against size with "
                        "thunderlink's plot (needs thunderlink and matplotlib)")
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.peer and not args.compare:
        parser.error("--peer gloo|ompi is required (or --compare JSON...)")
    parse_sizes(args.sizes)  # exits with a message when malformed
    if args.ranks < 2 or args.iters < 0 or args.warmup < 0:
        raise SystemExit("peers.py: need -n >= 2, --iters >= 0, --warmup >= 0")
    if args.rank_worker:
        return run_rank(args)
    if args.compare:
        merged = []
        for path in args.compare:
            with open(path, encoding="utf-8") as f:
                merged += json.load(f)
        return finish(args, merged)
    if args.peer.startswith("gloo"):
        from thunderlink.bench.gloo import GlooUnavailable

        try:
            args.gloo_impl, args.gloo_lib = resolve_gloo(args.peer, args.gloo_lib)
        except GlooUnavailable as e:  # the message names the fix
            print(f"peers.py: --peer {args.peer}: {e}")
            return 2
    elif not installed(args.peer):
        print(INSTALL[args.peer])
        return 2
    if not args.with_thunderlink:
        return launch(args)
    import importlib.util
    import tempfile

    if importlib.util.find_spec("thunderlink") is None:
        sys.stderr.write("peers.py: --with-thunderlink: thunderlink is not importable: build it "
                         "(python setup.py -q build_ext --inplace) and set PYTHONPATH=src\n")
        return 3
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        tl_json, peer_json = os.path.join(tmp, "thunderlink.json"), os.path.join(tmp, "peer.json")
        rc_tl = run_thunderlink(args, tl_json)
        if rc_tl not in (0, 1):
            sys.stderr.write("peers.py: thunderlink bench failed (is thunderlink importable? PYTHONPATH=src)\n")
            return 3
        final_json, args.json_path = args.json_path, peer_json
        rc = launch(args)
        if rc not in (0, 1):
            return rc
        merged = []
        for path in (tl_json, peer_json):
            with open(path, encoding="utf-8") as f:
                merged += json.load(f)
        args.json_path = final_json
        return max(rc, rc_tl, finish(args, merged))


def finish(args, merged: list[dict]) -> int:
    compare(merged)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(merged, f, indent=1)
    if args.plot_path:
        from types import SimpleNamespace

        try:
            from thunderlink.bench.plot import plot
        except ImportError:
            sys.stderr.write("peers.py: --plot needs thunderlink importable (PYTHONPATH=src) and matplotlib\n")
            return 3
        ms = [SimpleNamespace(**{**m, "supported": m.get("supported", True)}) for m in merged]
        plot(ms, SimpleNamespace(op="all_sum", dtype="float32"), args.plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
