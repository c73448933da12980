"""Checks of a hostfile against this host, for one rank; and the checks that
need the hostfile only or several ranks' findings (MTUs of both cable ends).

Which ranks share a link, who dials whom over which cables, and from which
address, are the core's answers (Hostfile.link, from csrc/core/topo.c). The
doctor probes every link from both ends: the dialing rank as the core dials,
the listening rank the way back along each cable, from its end to the
dialer's.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

from ..hosts import interfaces as ifs
from ..hosts.hostfile import Address, Hostfile, linked
from .commands import Host
from .report import Check, ok, problem, warn

__all__ = ["hostfile_checks", "select_ranks", "check_rank", "mtu_checks", "probes", "cable_pairs"]


# --------------------------------------------------------------------------- small helpers


def resolve(host: str) -> tuple[str | None, str | None]:
    """An IP literal as is; a name through the resolver. (ip, error)."""
    h = host.strip("[]")
    try:
        ipaddress.ip_address(h.split("%", 1)[0])
        return h, None
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(h, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        return None, f"cannot resolve {host!r}: {e.strerror}"
    return infos[0][4][0], None


def _net(ip: str, prefix: int | None):
    if prefix is None:
        return None
    try:
        return ipaddress.ip_network(f"{ip.split('%', 1)[0]}/{prefix}", strict=False)
    except ValueError:
        return None


def _in(ip: str, net) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]) in net
    except ValueError:
        return False


def other_end(ip: str, prefix: int | None) -> str | None:
    """The other host address of a /30 (or /31)."""
    net = _net(ip, prefix)
    if net is None or net.version != 4 or net.prefixlen not in (30, 31):
        return None
    hosts = [str(h) for h in (net.hosts() if net.prefixlen == 30 else net)]
    rest = [h for h in hosts if h != ip]
    return rest[0] if len(rest) == 1 else None


def _loc(r: int, j: int) -> str:
    return f"ranks[{r}].addresses[{j}]"


# --------------------------------------------------------------------------- hostfile-only checks


def hostfile_checks(hf: Hostfile) -> list[Check]:
    out: list[Check] = []
    n = hf.size
    where = hf.path or "hostfile"
    out.append(ok("hostfile", "hostfile read",
                  f"hostfile {where}: {n} rank{'s' if n != 1 else ''}, {hf.format} format"))
    # The ring must follow links.
    if n > 2:
        if hf.ring is None:
            out.append(problem(
                "ring", "no ring through the links", hf.ring_problem,
                "the doctor's topology lists the links found; add cables (both ends, each address with "
                "\"peer\": the other rank) or addresses without \"peer\" that every rank may use, or, if "
                "the links are right, give the order as \"ring\" in the hostfile"))
        else:
            bad = [(a, b) for a, b in zip(hf.ring, hf.ring[1:] + hf.ring[:1]) if not linked(hf, a, b)]
            if bad:
                out.append(problem(
                    "ring", "ring neighbours without a link",
                    "ring order " + str(hf.ring) + " puts unlinked ranks next to each other: "
                    + ", ".join(f"{a}-{b}" for a, b in bad),
                    "fix \"ring\" to follow the cables, or add addresses facing those neighbours"))
    # Cables listed at one end only.
    for r, spec in enumerate(hf.ranks):
        for j, a in enumerate(spec.addresses):
            if a.peer is None or hf.format != "thunderlink":
                continue
            p = a.peer
            if any(x.peer == r for x in hf.ranks[p].addresses):
                continue
            oe = other_end(a.ip, a.prefix)
            entry = '{"ip": "' + (oe or "<rank %d's address on this cable>" % p) + f'", "peer": {r}'
            if a.prefix is not None:
                entry += f', "prefix": {a.prefix}'
            entry += ', "iface": "<its interface>"}'
            out.append(warn(
                "cable", "cable listed at one end only",
                f"{_loc(r, j)} ({a.ip}) is rank {r}'s end of a cable to rank {p}, but rank {p} lists no "
                f"address facing rank {r}: rank {p} cannot pin its end of that cable",
                f"add the other end to ranks[{p}].addresses: {entry}", rank=r, address=str(a)))
    # One IP given to ranks on different hosts.
    by_ip: dict[str, list[int]] = {}
    for r, spec in enumerate(hf.ranks):
        for a in spec.addresses:
            by_ip.setdefault(a.ip, [])
            if r not in by_ip[a.ip]:
                by_ip[a.ip].append(r)
    for ip, rs in by_ip.items():
        hosts = {hf.ranks[r].host for r in rs}
        if len(rs) > 1 and len(hosts) > 1:
            out.append(problem(
                "address", "one address on several hosts",
                f"{ip} is given to ranks {', '.join(map(str, rs))}, which the hostfile puts on different hosts "
                f"({', '.join(sorted(hosts))}): one of them has the wrong address",
                "give every rank the address of its own host (thunderlink doctor on each host lists its "
                "addresses)"))
    return out


# --------------------------------------------------------------------------- which rank(s) live here


def select_ranks(hf: Hostfile, interfaces: list[ifs.Interface], hostname: str | None = None) -> list[int]:
    """Ranks with an address on this host; else ranks whose host is this host's name."""
    out = []
    for r, spec in enumerate(hf.ranks):
        for a in spec.addresses:
            ip, _ = resolve(a.ip)
            if ip is not None and ifs.interface_of(ip, interfaces) is not None:
                out.append(r)
                break
    if out:
        return out
    hostname = hostname or socket.gethostname()
    names = {hostname, hostname.split(".")[0]}
    for r, spec in enumerate(hf.ranks):
        cands = {spec.host, spec.host.split(".")[0]}
        if spec.ssh:
            h = spec.ssh.split("@")[-1]
            cands |= {h, h.split(".")[0]}
        if cands & names:
            out.append(r)
    return out


