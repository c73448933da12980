"""Tests of `thunderlink doctor`.

The listing mode and the parsers run anywhere; the hostfile checks run on
emulated clusters (network namespaces, see thunderlink.testing.cluster) and
are skipped with available()'s reason where namespaces cannot be made. Every
subprocess has a hard timeout, every cluster is removed (``with Cluster``),
and an autouse SIGALRM watchdog fails a test that runs too long.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PKG_ROOT as SRC, unique_name  # the thunderlink under test's folder

from thunderlink.doctor import ranks as rk
from thunderlink.testing import cluster as cl
from thunderlink.hosts import interfaces as ifs
from thunderlink.hosts.hostfile import parse

ROOT = Path(__file__).resolve().parents[1]
TEST_TIMEOUT_S = 45
RUN_TIMEOUT_S = 40

OK, WHY = cl.available()
needs_netns = pytest.mark.skipif(not OK, reason=WHY)

def uniq() -> str:
    return unique_name("d")


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(cl.STATE_DIR_ENV, str(tmp_path / "state"))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def doctor(*args: str, netns: str | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "thunderlink.doctor", *args]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=_env())


def doctor_json(*args: str, netns: str | None = None) -> tuple[int, dict]:
    cp = doctor(*args, "--json", netns=netns)
    assert cp.returncode in (0, 1), cp.stderr
    return cp.returncode, json.loads(cp.stdout)


def problems(res: dict) -> list[dict]:
    return [c for c in res["checks"] if c["status"] == "problem"]


def write(tmp_path, obj, name="hostfile.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps(obj, indent=1))
    return str(p)


# ----------------------------------------------------------------------------- anywhere


def test_listing_lists_lo():
    cp = doctor()
    assert cp.returncode in (0, 1), cp.stderr
    lines = cp.stdout.splitlines()
    assert any(line.split()[:1] == ["NAME"] for line in lines), cp.stdout
    assert any(line.split()[:1] == ["lo"] for line in lines), cp.stdout
    assert "127.0.0.1/8" in cp.stdout


def test_listing_json():
    rc, res = doctor_json()
    names = {i["name"] for i in res["interfaces"]}
    assert "lo" in names
    lo = next(i for i in res["interfaces"] if i["name"] == "lo")
    assert lo["kind"] == "loopback" and lo["up"] and "127.0.0.1/8" in lo["addresses"]
    assert res["problems"] == len(problems(res)) and rc == (1 if res["problems"] else 0)
    for c in res["checks"]:
        assert c["status"] in ("ok", "warn", "problem") and c["message"]


def test_interface_helpers():
    its = ifs.list_interfaces()
    assert "127.0.0.1" in ifs.local_addresses(its)
    lo = ifs.interface_of("127.0.0.1", its)
    assert lo and next(i for i in its if i.name == lo).loopback
    assert ifs.interface_of("203.0.113.77", its) is None


def test_macos_parsers():
    ports = ifs.parse_hardware_ports(
        "Hardware Port: Wi-Fi\nDevice: en0\nEthernet Address: a:b\n\n"
        "Hardware Port: Thunderbolt 1\nDevice: en2\nEthernet Address: c:d\n\n"
        "Hardware Port: Thunderbolt Bridge\nDevice: bridge0\nEthernet Address: N/A\n")
    assert ports == {"en0": "Wi-Fi", "en2": "Thunderbolt 1", "bridge0": "Thunderbolt Bridge"}
    members = ifs.parse_bridge_members(
        "bridge0: flags=8863<UP,BROADCAST> mtu 1500\n\tmember: en2 flags=3<LEARNING,DISCOVER>\n"
        "\t        ifmaxaddr 0 port 7 priority 0\n\tmember: en3 flags=3<LEARNING,DISCOVER>\n")
    assert members == ["en2", "en3"]
    r = ifs.parse_route_get_macos("10.0.1.2", "   route to: 10.0.1.2\ndestination: 10.0.1.0\n"
                                  "       mask: 255.255.255.252\n  interface: en2\n      flags: <UP,DONE>\n")
    assert r.dev == "en2" and r.error is None
    assert ifs.parse_route_get_macos("10.9.9.9", "route: writing to routing socket: not in table", 1).dev is None
    r = ifs.parse_route_get_linux("10.0.0.2", '[{"dst":"10.0.0.2","dev":"tb1","prefsrc":"10.0.0.1"}]')
    assert (r.dev, r.src) == ("tb1", "10.0.0.1")
    assert ifs.parse_route_get_linux("1.2.3.4", "", 2, "RTNETLINK answers: Network is unreachable").error \
        == "Network is unreachable"


def test_usage_errors(tmp_path):
    assert doctor("--rank", "0").returncode == 2
    assert doctor("--no-such-option").returncode == 2
    path = write(tmp_path, {"ranks": [{"addresses": ["127.0.0.1:41001"]}]})
    cp = doctor("--hostfile", path, "--rank", "5")
    assert cp.returncode == 2 and "out of range" in cp.stderr


@pytest.mark.parametrize("content, expect", [
    ('{"ranks": [{"addresses": []}]}', '"addresses" must be a non-empty list'),
    ('{"ranks": [ {"addresses": ["10.0.0.1:5"]},, ]}', "is not valid JSON"),
    ('{"ranks": [{"addresses": ["10.0.0.1:5"]}, {"addresses": ["10.0.0.1:5"]}]}', "duplicate address"),
])
def test_malformed_hostfile(tmp_path, content, expect):
    p = tmp_path / "bad.json"
    p.write_text(content)
    cp = doctor("--hostfile", str(p))
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "PROBLEM: hostfile rejected" in cp.stdout and expect in cp.stdout and "fix:" in cp.stdout
    rc, res = doctor_json("--hostfile", str(p))
    (pr,) = problems(res)
    assert rc == 1 and pr["check"] == "hostfile" and expect in pr["message"] and pr["fix"]


@pytest.mark.parametrize("content, expect", [
    (b'{"ranks": [{"host": "caf\xe9", "addresses": ["10.0.0.1:5"]}]}', "is not UTF-8 text"),
    (b'{"ranks": [{"addresses": ["10.0.0.1:5"]}], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "levels deep"),
    (b'{"ranks": [{"addresses": ["127.0.0.1:41000"]}, {"addresses": ["localhost:41000"]}]}', "duplicate address"),
    (b'{"ranks": [{"addresses": ["[::1]:41000"]}, {"addresses": ["[0:0::1]:41000"]}]}', "duplicate address"),
    (b'{"ranks": [{"addresses": ["999.0.0.1:41000"]}]}', "is not a valid IPv4 address"),
], ids=["latin-1", "nested", "localhost", "ipv6-spelling", "bad-ipv4"])
def test_hostile_hostfile_is_a_problem_not_a_traceback(tmp_path, content, expect):
    p = tmp_path / "bad.json"
    p.write_bytes(content)
    cp = doctor("--hostfile", str(p))
    assert cp.returncode == 1 and "Traceback" not in cp.stderr, cp.stdout + cp.stderr
    assert "PROBLEM: hostfile rejected" in cp.stdout and expect in cp.stdout and "fix:" in cp.stdout, cp.stdout


def test_loopback_hostfile(tmp_path, monkeypatch):
    monkeypatch.setenv("THUNDERLINK_TRANSPORT", "auto")
    path = write(tmp_path, {"ranks": [{"addresses": ["127.0.0.1:41011"]}, {"addresses": ["127.0.0.1:41012"]}]})
    rc, res = doctor_json("--hostfile", path)
    assert rc == 0 and not problems(res), problems(res)
    assert set(res["facts"]) == {"0", "1"}
    # The topology the core derives: rank 0 listens, rank 1 dials; both ranks
    # live here, so auto joins them by shared memory.
    topo = res["topology"]
    assert topo["ring"] == [0, 1] and topo["ring_problem"] is None
    assert topo["links"] == [{"ranks": [0, 1], "acceptor": 0, "dialer": 1,
                              "cables": [{"to": "127.0.0.1:41011", "from": None}]}]
    assert topo["shared_memory"] == [[0, 1]]
    cp = doctor("--hostfile", path)
    assert "topology (as the core will connect):" in cp.stdout, cp.stdout
    assert "ring 0 -> 1 -> 0" in cp.stdout and "rank 0 listens for 1 (at 1 address for any rank)" in cp.stdout
    assert "links 0-1 stay on this host" in cp.stdout and "shared memory" in cp.stdout
    assert "topology" not in doctor("--hostfile", path, "-q").stdout
    monkeypatch.setenv("THUNDERLINK_TRANSPORT", "tcp")
    _, res = doctor_json("--hostfile", path)
    assert res["topology"]["shared_memory"] == []


def loopback_cables(n, cables, port=41100):
    """A hostfile whose cables are pairs of loopback addresses (on lo, so every
    rank is on this host), each end facing the other."""
    ranks = [[] for _ in range(n)]
    for i, (a, b) in enumerate(cables):
        ranks[a].append({"ip": f"127.0.{i + 1}.1", "port": port, "peer": b})
        ranks[b].append({"ip": f"127.0.{i + 1}.2", "port": port, "peer": a})
    return {"ranks": [{"addresses": x} for x in ranks]}


def test_no_ring_shows_the_cores_reason(tmp_path):
    # A line 0-1-2-3: ranks 0 and 3 have one neighbour each (the core names the first).
    obj = loopback_cables(4, [(1, 0), (1, 2), (2, 3)])
    (ring,) = [c for c in rk.hostfile_checks(parse(obj)) if c.check == "ring"]
    assert ring.status == "problem" and ring.title == "no ring through the links"
    assert ring.message == "rank 0 shares a link with rank 1 only, and a ring needs two neighbours: add a " \
                           "cable or a common address to a second rank"
    assert '"ring"' in ring.fix
    path = write(tmp_path, obj)
    cp = doctor("--hostfile", path, "--timeout", "1")
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "PROBLEM: no ring through the links" in cp.stdout
    assert "rank 0 shares a link with rank 1 only" in cp.stdout and "ring: none" in cp.stdout
    rc, res = doctor_json("--hostfile", path, "--timeout", "1")
    assert res["topology"]["ring"] is None and "rank 0" in res["topology"]["ring_problem"]


def test_probes_follow_the_cores_links():
    # A cabled ring: every cable is probed from both ends, each from its own end.
    hf = parse(loopback_cables(3, [(0, 1), (1, 2), (2, 0)]))
    for r in range(3):
        got = {(p, d.ip, s.ip) for p, (_, d), (_, s) in rk.probes(hf, r)}
        want = {(p, x.ip, y.ip) for p in range(3) if p != r
                for x in hf.ranks[p].addresses if x.peer == r
                for y in hf.ranks[r].addresses if y.peer == p}
        assert got == want and len(got) == 2, (r, got)
    # Addresses for any rank: the dialer probes what it dials, leaving by the
    # route; the listener has no end of its own to probe back from.
    hf = parse({"ranks": [{"addresses": [f"127.0.0.1:{41200 + r}"]} for r in range(3)]})
    assert rk.probes(hf, 0) == []
    assert [(p, d.port, s) for p, (_, d), s in rk.probes(hf, 2)] == [(0, 41200, None), (1, 41201, None)]


def test_cable_pairs_as_the_core_pairs_them():
    obj = loopback_cables(2, [(0, 1), (1, 0)])
    obj["ranks"][1]["addresses"].insert(0, "127.0.9.9:41300")  # rank 1's cable ends are its 2nd and 3rd
    hf = parse(obj)
    assert rk.cable_pairs(hf, 0, 1) == [(0, 1), (1, 2)]
    assert rk.cable_pairs(hf, 1, 0) == [(1, 0), (2, 1)]
    # Addresses for any rank are no cable ends.
    hf = parse({"ranks": [{"addresses": ["127.0.0.1:41300"]}, {"addresses": ["127.0.0.1:41301"]}]})
    assert rk.cable_pairs(hf, 0, 1) == []


# ----------------------------------------------------------------------------- emulated clusters


@needs_netns
def test_ring_clean(tmp_path):
    with cl.Cluster(3, topology="ring", name=uniq()) as c:
        path = write(tmp_path, c.hostfile(32400))
        cp = doctor("--hostfile", path, "--all-netns")
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert "no problems found" in cp.stdout
        rc, res = doctor_json("--hostfile", path, "--all-netns")
        assert rc == 0 and res["ok"] and res["problems"] == 0 and res["warnings"] == 0, problems(res)
        assert set(res["facts"]) == {"0", "1", "2"}
        # every cable's MTUs compared, every rank reached both neighbours
        assert sum(c["check"] == "mtu" for c in res["checks"]) == 3
        assert sum(c["check"] == "peer" for c in res["checks"]) == 6
        # one rank, from inside its namespace, without --all-netns
        rc, res = doctor_json("--hostfile", path, netns=c.netns(1))
        assert rc == 0 and set(res["facts"]) == {"1"}


@needs_netns
def test_wrong_address(tmp_path):
    with cl.Cluster(3, topology="ring", name=uniq()) as c:
        hf = copy.deepcopy(c.hostfile(32400))
        hf["ranks"][1]["addresses"][0]["ip"] = "10.99.0.1"
        path = write(tmp_path, hf)
        rc, res = doctor_json("--hostfile", path, "--all-netns", "--timeout", "1")
        assert rc == 1
        bad = [p for p in problems(res) if p["check"] == "address" and p["rank"] == 1]
        assert bad, problems(res)
        assert "10.99.0.1" in bad[0]["message"] and "not an address" in bad[0]["message"]
        # the fix names the address the interface really has
        assert c.hosts[1].addresses[0].ip in bad[0]["fix"] and "ranks[1].addresses[0].ip" in bad[0]["fix"]
        cp = doctor("--hostfile", path, "--all-netns", "--timeout", "1")
        assert cp.returncode == 1 and "PROBLEM: address not on this host -- rank 1, 10.99.0.1:32400" in cp.stdout


@needs_netns
def test_mtu_mismatch(tmp_path):
    with cl.Cluster(3, topology="ring", name=uniq()) as c:
        path = write(tmp_path, c.hostfile(32400))
        cab = c.cable(0, 1)
        subprocess.run(["ip", "-n", cab.netns_b, "link", "set", "dev", cab.ifname_b, "mtu", "9000"],
                       check=True, timeout=10)
        rc, res = doctor_json("--hostfile", path, "--all-netns")
        assert rc == 1
        (mm,) = [p for p in problems(res) if p["check"] == "mtu"]
        msg = mm["message"]
        assert f"rank 0 {cab.ifname_a} ({cab.ip_a}, mtu 1500)" in msg
        assert f"rank 1 {cab.ifname_b} ({cab.ip_b}, mtu 9000)" in msg
        assert f"link set dev {cab.ifname_a} mtu 9000" in mm["fix"] or \
            f"link set dev {cab.ifname_b} mtu 1500" in mm["fix"]
        assert len(problems(res)) == 1, problems(res)


@needs_netns
def test_port_in_use(tmp_path):
    with cl.Cluster(3, topology="ring", name=uniq()) as c:
        hf = c.hostfile(32400)
        path = write(tmp_path, hf)
        a = hf["ranks"][1]["addresses"][0]
        holder = c.run(1, [sys.executable, "-c",
                           "import socket, sys, time\n"
                           "s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()\n"
                           "print('ready', flush=True); time.sleep(60)", a["ip"], str(a["port"])],
                       stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "ready"
            rc, res = doctor_json("--hostfile", path, "--all-netns")
            assert rc == 1
            (pu,) = [p for p in problems(res) if p["check"] == "port"]
            assert pu["title"] == "port in use" and pu["rank"] == 1
            assert f"port {a['port']} on {a['ip']}" in pu["message"] and f"pid {holder.pid}" in pu["message"]
            assert f"kill {holder.pid}" in pu["fix"] and "ranks[1].addresses[0].port" in pu["fix"]
            cp = doctor("--hostfile", path, "--all-netns")
            assert "PROBLEM: port in use -- rank 1" in cp.stdout
        finally:
            holder.kill()
            holder.wait(10)


@needs_netns
def test_cable_down(tmp_path):
    with cl.Cluster(3, topology="ring", name=uniq()) as c:
        path = write(tmp_path, c.hostfile(32400))
        cab = c.cable(1, 2)
        c.set_cable(cab, False)
        rc, res = doctor_json("--hostfile", path, "--all-netns")
        assert rc == 1
        peers = [p for p in problems(res) if p["check"] == "peer"]
        assert {p["rank"] for p in peers} == {1, 2}, peers
        p1 = next(p for p in peers if p["rank"] == 1)
        assert p1["title"] == "peer unreachable" and cab.ip_b in p1["message"] and p1["fix"]
        down = [p for p in problems(res) if p["title"] == "interface down"]
        assert {p["iface"] for p in down} == {cab.ifname_a, cab.ifname_b}
        # the other cables are fine
        assert not [p for p in problems(res) if p["rank"] == 0]


@needs_netns
def test_route_through_another_interface(tmp_path):
    """A more specific route sends the peer's address out another interface
    (think Wi-Fi): a warning when the hostfile pins the cable's interface, a
    problem when it does not."""
    with cl.Cluster(2, topology="ring", name=uniq()) as c:
        hf = c.hostfile(32400)
        ns, cab = c.netns(0), c.cable(0, 1)
        for cmd in (["link", "add", "wlan0", "type", "veth", "peer", "name", "wlan0p"],
                    ["link", "set", "wlan0", "up"], ["link", "set", "wlan0p", "up"],
                    ["route", "add", f"{cab.ip_b}/32", "dev", "wlan0"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True, timeout=10)
        rc, res = doctor_json("--hostfile", write(tmp_path, hf), netns=ns)
        (w,) = [x for x in res["checks"] if x["check"] == "route"]
        assert rc == 0 and w["status"] == "warn" and "wlan0" in w["message"]
        for a in hf["ranks"][0]["addresses"]:
            a.pop("iface")
        rc, res = doctor_json("--hostfile", write(tmp_path, hf, "unpinned.json"), "--timeout", "0.5", netns=ns)
        (p,) = problems(res)
        assert rc == 1 and p["check"] == "route" and "wlan0" in p["message"]
        assert f'ranks[0].addresses[0].iface to "{cab.ifname_a}"' in p["fix"]


@needs_netns
def test_thunderbolt_bridge_flagged():
    """Linux: a bridge of thunderbolt-net interfaces is the Thunderbolt Bridge."""
    with cl.Cluster(1, topology="ring", name=uniq()) as c:
        ns = c.netns(0)
        for cmd in (["link", "add", "thunderbolt0", "type", "veth", "peer", "name", "thunderbolt1"],
                    ["link", "add", "br0", "type", "bridge"],
                    ["link", "set", "thunderbolt0", "master", "br0"],
                    ["link", "set", "thunderbolt1", "master", "br0"],
                    ["link", "set", "thunderbolt0", "up"], ["link", "set", "thunderbolt1", "up"],
                    ["link", "set", "br0", "up"], ["addr", "add", "10.77.0.1/24", "dev", "br0"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True, timeout=10)
        cp = doctor(netns=ns)
        assert "[Thunderbolt Bridge: thunderbolt0, thunderbolt1]" in cp.stdout, cp.stdout
        assert "WARNING: Thunderbolt Bridge in use" in cp.stdout and "nomaster" in cp.stdout
        rc, res = doctor_json(netns=ns)
        br = next(i for i in res["interfaces"] if i["name"] == "br0")
        assert br["kind"] == "thunderbolt-bridge" and br["members"] == ["thunderbolt0", "thunderbolt1"]


def test_the_hostfile_s_rdma_devices_are_checked(tmp_path, monkeypatch):
    """A hostfile's "rdma" device: present and active is ok; a name this host
    does not have is a problem that lists the devices it has."""
    from conftest import use_softverbs

    use_softverbs(monkeypatch)
    monkeypatch.setenv("SOFTVERBS_DEVICES", "sva=127.0.0.1,svb=127.0.0.2")
    path = write(tmp_path, {"ranks": [{"addresses": [{"ip": "127.0.0.1", "port": 41021, "rdma": "svb"}]},
                                      {"addresses": [{"ip": "127.0.0.1", "port": 41022, "rdma": "mlx5_3"}]}]})
    rc, res = doctor_json("--hostfile", path)
    assert rc == 1, res
    bad = [c for c in problems(res) if c["check"] == "rdma"]
    assert len(bad) == 1 and bad[0]["rank"] == 1, problems(res)
    assert "names mlx5_3, which" in bad[0]["message"] and "it has sva, svb" in bad[0]["message"], bad[0]
    assert "one of sva, svb" in bad[0]["fix"], bad[0]
    good = [c for c in res["checks"] if c["check"] == "rdma" and c["rank"] == 0]
    assert [c["status"] for c in good] == ["ok"] and "svb port 1 is active" in good[0]["message"], good
