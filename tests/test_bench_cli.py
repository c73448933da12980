"""`python -m thunderlink bench`: the nccl-tests style table, every op, the
JSON output, dtypes, and the parsing of --sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from thunderlink.bench.__main__ import parse_sizes
from thunderlink.bench.ops import DTYPES, OPS, expected_sum, make_data

from conftest import PKG_ROOT as SRC  # where the thunderlink being tested lives
HARD_TIMEOUT = 60

# Keys every measurement in --json has (bench/worker.py Measurement).
KEYS = {"backend", "op", "size", "count", "dtype", "inplace", "iters", "time_us", "p50_us", "p99_us",
        "algbw", "busbw", "wrong", "ranks"}


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    for k in ("THUNDERLINK_RANK", "THUNDERLINK_HOSTFILE", "MLX_RANK", "MLX_HOSTFILE"):
        e.pop(k, None)  # not inside a job: the bench starts its own ranks
    e.setdefault("THUNDERLINK_CONNECT_TIMEOUT", "20")
    e.setdefault("THUNDERLINK_TIMEOUT", "30")
    return e


def bench(*args, timeout=HARD_TIMEOUT):
    return subprocess.run([sys.executable, "-m", "thunderlink", "bench", *args], env=env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class Table:
    """The rows of a bench table, each a dict from column name to text
    (repeated columns, one per variant, become lists)."""

    def __init__(self, text: str):
        self.text = text
        lines = text.splitlines()
        self.comments = [line for line in lines if line.startswith("#")]
        heads = [line[1:].split() for line in self.comments if line[1:].split()[:3] == ["size", "count", "type"]]
        assert len(heads) == 1, text
        self.columns = heads[0]
        self.rows = []
        for line in lines:
            if not line.strip() or line.startswith("#"):
                continue
            tokens = line.split()
            assert len(tokens) == len(self.columns), (line, self.columns)
            row: dict = {}
            for name, tok in zip(self.columns, tokens):
                row.setdefault(name, []).append(tok)
            self.rows.append(row)

    def col(self, name):
        return [row[name] for row in self.rows]

    def wrong(self):
        return [int(w) for row in self.rows for w in row["#wrong"]]


def check_table(p, sizes=None, dtype="float32", variants=2):
    assert p.returncode == 0, p.stdout + p.stderr
    t = Table(p.stdout)
    assert t.comments[0].startswith("# thunderlink bench:")
    assert t.rows, p.stdout
    if sizes is not None:
        assert [int(r["size"][0]) for r in t.rows] == list(sizes), p.stdout
    assert all(r["type"] == [dtype] for r in t.rows)
    assert all(len(r["#wrong"]) == variants for r in t.rows), t.columns
    assert t.wrong() == [0] * (len(t.rows) * variants)
    for row in t.rows:
        for name in ("time", "algbw", "busbw"):
            assert all(float(v) >= 0 for v in row[name])
    assert "# OK" in p.stdout
    return t


# ---- end to end ------------------------------------------------------------------


@pytest.mark.multiproc
def test_default_op_size_sweep():
    p = bench("--sizes", "4:64K", "--iters", "5", "--warmup", "1")
    t = check_table(p, sizes=[4 << i for i in range(15)])
    assert "all_sum" in t.comments[0] and "2 ranks" in t.comments[0]
    assert "out-of-place" in p.stdout and "in-place" in p.stdout
    # count is in float32 elements.
    assert [int(r["count"][0]) for r in t.rows] == [1 << i for i in range(15)]


@pytest.mark.multiproc
@pytest.mark.parametrize("op", ["all_gather", "sum_scatter", "broadcast", "sendrecv"])
def test_ops_three_ranks(op):
    p = bench("-n", "3", "--op", op, "--sizes", "12,1K", "--iters", "3", "--warmup", "1")
    t = check_table(p)
    assert op in t.comments[0] and "3 ranks" in t.comments[0]
    counts = [int(r["count"][0]) for r in t.rows]
    sizes = [int(r["size"][0]) for r in t.rows]
    if op in ("all_gather", "sum_scatter"):
        # size is what one rank's output (gather) / input (scatter) holds:
        # rounded down to a multiple of ranks x element size; count per rank.
        assert counts == [1, 85] and sizes == [12, 1020]
    else:
        assert counts == [3, 256] and sizes == [12, 1024]


@pytest.mark.multiproc
def test_json_output(tmp_path):
    out = tmp_path / "out.json"
    p = bench("-n", "3", "--sizes", "16,4K", "--iters", "4", "--warmup", "1", "--json", str(out))
    check_table(p)
    data = json.loads(out.read_text())
    assert isinstance(data, list) and len(data) == 4  # 2 sizes x (out-of-place, in-place)
    for m in data:
        assert KEYS <= set(m), sorted(KEYS - set(m))
        assert m["op"] == "all_sum" and m["dtype"] == "float32" and m["ranks"] == 3
        assert m["backend"] == "thunderlink"
        assert m["iters"] == 4 and m["wrong"] == 0
        assert m["count"] * 4 == m["size"]
        assert m["time_us"] > 0 and m["p99_us"] >= m["p50_us"] > 0
        # busbw = algbw x 2(n-1)/n for all_sum.
        assert m["busbw"] == pytest.approx(m["algbw"] * 4 / 3, rel=1e-6)
        assert m["algbw"] == pytest.approx(m["size"] / (m["time_us"] * 1e-6) / 1e9, rel=1e-6)
    assert [(m["size"], m["inplace"]) for m in data] == [(16, False), (16, True), (4096, False), (4096, True)]


@pytest.mark.multiproc
def test_json_bus_factor_gather(tmp_path):
    out = tmp_path / "g.json"
    p = bench("-n", "3", "--op", "all_gather", "--sizes", "1200", "--iters", "3", "--warmup", "0",
              "--inplace", "out", "--json", str(out))
    check_table(p, variants=1)
    (m,) = json.loads(out.read_text())
    assert m["inplace"] is False and m["size"] == 1200 and m["count"] == 100
    assert m["busbw"] == pytest.approx(m["algbw"] * 2 / 3, rel=1e-6)


@pytest.mark.multiproc
@pytest.mark.parametrize("dtype,itemsize", [("bfloat16", 2), ("int8", 1)])
def test_dtypes(dtype, itemsize):
    p = bench("--dtype", dtype, "--sizes", "4,1K,64K", "--iters", "3", "--warmup", "1")
    t = check_table(p, sizes=[4, 1024, 65536], dtype=dtype)
    assert [int(r["count"][0]) for r in t.rows] == [4 // itemsize, 1024 // itemsize, 65536 // itemsize]
    assert dtype in t.comments[0]


@pytest.mark.multiproc
def test_inplace_only():
    p = bench("--sizes", "64", "--iters", "2", "--warmup", "0", "--inplace", "in")
    check_table(p, sizes=[64], variants=1)
    assert "out-of-place" not in p.stdout


@pytest.mark.multiproc
def test_inside_a_launched_job():
    """Under `thunderlink launch` the bench runs as one rank of that job."""
    cmd = [sys.executable, "-m", "thunderlink", "launch", "-n", "2", "--timeout", "50", "--",
           sys.executable, "-m", "thunderlink", "bench", "--sizes", "4,8", "--iters", "2", "--warmup", "0"]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=HARD_TIMEOUT,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    rank0 = "\n".join(line[4:] for line in p.stdout.splitlines() if line.startswith("[0] "))
    t = Table(rank0)
    assert [int(r["size"][0]) for r in t.rows] == [4, 8]
    assert t.wrong() == [0, 0, 0, 0]
    assert not [line for line in p.stdout.splitlines() if line.startswith("[1] ")]  # only rank 0 reports


@pytest.mark.multiproc
def test_sendrecv_needs_two_ranks():
    p = bench("-n", "1", "--op", "sendrecv", "--sizes", "4", "--iters", "1")
    assert p.returncode != 0
    assert "sendrecv needs at least 2 ranks" in p.stdout + p.stderr


# ---- bad arguments ---------------------------------------------------------------


@pytest.mark.parametrize("sizes,message", [
    ("64K:4", "need 1 <= MIN <= MAX"),
    ("0:4", "need 1 <= MIN <= MAX"),
    ("1:2:3:4", "expected MIN:MAX"),
    ("4:64K:x1", "factor must be above 1"),
    ("4:64K:+0", "step must be positive"),
])
def test_bad_sizes(sizes, message):
    p = bench("--sizes", sizes, timeout=20)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "--sizes" in p.stderr and message in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("sizes", ["abc", "4:lots", "4:64K:xq", "1M,two"])
def test_bad_sizes_without_traceback(sizes):
    p = bench("--sizes", sizes, timeout=20)
    assert p.returncode != 0
    assert "--sizes" in p.stderr
    assert "Traceback" not in p.stderr, p.stderr


def test_bad_sizes_start_nothing():
    """Sizes are checked before any rank starts (no [rank] output)."""
    p = bench("--sizes", "64K:4", timeout=20)
    assert "[0]" not in p.stdout + p.stderr and "[1]" not in p.stdout + p.stderr


@pytest.mark.parametrize("args, message", [
    (["--iters", "-5"], "argument --iters: -5 is out of range: give 0..1000000"),
    (["--iters", "10000000"], "argument --iters: 10000000 is out of range"),
    (["--iters", "many"], "argument --iters: 'many' is not an integer"),
    (["--warmup", "-1"], "argument --warmup: -1 is out of range: give 0 or more"),
    (["-n", "0"], "argument -n/--ranks: 0 is out of range: give 1 or more"),
    (["--timeout", "-3"], "argument --timeout: -3 is not a positive number of seconds"),
    (["--sizes", "0,4"], "give sizes of at least 1 byte"),
    (["--sizes", "4:64K:xinf"], "factor must be above 1"),
    (["--sizes", "1:1T:+1"], "more than 1000 sizes"),
])
def test_bad_numbers_are_usage_errors(args, message):
    """Checked by the parser before any rank starts: status 2 with the usage,
    never a rank's traceback (--iters -5 used to crash every rank)."""
    p = bench(*args, timeout=20)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr and "usage: thunderlink bench" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "[0]" not in p.stdout + p.stderr, p.stdout + p.stderr


