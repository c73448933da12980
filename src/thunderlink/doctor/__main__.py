"""thunderlink doctor: find set-up problems and print each with its fix.

    thunderlink doctor                          this host's interfaces (Thunderbolt marked)
    thunderlink doctor --hostfile H [--rank R]  the topology the core derives from the hostfile
                                                (ring, who listens for each link), and the
                                                hostfile checked against this host
    thunderlink doctor --hostfile H --all-netns every rank inside its network namespace
                                                (emulated clusters: thunderlink cluster up)

Exit status: 0 no problems, 1 problems found, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConfigError
from .commands import Host
from .report import Report, problem

__all__ = ["main", "build_parser", "run"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="thunderlink doctor",
        description="Find set-up problems (addresses, interfaces, Thunderbolt Bridge vs per-cable "
        "links, MTUs, ports, reachability) and print each with its fix.",
        epilog="Without --hostfile: list this host's interfaces. With --hostfile: show the topology "
        "the core derives (ring order, who listens for each link) and check the ranks whose addresses "
        "are on this host (or --rank R). Exit status: 0 no problems, 1 problems, 2 usage error.",
    )
    p.add_argument("--hostfile", metavar="H", help="thunderlink or MLX ring hostfile to check")
    p.add_argument("--rank", type=int, metavar="R", help="check this rank (default: the ranks whose "
                   "addresses are on this host)")
    p.add_argument("--all-netns", action="store_true",
                   help="check every rank inside the network namespace its hostfile entry names "
                   "(\"netns\"), and compare both ends of every cable")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=2.0, metavar="S",
                   help="seconds to wait for each peer to answer (default 2)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems and warnings")
    # internal: set by --all-netns for the per-namespace runs
    p.add_argument("--netns-label", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank-only", action="store_true", help=argparse.SUPPRESS)
    return p


def _config_fix(msg: str, path: str) -> str:
    if "does not exist" in msg or "cannot read" in msg:
        return f"check the path {path}"
    if "not valid JSON" in msg:
        return f"fix the JSON syntax at that line (python -m json.tool {path} shows it)"
    if "not UTF-8" in msg:
        return f"save {path} as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8), or remove the stray byte"
    if "levels deep" in msg or "larger than" in msg:
        return f"check that {path} is the hostfile: one short entry per rank (see the README's hostfile formats)"
    if "duplicate address" in msg:
        return "give every rank its own ip:port (ranks on one host need different ports)"
    if "is empty" in msg:
        return "write one entry per rank (thunderlink doctor lists this host's addresses)"
    return ("edit the hostfile where the message points; `thunderlink doctor` with no arguments "
            "lists this host's interfaces and addresses")


def _hostfile_report(args, host: Host) -> Report | int:
    from ..config import from_env
    from ..hosts import hostfile as hostfile_mod
    from ..hosts import interfaces as ifs
    from . import ranks as rk
    from . import topology as tp

    path = args.hostfile
    rep = Report(header=[f"thunderlink doctor: hostfile {path}, on {host.label} ({host.platform})"])
    try:
        hf = hostfile_mod.load(path)
    except ConfigError as e:
        msg = str(e).removeprefix("[thunderlink] ")
        rep.add(problem("hostfile", "hostfile rejected", msg, _config_fix(msg, path), where=host.label))
        return rep
    if args.rank is not None and not 0 <= args.rank < hf.size:
        sys.stderr.write(f"thunderlink doctor: error: --rank {args.rank} is out of range: {path} has "
                         f"{hf.size} ranks (0..{hf.size - 1})\n")
        return 2
    if not args.rank_only:
        rep.extend(rk.hostfile_checks(hf))
    facts: dict[int, dict] = {}
    shm: list[tuple[int, int]] = []  # links that auto joins by shared memory, as far as this host shows
    if args.all_netns:
        from .netns import run_all

        ranks = [args.rank] if args.rank is not None else list(range(hf.size))
        rep.header[0] = f"thunderlink doctor: hostfile {path}, each rank in its network namespace"
        checks, facts = run_all(hf, path, ranks, args.timeout)
        rep.extend(checks)
    else:
        its = ifs.list_interfaces()
        ranks = [args.rank] if args.rank is not None else rk.select_ranks(hf, its, host.name)
        if not ranks:
            mine = [f"{a.ip} ({i.name})" for i in its if not i.loopback for a in i.ipv4]
            has_ns = any(s.extra.get("netns") for s in hf.ranks)
            rep.add(problem(
                "address", "no rank on this host",
                f"no rank of {path} has an address on {host.label}, and no rank's host is named "
                f"{host.name!r}; this host's addresses: {', '.join(mine) or 'none'}",
                ("the ranks carry \"netns\": check each inside its namespace with --all-netns"
                 if has_ns else
                 "run the doctor on the ranks' hosts, pass --rank R to check a rank here anyway, or fix "
                 "the ranks' addresses"), where=host.label))
        else:
            rep.header.append(f"checking rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}")
        cfg = from_env()
        for r in ranks:  # the core binds a rank's unnamed addresses to THUNDERLINK_IFNAME
            checks, f = rk.check_rank(hf.with_default_iface(r, cfg.ifname), r, timeout=args.timeout, host=host,
                                      interfaces=its)
            rep.extend(checks)
            facts[r] = f
        if cfg.transport == "auto":
            local = [r for r in ranks if all(a["local"] for a in facts[r]["addresses"])]
            shm = tp.shared_memory_pairs(hf, local)
    if not args.rank_only:
        rep.extend(rk.mtu_checks(hf, facts))
        text, rep.extra["topology"] = tp.describe(hf, shm)
        if not args.quiet:
            rep.text_sections.append(text)
    rep.extra["hostfile"] = os.path.abspath(path)
    rep.extra["facts"] = {str(r): f for r, f in facts.items()}
    return rep


def run(args) -> Report | int:
    host = Host(netns=args.netns_label)
    if args.hostfile is None:
        from .listing import listing_report

        return listing_report(host)
    return _hostfile_report(args, host)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if args.hostfile is None and (args.rank is not None or args.all_netns):
        parser.print_usage(sys.stderr)
        sys.stderr.write("thunderlink doctor: error: --rank and --all-netns need --hostfile\n")
        return 2
    if not args.timeout > 0:
        sys.stderr.write("thunderlink doctor: error: --timeout must be positive\n")
        return 2
    res = run(args)
    if isinstance(res, int):
        return res
    sys.stdout.write(res.to_json() + "\n" if args.json else res.to_text(verbose=not args.quiet))
    sys.stdout.flush()
    return res.exit_status


if __name__ == "__main__":
    sys.exit(main())
