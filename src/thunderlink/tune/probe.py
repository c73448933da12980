"""thunderlink probe: measure every cable of a job.

For every pair of ranks that share a link: bandwidth one way and both ways
with 1, 2 and 4 connections per cable, latency (round trip, p50 and p99);
where a pair has several cables, each cable alone. Then checks: a cable far
below its peers or below its stated ``rate``, and the two ends of a cable
with different MTUs, each with the fix. A matrix in the terminal,
``--json PATH``, ``--plot PNG`` (the topology, each cable labelled by its
measured rate; needs thunderlink[plot]).

Runs like ``thunderlink bench``: ``-n N`` starts N ranks on this host;
``--hostfile H`` one rank per entry; inside a job started by ``thunderlink
launch`` it is one rank of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from ..config import parse_size
from .session import Session

__all__ = ["main", "probe", "check", "Report"]

CONNS = (1, 2, 4)
SLOW_VS_PEERS = 0.6  # a cable below this fraction of the median cable is flagged
SLOW_VS_RATE = 0.7  # ... or below this fraction of its stated rate


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e9


def _exchange_json(comm, value, cap: int = 16384) -> list:
    """Every rank's JSON value (all_gather of a fixed-size buffer)."""
    raw = json.dumps(value).encode()
    if len(raw) > cap:
        raise ValueError("probe: description too large to exchange")
    buf = np.zeros(cap, np.uint8)
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.empty(cap * comm.size, np.uint8)
    comm.all_gather(buf, out)
    return [json.loads(bytes(out[r * cap:(r + 1) * cap]).rstrip(b"\0")) for r in range(comm.size)]


def _local_mtus(s: Session) -> dict:
    """This rank's addresses: index -> [interface, MTU] (None where unknown)."""
    from ..hosts.interfaces import interface_of, list_interfaces

    try:
        its = list_interfaces()
    except Exception:  # noqa: BLE001 - no interface list: nothing to compare
        its = []
    mtu = {i.name: i.mtu for i in its}
    out = {}
    for i, a in enumerate(s.hostfile.ranks[s.rank].addresses):
        name = a.iface or interface_of(a.ip, its)
        out[str(i)] = [name, mtu.get(name) if name else None]
    return out


def _pair_comm(comm, a: int, b: int):
    """A communicator of ranks a and b (a first); None on the others."""
    me = comm.rank
    return comm.split(0 if me in (a, b) else -1, 0 if me == a else 1)


