"""Emulated Thunderbolt clusters on one Linux box, built from network namespaces.

Each emulated host is a network namespace; each Thunderbolt "cable" is a veth
pair whose two ends live in the two hosts' namespaces and which carries its own
/30 IPv4 subnet, as on a real Mac Thunderbolt ring (MLX's tooling assigns a
192.168.x.y/30 per cable).  Cables can be rate-shaped with ``tbf``, given an MTU
up to 65520 (Linux thunderbolt-net's maximum), taken down and up mid-run, and
their byte counters read.  Non-neighbours are *not* routable (no forwarding, no
routes beyond the connected /30s), exactly like a real ring.

Everything created is recorded by name and removed again by :meth:`Cluster.down`
(idempotent), on ``with`` exit, at interpreter exit (``atexit``) and on
SIGTERM/SIGINT (handlers chain to whatever was installed before) -- the latter
two only in the process that created the cluster.  A cluster created from the
CLI (``thunderlink cluster up``) persists; it is described by a state file
``/run/thunderlink/clusters/<name>.json`` (directory overridable with
``$THUNDERLINK_CLUSTER_STATE_DIR``) so that ``thunderlink cluster down`` in
another process can remove it.  In-process clusters write a state file too (it
records the owner pid), so that leftovers of a SIGKILLed process can be removed
with ``thunderlink cluster down --all``.

Only the standard library is used, and of thunderlink only its configuration
(the one reader of environment variables): no compiled code.

Shaping choice (``tbf``, egress on both veth ends = a full-duplex cable):

* ``burst`` = the larger of 1 ms worth of tokens at the rate, 2 x (MTU + 14)
  and 64 KiB, rounded up to 4 KiB and capped at 64 MiB (10gbit -> 1.25 MB,
  5gbit -> 625 KB, 1gbit -> 128 KiB at MTU 65520).  Modern tbf uses
  hrtimers, so the old "burst >= rate/HZ" rule (5 MB at 10gbit with HZ=250) is
  not needed: with 1 ms of burst a single Python TCP stream reaches ~95% of
  the rate at MTU 1500 (the remainder is exactly the Ethernet+IP+TCP header
  overhead that tbf counts and goodput does not) and ~100% at MTU 65520;
  larger bursts (2-4 MB) measured the same.  The 2 x MTU floor keeps full
  frames (and GSO segments) from being dropped at low rates.
* ``latency`` = 5 ms: the tbf queue holds rate x 5 ms (+ burst) -- enough for
  several TCP streams to share a cable without tail drops, while keeping the
  queueing delay bounded.  1 ms gave the same single-stream goodput.

Both can be overridden per cluster (``Cluster(..., burst=..., latency=...)``).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import errno
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

__all__ = [
    "Address",
    "Cable",
    "Cluster",
    "ClusterError",
    "Host",
    "available",
    "list_clusters",
    "main",
    "parse_rate",
    "state_dir",
    "tbf_params",
]

STATE_DIR_ENV = "THUNDERLINK_CLUSTER_STATE_DIR"  # read through thunderlink.config
DEFAULT_BASE = "10.231.0.0/16"
DEFAULT_PORT = 32400
DEFAULT_LATENCY = "5ms"
MAX_MTU = 65520  # Linux thunderbolt-net maximum
MIN_MTU = 68
TOPOLOGIES = ("ring", "mesh", "switch")
STATE_VERSION = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_CMD_TIMEOUT = 30.0


class ClusterError(RuntimeError):
    """A cluster could not be built, changed or removed (message says why and how to fix)."""


# --------------------------------------------------------------------------- data


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


# --------------------------------------------------------------------------- helpers


def state_dir() -> str:
    from ..config import cluster_state_dir

    return cluster_state_dir()


def parse_rate(rate: str | int | float) -> int:
    """A cable rate -> bit/s, read as every hostfile reads it (``config.parse_rate``:
    ``"10gbit"``, ``"500mbit"``, ``"1gbps"`` = 1 Gbit/s, a bare number = Gbit/s), so the
    string copied into the hostfile means what tc was told."""
    from ..config import parse_rate as gbit_per_s

    return round(gbit_per_s(rate, "cluster rate") * 1e9)


def tbf_params(rate: str, mtu: int = 1500, latency: str = DEFAULT_LATENCY,
               burst: int | str | None = None) -> dict[str, str]:
    """The tbf arguments used for ``rate`` (see the module docstring for the reasoning)."""
    bps = parse_rate(rate)
    if burst is None:
        b = max(bps / 8 / 1000.0, 2 * (mtu + 14), 64 * 1024)
        b = int(-(-b // 4096) * 4096)
        b = min(b, 64 * 1024 * 1024)
        burst = str(b)
    # tc reads "gbps" as bytes/s; hand it the bits we mean
    return {"rate": f"{bps}bit", "burst": str(burst), "latency": str(latency)}


def _run_cmd(argv: Sequence[str], *, input: str | None = None, check: bool = True,
             timeout: float = _CMD_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                            timeout=timeout)
    except FileNotFoundError as e:
        raise ClusterError(f"{argv[0]!r} not found: install iproute2 (apt-get install iproute2)") from e
    except subprocess.TimeoutExpired as e:
        raise ClusterError(f"command timed out after {timeout}s: {' '.join(argv)}") from e
    if check and cp.returncode != 0:
        msg = (cp.stderr or cp.stdout).strip()
        raise ClusterError(f"command failed (rc={cp.returncode}): {' '.join(argv)}"
                           + (f"\n  input: {input.strip()}" if input and len(input) < 2000 else "")
                           + f"\n  {msg}")
    return cp


def _ip(*args: str, ns: str | None = None, **kw) -> subprocess.CompletedProcess:
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    return _run_cmd(argv, **kw)


def _ip_batch(lines: list[str], ns: str | None = None, force: bool = False,
              check: bool = True) -> subprocess.CompletedProcess | None:
    if not lines:
        return None
    argv = ["ip"] + (["-n", ns] if ns else []) + (["-force"] if force else []) + ["-batch", "-"]
    return _run_cmd(argv, input="\n".join(lines) + "\n", check=check)


def _tc_batch(lines: list[str], ns: str, check: bool = True) -> subprocess.CompletedProcess | None:
    if not lines:
        return None
    return _run_cmd(["tc", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n", check=check)


def netns_list() -> list[str]:
    """Names of all named network namespaces on this box (``ip netns list``)."""
    cp = _ip("netns", "list", check=False)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _has_caps() -> bool:
    """CAP_SYS_ADMIN (21) and CAP_NET_ADMIN (12) in the effective set."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    eff = int(line.split()[1], 16)
                    return bool(eff & (1 << 21)) and bool(eff & (1 << 12))
    except OSError:
        pass
    return os.geteuid() == 0


