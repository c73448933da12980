"""Which RDMA device a link opens: the hostfile's "rdma" field, per cable.

A host with several RDMA devices (two NICs, or one Thunderbolt port per
cable) needs each link on the device at its end of that link's cable. Here
every rank's process sees two software devices (SOFTVERBS_DEVICES) and the
hostfile says which one each end uses; the log line of each link names the
device it opened.
"""

import json
import os
import random
import sys

import pytest

from conftest import RANKPROGS, Ranks, use_softverbs
from thunderlink.launch import free_ports
from thunderlink.launch.job import Job
from thunderlink.launch.local import rank_env

pytestmark = pytest.mark.multiproc

TEST_TIMEOUT_S = 120
DEVICES = "sva=127.0.0.1,svb=127.0.0.2,svc=127.0.0.3"


def _run(tmp_path, addresses, env):
    """links_report on len(addresses) ranks of a hostfile whose rank r has
    addresses[r]; returns Ranks."""
    n = len(addresses)
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"ranks": [{"addresses": a} for a in addresses]}))
    base = dict(os.environ, THUNDERLINK_TRANSPORT="rdma", THUNDERLINK_DEBUG="info",
                SOFTVERBS_DEVICES=DEVICES, THUNDERLINK_CONNECT_TIMEOUT="20", THUNDERLINK_TIMEOUT="30", **env)
    job_id = random.getrandbits(63)
    envs = [rank_env(base, r, n, str(path), job_id, "rdma-device-test-token") for r in range(n)]
    argv = [sys.executable, RANKPROGS, "links_report", json.dumps([None])]
    return Ranks(Job([argv] * n, envs, capture=True, timeout=60, on_line=lambda *a: None).run())


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_each_cable_opens_the_device_the_hostfile_names(tmp_path, monkeypatch):
    """A 3-rank triangle of cables: every end names its own device, and
    every link's log line shows that device at this rank's end."""
    use_softverbs(monkeypatch)
    p = free_ports(6)
    dev = {(0, 1): "sva", (0, 2): "svb", (1, 0): "svb", (1, 2): "svc", (2, 0): "svc", (2, 1): "sva"}
    addresses = [
        [{"ip": "127.0.0.1", "port": p[2 * r + k], "peer": peer, "rdma": dev[(r, peer)]}
         for k, peer in enumerate(q for q in range(3) if q != r)]
        for r in range(3)
    ]
    r = _run(tmp_path, addresses, {})
    assert r.status == 0, r.all_text()
    for rank in range(3):
        assert r.values[rank]["links"] == {str(q): ["rdma", 2] for q in range(3) if q != rank}, r.all_text()
        for peer in range(3):
            if peer != rank:
                assert f"link to rank {peer}: rdma on {dev[(rank, peer)]} " in r.text(rank), r.text(rank)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_an_address_open_to_every_rank_names_the_rank_s_device(tmp_path, monkeypatch):
    """Addresses without "peer" (a switch, one NIC per host): the device on
    the address serves every link of that rank."""
    use_softverbs(monkeypatch)
    p = free_ports(2)
    r = _run(tmp_path, [[{"ip": "127.0.0.1", "port": p[0], "rdma": "svc"}],
                        [{"ip": "127.0.0.1", "port": p[1], "rdma": "svb"}]], {})
    assert r.status == 0, r.all_text()
    assert "link to rank 1: rdma on svc " in r.text(0), r.text(0)
    assert "link to rank 0: rdma on svb " in r.text(1), r.text(1)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_an_unknown_device_in_the_hostfile_is_named_on_every_rank(tmp_path, monkeypatch):
    use_softverbs(monkeypatch)
    p = free_ports(2)
    r = _run(tmp_path, [[{"ip": "127.0.0.1", "port": p[0], "peer": 1, "rdma": "mlx5_7"}],
                        [{"ip": "127.0.0.1", "port": p[1], "peer": 0, "rdma": "sva"}]], {})
    assert r.status != 0, r.all_text()
    assert "the hostfile's \"rdma\": mlx5_7: no such device (found: sva svb svc)" in r.text(0), r.text(0)
    # Its peer learns why from rank 0's answer in the set-up.
    assert "rank 0 cannot: the hostfile's \"rdma\": mlx5_7: no such device" in r.text(1), r.text(1)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_thunderlink_ibv_device_overrides_the_hostfile(tmp_path, monkeypatch):
    use_softverbs(monkeypatch)
    p = free_ports(2)
    r = _run(tmp_path, [[{"ip": "127.0.0.1", "port": p[0], "peer": 1, "rdma": "mlx5_7"}],
                        [{"ip": "127.0.0.1", "port": p[1], "peer": 0, "rdma": "sva"}]],
             {"THUNDERLINK_IBV_DEVICE": "svb"})
    assert r.status == 0, r.all_text()
    for rank in range(2):
        assert "rdma on svb " in r.text(rank), r.text(rank)
