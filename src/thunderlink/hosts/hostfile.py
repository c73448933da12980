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
            "iface": "en2", "rate": "40gbit", "prefix": 30,
            "rdma": "rdma_en2"}               # optional RDMA device of this end
         ]},
        ...
      ]
    }

An address with ``"peer": p`` is the near end of a cable to rank p: only rank
p connects there, and several such addresses to the same peer (several
cables) share the traffic in proportion to ``rate``. Addresses without
``peer`` are reachable by every rank.

``rdma`` names the RDMA device (``ibv_devices``) at this end of the cable:
the RDMA transport opens it for this rank's link to ``peer`` (on an address
without ``peer``: for every link of this rank that has no cable of its own).
Without it, the device of an interface ``X`` is taken to be ``rdma_X``
(Apple's naming), else the first device with an active port;
``THUNDERLINK_IBV_DEVICE`` overrides both.

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
import re
from dataclasses import dataclass, field, replace
from functools import cached_property

from ..config import parse_rate
from ..errors import ConfigError

__all__ = ["Address", "RankSpec", "Link", "Hostfile", "load", "parse", "parse_addresses", "is_device_matrix",
           "link_plan", "linked", "local_hostfile", "DEFAULT_PORT"]

DEFAULT_PORT = 32323


@dataclass(frozen=True)
class Address:
    ip: str
    port: int
    peer: int | None = None
    iface: str | None = None
    rate: float | None = None  # Gbit/s
    prefix: int | None = None
    rdma: str | None = None  # the RDMA device of this end

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
                             ifname=iface, weight=a.rate or 1.0, device=a.rdma or "")
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
                if a.rdma:
                    d["rdma"] = a.rdma
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


# A hostfile holds one short entry per rank: anything near these bounds is the
# wrong file (or a hostile one), refused before it can cost memory or recursion.
MAX_HOSTFILE_BYTES = 4 << 20
MAX_JSON_DEPTH = 32  # a thunderlink hostfile nests 5 deep, a JACCL device matrix 3


def read_json(path: str, var: str | None = None):
    """The JSON of a hostfile, with errors that name the file."""
    via = f" (from {var})" if var else ""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_HOSTFILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"[thunderlink] hostfile {path}{via} does not exist") from None
    except OSError as e:
        raise ConfigError(f"[thunderlink] cannot read hostfile {path}{via}: {e.strerror}") from None
    if len(data) > MAX_HOSTFILE_BYTES:
        raise ConfigError(
            f"[thunderlink] hostfile {path}{via} is larger than {MAX_HOSTFILE_BYTES >> 20} MiB, far more than "
            f"a hostfile needs (one short entry per rank): check that it is the right file"
        )
    if not data.strip():
        raise ConfigError(
            f"[thunderlink] hostfile {path}{via} is empty (mlx.launch writes an empty hostfile "
            f"for a single host; thunderlink needs at least one rank per entry)"
        )
    return decode_json(data, f"hostfile {path}{via}")


