"""Interconnect tuning: ``thunderlink probe`` measures the cables,
``thunderlink tune`` sweeps the knobs and writes a profile
(:mod:`thunderlink.tune.profile`) that every communicator applies at init."""

from __future__ import annotations

from ..bindings import ffi, lib
from ..errors import check

__all__ = ["plan", "HOW_NAMES"]

HOW_NAMES = {lib.TL_HOW_LOCAL: "local", lib.TL_HOW_ONE_ROUND: "oneshot", lib.TL_HOW_RING: "ring",
             lib.TL_HOW_CHAIN: "chain", lib.TL_HOW_FRAMES: "frames", lib.TL_HOW_MESH: "mesh"}
_OPS = {"all_sum": lib.TL_OP_ALL_REDUCE, "all_gather": lib.TL_OP_ALL_GATHER,
        "sum_scatter": lib.TL_OP_REDUCE_SCATTER, "broadcast": lib.TL_OP_BROADCAST}


def plan(comm, op: str, nbytes: int, dtype: str = "float32") -> dict:
    """What a connected Comm runs for ``op`` of ``nbytes`` (as the selector
    counts them: the buffer for all_sum, this rank's input for all_gather, the
    whole input for sum_scatter) with its options and profile: algorithm,
    lanes, depth, chunk size (tl_comm_plan)."""
    from ..bindings.comm import dtype_code

    out = ffi.new("tl_plan_t *")
    h = comm.handle
    check(lib.tl_comm_plan(h, _OPS[op], nbytes, dtype_code(dtype), out), h)
    return {"algo": HOW_NAMES.get(out.how, str(out.how)), "lanes": out.lanes, "depth": out.depth,
            "chunk_bytes": out.chunk_bytes}
