"""--plot: bus bandwidth and latency against size, one line per series."""

from __future__ import annotations

from .report import series_name

__all__ = ["plot", "size_label"]


def size_label(nbytes: float, _pos=None) -> str:
    """Axis label of a byte count: 256 -> '256 B', 2**18 -> '256 KiB', 2**26 -> '64 MiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(nbytes) >= 1024 and i < len(units) - 1:
        nbytes /= 1024
        i += 1
    return f"{nbytes:g} {units[i]}"


def plot(results, s, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.ticker
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("thunderlink bench: --plot needs matplotlib: pip install 'thunderlink[plot]'") from None
    keys = []
    for m in results:
        k = (m.backend, m.inplace)
        if k not in keys:
            keys.append(k)
    variants = {}
    for b, v in keys:
        variants.setdefault(b, []).append(v)
    fig, (bw, lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    for b, v in keys:
        ms = [m for m in results if m.backend == b and m.inplace == v and m.supported]
        if not ms:
            continue
        label = series_name(b, v, variants[b])
        bw.plot([m.size for m in ms], [m.busbw for m in ms], marker="o", ms=3, label=label)
        lat.plot([m.size for m in ms], [m.p50_us for m in ms], marker="o", ms=3, label=label)
    n = results[0].ranks if results else 0
    for ax, title, unit in ((bw, "bus bandwidth", "GB/s"), (lat, "latency (p50)", "us")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(size_label))
        ax.set_xlabel("size")
        ax.set_ylabel(unit)
        ax.set_title(f"{s.op} {s.dtype}, {n} ranks: {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    lat.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
