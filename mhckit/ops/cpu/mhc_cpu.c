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
 * latency of each step's sum -> divide -> scale chain; the backward's kept-iterate walk runs all 16
 * in one 16-lane vector per entry where the build targets AVX-512 (float32; bitwise the 8-lane walk's
 * results, every step being lane-wise).
 * The coefficient kernels (mhc_coeffs_fwd / _bwd) work on blocks of SB tokens: the block's stream
 * rows are read from memory once and the projection matmuls, the tail and the read run on them from
 * cache (matmuls as 4-token x 24-column register blocks, or 16-lane AVX-512 blocks for float32 where
 * the build targets AVX-512; per-thread dphi summed at the end). The
 * backward can also take the output gradient of the sublayer's write-back and then produces that
 * write-back's dx and dh_res in the same pass (see mhckit/ops/carry.py, CoeffsCarryFunction).
 * Where the float32 build targets AVX-512, a block's per-token rows of coefficient values (z, the
 * gradients of h_pre / h_post / h_res, and back: h_*, da) become 16-lane columns and back by register
 * transposes (zmm_rows_to_cols / zmm_cols_to_rows) rather than one value at a time, and the per-token
 * stream functions walk C in 16-lane vectors (mhc_cpu_stream.h).
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

/* Prefetch `bytes` from p into L2 (one hint per cache line); NULL: nothing. The streams of a
 * training step are cold by the time a kernel reads them (the branch between two reads of x evicts
 * them from L2), and the hardware prefetcher stops at every 4 KiB page (4 tokens of a [T, 4, 64]
 * float stream): the write-back asks for the rows PF_TOKENS tokens ahead, the coefficient backward
 * for the next block's rows one token at a time, spread over the block (a burst of a whole block's
 * ~800 lines before it stalled the core: with it the backward took ~4 % longer on the Intel host).
 * The coefficient forward asks for nothing: its x was just written by the previous write-back. */
#define PF_TOKENS 8 /* tokens ahead that the per-token kernels prefetch */
static inline __attribute__((always_inline)) void mhc_prefetch(const void *p, size_t bytes) {
    if (!p) return;
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 2);
}
static inline __attribute__((always_inline)) void mhc_prefetch_w(void *p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch((char *)p + o, 1, 2);
}

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

/* The coefficient kernels' `iters`: > 0, Sinkhorn with that many iterations (mHC, Eq. 9); or
 * MHC_PERMUTATIONS: h_res = sum_p softmax(a_res)_p P_p over the n! permutation matrices (mHC-lite,
 * arXiv 2601.05732), for n <= MAXN_PERM, in itertools.permutations order (P_p[k][perm_p[k]] = 1); or
 * MHC_IDENTITY: h_res = I, no logits for it (the identity / iHC ablation): the kernels then take and
 * write no h_res (NULL), and a NULL h_res in the write-back and in the stream gradient means I
 * (x_new[k] = x[k] + h_post[k] y; dx[j] gets g[j]), not a product with a unit matrix.
 * The logits of h_res are n^2, n! or 0 columns: K = 2n + mhc_kres(n, iters). */
#define MHC_PERMUTATIONS (-1)
#define MHC_IDENTITY (-2)
#define MAXN_PERM 4
#define MAXP 24 /* 4! */

static int mhc_kres(int n, int iters) {
    if (iters == MHC_IDENTITY) return 0;
    if (iters != MHC_PERMUTATIONS) return n * n;
    int f = 1;
    for (int i = 2; i <= n; i++) f *= i;
    return f;
}

/* whether the coefficient kernels take (n, iters) */
static int mhc_tail_ok(int n, int iters) {
    return n >= 1 && n <= MAXN && (iters >= 1 || iters == MHC_IDENTITY || (iters == MHC_PERMUTATIONS && n <= MAXN_PERM));
}

