"""Fuzzing: every hostfile format and every configuration input, then the
handshake and the frame header of live jobs.

Hostfile targets (no network): whatever the bytes or the JSON, reading a
hostfile returns a Hostfile or raises ConfigError, quickly and without
growing memory; a Hostfile that parses re-parses from its canonical form to
the same job. The formats: thunderlink's JSON object, MLX's ring list, a
JACCL device matrix (MLX_IBV_DEVICES) and the records its coordinator
exchanges, plus the variables that point at them (config.from_env) and the
rate and size parsers.

Live targets (two ranks of a job as threads of this process): generated
garbage, truncated, oversized and valid-prefix-then-garbage handshakes sent to
a starting rank's port never stop the job; generated frames sent by a fake
peer in the middle of a collective are an error, or a right result, never a
crash, a hang or a wrong answer.

In CI every target runs a fixed number of derandomized examples (the same
inputs every run, no example database). ``python bench/fuzz.py`` runs the
same targets for minutes with fresh random inputs.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from thunderlink import config as config_mod  # noqa: E402
from thunderlink.errors import ConfigError, ThunderlinkError  # noqa: E402
from thunderlink.hosts import hostfile as hf_mod  # noqa: E402
from thunderlink.hosts import jaccl  # noqa: E402

TEST_TIMEOUT_S = 120

# CI: a bounded, repeatable run. bench/fuzz.py overrides these per target.
CI = settings(max_examples=80, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
CI_LIVE = settings(CI, max_examples=30)

# ---- strategies ----------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", "127.0.0.1:1", "::1", "rdma_en3", "a:b:c", "[::1]:2"]))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.one_of(st.text(max_size=8),
                                                      st.sampled_from(["ranks", "addresses", "ip", "port", "peer",
                                                                       "iface", "rate", "prefix", "host", "ssh",
                                                                       "ring", "version"])),
                                            inner, max_size=5)),
    max_leaves=30)

hosts = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(["localhost", "LOCALHOST.", "127.0.0.1", "::1", "0:0::1", "::ffff:127.0.0.1", "999.0.0.1",
                     "10.1", "0x7f.1", "a..b", "[::1]", "fe80::1%lo", "host-1", "h_2.example", "-bad", "",
                     " 127.0.0.2 ", "1.2.3.4.5", "x" * 300, "\x1b[31m", "é.local"]),
    st.text(max_size=20))
ports = st.one_of(st.integers(-5, 70000), st.sampled_from([0, 1, 65535, 65536, True, 1.5, "80", None]))
rates = st.one_of(st.sampled_from([10, 0, -1, 1e-300, 1e308, float("inf"), float("nan"), "10gbit", "40Gbps",
                                   "25G", "100mibit", "0bit", "9" * 400, "1e9", "fast", True, [1], {}]),
                  st.floats(), st.text(max_size=10))


def hostport(draw_host, draw_port):
    return st.builds(lambda h, p: (f"[{h}]:{p}" if ":" in h and not h.startswith("[") else f"{h}:{p}"),
                     draw_host, draw_port)


address_objects = st.fixed_dictionaries(
    {"ip": hosts},
    optional={"port": ports, "peer": st.one_of(st.integers(-2, 9), st.sampled_from([None, True, "1"])),
              "iface": st.one_of(st.sampled_from(["lo", "en2", "x" * 80, "", "\n", None]), st.text(max_size=8)),
              "rate": rates, "prefix": st.one_of(st.integers(-1, 200), st.sampled_from([None, True, "30"])),
              "bogus": json_scalars})
addresses = st.one_of(hostport(hosts, ports), st.text(max_size=20), address_objects, json_scalars)
rank_entries = st.one_of(
    st.fixed_dictionaries({"addresses": st.lists(addresses, max_size=4)},
                          optional={"host": st.one_of(st.text(max_size=10), json_scalars),
                                    "ssh": st.one_of(st.text(max_size=10), json_scalars),
                                    "port": ports, "extra": json_values}),
    json_values)
thunderlink_hostfiles = st.fixed_dictionaries(
    {"ranks": st.lists(rank_entries, max_size=6)},
    optional={"version": st.sampled_from([1, 1, 2, "1", None, 1.0, True]), "port": ports,
              "ring": st.one_of(st.permutations(list(range(4))), st.lists(st.integers(-1, 6), max_size=6),
                                json_values)})
mlx_ring_hostfiles = st.lists(st.one_of(st.lists(st.one_of(hostport(hosts, ports), st.text(max_size=16)),
                                                 max_size=3),
                                        hostport(hosts, ports), json_scalars), max_size=6)
# Near-valid: loopback addresses on distinct ports, so that many of these parse.
valid_ish = st.integers(1, 6).flatmap(lambda n: st.fixed_dictionaries({
    "ranks": st.just([{"addresses": [f"127.0.0.{1 + r}:{20000 + r}"]} for r in range(n)]),
}, optional={"ring": st.permutations(list(range(n))), "port": st.integers(1, 65535)}))
device_names = st.one_of(st.none(), st.sampled_from(["rdma_en2", "rdma_en3", "rdma_lo", "en5", "rdma_", ""]),
                         st.lists(st.sampled_from(["rdma_en2", "rdma_en3", "x:y"]), max_size=3), json_scalars)
device_matrices = st.integers(0, 5).flatmap(
    lambda n: st.lists(st.lists(device_names, min_size=n, max_size=n), min_size=n, max_size=n))


# ---- targets: each returns normally for an acceptable outcome, raises otherwise -----


def _parsed_is_sound(hf) -> None:
    """What a caller does with a Hostfile must work, and its canonical form
    must parse back to the same job."""
    assert hf.size >= 1
    eps = hf.endpoints()
    assert len(eps) == sum(len(r.addresses) for r in hf.ranks)
    job = hf.job_id()
    again = hf_mod.parse(json.loads(hf.canonical))
    assert again.job_id() == job, (hf.canonical, again.canonical)
    if hf.ring is not None:
        assert sorted(hf.ring) == list(range(hf.size))


def target_decode(data: bytes) -> None:
    try:
        hf_mod.decode_json(data, "fuzzed hostfile")
    except ConfigError:
        pass


def target_read(data: bytes, path: str) -> None:
    with open(path, "wb") as f:
        f.write(data)
    try:
        hf = hf_mod.load(path)
    except ConfigError:
        return
    _parsed_is_sound(hf)


def target_parse(obj) -> None:
    try:
        hf = hf_mod.parse(obj)
    except ConfigError:
        return
    _parsed_is_sound(hf)


def target_matrix(obj, rank: int) -> None:
    is_matrix = hf_mod.is_device_matrix(obj)
    assert is_matrix in (True, False)
    # Without a coordinator, or not a matrix, or the rank out of range: a clear error.
    with pytest.raises(ConfigError):
        jaccl.hostfile_from_matrix(obj, rank, None)
    if not is_matrix:
        with pytest.raises(ConfigError):
            jaccl.hostfile_from_matrix(obj, rank, "127.0.0.1:1", timeout=0.1)


def target_records(records) -> None:
    """What rank 0 hands every rank: the records the coordinator collected."""
    try:
        hf = hf_mod.parse_addresses({"version": 1, "ranks": records})
    except ConfigError:
        return
    _parsed_is_sound(hf)


def target_coordinator(text: str) -> None:
    try:
        host, port = jaccl._split(text)
    except ConfigError:
        return
    assert isinstance(host, str) and isinstance(port, int)


def target_env(env: dict) -> None:
    try:
        config_mod.from_env(env)
    except ConfigError:
        pass


def target_rate_size(value) -> None:
    try:
        r = config_mod.parse_rate(value)
        assert math.isfinite(r) and r > 0, r
    except ConfigError:
        pass
    try:
        s = config_mod.parse_size(value)
        assert s >= 0
    except ConfigError:
        pass


# ---- the CI runs of the offline targets ------------------------------------------


@CI
@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                 thunderlink_hostfiles.map(lambda v: json.dumps(v).encode()),
                 st.binary(max_size=40).map(lambda b: b'{"ranks": [' + b)))
def test_fuzz_decode(data):
    target_decode(data)


@CI
@given(st.one_of(st.binary(max_size=200), thunderlink_hostfiles.map(lambda v: json.dumps(v).encode()),
                 mlx_ring_hostfiles.map(lambda v: json.dumps(v).encode())))
def test_fuzz_read_hostfile(tmp_path_factory, data):
    target_read(data, str(tmp_path_factory.mktemp("hf") / "hostfile.json"))


@CI
@given(st.one_of(thunderlink_hostfiles, valid_ish, json_values))
def test_fuzz_thunderlink_format(obj):
    target_parse(obj)


@CI
@given(mlx_ring_hostfiles)
def test_fuzz_mlx_ring_format(obj):
    target_parse(obj)


@CI
@given(st.one_of(device_matrices, json_values), st.integers(-1, 6))
def test_fuzz_jaccl_device_matrix(obj, rank):
    target_matrix(obj, rank)


@CI
@given(st.one_of(st.lists(rank_entries, max_size=5), json_values))
def test_fuzz_jaccl_records(records):
    target_records(records)


@CI
@given(st.one_of(hostport(hosts, ports), st.text(max_size=30)))
def test_fuzz_jaccl_coordinator(text):
    target_coordinator(text)


ENV_NAMES = sorted(set(config_mod.__dict__.get("HOSTFILE_VARS", ())) | set(config_mod.__dict__.get("RANK_VARS", ()))
                   | {s.env for s in config_mod.OPTIONS}
                   | {"THUNDERLINK_JOB_ID", "THUNDERLINK_WORLD_SIZE", "THUNDERLINK_IFNAME", "MLX_DISTRIBUTED_BACKEND",
                      "MLX_JACCL_COORDINATOR"})


@CI
@given(st.dictionaries(st.sampled_from(ENV_NAMES),
                       st.one_of(st.text(max_size=12), st.sampled_from(["9" * 400, "1e999", "-1", "0x10", "nan",
                                                                        "inf", "1" * 30, " 5 ", "64K", "1.5"])),
                       max_size=6))
def test_fuzz_environment(env):
    target_env(env)


@CI
@given(rates)
def test_fuzz_rates_and_sizes(value):
    target_rate_size(value)


def test_big_and_deep_inputs_are_refused_quickly(tmp_path):
    """The bounds that keep a hostile hostfile from costing memory or time."""
    cases = {
        "deep.json": b"[" * 100000 + b"]" * 100000,
        "huge.json": b" " * (hf_mod.MAX_HOSTFILE_BYTES + 10),
        "bigint.json": b'{"ranks": [], "port": ' + b"9" * 100000 + b"}",
        "wide.json": json.dumps({"ranks": [{"addresses": [f"10.{r >> 16 & 255}.{r >> 8 & 255}.{r & 255}:1"]}
                                           for r in range(5000)]}).encode(),
        # Not a ring in rank order: the search is refused past 512 ranks, not run.
        "unordered.json": json.dumps({"ranks": [{"addresses": [{"ip": "10.0.0.1", "port": 1 + r,
                                                               "peer": (r + 2) % 3000}]}
                                                for r in range(3000)]}).encode(),
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        t0 = time.monotonic()
        try:
            hf_mod.load(str(p))
        except ConfigError:
            pass
        assert time.monotonic() - t0 < 10, name


# ---- live: two ranks of one job as threads of this process --------------------------


def _start(rank: int, eps, opts, out: list, errs: list):
    from thunderlink.bindings import Comm

    def run():
        try:
            out[rank] = Comm.create(rank, 2, eps, opts)
        except Exception as e:  # noqa: BLE001 -- reported by the caller
            errs.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t


def _fresh_job(transport="tcp", timeout=10.0, conns=None):
    from thunderlink.bindings import Endpoint, Options
    from thunderlink.launch import free_ports

    p = free_ports(2)
    eps = [Endpoint(owner=r, host="127.0.0.1", port=p[r]) for r in range(2)]
    kw = {"conns_per_peer": conns} if conns else {}
    # Quiet: every refused stranger is a warning on stderr, thousands of them here.
    opts = Options(transport=transport, timeout=timeout, connect_timeout=timeout, log_level="none",
                   job_id=int.from_bytes(os.urandom(7), "little"), **kw)
    return p, eps, opts


def _usage_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


HELLO = struct.Struct("<IHHQQIIIIIIQ32s")   # the handshake's hello (csrc/core/bootstrap.c), 88 bytes
HELLO_MAGIC = 0x4B4E4C54


def _protocol_version() -> int:
    from thunderlink.bindings import lib

    return int(getattr(lib, "TL_PROTOCOL_VERSION", 2))


def hello_bytes(version, job_id, src, dst, conn=0, nconns=1, world=2, digest=0, host=0, magic=HELLO_MAGIC, flags=0):
    return HELLO.pack(magic & 0xFFFFFFFF, version & 0xFFFF, flags & 0xFFFF, job_id & (2**64 - 1), digest & (2**64 - 1),
                      src & 0xFFFFFFFF, dst & 0xFFFFFFFF, conn & 0xFFFFFFFF, nconns & 0xFFFFFFFF,
                      world & 0xFFFFFFFF, 0, host & (2**64 - 1), b"\0" * 32)


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def stranger_payloads(draw):
    """What a stranger sends to a starting rank's port (job_id: the real one,
    which a stranger without the job's token may know; see the README)."""
    kind = draw(st.sampled_from(["garbage", "magic_then_garbage", "hello_wrong_job", "hello_wrong_version",
                                 "truncated_real_hello", "oversized", "empty", "hello_right_job"]))
    v = _protocol_version()
    if kind == "garbage":
        return kind, draw(st.binary(max_size=200))
    if kind == "magic_then_garbage":
        return kind, struct.pack("<I", HELLO_MAGIC) + draw(st.binary(max_size=120))
    if kind == "hello_wrong_job":
        return kind, hello_bytes(v, draw(u64), draw(u32), draw(u32), draw(u32), draw(u32), draw(u32), draw(u64),
                                 draw(u64)) + draw(st.binary(max_size=64))
    if kind == "hello_wrong_version":
        return kind, hello_bytes(draw(st.integers(0, 65535).filter(lambda x: x != v)), -1, draw(u32), 0, 0, 1, 2)
    if kind == "truncated_real_hello":
        return kind, None  # filled in with the job's id, cut short
    if kind == "hello_right_job":
        # The job's id and random ranks, sizes, flags: filled in with the id;
        # sent only to a job with a token (without one, the id is the credential).
        return kind, (draw(u32), draw(st.sampled_from([0, 1, 2, draw(u32)])), draw(u32), draw(u32),
                      draw(st.sampled_from([2, draw(u32)])), draw(st.integers(0, 65535)),
                      draw(u64), draw(st.binary(max_size=80)))
    if kind == "oversized":
        return kind, draw(st.binary(min_size=1, max_size=64)) * 8192  # up to 512 KiB
    return kind, b""


