"""Hostfiles (thunderlink.hosts.hostfile): both formats, defaults, every
error path, the MLX ring's cable directions, ring derivation, job ids,
endpoints and the JSON round trip. The topology itself (links, ring search):
test_topology.py."""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap

import pytest

import thunderlink
from thunderlink.bindings import Endpoint
from thunderlink.hosts import hostfile as H
from thunderlink.hosts.hostfile import Address, ConfigError, linked, load, parse

from conftest import PKG_ROOT as SRC  # where the thunderlink being tested lives


def write(tmp_path, obj, name="hosts.json") -> str:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def tl(*ranks, **top):
    """A thunderlink-format hostfile with one entry per rank (address lists)."""
    return {"version": 1, **top, "ranks": [{"addresses": list(a)} for a in ranks]}


def raises(obj, *needles, path=None):
    """parse(obj) raises ConfigError whose message contains every needle."""
    with pytest.raises(ConfigError) as ei:
        parse(obj, path)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    return msg


def cabled(n, cables):
    """Thunderlink hostfile: rank a and rank b each list the near end of
    every cable a-b (10.a.b.x, peer = other end)."""
    ranks = [[] for _ in range(n)]
    for a, b in cables:
        lo, hi = min(a, b), max(a, b)
        ranks[a].append({"ip": f"10.{lo}.{hi}.{1 if a == lo else 2}", "port": 5000, "peer": b})
        ranks[b].append({"ip": f"10.{lo}.{hi}.{1 if b == lo else 2}", "port": 5000, "peer": a})
    return {"ranks": [{"addresses": a} for a in ranks]}


# ---- thunderlink format -------------------------------------------------------


def test_short_strings():
    hf = parse(tl(["192.168.0.10:4000"], ["192.168.0.11:4001"]))
    assert hf.format == "thunderlink" and hf.size == 2
    assert hf.ranks[0].addresses == [Address("192.168.0.10", 4000)]
    assert hf.ranks[1].addresses == [Address("192.168.0.11", 4001)]
    assert hf.ranks[0].host == "192.168.0.10"  # host defaults to the first ip
    assert hf.ring == [0, 1]


def test_ipv6_strings():
    hf = parse(tl(["[::1]:5000"], ["[fe80::1%en0]:5001", "::2"], port=7000))
    assert hf.ranks[0].addresses[0] == Address("::1", 5000)
    assert hf.ranks[1].addresses[0] == Address("fe80::1%en0", 5001)
    # A bare IPv6 literal takes the default port (port + rank).
    assert hf.ranks[1].addresses[1] == Address("::2", 7001)
    assert str(hf.ranks[0].addresses[0]) == "[::1]:5000"
    assert str(Address("10.0.0.1", 9)) == "10.0.0.1:9"
    # [ipv6] without a port takes the default too.
    assert parse(tl(["[::1]"], ["[::1]:1"], port=9000)).ranks[0].addresses[0] == Address("::1", 9000)


def test_default_ports():
    hf = parse(tl(["10.0.0.1"], ["10.0.0.2"], ["10.0.0.3:1234"]))
    assert [a.port for r in hf.ranks for a in r.addresses] == [H.DEFAULT_PORT, H.DEFAULT_PORT + 1, 1234]
    hf = parse(tl(["10.0.0.1"], ["10.0.0.2"], port=40000))
    assert [r.addresses[0].port for r in hf.ranks] == [40000, 40001]
    # Objects without "port" take it too; a rank's own "port" wins.
    hf = parse({"port": 100, "ranks": [{"addresses": [{"ip": "10.0.0.1"}]},
                                         {"port": 555, "addresses": [{"ip": "10.0.0.2"}, "10.0.0.3"]}]})
    assert [(a.ip, a.port) for r in hf.ranks for a in r.addresses] == [
        ("10.0.0.1", 100), ("10.0.0.2", 555), ("10.0.0.3", 555)]