# --------------------------------------------------------------------------- one rank, on its host


def _address_checks(hf: Hostfile, r: int, its: list[ifs.Interface], host: Host) -> tuple[list[Check], list[dict]]:
    out: list[Check] = []
    facts: list[dict] = []
    by_name = {i.name: i for i in its}
    spec = hf.ranks[r]
    for j, a in enumerate(spec.addresses):
        if a.rdma:
            out.append(_rdma_device_check(a.rdma, r, j, a, host))
    for j, a in enumerate(spec.addresses):
        loc = _loc(r, j)
        fact = {"index": j, "ip": a.ip, "port": a.port, "peer": a.peer, "named_iface": a.iface,
                "iface": None, "mtu": None, "up": None, "running": None, "prefix": None, "local": False}
        facts.append(fact)
        ip, err = resolve(a.ip)
        kw = dict(rank=r, address=str(a), iface=a.iface, where=host.label)
        if ip is None:
            out.append(problem("address", "unresolvable address", f"{loc}: {err}",
                               f"write an IP address in {loc}.ip", **kw))
            continue
        if ipaddress.ip_address(ip.split("%", 1)[0]).is_unspecified:
            out.append(problem("address", "unspecified address",
                               f"{loc} is {ip}, which peers cannot connect to",
                               f"write this host's address on the cable in {loc}.ip", **kw))
            continue
        actual = ifs.interface_of(ip, its)
        if actual is None:
            out.append(problem("address", "address not on this host",
                               f"{ip} ({loc}) is not an address of {host.label}, but the hostfile gives it "
                               f"to rank {r} (host {spec.host!r})",
                               _fix_not_local(hf, r, j, a, ip, its, host), **kw))
            continue
        itf = by_name[actual]
        have = next((x for x in itf.addresses if x.ip.split("%")[0] == ip.split("%")[0]), None)
        fact.update(iface=actual, mtu=itf.mtu, up=itf.up, running=itf.running, local=True,
                    prefix=have.prefix if have else None, thunderbolt=itf.thunderbolt)
        kw["iface"] = actual
        if a.iface and a.iface != actual and not itf.loopback:
            exists = a.iface in by_name
            out.append(problem(
                "interface", "address on another interface",
                f"{ip} ({loc}) is on interface {actual}, but the hostfile says \"iface\": \"{a.iface}\""
                + ("" if exists else f" (there is no interface {a.iface} here)"),
                f"set {loc}.iface to \"{actual}\" (or move {ip} to {a.iface})", **kw))
        else:
            out.append(ok("address", "address local",
                          f"{ip} is on {actual} (mtu {itf.mtu}, {'up' if itf.up else 'down'})", **kw))
        if not itf.up:
            out.append(problem("interface", "interface down",
                               f"interface {actual}, which holds rank {r}'s address {ip}, is down",
                               host.link_up(actual), **kw))
        elif not itf.running:
            out.append(problem("interface", "no link",
                               f"interface {actual} (rank {r}'s address {ip}) is up but has no link: "
                               f"the cable is unplugged or the other end is down",
                               "check the cable; bring up the other end's interface", **kw))
        if a.prefix is not None and have is not None and have.prefix is not None and a.prefix != have.prefix:
            out.append(warn("address", "prefix differs",
                            f"{loc} says prefix /{a.prefix}, but {ip} is configured as /{have.prefix} on {actual}",
                            f"set {loc}.prefix to {have.prefix}, or re-add the address: "
                            + host.addr_add(actual, ip, a.prefix), **kw))
        if itf.thunderbolt_bridge and hf.size >= 3:
            out.append(warn("bridge", "Thunderbolt Bridge in a ring",
                            f"rank {r}'s address {ip} is on the Thunderbolt Bridge {actual} and the job has "
                            f"{hf.size} ranks: {ifs.THUNDERBOLT_BRIDGE_ADVICE}",
                            "\n".join(host.bridge_off(actual, itf.members))
                            + "\nthen give each Thunderbolt port its own /30 and list one address per cable "
                            "(with \"peer\") in the hostfile", **kw))
    return out, facts


