"""Rank programs for tests/test_hung.py (python hungprogs.py FUNC JSON_ARGS).

Each prints ``RESULT <json>`` when it has something to report; the test
reads it (conftest.result_of).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np

import thunderlink

from progmain import emit, run, threads_named  # noqa: E402  (tests/ is on sys.path)


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def heartbeat_threads() -> int:
    """The core's heartbeat threads (other threads come and go with a
    transport: softverbs runs one per queue pair)."""
    return threads_named("tl-heartbeat")


def stop_mid_job(stopper: int, size_bytes: int):
    """Collectives until rank `stopper` stops itself (SIGSTOP) between two of
    them; the others report how their next collective failed, and how long
    it waited. The stopped rank, once continued (SIGCONT), reports what its
    next call says."""
    comm = thunderlink.connect()
    x = np.ones(max(1, size_bytes // 4), np.float32)
    for _ in range(3):
        comm.all_sum(x, x)
    comm.barrier()
    if comm.rank == stopper:
        print(f"STOPPING {os.getpid()}", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
        # Continued: the job went on without this rank.
    t = time.monotonic()
    try:
        for _ in range(1000):
            t = time.monotonic()
            comm.all_sum(x, x)
        emit({"raised": None})
    except thunderlink.ThunderlinkError as e:
        emit({"raised": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t})


def busy_then_join(busy_rank: int, seconds: float, how: str):
    """Rank `busy_rank` computes for `seconds` before joining an all_sum
    that the others are already waiting in; everyone must get the sum."""
    comm = thunderlink.connect()
    comm.barrier()
    if comm.rank == busy_rank:
        end = time.monotonic() + seconds
        if how == "sleep":
            time.sleep(seconds)
        elif how == "python":  # holds the GIL throughout
            n = 0
            while time.monotonic() < end:
                n += 1
        else:  # numpy, in large calls
            a = np.random.default_rng(0).standard_normal((300, 300))
            while time.monotonic() < end:
                a = np.tanh(a @ a) 
    t = time.monotonic()
    x = np.full(1000, comm.rank + 1, np.float32)
    try:
        comm.all_sum(x, x)
        ok = bool((x == comm.size * (comm.size + 1) / 2).all())
        emit({"raised": None, "ok": ok, "waited": time.monotonic() - t})
    except thunderlink.ThunderlinkError as e:
        emit({"raised": type(e).__name__, "message": str(e), "waited": time.monotonic() - t})


def churn(times: int):
    """Communicators made and closed `times` times (split children of one
    parent, three alive at once at times), counting this process's threads
    and, among them, heartbeat threads."""
    import gc

    base = threads()
    comm = thunderlink.connect()
    with_one = heartbeat_threads()
    kids = []
    most = with_one
    for i in range(times):
        kid = comm.split(0)
        kid.all_sum(np.ones(4, np.float32))
        kids.append(kid)
        most = max(most, heartbeat_threads())
        if len(kids) == 3 or i == times - 1:
            for k in kids:
                k.close()
            kids = []
    after_kids = heartbeat_threads()
    comm.close()
    gc.collect()
    time.sleep(0.2)
    emit({"base": base, "with_one": with_one, "most": most, "after_kids": after_kids,
          "after_all": threads(), "heartbeats_after_all": heartbeat_threads()})


def loop_until_error(_):
    """all_sum of 1 MiB over and over until one fails; when it failed."""
    comm = thunderlink.connect()
    x = np.ones(1 << 18, np.float32)
    comm.all_sum(x, x)
    print("ready", flush=True)
    try:
        for _ in range(10 ** 7):
            comm.all_sum(x, x)
            x.fill(1)
        emit({"raised": None})
    except thunderlink.ThunderlinkError as e:
        emit({"raised": type(e).__name__, "message": str(e), "at": time.time()})


def numpy_interrupted(hung_rank: int):
    """The numpy API on the main thread: rank `hung_rank` never joins the
    all_sum the others wait in; the test sends them SIGINT."""
    comm = thunderlink.connect()
    comm.barrier()
    if comm.rank == hung_rank:
        print("HANGING", flush=True)
        time.sleep(600)
        return
    print("WAITING", flush=True)
    try:
        comm.all_sum(np.ones(1 << 16, np.float32))
        raised = None
    except BaseException as e:
        raised = type(e).__name__
    when = time.time()
    try:
        comm.barrier()
        after = None
    except BaseException as e:
        after = [type(e).__name__, str(e)]
    emit({"raised": raised, "now": when, "after": after})


def fork_then_collective(_):
    """A process with a communicator (and so a heartbeat thread) forks; the
    child closes its copy and exits; the parent's job goes on."""
    comm = thunderlink.connect()
    comm.barrier()
    pid = os.fork()
    if pid == 0:
        t = time.monotonic()
        comm.close()
        os._exit(0 if time.monotonic() - t < 5 else 3)
    _, status = os.waitpid(pid, 0)
    time.sleep(0.5)
    x = np.full(8, comm.rank + 1.0, np.float32)
    comm.all_sum(x, x)
    emit({"child": os.waitstatus_to_exitcode(status), "sum": float(x[0])})


def mlx_interrupted(hung_rank: int, handler: str):
    """Rank `hung_rank` joins the group and then never calls the collective
    (it sleeps: alive, but hung as far as the job goes). The others evaluate
    an all_sum and wait; the test sends them SIGINT. They report what
    mx.eval raised, how long after the signal, and what a later collective
    on the group says. handler: "default" (KeyboardInterrupt), or "own" (the
    program's own Python handler, which only records the signal)."""
    import mlx.core as mx

    g = thunderlink.init()
    mx.eval(mx.distributed.all_sum(mx.ones(4), group=g))
    if g.rank() == hung_rank:
        print("HANGING", flush=True)
        time.sleep(600)
        return
    got = []
    if handler == "own":
        signal.signal(signal.SIGINT, lambda s, f: got.append(time.monotonic()))
    x = mx.distributed.all_sum(mx.ones(1 << 16), group=g)
    print("WAITING", flush=True)
    t = time.monotonic()
    try:
        mx.eval(x)
        raised, message = None, ""
    except BaseException as e:  # KeyboardInterrupt or RuntimeError
        raised, message = type(e).__name__, str(e)
    when = time.monotonic()
    if handler == "own":
        # The program's handler ran (Python runs it at the next bytecode).
        time.sleep(0.1)
    after = None
    t2 = time.monotonic()
    try:
        mx.eval(mx.distributed.all_sum(mx.ones(4), group=g))
    except BaseException as e:
        after = [type(e).__name__, str(e), time.monotonic() - t2]
    emit({"raised": raised, "message": message, "waited": when - t, "now": time.time(),
          "handler_ran": bool(got), "after": after})


if __name__ == "__main__":
    run(globals())
