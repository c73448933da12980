"""tl_reduce / tl_dtype_size: the element-wise kernels of every collective.

Each dtype x op is checked against a numpy reference: exactly for integers
and bool, bit for bit for floats (float16 against numpy's own float16
arithmetic, bfloat16 against a reference on uint16 bit patterns), except
that when both operands are NaN only NaN-ness is checked (which payload wins
depends on operand order inside the FPU). Then tails, aliasing, unaligned
pointers, special values, argument checking, and the baseline (non-AVX2)
kernels against the dispatched ones.
"""


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thunderlink.bindings import ffi, lib

DTYPES = {
    # name: (TL code, numpy storage dtype)
    "bool": (lib.TL_BOOL, np.uint8),
    "uint8": (lib.TL_UINT8, np.uint8),
    "uint16": (lib.TL_UINT16, np.uint16),
    "uint32": (lib.TL_UINT32, np.uint32),
    "uint64": (lib.TL_UINT64, np.uint64),
    "int8": (lib.TL_INT8, np.int8),
    "int16": (lib.TL_INT16, np.int16),
    "int32": (lib.TL_INT32, np.int32),
    "int64": (lib.TL_INT64, np.int64),
    "float16": (lib.TL_FLOAT16, np.float16),
    "float32": (lib.TL_FLOAT32, np.float32),
    "float64": (lib.TL_FLOAT64, np.float64),
    "bfloat16": (lib.TL_BFLOAT16, np.uint16),
    "complex64": (lib.TL_COMPLEX64, np.complex64),
}
OPS = {"sum": lib.TL_SUM, "prod": lib.TL_PROD, "max": lib.TL_MAX, "min": lib.TL_MIN}
NUM_REDOPS = lib.TL_NUM_REDOPS
INTS = ["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64"]
FLOATS = ["float16", "float32", "float64"]
ALL = [(d, o) for d in DTYPES for o in OPS]
UINT_OF = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def ptr(arr):
    return ffi.cast("void *", arr.ctypes.data)


def reduce(dst, a, b, dtype, op, count=None):
    n = len(dst) if count is None else count
    return lib.tl_reduce(ptr(dst), ptr(a), ptr(b), n, DTYPES[dtype][0], OPS[op])


def bits(x):
    x = np.asarray(x)
    if x.dtype == np.complex64:
        return x.view(np.uint32).reshape(-1, 2)
    return x.view(UINT_OF[x.dtype.itemsize])


# ---------------------------------------------------------------- references


