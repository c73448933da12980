/*
 * thunderlink C core: element-wise reduction kernels.
 *
 *   tl_dtype_size(dtype)                     bytes per element, 0 if invalid
 *   tl_reduce(dst, a, b, count, dtype, op)   dst[i] = a[i] op b[i]
 *
 * These are the kernels every reducing collective runs on its hot path, so
 * each (dtype, op) pair has its own loop, written so that the compiler
 * vectorises it. Checked with gcc 12 -O3 (objdump, -fopt-info-vec): every
 * AVX2 kernel runs on ymm registers; the baseline x86-64 (SSE2) kernels are
 * vectorised except 64-bit integer prod/max/min and float64 max/min, which
 * SSE2 has no instructions for. float16 and bfloat16 sum/prod are written
 * with intrinsics in the AVX2 table (F16C conversions; a shuffle-free
 * bfloat16 widening), as the auto-vectorised bfloat16 loop is compute bound.
 * clang 14 for arm64 (apple-macos and linux) vectorises every loop but
 * 64-bit integer prod.
 *
 * Semantics (the same on every ISA, bit for bit):
 *  - integers: sum and prod wrap modulo 2^bits (computed in the unsigned
 *    type, so signed and unsigned share the sum/prod kernels); max/min in the
 *    dtype's own signedness.
 *  - bool: one byte; any non-zero byte is true; results are 0 or 1.
 *    sum = max = OR, prod = min = AND.
 *  - float32/float64: IEEE add/mul. max/min are IEEE 754-2019 maximum and
 *    minimum: NaN propagates (a NaN operand is returned as is, a's if both
 *    are NaN) and -0 < +0, so max(+0, -0) = +0 and min(+0, -0) = -0 in either
 *    order. Apart from which NaN comes back when both are NaN, max and min
 *    are therefore commutative bit for bit, which keeps every rank of an
 *    all_reduce on identical bits whatever order the operands arrive in.
 *  - float16: both operands are widened to float32, the op runs in float32
 *    and the result is rounded back to nearest, ties to even (overflow to
 *    inf, subnormals and NaN handled): exactly what numpy does for float16.
 *    (For + and * this double rounding equals a correctly rounded float16
 *    operation, since float32 carries at least 2 * 11 + 2 bits.)
 *    max/min as for float32, on the float16 bits (no rounding involved).
 *  - bfloat16: as float16, but rounding is done like MLX's
 *    _MLX_BFloat16(float) constructor: every NaN result is the canonical
 *    0x7FC0, other values round to nearest even by
 *    `u += ((u >> 16) & 1) + 0x7FFF; bits = u >> 16`. max/min order like
 *    float32 and return 0x7FC0 if either operand is NaN.
 *  - complex64 (float32 real, float32 imag): sum is component-wise add;
 *    prod is real = ar*br - ai*bi, imag = ar*bi + ai*br in float32 without
 *    fused multiply-add (this form is commutative bit for bit). max/min
 *    compare lexicographically like MLX's complex64_t (real part first, then
 *    imaginary part), each part ordered as above (-0 < +0); if either operand
 *    has a NaN part the result is that operand, a's if both do.
 *
 * Aliasing: dst may be a or b exactly (or a == b == dst). Every loop reads
 * a[i] and b[i] before it writes dst[i] and no iteration touches another
 * iteration's element, so such an element-wise loop stays correct when it is
 * vectorised even with exact aliasing. TL_IVDEP tells the compiler so,
 * which saves the runtime overlap test it would otherwise put in front of
 * every loop (gcc 12's test lets exact aliasing through, but other compilers
 * may not). `restrict` is not used: with dst == a it would be undefined.
 * Partial overlap is rejected with TL_ERR_INVALID.
 *
 * Alignment: pointers need not be aligned, not even to the element size
 * (the element types used below are declared with alignment 1, so the
 * compiler emits unaligned vector accesses and never peels for alignment).
 *
 * Dispatch: on x86-64 the kernels are compiled twice, once for the baseline
 * ISA and once with __attribute__((target("avx2,f16c"))); the first call
 * picks a table (__builtin_cpu_supports("avx2") and cpuid for F16C) and
 * caches the choice in one int (idempotent: racing threads compute and
 * store the same value). tl_reduce_select_isa("generic") forces the baseline
 * table (for tests and benchmarks). On aarch64 there is a single table;
 * float16 uses the compiler's __fp16 type (see there).
 *
 * Floating-point environment: the kernels assume the default rounding mode
 * (round to nearest even) and no flush-to-zero/denormals-are-zero. The
 * software float16 rounding (baseline x86) relies on the rounding mode.
 * Floating-point contraction must stay off (gcc: -std=c11 implies
 * -ffp-contract=off; clang: see the pragma below), or complex prod would be
 * fused and lose its exact, commutative form. The x86 variants do not
 * enable FMA at all.
 */
#include "tl.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#define TL_REDUCE_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

#if defined(__aarch64__)
#define TL_REDUCE_ARM64 1
#endif

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "thunderlink reduce.c assumes a little-endian target"
#endif

