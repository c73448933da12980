"""The cluster model: hosts (network namespaces), cables (veth pairs, one /30
each) and their planning, creation, removal and control; processes run inside
a host. Measurement is in :mod:`.probes`, hostfiles in :mod:`.hostfiles`."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Sequence

from . import cleanup, state
from .hostfiles import Hostfiles
from .net import (DEFAULT_LATENCY, NEEDS_ROOT, ClusterError, has_caps, ip, ip_batch, netns_list, parse_rate,
                  run_cmd, tbf_params, tc_batch, wait_operstate)
from .probes import Probes

DEFAULT_BASE = "10.231.0.0/16"
MAX_MTU = 65520  # Linux thunderbolt-net maximum
MIN_MTU = 68
TOPOLOGIES = ("ring", "mesh", "switch")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")




@dataclass
class Address:
    """One local address of a host: the host's end of one cable."""

    ip: str
    prefix: int
    iface: str
    peer: int | None  # host at the other end (None on a switch)
    cable: int  # index into Cluster.cables
    rate: str | None = None


@dataclass
class Host:
    index: int
    netns: str
    addresses: list[Address] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.netns


@dataclass
class Cable:
    """One veth pair.  ``b`` is None for a host's port on the switch topology."""

    index: int
    a: int
    b: int | None
    k: int  # index among the cables between a and b
    ifname_a: str
    ifname_b: str
    netns_a: str
    netns_b: str
    ip_a: str
    ip_b: str | None
    prefix: int
    subnet: str
    rate: str | None
    mtu: int
    up: bool = True

    def end(self, host: int) -> tuple[str, str, str | None]:
        """(netns, ifname, ip) of this cable's end at ``host``."""
        if host == self.a:
            return self.netns_a, self.ifname_a, self.ip_a
        if host == self.b:
            return self.netns_b, self.ifname_b, self.ip_b
        raise ValueError(f"host {host} is not an end of cable {self.index} ({self.a}-{self.b})")

    def peer_of(self, host: int) -> int | None:
        if host == self.a:
            return self.b
        if host == self.b:
            return self.a
        raise ValueError(f"host {host} is not an end of cable {self.index}")


