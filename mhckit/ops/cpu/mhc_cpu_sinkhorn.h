/* Part of mhc_cpu_impl.h, instantiated once per floating type (T, FN, W, SB, ... as mhc_cpu.c and the parts before
 * this one define them): the vector types and exp that every part uses, and Sinkhorn-Knopp (Eq. 9) on blocks of
 * tokens: forward, kept-iterate forward, backward. */

/* ---- Sinkhorn on a block of SB tokens: m[i][l] is entry i (row-major n x n) of token lane l ---- */

/* The W lanes of one entry as one vector (GCC / Clang vector extension; unaligned loads allowed):
 * every step below is one vector operation over 8 tokens. IV is the same-size integer vector. */
typedef T FN(vt) __attribute__((vector_size(W * sizeof(T)), aligned(sizeof(T))));
typedef ITYPE FN(iv) __attribute__((vector_size(W * sizeof(T)), aligned(sizeof(T))));
#define VT FN(vt)
#define IV FN(iv)
#define VSEL(mask, a, b) ((VT)(((IV)(a) & (IV)(mask)) | ((IV)(b) & ~(IV)(mask))))
#define VMAX(acc, v) VSEL((v) > (acc), (v), (acc))
#define VLD(p) (*(const VT *)(p)) /* W values from p, any alignment */
#define VST(p, v) (*(VT *)(p) = (v))

#define SK(name) FN(name)
#define SKW W
#include "mhc_cpu_skb.h"
#undef SK
#undef SKW
#define VEXP FN(vexp)

/* The kept-iterate Sinkhorn (the backward's) in SL lanes: with AVX-512 (ZMM, float) one 16-lane vector per
 * entry, the whole block of SB tokens in one walk. Its forward and backward steps are chains of dependent
 * operations (sum -> reciprocal -> scale), so the time per walk is set more by their latency than by
 * the width (measured against two 8-lane walks on an Intel Xeon host, 20 iterations, 1024 tokens, one
 * process: the Sinkhorn backward 0.67-0.91x at n = 4, 0.80x at n = 8; the whole coefficient backward
 * 0.975x at n = 4, C = 64, 0.945x at n = 8, unchanged at C = 512). Bitwise the same results as the
 * 8-lane walk. */
#if ZMM
#define SL MHC_ZMM_LANES
typedef T FN(vt16) __attribute__((vector_size(SL * sizeof(T)), aligned(sizeof(T))));
typedef ITYPE FN(iv16) __attribute__((vector_size(SL * sizeof(T)), aligned(sizeof(T))));
#undef VT
#undef IV
#define VT FN(vt16)
#define IV FN(iv16)
#define SK(name) CAT(FN(name), _x16)
#define SKW SL
#include "mhc_cpu_skb.h"
#undef SK
#undef SKW
#undef VT
#undef IV
#define VT FN(vt)
#define IV FN(iv)
#define SKG(name) CAT(FN(name), _x16)
#define SVT FN(vt16)
#else
#define SL W
#define SKG(name) FN(name)
#define SVT VT
#endif

/* Entry points, n = 4 (the paper's) as its own compile-time copy: skb_fwd2 keeps nothing (rows of SB
 * lanes, HH = 2 vectors of W); skb_fwd / skb_bwd keep the iterates in / read them from the scratch
 * (rows of SL lanes, HH = 1). */
static void FN(skb_fwd2)(T (*m)[SB], int n, int iters) {
    if (n == 4) FN(skb_fwd_n)((VT *)m, 4, 2, iters, NULL, NULL, NULL);
    else FN(skb_fwd_n)((VT *)m, n, 2, iters, NULL, NULL, NULL);
}

static void FN(skb_fwd)(T (*m)[SL], int n, int iters, T (*m0)[SL], T (*ys)[SL], T (*cs)[SL]) {
    if (n == 4) SKG(skb_fwd_n)((SVT *)m, 4, 1, iters, (SVT *)m0, (SVT *)ys, (SVT *)cs);
    else SKG(skb_fwd_n)((SVT *)m, n, 1, iters, (SVT *)m0, (SVT *)ys, (SVT *)cs);
}

