"""Bad input and failures: each gets a clear error that names the problem, on
every rank, within its deadline; nothing hangs and nothing is silently wrong."""

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time

import pytest

from conftest import RANKPROGS, result_of
from thunderlink.bindings import lib
from thunderlink.launch import free_ports

pytestmark = pytest.mark.multiproc


def test_mismatched_collectives_fail_on_every_rank(ranks, transport):
    for kind in ("op", "size", "dtype", "large_size"):
        r = ranks(3, "mismatch", kind, env={"THUNDERLINK_TRANSPORT": transport})
        assert r.status == 0, r.all_text()
        values = r.results()
        for v in values:
            assert v["raised"] in ("MismatchError", "PeerLostError"), (kind, v)
        # The ranks that compared headers name both sides.
        assert any(v["raised"] == "MismatchError" for v in values), kind
        msg = next(v["message"] for v in values if v["raised"] == "MismatchError")
        assert "while this rank called" in msg or "sizes or dtypes" in msg, msg


def test_mismatched_broadcast_root_is_reported(ranks, transport):
    r = ranks(3, "mismatch", "root", env={"THUNDERLINK_TRANSPORT": transport})
    assert r.status == 0, r.all_text()
    # Ranks 0 and 2 call broadcast #1 from root 0, rank 1 from root 1. A rank
    # that compares roots names both; a rank that went on to the barrier meets
    # the other root's broadcast #1 there; the others are told by a peer that
    # failed. Every rank raises, at least one detects the mismatch itself, and
    # every message leads back to broadcast #1 (not to some unrelated failure).
    values = r.results()
    assert all(v["raised"] in ("MismatchError", "PeerLostError") for v in values), values
    detected = [v["message"] for v in values if v["raised"] == "MismatchError"]
    assert detected, values
    for msg in detected:
        roots = re.search(r"broadcast #1 from root (\d) while this rank called it from root (\d)", msg)
        assert (roots and roots[1] != roots[2]) or re.search(
            r"called broadcast #1 \(.*\) while this rank called barrier #2", msg), msg
    assert all("broadcast #1" in v["message"] for v in values), values


def test_dead_peer_is_an_error_on_every_other_rank(ranks, transport):
    r = ranks(3, "die_mid_collective", None, env={"THUNDERLINK_TRANSPORT": transport}, timeout=60)
    assert r.status == 0, r.all_text()
    for rank in (0, 1):
        v = r.values[rank]
        assert v is not None and v["raised"] == "PeerLostError", r.all_text()
        assert v["seconds"] < 10
        assert "rank" in v["message"]


def test_failure_is_sticky(ranks, transport):
    r = ranks(2, "then_fail_later", None, env={"THUNDERLINK_TRANSPORT": transport})
    assert r.status == 0, r.all_text()
    for v in r.results():
        assert v["first"] is not None
        assert v["same"], v


@pytest.mark.parametrize("kind", ["dtype", "peer", "self", "noncontig"])
def test_bad_arguments_raise_value_errors_and_leave_the_comm_usable(ranks, transport, kind):
    r = ranks(2, "bad_call", kind, env={"THUNDERLINK_TRANSPORT": transport})
    assert r.status == 0, r.all_text()
    for v in r.results():
        assert v["raised"] == "InvalidArgumentError", v
        assert "ValueError" in v["bases"]
        assert "cffi" not in v["message"]


def _hostfile(tmp_path, n, ports):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"ranks": [{"addresses": [f"127.0.0.1:{p}"]} for p in ports[:n]]}))
    return str(path)


def _run_one(tmp_path, rank, hostfile, extra_env=None, timeout=30):
    env = dict(os.environ, THUNDERLINK_HOSTFILE=hostfile, THUNDERLINK_RANK=str(rank), CT="2",
               THUNDERLINK_JOB_ID="1234")
    env.update(extra_env or {})
    p = subprocess.run([sys.executable, RANKPROGS, "connect_only", "[null]"], env=env,
                       capture_output=True, text=True, timeout=timeout)
    return result_of(p.stdout + p.stderr, f"rank {rank} (status {p.returncode})")


def test_unreachable_peer_names_the_address(tmp_path):
    ports = free_ports(2)
    hf = _hostfile(tmp_path, 2, ports)
    t = time.monotonic()
    v = _run_one(tmp_path, 1, hf)  # rank 1 connects to rank 0, which is absent
    assert time.monotonic() - t < 15
    assert v["raised"] == "CollectiveTimeoutError"
    assert f"127.0.0.1:{ports[0]}" in v["message"] and "rank 0" in v["message"]
    v = _run_one(tmp_path, 0, hf)  # rank 0 waits for rank 1, which is absent
    assert v["raised"] == "CollectiveTimeoutError"
    assert "rank 1 never connected" in v["message"]


