"""The ip/tc wrappers: running iproute2, whether namespaces can be made here,
cable rates and their tbf shaping, waiting for interfaces to come up.

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

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from typing import Sequence

DEFAULT_LATENCY = "5ms"
_CMD_TIMEOUT = 30.0


class ClusterError(RuntimeError):
    """A cluster could not be built, changed or removed (message says why and how to fix)."""


def parse_rate(rate: str | int | float) -> int:
    """A cable rate -> bit/s, read as every hostfile reads it (``config.parse_rate``:
    ``"10gbit"``, ``"500mbit"``, ``"1gbps"`` = 1 Gbit/s, a bare number = Gbit/s), so the
    string copied into the hostfile means what tc was told."""
    from ...config import parse_rate as gbit_per_s

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


def run_cmd(argv: Sequence[str], *, input: str | None = None, check: bool = True,
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


def ip(*args: str, ns: str | None = None, **kw) -> subprocess.CompletedProcess:
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    return run_cmd(argv, **kw)


def ip_batch(lines: list[str], ns: str | None = None, force: bool = False,
             check: bool = True) -> subprocess.CompletedProcess | None:
    if not lines:
        return None
    argv = ["ip"] + (["-n", ns] if ns else []) + (["-force"] if force else []) + ["-batch", "-"]
    return run_cmd(argv, input="\n".join(lines) + "\n", check=check)


def tc_batch(lines: list[str], ns: str, check: bool = True) -> subprocess.CompletedProcess | None:
    if not lines:
        return None
    return run_cmd(["tc", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n", check=check)


def netns_list() -> list[str]:
    """Names of all named network namespaces on this box (``ip netns list``)."""
    cp = ip("netns", "list", check=False)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def has_caps() -> bool:
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


NEEDS_ROOT = ("needs root: creating network namespaces requires CAP_SYS_ADMIN and CAP_NET_ADMIN; "
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
    if not has_caps():
        return False, NEEDS_ROOT
    ns = f"tlprobe{os.getpid()}-{secrets.token_hex(2)}"
    try:
        cp = ip("netns", "add", ns, check=False)
        if cp.returncode != 0:
            return False, ("cannot create network namespaces: " + cp.stderr.strip()
                           + " -- run as root in a privileged container, with /run writable")
        try:
            cp = ip("link", "add", "tlpa", "type", "veth", "peer", "name", "tlpb", ns=ns, check=False)
            if cp.returncode != 0:
                return False, ("cannot create veth pairs: " + cp.stderr.strip()
                               + " -- the kernel needs CONFIG_VETH (modprobe veth)")
            if shaping:
                cp = run_cmd(["tc", "-n", ns, "qdisc", "add", "dev", "tlpa", "root", "tbf",
                               "rate", "1gbit", "burst", "128k", "latency", "5ms"], check=False)
                if cp.returncode != 0:
                    return False, ("cannot install the tbf qdisc: " + cp.stderr.strip()
                                   + " -- the kernel needs CONFIG_NET_SCH_TBF (modprobe sch_tbf)")
        finally:
            ip("netns", "del", ns, check=False)
    except ClusterError as e:
        return False, str(e)
    return True, "ok: root, iproute2 and network namespaces available"


# --------------------------------------------------------------------------- cleanup registry


def wait_operstate(ends: dict[str, list[str]], timeout: float = 5.0) -> None:
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
            cp = ip("-j", "-d", "link", "show", "dev", ifn, ns=ns, check=False)
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
