"""Per-call overhead of the Python layers, with pytest-benchmark.

    pytest bench/bench_overhead.py

- a 1-rank communicator: nothing crosses a socket, so the time is the cost
  of getting into the core and back: the raw cffi call, then Comm.all_sum
  with its buffer checks, then the same through an MLX group op;
- two ranks as two threads of this process over loopback (the core releases
  the GIL): a 4-byte all_sum round trip through the raw core, through Comm,
  and through mx.distributed with thunderlink's group, so the difference is
  what each layer adds.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from thunderlink.bindings import Comm, Endpoint, Options, ffi, lib
from thunderlink.launch import free_ports


def _pair():
    """Two connected communicators (ranks 0 and 1) in this process."""
    ports = free_ports(2)
    eps = [Endpoint(owner=r, host="127.0.0.1", port=ports[r]) for r in range(2)]
    out = [None, None]

    def make(r):
        out[r] = Comm.create(r, 2, eps, Options(job_id=7, timeout=30, connect_timeout=10))

    t = threading.Thread(target=make, args=(1,))
    t.start()
    make(0)
    t.join()
    return out


class Peer:
    """Rank 1 in a thread: repeats `call` until stopped (its last call is
    ended by closing its communicator)."""

    def __init__(self, comm, call):
        self.comm, self.call, self.stop = comm, call, False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        try:
            while not self.stop:
                self.call()
        except Exception:
            pass

    def close(self):
        self.stop = True
        self.comm.close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def solo():
    with Comm.create(0, 1, [Endpoint(owner=0, host="127.0.0.1", port=0)]) as c:
        yield c


def test_solo_raw_cffi_call(benchmark, solo):
    x = np.ones(1, np.float32)
    y = np.empty_like(x)
    px, py, h = ffi.from_buffer(x), ffi.from_buffer(y, require_writable=True), solo.handle
    benchmark(lambda: lib.tl_all_reduce(h, px, py, 1, lib.TL_FLOAT32, lib.TL_SUM))


def test_solo_comm_all_sum(benchmark, solo):
    x = np.ones(1, np.float32)
    y = np.empty_like(x)
    benchmark(lambda: solo.all_sum(x, y))


def _pair_bench(benchmark, run0, run1):
    c0, c1 = _pair()
    peer = Peer(c1, lambda: run1(c1))
    try:
        benchmark.pedantic(lambda: run0(c0), rounds=2000, warmup_rounds=100, iterations=1)
    finally:
        # Unblock the peer's pending call, then let rank 0 go.
        peer.close()
        c0.close()


def test_pair_raw_core_4B(benchmark):
    x = np.ones(1, np.float32)
    y = np.empty_like(x)

    def raw(c):
        lib.tl_all_reduce(c.handle, ffi.from_buffer(x), ffi.from_buffer(y, require_writable=True), 1,
                          lib.TL_FLOAT32, lib.TL_SUM)

    _pair_bench(benchmark, raw, raw)


def test_pair_comm_all_sum_4B(benchmark):
    x = np.ones(1, np.float32)
    y = np.empty_like(x)
    _pair_bench(benchmark, lambda c: c.all_sum(x, y), lambda c: c.all_sum(x, y))


def test_pair_mlx_all_sum_4B(benchmark):
    mx = pytest.importorskip("mlx.core")
    from thunderlink.mlx_backend import group_from_comm

    c0, c1 = _pair()
    g0, g1 = group_from_comm(c0), group_from_comm(c1)
    x = mx.ones((1,))
    mx.eval(x)
    streams = {}

    def peer():
        # MLX streams belong to the thread that made them.
        s1 = streams.get(threading.get_ident()) or streams.setdefault(threading.get_ident(), mx.new_stream(mx.cpu))
        mx.eval(mx.distributed.all_sum(x, group=g1, stream=s1))

    p = Peer(c1, peer)
    try:
        benchmark.pedantic(lambda: mx.eval(mx.distributed.all_sum(x, group=g0)), rounds=2000, warmup_rounds=100,
                           iterations=1)
    finally:
        from thunderlink.mlx_backend import close

        p.stop = True
        close(g1)
        p.thread.join(10)
        close(g0)