def test_address_objects():
    obj = {"ranks": [
        {"host": "mac-a", "ssh": "me@mac-a", "addresses": [
            "192.168.0.10:32323",
            {"ip": "10.0.1.1", "port": 32324, "peer": 1, "iface": "en2", "rate": "40gbit", "prefix": 30,
             "rdma": "rdma_en2"},
        ]},
        {"host": "mac-b", "addresses": [
            {"ip": "10.0.1.2", "port": 32324, "peer": 0, "iface": "en3", "rate": 10},
            {"ip": "10.0.2.2", "port": 32325, "peer": 0, "rate": "500mbit"},
        ]},
    ]}
    hf = parse(obj)
    a = hf.ranks[0].addresses[1]
    assert a == Address("10.0.1.1", 32324, peer=1, iface="en2", rate=40.0, prefix=30, rdma="rdma_en2")
    assert parse(hf.to_json()).ranks[0].addresses[1] == a
    assert [e.device for e in hf.endpoints()] == ["", "rdma_en2", "", ""]
    assert hf.ranks[0].host == "mac-a" and hf.ranks[0].ssh == "me@mac-a"
    assert hf.ranks[1].addresses[0].rate == 10.0
    assert hf.ranks[1].addresses[1].rate == pytest.approx(0.5)
    assert hf.ranks[1].ssh is None


def test_extra_rank_keys_are_kept():
    hf = parse({"ranks": [{"addresses": ["10.0.0.1:1"], "gpu": "m2", "note": [1]},
                          {"addresses": ["10.0.0.2:1"]}]})
    assert hf.ranks[0].extra == {"gpu": "m2", "note": [1]}
    assert hf.to_json()["ranks"][0]["gpu"] == "m2"


def test_explicit_ring():
    hf = parse(tl(["10.0.0.1:1"], ["10.0.0.2:1"], ["10.0.0.3:1"], ring=[0, 2, 1]))
    assert hf.ring == [0, 2, 1]


def test_load_reads_a_file(tmp_path):
    path = write(tmp_path, tl(["127.0.0.1:5000"], ["127.0.0.1:5001"]))
    hf = load(path)
    assert hf.path == path and hf.size == 2


# ---- errors ---------------------------------------------------------------------


def test_error_is_config_and_value_error():
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, thunderlink.ThunderlinkError)
    assert ConfigError is thunderlink.ConfigError


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="does not exist") as ei:
        load(path, "THUNDERLINK_HOSTFILE")
    assert path in str(ei.value) and "THUNDERLINK_HOSTFILE" in str(ei.value)


def test_unreadable_path(tmp_path):
    with pytest.raises(ConfigError, match="cannot read hostfile") as ei:
        load(str(tmp_path))  # a directory
    assert str(tmp_path) in str(ei.value)


@pytest.mark.parametrize("text", ["", "   \n\t\n"])
def test_empty_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="is empty") as ei:
        load(path, "MLX_HOSTFILE")
    assert path in str(ei.value) and "MLX_HOSTFILE" in str(ei.value)


def test_invalid_json(tmp_path):
    path = write(tmp_path, '{\n  "ranks": [\n    {"addresses": ["10.0.0.1:1",]}\n  ]\n}\n')
    with pytest.raises(ConfigError) as ei:
        load(path)
    msg = str(ei.value)
    assert path in msg and "not valid JSON" in msg
    assert "line 3" in msg and "column" in msg


def test_errors_name_the_file(tmp_path):
    path = write(tmp_path, {"ranks": [{"addresses": ["10.0.0.1:0"]}]})
    with pytest.raises(ConfigError) as ei:
        load(path)
    assert path in str(ei.value) and "port" in str(ei.value)


def test_wrong_top_level_type():
    raises(42, "expected a JSON object", "got int", path="/x/h.json")
    raises("text", "got str", "/x/h.json", path="/x/h.json")


def test_ranks_missing_or_empty():
    raises({"version": 1}, 'missing "ranks"', "h.json", path="h.json")
    raises({"ranks": []}, '"ranks" must be a non-empty list', path="h.json")
    raises({"ranks": {"0": 1}}, '"ranks" must be a non-empty list')
    raises([], "lists no ranks", "h.json", path="h.json")


def test_bad_version():
    raises({"version": 2, "ranks": [{"addresses": ["10.0.0.1:1"]}]}, "version 2 is not supported")


