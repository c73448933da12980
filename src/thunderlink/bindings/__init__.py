"""The C core, bound with cffi (API mode): ``ffi``, ``lib`` and :class:`Comm`."""

from ._core import ffi, lib  # noqa: F401  (built by setup.py from _build.py)
from .comm import Comm, Endpoint, Options, dtype_code  # noqa: E402

__all__ = ["ffi", "lib", "Comm", "Endpoint", "Options", "dtype_code"]
