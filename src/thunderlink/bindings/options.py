"""The core's options table (csrc/core/options.h), as Python sees it.

Each knob is declared once, in C; this module reads the table from the
compiled core (``tl_option_info``) and makes from it :data:`SPECS` (what
``thunderlink.config`` reads from the environment, and the README's rows)
and :class:`Options` (the keyword arguments of a communicator).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, make_dataclass

from ..errors import ConfigError, InvalidArgumentError
from ._core import ffi, lib

__all__ = ["Spec", "SPECS", "Options", "token_key"]

_KINDS = {lib.TL_OPT_INT: "int", lib.TL_OPT_BYTES: "bytes", lib.TL_OPT_MS: "seconds",
          lib.TL_OPT_CHOICE: "choice"}


@dataclass(frozen=True)
class Spec:
    """One option. ``default``, ``lo`` and ``hi`` are in the core's units
    (milliseconds for ``kind == "seconds"``, an index for "choice");
    :meth:`value` and :meth:`raw` convert to and from Options' units."""

    name: str  # keyword of Options
    field: str  # member of tl_options_t
    env: str  # environment variable
    kind: str  # "int", "bytes", "seconds" or "choice"
    unit: str  # of the stored value
    default: int
    lo: int
    hi: int
    shared: bool  # every rank must agree (the handshake checks it)
    choices: tuple[str, ...]  # kind "choice": names of 0, 1, ...
    help: str  # Markdown, one line

    def value(self, raw: int):
        """The core's value -> Options' units."""
        if self.kind == "seconds":
            return raw / 1000
        if self.kind == "choice":
            return self.choices[raw]
        return raw

    def raw(self, value) -> int:
        """Options' units -> the core's value (range checked by the core)."""
        if self.kind == "seconds":
            s = float(value)
            ms = int(round(s * 1000)) if s == s and abs(s) < 1e12 else -1
            if not self.lo <= ms <= self.hi:
                raise InvalidArgumentError(
                    f"[thunderlink] {self.name} must be between {self.lo / 1000:g} and "
                    f"{self.hi / 1000:g} seconds, not {value}"
                )
            return ms
        if self.kind == "choice":
            for text in (value, str(value).lower()):
                if text in self.choices:
                    return self.choices.index(text)
            raise InvalidArgumentError(
                f"[thunderlink] {self.name} must be one of {', '.join(self.available)}, not {value!r}"
            )
        return int(value)

    @property
    def available(self) -> tuple[str, ...]:
        """Choices this build accepts (later names are understood but refused)."""
        return self.choices[self.lo:self.hi + 1]

    @property
    def shown_default(self) -> str:
        """The default as people write it: 600, 512K, auto."""
        if self.kind == "seconds":
            return f"{self.default / 1000:g}"
        if self.kind == "choice":
            return self.choices[self.default]
        if self.kind == "bytes" and self.default:
            for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
                if self.default % (1 << shift) == 0:
                    return f"{self.default >> shift}{suffix}"
        return str(self.default)

    @property
    def doc(self) -> str:
        """The help text, saying whether every rank must agree."""
        if self.shared and "same on every rank" not in self.help.lower():
            return f"{self.help} (same on every rank)"
        return self.help


def _text(p) -> str:
    return ffi.string(p).decode("utf-8")


def _read() -> tuple[Spec, ...]:
    info = ffi.new("tl_option_info_t *")
    specs = []
    for i in range(lib.tl_option_count()):
        if lib.tl_option_info(i, info):
            raise RuntimeError(f"tl_option_info({i}) failed")
        choices = _text(info.choices)
        specs.append(Spec(
            name=_text(info.name), field=_text(info.field), env=_text(info.env), kind=_KINDS[info.kind],
            unit=_text(info.unit), default=getattr(info, "def"),  # "def" is a Python keyword
            lo=info.min, hi=info.max, shared=bool(info.shared),
            choices=tuple(choices.split(",")) if choices else (), help=_text(info.help),
        ))
    return tuple(specs)


SPECS: tuple[Spec, ...] = _read()
_TYPES = {"int": "int | None", "bytes": "int | None", "seconds": "float | None", "choice": "str | None"}


def token_key(token: str) -> bytes:
    """The 32-byte key a job token stands for: SHA-256 of its UTF-8 text after
    a label (any non-empty text is a token; every rank hashes it the same way)."""
    if not isinstance(token, str) or not token:
        raise ConfigError("[thunderlink] the job token must be a non-empty string")
    return hashlib.sha256(b"thunderlink job token\0" + token.encode("utf-8", "surrogateescape")).digest()


def _to_c(self):
    """A tl_options_t: the core's defaults, overridden by every field not None."""
    o = ffi.new("tl_options_t *")
    lib.tl_options_default(o)
    if self.job_id is not None:
        o.job_id = int(self.job_id) & 0xFFFFFFFFFFFFFFFF
    if self.token is not None:
        o.token_key = token_key(self.token)
        o.token_set = 1
    for spec in SPECS:
        v = getattr(self, spec.name)
        if v is None:
            continue
        try:
            setattr(o, spec.field, spec.raw(v))
        except OverflowError:
            raise ConfigError(f"[thunderlink] option {spec.name}={v} is out of range") from None
    rows = self.tuning or ()
    if len(rows) > lib.TL_MAX_TUNE_ROWS:
        raise ConfigError(f"[thunderlink] a tuning profile has at most {lib.TL_MAX_TUNE_ROWS} rows, not {len(rows)}")
    o.ntune = len(rows)
    for i, row in enumerate(rows):  # tl_tune_row_t fields (thunderlink.tune.profile makes them)
        for name, v in row.items():
            try:
                setattr(o.tune[i], name, v)
            except (AttributeError, OverflowError, TypeError):
                raise ConfigError(f"[thunderlink] tuning row {i}: bad {name}={v!r}") from None
    why = ffi.new("char[256]")
    if lib.tl_options_check(o, why, 256):
        raise ConfigError(f"[thunderlink] invalid options: {ffi.string(why).decode()}")
    return o


def _defaults() -> dict:
    """The core's defaults, in Options' units (seconds, names)."""
    o = ffi.new("tl_options_t *")
    lib.tl_options_default(o)
    return {**{s.name: s.value(getattr(o, s.field)) for s in SPECS}, "tuning": None}


Options = make_dataclass(
    "Options",
    [("job_id", "int | None", field(default=None)),
     # A secret: kept out of repr() (and so out of logs and tracebacks).
     ("token", "str | None", field(default=None, repr=False))]
    + [(s.name, _TYPES[s.kind], field(default=None)) for s in SPECS]
    # A tuning profile's rows, as tl_tune_row_t fields (thunderlink.tune.profile).
    + [("tuning", "tuple | None", field(default=None))],
    namespace={"to_c": _to_c, "defaults": staticmethod(_defaults)},
)
Options.__module__ = __name__
Options.__doc__ = (
    "Knobs of a communicator, one field per row of the core's options table "
    "(csrc/core/options.h, listed in SPECS); None keeps the core's default. "
    "Times are in seconds; choices by name (algo: auto, ring, oneshot, mesh). "
    "job_id is the job's identity, checked in every handshake; token the job's "
    "secret (THUNDERLINK_TOKEN), which every connection proves it holds (never shown "
    "by repr). tuning holds a tuning profile's rows (thunderlink.tune.profile), also "
    "checked.\n\nFields: "
    + ", ".join(["job_id", "token"] + [s.name for s in SPECS] + ["tuning"])
)
