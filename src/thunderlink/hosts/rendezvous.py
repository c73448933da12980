"""From configuration to a connected communicator."""

from __future__ import annotations

from ..bindings import Comm, Options
from ..bindings.comm import TRANSPORTS
from ..config import Config, from_env
from ..errors import ConfigError, UnsupportedError
from . import hostfile as hostfile_mod
from . import jaccl

__all__ = ["connect", "IMPLEMENTED_TRANSPORTS"]

IMPLEMENTED_TRANSPORTS = tuple(TRANSPORTS)


def connect(
    config: Config | None = None,
    *,
    hostfile: str | None = None,
    rank: int | None = None,
    transport: str | None = None,
    options: Options | None = None,
) -> Comm:
    """Join the job described by the environment (or the arguments, which
    win; fields of ``options`` left at None keep their THUNDERLINK_* value)
    and return a connected :class:`Comm`.

    ``hostfile`` is a thunderlink or MLX ring hostfile (THUNDERLINK_HOSTFILE,
    else MLX_HOSTFILE); ``rank`` this process's rank (THUNDERLINK_RANK, else
    MLX_RANK)."""
    cfg = config if config is not None else from_env()
    path = hostfile if hostfile is not None else cfg.hostfile
    var = None if hostfile is not None else cfg.hostfile_var
    if rank is None:
        rank, rank_var = cfg.rank, cfg.rank_var
    else:
        rank_var = None
    if path is None:
        raise ConfigError(
            "[thunderlink] no hostfile: set THUNDERLINK_HOSTFILE (or MLX_HOSTFILE), pass hostfile=, "
            "or start the program with `thunderlink launch`"
        )
    if rank is None:
        raise ConfigError(
            "[thunderlink] no rank: set THUNDERLINK_RANK (or MLX_RANK), pass rank=, or start the "
            "program with `thunderlink launch`"
        )
    kind = (transport or cfg.transport or "auto").lower()
    if kind not in IMPLEMENTED_TRANSPORTS:
        raise UnsupportedError(
            f"[thunderlink] transport {kind!r} is not available in this version of thunderlink "
            f"(it implements {', '.join(IMPLEMENTED_TRANSPORTS)}); unset THUNDERLINK_TRANSPORT or set it to auto"
        )
    obj = hostfile_mod.read_json(path, var)
    held: list = []  # sockets holding the ports a JACCL rank announced, until the core binds them
    try:
        return _connect(cfg, obj, path, rank, rank_var, kind, options, held)
    finally:
        jaccl.release(held)


def _connect(cfg: Config, obj, path: str, rank: int, rank_var: str | None, kind: str,
             options: Options | None, held: list) -> Comm:
    if hostfile_mod.is_device_matrix(obj):  # the one place the format is told apart
        timeout = (options.connect_timeout if options and options.connect_timeout else None) or \
            cfg.options.get("connect_timeout") or Options.defaults()["connect_timeout"]
        token = (options.token if options is not None and options.token is not None else None) or cfg.token
        hf = jaccl.hostfile_from_matrix(obj, rank, cfg.coordinator, timeout=timeout, path=path, hold=held,
                                        token=token)
    else:
        hf = hostfile_mod.parse_addresses(obj, path)
    if cfg.cable_rates:  # a tuning profile's measured rates replace the hostfile's, for striping
        from ..tune.profile import with_cable_rates

        hf = with_cable_rates(hf, cfg.cable_rates)
    via = f" ({rank_var})" if rank_var else ""
    if not 0 <= rank < hf.size:
        raise ConfigError(
            f"[thunderlink] rank {rank}{via} is out of range: hostfile {path} has {hf.size} ranks (0..{hf.size - 1})"
        )
    if cfg.world_size is not None and cfg.world_size != hf.size:
        raise ConfigError(
            f"[thunderlink] THUNDERLINK_WORLD_SIZE={cfg.world_size} but hostfile {path} has {hf.size} ranks"
        )
    # Environment first, then whatever the caller set explicitly.
    opts = Options(**cfg.options)
    if options is not None:
        for name, value in vars(options).items():
            if value is not None:
                setattr(opts, name, value)
    if opts.job_id is None:
        opts.job_id = cfg.job_id if cfg.job_id is not None else hf.job_id()
    if opts.token is None:
        opts.token = cfg.token
    opts.transport = kind
    jaccl.release(held)  # the core binds these ports now
    return Comm.create(rank, hf.size, hf.endpoints(cfg.ifname, rank), opts, ring=hf.ring)
