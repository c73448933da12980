"""bench/peers.py times its peers with thunderlink bench's own loop and table
(thunderlink.bench.worker.run and .report): same columns, same JSON keys."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import PKG_ROOT as SRC

PEERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "peers.py")
KEYS = ["backend", "op", "size", "count", "dtype", "inplace", "iters", "time_us", "p50_us", "p99_us",
        "algbw", "busbw", "wrong", "ranks", "cpu", "supported"]
MPI = importlib.util.find_spec("mpi4py") is not None and shutil.which("mpirun") is not None


def peers(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=SRC + (os.pathsep + os.environ["PYTHONPATH"]
                                             if os.environ.get("PYTHONPATH") else ""))
    return subprocess.run([sys.executable, PEERS, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_peers_has_no_loop_of_its_own():
    text = open(PEERS).read()
    assert "perf_counter()" not in text and "def measure" not in text and "def header" not in text
    assert "from thunderlink.bench.worker import" in text


@pytest.mark.skipif(not MPI, reason="Open MPI / mpi4py not installed")
def test_ompi_shm_through_the_bench_loop(tmp_path):
    out = tmp_path / "ompi.json"
    cp = peers("--peer", "ompi-shm", "--sizes", "4,1K", "--iters", "5", "--warmup", "1", "--json", str(out))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0].startswith("# peers bench: all_sum, 2 ranks, float32, on ")
    assert lines[1].startswith("# peer: ") and "MPI_Allreduce" in lines[1]
    assert "ompi-shm out-of-place" in lines[4] and "ompi-shm in-place" in lines[4]
    assert lines[5].split()[1:4] == ["size", "count", "type"]
    rows = [x.split() for x in lines if not x.startswith("#")]
    assert [r[:3] for r in rows] == [["4", "1", "float32"], ["1024", "256", "float32"]]
    assert all(len(r) == 3 + 2 * 7 for r in rows)
    assert lines[-1] == "# OK"
    ms = json.loads(out.read_text())
    assert [list(m) for m in ms] == [KEYS] * 4
    assert [(m["backend"], m["size"], m["inplace"], m["iters"], m["wrong"]) for m in ms] == [
        ("ompi-shm", 4, False, 5, 0), ("ompi-shm", 4, True, 5, 0),
        ("ompi-shm", 1024, False, 5, 0), ("ompi-shm", 1024, True, 5, 0)]
    cp = peers("--compare", str(out))
    assert cp.returncode == 0 and "ompi-shm-in p50" in cp.stdout, cp.stdout + cp.stderr


def test_mlx_ring_alone(tmp_path):
    """--peer mlx-ring: MLX's ring in processes of its own (no thunderlink
    group, malloc as MLX leaves it), out of place and in place (donated)."""
    pytest.importorskip("mlx.core")
    out = tmp_path / "ring.json"
    cp = peers("--peer", "mlx-ring", "--sizes", "4,64K", "--iters", "3", "--warmup", "1", "--json", str(out))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "ring backend alone" in cp.stdout and "left alone: no thunderlink group here" in cp.stdout
    ms = json.loads(out.read_text())
    assert [(m["backend"], m["size"], m["inplace"], m["wrong"]) for m in ms] == [
        ("mlx-ring", 4, False, 0), ("mlx-ring", 4, True, 0),
        ("mlx-ring", 65536, False, 0), ("mlx-ring", 65536, True, 0)]