def _rdma_device_check(name: str, r: int, j: int, a: Address, host: Host) -> Check:
    """The hostfile's "rdma" device of rank r's address j: present here, with
    an active port?"""
    from ..bindings.comm import rdma_devices

    loc = _loc(r, j)
    kw = dict(rank=r, address=str(a), iface=a.iface, where=host.label)
    ports, why = rdma_devices()
    mine = [p for p in ports if p["device"] == name]
    if not mine:
        have = sorted({p["device"] for p in ports})
        return problem("rdma", "RDMA device missing",
                       f"{loc}.rdma names {name}, which {host.label} does not have ("
                       + (f"it has {', '.join(have)}" if have else f"no RDMA device: {why}") + ")",
                       f"set {loc}.rdma to " + (f"one of {', '.join(have)}" if have else "a device of this host")
                       + " (`ibv_devices` lists them), or remove it to let thunderlink choose", **kw)
    active = [p for p in mine if p.get("state") == "active"]
    if not active:
        states = ", ".join(f"port {p['port']} {p['state']}" for p in mine)
        return warn("rdma", "RDMA device not active", f"{loc}.rdma names {name}: {states}",
                    "check the cable and the other end; on macOS 26.2+ RDMA over Thunderbolt 5 must be "
                    "enabled (docs/hardware-checklist.md)", **kw)
    return ok("rdma", "RDMA device present", f"{name} port {active[0]['port']} is active", **kw)