def _poke(port: int, payload: bytes, keep_open: bool) -> socket.socket | None:
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        s.settimeout(0.1)
        if payload:
            try:
                s.sendall(payload)
            except OSError:
                pass  # refused and closed while we sent: fine
        if keep_open:
            return s
        try:
            s.recv(4096)  # a refusal, perhaps
        except OSError:
            pass
    except BaseException:
        s.close()
        raise
    s.close()
    return None


def target_handshake(payloads: list, keep_open: list, token: bool = False) -> None:
    """Rank 0 starts; strangers connect to its port and send the payloads;
    then rank 1 starts. The job must connect and add correctly. With a job
    token, strangers also send hellos that name the job's own id."""
    from dataclasses import replace

    p, eps, opts = _fresh_job()
    if token:
        opts = replace(opts, token="fuzz-" + os.urandom(8).hex())
    out, errs = [None, None], []
    t0 = _start(0, eps, opts, out, errs)
    held = []
    try:
        # Rank 0 listens once its thread is in tl_comm_connect.
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", p[0]), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "rank 0 never listened"
                time.sleep(0.005)
        for (kind, data), keep in zip(payloads, keep_open):
            if data is None:
                real = hello_bytes(_protocol_version(), opts.job_id, 1, 0)
                data = real[:len(real) // 2]
            elif isinstance(data, tuple):
                if not token:
                    continue
                src, dst, conn, nconns, world, flags, digest, tail = data
                data = hello_bytes(_protocol_version(), opts.job_id, src, dst, conn, nconns, world, digest,
                                   flags=flags) + tail
            s = _poke(p[0], data, keep)
            if s is not None:
                held.append(s)
        t1 = _start(1, eps, opts, out, errs)
        t0.join(30)
        t1.join(30)
        assert not t0.is_alive() and not t1.is_alive(), "set-up hung"
        assert not errs, f"the job failed after {[k for k, _ in payloads]}: {errs[0]!r}"
        res = [None, None]
        x = [np.arange(100, dtype=np.float32), np.full(100, 2, np.float32)]
        th = threading.Thread(target=lambda: res.__setitem__(1, out[1].all_sum(x[1])))
        th.start()
        res[0] = out[0].all_sum(x[0])
        th.join(30)
        assert np.array_equal(res[0], x[0] + x[1]) and np.array_equal(res[1], x[0] + x[1])
    finally:
        for s in held:
            s.close()
        t0.join(30)
        for c in out:
            if c is not None:
                c.close()


@CI_LIVE
@given(st.lists(stranger_payloads(), min_size=1, max_size=6), st.lists(st.booleans(), min_size=6, max_size=6),
       st.booleans())
def test_fuzz_handshake_live(payloads, keep_open, token):
    target_handshake(payloads, keep_open, token)


# ---- the JACCL coordinator: strangers while rank 0 collects the records ---------------


@st.composite
def coordinator_payloads(draw):
    kind = draw(st.sampled_from(["garbage", "json", "record_like", "partial", "oversized", "silent", "nested"]))
    if kind == "garbage":
        return draw(st.binary(max_size=200)) + draw(st.sampled_from([b"", b"\n"]))
    if kind == "json":
        return json.dumps(draw(json_values)).encode() + b"\n"
    if kind == "record_like":
        msg = {"rank": draw(st.one_of(st.integers(-2, 4), st.sampled_from([True, "1", None, 1]))),
               "size": draw(st.one_of(st.integers(0, 4), st.sampled_from([True, "2"]))),
               "record": draw(json_values)}
        if draw(st.booleans()):
            del msg["record"]
        return json.dumps(msg).encode() + b"\n"
    if kind == "partial":
        return b'{"rank": 1, "size": 2, "record": {"host": "x"'
    if kind == "oversized":
        return b"[" + b"1," * ((1 << 20) // 2 + 10)
    if kind == "nested":
        return b"[" * 50000 + b"\n"
    return b""


def _impersonates(data: bytes) -> bool:
    """Is this rank 1's record, well formed? Without a token anyone may send
    one (the README says so); only a job with a token must refuse it."""
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):
        return False
    r = msg.get("rank") if isinstance(msg, dict) else None
    return type(r) is int and r == 1 and msg.get("size") == 2 and "record" in msg


def target_coordinator_live(payloads: list, token: bool = False) -> None:
    """Rank 0 collects the records of a two-rank JACCL job while strangers
    connect and send the payloads (some then stay silent); rank 1 then
    sends its record. Both must get both records within the time."""
    from thunderlink.bindings.options import token_key
    from thunderlink.launch import free_ports

    key = token_key("fuzz-" + os.urandom(8).hex()) if token else None
    if not token:
        payloads = [p for p in payloads if not _impersonates(p)]

    port = free_ports(1)[0]
    coord = f"127.0.0.1:{port}"
    matrix = [[None, "rdma_x"], ["rdma_x", None]]
    res, held = {}, []

    def rank0():
        try:
            res[0] = jaccl._exchange(matrix, 0, coord, {"me": 0}, 10.0, key)
        except Exception as e:  # noqa: BLE001 -- checked below
            res[0] = e

    t = threading.Thread(target=rank0)
    t.start()
    try:
        deadline = time.monotonic() + 5
        for data in payloads:
            while True:
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=1)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the coordinator never listened"
                    time.sleep(0.01)
            try:
                s.sendall(data)
            except OSError:
                pass
            held.append(s)
        t0 = time.monotonic()
        res[1] = jaccl._exchange(matrix, 1, coord, {"me": 1}, 10.0, key)
        t.join(15)
        assert not t.is_alive(), "rank 0 hung"
        assert res[0] == [{"me": 0}, {"me": 1}] and res[1] == res[0], (res, payloads)
        assert time.monotonic() - t0 < 5, "the strangers held the ranks up"
    finally:
        for s in held:
            s.close()
        t.join(15)


