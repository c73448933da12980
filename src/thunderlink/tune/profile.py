"""Tuning profiles: what ``thunderlink tune`` finds, applied at every init.

A profile is a JSON file::

    {
      "thunderlink_tuning": 1,
      "options": {"conns_per_peer": 2, "algo_threshold": "512K"},
      "rows": [
        {"op": "all_sum", "ranks": 4, "transport": "tcp",
         "min_bytes": "1M", "max_bytes": "16M",
         "algo": "mesh", "chunk_bytes": "256K", "pipeline_depth": 4, "lanes": 2}
      ],
      "measured": {...}
    }

``options`` sets knobs of the options table (csrc/core/options.h) for the
whole communicator, by their Options names; ``rows`` steer the algorithm
choice (coll/select.c) per operation, size band (``min_bytes`` inclusive,
``max_bytes`` exclusive or null; sizes as the selector counts them: the
buffer for all_sum, this rank's input for all_gather, the whole input for
sum_scatter), group size (``ranks``, null: any) and transport (``tcp``,
``shm``, ``any``); the first row that matches applies, and what a row leaves
out (or null) keeps the options' choice. ``cables`` (``[{"rank": r, "ip":
address, "gbps": rate}]``) replace the hostfile's ``rate`` of those
addresses for striping. ``measured`` is what tune saw, for people; it is
not applied.

Environment variables set explicitly win over the profile (config.from_env
applies it); every rank must use the same profile: its rows are in the
handshake's digest (core/options.c), its options are shared knobs already.

This module never reads the environment (config.py does).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..bindings.options import SPECS
from ..errors import ConfigError

__all__ = ["VERSION", "KNOBS", "OPS", "ALGOS", "Profile", "load", "parse", "apply", "DEFAULT_PATH"]

VERSION = 1
# Where a profile is looked for when THUNDERLINK_TUNING_FILE is unset (under
# $XDG_CONFIG_HOME when that is set instead of ~/.config).
DEFAULT_PATH = "~/.config/thunderlink/tuning.json"

# Options a profile may set: how the job moves bytes, never whom it talks to,
# how long it waits or what it logs.
KNOBS = ("conns_per_peer", "chunk_bytes", "algo_threshold", "algo", "spin_us", "stripe_min_bytes",
         "pipeline_depth", "sockbuf_bytes")
_SPEC = {s.name: s for s in SPECS}

# Operation names (the bench's and MLX's, and the core's) -> TL_OP_*.
OPS = {"all_sum": 1, "all_reduce": 1, "all_gather": 2, "sum_scatter": 3, "reduce_scatter": 3, "broadcast": 5}
_OP_NAME = {1: "all_sum", 2: "all_gather", 3: "sum_scatter", 5: "broadcast"}
# Algorithms a row may name -> TL_HOW_*.
ALGOS = {"oneshot": 1, "ring": 2, "mesh": 5}
TRANSPORTS = {"any": 0, "tcp": 1, "shm": 2}
_ROW_KEYS = {"op", "ranks", "transport", "min_bytes", "max_bytes", "algo", "chunk_bytes", "pipeline_depth",
             "lanes"}
# Which row fields an explicitly set variable (by Options name) overrides.
_ROW_FIELD_OF = {"algo": ("algo",), "algo_threshold": ("algo",), "chunk_bytes": ("chunk_bytes",),
                 "pipeline_depth": ("pipeline_depth",), "conns_per_peer": ("lanes",)}


def _size(value, what: str) -> int:
    from ..config import parse_size

    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: {value} is negative")
        return value
    if isinstance(value, str):
        return parse_size(value, what)
    raise ConfigError(f"{what}: {value!r} is not a size (a number of bytes, or '64K', '1M')")


def _int(value, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{what}: {value!r} must be an integer in {lo}..{hi}")
    return value


@dataclass
class Row:
    op: str
    ranks: int | None = None
    transport: str = "any"
    min_bytes: int = 0
    max_bytes: int | None = None
    algo: str | None = None
    chunk_bytes: int | None = None
    pipeline_depth: int | None = None
    lanes: int | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def to_c(self) -> dict:
        """tl_tune_row_t's fields."""
        return {
            "op": OPS[self.op], "nranks": self.ranks or 0, "transport": TRANSPORTS[self.transport],
            "how": ALGOS[self.algo] if self.algo else -1, "min_bytes": self.min_bytes,
            "max_bytes": self.max_bytes or 0, "depth": self.pipeline_depth or 0, "lanes": self.lanes or 0,
            "chunk_bytes": self.chunk_bytes or 0,
        }


