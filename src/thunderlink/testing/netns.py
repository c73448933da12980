"""What the rest of thunderlink needs to know about emulated hosts: a hostfile
entry with a "netns" key (written by ``thunderlink cluster``) is a network
namespace on this machine, and a command runs there through ``ip netns exec``.
Import-light: the launcher imports this."""

from __future__ import annotations

from typing import Sequence

__all__ = ["namespace_of", "command_in"]


def namespace_of(spec) -> str | None:
    """The network namespace of an emulated host's hostfile entry (a RankSpec), else None."""
    ns = spec.extra.get("netns")
    return str(ns) if ns else None


def command_in(netns: str, argv: Sequence) -> list[str]:
    """``argv`` run inside the network namespace ``netns``."""
    return ["ip", "netns", "exec", netns, *[str(a) for a in argv]]
