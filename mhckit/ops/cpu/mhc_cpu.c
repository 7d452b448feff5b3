/* mhckit CPU kernels: the per-token tail of the mHC coefficients (mHC Eq. 8-9, arXiv 2512.24880).
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

#define MAXN 8

#define DEFINE_KERNELS(T, SUF, TINY, EXP)                                                              \
                                                                                                       \
    /* Sinkhorn on one n x n block m (row-major), in place after the softmax of `logits`.           \
       keep (optional): per step s (0 .. 2 iters - 2) the iterate y_s (n*n), the divisor c_s (n) and \
       the mask ok_s (n); m0 (optional) receives the softmax output. */                              \
    static void sk_one_##SUF(const T *logits, T *m, int n, int iters, T *m0, T *ys, T *cs,           \
                             unsigned char *oks) {                                                     \
        for (int j = 0; j < n; j++) {                                                                  \
            T mx = logits[j];                                                                          \
            for (int k = 1; k < n; k++) mx = logits[k * n + j] > mx ? logits[k * n + j] : mx;          \
            T s = 0;                                                                                   \
            for (int k = 0; k < n; k++) {                                                              \
                T e = EXP(logits[k * n + j] - mx);                                                     \
                m[k * n + j] = e;                                                                      \
                s += e;                                                                                \
            }                                                                                          \
            for (int k = 0; k < n; k++) m[k * n + j] /= s;                                             \
        }                                                                                              \
        if (m0) memcpy(m0, m, sizeof(T) * n * n);                                                      \
        int steps = 2 * iters - 1;                                                                     \
        for (int st = 0; st < steps; st++) {                                                           \
            T c[MAXN];                                                                                 \
            unsigned char ok[MAXN];                                                                    \
            if (st % 2 == 0) { /* rows: sum over j */                                                  \
                for (int k = 0; k < n; k++) {                                                          \
                    T s = 0;                                                                           \
                    for (int j = 0; j < n; j++) s += m[k * n + j];                                     \
                    ok[k] = s >= TINY;                                                                 \
                    c[k] = ok[k] ? s : TINY;                                                           \
                    for (int j = 0; j < n; j++) m[k * n + j] /= c[k];                                  \
                }                                                                                      \
            } else { /* columns: sum over k */                                                         \
                for (int j = 0; j < n; j++) {                                                          \
                    T s = 0;                                                                           \
                    for (int k = 0; k < n; k++) s += m[k * n + j];                                     \
                    ok[j] = s >= TINY;                                                                 \
                    c[j] = ok[j] ? s : TINY;                                                           \
                    for (int k = 0; k < n; k++) m[k * n + j] /= c[j];                                  \
                }                                                                                      \
            }                                                                                          \
            if (ys) {                                                                                  \
                memcpy(ys + (size_t)st * n * n, m, sizeof(T) * n * n);                                 \
                memcpy(cs + (size_t)st * n, c, sizeof(T) * n);                                         \
                memcpy(oks + (size_t)st * n, ok, n);                                                   \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    /* Reverse walk: g (n*n, in place) -> dL/dlogits. */                                              \
    static void sk_bwd_one_##SUF(T *g, int n, int iters, const T *m0, const T *ys, const T *cs,      \
                                 const unsigned char *oks) {                                           \
        int steps = 2 * iters - 1;                                                                     \
        for (int st = steps - 1; st >= 0; st--) {                                                      \
            const T *y = ys + (size_t)st * n * n, *c = cs + (size_t)st * n;                            \
            const unsigned char *ok = oks + (size_t)st * n;                                            \
            if (st % 2 == 0) {                                                                         \
                for (int k = 0; k < n; k++) {                                                          \
                    T d = 0;                                                                           \
                    for (int j = 0; j < n; j++) d += g[k * n + j] * y[k * n + j];                      \
                    if (!ok[k]) d = 0;                                                                 \
                    for (int j = 0; j < n; j++) g[k * n + j] = (g[k * n + j] - d) / c[k];              \
                }                                                                                      \
            } else {                                                                                   \
                for (int j = 0; j < n; j++) {                                                          \
                    T d = 0;                                                                           \
                    for (int k = 0; k < n; k++) d += g[k * n + j] * y[k * n + j];                      \
                    if (!ok[j]) d = 0;                                                                 \
                    for (int k = 0; k < n; k++) g[k * n + j] = (g[k * n + j] - d) / c[j];              \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
        for (int j = 0; j < n; j++) {                                                                  \
            T d = 0;                                                                                   \
            for (int k = 0; k < n; k++) d += g[k * n + j] * m0[k * n + j];                             \
            for (int k = 0; k < n; k++) g[k * n + j] = m0[k * n + j] * (g[k * n + j] - d);             \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    /* Sinkhorn forward: logits [T, ld] (n*n values per row) -> out [T, n*n]. */                      \
    int mhc_sinkhorn_fwd_##SUF(const T *logits, int64_t ld, T *out, int64_t tokens, int n, int iters,  \
                               int threads) {                                                          \
        if (n < 1 || n > MAXN || iters < 1) return 1;                                                  \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
        for (int64_t t = 0; t < tokens; t++)                                                           \
            sk_one_##SUF(logits + t * ld, out + t * n * n, n, iters, NULL, NULL, NULL, NULL);         \
        return 0;                                                                                      \
    }                                                                                                  \
                                                                                                       \
    /* Sinkhorn backward: logits [T, ld], grad [T, n*n] -> dlogits [T, ldo] (may alias nothing). */    \
    int mhc_sinkhorn_bwd_##SUF(const T *logits, int64_t ld, const T *grad, T *dlogits, int64_t ldo,    \
                               int64_t tokens, int n, int iters, int threads) {                        \
        if (n < 1 || n > MAXN || iters < 1) return 1;                                                  \
        int err = 0;                                                                                   \
        _Pragma("omp parallel num_threads(threads)") {                                                 \
            size_t steps = 2 * (size_t)iters - 1, nn = (size_t)n * n;                                  \
            T *buf = (T *)malloc(sizeof(T) * (nn * (steps + 2) + n * steps));                          \
            unsigned char *oks = (unsigned char *)malloc(n * steps);                                   \
            if (!buf || !oks) {                                                                        \
                _Pragma("omp atomic write") err = 2;                                                   \
            } else {                                                                                   \
                T *m = buf, *m0 = buf + nn, *ys = buf + 2 * nn, *cs = ys + nn * steps;                 \
                _Pragma("omp for schedule(static)")                                                   \
                for (int64_t t = 0; t < tokens; t++) {                                                 \
                    sk_one_##SUF(logits + t * ld, m, n, iters, m0, ys, cs, oks);                       \
                    T *g = dlogits + t * ldo;                                                          \
                    memcpy(g, grad + t * nn, sizeof(T) * nn);                                          \
                    sk_bwd_one_##SUF(g, n, iters, m0, ys, cs, oks);                                    \
                }                                                                                      \
            }                                                                                          \
            free(buf);                                                                                 \
            free(oks);                                                                                 \
        }                                                                                              \
        return err;                                                                                    \
    }                                                                                                  \
                                                                                                       \
    /* Coefficient tail forward: z [T, K] (K = 2n + n^2), bias [K], gates (3) ->                      \
       h_pre [T, n] = sigmoid(a_pre), h_post [T, n] = 2 sigmoid(a_post), h_res [T, n*n]. */           \
    int mhc_tail_fwd_##SUF(const T *z, const T *bias, const T *gates, T *h_pre, T *h_post, T *h_res,   \
                           int64_t tokens, int n, int iters, int threads) {                            \
        if (n < 1 || n > MAXN || iters < 1) return 1;                                                  \
        const int K = 2 * n + n * n;                                                                   \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
        for (int64_t t = 0; t < tokens; t++) {                                                         \
            const T *zt = z + t * K;                                                                   \
            T a[MAXN * MAXN];                                                                          \
            for (int i = 0; i < n; i++) {                                                              \
                h_pre[t * n + i] = 1 / (1 + EXP(-(bias[i] + zt[i] * gates[0])));                       \
                h_post[t * n + i] = 2 * (1 / (1 + EXP(-(bias[n + i] + zt[n + i] * gates[1]))));         \
            }                                                                                          \
            for (int i = 0; i < n * n; i++) a[i] = bias[2 * n + i] + zt[2 * n + i] * gates[2];         \
            sk_one_##SUF(a, h_res + t * n * n, n, iters, NULL, NULL, NULL, NULL);                      \
        }                                                                                              \
        return 0;                                                                                      \
    }                                                                                                  \
                                                                                                       \
    /* Coefficient tail backward: da [T, K] = dL/da from the gradients of h_pre, h_post, h_res      \
       (any of them may be NULL: zero gradient). */                                                   \
    int mhc_tail_bwd_##SUF(const T *z, const T *bias, const T *gates, const T *g_pre, const T *g_post, \
                           const T *g_res, T *da, int64_t tokens, int n, int iters, int threads) {      \
        if (n < 1 || n > MAXN || iters < 1) return 1;                                                  \
        const int K = 2 * n + n * n;                                                                   \
        int err = 0;                                                                                   \
        _Pragma("omp parallel num_threads(threads)") {                                                 \
            size_t steps = 2 * (size_t)iters - 1, nn = (size_t)n * n;                                  \
            T *buf = (T *)malloc(sizeof(T) * (nn * (steps + 3) + n * steps));                          \
            unsigned char *oks = (unsigned char *)malloc(n * steps);                                   \
            if (!buf || !oks) {                                                                        \
                _Pragma("omp atomic write") err = 2;                                                   \
            } else {                                                                                   \
                T *m = buf, *m0 = buf + nn, *a = buf + 2 * nn, *ys = buf + 3 * nn;                     \
                T *cs = ys + nn * steps;                                                               \
                _Pragma("omp for schedule(static)")                                                   \
                for (int64_t t = 0; t < tokens; t++) {                                                 \
                    const T *zt = z + t * K;                                                           \
                    T *dat = da + t * K;                                                               \
                    for (int i = 0; i < n; i++) {                                                      \
                        T s = 1 / (1 + EXP(-(bias[i] + zt[i] * gates[0])));                            \
                        dat[i] = g_pre ? g_pre[t * n + i] * s * (1 - s) : 0;                           \
                        s = 1 / (1 + EXP(-(bias[n + i] + zt[n + i] * gates[1])));                      \
                        dat[n + i] = g_post ? g_post[t * n + i] * 2 * s * (1 - s) : 0;                 \
                    }                                                                                  \
                    T *g = dat + 2 * n;                                                                \
                    if (g_res) {                                                                       \
                        for (size_t i = 0; i < nn; i++) a[i] = bias[2 * n + i] + zt[2 * n + i] * gates[2]; \
                        sk_one_##SUF(a, m, n, iters, m0, ys, cs, oks);                                 \
                        memcpy(g, g_res + t * nn, sizeof(T) * nn);                                     \
                        sk_bwd_one_##SUF(g, n, iters, m0, ys, cs, oks);                                \
                    } else {                                                                           \
                        memset(g, 0, sizeof(T) * nn);                                                  \
                    }                                                                                  \
                }                                                                                      \
            }                                                                                          \
            free(buf);                                                                                 \
            free(oks);                                                                                 \
        }                                                                                              \
        return err;                                                                                    \
    }

DEFINE_KERNELS(float, f32, FLT_MIN, expf)
DEFINE_KERNELS(double, f64, DBL_MIN, exp)

/* Stream read and write-back (mHC Eq. 3), one token per iteration; streams x [T, n, C], branch
 * output y [T, C], coefficients h_pre / h_post [T, n], h_res [T, n, n], all of one dtype.
 *   pre:      u[c] = sum_j h_pre[j] x[j, c]
 *   post_res: out[k, c] = h_post[k] y[c] + sum_j h_res[k, j] x[j, c]
 * Backward outputs may be NULL (not needed). */
#define DEFINE_STREAM_KERNELS(T, SUF)                                                                  \
    /* dot product with 8 independent partial sums (vectorisable without -ffast-math) */             \
    static inline T dot_##SUF(const T *a, const T *b, int64_t C) {                                     \
        T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                           \
        int64_t c = 0;                                                                                 \
        for (; c + 8 <= C; c += 8)                                                                     \
            for (int l = 0; l < 8; l++) acc[l] += a[c + l] * b[c + l];                                 \
        T s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));       \
        for (; c < C; c++) s += a[c] * b[c];                                                           \
        return s;                                                                                      \
    }                                                                                                  \
                                                                                                       \
    int mhc_pre_fwd_##SUF(const T *x, const T *h, T *u, int64_t tokens, int n, int64_t C, int threads) { \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
        for (int64_t t = 0; t < tokens; t++) {                                                         \
            const T *xt = x + t * n * C, *ht = h + t * n;                                              \
            T *ut = u + t * C;                                                                         \
            for (int64_t c = 0; c < C; c++) ut[c] = ht[0] * xt[c];                                     \
            for (int j = 1; j < n; j++) {                                                              \
                const T w = ht[j], *xj = xt + j * C;                                                   \
                for (int64_t c = 0; c < C; c++) ut[c] += w * xj[c];                                    \
            }                                                                                          \
        }                                                                                              \
        return 0;                                                                                      \
    }                                                                                                  \
                                                                                                       \
    int mhc_pre_bwd_##SUF(const T *x, const T *h, const T *gu, T *gx, T *gh, int64_t tokens, int n,   \
                          int64_t C, int threads) {                                                    \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
        for (int64_t t = 0; t < tokens; t++) {                                                         \
            const T *xt = x + t * n * C, *gt = gu + t * C;                                             \
            for (int j = 0; j < n; j++) {                                                              \
                const T *xj = xt + j * C;                                                              \
                if (gx) {                                                                              \
                    const T w = h[t * n + j];                                                          \
                    T *o = gx + (t * n + j) * C;                                                       \
                    for (int64_t c = 0; c < C; c++) o[c] = w * gt[c];                                  \
                }                                                                                      \
                if (gh) gh[t * n + j] = dot_##SUF(gt, xj, C);                                          \
            }                                                                                          \
        }                                                                                              \
        return 0;                                                                                      \
    }                                                                                                  \
                                                                                                       \
    int mhc_post_res_fwd_##SUF(const T *x, const T *y, const T *hp, const T *hr, T *out, int64_t tokens, \
                               int n, int64_t C, int threads) {                                        \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
        for (int64_t t = 0; t < tokens; t++) {                                                         \
            const T *xt = x + t * n * C, *yt = y + t * C, *hpt = hp + t * n, *hrt = hr + t * n * n;    \
            for (int k = 0; k < n; k++) {                                                              \
                T *o = out + (t * n + k) * C;                                                          \
                const T wp = hpt[k];                                                                   \
                for (int64_t c = 0; c < C; c++) o[c] = wp * yt[c];                                     \
                for (int j = 0; j < n; j++) {                                                          \
                    const T w = hrt[k * n + j], *xj = xt + j * C;                                      \
                    for (int64_t c = 0; c < C; c++) o[c] += w * xj[c];                                 \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
        return 0;                                                                                      \
    }                                                                                                  \
                                                                                                       \
    int mhc_post_res_bwd_##SUF(const T *x, const T *y, const T *hp, const T *hr, const T *g, T *gx,    \
                               T *gy, T *gpost, T *gres, int64_t tokens, int n, int64_t C, int threads) { \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
        for (int64_t t = 0; t < tokens; t++) {                                                         \
            const T *xt = x + t * n * C, *yt = y + t * C, *hpt = hp + t * n, *hrt = hr + t * n * n;    \
            const T *gt = g + t * n * C;                                                               \
            if (gx)                                                                                    \
                for (int j = 0; j < n; j++) {                                                          \
                    T *o = gx + (t * n + j) * C;                                                       \
                    const T w0 = hrt[j];                                                               \
                    for (int64_t c = 0; c < C; c++) o[c] = w0 * gt[c];                                 \
                    for (int k = 1; k < n; k++) {                                                      \
                        const T w = hrt[k * n + j], *gk = gt + k * C;                                  \
                        for (int64_t c = 0; c < C; c++) o[c] += w * gk[c];                             \
                    }                                                                                  \
                }                                                                                      \
            if (gy) {                                                                                  \
                T *o = gy + t * C;                                                                     \
                for (int64_t c = 0; c < C; c++) o[c] = hpt[0] * gt[c];                                 \
                for (int k = 1; k < n; k++) {                                                          \
                    const T w = hpt[k], *gk = gt + k * C;                                              \
                    for (int64_t c = 0; c < C; c++) o[c] += w * gk[c];                                 \
                }                                                                                      \
            }                                                                                          \
            if (gpost || gres)                                                                         \
                for (int k = 0; k < n; k++) {                                                          \
                    const T *gk = gt + k * C;                                                          \
                    if (gpost) gpost[t * n + k] = dot_##SUF(gk, yt, C);                                \
                    if (gres)                                                                          \
                        for (int j = 0; j < n; j++) gres[(t * n + k) * n + j] = dot_##SUF(gk, xt + j * C, C); \
                }                                                                                      \
        }                                                                                              \
        return 0;                                                                                      \
    }

DEFINE_STREAM_KERNELS(float, f32)
DEFINE_STREAM_KERNELS(double, f64)

int mhc_abi_version(void) { return 1; }

int mhc_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
