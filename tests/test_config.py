"""Configuration: thunderlink.config.from_env, parse_size, parse_rate,
Options <-> tl_options_t, the errors of thunderlink.connect(), and ENV as
the documentation of every variable config.py reads."""

from __future__ import annotations

import ast
import dataclasses
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import thunderlink
from thunderlink import config
from thunderlink.bindings import Options, ffi, lib
from thunderlink.config import ConfigError, from_env, parse_rate, parse_size
from thunderlink.launch import free_ports

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def env_error(env, *needles):
    with pytest.raises(ConfigError) as ei:
        from_env(env)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    return msg


# ---- from_env ------------------------------------------------------------------


def test_empty_environment():
    c = from_env({})
    assert c.options == {}
    assert (c.hostfile, c.hostfile_var, c.rank, c.rank_var) == (None, None, None, None)
    assert (c.world_size, c.ifname, c.job_id, c.backend) == (None, None, None, None)
    assert c.transport == "auto"
    assert not c.configured


def test_every_variable():
    env = {
        "MLX_DISTRIBUTED_BACKEND": " Thunderlink ",
        "THUNDERLINK_TRANSPORT": "TCP",
        "THUNDERLINK_HOSTFILE": "/h.json",
        "THUNDERLINK_RANK": "3",
        "THUNDERLINK_WORLD_SIZE": "4",
        "THUNDERLINK_IFNAME": "en5",
        "THUNDERLINK_JOB_ID": "0x1234",
        "THUNDERLINK_TIMEOUT": "2.5",
        "THUNDERLINK_CONNECT_TIMEOUT": "7",
        "THUNDERLINK_CONNS": "3",
        "THUNDERLINK_CHUNK_BYTES": "512K",
        "THUNDERLINK_PIPELINE_DEPTH": "8",
        "THUNDERLINK_ALGO": "Ring",
        "THUNDERLINK_ALGO_THRESHOLD": "32K",
        "THUNDERLINK_STRIPE_MIN_BYTES": "1MiB",
        "THUNDERLINK_SPIN_US": "0",
        "THUNDERLINK_SOCKBUF_BYTES": "4M",
        "THUNDERLINK_DEBUG": "TRACE",
    }
    c = from_env(env)
    assert c.backend == "thunderlink"
    assert c.transport == "tcp"
    assert (c.hostfile, c.hostfile_var) == ("/h.json", "THUNDERLINK_HOSTFILE")
    assert (c.rank, c.rank_var) == (3, "THUNDERLINK_RANK")
    assert c.world_size == 4 and c.ifname == "en5" and c.job_id == 0x1234
    assert c.configured
    assert c.options == {
        "timeout": 2.5,
        "connect_timeout": 7.0,
        "conns_per_peer": 3,
        "pipeline_depth": 8,
        "spin_us": 0,
        "chunk_bytes": 512 * K,
        "algo_threshold": 32 * K,
        "stripe_min_bytes": M,
        "sockbuf_bytes": 4 * M,
        "algo": "ring",
        "log_level": "trace",
    }
    # Every option from the environment is one that Options accepts.
    Options(**c.options).to_c()


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("THUNDERLINK_CONNS", "5")
    monkeypatch.setenv("THUNDERLINK_RANK", "1")
    c = from_env()
    assert c.options["conns_per_peer"] == 5 and c.rank == 1


def test_empty_values_are_unset():
    env = {name: "" for name in config.ENV}
    c = from_env(env)
    assert c.options == {} and c.hostfile is None and c.rank is None and c.transport == "auto"


