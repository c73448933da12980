"""A cluster's hostfiles, built as the project's own
:class:`thunderlink.hosts.hostfile.Hostfile` (one rank per emulated host, one
address per local cable end) and written in either format it reads."""

from __future__ import annotations

import json

DEFAULT_PORT = 32400


class Hostfiles:
    """The hostfile half of :class:`~thunderlink.testing.cluster.Cluster` (mixed into it)."""

    def hostfile_spec(self, port: int = DEFAULT_PORT):
        """The :class:`~thunderlink.hosts.hostfile.Hostfile` of this cluster: rank i is host i
        (its "netns" says where it runs), listening on ``port + j`` at its j-th cable end."""
        from ...hosts import hostfile as hf
        from .net import parse_rate

        ranks = []
        for h in self.hosts:
            addrs = [hf.Address(ip=a.ip, port=port + j, peer=a.peer, iface=a.iface, prefix=a.prefix,
                                rate=parse_rate(a.rate) / 1e9 if a.rate else None)
                     for j, a in enumerate(h.addresses)]
            ranks.append(hf.RankSpec(host=h.netns, addresses=addrs, extra={"netns": h.netns}))
        return hf.Hostfile(ranks=ranks)

    def hostfile(self, port: int = DEFAULT_PORT) -> dict:
        """The thunderlink hostfile (:meth:`hostfile_spec` as JSON). A cable's rate is
        written as tc was told it ("10gbit"), which the hostfile reads as the same bits."""
        out = self.hostfile_spec(port).to_json()
        for h, entry in zip(self.hosts, out["ranks"]):
            for a, d in zip(h.addresses, entry["addresses"]):
                if a.rate:
                    d["rate"] = a.rate
        return out

    def mlx_hostfile(self, port: int = DEFAULT_PORT) -> list[list[str]]:
        """MLX ring hostfile: rank r's list = the addresses rank r-1 connects to (r's cables facing r-1).

        MLX's ring backend has rank r listen on hostfile[r] and connect to every
        address of hostfile[r+1]; with k parallel cables that gives k
        connections per neighbour pair.  For mesh/switch one address per rank,
        reachable from its left neighbour.
        """
        spec = self.hostfile_spec(port)
        n = spec.size
        out: list[list[str]] = []
        for r, rank in enumerate(spec.ranks):
            left = (r - 1) % n
            entries = [str(a) for a in rank.addresses
                       if self.topology == "switch" or n == 1 or a.peer == left]
            if self.topology == "mesh" and entries:
                entries = entries[:1]
            out.append(entries)
        return out

    def write_hostfile(self, path: str, port: int = DEFAULT_PORT, mlx: bool = False) -> None:
        data = self.mlx_hostfile(port) if mlx else self.hostfile(port)
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
