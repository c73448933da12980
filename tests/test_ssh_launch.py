"""``thunderlink launch --hostfile``: one rank per host over ssh (thunderlink.launch.ssh).

The hosts are an emulated 3-host ring (network namespaces, thunderlink.testing.cluster)
with an sshd in each (tests/sshd_cluster.py: generated keys and configs, one
management veth per host from the root namespace, where the launcher runs).
Skipped with a reason when namespaces cannot be made or sshd is not installed
(apt-get install -y openssh-server). Hard timeouts: every launch has timeout=,
every subprocess a timeout, and a SIGALRM watchdog fails a test past TEST_TIMEOUT_S.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import PKG_ROOT as SRC  # the thunderlink under test's folder

from sshd_cluster import SshdCluster, sshd_available
from thunderlink.launch.ssh import launch_hostfile
from thunderlink.testing import cluster as cl

ROOT = Path(__file__).resolve().parents[1]
TEST_TIMEOUT_S = 45
LAUNCH_TIMEOUT = 30

NETNS_OK, NETNS_WHY = cl.available()
SSHD_OK, SSHD_WHY = sshd_available()
needs_sshd = pytest.mark.skipif(not (NETNS_OK and SSHD_OK), reason=NETNS_WHY if not NETNS_OK else SSHD_WHY)
needs_ssh_client = pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client (openssh-client)")

pytestmark = [pytest.mark.multiproc]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not (NETNS_OK and SSHD_OK):
        pytest.skip(NETNS_WHY if not NETNS_OK else SSHD_WHY)
    state = tmp_path_factory.mktemp("state")
    old_state = os.environ.get(cl.STATE_DIR_ENV)
    os.environ[cl.STATE_DIR_ENV] = str(state)
    c = cl.Cluster(3, topology="ring", name=f"tssh{os.getpid() % 4096:03x}{secrets.token_hex(1)}")
    s = SshdCluster(c, tmp_path_factory.mktemp("sshd"))
    try:
        c.up()
        s.up()
        yield s
    finally:
        s.down()
        c.down()
        if old_state is None:
            os.environ.pop(cl.STATE_DIR_ENV, None)
        else:
            os.environ[cl.STATE_DIR_ENV] = old_state
        assert not s.leftover_links()
        assert not set(c.netns_names) & set(cl.netns_list())


_port = iter(range(34100, 34900, 8))


def write_hostfile(sshd: SshdCluster, tmp_path: Path, **change) -> str:
    hf = sshd.hostfile(next(_port))
    for r, ssh in change.items():
        hf["ranks"][int(r[1:])]["ssh"] = ssh
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(hf))
    return str(path)


def launch(sshd, hostfile, program, **kw):
    kw.setdefault("timeout", LAUNCH_TIMEOUT)
    kw.setdefault("extra_env", {"PYTHONPATH": SRC})
    return launch_hostfile(hostfile, program, ssh_options=sshd.ssh_options, **kw)


def script(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def pgrep(marker: str) -> list[int]:
    cp = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, timeout=10)
    return [int(x) for x in cp.stdout.split()]


def wait_none(marker: str, seconds: float) -> list[int]:
    end = time.monotonic() + seconds
    while True:
        left = pgrep(marker)
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


ALL_SUM = """
    import os, sys
    import numpy as np
    import thunderlink
    comm = thunderlink.connect()
    x = np.arange(6, dtype=np.float32) * (comm.rank + 1)
    y = comm.all_sum(x)
    hf = os.environ["THUNDERLINK_HOSTFILE"]
    print("RESULT", comm.rank, comm.size, " ".join(str(int(v)) for v in y), hf, os.path.exists(hf))
    comm.close()
