"""The fuzz targets of tests/test_fuzz.py, for minutes instead of CI's seconds.

    python bench/fuzz.py                          # every target, 60 s each
    python bench/fuzz.py --seconds 300 frames handshake
    python bench/fuzz.py --list

Each target runs batches of fresh random inputs (hypothesis, not
derandomized) until its time is up, then prints how many inputs it tried and how long it
took; the first input that breaks a target is printed (shrunk) and the
script exits 1. The CI runs of tests/test_fuzz.py use the same strategies
and targets with a fixed, small number of repeatable inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import test_fuzz as T  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _targets(tmp: str) -> dict:
    path = os.path.join(tmp, "hostfile.json")
    return {
        "decode": (st.one_of(st.binary(max_size=600), T.json_values.map(lambda v: json.dumps(v).encode()),
                             T.thunderlink_hostfiles.map(lambda v: json.dumps(v).encode())), T.target_decode),
        "read_hostfile": (st.one_of(st.binary(max_size=300), T.thunderlink_hostfiles.map(lambda v: json.dumps(v).encode()),
                                    T.mlx_ring_hostfiles.map(lambda v: json.dumps(v).encode())),
                          lambda data: T.target_read(data, path)),
        "thunderlink_format": (st.one_of(T.thunderlink_hostfiles, T.valid_ish, T.json_values), T.target_parse),
        "mlx_ring_format": (T.mlx_ring_hostfiles, T.target_parse),
        "jaccl_matrix": (st.tuples(st.one_of(T.device_matrices, T.json_values), st.integers(-1, 6)),
                         lambda a: T.target_matrix(*a)),
        "jaccl_records": (st.one_of(st.lists(T.rank_entries, max_size=6), T.json_values), T.target_records),
        "coordinator": (st.one_of(T.hostport(T.hosts, T.ports), st.text(max_size=40)), T.target_coordinator),
        "environment": (st.dictionaries(st.sampled_from(T.ENV_NAMES), st.text(max_size=40), max_size=8), T.target_env),
        "rates_sizes": (T.rates, T.target_rate_size),
        "handshake": (st.tuples(st.lists(T.stranger_payloads(), min_size=1, max_size=8),
                                st.lists(st.booleans(), min_size=8, max_size=8), st.booleans()),
                      lambda a: T.target_handshake(*a)),
        "frames": (T.frame_mutations(), T.target_frames),
        "coordinator_live": (st.tuples(st.lists(T.coordinator_payloads(), min_size=1, max_size=8), st.booleans()),
                             lambda a: T.target_coordinator_live(*a)),
    }


def run(name: str, strategy, target, seconds: float, batch: int = 50) -> tuple[int, float, str | None]:
    """Batches of fresh random inputs until the time is up; the first
    failure (shrunk by hypothesis) ends the target."""
    count = 0
    start = time.monotonic()

    @settings(max_examples=batch, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def body(x):
        nonlocal count
        count += 1
        target(x)

    while time.monotonic() - start < seconds:
        try:
            body()
        except Exception as e:  # noqa: BLE001 -- the finding, with every sub-exception and input
            return count, time.monotonic() - start, "".join(traceback.format_exception(e))[-12000:]
    return count, time.monotonic() - start, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", help="targets to run (default: all)")
    ap.add_argument("--seconds", type=float, default=60.0, help="per target")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--json", help="write the counts here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tl-fuzz-") as tmp:
        targets = _targets(tmp)
        if args.list:
            print("\n".join(targets))
            return 0
        names = args.targets or list(targets)
        unknown = [n for n in names if n not in targets]
        if unknown:
            ap.error(f"unknown target(s) {', '.join(unknown)}; --list shows them")
        failed = 0
        rows = []
        print(f"{'target':<20} {'inputs':>9} {'seconds':>8}  verdict")
        for name in names:
            strategy, target = targets[name]
            n, secs, problem = run(name, strategy, target, args.seconds)
            rows.append({"target": name, "inputs": n, "seconds": round(secs, 1), "problem": problem})
            print(f"{name:<20} {n:>9} {secs:>8.0f}  {'ok' if problem is None else 'FAIL'}", flush=True)
            if problem:
                failed += 1
                print("    " + problem.replace("\n", "\n    "), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        total = sum(r["inputs"] for r in rows)
        print(f"{total} inputs in {sum(r['seconds'] for r in rows):.0f} s; "
              f"{'no failures' if not failed else f'{failed} target(s) failed'}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
