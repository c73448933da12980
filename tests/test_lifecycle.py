"""Communicators and MLX groups come and go without leaking, and close() from
another thread never frees a communicator under a call in flight.

The loops run in child processes (this file is also their program, with
faulthandler on), so that a crash is a failed test with a traceback, and the
counts of descriptors, threads and memory are those of a process that does
nothing else. Two ranks of one job run as two threads of one process where
MLX is not involved (a Comm call releases the GIL); MLX groups need a
process per rank (one MLX CPU stream per process).
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from pairs import comm_pair

pytestmark = pytest.mark.multiproc
TEST_TIMEOUT_S = 150

# Growth allowed from the sample after the warm-up to the last one. Descriptors
# and threads must not grow at all; memory may move by allocator noise.
RSS_SLACK = 8 << 20


def usage() -> dict:
    """Open descriptors, threads and resident memory of this process."""
    import psutil

    p = psutil.Process()
    return {"fds": len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else p.num_fds(),
            "threads": p.num_threads(), "rss": p.memory_info().rss}


# ---- the child programs -------------------------------------------------------------


def prog_create_close(transport: str, n: int, sample_every: int):
    """n jobs of two ranks: connect, one all_sum each, close. Usage sampled."""
    import numpy as np

    samples = []
    x0, x1 = np.arange(64, dtype=np.float32), np.ones(64, np.float32)
    for i in range(1, n + 1):
        a, b = comm_pair(transport=transport)
        res = [None, None]

        def call(r, comm, x):
            res[r] = comm.all_sum(x)

        t = threading.Thread(target=call, args=(1, b, x1))
        t.start()
        call(0, a, x0)
        t.join()
        want = x0 + x1
        if not (np.array_equal(res[0], want) and np.array_equal(res[1], want)):
            print("RESULT " + json.dumps({"wrong": i}))
            return
        a.close()
        b.close()
        if i % sample_every == 0:
            gc.collect()
            samples.append(dict(usage(), at=i))
    print("RESULT " + json.dumps({"samples": samples}))


def prog_close_race(transport: str, n: int, seed: int):
    """n times: rank 0 calls a collective its peer never joins, another
    thread closes rank 0 at a random moment (before, around or during the
    call). The call must fail with ClosedError (or, closed before it began,
    the same), close() must return promptly, and the peer must fail fast."""
    import numpy as np

    import thunderlink

    rng = random.Random(seed)
    outcomes = {}
    worst_close = 0.0
    worst_peer = 0.0
    for i in range(n):
        a, b = comm_pair(30.0, transport=transport)
        size = rng.choice([1, 1000, 1 << 18])
        op = rng.choice(["all_sum", "all_gather", "barrier", "broadcast"])
        got = []

        def call():
            x = np.ones(size, np.float32)
            try:
                if op == "barrier":
                    a.barrier()
                elif op == "broadcast":
                    a.broadcast(x, root=1)  # from the peer: rank 0 must wait
                else:
                    getattr(a, op)(x)
                got.append("returned")
            except thunderlink.ThunderlinkError as e:
                got.append(f"{type(e).__name__}: {e}")

        t = threading.Thread(target=call)
        t.start()
        time.sleep(rng.choice([0, 0, 0.0005, 0.002, 0.02]))
        t0 = time.monotonic()
        a.close()
        worst_close = max(worst_close, time.monotonic() - t0)
        t.join(10)
        if t.is_alive():
            print("RESULT " + json.dumps({"hung": i, "op": op}))
            return
        kind = got[0].split(":")[0]
        outcomes[kind] = outcomes.get(kind, 0) + 1
        if kind != "ClosedError" or "closed" not in got[0]:
            print("RESULT " + json.dumps({"unexpected": got[0], "op": op, "i": i}))
            return
        # The peer learns at once (an abort notice, or the closed connection).
        # Its first barrier may still complete: rank 0's own barrier may have
        # sent its part before the close. The second cannot.
        t0 = time.monotonic()
        peer = "returned"
        for _ in range(2):
            try:
                b.barrier()
            except thunderlink.ThunderlinkError as e:
                peer = type(e).__name__
                break
        worst_peer = max(worst_peer, time.monotonic() - t0)
        b.close()
        if peer == "returned":
            print("RESULT " + json.dumps({"peer_returned": i}))
            return
        # Every call on the closed Comm is a ClosedError, not a crash.
        try:
            a.all_sum(np.ones(4, np.float32))
            print("RESULT " + json.dumps({"closed_call_returned": i}))
            return
        except thunderlink.ClosedError:
            pass
    print("RESULT " + json.dumps({"outcomes": outcomes, "worst_close_s": worst_close,
                                  "worst_peer_s": worst_peer}))


def prog_mlx_groups(n: int, sample_every: int):
    """As a rank of a launched job: n times thunderlink.init(), an all_sum on
    the group, thunderlink.mlx_backend.close(). Usage sampled."""
    import mlx.core as mx

    import thunderlink
    from thunderlink.mlx_backend import close as close_group

    samples = []
    rank = None
    for i in range(1, n + 1):
        g = thunderlink.init(strict=True)
        rank = g.rank()
        x = mx.arange(16, dtype=mx.float32) + g.rank()
        y = mx.distributed.all_sum(x, group=g)
        mx.eval(y)
        want = sum(mx.arange(16, dtype=mx.float32) + r for r in range(g.size()))
        if not mx.array_equal(y, want).item():
            print("RESULT " + json.dumps({"wrong": i}))
            return
        close_group()
        del g, x, y
        if i % sample_every == 0:
            gc.collect()
            samples.append(dict(usage(), at=i))
    print("RESULT " + json.dumps({"rank": rank, "samples": samples}))


# ---- the tests --------------------------------------------------------------------


def _child(*args, timeout: float, env: dict | None = None) -> dict:
    cp = subprocess.run([sys.executable, "-X", "faulthandler", __file__, *map(str, args)],
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})
    lines = [ln for ln in cp.stdout.splitlines() if ln.startswith("RESULT ")]
    assert cp.returncode == 0 and lines, (
        f"child {args} exited with {cp.returncode}\nstdout:\n{cp.stdout[-4000:]}\nstderr:\n{cp.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _assert_flat(samples: list[dict], what: str) -> None:
    first, last = samples[0], samples[-1]
    assert last["fds"] <= first["fds"], f"{what}: open descriptors grew {first} -> {last}"
    assert last["threads"] <= first["threads"], f"{what}: threads grew {first} -> {last}"
    assert last["rss"] - first["rss"] <= RSS_SLACK, f"{what}: memory grew {first} -> {last}"


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_create_and_close_leaks_nothing(transport):
    n = 1000 if transport == "tcp" else 500
    r = _child("create_close", transport, n, 100, timeout=120)
    assert "wrong" not in r, r
    assert len(r["samples"]) == n // 100
    # From the first sample (after 100 jobs: allocator and caches warm) to the last.
    _assert_flat(r["samples"], f"{n} communicators over {transport}")


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_close_from_another_thread_fails_the_call_cleanly(transport):
    r = _child("close_race", transport, 40, 1234, timeout=120)
    assert set(r) == {"outcomes", "worst_close_s", "worst_peer_s"}, r
    assert r["outcomes"] == {"ClosedError": 40}, r
    # close() waits only for the call to notice, not for its deadline (30 s).
    assert r["worst_close_s"] < 2.0, r
    assert r["worst_peer_s"] < 5.0, r


def test_mlx_group_init_and_close_leak_nothing():
    pytest.importorskip("mlx.core")
    from conftest import run_ranks

    n = 200
    res = run_ranks(2, "prog", argv=[sys.executable, "-X", "faulthandler", __file__, "mlx_groups", str(n), "20"],
                    timeout=120)
    assert res.status == 0, res.all_text()
    for v in res.results():
        assert "wrong" not in v, v
        assert len(v["samples"]) == n // 20, v
        # From the first sample (after 20 groups) to the last.
        _assert_flat(v["samples"], f"{n} MLX groups, rank {v['rank']}")


if __name__ == "__main__":
    faulthandler.enable()
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "create_close":
        prog_create_close(rest[0], int(rest[1]), int(rest[2]))
    elif mode == "close_race":
        prog_close_race(rest[0], int(rest[1]), int(rest[2]))
    elif mode == "mlx_groups":
        prog_mlx_groups(int(rest[0]), int(rest[1]))
    else:
        raise SystemExit(f"unknown mode {mode}")