def bf16_to_f32(u):
    return (np.asarray(u, np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(f):
    u = np.asarray(f, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(f), np.uint16(0x7FC0), r).astype(np.uint16)


def _greater(x, y):
    """x > y for floats with -0 < +0 (no NaN)."""
    zeros = (x == 0) & (y == 0)
    return (x > y) | (zeros & ~np.signbit(x) & np.signbit(y))


def _same(x, y):
    return (x == y) & (np.signbit(x) == np.signbit(y))


def float_minmax(a, b, op):
    """IEEE 754-2019 maximum/minimum: NaN propagates (a's first), -0 < +0."""
    with np.errstate(invalid="ignore"):
        take_a = _greater(a, b) if op == "max" else _greater(b, a)
        take_a |= _same(a, b)
        take_a = np.isnan(a) | (take_a & ~np.isnan(b))
    return np.where(take_a, a, b)


def reference(dtype, op, a, b):
    """Expected result of a op b (numpy arrays of the storage dtype)."""
    with np.errstate(all="ignore"):
        if dtype == "bool":
            x, y = a != 0, b != 0
            r = (x | y) if op in ("sum", "max") else (x & y)
            return r.astype(np.uint8)
        if dtype in INTS:
            return {"sum": np.add, "prod": np.multiply, "max": np.maximum,
                    "min": np.minimum}[op](a, b).astype(a.dtype)
        if dtype in FLOATS:
            if op == "sum":
                return a + b
            if op == "prod":
                return a * b
            return float_minmax(a, b, op)
        if dtype == "bfloat16":
            fa, fb = bf16_to_f32(a), bf16_to_f32(b)
            if op == "sum":
                return f32_to_bf16(fa + fb)
            if op == "prod":
                return f32_to_bf16(fa * fb)
            r = np.where(_same(float_minmax(fa, fb, op), fa), a, b)
            return np.where(np.isnan(fa) | np.isnan(fb), np.uint16(0x7FC0), r)
        assert dtype == "complex64"
        ar, ai = a.real.astype(np.float32), a.imag.astype(np.float32)
        br, bi = b.real.astype(np.float32), b.imag.astype(np.float32)
        if op == "sum":
            re, im = ar + br, ai + bi
        elif op == "prod":
            # float32 ufuncs round after every operation: no fused multiply-add
            re = np.subtract(np.multiply(ar, br), np.multiply(ai, bi))
            im = np.add(np.multiply(ar, bi), np.multiply(ai, br))
        else:
            na = np.isnan(ar) | np.isnan(ai)
            nb = np.isnan(br) | np.isnan(bi)
            if op == "max":
                order = _greater(ar, br) | (_same(ar, br) & ~_greater(bi, ai))
            else:
                order = _greater(br, ar) | (_same(ar, br) & ~_greater(ai, bi))
            take_a = na | (order & ~nb)
            return np.where(take_a, a, b)
        out = np.empty(len(a), np.complex64)
        out.real, out.imag = re, im
        return out


def nan_mask(dtype, x):
    """Elements of x (storage dtype) that are NaN (any part, for complex)."""
    if dtype in FLOATS:
        return np.isnan(x)
    if dtype == "bfloat16":
        return (x & 0x7FFF) > 0x7F80
    if dtype == "complex64":
        return np.isnan(x.real) | np.isnan(x.imag)
    return np.zeros(len(x), bool)


def assert_matches(dtype, op, got, a, b, expected=None):
    """got == reference bit for bit; where both operands are NaN, NaN-ness."""
    exp = reference(dtype, op, a, b) if expected is None else expected
    gb, eb = bits(got), bits(exp)
    diff = gb != eb
    if diff.ndim == 2:
        if op in ("sum", "prod"):
            # complex arithmetic: a NaN part matches any NaN (its sign and
            # payload depend on the order of operations inside the FPU)
            gp = got.view(np.float32).reshape(-1, 2)
            ep = exp.view(np.float32).reshape(-1, 2)
            diff &= ~(np.isnan(gp) & np.isnan(ep))
        diff = diff.any(axis=1)
    both_nan = nan_mask(dtype, a) & nan_mask(dtype, b)
    bad = diff & ~(both_nan & nan_mask(dtype, got) & nan_mask(dtype, exp))
    if bad.any():
        i = np.flatnonzero(bad)[:8]
        pytest.fail(f"{dtype} {op}: {bad.sum()} of {len(got)} differ, e.g. at {i}: "
                    f"a={a[i]!r} b={b[i]!r} got={got[i]!r} expected={exp[i]!r}")


# ---------------------------------------------------------------- inputs

SPECIAL_F = [0.0, -0.0, 1.0, -1.0, 0.5, 1.5, 2.5, -3.0, 7.0, 1e-3, -1e-3,
             np.inf, -np.inf, np.nan, -np.nan, 65504.0, -65504.0, 65520.0,
             6.1035156e-05, 5.9604645e-08, 2.9802322e-08, 8.940697e-08,
             1e-40, -1e-45, 3.4028235e38, -3.4028235e38, 1e300, 5e-324]


def specials(dtype):
    st_dtype = DTYPES[dtype][1]
    if dtype == "bool":
        return np.array([0, 1, 2, 0x80, 0xFF], np.uint8)
    if dtype in INTS:
        info = np.iinfo(st_dtype)
        half = 1 << (info.bits // 2)
        v = [0, 1, 2, 3, -1, -2, int(info.max), int(info.max) - 1, int(info.min),
             int(info.min) + 1, int(info.max) // 2 + 1, half, half + 1]
        return np.array([_wrap(x, st_dtype) for x in v], dtype=object).astype(st_dtype)
    if dtype == "bfloat16":
        return np.array([0x0000, 0x8000, 0x3F80, 0xBF80, 0x3F81, 0x3B80, 0x3C40,
                         0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81,
                         0x0001, 0x8001, 0x0003, 0x007F, 0x0080, 0x3F00, 0x4040,
                         0x4000, 0x3F7F], np.uint16)
    with np.errstate(all="ignore"):
        f = np.array(SPECIAL_F, np.float64).astype(np.float32 if dtype == "complex64"
                                                   else st_dtype)
    if dtype == "float16":
        f = np.concatenate([f, np.array([0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF,
                                         0x7C01, 0xFE01, 0x3C01], np.uint16)
                            .view(np.float16)])
    if dtype == "complex64":
        re, im = np.meshgrid(f[:16], f[:16])
        return np.stack([re.ravel(), im.ravel()], axis=1).ravel().view(np.complex64)
    return f


def _wrap(v, t):
    """Python int v reduced modulo 2^bits into the range of integer dtype t."""
    info = np.iinfo(t)
    v %= 1 << info.bits
    return v - (1 << info.bits) if v > info.max else v


def random_values(dtype, n, rng):
    st_dtype = DTYPES[dtype][1]
    if dtype == "bool":
        return rng.choice(np.array([0, 1, 2, 255], np.uint8), n)
    if dtype in INTS:
        info = np.iinfo(st_dtype)
        return rng.integers(info.min, info.max, n, dtype=st_dtype, endpoint=True)
    if dtype == "bfloat16":
        raw = rng.integers(0, 1 << 16, n, dtype=np.uint16)
        near = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16)
        return np.where(rng.random(n) < 0.5, raw, near.astype(np.uint16))
    if dtype == "complex64":
        return random_values("float32", 2 * n, rng).view(np.complex64)
    size = np.dtype(st_dtype).itemsize
    raw = rng.integers(0, np.iinfo(UINT_OF[size]).max, n, dtype=UINT_OF[size],
                       endpoint=True).view(st_dtype)
    near = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e3], n)).astype(st_dtype)
    return np.where(rng.random(n) < 0.3, raw, near)


