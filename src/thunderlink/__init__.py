"""thunderlink: a distributed backend for MLX over Thunderbolt and any IP link.

    import thunderlink
    group = thunderlink.init()            # an mx.distributed.Group
    comm = thunderlink.connect()          # or a Comm over the C core (numpy buffers)

See README.md for the command-line tools.
"""

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all

__version__ = "0.1.0"


def connect(*args, **kwargs):
    """Join the job described by the environment; returns a connected
    :class:`thunderlink.bindings.Comm`. See thunderlink.hosts.rendezvous.connect."""
    from .hosts.rendezvous import connect as _connect

    return _connect(*args, **kwargs)


def init(strict: bool = False, *, transport: str | None = None, hostfile: str | None = None):
    """Join the job and return an ``mx.distributed.Group`` running on thunderlink
    (size 1 when nothing is configured, or an error if ``strict``). See
    thunderlink.mlx_backend.init."""
    from .mlx_backend import init as _init

    return _init(strict, transport=transport, hostfile=hostfile)


__all__ = ["init", "connect", "__version__"] + list(_errors_all)
