"""Hostfiles: who the ranks are and where they listen.

Two formats are read (the format is recognised from the JSON itself):

**thunderlink** (a JSON object)::

    {
      "version": 1,
      "port": 32323,                      # optional default port (plus the rank)
      "ring": [0, 2, 1, 3],               # optional ring order (default: found along the links)
      "ranks": [
        {"host": "mac-a",                 # ssh target / label (default: first ip)
         "ssh": "me@mac-a",               # optional ssh destination
         "addresses": [
           "192.168.0.10:32323",          # reachable by any rank
           {"ip": "10.0.1.1", "port": 32324, "peer": 1,      # a cable to rank 1
            "iface": "en2", "rate": "40gbit", "prefix": 30}
         ]},
        ...
      ]
    }

An address with ``"peer": p`` is the near end of a cable to rank p: only rank
p connects there, and several such addresses to the same peer (several
cables) share the traffic in proportion to ``rate``. Addresses without
``peer`` are reachable by every rank.

Which ranks share a link, who listens for it, over which cables, and the
ring order when the file gives none are the C core's answers
(csrc/core/topo.c, through :class:`thunderlink.bindings.Topology`):
:meth:`Hostfile.link`, :func:`link_plan` and :func:`linked` ask it, so the
tools and the core never disagree.

**MLX ring** (what ``mlx.launch --backend ring`` writes to ``MLX_HOSTFILE``):
a JSON list, one entry per rank, each a list of ``"ip:port"`` strings. As in
MLX's ring, rank r's addresses are those its left neighbour (r-1) connects
to; loopback addresses are reachable by every rank.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass, field, replace
from functools import cached_property

from ..config import parse_rate
from ..errors import ConfigError

__all__ = ["Address", "RankSpec", "Link", "Hostfile", "load", "parse", "link_plan", "linked", "local_hostfile",
           "DEFAULT_PORT"]

DEFAULT_PORT = 32323


@dataclass(frozen=True)
class Address:
    ip: str
    port: int
    peer: int | None = None
    iface: str | None = None
    rate: float | None = None  # Gbit/s
    prefix: int | None = None

    def __str__(self):
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"


@dataclass
class RankSpec:
    host: str
    addresses: list[Address]
    ssh: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Link:
    """How the core joins two ranks: ``dialer`` connects to each of
    ``acceptor``'s addresses in ``cables`` (one per cable), leaving for the
    k-th from ``sources[k]``. Entries are (index in that rank's addresses,
    address); a source is None where the dialer has no k-th address facing
    the acceptor (its route then picks the way out)."""

    acceptor: int
    dialer: int
    cables: tuple[tuple[int, Address], ...]
    sources: tuple[tuple[int, Address] | None, ...]


@dataclass
class Hostfile:
    ranks: list[RankSpec]
    ring: list[int] | None = None
    format: str = "thunderlink"
    path: str | None = None
    canonical: str = ""
    # Why no ring exists when the file gives none and the core finds none
    # (then ``ring`` is None and the core refuses to connect with this reason).
    ring_problem: str | None = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    @cached_property
    def topology(self):
        """The core's topology of these addresses (:class:`thunderlink.bindings.Topology`),
        built on first use; ``ranks`` must not change afterwards."""
        from ..bindings import Topology  # lazily, as in endpoints(): it loads the compiled core

        return Topology(self.size, self.endpoints())

    def link(self, a: int, b: int) -> Link | None:
        """How the core joins ranks a and b; None when they share no link."""
        acceptor, cables, sources = self.topology.link(a, b)
        if acceptor is None:
            return None
        dialer = b if acceptor == a else a
        # Endpoints are in rank order, then address order (endpoints()).
        starts = [0]
        for spec in self.ranks:
            starts.append(starts[-1] + len(spec.addresses))

        def local(rank: int, i: int) -> tuple[int, Address]:
            return i - starts[rank], self.ranks[rank].addresses[i - starts[rank]]

        return Link(acceptor=acceptor, dialer=dialer,
                    cables=tuple(local(acceptor, i) for i in cables),
                    sources=tuple(None if i is None else local(dialer, i) for i in sources))

    def job_id(self) -> int:
        """A 64-bit id every rank derives from the same file."""
        return int.from_bytes(hashlib.blake2b(self.canonical.encode(), digest_size=8).digest(), "little")

    def with_default_iface(self, rank: int, ifname: str | None) -> "Hostfile":
        """A copy in which ``rank``'s addresses that name no interface name
        ``ifname`` (THUNDERLINK_IFNAME), as the core will bind them."""
        if not ifname:
            return self
        ranks = list(self.ranks)
        spec = ranks[rank]
        ranks[rank] = RankSpec(host=spec.host, ssh=spec.ssh, extra=spec.extra,
                               addresses=[a if a.iface else replace(a, iface=ifname) for a in spec.addresses])
        return replace(self, ranks=ranks)

    def endpoints(self, ifname: str | None = None, rank: int | None = None):
        """Endpoints for the core. ``ifname`` applies to ``rank``'s addresses
        that name no interface."""
        from ..bindings import Endpoint

        out = []
        for r, spec in enumerate(self.ranks):
            for a in spec.addresses:
                iface = a.iface or (ifname if rank == r else None) or ""
                out.append(
                    Endpoint(owner=r, host=a.ip, port=a.port,
                             facing=-1 if a.peer is None else a.peer,
                             ifname=iface, weight=a.rate or 1.0)
                )
        return out

    def to_json(self) -> dict:
        """The thunderlink format of this hostfile."""
        ranks = []
        for spec in self.ranks:
            addrs = []
            for a in spec.addresses:
                d = {"ip": a.ip, "port": a.port}
                if a.peer is not None:
                    d["peer"] = a.peer
                if a.iface:
                    d["iface"] = a.iface
                if a.rate:
                    d["rate"] = a.rate
                if a.prefix is not None:
                    d["prefix"] = a.prefix
                addrs.append(d)
            entry = {"host": spec.host, "addresses": addrs}
            if spec.ssh:
                entry["ssh"] = spec.ssh
            entry.update(spec.extra)
            ranks.append(entry)
        out = {"version": 1, "ranks": ranks}
        if self.ring is not None:
            out["ring"] = list(self.ring)
        return out


def _where(path: str | None) -> str:
    return f"hostfile {path}" if path else "hostfile"


def read_json(path: str, var: str | None = None):
    """The JSON of a hostfile, with errors that name the file."""
    via = f" (from {var})" if var else ""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"[thunderlink] hostfile {path}{via} does not exist") from None
    except OSError as e:
        raise ConfigError(f"[thunderlink] cannot read hostfile {path}{via}: {e.strerror}") from None
    if not text.strip():
        raise ConfigError(
            f"[thunderlink] hostfile {path}{via} is empty (mlx.launch writes an empty hostfile "
            f"for a single host; thunderlink needs at least one rank per entry)"
        )
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"[thunderlink] hostfile {path}{via} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from None
    return obj


def load(path: str, var: str | None = None) -> Hostfile:
    """Read and check a hostfile. ``var`` names the variable that pointed to
    it, for error messages."""
    return parse(read_json(path, var), path)


def parse(obj, path: str | None = None) -> Hostfile:
    from .jaccl import is_device_matrix

    if is_device_matrix(obj):
        raise ConfigError(
            f"[thunderlink] {_where(path)} is a JACCL device matrix: it names devices, not addresses, so it "
            f"is read together with the coordinator (MLX_JACCL_COORDINATOR) when a rank connects"
        )
    if isinstance(obj, list):
        hf = _parse_mlx_ring(obj, path)
    elif isinstance(obj, dict):
        hf = _parse_thunderlink(obj, path)
    else:
        raise ConfigError(
            f"[thunderlink] {_where(path)}: expected a JSON object with \"ranks\" (thunderlink format) "
            f"or a list of address lists (MLX ring format), got {type(obj).__name__}"
        )
    _check(hf)
    try:
        topology = hf.topology
    except ConfigError as e:  # an address the core cannot take (an overlong name)
        raise ConfigError(f"[thunderlink] {_where(path)}: {_reason(e)}") from None
    if hf.ring is None:
        try:
            hf.ring = topology.ring()
        except ConfigError as e:
            hf.ring_problem = _reason(e)
    hf.canonical = json.dumps(hf.to_json(), sort_keys=True, separators=(",", ":"))
    return hf


def _reason(e: ConfigError) -> str:
    return str(e).removeprefix("[thunderlink] ")


def _split_hostport(text: str, where: str, default_port: int | None) -> tuple[str, int]:
    text = text.strip()
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"[thunderlink] {where}: {text!r} has an unclosed '['")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"[thunderlink] {where}: {text!r} is not [ipv6]:port")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if port is None:
        if default_port is None:
            raise ConfigError(f"[thunderlink] {where}: {text!r} has no port (write ip:port)")
        return host, default_port
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"[thunderlink] {where}: port {port!r} in {text!r} is not a number") from None
    return host, p


def _check_port(port, where: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"[thunderlink] {where}: port must be an integer 1..65535, not {port!r}")
    return port


def _check_ip(ip, where: str) -> str:
    if not isinstance(ip, str) or not ip.strip():
        raise ConfigError(f"[thunderlink] {where}: \"ip\" must be a non-empty string, not {ip!r}")
    return ip.strip()


def _parse_mlx_ring(obj: list, path: str | None) -> Hostfile:
    n = len(obj)
    if n == 0:
        raise ConfigError(f"[thunderlink] {_where(path)} lists no ranks")
    ranks = []
    for r, entry in enumerate(obj):
        where = f"{_where(path)}, rank {r}"
        if isinstance(entry, str):
            entry = [entry]
        if not isinstance(entry, list) or not entry:
            raise ConfigError(f"[thunderlink] {where}: expected a non-empty list of \"ip:port\" strings")
        addrs = []
        for a in entry:
            if not isinstance(a, str):
                raise ConfigError(f"[thunderlink] {where}: {a!r} is not an \"ip:port\" string")
            ip, port = _split_hostport(a, where, None)
            _check_port(port, where)
            loop = _is_loopback(ip)
            peer = None if (loop or n == 1) else (r - 1) % n
            addrs.append(Address(ip=ip, port=port, peer=peer))
        ranks.append(RankSpec(host=addrs[0].ip, addresses=addrs))
    return Hostfile(ranks=ranks, ring=list(range(n)), format="mlx-ring", path=path)


def _parse_thunderlink(obj: dict, path: str | None) -> Hostfile:
    w = _where(path)
    if "ranks" not in obj:
        raise ConfigError(f"[thunderlink] {w}: missing \"ranks\" (a list with one entry per rank)")
    version = obj.get("version", 1)
    if version != 1:
        raise ConfigError(f"[thunderlink] {w}: version {version!r} is not supported (this thunderlink reads version 1)")
    ranks_in = obj["ranks"]
    if not isinstance(ranks_in, list) or not ranks_in:
        raise ConfigError(f"[thunderlink] {w}: \"ranks\" must be a non-empty list")
    n = len(ranks_in)
    base_port = obj.get("port", DEFAULT_PORT)
    _check_port(base_port, f"{w}, \"port\"")
    ranks = []
    for r, entry in enumerate(ranks_in):
        where = f"{w}, ranks[{r}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"[thunderlink] {where}: expected an object with \"addresses\"")
        raw = entry.get("addresses")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"[thunderlink] {where}: \"addresses\" must be a non-empty list")
        default_port = entry.get("port", base_port + r)
        _check_port(default_port, f"{where}.port")
        addrs = []
        for i, a in enumerate(raw):
            aw = f"{where}.addresses[{i}]"
            if isinstance(a, str):
                ip, port = _split_hostport(a, aw, default_port)
                addrs.append(Address(ip=_check_ip(ip, aw), port=_check_port(port, aw)))
                continue
            if not isinstance(a, dict):
                raise ConfigError(f"[thunderlink] {aw}: expected \"ip:port\" or an object with \"ip\"")
            unknown = set(a) - {"ip", "port", "peer", "iface", "rate", "prefix"}
            if unknown:
                raise ConfigError(f"[thunderlink] {aw}: unknown key(s) {', '.join(sorted(unknown))}")
            ip = _check_ip(a.get("ip"), aw)
            port = _check_port(a.get("port", default_port), aw)
            peer = a.get("peer")
            if peer is not None and (isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < n or peer == r):
                raise ConfigError(
                    f"[thunderlink] {aw}: \"peer\" must be another rank 0..{n - 1}, not {peer!r}"
                )
            iface = a.get("iface")
            if iface is not None and (not isinstance(iface, str) or not iface):
                raise ConfigError(f"[thunderlink] {aw}: \"iface\" must be an interface name")
            rate = parse_rate(a["rate"], f"{aw}.rate") if a.get("rate") is not None else None
            prefix = a.get("prefix")
            if prefix is not None and (not isinstance(prefix, int) or not 0 <= prefix <= 128):
                raise ConfigError(f"[thunderlink] {aw}: \"prefix\" must be a prefix length 0..128")
            addrs.append(Address(ip=ip, port=port, peer=peer, iface=iface, rate=rate, prefix=prefix))
        host = entry.get("host", addrs[0].ip)
        if not isinstance(host, str) or not host:
            raise ConfigError(f"[thunderlink] {where}: \"host\" must be a non-empty string")
        ssh = entry.get("ssh")
        if ssh is not None and (not isinstance(ssh, str) or not ssh):
            raise ConfigError(f"[thunderlink] {where}: \"ssh\" must be a non-empty string")
        extra = {k: v for k, v in entry.items() if k not in ("host", "ssh", "addresses", "port")}
        ranks.append(RankSpec(host=host, addresses=addrs, ssh=ssh, extra=extra))
    ring = obj.get("ring")
    if ring is not None:
        if (not isinstance(ring, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in ring)
                or sorted(ring) != list(range(n))):
            raise ConfigError(f"[thunderlink] {w}: \"ring\" must list every rank 0..{n - 1} exactly once")
    return Hostfile(ranks=ranks, ring=ring, format="thunderlink", path=path)


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%")[0]).is_loopback
    except ValueError:
        return ip == "localhost"


def _check(hf: Hostfile) -> None:
    seen: dict[tuple[str, int], int] = {}
    for r, spec in enumerate(hf.ranks):
        for a in spec.addresses:
            key = (a.ip, a.port)
            if key in seen:
                other = seen[key]
                who = f"rank {r} lists it twice" if other == r else f"ranks {other} and {r} both listen there"
                raise ConfigError(
                    f"[thunderlink] {_where(hf.path)}: duplicate address {a}: {who}; every rank needs its "
                    f"own address or port"
                )
            seen[key] = r


def link_plan(hf: Hostfile, a: int, b: int) -> tuple[int | None, list[Address]]:
    """(the rank that listens for the link between a and b, the addresses the
    other dials, one per cable), as the core decides; (None, []) when they
    share no link."""
    link = hf.link(a, b)
    return (None, []) if link is None else (link.acceptor, [x for _, x in link.cables])


def linked(hf: Hostfile, a: int, b: int) -> bool:
    """Do ranks a and b share a link (one has an address the other may dial)?"""
    return hf.topology.linked(a, b)


def _dialable(hf: Hostfile, owner: int, frm: int) -> list[Address]:
    """owner's addresses that frm dials when owner listens: those facing frm,
    else those for any rank (the rule of targets() in csrc/core/topo.c)."""
    addrs = hf.ranks[owner].addresses
    return [x for x in addrs if x.peer == frm] or [x for x in addrs if x.peer is None]


def mlx_ring_hostfile(hf: Hostfile, port_offset: int) -> list[list[str]]:
    """The MLX ring hostfile over the same links: rank r lists the addresses
    rank r-1 dials (its addresses facing r-1, else those for any rank), on
    port + port_offset. MLX's ring follows rank order, so consecutive ranks
    must share a link."""
    n = hf.size
    out = []
    for r in range(n):
        left = (r - 1) % n
        addrs = _dialable(hf, r, left)
        if not addrs:
            raise ConfigError(
                f"[thunderlink] MLX's ring needs ranks {left} and {r} to share a link (it follows rank order), "
                f"but {_where(hf.path)} gives rank {r} no address for rank {left}")
        entries = []
        for a in addrs:
            port = a.port + port_offset
            if not 1 <= port <= 65535:
                raise ConfigError(f"[thunderlink] port {a.port} + {port_offset} is out of range for MLX's ring")
            entries.append(str(Address(ip=a.ip, port=port)))
        out.append(entries)
    return out


def local_hostfile(n: int, ports: list[int], host: str = "127.0.0.1") -> dict:
    """A thunderlink hostfile for n ranks on this host."""
    return {
        "version": 1,
        "ranks": [{"host": "localhost", "addresses": [f"{host}:{p}"]} for p in ports[:n]],
    }


def write(obj: dict, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