/* the n! permutations of 0..n-1 in lexicographic (itertools) order; returns n! */
static int mhc_perm_table(int n, unsigned char pt[MAXP][MAXN_PERM]) {
    unsigned char a[MAXN_PERM];
    int count = 0;
    for (int i = 0; i < n; i++) a[i] = (unsigned char)i;
    for (;;) {
        memcpy(pt[count++], a, (size_t)n);
        int i = n - 2;
        while (i >= 0 && a[i] > a[i + 1]) i--;
        if (i < 0) return count;
        int j = n - 1;
        while (a[j] < a[i]) j--;
        unsigned char t = a[i];
        a[i] = a[j], a[j] = t;
        for (int l = i + 1, r = n - 1; l < r; l++, r--) t = a[l], a[l] = a[r], a[r] = t;
    }
}

/* ---- AVX-512 register blocks for the three float32 matmuls with phi (where the compiler targets it) ----
 * The portable kernels below run these matmuls in 8-lane vectors (4 tokens x 24 columns of
 * accumulators); with 16-lane vectors and 32 registers each FMA does twice the work. Used by the
 * float instantiation only (float64 is for checks). Each block sums every output in the portable
 * code's order (one FMA per term); an AVX2 build still differs by rounding, because the compiler
 * contracts some scalar code elsewhere (e.g. the RMS dot product's tail) differently per ISA. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define MHC_ZMM 1
#define MHC_ZMM_LANES 16 /* float32 lanes of a 512-bit vector */

/* z rows (ld K) of 8 tokens (rows xr[0..8), ld nC) = (x @ phiP) / r over the NCOL = 24, 16 or 8 columns
 * [kb, kb + NCOL) of phiP (ld KP): per phi row a 16-lane and / or an 8-lane load and 8 broadcasts for 8
 * or 16 FMAs. The narrower blocks serve the last columns when K is not a multiple of 24 (mHC-lite's 32
 * logits at n = 4: 24 + 8, not 2 x 24). */
static inline __attribute__((always_inline)) void zmm_project8(const float *const xr[8], int64_t nC, const float *phiP,
                                                                int KP, int kb, const float *rr, float *z, int K,
                                                                int tokens, const int NCOL) {
    const int wide = NCOL >= 16, narrow = NCOL != 16; /* a 16-lane and / or an 8-lane part */
    __m512 a[8];
    __m256 b[8];
    for (int t = 0; t < 8; t++) a[t] = _mm512_setzero_ps(), b[t] = _mm256_setzero_ps();
    const float *ph = phiP + kb;
    for (int64_t i = 0; i < nC; i++, ph += KP) {
        const __m512 p0 = wide ? _mm512_loadu_ps(ph) : _mm512_setzero_ps();
        const __m256 p1 = narrow ? _mm256_loadu_ps(ph + (wide ? 16 : 0)) : _mm256_setzero_ps();
        for (int t = 0; t < 8; t++) {
            const __m512 v = _mm512_set1_ps(xr[t][i]);
            if (wide) a[t] = _mm512_fmadd_ps(v, p0, a[t]);
            if (narrow) b[t] = _mm256_fmadd_ps(_mm512_castps512_ps256(v), p1, b[t]);
        }
    }
    for (int t = 0; t < tokens; t++) {
        float out[24] __attribute__((aligned(64)));
        if (wide) _mm512_store_ps(out, _mm512_div_ps(a[t], _mm512_set1_ps(rr[t])));
        if (narrow) _mm256_store_ps(out + (wide ? 16 : 0), _mm256_div_ps(b[t], _mm256_set1_ps(rr[t])));
        for (int l = 0; l < NCOL && kb + l < K; l++) z[t * K + kb + l] = out[l];
    }
}

/* z rows of `lanes` tokens = (x rows @ phiP) / r, phiP [nC, KP] with KP a multiple of 24: blocks of 24
 * columns, the last one 8 or 16 wide when that covers the rest of K */
