/* Body of the mhckit CPU kernels for one floating type; included by mhc_cpu.c once per type with
 * T (the type), FN(name) (adds the type suffix), TINY (smallest normal) and EXP defined.
 * See mhc_cpu.c for the maths and the layouts. */

/* ---- Sinkhorn on a block of W tokens: m[i][l] is entry i (row-major n x n) of token lane l ---- */

/* The W lanes of one entry as one vector (GCC / Clang vector extension; unaligned loads allowed):
 * every step below is one vector operation over 8 tokens. IV is the same-size integer vector. */
typedef T FN(vt) __attribute__((vector_size(W * sizeof(T)), aligned(sizeof(T))));
typedef ITYPE FN(iv) __attribute__((vector_size(W * sizeof(T)), aligned(sizeof(T))));
#define VT FN(vt)
#define IV FN(iv)
#define VSEL(mask, a, b) ((VT)(((IV)(a) & (IV)(mask)) | ((IV)(b) & ~(IV)(mask))))
#define VMAX(acc, v) VSEL((v) > (acc), (v), (acc))

/* exp of every lane. float: Cody-Waite reduction x = k ln2 + r, the Cephes degree-6 polynomial for
 * e^r (~1 ulp, like PyTorch's SLEEF expf), 2^k applied as two exact power-of-two factors so that
 * overflow (inf) and gradual underflow (subnormals, 0) come out as from expf; all in vector ops.
 * double: libm's exp per lane (the float64 path is for checks, not speed). */
static inline VT FN(vexp)(VT x) {
#if VEXP_POLY
    const VT zero = {0};
    x = VSEL(x < zero - 104, zero - 104, x);
    x = VSEL(x > zero + 89, zero + 89, x);
    const VT t = x * (T)1.44269504088896341 + (T)0.5;
    IV ki = __builtin_convertvector(t, IV); /* truncation; then floor */
    ki += (IV)(__builtin_convertvector(ki, VT) > t);
    const VT k = __builtin_convertvector(ki, VT);
    VT r = x - k * (T)0.693359375;
    r = r - k * (T)-2.12194440e-4;
    VT p = zero + (T)1.9875691500e-4;
    p = p * r + (T)1.3981999507e-3;
    p = p * r + (T)8.3334519073e-3;
    p = p * r + (T)4.1665795894e-2;
    p = p * r + (T)1.6666665459e-1;
    p = p * r + (T)5.0000001201e-1;
    const VT y = p * (r * r) + r + 1;
    const IV k1 = ki >> 1, k2 = ki - k1;
    return y * (VT)((k1 + 127) << 23) * (VT)((k2 + 127) << 23);
#else
    VT r;
    for (int l = 0; l < W; l++) r[l] = EXP(x[l]);
    return r;
#endif
}
#define VEXP FN(vexp)

/* Softmax over each column, then 2 iters - 1 alternating normalisations (rows first, rows last).
 * keep (ys != NULL): m0 = the softmax output; per step s the iterate ys[s*nn + i], the reciprocal
 * of the clamped divisor cs[s*n + r] and the unclamped mask oks[s*n + r] (1 or 0). Dividing by c is
 * done as one reciprocal and n products (differs from x / c by at most ~1 ulp). */
