"""The topology the core derives from a hostfile, as the doctor shows it:
the ring order and, per listening rank, the ranks that dial it and over how
many cables (Hostfile.link, from csrc/core/topo.c)."""

from __future__ import annotations

from ..hosts.hostfile import Hostfile

__all__ = ["shared_memory_pairs", "describe"]


def shared_memory_pairs(hf: Hostfile, local: list[int]) -> list[tuple[int, int]]:
    """Linked pairs among ``local`` (ranks with every address on this host):
    THUNDERLINK_TRANSPORT=auto joins them by shared memory, as the core
    chooses shared memory where both ends share a host identity."""
    return [(a, b) for i, a in enumerate(local) for b in local[i + 1:] if hf.link(a, b) is not None]


def _dialed(k: int, cables: bool, dialers: int) -> str:
    if not cables:
        return f"at {k} address{'es' if k != 1 else ''} for any rank"
    return f"{k} cable{'s' if k != 1 else ''}" + (" each" if dialers > 1 else "")


def describe(hf: Hostfile, shm: list[tuple[int, int]]) -> tuple[str, dict]:
    """(the text section, the JSON) of the topology; ``shm``: the pairs that
    auto joins by shared memory (shared_memory_pairs)."""
    n = hf.size
    links = [link for a in range(n) for b in range(a + 1, n) if (link := hf.link(a, b)) is not None]
    data = {
        "ring": hf.ring,
        "ring_problem": hf.ring_problem,
        "links": [{"ranks": sorted((x.acceptor, x.dialer)), "acceptor": x.acceptor, "dialer": x.dialer,
                   "cables": [{"to": str(c), "from": str(s[1]) if s else None}
                              for (_, c), s in zip(x.cables, x.sources)]}
                  for x in links],
        "shared_memory": [list(p) for p in shm],
    }
    lines = ["topology (as the core will connect):"]
    if hf.ring is None:
        lines.append("  ring: none (see the problem below)")
    else:
        order = hf.ring + hf.ring[:1] if n > 1 else hf.ring
        lines.append("  ring " + " -> ".join(map(str, order)))
    for r in range(n):
        # The ranks that dial r, grouped by what they dial: "1, 3 (1 cable each); 2 (2 cables)".
        groups: dict[tuple[int, bool], list[int]] = {}
        for x in links:
            if x.acceptor == r:
                groups.setdefault((len(x.cables), x.cables[0][1].peer is not None), []).append(x.dialer)
        if groups:
            lines.append(f"  rank {r} listens for " + "; ".join(
                f"{', '.join(map(str, ds))} ({_dialed(k, cables, len(ds))})" for (k, cables), ds in groups.items()))
    if shm:
        lines.append(f"  links {', '.join(f'{a}-{b}' for a, b in shm)} stay on this host (their ranks have every "
                     f"address here): THUNDERLINK_TRANSPORT=auto joins them by shared memory when the ranks run "
                     f"here as one user")
    return "\n".join(lines), data
