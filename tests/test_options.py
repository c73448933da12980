"""The options table (csrc/core/options.h): one declaration per knob, from
which the core's defaults, checks and handshake digest, config.from_env,
bindings.Options and the README's rows all follow. These tests hold the
pieces that are still written twice (tl_options_t, the README) to the table,
and check that the C and Python sides of every range agree."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest

from thunderlink import config
from thunderlink.bindings import Options, ffi, lib
from thunderlink.bindings.options import SPECS
from thunderlink.config import ConfigError, from_env

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def c_check(o) -> str:
    why = ffi.new("char[256]")
    rc = lib.tl_options_check(o, why, 256)
    return "" if rc == 0 else ffi.string(why).decode()


def defaults():
    o = ffi.new("tl_options_t *")
    lib.tl_options_default(o)
    return o


def test_table_covers_every_field_of_tl_options():
    struct_fields = [name for name, _ in ffi.typeof("tl_options_t").fields]
    assert sorted(s.field for s in SPECS) == sorted(
        set(struct_fields) - {"job_id", "token_key", "token_set", "ntune", "tune"})


def test_names_are_unique_and_well_formed():
    for attr in ("name", "field", "env"):
        values = [getattr(s, attr) for s in SPECS]
        assert len(set(values)) == len(values), attr
    for s in SPECS:
        assert re.fullmatch(r"THUNDERLINK_[A-Z_]+", s.env), s
        assert s.kind in ("int", "bytes", "seconds", "choice"), s
        assert s.lo <= s.default <= s.hi, s
        assert len(s.help) > 10 and "\n" not in s.help, s
        assert bool(s.choices) == (s.kind == "choice"), s
        if s.kind == "choice":
            assert s.hi < len(s.choices), s


def test_options_fields_follow_the_table():
    assert [f.name for f in dataclasses.fields(Options)] == ["job_id", "token"] + [s.name for s in SPECS] + ["tuning"]
    assert Options.defaults() == {**{s.name: s.value(s.default) for s in SPECS}, "tuning": None}


def test_shared_options_are_the_handshakes():
    """Which options every rank must share is part of the wire protocol
    (the handshake's digest covers them, in table order): changing the set
    or its order needs a new TL_PROTOCOL_VERSION."""
    assert [s.name for s in SPECS if s.shared] == [
        "conns_per_peer", "chunk_bytes", "algo_threshold", "algo", "stripe_min_bytes", "pipeline_depth",
        "transport", "heartbeat",
    ]
    assert lib.TL_PROTOCOL_VERSION == 3


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_ranges_agree_between_c_and_python(spec):
    """The ends of every range pass both from_env and the core's check; one
    step outside fails both, each naming the variable."""
    for raw in (spec.lo, spec.hi):
        o = defaults()
        setattr(o, spec.field, raw)
        assert c_check(o) == "", (spec.name, raw)
        if spec.kind != "choice":
            text = str(spec.value(raw))
            assert from_env({spec.env: text}).options.get(spec.name, spec.value(raw)) == spec.value(raw)
    for raw in (spec.lo - 1, spec.hi + 1):
        o = defaults()
        try:
            setattr(o, spec.field, raw)
        except OverflowError:
            continue  # the field cannot even hold it
        msg = c_check(o)
        assert spec.env in msg and spec.field in msg, msg
        # (Sizes are read through a float: 2**62 + 1 reads as 2**62.)
        if spec.kind in ("int", "bytes") and raw >= 0 and int(float(raw)) == raw:
            with pytest.raises(ConfigError, match=spec.env):
                from_env({spec.env: str(raw)})


def test_core_check_messages():
    o = defaults()
    o.chunk_bytes = 5
    assert c_check(o) == "chunk_bytes (THUNDERLINK_CHUNK_BYTES) must be 4096..1073741824 B, not 5"
    o = defaults()
    o.algo = 7
    assert c_check(o) == "algo (THUNDERLINK_ALGO) must be one of auto, ring, oneshot, mesh, not 7"
    o = defaults()
    o.transport = lib.TL_TRANSPORT_RDMA
    assert c_check(o) == "transport (THUNDERLINK_TRANSPORT) rdma is not available in this build (auto, tcp, shm are)"


def test_every_choice_reads_from_the_environment():
    for spec in SPECS:
        if spec.kind == "choice":
            for name in spec.choices:
                got = from_env({spec.env: name.upper()})
                assert (got.transport if spec.name == "transport" else got.options[spec.name]) == name


def test_env_shows_the_table():
    for spec in SPECS:
        assert config.ENV[spec.env] == (spec.shown_default, spec.doc)
    assert config.ENV["THUNDERLINK_CHUNK_BYTES"][0] == "512K"
    assert config.ENV["THUNDERLINK_TIMEOUT"][0] == "600"
    assert config.ENV["THUNDERLINK_SOCKBUF_BYTES"][0] == "4M"


def test_shared_options_say_so():
    for spec in SPECS:
        assert ("same on every rank" in spec.doc.lower()) == spec.shared, spec.name


def test_readme_has_the_rows_of_the_table():
    """README.md's environment table shows each option as readme_rows()
    renders it (paste the rows from `python -c "from thunderlink.config
    import readme_rows; print(*readme_rows(), sep=chr(10))"`)."""
    with open(README, encoding="utf-8") as f:
        lines = {line.rstrip("\n") for line in f}
    rows = config.readme_rows()
    assert len(rows) == len(SPECS)
    missing = [row for row in rows if row not in lines]
    assert not missing, "README.md rows differ from config.readme_rows():\n" + "\n".join(missing)
