"""JACCL's device file, for TCP over the same cables.

``mlx.launch --backend jaccl`` (and exo) describe a Thunderbolt cluster with an
N x N matrix of RDMA device names (MLX_IBV_DEVICES): entry [i][j] is null,
"rdma_en3" or a list of names, the devices of rank i on its cables to rank j,
plus a coordinator, rank 0's "ip:port" (MLX_JACCL_COORDINATOR). The matrix
does not hold IP addresses, so thunderlink turns each device rdma_X into the
network interface X, reads that interface's IPv4 address on its own host,
and exchanges addresses and ports through the coordinator: every rank sends
rank 0 its record over TCP, rank 0 answers with all of them. The result is
an ordinary thunderlink hostfile, with one address per cable facing its peer.

With a job token (THUNDERLINK_TOKEN), every record and rank 0's answer carry
an HMAC-SHA256 of their content under the token's key: rank 0 drops a record
without a right one (a stranger cannot take a rank's place nor plant an
address), and a rank refuses an answer without one.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import selectors
import socket
import time

from ..bindings.options import token_key
from ..errors import ConfigError
from . import hostfile as hostfile_mod
from .hostfile import is_device_matrix
from .interfaces import list_interfaces

__all__ = ["is_device_matrix", "hostfile_from_matrix", "release"]

_MAX_RECORD = 1 << 20


def _names(entry) -> list[str]:
    if entry is None:
        return []
    return [entry] if isinstance(entry, str) else list(entry)


def _iface_of(device: str) -> str:
    return device[len("rdma_"):] if device.startswith("rdma_") else device


def _ipv4_of(iface: str) -> tuple[str, int] | None:
    for itf in list_interfaces():
        if itf.name == iface:
            for a in itf.addresses:
                if a.family == 4:
                    return a.ip, a.prefix
    return None


def _reserve_port(ip: str) -> socket.socket:
    """A socket bound to a port of the kernel's choosing on ``ip``. Holding it
    keeps the port ours while the records travel; the caller closes it just
    before the core binds the same port (SO_REUSEADDR on both sides)."""
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, 0))
    except BaseException:
        s.close()
        raise
    return s


def _my_record(matrix: list, rank: int, held: list[socket.socket]) -> dict:
    """This rank's cables: one address per interface, facing the peer(s) the
    matrix gives it, on a port the kernel chose; the sockets holding those
    ports are appended to ``held``."""
    faces: dict[str, list[int]] = {}
    devices: dict[str, str] = {}
    for peer, entry in enumerate(matrix[rank]):
        if peer == rank:
            continue
        for dev in _names(entry):
            faces.setdefault(_iface_of(dev), []).append(peer)
            devices[_iface_of(dev)] = dev
    addresses = []
    for iface, peers in faces.items():
        found = _ipv4_of(iface)
        if found is None:
            raise ConfigError(
                f"[thunderlink] rank {rank}: the device file lists rdma_{iface}, but interface {iface} has no "
                f"IPv4 address on this host; give each Thunderbolt cable its own subnet (as "
                f"mlx.distributed_config does: `sudo ifconfig {iface} inet 192.168.x.y netmask 255.255.255.252`)"
            )
        ip, prefix = found
        held.append(_reserve_port(ip))
        port = held[-1].getsockname()[1]
        # An interface facing several peers (a bridge, a switch) is open to any rank.
        peer = peers[0] if len(peers) == 1 else None
        addresses.append({"ip": ip, "port": port, "peer": peer, "iface": iface, "prefix": prefix,
                          "rdma": devices[iface]})
    return {"host": socket.gethostname(), "addresses": addresses}


def _split(coordinator: str) -> tuple[str, int]:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"[thunderlink] coordinator {coordinator!r} is not ip:port (MLX_JACCL_COORDINATOR)")
    return host.strip("[]"), int(port)


def _recv_json(sock: socket.socket, deadline: float):
    data = b""
    while not data.endswith(b"\n"):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
        if len(data) > _MAX_RECORD:
            raise ConfigError("[thunderlink] JACCL rendezvous: oversized record")
    # Anyone may connect to the coordinator: a record nested to exhaust the
    # recursion limit is a ConfigError (a ValueError: the caller drops that
    # connection), not a RecursionError that ends rank 0.
    return hostfile_mod.decode_json(data, "JACCL rendezvous record")


def _send_json(sock: socket.socket, obj) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


def _mac(key: bytes | None, label: str, obj) -> str | None:
    """HMAC-SHA256 of obj (as canonical JSON) under key, labelled; None without a key."""
    if key is None:
        return None
    text = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, b"thunderlink jaccl " + label.encode() + b"\0" + text, hashlib.sha256).hexdigest()


def _mac_ok(key: bytes | None, label: str, obj, mac) -> bool:
    return key is None or (isinstance(mac, str) and hmac.compare_digest(mac, _mac(key, label, obj)))


# A connection to the coordinator that has not sent its whole record by then
# is dropped, and at most this many wait at once (the oldest goes first): a
# silent or slow stranger cannot hold rank 0 up, nor a flood of them lock
# the ranks out.
_RECORD_TIMEOUT = 2.0
_MAX_PENDING = 256


def _collect(srv: socket.socket, n: int, mine: dict, coordinator: str, timeout: float,
             deadline: float, key: bytes | None) -> tuple[list, list[socket.socket]]:
    """Rank 0: every rank's record, read from connections served side by
    side; returns the records and the ranks' connections (blocking again)."""
    records: list = [None] * n
    records[0] = mine
    peers: list[socket.socket] = []
    refused: list[str] = []  # where records that did not prove the token came from
    pending: dict[socket.socket, list] = {}  # connection -> [bytes so far, accepted at, address]
    sel = selectors.DefaultSelector()
    srv.setblocking(False)
    sel.register(srv, selectors.EVENT_READ)

    def drop(conn: socket.socket) -> None:
        sel.unregister(conn)
        pending.pop(conn, None)
        conn.close()

    try:
        while any(r is None for r in records):
            now = time.monotonic()
            if now >= deadline:
                missing = [r for r in range(n) if records[r] is None]
                auth = (f"; authentication failed: {len(refused)} record(s), the latest from "
                        f"{refused[-1]}, did not prove this job's token (every rank needs the same "
                        f"THUNDERLINK_TOKEN)") if refused else ""
                raise ConfigError(
                    f"[thunderlink] rank 0: ranks {missing} did not reach the coordinator {coordinator} "
                    f"within {timeout:g} s (are they running, and can they reach that address?){auth}")
            for conn in [c for c, (_, t, _) in pending.items() if now - t > _RECORD_TIMEOUT]:
                drop(conn)
            for sk, _ in sel.select(min(deadline - now, 0.25)):
                if sk.fileobj is srv:
                    while True:
                        try:
                            conn, addr = srv.accept()
                        except OSError:  # none left (EAGAIN), out of descriptors, an aborted connection
                            break
                        if len(pending) >= _MAX_PENDING:
                            drop(min(pending, key=lambda c: pending[c][1]))
                        conn.setblocking(False)
                        pending[conn] = [b"", time.monotonic(), f"{addr[0]}:{addr[1]}"]
                        sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = sk.fileobj
                try:
                    chunk = conn.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                entry = pending[conn]
                entry[0] += chunk
                if not chunk or len(entry[0]) > _MAX_RECORD:
                    drop(conn)
                    continue
                if not entry[0].endswith(b"\n"):
                    continue
                try:
                    msg = hostfile_mod.decode_json(entry[0], "JACCL rendezvous record")
                    r = msg.get("rank")
                    ok = (msg.get("size") == n and isinstance(r, int) and not isinstance(r, bool)
                          and 0 < r < n and records[r] is None and "record" in msg)
                except (ConfigError, AttributeError):
                    ok = False
                if not ok:
                    drop(conn)  # a stranger, or a rank of another job
                    continue
                if not _mac_ok(key, "record", [r, n, msg.get("record")], msg.get("mac")):
                    # Dropped, never fatal; told why (that is no secret).
                    refused.append(entry[2])
                    with contextlib.suppress(OSError):
                        _send_json(conn, {"refused": "authentication failed"})
                    drop(conn)
                    continue
                records[r] = msg["record"]
                sel.unregister(conn)
                del pending[conn]
                conn.setblocking(True)
                peers.append(conn)
    except BaseException:
        for conn in peers:
            conn.close()
        raise
    finally:
        for conn in list(pending):
            drop(conn)
        sel.close()
    return records, peers