@pytest.mark.parametrize("text,value", [("64K", 64 * K), ("1M", M), ("1MiB", M), ("4096", 4096),
                                        ("0.5g", G // 2), ("4.5K", 4608), (" 8 kb ", 8 * K)])
def test_size_variables(text, value):
    for name, key in (("THUNDERLINK_CHUNK_BYTES", "chunk_bytes"), ("THUNDERLINK_ALGO_THRESHOLD", "algo_threshold"),
                      ("THUNDERLINK_STRIPE_MIN_BYTES", "stripe_min_bytes"), ("THUNDERLINK_SOCKBUF_BYTES", "sockbuf_bytes")):
        assert from_env({name: text}).options == {key: value}


@pytest.mark.parametrize("name", ["THUNDERLINK_CHUNK_BYTES", "THUNDERLINK_ALGO_THRESHOLD",
                                  "THUNDERLINK_STRIPE_MIN_BYTES", "THUNDERLINK_SOCKBUF_BYTES"])
@pytest.mark.parametrize("bad", ["big", "-1", "1X", "1e6", "K"])
def test_bad_size_variable(name, bad):
    env_error({name: bad}, name, repr(bad), "is not a size", "64K")


@pytest.mark.parametrize("name,key", [("THUNDERLINK_TIMEOUT", "timeout"),
                                      ("THUNDERLINK_CONNECT_TIMEOUT", "connect_timeout")])
def test_seconds(name, key):
    assert from_env({name: "30"}).options == {key: 30.0}
    assert from_env({name: "0.25"}).options == {key: 0.25}
    env_error({name: "soon"}, name, "'soon'", "is not a number of seconds")
    for bad in ("0", "-3", "nan", "inf", "1e7", "0.0001"):
        env_error({name: bad}, name, bad, "must be a number of seconds between 0.001 and 2e+06")


@pytest.mark.parametrize("name,key,lo", [("THUNDERLINK_CONNS", "conns_per_peer", 1),
                                         ("THUNDERLINK_PIPELINE_DEPTH", "pipeline_depth", 1),
                                         ("THUNDERLINK_SPIN_US", "spin_us", 0)])
def test_integers(name, key, lo):
    assert from_env({name: "4"}).options == {key: 4}
    assert from_env({name: "0x10"}).options == {key: 16}
    assert from_env({name: str(lo)}).options == {key: lo}
    env_error({name: "four"}, name, "'four'", "is not an integer")
    env_error({name: "2.5"}, name, "is not an integer")
    env_error({name: str(lo - 1)}, name, f"must be between {lo} and")


def test_integers_with_leading_zero():
    assert from_env({"THUNDERLINK_PIPELINE_DEPTH": "08"}).options == {"pipeline_depth": 8}
    assert from_env({"THUNDERLINK_RANK": "01"}).rank == 1


@pytest.mark.parametrize("value", ["auto", "ring", "oneshot", "RING", " oneshot "])
def test_algo(value):
    assert from_env({"THUNDERLINK_ALGO": value}).options == {"algo": value.strip().lower()}


def test_bad_choices():
    env_error({"THUNDERLINK_ALGO": "fast"}, "THUNDERLINK_ALGO", "'fast'", "auto, ring, oneshot")
    env_error({"THUNDERLINK_TRANSPORT": "ib"}, "THUNDERLINK_TRANSPORT", "'ib'", "auto, tcp, shm, rdma")
    env_error({"THUNDERLINK_DEBUG": "loud"}, "THUNDERLINK_DEBUG", "'loud'", "none, warn, info or trace")
    env_error({"THUNDERLINK_DEBUG": "3"}, "THUNDERLINK_DEBUG")


@pytest.mark.parametrize("value,level", [("none", "none"), ("warn", "warn"), ("Info", "info"), ("trace", "trace"),
                                         ("0", "warn"), ("1", "info"), ("2", "trace")])
def test_debug(value, level):
    assert from_env({"THUNDERLINK_DEBUG": value}).options == {"log_level": level}


@pytest.mark.parametrize("value", ["auto", "tcp", "shm", "rdma", "Shm"])
def test_transport(value):
    assert from_env({"THUNDERLINK_TRANSPORT": value}).transport == value.lower()


def test_hostfile_fallback():
    c = from_env({"MLX_HOSTFILE": "/mlx.json"})
    assert (c.hostfile, c.hostfile_var) == ("/mlx.json", "MLX_HOSTFILE")
    c = from_env({"MLX_HOSTFILE": "/mlx.json", "THUNDERLINK_HOSTFILE": "/tl.json"})
    assert (c.hostfile, c.hostfile_var) == ("/tl.json", "THUNDERLINK_HOSTFILE")
    c = from_env({"MLX_HOSTFILE": "/mlx.json", "THUNDERLINK_HOSTFILE": ""})
    assert (c.hostfile, c.hostfile_var) == ("/mlx.json", "MLX_HOSTFILE")


def test_rank_fallback():
    c = from_env({"MLX_RANK": "2"})
    assert (c.rank, c.rank_var) == (2, "MLX_RANK")
    c = from_env({"MLX_RANK": "2", "THUNDERLINK_RANK": "0"})
    assert (c.rank, c.rank_var) == (0, "THUNDERLINK_RANK")
    c = from_env({"MLX_RANK": "2", "THUNDERLINK_RANK": ""})
    assert (c.rank, c.rank_var) == (2, "MLX_RANK")
    env_error({"THUNDERLINK_RANK": "-1"}, "THUNDERLINK_RANK", "must be at least 0")
    env_error({"MLX_RANK": "x"}, "MLX_RANK", "is not an integer")
    env_error({"THUNDERLINK_RANK": "one", "MLX_RANK": "1"}, "THUNDERLINK_RANK")


def test_configured():
    assert from_env({"MLX_HOSTFILE": "/h", "MLX_RANK": "0"}).configured
    assert not from_env({"MLX_HOSTFILE": "/h"}).configured
    assert not from_env({"THUNDERLINK_RANK": "0"}).configured


def test_half_configured_names_what_is_missing():
    assert from_env({}).half_configured is None
    assert from_env({"MLX_HOSTFILE": "/h", "MLX_RANK": "0"}).half_configured is None
    msg = from_env({"MLX_HOSTFILE": "/h"}).half_configured
    assert msg.startswith("MLX_HOSTFILE is set but no rank") and "THUNDERLINK_RANK" in msg and "JACCL_RANK" in msg
    msg = from_env({"JACCL_RANK": "1"}).half_configured
    assert msg.startswith("JACCL_RANK is set but no hostfile") and "THUNDERLINK_HOSTFILE" in msg


def test_world_size_job_id_ifname():
    assert from_env({"THUNDERLINK_WORLD_SIZE": "8"}).world_size == 8
    env_error({"THUNDERLINK_WORLD_SIZE": "0"}, "THUNDERLINK_WORLD_SIZE", "must be at least 1")
    env_error({"THUNDERLINK_WORLD_SIZE": "two"}, "THUNDERLINK_WORLD_SIZE", "is not an integer")
    assert from_env({"THUNDERLINK_JOB_ID": "12345"}).job_id == 12345
    assert from_env({"THUNDERLINK_JOB_ID": "-1"}).job_id == 2**64 - 1
    assert from_env({"THUNDERLINK_JOB_ID": str(2**64 + 5)}).job_id == 5
    env_error({"THUNDERLINK_JOB_ID": "job7"}, "THUNDERLINK_JOB_ID", "is not an integer")
    assert from_env({"THUNDERLINK_IFNAME": "bridge0"}).ifname == "bridge0"


# ---- parse_size / parse_rate --------------------------------------------------------


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("4", 4), ("4096", 4096), ("64K", 64 * K), ("64k", 64 * K), ("1M", M), ("1MiB", M),
    ("1MB", M), ("1mb", M), ("2G", 2 * G), ("1GiB", G), ("1T", T), ("1.5M", 3 * M // 2), ("10B", 10),
    (" 7 ", 7), ("3 K", 3 * K), (4096, 4096),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "-1", "1e3", "1 2", "64KK", "1P", "abc", "0x10", "1,000"])
def test_parse_size_errors(text):
    with pytest.raises(ConfigError) as ei:
        parse_size(text, "THE_THING")
    assert "THE_THING" in str(ei.value) and repr(text) in str(ei.value) and "64K" in str(ei.value)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 10**6), unit=st.sampled_from(["", "K", "M", "G", "k", "KiB", "MiB", "GB"]))