@CI_LIVE
@given(st.lists(coordinator_payloads(), min_size=1, max_size=5), st.booleans())
def test_fuzz_jaccl_coordinator_live(payloads, token):
    target_coordinator_live(payloads, token)


# ---- frames: a fake rank 1 in the middle of a collective ------------------------------

FRAME = struct.Struct("<IBBBBIIQII")   # tl_frame_t (csrc/core/internal.h), 32 bytes
FRAME_MAGIC = 0x31464C54
ACK_BYTES = 56


def _recv_exact(s: socket.socket, n: int) -> bytes:
    b = b""
    while len(b) < n:
        chunk = s.recv(n - len(b))
        if not chunk:
            raise ConnectionError("closed")
        b += chunk
    return b


class FakePeer:
    """Rank 1 of a two-rank TCP job, played by this test: it learns the real
    rank 1's hello (by listening where rank 0 will, before rank 0 does), then
    replays it to the real rank 0, and from then on speaks frames itself."""

    hellos: dict = {}  # job id -> the real rank 1's hello (it names no port)
    job_id = int.from_bytes(os.urandom(7), "little")

    def __init__(self):
        from dataclasses import replace

        self.p, self.eps, self.opts = _fresh_job("tcp", timeout=5.0, conns=1)
        self.opts = replace(self.opts, job_id=self.job_id)
        if "heartbeat" in self.opts.__dataclass_fields__:
            # One connection per link: with heartbeats a TCP link has a control
            # connection too, which this fake peer does not play.
            self.opts = replace(self.opts, heartbeat=0)
        self.hello = self.hellos.get(self.job_id)
        if self.hello is None:
            # Learn rank 1's hello: listen on rank 0's port, let a real rank 1
            # dial (and give up soon after: connect_timeout is not in the digest).
            lst = socket.create_server(("127.0.0.1", self.p[0]))
            lst.settimeout(5)
            out, errs = [None, None], []
            t1 = _start(1, self.eps, replace(self.opts, connect_timeout=0.3), out, errs)
            conn, _ = lst.accept()
            conn.settimeout(5)
            self.hello = self.hellos[self.job_id] = _recv_exact(conn, HELLO.size)
            conn.close()
            lst.close()
            t1.join(30)
            assert errs and out[1] is None, "rank 1 connected to a listener that never answered"
        # The real rank 0, and the fake rank 1 joining it.
        self.out, self.errs = [None, None], []
        t0 = _start(0, self.eps, self.opts, self.out, self.errs)
        deadline = time.monotonic() + 5
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.p[0]), timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.005)
        self.sock.sendall(self.hello)
        ack = _recv_exact(self.sock, ACK_BYTES)
        assert struct.unpack_from("<IHH", ack)[2] == 0, "rank 0 refused the replayed hello"
        t0.join(30)
        assert not self.errs, self.errs
        self.comm = self.out[0]

    def close(self):
        self.sock.close()
        if self.comm is not None:
            self.comm.close()


