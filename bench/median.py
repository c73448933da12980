"""Median over repeated `thunderlink bench --json` runs, per series and size.

    python bench/median.py run1.json run2.json run3.json

Prints, per size, each series' median p50 time and median busbw, and the
ratio of MLX's ring p50 to each other series' (above 1: faster than the
ring), of the same variant: an in-place series against the ring in place
(Gloo, in place only, too), an out-of-place one against the ring out of
place; and Gloo's p50 to each thunderlink series' where Gloo ran. On a shared machine one sweep can hit a noisy moment at any size;
the median of a few interleaved sweeps is what BENCHMARKS.md reports.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def series(m: dict) -> str:
    if m["backend"] == "thunderlink":
        return "core-in" if m["inplace"] else "core"
    name = {"thunderlink/mlx": "mlx-group"}.get(m["backend"], m["backend"])
    return name + "-in" if m["inplace"] and m["backend"] != "gloo" else name


def main(paths: list[str]) -> int:
    runs = [json.load(open(p)) for p in paths]
    p50: dict = defaultdict(list)
    bw: dict = defaultdict(list)
    names: list[str] = []
    sizes: list[int] = []
    for run in runs:
        for m in run:
            if not m.get("supported", True) or m["p50_us"] is None:
                continue
            s, k = series(m), m["size"]
            if s not in names:
                names.append(s)
            if k not in sizes:
                sizes.append(k)
            p50[s, k].append(m["p50_us"])
            bw[s, k].append(m["busbw"])
    def ring_of(n: str) -> str:
        """The ring series a series is compared with: the same variant."""
        inplace = n.endswith("-in") or n.startswith("gloo")
        return "mlx-ring-in" if inplace and "mlx-ring-in" in names else "mlx-ring"

    rings = ("mlx-ring", "mlx-ring-in")
    ratios = [("x ring " + n, ring_of(n), n) for n in names if n not in rings and ring_of(n) in names]
    gloos = [n for n in names if n.startswith("gloo")]
    ratios += [(f"x {g} " + n, g, n) for g in gloos for n in names if n.startswith(("core", "mlx-group"))]
    print(f"# median of {len(runs)} runs: p50 time (us) / busbw (GB/s); x P S = P's p50 / S's p50 "
          "(above 1: S is faster), in place against in place where P has it")
    print(f"# {'size':>12}" + "".join(f"  {n + ' p50':>14} {'busbw':>6}" for n in names)
          + "".join(f"  {title:>16}" for title, _, _ in ratios))
    for k in sorted(sizes):
        line = f"  {k:>12}"
        for n in names:
            line += (f"  {statistics.median(p50[n, k]):>14.1f} {statistics.median(bw[n, k]):>6.2f}"
                     if p50[n, k] else f"  {'n/a':>14} {'':>6}")
        for _, ref, n in ratios:
            if p50[n, k] and p50[ref, k]:
                line += f"  {statistics.median(p50[ref, k]) / statistics.median(p50[n, k]):>16.2f}"
            else:
                line += f"  {'n/a':>16}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
