"""Cleanup: the clusters this process owns are removed at interpreter exit and
on SIGTERM/SIGINT (handlers chain to whatever was installed before), and the
processes a cluster started, or that still run in its namespaces, are killed."""

from __future__ import annotations

import atexit
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from .net import ip

_LIVE: dict[int, Any] = {}  # id(cluster) -> Cluster, while up
_LIVE_LOCK = threading.RLock()
_HANDLERS_PID: int | None = None
_PREV_HANDLERS: dict[int, Any] = {}


def track(cluster) -> None:
    """Record an up cluster; unless it is persistent, remove it when this process exits or is signalled."""
    with _LIVE_LOCK:
        _LIVE[id(cluster)] = cluster
    if not cluster.persistent:
        _install_cleanup_handlers()


def untrack(cluster) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(id(cluster), None)


def _cleanup_owned() -> None:
    pid = os.getpid()
    with _LIVE_LOCK:
        clusters = [c for c in _LIVE.values() if c._owner_pid == pid and not c.persistent]
    for c in clusters:
        try:
            c.down()
        except Exception as e:  # pragma: no cover - best effort at exit
            print(f"thunderlink.testing.cluster: cleanup of {c.name} failed: {e}", file=sys.stderr)


def _on_signal(signum, frame):
    _cleanup_owned()
    prev = _PREV_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(prev):
        return prev(signum, frame)
    if prev == signal.SIG_IGN:
        return None
    # SIG_DFL (or unknown, e.g. installed from C): die of the signal as we would have.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return None


def _install_cleanup_handlers() -> None:
    global _HANDLERS_PID
    pid = os.getpid()
    if _HANDLERS_PID == pid:
        return
    _HANDLERS_PID = pid
    atexit.register(_cleanup_owned)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still applies
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            prev = signal.getsignal(sig)
            if prev is _on_signal:
                continue
            _PREV_HANDLERS[sig] = prev if prev is not None else signal.SIG_DFL
            signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # pragma: no cover
            pass


# --------------------------------------------------------------------------- the cluster


def kill_procs(procs: list[subprocess.Popen]) -> None:
    """SIGTERM the process groups of ``procs``, SIGKILL what is left after a second; empties the list."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 1.0
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in live:
        if p.poll() is None:
            killpg(p.pid, signal.SIGKILL)
            try:
                p.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
    procs.clear()


def kill_netns_pids(ns: str) -> None:
    """SIGKILL whatever still runs inside one of *our* namespaces (e.g. from `cluster exec`)."""
    cp = ip("netns", "pids", ns, check=False)
    pids = [int(x) for x in cp.stdout.split() if x.isdigit()]
    me = os.getpid()
    for pid in pids:
        if pid != me:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    if pids:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            cp = ip("netns", "pids", ns, check=False)
            if not cp.stdout.split():
                break
            time.sleep(0.02)


def killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    except OSError as e:  # pragma: no cover
        if e.errno != errno.ESRCH:
            raise


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
