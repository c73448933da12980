"""Several hosts for real: emulated Thunderbolt clusters (network namespaces,
one /30 per cable), every collective across rings and meshes, two cables
per pair striped by rate, and a cable pulled mid-run.

Ranks run inside their hosts' namespaces through thunderlink's own launcher
(hostfile entries with "netns"), with a hard timeout; every cluster is
removed at the end of its test.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import time

import pytest

from conftest import HERE, RANKPROGS, Ranks
from thunderlink.launch.ssh import launch_hostfile
from thunderlink.testing import cluster as cl

OK, WHY = cl.available(shaping=True)
pytestmark = [pytest.mark.netns, pytest.mark.multiproc, pytest.mark.skipif(not OK, reason=WHY)]

MLXPROGS = os.path.join(HERE, "mlxprogs.py")


def run_in(cluster, tmp_path, prog, func, *args, env=None, timeout=120, on_line=None):
    path = tmp_path / f"hosts-{secrets.token_hex(3)}.json"
    path.write_text(json.dumps(cluster.hostfile()))
    full = {k: v for k, v in os.environ.items()}
    full.update({"THUNDERLINK_CONNECT_TIMEOUT": "20", "THUNDERLINK_TIMEOUT": "30"})
    full.update(env or {})
    res = launch_hostfile(str(path), ["--", sys.executable, prog, func, json.dumps(list(args))], env=full,
                          timeout=timeout, capture=True, on_line=on_line or (lambda *a: None))
    return Ranks(res)


def name():
    return f"tm{secrets.token_hex(2)}"


def neighbour_pairs(n, topology):
    if topology == "mesh" or n <= 3:
        return [[a, b] for a in range(n) for b in range(a + 1, n)]
    return [[i, (i + 1) % n] for i in range(n)]


def check_values(r, n, hashed=True):
    assert r.status == 0, r.all_text()
    for rank in range(n):
        v = r.values[rank]
        assert v is not None, r.all_text()
        bad = {k: c["err"] for k, c in v.items() if c["err"]}
        assert not bad, f"rank {rank}: {bad}"
    if hashed:
        hashes = [{k: c["hash"] for k, c in v.items() if c["hash"]} for v in r.values]
        assert all(h == hashes[0] for h in hashes)


@pytest.mark.parametrize("topology", ["ring", "mesh"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_collective_across_hosts(tmp_path, n, topology):
    with cl.Cluster(n, topology=topology, name=name()) as c:
        reductions = [["sum", d, k, ip] for d in ("float32", "bfloat16", "int32") for k in (1, n + 1, 999983)
                      for ip in (False, True)]
        check_values(run_in(c, tmp_path, RANKPROGS, "reductions", reductions), n)
        gathers = [[kind, "float32", k, False] for kind in ("all_gather", "reduce_scatter", "broadcast")
                   for k in (1, n, 300001)]
        r = run_in(c, tmp_path, RANKPROGS, "gathers", gathers)
        check_values(r, n, hashed=False)
        pairs = neighbour_pairs(n, topology)
        r = run_in(c, tmp_path, RANKPROGS, "p2p", [1, 100000], pairs)
        assert r.status == 0, r.all_text()
        assert all(v["errors"] == [] for v in r.values)
        # The same through the MLX Group.
        r = run_in(c, tmp_path, MLXPROGS, "basics", pairs[0], timeout=180)
        assert r.status == 0, r.all_text()
        for v in r.values:
            assert v["type_ok"] and v["errors"] == [], v
        if topology == "ring" and n == 4:
            # Ranks 0 and 2 share no cable: a clear error, not a hang.
            r = run_in(c, tmp_path, RANKPROGS, "unlinked_send", 2)
            assert r.values[0]["raised"] == "ConfigError" and "share no link" in r.values[0]["message"]


def _tx(c, cable):
    cnt = c.counters(cable)
    return cnt["a"]["tx_bytes"] + cnt["b"]["tx_bytes"]


@pytest.mark.parametrize("rates", [("2gbit", "2gbit"), ("2gbit", "1gbit")])
def test_two_cables_share_the_traffic_by_rate(tmp_path, rates):
    """Two cables between two hosts: both carry traffic, split by their rates."""
    with cl.Cluster(2, topology="ring", cables_per_link=2, rates={(0, 1, 0): rates[0], (0, 1, 1): rates[1]},
                    mtu=9000, name=name()) as c:
        c0, c1 = c.cable(0, 1, 0), c.cable(0, 1, 1)
        before = (_tx(c, c0), _tx(c, c1))
        big = (64 << 20) // 4
        r = run_in(c, tmp_path, RANKPROGS, "reductions", [["sum", "float32", big, False]] * 2, timeout=180)
        check_values(r, 2)
        moved = (_tx(c, c0) - before[0], _tx(c, c1) - before[1])
        assert min(moved) > 32 << 20, moved  # both cables carried a good part of 2 x 128 MiB
        want = cl.parse_rate(rates[0]) / cl.parse_rate(rates[1])
        assert want * 0.8 < moved[0] / moved[1] < want * 1.25, (moved, want)


def test_cable_pulled_mid_run_is_an_error_not_a_hang(tmp_path):
    with cl.Cluster(3, topology="ring", name=name()) as c:
        ready = threading.Event()
        seen = set()

        def on_line(rank, stream, line):
            if line == "ready":
                seen.add(rank)
                if len(seen) == 3:
                    ready.set()

        def pull():
            if ready.wait(60):
                time.sleep(1.0)
                c.set_cable(c.cable(0, 1), False)

        t = threading.Thread(target=pull, daemon=True)
        t.start()
        start = time.monotonic()
        r = run_in(c, tmp_path, RANKPROGS, "loop_all_sum", 120, env={"THUNDERLINK_TIMEOUT": "4"},
                   on_line=on_line, timeout=90)
        elapsed = time.monotonic() - start
        t.join(5)
        assert ready.is_set(), r.all_text()
        assert elapsed < 60, elapsed  # nobody waited for the 120 s loop to end
        raised = [v["raised"] if v else "killed" for v in r.values]
        # The ranks on the pulled cable time out; the third learns it from them.
        assert all(x in ("CollectiveTimeoutError", "PeerLostError", "killed") for x in raised), r.all_text()
        assert any(x == "CollectiveTimeoutError" for x in raised), r.all_text()


def _two_ranks_per_host(c) -> dict:
    """Two emulated hosts, two ranks on each: ranks 0, 1 on host 0 and 2, 3
    on host 1. Ranks of one host reach each other on the host's loopback;
    rank 0 faces rank 2 and rank 1 faces rank 3 over the cable."""
    ends = [c.hosts[h].addresses[0].ip for h in (0, 1)]
    port = 41000
    ranks = []
    for r in range(4):
        h, mate, far = r // 2, r ^ 1, (r + 2) % 4
        ranks.append({"host": c.hosts[h].netns, "netns": c.hosts[h].netns, "addresses": [
            {"ip": "127.0.0.1", "port": port + 2 * r, "peer": mate},
            {"ip": ends[h], "port": port + 2 * r + 1, "peer": far}]})
    return {"version": 1, "ranks": ranks}


def _run_hostfile(tmp_path, hostfile, func, *args, env=None, timeout=120):
    path = tmp_path / f"hosts-{secrets.token_hex(3)}.json"
    path.write_text(json.dumps(hostfile))
    full = dict(os.environ, THUNDERLINK_CONNECT_TIMEOUT="20", THUNDERLINK_TIMEOUT="30", **(env or {}))
    res = launch_hostfile(str(path), ["--", sys.executable, RANKPROGS, func, json.dumps(list(args))], env=full,
                          timeout=timeout, capture=True, on_line=lambda *a: None)
    return Ranks(res)


def test_mixed_job_shared_memory_inside_hosts_tcp_across(tmp_path):
    """Two hosts with two ranks each: shared memory inside each host, TCP
    over the cable between them; every collective is right, and the log and
    the counters say which transport each link took."""
    with cl.Cluster(2, topology="ring", name=name()) as c:
        hf = _two_ranks_per_host(c)
        r = _run_hostfile(tmp_path, hf, "links_report", None, env={"THUNDERLINK_DEBUG": "info"})
        assert r.status == 0, r.all_text()
        for rank, v in enumerate(r.values):
            mate, far = rank ^ 1, (rank + 2) % 4
            assert v["links"] == {str(mate): ["shm", 2], str(far): ["tcp", 2]}, v
            assert f"link to rank {mate}: shm" in r.text(rank) and f"link to rank {far}: tcp" in r.text(rank)
            sent = v["stats"]["bytes_sent_by"]
            assert sent["shm"] > 0 and sent["tcp"] > 0, sent
        reductions = [[op, d, k, ip] for op in ("sum", "max") for d in ("float32", "bfloat16", "int32")
                      for k in (1, 5, 999983) for ip in (False, True)]
        check_values(_run_hostfile(tmp_path, hf, "reductions", reductions), 4)
        gathers = [[kind, "float32", k, False] for kind in ("all_gather", "reduce_scatter", "broadcast")
                   for k in (1, 4, 300001)]
        check_values(_run_hostfile(tmp_path, hf, "gathers", gathers), 4, hashed=False)
        r = _run_hostfile(tmp_path, hf, "p2p", [1, 100000], [[0, 1], [0, 2], [1, 3], [2, 3]])
        assert r.status == 0 and all(v["errors"] == [] for v in r.values), r.all_text()


def test_shared_memory_across_hosts_is_a_clear_error(tmp_path):
    with cl.Cluster(2, topology="ring", name=name()) as c:
        r = run_in(c, tmp_path, RANKPROGS, "connect_only", None, env={"THUNDERLINK_TRANSPORT": "shm", "CT": "20"})
        for v in r.values:
            assert v and v["raised"] == "ConfigError", r.all_text()
            assert "THUNDERLINK_TRANSPORT=shm" in v["message"] and "another host" in v["message"], v
            assert "auto" in v["message"], v
