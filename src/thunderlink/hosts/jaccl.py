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
"""

from __future__ import annotations

import json
import selectors
import socket
import time

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
    for peer, entry in enumerate(matrix[rank]):
        if peer == rank:
            continue
        for dev in _names(entry):
            faces.setdefault(_iface_of(dev), []).append(peer)
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
        addresses.append({"ip": ip, "port": port, "peer": peer, "iface": iface, "prefix": prefix})
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


# A connection to the coordinator that has not sent its whole record by then
# is dropped, and at most this many wait at once (the oldest goes first): a
# silent or slow stranger cannot hold rank 0 up, nor a flood of them lock
# the ranks out.
_RECORD_TIMEOUT = 2.0
_MAX_PENDING = 256


def _collect(srv: socket.socket, n: int, mine: dict, coordinator: str, timeout: float,
             deadline: float) -> tuple[list, list[socket.socket]]:
    """Rank 0: every rank's record, read from connections served side by
    side; returns the records and the ranks' connections (blocking again)."""
    records: list = [None] * n
    records[0] = mine
    peers: list[socket.socket] = []
    pending: dict[socket.socket, list] = {}  # connection -> [bytes so far, accepted at]
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
                raise ConfigError(
                    f"[thunderlink] rank 0: ranks {missing} did not reach the coordinator {coordinator} "
                    f"within {timeout:g} s (are they running, and can they reach that address?)")
            for conn in [c for c, (_, t) in pending.items() if now - t > _RECORD_TIMEOUT]:
                drop(conn)
            for key, _ in sel.select(min(deadline - now, 0.25)):
                if key.fileobj is srv:
                    while True:
                        try:
                            conn, _ = srv.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:  # out of descriptors, an aborted connection
                            break
                        if len(pending) >= _MAX_PENDING:
                            drop(min(pending, key=lambda c: pending[c][1]))
                        conn.setblocking(False)
                        pending[conn] = [b"", time.monotonic()]
                        sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj
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


def _exchange(matrix: list, rank: int, coordinator: str, mine: dict, timeout: float) -> list[dict]:
    n = len(matrix)
    host, port = _split(coordinator)
    deadline = time.monotonic() + timeout
    if rank == 0:
        with socket.create_server((host, port), reuse_port=False, backlog=128) as srv:
            records, peers = _collect(srv, n, mine, coordinator, timeout, deadline)
            try:
                for conn in peers:
                    conn.settimeout(max(0.1, deadline - time.monotonic()))
                    _send_json(conn, records)
            finally:
                for conn in peers:
                    conn.close()
        return records
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())) as s:
                _send_json(s, {"rank": rank, "size": n, "record": mine})
                return _recv_json(s, deadline)
        except (OSError, ValueError) as e:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"[thunderlink] rank {rank}: cannot exchange addresses through the coordinator "
                    f"{coordinator} within {timeout:g} s ({e}); is rank 0 running, and is that its address?"
                ) from None
            time.sleep(0.1)


def hostfile_from_matrix(matrix: list, rank: int, coordinator: str | None, *, timeout: float = 60.0,
                         path: str | None = None, hold: list | None = None) -> hostfile_mod.Hostfile:
    """The hostfile of a JACCL device matrix: this rank's addresses from its
    interfaces, everyone's through the coordinator. (``connect`` calls it once
    ``hostfile.is_device_matrix`` has said what the file is.)

    This rank's ports are the kernel's choice, and stay bound while the
    records travel so no other process can take them. With ``hold`` (a list)
    the sockets holding them are appended there, for the caller to close just
    before the core listens on those ports; without it they close on return."""
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
        records = _exchange(matrix, rank, coordinator, _my_record(matrix, rank, held), timeout)
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
