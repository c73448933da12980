"""Test helpers: two ranks of one job inside one process, and a 3-rank job
whose third rank is SIGKILLed in the middle of its collectives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading


def comm_pair(timeout: float = 20.0, **options):
    """Ranks 0 and 1 of a fresh job on 127.0.0.1 (Options(**options), with
    the timeouts), each connected by its own thread."""
    from thunderlink.bindings import Comm, Endpoint, Options
    from thunderlink.errors import ConfigError
    from thunderlink.launch import free_ports

    for attempt in range(5):
        ports = free_ports(2)
        eps = [Endpoint(owner=r, host="127.0.0.1", port=ports[r]) for r in range(2)]
        opts = Options(timeout=timeout, connect_timeout=timeout, **options)
        out, errs = [None, None], []

        def make(r, out=out, errs=errs, eps=eps, opts=opts):
            try:
                out[r] = Comm.create(r, 2, eps, opts)
            except Exception as e:  # noqa: BLE001 -- reported below
                errs.append(e)

        threads = [threading.Thread(target=make, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not errs:
            return out
        for c in out:
            if c is not None:
                c.close()
        # Another process took a port between free_ports and the bind: again.
        if not (isinstance(errs[0], ConfigError) and "already in use" in str(errs[0])) or attempt == 4:
            raise errs[0]


def sigkill_mid_collective(tmp_path, env: dict) -> None:
    """3 ranks run rankprogs.killed_mid_collective (env added to theirs);
    rank 2 SIGKILLs itself mid-all_sum: ranks 0 and 1 must raise
    PeerLostError naming rank 2 within 2 s of its death."""
    from conftest import RANKPROGS

    from thunderlink.launch import free_ports

    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"ranks": [{"addresses": [f"127.0.0.1:{p}"]} for p in free_ports(3)]}))
    stamp = tmp_path / "killed_at"
    procs = []
    try:
        for rank in range(3):
            e = dict(os.environ, THUNDERLINK_HOSTFILE=str(hf), THUNDERLINK_RANK=str(rank),
                     THUNDERLINK_TIMEOUT="60", THUNDERLINK_CONNECT_TIMEOUT="20", **env)
            procs.append(subprocess.Popen([sys.executable, RANKPROGS, "killed_mid_collective", json.dumps([str(stamp)])],
                                          env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[2].returncode == -9, outs[2]
    killed_at = float(stamp.read_text())
    for rank in (0, 1):
        line = next((ln for ln in outs[rank][0].splitlines() if ln.startswith("RESULT ")), None)
        assert line, outs[rank]
        v = json.loads(line[7:])
        assert v["raised"] == "PeerLostError", v
        assert "rank 2" in v["message"], v
        assert v["at"] - killed_at < 2.0, (v, killed_at)