/* "No loop-carried dependency": the loops are element-wise and dst may only
 * alias a or b exactly (see above). */
#if defined(__clang__)
#define TL_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define TL_IVDEP _Pragma("GCC ivdep")
#else
#define TL_IVDEP
#endif

/* Element types with alignment 1: any address is valid. */
typedef uint8_t tl_u8;
typedef int8_t tl_i8;
typedef uint16_t tl_u16 __attribute__((aligned(1)));
typedef int16_t tl_i16 __attribute__((aligned(1)));
typedef uint32_t tl_u32 __attribute__((aligned(1)));
typedef int32_t tl_i32 __attribute__((aligned(1)));
typedef uint64_t tl_u64 __attribute__((aligned(1)));
typedef int64_t tl_i64 __attribute__((aligned(1)));
typedef float tl_f32 __attribute__((aligned(1)));
typedef double tl_f64 __attribute__((aligned(1)));

typedef void (*tl_kernel_fn)(void *dst, const void *a, const void *b,
                             size_t n);

/* ------------------------------------------------------------------------ */
/* dtype sizes                                                               */
/* ------------------------------------------------------------------------ */

static const unsigned char tl_dtype_sizes[TL_NUM_DTYPES] = {
    [TL_BOOL] = 1,    [TL_UINT8] = 1,    [TL_UINT16] = 2,   [TL_UINT32] = 4,
    [TL_UINT64] = 8,  [TL_INT8] = 1,     [TL_INT16] = 2,    [TL_INT32] = 4,
    [TL_INT64] = 8,   [TL_FLOAT16] = 2,  [TL_FLOAT32] = 4,  [TL_FLOAT64] = 8,
    [TL_BFLOAT16] = 2, [TL_COMPLEX64] = 8,
};

size_t tl_dtype_size(int dtype) {
  if (dtype < 0 || dtype >= TL_NUM_DTYPES)
    return 0;
  return tl_dtype_sizes[dtype];
}

/* ------------------------------------------------------------------------ */
/* scalar element operations (inlined into the loops)                        */
/* ------------------------------------------------------------------------ */

/* Integers. `1u * x` lifts narrow types to unsigned int before the
 * arithmetic, so nothing is done in (overflowing) signed int. */
#define TL_INT_ELEM_OPS(S, U, T)                                               \
  static inline U tl_sum_##S(U x, U y) { return (U)(1u * x + y); }            \
  static inline U tl_prod_##S(U x, U y) { return (U)(1u * x * y); }           \
  static inline U tl_umax_##S(U x, U y) { return x > y ? x : y; }             \
  static inline U tl_umin_##S(U x, U y) { return x < y ? x : y; }             \
  static inline T tl_smax_##S(T x, T y) { return x > y ? x : y; }             \
  static inline T tl_smin_##S(T x, T y) { return x < y ? x : y; }

TL_INT_ELEM_OPS(8, uint8_t, int8_t)
TL_INT_ELEM_OPS(16, uint16_t, int16_t)
TL_INT_ELEM_OPS(32, uint32_t, int32_t)
TL_INT_ELEM_OPS(64, uint64_t, int64_t)

static inline uint8_t tl_or_b(uint8_t x, uint8_t y) {
  return (uint8_t)((x | y) != 0);
}
static inline uint8_t tl_and_b(uint8_t x, uint8_t y) {
  return (uint8_t)((x != 0) & (y != 0));
}

static inline float tl_add_f32(float x, float y) { return x + y; }
static inline float tl_mul_f32(float x, float y) { return x * y; }
static inline double tl_add_f64(double x, double y) { return x + y; }
static inline double tl_mul_f64(double x, double y) { return x * y; }

/*
 * Total-order keys for IEEE bit patterns: the key, read as a signed integer,
 * grows with the value, and -0 (key -1) sorts just below +0 (key 0). NaN is
 * handled separately. Positive patterns keep their bits; negative ones flip
 * every bit but the sign.
 */
static inline int16_t tl_key16(uint16_t x) {
  uint16_t m = (uint16_t)((uint16_t)(-(x >> 15)) >> 1);
  return (int16_t)(uint16_t)(x ^ m);
}
static inline int32_t tl_key32(uint32_t x) {
  uint32_t m = (0u - (x >> 31)) >> 1;
  return (int32_t)(x ^ m);
}
static inline int64_t tl_key64(uint64_t x) {
  uint64_t m = ((uint64_t)0 - (x >> 63)) >> 1;
  return (int64_t)(x ^ m);
}

static inline int tl_isnan_f16(uint16_t x) { return (x & 0x7FFFu) > 0x7C00u; }
static inline int tl_isnan_bf16(uint16_t x) { return (x & 0x7FFFu) > 0x7F80u; }
static inline int tl_isnan_f32(uint32_t x) {
  return (x & 0x7FFFFFFFu) > 0x7F800000u;
}
static inline int tl_isnan_f64(uint64_t x) {
  return (x & 0x7FFFFFFFFFFFFFFFull) > 0x7FF0000000000000ull;
}

