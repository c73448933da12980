"""``thunderlink bench --profile P``: a tuning profile against the defaults,
side by side, in one job over the same cables, interleaved size by size.

Two communicators: one with the core's defaults, one with the profile's
options, rows and cable rates (as init would apply it). For each size the
busbw of both and their ratio."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from . import profile as pf
from .session import Session, busbw, time_op

__all__ = ["main"]

OPS = ("all_sum", "all_gather", "sum_scatter")


def build_parser() -> argparse.ArgumentParser:
    from ..bench.__main__ import _sizes_arg

    ap = argparse.ArgumentParser(prog="thunderlink bench --profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True, help="the tuning profile to compare with the defaults")
    ap.add_argument("-n", "--ranks", type=int, default=None)
    ap.add_argument("--hostfile")
    ap.add_argument("--op", default="all_sum", choices=OPS)
    ap.add_argument("--sizes", type=_sizes_arg, default="4K:64M:x4")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args, ignored = ap.parse_known_args(argv)
    try:
        prof = pf.load(args.profile)  # a bad profile stops here, before any rank starts
    except ConfigError as e:
        print(f"thunderlink bench: {str(e).removeprefix('[thunderlink] ')}", file=sys.stderr)
        return 2
    from ..config import from_env

    if not (args.worker or from_env().configured):
        if ignored:
            print(f"# thunderlink bench --profile: ignoring {' '.join(ignored)}", file=sys.stderr)
        from ._run import launch_workers

        kept = [a for a in argv if a not in ignored]
        return launch_workers("bench", "thunderlink.tune.compare", kept, args.ranks, args.hostfile, args.timeout)
    s = Session()
    try:
        cables = {}
        for c in prof.cables:
            for i, a in enumerate(s.hostfile.ranks[c["rank"]].addresses if c["rank"] < s.size else []):
                if a.ip == c["ip"]:
                    cables[(c["rank"], i)] = c["gbps"]
        default = s.connect({})
        tuned = s.connect(dict(prof.options), rates=cables or None, profile_rows=prof.c_rows())
        if s.rank == 0:
            print(f"# {args.op}, {s.size} ranks: busbw GB/s with the defaults and with {args.profile}")
            print(f"{'bytes':>12} {'default':>9} {'tuned':>9} {'tuned/default':>14}")
        for size in args.sizes:
            td = time_op(default, args.op, size, iters=args.iters, budget_s=1.0)
            tt = time_op(tuned, args.op, size, iters=args.iters, budget_s=1.0)
            if s.rank == 0:
                bd, bt = (busbw(args.op, size, s.size, t) / 1e9 for t in (td, tt))
                print(f"{size:>12} {bd:9.3f} {bt:9.3f} {bt / bd:14.2f}", flush=True)
        default.close()
        tuned.close()
    finally:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
