"""Fix commands, written for the platform (and namespace) of the host they
are meant for."""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass, field

__all__ = ["Host"]


@dataclass
class Host:
    """Where checks run and fixes apply: platform, optional network namespace, name."""

    platform: str = field(default_factory=lambda: sys.platform)
    netns: str | None = None
    name: str = field(default_factory=socket.gethostname)

    @property
    def darwin(self) -> bool:
        return self.platform == "darwin"

    @property
    def label(self) -> str:
        return f"namespace {self.netns}" if self.netns else self.name

    def sudo(self, cmd: str) -> str:
        if self.netns:
            return f"sudo ip netns exec {self.netns} {cmd}"
        return f"sudo {cmd}"

    def addr_add(self, iface: str, ip: str, prefix: int | None) -> str:
        v6 = ":" in ip
        if prefix is None:
            prefix = 64 if v6 else 30
        if self.darwin:
            if v6:
                return self.sudo(f"ifconfig {iface} inet6 {ip} prefixlen {prefix} alias")
            mask = ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask
            return self.sudo(f"ifconfig {iface} inet {ip} netmask {mask}")
        return self.sudo(f"ip addr add {ip}/{prefix} dev {iface}")

    def link_up(self, iface: str) -> str:
        return self.sudo(f"ifconfig {iface} up" if self.darwin else f"ip link set dev {iface} up")

    def set_mtu(self, iface: str, mtu: int) -> str:
        return self.sudo(f"ifconfig {iface} mtu {mtu}" if self.darwin else f"ip link set dev {iface} mtu {mtu}")

    def route_via(self, ip: str, iface: str) -> str:
        if self.darwin:
            return self.sudo(f"route change {ip} -interface {iface}")
        plen = 128 if ":" in ip else 32
        return self.sudo(f"ip route replace {ip}/{plen} dev {iface}")

    def who_listens(self, port: int) -> str:
        if self.darwin:
            return self.sudo(f"lsof -nP -iTCP:{port} -sTCP:LISTEN")
        return self.sudo(f"ss -ltnp 'sport = :{port}'")

    def bridge_off(self, bridge: str, members: list[str]) -> list[str]:
        if self.darwin:
            cmds = [self.sudo(f"ifconfig {bridge} down")]
            cmds += [self.sudo(f"ifconfig {bridge} deletem {m}") for m in members]
            return cmds
        cmds = [self.sudo(f"ip link set dev {m} nomaster") for m in members]
        cmds.append(self.sudo(f"ip link set dev {bridge} down"))
        return cmds