/* IEEE 754-2019 maximum/minimum on bit patterns (NaN: a's wins). */
#define TL_FLOAT_MINMAX(S, U, KEY, ISNAN)                                      \
  static inline U tl_fmax_##S(U x, U y) {                                     \
    U m = KEY(x) >= KEY(y) ? x : y;                                           \
    m = ISNAN(y) ? y : m;                                                     \
    return ISNAN(x) ? x : m;                                                  \
  }                                                                           \
  static inline U tl_fmin_##S(U x, U y) {                                     \
    U m = KEY(x) <= KEY(y) ? x : y;                                           \
    m = ISNAN(y) ? y : m;                                                     \
    return ISNAN(x) ? x : m;                                                  \
  }

TL_FLOAT_MINMAX(f16, uint16_t, tl_key16, tl_isnan_f16)
TL_FLOAT_MINMAX(f32, uint32_t, tl_key32, tl_isnan_f32)
TL_FLOAT_MINMAX(f64, uint64_t, tl_key64, tl_isnan_f64)

/* bfloat16 max/min: a NaN result is the canonical 0x7FC0. */
static inline uint16_t tl_fmax_bf16(uint16_t x, uint16_t y) {
  uint16_t m = tl_key16(x) >= tl_key16(y) ? x : y;
  return (tl_isnan_bf16(x) | tl_isnan_bf16(y)) ? (uint16_t)0x7FC0u : m;
}
static inline uint16_t tl_fmin_bf16(uint16_t x, uint16_t y) {
  uint16_t m = tl_key16(x) <= tl_key16(y) ? x : y;
  return (tl_isnan_bf16(x) | tl_isnan_bf16(y)) ? (uint16_t)0x7FC0u : m;
}

static inline float tl_f32_from_bits(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}
static inline uint32_t tl_f32_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
}

/* bfloat16 <-> float32, rounding like MLX's _MLX_BFloat16(float). */
static inline float tl_bf16_to_f32(uint16_t h) {
  return tl_f32_from_bits((uint32_t)h << 16);
}
static inline uint16_t tl_f32_to_bf16(float f) {
  uint32_t u = tl_f32_bits(f);
  uint32_t r = u + 0x7FFFu + ((u >> 16) & 1u);
  return tl_isnan_f32(u) ? (uint16_t)0x7FC0u : (uint16_t)(r >> 16);
}
static inline uint16_t tl_add_bf16(uint16_t x, uint16_t y) {
  return tl_f32_to_bf16(tl_bf16_to_f32(x) + tl_bf16_to_f32(y));
}
static inline uint16_t tl_mul_bf16(uint16_t x, uint16_t y) {
  return tl_f32_to_bf16(tl_bf16_to_f32(x) * tl_bf16_to_f32(y));
}

#if !defined(TL_REDUCE_ARM64)
/*
 * Software float16 <-> float32 (baseline x86 and other targets without a
 * native half type), after F. Giesen's half_to_float_fast4 and
 * float_to_half_fast3_rtne. Every path is computed and the right one picked
 * with a select (the float operations must not sit under a branch, or gcc,
 * honouring -ftrapping-math, will not if-convert and vectorise the loop).
 * NaN is kept like F16C's vcvtps2ph keeps it (sign and top payload bits,
 * quiet bit set), so the baseline and AVX2 tables give identical bits.
 * The float operations only see normal operands, so this also holds with
 * denormals-are-zero.
 */
static inline float tl_f16_to_f32_sw(uint16_t h) {
  const uint32_t shifted_exp = 0x7C00u << 13;
  uint32_t o = ((uint32_t)h & 0x7FFFu) << 13;
  uint32_t exp = o & shifted_exp;
  o += (uint32_t)(127 - 15) << 23;
  uint32_t o_inf = o + ((uint32_t)(128 - 16) << 23);
  /* subnormal: renormalise through an exact float subtraction */
  uint32_t o_sub = tl_f32_bits(tl_f32_from_bits(o + (1u << 23)) -
                               tl_f32_from_bits(113u << 23));
  uint32_t m_inf = 0u - (uint32_t)(exp == shifted_exp);
  uint32_t m_sub = 0u - (uint32_t)(exp == 0);
  o = (o & ~(m_inf | m_sub)) | (o_inf & m_inf) | (o_sub & m_sub);
  return tl_f32_from_bits(o | (((uint32_t)h & 0x8000u) << 16));
}

static inline uint16_t tl_f32_to_f16_sw(float f) {
  const uint32_t f32infty = 255u << 23;
  const uint32_t f16max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = tl_f32_bits(f);
  uint32_t sign = u & 0x80000000u;
  u ^= sign;
  /* inf or NaN (and overflow to inf) */
  uint32_t o_big = u > f32infty ? (0x7E00u | ((u >> 13) & 0x3FFu)) : 0x7C00u;
  /* subnormal or zero: the float add rounds to nearest even at 2^-24 */
  uint32_t o_sub =
      tl_f32_bits(tl_f32_from_bits(u) + tl_f32_from_bits(denorm_magic)) -
      denorm_magic;
  /* normal: rebias the exponent and round to nearest even */
  uint32_t o_norm =
      (u + ((uint32_t)(15 - 127) << 23) + 0xFFFu + ((u >> 13) & 1u)) >> 13;
  uint32_t m_big = 0u - (uint32_t)(u >= f16max);
  uint32_t m_sub = 0u - (uint32_t)(u < (113u << 23));
  uint32_t o = (o_norm & ~(m_big | m_sub)) | (o_big & m_big) | (o_sub & m_sub);
  return (uint16_t)(o | (sign >> 16));
}