static inline __attribute__((always_inline)) void FN(skb_fwd_n)(T (*m_)[W], const int n, int iters, T (*m0_)[W], T (*ys_)[W], T (*cs_)[W], T (*oks_)[W]) {
    const int nn = n * n, steps = 2 * iters - 1;
    VT *m = (VT *)m_;
    const VT zero = {0}, tiny = zero + TINY, one = zero + 1;
    for (int j = 0; j < n; j++) {
        VT mx = m[j];
        for (int k = 1; k < n; k++) mx = VMAX(mx, m[k * n + j]);
        VT s = zero;
        for (int k = 0; k < n; k++) {
            m[k * n + j] = VEXP(m[k * n + j] - mx);
            s += m[k * n + j];
        }
        for (int k = 0; k < n; k++) m[k * n + j] /= s;
    }
    if (m0_) memcpy(m0_, m, sizeof(VT) * nn);
    for (int st = 0; st < steps; st++) {
        const int rows = st % 2 == 0; /* rows: sum over j for each k; columns: sum over k for each j */
        for (int a = 0; a < n; a++) {
            VT s = zero;
            for (int b = 0; b < n; b++) s += m[rows ? a * n + b : b * n + a];
            const VT ok = VSEL(s >= tiny, one, zero);
            const VT r = one / VSEL(s >= tiny, s, tiny); /* reciprocal of the clamped divisor */
            for (int b = 0; b < n; b++) m[rows ? a * n + b : b * n + a] *= r;
            if (ys_) {
                ((VT *)cs_)[st * n + a] = r;
                ((VT *)oks_)[st * n + a] = ok;
            }
        }
        if (ys_) memcpy(ys_ + (size_t)st * nn, m, sizeof(VT) * nn);
    }
}

/* Reverse walk over the kept iterates: g (the gradient of the output) -> dL/dlogits, in place. */
static inline __attribute__((always_inline)) void FN(skb_bwd_n)(T (*g_)[W], const int n, int iters, T (*m0_)[W], T (*ys_)[W], T (*cs_)[W], T (*oks_)[W]) {
    const int nn = n * n, steps = 2 * iters - 1;
    VT *g = (VT *)g_;
    const VT *m0 = (const VT *)m0_, zero = {0};
    for (int st = steps - 1; st >= 0; st--) {
        const VT *y = (const VT *)ys_ + (size_t)st * nn, *c = (const VT *)cs_ + st * n, *ok = (const VT *)oks_ + st * n;
        const int rows = st % 2 == 0;
        for (int a = 0; a < n; a++) {
            VT d = zero;
            for (int b = 0; b < n; b++) {
                const int i = rows ? a * n + b : b * n + a;
                d += g[i] * y[i];
            }
            d *= ok[a]; /* a clamped divisor is a constant: no term through it (as PyTorch's `* ok`) */
            for (int b = 0; b < n; b++) {
                const int i = rows ? a * n + b : b * n + a;
                g[i] = (g[i] - d) * c[a];
            }
        }
    }
    for (int j = 0; j < n; j++) {
        VT d = zero;
        for (int k = 0; k < n; k++) d += g[k * n + j] * m0[k * n + j];
        for (int k = 0; k < n; k++) g[k * n + j] = m0[k * n + j] * (g[k * n + j] - d);
    }
}

/* n = 4 (the paper's) gets its own copy with a compile-time n: the 16 entries then stay in registers. */
static void FN(skb_fwd)(T (*m)[W], int n, int iters, T (*m0)[W], T (*ys)[W], T (*cs)[W], T (*oks)[W]) {
    if (n == 4) FN(skb_fwd_n)(m, 4, iters, m0, ys, cs, oks);
    else FN(skb_fwd_n)(m, n, iters, m0, ys, cs, oks);
}

static void FN(skb_bwd)(T (*g)[W], int n, int iters, T (*m0)[W], T (*ys)[W], T (*cs)[W], T (*oks)[W]) {
    if (n == 4) FN(skb_bwd_n)(g, 4, iters, m0, ys, cs, oks);
    else FN(skb_bwd_n)(g, n, iters, m0, ys, cs, oks);
}

/* Per-thread scratch for the backward: m, m0, g, kept iterates, divisors, masks. */
typedef struct {
    T (*m)[W], (*m0)[W], (*g)[W], (*ys)[W], (*cs)[W], (*oks)[W];
    void *mem;
} FN(scratch_t);

static int FN(scratch_alloc)(FN(scratch_t) *s, int n, int iters) {
    const size_t nn = (size_t)n * n, steps = 2 * (size_t)iters - 1;
    const size_t vals = nn * (3 + steps) + 2 * (size_t)n * steps;
    s->mem = malloc(sizeof(T) * W * vals);
    if (!s->mem) return 2;
    T (*base)[W] = (T (*)[W])s->mem;
    s->m = base, s->m0 = base + nn, s->g = base + 2 * nn, s->ys = base + 3 * nn, s->cs = s->ys + nn * steps;
    s->oks = s->cs + (size_t)n * steps;
    return 0;
}

