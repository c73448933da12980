"""Tests of thunderlink.testing.cluster (emulated hosts as network namespaces).

Needs root + iproute2; skipped with the reason from ``available()`` otherwise.
Every cluster gets a name unique to this run, every test removes what it made
(fixtures with try/finally), and only namespaces this run created are ever removed.
Hard timeouts: every blocking call has a subprocess timeout, and an autouse
SIGALRM watchdog fails a test that runs past TEST_TIMEOUT_S even without
pytest-timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import unique_name

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_PY = ROOT / "src" / "thunderlink" / "testing" / "cluster.py"
TEST_TIMEOUT_S = 45


import thunderlink.testing.cluster as cl  # noqa: E402
OK, WHY = cl.available(shaping=True)
needs_netns = pytest.mark.skipif(not OK, reason=WHY)

pytestmark = [pytest.mark.netns]

def uniq() -> str:
    return unique_name("t")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv(cl.STATE_DIR_ENV, str(d))
    return d


def _netns_names() -> set[str]:
    cp = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return {line.split()[0] for line in cp.stdout.splitlines() if line.strip()}


def _force_remove(names) -> None:
    """Last resort for namespaces *this test* created (never anything else)."""
    present = _netns_names()
    for ns in names:
        if ns in present:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
def make_cluster():
    made = []

    def make(*args, **kw):
        kw.setdefault("name", uniq())
        c = cl.Cluster(*args, **kw)
        made.append(c)
        c.up()
        return c

    try:
        yield make
    finally:
        errors = []
        for c in made:
            try:
                c.down()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
            _force_remove(c.netns_names)
        left = _netns_names() & {ns for c in made for ns in c.netns_names}
        assert not errors and not left, (errors, left)


def _assert_gone(c) -> None:
    present = _netns_names()
    assert not (set(c.netns_names) & present), f"namespaces left: {set(c.netns_names) & present}"
    # veths were created directly inside the namespaces; none may appear in the root namespace
    cp = subprocess.run(["ip", "-j", "link", "show", "type", "veth"], capture_output=True, text=True,
                        timeout=10)
    root_veths = {x["ifname"] for x in json.loads(cp.stdout or "[]")}
    ours = {cb.ifname_a for cb in c.cables} | {cb.ifname_b for cb in c.cables}
    assert not (root_veths & ours), root_veths & ours


def _ip_json(c, host_ns: str, *args) -> list:
    cp = subprocess.run(["ip", "-n", host_ns, "-j", *args], capture_output=True, text=True, timeout=10,
                        check=True)
    return json.loads(cp.stdout)


# ----------------------------------------------------------------------------- pure planning (no root)


def test_plan_ring_and_hostfiles():
    c = cl.Cluster(4, topology="ring", rate="10gbit", name="plan0")
    assert [(x.a, x.b, x.k) for x in c.cables] == [(0, 1, 0), (1, 2, 0), (2, 3, 0), (3, 0, 0)]
    subnets = [x.subnet for x in c.cables]
    assert subnets == ["10.231.0.0/30", "10.231.0.4/30", "10.231.0.8/30", "10.231.0.12/30"]
    assert all(x.prefix == 30 and int(x.ip_a.split(".")[-1]) % 4 == 1
               and int(x.ip_b.split(".")[-1]) % 4 == 2 for x in c.cables)
    assert c.cables[0].ifname_a == "tb1" and c.cables[0].ifname_b == "tb0"
    assert all(len(n) <= 15 for x in c.cables for n in (x.ifname_a, x.ifname_b))
    hf = c.hostfile(32400)
    assert hf["version"] == 1 and len(hf["ranks"]) == 4
    r0 = hf["ranks"][0]
    assert r0["host"] == "plan0-h0" and r0["netns"] == "plan0-h0"
    assert r0["addresses"] == [
        {"ip": "10.231.0.1", "port": 32400, "peer": 1, "iface": "tb1", "prefix": 30, "rate": "10gbit"},
        {"ip": "10.231.0.14", "port": 32401, "peer": 3, "iface": "tb3", "prefix": 30, "rate": "10gbit"},
    ]
    # MLX: rank r listens on hostfile[r], rank r-1 connects to it -> r's address facing r-1
    mh = c.mlx_hostfile(32400)
    assert mh == [["10.231.0.14:32401"], ["10.231.0.2:32400"], ["10.231.0.6:32400"], ["10.231.0.10:32400"]]
    for r, entries in enumerate(mh):
        left = (r - 1) % 4
        for e in entries:
            ip = e.split(":")[0]
            cab = next(x for x in c.cables if ip in (x.ip_a, x.ip_b))
            assert {cab.a, cab.b} == {r, left}


def test_plan_variants():
    two = cl.Cluster(2, topology="ring", name="plan1")
    assert len(two.cables) == 1
    two2 = cl.Cluster(2, topology="ring", cables_per_link=2, name="plan2",
                      rates={(1, 0, 1): "5gbit"}, rate="10gbit")
    assert [(x.a, x.b, x.k, x.rate) for x in two2.cables] == [(0, 1, 0, "10gbit"), (0, 1, 1, "5gbit")]
    assert two2.cables[1].ifname_a == "tb1c1"
    assert two2.mlx_hostfile() == [["10.231.0.1:32400", "10.231.0.5:32401"],
                                   ["10.231.0.2:32400", "10.231.0.6:32401"]]
    mesh = cl.Cluster(4, topology="mesh", name="plan3")
    assert len(mesh.cables) == 6 and all(len(h.addresses) == 3 for h in mesh.hosts)
    assert all(len(e) == 1 for e in mesh.mlx_hostfile())
    sw = cl.Cluster(3, topology="switch", name="plan4", base="10.9.0.0/16")
    hf = sw.hostfile()
    assert [r["addresses"] for r in hf["ranks"]][1] == [
        {"ip": "10.9.0.2", "port": 32400, "iface": "tbsw", "prefix": 24}]
    assert sw.mlx_hostfile(1000) == [["10.9.0.1:1000"], ["10.9.0.2:1000"], ["10.9.0.3:1000"]]
    with pytest.raises(ValueError):
        cl.Cluster(3, mtu=70000)
    with pytest.raises(ValueError):
        cl.Cluster(3, topology="torus")
    # "gbps" is bits, as the hostfile reads it (was bytes here, 8x the hostfile's reading)
    assert cl.parse_rate("10gbit") == 10e9 and cl.parse_rate("1gbps") == 1e9
    assert int(cl.tbf_params("10gbit")["burst"]) >= 1_250_000


@pytest.mark.parametrize("rate", ["10gbit", "1gbps", "500mbit", "100Mbps", "100mibit", "2.5gbit", "25G", "40"])
def test_cluster_rate_round_trips_through_the_hostfile(rate):
    """The rate string the cluster copies into its hostfile reads, there, as the bits tc was told."""
    from thunderlink.hosts import hostfile

    c = cl.Cluster(2, topology="ring", rate=rate, name="plan5")
    bits = cl.parse_rate(rate)
    assert cl.tbf_params(rate)["rate"] == f"{bits}bit"  # tc gets bits, never tc's bytes-reading of "bps"
    hf = hostfile.parse(c.hostfile())
    rates = [a.rate for r in hf.ranks for a in r.addresses]
    assert rates and all(x == pytest.approx(bits / 1e9) for x in rates)
    assert bits == pytest.approx({"10gbit": 10e9, "1gbps": 1e9, "500mbit": 5e8, "100Mbps": 1e8,
                                  "100mibit": 100 * 2**20, "2.5gbit": 2.5e9, "25G": 25e9, "40": 40e9}[rate])


def test_cluster_refuses_what_the_hostfile_refuses():
    for bad in ["fast", "10 furlongs", "0gbit", "10ibit"]:
        with pytest.raises(ValueError, match="is not a rate"):
            cl.Cluster(2, rate=bad, name="plan6")


def test_available_reports_reason_without_root():
    ok, why = cl.available()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    if os.geteuid() != 0:
        return
    # as an unprivileged user the reason names root and the fix
    code = (f"import importlib.util,sys; s=importlib.util.spec_from_file_location('m', {str(CLUSTER_PY)!r});"
            "m=importlib.util.module_from_spec(s); sys.modules['m']=m; s.loader.exec_module(m);"
            "ok,why=m.available(); print(ok); print(why)")
    try:
        cp = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "--inh-caps=-all", sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        pytest.skip("setpriv not installed")
    if cp.returncode != 0:
        pytest.skip(f"cannot drop privileges here: {cp.stderr.strip()[:200]}")
    lines = cp.stdout.splitlines()
    assert lines[0] == "False" and "root" in lines[1], cp.stdout


# ----------------------------------------------------------------------------- with namespaces


@needs_netns
@pytest.mark.parametrize("topology,n", [("ring", 3), ("ring", 4), ("mesh", 3), ("mesh", 4), ("switch", 3)])
def test_topology_reachability(make_cluster, topology, n):
    c = make_cluster(n, topology=topology)
    present = _netns_names()
    assert set(c.netns_names) <= present
    for h in c.hosts:
        if topology == "switch":
            targets = [o.addresses[0].ip for o in c.hosts if o.index != h.index]
        else:
            targets = [cab.end(cab.peer_of(h.index))[2] for cab in c.cables if h.index in (cab.a, cab.b)]
        res = c.probe(h.index, targets)
        assert all(res.values()), (h.index, res)
        lo = c.exec(h.index, ["ip", "-j", "addr", "show", "dev", "lo"], timeout=10)
        assert "UP" in json.loads(lo.stdout)[0]["flags"]
    if topology == "ring" and n == 4:
        far = [a.ip for a in c.hosts[2].addresses]
        assert c.probe(0, far) == {ip: False for ip in far}
        fwd = c.exec(1, ["cat", "/proc/sys/net/ipv4/ip_forward"], timeout=10).stdout.strip()
        assert fwd == "0"
    c.down()
    c.down()  # idempotent
    _assert_gone(c)


@needs_netns
def test_parallel_cables(make_cluster):
    c = make_cluster(3, topology="ring", cables_per_link=2)
    assert len(c.cables) == 6
    assert len({x.subnet for x in c.cables}) == 6
    for a, b in [(0, 1), (1, 2), (2, 0)]:
        pair = [x for x in c.cables if {x.a, x.b} == {a, b}]
        assert sorted(x.k for x in pair) == [0, 1]
        assert c.probe(a, [x.end(b)[2] for x in pair]) == {x.end(b)[2]: True for x in pair}
    names = {a.iface for a in c.hosts[0].addresses}
    assert names == {"tb1c0", "tb1c1", "tb2c0", "tb2c1"}
    assert c.mlx_hostfile()[1] == [f"{x.ip_b}:{32400 + j}" for j, x in
                                   enumerate(y for y in c.cables if {y.a, y.b} == {0, 1})]


@needs_netns
def test_mtu_65520(make_cluster):
    c = make_cluster(2, topology="ring", mtu=65520)
    cab = c.cables[0]
    for ns, ifn in ((cab.netns_a, cab.ifname_a), (cab.netns_b, cab.ifname_b)):
        assert _ip_json(c, ns, "link", "show", "dev", ifn)[0]["mtu"] == 65520


@needs_netns
def test_rate_tbf_and_goodput(make_cluster):
    c = make_cluster(2, topology="ring", rate="1gbit")
    q = c.qdisc(0)
    for side in "ab":
        assert q[side][0]["kind"] == "tbf"
        assert q[side][0]["options"]["rate"] == 125_000_000  # bytes/s
    gp = c.goodput(0, seconds=1.0)
    assert 0.5e9 <= gp <= 1.1e9, gp
    c.set_rate(0, "500mbit")
    assert c.qdisc(0)["b"][0]["options"]["rate"] == 62_500_000
    assert c.hostfile()["ranks"][0]["addresses"][0]["rate"] == "500mbit"
    c.set_rate(0, None)
    assert all(x.get("kind") != "tbf" for side in "ab" for x in c.qdisc(0)[side])
    assert "rate" not in c.hostfile()["ranks"][0]["addresses"][0]


@needs_netns
def test_per_cable_rates(make_cluster):
    c = make_cluster(3, topology="ring", rate="2gbit", rates={(2, 1, 0): "300mbit"})
    assert c.cable(1, 2).rate == "300mbit" and c.cable(0, 1).rate == "2gbit"
    assert c.qdisc(c.cable(1, 2))["a"][0]["options"]["rate"] == 37_500_000
    assert c.qdisc(c.cable(0, 1))["b"][0]["options"]["rate"] == 250_000_000


@needs_netns
def test_set_cable_down_up(make_cluster):
    c = make_cluster(3, topology="ring")
    cab = c.cable(0, 1)
    assert c.can_reach(0, cab.ip_b)
    c.set_cable(cab, up=False)
    assert not c.can_reach(0, cab.ip_b)
    assert not c.can_reach(1, cab.ip_a)
    assert c.can_reach(0, c.cable(2, 0).end(2)[2])  # the other cable is unaffected
    c.set_cable(cab, up=True)
    deadline = time.monotonic() + 5
    while not c.can_reach(0, cab.ip_b) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert c.can_reach(0, cab.ip_b)


@needs_netns
def test_counters_move(make_cluster):
    c = make_cluster(2, topology="ring")
    before = c.counters(0)
    c.goodput(0, seconds=0.3)
    after = c.counters(0)
    assert after["a"]["tx_bytes"] - before["a"]["tx_bytes"] > 1_000_000
    assert after["b"]["rx_bytes"] - before["b"]["rx_bytes"] > 1_000_000
    assert after["b"]["tx_bytes"] > before["b"]["tx_bytes"]  # ACKs


@needs_netns
def test_run_killed_by_down(make_cluster):
    c = make_cluster(2, topology="ring")
    p = c.run(1, ["sleep", "60"], stdout=subprocess.DEVNULL)
    q = c.run(0, [sys.executable, "-c", "import os,time; print(os.environ['TLX']); time.sleep(60)"],
              env={"TLX": "hello"}, stdout=subprocess.PIPE, text=True)
    assert q.stdout.readline().strip() == "hello"
    assert p.poll() is None and q.poll() is None
    t0 = time.monotonic()
    c.down()
    assert p.wait(5) is not None and q.wait(5) is not None
    assert time.monotonic() - t0 < 5
    q.stdout.close()
    _assert_gone(c)


@needs_netns
def test_name_clash_does_not_touch_existing(make_cluster):
    c = make_cluster(2, topology="ring")
    other = cl.Cluster(2, topology="ring", name=c.name)
    with pytest.raises(cl.ClusterError, match="already exist"):
        other.up()
    other.down()
    assert set(c.netns_names) <= _netns_names()
    assert c.can_reach(0, c.cables[0].ip_b)


_CHILD = r"""
import sys, time
from thunderlink.testing import cluster as m
c = m.Cluster(3, topology="ring", rate="1gbit", name=sys.argv[2]).up()
p = c.run(0, ["sleep", "60"])
print("ready", flush=True)
if sys.argv[3] == "exit":
    sys.exit(0)          # no down(): the atexit handler must remove it
