"""The topology of a hostfile is the C core's (csrc/core/topo.c, through
thunderlink.bindings.Topology): which ranks share a link, who listens, over
which cables, and the ring order. Here: the Python side asks the core and
agrees with the rules it used to apply itself; the ring search is bounded
(it was an exponential search in Python) and says why when there is no ring;
rings cabled in any order are found."""

from __future__ import annotations

import itertools
import time

import pytest

from thunderlink.errors import ConfigError
from thunderlink.hosts.hostfile import Address, Link, link_plan, linked, mlx_ring_hostfile, parse


def cabled(n: int, cables, port: int = 5000) -> dict:
    """Thunderlink hostfile: each cable (a, b) gives a and b an address on
    its own subnet facing the other end. Several cables may join one pair."""
    ranks = [[] for _ in range(n)]
    for i, (a, b) in enumerate(cables):
        net = f"10.{i // 250}.{i % 250}"
        ranks[a].append({"ip": f"{net}.1", "port": port, "peer": b, "prefix": 30})
        ranks[b].append({"ip": f"{net}.2", "port": port, "peer": a, "prefix": 30})
    return {"ranks": [{"addresses": a} for a in ranks]}


def shared(n: int) -> dict:
    """Every rank has one address that every rank may dial."""
    return {"ranks": [{"addresses": [f"10.9.0.{r + 1}:5000"]} for r in range(n)]}


def ring_pairs(ring):
    return [(ring[i], ring[(i + 1) % len(ring)]) for i in range(len(ring))]


# ---- the rules the Python side applied before it asked the core ------------------------


def old_link_plan(hf, a, b):
    """The link plan as hostfile.py computed it in Python: the lower rank
    listens if it has an address the higher may dial (facing it, else for
    any rank), else the higher does."""
    def usable(owner, frm):
        addrs = hf.ranks[owner].addresses
        return [x for x in addrs if x.peer == frm] or [x for x in addrs if x.peer is None]

    lo, hi = min(a, b), max(a, b)
    for owner, frm in ((lo, hi), (hi, lo)):
        if usable(owner, frm):
            return owner, usable(owner, frm)
    return None, []