def _one_way(sub, nbytes: int, repeat: int) -> float:
    """Gbit/s from rank 0 to rank 1 of sub (both ranks return it)."""
    x = np.ones(max(1, nbytes // 4), np.float32)
    ack = np.zeros(1, np.float64)
    # One message untimed: connections opened or idle start slowly (TCP's
    # slow start, again after an idle spell).
    if sub.rank == 0:
        sub.send(x[: max(1, x.size // 4)], 1)
    else:
        sub.recv(x[: max(1, x.size // 4)], 0)
    sub.barrier()
    t0 = time.perf_counter()
    for _ in range(repeat):
        if sub.rank == 0:
            sub.send(x, 1)
        else:
            sub.recv(x, 0)
    if sub.rank == 0:
        sub.recv(ack, 1)
        ack[0] = time.perf_counter() - t0
        sub.send(ack, 1)
    else:
        sub.send(ack, 0)
        sub.recv(ack, 0)
    return _gbps(x.nbytes * repeat, float(ack[0]))


def _both_ways(sub, nbytes: int, repeat: int) -> float:
    """Gbit/s in each direction at once (an all_gather of 2 ranks)."""
    x = np.ones(max(1, nbytes // 4), np.float32)
    out = np.empty(2 * x.size, np.float32)
    sub.all_gather(x[: max(1, x.size // 4)], out[: 2 * max(1, x.size // 4)])  # untimed, as in _one_way
    sub.barrier()
    t0 = time.perf_counter()
    for _ in range(repeat):
        sub.all_gather(x, out)
    t = np.array([time.perf_counter() - t0])
    sub.all_reduce(t, t, "max")
    return _gbps(x.nbytes * repeat, float(t[0]))


def _latency(sub, iters: int) -> tuple[float, float]:
    """Round trip of a 4-byte message, microseconds: p50, p99."""
    x = np.zeros(1, np.float32)
    times = []
    sub.barrier()
    for _ in range(iters):
        t0 = time.perf_counter()
        if sub.rank == 0:
            sub.send(x, 1)
            sub.recv(x, 1)
        else:
            sub.recv(x, 0)
            sub.send(x, 0)
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.99))]


def _pairs(s: Session) -> list[tuple[int, int, object]]:
    out = []
    for a in range(s.size):
        for b in range(a + 1, s.size):
            link = s.hostfile.link(a, b)
            if link is not None:
                out.append((a, b, link))
    return out


def _cable_rates(s: Session, k: int) -> dict:
    """Weights that send (almost) everything of every pair over its cable k."""
    rates = {}
    for a, b, link in _pairs(s):
        if len(link.cables) <= k:
            continue
        for j, (idx, _) in enumerate(link.cables):
            rates[(link.acceptor, idx)] = 1000.0 if j == k else 1e-3
    return rates


def probe(s: Session, nbytes: int = 16 << 20, repeat: int = 2, conns=CONNS, latency_iters: int = 200,
          progress=None) -> dict | None:
    """Measure; every rank calls it; rank 0 gets the report (others None)."""
    pairs = _pairs(s)
    base = s.connect({"conns_per_peer": 1})
    mtus = _exchange_json(base, _local_mtus(s))
    report = {"ranks": s.size, "bytes": nbytes, "pairs": [], "flags": []}
    entries = {}
    for a, b, link in pairs:
        cables = []
        for k, (idx, addr) in enumerate(link.cables):
            src = link.sources[k]
            ends = {str(link.acceptor): [addr.ip] + mtus[link.acceptor][str(idx)]}
            if src is not None:
                ends[str(link.dialer)] = [src[1].ip] + mtus[link.dialer][str(src[0])]
            cables.append({"ends": ends, "rate_gbps": addr.rate or (src[1].rate if src else None)})
        entries[(a, b)] = {"pair": [a, b], "cables": cables, "oneway_gbps": {}, "bothways_gbps": {}}
    steps = len(conns) * len(pairs) + (len(pairs) if any(len(l.cables) > 1 for *_, l in pairs) else 0)
    done = 0
    for c in conns:
        comm = base if c == 1 else s.connect({"conns_per_peer": c})
        for a, b, _ in pairs:
            sub = _pair_comm(comm, a, b)
            if sub is not None:
                e = entries[(a, b)]
                e["oneway_gbps"][str(c)] = _one_way(sub, nbytes, repeat)
                e["bothways_gbps"][str(c)] = _both_ways(sub, nbytes, repeat)
                if c == conns[0]:
                    p50, p99 = _latency(sub, latency_iters)
                    e["latency_us"] = {"p50": p50, "p99": p99}
                sub.close()
            comm.barrier()
            done += 1
            if progress:
                progress(done, steps, f"{c} conn: {a}<->{b}")
        if comm is not base:
            comm.close()
    kmax = max((len(l.cables) for *_, l in pairs), default=1)
    for k in range(kmax if kmax > 1 else 0):
        comm = s.connect({"conns_per_peer": 2}, rates=_cable_rates(s, k))
        for a, b, link in pairs:
            sub = _pair_comm(comm, a, b) if len(link.cables) > k else None
            if len(link.cables) > k and sub is not None:
                # The best of two: a cable's rate is what it can do (a busy
                # host only ever makes it look slower).
                entries[(a, b)]["cables"][k]["oneway_gbps"] = max(_one_way(sub, nbytes, repeat) for _ in range(2))
            if sub is not None:
                sub.close()
            comm.barrier()
        comm.close()
    # Rank 0 collects what each pair's first rank measured.
    mine = [entries[(a, b)] for a, b, _ in pairs if s.rank == a]
    everyone = _exchange_json(base, mine, cap=1 << 16)
    base.close()
    if s.rank != 0:
        return None
    for part in everyone:
        report["pairs"].extend(part)
    report["pairs"].sort(key=lambda e: e["pair"])
    for e in report["pairs"]:
        best = max(e["oneway_gbps"].values())
        if len(e["cables"]) == 1:
            e["cables"][0]["oneway_gbps"] = best
    report["flags"] = check(report)
    return report


def check(report: dict) -> list[str]:
    """Problems in a report, each with its fix: a cable far below the others
    or below its stated rate, the two ends of a cable with different MTUs."""
    flags = []
    measured = [c["oneway_gbps"] for e in report["pairs"] for c in e["cables"] if c.get("oneway_gbps")]
    median = statistics.median(measured) if measured else 0
    for e in report["pairs"]:
        a, b = e["pair"]
        for k, c in enumerate(e["cables"]):
            name = f"cable {k} of ranks {a}<->{b}" if len(e["cables"]) > 1 else f"the cable of ranks {a}<->{b}"
            got = c.get("oneway_gbps")
            if got and len(measured) >= 3 and got < SLOW_VS_PEERS * median:
                flags.append(f"SLOW: {name} moves {got:.2f} Gbit/s, {got / median:.0%} of the median cable "
                             f"({median:.2f}): check it is the cable you think (Thunderbolt 4/5 rated, not USB-C "
                             f"charging), reseat it, or try another port; note its rate in the hostfile so "
                             f"striping and tuning account for it")
            elif got and c.get("rate_gbps") and got < SLOW_VS_RATE * c["rate_gbps"]:
                flags.append(f"SLOW: {name} moves {got:.2f} Gbit/s, {got / c['rate_gbps']:.0%} of its stated "
                             f"rate {c['rate_gbps']:g} Gbit/s: check the cable and port, or correct `rate` in "
                             f"the hostfile")
            ends = c["ends"]
            mtu = {r: v[2] for r, v in ends.items() if v[2]}
            if len(set(mtu.values())) > 1:
                desc = ", ".join(f"rank {r}'s {ends[r][1]} ({ends[r][0]}) has {m}" for r, m in sorted(mtu.items()))
                top = max(mtu.values())
                flags.append(f"MTU MISMATCH on {name}: {desc}: set both ends to the same MTU, e.g. {top} "
                             f"(Linux: `ip link set dev IFACE mtu {top}`; macOS: `sudo ifconfig IFACE mtu {top}`, "
                             f"or networksetup -setMTU for the Thunderbolt Bridge); a mismatch drops large "
                             f"frames or caps the segment size")
    return flags


def render(report: dict) -> str:
    conns = sorted({int(c) for e in report["pairs"] for c in e["oneway_gbps"]})
    head = (["pair", "cable", "rate"] + [f"1way x{c}" for c in conns] + [f"2way x{c}" for c in conns]
            + ["lat p50", "lat p99", "MTU"])
    rows = []
    for e in report["pairs"]:
        a, b = e["pair"]
        for k, c in enumerate(e["cables"]):
            mtu = "/".join(str(v[2]) for _, v in sorted(c["ends"].items()))
            first = k == 0
            rows.append(
                [f"{a}<->{b}" if first else "", str(k) if len(e["cables"]) > 1 else "",
                 f"{c['oneway_gbps']:.2f}" if c.get("oneway_gbps") else "-"]
                + ([f"{e['oneway_gbps'][str(x)]:.2f}" for x in conns] if first else [""] * len(conns))
                + ([f"{e['bothways_gbps'][str(x)]:.2f}" for x in conns] if first else [""] * len(conns))
                + ([f"{e['latency_us']['p50']:.0f}us", f"{e['latency_us']['p99']:.0f}us"] if first else ["", ""])
                + [mtu])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)] if rows else [len(h) for h in head]
    lines = ["# thunderlink probe: Gbit/s (one way; both ways, each direction), round trip latency",
             "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines += [f"! {f}" for f in report["flags"]] or ["no problems found"]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """The topology: ranks on a circle, each cable labelled by its rate."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = report["ranks"]
    pos = {r: (math.cos(2 * math.pi * r / n), math.sin(2 * math.pi * r / n)) for r in range(n)}
    fig, ax = plt.subplots(figsize=(6, 6))
    flagged = " ".join(report["flags"])
    for e in report["pairs"]:
        a, b = e["pair"]
        m = len(e["cables"])
        for k, c in enumerate(e["cables"]):
            off = (k - (m - 1) / 2) * 0.08
            (xa, ya), (xb, yb) = pos[a], pos[b]
            dx, dy = yb - ya, xa - xb
            norm = math.hypot(dx, dy) or 1
            ox, oy = dx / norm * off, dy / norm * off
            slow = f"ranks {a}<->{b}" in flagged
            ax.plot([xa + ox, xb + ox], [ya + oy, yb + oy], color="red" if slow else "tab:blue", lw=2)
            rate = c.get("oneway_gbps")
            ax.text((xa + xb) / 2 + ox, (ya + yb) / 2 + oy, f"{rate:.2f} Gbit/s" if rate else "?",
                    ha="center", va="center", fontsize=8, bbox={"fc": "white", "ec": "none", "pad": 1})
    for r, (x, y) in pos.items():
        ax.scatter([x], [y], s=600, color="white", edgecolors="black", zorder=3)
        ax.text(x, y, str(r), ha="center", va="center", zorder=4)
    ax.set_axis_off()
    ax.set_title("thunderlink probe: measured rate of each cable (one way)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="thunderlink probe", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--ranks", type=int, default=None, help="local ranks to start (default 2)")
    ap.add_argument("--hostfile", help="run one rank per hostfile entry instead of locally")
    ap.add_argument("--bytes", default="16M", help="message size of the bandwidth runs (default 16M)")
    ap.add_argument("--repeat", type=int, default=2, help="messages per bandwidth run (default 2)")
    ap.add_argument("--conns", default="1,2,4", help="connections per cable to try (default 1,2,4)")
    ap.add_argument("--latency-iters", type=int, default=200, help="round trips timed (default 200)")
    ap.add_argument("--json", dest="json_path", metavar="PATH", help="also write the report as JSON")
    ap.add_argument("--plot", dest="plot_path", metavar="PNG", help="draw the topology (needs thunderlink[plot])")
    ap.add_argument("--timeout", type=float, default=None, help="stop the job after this many seconds")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    nbytes = parse_size(args.bytes, "--bytes")
    conns = tuple(int(c) for c in args.conns.split(","))
    if args.plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("thunderlink probe: --plot needs matplotlib: pip install 'thunderlink[plot]'") from None
    from ..config import from_env

    if not (args.worker or from_env().configured):
        if args.hostfile and args.ranks is not None:
            ap.error("give -n N or --hostfile FILE, not both")
        from ._run import launch_workers

        return launch_workers("probe", "thunderlink.tune.probe", argv, args.ranks, args.hostfile, args.timeout)
    s = Session()

    def progress(i, n, what):
        if s.rank == 0:
            print(f"# probe {i}/{n}: {what}", file=sys.stderr, flush=True)

    try:
        report = probe(s, nbytes, args.repeat, conns, args.latency_iters, progress)
    finally:
        s.close()
    if report is None:
        return 0
    print(render(report), flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot_path:
        plot(report, args.plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
