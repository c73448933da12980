"""thunderlink as an MLX distributed backend.

``init()`` returns a genuine ``mx.distributed.Group`` whose operations run on
thunderlink's C core: lazily, inside MLX graphs, under ``mx.compile`` and
autodiff, reading and writing the arrays' own buffers.
"""

from __future__ import annotations

import ctypes
import sys
import threading

from ..errors import ConfigError, ThunderlinkError

__all__ = ["init", "group_from_comm", "close", "is_thunderlink_group", "malloc_state"]

_lock = threading.Lock()
_world = None          # the group init() made (like MLX, one per process)
_mlx_init = None       # mx.distributed.init before autoload replaced it
_warned_alone = False  # init() said why this process runs alone
# What tune_malloc did, for the bench and doctor to print: None (not yet),
# "heap <bytes>", or why it left malloc alone.
malloc_state = None

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc(heap: int | None) -> str:
    """Keep MLX's large arrays in glibc's heap (THUNDERLINK_MALLOC_HEAP).

    MLX's CPU allocator on Linux caches nothing: every fresh array (an
    all_sum's output, ``x + 1``) is a malloc, and glibc serves blocks above
    its mmap threshold (at most 32 MiB) with a fresh mapping that the kernel
    faults in and zeroes page by page, while the core receives into it: a
    64 MiB all_sum through MLX took 79 ms against 13 ms for the core itself.
    With the mmap threshold and the trim threshold at ``heap`` bytes, blocks
    up to that size come from the heap, whose freed pages the next array
    reuses: 17 ms. Process-wide, once, at the first group. What the process
    holds: its heap stays at its high-water mark of live blocks below
    ``heap`` (freed blocks are reused, not returned), plus at most ``heap``
    bytes of free space at the top, which glibc returns past that; blocks
    above ``heap`` are still mapped and unmapped each time. 0 (or glibc's
    own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / GLIBC_TUNABLES
    in the environment: ``heap`` None) leaves malloc as it is."""
    global malloc_state
    if malloc_state is not None:
        return malloc_state
    if heap is None:
        malloc_state = "left alone: the environment sets glibc's malloc thresholds"
    elif heap == 0:
        malloc_state = "left alone: THUNDERLINK_MALLOC_HEAP=0"
    elif not sys.platform.startswith("linux"):
        malloc_state = "left alone: not Linux"
    else:
        try:
            libc = ctypes.CDLL(None)
            glibc = libc.gnu_get_libc_version  # glibc only: other libcs' mallopt differ
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            malloc_state = "left alone: not glibc"
        else:
            glibc.restype = ctypes.c_char_p
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            if mallopt(_M_MMAP_THRESHOLD, heap) and mallopt(_M_TRIM_THRESHOLD, heap):
                malloc_state = f"heap {heap}"
            else:  # glibc before 2.35 refuses an mmap threshold above 32 MiB
                malloc_state = f"left alone: glibc {glibc().decode()} refused a threshold of {heap} bytes"
    return malloc_state


def _load_shim():
    """The nanobind module, after checking it matches the running MLX."""
    import mlx.core as mx  # registers mx.distributed.Group in the shared domain

    try:
        from . import _shim as shim
    except ImportError as e:
        raise ThunderlinkError(
            f"[thunderlink] the MLX shim cannot be loaded ({e}); reinstall thunderlink with "
            f"`pip install --force-reinstall --no-deps .` in an environment with mlx=={mx.__version__}"
        ) from None
    if shim.built_mlx_version() != mx.__version__ or not shim.abi_ok():
        raise ThunderlinkError(
            f"[thunderlink] the MLX shim was built for mlx {shim.built_mlx_version()} but mlx "
            f"{mx.__version__} is running (or its nanobind ABI differs), so it cannot hand MLX a "
            f"Group; rebuild it against this mlx: `pip install --force-reinstall --no-deps "
            f"--no-build-isolation .` (with nanobind 3.0.1-3.1.x installed)"
        )
    return shim


def group_from_comm(comm):
    """An ``mx.distributed.Group`` over a connected ``thunderlink.bindings.Comm``.
    The group keeps the communicator alive; the Comm object may be closed."""
    from ..bindings import ffi, lib
    from ..config import from_env

    shim = _load_shim()
    tune_malloc(from_env().malloc_heap)
    return shim.make_group(int(ffi.cast("uintptr_t", lib.tl_get_vtable())), comm.handle_address())


def _original_init():
    import mlx.core as mx

    return _mlx_init or mx.distributed.init


def init(strict: bool = False, *, transport: str | None = None, hostfile: str | None = None):
    """Join the job and return an ``mx.distributed.Group`` on thunderlink.

    The job is described by THUNDERLINK_HOSTFILE/THUNDERLINK_RANK (or MLX's
    MLX_HOSTFILE/MLX_RANK, as written by mlx.launch), or by ``hostfile`` and
    THUNDERLINK_RANK. With nothing configured it behaves like
    ``mx.distributed.init``: a group of size 1, or an error if ``strict``.
    With half a job configured (a hostfile but no rank, or a rank but no
    hostfile) it says so on stderr, once, before returning that group of
    size 1; with ``strict``, it raises ConfigError.
    The group is made once per process; later calls return it."""
    global _world, _warned_alone
    from ..config import from_env
    from ..hosts.rendezvous import connect

    with _lock:
        if _world is not None:
            return _world
        cfg = from_env()
        if hostfile is None and not cfg.configured:
            half = cfg.half_configured
            if strict:
                raise ConfigError(
                    f"[thunderlink] init(strict=True): {half or 'no job to join: no hostfile and no rank are set'}; "
                    "set THUNDERLINK_HOSTFILE and THUNDERLINK_RANK (or MLX_HOSTFILE and MLX_RANK), or start "
                    "the program with `thunderlink launch`"
                )
            if half and not _warned_alone:
                _warned_alone = True
                set_var = cfg.hostfile_var if cfg.rank is None else cfg.rank_var
                sys.stderr.write(
                    f"[thunderlink] warning: {half}, so this process runs alone (a group of size 1) instead "
                    f"of joining its job; set the missing variable on every rank (`thunderlink launch` sets "
                    f"them all), or unset {set_var} to run alone without this warning\n"
                )
                sys.stderr.flush()
            return _original_init()(False)
        with connect(cfg, hostfile=hostfile, transport=transport) as comm:
            _world = group_from_comm(comm)
        return _world


def close(group=None) -> None:
    """Close a thunderlink group's connections now (default: init()'s group).
    Compiled functions keep groups alive; this ends the connections anyway."""
    global _world
    g = group if group is not None else _world
    if g is None:
        return
    _load_shim().close_group(g)
    if g is _world:
        _world = None


def is_thunderlink_group(group) -> bool:
    return _load_shim().is_thunderlink_group(group)
