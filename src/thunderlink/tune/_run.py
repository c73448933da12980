"""Starting probe and tune like `thunderlink bench`: as one rank of a job
that is already running (THUNDERLINK_RANK/MLX_RANK set, or --worker), or as
the launcher of N local ranks (-n) or of one rank per hostfile entry
(--hostfile), each running the tool's worker. Rank 0's lines are printed as
they are; other ranks' prefixed with their rank."""

from __future__ import annotations

import os
import sys

from ..errors import ConfigError

__all__ = ["launch_workers", "worker_args"]


def worker_args(argv: list[str]) -> list[str]:
    """The tool's own arguments minus those that only concern starting ranks."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("-n", "--ranks", "--hostfile", "--timeout"):
            skip = True
            continue
        if a.startswith(("--ranks=", "--hostfile=", "--timeout=")) or a == "--worker":
            continue
        out.append(a)
    return out


def launch_workers(tool: str, module: str, argv: list[str], ranks: int | None, hostfile: str | None,
                   timeout: float | None) -> int:
    from ..launch import launch_local

    def on_line(rank: int, stream: str, line: str) -> None:
        if rank == 0:
            (sys.stdout if stream == "out" else sys.stderr).write(line + "\n")
        else:
            (sys.stdout if stream == "out" else sys.stderr).write(f"[{rank}] {line}\n")
        sys.stdout.flush()

    cmd = [sys.executable, "-m", module, "--worker"] + worker_args(argv)
    env = dict(os.environ)
    if hostfile:
        from ..launch.ssh import launch_hostfile

        try:
            return launch_hostfile(hostfile, ["--"] + cmd, env=env, timeout=timeout, on_line=on_line).status
        except ConfigError as e:
            sys.stderr.write(f"thunderlink {tool}: {str(e).removeprefix('[thunderlink] ')}\n")
            return 2
    return launch_local(ranks or 2, cmd, env=env, timeout=timeout, on_line=on_line).status
