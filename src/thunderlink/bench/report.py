"""The benchmark's table, in the style of nccl-tests."""

from __future__ import annotations

import platform
import socket
import time

__all__ = ["header", "row", "footer"]

_COLS = f"{'time':>9} {'p50':>9} {'p99':>9} {'algbw':>7} {'busbw':>7} {'#wrong':>6}"
_UNITS = f"{'(us)':>9} {'(us)':>9} {'(us)':>9} {'(GB/s)':>7} {'(GB/s)':>7} {'':>6}"


def header(out, s, n: int, backends: list[str], variants) -> None:
    out.write(f"# thunderlink bench: {s.op}, {n} ranks, {s.dtype}, on {socket.gethostname()} "
              f"({platform.system()} {platform.machine()}), {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    out.write(f"# warmup {s.warmup}, iterations {s.iters or 'auto'}, check {'on' if s.check else 'off'}; "
              f"time = mean over iterations of the slowest rank; busbw as in nccl-tests\n")
    groups = []
    for b in backends:
        for inplace in variants:
            groups.append(f"{b} {'in-place' if inplace else 'out-of-place'}")
    width = len(_COLS) + 2
    out.write("#" + " " * 34 + "".join(f"{g:^{width}}" for g in groups) + "\n")
    out.write(f"# {'size':>12} {'count':>12} {'type':>8}" + ("  " + _COLS) * len(groups) + "\n")
    out.write(f"# {'(B)':>12} {'(elements)':>12} {'':>8}" + ("  " + _UNITS) * len(groups) + "\n")
    out.flush()


def row(out, ms, variants, backends) -> None:
    m0 = ms[0]
    line = f"  {m0.size:>12} {m0.count:>12} {m0.dtype:>8}"
    for m in ms:
        line += (f"  {m.time_us:>9.1f} {m.p50_us:>9.1f} {m.p99_us:>9.1f} {m.algbw:>7.2f} "
                 f"{m.busbw:>7.2f} {m.wrong:>6}")
    out.write(line + "\n")
    out.flush()


def footer(out, results, backends) -> None:
    if not results:
        return
    wrong = sum(m.wrong for m in results)
    for b in backends:
        mine = [m for m in results if m.backend == b]
        if mine:
            avg = sum(m.busbw for m in mine) / len(mine)
            out.write(f"# {b}: out of bounds values: {sum(m.wrong for m in mine)}; avg bus bandwidth: {avg:.3f} GB/s\n")
    out.write(f"# {'OK' if wrong == 0 else 'WRONG RESULTS'}\n")
    out.flush()