def _fix_not_local(hf: Hostfile, r: int, j: int, a: Address, ip: str, its: list[ifs.Interface],
                   host: Host) -> str:
    loc = _loc(r, j)
    by_name = {i.name: i for i in its}
    lines = []
    add_iface = None
    if a.iface:
        itf = by_name.get(a.iface)
        if itf is None:
            lines.append(f"there is no interface {a.iface} here; fix {loc}.iface and {loc}.ip")
        else:
            add_iface = a.iface
            v4 = [x for x in itf.addresses if (":" in x.ip) == (":" in ip)]
            if v4:
                lines.append(f"{a.iface} has {', '.join(map(str, v4))}: set {loc}.ip to \"{v4[0].ip}\"")
    if not lines or add_iface is None:
        net = _net(ip, a.prefix)
        near = [(i, x) for i in its for x in i.addresses if net is not None and _in(x.ip, net)]
        if near:
            i, x = near[0]
            lines.append(f"{x.ip} on {i.name} is in {ip}'s subnet {net}: set {loc}.ip to \"{x.ip}\"")
            add_iface = add_iface or i.name
        cands = [f"{x.ip} ({i.name})" for i in its if not i.loopback for x in i.ipv4]
        if cands:
            lines.append(f"this host's addresses: {', '.join(cands)}")
    if add_iface:
        lines.append(f"or give {add_iface} that address: {host.addr_add(add_iface, ip, a.prefix or (30 if a.peer is not None else None))}")
    lines.append(f"(if this is not rank {r}'s host, run the doctor there, or pass --rank)")
    return "\n".join(lines)


def _port_holder(ip: str, port: int) -> str:
    try:
        import psutil

        for c in psutil.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and \
                    c.laddr.ip in (ip, "0.0.0.0", "::", "::ffff:" + ip):
                if c.pid:
                    try:
                        name = psutil.Process(c.pid).name()
                    except (psutil.Error, OSError):
                        name = "a process"
                    return f"{name} (pid {c.pid})"
                return "another process"
    except Exception:  # noqa: BLE001 - best effort (AccessDenied on macOS without root)
        pass
    return ""


def _free_port_near(ip: str, port: int) -> int | None:
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for cand in list(range(port + 100, port + 110)) + list(range(port + 1000, port + 1010)):
        if cand > 65535:
            break
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ip, cand))
            return cand
        except OSError:
            continue
        finally:
            s.close()
    return None


def _port_checks(hf: Hostfile, r: int, facts: list[dict], host: Host) -> list[Check]:
    out: list[Check] = []
    seen = set()
    for f, a in zip(facts, hf.ranks[r].addresses):
        if not f["local"]:
            continue
        ip, _ = resolve(a.ip)
        key = (ip, a.port)
        if key in seen:
            continue
        seen.add(key)
        kw = dict(rank=r, address=str(a), iface=f["iface"], where=host.label)
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the core: TIME_WAIT is no conflict
            s.bind((ip, a.port))
            s.listen(1)
        except OSError as e:
            loc = _loc(r, f["index"])
            if e.errno == errno.EADDRINUSE:
                holder = _port_holder(ip, a.port)
                alt = _free_port_near(ip, a.port)
                pid = holder.rsplit("pid ", 1)[-1].rstrip(")") if "pid " in holder else None
                fix = []
                if pid:
                    fix.append(f"if {holder} is a leftover, stop it: kill {pid}")
                else:
                    fix.append(f"see who holds it: {host.who_listens(a.port)}")
                fix.append(f"or give rank {r} another port: set {loc}.port to {alt or 'a free port'}")
                out.append(problem("port", "port in use",
                                   f"port {a.port} on {ip} (rank {r} listens there) is already in use"
                                   + (f" by {holder}" if holder else "")
                                   + " -- fine only if this job is running right now",
                                   "\n".join(fix), **kw))
            elif e.errno == errno.EACCES:
                out.append(problem("port", "port needs privileges",
                                   f"port {a.port} on {ip}: {e.strerror} (ports below 1024 need root)",
                                   f"use a port of 1024 or above in {loc}.port", **kw))
            else:
                out.append(problem("port", "cannot listen",
                                   f"cannot listen on {ip}:{a.port}: {e.strerror}", None, **kw))
        else:
            out.append(ok("port", "port free", f"port {a.port} on {ip} is free", **kw))
        finally:
            s.close()
    return out


