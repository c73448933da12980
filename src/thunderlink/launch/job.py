"""Run one process per rank, stream their output, stop them all when one fails.

Every process starts in its own session (process group), so that stopping a
rank stops what it started too. Output lines are prefixed with the rank.
When a rank exits with a non-zero status, the others get SIGTERM, then
SIGKILL after a grace period, and the job's status is that rank's.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

__all__ = ["Job", "JobResult", "exit_status"]

GRACE_SECONDS = 3.0


def exit_status(returncode: int) -> int:
    """A shell-style status: 128 + signal for a process killed by a signal."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class JobResult:
    status: int                      # 0, or the failing rank's status
    returncodes: list[int | None]    # per rank (None: never finished)
    failed_rank: int | None = None   # the first rank that failed
    timed_out: bool = False
    output: list[list[str]] = field(default_factory=list)  # per rank, when captured


class Job:
    """Processes for ranks 0..n-1.

    ``on_line(rank, stream, line)`` receives every output line (stream is
    "out" or "err", the line without its newline); by default lines go to
    this process's stdout/stderr prefixed with "[rank] ". With
    ``capture=True`` lines are also kept in the result.
    """

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        envs: Sequence[dict] | None = None,
        *,
        on_line: Callable[[int, str, str], None] | None = None,
        capture: bool = False,
        timeout: float | None = None,
        cwd: str | None = None,
        label: str = "thunderlink launch",
    ):
        self.commands = [list(c) for c in commands]
        self.envs = list(envs) if envs is not None else [None] * len(self.commands)
        self.on_line = on_line or self._print_line
        self.capture = capture
        self.timeout = timeout
        self.cwd = cwd
        self.label = label
        self.procs: list[subprocess.Popen] = []
        self._output: list[list[str]] = [[] for _ in self.commands]
        self._partial: dict = {}

    @staticmethod
    def _print_line(rank: int, stream: str, line: str) -> None:
        out = sys.stdout if stream == "out" else sys.stderr
        out.write(f"[{rank}] {line}\n")
        out.flush()

    def _note(self, text: str) -> None:
        sys.stderr.write(f"{self.label}: {text}\n")
        sys.stderr.flush()

    def _stdin(self, rank: int):
        """What a rank reads: nothing (the launcher's terminal stays its own)."""
        return subprocess.DEVNULL

    def start(self) -> None:
        for rank, (cmd, env) in enumerate(zip(self.commands, self.envs)):
            try:
                p = subprocess.Popen(
                    cmd,
                    env=env,
                    cwd=self.cwd,
                    stdin=self._stdin(rank),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            except OSError as e:
                self.stop()
                raise OSError(e.errno, f"cannot start rank {rank} ({cmd[0]}): {e.strerror}") from None
            self.procs.append(p)

    def _signal(self, p: subprocess.Popen, sig: int) -> None:
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        """SIGTERM every running rank, SIGKILL those still running after grace."""
        for p in self.procs:
            self._signal(p, signal.SIGTERM)
        end = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            self._signal(p, signal.SIGKILL)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        # A killed rank may leave children in its group: kill the groups too.
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _feed(self, rank: int, stream: str, data: bytes, final: bool = False) -> None:
        key = (rank, stream)
        buf = self._partial.get(key, b"") + data
        *lines, rest = buf.split(b"\n")
        if final and rest:
            lines.append(rest)
            rest = b""
        self._partial[key] = rest
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if self.capture:
                self._output[rank].append(line)
            self.on_line(rank, stream, line)

    def run(self) -> JobResult:
        """Start (if needed) and wait. Never returns while a rank is running."""
        if not self.procs:
            self.start()
        sel = selectors.DefaultSelector()
        for rank, p in enumerate(self.procs):
            for stream, pipe in (("out", p.stdout), ("err", p.stderr)):
                os.set_blocking(pipe.fileno(), False)
                sel.register(pipe, selectors.EVENT_READ, (rank, stream))
        start = time.monotonic()
        failed: int | None = None
        timed_out = False
        interrupted = 0
        stop_at: float | None = None  # set by Ctrl-C: SIGINT first, then stop
        stopped = False
        exited_at: float | None = None

        def on_sigint(signum, frame):
            nonlocal interrupted
            interrupted += 1

        old = None
        try:
            old = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread
            pass
        try:
            while True:
                for key, _ in sel.select(timeout=0.1):
                    rank, stream = key.data
                    try:
                        data = os.read(key.fileobj.fileno(), 65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        sel.unregister(key.fileobj)
                        self._feed(rank, stream, b"", final=True)
                    else:
                        self._feed(rank, stream, data)
                now = time.monotonic()
                if interrupted and stop_at is None:
                    self._note("interrupted; stopping every rank")
                    for p in self.procs:
                        self._signal(p, signal.SIGINT)
                    stop_at = now + GRACE_SECONDS
                if failed is None and stop_at is None and not stopped:
                    for rank, p in enumerate(self.procs):
                        rc = p.poll()
                        if rc is not None and rc != 0:
                            failed = rank
                            self._note(f"rank {rank} exited with status {exit_status(rc)}; stopping the other ranks")
                            break
                running = any(p.poll() is None for p in self.procs)
                if self.timeout is not None and running and not timed_out and now - start > self.timeout:
                    timed_out = True
                    self._note(f"timed out after {self.timeout:g} s; stopping every rank")
                if not stopped and (failed is not None or timed_out or (stop_at is not None and now > stop_at)):
                    stopped = True
                    self.stop()
                    running = False
                if not running:
                    # Wait briefly for the last output; a rank's orphans may
                    # hold its pipes open, and must not keep the job alive.
                    exited_at = exited_at or now
                    if not sel.get_map() or now - exited_at > 1.0:
                        break
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
            for key in list(sel.get_map().values()):
                sel.unregister(key.fileobj)
            for p in self.procs:
                for pipe in (p.stdout, p.stderr):
                    try:
                        pipe.close()
                    except OSError:
                        pass
            # The job ends with its ranks: stop whatever they left running in
            # their process groups too.
            self.stop(grace=0.5 if any(p.poll() is None for p in self.procs) else 0.0)
        codes = [p.returncode for p in self.procs]
        if timed_out:
            status = 124
        elif failed is not None:
            status = exit_status(codes[failed])
        elif stop_at is not None:
            status = 130
        else:
            status = next((exit_status(c) for c in codes if c), 0)
        return JobResult(status=status, returncodes=codes, failed_rank=failed, timed_out=timed_out,
                         output=self._output)
