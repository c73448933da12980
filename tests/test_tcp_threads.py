"""I/O threads of TCP connections (THUNDERLINK_TCP_THREADS, core/tcpio.c).

With threads on, each TCP data connection's large frames move on a thread of
its own (named tl-io) while the calling thread reduces; the rules stay the
progress loop's. These tests hold both paths to the same results, check
that the threads exist exactly when asked for (and the auto rule), that they
end with their communicator (counts flat over many), and that the failure
cases with threads blocked in the kernel behave as without: a peer killed
mid-transfer, a header that differs, close() from another thread.

In-process programs (two ranks as two threads of one child process, as in
test_lifecycle) run in a child so that thread and descriptor counts are
those of a process doing nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from pairs import comm_pair, sigkill_mid_collective
from progmain import threads_named

pytestmark = pytest.mark.multiproc
TEST_TIMEOUT_S = 240

MODES = ("on", "off")


# ---- the child programs ---------------------------------------------------------------


def io_threads() -> int:
    """Threads of this process named tl-io."""
    return threads_named("tl-io")


def _both(a, b, name: str, args_a: tuple, args_b: tuple):
    """a.name(*args_a) on this thread and b.name(*args_b) on another (for
    send/recv, name is "send/recv"); both results (or exceptions)."""
    res = [None, None]
    names = name.split("/") * (2 if "/" not in name else 1)

    def run(i, c, method, args):
        try:
            res[i] = getattr(c, method)(*args)
        except Exception as e:  # noqa: BLE001 -- returned to the caller
            res[i] = e

    t = threading.Thread(target=run, args=(1, b, names[1], args_b))
    t.start()
    run(0, a, names[0], args_a)
    t.join(60)
    assert not t.is_alive(), "rank 1 hung"
    return res


def prog_modes(mode: str):
    """all_sum, all_gather, reduce_scatter and broadcast of sizes around the
    hand-over threshold, checked; the tl-io threads seen; stats."""
    import numpy as np

    a, b = comm_pair(transport="tcp", tcp_threads=mode)
    before = io_threads()
    out = {"before": before, "wrong": []}
    for count in (1000, 1 << 16, (1 << 18) + 3, 1 << 22, (1 << 23) + 5):
        xs = [np.arange(count, dtype=np.float32) % 251 + r for r in range(2)]
        want = xs[0] + xs[1]
        got = _both(a, b, "all_sum", (xs[0],), (xs[1],))
        if not all(isinstance(g, np.ndarray) and np.array_equal(g, want) for g in got):
            out["wrong"].append(["all_sum", count, [repr(g)[:200] for g in got if not isinstance(g, np.ndarray)]])
        ys = [x.copy() for x in xs]
        _both(a, b, "all_sum", (ys[0], ys[0]), (ys[1], ys[1]))
        if not (np.array_equal(ys[0], want) and np.array_equal(ys[1], want)):
            out["wrong"].append(["all_sum in place", count])
        got = _both(a, b, "all_gather", (xs[0],), (xs[1],))
        if not all(isinstance(g, np.ndarray) and np.array_equal(g, np.concatenate(xs)) for g in got):
            out["wrong"].append(["all_gather", count])
        if count % 2 == 0:
            got = _both(a, b, "reduce_scatter", (xs[0],), (xs[1],))
            half = count // 2
            if not (np.array_equal(got[0], want[:half]) and np.array_equal(got[1], want[half:])):
                out["wrong"].append(["reduce_scatter", count])
        zs = [xs[0].copy(), np.zeros(count, np.float32)]
        _both(a, b, "broadcast", (zs[0], 0), (zs[1], 0))
        if not np.array_equal(zs[1], xs[0]):
            out["wrong"].append(["broadcast", count])
        rx = np.zeros(count, np.float32)
        _both(a, b, "send/recv", (xs[0], 1), (rx, 0))
        if not np.array_equal(rx, xs[0]):
            out["wrong"].append(["send/recv", count])
    out["during"] = io_threads()
    out["stats"] = [a.stats(), b.stats()]
    a.close()
    b.close()
    out["after"] = io_threads()
    print("RESULT " + json.dumps(out))


def prog_auto():
    """tcp_threads=auto: threads iff usable CPUs >= 4 x ranks on this host."""
    import numpy as np

    a, b = comm_pair(transport="tcp", tcp_threads="auto")
    x = np.ones(1 << 22, np.float32)
    _both(a, b, "all_sum", (x,), (x,))
    n = io_threads()
    a.close()
    b.close()
    print("RESULT " + json.dumps({"threads": n, "cpus": len(os.sched_getaffinity(0))}))


def prog_min_bytes():
    """tcp_threads=on, tcp_threads_min_bytes=32M: a 16 MiB all_sum stays on
    the calling thread, a 32 MiB one starts the threads."""
    import numpy as np

    a, b = comm_pair(transport="tcp", tcp_threads="on", tcp_threads_min_bytes=32 << 20)
    counts = []
    for size in (16 << 20, 32 << 20):
        x = np.ones(size // 4, np.float32)
        got = _both(a, b, "all_sum", (x,), (x,))
        assert all(isinstance(g, np.ndarray) and np.all(g == 2) for g in got), got
        counts.append(io_threads())
    a.close()
    b.close()
    print("RESULT " + json.dumps({"threads": counts}))


def prog_many(mode: str, n: int, sample_every: int):
    """n jobs: connect, a large all_sum (threads start), close. Usage sampled."""
    import gc

    import numpy as np
    import psutil

    p = psutil.Process()
    samples, seen = [], 0
    x = np.ones(1 << 21, np.float32)  # 8 MiB: above THUNDERLINK_TCP_THREADS_MIN_BYTES
    for i in range(1, n + 1):
        a, b = comm_pair(transport="tcp", tcp_threads=mode)
        got = _both(a, b, "all_sum", (x,), (x,))
        if not all(isinstance(g, np.ndarray) and np.all(g == 2) for g in got):
            print("RESULT " + json.dumps({"wrong": i, "got": [repr(g)[:200] for g in got]}))
            return
        seen = max(seen, io_threads())
        a.close()
        b.close()
        if io_threads():
            print("RESULT " + json.dumps({"left": io_threads(), "at": i}))
            return
        if i % sample_every == 0:
            gc.collect()
            samples.append({"fds": len(os.listdir("/proc/self/fd")), "threads": p.num_threads(), "at": i})
    print("RESULT " + json.dumps({"samples": samples, "seen": seen}))


def prog_close_mid_transfer(mode: str, rounds: int):
    """Rank 0 calls a large all_sum that its peer joins late (its I/O
    threads block on the sockets); another thread closes rank 0 meanwhile.
    The call fails with ClosedError promptly, close() returns, the peer fails
    fast, and no thread is left."""
    import numpy as np

    import thunderlink

    worst = {"close": 0.0, "call": 0.0, "peer": 0.0}
    for i in range(rounds):
        a, b = comm_pair(30.0, transport="tcp", tcp_threads=mode)
        x = np.ones(1 << 22, np.float32)
        # One all_sum together first: the threads exist and are idle.
        _both(a, b, "all_sum", (x,), (x,))
        got = []

        def call(a=a, x=x, got=got):
            t0 = time.monotonic()
            try:
                a.all_sum(x)
                got.append("returned")
            except thunderlink.ThunderlinkError as e:
                got.append(f"{type(e).__name__}: {e}")
            worst["call"] = max(worst["call"], time.monotonic() - t0)

        t = threading.Thread(target=call)
        t.start()
        # The peer never joins: rank 0's threads wait on the sockets (the
        # receives) or fill them (the sends) until the close, which comes
        # before, while or after they start.
        time.sleep((0, 0.0005, 0.002, 0.02, 0.1, 0.2)[i % 6])
        t0 = time.monotonic()
        a.close()
        worst["close"] = max(worst["close"], time.monotonic() - t0)
        t.join(10)
        if t.is_alive():
            print("RESULT " + json.dumps({"hung": i}))
            return
        if not got[0].startswith("ClosedError"):
            print("RESULT " + json.dumps({"unexpected": got[0], "i": i}))
            return
        t0 = time.monotonic()
        peer = "returned"
        for _ in range(2):
            try:
                b.all_sum(x)
            except thunderlink.ThunderlinkError as e:
                peer = type(e).__name__
                break
        worst["peer"] = max(worst["peer"], time.monotonic() - t0)
        b.close()
        if peer == "returned":
            print("RESULT " + json.dumps({"peer_returned": i}))
            return
    print("RESULT " + json.dumps({"worst": worst, "left": io_threads()}))


def prog_ctrl_c():
    """Rank 0 waits on the main thread in a 16 MiB all_sum that its peer
    never joins, its I/O threads blocked on the sockets; SIGINT arrives.
    The wait ends at once (KeyboardInterrupt), the communicator is poisoned,
    and closing it leaves no thread."""
    import signal

    import numpy as np

    a, b = comm_pair(30.0, transport="tcp", tcp_threads="on")
    x = np.ones(1 << 22, np.float32)
    _both(a, b, "all_sum", (x,), (x,))  # threads up
    main = threading.main_thread().ident  # as Ctrl-C reaches the program's main thread
    threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
    t0 = time.monotonic()
    try:
        a.all_sum(x)
        raised = None
    except BaseException as e:  # noqa: BLE001 -- KeyboardInterrupt is the point
        raised = type(e).__name__
    took = time.monotonic() - t0
    try:
        a.barrier()
        after = None
    except BaseException as e:  # noqa: BLE001
        after = type(e).__name__
    a.close()
    b.close()
    print("RESULT " + json.dumps({"raised": raised, "took": took, "after": after, "left": io_threads()}))


# ---- the tests --------------------------------------------------------------------------


def _child(*args, timeout: float, env: dict | None = None) -> dict:
    cp = subprocess.run([sys.executable, "-X", "faulthandler", __file__, *map(str, args)],
                        capture_output=True, text=True, timeout=timeout, check=False,
                        env={**os.environ, **(env or {})})
    lines = [ln for ln in cp.stdout.splitlines() if ln.startswith("RESULT ")]
    assert cp.returncode == 0 and lines, (
        f"child {args} exited with {cp.returncode}\nstdout:\n{cp.stdout[-4000:]}\nstderr:\n{cp.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads by /proc names")


@needs_proc
@pytest.mark.parametrize("mode", MODES)
def test_every_op_is_right_and_threads_exist_only_when_on(mode):
    v = _child("modes", mode, timeout=180)
    assert v["wrong"] == [], v["wrong"]
    assert v["before"] == 0 and v["after"] == 0, v
    if mode == "on":
        # Two ranks, two data connections each, a thread per direction.
        assert v["during"] == 8, v
    else:
        assert v["during"] == 0, v
    # The threads' bytes are counted: what one rank sent, the other received.
    s0, s1 = v["stats"]
    assert s0["bytes_sent"] == s1["bytes_received"] > 0 and s1["bytes_sent"] == s0["bytes_received"] > 0, v["stats"]


def test_both_paths_count_the_same_bytes():
    on, off = (_child("modes", m, timeout=180) for m in MODES)
    def key(s):
        return s["bytes_sent"], s["bytes_received"]

    assert [key(s) for s in on["stats"]] == [key(s) for s in off["stats"]]


@needs_proc
def test_auto_follows_the_spare_cores():
    v = _child("auto", timeout=120)
    # Two ranks of this host: on where the process may use 8 CPUs or more.
    assert v["threads"] == (8 if v["cpus"] >= 8 else 0), v


@needs_proc
def test_small_operations_stay_on_the_calling_thread():
    v = _child("min_bytes", timeout=120)
    assert v["threads"] == [0, 8], v


@needs_proc
def test_threads_and_descriptors_stay_flat_over_many_communicators():
    v = _child("many", "on", 40, 10, timeout=200)
    assert "samples" in v, v
    assert v["seen"] == 8, v
    first, last = v["samples"][0], v["samples"][-1]
    assert last["fds"] <= first["fds"], (first, last)
    assert last["threads"] <= first["threads"], (first, last)


@needs_proc
def test_close_from_another_thread_while_threads_block():
    v = _child("close_mid_transfer", "on", 12, timeout=150)
    assert "worst" in v, v
    assert v["left"] == 0, v
    assert v["worst"]["close"] < 5 and v["worst"]["call"] < 5, v
    assert v["worst"]["peer"] < 10, v


@needs_proc
def test_ctrl_c_while_threads_block():
    v = _child("ctrl_c", timeout=60)
    assert v["raised"] == "KeyboardInterrupt", v
    assert 0.2 < v["took"] < 1.5, v
    assert v["after"] == "InterruptedCollectiveError", v
    assert v["left"] == 0, v


@pytest.mark.parametrize("mode", MODES)
def test_collectives_over_processes(ranks, mode):
    """Three and two ranks as processes, the rank programs' checks."""
    from conftest import check_gathers
    from test_collectives import check

    env = {"THUNDERLINK_TRANSPORT": "tcp", "THUNDERLINK_TCP_THREADS": mode}
    big = (16 << 20) // 4
    for n in (2, 3):
        cases = [["sum", "float32", big, ip] for ip in (False, True)]
        cases += [["max", "bfloat16", 1000003, False], ["sum", "float64", (1 << 18) + 1, True]]
        check(ranks(n, "reductions", cases, env=env, timeout=180), n)
        cases = [[k, "float32", (1 << 21) + 3 * n, ip] for k in ("all_gather", "broadcast")
                 for ip in (False, True)] + [["reduce_scatter", "float32", 1 << 21, False]]
        check_gathers(ranks(n, "gathers", cases, env=env, timeout=180), n)