static inline uint16_t tl_add_f16_sw(uint16_t x, uint16_t y) {
  return tl_f32_to_f16_sw(tl_f16_to_f32_sw(x) + tl_f16_to_f32_sw(y));
}
static inline uint16_t tl_mul_f16_sw(uint16_t x, uint16_t y) {
  return tl_f32_to_f16_sw(tl_f16_to_f32_sw(x) * tl_f16_to_f32_sw(y));
}
#endif /* !TL_REDUCE_ARM64 */

/* complex64, as pairs of float32 bit patterns. */
static inline int tl_c64_take_a_max(uint32_t ar, uint32_t ai, uint32_t br,
                                    uint32_t bi) {
  int na = tl_isnan_f32(ar) | tl_isnan_f32(ai);
  int nb = tl_isnan_f32(br) | tl_isnan_f32(bi);
  int32_t kar = tl_key32(ar), kbr = tl_key32(br);
  int ge = (kar > kbr) | ((kar == kbr) & (tl_key32(ai) >= tl_key32(bi)));
  return na | (ge & !nb);
}
static inline int tl_c64_take_a_min(uint32_t ar, uint32_t ai, uint32_t br,
                                    uint32_t bi) {
  int na = tl_isnan_f32(ar) | tl_isnan_f32(ai);
  int nb = tl_isnan_f32(br) | tl_isnan_f32(bi);
  int32_t kar = tl_key32(ar), kbr = tl_key32(br);
  int le = (kar < kbr) | ((kar == kbr) & (tl_key32(ai) <= tl_key32(bi)));
  return na | (le & !nb);
}

/* ------------------------------------------------------------------------ */
/* loops                                                                     */
/* ------------------------------------------------------------------------ */

/* dst[i] = FN(a[i], b[i]) over n elements of type T. */
#define TL_KERNEL(ATTR, NAME, T, FN)                                           \
  ATTR static void NAME(void *vd, const void *va, const void *vb, size_t n) { \
    T *d = (T *)vd;                                                           \
    const T *a = (const T *)va;                                               \
    const T *b = (const T *)vb;                                               \
    TL_IVDEP                                                                  \
    for (size_t i = 0; i < n; i++)                                            \
      d[i] = FN(a[i], b[i]);                                                  \
  }

