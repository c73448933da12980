"""The `thunderlink` command: one entry point, one module per tool."""

from __future__ import annotations

import importlib
import sys

TOOLS = {
    "launch": ("thunderlink.launch.__main__", "start the ranks of a job"),
    "bench": ("thunderlink.bench.__main__", "measure collectives (nccl-tests style)"),
    "doctor": ("thunderlink.doctor.__main__", "check interfaces and a hostfile, with fixes"),
    "probe": ("thunderlink.tune.probe", "measure every cable: bandwidth, latency, MTU, slow cables"),
    "tune": ("thunderlink.tune.tuner", "sweep the knobs on the live cluster and write a tuning profile"),
    "cluster": ("thunderlink.testing.cluster", "emulate a Thunderbolt cluster with network namespaces"),
}

USAGE = "usage: thunderlink <tool> [args]\n\ntools:\n" + "\n".join(
    f"  {name:<10} {help}" for name, (_, help) in TOOLS.items()
) + "\n\n`thunderlink <tool> --help` describes a tool.\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a missing tool is a usage error, as with any command that needs one
        sys.stderr.write(USAGE)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"thunderlink {__version__}")
        return 0
    tool = TOOLS.get(argv[0])
    if tool is None:
        sys.stderr.write(f"thunderlink: unknown tool {argv[0]!r}\n\n{USAGE}")
        return 2
    module = importlib.import_module(tool[0])
    try:
        return int(module.main(argv[1:]) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # probe and tune: a configuration problem is one line, not a traceback
        from .errors import ConfigError

        if argv[0] not in ("probe", "tune") or not isinstance(e, ConfigError):
            raise
        sys.stderr.write(f"thunderlink {argv[0]}: {str(e).removeprefix('[thunderlink] ')}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