static void FN(skb_bwd)(T (*g)[SL], int n, int iters, T (*m0)[SL], T (*ys)[SL], T (*cs)[SL]) {
    if (n == 4) SKG(skb_bwd_n)((SVT *)g, 4, 1, iters, (const SVT *)m0, (const SVT *)ys, (const SVT *)cs);
    else SKG(skb_bwd_n)((SVT *)g, n, 1, iters, (const SVT *)m0, (const SVT *)ys, (const SVT *)cs);
}

/* Per-thread scratch for the backward: m, m0, g, the rows steps' iterates and the signed
 * reciprocals (rows of SL lanes; ~33 KB for n = 4, 20 iterations, float with AVX-512, else ~16 KB). */
typedef struct {
    T (*m)[SL], (*m0)[SL], (*g)[SL], (*ys)[SL], (*cs)[SL];
    T *extra; /* `extra` more values for the caller (the half-precision entry points' converted blocks) */
    void *mem;
} FN(scratch_t);

static int FN(scratch_alloc)(FN(scratch_t) *s, int n, int iters, size_t extra) {
    if (iters < 1) iters = 1; /* the permutation mixture keeps no iterates */
    const size_t nn = (size_t)n * n, steps = 2 * (size_t)iters - 1;
    const size_t rows = nn * (3 + (size_t)iters) + (size_t)n * steps;
    const size_t off = (SL * rows + 15) & ~(size_t)15; /* extra starts on a cache line */
    s->mem = mhc_alloc(sizeof(T) * (off + extra), 0);
    if (!s->mem) return 2;
    T (*base)[SL] = (T (*)[SL])s->mem;
    s->m = base, s->m0 = base + nn, s->g = base + 2 * nn, s->ys = base + 3 * nn, s->cs = s->ys + nn * iters;
    s->extra = (T *)s->mem + off;
    return 0;
}

/* Kept-iterate forward and backward of the tokens [0, lanes) of a block (lanes <= SB), SL at a time:
 * logits row l at lg + l * ld (bias + gate * logits if bias), gradient row l at gr + l * nn ->
 * dlogits row l at out + l * ldo; the recomputed forward output (rows of nn) to hres if not NULL. */
static void FN(skb_grad)(FN(scratch_t) *s, const T *lg, int64_t ld, const T *bias, T gate, const T *gr, T *out,
                         int64_t ldo, T *hres, int lanes, int n, int iters) {
    const int nn = n * n;
    for (int l0 = 0; l0 < lanes; l0 += SL) {
        const int w = lanes - l0 < SL ? lanes - l0 : SL;
#if ZMM /* rows of tokens <-> 16-lane columns by register transposes (zmm_rows_to_cols; absent lanes: 0) */
        for (int c0 = 0; c0 < nn; c0 += 16) {
            const int cols = nn - c0 < 16 ? nn - c0 : 16;
            zmm_rows_to_cols(lg + l0 * ld + c0, ld, w, cols, s->m + c0);
            zmm_rows_to_cols(gr + l0 * nn + c0, nn, w, cols, s->g + c0);
        }
        if (bias)
            for (int i = 0; i < nn; i++) {
                const SVT v = *(const SVT *)s->m[i];
                *(SVT *)s->m[i] = bias[i] + v * gate; /* absent lanes: bias (their results are not written) */
            }
#else
        for (int i = 0; i < nn; i++)
            for (int l = 0; l < SL; l++) {
                const int in = l < w;
                const T v = in ? lg[(l0 + l) * ld + i] : 0;
                s->m[i][l] = in ? (bias ? bias[i] + v * gate : v) : 0;
                s->g[i][l] = in ? gr[(l0 + l) * nn + i] : 0;
            }
#endif
        FN(skb_fwd)(s->m, n, iters, s->m0, s->ys, s->cs);
#if ZMM
        for (int c0 = 0; c0 < nn; c0 += 16) {
            const int cols = nn - c0 < 16 ? nn - c0 : 16;
            if (hres) zmm_cols_to_rows((const float(*)[16])(s->m + c0), cols, hres + l0 * nn + c0, nn, w);
        }
        FN(skb_bwd)(s->g, n, iters, s->m0, s->ys, s->cs);
        for (int c0 = 0; c0 < nn; c0 += 16) {
            const int cols = nn - c0 < 16 ? nn - c0 : 16;
            zmm_cols_to_rows((const float(*)[16])(s->g + c0), cols, out + l0 * ldo + c0, ldo, w);
        }
#else
        if (hres)
            for (int l = 0; l < w; l++)
                for (int i = 0; i < nn; i++) hres[(l0 + l) * nn + i] = s->m[i][l];
        FN(skb_bwd)(s->g, n, iters, s->m0, s->ys, s->cs);
        for (int l = 0; l < w; l++)
            for (int i = 0; i < nn; i++) out[(l0 + l) * ldo + i] = s->g[i][l];
#endif
    }
}