def operands(dtype, n_random=2000, seed=0):
    """a, b: every pair of special values, then random values."""
    rng = np.random.default_rng(seed)
    s = specials(dtype)
    a = np.concatenate([np.repeat(s, len(s)), random_values(dtype, n_random, rng)])
    b = np.concatenate([np.tile(s, len(s)), random_values(dtype, n_random, rng)])
    return a, b


# ---------------------------------------------------------------- tests


def test_dtype_size():
    expected = {"bool": 1, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
                "int8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2,
                "float32": 4, "float64": 8, "bfloat16": 2, "complex64": 8}
    for name, (code, _) in DTYPES.items():
        assert lib.tl_dtype_size(code) == expected[name], name
    assert lib.TL_NUM_DTYPES == 14
    for bad in (-1, lib.TL_NUM_DTYPES, 100, -(2**31)):
        assert lib.tl_dtype_size(bad) == 0


@pytest.mark.parametrize("dtype,op", ALL)
def test_against_reference(dtype, op):
    a, b = operands(dtype)
    dst = np.zeros_like(a)
    assert reduce(dst, a, b, dtype, op) == lib.TL_OK
    assert_matches(dtype, op, dst, a, b)
    if dtype == "bool":
        assert set(np.unique(dst)) <= {0, 1}


