"""The mesh algorithm (coll/mesh.c): all_reduce, all_gather and
reduce_scatter by direct exchange with every peer at once, forced with
THUNDERLINK_ALGO=mesh over loopback TCP and shared memory (every pair of
local ranks is linked), and chosen by itself on an emulated full mesh of
cables (tests/test_multihost.py's clusters). Every dtype, odd sizes, in
place and not, several chunks in flight; results equal numpy's and
bit-identical on every rank."""

import pytest

from conftest import check_gathers

from rankprogs import DTYPES
from test_collectives import OPS, PRIME, check, sizes

pytestmark = pytest.mark.multiproc
TEST_TIMEOUT_S = 240

# Small chunks and a deep pipeline, so that a few hundred KiB is many chunks
# and every slot is reused.
CHUNKED = {"THUNDERLINK_CHUNK_BYTES": "4096", "THUNDERLINK_PIPELINE_DEPTH": "3"}


# Each transport at some group sizes (CI time): 2 ranks (one peer), 3 and 4.
@pytest.mark.parametrize("transport, n", [("tcp", 2), ("shm", 3), ("tcp", 4), ("shm", 4)])
def test_all_reduce_every_dtype(ranks, transport, n):
    cases = [["sum", d, c, ip] for d in DTYPES for c in sizes(n) + [PRIME] for ip in (False, True)]
    cases += [[op, d, 3001, ip] for op in OPS for d in ("float32", "int32", "bfloat16", "uint8", "bool")
              for ip in (False, True)]
    env = {"THUNDERLINK_ALGO": "mesh", "THUNDERLINK_TRANSPORT": transport, **CHUNKED}
    check(ranks(n, "reductions", cases, env=env, timeout=150), n)


@pytest.mark.parametrize("transport, n", [("shm", 3), ("tcp", 4)])
def test_gathers(ranks, transport, n):
    cases = []
    for kind in ("all_gather", "reduce_scatter"):
        for d in ("float32", "int8", "bfloat16", "complex64"):
            for c in sizes(n) + [PRIME]:
                cases += [[kind, d, c, ip] for ip in ((False, True) if kind == "all_gather" else (False,))]
    env = {"THUNDERLINK_ALGO": "mesh", "THUNDERLINK_TRANSPORT": transport, **CHUNKED}
    r = ranks(n, "gathers", cases, env=env, timeout=150)
    check_gathers(r, n)


def test_large_default_chunks(ranks):
    """16 MiB with the default chunk size and depth, over TCP."""
    big = (16 << 20) // 4
    cases = [["sum", "float32", big, ip] for ip in (False, True)] + [["sum", "float16", big + 7, True]]
    check(ranks(4, "reductions", cases, env={"THUNDERLINK_ALGO": "mesh", "THUNDERLINK_TRANSPORT": "tcp"},
                timeout=150), 4)


def test_chosen_on_a_cabled_mesh_and_correct(tmp_path):
    """Four emulated hosts with a cable between every pair: auto picks the
    mesh above the one-round sizes (and the ring on a ring of cables), and
    every collective is right."""
    import json
    import secrets
    import sys

    from conftest import RANKPROGS, Ranks
    from thunderlink.launch.ssh import launch_hostfile
    from thunderlink.testing import cluster as cl
    from test_tune import TUNEPROGS

    ok, why = cl.available(shaping=False)
    if not ok:
        pytest.skip(why)

    def run(c, argv):
        path = tmp_path / f"hosts-{secrets.token_hex(3)}.json"
        path.write_text(json.dumps(c.hostfile()))
        env = {"THUNDERLINK_CONNECT_TIMEOUT": "20", "THUNDERLINK_TIMEOUT": "60", "THUNDERLINK_TUNING_FILE": ""}
        import os
        res = launch_hostfile(str(path), ["--", sys.executable, *argv], env={**os.environ, **env}, timeout=120,
                              capture=True, on_line=lambda *a: None)
        return Ranks(res)

    cases = [["all_sum", 4 << 20], ["all_gather", 4 << 20], ["sum_scatter", 4 << 20], ["all_sum", 1024]]
    for topology, want in (("mesh", "mesh"), ("ring", "ring")):
        with cl.Cluster(4, topology=topology, name=f"tm{secrets.token_hex(2)}") as c:
            r = run(c, [TUNEPROGS, "plans", json.dumps([cases])])
            assert r.status == 0, r.all_text()
            for v in r.results():
                assert v["ok"]
                assert [p["algo"] for p in v["plans"]] == [want] * 3 + ["oneshot" if want == "mesh" else "ring"]
            if topology == "mesh":
                red = [["sum", d, k, ip] for d in ("float32", "bfloat16", "int64") for k in (5, 999983)
                       for ip in (False, True)]
                check(run(c, [RANKPROGS, "reductions", json.dumps([red])]), 4)


def test_selector_picks_the_mesh():
    """tl_select: auto takes the mesh above the one-round sizes where every
    pair has its own cable and there are 3 or more ranks; mesh forces it
    wherever every pair is linked; never without a link between every pair."""
    from thunderlink.bindings import ffi, lib

    def how(algo, nbytes, n, mesh, op=lib.TL_OP_ALL_REDUCE):
        o = ffi.new("tl_options_t *")
        lib.tl_options_default(o)
        o.algo = algo
        p = ffi.new("tl_plan_t *")
        assert lib.tl_select(o, op, nbytes, lib.TL_FLOAT32, n, mesh, lib.TL_TRANSPORT_TCP, p) == 0
        return p.how

    big, small = 64 << 20, 1024
    cabled = lib.TL_MESH_CABLED
    for op in (lib.TL_OP_ALL_REDUCE, lib.TL_OP_ALL_GATHER, lib.TL_OP_REDUCE_SCATTER):
        assert how(lib.TL_ALGO_AUTO, big, 4, cabled, op) == lib.TL_HOW_MESH
    assert how(lib.TL_ALGO_AUTO, small, 4, cabled) == lib.TL_HOW_ONE_ROUND
    assert how(lib.TL_ALGO_AUTO, big, 4, 1) == lib.TL_HOW_RING  # loopback, a switch: one shared path
    assert how(lib.TL_ALGO_AUTO, big, 2, cabled) == lib.TL_HOW_RING
    assert how(lib.TL_ALGO_AUTO, big, 4, 0) == lib.TL_HOW_RING
    assert how(lib.TL_ALGO_MESH, small, 4, 1) == lib.TL_HOW_MESH
    assert how(lib.TL_ALGO_MESH, big, 2, 1) == lib.TL_HOW_MESH
    assert how(lib.TL_ALGO_MESH, big, 4, 0) == lib.TL_HOW_RING
    assert how(lib.TL_ALGO_RING, big, 4, cabled) == lib.TL_HOW_RING
    assert how(lib.TL_ALGO_MESH, big, 4, 1, lib.TL_OP_BROADCAST) == lib.TL_HOW_CHAIN
