"""Launch one rank per hostfile entry over ssh (``thunderlink launch --hostfile``).

Rank r runs on ``ranks[r].ssh`` (else ``ranks[r].host``) through::

    ssh [ssh_options] -T -o BatchMode=yes -o ConnectTimeout=10 \\
        -o ServerAliveInterval=5 -o ServerAliveCountMax=3 DEST 'exec /bin/sh -c ...'

(``ssh_options`` come first because ssh keeps the first value of an option:
``-o ConnectTimeout=30`` there overrides the default.)

An entry whose destination is this machine's loopback (``localhost``,
``127.0.0.1``, ``::1``; no ``user@``) runs directly, without ssh, like
``mlx.launch`` (``force_ssh=True`` uses ssh for those too).

What the remote shell does (POSIX sh, whatever the login shell is):

1. ``cd`` to the launcher's working directory if it exists there, else ``$HOME``;
2. exports THUNDERLINK_RANK, THUNDERLINK_WORLD_SIZE, THUNDERLINK_JOB_ID (random,
   the same for every rank), THUNDERLINK_HOSTFILE, MLX_DISTRIBUTED_BACKEND=
   thunderlink, PYTHONUNBUFFERED=1, every THUNDERLINK_* and MLX_* variable of
   the launcher's environment (not the placement variables of another job:
   MLX_RANK, MLX_HOSTFILE, ...) and the ``extra_env`` (``--env NAME=VALUE``)
   assignments, every value quoted with :func:`shlex.quote`;
3. picks the interpreter: ``python`` if given (``--python``), else the
   launcher's ``sys.executable`` path if it is executable there, else ``python3``;
4. execs the *rank wrapper* (``python -m thunderlink.launch.remote``, so
   thunderlink must be installed for that interpreter) that reads the job's
   token (THUNDERLINK_TOKEN) from its standard input, writes the hostfile to ``/tmp/thunderlink-<job>-r<rank>.json``
   (O_EXCL, mode 0600), runs the program in its own session (process group)
   with the token in its environment, and removes the hostfile when the
   program is done.

The job's token never travels on a command line (which ``ps`` shows every
user of a host): THUNDERLINK_TOKEN and THUNDERLINK_TOKEN_FILE are not copied
into the remote command; the launcher writes the token as the first line of
each ssh client's stdin, through ssh's encrypted channel, and the wrapper
hands it to the program in its environment (readable by the same user only).

How remote ranks are stopped (killing a local ssh client does not kill the
remote command: without a tty sshd sends no SIGHUP):

* The launcher gives every ssh client a **pipe as stdin** and never writes to
  it; the remote wrapper watches its stdin. End of file there means "stop":
  the wrapper sends SIGTERM to the program's process group, SIGKILL after
  ``REMOTE_GRACE`` seconds, then exits with 128 + signal.
* To stop a job (a rank failed, ``timeout``, Ctrl-C) the launcher closes those
  pipes: ssh forwards the EOF, the remote wrappers stop their programs, and ssh
  returns their status -- the launcher waits for that (up to REMOTE_GRACE + 2 s)
  before SIGTERM/SIGKILL of the ssh clients (Job.stop), which also ends the
  remote sessions and so gives the wrappers EOF as well.
* Ctrl-C (SIGINT to the launcher): Job passes SIGINT on to every rank; for a
  remote rank the launcher writes "i" to that pipe and the wrapper sends
  SIGINT to the program's process group (KeyboardInterrupt, as locally);
  ranks still running after Job's grace period are stopped as above.
* If the launcher dies (even by SIGKILL) the kernel closes its ends of the
  pipes: the ssh clients see EOF on stdin and forward it; same result.
* If the ssh connection drops, sshd closes the wrapper's stdin: EOF again.
  The wrapper also stops the program if it is orphaned (its parent, sshd,
  went away) or gets SIGTERM/SIGINT/SIGHUP.
* When the program exits by itself, what is left of its process group is
  killed too, so that orphans holding the ssh channel open cannot hang the job.

Exit status: that of the failing rank (the remote status comes back through
ssh). ssh's own failure is 255: when a rank ends with 255 before its wrapper
started, the launcher reports "cannot reach host X over ssh: <ssh's message>"
with a hint about BatchMode and keys (:attr:`HostfileJobResult.messages`).
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from ..errors import ConfigError
from ..testing.netns import command_in, namespace_of
from ..hosts import hostfile as hostfile_mod
from ..hosts.hostfile import Hostfile, RankSpec
from .job import GRACE_SECONDS, Job, JobResult, exit_status
from .local import job_token, private_tempdir, rank_env
from .remote import GRACE as REMOTE_GRACE
from .remote import TOKEN_FLAG

__all__ = [
    "launch_hostfile",
    "plan_hostfile",
    "HostfileJobResult",
    "LaunchPlan",
    "SshJob",
    "REMOTE_MODULE",
    "REMOTE_GRACE",
    "DEFAULT_CONNECT_TIMEOUT",
    "add_cli_arguments",
    "from_cli_args",
    "is_local_destination",
    "split_program",
]

DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds, ssh's ConnectTimeout
LABEL = "thunderlink launch"

# Placement variables that the launcher sets itself, or that describe another
# job: never copied from the launcher's environment.
_PLACEMENT = frozenset({
    "THUNDERLINK_HOSTFILE", "THUNDERLINK_RANK", "THUNDERLINK_WORLD_SIZE", "THUNDERLINK_JOB_ID",
    # The job's secret travels on stdin, never on the remote command line.
    "THUNDERLINK_TOKEN", "THUNDERLINK_TOKEN_FILE",
    "MLX_HOSTFILE", "MLX_RANK", "MLX_WORLD_SIZE", "MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES",
})
_PROPAGATED_PREFIXES = ("THUNDERLINK_", "MLX_")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The remote rank wrapper is the module thunderlink.launch.remote, run by the
# remote interpreter as ``python -m thunderlink.launch.remote --token-on-stdin
# HOSTFILE_PATH HOSTFILE_TEXT MODE MARKER ARGV...``.
REMOTE_MODULE = "thunderlink.launch.remote"


# --------------------------------------------------------------------------- helpers


def split_program(program: Sequence[str]) -> tuple[list[str], bool]:
    """``["prog.py", args...]`` -> (argv, True): a Python script, run with the
    chosen interpreter; ``["--", "cmd", args...]`` -> (["cmd", args...], False):
    a command run as is (the convention of ``thunderlink launch``)."""
    program = list(program)
    if program and program[0] == "--":
        if len(program) < 2:
            raise ConfigError("[thunderlink] launch: nothing to run after --")
        return program[1:], False
    if not program:
        raise ConfigError("[thunderlink] launch: give a Python script (prog.py) or -- CMD")
    return program, True


def _host_of(dest: str) -> tuple[str, bool]:
    """(hostname, has_user) of an ssh destination: [user@]host or ssh://[user@]host[:port]."""
    d = dest.strip()
    uri = d.startswith("ssh://")
    if uri:
        d = d[len("ssh://"):]
    user, at, host = d.rpartition("@")
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif uri and host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host, bool(at)