def test_parse_size_units(n, unit):
    mult = {"": 1, "K": K, "M": M, "G": G}[unit[:1].upper()]
    assert parse_size(f"{n}{unit}") == n * mult


@pytest.mark.parametrize("value,gbit", [
    (10, 10.0), (2.5, 2.5), ("10", 10.0), ("10gbit", 10.0), ("40Gbps", 40.0), ("500mbit", 0.5),
    ("100Mbps", 0.1), ("1tbit", 1000.0), ("800kbit", 0.0008), ("25G", 25.0), ("10 Gb/s", 10.0),
    ("100mibit", 0.1048576), ("1kibit", 1.024e-6), ("1000bit", 1e-6), ("1Gibps", 1.073741824),
])
def test_parse_rate(value, gbit):
    assert parse_rate(value) == pytest.approx(gbit)
    assert isinstance(parse_rate(value), float)


@pytest.mark.parametrize("value", [0, -1, "0", "0gbit", "fast", "10 furlongs", "-5gbit", True, None, "",
                                   "10ibit", "10gi"])
def test_parse_rate_errors(value):
    with pytest.raises(ConfigError) as ei:
        parse_rate(value, "the.rate")
    assert "the.rate" in str(ei.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_parse_rate_rejects_non_finite(value):
    with pytest.raises(ConfigError):
        parse_rate(value, "rate")


# ---- Options ----------------------------------------------------------------------------


C_FIELDS = ["job_id", "connect_timeout_ms", "timeout_ms", "conns_per_peer", "pipeline_depth", "chunk_bytes",
            "algo_threshold", "algo", "spin_us", "stripe_min_bytes", "sockbuf_bytes", "log_level"]


def c_dict(o):
    return {f: getattr(o, f) for f in C_FIELDS}


def core_defaults():
    o = ffi.new("tl_options_t *")
    lib.tl_options_default(o)
    return c_dict(o)


def test_options_defaults_round_trip():
    d = Options.defaults()
    assert set(d) == {f.name for f in dataclasses.fields(Options)} - {"job_id", "token"}
    assert c_dict(Options().to_c()) == core_defaults()
    assert c_dict(Options(**d).to_c()) == core_defaults()
    # Units: seconds and names.
    assert d["timeout"] == 600 and d["connect_timeout"] == 60
    assert d["algo"] == "auto" and d["log_level"] == "warn"
    assert d["chunk_bytes"] == 512 * K and d["algo_threshold"] == 512 * K


def test_options_documented_defaults_match_env():
    """ENV shows the core's defaults."""
    d = Options.defaults()
    shown = {name: default for name, (default, _) in config.ENV.items()}
    assert float(shown["THUNDERLINK_TIMEOUT"]) == d["timeout"]
    assert float(shown["THUNDERLINK_CONNECT_TIMEOUT"]) == d["connect_timeout"]
    assert int(shown["THUNDERLINK_CONNS"]) == d["conns_per_peer"]
    assert parse_size(shown["THUNDERLINK_CHUNK_BYTES"]) == d["chunk_bytes"]
    assert int(shown["THUNDERLINK_PIPELINE_DEPTH"]) == d["pipeline_depth"]
    assert shown["THUNDERLINK_ALGO"] == d["algo"]
    assert parse_size(shown["THUNDERLINK_ALGO_THRESHOLD"]) == d["algo_threshold"]
    assert parse_size(shown["THUNDERLINK_STRIPE_MIN_BYTES"]) == d["stripe_min_bytes"]
    assert int(shown["THUNDERLINK_SPIN_US"]) == d["spin_us"]
    assert parse_size(shown["THUNDERLINK_SOCKBUF_BYTES"]) == d["sockbuf_bytes"]
    assert shown["THUNDERLINK_DEBUG"] == d["log_level"]


def test_options_to_c_values():
    o = Options(job_id=-1, timeout=1.5, connect_timeout=0.001, conns_per_peer=4, pipeline_depth=2,
                chunk_bytes=64 * K, algo_threshold=0, algo="ONESHOT", spin_us=0, stripe_min_bytes=1,
                sockbuf_bytes=M, log_level="Info").to_c()
    assert c_dict(o) == {
        "job_id": 2**64 - 1, "connect_timeout_ms": 1, "timeout_ms": 1500, "conns_per_peer": 4,
        "pipeline_depth": 2, "chunk_bytes": 64 * K, "algo_threshold": 0, "algo": lib.TL_ALGO_ONESHOT,
        "spin_us": 0, "stripe_min_bytes": 1, "sockbuf_bytes": M, "log_level": lib.TL_LOG_INFO,
    }


def test_options_to_c_errors():
    with pytest.raises(thunderlink.InvalidArgumentError, match="algo must be one of auto, ring, oneshot"):
        Options(algo="fast").to_c()
    with pytest.raises(thunderlink.InvalidArgumentError, match="log_level"):
        Options(log_level="loud").to_c()
    with pytest.raises(thunderlink.InvalidArgumentError, match="timeout"):
        Options(timeout=0).to_c()


# ---- connect() errors ----------------------------------------------------------------


@pytest.fixture
def hostfile2(tmp_path):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"ranks": [{"addresses": ["127.0.0.1:1"]}, {"addresses": ["127.0.0.1:2"]}]}))
    return str(path)


