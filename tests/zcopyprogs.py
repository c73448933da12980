"""Rank programs of tests/test_rdma_zcopy.py (python zcopyprogs.py FUNC JSON_ARGS).

Each prints one line ``RESULT <json>``. Inputs come from rankprogs.data
(seeded by rank and size), so every rank knows every other rank's input.
"""

from __future__ import annotations

import os

import numpy as np

import thunderlink
from progmain import emit, run  # noqa: E402  (tests/ is on sys.path)
from rankprogs import data, digest, lossy_all_sums


def across(counts, zcopy_by_rank=None):
    """all_sum (out of place and in place), all_gather, reduce_scatter and a
    send/recv round between every ordered pair, of float32 `counts`; the
    digest of every result (every rank's, for the test to compare with
    another transport's run) and this rank's counters. zcopy_by_rank: each
    rank's THUNDERLINK_IBV_ZCOPY (ranks may differ)."""
    if zcopy_by_rank:
        os.environ["THUNDERLINK_IBV_ZCOPY"] = zcopy_by_rank[int(os.environ["THUNDERLINK_RANK"])]
    comm = thunderlink.connect()
    n, rank = comm.size, comm.rank
    out = {}
    for count in counts:
        x = data("float32", count, rank)
        out[f"sum/out/{count}"] = digest(comm.all_sum(x))
        y = data("float32", count, rank, 1)
        comm.all_sum(y, y)
        out[f"sum/in/{count}"] = digest(y)
        out[f"gather/{count}"] = digest(comm.all_gather(x))
        big = data("float32", count * n, rank, 2)
        out[f"scatter/{count}"] = digest(comm.reduce_scatter(big))
        for a in range(n):
            for b in range(n):
                if a == b:
                    continue
                if rank == a:
                    comm.send(data("float32", count, a, 3 + a * n + b), b)
                elif rank == b:
                    got = comm.recv(np.empty(count, np.float32), a)
                    out[f"p2p/{a}-{b}/{count}"] = digest(got)
                    if digest(got) != digest(data("float32", count, a, 3 + a * n + b)):
                        out[f"p2p/{a}-{b}/{count}"] += "-WRONG"
    comm.barrier()
    emit({"digests": out, "stats": comm.stats()})


def many_buffers(params):
    """From `nbuf` distinct input buffers into distinct outputs, `rounds`
    times: all_sum out of place, and reduce_scatter (whose ring also stages
    partial sums in scratch memory: three buffers per call); each result
    checked against the exact sum (small integers in float32: exact in any
    order)."""
    count, nbuf, rounds = params
    comm = thunderlink.connect()
    n, rank = comm.size, comm.rank
    ins = [np.full(count * n, rank * 10 + b, np.float32) for b in range(nbuf)]
    outs = [np.empty(count * n, np.float32) for _ in range(nbuf)]
    parts = [np.empty(count, np.float32) for _ in range(nbuf)]
    marks = (np.arange(count * n) % 7 == 0)
    wrong = []
    for r in range(rounds):
        for b in range(nbuf):
            ins[b][marks] += 1  # the data changes between calls
            want = sum(np.full(count * n, p * 10 + b, np.float32) for p in range(n)) + n * (r + 1) * marks
            comm.all_sum(ins[b], outs[b])
            if not np.array_equal(outs[b], want):
                wrong.append(["all_sum", r, b])
            comm.reduce_scatter(ins[b], parts[b])
            if not np.array_equal(parts[b], want[rank * count:(rank + 1) * count]):
                wrong.append(["reduce_scatter", r, b])
    emit({"wrong": wrong, "stats": comm.stats()})


def registered(params):
    """One buffer declared with register_memory, all_gather'd into and
    all_sum'd in place `iters` times: counters after the first call and
    after the last."""
    count, iters = params
    comm = thunderlink.connect()
    n, rank = comm.size, comm.rank
    x = np.empty(count * n, np.float32)
    # Not declared yet: each call registers what it uses, and lets it go.
    per_call = []
    for i in range(2):
        before = comm.stats()["rdma"]["mr_registered"]
        x[:] = rank
        comm.all_sum(x, x)
        per_call.append(comm.stats()["rdma"]["mr_registered"] - before)
    comm.register_memory(x)
    wrong = 0
    firsts = None
    for i in range(iters):
        x[:] = rank + i
        comm.all_sum(x, x)
        wrong += not np.array_equal(x, np.full(count * n, n * (n - 1) / 2 + n * i, np.float32))
        if firsts is None:
            firsts = comm.stats()["rdma"]
    comm.deregister_memory(x)
    try:
        comm.deregister_memory(x)
        again = None
    except thunderlink.ThunderlinkError as e:
        again = str(e)
    emit({"wrong": wrong, "first": firsts, "last": comm.stats()["rdma"], "again": again,
          "per_call": per_call})


def register_too_much(_):
    """register_memory where the device has no region left: an error naming
    the limit, on every rank; the communicator still works."""
    comm = thunderlink.connect()
    x = np.ones(1 << 20, np.float32)
    try:
        comm.register_memory(x)
        raised = None
    except thunderlink.ThunderlinkError as e:
        raised = [type(e).__name__, str(e)]
    y = comm.all_sum(x)
    emit({"raised": raised, "ok": bool(np.all(y == comm.size))})


def lossy(params):
    """rankprogs.lossy_all_sums out of place: the zero-copy path."""
    lossy_all_sums(list(params) + [False])


if __name__ == "__main__":
    run(globals())