_NEEDS_ROOT = ("needs root: creating network namespaces requires CAP_SYS_ADMIN and CAP_NET_ADMIN; "
               "run as root (sudo) or inside a privileged container (docker run --privileged)")

_AVAILABLE: dict[bool, tuple[bool, str]] = {}


def available(shaping: bool = False) -> tuple[bool, str]:
    """Whether emulated clusters can be made here, and if not, why (and how to fix it).

    With ``shaping=True`` also requires ``tc`` and the tbf qdisc.  The answer
    is cached; the first call creates and removes a probe namespace.
    """
    if shaping in _AVAILABLE:
        return _AVAILABLE[shaping]
    res = _available(shaping)
    _AVAILABLE[shaping] = res
    return res


def _available(shaping: bool) -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, f"emulated clusters need Linux network namespaces (this is {sys.platform})"
    if shutil.which("ip") is None:
        return False, "iproute2's 'ip' is not on PATH: install iproute2 (apt-get install iproute2)"
    if shaping and shutil.which("tc") is None:
        return False, "'tc' is not on PATH (needed for rate shaping): install iproute2"
    if not _has_caps():
        return False, _NEEDS_ROOT
    ns = f"tlprobe{os.getpid()}-{secrets.token_hex(2)}"
    try:
        cp = _ip("netns", "add", ns, check=False)
        if cp.returncode != 0:
            return False, ("cannot create network namespaces: " + cp.stderr.strip()
                           + " -- run as root in a privileged container, with /run writable")
        try:
            cp = _ip("link", "add", "tlpa", "type", "veth", "peer", "name", "tlpb", ns=ns, check=False)
            if cp.returncode != 0:
                return False, ("cannot create veth pairs: " + cp.stderr.strip()
                               + " -- the kernel needs CONFIG_VETH (modprobe veth)")
            if shaping:
                cp = _run_cmd(["tc", "-n", ns, "qdisc", "add", "dev", "tlpa", "root", "tbf",
                               "rate", "1gbit", "burst", "128k", "latency", "5ms"], check=False)
                if cp.returncode != 0:
                    return False, ("cannot install the tbf qdisc: " + cp.stderr.strip()
                                   + " -- the kernel needs CONFIG_NET_SCH_TBF (modprobe sch_tbf)")
        finally:
            _ip("netns", "del", ns, check=False)
    except ClusterError as e:
        return False, str(e)
    return True, "ok: root, iproute2 and network namespaces available"