static void zmm_project(const float *x, int64_t nC, const float *phiP, int KP, const float *r, float *z, int K,
                        int lanes) {
    for (int t0 = 0; t0 < lanes; t0 += 8) {
        const float *xr[8];
        const int tokens = lanes - t0 < 8 ? lanes - t0 : 8;
        for (int t = 0; t < 8; t++) xr[t] = x + (t0 + (t < tokens ? t : tokens - 1)) * nC;
        for (int kb = 0; kb < K; kb += 24) {
            if (K - kb <= 8) zmm_project8(xr, nC, phiP, KP, kb, r + t0, z + t0 * K, K, tokens, 8);
            else if (K - kb <= 16) zmm_project8(xr, nC, phiP, KP, kb, r + t0, z + t0 * K, K, tokens, 16);
            else zmm_project8(xr, nC, phiP, KP, kb, r + t0, z + t0 * K, K, tokens, 24);
        }
    }
}

/* dT[k][i] (ld nC) += sum_{t < lanes} G[t][k] x[t][i] for NK columns k0.. of G (ld KP) and NQ vectors of
 * 16 from i: the NK x NQ tile of dT stays in registers over the tokens (3 loads of x and NK
 * broadcasts per 3 NK FMAs). Per output the tokens are summed in order. */
static inline __attribute__((always_inline)) void zmm_dphi_tile(const float *x, int64_t nC, const float *G, int KP,
                                                                 int k0, const int NK, int64_t i, const int NQ,
                                                                 int lanes, float *dT) {
    __m512 acc[4][3];
    for (int k = 0; k < NK; k++)
        for (int q = 0; q < NQ; q++) acc[k][q] = _mm512_loadu_ps(dT + (k0 + k) * nC + i + 16 * q);
    for (int t = 0; t < lanes; t++) {
        __m512 xv[3];
        for (int q = 0; q < NQ; q++) xv[q] = _mm512_loadu_ps(x + t * nC + i + 16 * q);
        for (int k = 0; k < NK; k++) {
            const __m512 g = _mm512_set1_ps(G[t * KP + k0 + k]);
            for (int q = 0; q < NQ; q++) acc[k][q] = _mm512_fmadd_ps(g, xv[q], acc[k][q]);
        }
    }
    for (int k = 0; k < NK; k++)
        for (int q = 0; q < NQ; q++) _mm512_storeu_ps(dT + (k0 + k) * nC + i + 16 * q, acc[k][q]);
}

static inline __attribute__((always_inline)) void zmm_dphi_cols(const float *x, int64_t nC, const float *G, int KP,
                                                                 int K, int64_t i, const int NQ, int lanes, float *dT) {
    int k0 = 0;
    for (; k0 + 4 <= K; k0 += 4) zmm_dphi_tile(x, nC, G, KP, k0, 4, i, NQ, lanes, dT);
    for (; k0 < K; k0++) zmm_dphi_tile(x, nC, G, KP, k0, 1, i, NQ, lanes, dT);
}

/* dT [K, nC] += G^T x for `lanes` tokens (x rows ld nC, G rows ld KP) */
static void zmm_dphi(const float *x, int64_t nC, const float *G, int KP, int K, int lanes, float *dT) {
    int64_t i = 0;
    for (; i + 48 <= nC; i += 48) zmm_dphi_cols(x, nC, G, KP, K, i, 3, lanes, dT);
    for (; i + 16 <= nC; i += 16) zmm_dphi_cols(x, nC, G, KP, K, i, 1, lanes, dT);
    for (; i < nC; i++)
        for (int k = 0; k < K; k++) {
            float a = dT[k * nC + i];
            for (int t = 0; t < lanes; t++) a += G[t * KP + k] * x[t * nC + i];
            dT[k * nC + i] = a;
        }
}

/* gx rows gr[0..NT) += G @ phi^T over NQ vectors of 16 from i (phiT [K, nC], G rows ld KP): per column
 * k, NQ loads of phiT and NT broadcasts for NQ NT FMAs; per output the columns are summed in order,
 * as the portable gx_chunk does. */
