"""Tuning profiles (thunderlink.tune.profile): parsing and checking, the
round trip through JSON and the core's tl_options_t, rows steering the
algorithm choice (tl_select), environment variables winning, a profile
applied by every rank of a job (the core reports the plan it uses), and
ranks with different profiles refused at connect."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import HERE
from thunderlink import config
from thunderlink.bindings import Options, ffi, lib
from thunderlink.errors import ConfigError
from thunderlink.tune import profile as pf

TEST_TIMEOUT_S = 120
TUNEPROGS = f"{HERE}/tuneprogs.py"

PROFILE = {
    "thunderlink_tuning": 1,
    "options": {"conns_per_peer": 3, "chunk_bytes": "256K"},
    "rows": [
        {"op": "all_sum", "ranks": 3, "min_bytes": 0, "max_bytes": "256K", "algo": "ring", "pipeline_depth": 5},
        {"op": "all_sum", "ranks": 3, "min_bytes": "256K", "algo": "mesh", "chunk_bytes": "64K",
         "pipeline_depth": 3, "lanes": 1},
        {"op": "all_gather", "transport": "tcp", "min_bytes": "1M", "max_bytes": "2M", "algo": "oneshot"},
    ],
    "measured": {"note": "by hand"},
}


def write(tmp_path, data, name="tuning.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(p)


def test_round_trip(tmp_path):
    prof = pf.load(write(tmp_path, PROFILE))
    out = str(tmp_path / "again" / "t.json")
    prof.dump(out)
    again = pf.load(out)
    assert again.to_json() == prof.to_json()
    assert prof.options == {"conns_per_peer": 3, "chunk_bytes": 256 << 10}
    assert [r.algo for r in prof.rows] == ["ring", "mesh", "oneshot"]
    assert prof.rows[1].max_bytes is None and prof.rows[0].max_bytes == 256 << 10
    # Into the core's struct and past its checks.
    o = Options(**pf.apply({}, prof)).to_c()
    assert o.ntune == 3 and o.conns_per_peer == 3
    assert (o.tune[1].how, o.tune[1].chunk_bytes, o.tune[1].depth, o.tune[1].lanes) == (
        lib.TL_HOW_MESH, 64 << 10, 3, 1)
    assert o.tune[2].transport == lib.TL_TRANSPORT_TCP and o.tune[2].op == lib.TL_OP_ALL_GATHER


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"rows": []}), "no \"thunderlink_tuning\" key"),
    (json.dumps({"thunderlink_tuning": 9}), "version 9"),
    (json.dumps({"thunderlink_tuning": 1, "options": {"timeout": 5}}), "'timeout' cannot be tuned"),
    (json.dumps({"thunderlink_tuning": 1, "options": {"pipeline_depth": 0}}), "pipeline_depth"),
    (json.dumps({"thunderlink_tuning": 1, "rows": [{"op": "all_sum", "algo": "fast"}]}), "row 0: algo 'fast'"),
    (json.dumps({"thunderlink_tuning": 1, "rows": [{"op": "all_sum", "min_bytes": "1M", "max_bytes": "1K"}]}),
     "not above min_bytes"),
    (json.dumps({"thunderlink_tuning": 1, "rows": [{"op": "gossip"}]}), "op 'gossip'"),
    (json.dumps({"thunderlink_tuning": 1, "rows": [{"op": "all_sum", "chunk": 4}]}), "unknown key(s) chunk"),
    (json.dumps({"thunderlink_tuning": 1, "rows": [{"op": "all_sum"}] * 65}), "at most 64"),
])
def test_bad_profiles_name_the_file_and_the_problem(tmp_path, text, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        config.from_env({"THUNDERLINK_TUNING_FILE": path})
    assert path in str(ei.value) and problem in str(ei.value)


def test_missing_profile(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="nope.json: cannot read it"):
        config.from_env({"THUNDERLINK_TUNING_FILE": path})
    # Empty: none; the default path only when it exists.
    assert config.from_env({"THUNDERLINK_TUNING_FILE": ""}).tuning_file is None
    assert config.from_env({"HOME": str(tmp_path)}).tuning_file is None
    default = tmp_path / ".config" / "thunderlink" / "tuning.json"
    default.parent.mkdir(parents=True)
    default.write_text(json.dumps(PROFILE))
    cfg = config.from_env({"HOME": str(tmp_path)})
    assert cfg.tuning_file == str(default) and cfg.options["conns_per_peer"] == 3
    cfg = config.from_env({"XDG_CONFIG_HOME": str(tmp_path / "elsewhere"), "HOME": str(tmp_path)})
    assert cfg.tuning_file is None


def test_explicit_variables_win(tmp_path):
    path = write(tmp_path, PROFILE)
    cfg = config.from_env({"THUNDERLINK_TUNING_FILE": path, "THUNDERLINK_CHUNK_BYTES": "1M",
                           "THUNDERLINK_PIPELINE_DEPTH": "7", "THUNDERLINK_ALGO": "ring"})
    assert cfg.options["chunk_bytes"] == 1 << 20 and cfg.options["conns_per_peer"] == 3
    rows = cfg.options["tuning"]
    assert all(r["how"] == -1 and r["depth"] == 0 and r["chunk_bytes"] == 0 for r in rows)
    assert rows[1]["lanes"] == 1  # not decided by any variable set here


def select(o, op, nbytes, nranks=3, mesh=1, transport=lib.TL_TRANSPORT_TCP):
    p = ffi.new("tl_plan_t *")
    assert lib.tl_select(o, op, nbytes, lib.TL_FLOAT32, nranks, mesh, transport, p) == 0
    return (p.how, p.depth, p.chunk_bytes, p.lanes)


def test_rows_steer_the_selector(tmp_path):
    o = Options(**pf.apply({}, pf.load(write(tmp_path, PROFILE)))).to_c()
    AR, AG = lib.TL_OP_ALL_REDUCE, lib.TL_OP_ALL_GATHER
    assert select(o, AR, 64 << 10) == (lib.TL_HOW_RING, 5, 256 << 10, 2)
    assert select(o, AR, 1 << 20) == (lib.TL_HOW_MESH, 3, 64 << 10, 1)
    # Without a link between every pair, no mesh: the ring, with the row's knobs.
    assert select(o, AR, 1 << 20, mesh=0) == (lib.TL_HOW_RING, 3, 64 << 10, 1)
    # Another group size: the options' choice (one round below the threshold).
    assert select(o, AR, 64 << 10, nranks=4)[0] == lib.TL_HOW_ONE_ROUND
    assert select(o, AG, 1 << 20)[0] == lib.TL_HOW_ONE_ROUND
    assert select(o, AG, 1 << 20, transport=lib.TL_TRANSPORT_SHM)[0] == lib.TL_HOW_RING
    assert select(o, AG, 2 << 20)[0] == lib.TL_HOW_RING
    # The rows are in the handshake's digest: a changed row changes it. The
    # core's digest is internal; tl_options_check at least refuses bad rows.
    o.tune[0].depth = 99
    why = ffi.new("char[200]")
    assert lib.tl_options_check(o, why, 200) == lib.TL_ERR_CONFIG
    assert "tuning profile row 0: depth" in ffi.string(why).decode()


def run_plans(ranks, n, cases, env, profile_base=None, timeout=60):
    args = [cases] + ([profile_base] if profile_base else [])
    return ranks(n, "", env=env, timeout=timeout, argv=[sys.executable, TUNEPROGS, "plans", json.dumps(args)])


@pytest.mark.multiproc
@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_every_rank_applies_the_profile(ranks, tmp_path, transport):
    path = write(tmp_path, PROFILE)
    cases = [["all_sum", 64 << 10], ["all_sum", 1 << 20], ["all_gather", 1 << 20]]
    r = run_plans(ranks, 3, cases, {"THUNDERLINK_TUNING_FILE": path, "THUNDERLINK_TRANSPORT": transport})
    assert r.status == 0, r.all_text()
    for v in r.results():
        assert v["ok"]
        assert v["plans"][0] == {"algo": "ring", "lanes": 2, "depth": 5, "chunk_bytes": 256 << 10}
        assert v["plans"][1] == {"algo": "mesh", "lanes": 1, "depth": 3, "chunk_bytes": 64 << 10}
        assert v["plans"][2]["algo"] == ("oneshot" if transport == "tcp" else "ring")
        if transport == "tcp":
            assert v["channels"] == [3]  # the profile's conns_per_peer


@pytest.mark.multiproc
def test_ranks_with_different_profiles_are_refused(ranks, tmp_path):
    write(tmp_path, PROFILE, "p0.json")
    other = json.loads(json.dumps(PROFILE))
    other["rows"][1]["pipeline_depth"] = 4  # one knob of one row
    write(tmp_path, other, "p1.json")
    r = run_plans(ranks, 2, [["all_sum", 1 << 20]], {"THUNDERLINK_CONNECT_TIMEOUT": "6",
                                                      "THUNDERLINK_TRANSPORT": "tcp"},
                  profile_base=str(tmp_path / "p"))
    values = r.results()
    assert all(v.get("raised") for v in values), r.all_text()
    assert "THUNDERLINK_TUNING_FILE" in r.all_text()


@pytest.mark.multiproc
def test_tune_writes_a_profile_that_is_applied(ranks, tmp_path):
    """A short sweep on 3 local ranks: the profile parses, round-trips, and
    every rank that reads it runs what its rows say."""
    import os
    import subprocess

    out = tmp_path / "tuned.json"
    env = dict(os.environ, THUNDERLINK_TUNING_FILE="", THUNDERLINK_TRANSPORT="tcp", THUNDERLINK_CONNECT_TIMEOUT="20",
               THUNDERLINK_TIMEOUT="30")
    cp = subprocess.run([sys.executable, "-m", "thunderlink.cli", "tune", "-n", "3", "--sizes", "16K,1M",
                         "--conns", "1,2", "--chunks", "128K", "--depths", "2,3", "--iters", "1", "-o", str(out),
                         "--timeout", "100"], env=env, capture_output=True, text=True, timeout=110)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "tuned/best" in cp.stdout and f"wrote {out}" in cp.stdout
    prof = pf.load(str(out))
    assert pf.parse(json.loads(json.dumps(prof.to_json()))).to_json() == prof.to_json()
    assert prof.options["conns_per_peer"] in (1, 2)
    assert [(r.op, r.ranks, r.transport, r.min_bytes) for r in prof.rows] == [
        ("all_sum", 3, "tcp", 0), ("all_sum", 3, "tcp", prof.rows[0].max_bytes)]
    assert prof.rows[-1].max_bytes is None
    assert len(prof.measured["bands"]) == 2
    r = run_plans(ranks, 3, [["all_sum", 16 << 10], ["all_sum", 1 << 20]],
                  {"THUNDERLINK_TUNING_FILE": str(out), "THUNDERLINK_TRANSPORT": "tcp"})
    assert r.status == 0, r.all_text()
    for v in r.results():
        assert v["ok"] and v["channels"] == [prof.options["conns_per_peer"]]
        for got, row in zip(v["plans"], prof.rows):
            assert got["algo"] == row.algo
            if row.chunk_bytes:
                assert (got["chunk_bytes"], got["depth"]) == (row.chunk_bytes, row.pipeline_depth)


@pytest.mark.multiproc
def test_bench_profile_side_by_side(tmp_path):
    """thunderlink bench --profile P: the defaults and the profile, per size."""
    import os
    import subprocess

    path = write(tmp_path, {"thunderlink_tuning": 1, "options": {"conns_per_peer": 1},
                            "rows": [{"op": "all_sum", "min_bytes": "32K", "algo": "ring", "chunk_bytes": "16K"}]})
    env = dict(os.environ, THUNDERLINK_TRANSPORT="tcp", THUNDERLINK_CONNECT_TIMEOUT="20", THUNDERLINK_TIMEOUT="30")
    cp = subprocess.run([sys.executable, "-m", "thunderlink.cli", "bench", "-n", "2", "--profile", path,
                         "--sizes", "4K,64K", "--iters", "1", "--timeout", "60"],
                        env=env, capture_output=True, text=True, timeout=80)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    lines = [line.split() for line in cp.stdout.splitlines() if line and not line.startswith("#")]
    assert lines[0] == ["bytes", "default", "tuned", "tuned/default"]
    assert [int(row[0]) for row in lines[1:]] == [4096, 65536]
    assert all(float(x) > 0 for row in lines[1:] for x in row[1:])
    # A bad profile is refused before any rank starts.
    bad = write(tmp_path, "{", "bad.json")
    cp = subprocess.run([sys.executable, "-m", "thunderlink.cli", "bench", "--profile", bad], env=env,
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode != 0 and "bad.json" in cp.stderr and "not valid JSON" in cp.stderr
