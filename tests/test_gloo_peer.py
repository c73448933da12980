"""Gloo as a peer of the benchmarks (thunderlink.bench.gloo): which
implementation runs (torch.distributed, or bench/gloo's driver library where
PyTorch is missing) and the errors that name the fix when neither can.

CI has no Gloo build, so these tests run the selection, the argument checks
and the loader's refusals; the one test that measures Gloo through the
driver library runs where THUNDERLINK_GLOO_LIB names one (bench/gloo/build.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import PKG_ROOT as SRC

import thunderlink.bindings
from thunderlink import config
from thunderlink.bench import gloo

PEERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "peers.py")
CORE_SO = next(os.path.join(os.path.dirname(thunderlink.bindings.__file__), f)
               for f in os.listdir(os.path.dirname(thunderlink.bindings.__file__)) if f.startswith("_core"))
GLOO_LIB = config.gloo_lib()


def run(*args, env_extra=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=SRC + (os.pathsep + os.environ["PYTHONPATH"]
                                             if os.environ.get("PYTHONPATH") else ""))
    for k in ("THUNDERLINK_RANK", "THUNDERLINK_HOSTFILE", "MLX_RANK", "MLX_HOSTFILE", "THUNDERLINK_GLOO_LIB"):
        env.pop(k, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)


@pytest.fixture
def no_env_lib(monkeypatch):
    monkeypatch.delenv("THUNDERLINK_GLOO_LIB", raising=False)


def test_auto_prefers_torch(monkeypatch, no_env_lib):
    monkeypatch.setattr(gloo, "torch_available", lambda: True)
    assert gloo.resolve("auto") == ("torch", None)
    assert gloo.resolve("auto", "/nowhere/libgloo_allreduce.so") == ("torch", None)  # torch first, lib unread


def test_without_torch_or_library_the_message_names_both_fixes(monkeypatch, no_env_lib):
    monkeypatch.setattr(gloo, "torch_available", lambda: False)
    with pytest.raises(gloo.GlooUnavailable) as e:
        gloo.resolve("auto")
    msg = str(e.value)
    assert "--gloo-lib PATH" in msg and "THUNDERLINK_GLOO_LIB" in msg and "bench/gloo/build.sh" in msg
    assert "pip install torch" in msg
    with pytest.raises(gloo.GlooUnavailable, match="pip install torch"):
        gloo.resolve("torch")


def test_missing_library_file(monkeypatch, tmp_path, no_env_lib):
    monkeypatch.setattr(gloo, "torch_available", lambda: False)
    missing = tmp_path / "libgloo_allreduce.so"
    with pytest.raises(gloo.GlooUnavailable, match="does not exist: build it with bench/gloo/build.sh"):
        gloo.resolve("auto", str(missing))
    monkeypatch.setenv("THUNDERLINK_GLOO_LIB", str(missing))  # the variable, when no option is given
    with pytest.raises(gloo.GlooUnavailable, match=str(missing)):
        gloo.resolve("lib")


def test_a_file_that_is_not_the_driver_is_refused(tmp_path, no_env_lib):
    text = tmp_path / "libgloo_allreduce.so"
    text.write_text("not a library\n")
    with pytest.raises(gloo.GlooUnavailable, match="not a loadable Gloo driver library"):
        gloo.resolve("lib", str(text))
    # A real shared library, but without the driver's C API (thunderlink's own core).
    with pytest.raises(gloo.GlooUnavailable, match="not a loadable Gloo driver library"):
        gloo.resolve("lib", CORE_SO)


def test_option_wins_over_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("THUNDERLINK_GLOO_LIB", "/from/env/lib.so")
    assert gloo.lib_path() == "/from/env/lib.so"
    assert gloo.lib_path(str(tmp_path / "x.so")) == str(tmp_path / "x.so")
    assert config.gloo_lib({"THUNDERLINK_GLOO_LIB": ""}) is None
    assert "THUNDERLINK_GLOO_LIB" in config.ENV


def test_bench_refuses_gloo_with_gloo_lib():
    cp = run("-m", "thunderlink", "bench", "--vs", "gloo", "--vs", "gloo-lib")
    assert cp.returncode == 2 and "give it alone" in cp.stderr, cp.stderr


def test_bench_without_a_library_starts_nothing(tmp_path):
    missing = str(tmp_path / "none.so")
    cp = run("-m", "thunderlink", "bench", "--vs", "gloo-lib", "--gloo-lib", missing, timeout=60)
    assert cp.returncode == 1 and f"--vs gloo-lib: the Gloo driver library {missing} does not exist" in cp.stderr, \
        cp.stdout + cp.stderr
    assert "size" not in cp.stdout  # no table: no rank was started


def test_peers_without_a_library(tmp_path):
    missing = str(tmp_path / "none.so")
    cp = run(PEERS, "--peer", "gloo-lib", "--gloo-lib", missing, timeout=60)
    assert cp.returncode == 2 and "--peer gloo-lib" in cp.stdout and "bench/gloo/build.sh" in cp.stdout, \
        cp.stdout + cp.stderr


@pytest.mark.multiproc
@pytest.mark.skipif(not GLOO_LIB, reason="no Gloo driver library: set THUNDERLINK_GLOO_LIB to one built by "
                                         "bench/gloo/build.sh (CI has none)")
def test_gloo_lib_through_both_harnesses(tmp_path):
    """Where a driver library is named: Gloo through it, in thunderlink bench
    (next to the core, with the ratio column) and in peers.py alone, exact sums."""
    out = tmp_path / "bench.json"
    cp = run("-m", "thunderlink", "bench", "--sizes", "4,64K,1M", "--iters", "3", "--warmup", "1",
             "--vs", "gloo-lib", "--gloo-lib", GLOO_LIB, "--json", str(out), "--timeout", "120", timeout=180)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "# gloo-lib: Gloo driver library" in cp.stdout and "x gloo-lib" in cp.stdout
    ms = json.loads(out.read_text())
    assert {(m["backend"], m["inplace"]) for m in ms} == {("thunderlink", False), ("gloo-lib", True)}
    assert all(m["wrong"] == 0 and m["busbw"] > 0 for m in ms)

    out = tmp_path / "peers.json"  # the library named by the variable this time
    cp = run(PEERS, "--peer", "gloo-lib", "--sizes", "4,1M", "--iters", "3", "--warmup", "1", "--json", str(out),
             "--timeout", "120", env_extra={"THUNDERLINK_GLOO_LIB": GLOO_LIB}, timeout=180)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "# peer: Gloo driver library" in cp.stdout
    ms = json.loads(out.read_text())
    assert [(m["size"], m["inplace"], m["wrong"]) for m in ms] == [(4, True, 0), (1048576, True, 0)]
