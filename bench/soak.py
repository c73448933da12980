"""Soak: thousands of random collectives across local ranks, every result
checked, and the ranks' open descriptors, threads and memory watched.

    python bench/soak.py                      # 10,000 operations, 4 ranks (README figures)
    python bench/soak.py --ops 300 --max-bytes 1M --every 100   # the CI form

Every rank draws the same sequence of operations from the seed: all_sum,
all_max, all_min, all_gather, reduce_scatter, broadcast (random root),
send/recv round the ring, barrier; sizes log-uniform from 1 element to
--max-bytes; one of nine dtypes; in place or not; and now and then a split
into two halves that run a few operations of their own and close. Inputs are
small integers derived from (seed, operation, rank), so every rank knows
every other rank's input and checks its result exactly, in every dtype.

Each rank samples its descriptors, threads and resident memory (after
handing freed heap back to the system: malloc_trim) every --every operations (after the first: the allocator and the core's scratch
buffer have reached their size by then). The verdict fails, and the script
exits 1, on any wrong result, any failed rank, or when from the first sample
to the last a rank's descriptors or threads grow at all or its memory grows
by more than --rss-slack.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time

import numpy as np

DTYPES = ["uint8", "int8", "uint16", "int32", "int64", "float16", "bfloat16", "float32", "float64"]
OPS = ["all_sum", "all_max", "all_min", "all_gather", "reduce_scatter", "broadcast", "sendrecv", "barrier"]


def _size(text: str) -> int:
    from thunderlink.config import parse_size

    return parse_size(text, "--max-bytes")


def _trim() -> None:
    """Hand freed heap back to the system (glibc), so that resident memory
    shows what is live rather than what the allocator keeps for reuse."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def usage() -> dict:
    import psutil

    _trim()
    p = psutil.Process()
    return {"fds": len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else p.num_fds(),
            "threads": p.num_threads(), "rss": p.memory_info().rss}


def storage(dtype: str):
    return np.uint16 if dtype == "bfloat16" else np.dtype(dtype)