@pytest.fixture
def hostfile1(tmp_path):
    path = tmp_path / "one.json"
    port = free_ports(1)[0]
    path.write_text(json.dumps({"ranks": [{"addresses": [f"127.0.0.1:{port}"]}]}))
    return str(path)


def connect_env(env):
    return thunderlink.connect(from_env(env))


def test_connect_without_hostfile():
    with pytest.raises(ConfigError) as ei:
        connect_env({"THUNDERLINK_RANK": "0"})
    msg = str(ei.value)
    assert "no hostfile" in msg and "THUNDERLINK_HOSTFILE" in msg and "MLX_HOSTFILE" in msg
    assert "thunderlink launch" in msg


def test_connect_without_rank(hostfile2):
    with pytest.raises(ConfigError) as ei:
        connect_env({"THUNDERLINK_HOSTFILE": hostfile2})
    msg = str(ei.value)
    assert "no rank" in msg and "THUNDERLINK_RANK" in msg and "MLX_RANK" in msg


@pytest.mark.parametrize("var", ["THUNDERLINK_RANK", "MLX_RANK"])
def test_connect_rank_out_of_range(hostfile2, var):
    with pytest.raises(ConfigError) as ei:
        connect_env({"THUNDERLINK_HOSTFILE": hostfile2, var: "5"})
    msg = str(ei.value)
    assert "rank 5" in msg and var in msg and hostfile2 in msg and "2 ranks" in msg and "0..1" in msg