static inline __attribute__((always_inline)) void zmm_gx_tile(float *const *gr, const float *G, int KP,
                                                               const float *phiT, int K, int64_t nC, int64_t i,
                                                               const int NQ, const int NT) {
    __m512 acc[4][3];
    for (int t = 0; t < NT; t++)
        for (int q = 0; q < NQ; q++) acc[t][q] = _mm512_loadu_ps(gr[t] + i + 16 * q);
    for (int k = 0; k < K; k++) {
        __m512 p[3];
        for (int q = 0; q < NQ; q++) p[q] = _mm512_loadu_ps(phiT + k * nC + i + 16 * q);
        for (int t = 0; t < NT; t++) {
            const __m512 g = _mm512_set1_ps(G[t * KP + k]);
            for (int q = 0; q < NQ; q++) acc[t][q] = _mm512_fmadd_ps(g, p[q], acc[t][q]);
        }
    }
    for (int t = 0; t < NT; t++)
        for (int q = 0; q < NQ; q++) _mm512_storeu_ps(gr[t] + i + 16 * q, acc[t][q]);
}

/* gx rows (NT = 4 or 1 tokens, ld nC) += G @ phi^T: chunks of 48, then 16, then scalars */
static inline __attribute__((always_inline)) void zmm_gx(float *const *gr, const float *G, int KP, const float *phiT,
                                                          int K, int64_t nC, const int NT) {
    int64_t i = 0;
    for (; i + 48 <= nC; i += 48) zmm_gx_tile(gr, G, KP, phiT, K, nC, i, 3, NT);
    for (; i + 16 <= nC; i += 16) zmm_gx_tile(gr, G, KP, phiT, K, nC, i, 1, NT);
    for (; i < nC; i++)
        for (int t = 0; t < NT; t++) {
            float a = gr[t][i];
            for (int k = 0; k < K; k++) a += G[t * KP + k] * phiT[k * nC + i];
            gr[t][i] = a;
        }
}

/* The 16 x 16 block r[0..16) of floats transposed in registers (r[i][j] <- r[j][i]): 32-bit and 64-bit
 * interleaves within 128-bit lanes, then two rounds of 128-bit lane shuffles; 64 shuffles in all, where
 * moving the 256 values one at a time takes 512 scalar loads and stores. */