def test_bad_rank_entries():
    raises({"ranks": ["10.0.0.1:1"]}, "ranks[0]", 'expected an object with "addresses"')
    raises({"ranks": [{"addresses": []}]}, "ranks[0]", '"addresses" must be a non-empty list')
    raises({"ranks": [{"addresses": ["10.0.0.1:1"]}, {"host": "b"}]}, "ranks[1]", '"addresses"')
    raises({"ranks": [{"addresses": [5]}]}, "ranks[0].addresses[0]", 'expected "ip:port"')
    raises({"ranks": [{"host": "", "addresses": ["10.0.0.1:1"]}]}, '"host" must be a non-empty string')
    raises({"ranks": [{"ssh": 3, "addresses": ["10.0.0.1:1"]}]}, '"ssh" must be a non-empty string')
    raises({"ranks": [{"addresses": [{"port": 5}]}]}, '"ip" must be a non-empty string')
    raises({"ranks": [{"addresses": [{"ip": "  "}]}]}, '"ip" must be a non-empty string')
    raises({"ranks": [{"addresses": [":5000"]}]}, '"ip" must be a non-empty string')


def test_address_without_port_in_mlx_format():
    raises([["10.0.0.1"], ["10.0.0.2:5000"]], "rank 0", "has no port", "h.json", path="h.json")
    raises([["10.0.0.1:5000"], ["::1"]], "rank 1", "has no port")


@pytest.mark.parametrize("port", [0, -1, 65536, 100000, "80", 5000.0, True, None])
def test_port_out_of_range(port):
    msg = raises({"ranks": [{"addresses": [{"ip": "10.0.0.1", "port": port}]}]},
                 "ranks[0].addresses[0]", "port must be an integer 1..65535")
    assert repr(port) in msg


@pytest.mark.parametrize("text", ["10.0.0.1:0", "10.0.0.1:65536", "[::1]:70000"])
def test_port_out_of_range_in_strings(text):
    raises(tl([text]), "port must be an integer 1..65535")
    raises([[text]], "rank 0", "port must be an integer 1..65535")


def test_port_not_a_number():
    raises(tl(["10.0.0.1:http"]), "port 'http'", "is not a number")
    raises([["[::1]:x"]], "is not a number")
    raises(tl(["[::1"]), "unclosed '['")
    raises(tl(["[::1]5000"]), "is not [ipv6]:port")


def test_bad_default_ports():
    raises({"port": 0, "ranks": [{"addresses": ["10.0.0.1"]}]}, '"port"', "1..65535")
    raises({"port": 65535, "ranks": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}]},
           "ranks[1].port", "65536")
    raises({"ranks": [{"port": "x", "addresses": ["10.0.0.1"]}]}, "ranks[0].port")


def test_unknown_key():
    msg = raises(tl([{"ip": "10.0.0.1", "port": 1, "peers": 1, "speed": 3}], ["10.0.0.2:1"]),
                 "ranks[0].addresses[0]", "unknown key(s)")
    assert "peers" in msg and "speed" in msg


@pytest.mark.parametrize("peer", [0, 2, -1, 7, "1", True, 1.0])
def test_bad_peer(peer):
    # rank 0 of 2: 0 is itself, 2/-1/7 are out of range, the rest are not ints.
    raises(tl([{"ip": "10.0.0.1", "port": 1, "peer": peer}], ["10.0.0.2:1"]),
           "ranks[0].addresses[0]", '"peer" must be another rank 0..1')


def test_bad_iface_rate_prefix():
    raises(tl([{"ip": "10.0.0.1", "iface": ""}]), '"iface" must be an interface name')
    raises(tl([{"ip": "10.0.0.1", "iface": 3}]), '"iface"')
    raises(tl([{"ip": "10.0.0.1", "rate": "fast"}]), "ranks[0].addresses[0].rate", "is not a rate")
    raises(tl([{"ip": "10.0.0.1", "rate": -5}]), "rate", "must be a positive")
    raises(tl([{"ip": "10.0.0.1", "prefix": 129}]), '"prefix" must be a prefix length')
    raises(tl([{"ip": "10.0.0.1", "prefix": "24"}]), '"prefix"')
    for bad in ("", "mlx5 0", "x" * 64, 5, "sv\x1b[0m"):
        raises(tl([{"ip": "10.0.0.1", "rdma": bad}]), '"rdma" must be an RDMA device name as `ibv_devices`')


