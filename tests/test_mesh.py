"""The mesh algorithm (coll/mesh.c): all_reduce, all_gather and
reduce_scatter by direct exchange with every peer at once, forced with
THUNDERLINK_ALGO=mesh over loopback TCP and shared memory (every pair of
local ranks is linked), and chosen by itself on an emulated full mesh of
cables (tests/test_multihost.py's clusters). Every dtype, odd sizes, in
place and not, several chunks in flight; results equal numpy's and
bit-identical on every rank."""

import pytest

from rankprogs import DTYPES
from test_collectives import OPS, PRIME, check, sizes

pytestmark = pytest.mark.multiproc
TEST_TIMEOUT_S = 240

# Small chunks and a deep pipeline, so that a few hundred KiB is many chunks
# and every slot is reused.
CHUNKED = {"THUNDERLINK_CHUNK_BYTES": "4096", "THUNDERLINK_PIPELINE_DEPTH": "3"}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_all_reduce_every_dtype(ranks, transport, n):
    cases = [["sum", d, c, ip] for d in DTYPES for c in sizes(n) + [PRIME] for ip in (False, True)]
    cases += [[op, d, 3001, ip] for op in OPS for d in ("float32", "int32", "bfloat16", "uint8", "bool")
              for ip in (False, True)]
    env = {"THUNDERLINK_ALGO": "mesh", "THUNDERLINK_TRANSPORT": transport, **CHUNKED}
    check(ranks(n, "reductions", cases, env=env, timeout=150), n)


@pytest.mark.parametrize("n", [3, 4])
def test_gathers(ranks, transport, n):
    cases = []
    for kind in ("all_gather", "reduce_scatter"):
        for d in ("float32", "int8", "bfloat16", "complex64"):
            for c in sizes(n) + [PRIME]:
                cases += [[kind, d, c, ip] for ip in ((False, True) if kind == "all_gather" else (False,))]
    env = {"THUNDERLINK_ALGO": "mesh", "THUNDERLINK_TRANSPORT": transport, **CHUNKED}
    r = ranks(n, "gathers", cases, env=env, timeout=150)
    assert r.status == 0, r.all_text()
    for rank in range(n):
        bad = {k: c["err"] for k, c in r.values[rank].items() if c["err"]}
        assert not bad, f"rank {rank}: {bad}"
    hashes = [{k: c["hash"] for k, c in v.items() if not k.startswith("reduce")} for v in r.values]
    assert all(h == hashes[0] for h in hashes)


def test_large_default_chunks(ranks):
    """16 MiB with the default chunk size and depth, over TCP."""
    big = (16 << 20) // 4
    cases = [["sum", "float32", big, ip] for ip in (False, True)] + [["sum", "float16", big + 7, True]]
    check(ranks(4, "reductions", cases, env={"THUNDERLINK_ALGO": "mesh", "THUNDERLINK_TRANSPORT": "tcp"},
                timeout=150), 4)
