"""--all-netns: the per-rank checks of an emulated cluster, run inside each
rank's network namespace (``ip netns exec NS python ... doctor --rank R
--json``) and merged, so that both ends of every cable are known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from ..hosts.hostfile import Hostfile
from .report import Check, problem, warn

__all__ = ["run_all", "doctor_argv"]

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs this very thunderlink inside the namespace, whatever sys.path the caller has.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from thunderlink.doctor.__main__ import main; sys.exit(main(sys.argv[1:]))"
)


def doctor_argv(netns: str, hostfile: str, rank: int, timeout: float) -> list[str]:
    return ["ip", "netns", "exec", netns, sys.executable, "-c", _BOOT, _PKG_PARENT,
            "--hostfile", hostfile, "--rank", str(rank), "--json", "--timeout", str(timeout),
            "--netns-label", netns, "--rank-only"]


def _one(hf: Hostfile, path: str, r: int, ns: str, timeout: float) -> tuple[list[Check], dict | None]:
    argv = doctor_argv(ns, path, r, timeout)
    limit = 30.0 + 4 * timeout
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=limit)
    except FileNotFoundError:
        return [problem("netns", "cannot enter namespace", "`ip` is not on PATH",
                        "install iproute2 (apt-get install iproute2)", rank=r)], None
    except subprocess.TimeoutExpired:
        return [problem("netns", "doctor timed out",
                        f"the doctor for rank {r} in namespace {ns} did not finish within {limit:g} s",
                        f"run it by hand: {' '.join(argv[:4])} python -m thunderlink doctor --hostfile {path} "
                        f"--rank {r}", rank=r, where=f"namespace {ns}")], None
    try:
        res = json.loads(cp.stdout)
    except ValueError:
        msg = (cp.stderr or cp.stdout).strip()
        fix = None
        if "Cannot open network namespace" in msg or "No such file" in msg:
            fix = (f"create the cluster (thunderlink cluster up ...) or fix \"netns\" of rank {r} "
                   f"(`ip netns list` shows the namespaces)")
        return [problem("netns", "cannot run the doctor in the namespace",
                        f"rank {r}: `ip netns exec {ns} ...` failed (exit {cp.returncode}): {msg[-800:]}",
                        fix, rank=r, where=f"namespace {ns}")], None
    checks = [Check.from_dict(c) for c in res.get("checks", [])]
    facts = (res.get("facts") or {}).get(str(r))
    return checks, facts


def run_all(hf: Hostfile, path: str, ranks: list[int], timeout: float) -> tuple[list[Check], dict[int, dict]]:
    """Checks of ``ranks`` (each in its namespace) and their facts by rank."""
    checks: list[Check] = []
    facts: dict[int, dict] = {}
    jobs = []
    for r in ranks:
        ns = hf.ranks[r].extra.get("netns")
        if not isinstance(ns, str) or not ns:
            checks.append(warn("netns", "rank without namespace",
                               f"rank {r} has no \"netns\" in the hostfile: not checked by --all-netns",
                               f"add \"netns\": \"<namespace>\" to ranks[{r}], or run the doctor on rank {r}'s "
                               f"host without --all-netns", rank=r))
            continue
        jobs.append((r, ns))
    if not jobs:
        return checks, facts
    path = os.path.abspath(path)
    with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as ex:
        results = list(ex.map(lambda job: _one(hf, path, job[0], job[1], timeout), jobs))
    for (r, _), (cs, f) in zip(jobs, results):
        checks += cs
        if f is not None:
            facts[r] = f
    return checks, facts
