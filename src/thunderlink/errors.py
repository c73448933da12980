"""Exceptions, and the one place where C status codes become them.

Every thunderlink error is a :class:`ThunderlinkError`, itself a
``RuntimeError`` (what MLX raises when a collective fails at ``mx.eval``).
Each also derives from the built-in that matches its cause, so
``except TimeoutError`` or ``except ValueError`` work as expected.
"""

from __future__ import annotations

import re

__all__ = [
    "ThunderlinkError",
    "ConfigError",
    "InvalidArgumentError",
    "CommunicationError",
    "PeerLostError",
    "CollectiveTimeoutError",
    "ProtocolError",
    "MismatchError",
    "SystemCallError",
    "UnsupportedError",
    "ClosedError",
    "InterruptedCollectiveError",
    "check",
    "printable",
]


class ThunderlinkError(RuntimeError):
    """Base class. ``status`` is the C core's status code (0 when raised in Python)."""

    status = 0

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class ConfigError(ThunderlinkError, ValueError):
    """Bad configuration: hostfile, addresses, ports, environment variables."""


class InvalidArgumentError(ThunderlinkError, ValueError):
    """A call was given an argument it cannot use (dtype, rank, buffer ...)."""


class CommunicationError(ThunderlinkError):
    """A collective failed on the wire. The communicator is unusable afterwards:
    every later call raises the same error."""


class PeerLostError(CommunicationError, ConnectionError):
    """A peer closed or reset its connection, or reported its own failure."""


class CollectiveTimeoutError(CommunicationError, TimeoutError):
    """A deadline passed (THUNDERLINK_TIMEOUT, THUNDERLINK_CONNECT_TIMEOUT)."""


class ProtocolError(CommunicationError):
    """Bytes on a connection were not what the protocol allows."""


class MismatchError(CommunicationError):
    """Ranks called different collectives, or with different sizes or dtypes."""


class SystemCallError(CommunicationError, OSError):
    """An operating-system call failed."""


class UnsupportedError(ThunderlinkError, NotImplementedError):
    """The operation or transport is not available in this build or on this host."""


class ClosedError(ThunderlinkError):
    """The communicator was closed."""


class InterruptedCollectiveError(CommunicationError, InterruptedError):
    """A signal (Ctrl-C) interrupted a collective on the main thread."""


class _OutOfMemory(ThunderlinkError, MemoryError):
    """The core could not allocate memory."""


# The core's status names (TL_ERR_<NAME> in tl.h) and the class each raises.
_BY_NAME = {
    "INVALID": InvalidArgumentError,
    "CONFIG": ConfigError,
    "SYSTEM": SystemCallError,
    "TIMEOUT": CollectiveTimeoutError,
    "PEER": PeerLostError,
    "PROTOCOL": ProtocolError,
    "MISMATCH": MismatchError,
    "UNSUPPORTED": UnsupportedError,
    "NOMEM": _OutOfMemory,
    "CLOSED": ClosedError,
    "INTERRUPTED": InterruptedCollectiveError,
}

# Filled by register_core(): the bindings hand the core over once they have
# loaded it, so this module never imports them (one direction: bindings -> errors).
_ffi = None
_lib = None
_classes: dict[int, type[ThunderlinkError]] = {}


def register_core(ffi, lib) -> None:
    """Called by :mod:`thunderlink.bindings` right after the core is loaded:
    keep ``ffi``/``lib`` for :func:`check` and map each ``TL_ERR_*`` status
    to its exception class (a status without a class raises the base)."""
    global _ffi, _lib, _classes
    _classes = {
        getattr(lib, name): _BY_NAME.get(name[len("TL_ERR_"):], ThunderlinkError)
        for name in dir(lib)
        if name.startswith("TL_ERR_")
    }
    _ffi, _lib = ffi, lib


# C0 and C1 controls (terminal escapes), DEL, and the bidirectional overrides.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control characters and
    bidirectional overrides shown as \\xNN or \\uNNNN. Messages can quote
    what a peer or a file said; the core escapes a peer's abort notice
    already, and this is the second line of defence."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def check(rc: int, handle=None) -> int:
    """Return ``rc`` if it is not an error, else raise the matching exception
    with the communicator's message (or the code's generic text)."""
    if rc >= 0:
        return rc
    ffi, lib = _ffi, _lib
    if lib is None:  # a status can only come from the core, which registers itself
        raise ThunderlinkError(f"[thunderlink] status {rc} (core not loaded)", rc)
    message = ""
    if handle is not None and handle != ffi.NULL:
        message = printable(ffi.string(lib.tl_comm_last_error(handle)).decode("utf-8", "replace"))
    if not message:
        message = ffi.string(lib.tl_strerror(rc)).decode()
    raise _classes.get(rc, ThunderlinkError)(f"[thunderlink] {message}", rc)
