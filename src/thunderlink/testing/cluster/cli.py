"""``thunderlink cluster``: up, down, list and exec from the command line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from .hostfiles import DEFAULT_PORT
from .model import DEFAULT_BASE, MAX_MTU, TOPOLOGIES, Cluster
from .net import ClusterError
from .state import list_clusters


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thunderlink cluster",
                                description="Emulated Thunderbolt clusters from network namespaces (needs root).")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create a cluster that persists until `down`")
    up.add_argument("--hosts", type=int, required=True)
    up.add_argument("--topology", choices=TOPOLOGIES, default="ring")
    up.add_argument("--rate", default=None, help="tc rate of every cable, e.g. 10gbit (default: unshaped)")
    up.add_argument("--mtu", type=int, default=1500, help=f"MTU of every cable (max {MAX_MTU})")
    up.add_argument("--cables", type=int, default=1, help="parallel cables per connected pair")
    up.add_argument("--name", default=None)
    up.add_argument("--base", default=DEFAULT_BASE, help="IPv4 range the /30 cable subnets are taken from")
    up.add_argument("--hostfile", default=None, help="write the thunderlink hostfile here")
    up.add_argument("--mlx-hostfile", default=None, help="write the MLX ring hostfile here")
    up.add_argument("--port", type=int, default=DEFAULT_PORT)
    up.add_argument("--json", action="store_true", help="print the state as JSON")
    dn = sub.add_parser("down", help="remove a cluster (or all recorded ones)")
    dn.add_argument("name", nargs="?")
    dn.add_argument("--all", action="store_true",
                    help="remove all recorded clusters that are persistent or whose owner process is gone")
    dn.add_argument("--force", action="store_true", help="with --all: also clusters of live processes")
    ls = sub.add_parser("list", help="list recorded clusters")
    ls.add_argument("--json", action="store_true")
    ex = sub.add_parser("exec", help="run a command inside a host: exec NAME HOST -- cmd args")
    ex.add_argument("name")
    ex.add_argument("host", help="host index (or namespace name)")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:
        if args.cmd == "up":
            c = Cluster(args.hosts, topology=args.topology, rate=args.rate, mtu=args.mtu,
                        cables_per_link=args.cables, name=args.name, base=args.base, persistent=True)
            c.up()
            if args.hostfile:
                c.write_hostfile(args.hostfile, args.port)
            if args.mlx_hostfile:
                c.write_hostfile(args.mlx_hostfile, args.port, mlx=True)
            if args.json:
                print(json.dumps(c.to_state(), indent=1))
            else:
                print(c.describe())
                if args.hostfile:
                    print(f"thunderlink hostfile: {args.hostfile}")
                if args.mlx_hostfile:
                    print(f"MLX hostfile: {args.mlx_hostfile}")
                print(f"remove with: thunderlink cluster down {c.name}")
            return 0
        if args.cmd == "down":
            if args.all == bool(args.name):
                p.error("give a cluster NAME or --all")
            if args.name:
                Cluster.attach(args.name).down()
                print(f"removed {args.name}")
                return 0
            rc = 0
            for st in list_clusters():
                if not st.get("persistent") and st["owner_alive"] and not args.force:
                    print(f"skipping {st['name']}: owned by live process {st.get('owner_pid')} (use --force)")
                    continue
                try:
                    Cluster.from_state(st).down()
                    print(f"removed {st['name']}")
                except ClusterError as e:
                    print(f"thunderlink cluster: error: {e}", file=sys.stderr)
                    rc = 1
            return rc
        if args.cmd == "list":
            cl = list_clusters()
            if args.json:
                print(json.dumps(cl, indent=1))
                return 0
            if not cl:
                print("no clusters")
                return 0
            print(f"{'NAME':<16} {'TOPOLOGY':<8} {'HOSTS':>5} {'CABLES':>6} {'RATE':<9} {'MTU':>5}  STATUS")
            for st in cl:
                owner = ("persistent" if st.get("persistent")
                         else f"pid {st.get('owner_pid')}" + ("" if st["owner_alive"] else " (dead)"))
                present = f"{len(st['present'])}/{len(st.get('created_netns', []))} netns"
                print(f"{st['name']:<16} {st['topology']:<8} {len(st['hosts']):>5} {len(st['cables']):>6} "
                      f"{st.get('rate') or '-':<9} {st.get('mtu', 1500):>5}  {owner}, {present}")
            return 0
        if args.cmd == "exec":
            cmd = list(args.argv)
            if cmd and cmd[0] == "--":
                cmd = cmd[1:]
            if not cmd:
                p.error("exec: give a command after --")
            c = Cluster.attach(args.name)
            if args.host.isdigit():
                i = int(args.host)
                if not 0 <= i < len(c.hosts):
                    raise ClusterError(f"host {i} out of range (cluster {c.name} has {len(c.hosts)} hosts)")
                ns = c.hosts[i].netns
            else:
                ns = args.host
                if ns not in c.netns_names:
                    raise ClusterError(f"{ns!r} is not a namespace of cluster {c.name}: {c.netns_names}")
            try:
                return subprocess.call(["ip", "netns", "exec", ns, *cmd])
            except KeyboardInterrupt:
                return 130
    except ClusterError as e:
        print(f"thunderlink cluster: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"thunderlink cluster: error: {e}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover
