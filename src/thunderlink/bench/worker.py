"""The benchmark's body, run by every rank.

For each size and each backend (interleaved, so every backend sees the same
machine), for out-of-place and in-place: warm up, time every iteration on
every rank, take the slowest rank of each iteration, and report the mean,
median (p50) and p99. Then check one result (#wrong counts the elements that
differ from the exact expected value, summed over ranks).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, asdict

import numpy as np

from .ops import DTYPES, OPS

__all__ = ["Settings", "Measurement", "run"]


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


class CoreBackend:
    """The C core through cffi (no MLX)."""

    name = "thunderlink"

    def __init__(self, comm):
        self.comm = comm

    def prepare(self, op, x, out):
        return x, out

    def result(self, op, x, out):
        return x if op in ("broadcast",) else out

    def run(self, op, x, out):
        c = self.comm
        if op == "all_sum":
            c.all_reduce(x, out, "sum", dtype=self.dtype)
        elif op == "all_gather":
            c.all_gather(x, out, dtype=self.dtype)
        elif op == "sum_scatter":
            c.reduce_scatter(x, out, "sum", dtype=self.dtype)
        elif op == "broadcast":
            c.broadcast(x, 0, dtype=self.dtype)
        elif op == "sendrecv":
            last = c.size - 1
            if c.rank == 0:
                c.send(x, last, dtype=self.dtype)
                c.recv(out, last, dtype=self.dtype)
            elif c.rank == last:
                c.recv(out, 0, dtype=self.dtype)
                c.send(x, 0, dtype=self.dtype)


def _stats(comm, times: np.ndarray):
    slowest = comm.all_max(times)  # per iteration, the slowest rank
    return float(slowest.mean()), float(np.percentile(slowest, 50)), float(np.percentile(slowest, 99))


def measure(comm, backend, s: Settings, size: int, inplace: bool) -> Measurement:
    op = OPS[s.op]
    n, rank = comm.size, comm.rank
    storage, core_dtype = DTYPES[s.dtype]
    itemsize = np.dtype(storage).itemsize
    count = op.count(size, itemsize, n)
    backend.dtype = core_dtype
    x, out = op.buffers(count, s.dtype, rank, n, inplace)
    bx, bout = backend.prepare(s.op, x, out)
    for _ in range(s.warmup):
        backend.run(s.op, bx, bout)
    iters = s.iters
    if not iters:
        t = time.perf_counter()
        backend.run(s.op, bx, bout)
        est = comm.all_max(np.array([time.perf_counter() - t]))[0]
        iters = int(min(2000, max(10, s.budget / max(est, 1e-7))))
    comm.barrier()
    times = np.empty(iters)
    for i in range(iters):
        t = time.perf_counter()
        backend.run(s.op, bx, bout)
        times[i] = time.perf_counter() - t
    mean, p50, p99 = _stats(comm, times)
    if s.op == "sendrecv":
        mean, p50, p99 = mean / 2, p50 / 2, p99 / 2
    wrong = 0
    if s.check:
        x, out = op.buffers(count, s.dtype, rank, n, inplace)
        bx, bout = backend.prepare(s.op, x, out)
        backend.run(s.op, bx, bout)
        want = op.expected(count, s.dtype, rank, n)
        if want is not None:
            got = np.asarray(backend.result(s.op, bx, bout)).reshape(-1)
            wrong = op.wrong(got, want.reshape(-1))
        wrong = int(comm.all_sum(np.array([wrong], dtype=np.int64))[0])
    nbytes = count * itemsize * (n if s.op in ("all_gather", "sum_scatter") else 1)
    algbw = nbytes / mean / 1e9 if mean > 0 else 0.0
    return Measurement(
        backend=backend.name, op=s.op, size=nbytes, count=count, dtype=s.dtype, inplace=inplace,
        iters=iters, time_us=mean * 1e6, p50_us=p50 * 1e6, p99_us=p99 * 1e6, algbw=algbw,
        busbw=algbw * op.bus_factor(n), wrong=wrong, ranks=n,
    )


def run(comm, s: Settings, backends=None, out=sys.stdout) -> list[Measurement]:
    """Sweep the sizes; rank 0 writes the table to ``out``."""
    from . import report

    backends = backends or [CoreBackend(comm)]
    variants = {"both": (False, True), "out": (False,), "in": (True,)}[s.inplace]
    rank0 = comm.rank == 0
    results: list[Measurement] = []
    if rank0:
        report.header(out, s, comm.size, [b.name for b in backends], variants)
    for size in s.sizes:
        row = []
        for b in backends:
            for inplace in variants:
                m = measure(comm, b, s, size, inplace)
                row.append(m)
        results += row
        if rank0:
            report.row(out, row, variants, [b.name for b in backends])
    if rank0:
        report.footer(out, results, [b.name for b in backends])
        if s.json_path:
            with open(s.json_path, "w", encoding="utf-8") as f:
                json.dump([asdict(m) for m in results], f, indent=1)
    return results