/* Sinkhorn forward: logits [T, ld] (n*n values per row) -> out [T, n*n]. */
int FN(mhc_sinkhorn_fwd)(const T *logits, int64_t ld, T *out, int64_t tokens, int n, int iters, int threads) {
    if (n < 1 || n > MAXN || iters < 1) return 1;
    const int nn = n * n;
    const int64_t blocks = (tokens + W - 1) / W;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        T m[MAXN * MAXN][W];
        const int64_t t0 = b * W;
        const int lanes = tokens - t0 < W ? (int)(tokens - t0) : W;
        for (int i = 0; i < nn; i++)
            for (int l = 0; l < W; l++) m[i][l] = l < lanes ? logits[(t0 + l) * ld + i] : 0;
        FN(skb_fwd)(m, n, iters, NULL, NULL, NULL, NULL);
        for (int l = 0; l < lanes; l++)
            for (int i = 0; i < nn; i++) out[(t0 + l) * nn + i] = m[i][l];
    }
    return 0;
}

/* Sinkhorn backward: logits [T, ld], grad [T, n*n] -> dlogits [T, ldo]. */
int FN(mhc_sinkhorn_bwd)(const T *logits, int64_t ld, const T *grad, T *dlogits, int64_t ldo, int64_t tokens, int n,
                         int iters, int threads) {
    if (n < 1 || n > MAXN || iters < 1) return 1;
    const int nn = n * n;
    const int64_t blocks = (tokens + W - 1) / W;
    int err = 0;
#pragma omp parallel num_threads(threads)
    {
        FN(scratch_t) s;
        if (FN(scratch_alloc)(&s, n, iters)) {
#pragma omp atomic write
            err = 2;
        } else {
#pragma omp for schedule(static)
            for (int64_t b = 0; b < blocks; b++) {
                const int64_t t0 = b * W;
                const int lanes = tokens - t0 < W ? (int)(tokens - t0) : W;
                for (int i = 0; i < nn; i++)
                    for (int l = 0; l < W; l++) {
                        s.m[i][l] = l < lanes ? logits[(t0 + l) * ld + i] : 0;
                        s.g[i][l] = l < lanes ? grad[(t0 + l) * nn + i] : 0;
                    }
                FN(skb_fwd)(s.m, n, iters, s.m0, s.ys, s.cs, s.oks);
                FN(skb_bwd)(s.g, n, iters, s.m0, s.ys, s.cs, s.oks);
                for (int l = 0; l < lanes; l++)
                    for (int i = 0; i < nn; i++) dlogits[(t0 + l) * ldo + i] = s.g[i][l];
            }
        }
        free(s.mem);
    }
    return err;
}

/* Coefficient tail forward: z [T, K] (K = 2n + n^2), bias [K], gates (3) ->
 * h_pre [T, n] = sigmoid(a_pre), h_post [T, n] = 2 sigmoid(a_post), h_res [T, n*n]. */
int FN(mhc_tail_fwd)(const T *z, const T *bias, const T *gates, T *h_pre, T *h_post, T *h_res, int64_t tokens, int n,
                     int iters, int threads) {
    if (n < 1 || n > MAXN || iters < 1) return 1;
    const int K = 2 * n + n * n, nn = n * n;
    const int64_t blocks = (tokens + W - 1) / W;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        T m[MAXN * MAXN][W];
        const int64_t t0 = b * W;
        const int lanes = tokens - t0 < W ? (int)(tokens - t0) : W;
        for (int i = 0; i < 2 * n; i++) { /* h_pre = sigmoid(a_pre), h_post = 2 sigmoid(a_post) */
            VT a;
            for (int l = 0; l < W; l++) a[l] = l < lanes ? z[(t0 + l) * K + i] : 0;
            const VT sg = 1 / (1 + VEXP(-(bias[i] + a * gates[i < n ? 0 : 1])));
            for (int l = 0; l < lanes; l++) {
                if (i < n) h_pre[(t0 + l) * n + i] = sg[l];
                else h_post[(t0 + l) * n + i - n] = 2 * sg[l];
            }
        }
        for (int i = 0; i < nn; i++)
            for (int l = 0; l < W; l++) m[i][l] = l < lanes ? bias[2 * n + i] + z[(t0 + l) * K + 2 * n + i] * gates[2] : 0;
        FN(skb_fwd)(m, n, iters, NULL, NULL, NULL, NULL);
        for (int l = 0; l < lanes; l++)
            for (int i = 0; i < nn; i++) h_res[(t0 + l) * nn + i] = m[i][l];
    }
    return 0;
}