time.sleep(60)
"""


@needs_netns
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "exit"])
def test_cleanup_on_signal_and_exit(how):
    name = uniq()
    names = [f"{name}-h{i}" for i in range(3)]
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(CLUSTER_PY), name, how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        if how != "exit":
            assert set(names) <= _netns_names()
            proc.send_signal(getattr(signal, how))
        rc = proc.wait(15)
        if how == "SIGTERM":
            assert rc == -signal.SIGTERM  # chained to the default action
        elif how == "SIGINT":
            assert rc != 0  # KeyboardInterrupt from Python's default handler
        else:
            assert rc == 0
        assert not (set(names) & _netns_names())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()
        _force_remove(names)


def _cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "thunderlink", "cluster", *args], capture_output=True,
                          text=True, timeout=timeout)


@needs_netns
def test_cli_up_list_exec_down(tmp_path, state_dir, capsys):
    name = uniq()
    hf, mhf = tmp_path / "hosts.json", tmp_path / "mlx.json"
    names = [f"{name}-h{i}" for i in range(3)]
    try:
        # up in another process: the cluster must outlive it
        cp = _cli("up", "--hosts", "3", "--topology", "ring", "--rate", "2gbit", "--mtu", "9000",
                  "--name", name, "--hostfile", str(hf), "--mlx-hostfile", str(mhf), "--port", "40000")
        assert cp.returncode == 0, cp.stderr
        assert f"ip netns exec {name}-h" in cp.stdout and "10.231.0.1/30" in cp.stdout
        assert set(names) <= _netns_names()
        assert (state_dir / f"{name}.json").exists()
        data = json.loads(hf.read_text())
        assert data["version"] == 1 and [r["host"] for r in data["ranks"]] == names
        assert data["ranks"][0]["addresses"][0] == {"ip": "10.231.0.1", "port": 40000, "peer": 1,
                                                    "iface": "tb1", "prefix": 30, "rate": "2gbit"}
        mlx = json.loads(mhf.read_text())
        assert len(mlx) == 3 and all(len(e) == 1 for e in mlx)

        assert cl.main(["list"]) == 0
        out = capsys.readouterr().out
        assert name in out and "persistent" in out

        cp = _cli("exec", name, "1", "--", "ip", "-j", "link", "show", "dev", "tb0")
        assert cp.returncode == 0, cp.stderr
        assert json.loads(cp.stdout)[0]["mtu"] == 9000
        assert _cli("exec", name, "0", "--", "false").returncode == 1

        assert cl.main(["down", name]) == 0
        assert not (set(names) & _netns_names())
        assert not (state_dir / f"{name}.json").exists()
        capsys.readouterr()
        assert cl.main(["list"]) == 0
        assert name not in capsys.readouterr().out
        assert cl.main(["down", name]) == 1  # unknown now: clear error, no exception
        assert "no cluster named" in capsys.readouterr().err
    finally:
        if set(names) & _netns_names():
            _cli("down", name)
        _force_remove(names)


@needs_netns
def test_cli_down_all_skips_live_owner(make_cluster, capsys):
    live = make_cluster(2, topology="ring")  # owned by this (live) process
    name = uniq()
    try:
        assert cl.main(["up", "--hosts", "2", "--name", name]) == 0
        capsys.readouterr()
        assert cl.main(["down", "--all"]) == 0
        out = capsys.readouterr().out
        assert f"removed {name}" in out and f"skipping {live.name}" in out
        assert not ({f"{name}-h0", f"{name}-h1"} & _netns_names())
        assert set(live.netns_names) <= _netns_names()
    finally:
        _force_remove([f"{name}-h0", f"{name}-h1"])
