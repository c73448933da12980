"""The one reader of environment variables.

Everything else receives a :class:`Config`. ``ENV`` documents every variable
with its default; the README's table is written from it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Mapping

from .errors import ConfigError

__all__ = ["Config", "from_env", "ENV", "HOSTFILE_VARS", "RANK_VARS", "parse_size", "parse_rate",
           "cluster_state_dir"]

# Where a hostfile and a rank are looked for, first set first.
HOSTFILE_VARS = ("THUNDERLINK_HOSTFILE", "MLX_HOSTFILE", "MLX_IBV_DEVICES", "JACCL_IBV_DEVICES")
RANK_VARS = ("THUNDERLINK_RANK", "MLX_RANK", "JACCL_RANK")

# name -> (default shown to users, description)
ENV = {
    "MLX_DISTRIBUTED_BACKEND": (
        "unset",
        "thunderlink: unmodified MLX programs calling mx.distributed.init() get a "
        "thunderlink group (set by thunderlink launch)",
    ),
    "THUNDERLINK_TRANSPORT": (
        "auto",
        "auto | tcp | shm: auto uses shared memory between ranks of one host and TCP between hosts; shm "
        "requires every rank on one host (same on every rank); rdma is not implemented yet",
    ),
    "THUNDERLINK_HOSTFILE": (
        "unset",
        "hostfile (thunderlink JSON, MLX ring format or a JACCL device matrix); falls back to MLX_HOSTFILE",
    ),
    "MLX_HOSTFILE": ("unset", "MLX ring hostfile, as written by mlx.launch"),
    "MLX_IBV_DEVICES": (
        "unset",
        "JACCL's device matrix (also JACCL_IBV_DEVICES), used when no hostfile is set: TCP over the cables it names",
    ),
    "MLX_JACCL_COORDINATOR": ("unset", "rank 0's ip:port for a device matrix (also JACCL_COORDINATOR)"),
    "THUNDERLINK_RANK": ("unset", "this process's rank; falls back to MLX_RANK, then JACCL_RANK"),
    "MLX_RANK": ("unset", "rank, as set by mlx.launch"),
    "THUNDERLINK_WORLD_SIZE": ("unset", "if set, must equal the number of ranks in the hostfile"),
    "THUNDERLINK_IFNAME": ("unset", "bind this rank's sockets to this interface when the hostfile names none"),
    "THUNDERLINK_JOB_ID": ("hash of the hostfile", "job id checked in every handshake (set by thunderlink launch)"),
    "THUNDERLINK_TIMEOUT": ("600", "seconds a collective may wait before failing"),
    "THUNDERLINK_CONNECT_TIMEOUT": ("60", "seconds to connect to every peer at start-up"),
    "THUNDERLINK_CONNS": ("2", "TCP connections per cable between two ranks, striped (same on every rank)"),
    "THUNDERLINK_CHUNK_BYTES": ("512K", "largest pipelined chunk of the ring (same on every rank)"),
    "THUNDERLINK_PIPELINE_DEPTH": ("2", "chunks in flight per ring direction"),
    "THUNDERLINK_ALGO": ("auto", "auto | ring | oneshot: all_reduce algorithm (same on every rank)"),
    "THUNDERLINK_ALGO_THRESHOLD": (
        "512K",
        "auto: one round of messages while each rank sends at most this (all_reduce: bytes x (ranks-1)); "
        "the ring above (same on every rank)",
    ),
    "THUNDERLINK_STRIPE_MIN_BYTES": ("256K", "messages below this travel on one connection (same on every rank)"),
    "THUNDERLINK_SPIN_US": ("50", "microseconds to poll before sleeping, for small operations"),
    "THUNDERLINK_SOCKBUF_BYTES": (
        "4M",
        "SO_SNDBUF/SO_RCVBUF of every connection where the kernel grants that much (else, and with 0, "
        "the kernel's autotuning)",
    ),
    "THUNDERLINK_DEBUG": ("warn", "log level of the core on stderr: none | warn | info | trace"),
    "THUNDERLINK_CLUSTER_STATE_DIR": (
        "/run/thunderlink/clusters",
        "where `thunderlink cluster` records the emulated clusters it made",
    ),
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """'4', '64K', '1M', '1MiB', '2G' -> bytes (K = 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"[thunderlink] {what}: {text!r} is not a size (examples: 4096, 64K, 1M, 1GiB)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt]i?|)(bit|bps|b/s)|([kmgt]?))\s*$", re.IGNORECASE)
_RATE_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_rate(value, what: str = "rate") -> float:
    """A link rate in Gbit/s: a number (Gbit/s) or '10gbit', '40Gbps', '500mbit', '100mibit'.

    The one rate parser of the project (hostfiles, the emulated cluster's tc
    rates): every unit counts bits per second ('bps' too, as the README says;
    tc alone would read 'gbps' as bytes, so the cluster hands tc bits). A unit
    with a prefix and no 'bit' ('25G') or none at all ('10') is Gbit/s; 'kibit',
    'mibit', ... are binary prefixes, as in tc."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"[thunderlink] {what}: {value} must be a positive, finite number of Gbit/s")
        return float(value)
    m = _RATE.match(str(value))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"[thunderlink] {what}: {value!r} is not a rate (examples: 10, '10gbit', '40Gbps')")
    number, prefix, unit, bare = m.groups()
    if unit is None:  # '10', '25G': Gbit/s unless a prefix says otherwise
        prefix = bare or "g"
    power = _RATE_POWER[prefix[:1].lower()]
    bits = float(number) * (1024 ** power if prefix.lower().endswith("i") else 10 ** (3 * power))
    return bits / 1e9


@dataclass(frozen=True)
class Config:
    backend: str | None = None
    transport: str = "auto"
    hostfile: str | None = None
    hostfile_var: str | None = None
    rank: int | None = None
    rank_var: str | None = None
    world_size: int | None = None
    ifname: str | None = None
    job_id: int | None = None
    coordinator: str | None = None  # a JACCL device matrix's rank 0, ip:port
    # Options for the core, as keyword arguments of bindings.Options.
    options: dict = field(default_factory=dict)

    @property
    def configured(self) -> bool:
        """True when a hostfile and a rank say how to join a job."""
        return self.hostfile is not None and self.rank is not None

    @property
    def half_configured(self) -> str | None:
        """When a hostfile is set without a rank, or a rank without a hostfile,
        which one is missing ("MLX_HOSTFILE is set but no rank ..."); else
        None. Such a process would run alone instead of joining its job."""
        if self.hostfile is not None and self.rank is None:
            return f"{self.hostfile_var} is set but no rank ({' / '.join(RANK_VARS)})"
        if self.rank is not None and self.hostfile is None:
            return f"{self.rank_var} is set but no hostfile ({' / '.join(HOSTFILE_VARS)})"
        return None


def _int(env: Mapping[str, str], name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        v = int(raw)  # decimal, leading zeros allowed
    except ValueError:
        try:
            v = int(raw, 0)  # 0x...
        except ValueError:
            raise ConfigError(f"[thunderlink] {name}={raw!r} is not an integer") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"[thunderlink] {name}={v} must be {bounds}")
    return v


# The core keeps times in int32 milliseconds.
_MIN_SECONDS, _MAX_SECONDS = 0.001, 2_000_000.0


def _seconds(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        v = float(raw)
    except ValueError:
        raise ConfigError(f"[thunderlink] {name}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(v) and _MIN_SECONDS <= v <= _MAX_SECONDS):
        raise ConfigError(
            f"[thunderlink] {name}={raw} must be a number of seconds between {_MIN_SECONDS} and {_MAX_SECONDS:g}"
        )
    return v


def _size(env: Mapping[str, str], name: str, lo: int, hi: int) -> int | None:
    raw = env.get(name)
    if not raw:
        return None
    v = parse_size(raw, name)
    if not lo <= v <= hi:
        raise ConfigError(f"[thunderlink] {name}={raw} must be between {lo} and {hi} bytes")
    return v


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    v = raw.strip().lower()
    if v not in choices:
        raise ConfigError(f"[thunderlink] {name}={raw!r}: expected one of {', '.join(choices)}")
    return v


def from_env(env: Mapping[str, str] | None = None) -> Config:
    """Read the configuration from ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    options: dict = {}
    for key, name in (("timeout", "THUNDERLINK_TIMEOUT"), ("connect_timeout", "THUNDERLINK_CONNECT_TIMEOUT")):
        v = _seconds(env, name)
        if v is not None:
            options[key] = v
    # Ranges as the core checks them (tl_options_check).
    for key, name, lo, hi in (
        ("conns_per_peer", "THUNDERLINK_CONNS", 1, 64),
        ("pipeline_depth", "THUNDERLINK_PIPELINE_DEPTH", 1, 64),
        ("spin_us", "THUNDERLINK_SPIN_US", 0, 1_000_000),
    ):
        v = _int(env, name, lo, hi)
        if v is not None:
            options[key] = v
    for key, name, lo, hi in (
        ("chunk_bytes", "THUNDERLINK_CHUNK_BYTES", 4096, 1 << 30),
        ("algo_threshold", "THUNDERLINK_ALGO_THRESHOLD", 0, 1 << 62),
        ("stripe_min_bytes", "THUNDERLINK_STRIPE_MIN_BYTES", 0, 1 << 62),
        ("sockbuf_bytes", "THUNDERLINK_SOCKBUF_BYTES", 0, (1 << 31) - 1),
    ):
        v = _size(env, name, lo, hi)
        if v is not None:
            options[key] = v
    algo = _choice(env, "THUNDERLINK_ALGO", ("auto", "ring", "oneshot"))
    if algo:
        options["algo"] = algo
    debug = env.get("THUNDERLINK_DEBUG")
    if debug:
        level = {"0": "warn", "1": "info", "2": "trace"}.get(debug.strip(), debug.strip().lower())
        if level not in ("none", "warn", "info", "trace"):
            raise ConfigError(f"[thunderlink] THUNDERLINK_DEBUG={debug!r}: expected none, warn, info or trace")
        options["log_level"] = level

    hostfile, hostfile_var = None, None
    for name in HOSTFILE_VARS:
        if env.get(name):
            hostfile, hostfile_var = env[name], name
            break
    coordinator = env.get("MLX_JACCL_COORDINATOR") or env.get("JACCL_COORDINATOR") or None
    rank, rank_var = None, None
    for name in RANK_VARS:
        v = _int(env, name, 0)
        if v is not None:
            rank, rank_var = v, name
            break
    job = env.get("THUNDERLINK_JOB_ID")
    job_id = None
    if job:
        try:
            job_id = int(job, 0) & 0xFFFFFFFFFFFFFFFF
        except ValueError:
            raise ConfigError(f"[thunderlink] THUNDERLINK_JOB_ID={job!r} is not an integer") from None
    backend = env.get("MLX_DISTRIBUTED_BACKEND") or None
    return Config(
        backend=backend.strip().lower() if backend else None,
        transport=_choice(env, "THUNDERLINK_TRANSPORT", ("auto", "tcp", "shm", "rdma")) or "auto",
        hostfile=hostfile,
        hostfile_var=hostfile_var,
        rank=rank,
        rank_var=rank_var,
        world_size=_int(env, "THUNDERLINK_WORLD_SIZE", 1),
        ifname=env.get("THUNDERLINK_IFNAME") or None,
        job_id=job_id,
        coordinator=coordinator,
        options=options,
    )


def cluster_state_dir(env: Mapping[str, str] | None = None) -> str:
    """Where emulated clusters are recorded (THUNDERLINK_CLUSTER_STATE_DIR)."""
    env = os.environ if env is None else env
    return env.get("THUNDERLINK_CLUSTER_STATE_DIR") or ENV["THUNDERLINK_CLUSTER_STATE_DIR"][0]