def decode_json(data: bytes, what: str):
    """JSON from bytes that anyone may have written: every way it can be
    unusable is a ConfigError naming ``what``, never a UnicodeDecodeError or
    a RecursionError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"[thunderlink] {what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            f"save it as UTF-8 JSON"
        ) from None
    try:
        obj = json.loads(text)
        too_deep = _deeper_than(obj, MAX_JSON_DEPTH)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"[thunderlink] {what} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from None
    except RecursionError:  # nested past Python's own limit
        too_deep = True
    except ValueError as e:  # e.g. an integer of thousands of digits
        raise ConfigError(f"[thunderlink] {what} is not usable JSON: {e}") from None
    if too_deep:
        raise ConfigError(
            f"[thunderlink] {what} nests arrays or objects more than {MAX_JSON_DEPTH} levels deep; "
            f"a hostfile needs 5 at most"
        )
    return obj


def _deeper_than(obj, limit: int) -> bool:
    """Do arrays and objects nest more than ``limit`` levels in ``obj``? (No recursion.)"""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, (list, dict)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (x.values() if isinstance(x, dict) else x))
    return False


def load(path: str, var: str | None = None) -> Hostfile:
    """Read and check a hostfile. ``var`` names the variable that pointed to
    it, for error messages."""
    return parse(read_json(path, var), path)


def is_device_matrix(obj) -> bool:
    """A square list of lists of null / device name / list of names, with no
    "ip:port" strings (which would make it an MLX ring hostfile)."""
    if not isinstance(obj, list) or not obj or not all(isinstance(row, list) for row in obj):
        return False
    if any(len(row) != len(obj) for row in obj):
        return False

    def name(x):
        return isinstance(x, str) and ":" not in x

    for row in obj:
        for e in row:
            if e is None or name(e) or (isinstance(e, list) and all(name(x) for x in e)):
                continue
            return False
    return any(e is not None for row in obj for e in row)


def parse(obj, path: str | None = None) -> Hostfile:
    """A hostfile from its JSON: thunderlink's format or MLX's ring format.
    A JACCL device matrix is refused here: it is read with its coordinator
    (``jaccl.hostfile_from_matrix``) when a rank connects."""
    if is_device_matrix(obj):
        raise ConfigError(
            f"[thunderlink] {_where(path)} is a JACCL device matrix: it names devices, not addresses, so it "
            f"is read together with the coordinator (MLX_JACCL_COORDINATOR) when a rank connects"
        )
    return parse_addresses(obj, path)


def parse_addresses(obj, path: str | None = None) -> Hostfile:
    """``parse`` for JSON already known not to be a JACCL device matrix."""
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
    if not re.fullmatch(r"[0-9]{1,5}", port):
        raise ConfigError(f"[thunderlink] {where}: port {port!r} in {text!r} is not a number 1..65535")
    return host, int(port)


def _check_port(port, where: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"[thunderlink] {where}: port must be an integer 1..65535, not {port!r}")
    return port


# A label that makes a name numeric: getaddrinfo reads such names as IPv4
# (inet_aton: 10.1, 0x7f.1), and no real host name ends in one.
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)", re.IGNORECASE)
_NAME_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)


def _check_ip(ip, where: str) -> str:
    """An IP literal or a host name. A malformed literal (999.0.0.1, 10.1,
    1:2:3) is refused here, not sent to DNS as a name."""
    if not isinstance(ip, str) or not ip.strip():
        raise ConfigError(f"[thunderlink] {where}: \"ip\" must be a non-empty string, not {ip!r}")
    ip = ip.strip()
    if ":" in ip:
        try:
            ipaddress.IPv6Address(ip)  # with a %zone where given
        except ValueError:
            hint = " (in \"ip\", write an IPv6 address without brackets)" if ip.startswith("[") else ""
            raise ConfigError(f"[thunderlink] {where}: {ip!r} is not a valid IPv6 address{hint}") from None
        return ip
    labels = ip.removesuffix(".").split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise ConfigError(
                f"[thunderlink] {where}: {ip!r} is not a valid IPv4 address (four numbers 0..255 "
                f"separated by dots, without leading zeros)"
            ) from None
        return ip
    if len(ip) > 253 or not all(_NAME_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(
            f"[thunderlink] {where}: {ip!r} is neither an IP address nor a host name (letters, digits, "
            f"'-' and '_' in labels of up to 63 characters separated by dots)"
        )
    return ip


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
            ip = _check_ip(ip, where)
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
            unknown = set(a) - {"ip", "port", "peer", "iface", "rate", "prefix", "rdma"}
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
            if iface is not None and not _printable(iface):
                raise ConfigError(f"[thunderlink] {aw}: \"iface\" must be an interface name, not {iface!r}")
            rdma = a.get("rdma")
            if rdma is not None and not (_printable(rdma) and len(rdma) < 64 and " " not in rdma):
                raise ConfigError(f"[thunderlink] {aw}: \"rdma\" must be an RDMA device name as `ibv_devices` "
                                  f"lists it (under 64 characters, no spaces), not {rdma!r}")
            rate = parse_rate(a["rate"], f"{aw}.rate") if a.get("rate") is not None else None
            prefix = a.get("prefix")
            if prefix is not None and (not isinstance(prefix, int) or not 0 <= prefix <= 128):
                raise ConfigError(f"[thunderlink] {aw}: \"prefix\" must be a prefix length 0..128")
            addrs.append(Address(ip=ip, port=port, peer=peer, iface=iface, rate=rate, prefix=prefix, rdma=rdma))
        host = entry.get("host", addrs[0].ip)
        if not _printable(host):
            raise ConfigError(f"[thunderlink] {where}: \"host\" must be a non-empty string of printable "
                              f"characters, not {host!r}")
        ssh = entry.get("ssh")
        if ssh is not None and not _printable(ssh):
            raise ConfigError(f"[thunderlink] {where}: \"ssh\" must be a non-empty string of printable "
                              f"characters, not {ssh!r}")
        extra = {k: v for k, v in entry.items() if k not in ("host", "ssh", "addresses", "port")}
        ranks.append(RankSpec(host=host, addresses=addrs, ssh=ssh, extra=extra))
    ring = obj.get("ring")
    if ring is not None:
        if (not isinstance(ring, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in ring)
                or sorted(ring) != list(range(n))):
            raise ConfigError(f"[thunderlink] {w}: \"ring\" must list every rank 0..{n - 1} exactly once")
    return Hostfile(ranks=ranks, ring=ring, format="thunderlink", path=path)


def _printable(value) -> bool:
    """A non-empty string that a terminal shows as written: no control
    characters (escape sequences), as names from a peer's record may hold."""
    return isinstance(value, str) and value != "" and value.isprintable()