/* Coefficient tail backward: da [T, K] = dL/da from the gradients of h_pre, h_post, h_res (any of them
 * may be NULL: zero gradient). */
int FN(mhc_tail_bwd)(const T *z, const T *bias, const T *gates, const T *g_pre, const T *g_post, const T *g_res, T *da,
                     int64_t tokens, int n, int iters, int threads) {
    if (n < 1 || n > MAXN || iters < 1) return 1;
    const int K = 2 * n + n * n, nn = n * n;
    const int64_t blocks = (tokens + W - 1) / W;
    int err = 0;
#pragma omp parallel num_threads(threads)
    {
        FN(scratch_t) s;
        if (FN(scratch_alloc)(&s, n, iters)) {
#pragma omp atomic write
            err = 2;
        } else {
#pragma omp for schedule(static)
            for (int64_t b = 0; b < blocks; b++) {
                const int64_t t0 = b * W;
                const int lanes = tokens - t0 < W ? (int)(tokens - t0) : W;
                for (int i = 0; i < 2 * n; i++) { /* d sigmoid = s (1 - s); h_post carries a factor 2 */
                    const T *gp = i < n ? g_pre : g_post;
                    const int col = i < n ? i : i - n;
                    VT a;
                    for (int l = 0; l < W; l++) a[l] = l < lanes ? z[(t0 + l) * K + i] : 0;
                    const VT sg = 1 / (1 + VEXP(-(bias[i] + a * gates[i < n ? 0 : 1])));
                    const VT dsg = (T)(i < n ? 1 : 2) * sg * (1 - sg);
                    for (int l = 0; l < lanes; l++) da[(t0 + l) * K + i] = gp ? gp[(t0 + l) * n + col] * dsg[l] : 0;
                }
                for (int l = 0; l < lanes; l++) {
                    T *dat = da + (t0 + l) * K;
                    if (!g_res) memset(dat + 2 * n, 0, sizeof(T) * nn);
                }
                if (!g_res) continue;
                for (int i = 0; i < nn; i++)
                    for (int l = 0; l < W; l++) {
                        const int in = l < lanes;
                        s.m[i][l] = in ? bias[2 * n + i] + z[(t0 + l) * K + 2 * n + i] * gates[2] : 0;
                        s.g[i][l] = in ? g_res[(t0 + l) * nn + i] : 0;
                    }
                FN(skb_fwd)(s.m, n, iters, s.m0, s.ys, s.cs, s.oks);
                FN(skb_bwd)(s.g, n, iters, s.m0, s.ys, s.cs, s.oks);
                for (int l = 0; l < lanes; l++)
                    for (int i = 0; i < nn; i++) da[(t0 + l) * K + 2 * n + i] = s.g[i][l];
            }
        }
        free(s.mem);
    }
    return err;
}

/* ---- stream read and write-back: x [T, n, C], y / u [T, C], coefficients [T, n] / [T, n, n] ---- */

/* dot product with 8 independent partial sums (vectorisable without -ffast-math) */
static inline T FN(dot)(const T *a, const T *b, int64_t C) {
    T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t c = 0;
    for (; c + 8 <= C; c += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[c + l] * b[c + l];
    T s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; c < C; c++) s += a[c] * b[c];
    return s;
}

