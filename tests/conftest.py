"""Shared fixtures: running a function of tests/rankprogs.py as N ranks.

Every multi-process test goes through ``run_ranks``: the ranks are started
by thunderlink's own launcher, with a hard timeout; the launcher kills every
process group it started when one rank fails or the time is up, and removes
its temporary hostfile.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import sys
import threading

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RANKPROGS = os.path.join(HERE, "rankprogs.py")

import thunderlink  # noqa: E402

# Tests run hermetic: a tuning profile at the default path
# (~/.config/thunderlink/tuning.json, from a `thunderlink tune` on this
# machine) must not change what they run. Tests of profiles set the variable.
os.environ.setdefault("THUNDERLINK_TUNING_FILE", "")

# The folder holding the thunderlink package under test (site-packages once
# installed, src/ in a development build), for subprocesses that need it on
# their PYTHONPATH: never the source tree of an installed package, whose
# compiled modules live elsewhere.
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(thunderlink.__file__)))


def result_of(output: str, who: str, tag: str = "RESULT "):
    """The JSON after ``tag`` on the last line of ``output`` that starts with
    it (a rank program's RESULT line); fails the test, naming ``who`` and
    showing the output, when no line does."""
    found = [line[len(tag):] for line in output.splitlines() if line.startswith(tag)]
    if not found:
        pytest.fail(f"{who} printed no {tag.strip()} line; its output:\n{output}", pytrace=False)
    return json.loads(found[-1])


class Ranks:
    def __init__(self, result):
        self.result = result
        self.status = result.status
        self.output = result.output
        # Each rank's RESULT value, None where a rank printed none (see results()).
        self.values = []
        for lines in result.output:
            found = None
            for line in lines:
                if line.startswith("RESULT "):
                    found = json.loads(line[len("RESULT "):])
            self.values.append(found)

    def results(self) -> list:
        """Every rank's RESULT value; fails the test, naming the rank and
        showing its output, where a rank printed none."""
        return [result_of(self.text(r), f"rank {r} (job status {self.status})") for r in range(len(self.output))]

    def text(self, rank: int) -> str:
        return "\n".join(self.output[rank])

    def all_text(self) -> str:
        return "\n".join(f"--- rank {r} ---\n{self.text(r)}" for r in range(len(self.output)))


def run_ranks(n: int, func: str, *args, env: dict | None = None, timeout: float = 60.0, argv=None):
    """Run rankprogs.<func>(*args) on n local ranks; returns Ranks (each
    rank's RESULT value, output and status)."""
    from thunderlink.launch import launch_local

    full_env = dict(os.environ)
    full_env.setdefault("THUNDERLINK_CONNECT_TIMEOUT", "20")
    full_env.setdefault("THUNDERLINK_TIMEOUT", "30")
    if env:
        full_env.update(env)
    cmd = argv or [sys.executable, RANKPROGS, func, json.dumps(list(args))]
    result = launch_local(n, cmd, env=full_env, timeout=timeout, capture=True, on_line=lambda *a: None)
    return Ranks(result)


@pytest.fixture
def ranks():
    return run_ranks


# The transports every test of the `transport` axis runs over: ranks of one
# host take shared memory by default, so TCP is forced for its part. RDMA
# runs over the software ibverbs provider (thunderlink.testing.softverbs);
# the collective and error tests also run it with jitter (completions
# delayed and reordered: `@with_jitter`), which costs too much CI time to
# repeat for every test of the axis.
TRANSPORTS = ("tcp", "shm", "rdma")
with_jitter = pytest.mark.parametrize("transport", TRANSPORTS + ("rdma-jitter",), indirect=True)
SOFTVERBS_JITTER_US = "200"


def softverbs_path() -> tuple[str | None, str]:
    """(the software ibverbs provider's library, or None; why not)."""
    try:
        from thunderlink.testing import softverbs
        return softverbs.path(), ""
    except (ImportError, FileNotFoundError) as e:
        return None, str(e)


def use_softverbs(monkeypatch, jitter: bool = False) -> str:
    """Point the RDMA transport of every rank started from here at the
    software provider (THUNDERLINK_IBV_LIB); skip when it cannot be built."""
    path, why = softverbs_path()
    if path is None:
        pytest.skip(f"the software ibverbs provider is not available: {why}")
    monkeypatch.setenv("THUNDERLINK_IBV_LIB", path)
    monkeypatch.delenv("THUNDERLINK_IBV_DEVICE", raising=False)
    if jitter:
        monkeypatch.setenv("SOFTVERBS_JITTER_US", SOFTVERBS_JITTER_US)
    else:
        monkeypatch.delenv("SOFTVERBS_JITTER_US", raising=False)
    return path


@pytest.fixture(params=TRANSPORTS)
def transport(request, monkeypatch):
    """THUNDERLINK_TRANSPORT for the test's ranks (the transport axis)."""
    if request.param.startswith("rdma"):
        use_softverbs(monkeypatch, jitter=request.param == "rdma-jitter")
        return "rdma"
    return request.param


_names = itertools.count()
_RUN = f"{os.getpid() % 4096:03x}{secrets.token_hex(1)}"


def unique_name(prefix: str) -> str:
    """A short name no other test run uses (namespaces, clusters)."""
    return f"{prefix}{_RUN}{next(_names)}"


def pytest_collection_modifyitems(config, items):
    """A module's TEST_TIMEOUT_S is its tests' hard limit (pytest-timeout)."""
    for item in items:
        limit = getattr(item.module, "TEST_TIMEOUT_S", None)
        if limit is not None:
            item.add_marker(pytest.mark.timeout(limit))


class _TestTimeout(Exception):
    pass


@pytest.fixture(autouse=True)
def _watchdog(request):
    """Without pytest-timeout installed, a SIGALRM watchdog enforces a
    module's TEST_TIMEOUT_S, so that a hung test fails (and its fixtures
    clean up) instead of hanging the run."""
    limit = getattr(request.module, "TEST_TIMEOUT_S", None)
    if (limit is None or request.config.pluginmanager.hasplugin("timeout")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return

    def on_alarm(signum, frame):
        raise _TestTimeout(f"test exceeded {limit}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_gathers(r, n: int) -> None:
    """The `gathers` rank program's verdict: it ran, no case failed on any
    rank, and every rank holds the same bytes (reduce_scatter blocks differ
    by rank)."""
    assert r.status == 0, r.all_text()
    for rank in range(n):
        bad = {k: c["err"] for k, c in r.values[rank].items() if c["err"]}
        assert not bad, f"rank {rank}: {bad}"
    hashes = [{k: c["hash"] for k, c in v.items() if not k.startswith("reduce")} for v in r.values]
    assert all(h == hashes[0] for h in hashes)