def test_duplicate_address_across_ranks():
    msg = raises(tl(["10.0.0.1:5000"], ["10.0.0.1:5000"]), "duplicate address 10.0.0.1:5000",
                 "ranks 0 and 1 both listen there", "h.json", path="h.json")
    assert "own address or port" in msg
    # Same ip, default ports differ by rank: fine.
    parse(tl(["10.0.0.1"], ["10.0.0.1"]))
    # IPv6 duplicates are shown bracketed.
    raises(tl(["[::1]:1"], ["[::1]:1"]), "duplicate address [::1]:1")
    raises([["10.0.0.1:5"], ["10.0.0.1:5"]], "ranks 0 and 1 both listen there")


def test_duplicate_address_within_a_rank():
    raises(tl(["10.0.0.1:5000", {"ip": "10.0.0.1", "port": 5000, "peer": 1}], ["10.0.0.2:1"]),
           "duplicate address 10.0.0.1:5000", "rank 0 lists it twice")
    raises([["127.0.0.1:5", "127.0.0.1:5"]], "rank 0 lists it twice")


@pytest.mark.parametrize("a, b, why", [
    ("127.0.0.1:41000", "localhost:41000", "localhost is 127.0.0.1 or ::1"),
    ("[::1]:41000", "LOCALHOST:41000", "localhost is 127.0.0.1 or ::1"),
    ("[::1]:41000", "[0:0::1]:41000", "the same address written two ways"),
    ("[::ffff:10.0.0.1]:41000", "10.0.0.1:41000", "the same address written two ways"),
    ("mac-a.local:41000", "MAC-A.local.:41000", "the same address written two ways"),
])
def test_duplicate_address_written_two_ways(a, b, why):
    """The same address spelled twice is one address: both entries are named."""
    raises(tl([a], [b]), f"duplicate address {a} in ranks[0].addresses[0] and {b} in ranks[1].addresses[0]",
           why, "ranks 0 and 1 both listen there", "h.json", path="h.json")
    raises([[a], [b]], f"duplicate address {a} in [0][0] and {b} in [1][0]", why)
    raises(tl([a, b]), "rank 0 lists it twice")


def test_different_addresses_on_one_port_are_fine():
    parse(tl(["127.0.0.1:41000"], ["127.0.0.2:41000"], ["[::2]:41000"], ["[fe80::1%en0]:41000"],
             ["[fe80::1%en1]:41000"], ["mac-a:41000"], ["mac-b:41000"], ["localhost:41001"]))


@pytest.mark.parametrize("ip, why", [
    ("999.0.0.1", "is not a valid IPv4 address"),
    ("256.1.1.1", "is not a valid IPv4 address"),
    ("10.1", "is not a valid IPv4 address"),  # inet_aton would read 10.0.0.1
    ("1.2.3.4.5", "is not a valid IPv4 address"),
    ("01.2.3.4", "is not a valid IPv4 address"),
    ("0x7f.1", "is not a valid IPv4 address"),
    ("1:2:3", "is not a valid IPv6 address"),
    ("::g", "is not a valid IPv6 address"),
    ("bad host", "neither an IP address nor a host name"),
    ("-lead.example", "neither an IP address nor a host name"),
    ("a..b", "neither an IP address nor a host name"),
    ("10.0.0.1%en0", "neither an IP address nor a host name"),
    ("host\x1b[31m", "neither an IP address nor a host name"),
])
def test_malformed_addresses_are_refused_not_resolved(ip, why):
    """A malformed literal is an error in the hostfile, not a name for DNS."""
    raises(tl([{"ip": ip, "port": 5000}]), "ranks[0].addresses[0]", repr(ip), why, "h.json", path="h.json")
    if ":" not in ip:
        raises(tl([f"{ip}:5000"]), repr(ip), why)
        raises([[f"{ip}:5000"]], "rank 0", repr(ip), why)


def test_bracketed_ipv6_in_an_object_says_to_drop_the_brackets():
    raises(tl([{"ip": "[::1]", "port": 5000}]), "'[::1]' is not a valid IPv6 address", "without brackets")


def test_host_names_and_literals_are_accepted():
    hf = parse(tl(["mac-a:1"], ["mac-b.local:1"], ["host_1.example.com.:1"], ["10.0.0.1:1"], ["[fe80::1%en0]:1"],
                  ["localhost:2"]))
    assert [r.addresses[0].ip for r in hf.ranks] == ["mac-a", "mac-b.local", "host_1.example.com.", "10.0.0.1",
                                                     "fe80::1%en0", "localhost"]


