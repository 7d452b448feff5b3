/* mhckit CPU kernels: the mHC coefficients (Eq. 7-9: RMS, projection, gates, Sinkhorn) with the branch
 * read, and the stream read / write-back (Eq. 3), forward and backward; arXiv 2512.24880.
 *
 * Built at first use by mhckit/ops/cpu/__init__.py with the system C compiler and loaded with
 * ctypes (no Python headers, no torch headers). Every function works token by token on small
 * per-token blocks (n <= 8 streams: 2n + n^2 <= 80 values), so the whole 20-iteration Sinkhorn
 * stays in L1 and runs as one pass over the tokens instead of ~120 (forward) / ~400 (backward)
 * whole-tensor PyTorch ops.
 *
 * The arithmetic follows mhckit/ops/autograd.py (which follows mhckit/reference.py) operation by
 * operation: softmax over each column first (= exp + the first column normalisation), then
 * alternating row / column normalisations with divisors clamped at `tiny` (FLT_MIN / DBL_MIN),
 * rows last. The backward recomputes the iterates per token and walks them in reverse:
 *     y = x / c, c = sum_d(x)   =>  dL/dx = (g - [c unclamped] * sum_d(g * y)) / c
 *     M = softmax_col(L)        =>  dL/dL = M * (g - sum_col(g * M))
 * keeping per block only the rows steps' iterates and every step's reciprocal divisor (its sign
 * bit marks a clamped one); a columns step's iterate is recomputed as rows iterate x reciprocal,
 * the same product as in the forward, so the gradient uses bitwise the forward's iterates.
 *
 * Tokens are processed in blocks of W = 8 lanes (entry i of an n x n block for 8 tokens side by
 * side), so that every step of the Sinkhorn is an 8-wide vector operation, divisions included; the
 * forward without kept iterates runs two such blocks side by side (SB = 16 tokens) to hide the
 * latency of each step's sum -> divide -> scale chain.
 * The coefficient kernels (mhc_coeffs_fwd / _bwd) work on blocks of SB tokens: the block's stream
 * rows are read from memory once and the projection matmuls, the tail and the read run on them from
 * cache (matmuls as 4-token x 24-column register blocks; per-thread dphi summed at the end). The
 * backward can also take the output gradient of the sublayer's write-back and then produces that
 * write-back's dx and dh_res in the same pass (see mhckit/ops/carry.py, CoeffsCarryFunction).
 *
 * Layout: token t's K = 2n + n^2 coefficient logits at row t of a [T, ld] array:
 *     [pre (n) | post (n) | res (n x n, row k = output stream, col j = input stream)].
 * Gates: a = bias + gate * z with gate = alpha_pre | alpha_post | alpha_res per slice.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAXN 8 /* streams */
#define W 8    /* vector lanes; the shuffles in FN(reduce8) assume 8 */
#define HH_ 2  /* vectors per Sinkhorn entry in the forward that keeps nothing */
#define SB (HH_ * W) /* tokens per block of the coefficient kernels */
#define ALIGNED __attribute__((aligned(64))) /* a cache line: no W-lane vector straddles two */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUFFIX)
/* n = 4 with a compile-time n, other n generic: CALL_N(f, n, args...) expands to the right call
 * (the per-token functions take n and C last; C must be in scope) */
#define CALL_N(f, n, ...) ((n) == 4 ? f(__VA_ARGS__, 4, C) : f(__VA_ARGS__, (n), C))

/* Heap blocks aligned like ALIGNED. malloc guarantees 16 bytes; the OpenMP worker's per-thread Sinkhorn
 * scratch then had most of its 32-byte vectors across two cache lines, and the 2-thread kept-iterate
 * Sinkhorn took 1.7x as long as with aligned scratch (how often depended on the heap's state).
 * Zeroed if `zero`. */
static void *mhc_alloc(size_t bytes, int zero) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64)) return NULL;
    if (zero) memset(p, 0, bytes);
    return p;
}

#define T float
#define SUFFIX _f32
#define TINY FLT_MIN
#define EXP expf
#define ITYPE int32_t
#define VEXP_POLY 1
#include "mhc_cpu_impl.h" /* undefines T, SUFFIX, TINY, EXP, ITYPE, VEXP_POLY */

#define T double
#define SUFFIX _f64
#define TINY DBL_MIN
#define EXP exp
#define ITYPE int64_t
#define VEXP_POLY 0
#include "mhc_cpu_impl.h" /* undefines T, SUFFIX, TINY, EXP, ITYPE, VEXP_POLY */

/* ---- half-precision streams: 2-byte storage, float arithmetic (mhc_cpu_half.h) ---- */

/* bfloat16: the top 16 bits of a float; float -> bfloat16 rounds to nearest even, NaN -> 0x7FC0
 * (as c10::BFloat16 does, so that the results equal PyTorch's `.to(torch.bfloat16)`). Vector
 * extensions for 8 values at a time (memcpy: any alignment, no aliasing questions). */
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));

static void bf16_in(const uint16_t *restrict s, float *restrict d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        u16x8 h;
        memcpy(&h, s + i, sizeof h);
        const f32x8 f = (f32x8)(__builtin_convertvector(h, u32x8) << 16);
        memcpy(d + i, &f, sizeof f);
    }
    for (; i < n; i++) {
        const uint32_t u = (uint32_t)s[i] << 16;
        memcpy(d + i, &u, sizeof u);
    }
}

static inline uint16_t bf16_round1(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return f != f ? 0x7FC0 : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static void bf16_out(const float *restrict s, uint16_t *restrict d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        f32x8 f;
        memcpy(&f, s + i, sizeof f);
        const u32x8 u = (u32x8)f, nan = (u32x8)(f != f);
        const u32x8 r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 & ~nan) | (0x7FC0 & nan);
        const u16x8 h = __builtin_convertvector(r, u16x8);
        memcpy(d + i, &h, sizeof h);
    }
    for (; i < n; i++) d[i] = bf16_round1(s[i]);
}

#define HSUF _bf16
#define CVT_IN bf16_in
#define CVT_OUT bf16_out
#include "mhc_cpu_half.h"

/* float16 (IEEE binary16) through the compiler's _Float16 (F16C instructions where enabled). */
#ifdef __FLT16_MAX__
#define MHC_HAVE_F16 1
static void f16_in(const uint16_t *restrict s, float *restrict d, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        _Float16 h;
        memcpy(&h, s + i, sizeof h);
        d[i] = (float)h;
    }
}

static void f16_out(const float *restrict s, uint16_t *restrict d, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const _Float16 h = (_Float16)s[i];
        memcpy(d + i, &h, sizeof h);
    }
}

#define HSUF _f16
#define CVT_IN f16_in
#define CVT_OUT f16_out
#include "mhc_cpu_half.h"
#else
#define MHC_HAVE_F16 0
#endif

/* which stream formats this build has: bit 0 bfloat16, bit 1 float16 */
int mhc_half_formats(void) { return 1 | (MHC_HAVE_F16 << 1); }

int mhc_abi_version(void) { return 6; }

int mhc_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
