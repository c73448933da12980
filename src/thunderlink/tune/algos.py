"""Ring against mesh (or any algorithms) on the same cables, in one job,
interleaved: ``thunderlink launch --hostfile H -- python -m
thunderlink.tune.algos --sizes 64M,256M``. Rank 0 prints one line per size
and algorithm, and a JSON summary (``RESULT {...}``)."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import parse_size
from .session import Session, busbw, time_op


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m thunderlink.tune.algos", description=__doc__)
    ap.add_argument("--sizes", default="64M,256M", help="comma-separated sizes (default 64M,256M)")
    ap.add_argument("--algos", default="ring,mesh", help="algorithms to compare (default ring,mesh)")
    ap.add_argument("--op", default="all_sum", choices=("all_sum", "all_gather", "sum_scatter"))
    ap.add_argument("--iters", type=int, default=3, help="timed calls per size and round (default 3)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    algos = args.algos.split(",")
    s = Session()
    comms = {a: s.connect({"algo": a}) for a in algos}
    best = {(a, n): float("inf") for a in algos for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:
            for a in algos:
                best[(a, n)] = min(best[(a, n)], time_op(comms[a], args.op, n, iters=args.iters, warmup=1, groups=1))
    out = {}
    for n in sizes:
        row = {a: busbw(args.op, n, s.size, best[(a, n)]) / 1e9 for a in algos}
        out[str(n)] = row
        if s.rank == 0:
            text = "  ".join(f"{a} {row[a]:.3f} GB/s" for a in algos)
            ratio = f"  {algos[1]}/{algos[0]} {row[algos[1]] / row[algos[0]]:.2f}x" if len(algos) > 1 else ""
            print(f"{args.op} {n >> 20} MiB busbw: {text}{ratio}", flush=True)
    if s.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    for c in comms.values():
        c.close()
    s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