def is_local_destination(dest: str) -> bool:
    """True for this machine's loopback without an explicit user: ``localhost``,
    ``127.0.0.1``, ``::1`` (such ranks run directly, without ssh)."""
    host, has_user = _host_of(dest)
    if has_user:
        return False
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def destination(spec: RankSpec) -> str:
    """Where a rank runs: its "ssh" entry, else its "host"."""
    return spec.ssh or spec.host


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"[thunderlink] launch: {what} {name!r} is not a valid environment variable name")
    return name


def _python_assignment(python: str | None, default: str) -> str:
    """Shell text that sets TL_PY to the remote interpreter."""
    if python:
        if python.startswith("~/"):
            return f'TL_PY="$HOME"/{shlex.quote(python[2:])}'
        return f"TL_PY={shlex.quote(python)}"
    return f'TL_PY={shlex.quote(default)}; [ -x "$TL_PY" ] || TL_PY=python3'


def remote_command(
    *,
    argv: Sequence[str],
    is_script: bool,
    env: Mapping[str, str],
    hostfile_path: str,
    hostfile_text: str,
    marker: str,
    cwd: str | None,
    python: str | None,
    default_python: str,
) -> str:
    """The command string given to ssh for one rank (see the module docstring)."""
    parts = []
    if cwd:
        parts.append(f"cd {shlex.quote(cwd)} 2>/dev/null || cd")
    parts.append(_python_assignment(python, default_python))
    assigns = [f"{_check_name(k, 'variable')}={shlex.quote(str(v))}" for k, v in env.items()]
    assigns.append(f"THUNDERLINK_HOSTFILE={shlex.quote(hostfile_path)}")
    parts.append("export " + " ".join(assigns))
    args = [TOKEN_FLAG, hostfile_path, hostfile_text, "python" if is_script else "exec", marker, *argv]
    parts.append(f'exec "$TL_PY" -m {REMOTE_MODULE} ' + " ".join(shlex.quote(a) for a in args))
    return "exec /bin/sh -c " + shlex.quote("; ".join(parts))