AGREE = {
    "mlx-ring-2": [["10.0.0.1:5000"], ["10.0.0.2:5000"]],
    "mlx-ring-4": [[f"10.0.{r}.2:5000", f"10.1.{r}.2:5000"] for r in range(4)],
    "mlx-ring-loopback": [["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]],
    "mlx-ring-mixed": [["127.0.0.1:1", "10.0.0.1:1"], ["127.0.0.1:2", "10.0.0.2:1"], ["10.0.0.3:1"]],
    "cabled-ring-5": cabled(5, [(0, 3), (3, 1), (1, 4), (4, 2), (2, 0)]),
    "two-cables": cabled(3, [(0, 1), (0, 1), (1, 2), (2, 0), (2, 0), (2, 0)]),
    "one-end-only": {"ranks": [
        {"addresses": [{"ip": "10.0.0.1", "port": 1, "peer": 1}]},
        {"addresses": [{"ip": "10.0.1.1", "port": 1, "peer": 2}]},
        {"addresses": [{"ip": "10.0.2.1", "port": 1, "peer": 0}, "10.0.2.9:1"]},
    ]},
    "cables-and-shared": {"ranks": [
        {"addresses": ["192.168.0.10:1", {"ip": "10.0.0.1", "port": 1, "peer": 2}]},
        {"addresses": ["192.168.0.11:1"]},
        {"addresses": [{"ip": "10.0.0.2", "port": 1, "peer": 0}, "192.168.0.12:1"]},
        {"addresses": [{"ip": "10.0.3.1", "port": 1, "peer": 1}]},
    ]},
    "shared-mesh": shared(4),
}


@pytest.mark.parametrize("name", AGREE)
def test_link_plan_agrees_with_the_old_rules(name):
    hf = parse(AGREE[name])
    for a, b in itertools.permutations(range(hf.size), 2):
        assert link_plan(hf, a, b) == old_link_plan(hf, a, b), (a, b)
        assert linked(hf, a, b) == (old_link_plan(hf, a, b)[0] is not None), (a, b)


def test_link_plan_mlx_ring():
    # Rank r's addresses face its left neighbour r-1, which dials them.
    hf = parse([[f"10.0.{r}.2:5000", f"10.1.{r}.2:5000"] for r in range(4)])
    assert link_plan(hf, 0, 1) == (1, hf.ranks[1].addresses)
    assert link_plan(hf, 1, 0) == (1, hf.ranks[1].addresses)
    assert link_plan(hf, 3, 0) == (0, hf.ranks[0].addresses)
    assert link_plan(hf, 0, 2) == (None, []) and not linked(hf, 0, 2)
    # Loopback addresses are for any rank: the lower rank listens.
    hf = parse([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]])
    assert link_plan(hf, 2, 0) == (0, [Address("127.0.0.1", 5000)])


def test_link_per_cable():
    hf = parse(cabled(3, [(0, 1), (1, 2), (0, 1), (2, 0)]))
    # Two cables 0-1: rank 0 listens on both ends of its, rank 1 dials each
    # from its own end of the same cable.
    link = hf.link(1, 0)
    a0, a1 = hf.ranks[0].addresses, hf.ranks[1].addresses
    assert link == Link(acceptor=0, dialer=1, cables=((0, a0[0]), (1, a0[1])),
                        sources=((0, a1[0]), (2, a1[2])))
    assert [str(x) for _, x in link.cables] == ["10.0.0.1:5000", "10.0.2.1:5000"]
    assert [str(s) for _, s in link.sources] == ["10.0.0.2:5000", "10.0.2.2:5000"]
    assert link_plan(hf, 0, 1) == (0, [a0[0], a0[1]])
    # The lower rank listens when it has an address facing the higher.
    assert hf.link(2, 1).acceptor == 1 and hf.link(0, 2).acceptor == 0


def test_link_dialer_without_own_end():
    # Rank 1 has no address facing rank 0: it dials rank 0's end of the cable
    # from whatever address its route picks.
    hf = parse({"ranks": [{"addresses": [{"ip": "10.0.0.1", "port": 1, "peer": 1}]},
                          {"addresses": ["10.0.0.2:1"]}]})
    link = hf.link(0, 1)
    assert (link.acceptor, link.dialer, link.sources) == (0, 1, (None,))


# ---- the ring ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [11, 12, 13, 14])
def test_rank_with_one_cable_fails_fast(n):
    """Ranks 0..n-2 cabled as a full mesh, rank n-1 cabled to rank 0 only: no
    ring. The old search tried every path through the mesh (9.6 s at 11
    ranks, minutes at 13); the core names the rank at once."""
    obj = cabled(n, list(itertools.combinations(range(n - 1), 2)) + [(n - 1, 0)])
    t0 = time.monotonic()
    hf = parse(obj)
    elapsed = time.monotonic() - t0
    assert hf.ring is None
    assert f"rank {n - 1} shares a link with rank 0 only" in hf.ring_problem, hf.ring_problem
    assert "add a cable" in hf.ring_problem
    assert elapsed < 2.0, f"parse took {elapsed:.1f} s: is the ring search exponential again?"
    # The core refuses the same way when asked directly.
    with pytest.raises(ConfigError, match=f"rank {n - 1} shares a link with rank 0 only"):
        hf.topology.ring()


@pytest.mark.parametrize("k", [6, 8])
def test_no_ring_through_a_cut_rank_is_bounded(k):
    """Two meshes of k+1 ranks that share rank 0: every rank has two links or
    more, yet no ring exists (it would pass rank 0 twice). An unbounded search
    tries every path through both meshes; the core's gives up or proves it."""
    n = 2 * k + 1
    cables = list(itertools.combinations(range(k + 1), 2)) + \
        list(itertools.combinations([0, *range(k + 1, n)], 2))
    t0 = time.monotonic()
    hf = parse(cabled(n, cables))
    elapsed = time.monotonic() - t0
    assert hf.ring is None
    assert f"of the {n} ranks" in hf.ring_problem and "ring" in hf.ring_problem, hf.ring_problem
    assert elapsed < 2.0, f"parse took {elapsed:.1f} s: is the ring search unbounded again?"


@pytest.mark.parametrize("cycle", [[0, 3, 1, 4, 2, 5], [0, 3, 6, 2, 5, 1, 4], [0, 5, 2, 7, 4, 1, 6, 3]])
def test_ring_cabled_in_a_permuted_order(cycle):
    # Cables along 0-3-1-4-2-5-0 and the like: consecutive ranks share no cable.
    n = len(cycle)
    cables = ring_pairs(cycle)
    hf = parse(cabled(n, cables))
    assert hf.ring_problem is None
    assert sorted(hf.ring) == list(range(n))
    want = {frozenset(c) for c in cables}
    for a, b in ring_pairs(hf.ring):
        assert frozenset((a, b)) in want, (hf.ring, a, b)
        assert linked(hf, a, b)
    assert hf.ring == hf.topology.ring()  # what the core uses when it connects


@pytest.mark.parametrize("n", [3, 5, 8])
def test_full_mesh_is_in_rank_order(n):
    assert parse(cabled(n, list(itertools.combinations(range(n), 2)))).ring == list(range(n))
    assert parse(shared(n)).ring == list(range(n))


def test_explicit_ring_is_kept_without_a_search():
    obj = cabled(4, [(0, 1), (1, 2), (2, 3)])  # a line: no ring
    obj["ring"] = [0, 1, 2, 3]
    hf = parse(obj)
    assert hf.ring == [0, 1, 2, 3] and hf.ring_problem is None


def test_ring_problem_survives_copies():
    hf = parse(cabled(4, [(0, 1), (1, 2), (2, 3)]))
    assert hf.ring is None and "rank 0 shares a link with rank 1 only" in hf.ring_problem
    assert hf.with_default_iface(0, "eth0").ring_problem == hf.ring_problem


def test_address_the_core_cannot_take_names_the_file():
    obj = cabled(2, [(0, 1)])
    obj["ranks"][0]["addresses"][0]["iface"] = "x" * 80
    with pytest.raises(ConfigError) as ei:
        parse(obj, "/x/hosts.json")
    msg = str(ei.value)
    assert msg.startswith("[thunderlink] hostfile /x/hosts.json: ") and "too long" in msg, msg


# ---- MLX's ring hostfile over the same links ---------------------------------------------


def test_mlx_ring_hostfile():
    # Rank r lists its addresses that its left neighbour dials, on port + offset.
    hf = parse(cabled(3, [(0, 1), (1, 2), (2, 0)]))
    assert mlx_ring_hostfile(hf, 100) == [["10.0.2.2:5100"], ["10.0.0.2:5100"], ["10.0.1.2:5100"]]
    # Addresses for any rank serve every neighbour.
    assert mlx_ring_hostfile(parse(shared(3)), 0) == [[f"10.9.0.{r + 1}:5000"] for r in range(3)]
    # MLX's ring follows rank order: 0-2-1-3 cabled cannot be a rank-order ring.
    hf = parse(cabled(4, [(0, 2), (2, 1), (1, 3), (3, 0)]))
    with pytest.raises(ConfigError, match="needs ranks 0 and 1 to share a link"):
        mlx_ring_hostfile(hf, 0)