def test_connect_world_size_mismatch(hostfile2):
    with pytest.raises(ConfigError) as ei:
        connect_env({"THUNDERLINK_HOSTFILE": hostfile2, "THUNDERLINK_RANK": "0", "THUNDERLINK_WORLD_SIZE": "3"})
    msg = str(ei.value)
    assert "THUNDERLINK_WORLD_SIZE=3" in msg and hostfile2 in msg and "2 ranks" in msg


def test_connect_unimplemented_transport(hostfile2):
    with pytest.raises(thunderlink.UnsupportedError) as ei:
        connect_env({"THUNDERLINK_HOSTFILE": hostfile2, "THUNDERLINK_RANK": "0", "THUNDERLINK_TRANSPORT": "rdma"})
    msg = str(ei.value)
    assert "'rdma'" in msg and "unset THUNDERLINK_TRANSPORT or set it to auto" in msg
    assert isinstance(ei.value, NotImplementedError)


def test_connect_bad_hostfile_names_variable(tmp_path):
    missing = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError) as ei:
        connect_env({"MLX_HOSTFILE": missing, "MLX_RANK": "0"})
    assert missing in str(ei.value) and "MLX_HOSTFILE" in str(ei.value)


def test_connect_single_rank(hostfile1):
    with connect_env({"THUNDERLINK_HOSTFILE": hostfile1, "THUNDERLINK_RANK": "0",
                      "THUNDERLINK_CONNECT_TIMEOUT": "5", "THUNDERLINK_CONNS": "3"}) as comm:
        assert (comm.rank, comm.size) == (0, 1)