def test_bad_hostfile_is_named_without_traceback(tmp_path):
    path = tmp_path / "hosts.json"
    path.write_bytes(b"\xff\xfe[]")
    p = bench("--hostfile", str(path), timeout=20)
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"hostfile {path} is not UTF-8 text" in p.stderr and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("args", [["--op", "all_to_all"], ["--dtype", "float128"], ["--inplace", "sideways"]])
def test_bad_choices(args):
    p = bench(*args, timeout=20)
    assert p.returncode == 2
    assert "invalid choice" in p.stderr


# ---- parse_sizes --------------------------------------------------------------------


@pytest.mark.parametrize("text,sizes", [
    ("4:64", (4, 8, 16, 32, 64)),
    ("4:100", (4, 8, 16, 32, 64)),
    ("1K:4K", (1024, 2048, 4096)),
    ("4:64:x4", (4, 16, 64)),
    ("1M:4M:+1M", (1 << 20, 2 << 20, 3 << 20, 4 << 20)),
    ("4,1K,1M", (4, 1024, 1 << 20)),
    ("4096", (4096,)),
    ("1:4:x1.5", (1, 2, 3, 4)),
    ("7:7", (7,)),
])
def test_parse_sizes(text, sizes):
    assert parse_sizes(text) == sizes


def test_parse_sizes_default_sweep():
    s = parse_sizes("4:64M")
    assert s[0] == 4 and s[-1] == 64 << 20 and len(s) == 25
    assert all(b == 2 * a for a, b in zip(s, s[1:]))