@pytest.mark.parametrize("dtype,op", ALL)
def test_aliasing(dtype, op):
    a, b = operands(dtype, n_random=500, seed=1)
    expected = reference(dtype, op, a, b)
    x = a.copy()
    assert reduce(x, x, b, dtype, op) == lib.TL_OK  # dst == a
    assert_matches(dtype, op, x, a, b, expected)
    y = b.copy()
    assert reduce(y, a, y, dtype, op) == lib.TL_OK  # dst == b
    assert_matches(dtype, op, y, a, b, expected)
    z = a.copy()
    assert reduce(z, z, z, dtype, op) == lib.TL_OK  # dst == a == b
    assert_matches(dtype, op, z, a, a)


@pytest.mark.parametrize("dtype,op", ALL)
def test_tails_and_bounds(dtype, op):
    """Counts 0..67 (vector tails): the prefix is right, nothing after it is
    written."""
    rng = np.random.default_rng(2)
    a, b = random_values(dtype, 80, rng), random_values(dtype, 80, rng)
    expected = reference(dtype, op, a, b)
    sentinel = np.frombuffer(b"\xa5" * a.nbytes, dtype=a.dtype)
    for n in range(68):
        dst = sentinel.copy()
        assert reduce(dst, a, b, dtype, op, count=n) == lib.TL_OK
        assert_matches(dtype, op, dst[:n], a[:n], b[:n], expected[:n])
        assert dst[n:].tobytes() == sentinel[n:].tobytes(), f"n={n} wrote past the end"


def _view(buf, dtype, offset, n):
    return np.frombuffer(buf, dtype=DTYPES[dtype][1], count=n, offset=offset)


@pytest.mark.parametrize("dtype,op", ALL)
def test_unaligned(dtype, op):
    """Pointers offset by 1 byte (misaligned for the element) and by one
    element, with odd counts; also in place."""
    a0, b0 = operands(dtype, n_random=300, seed=3)
    size = a0.itemsize
    for n in (len(a0), 37):
        for offset in sorted({1, size, size + 1, 3}):
            ba, bb, bd = (bytearray(n * size + 16) for _ in range(3))
            a = _view(ba, dtype, offset, n)
            b = _view(bb, dtype, (offset + 2) % 16, n)  # differently misaligned
            dst = _view(bd, dtype, (offset + 5) % 16, n)
            a[:], b[:] = a0[:n], b0[:n]
            assert reduce(dst, a, b, dtype, op) == lib.TL_OK
            assert_matches(dtype, op, dst, a, b)
            expected = dst.copy()
            assert reduce(a, a, b, dtype, op) == lib.TL_OK
            assert_matches(dtype, op, a, a0[:n], b0[:n], expected)


def test_count_zero_and_invalid():
    x = np.zeros(4, np.float32)
    for dtype in range(lib.TL_NUM_DTYPES):
        for op in range(NUM_REDOPS):
            assert lib.tl_reduce(ffi.NULL, ffi.NULL, ffi.NULL, 0, dtype, op) == lib.TL_OK
    for dtype, op in [(-1, lib.TL_SUM), (lib.TL_NUM_DTYPES, lib.TL_SUM), (99, lib.TL_MAX),
                      (lib.TL_FLOAT32, -1), (lib.TL_FLOAT32, NUM_REDOPS),
                      (lib.TL_INT32, 17)]:
        assert lib.tl_reduce(ptr(x), ptr(x), ptr(x), 4, dtype, op) == lib.TL_ERR_INVALID
        assert lib.tl_reduce(ffi.NULL, ffi.NULL, ffi.NULL, 0, dtype, op) == lib.TL_ERR_INVALID
    # NULL with a non-zero count, and partial overlap of dst with a or b.
    assert lib.tl_reduce(ffi.NULL, ptr(x), ptr(x), 4, lib.TL_FLOAT32, lib.TL_SUM) == lib.TL_ERR_INVALID
    assert lib.tl_reduce(ptr(x), ffi.NULL, ptr(x), 4, lib.TL_FLOAT32, lib.TL_SUM) == lib.TL_ERR_INVALID
    big = np.arange(8, dtype=np.float32)
    assert lib.tl_reduce(ptr(big[1:]), ptr(big), ptr(x), 4, lib.TL_FLOAT32,
                         lib.TL_SUM) == lib.TL_ERR_INVALID
    assert lib.tl_reduce(ptr(big), ptr(x), ptr(big[3:]), 4, lib.TL_FLOAT32,
                         lib.TL_SUM) == lib.TL_ERR_INVALID
    assert (big == np.arange(8)).all()
    # Adjacent (not overlapping) ranges are fine.
    assert lib.tl_reduce(ptr(big[4:]), ptr(big), ptr(big), 4, lib.TL_FLOAT32,
                         lib.TL_SUM) == lib.TL_OK
    assert (big[4:] == 2 * np.arange(4)).all()