@pytest.mark.parametrize("key", ["host", "ssh", "iface"])
def test_names_with_control_characters_are_refused(key):
    """Names are printed (doctor, launch): a terminal escape in one, as a
    forged JACCL record could carry, is an error showing it escaped."""
    entry = {"addresses": [{"ip": "10.0.0.1", "port": 1}]}
    if key == "iface":
        entry["addresses"][0]["iface"] = "en0\x1b]0;owned\x07"
    else:
        entry[key] = "en0\x1b]0;owned\x07"
    msg = raises({"ranks": [entry]}, f'"{key}" must be', "'en0\\x1b]0;owned\\x07'")
    assert "\x1b" not in msg


def test_non_utf8_hostfile_names_the_file(tmp_path):
    path = tmp_path / "hosts.json"
    path.write_bytes('{"ranks": [{"host": "café", "addresses": ["10.0.0.1:1"]}]}'.encode("latin-1"))
    with pytest.raises(ConfigError) as ei:
        load(str(path), "THUNDERLINK_HOSTFILE")
    msg = str(ei.value)
    assert f"hostfile {path} (from THUNDERLINK_HOSTFILE) is not UTF-8 text (byte 0xe9 at offset 24)" in msg, msg


@pytest.mark.parametrize("depth", [40, 990, 100_000])
def test_deeply_nested_hostfile_names_the_file(tmp_path, depth):
    """Past Python's recursion limit (100 000), and below it (990), where
    later steps (the canonical JSON) would recurse out of stack."""
    path = write(tmp_path, '{"ranks": [{"addresses": ["10.0.0.1:1"], "x": ' + "[" * depth + "]" * depth + "}]}")
    with pytest.raises(ConfigError) as ei:
        load(path)
    msg = str(ei.value)
    assert f"hostfile {path} nests arrays or objects more than {H.MAX_JSON_DEPTH} levels deep" in msg, msg


def test_oversized_hostfile_is_refused(tmp_path):
    path = write(tmp_path, " " * H.MAX_HOSTFILE_BYTES + "[]")
    with pytest.raises(ConfigError) as ei:
        load(path)
    assert f"hostfile {path} is larger than 4 MiB" in str(ei.value)


def test_huge_number_in_a_hostfile(tmp_path):
    path = write(tmp_path, '{"port": ' + "1" * 5000 + ', "ranks": [{"addresses": ["10.0.0.1"]}]}')
    with pytest.raises(ConfigError, match="is not usable JSON") as ei:
        load(path)
    assert path in str(ei.value)


def test_rendezvous_record_nested_too_deep_is_a_value_error():
    """Anyone may connect to a JACCL coordinator: a record nested past the
    recursion limit is a ValueError (the coordinator drops that connection),
    not a RecursionError that ends rank 0."""
    import time

    from thunderlink.hosts import jaccl

    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"[" * 200_000 + b"\n")
        with pytest.raises(ValueError, match="JACCL rendezvous record nests"):
            jaccl._recv_json(b, time.monotonic() + 10)


@pytest.mark.parametrize("ring", [[0, 1], [0, 1, 1], [0, 1, 3], [2, 1, 0, 0], "012", 3, [0, 1, 2, 3]])
def test_bad_ring(ring):
    raises(tl(["10.0.0.1:1"], ["10.0.0.2:1"], ["10.0.0.3:1"], ring=ring),
           '"ring" must list every rank 0..2 exactly once', "h.json", path="h.json")


@pytest.mark.parametrize("ring", [[0, 1.0], [True, 0]])
def test_ring_entries_must_be_integers(ring):
    raises(tl(["10.0.0.1:1"], ["10.0.0.2:1"], ring=ring), '"ring"')