@dataclass
class Profile:
    options: dict = field(default_factory=dict)  # Options keyword -> value (Options' units)
    rows: list[Row] = field(default_factory=list)
    measured: dict = field(default_factory=dict)
    # Measured cable rates, replacing the hostfile's for striping:
    # [{"rank": r, "ip": address of r, "gbps": rate}]
    cables: list[dict] = field(default_factory=list)
    path: str | None = None

    def to_json(self) -> dict:
        out = {"thunderlink_tuning": VERSION, "options": dict(self.options),
               "rows": [r.to_json() for r in self.rows], "measured": self.measured}
        if self.cables:
            out["cables"] = list(self.cables)
        return out

    def dump(self, path: str) -> None:
        """Write atomically (a rank reading it meanwhile sees the old or the new file)."""
        path = os.path.expanduser(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
        self.path = path

    def c_rows(self) -> tuple[dict, ...]:
        return tuple(r.to_c() for r in self.rows)


def _row(d, where: str) -> Row:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: a row must be an object, not {type(d).__name__}")
    unknown = set(d) - _ROW_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(a row has {', '.join(sorted(_ROW_KEYS))})")
    op = d.get("op")
    if op not in OPS:
        raise ConfigError(f"{where}: op {op!r} is not one of {', '.join(OPS)}")
    r = Row(op=_OP_NAME[OPS[op]])
    if d.get("ranks") is not None:
        r.ranks = _int(d["ranks"], f"{where}: ranks", 1, 1 << 20)
    t = d.get("transport", "any")
    if t not in TRANSPORTS:
        raise ConfigError(f"{where}: transport {t!r} is not one of {', '.join(TRANSPORTS)}")
    r.transport = t
    r.min_bytes = _size(d.get("min_bytes", 0), f"{where}: min_bytes")
    if d.get("max_bytes") is not None:
        r.max_bytes = _size(d["max_bytes"], f"{where}: max_bytes")
        if r.max_bytes <= r.min_bytes:
            raise ConfigError(f"{where}: max_bytes {r.max_bytes} is not above min_bytes {r.min_bytes}")
    if d.get("algo") is not None:
        if d["algo"] not in ALGOS:
            raise ConfigError(f"{where}: algo {d['algo']!r} is not one of {', '.join(ALGOS)}")
        r.algo = d["algo"]
    if d.get("chunk_bytes") is not None:
        r.chunk_bytes = _size(d["chunk_bytes"], f"{where}: chunk_bytes")
        if not 4096 <= r.chunk_bytes <= 1 << 30:
            raise ConfigError(f"{where}: chunk_bytes {r.chunk_bytes} must be 4096..1G")
    if d.get("pipeline_depth") is not None:
        r.pipeline_depth = _int(d["pipeline_depth"], f"{where}: pipeline_depth", 1, 64)
    if d.get("lanes") is not None:
        r.lanes = _int(d["lanes"], f"{where}: lanes", 1, 2)
    return r


def parse(data, where: str = "tuning profile") -> Profile:
    """A Profile from the JSON value ``data``; ConfigError naming ``where``
    and the problem when it is not a valid profile."""
    if not isinstance(data, dict):
        raise ConfigError(f"[thunderlink] {where}: not a tuning profile (expected a JSON object)")
    version = data.get("thunderlink_tuning")
    if version != VERSION:
        raise ConfigError(
            f"[thunderlink] {where}: "
            + ("not a tuning profile (no \"thunderlink_tuning\" key)" if version is None else
               f"tuning profile version {version!r}, this thunderlink reads version {VERSION}")
            + "; run `thunderlink tune` again, or set THUNDERLINK_TUNING_FILE= (empty) to use none")
    unknown = set(data) - {"thunderlink_tuning", "options", "rows", "measured", "cables"}
    if unknown:
        raise ConfigError(f"[thunderlink] {where}: unknown key(s) {', '.join(sorted(unknown))}")
    prof = Profile(measured=data.get("measured") or {})
    try:
        opts = data.get("options") or {}
        if not isinstance(opts, dict):
            raise ConfigError("options must be an object")
        for name, value in opts.items():
            if name not in KNOBS:
                raise ConfigError(f"options: {name!r} cannot be tuned (a profile may set {', '.join(KNOBS)})")
            spec = _SPEC[name]
            if spec.kind == "choice":
                if value not in spec.available:
                    raise ConfigError(f"options: {name} must be one of {', '.join(spec.available)}, not {value!r}")
            elif spec.kind == "bytes":
                value = _size(value, f"options: {name}")
            else:
                value = _int(value, f"options: {name}", spec.lo, spec.hi)
            if spec.kind != "choice" and not spec.lo <= value <= spec.hi:
                raise ConfigError(f"options: {name} must be in {spec.lo}..{spec.hi}, not {value}")
            prof.options[name] = value
        rows = data.get("rows") or []
        if not isinstance(rows, list):
            raise ConfigError("rows must be a list")
        from ..bindings import lib

        if len(rows) > lib.TL_MAX_TUNE_ROWS:
            raise ConfigError(f"{len(rows)} rows, at most {lib.TL_MAX_TUNE_ROWS}")
        prof.rows = [_row(r, f"row {i}") for i, r in enumerate(rows)]
        cables = data.get("cables") or []
        if not isinstance(cables, list):
            raise ConfigError("cables must be a list")
        for i, c in enumerate(cables):
            if (not isinstance(c, dict) or set(c) != {"rank", "ip", "gbps"} or not isinstance(c["ip"], str)
                    or isinstance(c["rank"], bool) or not isinstance(c["rank"], int) or c["rank"] < 0
                    or isinstance(c["gbps"], bool) or not isinstance(c["gbps"], (int, float))
                    or not 0 < c["gbps"] < 1e6):
                raise ConfigError(f"cables[{i}]: expected {{\"rank\": R, \"ip\": \"A.B.C.D\", \"gbps\": RATE > 0}}, "
                                  f"not {c!r}")
            prof.cables.append(dict(c))
    except ConfigError as e:
        msg = str(e).removeprefix("[thunderlink] ")
        raise ConfigError(f"[thunderlink] {where}: {msg}; fix it, run `thunderlink tune` again, or set "
                          f"THUNDERLINK_TUNING_FILE= (empty) to use none") from None
    return prof


def load(path: str) -> Profile:
    """Read and check the profile at ``path`` (ConfigError naming the file)."""
    where = f"tuning profile {path}"
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20 + 1)
    except OSError as e:
        raise ConfigError(f"[thunderlink] {where}: cannot read it ({e.strerror}); set THUNDERLINK_TUNING_FILE "
                          f"to a profile `thunderlink tune` wrote, or to nothing to use none") from None
    if len(raw) > 1 << 20:
        raise ConfigError(f"[thunderlink] {where}: larger than 1 MiB, not a tuning profile")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"[thunderlink] {where}: not valid JSON ({e}); run `thunderlink tune` again, "
                          f"or set THUNDERLINK_TUNING_FILE= (empty) to use none") from None
    prof = parse(data, where)
    prof.path = path
    return prof


def apply(options: dict, prof: Profile) -> dict:
    """Options keyword arguments: the profile's, then ``options`` (what the
    environment set explicitly) over them; rows lose the fields an explicit
    variable decides."""
    merged = {**prof.options, **options}
    explicit = set(options)
    rows = []
    for r in prof.rows:
        c = r.to_c()
        for name in explicit:
            for f in _ROW_FIELD_OF.get(name, ()):
                c[{"algo": "how", "pipeline_depth": "depth"}.get(f, f)] = -1 if f == "algo" else 0
        rows.append(c)
    if rows:
        merged["tuning"] = tuple(rows)
    return merged


def with_cable_rates(hf, rates: dict):
    """The hostfile with the rate of each address ``rates`` names ((rank,
    ip) -> Gbit/s) replaced: what striping over several cables follows."""
    from dataclasses import replace

    ranks = []
    for r, spec in enumerate(hf.ranks):
        addrs = [replace(a, rate=rates[(r, a.ip)]) if (r, a.ip) in rates else a for a in spec.addresses]
        ranks.append(replace(spec, addresses=addrs))
    return replace(hf, ranks=ranks)
