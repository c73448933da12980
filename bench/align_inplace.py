"""Does the buffer's alignment, or the calling thread, slow the core's in-place all_sum?

MLX's buffers start 8 bytes past a 16-byte boundary, numpy's 16 past a
64-byte one, and MLX runs the core on its stream thread. This times the
core's in-place all_sum at 16 and 64 MiB with the buffer 0, 8 and 16 bytes
past a 64-byte boundary, called from the main thread and from another
thread, in 5 interleaved rounds (median per case, slowest rank):

    thunderlink launch -n 2 bench/align_inplace.py
"""
import threading, time, statistics as st
import numpy as np, thunderlink

def view(nbytes, off):
    raw = np.empty(nbytes + 256, np.uint8)
    base = raw.__array_interface__["data"][0]
    start = (-base) % 64 + off
    return raw[start:start + nbytes].view(np.float32)

with thunderlink.connect() as comm:
    res = {}
    for rnd in range(5):
        for size in (16 << 20, 64 << 20):
            for off in (0, 8, 16):
                for thr in (False, True):
                    x = view(size, off); x.fill(1.0)
                    def work(out):
                        for _ in range(3): comm.all_sum(x, out=x)
                        ts = []
                        for _ in range(8):
                            t = time.perf_counter(); comm.all_sum(x, out=x); ts.append(time.perf_counter() - t)
                        out.append(st.median(ts))
                    comm.barrier(); out = []
                    if thr:
                        th = threading.Thread(target=work, args=(out,)); th.start(); th.join()
                    else:
                        work(out)
                    t = float(comm.all_max(np.array(out))[0])
                    res.setdefault((size >> 20, off, thr), []).append(t * 1e3)
    if comm.rank == 0:
        for k, v in sorted(res.items()):
            print(f"{k[0]:>3} MiB offset {k[1]:>2} {'thread' if k[2] else 'main  '}: " + " ".join(f"{x:.2f}" for x in v) + f"  median {st.median(v):.2f} ms")