_UNREACH = {errno.ENETUNREACH: "network unreachable", errno.EHOSTUNREACH: "host unreachable",
            errno.ENETDOWN: "network down", errno.ETIMEDOUT: "timed out"}
if hasattr(errno, "EHOSTDOWN"):
    _UNREACH[errno.EHOSTDOWN] = "host down"


def _connect(ip: str, port: int, timeout: float, device: str | None = None,
             src: str | None = None) -> tuple[str, str]:
    """('listening'|'refused'|'failed', detail)."""
    try:
        infos = socket.getaddrinfo(ip, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return "failed", f"cannot resolve: {e.strerror}"
    fam, _, _, _, sa = infos[0]
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        if device:
            try:
                if sys.platform.startswith("linux"):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
                elif sys.platform == "darwin":
                    idx = socket.if_nametoindex(device)
                    if fam == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, 125, idx)  # IPV6_BOUND_IF
                    else:
                        s.setsockopt(socket.IPPROTO_IP, 25, idx)  # IP_BOUND_IF
            except OSError:
                pass  # no such interface (reported elsewhere) or no privilege: route decides
        if src:
            try:
                s.bind((src, 0))
            except OSError:
                pass  # not local: reported by the address checks
        s.settimeout(timeout)
        s.connect(sa)
        return "listening", "a process accepts connections there"
    except ConnectionRefusedError:
        return "refused", "reachable, nothing listening"
    except socket.timeout:
        return "failed", f"no answer within {timeout:g} s"
    except OSError as e:
        return "failed", _UNREACH.get(e.errno, e.strerror or str(e))
    finally:
        s.close()


