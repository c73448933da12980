"""The benchmark's table, in the style of nccl-tests."""

from __future__ import annotations

import math
import platform
import socket
import time

__all__ = ["header", "row", "footer", "series_name"]

_COLS = f"{'time':>9} {'p50':>9} {'p99':>9} {'algbw':>6} {'busbw':>6} {'#wrong':>6} {'cpu':>4}"
_UNITS = f"{'(us)':>9} {'(us)':>9} {'(us)':>9} {'(GB/s)':>6} {'(GB/s)':>6} {'':>6} {'':>4}"
_WIDTH = len(_COLS) + 2


def series_name(backend: str, inplace: bool, variants) -> str:
    if len(variants) == 1 and backend != "thunderlink":
        return backend
    return f"{backend} {'in-place' if inplace else 'out-of-place'}"


def _short(backend: str, inplace: bool) -> str:
    if backend == "thunderlink":
        return "core-in" if inplace else "core"
    if backend == "thunderlink/mlx":
        return "mlx-group-in" if inplace else "mlx-group"
    return backend


# Peers the other series are compared with: (backend, column title).
_REFS = (("mlx-ring", "x ring"), ("gloo", "x gloo"), ("gloo-torch", "x gloo-torch"), ("gloo-lib", "x gloo-lib"))


def _ratio_names(series) -> list[tuple[str, str]]:
    """Columns "x ring", "x gloo": the peer's p50 time over each of our
    series' (the peer's series of the same variant, else its only one)."""
    names = [b.name for b, _ in series]
    refs = [r for r in _REFS if r[0] in names]
    return [(title, _short(b.name, v)) for _, title in refs for b, v in series
            if b.name not in [r for r, _ in _REFS]]


def _ratios(ms) -> list[float]:
    out = []
    for ref, _ in _REFS:
        peers = [m for m in ms if m.backend == ref]
        if not peers:
            continue
        for m in ms:
            if m.backend in [r for r, _ in _REFS]:
                continue
            p = next((q for q in peers if q.inplace == m.inplace), peers[0])
            out.append(p.p50_us / m.p50_us if (p.supported and m.supported and m.p50_us > 0) else float("nan"))
    return out


def header(out, s, n: int, series, links: dict | None = None, title: str = "thunderlink bench",
           notes=()) -> None:
    """The table's head. ``title`` names the program (bench/peers.py: "peers bench"),
    ``notes`` are lines printed under the first (a peer's description)."""
    out.write(f"# {title}: {s.op}, {n} ranks, {s.dtype}, on {socket.gethostname()} "
              f"({platform.system()} {platform.machine()}), {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    for note in notes:
        out.write(f"# {note}\n")
    if links:
        kinds: dict[str, list[int]] = {}
        for peer, (kind, _) in sorted(links.items()):
            kinds.setdefault(kind, []).append(peer)
        out.write("# rank 0's links: " + "; ".join(f"{k} to rank{'s' if len(p) > 1 else ''} "
                                                    f"{', '.join(map(str, p))}" for k, p in kinds.items()) + "\n")
    out.write(f"# warmup {s.warmup}, iterations {s.iters or 'auto'}, check {'on' if s.check else 'off'}; "
              f"time = mean over iterations of the slowest rank, p50/p99 likewise; busbw as in nccl-tests;\n"
              f"# cpu = CPU time of all ranks / (wall time x ranks) over the timed loop\n")
    groups = [series_name(b.name, v, b.variants) for b, v in series]
    ratios = _ratio_names(series)
    titles = [t for t in dict.fromkeys(t for t, _ in ratios)]
    if ratios:
        out.write("# x ring / x gloo = the peer's p50 time / this series' p50 time, of the same variant where "
                  "the peer has it (above 1: faster than the peer)\n")
    out.write("#" + " " * 34 + "".join(f"{g:^{_WIDTH}}" for g in groups)
              + "".join(f"  {t:<{14 * sum(1 for tt, _ in ratios if tt == t) - 2}}" for t in titles) + "\n")
    out.write(f"# {'size':>12} {'count':>12} {'type':>8}" + ("  " + _COLS) * len(groups)
              + "".join(f"  {r:>12}" for _, r in ratios) + "\n")
    out.write(f"# {'(B)':>12} {'(elements)':>12} {'':>8}" + ("  " + _UNITS) * len(groups) + "\n")
    out.flush()


def _cells(m) -> str:
    if not m.supported:
        return f"{'n/a':>9} {'':>9} {'':>9} {'':>6} {'':>6} {'':>6} {'':>4}"
    cpu = "" if math.isnan(m.cpu) else f"{m.cpu:.2f}"
    return (f"{m.time_us:>9.1f} {m.p50_us:>9.1f} {m.p99_us:>9.1f} {m.algbw:>6.2f} "
            f"{m.busbw:>6.2f} {m.wrong:>6} {cpu:>4}")


def row(out, ms) -> None:
    m0 = ms[0]
    line = f"  {m0.size:>12} {m0.count:>12} {m0.dtype:>8}"
    for m in ms:
        line += "  " + _cells(m)
    for r in _ratios(ms):
        line += f"  {'n/a' if math.isnan(r) else f'{r:.2f}':>12}"
    out.write(line + "\n")
    out.flush()


def footer(out, results, series) -> None:
    if not results:
        return
    for b, v in series:
        mine = [m for m in results if m.backend == b.name and m.inplace == v and m.supported]
        if mine:
            avg = sum(m.busbw for m in mine) / len(mine)
            out.write(f"# {series_name(b.name, v, b.variants)}: #wrong {sum(m.wrong for m in mine)}; "
                      f"avg bus bandwidth {avg:.3f} GB/s\n")
    for ref, _ in _REFS:
        peer = [m for m in results if m.backend == ref and m.supported and m.p50_us > 0]
        jumpy = sorted({m.size for m in peer if m.p99_us > 3 * m.p50_us})
        if jumpy:
            out.write(f"# {ref}: p99 above 3x p50 at {len(jumpy)} of {len({m.size for m in peer})} sizes: its "
                      f"calls vary this much, and its p50 varies from run to run by up to as much, alone as "
                      f"beside thunderlink; read its ratios as the medians of repeated runs (bench/median.py), "
                      f"and see `python bench/peers.py --peer {ref}` for it alone\n")
    wrong = sum(m.wrong for m in results)
    out.write(f"# {'OK' if wrong == 0 else 'WRONG RESULTS'}\n")
    out.flush()