# --------------------------------------------------------------------------- cleanup registry

_LIVE: dict[int, "Cluster"] = {}
_LIVE_LOCK = threading.RLock()
_HANDLERS_PID: int | None = None
_PREV_HANDLERS: dict[int, Any] = {}


def _cleanup_owned() -> None:
    pid = os.getpid()
    with _LIVE_LOCK:
        clusters = [c for c in _LIVE.values() if c._owner_pid == pid and not c.persistent]
    for c in clusters:
        try:
            c.down()
        except Exception as e:  # pragma: no cover - best effort at exit
            print(f"thunderlink.testing.cluster: cleanup of {c.name} failed: {e}", file=sys.stderr)


def _on_signal(signum, frame):
    _cleanup_owned()
    prev = _PREV_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(prev):
        return prev(signum, frame)
    if prev == signal.SIG_IGN:
        return None
    # SIG_DFL (or unknown, e.g. installed from C): die of the signal as we would have.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return None


def _install_cleanup_handlers() -> None:
    global _HANDLERS_PID
    pid = os.getpid()
    if _HANDLERS_PID == pid:
        return
    _HANDLERS_PID = pid
    atexit.register(_cleanup_owned)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still applies
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            prev = signal.getsignal(sig)
            if prev is _on_signal:
                continue
            _PREV_HANDLERS[sig] = prev if prev is not None else signal.SIG_DFL
            signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # pragma: no cover
            pass


# --------------------------------------------------------------------------- the cluster