"""


@needs_sshd
def test_all_sum_over_ssh(sshd, tmp_path, capsys):
    prog = script(tmp_path, "allsum.py", ALL_SUM)
    env = dict(os.environ, THUNDERLINK_CONNECT_TIMEOUT="20", THUNDERLINK_TIMEOUT="20")
    res = launch(sshd, write_hostfile(sshd, tmp_path), [prog], env=env)
    out, err = capsys.readouterr()
    assert res.status == 0, out + err
    assert res.remote == [True, True, True] and res.started == [True, True, True]
    want = " ".join(str(v * 6) for v in range(6))  # (1 + 2 + 3) * i
    lines = [line for line in out.splitlines() if " RESULT " in line]
    assert len(lines) == 3, out + err
    for r in range(3):
        (line,) = [x for x in lines if x.startswith(f"[{r}] RESULT ")]
        _, _, rank, size, *vals, hf, exists = line.split()
        assert (int(rank), int(size), " ".join(vals)) == (r, 3, want), line
        assert hf == f"/tmp/thunderlink-{res.job_id:016x}-r{r}.json" and exists == "True"
    assert "thunderlink-ssh-started" not in out + err
    # every remote hostfile is removed at the end
    assert not glob.glob(f"/tmp/thunderlink-{res.job_id:016x}-*")


SLEEPER = """
    import os, subprocess, sys, time
    rank = int(os.environ["THUNDERLINK_RANK"])
    marker, piddir = sys.argv[1], sys.argv[2]
    # a grandchild in the rank's process group must die with it
    kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    with open(os.path.join(piddir, "pid%d" % rank), "w") as f:
        f.write("%d %d" % (os.getpid(), kid.pid))
    print("ready", flush=True)
    if rank == int(os.environ.get("FAIL_RANK", "-1")):
        end = time.time() + 10
        while time.time() < end and len(os.listdir(piddir)) < int(os.environ["THUNDERLINK_WORLD_SIZE"]):
            time.sleep(0.05)
        sys.exit(3)
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
"""


def _pids(piddir: Path) -> list[int]:
    return [int(x) for f in piddir.iterdir() for x in f.read_text().split()]


@needs_sshd
def test_failing_rank_stops_every_remote_rank(sshd, tmp_path):
    marker = f"tlmark-{secrets.token_hex(6)}"
    piddir = tmp_path / "pids"
    piddir.mkdir()
    prog = script(tmp_path, "sleeper.py", SLEEPER)
    lines = []
    t0 = time.monotonic()
    res = launch(sshd, write_hostfile(sshd, tmp_path), [prog, marker, str(piddir)],
                 extra_env={"FAIL_RANK": "1"}, on_line=lambda *a: lines.append(a))
    elapsed = time.monotonic() - t0
    assert res.status == 3 and res.failed_rank == 1, (res, lines)
    assert elapsed < 12, elapsed
    assert sorted(f.name for f in piddir.iterdir()) == ["pid0", "pid1", "pid2"]
    assert [(r, "out", "ready") for r in range(3)] == sorted(x for x in lines if x[2] == "ready")
    # the stopped ranks report the signal that stopped them (128 + SIGTERM)
    assert res.returncodes[0] == res.returncodes[2] == 128 + signal.SIGTERM, res
    left = wait_none(marker, 5)
    assert not left, [open(f"/proc/{p}/cmdline").read() for p in left if os.path.exists(f"/proc/{p}")]
    assert not [p for p in _pids(piddir) if alive(p)]
    assert not glob.glob(f"/tmp/thunderlink-{res.job_id:016x}-*")


@needs_sshd
def test_killed_launcher_takes_remote_ranks_down(sshd, tmp_path):
    """SIGKILL of the launcher: its ends of the ssh clients' stdin pipes close,
    the remote wrappers see EOF and stop their programs."""
    marker = f"tlmark-{secrets.token_hex(6)}"
    piddir = tmp_path / "pids"
    piddir.mkdir()
    prog = script(tmp_path, "sleeper.py", SLEEPER)
    hostfile = write_hostfile(sshd, tmp_path)
    code = (f"from thunderlink.launch.ssh import launch_hostfile; "
            f"launch_hostfile({hostfile!r}, {[prog, marker, str(piddir)]!r}, timeout=40, "
            f"extra_env={{'PYTHONPATH': {SRC!r}}}, ssh_options={sshd.ssh_options!r})")
    p = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=SRC),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        end = time.monotonic() + 20
        while len(list(piddir.iterdir())) < 3 and p.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.2)
        assert len(list(piddir.iterdir())) == 3 and p.poll() is None, p.stderr.read1() if p.poll() else ""
        assert all(alive(x) for x in _pids(piddir))
        os.kill(p.pid, signal.SIGKILL)
        p.wait(5)
        left = wait_none(marker, 10)
        assert not left
        assert not [x for x in _pids(piddir) if alive(x)]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
        p.stderr.close()
        for x in pgrep(marker):  # never leave anything behind, even on failure
            try:
                os.kill(x, signal.SIGKILL)
            except OSError:
                pass


@needs_sshd
def test_interrupt_reaches_remote_ranks(sshd, tmp_path):
    """Ctrl-C of the launcher: every remote program gets SIGINT (not just a
    closed session), the job ends with 130 and nothing is left."""
    marker = f"tlmark-{secrets.token_hex(6)}"
    piddir = tmp_path / "pids"
    piddir.mkdir()
    prog = script(tmp_path, "sleeper.py", SLEEPER)
    hostfile = write_hostfile(sshd, tmp_path)
    code = (f"import sys; from thunderlink.launch.ssh import launch_hostfile; "
            f"sys.exit(launch_hostfile({hostfile!r}, {[prog, marker, str(piddir)]!r}, timeout=40, "
            f"extra_env={{'PYTHONPATH': {SRC!r}}}, ssh_options={sshd.ssh_options!r}).status)")
    p = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=SRC),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        end = time.monotonic() + 20
        while len(list(piddir.iterdir())) < 3 and p.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert len(list(piddir.iterdir())) == 3 and p.poll() is None
        t0 = time.monotonic()
        os.kill(p.pid, signal.SIGINT)
        out, _ = p.communicate(timeout=20)
        assert p.returncode == 130, out
        assert time.monotonic() - t0 < 2.5  # the programs ended by themselves, before Job's grace
        for r in range(3):
            assert f"[{r}] interrupted" in out.splitlines(), out
        assert not wait_none(marker, 5)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate(timeout=5)
        for x in pgrep(marker):
            try:
                os.kill(x, signal.SIGKILL)
            except OSError:
                pass


ENV_DUMP = """
    import json, os, sys
    keys = sys.argv[1:]
    print("ENV " + json.dumps({"env": {k: os.environ.get(k) for k in keys}, "cwd": os.getcwd(),
                               "python": sys.executable,
                               "hostfile": json.load(open(os.environ["THUNDERLINK_HOSTFILE"]))}))