/* u[c] = sum_j h[j] x[j, c] */
int FN(mhc_pre_fwd)(const T *x, const T *h, T *u, int64_t tokens, int n, int64_t C, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++) {
        const T *xt = x + t * n * C, *ht = h + t * n;
        T *ut = u + t * C;
        for (int64_t c = 0; c < C; c++) ut[c] = ht[0] * xt[c];
        for (int j = 1; j < n; j++) {
            const T w = ht[j], *xj = xt + j * C;
            for (int64_t c = 0; c < C; c++) ut[c] += w * xj[c];
        }
    }
    return 0;
}

/* gx[j, c] = h[j] gu[c] (if gx), gh[j] = <gu, x[j]> (if gh) */
int FN(mhc_pre_bwd)(const T *x, const T *h, const T *gu, T *gx, T *gh, int64_t tokens, int n, int64_t C, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++) {
        const T *xt = x + t * n * C, *gt = gu + t * C;
        for (int j = 0; j < n; j++) {
            if (gx) {
                const T w = h[t * n + j];
                T *o = gx + (t * n + j) * C;
                for (int64_t c = 0; c < C; c++) o[c] = w * gt[c];
            }
            if (gh) gh[t * n + j] = FN(dot)(gt, xt + j * C, C);
        }
    }
    return 0;
}

/* out[k, c] = h_post[k] y[c] + sum_j h_res[k, j] x[j, c] */
int FN(mhc_post_res_fwd)(const T *x, const T *y, const T *hp, const T *hr, T *out, int64_t tokens, int n, int64_t C,
                         int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++) {
        const T *xt = x + t * n * C, *yt = y + t * C, *hpt = hp + t * n, *hrt = hr + t * n * n;
        for (int k = 0; k < n; k++) {
            T *o = out + (t * n + k) * C;
            const T wp = hpt[k];
            for (int64_t c = 0; c < C; c++) o[c] = wp * yt[c];
            for (int j = 0; j < n; j++) {
                const T w = hrt[k * n + j], *xj = xt + j * C;
                for (int64_t c = 0; c < C; c++) o[c] += w * xj[c];
            }
        }
    }
    return 0;
}

/* gx[j] = sum_k h_res[k, j] g[k]; gy = sum_k h_post[k] g[k]; gpost[k] = <g[k], y>; gres[k, j] = <g[k], x[j]> */
int FN(mhc_post_res_bwd)(const T *x, const T *y, const T *hp, const T *hr, const T *g, T *gx, T *gy, T *gpost, T *gres,
                         int64_t tokens, int n, int64_t C, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++) {
        const T *xt = x + t * n * C, *yt = y + t * C, *hpt = hp + t * n, *hrt = hr + t * n * n;
        const T *gt = g + t * n * C;
        if (gx)
            for (int j = 0; j < n; j++) {
                T *o = gx + (t * n + j) * C;
                const T w0 = hrt[j];
                for (int64_t c = 0; c < C; c++) o[c] = w0 * gt[c];
                for (int k = 1; k < n; k++) {
                    const T w = hrt[k * n + j], *gk = gt + k * C;
                    for (int64_t c = 0; c < C; c++) o[c] += w * gk[c];
                }
            }
        if (gy) {
            T *o = gy + t * C;
            for (int64_t c = 0; c < C; c++) o[c] = hpt[0] * gt[c];
            for (int k = 1; k < n; k++) {
                const T w = hpt[k], *gk = gt + k * C;
                for (int64_t c = 0; c < C; c++) o[c] += w * gk[c];
            }
        }
        if (gpost || gres)
            for (int k = 0; k < n; k++) {
                const T *gk = gt + k * C;
                if (gpost) gpost[t * n + k] = FN(dot)(gk, yt, C);
                if (gres)
                    for (int j = 0; j < n; j++) gres[(t * n + k) * n + j] = FN(dot)(gk, xt + j * C, C);
            }
    }
    return 0;
}

#undef VT
#undef IV
#undef VSEL
#undef VMAX
#undef VEXP
