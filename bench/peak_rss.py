#!/usr/bin/env python3
"""Peak resident memory of an all_sum: thunderlink's core, thunderlink through
mx.distributed, and MLX's ring, each in its own fresh processes.

    python bench/peak_rss.py [-n 2] [--size 256M] [--iters 3] [--cases core,tl-mlx,...] [--json out.json]

Every rank makes its input (float32, filled in place: no temporaries), then
resets the kernel's high-water mark of its resident set (``echo 5 >
/proc/self/clear_refs``), runs ``--iters`` all_sums and reads the mark
again (VmHWM). ``before`` is VmRSS just before the first all_sum (the
interpreter, the libraries and the input), ``peak`` is VmHWM over the
calls, ``extra = peak - before``, also in units of the buffer (the core out
of place needs one output: 1.0). The slowest rank's figures are shown.

Cases (out: a fresh output per call, y = all_sum(x); in: x = all_sum(x)):
  core, core-in         thunderlink's C core on numpy buffers (thunderlink.connect)
  tl-mlx, tl-mlx-in     mx.distributed.all_sum on thunderlink.init()'s group
  tl-mlx-nomalloc       the same with THUNDERLINK_MALLOC_HEAP=0 (malloc as MLX leaves it)
  ring, ring-in         MLX's ring backend alone (no thunderlink in the process)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

CASES = ("core", "core-in", "tl-mlx", "tl-mlx-in", "tl-mlx-nomalloc", "ring", "ring-in")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rank_main(case: str, size: int, iters: int) -> None:
    import numpy as np

    count = size // 4
    if case.startswith("core"):
        import thunderlink

        with thunderlink.connect() as comm:
            x = np.empty(count, np.float32)
            x.fill(comm.rank + 1)
            out = x if case == "core-in" else np.empty_like(x)
            out.fill(0)  # the output's pages are the caller's: count them before
            comm.barrier()
            before = _status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            for _ in range(iters):
                comm.all_sum(x, out=out)
            peak = _status("VmHWM")
            ok = float(out[0]) > 0
            rank = comm.rank
    else:
        import mlx.core as mx

        if case.startswith("tl-mlx"):
            import thunderlink.mlx_backend as tlb

            g = tlb.init(strict=True)
        else:
            from thunderlink.config import from_env

            os.environ["MLX_RANK"] = str(from_env().rank)
            g = mx.distributed.init(strict=True, backend="ring")
        rank = g.rank()
        x = mx.full((count,), float(rank + 1), dtype=mx.float32)
        mx.eval(x)
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=g))  # a barrier
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        for _ in range(iters):
            if case.endswith("-in"):
                x = mx.distributed.all_sum(x, group=g)
                mx.eval(x)
            else:
                y = mx.distributed.all_sum(x, group=g)
                mx.eval(y)
                del y
        peak = _status("VmHWM")
        ok = True
    print("PEAK " + json.dumps({"case": case, "rank": rank, "before": before, "peak": peak, "ok": ok}), flush=True)


def run_case(case: str, n: int, size: int, iters: int, timeout: float) -> list[dict]:
    from thunderlink.launch import free_ports, launch_local, private_tempdir

    env = dict(os.environ)
    if case == "tl-mlx-nomalloc":
        env["THUNDERLINK_MALLOC_HEAP"] = "0"
    lines: list[dict] = []

    def on_line(rank: int, stream: str, line: str) -> None:
        if line.startswith("PEAK "):
            lines.append(json.loads(line[5:]))
        elif stream == "err":
            sys.stderr.write(f"[{case} {rank}] {line}\n")

    with private_tempdir(prefix="peak-rss-") as tmp:
        if case.startswith("ring"):
            path = os.path.join(tmp, "ring.json")
            with open(path, "w") as f:
                json.dump([[f"127.0.0.1:{p}"] for p in free_ports(n)], f)
            env["MLX_HOSTFILE"] = path
        argv = [sys.executable, os.path.abspath(__file__), "--rank-worker", case, "--size", str(size),
                "--iters", str(iters)]
        status = launch_local(n, argv, env=env, timeout=timeout, on_line=on_line).status
    if status != 0 or len(lines) != n:
        raise SystemExit(f"peak_rss.py: case {case} failed (status {status}, {len(lines)} of {n} ranks reported)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--ranks", type=int, default=2)
    p.add_argument("--size", default="256M", help="bytes per rank (default 256M)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--json", dest="json_path")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--rank-worker", metavar="CASE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from thunderlink.config import parse_size

    size = parse_size(args.size)
    if args.rank_worker:
        rank_main(args.rank_worker, size, args.iters)
        return 0
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"unknown case {bad[0]!r}: choose from {', '.join(CASES)}")
    mib = 1 << 20
    print(f"# peak resident memory per rank, {args.ranks} ranks, all_sum of {size} B float32 x {args.iters}; "
          f"slowest rank's; extra = VmHWM over the calls - VmRSS before them")
    print(f"# {'case':<16} {'before (MiB)':>12} {'peak (MiB)':>11} {'extra (MiB)':>11} {'extra / buffer':>14}")
    rows = []
    for case in cases:
        ranks = run_case(case, args.ranks, size, args.iters, args.timeout)
        worst = max(ranks, key=lambda r: r["peak"] - r["before"])
        extra = worst["peak"] - worst["before"]
        rows.append({**worst, "extra": extra, "size": size, "ranks": args.ranks, "iters": args.iters})
        print(f"  {case:<16} {worst['before'] / mib:>12.1f} {worst['peak'] / mib:>11.1f} {extra / mib:>11.1f} "
              f"{extra / size:>14.2f}", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
