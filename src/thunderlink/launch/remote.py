"""The rank wrapper that ``thunderlink launch`` runs on a remote host over ssh.

    python -m thunderlink.launch.remote [--token-on-stdin] HOSTFILE_PATH HOSTFILE_TEXT MODE MARKER ARGV...

With --token-on-stdin the wrapper first reads one line from its stdin: the
job's token, which the program gets as THUNDERLINK_TOKEN in its environment
(never on a command line, where ``ps`` would show it to every user; an
empty line: no token). MODE "python" runs ARGV with this interpreter, "exec" runs ARGV as is. The
wrapper writes the hostfile to HOSTFILE_PATH (O_EXCL, mode 0600), prints
MARKER on stderr (so the launcher knows ssh got this far), runs the program in
its own session (process group), and removes the hostfile when it is done.

It stops the program (SIGTERM to its process group, SIGKILL ``GRACE`` seconds
later) when its stdin reaches end of file (the launcher closed the pipe, or the
ssh session ended), when it is orphaned (sshd went away), or on
SIGTERM/SIGINT/SIGHUP; an "i" read on stdin passes SIGINT on (Ctrl-C at the
launcher). When the program exits, what is left of its process group is
stopped too, so that orphans holding the ssh channel open cannot hang the job.
Exit status: the program's, 128 + signal when it was stopped or killed.
See thunderlink.launch.ssh for the launcher's side.
"""

from __future__ import annotations

import os
import sys

# ``-m`` puts the working directory (the launcher's) first on sys.path; a file
# there named like a module below must not replace it.
sys.path[:] = [p for p in sys.path if p not in ("", ".", os.getcwd())]

import select  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

__all__ = ["GRACE", "TOKEN_FLAG", "main", "read_token_line"]

GRACE = 2.0  # seconds between SIGTERM and SIGKILL
TOKEN_FLAG = "--token-on-stdin"
TOKEN_WAIT = 60.0  # seconds to wait for the token line (ssh forwards it at once)
_TOKEN_MAX = 65536


def read_token_line(fd: int = 0, timeout: float = TOKEN_WAIT, stop=()) -> str | None:
    """The first line of ``fd``, read a byte at a time so that what follows
    (the launcher's "i" for Ctrl-C) stays unread; None at end of file, after
    ``timeout`` seconds without a whole line, or once ``stop`` (the signals
    caught) is not empty."""
    data = bytearray()
    end = time.monotonic() + timeout
    while len(data) <= _TOKEN_MAX:
        left = end - time.monotonic()
        if left <= 0 or stop:
            return None
        try:
            if not select.select([fd], [], [], min(left, 0.2))[0]:
                continue
            b = os.read(fd, 1)
        except InterruptedError:
            continue
        except OSError:
            return None
        if not b:
            return None
        if b == b"\n":
            return data.decode("utf-8", "surrogateescape").rstrip("\r")
        data += b
    return None


def killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except OSError:
        return False


def _write_hostfile(path: str, text: str) -> str | None:
    """Create ``path`` (never an existing file or a link) holding ``text``; the reason on failure."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        return e.strerror
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return None


def _watch(child: subprocess.Popen, stop: list) -> bool:
    """Wait for ``child``, passing on "i" from stdin as SIGINT. True when the
    program must be stopped (stdin closed, a signal, orphaned)."""
    ppid = os.getppid()
    watch = True
    while child.poll() is None:
        if stop or os.getppid() != ppid:
            return True
        if not watch:
            time.sleep(0.1)
            continue
        try:
            ready = select.select([0], [], [], 0.1)[0]
        except (OSError, ValueError):
            watch = False
            continue
        if ready:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            if not data:  # the launcher closed our stdin, or the session ended
                return True
            if b"i" in data:  # the launcher was interrupted (Ctrl-C): pass it on
                killpg(child.pid, signal.SIGINT)
    return False


def _stop(pgid: int, grace: float, alive) -> None:
    """SIGTERM to the process group, SIGKILL once ``grace`` seconds pass with ``alive()`` true."""
    killpg(pgid, signal.SIGTERM)
    end = time.time() + grace
    while alive() and time.time() < end:
        time.sleep(0.02)
    killpg(pgid, signal.SIGKILL)


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else args
    token_on_stdin = bool(args) and args[0] == TOKEN_FLAG
    if token_on_stdin:
        args = args[1:]
    if len(args) < 5:
        sys.stderr.write(f"usage: python -m thunderlink.launch.remote [{TOKEN_FLAG}] HOSTFILE_PATH "
                         "HOSTFILE_TEXT python|exec MARKER ARGV... (run by thunderlink launch over ssh)\n")
        return 2
    path, text, mode, marker = args[:4]
    argv = args[4:]
    if mode == "python":
        argv = [sys.executable] + argv
    stop: list[int] = []

    def on_signal(signum, frame):
        stop.append(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    env = None
    if token_on_stdin:
        token = read_token_line(0, stop=stop)
        if stop:
            return 128 + stop[0]
        if token is None:
            sys.stderr.write("thunderlink launch: the rank wrapper did not receive the job's token on its "
                             "standard input (the launcher went away?)\n")
            return 71
        env = dict(os.environ)
        env.pop("THUNDERLINK_TOKEN_FILE", None)
        if token:
            env["THUNDERLINK_TOKEN"] = token
        else:
            env.pop("THUNDERLINK_TOKEN", None)
    why = _write_hostfile(path, text)
    if why is not None:
        sys.stderr.write(f"thunderlink launch: cannot write the hostfile {path} on this host: {why}\n")
        return 71
    try:
        if stop:
            return 128 + stop[0]
        try:
            sys.stderr.write(marker + "\n")
            sys.stderr.flush()
        except OSError:  # the session is gone already
            return 141
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        except OSError as e:
            sys.stderr.write(f"thunderlink launch: cannot run {argv[0]}: {e.strerror}\n")
            return 127
        if _watch(child, stop):
            _stop(child.pid, GRACE, lambda: child.poll() is None)
        rc = child.wait()
        # What is left of the program's process group would keep the ssh channel open.
        if killpg(child.pid, 0):
            _stop(child.pid, 0.5, lambda: killpg(child.pid, 0))
        return 128 - rc if rc < 0 else rc
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