def test_parse_sizes_errors():
    with pytest.raises(SystemExit, match="--sizes"):
        parse_sizes("64K:4")
    with pytest.raises(SystemExit, match="--sizes"):
        parse_sizes("abc")


# ---- the data the check compares against --------------------------------------------


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_expected_sum_matches_data(dtype, n):
    """expected_sum is the sum over ranks of make_data, in the bench dtype
    (exact for these small integers; integers wrap)."""
    count = 40
    storage = DTYPES[dtype][0]
    want = expected_sum(count, dtype, n)
    assert want.dtype == storage and want.shape == (count,)
    if dtype == "bfloat16":
        total = sum((make_data(count, dtype, r).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
                    for r in range(n))
        got = (want.astype(np.uint32) << 16).view(np.float32)
        assert np.array_equal(got, total)
    elif np.issubdtype(storage, np.integer):
        total = sum(make_data(count, dtype, r).astype(np.int64) for r in range(n))
        assert np.array_equal(want, total.astype(storage))
    else:
        total = sum(make_data(count, dtype, r).astype(np.float64) for r in range(n))
        assert np.array_equal(want.astype(np.float64), total)


def exact_totals(n: int) -> np.ndarray:
    return (np.arange(13) % 7) * n + sum(r % 8 for r in range(n))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_float_sums_exact_up_to_16_ranks(dtype):
    for n in range(1, 17):
        assert np.array_equal(expected_sum(13, dtype, n).astype(np.float64), exact_totals(n)), n


def test_bfloat16_sums_exact_up_to_16_ranks():
    for n in range(1, 17):
        got = (expected_sum(13, "bfloat16", n).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        assert np.array_equal(got, exact_totals(n)), n


def test_bus_factors():
    for n in (2, 3, 8):
        assert OPS["all_sum"].bus_factor(n) == pytest.approx(2 * (n - 1) / n)
        assert OPS["all_gather"].bus_factor(n) == pytest.approx((n - 1) / n)
        assert OPS["sum_scatter"].bus_factor(n) == pytest.approx((n - 1) / n)
        assert OPS["broadcast"].bus_factor(n) == 1.0
        assert OPS["sendrecv"].bus_factor(n) == 1.0


def test_wrong_counts_differing_elements():
    op = OPS["all_sum"]
    a = np.array([1, 2, 3, np.nan], np.float32)
    b = a.copy()
    assert op.wrong(a, b) == 0  # NaN-safe: same bits
    b[1] = 5
    b[3] = 0
    assert op.wrong(a, b) == 2


def test_side_by_side_with_mlx_ring_and_through_mlx(tmp_path):
    """--vs mlx-ring runs MLX's ring in the same processes and prints the
    ratio; --via mlx adds thunderlink's Group through mx.distributed."""
    pytest.importorskip("mlx.core")
    out = tmp_path / "vs.json"
    p = bench("--sizes", "4,64K", "--iters", "3", "--warmup", "1", "--vs", "mlx-ring", "--via", "mlx",
              "--json", str(out), timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "x ring" in p.stdout and "mlx-ring" in p.stdout and "thunderlink/mlx" in p.stdout
    data = json.loads(out.read_text())
    assert {m["backend"] for m in data} == {"thunderlink", "thunderlink/mlx", "mlx-ring"}
    assert all(m["wrong"] == 0 for m in data)
    rows = [line.split() for line in p.stdout.splitlines() if line.strip() and not line.startswith("#")]
    assert len(rows) == 2 and all(float(r[-1]) > 0 and float(r[-2]) > 0 for r in rows)


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "b.png"
    p = bench("--sizes", "4,1K", "--iters", "3", "--warmup", "1", "--plot", str(png))
    assert p.returncode == 0, p.stderr
    assert png.stat().st_size > 1000


def test_mlx_series_in_place_with_ring(tmp_path):
    """--inplace both with --via mlx --vs mlx-ring: both MLX backends get an
    in-place (donated) series, each compared with the ring's of its kind."""
    pytest.importorskip("mlx.core")
    out = tmp_path / "vs.json"
    p = bench("--sizes", "4,64K", "--iters", "3", "--warmup", "1", "--vs", "mlx-ring", "--via", "mlx",
              "--inplace", "both", "--json", str(out), timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert {(m["backend"], m["inplace"]) for m in data} == {
        (b, v) for b in ("thunderlink", "thunderlink/mlx", "mlx-ring") for v in (False, True)}
    assert all(m["wrong"] == 0 for m in data)
    assert "mlx-group-in" in p.stdout and "malloc (THUNDERLINK_MALLOC_HEAP" in p.stdout


DONATION_PROG = """
import numpy as np, thunderlink
from thunderlink.bench.worker import MLXBackend
from thunderlink.mlx_backend import group_from_comm

def address(a):
    return np.asarray(memoryview(a)).__array_interface__["data"][0]

with thunderlink.connect() as comm:
    b = MLXBackend("thunderlink/mlx", group_from_comm(comm), ring=False)
    x = np.ones(1 << 16, np.float32)
    p = b.prepare("all_sum", x, x, "float32")
    seen = set()
    for _ in range(4):
        seen.add(address(p["x"]))
        b.run(p)
    seen.add(address(p["x"]))
    assert len(seen) == 1, f"MLX allocated new outputs: {len(seen)} buffers"
    assert float(b.result(p)[0]) == 2.0 ** 4 * 1
    print("DONATED", comm.rank)
"""


@pytest.mark.multiproc
def test_mlx_in_place_series_donates(tmp_path):
    """The bench's in-place MLX series runs x = all_sum(x) in one buffer: nothing
    else may hold the input, or MLX allocates (the series would be out of place)."""
    pytest.importorskip("mlx.core")
    prog = tmp_path / "donate.py"
    prog.write_text(DONATION_PROG)
    p = subprocess.run([sys.executable, "-m", "thunderlink", "launch", "-n", "2", "--timeout", "60", str(prog)],
                       env=env(), capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("DONATED") == 2, p.stdout


def test_side_by_side_with_gloo(tmp_path):
    """--vs gloo: torch.distributed's Gloo in the same processes, in place,
    with the ratio column."""
    pytest.importorskip("torch.distributed")
    out = tmp_path / "gloo.json"
    p = bench("--sizes", "4,64K", "--iters", "3", "--warmup", "1", "--vs", "gloo", "--json", str(out),
              timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "x gloo" in p.stdout and "# gloo: torch" in p.stdout
    data = json.loads(out.read_text())
    assert {(m["backend"], m["inplace"]) for m in data} == {("thunderlink", False), ("gloo", True)}
    assert all(m["wrong"] == 0 for m in data)
    rows = [line.split() for line in p.stdout.splitlines() if line.strip() and not line.startswith("#")]
    assert len(rows) == 2 and all(float(r[-1]) > 0 for r in rows)


def test_vs_gloo_refuses_a_hostfile(tmp_path):
    hf = tmp_path / "h.json"
    hf.write_text("[]")
    p = bench("--vs", "gloo", "--hostfile", str(hf))
    assert p.returncode == 2 and "local ranks only" in p.stderr, p.stderr
