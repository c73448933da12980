"""Collectives over loopback with N = 2, 3, 4 ranks, over TCP, shared memory
and RDMA (softverbs, plainly and with jitter): every dtype and op, the
awkward sizes, in place and out of place, both algorithms; results equal to
the numpy reference (exact for integers) and bit-identical on every rank."""

import os

import pytest

from conftest import check_gathers, with_jitter
from rankprogs import DTYPES

pytestmark = pytest.mark.multiproc

OPS = ["sum", "prod", "max", "min"]
PRIME = 999983  # a prime near 10^6


def sizes(n):
    return [0, 1, n - 1, n, n + 1]


def check(r, n):
    assert r.status == 0, r.all_text()
    first = r.values[0]
    for rank in range(n):
        v = r.values[rank]
        assert v is not None, r.all_text()
        bad = {k: c["err"] for k, c in v.items() if c["err"]}
        assert not bad, f"rank {rank}: {bad}"
        # Every rank holds the same bits.
        assert {k: c["hash"] for k, c in v.items()} == {k: c["hash"] for k, c in first.items()}


@with_jitter
@pytest.mark.parametrize("algo", ["auto", "ring"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_all_sum_every_dtype(ranks, transport, n, algo):
    cases = [["sum", d, c, ip] for d in DTYPES for c in sizes(n) + [PRIME] for ip in (False, True)]
    env = {"THUNDERLINK_ALGO": algo, "THUNDERLINK_TRANSPORT": transport}
    check(ranks(n, "reductions", cases, env=env, timeout=120), n)


@with_jitter
@pytest.mark.parametrize("algo", ["auto", "ring", "oneshot"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_op(ranks, transport, n, algo):
    cases = [[op, d, c, ip] for op in OPS for d in ("float32", "int32", "float16", "bfloat16", "complex64", "uint8", "bool")
             for c in sizes(n) + [1000] for ip in (False, True)]
    env = {"THUNDERLINK_ALGO": algo, "THUNDERLINK_TRANSPORT": transport}
    check(ranks(n, "reductions", cases, env=env, timeout=120), n)


@with_jitter
@pytest.mark.parametrize("n", [2, 3, 4])
def test_large(ranks, transport, n):
    big = (16 << 20) // 4  # 16 MiB of float32
    cases = [["sum", "float32", big, ip] for ip in (False, True)]
    cases += [["max", "bfloat16", PRIME, False], ["sum", "int64", PRIME, True], ["sum", "float16", big, True]]
    check(ranks(n, "reductions", cases, env={"THUNDERLINK_TRANSPORT": transport}, timeout=180), n)


@with_jitter
@pytest.mark.parametrize("algo", ["auto", "ring"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_gather_scatter_broadcast(ranks, transport, n, algo):
    cases = []
    for kind in ("all_gather", "reduce_scatter", "broadcast"):
        for d in ("float32", "int8", "bfloat16", "complex64"):
            for c in sizes(n) + [PRIME, (4 << 20) // 4]:
                cases += [[kind, d, c, ip] for ip in ((False, True) if kind == "all_gather" else (False,))]
    r = ranks(n, "gathers", cases, env={"THUNDERLINK_ALGO": algo, "THUNDERLINK_TRANSPORT": transport}, timeout=180)
    check_gathers(r, n)


@with_jitter
@pytest.mark.parametrize("n", [2, 3, 4])
def test_send_recv_between_any_ranks(ranks, transport, n):
    r = ranks(n, "p2p", [0, 1, 1000, (3 << 20) + 5], env={"THUNDERLINK_TRANSPORT": transport}, timeout=120)
    assert r.status == 0, r.all_text()
    assert all(v["errors"] == [] for v in r.values)
    assert all(v["stats"]["send"] == 4 * 2 * (n - 1) for v in r.values)


@with_jitter
@pytest.mark.parametrize("n", [3, 4])
def test_split(ranks, transport, n):
    r = ranks(n, "split", None, env={"THUNDERLINK_TRANSPORT": transport})
    assert r.status == 0, r.all_text()
    for v in r.values:
        assert v["sum"] == v["want"]
        assert v["sub_rank"] == v["want_rank"]


def test_stats_see_the_callers_buffer(ranks):
    r = ranks(2, "stats_probe", None)
    assert r.status == 0, r.all_text()
    for v in r.values:
        assert v["last_in"] == v["ptr"] == v["last_out"]


def test_ipv6_loopback(tmp_path):
    """IPv6 addresses work like IPv4 ones (here [::1], over TCP)."""
    import json
    import socket
    import sys

    from conftest import RANKPROGS, Ranks
    from thunderlink.launch import Job, free_ports

    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    try:
        ports = free_ports(3, "::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"ranks": [{"addresses": [f"[::1]:{p}"]} for p in ports]}))
    cases = [["sum", "float32", k, False] for k in (1, 1000, PRIME)]
    envs = [dict(os.environ, THUNDERLINK_HOSTFILE=str(path), THUNDERLINK_RANK=str(r), THUNDERLINK_TIMEOUT="30",
                 THUNDERLINK_CONNECT_TIMEOUT="20", THUNDERLINK_TRANSPORT="tcp") for r in range(3)]
    cmd = [sys.executable, RANKPROGS, "reductions", json.dumps([cases])]
    check(Ranks(Job([cmd] * 3, envs, capture=True, timeout=60, on_line=lambda *a: None).run()), 3)
