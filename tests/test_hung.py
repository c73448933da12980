"""Hung peers are found within seconds, busy ones are not declared dead, and
Ctrl-C interrupts an MLX collective whose peer hangs.

A stopped process (SIGSTOP), a pulled cable (packets dropped, no reset) and
a frozen machine all fall silent: no heartbeat, no byte. A rank waiting on
such a peer must fail with PeerLostError naming it and saying how long it
has been silent, within THUNDERLINK_HEARTBEAT (small here: 2 s) and a
margin; every other rank learns it through the abort path. A rank that
computes (Python, numpy, sleep) for several bounds before joining is alive
and is waited for.

Ranks are started here (not through the launcher) so that the test can
stop and continue them; each test kills every process it started, whatever
happens, and has a hard timeout.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import HERE, result_of
from thunderlink.hosts.hostfile import local_hostfile, write
from thunderlink.launch.local import free_ports, rank_env

TEST_TIMEOUT_S = 120
PROGS = os.path.join(HERE, "hungprogs.py")
BOUND = 2.0     # THUNDERLINK_HEARTBEAT in these tests
MARGIN = 2.5    # poll granularity, a loaded 2-core machine, the abort path


class Job:
    """n ranks of a hungprogs function, started directly, each in its own
    session (so that a signal reaches exactly one); output to files."""

    def __init__(self, tmp_path, n, func, *args, env=None):
        self.tmp = tmp_path
        hostfile = str(tmp_path / "hosts.json")
        write(local_hostfile(n, free_ports(n)), hostfile)
        base = dict(os.environ, THUNDERLINK_CONNECT_TIMEOUT="20", THUNDERLINK_TIMEOUT="60",
                    THUNDERLINK_HEARTBEAT=str(BOUND))
        base.update(env or {})
        job_id = random.getrandbits(63)
        self.procs, self.outs = [], []
        for r in range(n):
            out = open(tmp_path / f"rank{r}.txt", "w+")
            self.outs.append(out)
            self.procs.append(subprocess.Popen(
                [sys.executable, PROGS, func, json.dumps(list(args))],
                env=rank_env(base, r, n, hostfile, job_id), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True))

    def text(self, r) -> str:
        self.outs[r].flush()
        with open(self.tmp / f"rank{r}.txt") as f:
            return f.read()

    def all_text(self) -> str:
        return "\n".join(f"--- rank {r} ---\n{self.text(r)}" for r in range(len(self.procs)))

    def wait_for(self, r, pattern, timeout=30.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(pattern, self.text(r))
            if m:
                return m
            if self.procs[r].poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"rank {r} never printed {pattern!r}:\n{self.all_text()}", pytrace=False)

    def wait(self, ranks, timeout=30.0):
        for r in ranks:
            try:
                self.procs[r].wait(max(0.1, timeout))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {r} did not finish in {timeout} s:\n{self.all_text()}", pytrace=False)

    def result(self, r):
        return result_of(self.text(r), f"rank {r} (exit {self.procs[r].poll()})")

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        pass
            p.wait()
        for f in self.outs:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def found_it(v) -> bool:
    """Did this rank find the silence itself (not learn it from a peer's
    abort notice, "rank R failed: ...")?"""
    return "silent for" in v["message"] and " failed: " not in v["message"]


def assert_silent_named(v, peer, bound=BOUND):
    assert v["raised"] == "PeerLostError", v
    assert f"rank {peer} " in v["message"] and "silent for" in v["message"], v
    secs = float(re.search(r"silent for ([0-9.]+) s", v["message"]).group(1))
    assert bound <= secs < bound + MARGIN, v


@pytest.mark.parametrize("size", [4096, 8 << 20], ids=["small", "8MiB"])
def test_stopped_rank_is_found_within_the_bound(tmp_path, transport, size):
    """SIGSTOP rank 2 of 3 between collectives: ranks 0 and 1 fail with
    PeerLostError within the bound (one of them says rank 2 is silent, the
    other may learn it from the first); once continued, rank 2 fails cleanly
    too."""
    with Job(tmp_path, 3, "stop_mid_job", 2, size, env={"THUNDERLINK_TRANSPORT": transport}) as job:
        job.wait_for(2, r"STOPPING (\d+)")
        job.wait([0, 1], timeout=BOUND + 20)
        got = [job.result(r) for r in (0, 1)]
        for v in got:
            assert v["raised"] == "PeerLostError", job.all_text()
            assert v["seconds"] < BOUND + MARGIN, job.all_text()
        direct = [v for v in got if found_it(v)]
        assert direct, job.all_text()
        for v in direct:
            assert_silent_named(v, 2)
            assert "THUNDERLINK_HEARTBEAT" in v["message"]
        # SIGCONT: the stopped rank resumes into a job that gave up on it, and
        # fails cleanly (no crash, no hang).
        os.killpg(job.procs[2].pid, signal.SIGCONT)
        job.wait([2], timeout=BOUND + 20)
        assert job.procs[2].returncode == 0, job.all_text()
        v = job.result(2)
        assert v["raised"] == "PeerLostError", job.all_text()
        # ... and hears why: the others' notice, not just a closed socket.
        assert "silent for" in v["message"], job.all_text()


def test_rank_stopped_mid_collective_is_found_within_the_bound(tmp_path, transport):
    """SIGSTOP from outside while every rank loops over 1 MiB all_sums: the
    signal lands anywhere, mid-frame included. The others fail within the
    bound of the stop, one of them naming rank 1 as silent; continued, rank
    1 fails cleanly."""
    with Job(tmp_path, 3, "loop_until_error", None, env={"THUNDERLINK_TRANSPORT": transport}) as job:
        for r in range(3):
            job.wait_for(r, r"ready")
        time.sleep(0.3 + random.random() * 0.5)
        os.killpg(job.procs[1].pid, signal.SIGSTOP)
        stopped = time.time()
        job.wait([0, 2], timeout=BOUND + 20)
        got = [job.result(r) for r in (0, 2)]
        for v in got:
            assert v["raised"] == "PeerLostError", job.all_text()
            assert v["at"] - stopped < BOUND + MARGIN, (v, stopped)
        direct = [v for v in got if found_it(v)]
        assert direct, job.all_text()
        for v in direct:
            assert_silent_named(v, 1)
        os.killpg(job.procs[1].pid, signal.SIGCONT)
        job.wait([1], timeout=BOUND + 20)
        assert job.procs[1].returncode == 0, job.all_text()
        v = job.result(1)
        assert v["raised"] == "PeerLostError" and "silent for" in v["message"], job.all_text()


@pytest.mark.parametrize("how", ["sleep", "python", "numpy"])
def test_busy_rank_is_not_declared_dead(tmp_path, transport, how):
    """Rank 1 computes for 3 bounds before it joins an all_sum the others
    wait in (a Python loop holds the GIL throughout): its heartbeats keep
    them waiting, and everyone gets the right sum."""
    busy = 3 * BOUND
    with Job(tmp_path, 3, "busy_then_join", 1, busy, how, env={"THUNDERLINK_TRANSPORT": transport}) as job:
        job.wait(range(3), timeout=busy + 30)
        for r in range(3):
            v = job.result(r)
            assert v["raised"] is None and v["ok"], job.all_text()
        assert job.result(0)["waited"] > busy * 0.8, job.all_text()


def test_heartbeats_off_waits_for_the_timeout(tmp_path):
    """THUNDERLINK_HEARTBEAT=0: today's behaviour, a stopped peer is found by
    THUNDERLINK_TIMEOUT (here 4 s) and called a timeout."""
    env = {"THUNDERLINK_TRANSPORT": "tcp", "THUNDERLINK_HEARTBEAT": "0", "THUNDERLINK_TIMEOUT": "4"}
    with Job(tmp_path, 2, "stop_mid_job", 1, 4096, env=env) as job:
        job.wait_for(1, r"STOPPING")
        job.wait([0], timeout=30)
        v = job.result(0)
        assert v["raised"] == "CollectiveTimeoutError", job.all_text()
        assert v["seconds"] >= 3.5, v


def test_one_heartbeat_thread_and_none_left_after_close(tmp_path, transport):
    """100 communicators made and closed (three alive at once at times):
    one heartbeat thread per process whatever their number, and none left
    once the last is closed."""
    with Job(tmp_path, 2, "churn", 100, env={"THUNDERLINK_TRANSPORT": transport}) as job:
        job.wait([0, 1], timeout=100)
        for r in range(2):
            v = job.result(r)
            assert v["with_one"] == 1, v
            assert v["most"] == 1, v
            assert v["after_kids"] == 1, v
            assert v["heartbeats_after_all"] == 0, v
            assert v["after_all"] == v["base"], v


def test_a_forked_child_does_not_disturb_heartbeats(tmp_path, transport):
    """fork() with a communicator open: the child has no heartbeat thread,
    closes its copy at once, and the parent's collectives go on."""
    with Job(tmp_path, 2, "fork_then_collective", None, env={"THUNDERLINK_TRANSPORT": transport}) as job:
        job.wait([0, 1], timeout=60)
        for r in range(2):
            v = job.result(r)
            assert v == {"child": 0, "sum": 3.0}, job.all_text()


