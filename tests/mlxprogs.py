"""MLX programs that tests run as N ranks (python mlxprogs.py FUNC JSON_ARGS).

Each prints ``RESULT <json>``. Groups come from thunderlink.init(); every
operation names its group explicitly except in the "unmodified" programs.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import thunderlink
from thunderlink.bindings.comm import process_stats

from progmain import emit, run  # noqa: E402  (tests/ is on sys.path)

MX_DTYPES = {
    "bool": mx.bool_, "uint8": mx.uint8, "uint16": mx.uint16, "uint32": mx.uint32, "uint64": mx.uint64,
    "int8": mx.int8, "int16": mx.int16, "int32": mx.int32, "int64": mx.int64, "float16": mx.float16,
    "float32": mx.float32, "float64": mx.float64, "bfloat16": mx.bfloat16, "complex64": mx.complex64,
}


def calls(op="all_reduce") -> int:
    return process_stats()["calls"][op]


def sample(dtype: str, rank: int, shape=(3, 5)) -> np.ndarray:
    """Small values whose sums, maxima and minima are exact in every dtype."""
    base = (np.arange(np.prod(shape)).reshape(shape) % 7) + rank
    if dtype == "bool":
        return (base % 2).astype(bool)
    if dtype == "complex64":
        return (base + 1j * (base % 3)).astype(np.complex64)
    return base.astype(np.float32 if dtype == "bfloat16" else dtype)


def as_mx(a: np.ndarray, dtype: str):
    return mx.array(a).astype(MX_DTYPES[dtype]) if dtype == "bfloat16" else mx.array(a)


def to_np(x) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        x = x.astype(mx.float32)
    return np.array(x)


def basics(pair=None):
    """pair: the two ranks that exchange send/recv (default 0 and n // 2,
    which are not neighbours in a ring of 4)."""
    g = thunderlink.init()
    n, rank = g.size(), g.rank()
    out = {"type_ok": type(g) is mx.distributed.Group, "size": n, "errors": []}
    errors = out["errors"]

    # Lazy: building the graph calls nothing; mx.eval does.
    x = mx.ones((4,)) * (rank + 1)
    before = calls()
    y = mx.distributed.all_sum(x, group=g)
    out["calls_after_graph"] = calls() - before
    mx.eval(y)
    out["calls_after_eval"] = calls() - before
    if not np.array_equal(np.array(y), np.full(4, n * (n + 1) / 2)):
        errors.append("lazy all_sum value")

    for dtype in MX_DTYPES:
        inputs = [sample(dtype, r) for r in range(n)]
        mine = as_mx(inputs[rank], dtype)
        for name, op in (("all_sum", mx.distributed.all_sum), ("all_max", mx.distributed.all_max),
                         ("all_min", mx.distributed.all_min)):
            got = to_np(op(mine, group=g))
            if dtype == "bool":
                want = np.logical_or.reduce(inputs) if name != "all_min" else np.logical_and.reduce(inputs)
            elif dtype == "complex64" and name != "all_sum":
                want = inputs[0].copy()  # lexicographic, like MLX's complex64_t
                for a in inputs[1:]:
                    better = (a.real > want.real) | ((a.real == want.real) & (a.imag > want.imag))
                    if name == "all_min":
                        better = (a.real < want.real) | ((a.real == want.real) & (a.imag < want.imag))
                    want = np.where(better, a, want)
            else:
                f = {"all_sum": np.add, "all_max": np.maximum, "all_min": np.minimum}[name]
                want = inputs[0].copy()
                with np.errstate(over="ignore"):
                    for a in inputs[1:]:
                        want = f(want, a)
            if got.shape != want.shape or not np.array_equal(got, want.astype(got.dtype)):
                errors.append(f"{name} {dtype}")

    # all_gather and sum_scatter: shapes and values.
    x = mx.array(sample("float32", rank, (2 * n, 3)))
    ag = mx.distributed.all_gather(x, group=g)
    if ag.shape != (2 * n * n, 3) or not np.array_equal(np.array(ag), np.concatenate([sample("float32", r, (2 * n, 3)) for r in range(n)])):
        errors.append("all_gather")
    ss = mx.distributed.sum_scatter(x, group=g)
    total = sum(sample("float32", r, (2 * n, 3)) for r in range(n))
    if ss.shape != (2, 3) or not np.array_equal(np.array(ss), total[2 * rank:2 * rank + 2]):
        errors.append(f"sum_scatter {ss.shape}")

    # send / recv / recv_like between non-neighbours (0 and n//2 in a ring of 4).
    a, b = pair if pair else (0, max(1, n // 2))
    payload = mx.arange(12, dtype=mx.int32).reshape(3, 4) * (rank + 1)
    if rank == a:
        mx.eval(mx.distributed.send(payload, b, group=g))
        back = mx.distributed.recv((3, 4), mx.int32, b, group=g)
        if not np.array_equal(np.array(back), np.arange(12).reshape(3, 4) * (b + 1)):
            errors.append("recv")
    elif rank == b:
        got = mx.distributed.recv_like(payload, a, group=g)
        mx.eval(got)
        if not np.array_equal(np.array(got), np.arange(12).reshape(3, 4) * (a + 1)):
            errors.append("recv_like")
        mx.eval(mx.distributed.send(payload, a, group=g))
    emit(out)


def splits(_):
    g = thunderlink.init()
    n, rank = g.size(), g.rank()
    by_parity = g.split(rank % 2)
    by_half = g.split(rank // 2)
    x = mx.full((1000,), rank, dtype=mx.float32)
    s1, s2 = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
    # Two groups at once, each on its own stream thread.
    y1 = mx.distributed.all_sum(x, group=by_parity, stream=s1)
    y2 = mx.distributed.all_sum(x, group=by_half, stream=s2)
    mx.eval(y1, y2)
    want1 = sum(r for r in range(n) if r % 2 == rank % 2)
    want2 = sum(r for r in range(n) if r // 2 == rank // 2)
    emit({"ok": bool(np.all(np.array(y1) == want1) and np.all(np.array(y2) == want2)),
          "sizes": [by_parity.size(), by_half.size()],
          "thunderlink": [thunderlink.mlx_backend.is_thunderlink_group(h) for h in (by_parity, by_half)]})


def autodiff(_):
    g = thunderlink.init()
    n, rank = g.size(), g.rank()
    res = {}
    w = mx.arange(6, dtype=mx.float32)
    x = mx.ones(6) * (rank + 1)

    def f(x):
        return (mx.distributed.all_sum(x, group=g) * w).sum()

    # MLX's AllReduce vjp is the identity: d/dx sum(all_sum(x) * w) = w.
    res["grad"] = bool(np.allclose(np.array(mx.grad(f)(x)), np.array(w)))
    v, dv = mx.value_and_grad(f)(x)
    res["value"] = bool(np.isclose(v.item(), float(np.sum(np.arange(6) * n * (n + 1) / 2))))
    X = mx.stack([x, 2 * x, 3 * x])
    vm = mx.vmap(lambda t: mx.distributed.all_sum(t, group=g))(X)
    res["vmap"] = bool(np.allclose(np.array(vm), np.array([[k * n * (n + 1) / 2] * 6 for k in (1, 2, 3)])))
    cf = mx.compile(lambda t: mx.distributed.all_sum(t * 2, group=g) + 1)
    ok = True
    for k in range(3):
        before = calls()
        r = cf(x + k)
        mx.eval(r)
        ok &= calls() - before == 1
        ok &= bool(np.allclose(np.array(r), 2 * (n * (n + 1) / 2 + n * k) + 1))
    res["compile"] = ok
    cg = mx.compile(mx.grad(f))
    res["compile_grad"] = bool(np.allclose(np.array(cg(x)), np.array(w)))
    emit(res)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 1)

    def __call__(self, x):
        return self.l2(nn.relu(self.l1(x)))


def _batch(steps: int, total: int):
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((steps, total, 8)).astype(np.float32)
    ys = rng.standard_normal((steps, total, 1)).astype(np.float32)
    return xs, ys


def training(_):
    """Data-parallel training with a compiled step and nn.average_gradients:
    replicas stay identical and match one process on the whole batch."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    g = thunderlink.init()
    n, rank = g.size(), g.rank()
    steps, per = 5, 4
    xs, ys = _batch(steps, per * n)

    def make():
        mx.random.seed(42)
        model = MLP()
        mx.eval(model.parameters())
        return model, optim.SGD(learning_rate=0.1)

    def loss_fn(model, x, y):
        return nn.losses.mse_loss(model(x), y)

    model, opt = make()
    state = [model.state, opt.state]

    @mx.compile
    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        grads = nn.average_gradients(grads, group=g)
        opt.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    for s in range(steps):
        step(mx.array(xs[s, rank * per:(rank + 1) * per]), mx.array(ys[s, rank * per:(rank + 1) * per]))
        mx.eval(state)
    params = np.concatenate([np.array(v).ravel() for _, v in tree_flatten(model.parameters())])

    # The same training in one process on the concatenated batch.
    ref, ref_opt = make()
    for s in range(steps):
        _, grads = nn.value_and_grad(ref, loss_fn)(ref, mx.array(xs[s]), mx.array(ys[s]))
        ref_opt.update(ref, grads)
        mx.eval(ref.parameters())
    want = np.concatenate([np.array(v).ravel() for _, v in tree_flatten(ref.parameters())])
    everyone = np.array(mx.distributed.all_gather(mx.array(params)[None], group=g))
    emit({"identical": bool(np.all(everyone == everyone[0])),
          "matches_single": bool(np.allclose(params, want, rtol=1e-5, atol=1e-6)),
          "max_diff": float(np.abs(params - want).max())})