class Cluster:
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
            with _LIVE_LOCK:
                _LIVE[id(self)] = self
            if not self.persistent:
                _install_cleanup_handlers()
            self._state = "up"  # from here on down() removes whatever got created
            try:
                self._write_state()
                self._create()
                self._write_state()
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
        if not _has_caps():
            raise ClusterError(_NEEDS_ROOT)
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
            cp = _ip("netns", "add", ns, check=False)
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
        _ip_batch(link_lines)
        for ns, lines in per_ns.items():
            _ip_batch(lines, ns=ns)
        for ns, lines in tc_ns.items():
            _tc_batch(lines, ns)
        # Packets sent before the kernel's linkwatch has activated a device's
        # qdisc (up to ~1 s after "up") are dropped; wait for operstate UP.
        ends: dict[str, list[str]] = {}
        for c in self.cables:
            ends.setdefault(c.netns_a, []).append(c.ifname_a)
            ends.setdefault(c.netns_b, []).append(c.ifname_b)
        _wait_operstate(ends)
        if fwd_on:
            # new namespaces may inherit ip_forward=1 from the root namespace; a
            # real Thunderbolt ring does not route between non-neighbours.
            for h in self.hosts:
                _run_cmd(["ip", "netns", "exec", h.netns, "sysctl", "-qw", "net.ipv4.ip_forward=0"],
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
                self._kill_procs()
                for ns in self._created_netns:
                    self._kill_netns_pids(ns)
                # Delete the links explicitly (in case something else keeps a
                # namespace alive), then the namespaces themselves.
                by_ns: dict[str, list[str]] = {}
                for ns, ifn in self._created_links:
                    if ns in self._created_netns:
                        by_ns.setdefault(ns, []).append(f"link del dev {ifn}")
                for ns, lines in by_ns.items():
                    _ip_batch(lines, ns=ns, force=True, check=False)
                for ns in self._created_netns:
                    cp = _ip("netns", "del", ns, check=False)
                    if cp.returncode != 0 and "No such file" not in cp.stderr:
                        errors.append(f"{ns}: {cp.stderr.strip()}")
                leftover = set(netns_list()) & set(self._created_netns)
                if leftover:
                    errors.append(f"namespaces still present: {sorted(leftover)}")
                else:
                    self._created_netns.clear()
                    self._created_links.clear()
                    self._remove_state()
            finally:
                self._in_down = False
                self._state = "down"
                with _LIVE_LOCK:
                    _LIVE.pop(id(self), None)
            if errors:
                raise ClusterError(f"cluster {self.name}: could not remove everything: " + "; ".join(errors))

    def _kill_procs(self) -> None:
        live = [p for p in self._procs if p.poll() is None]
        for p in live:
            _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in live:
            if p.poll() is None:
                _killpg(p.pid, signal.SIGKILL)
                try:
                    p.wait(2.0)
                except subprocess.TimeoutExpired:
                    pass
        self._procs.clear()

    @staticmethod
    def _kill_netns_pids(ns: str) -> None:
        """SIGKILL whatever still runs inside one of *our* namespaces (e.g. from `cluster exec`)."""
        cp = _ip("netns", "pids", ns, check=False)
        pids = [int(x) for x in cp.stdout.split() if x.isdigit()]
        me = os.getpid()
        for pid in pids:
            if pid != me:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if pids:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                cp = _ip("netns", "pids", ns, check=False)
                if not cp.stdout.split():
                    break
                time.sleep(0.02)

    # ------------------------------------------------------------------ state file

    def _state_path(self) -> str:
        return os.path.join(state_dir(), f"{self.name}.json")

    def to_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "name": self.name,
            "topology": self.topology,
            "hosts": [dataclasses.asdict(h) for h in self.hosts],
            "cables": [dataclasses.asdict(c) for c in self.cables],
            "switch_netns": self.switch_netns,
            "rate": self.rate,
            "mtu": self.mtu,
            "cables_per_link": self.cables_per_link,
            "base": self.base,
            "burst": self.burst,
            "latency": self.latency,
            "persistent": self.persistent,
            "owner_pid": self._owner_pid,
            "created_netns": list(self._created_netns) if self._created_netns else self.netns_names,
            "created_links": [list(x) for x in self._created_links],
            "created_at": time.time(),
        }

    def _write_state(self) -> None:
        path = self._state_path()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.to_state(), f, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            if self.persistent:
                raise ClusterError(f"cannot write cluster state file {path}: {e} "
                                   f"(set ${STATE_DIR_ENV} to a writable directory)") from e

    def _remove_state(self) -> None:
        try:
            os.unlink(self._state_path())
        except FileNotFoundError:
            pass
        except OSError:
            pass

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
        path = os.path.join(state_dir(), f"{name}.json")
        try:
            with open(path) as f:
                st = json.load(f)
        except FileNotFoundError:
            raise ClusterError(f"no cluster named {name!r} (no state file {path}); "
                               f"see `thunderlink cluster list`") from None
        except (OSError, ValueError) as e:
            raise ClusterError(f"cannot read cluster state {path}: {e}") from e
        return cls.from_state(st)

    # ------------------------------------------------------------------ processes

    def _check_up(self) -> None:
        if self._state != "up":
            raise ClusterError(f"cluster {self.name} is not up (state: {self._state})")

    def netns_argv(self, host: int | str, argv: Sequence[str]) -> list[str]:
        """``ip netns exec NS argv...`` for a host index (or a namespace name)."""
        ns = host if isinstance(host, str) else self.hosts[host].netns
        from .netns import command_in

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
            _ip("link", "set", "dev", ifn, "up" if up else "down", ns=ns)
        if up:
            by_ns: dict[str, list[str]] = {}
            for ns, ifn in ends:
                by_ns.setdefault(ns, []).append(ifn)
            _wait_operstate(by_ns)
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
                _run_cmd(["tc", "-n", ns, "qdisc", "del", "dev", ifn, "root"], check=False)
            else:
                _run_cmd(["tc", "-n", ns] + self._tbf_line(ifn, rate, c.mtu).split())
        c.rate = rate
        self.cables[c.index].rate = rate
        for h in self.hosts:
            for a in h.addresses:
                if a.cable == c.index:
                    a.rate = rate

    def qdisc(self, cable: Cable | int) -> dict:
        """``tc -j qdisc show`` of both ends: {"a": [...], "b": [...]}."""
        c, ends = self._ends(cable)
        out = {}
        for side, (ns, ifn) in zip("ab", ends):
            cp = _run_cmd(["tc", "-n", ns, "-j", "qdisc", "show", "dev", ifn])
            out[side] = json.loads(cp.stdout or "[]")
        return out

    def counters(self, cable: Cable | int) -> dict:
        """Byte/packet counters of both ends:
        {"a": {"tx_bytes", "rx_bytes", "tx_packets", "rx_packets", "tx_dropped", "rx_dropped"}, "b": {...}}.
        """
        c, ends = self._ends(cable)
        out: dict[str, dict[str, int]] = {}
        for side, (ns, ifn) in zip("ab", ends):
            cp = _ip("-s", "-j", "link", "show", "dev", ifn, ns=ns)
            st = json.loads(cp.stdout)[0]["stats64"]
            out[side] = {"tx_bytes": st["tx"]["bytes"], "rx_bytes": st["rx"]["bytes"],
                         "tx_packets": st["tx"]["packets"], "rx_packets": st["rx"]["packets"],
                         "tx_dropped": st["tx"].get("dropped", 0), "rx_dropped": st["rx"].get("dropped", 0)}
        return out

    # ------------------------------------------------------------------ probes / measurement

    _PROBE = r"""
import errno, json, socket, sys
timeout = float(sys.argv[1]); res = {}
for ip in sys.argv[2:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.settimeout(timeout)
    try:
        s.connect((ip, 9)); res[ip] = True
    except ConnectionRefusedError:
        res[ip] = True
    except OSError as e:
        res[ip] = False
    finally:
        s.close()
print(json.dumps(res))
"""

    def probe(self, host: int, ips: Iterable[str], timeout: float = 1.0) -> dict[str, bool]:
        """From inside ``host``: which of ``ips`` answer (TCP connect to port 9; refused = reachable).

        Uses one Python process for all targets; ``ping`` is not needed.
        """
        ips = list(ips)
        if not ips:
            return {}
        cp = self.exec(host, [sys.executable, "-c", self._PROBE, str(timeout), *ips],
                       timeout=timeout * len(ips) + 20)
        if cp.returncode != 0:
            raise ClusterError(f"probe in {self.netns(host)} failed: {cp.stderr.strip()}")
        return json.loads(cp.stdout.strip().splitlines()[-1])

    def can_reach(self, host: int, ip: str, timeout: float = 1.0) -> bool:
        return self.probe(host, [ip], timeout)[ip]

    _RECV = r"""
import json, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(float(sys.argv[3]))
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(float(sys.argv[3]))
buf = bytearray(1 << 20); mv = memoryview(buf); n = 0; t0 = None
while True:
    k = c.recv_into(mv)
    if not k:
        break
    if t0 is None:
        t0 = time.perf_counter()
    else:
        n += k
dt = time.perf_counter() - t0 if t0 else 0.0
print(json.dumps({"bytes": n, "seconds": dt}), flush=True)
"""
    _SEND = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