BAD = [
    42,
    [],
    {"version": 1},
    {"ranks": []},
    {"version": 3, "ranks": [{"addresses": ["10.0.0.1:1"]}]},
    {"ranks": [{"addresses": []}]},
    {"ranks": [{"addresses": ["10.0.0.1:99999"]}]},
    {"ranks": [{"addresses": [{"ip": "10.0.0.1", "colour": "red"}]}]},
    {"ranks": [{"addresses": [{"ip": "10.0.0.1", "peer": 0}]}]},
    {"ranks": [{"addresses": [{"ip": "10.0.0.1", "peer": 5}]}]},
    {"ranks": [{"addresses": ["10.0.0.1:1"]}, {"addresses": ["10.0.0.1:1"]}]},
    {"ranks": [{"addresses": ["10.0.0.1:1", "10.0.0.1:1"]}]},
    {"ranks": [{"addresses": ["10.0.0.1:1"]}, {"addresses": ["10.0.0.2:1"]}], "ring": [1, 1]},
    {"port": 0, "ranks": [{"addresses": ["10.0.0.1"]}]},
    {"ranks": [{"addresses": [{"ip": "10.0.0.1", "rate": "warp"}]}]},
    [["10.0.0.1"]],
    [["10.0.0.1:0"]],
    [[]],
    [["10.0.0.1:1"], ["10.0.0.1:1"]],
]


@pytest.mark.parametrize("obj", BAD, ids=range(len(BAD)))
def test_every_error_names_the_file(tmp_path, obj):
    path = write(tmp_path, obj)
    with pytest.raises(ConfigError) as ei:
        load(path)
    assert isinstance(ei.value, ValueError)
    msg = str(ei.value)
    assert msg.startswith("[thunderlink] ") and path in msg, msg


# ---- MLX ring format ---------------------------------------------------------------


def test_mlx_ring_basic():
    hf = parse([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]], "h.json")
    assert hf.format == "mlx-ring" and hf.size == 3 and hf.ring == [0, 1, 2]
    assert [r.addresses[0] for r in hf.ranks] == [Address("127.0.0.1", 5000 + i) for i in range(3)]
    assert hf.ranks[1].host == "127.0.0.1"


def test_mlx_ring_loopback_faces_any_rank():
    for ip in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        host = f"[{ip}]" if ":" in ip else ip
        hf = parse([[f"{host}:5000"], [f"{host}:5001"], [f"{host}:5002"]])
        assert all(a.peer is None for r in hf.ranks for a in r.addresses), ip


def test_mlx_ring_others_face_the_left_neighbour():
    n = 4
    hf = parse([[f"10.0.{r}.2:5000", f"10.1.{r}.2:5000"] for r in range(n)])
    for r in range(n):
        assert [a.peer for a in hf.ranks[r].addresses] == [(r - 1) % n] * 2
    # Mixed: loopback any, others the left neighbour.
    hf = parse([["127.0.0.1:1", "10.0.0.1:1"], ["127.0.0.1:2", "10.0.0.2:1"]])
    assert [a.peer for a in hf.ranks[1].addresses] == [None, 0]
    assert [a.peer for a in hf.ranks[0].addresses] == [None, 1]


def test_mlx_ring_single_rank_and_string_entries():
    hf = parse([["10.0.0.1:5000"]])
    assert hf.ranks[0].addresses[0].peer is None
    hf = parse(["10.0.0.1:5000", "10.0.0.2:5000"])  # an entry may be a bare string
    assert hf.size == 2 and hf.ranks[1].addresses[0].peer == 0


def test_mlx_ring_errors():
    raises([[]], "rank 0", "non-empty list")
    raises([["10.0.0.1:1"], {"a": 1}], "rank 1", "non-empty list")
    raises([[5]], "rank 0", "is not an \"ip:port\" string")


def mlx_ring_nonloopback(n):
    return [[f"10.0.{r}.2:5000"] for r in range(n)]


@pytest.mark.parametrize("n", [2])
def test_mlx_ring_neighbours_linked_two_ranks(n):
    hf = parse(mlx_ring_nonloopback(n))
    assert all(linked(hf, hf.ring[i], hf.ring[(i + 1) % n]) for i in range(n))


@pytest.mark.parametrize("n", [3, 4])
def test_mlx_ring_neighbours_linked(n):
    hf = parse(mlx_ring_nonloopback(n))
    bad = [(hf.ring[i], hf.ring[(i + 1) % n]) for i in range(n)
           if not linked(hf, hf.ring[i], hf.ring[(i + 1) % n])]
    assert not bad, f"ring neighbours without a link: {bad}"