def _peer_check(hf: Hostfile, r: int, p: int, j: int, d: Address, src: tuple[int, Address] | None,
                src_fact: dict | None, its: list[ifs.Interface], host: Host, timeout: float) -> list[Check]:
    out: list[Check] = []
    dloc = _loc(p, j)
    dst, err = resolve(d.ip)
    kw = dict(rank=r, address=str(d), where=host.label)
    if dst is None:
        return [problem("peer", "unresolvable peer address", f"rank {p}'s {dloc}: {err}",
                        f"write an IP address in {dloc}.ip", **kw)]
    sloc = _loc(r, src[0]) if src else None
    s_addr = src[1] if src else None
    expected = None
    if s_addr is not None:
        expected = s_addr.iface or (src_fact or {}).get("iface")
    kw["iface"] = expected
    # The two ends of a cable share its subnet.
    if s_addr is not None and src_fact is not None and src_fact.get("local"):
        prefix = s_addr.prefix if s_addr.prefix is not None else src_fact.get("prefix")
        net = _net(s_addr.ip, prefix)
        if net is not None and not _in(dst, net):
            oe = other_end(s_addr.ip, net.prefixlen)
            out.append(problem(
                "cable", "cable ends on different subnets",
                f"rank {p}'s end {dst} ({dloc}) is not in the subnet {net} of rank {r}'s end "
                f"{s_addr.ip} ({sloc}) of the same cable",
                (f"the other end of {net} is {oe}: set {dloc}.ip to \"{oe}\" (and give rank {p}'s interface "
                 f"that address), or fix {sloc}" if oe else
                 f"put both ends of the cable in one subnet (fix {dloc}.ip or {sloc}.ip)"), **kw))
    route = ifs.route_to(dst)
    pinned = bool(s_addr is not None and s_addr.iface)
    src_ip = src_fact["ip"] if (src_fact and src_fact.get("local")) else None
    outcome, detail = _connect(dst, d.port, timeout, device=s_addr.iface if pinned else None, src=src_ip)
    via = f"via {route.dev}" if route.dev else "no route"
    who = f"rank {p} at {d} ({dloc})"
    cable = f"the cable on {expected}" if expected else "this link"
    data = {"peer": p, "route_dev": route.dev, "route_error": route.error, "outcome": outcome,
            "detail": detail, "expected_iface": expected}
    other = next((i for i in its if i.name == route.dev), None)
    kind = " (Wi-Fi)" if other is not None and other.wireless else ""
    elsewhere = bool(expected and route.dev and route.dev != expected and not route.local)
    route_fixes = [f"make the cable's route win: {host.route_via(dst, expected)}" if expected else "",
                   "or give the cable a subnet that no other interface uses"]
    if not pinned and expected:
        route_fixes.insert(0, f"name the cable's interface in the hostfile: set {sloc}.iface to \"{expected}\"")
    if outcome in ("listening", "refused"):
        if elsewhere:
            mk = warn if pinned else problem
            out.append(mk(
                "route", "route leaves through another interface",
                f"the route from rank {r} to {who} goes out {route.dev}{kind}, not {cable}"
                + (" (thunderlink pins the interface the hostfile names, but other programs and MLX's ring "
                   "backend follow the route)" if pinned else
                   ": thunderlink's traffic to rank %d would not use the cable" % p),
                "\n".join(route_fixes), data=data, **kw))
        else:
            out.append(ok("peer", "peer reachable", f"{who} reachable {via} ({detail})", data=data, **kw))
        return out
    if elsewhere:
        if not pinned:
            cab = _connect(dst, d.port, timeout, device=expected, src=src_ip)
            if cab[0] in ("listening", "refused"):
                out.append(problem(
                    "route", "route leaves through another interface",
                    f"the route from rank {r} to {who} goes out {route.dev}{kind}, where it does not answer "
                    f"({detail}); through {cable} it answers", "\n".join(route_fixes), data=data, **kw))
                return out
        alt = _connect(dst, d.port, timeout)  # unpinned: the route's interface
        if alt[0] in ("listening", "refused"):
            out.append(problem(
                "peer", "peer reachable only through another interface",
                f"{who} does not answer through {cable} ({detail}), only through {route.dev}{kind}",
                f"check the cable and the addresses on both ends ({sloc} here, {dloc} on rank {p}); "
                f"the cable's subnet must not overlap {route.dev}'s", data=data, **kw))
            return out
        detail += f"; the route to {dst} goes out {route.dev}{kind}, not {expected}"
    reason = detail if route.dev else f"{detail}; no route to {dst}" + (f" ({route.error})" if route.error else "")
    state = ""
    if src_fact is not None and src_fact.get("local"):
        if src_fact.get("up") is False:
            state = f"; rank {r}'s end {expected} is down"
        elif src_fact.get("running") is False:
            state = f"; rank {r}'s end {expected} has no link"
    fix = [f"check that {cable} to rank {p} is plugged in and both ends are up"
           + (f" ({host.link_up(expected)})" if expected else ""),
           f"check that {dst} is rank {p}'s address on it (run `thunderlink doctor --hostfile "
           f"{hf.path or 'HOSTFILE'} --rank {p}` on rank {p}'s host)"]
    if "timed out" in detail or "no answer" in detail:
        fix.append(f"and that no firewall drops TCP port {d.port}")
    out.append(problem("peer", "peer unreachable", f"{who} does not answer from rank {r}: {reason}{state}",
                       "\n".join(fix), data=data, **kw))
    return out


def probes(hf: Hostfile, r: int) -> list[tuple[int, tuple[int, Address], tuple[int, Address] | None]]:
    """What rank r's checks try to reach: (peer, (index, address) of the
    peer's, (index, address) of r's to leave from or None). Where r dials, the
    cables the core dials, from the addresses it binds; where r listens, each
    cable the other way, from r's end to the dialer's (cables whose dialer
    binds no address of its own are checked from the dialer's side only)."""
    out = []
    for p in range(hf.size):
        link = hf.link(r, p) if p != r else None
        if link is None:
            continue
        for cable, source in zip(link.cables, link.sources):
            if link.dialer == r:
                out.append((p, cable, source))
            elif source is not None:
                out.append((p, source, cable))
    return out