def _is_localhost(ip: str) -> bool:
    return ip.removesuffix(".").lower() == "localhost"


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%")[0]).is_loopback
    except ValueError:
        return _is_localhost(ip)


def _listening_keys(a: Address) -> tuple[tuple[str, int], ...]:
    """The (address, port) pairs where ``a`` may listen, for finding two
    entries that are one: an IP literal in its one canonical form (::1 and
    0:0::1, 127.0.0.1 and ::ffff:127.0.0.1 meet); localhost as both loopback
    addresses it may resolve to; any other name as written, since resolving
    it would ask DNS."""
    if _is_localhost(a.ip):
        return ("127.0.0.1", a.port), ("::1", a.port)
    try:
        ip = ipaddress.ip_address(a.ip)
    except ValueError:
        return ((a.ip.removesuffix(".").lower(), a.port),)
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ((str(ip), a.port),)


def _check(hf: Hostfile) -> None:
    def entry(r: int, i: int) -> str:
        return f"[{r}][{i}]" if hf.format == "mlx-ring" else f"ranks[{r}].addresses[{i}]"

    seen: dict[tuple[str, int], tuple[int, int]] = {}  # listening key -> (rank, index) of its first entry
    for r, spec in enumerate(hf.ranks):
        for i, a in enumerate(spec.addresses):
            keys = _listening_keys(a)
            clash = next((seen[key] for key in keys if key in seen), None)
            if clash is not None:
                r0, i0 = clash
                first = hf.ranks[r0].addresses[i0]
                who = f"rank {r} lists it twice" if r0 == r else f"ranks {r0} and {r} both listen there"
                if str(first) == str(a):
                    what = f"{a} ({entry(r0, i0)} and {entry(r, i)})"
                else:
                    why = ("localhost is 127.0.0.1 or ::1" if _is_localhost(first.ip) or _is_localhost(a.ip)
                           else "the same address written two ways")
                    what = f"{first} in {entry(r0, i0)} and {a} in {entry(r, i)} ({why})"
                raise ConfigError(
                    f"[thunderlink] {_where(hf.path)}: duplicate address {what}: {who}; every rank needs its "
                    f"own address or port"
                )
            seen.update(dict.fromkeys(keys, (r, i)))


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
