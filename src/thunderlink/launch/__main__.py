"""thunderlink launch (-n N | --hostfile FILE) (prog.py [args] | -- CMD [args])"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConfigError
from .local import launch_local
from .ssh import add_cli_arguments, from_cli_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="thunderlink launch",
        description="Start the ranks of a program — N on this host, or one per hostfile entry over "
        "ssh (entries on this host, or inside an emulated host's network namespace, run without "
        "ssh) — prefix their output with the rank, and stop them all as soon as one fails (the "
        "exit status is that rank's).",
        epilog="A Python script runs with this interpreter; after --, any command runs as is. "
        "Each rank gets THUNDERLINK_HOSTFILE, THUNDERLINK_RANK, THUNDERLINK_WORLD_SIZE, "
        "THUNDERLINK_JOB_ID and MLX_DISTRIBUTED_BACKEND=thunderlink, and the job's secret, "
        "THUNDERLINK_TOKEN: a new random one, or yours when THUNDERLINK_TOKEN (or "
        "THUNDERLINK_TOKEN_FILE) is set. The token is never printed nor put on a command line: "
        "ranks over ssh read it on their standard input.",
    )
    p.add_argument("-n", "--ranks", type=int, default=None, help="number of ranks to start on this host")
    p.add_argument("--timeout", type=float, default=None, help="stop every rank after this many seconds (status 124)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for every rank")
    add_cli_arguments(p)
    p.add_argument("program", nargs=argparse.REMAINDER, help="prog.py [args] or -- CMD [args]")
    return p


def command_of(program: list[str]) -> list[str]:
    """The argv to run for `prog.py args` or `-- cmd args`."""
    if program and program[0] == "--":
        if len(program) < 2:
            raise SystemExit("thunderlink launch: nothing to run after --")
        return program[1:]
    if not program:
        raise SystemExit("thunderlink launch: give a Python script (prog.py) or -- CMD")
    if not os.path.exists(program[0]):
        raise SystemExit(
            f"thunderlink launch: {program[0]} does not exist; to run a command rather than a "
            f"Python script, put it after --"
        )
    return [sys.executable] + program


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    extra = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"thunderlink launch: --env {item!r} is not NAME=VALUE")
        extra[name] = value
    if (args.ranks is None) == (args.hostfile is None):
        parser.error("give -n N (ranks on this host) or --hostfile FILE (one rank per entry)")
    if args.hostfile is not None:
        if not args.program or (args.program[0] == "--" and len(args.program) < 2):
            raise SystemExit("thunderlink launch: give a Python script (prog.py) or -- CMD")
        return from_cli_args(args, env=dict(os.environ), extra_env=extra)
    if args.ranks < 1:
        raise SystemExit("thunderlink launch: -n must be at least 1")
    env = dict(os.environ)
    env.update(extra)
    try:
        return launch_local(args.ranks, command_of(args.program), env=env, timeout=args.timeout).status
    except OSError as e:
        sys.stderr.write(f"thunderlink launch: {e.strerror or e}\n")
        return 127
    except ConfigError as e:
        sys.stderr.write(f"thunderlink launch: {str(e).removeprefix('[thunderlink] ')}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