class Cluster(Probes, Hostfiles):
    """N emulated hosts (network namespaces) cabled by veth pairs.

    >>> with Cluster(4, topology="ring", rate="10gbit") as c:   # doctest: +SKIP
    ...     c.exec(0, ["ip", "-br", "addr"]).stdout
    """

    def __init__(self, hosts: int, topology: str = "ring", rate: str | None = None,
                 mtu: int = 1500, cables_per_link: int = 1, rates: dict | None = None,
                 name: str | None = None, *, base: str = DEFAULT_BASE,
                 burst: int | str | None = None, latency: str = DEFAULT_LATENCY,
                 persistent: bool = False, auto_up: bool = False):
        """Plan a cluster (nothing is created until :meth:`up` or ``with``).

        hosts: number of emulated hosts (namespaces ``<name>-h<i>``).
        topology: "ring" (i <-> i+1 mod N; one pair for N == 2), "mesh" (every
            pair) or "switch" (one bridge in namespace ``<name>-sw``, one port
            per host, all hosts in one /24).
        rate: tc rate of every cable (both directions), None = unshaped.
        mtu: MTU of both ends of every cable (<= 65520).
        cables_per_link: parallel cables between each connected pair (ring/mesh);
            interfaces are then named ``tb<peer>c<k>`` instead of ``tb<peer>``.
        rates: per-cable override, keys ``(a, b, k)`` (either host order; ``(a, b)``
            for all cables of a pair; ``(host, None, 0)`` for a switch port).
        name: prefix of all namespace names; default ``tl`` + 4 random hex digits.
        base: IPv4 range the /30 cable subnets are allocated from, in cable order
            (cable c gets base + 4c; ip_a = .1, ip_b = .2 of it); switch uses its first /24.
        burst, latency: tbf parameters (default: see the module docstring).
        persistent: do not remove at interpreter exit/signals (the CLI's `up`).
        auto_up: call :meth:`up` now.
        """
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, not {topology!r}")
        if not isinstance(hosts, int) or hosts < 1:
            raise ValueError(f"hosts must be a positive integer, not {hosts!r}")
        if topology != "switch" and hosts > 999:
            raise ValueError("at most 999 hosts")
        if not (MIN_MTU <= int(mtu) <= MAX_MTU):
            raise ValueError(f"mtu must be in [{MIN_MTU}, {MAX_MTU}] (65520 = thunderbolt-net max), not {mtu}")
        if cables_per_link < 1 or cables_per_link > 99:
            raise ValueError(f"cables_per_link must be in [1, 99], not {cables_per_link}")
        if topology == "switch" and cables_per_link != 1:
            raise ValueError("cables_per_link applies to ring/mesh only")
        for r in [rate, *(rates or {}).values()]:
            if r is not None:
                parse_rate(r)
        if name is None:
            name = "tl" + secrets.token_hex(2)
        if not _NAME_RE.match(name):
            raise ValueError(f"cluster name {name!r}: use 1-32 characters [A-Za-z0-9_.-], starting alphanumeric")
        self.name = name
        self.topology = topology
        self.rate = rate
        self.mtu = int(mtu)
        self.cables_per_link = cables_per_link
        self.rates = dict(rates or {})
        self.base = base
        self.burst = burst
        self.latency = latency
        self.persistent = persistent
        self.switch_netns: str | None = f"{name}-sw" if topology == "switch" else None
        self.hosts: list[Host] = []
        self.cables: list[Cable] = []
        self._plan(hosts)
        self._owner_pid = os.getpid()
        self._procs: list[subprocess.Popen] = []
        self._created_netns: list[str] = []
        self._created_links: list[tuple[str, str]] = []  # (netns, ifname) of one end of each veth/bridge
        self._lock = threading.RLock()
        self._state = "planned"  # planned -> up -> down
        self._in_down = False
        if auto_up:
            self.up()

    # ------------------------------------------------------------------ planning (pure)

    def _rate_for(self, a: int, b: int | None, k: int) -> str | None:
        for key in ((a, b, k), (b, a, k), (a, b), (b, a)):
            if key in self.rates:
                return self.rates[key]
        if b is None:
            for key in ((a, "switch", k), (a, -1, k), (a,)):
                if key in self.rates:
                    return self.rates[key]
        return self.rate

    def _pairs(self, n: int) -> list[tuple[int, int]]:
        if self.topology == "ring":
            if n < 2:
                return []
            if n == 2:
                return [(0, 1)]
            return [(i, (i + 1) % n) for i in range(n)]
        if self.topology == "mesh":
            return [(i, j) for i in range(n) for j in range(i + 1, n)]
        return []

    def _plan(self, n: int) -> None:
        try:
            net = ipaddress.IPv4Network(self.base, strict=False)
        except ValueError as e:
            raise ValueError(f"base {self.base!r} is not an IPv4 network: {e}") from None
        self.hosts = [Host(i, f"{self.name}-h{i}") for i in range(n)]
        if self.topology == "switch":
            if net.prefixlen > 24:
                raise ValueError(f"switch topology needs a base of /24 or larger, not {self.base}")
            if n > 253:
                raise ValueError("switch topology supports at most 253 hosts")
            sub = ipaddress.IPv4Network((int(net.network_address), 24))
            for i in range(n):
                ip = str(sub.network_address + i + 1)
                rate = self._rate_for(i, None, 0)
                c = Cable(index=i, a=i, b=None, k=0, ifname_a="tbsw", ifname_b=f"p{i}",
                          netns_a=self.hosts[i].netns, netns_b=self.switch_netns or "",
                          ip_a=ip, ip_b=None, prefix=24, subnet=str(sub), rate=rate, mtu=self.mtu)
                self.cables.append(c)
                self.hosts[i].addresses.append(Address(ip, 24, "tbsw", None, i, rate))
            return
        pairs = self._pairs(n)
        ncables = len(pairs) * self.cables_per_link
        if ncables * 4 > net.num_addresses:
            raise ValueError(f"base {self.base} too small for {ncables} /30 subnets")
        multi = self.cables_per_link > 1
        idx = 0
        for a, b in pairs:
            for k in range(self.cables_per_link):
                sub = ipaddress.IPv4Network((int(net.network_address) + 4 * idx, 30))
                ip_a, ip_b = str(sub.network_address + 1), str(sub.network_address + 2)
                if_a = f"tb{b}c{k}" if multi else f"tb{b}"
                if_b = f"tb{a}c{k}" if multi else f"tb{a}"
                rate = self._rate_for(a, b, k)
                c = Cable(index=idx, a=a, b=b, k=k, ifname_a=if_a, ifname_b=if_b,
                          netns_a=self.hosts[a].netns, netns_b=self.hosts[b].netns,
                          ip_a=ip_a, ip_b=ip_b, prefix=30, subnet=str(sub), rate=rate, mtu=self.mtu)
                self.cables.append(c)
                self.hosts[a].addresses.append(Address(ip_a, 30, if_a, b, idx, rate))
                self.hosts[b].addresses.append(Address(ip_b, 30, if_b, a, idx, rate))
                idx += 1

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Cluster":
        if self._state != "up":
            self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def __repr__(self) -> str:
        return (f"Cluster(name={self.name!r}, hosts={len(self.hosts)}, topology={self.topology!r}, "
                f"cables={len(self.cables)}, rate={self.rate!r}, mtu={self.mtu}, state={self._state})")

    @property
    def is_up(self) -> bool:
        return self._state == "up"

    @property
    def netns_names(self) -> list[str]:
        names = [h.netns for h in self.hosts]
        if self.switch_netns:
            names.append(self.switch_netns)
        return names

    def netns(self, host: int) -> str:
        return self.hosts[host].netns

    def up(self) -> "Cluster":
        """Create the namespaces, cables, addresses and qdiscs.  On failure removes what it made."""
        with self._lock:
            if self._state == "up":
                return self
            if self._state == "down":
                raise ClusterError(f"cluster {self.name} was taken down; create a new Cluster")
            self._preflight()
            self._owner_pid = os.getpid()
            cleanup.track(self)
            self._state = "up"  # from here on down() removes whatever got created
            try:
                state.write(self)
                self._create()
                state.write(self)
            except BaseException:
                try:
                    self.down()
                except Exception:
                    pass
                raise
            return self

    def _preflight(self) -> None:
        if not sys.platform.startswith("linux"):
            raise ClusterError(f"emulated clusters need Linux network namespaces (this is {sys.platform})")
        if shutil.which("ip") is None:
            raise ClusterError("iproute2's 'ip' is not on PATH: install iproute2 (apt-get install iproute2)")
        if any(c.rate for c in self.cables) and shutil.which("tc") is None:
            raise ClusterError("'tc' is not on PATH (needed for rate=...): install iproute2")
        if not has_caps():
            raise ClusterError(NEEDS_ROOT)
        existing = set(netns_list())
        clash = [ns for ns in self.netns_names if ns in existing]
        if clash:
            raise ClusterError(f"network namespace(s) {', '.join(clash)} already exist: pick another "
                               f"cluster name, or remove the old cluster (thunderlink cluster down {self.name})")

    def _create(self) -> None:
        fwd_on = False
        try:
            with open("/proc/sys/net/ipv4/ip_forward") as f:
                fwd_on = f.read().strip() != "0"
        except OSError:
            pass
        for ns in self.netns_names:
            cp = ip("netns", "add", ns, check=False)
            if cp.returncode != 0:
                msg = cp.stderr.strip()
                hint = ("" if "exist" in msg.lower() else
                        " -- needs root with CAP_SYS_ADMIN and a writable /run (privileged container)")
                raise ClusterError(f"cannot create network namespace {ns}: {msg}{hint}")
            self._created_netns.append(ns)
        # veth pairs are created directly inside the namespaces, so their names
        # never exist in (or collide in) the root namespace.
        link_lines = []
        for c in self.cables:
            link_lines.append(f"link add {c.ifname_a} netns {c.netns_a} type veth "
                              f"peer name {c.ifname_b} netns {c.netns_b}")
            self._created_links.append((c.netns_a, c.ifname_a))
        per_ns: dict[str, list[str]] = {ns: [] for ns in self.netns_names}
        tc_ns: dict[str, list[str]] = {ns: [] for ns in self.netns_names}
        for h in self.hosts:
            per_ns[h.netns].append("link set dev lo up")
        if self.switch_netns:
            self._created_links.append((self.switch_netns, "br0"))
            per_ns[self.switch_netns] += [
                "link set dev lo up",
                "link add br0 type bridge stp_state 0 forward_delay 0",
                f"link set dev br0 mtu {self.mtu} addrgenmode none up",
            ]
        for c in self.cables:
            # addrgenmode none: no IPv6 link-local, hence no RS/MLD chatter in counters()
            per_ns[c.netns_a] += [f"addr add {c.ip_a}/{c.prefix} dev {c.ifname_a}",
                                  f"link set dev {c.ifname_a} mtu {c.mtu} addrgenmode none up"]
            if c.b is None:
                per_ns[c.netns_b] += [f"link set dev {c.ifname_b} master br0",
                                      f"link set dev {c.ifname_b} mtu {c.mtu} addrgenmode none up"]
            else:
                per_ns[c.netns_b] += [f"addr add {c.ip_b}/{c.prefix} dev {c.ifname_b}",
                                      f"link set dev {c.ifname_b} mtu {c.mtu} addrgenmode none up"]
            if c.rate:
                for ns, ifn in ((c.netns_a, c.ifname_a), (c.netns_b, c.ifname_b)):
                    tc_ns[ns].append(self._tbf_line(ifn, c.rate, c.mtu))
        ip_batch(link_lines)
        for ns, lines in per_ns.items():
            ip_batch(lines, ns=ns)
        for ns, lines in tc_ns.items():
            tc_batch(lines, ns)
        # Packets sent before the kernel's linkwatch has activated a device's
        # qdisc (up to ~1 s after "up") are dropped; wait for operstate UP.
        ends: dict[str, list[str]] = {}
        for c in self.cables:
            ends.setdefault(c.netns_a, []).append(c.ifname_a)
            ends.setdefault(c.netns_b, []).append(c.ifname_b)
        wait_operstate(ends)
        if fwd_on:
            # new namespaces may inherit ip_forward=1 from the root namespace; a
            # real Thunderbolt ring does not route between non-neighbours.
            for h in self.hosts:
                run_cmd(["ip", "netns", "exec", h.netns, "sysctl", "-qw", "net.ipv4.ip_forward=0"],
                         check=False)

    def _tbf_line(self, ifname: str, rate: str, mtu: int) -> str:
        p = tbf_params(rate, mtu, latency=self.latency, burst=self.burst)
        return f"qdisc replace dev {ifname} root tbf rate {p['rate']} burst {p['burst']} latency {p['latency']}"

    def down(self) -> None:
        """Remove exactly what this cluster created (idempotent); kills processes started by run()."""
        with self._lock:
            if self._state != "up" or self._in_down:
                return
            self._in_down = True
            errors: list[str] = []
            try:
                cleanup.kill_procs(self._procs)
                for ns in self._created_netns:
                    cleanup.kill_netns_pids(ns)
                # Delete the links explicitly (in case something else keeps a
                # namespace alive), then the namespaces themselves.
                by_ns: dict[str, list[str]] = {}
                for ns, ifn in self._created_links:
                    if ns in self._created_netns:
                        by_ns.setdefault(ns, []).append(f"link del dev {ifn}")
                for ns, lines in by_ns.items():
                    ip_batch(lines, ns=ns, force=True, check=False)
                for ns in self._created_netns:
                    cp = ip("netns", "del", ns, check=False)
                    if cp.returncode != 0 and "No such file" not in cp.stderr:
                        errors.append(f"{ns}: {cp.stderr.strip()}")
                leftover = set(netns_list()) & set(self._created_netns)
                if leftover:
                    errors.append(f"namespaces still present: {sorted(leftover)}")
                else:
                    self._created_netns.clear()
                    self._created_links.clear()
                    state.remove(self.name)
            finally:
                self._in_down = False
                self._state = "down"
                cleanup.untrack(self)
            if errors:
                raise ClusterError(f"cluster {self.name}: could not remove everything: " + "; ".join(errors))

    # ------------------------------------------------------------------ state file

    def to_state(self) -> dict:
        return state.to_state(self)

    @classmethod
    def from_state(cls, st: dict) -> "Cluster":
        """Re-attach to a cluster described by a state file (e.g. created by `cluster up`)."""
        c = cls.__new__(cls)
        c.name = st["name"]
        c.topology = st["topology"]
        c.rate = st.get("rate")
        c.mtu = st.get("mtu", 1500)
        c.cables_per_link = st.get("cables_per_link", 1)
        c.rates = {}
        c.base = st.get("base", DEFAULT_BASE)
        c.burst = st.get("burst")
        c.latency = st.get("latency", DEFAULT_LATENCY)
        c.persistent = st.get("persistent", True)
        c.switch_netns = st.get("switch_netns")
        c.hosts = [Host(h["index"], h["netns"], [Address(**a) for a in h["addresses"]]) for h in st["hosts"]]
        c.cables = [Cable(**cb) for cb in st["cables"]]
        c._owner_pid = st.get("owner_pid", -1)
        c._procs = []
        c._created_netns = list(st.get("created_netns", []))
        c._created_links = [tuple(x) for x in st.get("created_links", [])]
        c._lock = threading.RLock()
        c._state = "up"
        c._in_down = False
        return c

    @classmethod
    def attach(cls, name: str) -> "Cluster":
        return cls.from_state(state.read(name))

    # ------------------------------------------------------------------ processes

    def _check_up(self) -> None:
        if self._state != "up":
            raise ClusterError(f"cluster {self.name} is not up (state: {self._state})")

    def netns_argv(self, host: int | str, argv: Sequence[str]) -> list[str]:
        """``ip netns exec NS argv...`` for a host index (or a namespace name)."""
        ns = host if isinstance(host, str) else self.hosts[host].netns
        from ..netns import command_in

        return command_in(ns, argv)

    def run(self, host: int, argv: Sequence[str], env: dict | None = None,
            **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace; it is killed (its process group) by down().

        ``env`` is merged over ``os.environ`` (pass ``popen_kwargs['env']``-style full
        replacement by giving ``replace_env=True``).
        """
        self._check_up()
        replace = popen_kwargs.pop("replace_env", False)
        if env is not None and not replace:
            env = {**os.environ, **{k: str(v) for k, v in env.items()}}
        popen_kwargs.setdefault("start_new_session", True)
        p = subprocess.Popen(self.netns_argv(host, argv), env=env, **popen_kwargs)
        with self._lock:
            self._procs = [q for q in self._procs if q.poll() is None]
            self._procs.append(p)
        return p

    def exec(self, host: int, argv: Sequence[str], timeout: float | None = 60.0,
             check: bool = False, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``host``'s namespace to completion (output captured as text by default)."""
        self._check_up()
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        if env is not None:
            env = {**os.environ, **{k: str(v) for k, v in env.items()}}
        return subprocess.run(self.netns_argv(host, argv), timeout=timeout, check=check, env=env, **kw)

    # ------------------------------------------------------------------ cables

    def cable(self, a: int, b: int | None = None, k: int = 0) -> Cable:
        """The k-th cable between hosts a and b (either order); for a switch, host a's port."""
        for c in self.cables:
            if c.k == k and ((c.a == a and c.b == b) or (c.a == b and c.b == a)):
                return c
        raise KeyError(f"no cable {a}-{b} #{k} in {self.topology} cluster {self.name}")

    def _ends(self, cable: Cable | int) -> tuple[Cable, list[tuple[str, str]]]:
        c = self.cables[cable] if isinstance(cable, int) else cable
        return c, [(c.netns_a, c.ifname_a), (c.netns_b, c.ifname_b)]

    def set_cable(self, cable: Cable | int, up: bool) -> None:
        """Take a cable down (both ends: addresses' routes vanish, peer unreachable) or up again."""
        self._check_up()
        c, ends = self._ends(cable)
        for ns, ifn in ends:
            ip("link", "set", "dev", ifn, "up" if up else "down", ns=ns)
        if up:
            by_ns: dict[str, list[str]] = {}
            for ns, ifn in ends:
                by_ns.setdefault(ns, []).append(ifn)
            wait_operstate(by_ns)
        c.up = bool(up)
        self.cables[c.index].up = bool(up)

    def set_rate(self, cable: Cable | int, rate: str | None) -> None:
        """Re-shape a cable (both ends); None removes the shaping."""
        self._check_up()
        c, ends = self._ends(cable)
        if rate is not None:
            parse_rate(rate)
        for ns, ifn in ends:
            if rate is None:
                run_cmd(["tc", "-n", ns, "qdisc", "del", "dev", ifn, "root"], check=False)
            else:
                run_cmd(["tc", "-n", ns] + self._tbf_line(ifn, rate, c.mtu).split())
        c.rate = rate
        self.cables[c.index].rate = rate
        for h in self.hosts:
            for a in h.addresses:
                if a.cable == c.index:
                    a.rate = rate

    # ------------------------------------------------------------------ description

    def describe(self) -> str:
        lines = [f"cluster {self.name}: {len(self.hosts)} hosts, topology {self.topology}, "
                 f"{len(self.cables)} cables, mtu {self.mtu}"]
        lines.append("namespaces: " + " ".join(self.netns_names))
        for c in self.cables:
            rate = c.rate or "unshaped"
            if c.b is None:
                lines.append(f"  port {c.index}: {c.netns_a}:{c.ifname_a} {c.ip_a}/{c.prefix} <-> "
                             f"{c.netns_b}:{c.ifname_b} (bridge br0)  {rate}")
            else:
                lines.append(f"  cable {c.index} (h{c.a}-h{c.b} #{c.k}): {c.netns_a}:{c.ifname_a} "
                             f"{c.ip_a}/{c.prefix} <-> {c.netns_b}:{c.ifname_b} {c.ip_b}/{c.prefix}  {rate}")
        lines.append(f"run a command on host i:  ip netns exec {self.name}-h<i> CMD ...   "
                     f"(or: thunderlink cluster exec {self.name} <i> -- CMD ...)")
        return "\n".join(lines)
