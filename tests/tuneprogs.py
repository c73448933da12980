"""Programs that tests/test_tune.py and test_mesh.py run as N ranks
(python tuneprogs.py FUNC JSON_ARGS); each prints ``RESULT <json>``."""

from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np

import thunderlink
from thunderlink.tune import plan


def emit(value) -> None:
    print("RESULT " + json.dumps(value), flush=True)


def plans(cases, profile_base=None):
    """cases: [[op, bytes], ...]: the plan the connected communicator runs for
    each, its links' channel counts, and an all_sum of the largest size
    checked (the profile's plan works). With profile_base, rank r reads the
    profile profile_base + str(r) + '.json' (THUNDERLINK_TUNING_FILE)."""
    if profile_base is not None:
        os.environ["THUNDERLINK_TUNING_FILE"] = f"{profile_base}{os.environ['THUNDERLINK_RANK']}.json"
    try:
        comm = thunderlink.connect()
    except thunderlink.ThunderlinkError as e:
        emit({"raised": type(e).__name__, "message": str(e)})
        return
    out = {"plans": [plan(comm, op, nbytes) for op, nbytes in cases],
           "channels": sorted({nch for _, nch in comm.links().values()})}
    big = max(nbytes for _, nbytes in cases) // 4
    x = np.arange(big, dtype=np.float32) % 7 + comm.rank
    y = comm.all_sum(x)
    want = (np.arange(big, dtype=np.float32) % 7) * comm.size + sum(range(comm.size))
    out["ok"] = bool(np.array_equal(y, want))
    emit(out)


if __name__ == "__main__":
    func, args = sys.argv[1], json.loads(sys.argv[2])
    try:
        globals()[func](*args)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