def test_port_in_use_is_named(tmp_path):
    ports = free_ports(2)
    hf = _hostfile(tmp_path, 2, ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))
        s.listen()
        v = _run_one(tmp_path, 0, hf)
    assert v["raised"] == "ConfigError"
    assert f"port {ports[0]}" in v["message"] and "in use" in v["message"]


def test_address_not_on_this_host(tmp_path):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"ranks": [{"addresses": ["192.0.2.1:5000"]}, {"addresses": ["127.0.0.1:5001"]}]}))
    v = _run_one(tmp_path, 0, str(path))
    assert v["raised"] == "ConfigError"
    assert "192.0.2.1 is not an address of this host" in v["message"]


def _stranger(port, payload, wait=0.5):
    """Connect to a rank's port, send payload, return what came back."""
    deadline = time.monotonic() + 10
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with s:
        s.sendall(payload)
        s.settimeout(wait)
        try:
            return s.recv(64)
        except (socket.timeout, ConnectionError):
            return b""


def _two_ranks(env0, env1, meanwhile=None):
    """Rank 0 in the background, `meanwhile()`, then rank 1; both run
    connect_only. Returns ((rank 0's stdout, stderr), rank 1's result)."""
    rank0 = subprocess.Popen([sys.executable, RANKPROGS, "connect_only", "[null]"], env=env0,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if meanwhile:
            meanwhile()
        rank1 = subprocess.run([sys.executable, RANKPROGS, "connect_only", "[null]"], env=env1,
                               capture_output=True, text=True, timeout=30)
        return rank0.communicate(timeout=30), rank1
    finally:
        rank0.kill()
        rank0.wait()


def test_strangers_are_refused_without_disturbing_the_job(tmp_path):
    """While rank 1 is late, a non-thunderlink client and a thunderlink peer
    of another job knock on rank 0's port: both are refused (with a log line)
    and the job still runs."""
    ports = free_ports(2)
    hf = _hostfile(tmp_path, 2, ports)
    env = dict(os.environ, THUNDERLINK_HOSTFILE=hf, THUNDERLINK_JOB_ID="1234")

    def knock():
        _stranger(ports[0], b"GET / HTTP/1.0\r\n\r\n" + b"x" * 80)
        # A hello of this protocol version from another job (job id 99).
        version = int(lib.TL_PROTOCOL_VERSION)
        hello = struct.pack("<IHHQQIIIIII Q32s", 0x4B4E4C54, version, 0, 99, 0, 1, 0, 0, 2, 2, 0, 0, b"")
        ack = _stranger(ports[0], hello)
        assert len(ack) == 56 and struct.unpack("<IHH", ack[:8])[1:] == (version, 1), ack  # ACK_WRONG_JOB
        # One of another protocol version, whatever its job: refused, not fatal.
        ack = _stranger(ports[0], struct.pack("<IH", 0x4B4E4C54, version + 1) + hello[6:])
        assert len(ack) >= 16 and struct.unpack("<IHH", ack[:8])[2] == 2, ack  # ACK_WRONG_VERSION

    (out0, err0), rank1 = _two_ranks(dict(env, THUNDERLINK_RANK="0"), dict(env, THUNDERLINK_RANK="1"), knock)
    assert '"raised": null' in rank1.stdout, rank1.stdout + rank1.stderr
    assert '"raised": null' in out0, out0 + err0
    assert "refused a connection" in err0 and "not a thunderlink peer" in err0
    assert "another job" in err0


@pytest.mark.parametrize("name,value", [("THUNDERLINK_CHUNK_BYTES", "2M"), ("THUNDERLINK_PIPELINE_DEPTH", "4"),
                                        ("THUNDERLINK_TRANSPORT", "tcp")])
def test_different_tuning_on_two_ranks_is_refused(tmp_path, name, value):
    """Settings that change the wire are compared at connect, not found out
    mid-collective."""
    ports = free_ports(2)
    hf = _hostfile(tmp_path, 2, ports)
    env = dict(os.environ, THUNDERLINK_HOSTFILE=hf, THUNDERLINK_JOB_ID="77", CT="10")
    (out0, err0), p1 = _two_ranks(dict(env, THUNDERLINK_RANK="0", **{name: value}), dict(env, THUNDERLINK_RANK="1"))
    for rank, out in ((1, p1.stdout + p1.stderr), (0, out0 + err0)):
        v = result_of(out, f"rank {rank}")
        assert v["raised"] == "ConfigError", v
        assert name in v["message"]


def test_peers_text_is_printed_escaped():
    """Messages can quote a peer or a file: terminal escapes and
    bidirectional overrides never reach the terminal raw."""
    from thunderlink.errors import printable

    shown = printable("rank 1 failed: \x1b[2J\x9b31m \u202eevil\u2066 caf\u00e9")
    assert shown == "rank 1 failed: \\x1b[2J\\x9b31m \\u202eevil\\u2066 caf\u00e9"
    assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in shown)
