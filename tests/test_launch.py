"""The launcher: `python -m thunderlink launch` and thunderlink.launch.Job /
launch_local. Output prefixes, the rank environment, failure propagation,
signals, timeouts, process groups, and no stray processes afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import PKG_ROOT as SRC  # the thunderlink under test's folder

from thunderlink.launch import Job, JobResult, exit_status, launch_local, rank_env
from thunderlink.hosts.hostfile import parse

pytestmark = pytest.mark.multiproc

HARD_TIMEOUT = 30  # no launcher run in this file may take longer

# One program for every scenario: python rank.py DIR MODE [ARG].
RANK_PROG = textwrap.dedent(r'''
    import json, os, signal, subprocess, sys, time

    rank = int(os.environ["THUNDERLINK_RANK"])
    size = int(os.environ["THUNDERLINK_WORLD_SIZE"])
    d, mode = sys.argv[1], sys.argv[2]
    arg = sys.argv[3] if len(sys.argv) > 3 else None

    def note(name, pid):
        tmp = os.path.join(d, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(str(pid))
        os.replace(tmp, os.path.join(d, name))

    def wait_for(names, limit=20):
        end = time.time() + limit
        while not all(os.path.exists(os.path.join(d, n)) for n in names):
            if time.time() > end:
                sys.exit(99)
            time.sleep(0.02)

    def sleep_forever():
        note(f"rank{rank}.pid", os.getpid())
        time.sleep(60)
        sys.exit(42)  # never reached when the launcher stops us

    if mode == "env":
        keys = ["THUNDERLINK_RANK", "THUNDERLINK_WORLD_SIZE", "THUNDERLINK_HOSTFILE",
                "THUNDERLINK_JOB_ID", "MLX_DISTRIBUTED_BACKEND", "PYTHONUNBUFFERED", "EXTRA", "EQ"]
        info = {k: os.environ.get(k) for k in keys}
        hf = os.environ["THUNDERLINK_HOSTFILE"]
        info["hostfile_exists"] = os.path.exists(hf)
        info["hostfile"] = json.load(open(hf)) if os.path.exists(hf) else None
        info["executable"] = sys.executable
        info["argv"] = sys.argv[1:]
        print("INFO " + json.dumps(info))
        print(f"to stderr from {rank}", file=sys.stderr)
        sys.stdout.write("no newline at the end")
    elif mode == "exit":
        print(f"rank {rank} done")
        sys.exit(int(arg or 0) if rank == size - 1 else 0)
    elif mode in ("fail", "fail_ignore_term"):
        # The last rank fails once the others are asleep.
        if rank == size - 1:
            wait_for([f"rank{r}.pid" for r in range(size - 1)])
            print("failing now", flush=True)
            sys.exit(int(arg))
        if mode == "fail_ignore_term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sleep_forever()
    elif mode == "signal":
        if rank == size - 1:
            wait_for([f"rank{r}.pid" for r in range(size - 1)])
            os.kill(os.getpid(), int(arg))
            time.sleep(10)
        sleep_forever()
    elif mode == "sleep":
        sleep_forever()
    elif mode == "hostfile_then_sleep":
        note(f"hostfile{rank}.path", os.environ["THUNDERLINK_HOSTFILE"])
        sleep_forever()
    elif mode == "child_then_fail":
        if rank == 0:
            child = subprocess.Popen(["sleep", "60"])
            note("child0.pid", child.pid)
            sleep_forever()
        wait_for(["child0.pid", "rank0.pid"])
        sys.exit(5)
    elif mode == "child_then_sleep":
        child = subprocess.Popen(["sleep", "60"])
        note(f"child{rank}.pid", child.pid)
        sleep_forever()
    elif mode == "child_then_exit":
        child = subprocess.Popen(["sleep", "60"])
        note(f"child{rank}.pid", child.pid)
        print("leaving a child behind")
        sys.exit(0)
    elif mode == "pieces":
        for piece in ("hel", "lo wor", "ld\nsecond ", "line\n"):
            sys.stdout.write(piece)
            sys.stdout.flush()
            time.sleep(0.05)
    else:
        sys.exit(f"unknown mode {mode}")
''')


@pytest.fixture
def prog(tmp_path):
    path = tmp_path / "rank.py"
    path.write_text(RANK_PROG)
    return str(path)


@pytest.fixture(autouse=True)
def no_strays(tmp_path):
    """Whatever a test asserts, kill the processes its ranks recorded (and
    only those) so that a failing test leaves nothing behind."""
    yield
    for f in tmp_path.glob("*.pid"):
        try:
            pid = int(f.read_text())
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE and ("sleep" in " ".join(p.cmdline()) or str(tmp_path) in " ".join(p.cmdline())):
                p.kill()
        except (ValueError, psutil.Error):
            pass


def base_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("THUNDERLINK_RANK", "THUNDERLINK_HOSTFILE", "MLX_RANK", "MLX_HOSTFILE", "EXTRA", "EQ"):
        env.pop(k, None)
    env.update(extra)
    return env


def cli(*args, timeout=HARD_TIMEOUT, env=None):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "thunderlink", "launch", *args], env=env or base_env(),
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    p.elapsed = time.monotonic() - t0
    return p


def pids(tmp_path, pattern="*.pid") -> list[int]:
    return [int(f.read_text()) for f in sorted(tmp_path.glob(pattern))]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for a parent that does not reap is gone too
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_gone(pid_list, within: float = 3.0) -> None:
    """Every pid is gone (grandchildren are reaped by init, which may take a moment)."""
    assert pid_list
    end = time.monotonic() + within
    while True:
        left = [p for p in pid_list if alive(p)]
        if not left or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert not left, f"still running: {left}"


def lines_of(text: str, rank: int) -> list[str]:
    prefix = f"[{rank}] "
    return [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]


# ---- the CLI ------------------------------------------------------------------------


def test_rank_environment_and_prefixes(prog, tmp_path):
    n = 3
    p = cli("-n", str(n), prog, str(tmp_path), "env", "x y")
    assert p.returncode == 0, p.stderr
    infos = []
    for r in range(n):
        out = lines_of(p.stdout, r)
        info_lines = [line for line in out if line.startswith("INFO ")]
        assert len(info_lines) == 1, p.stdout
        info = json.loads(info_lines[0][5:])
        infos.append(info)
        assert info["THUNDERLINK_RANK"] == str(r)
        assert info["THUNDERLINK_WORLD_SIZE"] == str(n)
        assert info["MLX_DISTRIBUTED_BACKEND"] == "thunderlink"
        assert info["PYTHONUNBUFFERED"] == "1"
        assert info["THUNDERLINK_JOB_ID"].isdigit()
        assert info["hostfile_exists"]
        assert len(info["hostfile"]["ranks"]) == n
        # The script runs with the launcher's interpreter, with its arguments.
        assert os.path.realpath(info["executable"]) == os.path.realpath(sys.executable)
        assert info["argv"] == [str(tmp_path), "env", "x y"]
        # A last line without a newline still comes out, prefixed.
        assert out[-1] == "no newline at the end"
        assert lines_of(p.stderr, r) == [f"to stderr from {r}"]
    # Every rank of the job shares the hostfile and the job id.
    assert len({i["THUNDERLINK_HOSTFILE"] for i in infos}) == 1
    assert len({i["THUNDERLINK_JOB_ID"] for i in infos}) == 1
    # The hostfile gives each rank its own loopback port.
    hf = parse(infos[0]["hostfile"])
    assert hf.size == n and len({a.port for r in hf.ranks for a in r.addresses}) == n
    # Every output line is prefixed with a rank.
    for line in p.stdout.splitlines():
        assert line[:1] == "[" and line[1:2].isdigit(), line
    # The temporary hostfile is removed afterwards.
    assert not os.path.exists(infos[0]["THUNDERLINK_HOSTFILE"])


def test_job_ids_differ_between_jobs(prog, tmp_path):
    ids = []
    for _ in range(2):
        p = cli("-n", "1", prog, str(tmp_path), "env")
        assert p.returncode == 0, p.stderr
        ids.append(json.loads(lines_of(p.stdout, 0)[0][5:])["THUNDERLINK_JOB_ID"])
    assert ids[0] != ids[1]


def test_env_option_reaches_ranks(prog, tmp_path):
    p = cli("-n", "2", "--env", "EXTRA=hello world", "--env", "EQ=a=b", prog, str(tmp_path), "env")
    assert p.returncode == 0, p.stderr
    for r in range(2):
        info = json.loads(lines_of(p.stdout, r)[0][5:])
        assert info["EXTRA"] == "hello world" and info["EQ"] == "a=b"


def test_bad_env_option(prog, tmp_path):
    p = cli("-n", "2", "--env", "NOVALUE", prog, str(tmp_path), "env")
    assert p.returncode != 0
    assert "--env 'NOVALUE' is not NAME=VALUE" in p.stderr
    assert "Traceback" not in p.stderr


def test_dashdash_runs_any_command(tmp_path):
    p = cli("-n", "2", "--", "sh", "-c", 'echo "rank $THUNDERLINK_RANK of $THUNDERLINK_WORLD_SIZE"; echo oops >&2')
    assert p.returncode == 0, p.stderr
    assert lines_of(p.stdout, 0) == ["rank 0 of 2"]
    assert lines_of(p.stdout, 1) == ["rank 1 of 2"]
    assert lines_of(p.stderr, 0) == ["oops"] and lines_of(p.stderr, 1) == ["oops"]


def test_dashdash_python(tmp_path):
    p = cli("-n", "2", "--", sys.executable, "-c", "import os; print('hi', os.environ['THUNDERLINK_RANK'])")
    assert p.returncode == 0, p.stderr
    assert lines_of(p.stdout, 1) == ["hi 1"]


def test_all_ranks_succeed(prog, tmp_path):
    p = cli("-n", "3", prog, str(tmp_path), "exit", "0")
    assert p.returncode == 0, p.stderr
    for r in range(3):
        assert lines_of(p.stdout, r) == [f"rank {r} done"]
    assert p.stderr == ""


def test_last_rank_status_when_others_finish(prog, tmp_path):
    # The others exit 0; the job's status is the failing rank's.
    p = cli("-n", "3", prog, str(tmp_path), "exit", "7")
    assert p.returncode == 7
    assert "rank 2 exited with status 7" in p.stderr


def test_failure_stops_the_others(prog, tmp_path):
    p = cli("-n", "3", prog, str(tmp_path), "fail", "3")
    assert p.returncode == 3, p.stderr
    assert p.elapsed < 10, p.elapsed
    assert "rank 2 exited with status 3; stopping the other ranks" in p.stderr
    assert lines_of(p.stdout, 2) == ["failing now"]
    assert_gone(pids(tmp_path))


class QuickJob(Job):
    """A Job with a short grace period between SIGTERM and SIGKILL."""

    def stop(self, grace: float = 0.5) -> None:
        super().stop(grace)


def test_failure_stops_ranks_that_ignore_sigterm(prog, tmp_path):
    """SIGTERM first, SIGKILL after the grace period."""
    cmd = [sys.executable, prog, str(tmp_path), "fail_ignore_term", "4"]
    envs = [rank_env(base_env(), r, 2, "/nonexistent.json", 1) for r in range(2)]
    t0 = time.monotonic()
    res = QuickJob([cmd] * 2, envs, on_line=lambda *a: None, timeout=HARD_TIMEOUT).run()
    assert time.monotonic() - t0 < 8
    assert res.status == 4 and res.failed_rank == 1
    assert res.returncodes[0] == -signal.SIGKILL
    assert_gone(pids(tmp_path))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_killed_by_signal(prog, tmp_path, sig):
    p = cli("-n", "2", prog, str(tmp_path), "signal", str(int(sig)))
    assert p.returncode == 128 + sig, p.stderr
    assert f"rank 1 exited with status {128 + sig}" in p.stderr
    assert_gone(pids(tmp_path))


def test_timeout(prog, tmp_path):
    p = cli("-n", "2", "--timeout", "1.5", prog, str(tmp_path), "sleep")
    assert p.returncode == 124, p.stderr
    assert "timed out after 1.5 s" in p.stderr
    assert p.elapsed < 10
    assert len(pids(tmp_path)) == 2
    assert_gone(pids(tmp_path))


def test_timeout_does_not_blame_a_rank(prog, tmp_path, capfd):
    res = launch_local(2, [sys.executable, prog, str(tmp_path), "sleep"], env=base_env(),
                       timeout=0.5, on_line=lambda *a: None)
    err = capfd.readouterr().err
    assert res.status == 124 and res.timed_out
    assert "timed out after 0.5 s" in err
    assert "exited with status" not in err, err
    assert res.failed_rank is None


def test_killed_launcher_leaves_no_hostfile(prog, tmp_path):
    """SIGKILL of `thunderlink launch` (no finally, no atexit): its temporary
    hostfile does not outlive it. (Its ranks, orphaned, are killed by
    no_strays.)"""
    launcher = subprocess.Popen([sys.executable, "-m", "thunderlink", "launch", "-n", "2", prog, str(tmp_path),
                                 "hostfile_then_sleep"], env=base_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = None
    try:
        end = time.monotonic() + HARD_TIMEOUT
        while len(pids(tmp_path, "rank*.pid")) < 2:
            assert launcher.poll() is None and time.monotonic() < end, "the ranks did not start"
            time.sleep(0.05)
        folder = os.path.dirname((tmp_path / "hostfile0.path").read_text())
        assert os.path.exists(os.path.join(folder, "hostfile.json"))
        launcher.kill()
        launcher.wait(HARD_TIMEOUT)
        end = time.monotonic() + 5
        while os.path.exists(folder) and time.monotonic() < end:
            time.sleep(0.05)
        assert not os.path.exists(folder), f"the killed launcher left {folder} behind"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if folder and os.path.basename(folder).startswith("thunderlink-"):
            shutil.rmtree(folder, ignore_errors=True)


def test_child_of_failed_job_is_killed(prog, tmp_path):
    p = cli("-n", "2", prog, str(tmp_path), "child_then_fail")
    assert p.returncode == 5, p.stderr
    assert p.elapsed < 10
    assert_gone(pids(tmp_path, "child*.pid"))
    assert_gone(pids(tmp_path, "rank*.pid"))


def test_child_of_timed_out_job_is_killed(prog, tmp_path):
    p = cli("-n", "2", "--timeout", "2", prog, str(tmp_path), "child_then_sleep")
    assert p.returncode == 124, p.stderr
    assert len(pids(tmp_path, "child*.pid")) == 2
    assert_gone(pids(tmp_path))


def test_child_of_successful_job_is_killed(prog, tmp_path):
    p = cli("-n", "2", prog, str(tmp_path), "child_then_exit")
    assert p.returncode == 0, p.stderr
    assert p.elapsed < 10
    assert len(pids(tmp_path, "child*.pid")) == 2
    assert_gone(pids(tmp_path, "child*.pid"), within=0.5)


def test_nonexistent_script(tmp_path):
    missing = str(tmp_path / "nope.py")
    p = cli("-n", "2", missing)
    assert p.returncode != 0
    assert f"{missing} does not exist" in p.stderr
    assert "put it after --" in p.stderr
    assert "Traceback" not in p.stderr


def test_nonexistent_command(tmp_path):
    p = cli("-n", "2", "--", str(tmp_path / "no-such-command"))
    assert p.returncode != 0
    assert "no-such-command" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("args,message", [
    (["-n", "2"], "give a Python script (prog.py) or -- CMD"),
    (["-n", "2", "--"], "nothing to run after --"),
    (["-n", "0", "--", "true"], "-n must be at least 1"),
])
def test_usage_errors(args, message):
    p = cli(*args)
    assert p.returncode != 0
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_ranks_option():
    p = cli("--", "true")
    assert p.returncode == 2 and "-n" in p.stderr


def test_partial_lines_are_joined(prog, tmp_path):
    p = cli("-n", "2", prog, str(tmp_path), "pieces")
    assert p.returncode == 0, p.stderr
    for r in range(2):
        assert lines_of(p.stdout, r) == ["hello world", "second line"]


def test_interrupt_stops_every_rank(prog, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "thunderlink", "launch", "-n", "2", prog, str(tmp_path), "sleep"],
                            env=base_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 20
        while len(pids(tmp_path)) < 2 and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.05)
        assert len(pids(tmp_path)) == 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=HARD_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted; stopping every rank" in err
    assert_gone(pids(tmp_path))


# ---- the API -------------------------------------------------------------------------


def test_exit_status():
    assert exit_status(0) == 0
    assert exit_status(3) == 3
    assert exit_status(-signal.SIGKILL) == 137
    assert exit_status(-signal.SIGTERM) == 143


def test_rank_env():
    env = rank_env({"A": "1", "THUNDERLINK_RANK": "9"}, 2, 4, "/h.json", 77)
    assert env == {"A": "1", "THUNDERLINK_HOSTFILE": "/h.json", "THUNDERLINK_RANK": "2",
                   "THUNDERLINK_WORLD_SIZE": "4", "THUNDERLINK_JOB_ID": "77",
                   "MLX_DISTRIBUTED_BACKEND": "thunderlink", "PYTHONUNBUFFERED": "1"}


def test_launch_local_capture(prog, tmp_path):
    seen = []
    res = launch_local(2, [sys.executable, prog, str(tmp_path), "env"], env=base_env(EXTRA="x"),
                       timeout=HARD_TIMEOUT, capture=True, on_line=lambda *a: seen.append(a))
    assert isinstance(res, JobResult)
    assert res.status == 0 and res.returncodes == [0, 0]
    assert res.failed_rank is None and not res.timed_out
    for r in range(2):
        info = json.loads(res.output[r][0][5:])
        assert info["THUNDERLINK_RANK"] == str(r) and info["EXTRA"] == "x"
        assert f"to stderr from {r}" in res.output[r]
        assert (r, "err", f"to stderr from {r}") in seen
        assert (r, "out", "no newline at the end") in seen


def test_launch_local_failure(prog, tmp_path):
    t0 = time.monotonic()
    res = launch_local(3, [sys.executable, prog, str(tmp_path), "fail", "9"], env=base_env(),
                       timeout=HARD_TIMEOUT, capture=True, on_line=lambda *a: None)
    assert time.monotonic() - t0 < 10
    assert res.status == 9 and res.failed_rank == 2 and not res.timed_out
    assert res.returncodes[2] == 9
    assert res.returncodes[0] == -signal.SIGTERM and res.returncodes[1] == -signal.SIGTERM
    assert_gone(pids(tmp_path))


def test_launch_local_timeout(prog, tmp_path):
    res = launch_local(2, [sys.executable, prog, str(tmp_path), "sleep"], env=base_env(),
                       timeout=1.5, capture=True, on_line=lambda *a: None)
    assert res.status == 124 and res.timed_out
    assert all(rc is not None and rc < 0 for rc in res.returncodes)
    assert_gone(pids(tmp_path))


def test_launch_local_needs_a_rank():
    with pytest.raises(ValueError, match="at least one rank"):
        launch_local(0, ["true"], timeout=5)


def test_job_with_distinct_commands(tmp_path):
    lines = []
    job = Job([[sys.executable, "-c", "print('a')"], ["sh", "-c", "echo b; echo c >&2; exit 0"]],
              [base_env(), base_env()], on_line=lambda *a: lines.append(a), capture=True, timeout=HARD_TIMEOUT)
    res = job.run()
    assert res.status == 0
    assert res.output == [["a"], ["b", "c"]]
    assert sorted(lines) == [(0, "out", "a"), (1, "err", "c"), (1, "out", "b")]


def test_job_default_printer_prefixes(capfd):
    res = Job([["sh", "-c", "echo one; echo two >&2"]] * 2, timeout=HARD_TIMEOUT).run()
    assert res.status == 0
    out, err = capfd.readouterr()
    assert sorted(out.splitlines()) == ["[0] one", "[1] one"]
    assert sorted(err.splitlines()) == ["[0] two", "[1] two"]


def test_job_start_failure_stops_started_ranks(tmp_path):
    """A rank that cannot start: OSError naming the rank; the ranks already
    started are stopped."""
    job = Job([["sh", "-c", f"echo $$ > {tmp_path}/rank0.pid; exec sleep 60"], [str(tmp_path / "missing")]],
              timeout=HARD_TIMEOUT)
    with pytest.raises(OSError, match="cannot start rank 1"):
        job.start()
    assert all(p.poll() is not None for p in job.procs)