"""


def _dumps(res) -> list[dict]:
    out = []
    for r, lines in enumerate(res.output):
        (line,) = [x for x in lines if x.startswith("ENV ")]
        out.append(json.loads(line[4:]))
    return out


@needs_sshd
def test_environment_and_cwd(sshd, tmp_path):
    prog = script(tmp_path, "envdump.py", ENV_DUMP)
    work = tmp_path / "work dir"
    work.mkdir()
    nasty = "a b 'c' \"d\" $HOME `id` ; \\ * é\nsecond line"
    env = dict(os.environ, THUNDERLINK_TEST_TOKEN="tok 1", MLX_TEST_TOKEN="mlx'2", NOT_PROPAGATED="x",
               MLX_RANK="99", THUNDERLINK_RANK="77", THUNDERLINK_DEBUG="warn")
    keys = ["THUNDERLINK_TEST_TOKEN", "MLX_TEST_TOKEN", "NOT_PROPAGATED", "MLX_RANK", "NASTY",
            "THUNDERLINK_RANK", "THUNDERLINK_WORLD_SIZE", "THUNDERLINK_JOB_ID", "THUNDERLINK_DEBUG",
            "MLX_DISTRIBUTED_BACKEND", "PYTHONUNBUFFERED"]
    res = launch(sshd, write_hostfile(sshd, tmp_path), [prog, *keys], env=env, cwd=str(work),
                 extra_env={"NASTY": nasty}, capture=True, on_line=lambda *a: None)
    assert res.status == 0, res.output
    dumps = _dumps(res)
    for r, d in enumerate(dumps):
        assert d["env"] == {
            "THUNDERLINK_TEST_TOKEN": "tok 1", "MLX_TEST_TOKEN": "mlx'2", "NOT_PROPAGATED": None,
            "MLX_RANK": None, "NASTY": nasty, "THUNDERLINK_RANK": str(r), "THUNDERLINK_WORLD_SIZE": "3",
            "THUNDERLINK_JOB_ID": str(res.job_id), "THUNDERLINK_DEBUG": "warn",
            "MLX_DISTRIBUTED_BACKEND": "thunderlink", "PYTHONUNBUFFERED": "1",
        }, d
        assert d["cwd"] == str(work)
        assert d["python"] == sys.executable  # the launcher's interpreter, by path
        assert [x["ssh"] for x in d["hostfile"]["ranks"]] == [sshd.dest(i) for i in range(3)]
    # a directory that does not exist on the remote host: $HOME instead
    res = launch(sshd, write_hostfile(sshd, tmp_path), [prog, "HOME"], cwd=str(tmp_path / "missing"),
                 capture=True, on_line=lambda *a: None)
    assert res.status == 0, res.output
    for d in _dumps(res):
        assert d["cwd"] == d["env"]["HOME"]


@needs_sshd
def test_remote_python_choice(sshd, tmp_path):
    prog = script(tmp_path, "which.py", 'import sys; print("PY", sys.executable)\n')
    hostfile = write_hostfile(sshd, tmp_path)
    # the launcher's path does not exist there: python3 from the remote PATH
    res = launch(sshd, hostfile, [prog], default_python="/nonexistent/bin/python", capture=True,
                 on_line=lambda *a: None)
    assert res.status == 0, res.output
    for lines in res.output:
        (line,) = [x for x in lines if x.startswith("PY ")]
        assert line != "PY /nonexistent/bin/python" and "python" in line
    # --python is used as given; a missing one is reported
    res = launch(sshd, hostfile, [prog], python="/nonexistent/bin/python", capture=True,
                 on_line=lambda *a: None)
    assert res.status == 127, res
    assert any("--python" in m for m in res.messages), res.messages


@needs_sshd
def test_unreachable_host_refused(sshd, tmp_path, capsys):
    marker = f"tlmark-{secrets.token_hex(6)}"
    piddir = tmp_path / "pids"
    piddir.mkdir()
    prog = script(tmp_path, "sleeper.py", SLEEPER)
    # nothing listens on this port: connection refused
    bad = f"ssh://root@{sshd.addresses[1]}:{sshd.port + 1}"
    t0 = time.monotonic()
    res = launch(sshd, write_hostfile(sshd, tmp_path, r1=bad), [prog, marker, str(piddir)],
                 connect_timeout=3)
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert res.status == 255 and res.failed_rank == 1, res
    assert list(res.unreachable) == [1] and "refused" in res.unreachable[1].lower()
    assert f"cannot reach host {sshd.cluster.hosts[1].netns} ({bad}) over ssh" in err, err
    assert "BatchMode" in err
    assert elapsed < 10, elapsed
    assert not wait_none(marker, 5)


@needs_ssh_client
def test_unreachable_host_times_out(tmp_path, capsys):
    """A host that accepts TCP but never answers (hung sshd, wrong port):
    ssh's ConnectTimeout ends the job."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)  # never accepts: the kernel completes the handshake, nobody speaks
    port = srv.getsockname()[1]
    hf = {"version": 1, "ranks": [
        {"host": "hung", "ssh": f"ssh://root@127.0.0.1:{port}", "addresses": ["127.0.0.1:34990"]},
        {"host": "hung2", "ssh": f"ssh://root@127.0.0.1:{port}", "addresses": ["127.0.0.1:34991"]},
    ]}
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(hf))
    try:
        t0 = time.monotonic()
        res = launch_hostfile(str(path), ["--", "true"], connect_timeout=2, timeout=LAUNCH_TIMEOUT,
                              ssh_options=["-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
                                           "-o", "UserKnownHostsFile=/dev/null"])
        elapsed = time.monotonic() - t0
    finally:
        srv.close()
    err = capsys.readouterr().err
    assert res.status == 255, (res, err)
    assert 1.5 < elapsed < 10, elapsed
    # whichever rank timed out first is reported; the other one was stopped
    assert re.search(rf"cannot reach host hung2? \(ssh://root@127\.0\.0\.1:{port}\) over ssh", err), err
    assert "timed out" in err.lower(), err


