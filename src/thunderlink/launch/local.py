"""Launch every rank on this host, over loopback."""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
from typing import Callable, Sequence

from ..transport.hostfile import local_hostfile, write
from .job import Job, JobResult

__all__ = ["free_ports", "rank_env", "launch_local"]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n TCP ports that are free on host now (the kernel picks them)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def rank_env(base: dict | None, rank: int, size: int, hostfile: str, job_id: int) -> dict:
    """The environment of one rank: base plus the variables that place it."""
    env = dict(os.environ if base is None else base)
    env.update(
        THUNDERLINK_HOSTFILE=hostfile,
        THUNDERLINK_RANK=str(rank),
        THUNDERLINK_WORLD_SIZE=str(size),
        THUNDERLINK_JOB_ID=str(job_id),
        MLX_DISTRIBUTED_BACKEND="thunderlink",
        PYTHONUNBUFFERED="1",
    )
    return env


def launch_local(
    n: int,
    argv: Sequence[str],
    *,
    env: dict | None = None,
    timeout: float | None = None,
    on_line: Callable[[int, str, str], None] | None = None,
    capture: bool = False,
    host: str = "127.0.0.1",
) -> JobResult:
    """Run argv as n ranks on this host and wait for them (see Job)."""
    if n < 1:
        raise ValueError("launch needs at least one rank (-n 1 or more)")
    tmp = tempfile.mkdtemp(prefix="thunderlink-")
    try:
        path = os.path.join(tmp, "hostfile.json")
        write(local_hostfile(n, free_ports(n, host), host), path)
        job_id = random.getrandbits(63)
        envs = [rank_env(env, r, n, path, job_id) for r in range(n)]
        return Job([argv] * n, envs, on_line=on_line, capture=capture, timeout=timeout).run()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
