"""Throughput of the tl_reduce kernels against memcpy.

    pytest bench/bench_reduce.py            (pytest-benchmark)
    python bench/bench_reduce.py            (plain timing loop, same table)

Each array is 64 MiB. GB/s counts the bytes the operation touches in memory
at the API level (10^9 bytes per second):

    tl_reduce(dst, a, b):  read a + read b + write dst = 3 x 64 MiB
    memcpy (np.copyto):    read src + write dst        = 2 x 64 MiB

(write-allocate traffic is not counted on either side). "vs memcpy" is the
ratio of the two GB/s figures, so 1.0 means the kernel streams memory as
fast as memcpy does; a memory-bound kernel lands near 1.
"""

import sys
import time

import numpy as np
import pytest

from thunderlink.bindings import ffi, lib

ARRAY_BYTES = 64 << 20


def _normal(n, rng):
    return rng.standard_normal(n, np.float32)


# row name: (TL dtype, numpy storage dtype, value maker, in place)
CASES = {
    "float32": ("TL_FLOAT32", np.float32, _normal, False),
    "float32 in place": ("TL_FLOAT32", np.float32, _normal, True),
    "float16": ("TL_FLOAT16", np.float16,
                lambda n, r: _normal(n, r).astype(np.float16), False),
    "bfloat16": ("TL_BFLOAT16", np.uint16,
                 lambda n, r: (_normal(n, r).view(np.uint32) >> 16).astype(np.uint16),
                 False),
    "int32": ("TL_INT32", np.int32,
              lambda n, r: r.integers(-1000, 1000, n, dtype=np.int32), False),
}


def _ptr(arr):
    return ffi.cast("void *", arr.ctypes.data)


def _setup(name):
    code, storage, make, inplace = CASES[name]
    n = ARRAY_BYTES // np.dtype(storage).itemsize
    rng = np.random.default_rng(0)
    a, b = make(n, rng), make(n, rng)
    dst = a if inplace else np.ones(n, storage)  # ones: pages faulted in
    args = (_ptr(dst), _ptr(a), _ptr(b), n, getattr(lib, code), lib.TL_SUM)
    # keep the arrays alive as long as the pointers
    return args, (a, b, dst)


def _table(results):
    """results: {name: seconds per call (median)} with a "memcpy" entry."""
    memcpy = 2 * ARRAY_BYTES / results["memcpy"] / 1e9 if "memcpy" in results else None
    lines = [f"tl_reduce SUM on {ARRAY_BYTES >> 20} MiB arrays "
             f"(GB/s of bytes touched: 3x array for reduce, 2x for memcpy)",
             f"{'case':<18}{'ms':>9}{'GB/s':>9}{'vs memcpy':>11}"]
    for name, sec in results.items():
        gbs = (2 if name == "memcpy" else 3) * ARRAY_BYTES / sec / 1e9
        ratio = f"{gbs / memcpy:.2f}" if memcpy else "-"
        lines.append(f"{name:<18}{sec * 1e3:>9.2f}{gbs:>9.1f}{ratio:>11}")
    return "\n".join(lines)


# ---------------------------------------------------------------- pytest

_RESULTS = {}


class _SummaryPlugin:
    """Prints the GB/s table in pytest's terminal summary (after capture)."""

    def pytest_terminal_summary(self, terminalreporter):
        if not _RESULTS:
            return
        ordered = {k: _RESULTS[k] for k in ["memcpy", *CASES] if k in _RESULTS}
        terminalreporter.write_sep("-", "tl_reduce throughput")
        for line in _table(ordered).splitlines():
            terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    name = "thunderlink-bench-reduce-summary"
    if request.config.pluginmanager.get_plugin(name) is None:
        request.config.pluginmanager.register(_SummaryPlugin(), name)
    yield


def _record(benchmark, name):
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    sec = stats.stats.median
    _RESULTS[name] = sec
    nbytes = (2 if name == "memcpy" else 3) * ARRAY_BYTES
    benchmark.extra_info["GB/s"] = round(nbytes / sec / 1e9, 2)


def test_memcpy(benchmark):
    benchmark.group = "reduce-64MiB"
    src = np.random.default_rng(0).integers(0, 255, ARRAY_BYTES, dtype=np.uint8)
    dst = np.ones(ARRAY_BYTES, np.uint8)
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=10, warmup_rounds=1)
    assert (dst == src).all()
    _record(benchmark, "memcpy")


@pytest.mark.parametrize("name", list(CASES))
def test_reduce(benchmark, name):
    benchmark.group = "reduce-64MiB"
    args, keep = _setup(name)
    rc = benchmark.pedantic(lib.tl_reduce, args=args, rounds=10, warmup_rounds=1)
    assert rc == lib.TL_OK
    _record(benchmark, name)


# ---------------------------------------------------------------- script


def _time(fn, args, rounds=10):
    fn(*args)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    results = {}
    src = np.random.default_rng(0).integers(0, 255, ARRAY_BYTES, dtype=np.uint8)
    dst = np.ones(ARRAY_BYTES, np.uint8)
    results["memcpy"] = _time(np.copyto, (dst, src))
    del src, dst
    for name in CASES:
        args, keep = _setup(name)
        results[name] = _time(lib.tl_reduce, args)
        del keep
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
