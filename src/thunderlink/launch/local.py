"""Launch every rank on this host, over loopback."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
from typing import Callable, Iterator, Sequence

from ..hosts.hostfile import local_hostfile, write
from .job import Job, JobResult

__all__ = ["free_ports", "rank_env", "launch_local", "private_tempdir", "job_token"]

# The guard of private_tempdir, run by /bin/sh with the pipe as stdin: keep the
# pipe as fd 3 and, in a background subshell that outlives this shell (so that
# no one waits for it: init reaps it), wait for end of file there (`read`
# returns then: nothing is ever written), then remove the directory ($1).
_GUARD = 'exec 3<&0 </dev/null; (read -r _ <&3; rm -rf -- "$1") &'


@contextlib.contextmanager
def private_tempdir(prefix: str = "thunderlink-") -> Iterator[str]:
    """A new directory of this user only (mode 0700, in the temp directory),
    removed when the block ends -- and also when this process dies without
    ending it (SIGKILL), so that no hostfile outlives its launcher.

    For the second case a guard process, in a session of its own (out of
    reach of signals to this process's group or terminal), holds the read end
    of a pipe whose write end only this process holds (Python opens it
    close-on-exec, so ranks do not inherit it). However this process ends,
    the kernel closes that end; the guard reads end of file and removes the
    directory. Ranks still starting then find no hostfile: their job is over."""
    path = tempfile.mkdtemp(prefix=prefix)
    read_end, write_end = os.pipe()
    try:
        subprocess.run(["/bin/sh", "-c", _GUARD, "thunderlink-tempdir-guard", path], stdin=read_end,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", start_new_session=True,
                       check=True)
    except BaseException:
        os.close(write_end)
        shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        os.close(read_end)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(write_end)  # the guard finds nothing left to remove, and exits


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


def job_token(env) -> str:
    """The job's secret: THUNDERLINK_TOKEN or THUNDERLINK_TOKEN_FILE's when the
    user set one (ConfigError for a token file others can read), else a new
    random 256-bit token. Never printed, never put on a command line."""
    from ..config import read_token

    return read_token(os.environ if env is None else env) or secrets.token_urlsafe(32)


def rank_env(base: dict | None, rank: int, size: int, hostfile: str, job_id: int,
             token: str | None = None) -> dict:
    """The environment of one rank: base plus the variables that place it
    (and the job's token, when given: a process's environment is readable by
    its user only, unlike its command line)."""
    env = dict(os.environ if base is None else base)
    if token is not None:
        env.pop("THUNDERLINK_TOKEN_FILE", None)
        env["THUNDERLINK_TOKEN"] = token
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
    with private_tempdir() as tmp:
        path = os.path.join(tmp, "hostfile.json")
        write(local_hostfile(n, free_ports(n, host), host), path)
        job_id = random.getrandbits(63)
        token = job_token(env)
        envs = [rank_env(env, r, n, path, job_id, token) for r in range(n)]
        return Job([argv] * n, envs, on_line=on_line, capture=capture, timeout=timeout).run()
