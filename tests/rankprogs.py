"""Programs that tests run as N ranks (python rankprogs.py FUNC JSON_ARGS).

Each prints one line ``RESULT <json>`` on success. Inputs are derived from
(seed, rank, case) so every rank can compute every other rank's input and
the exact reference.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

import thunderlink
from thunderlink.bindings import Options

from progmain import emit, run  # noqa: E402  (tests/ is on sys.path)

DTYPES = ["bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
          "float16", "float32", "float64", "bfloat16", "complex64"]


def storage(dtype: str):
    return np.uint16 if dtype == "bfloat16" else np.dtype(dtype)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def data(dtype: str, count: int, rank: int, salt: int = 0) -> np.ndarray:
    rng = np.random.default_rng([rank, count, salt, DTYPES.index(dtype)])
    if dtype == "bool":
        return rng.integers(0, 2, count).astype(np.bool_)
    if dtype.startswith(("uint", "int")):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True)
    if dtype == "complex64":
        return (rng.standard_normal(count) + 1j * rng.standard_normal(count)).astype(np.complex64)
    x = rng.standard_normal(count).astype(np.float32)
    if dtype == "bfloat16":
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(dtype)


def reference(op: str, dtype: str, inputs: list[np.ndarray]) -> np.ndarray:
    """The exact result for integers and bool; float64 (complex128) for floats."""
    if dtype == "bool":
        f = {"sum": np.logical_or, "max": np.logical_or, "prod": np.logical_and, "min": np.logical_and}[op]
        out = inputs[0]
        for x in inputs[1:]:
            out = f(out, x)
        return out
    if dtype == "bfloat16":
        inputs = [bf16_to_f32(x).astype(np.float64) for x in inputs]
    elif dtype.startswith("float"):
        inputs = [x.astype(np.float64) for x in inputs]
    elif dtype == "complex64":
        inputs = [x.astype(np.complex128) for x in inputs]
    if op in ("max", "min") and dtype == "complex64":  # lexicographic, like MLX
        out = inputs[0]
        for x in inputs[1:]:
            gt = (x.real > out.real) | ((x.real == out.real) & (x.imag > out.imag))
            lt = (x.real < out.real) | ((x.real == out.real) & (x.imag < out.imag))
            out = np.where(gt if op == "max" else lt, x, out)
        return out
    f = {"sum": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum}[op]
    out = inputs[0]
    with np.errstate(over="ignore"):
        for x in inputs[1:]:
            out = f(out, x)
    return out


def close(got: np.ndarray, want: np.ndarray, op: str, dtype: str, n: int) -> str | None:
    """None if got matches want; otherwise a description."""
    if dtype == "bool" or dtype.startswith(("uint", "int")) or op in ("max", "min"):
        if dtype == "bfloat16":
            ok = np.array_equal(bf16_to_f32(got), want.astype(np.float32))
        else:
            ok = np.array_equal(got, want.astype(got.dtype))
        return None if ok else "not exact"
    g = bf16_to_f32(got).astype(np.float64) if dtype == "bfloat16" else got.astype(np.complex128 if dtype == "complex64" else np.float64)
    eps = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23, "float64": 2.0 ** -52,
           "complex64": 2.0 ** -23}[dtype]
    scale = np.abs(want).max() if want.size else 1.0
    # float16 products can land among subnormals, where spacing is absolute.
    tiny = 2.0 ** -24 if dtype == "float16" else 1e-30
    tol = 4 * n * eps * max(scale, 1.0) if op == "sum" else 4 * n * (eps * np.abs(want) + tiny)
    err = np.abs(g - want)
    bad = err > tol
    return None if not np.any(bad) else f"max error {err.max():g} above tolerance"


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


# ---- programs ------------------------------------------------------------------


def reductions(cases):
    """cases: [[op, dtype, count, inplace], ...] for all_reduce."""
    comm = thunderlink.connect()
    n, rank = comm.size, comm.rank
    out = {}
    for op, dtype, count, inplace in cases:
        key = f"{op}/{dtype}/{count}/{'in' if inplace else 'out'}"
        x = data(dtype, count, rank)
        if inplace:
            y = x
            comm.all_reduce(x, x, op, dtype=dtype)
        else:
            y = comm.all_reduce(x, None, op, dtype=dtype)
            assert np.array_equal(x, data(dtype, count, rank)), "input modified"
        want = reference(op, dtype, [data(dtype, count, r) for r in range(n)])
        out[key] = {"err": close(y, want, op, dtype, n), "hash": digest(y)}
    emit(out)


def gathers(cases):
    """cases: [[kind, dtype, count, inplace]] with kind all_gather | reduce_scatter | broadcast."""
    comm = thunderlink.connect()
    n, rank = comm.size, comm.rank
    out = {}
    for kind, dtype, count, inplace in cases:
        key = f"{kind}/{dtype}/{count}/{'in' if inplace else 'out'}"
        err = None
        if kind == "all_gather":
            full = np.empty(count * n, dtype=storage(dtype))
            if inplace:
                full[rank * count:(rank + 1) * count] = data(dtype, count, rank)
                y = comm.all_gather(full[rank * count:(rank + 1) * count], full, dtype=dtype)
            else:
                y = comm.all_gather(data(dtype, count, rank), full, dtype=dtype)
            want = np.concatenate([data(dtype, count, r) for r in range(n)])
            err = None if np.array_equal(y, want) else "all_gather differs"
        elif kind == "reduce_scatter":
            x = data(dtype, count * n, rank)
            y = comm.reduce_scatter(x, None, "sum", dtype=dtype)
            want = reference("sum", dtype, [data(dtype, count * n, r) for r in range(n)])
            err = close(y, want[rank * count:(rank + 1) * count], "sum", dtype, n)
        elif kind == "broadcast":
            root = count % n
            y = data(dtype, count, rank)
            comm.broadcast(y, root, dtype=dtype)
            err = None if np.array_equal(y, data(dtype, count, root)) else "broadcast differs"
        out[key] = {"err": err, "hash": digest(y) if kind != "reduce_scatter" else ""}
    emit(out)


def p2p(counts, pairs=None):
    """Every ordered pair (a, b), a != b, exchanges a message: any two ranks,
    not only neighbours (or only the given pairs)."""
    comm = thunderlink.connect()
    n, rank = comm.size, comm.rank
    errors = []
    wanted = {tuple(p) for p in pairs} if pairs else None
    for count in counts:
        for a in range(n):
            for b in range(n):
                if a == b or (wanted is not None and (a, b) not in wanted and (b, a) not in wanted):
                    continue
                salt = a * n + b
                if rank == a:
                    comm.send(data("float32", count, a, salt), b)
                elif rank == b:
                    got = comm.recv(np.empty(count, np.float32), a)
                    if not np.array_equal(got, data("float32", count, a, salt)):
                        errors.append(f"{a}->{b} count {count}")
    comm.barrier()
    emit({"errors": errors, "stats": comm.stats()["calls"]})


def split(_):
    comm = thunderlink.connect()
    n, rank = comm.size, comm.rank
    sub = comm.split(rank % 2, key=n - rank)  # reversed order within each color
    x = np.full(3, rank, np.int64)
    y = sub.all_sum(x)
    members = [r for r in range(n) if r % 2 == rank % 2]
    emit({"sub_rank": sub.rank, "sub_size": sub.size, "sum": int(y[0]), "want": sum(members),
          "want_rank": sorted(members, key=lambda r: n - r).index(rank)})
    sub.close()


def stats_probe(_):
    comm = thunderlink.connect()
    x = np.ones(10, np.float32)
    comm.all_sum(x, x)
    s = comm.stats()
    emit({"ptr": int(x.__array_interface__["data"][0]), "last_in": s["last_in"], "last_out": s["last_out"]})


def mismatch(kind):
    """Rank 0 does something different from the others."""
    comm = thunderlink.connect()
    x = np.ones(1000, np.float32)
    try:
        if kind == "op":
            if comm.rank == 0:
                comm.all_gather(x)
            else:
                comm.all_sum(x)
        elif kind == "size":
            comm.all_sum(np.ones(1000 if comm.rank == 0 else 2000, np.float32))
        elif kind == "dtype":
            comm.all_sum(np.ones(1000, np.float32 if comm.rank == 0 else np.int32))
        elif kind == "large_size":
            comm.all_sum(np.ones((1 << 20) if comm.rank == 0 else (1 << 20) + 4, np.float32))
        elif kind == "root":
            comm.broadcast(np.ones(10, np.float32), root=comm.rank % 2)
            comm.barrier()
        emit({"raised": None})
    except thunderlink.ThunderlinkError as e:
        emit({"raised": type(e).__name__, "message": str(e)})


def die_mid_collective(_):
    """The last rank exits (status 0, so that the launcher lets the others
    report) between large all_sums; the others must fail fast."""
    comm = thunderlink.connect()
    x = np.ones(16 << 20, np.float32)
    comm.all_sum(x, x)
    if comm.rank == comm.size - 1:
        os._exit(0)
    t = time.monotonic()
    try:
        for _ in range(20):
            comm.all_sum(x, x)
        emit({"raised": None})
    except thunderlink.ThunderlinkError as e:
        emit({"raised": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t})


def then_fail_later(_):
    """After a first collective, a later one fails: the comm stays poisoned."""
    comm = thunderlink.connect()
    comm.all_sum(np.ones(4, np.float32))
    try:
        comm.all_sum(np.ones(4 if comm.rank else 8, np.float32))
    except thunderlink.ThunderlinkError as e1:
        try:
            comm.barrier()
        except thunderlink.ThunderlinkError as e2:
            emit({"first": type(e1).__name__, "second": type(e2).__name__, "same": str(e1) == str(e2)})
            return
    emit({"first": None})


def connect_only(_):
    try:
        comm = thunderlink.connect(options=Options(connect_timeout=float(os.environ.get("CT", "20"))))
        comm.barrier()
        emit({"raised": None})
    except thunderlink.ThunderlinkError as e:
        emit({"raised": type(e).__name__, "message": str(e)})


def bad_call(kind):
    comm = thunderlink.connect()
    try:
        if kind == "dtype":
            comm.all_sum(np.ones(4, np.complex128))
        elif kind == "peer":
            comm.send(np.ones(4, np.float32), 17)
        elif kind == "self":
            comm.send(np.ones(4, np.float32), comm.rank)
        elif kind == "noncontig":
            comm.all_sum(np.ones((4, 4), np.float32)[:, 1])
        emit({"raised": None})
    except thunderlink.ThunderlinkError as e:
        # The communicator is still usable after a refused argument.
        comm.barrier()
        emit({"raised": type(e).__name__, "message": str(e), "bases": [c.__name__ for c in type(e).__mro__]})


def unlinked_send(peer):
    """A send to a rank this one shares no cable with is a clear error."""
    comm = thunderlink.connect()
    try:
        if comm.rank == 0:
            comm.send(np.ones(4, np.float32), peer)
        emit({"raised": None})
    except thunderlink.ThunderlinkError as e:
        emit({"raised": type(e).__name__, "message": str(e)})


def killed_mid_collective(stamp_path):
    """all_sums of 16 MiB until the last rank SIGKILLs itself in the middle
    of one (having written the time to stamp_path); the others report."""
    import signal
    import threading

    comm = thunderlink.connect()
    x = np.ones(4 << 20, np.float32)
    comm.all_sum(x, x)
    if comm.rank == comm.size - 1:
        def kill():
            time.sleep(0.05)
            with open(stamp_path, "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=kill, daemon=True).start()
    try:
        for _ in range(100000):
            comm.all_sum(x, x)
        emit({"raised": None})
    except thunderlink.ThunderlinkError as e:
        emit({"raised": type(e).__name__, "message": str(e), "at": time.time()})


def links_report(_):
    """A few collectives, then each rank's links and byte counters."""
    comm = thunderlink.connect()
    x = np.ones(1 << 18, np.float32)
    comm.all_sum(x, x)
    comm.all_gather(x)
    comm.barrier()
    emit({"links": {str(p): list(v) for p, v in comm.links().items()}, "stats": comm.stats()})


