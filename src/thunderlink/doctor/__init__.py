"""thunderlink doctor: finds set-up problems (wrong addresses, Thunderbolt
Bridge vs per-cable links, hostfiles that don't match the machines, MTU
mismatches, busy ports, unreachable peers) and prints each with its fix.

See :mod:`thunderlink.doctor.__main__` for the command line; the checks live
in :mod:`.listing` (this host's interfaces) and :mod:`.ranks` (a hostfile
against this host), :mod:`.netns` runs them in emulated clusters, and
:mod:`.topology` shows what the core derives from a hostfile.
"""

from .report import Check, Report

__all__ = ["Check", "Report", "main"]


def main(argv: list[str] | None = None) -> int:
    from .__main__ import main as _main

    return _main(argv)
