"""What the benchmark measures: one class per operation.

Each op knows how many elements a message of S bytes holds, how to make its
buffers, how to run once, what every rank should hold afterwards (for
#wrong), and its bus-bandwidth factor (nccl-tests' conventions: all_sum
2(n-1)/n; all_gather and sum_scatter (n-1)/n; broadcast and send/recv 1).
``size`` is the per-rank input for all_sum and broadcast, the output for
all_gather and the input for sum_scatter, as in nccl-tests.
"""

from __future__ import annotations

import numpy as np

__all__ = ["OPS", "DTYPES", "make_data", "expected_sum"]

# name -> (numpy storage dtype, core dtype name)
DTYPES = {
    "float32": (np.float32, "float32"),
    "float16": (np.float16, "float16"),
    "bfloat16": (np.uint16, "bfloat16"),
    "float64": (np.float64, "float64"),
    "int32": (np.int32, "int32"),
    "int64": (np.int64, "int64"),
    "int8": (np.int8, "int8"),
    "uint8": (np.uint8, "uint8"),
}


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bits of small integers (exact)."""
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def make_data(count: int, dtype: str, rank: int) -> np.ndarray:
    """Rank-dependent values whose sums over up to 16 ranks are exact in every
    benchmark dtype (at most 6*16 + 56 = 152 < 256, exact in bfloat16):
    (i % 7) + (rank % 8)."""
    base = (np.arange(count, dtype=np.int64) % 7) + rank % 8
    storage, _ = DTYPES[dtype]
    if dtype == "bfloat16":
        return _bf16_bits(base)
    return base.astype(storage)


def expected_sum(count: int, dtype: str, nranks: int) -> np.ndarray:
    total = (np.arange(count, dtype=np.int64) % 7) * nranks + sum(r % 8 for r in range(nranks))
    storage, _ = DTYPES[dtype]
    if dtype == "bfloat16":
        return _bf16_bits(total)
    return total.astype(storage)  # integer dtypes wrap, as the core does


class Op:
    name = ""
    bus_factor_kind = "1"

    def bus_factor(self, n: int) -> float:
        return {"allreduce": 2 * (n - 1) / n, "gather": (n - 1) / n, "1": 1.0}[self.bus_factor_kind]

    def count(self, size: int, itemsize: int, n: int) -> int:
        return size // itemsize

    def wrong(self, got: np.ndarray, want: np.ndarray) -> int:
        """Elements whose bytes differ (NaN-safe, exact)."""
        g = np.ascontiguousarray(got).view(np.uint8).reshape(-1, got.itemsize)
        w = np.ascontiguousarray(want).view(np.uint8).reshape(-1, want.itemsize)
        return int(np.count_nonzero(np.any(g != w, axis=1)))


class AllSum(Op):
    name = "all_sum"
    bus_factor_kind = "allreduce"

    def buffers(self, count, dtype, rank, n, inplace):
        x = make_data(count, dtype, rank)
        return x, (x if inplace else np.empty_like(x))

    def expected(self, count, dtype, rank, n):
        return expected_sum(count, dtype, n)


class AllGather(Op):
    name = "all_gather"
    bus_factor_kind = "gather"

    def count(self, size, itemsize, n):
        return size // itemsize // n  # per rank

    def buffers(self, count, dtype, rank, n, inplace):
        out = np.empty(count * n, dtype=DTYPES[dtype][0])
        if inplace:
            x = out[rank * count:(rank + 1) * count]
            x[:] = make_data(count, dtype, rank)
            return x, out
        return make_data(count, dtype, rank), out

    def expected(self, count, dtype, rank, n):
        return np.concatenate([make_data(count, dtype, r) for r in range(n)])


class SumScatter(Op):
    name = "sum_scatter"
    bus_factor_kind = "gather"

    def count(self, size, itemsize, n):
        return size // itemsize // n  # per rank output

    def buffers(self, count, dtype, rank, n, inplace):
        x = make_data(count * n, dtype, rank)
        return x, np.empty(count, dtype=x.dtype)

    def expected(self, count, dtype, rank, n):
        return expected_sum(count * n, dtype, n)[rank * count:(rank + 1) * count]


class Broadcast(Op):
    name = "broadcast"

    def buffers(self, count, dtype, rank, n, inplace):
        x = make_data(count, dtype, rank)
        return x, x

    def expected(self, count, dtype, rank, n):
        return make_data(count, dtype, 0)


class SendRecv(Op):
    """Ping-pong between rank 0 and the last rank (not neighbours when n > 2):
    time is half a round trip."""

    name = "sendrecv"

    def buffers(self, count, dtype, rank, n, inplace):
        x = make_data(count, dtype, rank)
        return x, np.empty_like(x)

    def expected(self, count, dtype, rank, n):
        if rank == 0:
            return make_data(count, dtype, n - 1)
        if rank == n - 1:
            return make_data(count, dtype, 0)
        return None


OPS = {op.name: op for op in (AllSum(), AllGather(), SumScatter(), Broadcast(), SendRecv())}