# ---- a pulled cable, on emulated hosts --------------------------------------------


def _drop_everything(ns, ifname):
    """Every packet leaving this end of the cable vanishes, silently (no
    reset, no error to the sender): a token bucket too small for any packet.
    (netem and packet filters are not always in the kernel; tbf is.)"""
    subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", ifname, "root", "tbf", "rate", "8kbit",
                    "burst", "64", "limit", "1"], check=True, capture_output=True)


def test_pulled_cable_is_found_within_the_bound(tmp_path):
    """Three emulated hosts in a ring; the cable between hosts 0 and 1
    starts dropping every packet mid-run (no reset: a pulled cable). Ranks 0
    and 1 find each other silent within the bound, long before
    THUNDERLINK_TIMEOUT (60 s), and rank 2 learns it from them."""
    from thunderlink.launch.ssh import launch_hostfile
    from thunderlink.testing import cluster as cl

    ok, why = cl.available(shaping=True)
    if not ok:
        pytest.skip(why)
    from conftest import Ranks, unique_name

    with cl.Cluster(3, topology="ring", name=unique_name("th")) as c:
        path = tmp_path / "hosts.json"
        path.write_text(json.dumps(c.hostfile()))
        pulled = threading.Event()
        seen, when = set(), []

        def on_line(rank, stream, line):
            if line == "ready":
                seen.add(rank)
                if len(seen) == 3 and not pulled.is_set():
                    threading.Thread(target=pull, daemon=True).start()
                    pulled.set()

        def pull():
            time.sleep(0.5)
            cable = c.cable(0, 1)
            when.append(time.time())
            _drop_everything(cable.netns_a, cable.ifname_a)
            _drop_everything(cable.netns_b, cable.ifname_b)

        env = dict(os.environ, THUNDERLINK_CONNECT_TIMEOUT="20", THUNDERLINK_TIMEOUT="60",
                   THUNDERLINK_HEARTBEAT=str(BOUND))
        res = launch_hostfile(str(path), ["--", sys.executable, PROGS, "loop_until_error", "[null]"], env=env,
                              timeout=60, capture=True, on_line=on_line)
        r = Ranks(res)
        assert when, r.all_text()
        vals = r.results()
        for v in vals:
            assert v["raised"] == "PeerLostError", r.all_text()
            assert v["at"] - when[0] < BOUND + MARGIN, (v, when)
        silent = [(rank, v) for rank, v in enumerate(vals) if found_it(v)]
        assert silent, r.all_text()
        for rank, v in silent:
            assert rank in (0, 1), r.all_text()
            assert_silent_named(v, 1 - rank)


