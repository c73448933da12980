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

from conftest import RANKPROGS, result_of, with_jitter
from thunderlink.bindings import lib
from thunderlink.launch import free_ports

pytestmark = pytest.mark.multiproc


@with_jitter
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


@with_jitter
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


@with_jitter
def test_dead_peer_is_an_error_on_every_other_rank(ranks, transport):
    r = ranks(3, "die_mid_collective", None, env={"THUNDERLINK_TRANSPORT": transport}, timeout=60)
    assert r.status == 0, r.all_text()
    for rank in (0, 1):
        v = r.values[rank]
        assert v is not None and v["raised"] == "PeerLostError", r.all_text()
        assert v["seconds"] < 10
        assert "rank" in v["message"]


@with_jitter
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


def _hello(job=1234, version=None):
    """A hello of this protocol version from rank 1 to rank 0 of a 2-rank job."""
    version = int(lib.TL_PROTOCOL_VERSION) if version is None else version
    return struct.pack("<IHHQQIIIIII Q32s", 0x4B4E4C54, version, 0, job, 0, 1, 0, 0, 2, 2, 0, 0, b"")


def _dial(port, deadline_s=10):
    """A connection to a rank's port, once it listens (the caller closes it)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.timeout(60)
def test_a_flood_of_silent_connections_does_not_lock_out_the_job(tmp_path):
    """While rank 1 is late, 200 connections that never say anything are
    opened to rank 0's port and kept open (more than rank 0 keeps pending):
    rank 0 drops the oldest silent ones to make room, and when rank 1 comes
    it connects and the job runs a collective, well within the connect
    deadline (shorter than it would take the silent ones to time out
    before)."""
    import resource

    ports = free_ports(2)
    hf = _hostfile(tmp_path, 2, ports)
    env = dict(os.environ, THUNDERLINK_HOSTFILE=hf, THUNDERLINK_JOB_ID="1234", CT="8")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = min(200, soft - len(os.listdir("/proc/self/fd")) - 32) if os.path.isdir("/proc/self/fd") \
        else min(200, soft // 2)
    assert count > 80, f"the limit on open files ({soft}) leaves too few for the flood"
    socks = []

    def flood():
        socks.append(_dial(ports[0]))
        for _ in range(count - 1):
            socks.append(socket.create_connection(("127.0.0.1", ports[0]), timeout=5))
        # Rank 1 starts now, while rank 0's pending slots are full of them.

    try:
        t = time.monotonic()
        (out0, err0), rank1 = _two_ranks(dict(env, THUNDERLINK_RANK="0"), dict(env, THUNDERLINK_RANK="1"), flood)
        elapsed = time.monotonic() - t
    finally:
        for s in socks:
            s.close()
    assert len(socks) == count
    assert result_of(rank1.stdout + rank1.stderr, "rank 1")["raised"] is None, rank1.stdout + rank1.stderr
    assert result_of(out0 + err0, "rank 0")["raised"] is None, out0 + err0
    assert "flood of silent connections" in err0, err0
    assert elapsed < 8, elapsed


@pytest.mark.timeout(60)
def test_garbage_and_truncated_hellos_are_dropped_and_logged(tmp_path):
    """Bytes that are not a hello, hellos cut short (then closed, reset, or
    left hanging) reach rank 0 while rank 1 is late: each is dropped with a
    log line that says why (the hanging ones within 2 s), and the job runs."""
    ports = free_ports(2)
    hf = _hostfile(tmp_path, 2, ports)
    env = dict(os.environ, THUNDERLINK_HOSTFILE=hf, THUNDERLINK_JOB_ID="1234")
    hello = _hello()
    hanging = []

    def knock():
        garbage = b"\x00" + os.urandom(87)  # never the magic
        assert _stranger(ports[0], garbage) == b""
        assert _stranger(ports[0], hello[:40]) == b""  # truncated, then closed
        s = _dial(ports[0])  # truncated, then reset
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(hello[:20])
        time.sleep(0.2)
        s.close()
        for part in (hello[:50], b"TL"):  # truncated, and too short to tell: left hanging
            s = _dial(ports[0])
            hanging.append(s)
            s.sendall(part)
        time.sleep(2.6)  # rank 1 is late: the hanging ones are dropped meanwhile
        for s in hanging:
            s.settimeout(1)
            try:
                assert s.recv(64) == b"", "rank 0 answered an incomplete hello"
            except ConnectionError:
                pass
            except socket.timeout:
                pytest.fail("rank 0 still holds a connection whose hello stopped short 2.6 s ago")

    try:
        (out0, err0), rank1 = _two_ranks(dict(env, THUNDERLINK_RANK="0"), dict(env, THUNDERLINK_RANK="1"), knock)
    finally:
        for s in hanging:
            s.close()
    assert result_of(rank1.stdout + rank1.stderr, "rank 1")["raised"] is None, rank1.stdout + rank1.stderr
    assert result_of(out0 + err0, "rank 0")["raised"] is None, out0 + err0
    assert "not a thunderlink peer" in err0, err0
    assert err0.count("truncated hello (40 of 88 bytes") == 1, err0
    assert err0.count("truncated hello (20 of 88 bytes") == 1, err0
    assert err0.count("did not complete the handshake within 2 s") == 2, err0


@pytest.mark.timeout(60)
def test_a_dialler_dropped_mid_handshake_dials_again(tmp_path):
    """Rank 1's connection is reset, then closed, after its hello and before
    any answer (as a listener making room, or something briefly on the
    port, would do): rank 1 dials again until its connect deadline and the
    job runs once the real rank 0 is there."""
    ports = free_ports(2)
    hf = _hostfile(tmp_path, 2, ports)
    env = dict(os.environ, THUNDERLINK_HOSTFILE=hf, THUNDERLINK_JOB_ID="1234", CT="20")
    cmd = [sys.executable, RANKPROGS, "connect_only", "[null]"]
    rank1 = rank0 = None
    try:
        with socket.socket() as fake:
            fake.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            fake.bind(("127.0.0.1", ports[0]))
            fake.listen()
            fake.settimeout(15)
            rank1 = subprocess.Popen(cmd, env=dict(env, THUNDERLINK_RANK="1"), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
            for reset in (True, False):
                try:
                    conn, _ = fake.accept()
                except socket.timeout:
                    rank1.kill()
                    out1, err1 = rank1.communicate()
                    pytest.fail(f"rank 1 did not dial (again) in time:\n{out1}{err1}")
                with conn:
                    conn.settimeout(10)
                    got = b""
                    while len(got) < 88:
                        part = conn.recv(88 - len(got))
                        assert part, "rank 1 closed before its whole hello"
                        got += part
                    assert got[:4] == struct.pack("<I", 0x4B4E4C54)
                    if reset:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The port is free again: the real rank 0.
        rank0 = subprocess.run(cmd, env=dict(env, THUNDERLINK_RANK="0"), capture_output=True, text=True,
                               timeout=30)
        out1, err1 = rank1.communicate(timeout=30)
    finally:
        if rank1 is not None and rank1.poll() is None:
            rank1.kill()
            rank1.communicate()
    assert result_of(out1 + err1, "rank 1")["raised"] is None, out1 + err1
    assert result_of(rank0.stdout + rank0.stderr, "rank 0")["raised"] is None, rank0.stdout + rank0.stderr


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