/* The backward kernels' frame: OpenMP threads, each with its own Sinkhorn scratch, run
 * body(ctx, scratch, t0, lanes, thread) over the blocks of SB tokens. The split is static, so the
 * per-thread partial sums (and the results) do not depend on timing. 2 if a scratch allocation failed. */
typedef void (*FN(block_body))(const void *ctx, FN(scratch_t) *s, int64_t t0, int lanes, int me);

static int FN(for_blocks)(int64_t tokens, int n, int iters, int threads, size_t extra, FN(block_body) body,
                          const void *ctx) {
    const int64_t blocks = (tokens + SB - 1) / SB;
    int err = 0;
#pragma omp parallel num_threads(threads)
    {
        FN(scratch_t) s;
#ifdef _OPENMP
        const int me = omp_get_thread_num();
#else
        const int me = 0;
#endif
        const int ok = !FN(scratch_alloc)(&s, n, iters, extra);
        if (!ok) {
            s.mem = NULL;
#pragma omp atomic write
            err = 2;
        }
#pragma omp for schedule(static) /* met by every thread of the team, also one without scratch */
        for (int64_t b = 0; b < blocks; b++)
            if (ok) body(ctx, &s, b * SB, tokens - b * SB < SB ? (int)(tokens - b * SB) : SB, me);
        free(s.mem);
    }
    return err;
}

/* Sinkhorn forward: logits [T, ld] (n*n values per row) -> out [T, n*n]. */
int FN(mhc_sinkhorn_fwd)(const T *logits, int64_t ld, T *out, int64_t tokens, int n, int iters, int threads) {
    if (n < 1 || n > MAXN || iters < 1) return 1;
    const int nn = n * n;
    const int64_t blocks = (tokens + SB - 1) / SB;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        T m[MAXN * MAXN][SB] ALIGNED;
        const int64_t t0 = b * SB;
        const int lanes = tokens - t0 < SB ? (int)(tokens - t0) : SB;
        for (int i = 0; i < nn; i++)
            for (int l = 0; l < SB; l++) m[i][l] = l < lanes ? logits[(t0 + l) * ld + i] : 0;
        FN(skb_fwd2)(m, n, iters);
        for (int l = 0; l < lanes; l++)
            for (int i = 0; i < nn; i++) out[(t0 + l) * nn + i] = m[i][l];
    }
    return 0;
}

/* Sinkhorn backward: logits [T, ld], grad [T, n*n] -> dlogits [T, ldo]. */
typedef struct {
    const T *logits, *grad;
    T *dlogits;
    int64_t ld, ldo;
    int n, iters;
} FN(skb_bwd_ctx);

static void FN(skb_bwd_body)(const void *ctx, FN(scratch_t) *s, int64_t t0, int lanes, int me) {
    const FN(skb_bwd_ctx) *c = ctx;
    (void)me;
    FN(skb_grad)(s, c->logits + t0 * c->ld, c->ld, NULL, 0, c->grad + t0 * c->n * c->n, c->dlogits + t0 * c->ldo,
                 c->ldo, NULL, lanes, c->n, c->iters);
}

int FN(mhc_sinkhorn_bwd)(const T *logits, int64_t ld, const T *grad, T *dlogits, int64_t ldo, int64_t tokens, int n,
                         int iters, int threads) {
    if (n < 1 || n > MAXN || iters < 1) return 1;
    const FN(skb_bwd_ctx) c = {logits, grad, dlogits, ld, ldo, n, iters};
    return FN(for_blocks)(tokens, n, iters, threads, 0, FN(skb_bwd_body), &c);
}
