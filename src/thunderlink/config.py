"""The one reader of environment variables.

Everything else receives a :class:`Config`. ``ENV`` documents every variable
with its default; the README's table is written from it. The core's options
(``OPTIONS``) are declared once, in the core's table (csrc/core/options.h):
their variables, defaults, ranges and help come from there, and
:func:`readme_rows` writes their rows of the README's table.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Mapping

from .bindings.options import SPECS as OPTIONS
from .bindings.options import Spec
from .errors import ConfigError

__all__ = ["Config", "from_env", "ENV", "OPTIONS", "HOSTFILE_VARS", "RANK_VARS", "parse_size", "parse_rate",
           "cluster_state_dir", "readme_rows", "read_token", "tuning_path",
           "default_tuning_file", "rdma_settings", "gloo_lib"]

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
    "THUNDERLINK_HOSTFILE": (
        "unset",
        "hostfile (thunderlink JSON, MLX ring format or a JACCL device matrix); falls back to MLX_HOSTFILE",
    ),
    "MLX_HOSTFILE": ("unset", "MLX ring hostfile, as written by mlx.launch"),
    "MLX_IBV_DEVICES": (
        "unset",
        "JACCL's device matrix (also JACCL_IBV_DEVICES), used when no hostfile is set: RDMA over the cables it "
        "names where both ends have the device, else TCP",
    ),
    "MLX_JACCL_COORDINATOR": ("unset", "rank 0's ip:port for a device matrix (also JACCL_COORDINATOR)"),
    "THUNDERLINK_RANK": ("unset", "this process's rank; falls back to MLX_RANK, then JACCL_RANK"),
    "MLX_RANK": ("unset", "rank, as set by mlx.launch"),
    "THUNDERLINK_WORLD_SIZE": ("unset", "if set, must equal the number of ranks in the hostfile"),
    "THUNDERLINK_IFNAME": ("unset", "bind this rank's sockets to this interface when the hostfile names none"),
    "THUNDERLINK_JOB_ID": ("hash of the hostfile", "job id checked in every handshake (set by thunderlink launch)"),
    "THUNDERLINK_TOKEN": (
        "unset (thunderlink launch makes one)",
        "the job's secret: any non-empty text, the same on every rank; every connection proves it "
        "holds it (HMAC challenge-response). Unset: no authentication (see Security)",
    ),
    "THUNDERLINK_TOKEN_FILE": (
        "unset",
        "a file holding the job's token (its first line), readable by its owner only (mode 0600 or 0400); "
        "instead of THUNDERLINK_TOKEN",
    ),
    "THUNDERLINK_MALLOC_HEAP": (
        "1G",
        "thunderlink.init() tells glibc to keep blocks up to this size in the heap and to return free "
        "heap to the system only past it (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), so MLX's fresh arrays "
        "reuse memory instead of faulting in new pages on every call; 0: leave malloc alone",
    ),
    "THUNDERLINK_TUNING_FILE": (
        "~/.config/thunderlink/tuning.json",
        "tuning profile applied at init (`thunderlink tune` writes it; explicit variables still win; the same on "
        "every rank); set it empty to use none. The default is used only if it exists (under `$XDG_CONFIG_HOME` "
        "if set)",
    ),
    "THUNDERLINK_CLUSTER_STATE_DIR": (
        "/run/thunderlink/clusters",
        "where `thunderlink cluster` records the emulated clusters it made",
    ),
    "THUNDERLINK_IBV_LIB": (
        "libibverbs.so.1 (Linux), librdma.dylib (macOS)",
        "the ibverbs library the RDMA transport loads (a name or a path), e.g. the test provider's "
        "`python -m thunderlink.testing.softverbs --path`",
    ),
    "THUNDERLINK_IBV_DEVICE": (
        "unset",
        "the RDMA device to use for every link (`ibv_devices`, `thunderlink doctor`); unset: per link, the "
        "hostfile's \"rdma\" for this end, else rdma_<interface> of the link's interface if it exists, else the "
        "first device with an active port",
    ),
    "THUNDERLINK_GLOO_LIB": (
        "unset",
        "`thunderlink bench --vs gloo` and bench/peers.py where PyTorch is not installed: the Gloo driver library "
        "(libgloo_allreduce.so, built by bench/gloo/build.sh) to measure Gloo through; --gloo-lib PATH wins",
    ),
    # The core's options: THUNDERLINK_TRANSPORT, THUNDERLINK_CONNS, ...
    **{spec.env: (spec.shown_default, spec.doc) for spec in OPTIONS},
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """'4', '64K', '1M', '1MiB', '2G' -> bytes (K = 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"[thunderlink] {what}: {text!r} is not a size (examples: 4096, 64K, 1M, 1GiB)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    value = float(m.group(1)) * mult
    if not math.isfinite(value):  # hundreds of digits
        raise ConfigError(f"[thunderlink] {what}: {text!r} is far too large")
    return int(value)


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
    if not math.isfinite(bits):  # hundreds of digits
        raise ConfigError(f"[thunderlink] {what}: {value!r} is far too large for a rate")
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
    # The job's secret (THUNDERLINK_TOKEN): kept out of repr().
    token: str | None = field(default=None, repr=False)
    coordinator: str | None = None  # a JACCL device matrix's rank 0, ip:port
    # THUNDERLINK_MALLOC_HEAP: bytes glibc keeps in the heap (0: leave malloc
    # alone; None: the user set glibc's own MALLOC_*_THRESHOLD_/GLIBC_TUNABLES).
    malloc_heap: int | None = 1 << 30
    tuning_file: str | None = None  # the tuning profile applied to options, if any
    # The profile's measured cable rates: (rank, ip) -> Gbit/s, replacing the hostfile's.
    cable_rates: dict = field(default_factory=dict)
    ibv_lib: str | None = None  # THUNDERLINK_IBV_LIB: the RDMA transport's library
    ibv_device: str | None = None  # THUNDERLINK_IBV_DEVICE
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


def _seconds(env: Mapping[str, str], name: str, lo: float, hi: float) -> float | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        v = float(raw)
    except ValueError:
        raise ConfigError(f"[thunderlink] {name}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ConfigError(f"[thunderlink] {name}={raw} must be a number of seconds between {lo:g} and {hi:g}")
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


def _log_level(env: Mapping[str, str], spec: Spec) -> str | None:
    """THUNDERLINK_DEBUG also takes 0, 1 and 2, as older versions did."""
    raw = env.get(spec.env)
    if not raw:
        return None
    level = {"0": "warn", "1": "info", "2": "trace"}.get(raw.strip(), raw.strip().lower())
    if level not in spec.choices:
        raise ConfigError(f"[thunderlink] {spec.env}={raw!r}: expected none, warn, info or trace")
    return level


def _option(env: Mapping[str, str], spec: Spec):
    """One of the core's options from its variable, in Options' units; None when unset.
    Ranges are the core's (tl_options_check)."""
    if spec.name == "log_level":
        return _log_level(env, spec)
    if spec.kind == "seconds":
        return _seconds(env, spec.env, spec.lo / 1000, spec.hi / 1000)
    if spec.kind == "bytes":
        return _size(env, spec.env, spec.lo, spec.hi)
    if spec.kind == "choice":
        return _choice(env, spec.env, spec.choices)
    return _int(env, spec.env, spec.lo, spec.hi)


def read_token(env: Mapping[str, str]) -> str | None:
    """THUNDERLINK_TOKEN, or the first line of THUNDERLINK_TOKEN_FILE (a file
    of this user's that no one else may read). Errors never show the token."""
    token = env.get("THUNDERLINK_TOKEN") or None
    path = env.get("THUNDERLINK_TOKEN_FILE") or None
    if token is not None and path is not None:
        raise ConfigError("[thunderlink] both THUNDERLINK_TOKEN and THUNDERLINK_TOKEN_FILE are set: set one")
    if path is None:
        return token
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ConfigError(f"[thunderlink] THUNDERLINK_TOKEN_FILE={path}: cannot open it: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"[thunderlink] THUNDERLINK_TOKEN_FILE={path} is not a regular file")
        if st.st_uid != os.getuid():
            raise ConfigError(f"[thunderlink] THUNDERLINK_TOKEN_FILE={path} belongs to another user: the "
                              f"token file must be this user's own")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"[thunderlink] THUNDERLINK_TOKEN_FILE={path} can be read or written by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): a job's token must be secret; run "
                f"`chmod 600 {path}`")
        data = f.read(65537)
    if len(data) > 65536:
        raise ConfigError(f"[thunderlink] THUNDERLINK_TOKEN_FILE={path} is larger than 64 KiB: is it a token?")
    first = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not first.strip():
        raise ConfigError(f"[thunderlink] THUNDERLINK_TOKEN_FILE={path} holds no token (its first line is empty)")
    return first.decode("utf-8", "surrogateescape")


def readme_rows() -> list[str]:
    """The README's rows (variable, default, meaning) for the core's options,
    in the table's order. tests/test_options.py checks the README has them."""
    return [f"| `{spec.env}` | `{spec.shown_default}` | {spec.doc} |" for spec in OPTIONS]


def from_env(env: Mapping[str, str] | None = None) -> Config:
    """Read the configuration from ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    options = {spec.name: v for spec in OPTIONS if (v := _option(env, spec)) is not None}
    # connect() decides the transport (and refuses the ones not built yet):
    # it travels in Config.transport, not with the other options.
    transport = options.pop("transport", "auto")

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
    malloc_heap = _size(env, "THUNDERLINK_MALLOC_HEAP", 0, (1 << 31) - 1)  # mallopt takes an int
    if malloc_heap is None:
        own = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
        tunables = env.get("GLIBC_TUNABLES", "")
        theirs = any(env.get(v) for v in own) or any(f"glibc.malloc.{t}_threshold" in tunables
                                                     for t in ("mmap", "trim"))
        malloc_heap = None if theirs else 1 << 30
    tuning_file = tuning_path(env)
    cable_rates = {}
    if tuning_file is not None:
        from .tune.profile import apply, load

        prof = load(tuning_file)
        options = apply(options, prof)
        cable_rates = {(c["rank"], c["ip"]): c["gbps"] for c in prof.cables}
    return Config(
        backend=backend.strip().lower() if backend else None,
        transport=transport,
        hostfile=hostfile,
        hostfile_var=hostfile_var,
        rank=rank,
        rank_var=rank_var,
        world_size=_int(env, "THUNDERLINK_WORLD_SIZE", 1),
        ifname=env.get("THUNDERLINK_IFNAME") or None,
        job_id=job_id,
        token=read_token(env),
        coordinator=coordinator,
        malloc_heap=malloc_heap,
        tuning_file=tuning_file,
        cable_rates=cable_rates,
        ibv_lib=rdma_settings(env)[0],
        ibv_device=rdma_settings(env)[1],
        options=options,
    )


def tuning_path(env: Mapping[str, str] | None = None) -> str | None:
    """The tuning profile to apply: THUNDERLINK_TUNING_FILE (empty: none),
    else the default path when a file is there."""
    env = os.environ if env is None else env
    explicit = env.get("THUNDERLINK_TUNING_FILE")
    if explicit is not None:
        return os.path.expanduser(explicit.strip()) or None
    path = default_tuning_file(env)
    return path if os.path.exists(path) else None


def default_tuning_file(env: Mapping[str, str] | None = None) -> str:
    """Where `thunderlink tune` writes and init looks when
    THUNDERLINK_TUNING_FILE is unset: $XDG_CONFIG_HOME/thunderlink/tuning.json,
    else ~/.config/thunderlink/tuning.json."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config")
    return os.path.join(base, "thunderlink", "tuning.json")


def rdma_settings(env: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """(THUNDERLINK_IBV_LIB, THUNDERLINK_IBV_DEVICE), None where unset: the
    library the RDMA transport loads and the device it uses."""
    env = os.environ if env is None else env
    return env.get("THUNDERLINK_IBV_LIB") or None, env.get("THUNDERLINK_IBV_DEVICE") or None


def gloo_lib(env: Mapping[str, str] | None = None) -> str | None:
    """THUNDERLINK_GLOO_LIB: the Gloo driver library of the benchmarks, None where unset."""
    env = os.environ if env is None else env
    return env.get("THUNDERLINK_GLOO_LIB") or None


def cluster_state_dir(env: Mapping[str, str] | None = None) -> str:
    """Where emulated clusters are recorded (THUNDERLINK_CLUSTER_STATE_DIR)."""
    env = os.environ if env is None else env
    return env.get("THUNDERLINK_CLUSTER_STATE_DIR") or ENV["THUNDERLINK_CLUSTER_STATE_DIR"][0]
