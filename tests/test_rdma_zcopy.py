"""RDMA zero copy: large messages written straight from the sender's buffer
into the receiver's (a rendezvous: RTS, CTS or NACK, RDMA WRITE_WITH_IMM),
through a registration cache with LRU eviction, over the software provider
thunderlink.testing.softverbs.

Every program runs as real ranks with a hard timeout. The rank programs are
in zcopyprogs.py. THUNDERLINK_IBV_ZCOPY is 64K here, so that the ring's
chunks (512K at most) and messages on both sides of it are covered.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import HERE, SOFTVERBS_JITTER_US, run_ranks, use_softverbs

pytestmark = pytest.mark.multiproc

TEST_TIMEOUT_S = 180
PROGS = os.path.join(HERE, "zcopyprogs.py")
ZCOPY = 64 << 10
# float32 counts: below the threshold, one byte short of it... at it, and
# well above (chunks of the ring, and messages larger than a chunk).
COUNTS = [1000, ZCOPY // 4 - 1, ZCOPY // 4, 600001]


def run(n, func, args, env, timeout=120):
    """Run zcopyprogs.<func>(*args) as n ranks over RDMA."""
    full = {"THUNDERLINK_TRANSPORT": "rdma", "THUNDERLINK_IBV_ZCOPY": str(ZCOPY)}
    full.update(env)
    return run_ranks(n, func, env=full, timeout=timeout,
                     argv=[sys.executable, PROGS, func, json.dumps(args)])


@pytest.fixture(scope="module")
def tcp_digests():
    """The results over TCP: the reference, bit for bit."""
    r = run(3, "across", [COUNTS], {"THUNDERLINK_TRANSPORT": "tcp"})
    assert r.status == 0, r.all_text()
    return [v["digests"] for v in r.results()]


@pytest.mark.parametrize("variant", ["rc", "uc-jitter", "off"])
def test_results_are_bit_identical_to_tcp(monkeypatch, tcp_digests, variant):
    """all_sum (out of place and in place), all_gather, reduce_scatter and
    send/recv between every pair, below, at and above the threshold, over RC,
    over UC with completions delayed and reordered, and with zero copy off:
    every result has the bits TCP gives; the counters show which path ran."""
    use_softverbs(monkeypatch, jitter=variant == "uc-jitter")
    env = {}
    if variant == "uc-jitter":
        env["SOFTVERBS_UC_ONLY"] = "1"
    if variant == "off":
        env["THUNDERLINK_IBV_ZCOPY"] = "0"
    r = run(3, "across", [COUNTS], env)
    assert r.status == 0, r.all_text()
    values = r.results()
    for rank, v in enumerate(values):
        assert v["digests"] == tcp_digests[rank], (rank, variant)
        s = v["stats"]
        assert s["bytes_sent_by"]["rdma"] == s["bytes_sent"] > 0, s
        z = s["rdma"]
        if variant == "off":
            assert all(x == 0 for x in z.values()), z
        else:
            # Both directions ran zero copy; each write is one message of at
            # least the threshold; every region it used was registered or hit.
            assert z["zcopy_sent"] > 0 and z["zcopy_received"] > 0, z
            assert z["zcopy_sent_bytes"] >= ZCOPY * z["zcopy_sent"], z
            assert z["mr_registered"] > 0 and z["mr_hits"] > 0 and z["mr_evicted"] == 0, z
            # In-place all_sum reduces on arrival into the buffer it also
            # reads: that receive cannot take a write in place, and says so.
            assert z["zcopy_staged"] > 0, z
    if variant != "off":
        sent = sum(v["stats"]["rdma"]["zcopy_sent_bytes"] for v in values)
        assert sent == sum(v["stats"]["rdma"]["zcopy_received_bytes"] for v in values)


def test_ranks_that_differ_agree_per_link(monkeypatch, tcp_digests):
    """THUNDERLINK_IBV_ZCOPY is not a shared option: each link's two ends
    agree in set-up (off if either is off, else the larger size). Rank 0 off,
    ranks 1 and 2 at 64K and 128K: rank 0's links run without zero copy,
    the link between 1 and 2 with it; every result as over TCP."""
    use_softverbs(monkeypatch)
    r = run(3, "across", [COUNTS, ["0", str(ZCOPY), str(2 * ZCOPY)]], {})
    assert r.status == 0, r.all_text()
    values = r.results()
    for rank, v in enumerate(values):
        assert v["digests"] == tcp_digests[rank], rank
    z = [v["stats"]["rdma"] for v in values]
    assert z[0]["zcopy_sent"] == z[0]["zcopy_received"] == 0, z
    assert z[1]["zcopy_sent"] > 0 and z[2]["zcopy_received"] > 0, z
    # Between ranks 1 and 2, nothing below the larger size went zero copy.
    assert z[1]["zcopy_sent_bytes"] >= 2 * ZCOPY * z[1]["zcopy_sent"], z


@pytest.mark.parametrize("uc", [False, True], ids=["rc", "uc"])
def test_eviction_under_load_keeps_results_right(monkeypatch, uc):
    """A cache of two regions per link and a device of 5 regions (2 of them
    the links' staging buffers), where a reduce_scatter uses three buffers
    (input, scratch, output); 4 distinct input and output buffers, 3 ranks
    (2 links each, 2 channels per link), jitter: regions are evicted (least
    recently used, never one a write still uses: softverbs fails a write
    whose region was deregistered), the device refuses registrations,
    messages fall back to the staging slots, and every result is exact."""
    use_softverbs(monkeypatch, jitter=True)
    env = {"THUNDERLINK_IBV_MR_CACHE": "2", "SOFTVERBS_MAX_MR": "5"}
    if uc:
        env["SOFTVERBS_UC_ONLY"] = "1"
    r = run(3, "many_buffers", [[200001, 4, 2]], env)
    assert r.status == 0, r.all_text()
    total = {"mr_evicted": 0, "zcopy_staged": 0, "zcopy_received": 0}
    for v in r.results():
        assert v["wrong"] == [], v
        for k in total:
            total[k] += v["stats"]["rdma"][k]
    assert total["mr_evicted"] > 0 and total["zcopy_staged"] > 0 and total["zcopy_received"] > 0, total


def test_a_registered_buffer_is_registered_once(monkeypatch):
    """A buffer not declared is registered again by every call that uses it;
    Comm.register_memory: the buffer is registered once per link and
    every later call finds it in the cache (no new registration); it is
    deregistered once, and a second deregister is an error naming it."""
    use_softverbs(monkeypatch)
    r = run(3, "registered", [[100000, 6]], {})
    assert r.status == 0, r.all_text()
    for v in r.results():
        # Undeclared, the same buffer is registered anew by every call (a
        # registration never outlives the call that made it).
        assert v["per_call"][0] == v["per_call"][1] > 0, v
        first, last = v["first"], v["last"]
        assert v["wrong"] == 0, v
        # One per link at register time, none after.
        assert first["mr_registered"] == last["mr_registered"] == sum(v["per_call"]) + 2, v
        assert last["mr_hits"] > first["mr_hits"] > 0 and last["zcopy_received"] > first["zcopy_received"] > 0, v
        assert v["again"] and "were not registered" in v["again"], v


def test_register_memory_past_the_device_limit_is_a_clear_error(monkeypatch):
    """A device with no memory region left (SOFTVERBS_MAX_MR: the links'
    staging buffers take them all): register_memory raises, naming the
    limit, and registers nothing (all links or none); collectives go on,
    through the staging slots."""
    use_softverbs(monkeypatch)
    r = run(3, "register_too_much", [None], {"SOFTVERBS_MAX_MR": "2"})
    assert r.status == 0, r.all_text()
    for v in r.results():
        assert v["ok"], v
        kind, msg = v["raised"]
        assert kind == "ConfigError" and "register_memory" in msg and "memory regions are used up" in msg, v


def test_a_lost_zero_copy_write_fails_every_rank_quickly(monkeypatch):
    """UC, and every third RDMA write a queue pair transmits is lost (its
    sender completes it, as UC does): every rank fails within seconds with
    the error naming the lost write; no result is wrong."""
    use_softverbs(monkeypatch)
    env = {"SOFTVERBS_UC_ONLY": "1", "SOFTVERBS_DROP_EVERY": "3", "SOFTVERBS_DROP_WRITES": "1",
           "THUNDERLINK_TIMEOUT": "30", "THUNDERLINK_HEARTBEAT": "0.5"}
    r = run(3, "lossy", [[600001, 50]], env, timeout=100)
    assert r.status == 0, r.all_text()
    for rank, v in enumerate(r.results()):
        assert v["raised"] is not None and v["wrong"] == 0, (rank, v)
        assert v["seconds"] < 10, (rank, v)
        msg = v["message"]
        assert "zero-copy RDMA write" in msg and "was lost" in msg and "UC queue pairs do not retransmit" in msg, (rank, msg)


@pytest.mark.parametrize("every", [4, 7])
def test_any_lost_message_of_a_rendezvous_is_found(monkeypatch, every):
    """UC, every Nth message of any kind lost (data, RTS, write, and the
    control messages: credits, CTS, NACK, whose loss is made good by the
    next one or by the sender's probe): every rank fails within seconds,
    naming a lost message; never a hang, never a wrong result."""
    use_softverbs(monkeypatch)
    env = {"SOFTVERBS_UC_ONLY": "1", "SOFTVERBS_DROP_EVERY": str(every), "SOFTVERBS_DROP_AFTER": "40",
           "THUNDERLINK_TIMEOUT": "30", "THUNDERLINK_HEARTBEAT": "0.5"}
    r = run(3, "lossy", [[600001, 50]], env, timeout=100)
    assert r.status == 0, r.all_text()
    for rank, v in enumerate(r.results()):
        assert v["raised"] is not None and v["wrong"] == 0, (rank, v)
        assert v["seconds"] < 10, (rank, v)
        assert "was lost" in v["message"] and "UC queue pairs do not retransmit" in v["message"], (rank, v)