def test_connect_arguments_win(hostfile1, hostfile2):
    with thunderlink.connect(from_env({"THUNDERLINK_HOSTFILE": hostfile2, "THUNDERLINK_RANK": "1"}),
                             hostfile=hostfile1, rank=0) as comm:
        assert comm.size == 1


# Values that from_env accepts must either be refused by from_env (a
# ConfigError naming the variable) or work: they must not fail later with a
# message that names neither the variable nor the problem.
ACCEPTED = [
    ("THUNDERLINK_CONNS", "4"),
    ("THUNDERLINK_CHUNK_BYTES", "64K"),
    ("THUNDERLINK_TIMEOUT", "3"),
    ("THUNDERLINK_PIPELINE_DEPTH", "64"),
]
REFUSED = [
    ("THUNDERLINK_CONNS", "1000"),
    ("THUNDERLINK_CHUNK_BYTES", "1K"),
    ("THUNDERLINK_PIPELINE_DEPTH", "100"),
    ("THUNDERLINK_TIMEOUT", "inf"),
    ("THUNDERLINK_SOCKBUF_BYTES", "4G"),
    ("THUNDERLINK_TIMEOUT", "1e7"),
    ("THUNDERLINK_CONNECT_TIMEOUT", "0.0001"),
]


@pytest.mark.parametrize("name,value", ACCEPTED)
def test_accepted_values_connect(hostfile1, name, value):
    with connect_env({"THUNDERLINK_HOSTFILE": hostfile1, "THUNDERLINK_RANK": "0", name: value}) as comm:
        assert comm.size == 1


@pytest.mark.parametrize("name,value", REFUSED)
def test_refused_values_name_the_variable(hostfile1, name, value):
    with pytest.raises(ConfigError) as ei:
        comm = connect_env({"THUNDERLINK_HOSTFILE": hostfile1, "THUNDERLINK_RANK": "0", name: value})
        comm.close()
    assert name in str(ei.value)


# ---- ENV documents everything config.py reads ----------------------------------------


def names_read_by_config() -> set[str]:
    """Every THUNDERLINK_*/MLX_* string literal in config.py outside ENV, and
    the variables of the core's options, which config.py reads from the
    core's table (config.OPTIONS)."""
    src = open(config.__file__, encoding="utf-8").read()
    tree = ast.parse(src)
    env_node = next(n for n in tree.body if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "ENV" for t in n.targets))
    in_env = {id(n) for n in ast.walk(env_node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in in_env:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names |= set(re.findall(r"\b(?:THUNDERLINK|MLX)_[A-Z0-9_]+\b", node.value))
    return names | {spec.env for spec in config.OPTIONS}


def test_env_documents_every_variable_read():
    read = names_read_by_config()
    assert len(read) >= 15, read
    missing = read - set(config.ENV)
    assert not missing, f"read by config.py but not in ENV: {sorted(missing)}"


def test_every_documented_variable_is_read():
    unread = set(config.ENV) - names_read_by_config()
    assert not unread, f"in ENV but never read by config.py: {sorted(unread)}"


def test_env_entries_are_documented():
    for name, entry in config.ENV.items():
        assert re.fullmatch(r"(THUNDERLINK|MLX)_[A-Z_]+", name)
        default, text = entry
        assert isinstance(default, str) and default
        assert isinstance(text, str) and len(text) > 10
