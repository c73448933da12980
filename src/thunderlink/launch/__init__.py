"""thunderlink launch: start the ranks of a job (locally, or over ssh).

Import-light: the names below load their module on first use, so that the
remote rank wrapper (``python -m thunderlink.launch.remote``) starts without
importing subprocess before it has removed the working directory from sys.path.
"""

_EXPORTS = {
    "Job": "job", "JobResult": "job", "exit_status": "job",
    "free_ports": "local", "launch_local": "local", "private_tempdir": "local", "rank_env": "local",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
