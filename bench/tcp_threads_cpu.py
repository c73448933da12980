"""Where the CPU time of a TCP all_sum goes, with and without I/O threads.

Each rank times all_sum over TCP and splits its CPU time per call between
the calling thread and the tl-io threads (THUNDERLINK_TCP_THREADS), from
/proc/self/task/*/stat. Off, the calling thread does every copy into and
out of the kernel and every reduction, so its CPU time per call bounds the
call's time from below however many cores the machine has. On, it keeps the
reductions and the bookkeeping, each connection's thread its copies: with
enough cores the bound becomes the busiest of these threads. On a machine
with fewer cores than threads (this 2-core VM with 2 ranks) the wall time
cannot show it; the split does.

    THUNDERLINK_TRANSPORT=tcp THUNDERLINK_TCP_THREADS=on  thunderlink launch -n 2 bench/tcp_threads_cpu.py
    THUNDERLINK_TRANSPORT=tcp THUNDERLINK_TCP_THREADS=off thunderlink launch -n 2 bench/tcp_threads_cpu.py

Rank 0 prints one line per size: wall ms per call (median), then CPU ms per
call of the calling thread, of all tl-io threads together and of the
busiest tl-io thread, and the bound max(calling, busiest tl-io).
"""
import os
import statistics
import sys
import time

import numpy as np

import thunderlink

TICK = os.sysconf("SC_CLK_TCK")


def cpu_by_thread() -> dict:
    """{tid: (name, cpu seconds)} of this process's threads."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / TICK)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


sizes = [int(s) << 20 for s in (sys.argv[1] if len(sys.argv) > 1 else "16,64,256").split(",")]
me = __import__("threading").get_native_id()
with thunderlink.connect() as comm:
    mode = os.environ.get("THUNDERLINK_TCP_THREADS", "auto")
    for size in sizes:
        x = np.ones(size // 4, np.float32)
        y = np.empty_like(x)
        for _ in range(2):
            comm.all_sum(x, y)
        iters = max(4, min(40, (1 << 30) // size))
        comm.barrier()
        c0, t0 = cpu_by_thread(), []
        for _ in range(iters):
            s = time.perf_counter()
            comm.all_sum(x, y)
            t0.append(time.perf_counter() - s)
        c1 = cpu_by_thread()
        d = {t: c1[t][1] - c0.get(t, (None, 0.0))[1] for t in c1}
        main = d.get(me, 0.0)
        io = [d[t] for t in c1 if c1[t][0] == "tl-io"]

        def per(v, iters=iters):
            return 1e3 * v / iters

        if comm.rank == 0:
            busiest = max(io) if io else 0.0
            print(f"tcp_threads={mode} size={size >> 20}MiB wall={1e3 * statistics.median(t0):.2f}ms "
                  f"cpu: calling={per(main):.2f}ms io_threads={per(sum(io)):.2f}ms ({len(io)} threads, "
                  f"busiest {per(busiest):.2f}ms) bound={per(max(main, busiest)):.2f}ms", flush=True)