def local_ipv4() -> str | None:
    """A non-loopback IPv4 address of this host, or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.123", 9))  # no packet is sent
            ip = s.getsockname()[0]
    except OSError:
        return None
    if ip.startswith("127.") or ip == "0.0.0.0":
        return None
    try:
        with socket.socket() as s:
            s.bind((ip, 0))
    except OSError:
        return None
    return ip


RING_PROG = textwrap.dedent("""
    import sys, numpy as np, thunderlink
    with thunderlink.connect(hostfile=sys.argv[1]) as c:
        print("SUM", c.all_sum(np.ones(4, np.float32))[0])
""")


@pytest.mark.multiproc
def test_mlx_ring_three_ranks_connect(tmp_path):
    ip = local_ipv4()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this host")
    from thunderlink.launch import free_ports, launch_local

    ports = free_ports(3, ip)
    path = write(tmp_path, [[f"{ip}:{p}"] for p in ports])
    prog = tmp_path / "ring.py"
    prog.write_text(RING_PROG)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               THUNDERLINK_CONNECT_TIMEOUT="5", THUNDERLINK_TIMEOUT="5")
    res = launch_local(3, [sys.executable, str(prog), path], env=env, timeout=30, capture=True,
                       on_line=lambda *a: None)
    text = "\n".join("\n".join(lines) for lines in res.output)
    assert res.status == 0, text
    assert all("SUM 3.0" in lines for lines in res.output), text


# ---- ring derivation -------------------------------------------------------------


def test_ring_follows_cables():
    hf = parse(cabled(4, [(0, 2), (2, 1), (1, 3), (3, 0)]))
    assert hf.ring == [0, 2, 1, 3]
    n = len(hf.ring)
    assert all(linked(hf, hf.ring[i], hf.ring[(i + 1) % n]) for i in range(n))


def test_ring_in_order_when_cabled_in_order():
    hf = parse(cabled(4, [(0, 1), (1, 2), (2, 3), (3, 0)]))
    assert hf.ring == [0, 1, 2, 3]


def test_ring_five_out_of_order():
    cables = [(0, 3), (3, 1), (1, 4), (4, 2), (2, 0)]
    hf = parse(cabled(5, cables))
    ring = hf.ring
    assert sorted(ring) == list(range(5)) and ring[0] == 0
    pairs = {frozenset(c) for c in cables}
    assert all(frozenset((ring[i], ring[(i + 1) % 5])) in pairs for i in range(5))


def test_ring_without_a_cycle_is_none():
    # A line 0-1-2-3 (no cable closing the ring): no ring exists, and the
    # core's reason names the rank at an end of the line.
    hf = parse(cabled(4, [(0, 1), (1, 2), (2, 3)]))
    assert hf.ring is None
    assert "rank 0 shares a link with rank 1 only" in hf.ring_problem
    assert "ring" not in hf.to_json()


def test_ring_found_has_no_problem():
    assert parse(cabled(4, [(0, 2), (2, 1), (1, 3), (3, 0)])).ring_problem is None


def test_ring_with_shared_addresses_is_in_order():
    hf = parse(tl(["10.0.0.1:1"], ["10.0.0.2:1"], ["10.0.0.3:1"], ["10.0.0.4:1"]))
    assert hf.ring == [0, 1, 2, 3]


def test_explicit_ring_wins_over_cables():
    obj = cabled(4, [(0, 2), (2, 1), (1, 3), (3, 0)])
    obj["ring"] = [0, 3, 1, 2]
    assert parse(obj).ring == [0, 3, 1, 2]


# ---- job id, endpoints, round trip ------------------------------------------------------


def test_job_id_stable_and_content_dependent(tmp_path):
    obj = tl(["10.0.0.1:5000"], ["10.0.0.2:5000"])
    a = load(write(tmp_path, obj, "a.json"))
    b = load(write(tmp_path, json.dumps(obj, indent=4), "b.json"))  # other path, other layout
    assert a.job_id() == b.job_id() == parse(obj).job_id()
    assert 0 <= a.job_id() < 2**64
    other = parse(tl(["10.0.0.1:5000"], ["10.0.0.2:5001"]))
    assert other.job_id() != a.job_id()
    # The ring is part of the content.
    three = [["10.0.0.1:1"], ["10.0.0.2:1"], ["10.0.0.3:1"]]
    assert parse(tl(*three, ring=[0, 2, 1])).job_id() != parse(tl(*three)).job_id()
    # Same content in the default-port shorthand: same id.
    assert parse(tl(["10.0.0.1"], ["10.0.0.2"], port=5000)).job_id() == \
        parse(tl(["10.0.0.1:5000"], ["10.0.0.2:5001"])).job_id()


def test_endpoints():
    obj = {"ranks": [
        {"addresses": ["192.168.0.10:32323",
                       {"ip": "10.0.1.1", "port": 32324, "peer": 1, "iface": "en2", "rate": "40gbit"}]},
        {"addresses": [{"ip": "10.0.1.2", "port": 32324, "peer": 0}, "192.168.0.11:32323"]},
    ]}
    hf = parse(obj)
    assert hf.endpoints() == [
        Endpoint(owner=0, host="192.168.0.10", port=32323, facing=-1, ifname="", weight=1.0),
        Endpoint(owner=0, host="10.0.1.1", port=32324, facing=1, ifname="en2", weight=40.0),
        Endpoint(owner=1, host="10.0.1.2", port=32324, facing=0, ifname="", weight=1.0),
        Endpoint(owner=1, host="192.168.0.11", port=32323, facing=-1, ifname="", weight=1.0),
    ]
    # ifname applies to that rank's addresses without an interface only.
    eps = hf.endpoints("eth9", 1)
    assert [e.ifname for e in eps] == ["", "en2", "eth9", "eth9"]
    eps = hf.endpoints("eth9", 0)
    assert [e.ifname for e in eps] == ["eth9", "en2", "", ""]
    assert [e.ifname for e in hf.endpoints("eth9")] == ["", "en2", "", ""]


def test_endpoints_mlx_ring():
    hf = parse([["10.0.0.1:1", "127.0.0.1:7"], ["10.0.0.2:1"]])
    assert [(e.owner, e.host, e.port, e.facing) for e in hf.endpoints()] == [
        (0, "10.0.0.1", 1, 1), (0, "127.0.0.1", 7, -1), (1, "10.0.0.2", 1, 0)]


ROUND_TRIP = [
    tl(["10.0.0.1:5000"], ["10.0.0.2:5000"]),
    tl(["[::1]:5000"], ["[fe80::1%en0]:5001", "::2"], port=7000),
    tl(["10.0.0.1"], ["10.0.0.2"], ["10.0.0.3"], ring=[2, 0, 1]),
    cabled(4, [(0, 2), (2, 1), (1, 3), (3, 0)]),
    {"ranks": [
        {"host": "mac-a", "ssh": "me@mac-a", "gpu": "m2", "addresses": [
            "192.168.0.10:32323",
            {"ip": "10.0.1.1", "port": 32324, "peer": 1, "iface": "en2", "rate": "40gbit", "prefix": 30}]},
        {"host": "mac-b", "addresses": [{"ip": "10.0.1.2", "port": 32324, "peer": 0, "prefix": 0,
                                          "rate": "500mbit"}]},
    ]},
    [["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]],
    mlx_ring_nonloopback(2),
]


@pytest.mark.parametrize("obj", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_to_json_round_trips(obj, tmp_path):
    hf = parse(obj)
    js = hf.to_json()
    json.dumps(js)  # plain JSON
    again = parse(js)
    assert again.format == "thunderlink"
    assert [r.addresses for r in again.ranks] == [r.addresses for r in hf.ranks]
    assert [(r.host, r.ssh, r.extra) for r in again.ranks] == [(r.host, r.ssh, r.extra) for r in hf.ranks]
    assert again.ring == hf.ring
    assert again.job_id() == hf.job_id()
    assert again.to_json() == js
    assert again.endpoints() == hf.endpoints()
    # Through a file, too.
    path = tmp_path / "rt.json"
    H.write(js, str(path))
    assert load(str(path)).job_id() == hf.job_id()
    assert [p.name for p in tmp_path.iterdir()] == ["rt.json"]  # no temporary left


def test_local_hostfile():
    obj = H.local_hostfile(3, [5000, 5001, 5002, 5003])
    hf = parse(obj)
    assert hf.size == 3 and [r.addresses[0] for r in hf.ranks] == [
        Address("127.0.0.1", p) for p in (5000, 5001, 5002)]
    assert all(a.peer is None for r in hf.ranks for a in r.addresses)
