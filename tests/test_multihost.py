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
