"""The C core, bound with cffi (API mode): ``ffi``, ``lib`` and :class:`Comm`."""

from ._core import ffi, lib  # noqa: F401  (built by setup.py from _build.py)
from ..errors import register_core

register_core(ffi, lib)  # errors.check() reads statuses through these; errors never imports bindings
from .comm import Comm, Endpoint, Options, Topology, dtype_code, transport_available  # noqa: E402

__all__ = ["ffi", "lib", "Comm", "Endpoint", "Options", "Topology", "dtype_code", "transport_available"]