def _exchange(matrix: list, rank: int, coordinator: str, mine: dict, timeout: float,
              key: bytes | None = None) -> list[dict]:
    n = len(matrix)
    host, port = _split(coordinator)
    deadline = time.monotonic() + timeout
    if rank == 0:
        with socket.create_server((host, port), reuse_port=False, backlog=128) as srv:
            records, peers = _collect(srv, n, mine, coordinator, timeout, deadline, key)
            try:
                answer = records if key is None else {"records": records, "mac": _mac(key, "records", records)}
                for conn in peers:
                    conn.settimeout(max(0.1, deadline - time.monotonic()))
                    _send_json(conn, answer)
            finally:
                for conn in peers:
                    conn.close()
        return records
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())) as s:
                msg = {"rank": rank, "size": n, "record": mine}
                if key is not None:
                    msg["mac"] = _mac(key, "record", [rank, n, mine])
                _send_json(s, msg)
                answer = _recv_json(s, deadline)
            break
        except (OSError, ValueError) as e:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"[thunderlink] rank {rank}: cannot exchange addresses through the coordinator "
                    f"{coordinator} within {timeout:g} s ({e}); is rank 0 running, and is that its address?"
                ) from None
            time.sleep(0.1)
    if isinstance(answer, dict) and "refused" in answer:
        raise ConfigError(
            f"[thunderlink] rank {rank}: authentication failed: the coordinator {coordinator} refused this "
            f"rank's record: it holds another job token (every rank needs the same THUNDERLINK_TOKEN"
            f"{'' if key else '; this rank has none'})")
    if key is None:
        return answer
    if isinstance(answer, dict) and _mac_ok(key, "records", answer.get("records"), answer.get("mac")):
        return answer["records"]
    raise ConfigError(
        f"[thunderlink] rank {rank}: authentication failed: the coordinator {coordinator} answered without "
        f"proving this job's token (does rank 0 hold the same THUNDERLINK_TOKEN?)")