# ---- Ctrl-C ---------------------------------------------------------------------


def _interrupt_mlx(tmp_path, transport, handler):
    pytest.importorskip("mlx.core")
    with Job(tmp_path, 2, "mlx_interrupted", 1, handler, env={"THUNDERLINK_TRANSPORT": transport}) as job:
        job.wait_for(1, r"HANGING")
        job.wait_for(0, r"WAITING")
        time.sleep(0.5)  # in mx.eval, its collective waiting on rank 1
        sent = time.time()
        os.kill(job.procs[0].pid, signal.SIGINT)
        job.wait([0], timeout=10)
        v = job.result(0)
        assert job.procs[0].returncode == 0, job.all_text()
        assert v["now"] - sent < 2.0, v  # mx.eval returned within 2 s of the signal
        # Later collectives on the group fail at once, and say why.
        assert v["after"] is not None and v["after"][0] == "RuntimeError", v
        assert "Ctrl-C" in v["after"][1] and "no longer usable" in v["after"][1], v
        assert v["after"][2] < 1.0, v
        return v


def test_ctrl_c_interrupts_an_mlx_collective_whose_peer_hangs(tmp_path, transport):
    """A rank started directly waits in mx.eval on a peer that never joins:
    SIGINT makes mx.eval raise KeyboardInterrupt (once) within 2 s, not
    after THUNDERLINK_TIMEOUT."""
    v = _interrupt_mlx(tmp_path, transport, "default")
    assert v["raised"] == "KeyboardInterrupt", v


def test_ctrl_c_with_the_programs_own_handler(tmp_path):
    """A program with its own SIGINT handler (one that does not raise): the
    handler runs, and mx.eval raises RuntimeError saying the collective was
    interrupted (the handler is kept, not replaced)."""
    v = _interrupt_mlx(tmp_path, "tcp", "own")
    assert v["handler_ran"], v
    assert v["raised"] == "RuntimeError" and "Ctrl-C" in v["message"], v


def test_ctrl_c_interrupts_a_numpy_collective_at_once(tmp_path, transport):
    """The numpy API waits on the main thread: SIGINT ends the wait at once
    (KeyboardInterrupt), and the communicator is poisoned."""
    with Job(tmp_path, 2, "numpy_interrupted", 1, env={"THUNDERLINK_TRANSPORT": transport}) as job:
        job.wait_for(1, r"HANGING")
        job.wait_for(0, r"WAITING")
        time.sleep(0.5)
        sent = time.time()
        os.kill(job.procs[0].pid, signal.SIGINT)
        job.wait([0], timeout=10)
        v = job.result(0)
        assert v["raised"] == "KeyboardInterrupt", v
        assert v["now"] - sent < 1.0, v
        assert v["after"] and v["after"][0] == "InterruptedCollectiveError", v