def test_loopback_entries_run_directly(tmp_path):
    """localhost / 127.0.0.1 entries run without ssh (the ssh binary given here does not exist)."""
    prog = script(tmp_path, "allsum.py", ALL_SUM)
    from thunderlink.launch import free_ports

    a, b = free_ports(2)
    hf = {"version": 1, "ranks": [{"host": "localhost", "addresses": [f"127.0.0.1:{a}"]},
                                  {"host": "127.0.0.1", "addresses": [f"127.0.0.1:{b}"]}]}
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(hf))
    env = dict(os.environ, PYTHONPATH=SRC, THUNDERLINK_CONNECT_TIMEOUT="20")
    res = launch_hostfile(str(path), [prog], env=env, timeout=LAUNCH_TIMEOUT, ssh="/nonexistent/ssh",
                          capture=True, on_line=lambda *a: None)
    assert res.status == 0, res.output
    assert res.remote == [False, False]
    for r, lines in enumerate(res.output):
        (line,) = [x for x in lines if x.startswith("RESULT ")]
        assert line.split()[1:4] == [str(r), "2", "0"] and line.split()[4:9] == ["3", "6", "9", "12", "15"]


@needs_sshd
def test_cli_options(sshd, tmp_path, capsys):
    """The options add_cli_arguments() gives `thunderlink launch`, as from_cli_args() runs them."""
    import argparse

    from thunderlink.launch.ssh import add_cli_arguments, from_cli_args

    p = argparse.ArgumentParser()
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--env", action="append", default=[])
    add_cli_arguments(p)
    p.add_argument("program", nargs=argparse.REMAINDER)
    prog = script(tmp_path, "envdump.py", ENV_DUMP)
    args = p.parse_args(["--hostfile", write_hostfile(sshd, tmp_path), "--ssh-config", str(sshd.client_config),
                         "--ssh-option=-o ConnectTimeout=5", "--connect-timeout", "4", "--timeout", "30",
                         prog, "FOO"])
    assert from_cli_args(args, env=dict(os.environ), extra_env={"FOO": "bar baz"}) == 0
    out = capsys.readouterr().out
    for r in range(3):
        (line,) = [x for x in out.splitlines() if x.startswith(f"[{r}] ENV ")]
        assert json.loads(line.split(" ", 2)[2])["env"] == {"FOO": "bar baz"}
    # a command after --, and a bad hostfile (status 2, message)
    args = p.parse_args(["--hostfile", write_hostfile(sshd, tmp_path), "--ssh-config", str(sshd.client_config),
                         "--", "sh", "-c", "exit $((THUNDERLINK_RANK + 4))"])
    assert from_cli_args(args, env=dict(os.environ), extra_env={}) in (4, 5, 6)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    args = p.parse_args(["--hostfile", str(bad), prog])
    assert from_cli_args(args, env=dict(os.environ), extra_env={}) == 2
    assert "thunderlink launch: hostfile" in capsys.readouterr().err