def sharded(_):
    from mlx.nn.layers.distributed import AllToShardedLinear, ShardedToAllLinear, shard_linear

    g = thunderlink.init()
    n, rank = g.size(), g.rank()
    mx.random.seed(7)
    lin = nn.Linear(32, 16 * n)
    x = mx.random.normal((5, 32))
    mx.eval(lin.parameters(), x)
    full = lin(x)
    k = 16  # output columns per rank
    res = {}
    a2s = shard_linear(lin, "all-to-sharded", group=g)
    res["all_to_sharded"] = bool(np.allclose(np.array(a2s(x)), np.array(full[:, rank * k:(rank + 1) * k]), atol=1e-5))
    a2s_cls = AllToShardedLinear.from_linear(lin, group=g)
    res["all_to_sharded_class"] = bool(np.allclose(np.array(a2s_cls(x)), np.array(full[:, rank * k:(rank + 1) * k]), atol=1e-5))
    # Sharded-to-all: each rank holds a slice of the input features.
    lin2 = nn.Linear(16 * n, 24)
    x2 = mx.random.normal((5, 16 * n))
    mx.eval(lin2.parameters(), x2)
    full2 = lin2(x2)
    s2a = shard_linear(lin2, "sharded-to-all", group=g)
    res["sharded_to_all"] = bool(np.allclose(np.array(s2a(x2[:, rank * 16:(rank + 1) * 16])), np.array(full2), atol=1e-4))
    s2a_cls = ShardedToAllLinear.from_linear(lin2, group=g)
    res["sharded_to_all_class"] = bool(np.allclose(np.array(s2a_cls(x2[:, rank * 16:(rank + 1) * 16])), np.array(full2), atol=1e-4))
    emit(res)


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def zero_copy(mib):
    """The core reads and writes the arrays' own buffers; peak memory of a
    large all_sum is no more than with MLX's ring backend."""
    g = thunderlink.init()
    rank = g.rank()
    res = {}
    x = mx.arange(1000, dtype=mx.float32)
    mx.eval(x)
    xp = np.asarray(x).__array_interface__["data"][0]
    y = mx.distributed.all_sum(x, group=g)
    mx.eval(y)
    s = process_stats()
    res["in_is_array"] = s["last_in"] == xp
    res["out_is_array"] = s["last_out"] == np.asarray(y).__array_interface__["data"][0]
    # Donated input: MLX hands the same buffer in and out.
    z = mx.arange(1000, dtype=mx.float32) * 2
    mx.eval(z)
    zp = np.asarray(z).__array_interface__["data"][0]
    w = mx.distributed.all_sum(z, group=g)
    del z
    mx.eval(w)
    s = process_stats()
    res["donated_in_place"] = s["last_in"] == s["last_out"] == zp

    os.environ["MLX_RANK"] = str(rank)
    ring = mx.distributed.init(strict=True, backend="ring")
    count = (mib << 20) // 4
    peaks = {}
    for name, group in (("thunderlink", g), ("ring", ring), ("thunderlink2", g), ("ring2", ring),
                        ("thunderlink3", g), ("ring3", ring)):
        big = mx.ones((count,), dtype=mx.float32)
        mx.eval(big)
        mx.synchronize()
        mx.reset_peak_memory()
        _reset_hwm()
        base_rss = _vm_hwm_kib()
        out = mx.distributed.all_sum(big, group=group)
        mx.eval(out)
        peaks[name] = {"mlx": mx.get_peak_memory(), "rss_kib": _vm_hwm_kib() - base_rss}
        ok = bool(np.all(np.array(out[:10]) == g.size()))
        res[f"{name}_value"] = ok
        del big, out
    res["peaks"] = peaks
    emit(res)


def failure(_):
    """A failing collective raises RuntimeError at mx.eval with thunderlink's
    message; the stream keeps working."""
    g = thunderlink.init()
    rank = g.rank()
    x = mx.ones((100 if rank == 0 else 200,))
    res = {}
    try:
        mx.eval(mx.distributed.all_sum(x, group=g))
        res["raised"] = None
    except RuntimeError as e:
        res["raised"] = type(e).__name__
        res["message"] = str(e)
    after = mx.ones((3,)) * 2 + 1
    mx.eval(after)
    res["stream_usable"] = bool(np.all(np.array(after) == 3))
    emit(res)


def abi_detection(_):
    """A shim built for another MLX is refused with a clear message."""
    import thunderlink.mlx_backend as tlb
    from thunderlink.mlx_backend import _shim

    res = {"abi_ok": _shim.abi_ok(), "built": _shim.built_mlx_version(), "running": mx.__version__}
    _shim.built_mlx_version = lambda: "0.0.1"
    try:
        tlb._load_shim()
        res["raised"] = None
    except thunderlink.ThunderlinkError as e:
        res["raised"] = str(e)
    emit(res)


if __name__ == "__main__":
    run(globals())