def check_rank(hf: Hostfile, r: int, *, timeout: float = 2.0, host: Host | None = None,
               interfaces: list[ifs.Interface] | None = None) -> tuple[list[Check], dict]:
    """Every check of rank ``r`` that can run on this host; and the facts
    (per address: interface, MTU, state) for the cross-rank checks."""
    host = host or Host()
    its = ifs.list_interfaces() if interfaces is None else interfaces
    checks, afacts = _address_checks(hf, r, its, host)
    checks += _port_checks(hf, r, afacts, host)
    jobs = probes(hf, r)
    if jobs:
        with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as ex:
            futs = [ex.submit(_peer_check, hf, r, p, j, d, src, afacts[src[0]] if src else None, its, host,
                              timeout)
                    for p, (j, d), src in jobs]
            for f in futs:
                checks += f.result()
    facts = {"rank": r, "host": host.name, "netns": host.netns, "platform": host.platform,
             "addresses": afacts}
    return checks, facts


# --------------------------------------------------------------------------- across ranks


def cable_pairs(hf: Hostfile, a: int, b: int) -> list[tuple[int, int]]:
    """(index at a, index at b) of the two ends of each cable between a and b,
    as the core pairs them: the address it dials and the one it leaves from.
    Addresses without "peer" are no cable ends."""
    link = hf.link(a, b)
    if link is None:
        return []
    out = []
    for (jc, c), source in zip(link.cables, link.sources):
        if source is None or c.peer is None:
            continue
        out.append((jc, source[0]) if link.acceptor == a else (source[0], jc))
    return out


def mtu_checks(hf: Hostfile, facts: dict[int, dict]) -> list[Check]:
    """Both ends of every cable between two ranks whose facts are known have the same MTU."""
    out: list[Check] = []
    for a in range(hf.size):
        for b in range(a + 1, hf.size):
            if a not in facts or b not in facts:
                continue
            for ja, jb in cable_pairs(hf, a, b):
                fa, fb = facts[a]["addresses"][ja], facts[b]["addresses"][jb]
                if fa.get("mtu") is None or fb.get("mtu") is None:
                    continue
                ea = f"rank {a} {fa['iface']} ({fa['ip']}, mtu {fa['mtu']})"
                eb = f"rank {b} {fb['iface']} ({fb['ip']}, mtu {fb['mtu']})"
                kw = dict(rank=a, iface=f"{fa['iface']} <-> {fb['iface']}",
                          data={"a": {"rank": a, **fa}, "b": {"rank": b, **fb}})
                if fa["mtu"] == fb["mtu"]:
                    out.append(ok("mtu", "MTUs match",
                                  f"cable rank {a} {fa['iface']} <-> rank {b} {fb['iface']}: mtu {fa['mtu']} at both ends",
                                  **kw))
                    continue
                ha = Host(platform=facts[a].get("platform", sys.platform), netns=facts[a].get("netns"))
                hb = Host(platform=facts[b].get("platform", sys.platform), netns=facts[b].get("netns"))
                hi = max(fa["mtu"], fb["mtu"])
                lo = min(fa["mtu"], fb["mtu"])
                up_cmd = ha.set_mtu(fa["iface"], hi) if fa["mtu"] < hi else hb.set_mtu(fb["iface"], hi)
                dn_cmd = ha.set_mtu(fa["iface"], lo) if fa["mtu"] > lo else hb.set_mtu(fb["iface"], lo)
                out.append(problem(
                    "mtu", "MTU mismatch",
                    f"the two ends of a cable have different MTUs: {ea} <-> {eb}; large frames from the "
                    f"{hi} side are dropped at the {lo} side (connections stall mid-transfer)",
                    f"set both ends to the same MTU: on rank {a if fa['mtu'] < hi else b}'s host: {up_cmd}\n"
                    f"or on rank {a if fa['mtu'] > lo else b}'s host: {dn_cmd}", **kw))
    return out