@st.composite
def frame_mutations(draw):
    """How the fake peer answers rank 0's frame: the mirror image of it
    (valid), with one field changed, garbage, a truncated header, or a
    header that announces far more than follows."""
    kind = draw(st.sampled_from(["mirror", "field", "field", "garbage", "truncated", "oversized_len",
                                 "abort", "two_fields"]))
    fields = ["magic", "type", "op", "dtype", "redop", "seq", "len", "total", "unit", "lane"]
    if kind in ("field", "two_fields"):
        n = 1 if kind == "field" else 2
        chosen = draw(st.lists(st.sampled_from(fields), min_size=n, max_size=n, unique=True))
        values = [draw(st.integers(0, 2**64 - 1)) for _ in chosen]
        return kind, dict(zip(chosen, values))
    if kind == "garbage":
        return kind, draw(st.binary(min_size=1, max_size=100))
    if kind == "truncated":
        return kind, draw(st.integers(0, FRAME.size - 1))
    if kind == "oversized_len":
        return kind, draw(st.sampled_from([2**32 - 1, 2**31, 1 << 30, (1 << 30) + 1, 1 << 24]))
    if kind == "abort":
        return kind, draw(st.binary(max_size=2000))
    return kind, None


def target_frames(mutation) -> None:
    import thunderlink

    kind, arg = mutation
    peer = FakePeer()
    try:
        comm, s = peer.comm, peer.sock
        x = np.arange(64, dtype=np.float32)
        result = {}

        def call():
            try:
                result["out"] = comm.all_sum(x)
            except thunderlink.ThunderlinkError as e:
                result["err"] = e

        rss0 = _usage_rss()
        t = threading.Thread(target=call)
        t.start()
        hdr = _recv_exact(s, FRAME.size)
        f = list(FRAME.unpack(hdr))
        payload = _recv_exact(s, f[7])  # len
        names = ["magic", "type", "op", "dtype", "redop", "seq", "len", "total", "unit", "lane"]
        sizes = [32, 8, 8, 8, 8, 32, 32, 64, 32, 32]
        valid = True
        if kind == "mirror":
            data = hdr + payload
        elif kind in ("field", "two_fields"):
            for name, value in arg.items():
                i = names.index(name)
                new = value & ((1 << sizes[i]) - 1)
                valid &= new == f[i]
                f[i] = new
            body = payload if f[6] == len(payload) else payload[: f[6]] + bytes(max(0, min(f[6], 1 << 20) - len(payload)))
            data = FRAME.pack(*f) + body
        elif kind == "garbage":
            data, valid = arg, False
        elif kind == "truncated":
            data, valid = hdr[:arg], False
        elif kind == "oversized_len":
            f[6] = arg
            data, valid = FRAME.pack(*f) + payload, False
        else:  # abort, with a reason of arbitrary bytes
            f[1] = 2
            f[6] = len(arg)
            data, valid = FRAME.pack(*f) + arg, False
        try:
            s.sendall(data)
            if not valid:
                time.sleep(0.05)
                s.shutdown(socket.SHUT_WR)  # and then nothing more: the peer "died"
        except OSError:
            pass
        t.join(20)
        assert not t.is_alive(), f"all_sum hung after {kind} {arg!r}"
        assert _usage_rss() - rss0 < 64 << 20, f"memory grew after {kind}"
        if "out" in result:
            # Accepted: then it must have been a valid frame, and the sum right.
            assert valid, f"rank 0 accepted a corrupted frame ({kind} {arg!r}) and returned {result['out'][:4]}"
            assert np.array_equal(result["out"], x + np.frombuffer(payload, np.float32))
        else:
            assert isinstance(result["err"], thunderlink.ThunderlinkError)
            msg = str(result["err"])
            assert msg.isprintable(), f"a peer's bytes reached the message unescaped: {msg!r}"
            assert not valid or kind == "field", f"a valid frame was refused: {result['err']}"
    finally:
        peer.close()


@settings(CI, max_examples=80)
@given(frame_mutations())
def test_fuzz_frames_live(mutation):
    target_frames(mutation)
