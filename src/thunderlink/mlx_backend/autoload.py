"""MLX_DISTRIBUTED_BACKEND=thunderlink: unmodified MLX programs use thunderlink.

thunderlink.pth (installed into site-packages) imports this module at start-up,
and only when the variable is set. It waits for ``mlx.core`` to be imported
(a meta-path hook, so programs that never import MLX pay nothing), then:

- ``mx.distributed.init()`` with backend "any" (the default) or "thunderlink"
  returns thunderlink's group; other backends ("ring", "mpi", ...) are MLX's;
- operations called without ``group=`` (``all_sum(x)``, and so
  ``nn.average_gradients``, the sharded layers ...) run on that group, where
  MLX would otherwise use its own default group.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys

__all__ = ["install", "patch"]

_OPS = ("all_sum", "all_max", "all_min", "all_gather", "sum_scatter", "send", "recv", "recv_like")
_patched = False


def patch(mx) -> None:
    """Replace mx.distributed.init and give the ops thunderlink's default group."""
    global _patched
    if _patched:
        return
    _patched = True
    import thunderlink.mlx_backend as tlb

    dist = mx.distributed
    tlb._mlx_init = dist.init

    @functools.wraps(dist.init)
    def init(strict: bool = False, backend: str = "any", **kwargs):
        if backend in ("any", "thunderlink") and not kwargs:
            return tlb.init(strict)
        return tlb._mlx_init(strict, backend, **kwargs)

    dist.init = init
    for name in _OPS:
        original = getattr(dist, name)

        def make(original):
            @functools.wraps(original)
            def op(*args, group=None, **kwargs):
                return original(*args, group=init() if group is None else group, **kwargs)

            return op

        setattr(dist, name, make(original))


class _Finder(importlib.abc.MetaPathFinder):
    """Patches mlx.core right after it is first imported."""

    def find_spec(self, name, path, target=None):
        if name != "mlx.core":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        finder = self

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                if finder in sys.meta_path:
                    sys.meta_path.remove(finder)
                patch(module)

        spec.loader = Loader()
        return spec


def install() -> None:
    if "mlx.core" in sys.modules:
        patch(sys.modules["mlx.core"])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