def cpu_while_waiting(delay):
    """Rank 0 enters an all_sum at once, the others `delay` s later: the CPU
    time rank 0's process spends waiting, and whether the sum is right."""
    comm = thunderlink.connect()
    x = np.full(1 << 16, comm.rank + 1, np.float32)
    comm.barrier()
    if comm.rank:
        time.sleep(delay)
    wall, cpu = time.monotonic(), time.process_time()
    comm.all_sum(x, x)
    emit({"cpu": time.process_time() - cpu, "wall": time.monotonic() - wall,
          "right": bool((x == comm.size * (comm.size + 1) / 2).all())})


def loop_all_sum(seconds):
    """all_sum of 4 MiB over and over until it fails or time is up."""
    comm = thunderlink.connect()
    x = np.ones(1 << 20, np.float32)
    start = time.monotonic()
    done = 0
    print("ready", flush=True)
    try:
        while time.monotonic() - start < seconds:
            comm.all_sum(x, x)
            x.fill(1)
            done += 1
        emit({"raised": None, "done": done})
    except thunderlink.ThunderlinkError as e:
        emit({"raised": type(e).__name__, "message": str(e), "done": done,
              "seconds": time.monotonic() - start})


def lossy_all_sums(params):
    """all_sum of `count` float32 `iters` times (in place, or out of place
    with a third param False), each result checked, until one raises (a
    lossy link: SOFTVERBS_DROP_EVERY). Reports the collectives that
    completed, those whose result was wrong, and the error with the seconds
    the failing collective took and the RDMA counters."""
    count, iters, inplace = (list(params) + [True])[:3]
    comm = thunderlink.connect()
    n = comm.size
    want = np.full(count, n * (n + 1) / 2, np.float32)
    done = wrong = 0
    t = time.monotonic()
    try:
        for i in range(iters):
            x = np.full(count, comm.rank + 1, np.float32)
            t = time.monotonic()
            y = comm.all_sum(x, x) if inplace else comm.all_sum(x)
            done += 1
            wrong += not np.array_equal(x if inplace else y, want)
        emit({"raised": None, "done": done, "wrong": wrong})
    except thunderlink.ThunderlinkError as e:
        emit({"raised": type(e).__name__, "message": str(e), "done": done, "wrong": wrong,
              "seconds": time.monotonic() - t, "stats": comm.stats().get("rdma")})


def reuse_buffer(params):
    """all_sum out of one buffer, overwritten (with garbage) the moment each
    call returns; every result checked against what the buffers held."""
    count, iters = params
    comm = thunderlink.connect()
    n = comm.size
    x = np.empty(count, np.float32)
    wrong = []
    for i in range(iters):
        x[:] = comm.rank + 1 + i
        y = comm.all_sum(x)
        x[:] = -1e9
        if not np.array_equal(y, np.full(count, n * (n + 1) / 2 + n * i, np.float32)):
            wrong.append(i)
    comm.barrier()
    emit({"done": iters, "wrong": wrong})


if __name__ == "__main__":
    run(globals())