TOKEN_PROG = """
    import glob, hashlib, os
    import numpy as np
    import thunderlink
    token = os.environ["THUNDERLINK_TOKEN"]
    comm = thunderlink.connect()
    y = comm.all_sum(np.ones(4, dtype=np.float32))
    seen = []  # every command line on this machine (the ssh sessions, the wrappers, the ranks)
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if token.encode() in open(path, "rb").read():
                seen.append(path)
        except OSError:
            pass
    print("RESULT", comm.rank, int(y[0]), hashlib.sha256(token.encode()).hexdigest(), len(seen),
          "TOKEN_FILE" if "THUNDERLINK_TOKEN_FILE" in os.environ else "-")
    comm.close()
"""


@needs_sshd
@pytest.mark.parametrize("users_token", [None, "ssh-e2e-secret-4f1c"])
def test_ssh_ranks_get_the_token_on_stdin(sshd, tmp_path, capsys, users_token):
    """Over ssh every rank gets the job's token (the launcher's new one, or
    the user's THUNDERLINK_TOKEN), connects with it, and finds it in no
    command line on the machine while the job runs (ssh sessions, remote
    shells, wrappers, ranks); the launcher prints it nowhere."""
    prog = script(tmp_path, "tokenprog.py", TOKEN_PROG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("THUNDERLINK_TOKEN")}
    env.update(THUNDERLINK_CONNECT_TIMEOUT="20", THUNDERLINK_TIMEOUT="20")
    if users_token:
        env["THUNDERLINK_TOKEN"] = users_token
    res = launch(sshd, write_hostfile(sshd, tmp_path), [prog], env=env)
    out, err = capsys.readouterr()
    assert res.status == 0, out + err
    lines = sorted(line.split()[2:] for line in out.splitlines() if " RESULT " in line)
    assert [(int(r), int(s)) for r, s, *_ in lines] == [(0, 3), (1, 3), (2, 3)], out + err
    digests = {d for *_, d, _, _ in lines}
    assert len(digests) == 1, lines
    if users_token:
        assert digests == {hashlib.sha256(users_token.encode()).hexdigest()}
        assert users_token not in out + err
    assert [n for *_, n, _ in lines] == ["0"] * 3, lines  # in no command line
    assert [f for *_, f in lines] == ["-"] * 3