def hostfile_from_matrix(matrix: list, rank: int, coordinator: str | None, *, timeout: float = 60.0,
                         path: str | None = None, hold: list | None = None,
                         token: str | None = None) -> hostfile_mod.Hostfile:
    """The hostfile of a JACCL device matrix: this rank's addresses from its
    interfaces, everyone's through the coordinator. (``connect`` calls it once
    ``hostfile.is_device_matrix`` has said what the file is.)

    This rank's ports are the kernel's choice, and stay bound while the
    records travel so no other process can take them. With ``hold`` (a list)
    the sockets holding them are appended there, for the caller to close just
    before the core listens on those ports; without it they close on return.
    ``token``: the job's secret, which records and the answer prove."""
    if not is_device_matrix(matrix):
        raise ConfigError(f"[thunderlink] {path or 'device file'} is not a JACCL device matrix")
    if not 0 <= rank < len(matrix):
        raise ConfigError(f"[thunderlink] rank {rank} is out of range: the device file has {len(matrix)} ranks")
    if not coordinator:
        raise ConfigError(
            "[thunderlink] a JACCL device file needs the coordinator, rank 0's ip:port: set "
            "MLX_JACCL_COORDINATOR (mlx.launch --backend jaccl sets it)")
    held: list[socket.socket] = []
    try:
        key = token_key(token) if token else None
        records = _exchange(matrix, rank, coordinator, _my_record(matrix, rank, held), timeout, key)
        hf = hostfile_mod.parse_addresses({"version": 1, "ranks": records}, path)
        hf.format = "jaccl"
    except BaseException:
        release(held)
        raise
    if hold is None:
        release(held)
    else:
        hold.extend(held)
    return hf


def release(sockets: list) -> None:
    """Close the sockets that held this rank's ports (``hostfile_from_matrix(hold=)``)."""
    while sockets:
        sockets.pop().close()
