"""The algorithm choice (csrc/coll/select.c, tl_select): one pure function
of the operation, its size, the group and the options. The model below is
the choice as it was spread over api.c, p2p.c, msg.c and ring.c before it
moved there; the core must still choose the same."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thunderlink.bindings import ffi, lib

K = 1 << 10
MAX_FRAME = 1 << 30
SPIN_MAX_BYTES = 256 * K
OPS = {"all_reduce": lib.TL_OP_ALL_REDUCE, "all_gather": lib.TL_OP_ALL_GATHER,
       "reduce_scatter": lib.TL_OP_REDUCE_SCATTER, "broadcast": lib.TL_OP_BROADCAST,
       "send": lib.TL_OP_SEND, "barrier": lib.TL_OP_BARRIER, "split": lib.TL_OP_SPLIT}


def select(op, nbytes, n, mesh=True, dtype=lib.TL_FLOAT32, transport=lib.TL_TRANSPORT_TCP, **opts):
    o = ffi.new("tl_options_t *")
    lib.tl_options_default(o)
    for k, v in opts.items():
        setattr(o, k, v)
    p = ffi.new("tl_plan_t *")
    assert lib.tl_select(o, OPS[op], nbytes, dtype, n, int(mesh), transport, p) == lib.TL_OK
    return p


def model(op, nbytes, es, n, mesh, algo, threshold, conns, spin_us):
    """How the collectives chose before select.c (api.c use_ring, p2p.c
    broadcast, comm.c split, msg.c spin, ring.c lanes)."""
    def use_ring(traffic, elements):
        if algo == lib.TL_ALGO_RING or not mesh:
            return True
        if algo == lib.TL_ALGO_ONESHOT:
            return False
        return traffic > threshold and elements >= n

    ring, one = lib.TL_HOW_RING, lib.TL_HOW_ONE_ROUND
    if op == "send":
        how = lib.TL_HOW_FRAMES
    elif n == 1:
        how = lib.TL_HOW_LOCAL
    elif op == "all_reduce":
        how = ring if use_ring(nbytes * (n - 1), nbytes // es) else one
    elif op == "all_gather":
        how = ring if use_ring(nbytes * n, nbytes // es * n) else one
    elif op == "reduce_scatter":
        how = ring if use_ring(nbytes, nbytes // es) else one
    elif op == "broadcast":
        flat = mesh and nbytes <= MAX_FRAME and (nbytes <= threshold or n == 2)
        how = one if flat else lib.TL_HOW_CHAIN
    else:  # barrier, split: tl__gather_bytes
        how = one if mesh else ring
    lanes = 2 if conns >= 2 else 1
    spin = spin_us * 1000 if nbytes <= SPIN_MAX_BYTES else 0
    return how, lanes, spin


@settings(max_examples=600, deadline=None)
@given(op=st.sampled_from(sorted(OPS)), nbytes=st.one_of(st.integers(0, 1 << 32), st.sampled_from(
           [0, 4, 256 * K, 256 * K + 4, 512 * K, 512 * K + 4, MAX_FRAME, MAX_FRAME + 4])),
       n=st.integers(1, 9), mesh=st.booleans(),
       algo=st.sampled_from([lib.TL_ALGO_AUTO, lib.TL_ALGO_RING, lib.TL_ALGO_ONESHOT]),
       threshold=st.sampled_from([0, 4, 64 * K, 512 * K, 1 << 40]), conns=st.integers(1, 4),
       spin_us=st.sampled_from([0, 50, 1000]))
def test_same_choice_as_before(op, nbytes, n, mesh, algo, threshold, conns, spin_us):
    nbytes -= nbytes % 4  # whole float32 elements
    p = select(op, nbytes, n, mesh, algo=algo, algo_threshold=threshold, conns_per_peer=conns,
               spin_us=spin_us)
    assert (p.how, p.lanes, p.spin_ns) == model(op, nbytes, 4, n, mesh, algo, threshold, conns, spin_us)
    assert (p.depth, p.chunk_bytes) == (2, 512 * K)


def test_all_reduce_by_size():
    # Two ranks: one round while the buffer (its traffic) is at most 512 KiB.
    assert select("all_reduce", 512 * K, 2).how == lib.TL_HOW_ONE_ROUND
    assert select("all_reduce", 512 * K + 4, 2).how == lib.TL_HOW_RING
    # Four ranks send the buffer three times.
    assert select("all_reduce", 170 * K, 4).how == lib.TL_HOW_ONE_ROUND
    assert select("all_reduce", 171 * K, 4).how == lib.TL_HOW_RING
    # Without a link between every pair: the ring, whatever the size or algo.
    assert select("all_reduce", 4, 4, mesh=False, algo=lib.TL_ALGO_ONESHOT).how == lib.TL_HOW_RING
    assert select("all_reduce", 1 << 30, 4, algo=lib.TL_ALGO_ONESHOT).how == lib.TL_HOW_ONE_ROUND
    assert select("all_reduce", 4, 4, algo=lib.TL_ALGO_RING).how == lib.TL_HOW_RING
    # One rank copies.
    assert select("all_reduce", 1 << 30, 1).how == lib.TL_HOW_LOCAL


def test_broadcast_flat_or_chain():
    assert select("broadcast", 512 * K, 4).how == lib.TL_HOW_ONE_ROUND
    assert select("broadcast", 512 * K + 1, 4).how == lib.TL_HOW_CHAIN
    assert select("broadcast", 64 * K * K, 2).how == lib.TL_HOW_ONE_ROUND  # two ranks: direct is the chain
    assert select("broadcast", MAX_FRAME + 1, 2).how == lib.TL_HOW_CHAIN
    assert select("broadcast", 4, 3, mesh=False).how == lib.TL_HOW_CHAIN


def test_lanes_chunks_and_spin():
    p = select("all_reduce", 64 << 20, 4, conns_per_peer=1, chunk_bytes=64 * K, pipeline_depth=8, spin_us=7)
    assert (p.how, p.lanes, p.chunk_bytes, p.depth, p.spin_ns) == (lib.TL_HOW_RING, 1, 64 * K, 8, 0)
    p = select("send", 256 * K, 2, conns_per_peer=2, spin_us=7)
    assert (p.how, p.lanes, p.spin_ns) == (lib.TL_HOW_FRAMES, 2, 7000)


@pytest.mark.parametrize("op,dtype,n", [(0, lib.TL_FLOAT32, 2), (lib.TL_NUM_OPS, lib.TL_FLOAT32, 2),
                                        (lib.TL_OP_ALL_REDUCE, 99, 2), (lib.TL_OP_ALL_REDUCE, lib.TL_FLOAT32, 0)])
def test_invalid_arguments(op, dtype, n):
    o = ffi.new("tl_options_t *")
    lib.tl_options_default(o)
    p = ffi.new("tl_plan_t *")
    assert lib.tl_select(o, op, 64, dtype, n, 1, 0, p) == lib.TL_ERR_INVALID
    assert lib.tl_select(ffi.NULL, lib.TL_OP_ALL_REDUCE, 64, lib.TL_FLOAT32, 2, 1, 0, p) == lib.TL_ERR_INVALID
