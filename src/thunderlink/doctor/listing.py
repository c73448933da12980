"""`thunderlink doctor` without a hostfile: this host's interfaces, and what
is wrong with its Thunderbolt set-up."""

from __future__ import annotations

import ipaddress
import sys

from ..hosts.interfaces import THUNDERBOLT_BRIDGE_ADVICE, Interface, list_interfaces
from .commands import Host
from .report import Check, Report, ok, problem, warn

__all__ = ["interface_table", "interface_checks", "rdma_table", "rdma_checks", "listing_report"]


def _speed(mbit: int | None) -> str:
    if not mbit:
        return "-"
    return f"{mbit / 1000:g} Gb/s" if mbit >= 1000 else f"{mbit} Mb/s"


def _state(itf: Interface) -> str:
    if not itf.up:
        return "down"
    return "up" if itf.running else "no-link"


def _mark(itf: Interface, by_name: dict[str, Interface]) -> str:
    if itf.thunderbolt_bridge:
        return "[Thunderbolt Bridge" + (f": {', '.join(itf.members)}" if itf.members else "") + "]"
    if itf.thunderbolt:
        port = f" ({itf.hardware_port})" if itf.hardware_port else ""
        masters = [b.name for b in by_name.values() if b.bridge and itf.name in b.members]
        return f"[Thunderbolt{port}" + (f", in {masters[0]}" if masters else "") + "]"
    if itf.wireless:
        return "[Wi-Fi]"
    if itf.loopback:
        return "[loopback]"
    if itf.hardware_port:
        return f"[{itf.hardware_port}]"
    return ""


def interface_table(interfaces: list[Interface]) -> str:
    by_name = {i.name: i for i in interfaces}
    rows = [("NAME", "STATE", "MTU", "SPEED", "ADDRESSES", "")]
    for itf in interfaces:
        addrs = " ".join(str(a) for a in itf.addresses) or "-"
        rows.append((itf.name, _state(itf), str(itf.mtu or "-"), _speed(itf.speed), addrs,
                     _mark(itf, by_name)))
    w = [max(len(r[k]) for r in rows) for k in range(5)]
    return "\n".join(
        ("  " + "  ".join(r[k].ljust(w[k]) for k in range(5)) + ("  " + r[5] if r[5] else "")).rstrip()
        for r in rows
    )


def _suggest_subnets(n: int) -> list[str]:
    """n /30 cable subnets, MLX-style (192.168.x.y/30)."""
    return [f"192.168.{100 + i // 64}.{(i % 64) * 4 + 1}" for i in range(n)]


