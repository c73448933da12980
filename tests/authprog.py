"""The rank program of tests/test_auth.py: join the job the environment
describes, all_sum VALUE (default rank + 1), and print one line
``RESULT <json>``: {"raised": None, "sum": ...} or the error's name and text.
With SCAN_CMDLINES=1 it also reports whether its THUNDERLINK_TOKEN appears in
any process's command line (/proc/*/cmdline) while the job runs; with
TOKEN_OUT=PATH it writes its token there (mode 0600) for the test to check.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys

import numpy as np

import thunderlink
from thunderlink.bindings import Options


def emit(value) -> None:
    print("RESULT " + json.dumps(value), flush=True)


def scan_cmdlines(token: str) -> list[str]:
    """Command lines (of every process this user can see) that hold the token."""
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            continue
        if token.encode() in raw:
            found.append(path)
    return found


def main() -> None:
    token = os.environ.get("THUNDERLINK_TOKEN")
    extra = {}
    if os.environ.get("TOKEN_OUT") and token:
        fd = os.open(os.environ["TOKEN_OUT"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
    try:
        comm = thunderlink.connect(options=Options(connect_timeout=float(os.environ.get("CT", "20"))))
        if os.environ.get("SCAN_CMDLINES") and token:
            extra["token_in_cmdlines"] = scan_cmdlines(token)
        if token:
            extra["token_digest"] = hashlib.sha256(token.encode()).hexdigest()
        value = float(os.environ.get("VALUE", comm.rank + 1))
        out = comm.all_sum(np.array([value], dtype=np.float64))
        rank = comm.rank
        comm.close()
        emit({"raised": None, "sum": float(out[0]), "rank": rank, **extra})
    except thunderlink.ThunderlinkError as e:
        emit({"raised": type(e).__name__, "message": str(e)})


if __name__ == "__main__":
    sys.exit(main())