# ---------------------------------------------------------------- special values


@pytest.mark.parametrize("dtype", INTS)
def test_integer_wraparound(dtype):
    """sum and prod wrap modulo 2^bits at every width, signed or not."""
    t = DTYPES[dtype][1]
    info = np.iinfo(t)
    hi, lo, half = int(info.max), int(info.min), 1 << (info.bits // 2)
    pairs = [(hi, 1), (hi, hi), (lo, lo), (lo, -1), (half, half), (hi, 2),
             (3, hi // 3 + 1), (-1, -1), (lo, 1)]
    aa = np.array([_wrap(x, t) for x, _ in pairs], dtype=object).astype(t)
    bb = np.array([_wrap(y, t) for _, y in pairs], dtype=object).astype(t)
    got = np.zeros_like(aa)
    for op, fn in (("sum", lambda x, y: x + y), ("prod", lambda x, y: x * y),
                   ("max", max), ("min", min)):
        assert reduce(got, aa, bb, dtype, op) == lib.TL_OK
        want = [_wrap(fn(int(x), int(y)), t) for x, y in zip(aa, bb)]
        assert [int(v) for v in got] == want, op
        with np.errstate(over="ignore"):
            assert (got == reference(dtype, op, aa, bb)).all(), op


def _one(dtype, op, x, y):
    t = DTYPES[dtype][1]
    a, b = np.array([x], t), np.array([y], t)
    d = np.zeros(1, t)
    assert reduce(d, a, b, dtype, op) == lib.TL_OK
    return d


def test_float16_rounding():
    h = lambda u: np.array([u], np.uint16).view(np.float16)[0]  # noqa: E731
    cases = [
        # (op, a bits, b bits, expected bits)
        ("sum", 0x3C00, 0x1000, 0x3C00),  # 1 + 2^-11: tie, to even (down)
        ("sum", 0x3C01, 0x1000, 0x3C02),  # odd mantissa + half ulp: tie, up
        ("sum", 0x3C00, 0x1001, 0x3C01),  # just above the tie: up
        ("sum", 0x7BFF, 0x5000, 0x7C00),  # 65504 + 32 -> inf
        ("sum", 0x7BFF, 0x4C00, 0x7C00),  # 65504 + 16: tie with 65536, to even = inf
        ("sum", 0x7BFF, 0x4BFF, 0x7BFF),  # below the tie: stays finite
        ("sum", 0xFBFF, 0xD000, 0xFC00),  # -> -inf
        ("sum", 0x0001, 0x0001, 0x0002),  # subnormals
        ("sum", 0x03FF, 0x0001, 0x0400),  # largest subnormal + 1 ulp = smallest normal
        ("sum", 0x0001, 0x8001, 0x0000),  # x + (-x) = +0
        ("sum", 0x8000, 0x8000, 0x8000),  # -0 + -0 = -0
        ("prod", 0x0001, 0x3800, 0x0000),  # 2^-24 * 0.5: tie, to even (0)
        ("prod", 0x0003, 0x3800, 0x0002),  # 3 * 2^-25: tie, to even (2)
        ("prod", 0x0001, 0x3E00, 0x0002),  # 2^-24 * 1.5: tie, to even (2)
        ("prod", 0x0400, 0x3400, 0x0100),  # normal * 0.25 -> subnormal, exact
        ("prod", 0x5C00, 0x5C00, 0x7C00),  # 256 * 256: overflow
        ("prod", 0x7C00, 0x0000, None),   # inf * 0 = NaN
        ("sum", 0x7C00, 0xFC00, None),    # inf - inf = NaN
        ("sum", 0x7E00, 0x3C00, None),    # NaN propagates
        ("prod", 0x3C00, 0x7C01, None),   # sNaN propagates (as a NaN)
    ]
    for op, x, y, want in cases:
        got = _one("float16", op, h(x), h(y))
        with np.errstate(all="ignore"):
            ref = (np.add if op == "sum" else np.multiply)(np.float16(h(x)), np.float16(h(y)))
        if want is None:
            assert np.isnan(got[0]) and np.isnan(ref), (op, hex(x), hex(y))
        else:
            assert got.view(np.uint16)[0] == want, (op, hex(x), hex(y), hex(got.view(np.uint16)[0]))
            assert np.array([ref]).view(np.uint16)[0] == want  # numpy agrees


def test_bfloat16_rounding():
    cases = [
        ("sum", 0x3F80, 0x3B80, 0x3F80),  # 1 + 2^-8: tie, to even (down)
        ("sum", 0x3F80, 0x3C40, 0x3F82),  # 1 + 3*2^-8: tie, to even (up)
        ("sum", 0x3F81, 0x3B80, 0x3F82),  # odd + half ulp: tie, up
        ("sum", 0x3F80, 0x3B81, 0x3F81),  # above the tie: up
        ("sum", 0x7F7F, 0x7F7F, 0x7F80),  # overflow -> inf
        ("sum", 0x7F7F, 0x7B00, 0x7F80),  # max + half ulp (2^119): tie, to even = inf
        ("sum", 0x7F7F, 0x7AFF, 0x7F7F),  # max + less than half ulp
        ("sum", 0xFF7F, 0xFF7F, 0xFF80),  # -inf
        ("sum", 0x0001, 0x0001, 0x0002),  # subnormals
        ("sum", 0x007F, 0x0001, 0x0080),  # largest subnormal + 1 = smallest normal
        ("sum", 0x0001, 0x8001, 0x0000),
        ("sum", 0x8000, 0x8000, 0x8000),
        ("prod", 0x0001, 0x3F00, 0x0000),  # min subnormal * 0.5: tie, to even (0)
        ("prod", 0x0003, 0x3F00, 0x0002),  # 3 * half: tie, to even (2)
        ("prod", 0x0001, 0x3FC0, 0x0002),  # * 1.5: tie, to even (2)
        ("prod", 0x4000, 0x4040, 0x40C0),  # 2 * 3 = 6
        ("prod", 0x7F80, 0x0000, 0x7FC0),  # inf * 0 = canonical NaN
        ("sum", 0x7F80, 0xFF80, 0x7FC0),   # inf - inf
        ("sum", 0xFFC1, 0x3F80, 0x7FC0),   # negative NaN payload -> 0x7FC0
        ("prod", 0x7F81, 0x3F80, 0x7FC0),  # sNaN -> 0x7FC0
        ("max", 0x7F81, 0x3F80, 0x7FC0),
        ("min", 0x3F80, 0xFFC1, 0x7FC0),
        ("max", 0x8000, 0x0000, 0x0000),
        ("min", 0x0000, 0x8000, 0x8000),
        ("max", 0xFF80, 0xFF7F, 0xFF7F),
        ("min", 0x7F80, 0x7F7F, 0x7F7F),
    ]
    for op, x, y, want in cases:
        for a, b in ((x, y), (y, x)):
            got = _one("bfloat16", op, a, b)[0]
            assert got == want, (op, hex(a), hex(b), hex(got), hex(want))
            ref = reference("bfloat16", op, np.array([a], np.uint16), np.array([b], np.uint16))
            assert ref[0] == want, (op, hex(a), hex(b))


@pytest.mark.parametrize("dtype", FLOATS + ["bfloat16"])
def test_float_minmax_nan_and_signed_zero(dtype):
    """NaN propagates from either side; max(+0, -0) = +0 and min = -0 in both
    orders; +-inf order."""
    if dtype == "bfloat16":
        enc = lambda v: f32_to_bf16(np.float32(v))  # noqa: E731
        dec = lambda u: bf16_to_f32(u)  # noqa: E731
    else:
        t = DTYPES[dtype][1]
        enc = lambda v: t(v)  # noqa: E731
        dec = lambda u: u  # noqa: E731
    for x, y in [(np.nan, 1.0), (1.0, np.nan), (np.nan, -np.inf), (np.inf, np.nan),
                 (np.nan, np.nan), (np.nan, 0.0)]:
        for op in ("max", "min"):
            assert np.isnan(dec(_one(dtype, op, enc(x), enc(y))))[0], (op, x, y)
    for x, y in [(0.0, -0.0), (-0.0, 0.0)]:
        mx_ = dec(_one(dtype, "max", enc(x), enc(y)))[0]
        mn_ = dec(_one(dtype, "min", enc(x), enc(y)))[0]
        assert mx_ == 0 and not np.signbit(mx_)
        assert mn_ == 0 and np.signbit(mn_)
    assert dec(_one(dtype, "max", enc(-np.inf), enc(-1e30 if dtype != "float16" else -6e4)))[0] < -1
    assert dec(_one(dtype, "min", enc(np.inf), enc(-np.inf)))[0] == -np.inf
    assert dec(_one(dtype, "max", enc(np.inf), enc(-np.inf)))[0] == np.inf


def test_float_nan_operand_kept():
    """For float16/32/64 max/min the NaN operand comes back unchanged (a's if
    both are NaN)."""
    for t, payload in ((np.float16, 0x7C01), (np.float32, 0xFFC00123),
                       (np.float64, 0x7FF0000000000042)):
        u = UINT_OF[np.dtype(t).itemsize]
        nan = np.array([payload], u).view(t)
        other = np.array([1.5], t)
        name = np.dtype(t).name
        for op in ("max", "min"):
            for a, b in ((nan, other), (other, nan)):
                d = np.zeros(1, t)
                reduce(d, a, b, name, op)
                assert bits(d)[0] == payload
            nan2 = (nan.view(u) ^ u(2)).view(t)  # another NaN
            d = np.zeros(1, t)
            reduce(d, nan, nan2, name, op)
            assert bits(d)[0] == payload


def test_complex64_semantics():
    c = lambda re, im: np.array([complex(re, im)], np.complex64)  # noqa: E731
    nan = float("nan")

    def one(op, a, b):
        d = np.zeros(1, np.complex64)
        assert reduce(d, a, b, "complex64", op) == lib.TL_OK
        return d[0]

    assert one("sum", c(1, 2), c(3, -5)) == 4 - 3j
    assert one("prod", c(1, 2), c(3, -5)) == (1 + 2j) * (3 - 5j)
    # lexicographic: real first, then imaginary
    assert one("max", c(1, 100), c(2, -100)) == 2 - 100j
    assert one("max", c(2, 1), c(2, 3)) == 2 + 3j
    assert one("min", c(2, 1), c(2, 3)) == 2 + 1j
    assert one("min", c(-np.inf, 0), c(0, -np.inf)) == complex(-np.inf, 0)
    # NaN in either part: that operand, a's if both
    for op in ("max", "min"):
        r = one(op, c(nan, 0), c(1, 1))
        assert np.isnan(r.real) and r.imag == 0
        r = one(op, c(1, 1), c(5, nan))
        assert r.real == 5 and np.isnan(r.imag)
        r = one(op, c(7, nan), c(nan, 8))
        assert r.real == 7 and np.isnan(r.imag)
    # -0 < +0 in each part, in both orders
    for a, b in ((c(0.0, 1), c(-0.0, 1)), (c(-0.0, 1), c(0.0, 1))):
        assert not np.signbit(one("max", a, b).real)
        assert np.signbit(one("min", a, b).real)
    # prod is commutative bit for bit
    rng = np.random.default_rng(4)
    a = (rng.standard_normal(1000) + 1j * rng.standard_normal(1000)).astype(np.complex64)
    b = (rng.standard_normal(1000) + 1j * rng.standard_normal(1000)).astype(np.complex64)
    ab, ba = np.zeros_like(a), np.zeros_like(a)
    reduce(ab, a, b, "complex64", "prod")
    reduce(ba, b, a, "complex64", "prod")
    assert ab.tobytes() == ba.tobytes()


@pytest.mark.parametrize("dtype,op", ALL)
def test_commutative(dtype, op):
    """a op b == b op a bit for bit, except which NaN when both are NaN."""
    a, b = operands(dtype, n_random=500, seed=5)
    ab, ba = np.zeros_like(a), np.zeros_like(a)
    reduce(ab, a, b, dtype, op)
    reduce(ba, b, a, dtype, op)
    assert_matches(dtype, op, ab, a, b, expected=ba)


# ---------------------------------------------------------------- properties

int_dtypes = st.sampled_from(INTS)


@settings(max_examples=60, deadline=None)
@given(dtype=int_dtypes, op=st.sampled_from(list(OPS)),
       data=st.data())
def test_integer_property(dtype, op, data):
    t = DTYPES[dtype][1]
    info = np.iinfo(t)
    n = data.draw(st.integers(0, 100))
    elems = st.integers(int(info.min), int(info.max))
    a = np.array(data.draw(st.lists(elems, min_size=n, max_size=n)), dtype=t)
    b = np.array(data.draw(st.lists(elems, min_size=n, max_size=n)), dtype=t)
    dst = np.zeros(n, t)
    assert reduce(dst, a, b, dtype, op) == lib.TL_OK
    mod = 1 << info.bits
    py = {"sum": lambda x, y: x + y, "prod": lambda x, y: x * y,
          "max": max, "min": min}[op]
    for x, y, g in zip(a.tolist(), b.tolist(), dst.tolist()):
        e = py(x, y) % mod
        if info.min < 0 and e > info.max:
            e -= mod
        assert g == e


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(["float16", "bfloat16"]),
       op=st.sampled_from(list(OPS)),
       pairs=st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
                      min_size=1, max_size=80))
def test_half_bit_patterns_property(dtype, op, pairs):
    """Any 16-bit patterns, for both half types, against the references."""
    ua = np.array([p[0] for p in pairs], np.uint16)
    ub = np.array([p[1] for p in pairs], np.uint16)
    if dtype == "float16":
        a, b = ua.view(np.float16), ub.view(np.float16)
    else:
        a, b = ua, ub
    dst = np.zeros_like(a)
    assert reduce(dst, a, b, dtype, op) == lib.TL_OK
    assert_matches(dtype, op, dst, a, b)


# ---------------------------------------------------------------- baseline ISA

def test_generic_kernels_match_dispatched():
    """The portable kernels (the only ones on targets without run-time
    dispatch) give the same bits as the kernels this CPU gets."""
    results = {}
    try:
        assert lib.tl_reduce_select_isa(b"generic") == lib.TL_OK
        for dtype, op in ALL:
            a, b = operands(dtype, n_random=1500, seed=6)
            for n in (len(a), 13):
                d = np.zeros(n, a.dtype)
                assert reduce(d, a[:n], b[:n], dtype, op) == lib.TL_OK
                results[(dtype, op, n)] = d
    finally:
        assert lib.tl_reduce_select_isa(b"auto") == lib.TL_OK
    for dtype, op in ALL:
        a, b = operands(dtype, n_random=1500, seed=6)
        for n in (len(a), 13):
            d = np.zeros(n, a.dtype)
            assert reduce(d, a[:n], b[:n], dtype, op) == lib.TL_OK
            assert_matches(dtype, op, results[(dtype, op, n)], a[:n], b[:n], expected=d)