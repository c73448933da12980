"""thunderlink: a distributed backend for MLX over Thunderbolt and any IP link.

    import thunderlink
    comm = thunderlink.connect()          # a Comm over the C core (numpy buffers)

See README.md for the MLX group (thunderlink.init) and the command-line tools.
"""

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all

__version__ = "0.1.0"


def connect(*args, **kwargs):
    """Join the job described by the environment; returns a connected
    :class:`thunderlink.bindings.Comm`. See thunderlink.transport.rendezvous.connect."""
    from .transport.rendezvous import connect as _connect

    return _connect(*args, **kwargs)


__all__ = ["connect", "__version__"] + list(_errors_all)