def values(seed: int, i: int, rank: int, count: int, dtype: str) -> np.ndarray:
    """Rank ``rank``'s input to operation i: integers 0..15, exact in every
    dtype and in every sum of up to 16 ranks."""
    v = (np.arange(count, dtype=np.int64) * (2 * rank + 1) + (seed + 7 * i + rank)) % 16
    if dtype == "bfloat16":
        return (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return v.astype(dtype)


def as_int(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.int64)
    return a.astype(np.int64)


def one_op(comm, rng: random.Random, seed: int, i: int, max_bytes: int) -> str | None:
    """Run operation i on comm and check it; None when right, else what is wrong."""
    rank, n = comm.rank, comm.size
    op = rng.choice(OPS)
    dtype = rng.choice(DTYPES)
    item = np.dtype(storage(dtype)).itemsize
    count = max(1, int(math.exp(rng.uniform(0, math.log(max_bytes // item)))))
    in_place = rng.random() < 0.5
    root = rng.randrange(n)
    kw = {"dtype": "bfloat16"} if dtype == "bfloat16" else {}
    what = f"op {i}: {op} of {count} x {dtype}{' in place' if in_place else ''} on {n} ranks"
    if op == "barrier":
        comm.barrier()
        return None
    if op == "sendrecv" and n == 1:  # a split child alone: no one to send to
        return None
    if op == "reduce_scatter":
        count = max(n, count - count % n)
    x = values(seed, i, rank, count, dtype)
    ins = [x if r == rank else values(seed, i, r, count, dtype) for r in range(n)] if op != "sendrecv" else None
    if op in ("all_sum", "all_max", "all_min"):
        red = op[4:]
        want = {"sum": np.sum, "max": np.max, "min": np.min}[red](np.stack([as_int(a, dtype) for a in ins]), axis=0)
        got = comm.all_reduce(x, x if in_place else None, red, **kw)
        ok = np.array_equal(as_int(got, dtype), want)
    elif op == "all_gather":
        got = comm.all_gather(x, **kw)
        ok = np.array_equal(got, np.concatenate(ins))
    elif op == "reduce_scatter":
        got = comm.reduce_scatter(x, None, "sum", **kw)
        b = count // n
        ok = np.array_equal(as_int(got, dtype), sum(as_int(a, dtype) for a in ins)[rank * b:(rank + 1) * b])
    elif op == "broadcast":
        comm.broadcast(x, root, **kw)
        ok = np.array_equal(x, ins[root])
    else:  # sendrecv: each rank sends to the next; even ranks send first
        right, left = (rank + 1) % n, (rank - 1) % n
        got = np.empty_like(x)
        if rank % 2 == 0:
            comm.send(x, right, **kw)
            comm.recv(got, left, **kw)
        else:
            comm.recv(got, left, **kw)
            comm.send(x, right, **kw)
        ok = np.array_equal(got, values(seed, i, left, count, dtype))
    return None if ok else f"wrong result in {what}"


def rank_main(args) -> int:
    import thunderlink

    comm = thunderlink.connect()
    rng = random.Random(args.seed)
    ops = splits = 0
    first_error = None
    t0 = time.monotonic()
    for i in range(1, args.ops + 1):
        try:
            if rng.random() < args.split_rate:
                color = comm.rank % 2
                child = comm.split(color)
                sub = random.Random(args.seed * 1000003 + i)
                for j in range(3):
                    err = one_op(child, sub, args.seed, i * 10 + j, args.max_bytes)
                    first_error = first_error or err
                child.close()
                splits += 1
            err = one_op(comm, rng, args.seed, i, args.max_bytes)
        except thunderlink.ThunderlinkError as e:
            err = f"op {i}: {type(e).__name__}: {e}"
            print("RESULT " + json.dumps({"rank": comm.rank, "ops": ops, "error": err}), flush=True)
            return 1
        first_error = first_error or err
        ops += 1
        if i % args.every == 0:
            gc.collect()
            print("SAMPLE " + json.dumps(dict(usage(), rank=comm.rank, at=i, t=time.monotonic() - t0)), flush=True)
    print("RESULT " + json.dumps({"rank": comm.rank, "ops": ops, "splits": splits, "error": first_error,
                                  "seconds": time.monotonic() - t0, "stats": comm.stats()["calls"]}), flush=True)
    comm.close()
    return 0 if first_error is None else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=10000)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--max-bytes", type=_size, default=4 << 20)
    ap.add_argument("--every", type=int, default=1000, help="sample usage every this many operations")
    ap.add_argument("--split-rate", type=float, default=0.005, help="chance of a split before an operation")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--transport", default="auto")
    ap.add_argument("--rss-slack", type=_size, default=8 << 20,
                    help="memory growth allowed from the first sample to the last")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", help="write samples and results here")
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank_main:
        return rank_main(args)

    from thunderlink.launch import launch_local

    cmd = [sys.executable, os.path.abspath(__file__), "--rank-main", "--ops", str(args.ops),
           "--max-bytes", str(args.max_bytes), "--every", str(args.every), "--split-rate", str(args.split_rate),
           "--seed", str(args.seed)]
    env = dict(os.environ, THUNDERLINK_TRANSPORT=args.transport)
    t0 = time.monotonic()
    res = launch_local(args.ranks, cmd, env=env, timeout=args.timeout, capture=True, on_line=lambda *a: None)
    wall = time.monotonic() - t0
    samples = {r: [] for r in range(args.ranks)}
    results = {}
    for r, lines in enumerate(res.output):
        for line in lines:
            if line.startswith("SAMPLE "):
                samples[r].append(json.loads(line[7:]))
            elif line.startswith("RESULT "):
                results[r] = json.loads(line[7:])
    problems = []
    for r in range(args.ranks):
        v = results.get(r)
        if v is None:
            tail = "\n".join(res.output[r][-20:])
            problems.append(f"rank {r} printed no result (job status {res.status}):\n{tail}")
        elif v.get("error"):
            problems.append(f"rank {r}: {v['error']}")
    print(f"soak: {args.ops} operations on {args.ranks} ranks ({args.transport}), up to {args.max_bytes} B, "
          f"seed {args.seed}: {wall:.0f} s")
    print(f"{'ops':>6} " + " ".join(f"{'r%d fds thr  RSS MiB' % r:>20}" for r in range(args.ranks)))
    for k in range(max((len(s) for s in samples.values()), default=0)):
        row = []
        at = None
        for r in range(args.ranks):
            s = samples[r][k] if k < len(samples[r]) else None
            at = at or (s and s["at"])
            row.append(f"{s['fds']:>7} {s['threads']:>3} {s['rss'] / 2**20:>8.1f}" if s else f"{'-':>20}")
        print(f"{at or '?':>6} " + " ".join(f"{c:>20}" for c in row))
    for r in range(args.ranks):
        s = samples[r]
        if len(s) < 2:
            continue
        a, b = s[0], s[-1]
        if b["fds"] > a["fds"]:
            problems.append(f"rank {r}: open descriptors grew from {a['fds']} to {b['fds']}")
        if b["threads"] > a["threads"]:
            problems.append(f"rank {r}: threads grew from {a['threads']} to {b['threads']}")
        if b["rss"] - a["rss"] > args.rss_slack:
            problems.append(f"rank {r}: memory grew by {(b['rss'] - a['rss']) / 2**20:.1f} MiB "
                            f"(allowed {args.rss_slack / 2**20:.0f} MiB)")
    checked = sum(v.get("ops", 0) for v in results.values()) // max(1, args.ranks)
    splits = results.get(0, {}).get("splits", 0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "json"}, "wall_s": wall,
                       "samples": samples, "results": results, "problems": problems}, f, indent=1)
    if problems:
        print("verdict: FAIL")
        for p in problems:
            print("  " + p)
        return 1
    print(f"verdict: PASS: {checked} operations (and {3 * splits} more in {splits} splits) checked on every rank; "
          f"descriptors and threads flat, memory within {args.rss_slack / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
