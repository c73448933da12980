"""One rank of a launched job that connects several communicators, each
with its own knobs, over the same cables: what probe and tune need to
compare settings in one run (connections per cable and cable weights are
fixed when a communicator connects).

Communicator ``index`` listens on every hostfile address's port plus
``index * PORT_STRIDE`` and has its own job id, so communicators of one
session never meet each other's connections. The ranks agree on each index
over a control communicator (the hostfile's own ports): an index whose
ports some rank finds taken (local ranks share the loopback's ports with
everything else on the host) is skipped.
"""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import replace

import numpy as np

from ..bindings import Comm, Options
from ..config import Config, from_env
from ..errors import ConfigError
from ..hosts import hostfile as hostfile_mod

__all__ = ["Session", "time_op", "PORT_STRIDE"]

PORT_STRIDE = 7
MAX_INDEX = 400


class Session:
    def __init__(self, cfg: Config | None = None):
        cfg = cfg if cfg is not None else from_env()
        if not cfg.configured:
            raise ConfigError("[thunderlink] not a rank of a job: start it with `thunderlink launch` "
                              "(or set THUNDERLINK_HOSTFILE and THUNDERLINK_RANK)")
        self.cfg = cfg
        self.rank = cfg.rank
        self.hostfile = hostfile_mod.parse_addresses(hostfile_mod.read_json(cfg.hostfile, cfg.hostfile_var),
                                                     cfg.hostfile)
        self.size = self.hostfile.size
        self._next = 1
        self._control = None

    def _ports_free(self, index: int) -> bool:
        for a in self.hostfile.ranks[self.rank].addresses:
            port = a.port + index * PORT_STRIDE
            if port > 65535:
                return False
            family = socket.AF_INET6 if ":" in a.ip else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((a.ip.split("%")[0], port))
                except OSError as e:
                    if e.errno == errno.EADDRINUSE:
                        return False
        return True

    def _agree_index(self) -> int:
        """The next index whose ports every rank can bind now."""
        if self._control is None:
            self._control = self._create(0, Options(), None)
        import numpy as np

        while self._next < MAX_INDEX:
            index = self._next
            self._next += 1
            ok = np.array([1 if self._ports_free(index) else 0], np.int32)
            self._control.all_reduce(ok, ok, "min")
            if ok[0]:
                return index
        raise ConfigError("[thunderlink] no free ports left for another communicator of this session")

    def close(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None

    def _create(self, index: int, opts, rates) -> Comm:
        hf = self.hostfile_with(index, rates)
        for name in ("connect_timeout", "timeout", "log_level"):
            if getattr(opts, name) is None and name in self.cfg.options:
                setattr(opts, name, self.cfg.options[name])
        base = self.cfg.job_id if self.cfg.job_id is not None else self.hostfile.job_id()
        opts.job_id = (base + 0x9E3779B97F4A7C15 * index) & 0xFFFFFFFFFFFFFFFF
        opts.transport = self.cfg.transport or "auto"
        return Comm.create(self.rank, self.size, hf.endpoints(self.cfg.ifname, self.rank), opts, ring=hf.ring)

    def hostfile_with(self, index: int, rates: dict | None = None) -> hostfile_mod.Hostfile:
        """The hostfile with ports moved for communicator ``index`` and cable
        rates replaced: ``rates[(rank, address index)] = Gbit/s``."""
        ranks = []
        for r, spec in enumerate(self.hostfile.ranks):
            addrs = []
            for i, a in enumerate(spec.addresses):
                port = a.port + index * PORT_STRIDE
                if port > 65535:
                    raise ConfigError(f"[thunderlink] port {a.port} of rank {r} leaves no room for "
                                      f"{index + 1} communicators; use ports below {65535 - index * PORT_STRIDE}")
                rate = a.rate if rates is None or (r, i) not in rates else rates[(r, i)]
                addrs.append(replace(a, port=port, rate=rate))
            ranks.append(replace(spec, addresses=addrs))
        return replace(self.hostfile, ranks=ranks)

    def connect(self, options: dict | None = None, rates: dict | None = None, profile_rows=None) -> Comm:
        """A new communicator of every rank (all ranks must call this in the
        same order with the same arguments): ``options`` as Options keywords
        over the core's defaults (not the environment's or a profile's, so a
        sweep starts from known ground), the transport of the job."""
        opts = Options(**(options or {}))
        if profile_rows:
            opts.tuning = tuple(profile_rows)
        return self._create(self._agree_index(), opts, rates)


def _buffers(op: str, nbytes: int, n: int):
    count = max(1, nbytes // 4)
    if op == "all_sum":
        return np.ones(count, np.float32), np.empty(count, np.float32)
    if op == "all_gather":
        return np.ones(count, np.float32), np.empty(count * n, np.float32)
    if op == "sum_scatter":
        per = max(1, count // n)
        return np.ones(per * n, np.float32), np.empty(per, np.float32)
    raise ValueError(op)


def time_op(comm: Comm, op: str, nbytes: int, iters: int = 3, warmup: int = 1, budget_s: float | None = None,
            groups: int = 3) -> float:
    """Seconds per call of ``op`` on ``nbytes`` (the buffer for all_sum, this
    rank's input for all_gather, the whole input for sum_scatter): the best
    of ``groups`` groups of calls, the slowest rank's, the same on every
    rank. Each group has at least ``iters`` calls; with ``budget_s``, more
    for quick calls, to fill about that many seconds in all (at most 1000
    calls a group). Warm-up calls come first: new or idle connections start
    slowly (TCP's slow start)."""
    x, out = _buffers(op, nbytes, comm.size)
    call = {"all_sum": lambda: comm.all_sum(x, out),
            "all_gather": lambda: comm.all_gather(x, out),
            "sum_scatter": lambda: comm.reduce_scatter(x, out)}[op]
    for _ in range(warmup):
        call()
    t0 = time.perf_counter()
    call()
    one = np.array([time.perf_counter() - t0])
    comm.all_reduce(one, one, "max")
    per_group = iters
    if budget_s is not None:
        per_group = int(min(1000, max(iters, budget_s / groups / max(one[0], 1e-6))))
        # A second warm-up for quick calls, as long as one group.
        for _ in range(min(per_group, int(0.05 / max(one[0], 1e-6)))):
            call()
    best = np.array([np.inf])
    for _ in range(groups):
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(per_group):
            call()
        t = np.array([(time.perf_counter() - t0) / per_group])
        comm.all_reduce(t, t, "max")
        best = np.minimum(best, t)
    return float(best[0])


def busbw(op: str, nbytes: int, n: int, seconds: float) -> float:
    """nccl-tests' bus bandwidth, bytes/s."""
    if op == "all_sum":
        return nbytes / seconds * 2 * (n - 1) / n
    total = nbytes * n if op == "all_gather" else nbytes
    return total / seconds * (n - 1) / n