/* complex64 kernels, on float32 (prod) or uint32 (max/min) pairs. */
#define TL_C64_KERNELS(ATTR, SFX)                                              \
  ATTR static void tl_k_c64_prod_##SFX(void *vd, const void *va,              \
                                       const void *vb, size_t n) {            \
    tl_f32 *d = (tl_f32 *)vd;                                                 \
    const tl_f32 *a = (const tl_f32 *)va;                                     \
    const tl_f32 *b = (const tl_f32 *)vb;                                     \
    TL_IVDEP                                                                  \
    for (size_t i = 0; i < n; i++) {                                          \
      float ar = a[2 * i], ai = a[2 * i + 1];                                 \
      float br = b[2 * i], bi = b[2 * i + 1];                                 \
      d[2 * i] = ar * br - ai * bi;                                           \
      d[2 * i + 1] = ar * bi + ai * br;                                       \
    }                                                                         \
  }                                                                           \
  ATTR static void tl_k_c64_sum_##SFX(void *vd, const void *va,               \
                                      const void *vb, size_t n) {             \
    tl_k_f32_sum_##SFX(vd, va, vb, 2 * n);                                    \
  }                                                                           \
  TL_C64_MINMAX_KERNEL(ATTR, tl_k_c64_max_##SFX, tl_c64_take_a_max)           \
  TL_C64_MINMAX_KERNEL(ATTR, tl_k_c64_min_##SFX, tl_c64_take_a_min)

#define TL_C64_MINMAX_KERNEL(ATTR, NAME, TAKE_A)                               \
  ATTR static void NAME(void *vd, const void *va, const void *vb, size_t n) { \
    tl_u32 *d = (tl_u32 *)vd;                                                 \
    const tl_u32 *a = (const tl_u32 *)va;                                     \
    const tl_u32 *b = (const tl_u32 *)vb;                                     \
    TL_IVDEP                                                                  \
    for (size_t i = 0; i < n; i++) {                                          \
      uint32_t ar = a[2 * i], ai = a[2 * i + 1];                              \
      uint32_t br = b[2 * i], bi = b[2 * i + 1];                              \
      int t = TAKE_A(ar, ai, br, bi);                                         \
      d[2 * i] = t ? ar : br;                                                 \
      d[2 * i + 1] = t ? ai : bi;                                             \
    }                                                                         \
  }

/*
 * Every kernel except float16 and bfloat16 sum/prod (which each ISA
 * provides as tl_k_{f16,bf16}_{sum,prod}_SFX), and the [dtype][op] table.
 * Signed integers share the unsigned sum/prod kernels (same bits).
 */
#define TL_DEFINE_KERNELS(ATTR, SFX)                                           \
  TL_KERNEL(ATTR, tl_k_b_or_##SFX, tl_u8, tl_or_b)                            \
  TL_KERNEL(ATTR, tl_k_b_and_##SFX, tl_u8, tl_and_b)                          \
  TL_KERNEL(ATTR, tl_k_u8_sum_##SFX, tl_u8, tl_sum_8)                         \
  TL_KERNEL(ATTR, tl_k_u8_prod_##SFX, tl_u8, tl_prod_8)                       \
  TL_KERNEL(ATTR, tl_k_u8_max_##SFX, tl_u8, tl_umax_8)                        \
  TL_KERNEL(ATTR, tl_k_u8_min_##SFX, tl_u8, tl_umin_8)                        \
  TL_KERNEL(ATTR, tl_k_i8_max_##SFX, tl_i8, tl_smax_8)                        \
  TL_KERNEL(ATTR, tl_k_i8_min_##SFX, tl_i8, tl_smin_8)                        \
  TL_KERNEL(ATTR, tl_k_u16_sum_##SFX, tl_u16, tl_sum_16)                      \
  TL_KERNEL(ATTR, tl_k_u16_prod_##SFX, tl_u16, tl_prod_16)                    \
  TL_KERNEL(ATTR, tl_k_u16_max_##SFX, tl_u16, tl_umax_16)                     \
  TL_KERNEL(ATTR, tl_k_u16_min_##SFX, tl_u16, tl_umin_16)                     \
  TL_KERNEL(ATTR, tl_k_i16_max_##SFX, tl_i16, tl_smax_16)                     \
  TL_KERNEL(ATTR, tl_k_i16_min_##SFX, tl_i16, tl_smin_16)                     \
  TL_KERNEL(ATTR, tl_k_u32_sum_##SFX, tl_u32, tl_sum_32)                      \
  TL_KERNEL(ATTR, tl_k_u32_prod_##SFX, tl_u32, tl_prod_32)                    \
  TL_KERNEL(ATTR, tl_k_u32_max_##SFX, tl_u32, tl_umax_32)                     \
  TL_KERNEL(ATTR, tl_k_u32_min_##SFX, tl_u32, tl_umin_32)                     \
  TL_KERNEL(ATTR, tl_k_i32_max_##SFX, tl_i32, tl_smax_32)                     \
  TL_KERNEL(ATTR, tl_k_i32_min_##SFX, tl_i32, tl_smin_32)                     \
  TL_KERNEL(ATTR, tl_k_u64_sum_##SFX, tl_u64, tl_sum_64)                      \
  TL_KERNEL(ATTR, tl_k_u64_prod_##SFX, tl_u64, tl_prod_64)                    \
  TL_KERNEL(ATTR, tl_k_u64_max_##SFX, tl_u64, tl_umax_64)                     \
  TL_KERNEL(ATTR, tl_k_u64_min_##SFX, tl_u64, tl_umin_64)                     \
  TL_KERNEL(ATTR, tl_k_i64_max_##SFX, tl_i64, tl_smax_64)                     \
  TL_KERNEL(ATTR, tl_k_i64_min_##SFX, tl_i64, tl_smin_64)                     \
  TL_KERNEL(ATTR, tl_k_f16_max_##SFX, tl_u16, tl_fmax_f16)                    \
  TL_KERNEL(ATTR, tl_k_f16_min_##SFX, tl_u16, tl_fmin_f16)                    \
  TL_KERNEL(ATTR, tl_k_f32_sum_##SFX, tl_f32, tl_add_f32)                     \
  TL_KERNEL(ATTR, tl_k_f32_prod_##SFX, tl_f32, tl_mul_f32)                    \
  TL_KERNEL(ATTR, tl_k_f32_max_##SFX, tl_u32, tl_fmax_f32)                    \
  TL_KERNEL(ATTR, tl_k_f32_min_##SFX, tl_u32, tl_fmin_f32)                    \
  TL_KERNEL(ATTR, tl_k_f64_sum_##SFX, tl_f64, tl_add_f64)                     \
  TL_KERNEL(ATTR, tl_k_f64_prod_##SFX, tl_f64, tl_mul_f64)                    \
  TL_KERNEL(ATTR, tl_k_f64_max_##SFX, tl_u64, tl_fmax_f64)                    \
  TL_KERNEL(ATTR, tl_k_f64_min_##SFX, tl_u64, tl_fmin_f64)                    \
  TL_KERNEL(ATTR, tl_k_bf16_max_##SFX, tl_u16, tl_fmax_bf16)                  \
  TL_KERNEL(ATTR, tl_k_bf16_min_##SFX, tl_u16, tl_fmin_bf16)                  \
  TL_C64_KERNELS(ATTR, SFX)                                                   \
                                                                              \
  static const tl_kernel_fn tl_table_##SFX[TL_NUM_DTYPES][TL_NUM_REDOPS] = {  \
      [TL_BOOL] = {tl_k_b_or_##SFX, tl_k_b_and_##SFX, tl_k_b_or_##SFX,        \
                   tl_k_b_and_##SFX},                                         \
      [TL_UINT8] = {tl_k_u8_sum_##SFX, tl_k_u8_prod_##SFX, tl_k_u8_max_##SFX, \
                    tl_k_u8_min_##SFX},                                       \
      [TL_UINT16] = {tl_k_u16_sum_##SFX, tl_k_u16_prod_##SFX,                 \
                     tl_k_u16_max_##SFX, tl_k_u16_min_##SFX},                 \
      [TL_UINT32] = {tl_k_u32_sum_##SFX, tl_k_u32_prod_##SFX,                 \
                     tl_k_u32_max_##SFX, tl_k_u32_min_##SFX},                 \
      [TL_UINT64] = {tl_k_u64_sum_##SFX, tl_k_u64_prod_##SFX,                 \
                     tl_k_u64_max_##SFX, tl_k_u64_min_##SFX},                 \
      [TL_INT8] = {tl_k_u8_sum_##SFX, tl_k_u8_prod_##SFX, tl_k_i8_max_##SFX,  \
                   tl_k_i8_min_##SFX},                                        \
      [TL_INT16] = {tl_k_u16_sum_##SFX, tl_k_u16_prod_##SFX,                  \
                    tl_k_i16_max_##SFX, tl_k_i16_min_##SFX},                  \
      [TL_INT32] = {tl_k_u32_sum_##SFX, tl_k_u32_prod_##SFX,                  \
                    tl_k_i32_max_##SFX, tl_k_i32_min_##SFX},                  \
      [TL_INT64] = {tl_k_u64_sum_##SFX, tl_k_u64_prod_##SFX,                  \
                    tl_k_i64_max_##SFX, tl_k_i64_min_##SFX},                  \
      [TL_FLOAT16] = {tl_k_f16_sum_##SFX, tl_k_f16_prod_##SFX,                \
                      tl_k_f16_max_##SFX, tl_k_f16_min_##SFX},                \
      [TL_FLOAT32] = {tl_k_f32_sum_##SFX, tl_k_f32_prod_##SFX,                \
                      tl_k_f32_max_##SFX, tl_k_f32_min_##SFX},                \
      [TL_FLOAT64] = {tl_k_f64_sum_##SFX, tl_k_f64_prod_##SFX,                \
                      tl_k_f64_max_##SFX, tl_k_f64_min_##SFX},                \
      [TL_BFLOAT16] = {tl_k_bf16_sum_##SFX, tl_k_bf16_prod_##SFX,             \
                       tl_k_bf16_max_##SFX, tl_k_bf16_min_##SFX},             \
      [TL_COMPLEX64] = {tl_k_c64_sum_##SFX, tl_k_c64_prod_##SFX,              \
                        tl_k_c64_max_##SFX, tl_k_c64_min_##SFX},              \
  };

/* ------------------------------------------------------------------------ */
/* baseline table                                                            */
/* ------------------------------------------------------------------------ */

#if defined(TL_REDUCE_ARM64)
/* __fp16 is a storage type: arithmetic promotes to float, the cast back
 * rounds to nearest even (FPCR default). Where the CPU has half arithmetic
 * (FEAT_FP16: every Apple M chip), clang folds widen/op/round into a native
 * half fadd/fmul, which gives the same bits: float32 has at least
 * 2 * 11 + 2 bits, so rounding the float32 result again is the correctly
 * rounded result, as a native half operation returns. */
typedef __fp16 tl_h16 __attribute__((aligned(1)));
static inline __fp16 tl_add_h16(__fp16 x, __fp16 y) {
  return (__fp16)((float)x + (float)y);
}
static inline __fp16 tl_mul_h16(__fp16 x, __fp16 y) {
  return (__fp16)((float)x * (float)y);
}
TL_KERNEL(, tl_k_f16_sum_gen, tl_h16, tl_add_h16)
TL_KERNEL(, tl_k_f16_prod_gen, tl_h16, tl_mul_h16)
#else
TL_KERNEL(, tl_k_f16_sum_gen, tl_u16, tl_add_f16_sw)
TL_KERNEL(, tl_k_f16_prod_gen, tl_u16, tl_mul_f16_sw)
#endif
TL_KERNEL(, tl_k_bf16_sum_gen, tl_u16, tl_add_bf16)
TL_KERNEL(, tl_k_bf16_prod_gen, tl_u16, tl_mul_bf16)

TL_DEFINE_KERNELS(, gen)

/* ------------------------------------------------------------------------ */
/* x86-64: AVX2 + F16C table                                                 */
/* ------------------------------------------------------------------------ */

#if defined(TL_REDUCE_X86)
#define TL_AVX2 __attribute__((target("avx2,f16c")))

/* float16 sum/prod with F16C: 8 halves -> 8 floats, op, back with RNE.
 * The tail goes through zero-padded stack blocks, in the same order
 * (a and b read before dst is written), so aliasing stays safe. */
#define TL_F16C_KERNEL(NAME, OP)                                               \
  TL_AVX2 static void NAME(void *vd, const void *va, const void *vb,          \
                           size_t n) {                                        \
    unsigned char *d = (unsigned char *)vd;                                   \
    const unsigned char *a = (const unsigned char *)va;                       \
    const unsigned char *b = (const unsigned char *)vb;                       \
    size_t i = 0;                                                             \
    for (; i + 16 <= n; i += 16) {                                            \
      __m256 x0 = _mm256_cvtph_ps(                                            \
          _mm_loadu_si128((const __m128i *)(const void *)(a + 2 * i)));       \
      __m256 x1 = _mm256_cvtph_ps(                                            \
          _mm_loadu_si128((const __m128i *)(const void *)(a + 2 * i + 16)));  \
      __m256 y0 = _mm256_cvtph_ps(                                            \
          _mm_loadu_si128((const __m128i *)(const void *)(b + 2 * i)));       \
      __m256 y1 = _mm256_cvtph_ps(                                            \
          _mm_loadu_si128((const __m128i *)(const void *)(b + 2 * i + 16)));  \
      _mm_storeu_si128((__m128i *)(void *)(d + 2 * i),                        \
                       _mm256_cvtps_ph(OP(x0, y0), _MM_FROUND_TO_NEAREST_INT)); \
      _mm_storeu_si128((__m128i *)(void *)(d + 2 * i + 16),                   \
                       _mm256_cvtps_ph(OP(x1, y1), _MM_FROUND_TO_NEAREST_INT)); \
    }                                                                         \
    while (i < n) {                                                           \
      size_t m = n - i < 8 ? n - i : 8;                                       \
      __m128i ta = _mm_setzero_si128(), tb = _mm_setzero_si128(), td;         \
      memcpy(&ta, a + 2 * i, 2 * m);                                          \
      memcpy(&tb, b + 2 * i, 2 * m);                                          \
      td = _mm256_cvtps_ph(OP(_mm256_cvtph_ps(ta), _mm256_cvtph_ps(tb)),      \
                           _MM_FROUND_TO_NEAREST_INT);                        \
      memcpy(d + 2 * i, &td, 2 * m);                                          \
      i += m;                                                                 \
    }                                                                         \
  }

TL_F16C_KERNEL(tl_k_f16_sum_avx2, _mm256_add_ps)
TL_F16C_KERNEL(tl_k_f16_prod_avx2, _mm256_mul_ps)

/*
 * bfloat16 sum/prod, 16 elements per step (the auto-vectorised loop is
 * compute bound at about half the memory bandwidth: it widens with
 * vpmovzxwd, tests NaN with integer ops and narrows with a lane permute).
 * Seen as 32-bit lanes, each holds two bfloat16: the even element's float32
 * bits are lane << 16, the odd one's lane & 0xFFFF0000, and the results go
 * back the same way, so there is no shuffle at all. Rounding and NaN as in
 * tl_f32_to_bf16 (the result's bfloat16 ends up in the top 16 bits).
 */
TL_AVX2 static inline __m256i tl_bf16_round_avx2(__m256 f) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i bias = _mm256_set1_epi32(0x7FFF);
  const __m256i qnan = _mm256_set1_epi32(0x7FC00000);
  __m256i u = _mm256_castps_si256(f);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, bias), lsb);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, qnan, nan);
}

TL_AVX2 static inline __m256i tl_bf16_step_avx2(__m256i x, __m256i y,
                                               int mul) {
  const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
  __m256 xe = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  __m256 ye = _mm256_castsi256_ps(_mm256_slli_epi32(y, 16));
  __m256 xo = _mm256_castsi256_ps(_mm256_and_si256(x, hi));
  __m256 yo = _mm256_castsi256_ps(_mm256_and_si256(y, hi));
  __m256 re = mul ? _mm256_mul_ps(xe, ye) : _mm256_add_ps(xe, ye);
  __m256 ro = mul ? _mm256_mul_ps(xo, yo) : _mm256_add_ps(xo, yo);
  return _mm256_or_si256(_mm256_srli_epi32(tl_bf16_round_avx2(re), 16),
                         _mm256_and_si256(tl_bf16_round_avx2(ro), hi));
}

#define TL_BF16_AVX2_KERNEL(NAME, MUL)                                         \
  TL_AVX2 static void NAME(void *vd, const void *va, const void *vb,          \
                           size_t n) {                                        \
    unsigned char *d = (unsigned char *)vd;                                   \
    const unsigned char *a = (const unsigned char *)va;                       \
    const unsigned char *b = (const unsigned char *)vb;                       \
    size_t i = 0;                                                             \
    for (; i + 32 <= n; i += 32) {                                            \
      __m256i x0 = _mm256_loadu_si256((const void *)(a + 2 * i));           \
      __m256i y0 = _mm256_loadu_si256((const void *)(b + 2 * i));           \
      __m256i x1 = _mm256_loadu_si256((const void *)(a + 2 * i + 32));      \
      __m256i y1 = _mm256_loadu_si256((const void *)(b + 2 * i + 32));      \
      __m256i r0 = tl_bf16_step_avx2(x0, y0, MUL);                          \
      __m256i r1 = tl_bf16_step_avx2(x1, y1, MUL);                          \
      _mm256_storeu_si256((void *)(d + 2 * i), r0);                         \
      _mm256_storeu_si256((void *)(d + 2 * i + 32), r1);                    \
    }                                                                         \
    for (; i + 16 <= n; i += 16) {                                            \
      __m256i x = _mm256_loadu_si256((const void *)(a + 2 * i));            \
      __m256i y = _mm256_loadu_si256((const void *)(b + 2 * i));            \
      _mm256_storeu_si256((void *)(d + 2 * i), tl_bf16_step_avx2(x, y, MUL)); \
    }                                                                         \
    if (i < n) {                                                              \
      size_t m = n - i;                                                       \
      __m256i x = _mm256_setzero_si256(), y = _mm256_setzero_si256(), r;      \
      memcpy(&x, a + 2 * i, 2 * m);                                           \
      memcpy(&y, b + 2 * i, 2 * m);                                           \
      r = tl_bf16_step_avx2(x, y, MUL);                                       \
      memcpy(d + 2 * i, &r, 2 * m);                                           \
    }                                                                         \
  }

TL_BF16_AVX2_KERNEL(tl_k_bf16_sum_avx2, 0)
TL_BF16_AVX2_KERNEL(tl_k_bf16_prod_avx2, 1)

TL_DEFINE_KERNELS(TL_AVX2, avx2)

/* 1: baseline, 2: AVX2 + F16C; 0: not chosen yet. Written once per racing
 * thread with the same value, read with relaxed atomics. */
static int tl_reduce_isa;

static int tl_reduce_choose_isa(void) {
  /* avx2 through the compiler (it also checks that the OS saves the ymm
   * state); f16c through cpuid, as clang's __builtin_cpu_supports does not
   * know it. Every AVX2 CPU has F16C, so this is a formality. */
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  int f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
  __builtin_cpu_init();
  return (f16c && __builtin_cpu_supports("avx2")) ? 2 : 1;
}

static const tl_kernel_fn (*tl_reduce_table(void))[TL_NUM_REDOPS] {
  int isa = __atomic_load_n(&tl_reduce_isa, __ATOMIC_RELAXED);
  if (isa == 0) {
    isa = tl_reduce_choose_isa();
    __atomic_store_n(&tl_reduce_isa, isa, __ATOMIC_RELAXED);
  }
  return isa == 2 ? tl_table_avx2 : tl_table_gen;
}

int tl_reduce_select_isa(const char *name) {
  int isa;
  if (name == NULL || strcmp(name, "auto") == 0)
    isa = tl_reduce_choose_isa();
  else if (strcmp(name, "generic") == 0)
    isa = 1;
  else if (strcmp(name, "avx2") == 0 && tl_reduce_choose_isa() == 2)
    isa = 2;
  else
    return TL_ERR_UNSUPPORTED;
  __atomic_store_n(&tl_reduce_isa, isa, __ATOMIC_RELAXED);
  return TL_OK;
}
#else
int tl_reduce_select_isa(const char *name) {
  return name == NULL || strcmp(name, "auto") == 0 || strcmp(name, "generic") == 0
             ? TL_OK : TL_ERR_UNSUPPORTED;
}

static const tl_kernel_fn (*tl_reduce_table(void))[TL_NUM_REDOPS] {
  return tl_table_gen;
}
#endif /* TL_REDUCE_X86 */

/* ------------------------------------------------------------------------ */
/* entry point                                                               */
/* ------------------------------------------------------------------------ */

/* True if [p, p+len) and [q, q+len) overlap without being the same range. */
static int tl_partial_overlap(const void *p, const void *q, size_t len) {
  uintptr_t x = (uintptr_t)p, y = (uintptr_t)q;
  if (x == y)
    return 0;
  return x < y ? y - x < len : x - y < len;
}

int tl_reduce(void *dst, const void *a, const void *b, uint64_t count,
              int dtype, int op) {
  if (dtype < 0 || dtype >= TL_NUM_DTYPES || op < 0 || op >= TL_NUM_REDOPS)
    return TL_ERR_INVALID;
  if (count == 0)
    return TL_OK;
  size_t esize = tl_dtype_sizes[dtype];
  if (dst == NULL || a == NULL || b == NULL || count > SIZE_MAX / esize)
    return TL_ERR_INVALID;
  size_t len = (size_t)count * esize;
  if (tl_partial_overlap(dst, a, len) || tl_partial_overlap(dst, b, len))
    return TL_ERR_INVALID;
  tl_reduce_table()[dtype][op](dst, a, b, (size_t)count);
  return TL_OK;
}
