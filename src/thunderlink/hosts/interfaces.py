"""This host's network interfaces: addresses, MTU, speed, state, and which
ones are Thunderbolt.

Linux: Thunderbolt networking is the ``thunderbolt-net`` driver, whose
interfaces are named ``thunderbolt0``, ``thunderbolt1``, ... A Linux bridge
whose members are such interfaces is reported like the macOS Thunderbolt
Bridge.

macOS: ``networksetup -listallhardwareports`` names the hardware port of
every device ("Thunderbolt 1" -> en2, "Thunderbolt Bridge" -> bridge0,
"Wi-Fi" -> en0); the members of a bridge come from ``ifconfig bridgeN``.

Everything here is read-only and never raises for a missing tool: a helper
that cannot run answers "unknown" (None / empty). The parsers of the macOS
tools' output are plain functions so that they can be tested anywhere.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field

__all__ = [
    "IfAddress",
    "Interface",
    "Route",
    "list_interfaces",
    "local_addresses",
    "interface_of",
    "is_local",
    "route_to",
    "thunderbolt_bridge_advice",
    "parse_hardware_ports",
    "parse_bridge_members",
    "parse_route_get_macos",
    "parse_route_get_linux",
    "prefix_of_netmask",
]

_TOOL_TIMEOUT = 5.0

THUNDERBOLT_BRIDGE_ADVICE = (
    "per-cable links are preferred over the Thunderbolt Bridge: the bridge joins all "
    "Thunderbolt ports into one network without loop protection, so in a ring of 3 or more "
    "hosts frames circulate around the ring; give each cable its own /30 subnet instead "
    "(as mlx.distributed_config does)"
)


@dataclass(frozen=True)
class IfAddress:
    ip: str  # without a %scope suffix
    prefix: int | None
    family: int  # 4 or 6

    def network(self):
        """The subnet (ipaddress network), or None if the prefix is unknown."""
        if self.prefix is None:
            return None
        try:
            return ipaddress.ip_network(f"{self.ip}/{self.prefix}", strict=False)
        except ValueError:
            return None

    def __str__(self):
        return f"{self.ip}/{self.prefix}" if self.prefix is not None else self.ip


@dataclass
class Interface:
    name: str
    addresses: list[IfAddress] = field(default_factory=list)
    mtu: int | None = None
    speed: int | None = None  # Mbit/s; None when the driver does not say
    up: bool = False  # administratively up
    running: bool = False  # link (carrier) present
    loopback: bool = False
    wireless: bool = False
    thunderbolt: bool = False  # a Thunderbolt port, or a bridge of Thunderbolt ports
    bridge: bool = False
    members: list[str] = field(default_factory=list)  # bridge members
    hardware_port: str | None = None  # macOS: what networksetup calls it
    mac: str | None = None

    @property
    def thunderbolt_bridge(self) -> bool:
        return self.bridge and self.thunderbolt

    @property
    def kind(self) -> str:
        if self.loopback:
            return "loopback"
        if self.thunderbolt_bridge:
            return "thunderbolt-bridge"
        if self.thunderbolt:
            return "thunderbolt"
        if self.wireless:
            return "wi-fi"
        if self.bridge:
            return "bridge"
        return "other"

    @property
    def ipv4(self) -> list[IfAddress]:
        return [a for a in self.addresses if a.family == 4]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["addresses"] = [str(a) for a in self.addresses]
        d["kind"] = self.kind
        return d


@dataclass(frozen=True)
class Route:
    """Where the kernel sends packets for ``dst``: out ``dev`` (None when
    there is no route; ``error`` then says why)."""

    dst: str
    dev: str | None = None
    src: str | None = None
    gateway: str | None = None
    local: bool = False
    error: str | None = None


# --------------------------------------------------------------------------- helpers


def _run(argv: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=_TOOL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _strip_scope(ip: str) -> str:
    return ip.split("%", 1)[0]


def prefix_of_netmask(netmask: str | None, family: int) -> int | None:
    if not netmask:
        return None
    try:
        if family == 4:
            return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
        bits = bin(int(ipaddress.IPv6Address(_strip_scope(netmask))))[2:].rstrip("0")
        return len(bits) if set(bits) <= {"1"} else None
    except ValueError:
        return None


def parse_hardware_ports(text: str) -> dict[str, str]:
    """``networksetup -listallhardwareports`` -> {device: hardware port name}."""
    out: dict[str, str] = {}
    port = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Hardware Port:"):
            port = line.split(":", 1)[1].strip()
        elif line.startswith("Device:") and port is not None:
            dev = line.split(":", 1)[1].strip()
            if dev:
                out[dev] = port
            port = None
    return out


def parse_bridge_members(text: str) -> list[str]:
    """``ifconfig bridgeN`` (macOS) -> the member interfaces."""
    return re.findall(r"^\s*member:\s*(\S+)", text, flags=re.MULTILINE)


def parse_route_get_macos(dst: str, text: str, rc: int = 0) -> Route:
    """``route -n get DST`` (macOS) -> Route."""
    fields = {}
    for line in text.splitlines():
        if ":" in line:
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
    dev = fields.get("interface")
    if rc != 0 or not dev:
        err = text.strip().splitlines()[-1] if text.strip() else "no route"
        return Route(dst=dst, error=err)
    gw = fields.get("gateway")
    flags = fields.get("flags", "")
    return Route(dst=dst, dev=dev, gateway=gw if gw and "GATEWAY" in flags else None,
                 local=dev.startswith("lo"))


def parse_route_get_linux(dst: str, text: str, rc: int = 0, stderr: str = "") -> Route:
    """``ip -j route get DST`` -> Route."""
    import json

    if rc != 0:
        err = (stderr or text).strip() or "no route"
        err = err.replace("RTNETLINK answers: ", "")
        return Route(dst=dst, error=err)
    try:
        r = json.loads(text)[0]
    except (ValueError, IndexError, KeyError):
        return Route(dst=dst, error=f"cannot parse `ip route get`: {text.strip()[:200]}")
    kind = r.get("type", "unicast")
    if kind in ("unreachable", "prohibit", "blackhole"):
        return Route(dst=dst, error=f"route is {kind}")
    return Route(dst=dst, dev=r.get("dev"), src=r.get("prefsrc"), gateway=r.get("gateway"),
                 local=kind == "local")


# --------------------------------------------------------------------------- platform specifics


def _linux_details(name: str) -> dict:
    base = f"/sys/class/net/{name}"
    d: dict = {}
    try:
        driver = os.path.basename(os.path.realpath(f"{base}/device/driver"))
    except OSError:
        driver = ""
    d["thunderbolt"] = name.startswith("thunderbolt") or driver in ("thunderbolt-net", "thunderbolt_net")
    d["wireless"] = os.path.isdir(f"{base}/wireless") or os.path.isdir(f"{base}/phy80211")
    d["bridge"] = os.path.isdir(f"{base}/bridge")
    if d["bridge"]:
        try:
            d["members"] = sorted(os.listdir(f"{base}/brif"))
        except OSError:
            d["members"] = []
    return d


_DARWIN_PORTS: dict[str, str] | None = None


def _darwin_ports() -> dict[str, str]:
    global _DARWIN_PORTS
    if _DARWIN_PORTS is None:
        cp = _run(["networksetup", "-listallhardwareports"])
        _DARWIN_PORTS = parse_hardware_ports(cp.stdout) if cp and cp.returncode == 0 else {}
    return _DARWIN_PORTS


def _darwin_details(name: str, ports: dict[str, str]) -> dict:
    port = ports.get(name)
    d: dict = {"hardware_port": port}
    d["thunderbolt"] = bool(port and port.startswith("Thunderbolt"))
    d["wireless"] = port in ("Wi-Fi", "AirPort")
    d["bridge"] = name.startswith("bridge")
    if d["bridge"]:
        cp = _run(["ifconfig", name])
        d["members"] = parse_bridge_members(cp.stdout) if cp and cp.returncode == 0 else []
    return d


# --------------------------------------------------------------------------- public API


def list_interfaces() -> list[Interface]:
    """Every interface of this host (this network namespace), sorted by name."""
    import psutil

    addrs = psutil.net_if_addrs()
    try:
        stats = psutil.net_if_stats()
    except OSError:
        stats = {}
    darwin = sys.platform == "darwin"
    linux = sys.platform.startswith("linux")
    ports = _darwin_ports() if darwin else {}
    out: dict[str, Interface] = {}
    for name in sorted(set(addrs) | set(stats)):
        itf = Interface(name=name)
        for a in addrs.get(name, []):
            if a.family == socket.AF_INET:
                itf.addresses.append(IfAddress(a.address, prefix_of_netmask(a.netmask, 4), 4))
            elif a.family == socket.AF_INET6:
                itf.addresses.append(IfAddress(_strip_scope(a.address), prefix_of_netmask(a.netmask, 6), 6))
            elif getattr(psutil, "AF_LINK", None) is not None and a.family == psutil.AF_LINK:
                itf.mac = a.address
        st = stats.get(name)
        if st is not None:
            itf.mtu = st.mtu or None
            itf.speed = st.speed or None
            flags = set(filter(None, (getattr(st, "flags", "") or "").split(",")))
            itf.up = "up" in flags if flags else bool(st.isup)
            itf.running = "running" in flags if flags else bool(st.isup)
            itf.loopback = "loopback" in flags
        if not itf.loopback:
            itf.loopback = name == "lo" or name.startswith("lo0") or any(
                ipaddress.ip_address(a.ip).is_loopback for a in itf.addresses)
        details = _linux_details(name) if linux else _darwin_details(name, ports) if darwin else {}
        for k, v in details.items():
            setattr(itf, k, v)
        out[name] = itf
    # A bridge of Thunderbolt ports is the Thunderbolt Bridge (macOS also names it so).
    for itf in out.values():
        if itf.bridge and not itf.thunderbolt:
            itf.thunderbolt = any(out[m].thunderbolt for m in itf.members if m in out and not out[m].bridge)
        if itf.bridge and itf.hardware_port == "Thunderbolt Bridge":
            itf.thunderbolt = True
    return list(out.values())


def thunderbolt_bridge_advice(itf: Interface) -> str:
    members = f" (members: {', '.join(itf.members)})" if itf.members else ""
    return f"{itf.name} is a Thunderbolt Bridge{members}: {THUNDERBOLT_BRIDGE_ADVICE}"


def local_addresses(interfaces: list[Interface] | None = None) -> set[str]:
    """Every IP address of this host (IPv4 and IPv6, without %scope)."""
    its = list_interfaces() if interfaces is None else interfaces
    return {a.ip for itf in its for a in itf.addresses}


def _normalise(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(_strip_scope(ip)))
    except ValueError:
        return ip


def is_local(ip: str, interfaces: list[Interface] | None = None) -> bool:
    """Can this host bind ``ip``? (Linux: all of 127.0.0.0/8 is local.)"""
    return interface_of(ip, interfaces) is not None


def interface_of(ip: str, interfaces: list[Interface] | None = None) -> str | None:
    """The name of the interface that holds ``ip``, or None if no local one does."""
    its = list_interfaces() if interfaces is None else interfaces
    want = _normalise(ip)
    for itf in its:
        for a in itf.addresses:
            if _normalise(a.ip) == want:
                return itf.name
    try:
        addr = ipaddress.ip_address(want)
    except ValueError:
        return None
    if addr.is_loopback and addr.version == 4 and sys.platform.startswith("linux"):
        for itf in its:
            for a in itf.ipv4:
                net = a.network()
                if itf.loopback and net is not None and addr in net:
                    return itf.name
    return None


def route_to(ip: str) -> Route:
    """The route this host would use to reach ``ip`` (Linux: ``ip route get``;
    macOS: ``route -n get``)."""
    dst = _strip_scope(ip)
    if sys.platform.startswith("linux"):
        cp = _run(["ip", "-j", "route", "get", dst])
        if cp is None:
            return Route(dst=dst, error="cannot run `ip route get` (install iproute2)")
        return parse_route_get_linux(dst, cp.stdout, cp.returncode, cp.stderr)
    if sys.platform == "darwin":
        cp = _run(["route", "-n", "get", dst])
        if cp is None:
            return Route(dst=dst, error="cannot run `route -n get`")
        return parse_route_get_macos(dst, cp.stdout + cp.stderr, cp.returncode)
    return Route(dst=dst, error=f"routes cannot be read on {sys.platform}")