def interface_checks(interfaces: list[Interface], host: Host | None = None) -> list[Check]:
    host = host or Host()
    out: list[Check] = []
    tb = [i for i in interfaces if i.thunderbolt and not i.bridge]
    bridges = [i for i in interfaces if i.thunderbolt_bridge]
    bridged = {m for b in bridges for m in b.members}
    if tb or bridges:
        out.append(ok("interface", "thunderbolt interfaces",
                      f"Thunderbolt interfaces: {', '.join(i.name for i in tb + bridges)}", where=host.label))
    else:
        hint = ("load the driver: sudo modprobe thunderbolt-net" if sys.platform.startswith("linux")
                else "connect a Thunderbolt cable" if host.darwin else "")
        out.append(ok("interface", "no thunderbolt interfaces",
                      "no Thunderbolt interfaces found (fine for other IP links"
                      + (f"; for Thunderbolt: {hint})" if hint else ")"), where=host.label))

    for b in bridges:
        active = b.up and (b.ipv4 or b.members)
        if not active:
            out.append(ok("bridge", "thunderbolt bridge inactive", f"Thunderbolt Bridge {b.name} is inactive",
                          iface=b.name, where=host.label))
            continue
        cmds = host.bridge_off(b.name, b.members)
        subnets = _suggest_subnets(len(b.members))
        for m, ip in zip(b.members, subnets):
            cmds.append(host.addr_add(m, ip, 30) + f"    # the other end of this cable takes .{int(ip.rsplit('.', 1)[1]) + 1}")
        out.append(warn(
            "bridge", "Thunderbolt Bridge in use",
            f"{b.name} is the Thunderbolt Bridge" + (f" (members: {', '.join(b.members)})" if b.members else "")
            + f" and is up{' with ' + ', '.join(map(str, b.ipv4)) if b.ipv4 else ''}.\n" + THUNDERBOLT_BRIDGE_ADVICE,
            "take the Thunderbolt ports out of the bridge and address each cable on its own:\n"
            + "\n".join(cmds)
            + ("\n(or in System Settings > Network, make Thunderbolt Bridge inactive; "
               "mlx.distributed_config --auto-setup does the same)" if host.darwin else ""),
            iface=b.name, where=host.label))

    for i in tb:
        if i.name in bridged or not i.up:
            continue
        v4 = i.ipv4
        if i.running and not v4:
            out.append(warn("interface", "no IPv4 address",
                            f"Thunderbolt interface {i.name} is connected but has no IPv4 address",
                            "give each cable its own /30 subnet, e.g. "
                            + host.addr_add(i.name, _suggest_subnets(1)[0], 30)
                            + " (and .2 at the other end)", iface=i.name, where=host.label))
        for a in v4:
            if ipaddress.ip_address(a.ip).is_link_local:
                out.append(warn("interface", "self-assigned address",
                                f"{i.name} has the self-assigned address {a} (no static address on the cable): "
                                f"every cable then shares 169.254.0.0/16 and routes are ambiguous",
                                "give each cable its own /30 subnet, e.g. "
                                + host.addr_add(i.name, _suggest_subnets(1)[0], 30),
                                iface=i.name, where=host.label))

    # Overlapping subnets on different interfaces: the kernel picks one route,
    # possibly Wi-Fi/LAN instead of the cable.
    nets = []
    for i in interfaces:
        if i.loopback or not i.up:
            continue
        for a in i.ipv4:
            n = a.network()
            if n is not None and n.prefixlen < 32:
                nets.append((i, a, n))
    seen = set()
    for x in range(len(nets)):
        for y in range(x + 1, len(nets)):
            (i1, a1, n1), (i2, a2, n2) = nets[x], nets[y]
            if i1.name == i2.name or not n1.overlaps(n2):
                continue
            pair = tuple(sorted((i1.name, i2.name)))
            if pair in seen:
                continue
            seen.add(pair)
            involved_tb = i1.thunderbolt or i2.thunderbolt
            mk = problem if involved_tb else warn
            out.append(mk(
                "subnet", "overlapping subnets",
                f"{i1.name} ({a1}) and {i2.name} ({a2}) are on overlapping subnets: traffic for "
                f"{n1 if n1.prefixlen >= n2.prefixlen else n2} may leave through either interface"
                + (" (through the wrong cable)" if i1.thunderbolt and i2.thunderbolt else
                   " (e.g. over Wi-Fi/LAN instead of the cable)" if involved_tb else ""),
                "give every Thunderbolt cable its own /30 subnet that no other interface uses"
                if involved_tb else "give the interfaces distinct subnets",
                iface=f"{i1.name}, {i2.name}", where=host.label))
    return out


def rdma_table(ports: list[dict], why: str) -> str:
    """The RDMA ports this process sees (what ibv_devinfo shows), or why none."""
    if not ports:
        return f"  RDMA: none ({why})"
    rows = [("RDMA DEVICE", "PORT", "STATE", "LINK", "MTU", "GID")]
    for p in ports:
        if p["state"] == "error":
            rows.append((p["device"], str(p["port"]), "error", p.get("error", ""), "", ""))
            continue
        gid = f"[{p['gid_index']}] {p['gid']}" if p["gid_index"] >= 0 else "-"
        rows.append((p["device"], str(p["port"]), p["state"], p["link_layer"], str(p["mtu"] or "-"), gid))
    w = [max(len(r[k]) for r in rows) for k in range(6)]
    return "\n".join(("  " + "  ".join(r[k].ljust(w[k]) for k in range(6))).rstrip() for r in rows)


def rdma_checks(ports: list[dict], why: str, host: Host | None = None) -> list[Check]:
    host = host or Host()
    active = [p for p in ports if p["state"] == "active"]
    if active:
        names = ", ".join(sorted({p["device"] for p in active}))
        return [ok("rdma", "rdma devices", f"RDMA devices with an active port: {names} "
                   "(THUNDERLINK_TRANSPORT=auto uses RDMA between hosts where both ends have one)",
                   where=host.label)]
    if ports:
        return [warn("rdma", "no active rdma port",
                     "RDMA devices found, but no port is active: "
                     + ", ".join(f"{p['device']} port {p['port']} {p['state']}" for p in ports),
                     "connect the cable (Thunderbolt 5 on both Macs, macOS 26.2 or later) and give its "
                     "interface an IPv4 address", where=host.label)]
    return [ok("rdma", "no rdma", f"no RDMA ({why}): links use TCP (fine without RDMA hardware)",
               where=host.label)]


def listing_report(host: Host | None = None) -> Report:
    from ..bindings.comm import rdma_devices

    host = host or Host()
    its = list_interfaces()
    rep = Report(header=[f"thunderlink doctor: interfaces of {host.label} ({host.platform})"])
    rep.text_sections.append(interface_table(its))
    rep.extend(interface_checks(its, host))
    rep.extra["interfaces"] = [i.to_dict() for i in its]
    ports, why = rdma_devices()
    rep.text_sections.append(rdma_table(ports, why))
    rep.extend(rdma_checks(ports, why, host))
    rep.extra["rdma"] = {"ports": ports, "why": why}
    return rep