def ssh_argv(dest: str, command: str, *, ssh: str = "ssh", connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
             ssh_options: Sequence[str] = ()) -> list[str]:
    """The local ssh command line. ``ssh_options`` come first: for -o options
    ssh keeps the first value given, so they override the defaults here."""
    if dest.startswith("-"):
        raise ConfigError(f"[thunderlink] launch: ssh destination {dest!r} may not start with '-'")
    ct = max(1, int(round(connect_timeout)))
    return [
        ssh, *ssh_options,
        "-T",
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={ct}",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
        dest, command,
    ]


# --------------------------------------------------------------------------- plan


@dataclass
class LaunchPlan:
    """What launch_hostfile will run: per rank, the local argv and environment
    (ssh for remote ranks), and where each rank runs."""

    hostfile: Hostfile
    job_id: int
    commands: list[list[str]]
    envs: list[dict | None] = field(repr=False)  # local ranks' hold the job's token
    destinations: list[str]
    remote: list[bool]
    remote_hostfiles: list[str | None]
    marker: str
    local_hostfile_json: str
    token: str = field(default="", repr=False)  # the job's secret: remote ranks read it on stdin


def plan_hostfile(
    hf: Hostfile,
    program: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    local_hostfile: str = "",
    python: str | None = None,
    default_python: str | None = None,
    cwd: str | None = None,
    ssh: str = "ssh",
    ssh_options: Sequence[str] = (),
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    force_ssh: bool = False,
    job_id: int | None = None,
    token: str | None = None,
) -> LaunchPlan:
    """Build every rank's command (nothing is started). ``local_hostfile`` is
    the path of the hostfile for ranks that run on this machine. ``token``:
    the job's secret (default: :func:`~thunderlink.launch.local.job_token`
    of ``env``), in local ranks' environment and on remote ranks' stdin."""
    argv, is_script = split_program(program)
    default_python = default_python or sys.executable or "python3"
    job_id = random.getrandbits(63) if job_id is None else job_id
    token = job_token(env) if token is None else token
    extra = {_check_name(k, "--env name"): str(v) for k, v in (extra_env or {}).items()}
    n = hf.size
    text = json.dumps(hf.to_json(), separators=(",", ":"))
    marker = f"thunderlink-ssh-started {job_id:016x}"
    commands, envs, dests, remote, paths = [], [], [], [], []
    for r, spec in enumerate(hf.ranks):
        dest = destination(spec)
        base = rank_env(env, r, n, local_hostfile, job_id, token)
        dests.append(dest)
        # An emulated host's namespace, unless the entry names an ssh destination.
        netns = namespace_of(spec) if not (force_ssh or spec.ssh) else None
        if not force_ssh and (netns or is_local_destination(dest)):
            # On this machine: directly, or inside the network namespace of an
            # emulated host (thunderlink cluster), which needs no ssh.
            local_env = dict(base)
            local_env.update(extra)
            local_env.update(THUNDERLINK_HOSTFILE=local_hostfile, THUNDERLINK_RANK=str(r),
                             THUNDERLINK_WORLD_SIZE=str(n), THUNDERLINK_JOB_ID=str(job_id))
            cmd = ([python or default_python] + argv) if is_script else list(argv)
            commands.append(command_in(netns, cmd) if netns else cmd)
            envs.append(local_env)
            remote.append(False)
            paths.append(None)
            continue
        renv = {k: v for k, v in base.items()
                if k.startswith(_PROPAGATED_PREFIXES) and k not in _PLACEMENT and _NAME.match(k)}
        renv.update(extra)
        renv.update(
            THUNDERLINK_RANK=str(r),
            THUNDERLINK_WORLD_SIZE=str(n),
            THUNDERLINK_JOB_ID=str(job_id),
            MLX_DISTRIBUTED_BACKEND="thunderlink",
            PYTHONUNBUFFERED="1",
        )
        path = f"/tmp/thunderlink-{job_id:016x}-r{r}.json"
        cmd = remote_command(argv=argv, is_script=is_script, env=renv, hostfile_path=path, hostfile_text=text,
                             marker=marker, cwd=cwd, python=python, default_python=default_python)
        commands.append(ssh_argv(dest, cmd, ssh=ssh, connect_timeout=connect_timeout, ssh_options=ssh_options))
        # The ssh client itself runs with the launcher's environment (agent,
        # HOME), less the token (an ssh_config's SendEnv must not send it).
        envs.append({k: v for k, v in (os.environ if env is None else env).items()
                     if k not in ("THUNDERLINK_TOKEN", "THUNDERLINK_TOKEN_FILE")})
        remote.append(True)
        paths.append(path)
    return LaunchPlan(hostfile=hf, job_id=job_id, commands=commands, envs=envs, destinations=dests,
                      remote=remote, remote_hostfiles=paths, marker=marker, local_hostfile_json=text,
                      token=token)


