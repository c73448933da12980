"""Shared memory between ranks of one host: which links take it, what a dead
peer does, and what is left behind.

The collective and error tests run over shared memory too (their transport
axis); this file holds what only this transport has.
"""

import json
import os

import pytest
from pairs import sigkill_mid_collective

from thunderlink.bindings import transport_available
from thunderlink.launch import free_ports

pytestmark = pytest.mark.multiproc

OK, WHY = transport_available("shm")
needs_shm = pytest.mark.skipif(not OK, reason=f"no shared memory here: {WHY}")

TEST_TIMEOUT_S = 120


def _dev_shm():
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _hostfile(tmp_path, n):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"ranks": [{"addresses": [f"127.0.0.1:{p}"]} for p in free_ports(n)]}))
    return str(path)


@needs_shm
@pytest.mark.parametrize("mode,want", [("auto", "shm"), ("shm", "shm"), ("tcp", "tcp")])
def test_links_take_the_transport_asked_for(ranks, mode, want):
    r = ranks(3, "links_report", None, env={"THUNDERLINK_TRANSPORT": mode, "THUNDERLINK_DEBUG": "info"})
    assert r.status == 0, r.all_text()
    for rank, v in enumerate(r.values):
        peers = {int(p): tuple(t) for p, t in v["links"].items()}
        assert set(peers) == {0, 1, 2} - {rank}
        assert all(kind == want for kind, _ in peers.values()), peers
        # Shared memory has one ring per direction of the ring collectives;
        # TCP stripes over THUNDERLINK_CONNS (2) connections per cable.
        assert all(nch == 2 for _, nch in peers.values()), peers
        sent, received = v["stats"]["bytes_sent_by"], v["stats"]["bytes_received_by"]
        assert sent[want] == v["stats"]["bytes_sent"] > 0 and received[want] == v["stats"]["bytes_received"] > 0
        assert all(sent[k] == 0 for k in sent if k != want), sent
        for p in peers:
            assert f"link to rank {p}: {want}, 2 channels" in r.text(rank), r.text(rank)


@needs_shm
def test_sigkilled_peer_is_an_error_within_two_seconds_and_leaves_nothing(tmp_path):
    """A rank killed with SIGKILL in the middle of an all_sum: the others
    raise PeerLostError naming it within 2 s, and /dev/shm holds nothing new
    (the segments have no name once both ends mapped them)."""
    before = _dev_shm()
    sigkill_mid_collective(tmp_path, {"THUNDERLINK_TRANSPORT": "shm"})
    assert _dev_shm() - before == set()


@needs_shm
def test_normal_run_leaves_nothing_in_dev_shm(ranks):
    before = _dev_shm()
    r = ranks(2, "links_report", None, env={"THUNDERLINK_TRANSPORT": "shm"})
    assert r.status == 0, r.all_text()
    assert _dev_shm() - before == set()
