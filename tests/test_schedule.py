"""The ring schedule of the C core as pure functions (csrc/coll/schedule.c):
which block each ring position sends and receives at each step, how a block
is cut into chunks, how many chunks, and the order of (step, chunk) units."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thunderlink.bindings import ffi, lib

NS = range(2, 10)


def step(n: int, pos: int, t: int) -> tuple[int, int]:
    s, r = ffi.new("int *"), ffi.new("int *")
    lib.tl_ring_step(n, pos, t, s, r)
    return s[0], r[0]


def chunk(length: int, nchunks: int, j: int) -> tuple[int, int]:
    off, clen = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    lib.tl_chunk_range(length, nchunks, j, off, clen)
    return off[0], clen[0]


def unit(nchunks: int, group: int, steps: int, u: int) -> tuple[int, int]:
    t, j = ffi.new("int *"), ffi.new("int *")
    lib.tl_ring_unit(nchunks, group, steps, u, t, j)
    return t[0], j[0]


def unit_index(nchunks: int, group: int, steps: int, t: int, j: int) -> int:
    return lib.tl_ring_unit_index(nchunks, group, steps, t, j)


# ---- tl_ring_step ------------------------------------------------------------


@pytest.mark.parametrize("n", NS)
def test_step_blocks_are_in_range(n):
    for pos in range(n):
        for t in range(2 * (n - 1)):
            s, r = step(n, pos, t)
            assert 0 <= s < n and 0 <= r < n
            assert s != r, (n, pos, t)


@pytest.mark.parametrize("n", NS)
def test_forward_what_was_received(n):
    """From step 1 on, a position sends the block it received the step before."""
    for pos in range(n):
        for t in range(1, 2 * (n - 1)):
            assert step(n, pos, t)[0] == step(n, pos, t - 1)[1], (n, pos, t)


@pytest.mark.parametrize("n", NS)
def test_send_matches_right_neighbours_receive(n):
    for pos in range(n):
        for t in range(2 * (n - 1)):
            assert step(n, pos, t)[0] == step(n, (pos + 1) % n, t)[1], (n, pos, t)


@pytest.mark.parametrize("n", NS)
def test_reduce_scatter_ends_with_own_block(n):
    for pos in range(n):
        # The block received last in the reduce-scatter is the position's own.
        assert step(n, pos, n - 2)[1] == pos
        # During the reduce-scatter a position receives every block but the
        # one it starts with (which it sends at step 0), each once.
        received = [step(n, pos, t)[1] for t in range(n - 1)]
        assert sorted(received) == sorted(set(range(n)) - {step(n, pos, 0)[0]})
        # It starts by sending a block other than its own.
        assert step(n, pos, 0)[0] != pos


@pytest.mark.parametrize("n", NS)
def test_reduce_scatter_visits_every_position(n):
    """Follow each block through the reduce-scatter: it starts at one
    position, moves one position right per step, and after n-1 steps has been
    through all n positions (each contributing once), ending at its owner."""
    for b in range(n):
        starters = [p for p in range(n) if step(n, p, 0)[0] == b]
        assert len(starters) == 1
        pos, visited = starters[0], [starters[0]]
        for t in range(n - 1):
            assert step(n, pos, t)[0] == b
            pos = (pos + 1) % n
            assert step(n, pos, t)[1] == b
            visited.append(pos)
        assert sorted(visited) == list(range(n))
        assert pos == b


@pytest.mark.parametrize("n", NS)
def test_all_gather_delivers_every_other_block_once(n):
    for pos in range(n):
        gathered = [step(n, pos, t)[1] for t in range(n - 1, 2 * (n - 1))]
        assert sorted(gathered) == sorted(set(range(n)) - {pos}), (n, pos)
        # The all-gather starts by sending the block the position owns.
        assert step(n, pos, n - 1)[0] == pos


@pytest.mark.parametrize("n", NS)
def test_each_step_is_a_permutation(n):
    """At every step every block is sent by exactly one position."""
    for t in range(2 * (n - 1)):
        assert sorted(step(n, p, t)[0] for p in range(n)) == list(range(n))
        assert sorted(step(n, p, t)[1] for p in range(n)) == list(range(n))


# ---- tl_chunk_range -------------------------------------------------------------


def check_tiling(length: int, nchunks: int) -> None:
    end = 0
    sizes = []
    for j in range(nchunks):
        off, clen = chunk(length, nchunks, j)
        assert off == end, (length, nchunks, j)
        end = off + clen
        sizes.append(clen)
    assert end == length
    assert max(sizes) - min(sizes) <= 1
    if nchunks <= length:
        assert min(sizes) >= 1


@pytest.mark.parametrize("length", [0, 1, 2, 3, 7, 64, 1000, 999983])
@pytest.mark.parametrize("nchunks", [1, 2, 3, 4, 7, 16])
def test_chunk_ranges_tile_the_block(length, nchunks):
    check_tiling(length, nchunks)


@settings(max_examples=300, deadline=None)
@given(length=st.integers(0, 1 << 40), nchunks=st.integers(1, 64))
def test_chunk_ranges_tile_any_block(length, nchunks):
    check_tiling(length, nchunks)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(0, 1 << 40), nchunks=st.integers(1, 1 << 20), data=st.data())
def test_chunk_range_sizes_many_chunks(length, nchunks, data):
    """A chunk's size is floor or ceil of len/nchunks, and consecutive
    chunks abut (without walking every chunk)."""
    j = data.draw(st.integers(0, nchunks - 1))
    off, clen = chunk(length, nchunks, j)
    assert clen in (length // nchunks, -(-length // nchunks))
    if j + 1 < nchunks:
        assert chunk(length, nchunks, j + 1)[0] == off + clen
    else:
        assert off + clen == length
    if j == 0:
        assert off == 0


def test_chunk_range_huge_block_does_not_overflow():
    length, nchunks = 1 << 62, 8
    check_tiling(length, nchunks)


# ---- tl_ring_nchunks ------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(
    count=st.integers(0, 1 << 36),
    elem=st.sampled_from([1, 2, 4, 8]),
    chunk_bytes=st.integers(-1, 1 << 30),
    depth=st.integers(0, 64),
)
def test_nchunks_bounds(count, elem, chunk_bytes, depth):
    n = lib.tl_ring_nchunks(count, elem, chunk_bytes, depth)
    assert n >= 1
    if count:
        assert n <= count


@pytest.mark.parametrize("elem", [1, 2, 4, 8])
def test_nchunks_empty_block(elem):
    assert lib.tl_ring_nchunks(0, elem, 1 << 20, 4) == 1
    assert lib.tl_ring_nchunks(0, elem, 0, 0) == 1
    assert lib.tl_ring_nchunks(5, 0, 1 << 20, 4) == 1  # invalid elem size


@settings(max_examples=300, deadline=None)
@given(
    chunk_kib=st.integers(4, 4096),
    depth=st.integers(1, 16),
    mult=st.integers(0, 64),
    extra=st.integers(0, 4095),
    elem=st.sampled_from([1, 2, 4, 8]),
)
def test_nchunks_large_blocks_cut_at_chunk_bytes(chunk_kib, depth, mult, extra, elem):
    """A block of at least depth chunks is cut into ceil(bytes/chunk) chunks."""
    chunk_bytes = chunk_kib << 10
    count = ((depth + mult) * chunk_bytes + extra * elem) // elem
    nbytes = count * elem
    assert nbytes >= depth * chunk_bytes
    assert lib.tl_ring_nchunks(count, elem, chunk_bytes, depth) == math.ceil(nbytes / chunk_bytes)


def test_nchunks_examples():
    MiB = 1 << 20
    # 64 MiB of float32 in 1 MiB chunks: 64 chunks.
    assert lib.tl_ring_nchunks(16 * MiB, 4, MiB, 4) == 64
    # A small block (below 64 KiB) is never cut for pipelining.
    assert lib.tl_ring_nchunks(1000, 4, MiB, 4) == 1
    # A medium block (512 KiB, chunk 1 MiB) is cut into pipeline_depth chunks.
    assert lib.tl_ring_nchunks(128 << 10, 4, MiB, 4) == 4
    # ... but not below 64 KiB a chunk.
    assert lib.tl_ring_nchunks(32 << 10, 4, MiB, 4) == 2
    # chunk_bytes <= 0: one chunk (unless pipelining cuts it).
    assert lib.tl_ring_nchunks(1000, 4, 0, 1) == 1
    # Never more chunks than elements.
    assert lib.tl_ring_nchunks(3, 8, 4, 4) == 3


# ---- tl_ring_unit / tl_ring_unit_index -------------------------------------------


def check_unit_order(nchunks: int, group: int, steps: int) -> None:
    total = steps * nchunks
    seen = {}
    for u in range(total):
        t, j = unit(nchunks, group, steps, u)
        assert 0 <= t < steps and 0 <= j < nchunks, (nchunks, group, steps, u, t, j)
        assert (t, j) not in seen, (nchunks, group, steps, u, t, j)
        seen[(t, j)] = u
        assert unit_index(nchunks, group, steps, t, j) == u
    assert len(seen) == total
    for (t, j), u in seen.items():
        if t >= 1:
            assert seen[(t - 1, j)] < u, (nchunks, group, steps, t, j)


@pytest.mark.parametrize("steps", [1, 2, 3, 6, 16])
@pytest.mark.parametrize("nchunks", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 100])
def test_unit_order_is_a_bijection(nchunks, group, steps):
    check_unit_order(nchunks, group, steps)


@settings(max_examples=200, deadline=None)
@given(nchunks=st.integers(1, 40), group=st.integers(1, 48), steps=st.integers(1, 18))
def test_unit_order_any_shape(nchunks, group, steps):
    check_unit_order(nchunks, group, steps)


@settings(max_examples=200, deadline=None)
@given(nchunks=st.integers(1, 1 << 20), group=st.integers(1, 64), steps=st.integers(1, 64), data=st.data())
def test_unit_index_inverse_large(nchunks, group, steps, data):
    t = data.draw(st.integers(0, steps - 1))
    j = data.draw(st.integers(0, nchunks - 1))
    u = unit_index(nchunks, group, steps, t, j)
    assert 0 <= u < steps * nchunks
    assert unit(nchunks, group, steps, u) == (t, j)


def test_unit_order_groups_columns():
    """Group of 2 columns, 3 steps, 5 chunks: columns {0,1} for every step,
    then {2,3}, then the leftover column {4}."""
    order = [unit(5, 2, 3, u) for u in range(15)]
    assert order == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1),
        (0, 2), (0, 3), (1, 2), (1, 3), (2, 2), (2, 3),
        (0, 4), (1, 4), (2, 4),
    ]
