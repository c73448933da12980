"""Shared fixtures: running a function of tests/rankprogs.py as N ranks.

Every multi-process test goes through ``run_ranks``: the ranks are started
by thunderlink's own launcher, with a hard timeout; the launcher kills every
process group it started when one rank fails or the time is up, and removes
its temporary hostfile.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RANKPROGS = os.path.join(HERE, "rankprogs.py")


class Ranks:
    def __init__(self, result):
        self.result = result
        self.status = result.status
        self.output = result.output
        self.values = []
        for lines in result.output:
            found = None
            for line in lines:
                if line.startswith("RESULT "):
                    found = json.loads(line[len("RESULT "):])
            self.values.append(found)

    def text(self, rank: int) -> str:
        return "\n".join(self.output[rank])

    def all_text(self) -> str:
        return "\n".join(f"--- rank {r} ---\n{self.text(r)}" for r in range(len(self.output)))


def run_ranks(n: int, func: str, *args, env: dict | None = None, timeout: float = 60.0, argv=None):
    """Run rankprogs.<func>(*args) on n local ranks; returns Ranks (each
    rank's RESULT value, output and status)."""
    from thunderlink.launch import launch_local

    full_env = dict(os.environ)
    full_env.setdefault("THUNDERLINK_CONNECT_TIMEOUT", "20")
    full_env.setdefault("THUNDERLINK_TIMEOUT", "30")
    if env:
        full_env.update(env)
    cmd = argv or [sys.executable, RANKPROGS, func, json.dumps(list(args))]
    result = launch_local(n, cmd, env=full_env, timeout=timeout, capture=True, on_line=lambda *a: None)
    return Ranks(result)


@pytest.fixture
def ranks():
    return run_ranks
