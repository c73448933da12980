"""JACCL's device matrix (MLX_IBV_DEVICES + MLX_JACCL_COORDINATOR, as written
by mlx.launch --backend jaccl): thunderlink runs TCP over the cables it names,
exchanging addresses through the coordinator."""

from __future__ import annotations

import json
import os
import secrets
import sys

import pytest

from conftest import RANKPROGS, Ranks
from thunderlink.errors import ConfigError
from thunderlink.launch import Job
from thunderlink.launch.local import free_ports
from thunderlink.testing import cluster as cl
from thunderlink.hosts import jaccl
from thunderlink.hosts.hostfile import parse

OK, WHY = cl.available()


def test_matrix_recognised_and_refused_as_a_plain_hostfile():
    m = [[None, "rdma_en2"], ["rdma_en3", None]]
    assert jaccl.is_device_matrix(m)
    assert jaccl.is_device_matrix([[None, ["rdma_en2", "rdma_en5"]], [["rdma_en3"], None]])
    assert not jaccl.is_device_matrix([["10.0.0.1:5000"], ["10.0.0.2:5000"]])  # MLX ring format
    assert not jaccl.is_device_matrix([[None, "rdma_en2"]])  # not square
    with pytest.raises(ConfigError, match="JACCL device matrix"):
        parse(m, "devices.json")


def test_needs_a_coordinator():
    with pytest.raises(ConfigError, match="MLX_JACCL_COORDINATOR"):
        jaccl.hostfile_from_matrix([[None, "rdma_lo"], ["rdma_lo", None]], 0, None)


def test_interface_without_ipv4_is_named():
    with pytest.raises(ConfigError, match="interface nosuch0 has no IPv4"):
        jaccl.hostfile_from_matrix([[None, "rdma_nosuch0"], ["rdma_nosuch0", None]], 0, "127.0.0.1:1")


def test_ports_are_the_kernels_choice_and_held_until_released():
    """Each rank announces a port the kernel chose and keeps it bound while the
    records travel, so no other process can take it before the core listens."""
    import socket
    import threading

    matrix = [[None, "rdma_lo"], ["rdma_lo", None]]
    coordinator = f"127.0.0.1:{free_ports(1)[0]}"
    held, hfs, errors = [[], []], [None, None], []

    def rank(r):
        try:
            hfs[r] = jaccl.hostfile_from_matrix(matrix, r, coordinator, timeout=20, hold=held[r])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not errors and all(hfs), errors
        for r in (0, 1):
            announced = [a.port for a in hfs[0].ranks[r].addresses]
            assert announced == [s.getsockname()[1] for s in held[r]]
            for port in announced:  # still ours: a plain bind to it fails
                with socket.socket() as other, pytest.raises(OSError):
                    other.bind(("127.0.0.1", port))
    finally:
        ports = [s.getsockname()[1] for h in held for s in h]
        for h in held:
            jaccl.release(h)
    assert held == [[], []]
    for port in ports:  # released: the core can listen there (as it does, with SO_REUSEADDR)
        with socket.socket() as core:
            core.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            core.bind(("127.0.0.1", port))
            core.listen()


def test_ports_close_on_return_without_hold(monkeypatch):
    opened = []
    real = jaccl._reserve_port
    monkeypatch.setattr(jaccl, "_reserve_port", lambda ip: opened.append(real(ip)) or opened[-1])
    other = {"host": "b", "addresses": [{"ip": "127.0.0.2", "port": 9, "peer": 0}]}
    monkeypatch.setattr(jaccl, "_exchange", lambda m, r, c, mine, t, key=None: [mine, other])
    jaccl.hostfile_from_matrix([[None, "rdma_lo"], ["rdma_lo", None]], 0, "127.0.0.1:1")
    assert opened and all(s.fileno() == -1 for s in opened)


def _run(c, tmp_path, matrix, coordinator, func, *args):
    path = tmp_path / "devices.json"
    path.write_text(json.dumps(matrix))
    envs, cmds = [], []
    for r, h in enumerate(c.hosts):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("THUNDERLINK_HOSTFILE", "THUNDERLINK_RANK"))}
        env.update(MLX_IBV_DEVICES=str(path), MLX_JACCL_COORDINATOR=coordinator, MLX_RANK=str(r),
                   THUNDERLINK_CONNECT_TIMEOUT="20", THUNDERLINK_TIMEOUT="30", PYTHONUNBUFFERED="1")
        envs.append(env)
        cmds.append(["ip", "netns", "exec", h.netns, sys.executable, RANKPROGS, func, json.dumps(list(args))])
    return Ranks(Job(cmds, envs, capture=True, timeout=90, on_line=lambda *a: None).run())


@pytest.mark.netns
@pytest.mark.multiproc
@pytest.mark.skipif(not OK, reason=WHY)
@pytest.mark.parametrize("topology,n", [("ring", 2), ("switch", 3)])
def test_collectives_over_the_matrix_cables(tmp_path, topology, n):
    with cl.Cluster(n, topology=topology, name=f"tj{secrets.token_hex(2)}") as c:
        matrix = [[None] * n for _ in range(n)]
        for h in c.hosts:
            for a in h.addresses:
                for peer in ([a.peer] if a.peer is not None else [p for p in range(n) if p != h.index]):
                    matrix[h.index][peer] = f"rdma_{a.iface}"
        coordinator = f"{c.hosts[0].addresses[0].ip}:{free_ports(1)[0]}"
        cases = [["sum", "float32", k, False] for k in (1, 1000, 999983)]
        r = _run(c, tmp_path, matrix, coordinator, "reductions", cases)
        assert r.status == 0, r.all_text()
        for v in r.values:
            assert all(x["err"] is None for x in v.values()), v
