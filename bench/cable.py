"""Benchmark over an emulated Thunderbolt cable (needs root and iproute2).

    python bench/cable.py [--rate 10gbit] [--mtu 1500] [--hosts 2] [--sizes 1M:256M] [--json out.json]

Builds a cluster of network namespaces cabled as a ring (thunderlink.testing.
cluster), measures each cable's goodput with one TCP stream in one direction
and with one stream each way at once (an all-reduce loads both directions),
then runs `thunderlink bench --hostfile ... --vs mlx-ring` across the hosts,
and prints busbw against both goodputs. The cluster is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading

from thunderlink.testing import cluster as cl


def goodput_both_ways(c, cable, seconds: float) -> float:
    """Per-direction goodput (bytes/s) with a stream each way at once."""
    out = {}

    def one(key, src, dst, ip, port):
        out[key] = c.measure_goodput(src, dst, ip, seconds, port=port)

    ts = [threading.Thread(target=one, args=("ab", cable.a, cable.b, cable.ip_b, 45321)),
          threading.Thread(target=one, args=("ba", cable.b, cable.a, cable.ip_a, 45322))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 60)
    return (out["ab"] + out["ba"]) / 2 / 8


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", default="10gbit")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--sizes", default="1M:256M")
    p.add_argument("--seconds", type=float, default=2.0, help="per goodput measurement")
    p.add_argument("--json", dest="json_path")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="more arguments for thunderlink bench, after --")
    args = p.parse_args(argv)
    ok, why = cl.available(shaping=True)
    if not ok:
        print(f"bench/cable.py: {why}", file=sys.stderr)
        return 2
    with cl.Cluster(args.hosts, topology="ring", rate=args.rate, mtu=args.mtu) as c, \
            tempfile.TemporaryDirectory(prefix="thunderlink-cable-") as tmp:
        cable = c.cables[0]
        one_way = max(c.goodput(cable, seconds=args.seconds) for _ in range(2)) / 8
        both = max(goodput_both_ways(c, cable, args.seconds) for _ in range(2))
        print(f"# cable {args.rate}, MTU {args.mtu}, {args.hosts} hosts in a ring: goodput of one TCP stream "
              f"{one_way / 1e9:.3f} GB/s one way, {both / 1e9:.3f} GB/s per direction both ways at once", flush=True)
        hostfile = os.path.join(tmp, "hosts.json")
        c.write_hostfile(hostfile)
        js = os.path.join(tmp, "bench.json")
        extra = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
        cmd = [sys.executable, "-m", "thunderlink", "bench", "--hostfile", hostfile, "--sizes", args.sizes,
               "--vs", "mlx-ring", "--json", js, *extra]
        print("# " + " ".join(cmd[1:]), flush=True)
        rc = subprocess.run(cmd, timeout=3600).returncode
        if rc:
            return rc
        results = json.load(open(js))
        print(f"# {'size':>12}  {'busbw':>7} {'/one-way':>9} {'/both-ways':>10}   {'mlx-ring':>8} {'/both-ways':>10}")
        for m in results:
            if m["backend"] != "thunderlink" or m["inplace"]:
                continue
            ring = next((r for r in results if r["backend"] == "mlx-ring" and r["size"] == m["size"]), None)
            rb = ring["busbw"] if ring and ring.get("busbw") is not None else float("nan")
            print(f"  {m['size']:>12}  {m['busbw']:>7.3f} {m['busbw'] * 1e9 / one_way:>9.2f} "
                  f"{m['busbw'] * 1e9 / both:>10.2f}   {rb:>8.3f} {rb * 1e9 / both:>10.2f}")
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump({"rate": args.rate, "mtu": args.mtu, "hosts": args.hosts, "goodput_one_way": one_way,
                           "goodput_both_ways": both, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