# --------------------------------------------------------------------------- the job


class SshJob(Job):
    """A Job whose remote ranks get a pipe as stdin (see the module docstring):
    closing it stops the remote program."""

    def __init__(self, commands, envs=None, *, remote: Sequence[bool], started: list[bool] | None = None,
                 token: str | None = None, **kw):
        super().__init__(commands, envs, **kw)
        self.remote = list(remote)
        self._token = token  # the first line of every remote rank's stdin
        # started[r]: rank r's remote wrapper runs (set by the caller's line
        # filter); stop() waits only for those, the others are still in ssh.
        self.started = started if started is not None else [True] * len(self.remote)
        self.stopped: set[int] | None = None  # ranks still running when the first stop() began

    def _stdin(self, rank: int):
        # A remote rank's wrapper stops its program when this pipe closes.
        return subprocess.PIPE if self.remote[rank] else subprocess.DEVNULL

    def start(self) -> None:
        super().start()
        # The wrapper reads the token before anything else (see remote.py);
        # the pipe holds it until ssh has connected.
        line = ((self._token or "") + "\n").encode("utf-8", "surrogateescape")
        for rank, p in enumerate(self.procs):
            if self.remote[rank] and p.stdin is not None:
                try:
                    p.stdin.write(line)
                    p.stdin.flush()
                except OSError:  # ssh is gone already: its status says why
                    pass

    def _signal(self, p: subprocess.Popen, sig: int) -> None:
        # Ctrl-C: a remote rank gets SIGINT through its wrapper ("i" on stdin);
        # SIGINT to the ssh client would only end the session (then SIGTERM).
        if sig == signal.SIGINT and p.stdin is not None and not p.stdin.closed and p.poll() is None:
            try:
                p.stdin.write(b"i")
                p.stdin.flush()
                return
            except OSError:
                pass
        super()._signal(p, sig)

    def _close_stdins(self) -> None:
        for p in self.procs:
            if p.stdin is not None and not p.stdin.closed:
                try:
                    p.stdin.close()
                except OSError:
                    pass

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        """Local ranks: SIGTERM. Remote ranks: EOF on their stdin, so that the
        remote wrappers stop their programs and ssh returns; then Job.stop
        (SIGTERM, SIGKILL) for whatever still runs."""
        if self.stopped is None:
            self.stopped = {r for r, p in enumerate(self.procs) if p.poll() is None}
        for rank, p in enumerate(self.procs):
            if not self.remote[rank]:
                self._signal(p, signal.SIGTERM)
        self._close_stdins()
        end = time.monotonic() + REMOTE_GRACE + 2.0
        for rank, p in enumerate(self.procs):
            if self.remote[rank] and self.started[rank]:
                try:
                    p.wait(max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        super().stop(grace)

    def run(self) -> JobResult:
        try:
            return super().run()
        finally:
            self._close_stdins()


@dataclass
class HostfileJobResult(JobResult):
    job_id: int = 0                                        # THUNDERLINK_JOB_ID of every rank
    destinations: list[str] = field(default_factory=list)
    remote: list[bool] = field(default_factory=list)
    started: list[bool] = field(default_factory=list)      # remote wrapper ran (ssh got through)
    unreachable: dict = field(default_factory=dict)        # rank -> ssh's message
    messages: list[str] = field(default_factory=list)      # what was reported on stderr


def _ssh_hint(dest: str) -> str:
    return (f"thunderlink launch runs ssh with BatchMode=yes (no password or host-key prompts): "
            f"check that `ssh {dest} true` works without a prompt (keys: ssh-copy-id {dest}; "
            f"host key: connect once by hand), or pass ssh options (--ssh-option, --ssh-config)")


def launch_hostfile(
    hostfile_path: str,
    program: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    on_line: Callable[[int, str, str], None] | None = None,
    capture: bool = False,
    python: str | None = None,
    ssh_options: Sequence[str] = (),
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    force_ssh: bool = False,
    cwd: str | None = None,
    ssh: str = "ssh",
    default_python: str | None = None,
) -> HostfileJobResult:
    """Run ``program`` as one rank per entry of the hostfile and wait (see the
    module docstring for what runs where).

    program: ``["prog.py", args...]`` (a Python script, run with ``python``)
        or ``["--", "cmd", args...]`` (run as is) -- the CLI's positional part.
    env: the launcher's environment (the CLI passes ``dict(os.environ)``;
        None = this process's): local ranks get it whole, remote ranks get its
        THUNDERLINK_* and MLX_* variables.
    extra_env: NAME -> VALUE given with ``--env``: sent to every rank.
    timeout: stop every rank after this many seconds (status 124).
    on_line, capture: as for :class:`Job` (output is prefixed "[rank] ").
    python: the interpreter for a script on remote hosts (used as given); by
        default ``default_python`` (this interpreter's path, sys.executable) if
        it is executable there, else ``python3``.
    ssh_options: extra ssh arguments, before the defaults (e.g. ``["-F",
        "cfg", "-i", "key", "-o", "Port=2222"]``).
    connect_timeout: ssh's ConnectTimeout, seconds.
    force_ssh: use ssh for loopback entries too.
    cwd: the directory to run in (default: this process's current directory;
        remote hosts fall back to $HOME when it does not exist there).

    Raises ConfigError for a bad hostfile or --env name.
    """
    hf = hostfile_mod.load(hostfile_path)
    if cwd is None:
        cwd = os.getcwd()
    with private_tempdir() as tmp:
        local_path = os.path.join(tmp, "hostfile.json")
        plan = plan_hostfile(hf, program, env=env, extra_env=extra_env, local_hostfile=local_path,
                             python=python, default_python=default_python, cwd=cwd, ssh=ssh,
                             ssh_options=ssh_options,
                             connect_timeout=connect_timeout, force_ssh=force_ssh)
        if any(plan.remote) and shutil.which(ssh) is None:
            raise ConfigError(f"[thunderlink] launch: {ssh!r} not found: install an ssh client (openssh-client)")
        if not all(plan.remote):
            hostfile_mod.write(hf.to_json(), local_path)
        return _run(plan, timeout=timeout, on_line=on_line, capture=capture, cwd=cwd)


def _run(plan: LaunchPlan, *, timeout, on_line, capture, cwd) -> HostfileJobResult:
    n = len(plan.commands)
    started = [not r for r in plan.remote]
    tails = [collections.deque(maxlen=4) for _ in range(n)]
    output: list[list[str]] = [[] for _ in range(n)]
    show = on_line or Job._print_line

    def line(rank: int, stream: str, text: str) -> None:
        if plan.remote[rank] and not started[rank] and stream == "err" and text == plan.marker:
            started[rank] = True
            return
        if stream == "err" and text.strip():
            tails[rank].append(text.strip())
        if capture:
            output[rank].append(text)
        show(rank, stream, text)

    job = SshJob(plan.commands, plan.envs, remote=plan.remote, started=started, token=plan.token,
                 on_line=line, capture=False, timeout=timeout, cwd=cwd if os.path.isdir(cwd) else None, label=LABEL)
    res = job.run()
    out = HostfileJobResult(status=res.status, returncodes=res.returncodes, failed_rank=res.failed_rank,
                            timed_out=res.timed_out, output=output, job_id=plan.job_id,
                            destinations=plan.destinations,
                            remote=plan.remote, started=started)
    for r, rc in enumerate(res.returncodes):
        if not plan.remote[r] or started[r] or rc is None:
            continue
        status = exit_status(rc)
        dest = plan.destinations[r]
        host = plan.hostfile.ranks[r].host
        where = dest if dest == host else f"{host} ({dest})"
        last = tails[r][-1] if tails[r] else ""
        if status == 255 and r in (job.stopped or ()) and (not last or last.startswith("Killed by signal")):
            # we stopped it (another rank failed) before ssh had connected
            out.messages.append(f"rank {r}: ssh to {where} had not connected yet when the job was stopped")
        elif status == 255:
            why = last or "ssh exited with status 255"
            out.unreachable[r] = why
            out.messages.append(f"cannot reach host {where} over ssh (rank {r}): {why}\n  hint: {_ssh_hint(dest)}")
        elif status == 127:
            out.messages.append(f"rank {r} on {where}: the remote shell could not start the program's "
                                f"interpreter (status 127: {last or 'not found'}); "
                                f"choose it with --python")
    if out.unreachable and out.status == 0:
        out.status = 255
    for m in out.messages:
        sys.stderr.write(f"{LABEL}: {m}\n")
    sys.stderr.flush()
    return out


# --------------------------------------------------------------------------- CLI


def add_cli_arguments(parser) -> None:
    """The options of ``thunderlink launch --hostfile`` (add them to the
    launch parser; ``--env`` and ``--timeout`` are the launcher's own)."""
    parser.add_argument("--hostfile", default=None, metavar="FILE",
                        help="start one rank per entry of this hostfile (thunderlink or MLX ring format) "
                             "over ssh, on the entry's \"ssh\" destination or \"host\"; loopback entries "
                             "run directly")
    parser.add_argument("--python", default=None, metavar="PATH",
                        help="with --hostfile: the interpreter for a Python script on remote hosts "
                             "(default: this interpreter's path if it exists there, else python3)")
    parser.add_argument("--ssh-option", action="append", default=[], metavar="OPTS",
                        help="with --hostfile: extra ssh arguments, split like a shell would "
                             "(e.g. --ssh-option='-o Port=2222'); repeatable")
    parser.add_argument("--ssh-config", default=None, metavar="FILE",
                        help="with --hostfile: ssh client configuration file (ssh -F)")
    parser.add_argument("--ssh-identity", default=None, metavar="FILE",
                        help="with --hostfile: ssh identity (private key) file (ssh -i)")
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS",
                        help=f"with --hostfile: ssh connect timeout (default {DEFAULT_CONNECT_TIMEOUT:g})")
    parser.add_argument("--force-ssh", action="store_true",
                        help="with --hostfile: use ssh for localhost entries too")


