"""Test helpers for thunderlink: emulated clusters of hosts on one Linux box.

Import-light on purpose: nothing here imports the compiled core, and the
submodule is loaded lazily (so ``python -m thunderlink.testing.cluster`` works
without a runpy warning).
"""

__all__ = ["Cluster", "ClusterError", "available"]


def __getattr__(name):
    if name in __all__:
        from . import cluster

        return getattr(cluster, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