b = b"\0" * (1 << 20); end = time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < end:
    s.sendall(b)
s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
"""

    def measure_goodput(self, src: int, dst: int, dst_ip: str, seconds: float = 1.0,
                        port: int = 45321) -> float:
        """Goodput (bit/s) of one TCP stream from host ``src`` to ``dst_ip`` (an address of ``dst``)."""
        self._check_up()
        rx = self.run(dst, [sys.executable, "-c", self._RECV, dst_ip, str(port), str(seconds + 10)],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = rx.stdout.readline() if rx.stdout else ""
            if line.strip() != "ready":
                raise ClusterError(f"goodput receiver failed: {line}{rx.stderr.read() if rx.stderr else ''}")
            tx = self.exec(src, [sys.executable, "-c", self._SEND, dst_ip, str(port), str(seconds)],
                           timeout=seconds + 20)
            if tx.returncode != 0:
                raise ClusterError(f"goodput sender failed: {tx.stderr.strip()}")
            out, err = rx.communicate(timeout=seconds + 20)
        finally:
            if rx.poll() is None:
                _killpg(rx.pid, signal.SIGKILL)
                rx.wait(5)
        res = json.loads(out.strip().splitlines()[-1])
        return res["bytes"] * 8 / res["seconds"] if res["seconds"] > 0 else 0.0

    def goodput(self, cable: Cable | int, seconds: float = 1.0, reverse: bool = False,
                port: int = 45321) -> float:
        """Goodput (bit/s) of one TCP stream across ``cable`` (a -> b, or b -> a with reverse)."""
        c = self.cables[cable] if isinstance(cable, int) else cable
        if c.b is None:
            raise ClusterError("goodput(cable) needs a point-to-point cable; use measure_goodput() on a switch")
        if reverse:
            return self.measure_goodput(c.b, c.a, c.ip_a, seconds, port)
        return self.measure_goodput(c.a, c.b, c.ip_b, seconds, port)

    # ------------------------------------------------------------------ hostfiles

    def hostfile(self, port: int = DEFAULT_PORT) -> dict:
        """The thunderlink hostfile: one rank per host, one address per local cable end."""
        ranks = []
        for h in self.hosts:
            addrs = []
            for j, a in enumerate(h.addresses):
                d: dict[str, Any] = {"ip": a.ip, "port": port + j}
                if a.peer is not None:
                    d["peer"] = a.peer
                d["iface"] = a.iface
                d["prefix"] = a.prefix
                if a.rate:
                    d["rate"] = a.rate
                addrs.append(d)
            ranks.append({"host": h.netns, "netns": h.netns, "addresses": addrs})
        return {"version": 1, "ranks": ranks}

    def mlx_hostfile(self, port: int = DEFAULT_PORT) -> list[list[str]]:
        """MLX ring hostfile: rank r's list = the addresses rank r-1 connects to (r's cables facing r-1).

        MLX's ring backend has rank r listen on hostfile[r] and connect to every
        address of hostfile[r+1]; with k parallel cables that gives k
        connections per neighbour pair.  For mesh/switch one address per rank,
        reachable from its left neighbour.
        """
        n = len(self.hosts)
        out: list[list[str]] = []
        for h in self.hosts:
            left = (h.index - 1) % n
            entries = []
            for j, a in enumerate(h.addresses):
                if self.topology == "switch" or n == 1:
                    entries.append(f"{a.ip}:{port + j}")
                elif a.peer == left:
                    entries.append(f"{a.ip}:{port + j}")
            if self.topology == "mesh" and entries:
                entries = entries[:1]
            out.append(entries)
        return out

    def write_hostfile(self, path: str, port: int = DEFAULT_PORT, mlx: bool = False) -> None:
        data = self.mlx_hostfile(port) if mlx else self.hostfile(port)
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

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


def _wait_operstate(ends: dict[str, list[str]], timeout: float = 5.0) -> None:
    """Wait until every (netns -> ifnames) interface reports operstate UP.

    Until the kernel's linkwatch has processed a carrier change, a veth end
    may drop what it sends and a bridge port stays disabled (up to ~1 s).
    A per-device RTM_GETLINK (``ip link show dev X``) syncs linkwatch for that
    device on current kernels, so this usually returns at once; a link dump
    (``ip link show``) would not.
    """
    deadline = time.monotonic() + timeout
    pending = [(ns, i) for ns, ifs in ends.items() for i in ifs]
    while pending:
        still = []
        for ns, ifn in pending:
            cp = _ip("-j", "-d", "link", "show", "dev", ifn, ns=ns, check=False)
            try:
                info = json.loads(cp.stdout or "[]")[0]
            except (ValueError, IndexError):
                info = {}
            # a bridge port must also have reached the forwarding state
            port = (info.get("linkinfo") or {}).get("info_slave_data") or {}
            if info.get("operstate") != "UP" or port.get("state", "forwarding") != "forwarding":
                still.append((ns, ifn))
        pending = still
        if not pending:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"interfaces did not come up within {timeout}s: "
                               + ", ".join(f"{ns}:{i}" for ns, i in pending))
        time.sleep(0.01)


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    except OSError as e:  # pragma: no cover
        if e.errno != errno.ESRCH:
            raise


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_clusters() -> list[dict]:
    """The recorded clusters (state files), each with 'owner_alive' and 'present' added."""
    d = state_dir()
    out = []
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    existing = set(netns_list()) if shutil.which("ip") else set()
    for fn in names:
        if not fn.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, fn)) as f:
                st = json.load(f)
        except (OSError, ValueError):
            continue
        st["owner_alive"] = _pid_alive(int(st.get("owner_pid", -1)))
        st["present"] = [ns for ns in st.get("created_netns", []) if ns in existing]
        out.append(st)
    return out


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thunderlink cluster",
                                description="Emulated Thunderbolt clusters from network namespaces (needs root).")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create a cluster that persists until `down`")
    up.add_argument("--hosts", type=int, required=True)
    up.add_argument("--topology", choices=TOPOLOGIES, default="ring")
    up.add_argument("--rate", default=None, help="tc rate of every cable, e.g. 10gbit (default: unshaped)")
    up.add_argument("--mtu", type=int, default=1500, help=f"MTU of every cable (max {MAX_MTU})")
    up.add_argument("--cables", type=int, default=1, help="parallel cables per connected pair")
    up.add_argument("--name", default=None)
    up.add_argument("--base", default=DEFAULT_BASE, help="IPv4 range the /30 cable subnets are taken from")
    up.add_argument("--hostfile", default=None, help="write the thunderlink hostfile here")
    up.add_argument("--mlx-hostfile", default=None, help="write the MLX ring hostfile here")
    up.add_argument("--port", type=int, default=DEFAULT_PORT)
    up.add_argument("--json", action="store_true", help="print the state as JSON")
    dn = sub.add_parser("down", help="remove a cluster (or all recorded ones)")
    dn.add_argument("name", nargs="?")
    dn.add_argument("--all", action="store_true",
                    help="remove all recorded clusters that are persistent or whose owner process is gone")
    dn.add_argument("--force", action="store_true", help="with --all: also clusters of live processes")
    ls = sub.add_parser("list", help="list recorded clusters")
    ls.add_argument("--json", action="store_true")
    ex = sub.add_parser("exec", help="run a command inside a host: exec NAME HOST -- cmd args")
    ex.add_argument("name")
    ex.add_argument("host", help="host index (or namespace name)")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:
        if args.cmd == "up":
            c = Cluster(args.hosts, topology=args.topology, rate=args.rate, mtu=args.mtu,
                        cables_per_link=args.cables, name=args.name, base=args.base, persistent=True)
            c.up()
            if args.hostfile:
                c.write_hostfile(args.hostfile, args.port)
            if args.mlx_hostfile:
                c.write_hostfile(args.mlx_hostfile, args.port, mlx=True)
            if args.json:
                print(json.dumps(c.to_state(), indent=1))
            else:
                print(c.describe())
                if args.hostfile:
                    print(f"thunderlink hostfile: {args.hostfile}")
                if args.mlx_hostfile:
                    print(f"MLX hostfile: {args.mlx_hostfile}")
                print(f"remove with: thunderlink cluster down {c.name}")
            return 0
        if args.cmd == "down":
            if args.all == bool(args.name):
                p.error("give a cluster NAME or --all")
            if args.name:
                Cluster.attach(args.name).down()
                print(f"removed {args.name}")
                return 0
            rc = 0
            for st in list_clusters():
                if not st.get("persistent") and st["owner_alive"] and not args.force:
                    print(f"skipping {st['name']}: owned by live process {st.get('owner_pid')} (use --force)")
                    continue
                try:
                    Cluster.from_state(st).down()
                    print(f"removed {st['name']}")
                except ClusterError as e:
                    print(f"thunderlink cluster: error: {e}", file=sys.stderr)
                    rc = 1
            return rc
        if args.cmd == "list":
            cl = list_clusters()
            if args.json:
                print(json.dumps(cl, indent=1))
                return 0
            if not cl:
                print("no clusters")
                return 0
            print(f"{'NAME':<16} {'TOPOLOGY':<8} {'HOSTS':>5} {'CABLES':>6} {'RATE':<9} {'MTU':>5}  STATUS")
            for st in cl:
                owner = ("persistent" if st.get("persistent")
                         else f"pid {st.get('owner_pid')}" + ("" if st["owner_alive"] else " (dead)"))
                present = f"{len(st['present'])}/{len(st.get('created_netns', []))} netns"
                print(f"{st['name']:<16} {st['topology']:<8} {len(st['hosts']):>5} {len(st['cables']):>6} "
                      f"{st.get('rate') or '-':<9} {st.get('mtu', 1500):>5}  {owner}, {present}")
            return 0
        if args.cmd == "exec":
            cmd = list(args.argv)
            if cmd and cmd[0] == "--":
                cmd = cmd[1:]
            if not cmd:
                p.error("exec: give a command after --")
            c = Cluster.attach(args.name)
            if args.host.isdigit():
                i = int(args.host)
                if not 0 <= i < len(c.hosts):
                    raise ClusterError(f"host {i} out of range (cluster {c.name} has {len(c.hosts)} hosts)")
                ns = c.hosts[i].netns
            else:
                ns = args.host
                if ns not in c.netns_names:
                    raise ClusterError(f"{ns!r} is not a namespace of cluster {c.name}: {c.netns_names}")
            try:
                return subprocess.call(["ip", "netns", "exec", ns, *cmd])
            except KeyboardInterrupt:
                return 130
    except ClusterError as e:
        print(f"thunderlink cluster: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"thunderlink cluster: error: {e}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