def ssh_options_of(args) -> list[str]:
    opts: list[str] = []
    if getattr(args, "ssh_config", None):
        opts += ["-F", args.ssh_config]
    if getattr(args, "ssh_identity", None):
        opts += ["-i", args.ssh_identity]
    for item in getattr(args, "ssh_option", None) or []:
        opts += shlex.split(item)
    return opts


def from_cli_args(args, env: Mapping[str, str], extra_env: Mapping[str, str]) -> int:
    """Run ``thunderlink launch --hostfile`` from parsed arguments; returns the
    exit status. ``env``: the launcher's environment WITHOUT the --env
    assignments; ``extra_env``: the --env assignments."""
    try:
        return launch_hostfile(
            args.hostfile, args.program, env=env, extra_env=extra_env,
            timeout=getattr(args, "timeout", None), python=getattr(args, "python", None),
            ssh_options=ssh_options_of(args),
            connect_timeout=getattr(args, "connect_timeout", DEFAULT_CONNECT_TIMEOUT),
            force_ssh=getattr(args, "force_ssh", False),
        ).status
    except ConfigError as e:
        msg = str(e)
        if msg.startswith("[thunderlink] "):
            msg = msg[len("[thunderlink] "):]
        sys.stderr.write(f"{LABEL}: {msg}\n")
        return 2