def test_large_frames_that_differ_are_a_mismatch(ranks):
    """A header that differs reaches a thread first; the error is the same."""
    env = {"THUNDERLINK_TRANSPORT": "tcp", "THUNDERLINK_TCP_THREADS": "on",
           "THUNDERLINK_TCP_THREADS_MIN_BYTES": "1M"}  # the case is 4 MiB
    r = ranks(2, "mismatch", "large_size", env=env)
    assert r.status == 0, r.all_text()
    values = r.results()
    assert all(v["raised"] in ("MismatchError", "PeerLostError") for v in values), values
    assert any(v["raised"] == "MismatchError" for v in values), values


def test_peer_killed_mid_transfer_is_an_error_within_two_seconds(tmp_path):
    """SIGKILL in the middle of 16 MiB all_sums while the other ranks' I/O
    threads are blocked on their sockets: PeerLostError naming it, fast."""
    sigkill_mid_collective(tmp_path, {"THUNDERLINK_TRANSPORT": "tcp", "THUNDERLINK_TCP_THREADS": "on"})


if __name__ == "__main__":
    faulthandler = __import__("faulthandler")
    faulthandler.enable()
    name, *rest = sys.argv[1:]
    fn = globals()[f"prog_{name}"]
    fn(*[int(a) if a.isdigit() else a for a in rest])