static inline __attribute__((always_inline)) void zmm_transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) { /* t[2i]: per 128-bit lane k, r[2i][4k], r[2i+1][4k], r[2i][4k+1], r[2i+1][4k+1] */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int b = 0; b < 4; b++) { /* r[4b + c], lane k: rows 4b .. 4b + 3 of column 4k + c */
        const __m512d t0 = _mm512_castps_pd(t[4 * b]), t1 = _mm512_castps_pd(t[4 * b + 1]);
        const __m512d t2 = _mm512_castps_pd(t[4 * b + 2]), t3 = _mm512_castps_pd(t[4 * b + 3]);
        r[4 * b] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
        r[4 * b + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        r[4 * b + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        r[4 * b + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    for (int c = 0; c < 4; c++) { /* column 4k + c = lane k of r[c], r[4 + c], r[8 + c], r[12 + c] */
        const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
        const __m512 w0 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
        const __m512 w1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
        t[c] = _mm512_shuffle_f32x4(v0, w0, 0x88), t[4 + c] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
        t[8 + c] = _mm512_shuffle_f32x4(v1, w1, 0x88), t[12 + c] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* dst[c][l] = src[l * ld + c] for the rows l < rows (zeros beyond) and columns c < cols <= 16 of a block of
 * 16 rows (the tokens of a kernel block: per-token rows of coefficients -> one 16-lane vector per column) */
static inline __attribute__((always_inline)) void zmm_rows_to_cols(const float *src, int64_t ld, int rows, int cols,
                                                                   float (*dst)[16]) {
    const __mmask16 m = (__mmask16)((1u << cols) - 1);
    __m512 r[16];
    for (int l = 0; l < 16; l++) r[l] = l < rows ? _mm512_maskz_loadu_ps(m, src + l * ld) : _mm512_setzero_ps();
    zmm_transpose16(r);
    for (int c = 0; c < cols; c++) _mm512_storeu_ps(dst[c], r[c]);
}

/* dst[l * ld + c] = src[c][l] for l < rows, c < cols <= 16 (the reverse of zmm_rows_to_cols) */
static inline __attribute__((always_inline)) void zmm_cols_to_rows(const float (*src)[16], int cols, float *dst,
                                                                   int64_t ld, int rows) {
    const __mmask16 m = (__mmask16)((1u << cols) - 1);
    __m512 r[16];
    for (int c = 0; c < 16; c++) r[c] = c < cols ? _mm512_loadu_ps(src[c]) : _mm512_setzero_ps();
    zmm_transpose16(r);
    for (int l = 0; l < rows; l++) _mm512_mask_storeu_ps(dst + l * ld, m, r[l]);
}

/* dst[c * ldd + i] = src[i * cols + c]: src [rows, cols] row-major to [cols, rows] (row stride ldd), 16 x 16
 * tiles through the register transpose (the coefficient backward's phi^T: 6144 values at n = 4, C = 64, a
 * scalar loop's strided stores took longer than the rest of its serial part) */
static void zmm_transpose_to(const float *src, int64_t rows, int cols, float *dst, int64_t ldd) {
    float tmp[16][16] __attribute__((aligned(64)));
    for (int64_t i0 = 0; i0 < rows; i0 += 16) {
        const int w = rows - i0 < 16 ? (int)(rows - i0) : 16;
        const __mmask16 m = (__mmask16)((1u << w) - 1);
        for (int c0 = 0; c0 < cols; c0 += 16) {
            const int cc = cols - c0 < 16 ? cols - c0 : 16;
            zmm_rows_to_cols(src + i0 * cols + c0, cols, w, cc, tmp);
            for (int c = 0; c < cc; c++) _mm512_mask_storeu_ps(dst + (c0 + c) * ldd + i0, m, _mm512_load_ps(tmp[c]));
        }
    }
}

/* dst [rows, cols] (row-major) = sum over p < parts of src + p * pstride, each [cols, rows] (row stride
 * rows), summed in the order p = 0, 1, ... from 0 as a scalar loop would: the per-thread dphi parts of
 * the coefficient backward, summed and transposed to phi's layout in 16 x 16 tiles */
static void zmm_sum_transpose(const float *src, int parts, int64_t pstride, int64_t rows, int cols, float *dst) {
    float tmp[2 * MAXN + MAXN * MAXN][16] __attribute__((aligned(64)));
    for (int64_t i0 = 0; i0 < rows; i0 += 16) {
        const int w = rows - i0 < 16 ? (int)(rows - i0) : 16;
        const __mmask16 m = (__mmask16)((1u << w) - 1);
        for (int c = 0; c < cols; c++) {
            __m512 v = _mm512_setzero_ps();
            for (int p = 0; p < parts; p++) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, src + p * pstride + c * rows + i0));
            _mm512_store_ps(tmp[c], v);
        }
        for (int c0 = 0; c0 < cols; c0 += 16)
            zmm_cols_to_rows((const float(*)[16])tmp[c0], cols - c0 < 16 ? cols - c0 : 16, dst + i0 * cols + c0, cols, w);
    }
}
#else
#define MHC_ZMM 0
#endif

#define T float
#define SUFFIX _f32
#define ZMM MHC_ZMM /* the float instantiation uses the AVX-512 blocks above */
#define TINY FLT_MIN
#define EXP expf
#define TANH tanhf
#define ITYPE int32_t
#define VEXP_POLY 1
#include "mhc_cpu_impl.h" /* undefines T, SUFFIX, TINY, EXP, ITYPE, VEXP_POLY */

#define T double
#define SUFFIX _f64
#define ZMM 0
#define TINY DBL_MIN
#define EXP exp
#define TANH tanh
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

int mhc_abi_version(void) { return 11; }

/* 1 if the float32 matmuls with phi run in the AVX-512 blocks */
int mhc_avx512_matmuls(void) { return MHC_ZMM; }

/* tokens per vector of the float32 kept-iterate Sinkhorn (the backward's; mhc_cpu_sinkhorn.h) */
int mhc_sinkhorn_lanes(void) {
#if MHC_ZMM
    return MHC_ZMM_LANES;
#else
    return W;
#endif
}

int mhc_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
