"""What every rank program of the tests (rankprogs.py, mlxprogs.py, ...)
shares: the RESULT line the tests read, and the entry point that runs
`python PROG.py FUNC JSON_ARGS` (a traceback and status 1 on any error)."""

import json
import sys
import traceback


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
