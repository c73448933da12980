"""What every rank program of the tests (rankprogs.py, mlxprogs.py, ...)
shares: the RESULT line the tests read, the entry point that runs
`python PROG.py FUNC JSON_ARGS` (a traceback and status 1 on any error),
and counting this process's threads by name."""

import json
import os
import sys
import traceback


def threads_named(name: str) -> int:
    """This process's threads named `name` (Linux: /proc; the core names
    its own: tl-heartbeat, tl-io)."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().strip() == name
        except OSError:
            pass  # the thread ended meanwhile
    return n


def emit(value) -> None:
    print("RESULT " + json.dumps(value), flush=True)


def run(namespace: dict) -> None:
    func, args = sys.argv[1], json.loads(sys.argv[2])
    try:
        namespace[func](*args)
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
