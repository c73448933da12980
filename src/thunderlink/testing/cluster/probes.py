"""Measurement probes on a cluster that is up: a cable's qdisc and byte
counters, which addresses a host reaches, and one TCP stream's goodput."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Iterable

from .cleanup import killpg
from .net import ClusterError, ip, run_cmd

if TYPE_CHECKING:
    from .model import Cable


class Probes:
    """The measuring half of :class:`~thunderlink.testing.cluster.Cluster` (mixed into it)."""

    def qdisc(self, cable: Cable | int) -> dict:
        """``tc -j qdisc show`` of both ends: {"a": [...], "b": [...]}."""
        c, ends = self._ends(cable)
        out = {}
        for side, (ns, ifn) in zip("ab", ends):
            cp = run_cmd(["tc", "-n", ns, "-j", "qdisc", "show", "dev", ifn])
            out[side] = json.loads(cp.stdout or "[]")
        return out

    def counters(self, cable: Cable | int) -> dict:
        """Byte/packet counters of both ends:
        {"a": {"tx_bytes", "rx_bytes", "tx_packets", "rx_packets", "tx_dropped", "rx_dropped"}, "b": {...}}.
        """
        c, ends = self._ends(cable)
        out: dict[str, dict[str, int]] = {}
        for side, (ns, ifn) in zip("ab", ends):
            cp = ip("-s", "-j", "link", "show", "dev", ifn, ns=ns)
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
                killpg(rx.pid, signal.SIGKILL)
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
