"""thunderlink tune: sweep the knobs on the live cluster, write a profile.

In one job, over the job's own cables: connections per cable (1, 2, 4),
cable weights (the hostfile's against rates measured cable by cable, where
two ranks share several cables), then for each size band the algorithm
(one round, ring, mesh where every pair has a link), chunk size and
pipeline depth. The best of each band becomes a row of the profile, the best
connections and weights its options and cables; then the profile is applied
to a fresh communicator and timed against the sweep's best and against the
defaults, band by band. The profile goes to --output (default: the path
every init reads, ~/.config/thunderlink/tuning.json).

Runs like ``thunderlink bench``: ``-n N`` locally, ``--hostfile H``, or as
one rank of a job started by ``thunderlink launch``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import numpy as np

from ..config import parse_size
from . import profile as pf
from .session import Session, busbw, time_op

__all__ = ["main", "tune", "bands"]

DEFAULT_SIZES = "16K,256K,4M,32M"


def bands(sizes: list[int]) -> list[tuple[int, int | None]]:
    """Size bands around each size, split at geometric midpoints: the first
    from 0, the last without end."""
    sizes = sorted(sizes)
    cuts = [int(math.sqrt(a * b)) for a, b in zip(sizes, sizes[1:])]
    lows = [0] + cuts
    highs = cuts + [None]
    return list(zip(lows, highs))


def _distinct(combos, op: str, size: int, n: int) -> list:
    """The combinations that run differently at this size: where a block is
    one chunk whatever the chunk size, chunk and depth change nothing, and
    timing the same plan several times only picks the luckiest sample."""
    from ..bindings import lib

    block = size // 4 // n if op != "all_gather" else size // 4
    seen, out = set(), []
    for algo, chunk, depth in combos:
        k = lib.tl_ring_nchunks(max(1, block), 4, chunk, depth)
        key = (algo, k, min(k, depth))
        if key not in seen:
            seen.add(key)
            out.append((algo, chunk, depth))
    return out


class _Progress:
    def __init__(self, total: int, show: bool):
        self.total, self.done, self.show = total, 0, show
        self.bar = None
        if show:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="tune", unit="run", file=sys.stderr)
            except ImportError:
                pass

    def step(self, what: str) -> None:
        self.done += 1
        if not self.show:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)
        else:
            print(f"# tune {self.done}/{self.total}: {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cable_weights(s: Session, nbytes: int) -> dict | None:
    """Measured rate of each cable, as hostfile rates {(rank, address index):
    Gbit/s}, where some pair shares several cables; None where none does."""
    from .probe import _cable_rates, _one_way, _pair_comm, _pairs

    pairs = _pairs(s)
    kmax = max((len(link.cables) for *_, link in pairs), default=1)
    if kmax < 2:
        return None
    rates = {}
    for k in range(kmax):
        comm = s.connect({"conns_per_peer": 2}, rates=_cable_rates(s, k))
        for a, b, link in pairs:
            sub = _pair_comm(comm, a, b) if len(link.cables) > k else None
            got = max(_one_way(sub, nbytes, 2) for _ in range(2)) if sub is not None else 0.0  # as probe does
            if sub is not None:
                sub.close()
            v = np.array([got if s.rank == a else 0.0])
            comm.all_reduce(v, v, "max")
            if len(link.cables) > k:
                rates[(link.acceptor, link.cables[k][0])] = max(float(v[0]), 1e-3)
        comm.close()
    return rates


def tune(s: Session, sizes: list[int], ops=("all_sum",), conns=(1, 2, 4), chunks=(128 << 10, 512 << 10, 2 << 20),
         depths=(2, 4), iters: int = 2, budget_s: float = 1.0, show: bool = True) -> tuple[pf.Profile, list[dict]]:
    """Sweep; every rank calls it and gets the same profile and table."""
    started = time.monotonic()
    probe_comm = s.connect({"conns_per_peer": 1})
    kinds = {t for t, _ in probe_comm.links().values()}
    probe_comm.close()
    # Rows key on the transport when every link of this rank has the same
    # (a job that mixes them gets rows for any).
    transport = next(iter(kinds)) if len(kinds) == 1 and next(iter(kinds)) in pf.TRANSPORTS else "any"
    mesh = all(s.hostfile.link(a, b) is not None for a in range(s.size) for b in range(a + 1, s.size))
    big = max(sizes)
    algos = ["ring"] + (["mesh"] if mesh and s.size >= 3 else [])
    combos = [(a, c, d) for a in algos for c in chunks for d in depths]
    small_algos = ["oneshot"] if mesh else []
    # 1. Cable weights: the hostfile's, or measured cable by cable.
    measured = _cable_weights(s, min(big, 8 << 20))
    weight_choices = [None] + ([measured] if measured else [])
    nsmall = sum(1 for x in sizes if x <= (1 << 20)) * len(small_algos)
    nsweep = sum(len(_distinct(combos, op, x, s.size)) for op in ops for x in sizes)
    nsteps = len(conns) * len(weight_choices) + nsweep + len(ops) * (nsmall + len(sizes))
    prog = _Progress(nsteps, show and s.rank == 0)
    # 2. Connections per cable and weights, on the largest all_sum.
    best_link, best_t = None, math.inf
    link_times = {}
    for c, w in itertools.product(conns, weight_choices):
        comm = s.connect({"conns_per_peer": c}, rates=w)
        t = time_op(comm, "all_sum", big, iters=iters, budget_s=budget_s)
        comm.close()
        link_times[(c, w is not None)] = t
        if t < best_t:
            best_link, best_t = (c, w), t
        prog.step(f"conns {c}{' measured weights' if w else ''}: {busbw('all_sum', big, s.size, t) / 1e9:.3f} GB/s")
    conns_best, weights = best_link
    # 3. Per operation and band: algorithm, chunk, depth.
    comms = {k: s.connect({"conns_per_peer": conns_best, "algo": k[0], "chunk_bytes": k[1], "pipeline_depth": k[2]},
                          rates=weights) for k in combos}
    for a in small_algos:
        comms[(a, None, None)] = s.connect({"conns_per_peer": conns_best, "algo": a}, rates=weights)
    rows, table = [], []
    for op in ops:
        for size, (lo, hi) in zip(sorted(sizes), bands(sizes)):
            cands = _distinct(combos, op, size, s.size) + (
                [(a, None, None) for a in small_algos] if size <= (1 << 20) else [])
            times = {}
            for k in cands:
                times[k] = time_op(comms[k], op, size, iters=iters, budget_s=budget_s)
                prog.step(f"{op} {size}: {k[0]} {k[1] or ''} {k[2] or ''}")
            best = min(times, key=times.get)
            row = pf.Row(op=op, ranks=s.size, transport=transport, min_bytes=lo, max_bytes=hi, algo=best[0])
            if best[1]:
                row.chunk_bytes, row.pipeline_depth = best[1], best[2]
            rows.append(row)
            table.append({"op": op, "bytes": size, "band": [lo, hi], "best": list(best), "best_s": times[best],
                          "sweep": {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in times.items()}})
    for c in comms.values():
        c.close()
    prof = pf.Profile(options={"conns_per_peer": conns_best}, rows=rows)
    if weights:
        prof.cables = [{"rank": r, "ip": s.hostfile.ranks[r].addresses[i].ip, "gbps": g}
                       for (r, i), g in sorted(weights.items())]
    # 4. The profile applied, against the sweep's best and the defaults.
    tuned = s.connect(dict(prof.options), rates=weights, profile_rows=prof.c_rows())
    default = s.connect({})
    for t in table:
        t["tuned_s"] = time_op(tuned, t["op"], t["bytes"], iters=iters, budget_s=budget_s)
        t["default_s"] = time_op(default, t["op"], t["bytes"], iters=iters, budget_s=budget_s)
        prog.step(f"check {t['op']} {t['bytes']}")
    tuned.close()
    default.close()
    prog.close()
    prof.measured = {"ranks": s.size, "transport": transport, "seconds": round(time.monotonic() - started, 1),
                     "conns": {f"{c}{'+weights' if w else ''}": round(busbw('all_sum', big, s.size, t) / 1e9, 4)
                               for (c, w), t in link_times.items()},
                     "bands": [{k: v for k, v in t.items() if k != "sweep"} for t in table]}
    return prof, table


def render(prof: pf.Profile, table: list[dict], n: int) -> str:
    lines = ["# thunderlink tune: busbw GB/s per size band (best of the sweep, the profile applied, the defaults)",
             f"{'op':>11} {'size':>10} {'band':>22} {'best':>24} {'sweep':>8} {'tuned':>8} {'default':>8} "
             f"{'tuned/best':>10} {'tuned/def':>9}"]
    for t in table:
        bw = {k: busbw(t["op"], t["bytes"], n, t[k]) / 1e9 for k in ("best_s", "tuned_s", "default_s")}
        lo, hi = t["band"]
        band = f"[{lo}, {hi if hi is not None else 'inf'})"
        best = "/".join(str(x) for x in t["best"] if x is not None)
        lines.append(f"{t['op']:>11} {t['bytes']:>10} {band:>22} {best:>24} {bw['best_s']:8.3f} {bw['tuned_s']:8.3f} "
                     f"{bw['default_s']:8.3f} {bw['tuned_s'] / bw['best_s']:10.2f} {bw['tuned_s'] / bw['default_s']:9.2f}")
    lines.append(f"# options: {prof.options}; {len(prof.rows)} rows"
                 + (f"; cable rates {[(c['rank'], c['ip'], round(c['gbps'], 3)) for c in prof.cables]}"
                    if prof.cables else "") + f"; {prof.measured.get('seconds')} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="thunderlink tune", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--ranks", type=int, default=None, help="local ranks to start (default 2)")
    ap.add_argument("--hostfile", help="run one rank per hostfile entry instead of locally")
    ap.add_argument("-o", "--output", default=None,
                    help=f"where to write the profile (default {pf.DEFAULT_PATH}, which every init reads)")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"one size per band (default {DEFAULT_SIZES})")
    ap.add_argument("--ops", default="all_sum", help="operations to tune: all_sum,all_gather,sum_scatter")
    ap.add_argument("--conns", default="1,2,4", help="connections per cable to try (default 1,2,4)")
    ap.add_argument("--chunks", default="128K,512K,2M", help="chunk sizes to try (default 128K,512K,2M)")
    ap.add_argument("--depths", default="2,4", help="pipeline depths to try (default 2,4)")
    ap.add_argument("--iters", type=int, default=1, help="timed calls per group at least (3 groups per point; default 1)")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds at most per point, roughly (default 1)")
    ap.add_argument("--timeout", type=float, default=None, help="stop the job after this many seconds")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    sizes = [parse_size(x, "--sizes") for x in args.sizes.split(",")]
    ops = tuple(o.strip() for o in args.ops.split(","))
    for o in ops:
        if o not in ("all_sum", "all_gather", "sum_scatter"):
            ap.error(f"--ops: {o!r} is not all_sum, all_gather or sum_scatter")
    from ..config import default_tuning_file, from_env

    if not (args.worker or from_env().configured):
        if args.hostfile and args.ranks is not None:
            ap.error("give -n N or --hostfile FILE, not both")
        from ._run import launch_workers

        return launch_workers("tune", "thunderlink.tune.tuner", argv, args.ranks, args.hostfile, args.timeout)
    s = Session()
    try:
        prof, table = tune(s, sizes, ops, tuple(int(c) for c in args.conns.split(",")),
                           tuple(parse_size(c, "--chunks") for c in args.chunks.split(",")),
                           tuple(int(d) for d in args.depths.split(",")), args.iters, args.budget)
    finally:
        s.close()
    if s.rank == 0:
        out = args.output or default_tuning_file()
        print(render(prof, table, s.size), flush=True)
        prof.dump(out)
        print(f"# wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
