/* Body of the mhckit CPU kernels for one floating type; included by mhc_cpu.c once per type with
 * T (the type), FN(name) (adds the type suffix), TINY (smallest normal) and EXP defined.
 * See mhc_cpu.c for the maths and the layouts. */

/* ---- Sinkhorn on a block of SB tokens: m[i][l] is entry i (row-major n x n) of token lane l ---- */

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

/* A Sinkhorn step depends on the one before (sum -> divide -> scale), so one vector per entry leaves
 * the core waiting on latencies. The forward that keeps nothing runs HH = 2 blocks of W tokens side
 * by side (entry i of the block is m[i * HH + h]; SB = 2W tokens); the kept-iterate forward and the
 * backward run HH = 1 (measured faster there: their stores and loads of the kept iterates fill the
 * gaps, and two blocks' worth would not stay in L1). */

/* s = sum of p[0..n): (p0 + p1) + (p2 + p3) for n = 4 (a shorter dependency chain), else in order */
static inline __attribute__((always_inline)) VT FN(vsum)(const VT *p, const int n) {
    if (n == 4) return (p[0] + p[1]) + (p[2] + p[3]);
    VT s = p[0];
    for (int b = 1; b < n; b++) s += p[b];
    return s;
}

/* One normalisation: ROWS (a compile-time constant, so that the n x n entries are addressed at fixed
 * offsets) divides every row k by its sum over j, else every column j by its sum over k.
 * keep (cs != NULL): the reciprocal of the clamped divisor of step st, negated where the divisor
 * was clamped (the backward reads "unclamped" from the sign bit), and after a rows step the
 * iterate (the columns step's iterate is that times its reciprocals, recomputed in backward). */
static inline __attribute__((always_inline)) void FN(skb_step)(VT *m, const int n, const int ROWS, const int HH,
                                                                int st, VT *ys, VT *cs) {
    const VT zero = {0}, tiny = zero + TINY, one = zero + 1;
    for (int a = 0; a < n; a++)
        for (int h = 0; h < HH; h++) {
            VT p[MAXN];
            for (int b = 0; b < n; b++) p[b] = m[(ROWS ? a * n + b : b * n + a) * HH + h];
            const VT s = FN(vsum)(p, n);
            const VT r = one / VSEL(s >= tiny, s, tiny); /* reciprocal of the clamped divisor */
            for (int b = 0; b < n; b++) m[(ROWS ? a * n + b : b * n + a) * HH + h] *= r;
            if (cs) cs[(st * n + a) * HH + h] = VSEL(s >= tiny, r, -r);
        }
    if (cs && ROWS) memcpy(ys + (size_t)(st / 2) * n * n * HH, m, sizeof(VT) * n * n * HH);
}

/* Softmax over each column, then 2 iters - 1 alternating normalisations (rows first, rows last), on
 * HH vectors per entry. keep (cs != NULL): m0 = the softmax output, ys[iters] the rows steps'
 * iterates, cs[steps] the signed reciprocals. Dividing by c is done as one reciprocal and n products
 * (differs from x / c by at most ~1 ulp). */
static inline __attribute__((always_inline)) void FN(skb_fwd_n)(VT *m, const int n, const int HH, int iters, VT *m0,
                                                                 VT *ys, VT *cs) {
    const int steps = 2 * iters - 1;
    for (int j = 0; j < n; j++)
        for (int h = 0; h < HH; h++) {
            VT mx = m[j * HH + h];
            for (int k = 1; k < n; k++) mx = VMAX(mx, m[(k * n + j) * HH + h]);
            VT p[MAXN];
            for (int k = 0; k < n; k++) p[k] = m[(k * n + j) * HH + h] = VEXP(m[(k * n + j) * HH + h] - mx);
            const VT s = FN(vsum)(p, n);
            for (int k = 0; k < n; k++) m[(k * n + j) * HH + h] /= s;
        }
    if (m0) memcpy(m0, m, sizeof(VT) * n * n * HH);
    for (int st = 0; st < steps; st += 2) { /* rows, then columns (except after the last rows) */
        FN(skb_step)(m, n, 1, HH, st, ys, cs);
        if (st + 1 < steps) FN(skb_step)(m, n, 0, HH, st + 1, ys, cs);
    }
}

/* The reverse of kept step st (ROWS compile-time) on the gradient g:
 *     g = (g - [unclamped] sum_d(g * y)) * c. */
static inline __attribute__((always_inline)) void FN(skb_step_bwd)(VT *g, const int n, const int ROWS, const int HH,
                                                                    int st, const VT *ys, const VT *cs) {
    const VT *y = ys + (size_t)(st / 2) * n * n * HH, *c = cs + st * n * HH, zero = {0};
    for (int a = 0; a < n; a++)
        for (int h = 0; h < HH; h++) {
            const VT cv = c[a * HH + h];
            const IV ok = (IV)cv >= (IV)zero; /* sign bit clear: the divisor was not clamped */
            const VT ca = VSEL(ok, cv, -cv);
            VT acc = zero;
            for (int b = 0; b < n; b++) {
                const int i = (ROWS ? a * n + b : b * n + a) * HH + h;
                acc += g[i] * (ROWS ? y[i] : y[i] * ca); /* a columns step's iterate, as its forward made it */
            }
            const VT d = VSEL(ok, acc, zero); /* a clamped divisor is a constant: no term through it */
            for (int b = 0; b < n; b++) {
                const int i = (ROWS ? a * n + b : b * n + a) * HH + h;
                g[i] = (g[i] - d) * ca;
            }
        }
}

/* Reverse walk over the kept iterates: g (the gradient of the output) -> dL/dlogits, in place. */
static inline __attribute__((always_inline)) void FN(skb_bwd_n)(VT *g, const int n, const int HH, int iters,
                                                                 const VT *m0, const VT *ys, const VT *cs) {
    const int steps = 2 * iters - 1;
    for (int st = steps - 1; st >= 0; st -= 2) { /* steps - 1 is a rows step; then columns, rows, ... */
        FN(skb_step_bwd)(g, n, 1, HH, st, ys, cs);
        if (st >= 1) FN(skb_step_bwd)(g, n, 0, HH, st - 1, ys, cs);
    }
    for (int j = 0; j < n; j++)
        for (int h = 0; h < HH; h++) {
            VT p[MAXN];
            for (int k = 0; k < n; k++) p[k] = g[(k * n + j) * HH + h] * m0[(k * n + j) * HH + h];
            const VT d = FN(vsum)(p, n);
            for (int k = 0; k < n; k++) {
                const int i = (k * n + j) * HH + h;
                g[i] = m0[i] * (g[i] - d);
            }
        }
}

/* Entry points, n = 4 (the paper's) as its own compile-time copy: skb_fwd2 keeps nothing (rows of SB
 * lanes, HH = 2); skb_fwd / skb_bwd keep the iterates in / read them from the scratch (rows of W
 * lanes, HH = 1). */
static void FN(skb_fwd2)(T (*m)[SB], int n, int iters) {
    if (n == 4) FN(skb_fwd_n)((VT *)m, 4, 2, iters, NULL, NULL, NULL);
    else FN(skb_fwd_n)((VT *)m, n, 2, iters, NULL, NULL, NULL);
}

static void FN(skb_fwd)(T (*m)[W], int n, int iters, T (*m0)[W], T (*ys)[W], T (*cs)[W]) {
    if (n == 4) FN(skb_fwd_n)((VT *)m, 4, 1, iters, (VT *)m0, (VT *)ys, (VT *)cs);
    else FN(skb_fwd_n)((VT *)m, n, 1, iters, (VT *)m0, (VT *)ys, (VT *)cs);
}

static void FN(skb_bwd)(T (*g)[W], int n, int iters, T (*m0)[W], T (*ys)[W], T (*cs)[W]) {
    if (n == 4) FN(skb_bwd_n)((VT *)g, 4, 1, iters, (const VT *)m0, (const VT *)ys, (const VT *)cs);
    else FN(skb_bwd_n)((VT *)g, n, 1, iters, (const VT *)m0, (const VT *)ys, (const VT *)cs);
}

/* Per-thread scratch for the backward: m, m0, g, the rows steps' iterates and the signed
 * reciprocals (rows of W lanes; ~16 KB for n = 4, 20 iterations, float). */
typedef struct {
    T (*m)[W], (*m0)[W], (*g)[W], (*ys)[W], (*cs)[W];
    T *extra; /* `extra` more values for the caller (the half-precision entry points' converted blocks) */
    void *mem;
} FN(scratch_t);

static int FN(scratch_alloc)(FN(scratch_t) *s, int n, int iters, size_t extra) {
    if (iters < 1) iters = 1; /* the permutation mixture keeps no iterates */
    const size_t nn = (size_t)n * n, steps = 2 * (size_t)iters - 1;
    const size_t rows = nn * (3 + (size_t)iters) + (size_t)n * steps;
    const size_t off = (W * rows + 15) & ~(size_t)15; /* extra starts on a cache line */
    s->mem = mhc_alloc(sizeof(T) * (off + extra), 0);
    if (!s->mem) return 2;
    T (*base)[W] = (T (*)[W])s->mem;
    s->m = base, s->m0 = base + nn, s->g = base + 2 * nn, s->ys = base + 3 * nn, s->cs = s->ys + nn * iters;
    s->extra = (T *)s->mem + off;
    return 0;
}

/* Kept-iterate forward and backward of the tokens [0, lanes) of a block (lanes <= SB), W at a time:
 * logits row l at lg + l * ld (bias + gate * logits if bias), gradient row l at gr + l * nn ->
 * dlogits row l at out + l * ldo; the recomputed forward output (rows of nn) to hres if not NULL. */
static void FN(skb_grad)(FN(scratch_t) *s, const T *lg, int64_t ld, const T *bias, T gate, const T *gr, T *out,
                         int64_t ldo, T *hres, int lanes, int n, int iters) {
    const int nn = n * n;
    for (int l0 = 0; l0 < lanes; l0 += W) {
        const int w = lanes - l0 < W ? lanes - l0 : W;
        for (int i = 0; i < nn; i++)
            for (int l = 0; l < W; l++) {
                const int in = l < w;
                const T v = in ? lg[(l0 + l) * ld + i] : 0;
                s->m[i][l] = in ? (bias ? bias[i] + v * gate : v) : 0;
                s->g[i][l] = in ? gr[(l0 + l) * nn + i] : 0;
            }
        FN(skb_fwd)(s->m, n, iters, s->m0, s->ys, s->cs);
        if (hres)
            for (int l = 0; l < w; l++)
                for (int i = 0; i < nn; i++) hres[(l0 + l) * nn + i] = s->m[i][l];
        FN(skb_bwd)(s->g, n, iters, s->m0, s->ys, s->cs);
        for (int l = 0; l < w; l++)
            for (int i = 0; i < nn; i++) out[(l0 + l) * ldo + i] = s->g[i][l];
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

/* ---- coefficient tail on one block of <= SB tokens (pointers at the block's first row) --------- */

/* sigmoid(bias[i] + gate * z[l, i]) for the SB lanes of column i (absent lanes: z = 0) */
static inline void FN(sigmoid_col)(const T *z, int K, int i, T bias, T gate, int lanes, VT *out) {
    for (int h = 0; h < HH_; h++) {
        VT a;
        for (int l = 0; l < W; l++) a[l] = h * W + l < lanes ? z[(h * W + l) * K + i] : 0;
        out[h] = 1 / (1 + VEXP(-(bias + a * gate)));
    }
}

/* mHC-lite: the softmax over the P = n! logits a_p = bias[p] + gate z[l, p] (z rows of ld K, from the
 * first h_res column) of the SB lanes of a block: w[p][h] */
static void FN(perm_weights)(const T *z, int K, const T *bias, T gate, int P, int lanes, VT w[MAXP][HH_]) {
    for (int h = 0; h < HH_; h++) {
        VT mx = {0};
        for (int p = 0; p < P; p++) {
            VT a;
            for (int l = 0; l < W; l++) a[l] = h * W + l < lanes ? z[(h * W + l) * K + p] : 0;
            w[p][h] = bias[p] + a * gate;
            mx = p ? VMAX(mx, w[p][h]) : w[p][h];
        }
        VT e[MAXP];
        for (int p = 0; p < P; p++) e[p] = VEXP(w[p][h] - mx);
        for (int p = 0; p < P; p++) w[p][h] = e[p];
        for (int step = 1; step < P; step *= 2) /* pairwise sum: fewer roundings than in a row */
            for (int p = 0; p + step < P; p += 2 * step) e[p] += e[p + step];
        for (int p = 0; p < P; p++) w[p][h] /= e[0];
    }
}

/* h_res[k][j] = the sum of w_p over the permutations with perm_p[k] = j, in the order of p (rows of n*n) */
static void FN(perm_mix)(VT w[MAXP][HH_], unsigned char pt[MAXP][MAXN_PERM], int n, int P, int lanes, T *h_res) {
    const int nn = n * n;
    for (int h = 0; h < HH_; h++) {
        VT m[MAXN_PERM * MAXN_PERM];
        for (int i = 0; i < nn; i++) m[i] = (VT){0};
        for (int p = 0; p < P; p++)
            for (int k = 0; k < n; k++) m[k * n + pt[p][k]] += w[p][h];
        for (int l = 0; l < W && h * W + l < lanes; l++)
            for (int i = 0; i < nn; i++) h_res[(h * W + l) * nn + i] = m[i][l];
    }
}

/* mHC-lite backward on a block: da_p = w_p (dw_p - sum_q w_q dw_q) with dw_p = sum_k g_res[k][perm_p[k]]
 * (da rows of ld ldo from its first h_res column); h_res recomputed into hres if not NULL. */
static void FN(perm_bwd)(const T *z, int K, const T *bias, T gate, const T *g_res, T *da, int ldo, T *hres, int n,
                         int lanes) {
    unsigned char pt[MAXP][MAXN_PERM];
    const int P = mhc_perm_table(n, pt), nn = n * n;
    VT w[MAXP][HH_];
    FN(perm_weights)(z, K, bias, gate, P, lanes, w);
    if (hres) FN(perm_mix)(w, pt, n, P, lanes, hres);
    for (int h = 0; h < HH_; h++) {
        VT g[MAXN_PERM * MAXN_PERM], dw[MAXP], dot = {0};
        for (int i = 0; i < nn; i++)
            for (int l = 0; l < W; l++) g[i][l] = h * W + l < lanes ? g_res[(h * W + l) * nn + i] : 0;
        for (int p = 0; p < P; p++) {
            VT acc = g[pt[p][0]];
            for (int k = 1; k < n; k++) acc += g[k * n + pt[p][k]];
            dw[p] = acc;
            dot += w[p][h] * acc;
        }
        for (int p = 0; p < P; p++) {
            const VT d = w[p][h] * (dw[p] - dot);
            for (int l = 0; l < W && h * W + l < lanes; l++) da[(h * W + l) * ldo + p] = d[l];
        }
    }
}

/* Forward: z rows of K (K = 2n + n^2, or 2n + n! for the permutations), bias [K], gates (3) -> h_pre
 * rows of n = sigmoid(a_pre), h_post rows of n = 2 sigmoid(a_post), h_res rows of n*n = sinkhorn(a_res)
 * (or the permutation mixture of a_res, see MHC_PERMUTATIONS). */
static void FN(tail_fwd_block)(const T *z, const T *bias, const T *gates, T *h_pre, T *h_post, T *h_res, int lanes,
                               int n, int iters) {
    const int K = 2 * n + mhc_kres(n, iters), nn = n * n;
    T m[MAXN * MAXN][SB] ALIGNED;
    for (int i = 0; i < 2 * n; i++) {
        VT sg[HH_];
        FN(sigmoid_col)(z, K, i, bias[i], gates[i < n ? 0 : 1], lanes, sg);
        for (int l = 0; l < lanes; l++) {
            if (i < n) h_pre[l * n + i] = sg[l / W][l % W];
            else h_post[l * n + i - n] = 2 * sg[l / W][l % W];
        }
    }
    if (iters == MHC_IDENTITY) return; /* h_res = I: nothing to write */
    if (iters == MHC_PERMUTATIONS) {
        unsigned char pt[MAXP][MAXN_PERM];
        const int P = mhc_perm_table(n, pt);
        VT w[MAXP][HH_];
        FN(perm_weights)(z + 2 * n, K, bias + 2 * n, gates[2], P, lanes, w);
        FN(perm_mix)(w, pt, n, P, lanes, h_res);
        return;
    }
    for (int i = 0; i < nn; i++)
        for (int l = 0; l < SB; l++) m[i][l] = l < lanes ? bias[2 * n + i] + z[l * K + 2 * n + i] * gates[2] : 0;
    FN(skb_fwd2)(m, n, iters);
    for (int l = 0; l < lanes; l++)
        for (int i = 0; i < nn; i++) h_res[l * nn + i] = m[i][l];
}

/* Backward: da rows of K (ld K) from g_pre / g_post rows of n and g_res rows of n*n (any NULL:
 * zero gradient). If hpre is not NULL it receives sigmoid(a_pre) (rows of n); if hres is not NULL
 * (and g_res is not) it receives the recomputed Sinkhorn output, bitwise the forward's h_res. */
static void FN(tail_bwd_block)(FN(scratch_t) *s, const T *z, const T *bias, const T *gates, const T *g_pre,
                               const T *g_post, const T *g_res, T *da, T *hpre, T *hres, int lanes, int n, int iters) {
    const int kres = mhc_kres(n, iters), K = 2 * n + kres;
    for (int i = 0; i < 2 * n; i++) { /* d sigmoid = s (1 - s); h_post carries a factor 2 */
        const T *gp = i < n ? g_pre : g_post;
        const int col = i < n ? i : i - n;
        VT sg[HH_];
        FN(sigmoid_col)(z, K, i, bias[i], gates[i < n ? 0 : 1], lanes, sg);
        for (int h = 0; h < HH_; h++) {
            const VT dsg = (T)(i < n ? 1 : 2) * sg[h] * (1 - sg[h]);
            for (int l = 0; l < W && h * W + l < lanes; l++) {
                const int t = h * W + l;
                da[t * K + i] = gp ? gp[t * n + col] * dsg[l] : 0;
                if (hpre && i < n) hpre[t * n + i] = sg[h][l];
            }
        }
    }
    if (iters == MHC_IDENTITY) return; /* no logits of h_res (and no h_res to recompute) */
    if (!g_res) {
        for (int l = 0; l < lanes; l++) memset(da + l * K + 2 * n, 0, sizeof(T) * kres);
        return;
    }
    if (iters == MHC_PERMUTATIONS) {
        FN(perm_bwd)(z + 2 * n, K, bias + 2 * n, gates[2], g_res, da + 2 * n, K, hres, n, lanes);
        return;
    }
    FN(skb_grad)(s, z + 2 * n, K, bias + 2 * n, gates[2], g_res, da + 2 * n, K, hres, lanes, n, iters);
}

/* Coefficient tail forward over T tokens: z [T, K] -> h_pre [T, n], h_post [T, n], h_res [T, n*n]. */
int FN(mhc_tail_fwd)(const T *z, const T *bias, const T *gates, T *h_pre, T *h_post, T *h_res, int64_t tokens, int n,
                     int iters, int threads) {
    if (!mhc_tail_ok(n, iters)) return 1;
    const int K = 2 * n + mhc_kres(n, iters), nn = n * n;
    const int64_t blocks = (tokens + SB - 1) / SB;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t t0 = b * SB;
        const int lanes = tokens - t0 < SB ? (int)(tokens - t0) : SB;
        FN(tail_fwd_block)(z + t0 * K, bias, gates, h_pre + t0 * n, h_post + t0 * n, h_res ? h_res + t0 * nn : NULL,
                           lanes, n, iters);
    }
    return 0;
}

/* Coefficient tail backward over T tokens: da [T, K] from the gradients of h_pre, h_post, h_res (any
 * of them may be NULL: zero gradient). */
typedef struct {
    const T *z, *bias, *gates, *g_pre, *g_post, *g_res;
    T *da;
    int n, iters;
} FN(tail_bwd_ctx);

static void FN(tail_bwd_body)(const void *ctx, FN(scratch_t) *s, int64_t t0, int lanes, int me) {
    const FN(tail_bwd_ctx) *c = ctx;
    const int n = c->n, K = 2 * n + mhc_kres(n, c->iters);
    (void)me;
    FN(tail_bwd_block)(s, c->z + t0 * K, c->bias, c->gates, c->g_pre ? c->g_pre + t0 * n : NULL,
                       c->g_post ? c->g_post + t0 * n : NULL, c->g_res ? c->g_res + t0 * n * n : NULL, c->da + t0 * K,
                       NULL, NULL, lanes, n, c->iters);
}

int FN(mhc_tail_bwd)(const T *z, const T *bias, const T *gates, const T *g_pre, const T *g_post, const T *g_res, T *da,
                     int64_t tokens, int n, int iters, int threads) {
    if (!mhc_tail_ok(n, iters)) return 1;
    const FN(tail_bwd_ctx) c = {z, bias, gates, g_pre, g_post, g_res, da, n, iters};
    return FN(for_blocks)(tokens, n, iters, threads, 0, FN(tail_bwd_body), &c);
}

/* ---- stream read and write-back: x [T, n, C], y / u [T, C], coefficients [T, n] / [T, n, n] ---- */
/* Per token, the C axis is walked in vectors of W values (one load of each x[j] chunk serves every
 * output), with a scalar loop for the C % W rest. n = 4 gets a compile-time-n copy (see *_tok). */

#define VLD(p) (*(const VT *)(p))
#define VST(p, v) (*(VT *)(p) = (v))

/* the W lanes of v summed in a fixed order */
static inline T FN(hsum)(VT v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* s[i] = hsum(a[i]) for 8 vectors at once: three levels of pairwise shuffles and adds (21 vector
 * operations instead of 8 horizontal sums). GCC has __builtin_shuffle, Clang __builtin_shufflevector. */
#if defined(__clang__)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (IV){__VA_ARGS__})
#endif
static inline VT FN(reduce8)(const VT *a) {
    VT b[4], c[2];
    for (int i = 0; i < 4; i++) /* b[i][2m] = a[2i][2m] + a[2i][2m+1], b[i][2m+1] = the same for a[2i+1] */
        b[i] = SHUF(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) + SHUF(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; i++) /* c[i][4h + r] = lanes 4h..4h+3 of a[4i + r] summed */
        c[i] = SHUF(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) + SHUF(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return SHUF(c[0], c[1], 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(c[0], c[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

/* out[i] = hsum(a[i]) for i < count (count <= 8 * ceil(count / 8) vectors are read: pad with zeros) */
static inline void FN(reduce_many)(VT *a, int count, T *out) {
    for (int i = 0; i < count; i += 8) {
        for (int p = count; p < i + 8; p++) a[p] = (VT){0};
        const VT s = FN(reduce8)(a + i);
        for (int l = 0; l < 8 && i + l < count; l++) out[i + l] = s[l];
    }
}

/* dot product with W independent partial sums (vectorised without -ffast-math) */
static inline T FN(dot)(const T *a, const T *b, int64_t C) {
    VT acc = {0};
    int64_t c = 0;
    for (; c + W <= C; c += W) acc += VLD(a + c) * VLD(b + c);
    T s = FN(hsum)(acc);
    for (; c < C; c++) s += a[c] * b[c];
    return s;
}

/* u[c] = sum_j h[j] x[j, c] */
static inline __attribute__((always_inline)) void FN(pre_tok)(const T *restrict xt, const T *restrict h,
                                                               T *restrict u, const int n, const int64_t C) {
    int64_t c = 0;
    for (; c + W <= C; c += W) {
        VT acc = h[0] * VLD(xt + c);
        for (int j = 1; j < n; j++) acc += h[j] * VLD(xt + j * C + c);
        VST(u + c, acc);
    }
    for (; c < C; c++) {
        T acc = h[0] * xt[c];
        for (int j = 1; j < n; j++) acc += h[j] * xt[j * C + c];
        u[c] = acc;
    }
}

/* gx[j, c] = h[j] gu[c] (if gx); gh[j] = <gu, x[j]> (if gh) */
static inline __attribute__((always_inline)) void FN(pre_bwd_tok)(const T *restrict xt, const T *restrict h,
                                                                   const T *restrict gu, T *restrict gx,
                                                                   T *restrict gh, const int n, const int64_t C) {
    VT acc[MAXN + 8];
    for (int j = 0; j < n; j++) acc[j] = (VT){0};
    int64_t c = 0;
    for (; c + W <= C; c += W) {
        const VT g = VLD(gu + c);
        for (int j = 0; j < n; j++) {
            if (gx) VST(gx + j * C + c, h[j] * g);
            if (gh) acc[j] += g * VLD(xt + j * C + c);
        }
    }
    if (gh) {
        FN(reduce_many)(acc, n, gh);
        for (int j = 0; j < n; j++)
            for (int64_t r = c; r < C; r++) gh[j] += gu[r] * xt[j * C + r];
    }
    if (gx)
        for (int j = 0; j < n; j++)
            for (int64_t r = c; r < C; r++) gx[j * C + r] = h[j] * gu[r];
}

/* out[k, c] = h_post[k] y[c] + sum_j h_res[k, j] x[j, c] */
static inline __attribute__((always_inline)) void FN(post_res_tok)(const T *restrict xt, const T *restrict yt,
                                                                    const T *restrict hp, const T *restrict hr,
                                                                    T *restrict o, const int n, const int64_t C) {
    int64_t c = 0;
    if (!hr) { /* h_res = I: x[k] + h_post[k] y (a loop of its own: the general one below keeps its code) */
        for (int k = 0; k < n; k++) {
            for (c = 0; c + W <= C; c += W) VST(o + k * C + c, hp[k] * VLD(yt + c) + VLD(xt + k * C + c));
            for (; c < C; c++) o[k * C + c] = hp[k] * yt[c] + xt[k * C + c];
        }
        return;
    }
    for (; c + W <= C; c += W) {
        VT xv[MAXN];
        for (int j = 0; j < n; j++) xv[j] = VLD(xt + j * C + c);
        const VT yv = VLD(yt + c);
        for (int k = 0; k < n; k++) {
            VT acc = hp[k] * yv;
            for (int j = 0; j < n; j++) acc += hr[k * n + j] * xv[j];
            VST(o + k * C + c, acc);
        }
    }
    for (; c < C; c++)
        for (int k = 0; k < n; k++) {
            T acc = hp[k] * yt[c];
            for (int j = 0; j < n; j++) acc += hr[k * n + j] * xt[j * C + c];
            o[k * C + c] = acc;
        }
}

/* gx[j] = sum_k h_res[k, j] g[k]; gy = sum_k h_post[k] g[k]  (each if not NULL) */
static inline __attribute__((always_inline)) void FN(post_res_bwd_tok)(const T *restrict hp, const T *restrict hr,
                                                                        const T *restrict gt, T *restrict gx,
                                                                        T *restrict gy, const int n, const int64_t C) {
    int64_t c = 0;
    for (; c + W <= C; c += W) {
        VT gv[MAXN] = {{0}};
        for (int k = 0; k < n; k++) gv[k] = VLD(gt + k * C + c);
        if (gx)
            for (int j = 0; j < n; j++) {
                VT acc = hr[j] * gv[0];
                for (int k = 1; k < n; k++) acc += hr[k * n + j] * gv[k];
                VST(gx + j * C + c, acc);
            }
        if (gy) {
            VT acc = hp[0] * gv[0];
            for (int k = 1; k < n; k++) acc += hp[k] * gv[k];
            VST(gy + c, acc);
        }
    }
    for (; c < C; c++) {
        if (gx)
            for (int j = 0; j < n; j++) {
                T acc = hr[j] * gt[c];
                for (int k = 1; k < n; k++) acc += hr[k * n + j] * gt[k * C + c];
                gx[j * C + c] = acc;
            }
        if (gy) {
            T acc = hp[0] * gt[c];
            for (int k = 1; k < n; k++) acc += hp[k] * gt[k * C + c];
            gy[c] = acc;
        }
    }
}

/* gpost[k] = <g[k], y>; gres[k, j] = <g[k], x[j]> (row stride nx) for the n rows of g and nx <= MAXN + 2
 * columns x[j] (ld C), with nx and hasy (gpost) known at compile time: one sweep over C per group of ks
 * rows of g, the ks * m partial-sum vectors held in
 * registers (m = nx + hasy columns: x[0..nx), then y; ks * m <= 12), then reduced together
 * (FN(reduce_many)). Each dot sums its W lanes in the order of c, so the result does not depend on ks.
 * (A runtime m left the partial sums in memory, one store-to-load chain per FMA: the write-back's
 * backward took ~3x the time of its forward.) */
static inline __attribute__((always_inline)) void FN(dots_tok)(const T *restrict xt, const T *restrict yt,
                                                                const T *restrict gt, T *restrict gpost,
                                                                T *restrict gres, const int n, const int64_t C,
                                                                const int nx, const int hasy) {
    const int m = nx + hasy;
    const int ks = m * 4 <= 12 ? 4 : m * 2 <= 12 ? 2 : 1;
    VT acc[MAXN * (MAXN + 3) + 8];
    T sums[MAXN * (MAXN + 3)] ALIGNED;
    const int64_t c0 = C - C % W;
    for (int k0 = 0; k0 < n; k0 += ks) {
        const int kn = n - k0 < ks ? n - k0 : ks;
        VT a[4][MAXN + 3];
        for (int q = 0; q < ks; q++)
            for (int j = 0; j < m; j++) a[q][j] = (VT){0};
        for (int64_t c = 0; c < c0; c += W) {
            VT g[4];
            for (int q = 0; q < ks; q++) g[q] = q < kn ? VLD(gt + (k0 + q) * C + c) : (VT){0};
            for (int j = 0; j < m; j++) {
                const VT v = j < nx ? VLD(xt + j * C + c) : VLD(yt + c);
                for (int q = 0; q < ks; q++) a[q][j] += g[q] * v;
            }
        }
        for (int q = 0; q < kn; q++)
            for (int j = 0; j < m; j++) acc[(k0 + q) * m + j] = a[q][j];
    }
    FN(reduce_many)(acc, n * m, sums);
    for (int k = 0; k < n; k++)
        for (int j = 0; j < m; j++) {
            const T *gk = gt + k * C, *v = j < nx ? xt + j * C : yt;
            T s = sums[k * m + j];
            for (int64_t r = c0; r < C; r++) s += gk[r] * v[r];
            if (j < nx) gres[k * nx + j] = s;
            else gpost[k] = s;
        }
}

/* gpost[k] = <g[k], y>; gres[k, j] = <g[k], x[j]>  (each if not NULL; x / y are only read for the
 * dots asked for) */
static inline __attribute__((always_inline)) void FN(post_res_dots_tok)(const T *restrict xt, const T *restrict yt,
                                                                         const T *restrict gt, T *restrict gpost,
                                                                         T *restrict gres, const int n,
                                                                         const int64_t C) {
    if (gres && gpost) FN(dots_tok)(xt, yt, gt, gpost, gres, n, C, n, 1);
    else if (gres) FN(dots_tok)(xt, NULL, gt, NULL, gres, n, C, n, 0);
    else if (gpost) FN(dots_tok)(NULL, yt, gt, gpost, NULL, n, C, 0, 1);
}

/* The stream gradient of the coefficient backward, one token (gu, g may be NULL; hr NULL: h_res = I):
 *     gx[j] = x[j] coef + h_pre[j] gu + sum_k h_res[k, j] g[k]
 * (norm term, the read's term and, with g = the write-back's output gradient, its dx); withx 0 (a
 * compile-time constant at the call) leaves the norm term out (x is then not read: no 0 * inf). */
static inline __attribute__((always_inline)) void FN(coeffs_gx_tok)(const T *restrict xt, const T *restrict gut,
                                                                     const T *restrict got, const T *restrict hp,
                                                                     const T *restrict hr, const T coef,
                                                                     const int withx, T *restrict gx, const int n,
                                                                     const int64_t C) {
    int64_t c = 0;
    if (got && !hr) { /* h_res = I: g[j] itself (a loop of its own: the general one below keeps its code) */
        for (int j = 0; j < n; j++) {
            for (c = 0; c + W <= C; c += W) {
                VT acc = withx ? VLD(xt + j * C + c) * coef : (VT){0};
                if (gut) acc += hp[j] * VLD(gut + c);
                VST(gx + j * C + c, acc + VLD(got + j * C + c));
            }
            for (; c < C; c++) {
                T acc = withx ? xt[j * C + c] * coef : 0;
                if (gut) acc += hp[j] * gut[c];
                gx[j * C + c] = acc + got[j * C + c];
            }
        }
        return;
    }
    for (; c + W <= C; c += W) {
        VT gv[MAXN] = {{0}};
        if (got)
            for (int k = 0; k < n; k++) gv[k] = VLD(got + k * C + c);
        const VT u = gut ? VLD(gut + c) : (VT){0};
        for (int j = 0; j < n; j++) {
            VT acc = withx ? VLD(xt + j * C + c) * coef : (VT){0};
            if (gut) acc += hp[j] * u;
            if (got)
                for (int k = 0; k < n; k++) acc += hr[k * n + j] * gv[k];
            VST(gx + j * C + c, acc);
        }
    }
    for (; c < C; c++)
        for (int j = 0; j < n; j++) {
            T acc = withx ? xt[j * C + c] * coef : 0;
            if (gut) acc += hp[j] * gut[c];
            if (got)
                for (int k = 0; k < n; k++) acc += hr[k * n + j] * got[k * C + c];
            gx[j * C + c] = acc;
        }
}


int FN(mhc_pre_fwd)(const T *x, const T *h, T *u, int64_t tokens, int n, int64_t C, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++) CALL_N(FN(pre_tok), n, x + t * n * C, h + t * n, u + t * C);
    return 0;
}

/* The read's backward joined by its write-back's (HyperConnection's pair around coefficients computed
 * elsewhere, e.g. HC's), one pass over the tokens: with g the write-back's output gradient,
 *     gx[j] = h_pre[j] gu + sum_k h_res[k, j] g[k],  gh_pre[j] = <gu, x[j]>,  gh_res[k, j] = <g[k], x[j]>
 * (gu or g NULL: no term from it; an output NULL: not computed; gh_pre needs gu, gh_res needs g). */
int FN(mhc_read_bwd)(const T *x, const T *h_pre, const T *h_res, const T *gu, const T *g, T *gx, T *gh_pre,
                     T *gh_res, int64_t tokens, int n, int64_t C, int threads) {
    if (n < 1 || n > MAXN || (gh_pre && !gu) || (gh_res && !g)) return 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++) {
        const T *xt = x + t * n * C, *gut = gu ? gu + t * C : NULL, *gt = g ? g + t * n * C : NULL;
        if (gh_pre) CALL_N(FN(pre_bwd_tok), n, xt, NULL, gut, NULL, gh_pre + t * n);
        if (gh_res) CALL_N(FN(post_res_dots_tok), n, xt, NULL, gt, NULL, gh_res + t * n * n);
        if (gx) CALL_N(FN(coeffs_gx_tok), n, xt, gut, gt, h_pre + t * n, h_res + t * n * n, 0, 0, gx + t * n * C);
    }
    return 0;
}

int FN(mhc_pre_bwd)(const T *x, const T *h, const T *gu, T *gx, T *gh, int64_t tokens, int n, int64_t C, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++)
        CALL_N(FN(pre_bwd_tok), n, x + t * n * C, h ? h + t * n : NULL, gu + t * C, gx ? gx + t * n * C : NULL,
               gh ? gh + t * n : NULL);
    return 0;
}

int FN(mhc_post_res_fwd)(const T *x, const T *y, const T *hp, const T *hr, T *out, int64_t tokens, int n, int64_t C,
                         int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++) {
        if (t + PF_TOKENS < tokens) {
            mhc_prefetch(x + (t + PF_TOKENS) * n * C, sizeof(T) * n * C);
            mhc_prefetch_w(out + (t + PF_TOKENS) * n * C, sizeof(T) * n * C);
        }
        CALL_N(FN(post_res_tok), n, x + t * n * C, y + t * C, hp + t * n, hr ? hr + t * n * n : NULL, out + t * n * C);
    }
    return 0;
}

int FN(mhc_post_res_bwd)(const T *x, const T *y, const T *hp, const T *hr, const T *g, T *gx, T *gy, T *gpost, T *gres,
                         int64_t tokens, int n, int64_t C, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++) {
        const T *gt = g + t * n * C;
        if (gx || gy)
            CALL_N(FN(post_res_bwd_tok), n, hp + t * n, gx ? hr + t * n * n : NULL, gt, gx ? gx + t * n * C : NULL,
                   gy ? gy + t * C : NULL);
        if (gpost || gres)
            CALL_N(FN(post_res_dots_tok), n, gres ? x + t * n * C : NULL, gpost ? y + t * C : NULL, gt,
                   gpost ? gpost + t * n : NULL, gres ? gres + t * n * n : NULL);
    }
    return 0;
}

/* ---- mHC coefficients (Eq. 7-9) ------------------------------------------------------------------ */

#define KB (3 * W) /* projection columns per register block: 4 tokens x 3 vectors of accumulators */

/* phi [nC, K] -> [nC, KP] zero padded (KP = K rounded up to KB), so every block is full width */
static T *FN(pack_phi)(const T *phi, int64_t nC, int K, int *KP) {
    *KP = (K + KB - 1) / KB * KB;
    T *p = calloc((size_t)nC * *KP, sizeof(T));
    if (p)
        for (int64_t i = 0; i < nC; i++) memcpy(p + i * *KP, phi + i * K, sizeof(T) * K);
    return p;
}

/* z rows of 4 tokens (xr) over the columns [kb, kb + NQ W) of phiP: NQ vectors of accumulators per token,
 * one broadcast of x[t][i] per NQ FMAs */
static inline __attribute__((always_inline)) void FN(project_cols)(const T *const xr[4], int64_t nC, const T *phiP,
                                                                    int KP, int kb, const T *r, T *z, int K,
                                                                    int tokens, const int NQ) {
    VT acc[4][3] = {{{0}}};
    const T *ph = phiP + kb;
    for (int64_t i = 0; i < nC; i++, ph += KP) {
        VT p[3];
        for (int q = 0; q < NQ; q++) p[q] = VLD(ph + q * W);
        for (int t = 0; t < 4; t++) {
            const T v = xr[t][i];
            for (int q = 0; q < NQ; q++) acc[t][q] += v * p[q];
        }
    }
    for (int t = 0; t < tokens; t++)
        for (int q = 0; q < NQ; q++) {
            const VT zq = acc[t][q] / r[t];
            for (int l = 0; l < W && kb + q * W + l < K; l++) z[t * K + kb + q * W + l] = zq[l];
        }
}

/* z rows (ld K) of `lanes` tokens = (x rows (ld nC) @ phi) / r, with phiP from FN(pack_phi): for 4
 * tokens at a time, 12 vector accumulators over the nC axis (one broadcast of x[t][i] per 3 FMAs);
 * the last block of columns only as many vectors wide as the rest of K needs. */
static void FN(project_block)(const T *x, int64_t nC, const T *phiP, int KP, const T *r, T *z, int K, int lanes) {
#if ZMM
    zmm_project(x, nC, phiP, KP, r, z, K, lanes);
    return;
#endif
    for (int t0 = 0; t0 < lanes; t0 += 4) {
        const T *xr[4];
        const int tokens = lanes - t0 < 4 ? lanes - t0 : 4;
        for (int t = 0; t < 4; t++) xr[t] = x + (t0 + (t < tokens ? t : tokens - 1)) * nC;
        for (int kb = 0; kb < K; kb += KB) {
            const int rest = K - kb;
            if (rest <= W) FN(project_cols)(xr, nC, phiP, KP, kb, r + t0, z + t0 * K, K, tokens, 1);
            else if (rest <= 2 * W) FN(project_cols)(xr, nC, phiP, KP, kb, r + t0, z + t0 * K, K, tokens, 2);
            else FN(project_cols)(xr, nC, phiP, KP, kb, r + t0, z + t0 * K, K, tokens, 3);
        }
    }
}

/* Forward:  r = sqrt(|v|^2 / nC + eps) (v = x as [T, nC]);  z = (v @ phi) / r  [T, K];  the tail ->
 * h_pre, h_post, h_res;  u = sum_j h_pre[j] x[j] (if u is not NULL). With phi == NULL, z holds
 * v @ phi on entry (from BLAS) and is divided by r in place. One pass over the tokens in blocks
 * of W: x is read from memory once per block and then from cache. */
/* One block of `lanes` <= SB tokens of the forward below; every pointer at the block's first token
 * (x rows of nC, u rows of C, r / z / h_* rows as in the forward). */
static void FN(coeffs_fwd_block)(const T *x, const T *phiP, int KP, T *z, const T *bias, const T *gates,
                                 double rms_eps, T *r, T *h_pre, T *h_post, T *h_res, T *u, int lanes, int n,
                                 int64_t C, int iters) {
    const int K = 2 * n + mhc_kres(n, iters);
    const int64_t nC = n * C;
    for (int l = 0; l < lanes; l++) {
        const T *xt = x + l * nC;
        r[l] = (T)sqrt((double)(FN(dot)(xt, xt, nC) / (T)nC + (T)rms_eps));
    }
    if (phiP) FN(project_block)(x, nC, phiP, KP, r, z, K, lanes);
    else
        for (int l = 0; l < lanes; l++)
            for (int k = 0; k < K; k++) z[l * K + k] /= r[l];
    FN(tail_fwd_block)(z, bias, gates, h_pre, h_post, h_res, lanes, n, iters);
    if (u)
        for (int l = 0; l < lanes; l++) CALL_N(FN(pre_tok), n, x + l * nC, h_pre + l * n, u + l * C);
}

int FN(mhc_coeffs_fwd)(const T *x, const T *phi, T *z, const T *bias, const T *gates, double rms_eps, T *r, T *h_pre,
                       T *h_post, T *h_res, T *u, int64_t tokens, int n, int64_t C, int iters, int threads) {
    if (!mhc_tail_ok(n, iters)) return 1;
    const int K = 2 * n + mhc_kres(n, iters), nn = n * n;
    const int64_t nC = n * C, blocks = (tokens + SB - 1) / SB;
    int KP = 0;
    T *phiP = NULL;
    if (phi && !(phiP = FN(pack_phi)(phi, nC, K, &KP))) return 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t t0 = b * SB;
        const int lanes = tokens - t0 < SB ? (int)(tokens - t0) : SB;
        if (t0 + lanes < tokens) /* the next block's rows, while this one computes */
            mhc_prefetch(x + (t0 + lanes) * nC, sizeof(T) * (tokens - t0 - lanes < SB ? tokens - t0 - lanes : SB) * nC);
        FN(coeffs_fwd_block)(x + t0 * nC, phiP, KP, z + t0 * K, bias, gates, rms_eps, r + t0, h_pre + t0 * n,
                             h_post + t0 * n, h_res ? h_res + t0 * nn : NULL, u ? u + t0 * C : NULL, lanes, n, C,
                             iters);
    }
    free(phiP);
    return 0;
}

/* dphi columns [kb, kb + NQ W) += x rows^T @ G for 4 tokens */
static inline __attribute__((always_inline)) void FN(rank4_cols)(const T *const xr[4], const T *G, int KP, T *dphi,
                                                                  int64_t nC, int kb, const int NQ) {
    VT g[4][3];
    for (int t = 0; t < 4; t++)
        for (int q = 0; q < NQ; q++) g[t][q] = VLD(G + t * KP + kb + q * W);
    T *dp = dphi + kb;
    for (int64_t i = 0; i < nC; i++, dp += KP) {
        VT a[3];
        for (int q = 0; q < NQ; q++) a[q] = VLD(dp + q * W);
        for (int t = 0; t < 4; t++) {
            const T v = xr[t][i];
            for (int q = 0; q < NQ; q++) a[q] += v * g[t][q];
        }
        for (int q = 0; q < NQ; q++) VST(dp + q * W, a[q]);
    }
}

/* dphi [nC, KP] += x rows^T @ G for 4 tokens (x rows ld nC; G rows ld KP, zero past K): blocks of KB
 * columns, the last one only as many vectors wide as the rest of K needs (the columns past it stay 0) */
static void FN(rank4_update)(const T *const xr[4], const T *G, int KP, int K, T *dphi, int64_t nC) {
    for (int kb = 0; kb < K; kb += KB) {
        const int rest = K - kb;
        if (rest <= W) FN(rank4_cols)(xr, G, KP, dphi, nC, kb, 1);
        else if (rest <= 2 * W) FN(rank4_cols)(xr, G, KP, dphi, nC, kb, 2);
        else FN(rank4_cols)(xr, G, KP, dphi, nC, kb, 3);
    }
}

/* gx rows [i0, i0 + NQ W) of NT tokens += G @ phi^T (phiT [K, nC], G rows ld KP) */
static inline __attribute__((always_inline)) void FN(gx_chunk)(T *const *gr, const T *G, int KP, const T *phiT, int K,
                                                                int64_t nC, int64_t i0, const int NQ, const int NT) {
    VT acc[4][3];
    for (int t = 0; t < NT; t++)
        for (int q = 0; q < NQ; q++) acc[t][q] = VLD(gr[t] + i0 + q * W);
    for (int k = 0; k < K; k++) {
        VT p[3];
        for (int q = 0; q < NQ; q++) p[q] = VLD(phiT + k * nC + i0 + q * W);
        for (int t = 0; t < NT; t++) {
            const T g = G[t * KP + k];
            for (int q = 0; q < NQ; q++) acc[t][q] += g * p[q];
        }
    }
    for (int t = 0; t < NT; t++)
        for (int q = 0; q < NQ; q++) VST(gr[t] + i0 + q * W, acc[t][q]);
}

/* gx rows (NT = 4 or 1 tokens, ld nC) += G @ phi^T, in chunks of 3 W, then W, then scalars */
static inline __attribute__((always_inline)) void FN(gx_matmul)(T *const *gr, const T *G, int KP, const T *phiT, int K,
                                                                 int64_t nC, const int NT) {
    int64_t i = 0;
    for (; i + KB <= nC; i += KB) FN(gx_chunk)(gr, G, KP, phiT, K, nC, i, 3, NT);
    for (; i + W <= nC; i += W) FN(gx_chunk)(gr, G, KP, phiT, K, nC, i, 1, NT);
    for (; i < nC; i++)
        for (int t = 0; t < NT; t++) {
            T a = gr[t][i];
            for (int k = 0; k < K; k++) a += G[t * KP + k] * phiT[k * nC + i];
            gr[t][i] = a;
        }
}

/* Backward:
 *     g_pre += <gu, x[j]> (the read u = sum_j h_pre[j] x[j], if gu);
 *     g_res += <g_out[k], x[j]> (if g_out: the output gradient of the write-back
 *              x_new[k] = sum_j h_res[k, j] x[j] + h_post[k] y, whose dx is then added to gx below);
 *     da through the tail;
 *     dbias = sum_T da;  dalpha[s] = sum_T sum_{k in slice s} da z;  gzr = gate da / r  [T, K];
 *     gx = x * coef + h_pre[j] gu + sum_k h_res[k, j] g_out[k] (+ gzr @ phi^T)
 *          with  coef = -sum_K(gzr z) / (nC r)   (if gx; h_res is the tail's recomputed Sinkhorn output);
 *     dphi = v^T gzr (if dphi).
 * With phi != NULL the two matmuls run here (dphi summed per thread, then over threads; gzr may then
 * be NULL); with phi == NULL, gzr [T, K] is written and the caller runs them (BLAS): dphi = v^T gzr,
 * gx += gzr phi^T. dbias / dalpha are summed per thread, then over threads in a fixed order. */
typedef struct {
    const T *x, *gu, *g_out, *z, *r, *bias, *gates, *gk, *g_pre, *g_post, *g_res, *phiT, *zero;
    T *gzr, *gx, *part, *dphiP; /* part: per thread 2K sums; dphiP: per thread [nC, KP] (NULL: no dphi) */
    int64_t C, tokens;
    int n, iters;
    const void *aux; /* the half-precision entry points' stream pointers (mhc_cpu_half.h) */
} FN(coeffs_bwd_ctx);

/* One block of `lanes` tokens from t0: the stream rows x, gu, g_out, gx at the block's first token
 * (gu, g_out, gx may be NULL); the rest from c (whole-tensor pointers). */
static void FN(coeffs_bwd_block)(const FN(coeffs_bwd_ctx) *c, FN(scratch_t) *s, const T *x, const T *gu,
                                 const T *g_out, T *gx, int64_t t0, int lanes, int me) {
    const T *z = c->z, *r = c->r, *gk = c->gk;
    const T *g_pre = c->g_pre, *g_post = c->g_post, *g_res = c->g_res, *phiT = c->phiT, *zero = c->zero;
    T *gzr = c->gzr;
    const int n = c->n, nn = n * n, iters = c->iters, K = 2 * n + mhc_kres(n, iters), KP = (K + KB - 1) / KB * KB;
    const int64_t C = c->C, nC = n * C;
    T *acc = c->part + (size_t)me * 2 * K, *dp = c->dphiP ? c->dphiP + (size_t)me * nC * KP : NULL;
    T gp[SB * MAXN] ALIGNED, hp[SB * MAXN] ALIGNED, gr[SB * MAXN * MAXN] ALIGNED, hr[SB * MAXN * MAXN] ALIGNED;
    T da[SB * (2 * MAXN + MAXN * MAXN)] ALIGNED;
    T G[SB * (2 * MAXN + MAXN * MAXN + KB)] ALIGNED; /* gzr rows of the block, ld KP, zero padded */
    const T *gpre = g_pre ? g_pre + t0 * n : NULL, *gres = g_res ? g_res + t0 * nn : NULL;
    for (int l = 0; l < lanes && (gu || g_out); l++) { /* dots with x[t], read once */
        const int64_t t = t0 + l;
        if (gu) {
            CALL_N(FN(pre_bwd_tok), n, x + l * nC, NULL, gu + l * C, NULL, gp + l * n);
            if (g_pre)
                for (int j = 0; j < n; j++) gp[l * n + j] += g_pre[t * n + j];
        }
        if (g_out && iters != MHC_IDENTITY) { /* h_res = I has no gradient to take */
            CALL_N(FN(post_res_dots_tok), n, x + l * nC, NULL, g_out + l * nC, NULL, gr + l * nn);
            if (g_res)
                for (int i = 0; i < nn; i++) gr[l * nn + i] += g_res[t * nn + i];
        }
    }
    if (gu) gpre = gp;
    const int ident = iters == MHC_IDENTITY;
    if (g_out && !ident) gres = gr;
    FN(tail_bwd_block)(s, z + t0 * K, c->bias, c->gates, gpre, g_post ? g_post + t0 * n : NULL, gres, da,
                       hp, g_out && !ident ? hr : NULL, lanes, n, iters);
    memset(G, 0, sizeof(T) * SB * KP);
    for (int l = 0; l < lanes; l++) { /* gzr = gate da / r, sum_K gzr z; dbias, dalpha parts */
        const int64_t t = t0 + l;
        const T rt = r[t], *zt = z + t * K, *dl = da + l * K;
        T *Gl = G + l * KP;
        VT czv = {0};
        int k = 0;
        for (; k + W <= K; k += W) {
            const VT d = VLD(dl + k), zk = VLD(zt + k), g = VLD(gk + k) * d / rt;
            VST(acc + k, VLD(acc + k) + d);
            VST(acc + K + k, VLD(acc + K + k) + d * zk);
            VST(Gl + k, g);
            czv += g * zk;
        }
        T cz = FN(hsum)(czv);
        for (; k < K; k++) {
            const T d = dl[k], g = gk[k] * d / rt;
            acc[k] += d;
            acc[K + k] += d * zt[k];
            Gl[k] = g;
            cz += g * zt[k];
        }
        if (gzr) memcpy(gzr + t * K, G + l * KP, sizeof(T) * K);
        if (gx)
            CALL_N(FN(coeffs_gx_tok), n, x + l * nC, gu ? gu + l * C : NULL,
                   g_out ? g_out + l * nC : NULL, hp + l * n, ident ? NULL : hr + l * nn, cz / (-(T)nC * rt), 1,
                   gx + l * nC);
    }
    if (!c->phiT) return;
#if ZMM /* dphi per thread as [K, nC] (see coeffs_bwd_run) */
    if (dp) zmm_dphi(x, nC, G, KP, K, lanes, dp);
    for (int l0 = 0; gx && l0 < lanes; l0 += 4) {
        T *gxr[4];
        for (int t = 0; t < 4; t++) gxr[t] = gx + (l0 + t < lanes ? l0 + t : l0) * nC;
        if (l0 + 4 <= lanes) zmm_gx(gxr, G + l0 * KP, KP, phiT, K, nC, 4);
        else
            for (int t = l0; t < lanes; t++) {
                T *row = gx + t * nC;
                zmm_gx(&row, G + t * KP, KP, phiT, K, nC, 1);
            }
    }
    return;
#endif
    for (int l0 = 0; l0 < lanes; l0 += 4) { /* 4 tokens at a time; absent ones read zeros */
        const T *xr[4];
        T *gxr[4];
        for (int t = 0; t < 4; t++) xr[t] = l0 + t < lanes ? x + (l0 + t) * nC : zero;
        if (dp) FN(rank4_update)(xr, G + l0 * KP, KP, K, dp, nC);
        if (!gx) continue;
        for (int t = 0; t < 4; t++) gxr[t] = gx + (l0 + t < lanes ? l0 + t : l0) * nC;
        if (l0 + 4 <= lanes) FN(gx_matmul)(gxr, G + l0 * KP, KP, phiT, K, nC, 4);
        else /* a partial group: one token at a time */
            for (int t = l0; t < lanes; t++) {
                T *row = gx + t * nC;
                FN(gx_matmul)(&row, G + t * KP, KP, phiT, K, nC, 1);
            }
    }
}

static void FN(coeffs_bwd_body)(const void *ctx, FN(scratch_t) *s, int64_t t0, int lanes, int me) {
    const FN(coeffs_bwd_ctx) *c = ctx;
    const int64_t C = c->C, nC = c->n * C, t1 = t0 + lanes, next = c->tokens - t1 < SB ? c->tokens - t1 : SB;
    if (next > 0) { /* the next block's stream rows, while this one computes */
        mhc_prefetch(c->x + t1 * nC, sizeof(T) * next * nC);
        if (c->g_out) mhc_prefetch(c->g_out + t1 * nC, sizeof(T) * next * nC);
        if (c->gu) mhc_prefetch(c->gu + t1 * C, sizeof(T) * next * C);
        if (c->gx) mhc_prefetch_w(c->gx + t1 * nC, sizeof(T) * next * nC);
    }
    FN(coeffs_bwd_block)(c, s, c->x + t0 * nC, c->gu ? c->gu + t0 * C : NULL, c->g_out ? c->g_out + t0 * nC : NULL,
                         c->gx ? c->gx + t0 * nC : NULL, t0, lanes, me);
}

/* The backward with `body` run on every block (given `extra` per-thread scratch values and `aux`). */
static int FN(coeffs_bwd_run)(const T *x, const T *gu, const T *g_out, const T *z, const T *r, const T *bias,
                              const T *gates, const T *g_pre, const T *g_post, const T *g_res, const T *phi, T *gzr,
                              T *gx, T *dphi, T *dbias, T *dalpha, int64_t tokens, int n, int64_t C, int iters,
                              int threads, FN(block_body) body, size_t extra, const void *aux) {
    if (!mhc_tail_ok(n, iters) || threads < 1) return 1;
    const int K = 2 * n + mhc_kres(n, iters), KP = (K + KB - 1) / KB * KB;
    const int64_t nC = n * C;
    T *part = mhc_alloc(sizeof(T) * (size_t)threads * 2 * K, 1); /* per thread: sum_T da, sum_T da z (per column) */
    T *phiT = NULL, *dphiP = NULL, *zero = NULL;
    T gk[2 * MAXN + MAXN * MAXN] ALIGNED; /* the gate of each column */
    for (int k = 0; k < K; k++) gk[k] = gates[k < n ? 0 : k < 2 * n ? 1 : 2];
    if (phi) {
        phiT = mhc_alloc(sizeof(T) * (size_t)nC * K, 0);
        dphiP = mhc_alloc(sizeof(T) * (size_t)threads * nC * KP, 1);
        zero = mhc_alloc(sizeof(T) * (size_t)nC, 1);
        if (phiT)
            for (int64_t i = 0; i < nC; i++)
                for (int k = 0; k < K; k++) phiT[k * nC + i] = phi[i * K + k];
    }
    int err = !part || (phi && (!phiT || !dphiP || !zero)) ? 2 : 0;
    if (!err) {
        const FN(coeffs_bwd_ctx) c = {x, gu, g_out, z, r, bias, gates, gk, g_pre, g_post, g_res, phiT, zero,
                                      gzr, gx, part, dphi ? dphiP : NULL, C, tokens, n, iters, aux};
        err = FN(for_blocks)(tokens, n, iters, threads, extra, body, &c);
    }
    if (!err) {
        dalpha[0] = dalpha[1] = dalpha[2] = 0;
        for (int k = 0; k < K; k++) { /* over threads in a fixed order, then the columns of each slice */
            T sum = 0, sumz = 0;
            for (int th = 0; th < threads; th++) {
                sum += part[(size_t)th * 2 * K + k];
                sumz += part[(size_t)th * 2 * K + K + k];
            }
            dbias[k] = sum;
            dalpha[k < n ? 0 : k < 2 * n ? 1 : 2] += sumz;
        }
        if (phi && dphi)
            for (int64_t i = 0; i < nC; i++)
                for (int k = 0; k < K; k++) {
                    T sum = 0;
                    for (int th = 0; th < threads; th++) /* ZMM: per thread [K, nC], else [nC, KP] */
                        sum += ZMM ? dphiP[(size_t)th * nC * KP + (size_t)k * nC + i]
                                   : dphiP[((size_t)th * nC + i) * KP + k];
                    dphi[i * K + k] = sum;
                }
    }
    free(part), free(phiT), free(dphiP), free(zero);
    return err;
}

int FN(mhc_coeffs_bwd)(const T *x, const T *gu, const T *g_out, const T *z, const T *r, const T *bias, const T *gates,
                       const T *g_pre, const T *g_post, const T *g_res, const T *phi, T *gzr, T *gx, T *dphi, T *dbias,
                       T *dalpha, int64_t tokens, int n, int64_t C, int iters, int threads) {
    return FN(coeffs_bwd_run)(x, gu, g_out, z, r, bias, gates, g_pre, g_post, g_res, phi, gzr, gx, dphi, dbias, dalpha,
                              tokens, n, C, iters, threads, FN(coeffs_bwd_body), 0, NULL);
}

/* ---- Hyper-Connections (arXiv 2409.19606), dynamic: coefficients with the read, and their backward ----
 * Per token and stream j, with m = n + 2 columns q of W = [w_pre | w_post | w_res] (given transposed,
 * WT [m, C]) and the scales sa, sb (mhckit.reference.hc_coeffs):
 *     r_j = sqrt(|x_j|^2 / C + eps),  z_jq = <x_j, W[:, q]> / r_j,  t = tanh(z)
 *     h_pre[j] = sp[j] + sa t_j0,  h_post[j] = spo[j] + sb t_j1,  h_res[k][j] = sr[j][k] + sa t_j(2+k)
 *     u = sum_j h_pre[j] x_j
 * (row j of A_r = sr + sa tanh(...) comes from stream j; h_res = A_r^T in mhckit's convention). */

/* tanh of every lane. float: odd polynomial below 0.625 (Cephes tanhf, ~2 ulp), 1 - 2 / (e^2|x| + 1)
 * with the sign above (no cancellation near 0); double: libm per lane. */
static inline VT FN(vtanh)(VT x) {
#if VEXP_POLY
    const VT zero = {0}, one = zero + 1;
    const VT ax = VSEL(x < zero, -x, x), z = x * x;
    VT p = zero + (T)-5.70498872745e-3;
    p = p * z + (T)2.06390887954e-2;
    p = p * z + (T)-5.37397155531e-2;
    p = p * z + (T)1.33314422036e-1;
    p = p * z + (T)-3.33332819422e-1;
    const VT small = p * z * x + x;
    const VT e = VEXP(VSEL(ax > zero + 44, zero + 88, ax + ax)); /* e^{2|x|}; beyond 44: tanh = 1 */
    VT big = one - (T)2 / (e + one);
    big = VSEL(x < zero, -big, big);
    return VSEL(ax < zero + (T)0.625, small, big);
#else
    VT r;
    for (int l = 0; l < W; l++) r[l] = TANH(x[l]);
    return r;
#endif
}

/* tanh of the count values of t (in place), in vectors; t has room for count rounded up to W values
 * (the extra ones are zeroed first) */
static inline void FN(tanh_row)(T *t, int count) {
    for (int i = count; i % W; i++) t[i] = 0;
    for (int i = 0; i < count; i += W) VST(t + i, FN(vtanh)(VLD(t + i)));
}

#define HC_COLS(n) ((n) + 2)

/* one token: r (n), z (n*m) and, from them, the coefficients and u */
static inline __attribute__((always_inline)) void FN(hc_fwd_tok)(const T *restrict xt, const T *restrict WT,
                                                                  const T *sp, const T *spo, const T *sr, T sa, T sb,
                                                                  double eps, T *restrict zt, T *restrict rt,
                                                                  T *restrict hp, T *restrict hq, T *restrict hr,
                                                                  T *restrict ut, const int n, const int64_t C) {
    const int m = HC_COLS(n);
    T th[MAXN * (MAXN + 2) + W] ALIGNED;
    FN(dots_tok)(WT, NULL, xt, NULL, th, n, C, m, 0); /* th[j][q] = <x_j, WT[q]> */
    for (int j = 0; j < n; j++) {
        rt[j] = (T)sqrt((double)(FN(dot)(xt + j * C, xt + j * C, C) / (T)C + (T)eps));
        for (int q = 0; q < m; q++) zt[j * m + q] = th[j * m + q] = th[j * m + q] / rt[j];
    }
    FN(tanh_row)(th, n * m);
    for (int j = 0; j < n; j++) {
        hp[j] = sp[j] + sa * th[j * m];
        hq[j] = spo[j] + sb * th[j * m + 1];
        for (int k = 0; k < n; k++) hr[k * n + j] = sr[j * n + k] + sa * th[j * m + 2 + k];
    }
    if (ut) FN(pre_tok)(xt, hp, ut, n, C);
}

/* WT [m, C] = [w_pre | w_post | w_res]^T from the module's parameters w_pre [C], w_post [C], w_res [C, n]
 * (malloc'd; NULL if out of memory) */
static T *FN(hc_pack_w)(const T *wp, const T *wq, const T *wr, int n, int64_t C) {
    T *WT = mhc_alloc(sizeof(T) * (size_t)HC_COLS(n) * C, 0);
    if (WT)
        for (int64_t c = 0; c < C; c++) {
            WT[c] = wp[c], WT[C + c] = wq[c];
            for (int k = 0; k < n; k++) WT[(2 + k) * C + c] = wr[c * n + k];
        }
    return WT;
}

int FN(mhc_hc_fwd)(const T *x, const T *wp, const T *wq, const T *wr, const T *sp, const T *spo, const T *sr,
                   const T *sa_, const T *sb_, double eps, T *z, T *r, T *h_pre, T *h_post, T *h_res, T *u,
                   int64_t tokens, int n, int64_t C, int threads) {
    if (n < 1 || n > MAXN) return 1;
    const int m = HC_COLS(n);
    const T sa = *sa_, sb = *sb_;
    T *WT = FN(hc_pack_w)(wp, wq, wr, n, C);
    if (!WT) return 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++)
        CALL_N(FN(hc_fwd_tok), n, x + t * n * C, WT, sp, spo, sr, sa, sb, eps, z + t * n * m, r + t * n, h_pre + t * n,
               h_post + t * n, h_res + t * n * n, u ? u + t * C : NULL);
    free(WT);
    return 0;
}

/* Backward, one token, with g_u (the read's gradient) and g (the write-back's output gradient, whose
 * dx h_res^T g and dh_res = <g[k], x_j> join here) each optional:
 *     gh_pre = g_pre + <g_u, x_j>,  gh_res = g_res + <g[k], x_j>,  gh_post = g_post
 *     dt_j0 = sa gh_pre[j], dt_j1 = sb gh_post[j], dt_j(2+k) = sa gh_res[k][j];  gzr = dt (1 - t^2) / r_j
 *     dx_j = gzr_j @ WT - x_j sum_q(gzr_jq z_jq) / (C r_j) + h_pre[j] g_u + sum_k h_res[k][j] g[k]
 *     part: dWT[q] += gzr_jq x_j, the statics' and the scales' sums (per thread, summed in a fixed order) */
static inline __attribute__((always_inline)) void FN(hc_bwd_tok)(
    const T *restrict xt, const T *restrict gut, const T *restrict got, const T *restrict zt, const T *restrict rt,
    const T *restrict WT, const T *sp, const T *sr, T sa, T sb, const T *gpre, const T *gpost, const T *gres,
    T *restrict gx, T *restrict part, const int n, const int64_t C) {
    const int m = HC_COLS(n), nn = n * n;
    T *dWT = part, *dsp = part + m * C, *dspo = dsp + n, *dsr = dspo + n, *dsc = dsr + nn;
    T th[MAXN * (MAXN + 2) + W] ALIGNED, gp[MAXN] ALIGNED, gr[MAXN * MAXN] ALIGNED;
    T hp[MAXN], hr[MAXN * MAXN], gz[MAXN * (MAXN + 2)], cz[MAXN];
    for (int j = 0; j < n; j++) gp[j] = gpre ? gpre[j] : 0;
    for (int i = 0; i < nn; i++) gr[i] = gres ? gres[i] : 0;
    if (gut) {
        T d[MAXN] ALIGNED;
        FN(pre_bwd_tok)(xt, NULL, gut, NULL, d, n, C);
        for (int j = 0; j < n; j++) gp[j] += d[j];
    }
    if (got) {
        T d[MAXN * MAXN] ALIGNED;
        FN(post_res_dots_tok)(xt, NULL, got, NULL, d, n, C);
        for (int i = 0; i < nn; i++) gr[i] += d[i];
    }
    memcpy(th, zt, sizeof(T) * n * m);
    FN(tanh_row)(th, n * m);
    T sca = 0, scb = 0; /* this token's terms of dscales, summed here (registers), then added once */
    for (int j = 0; j < n; j++) {
        const T gq = gpost ? gpost[j] : 0, rinv = 1 / rt[j];
        hp[j] = sp[j] + sa * th[j * m];
        dsp[j] += gp[j];
        dspo[j] += gq;
        sca += th[j * m] * gp[j];
        scb += th[j * m + 1] * gq;
        T dt[MAXN + 2];
        dt[0] = sa * gp[j];
        dt[1] = sb * gq;
        for (int k = 0; k < n; k++) {
            const T g = gr[k * n + j];
            hr[k * n + j] = sr[j * n + k] + sa * th[j * m + 2 + k];
            dsr[j * n + k] += g;
            sca += th[j * m + 2 + k] * g;
            dt[2 + k] = sa * g;
        }
        T c = 0;
        for (int q = 0; q < m; q++) {
            const T tq = th[j * m + q];
            gz[j * m + q] = dt[q] * (1 - tq * tq) * rinv;
            c += gz[j * m + q] * zt[j * m + q];
        }
        cz[j] = -c * rinv / (T)C;
    }
    dsc[0] += sca;
    dsc[1] += scb;
    for (int64_t c = 0; c + W <= C || c < C; c += W) {
        const int vec = c + W <= C;
        VT gv[MAXN] = {{0}};
        if (vec && got)
            for (int k = 0; k < n; k++) gv[k] = VLD(got + k * C + c);
        const VT uv = vec && gut ? VLD(gut + c) : (VT){0};
        VT wv[MAXN + 2], xs[MAXN];
        if (vec)
            for (int q = 0; q < m; q++) wv[q] = VLD(WT + q * C + c);
        for (int j = 0; j < n; j++) {
            if (!vec) { /* the C % W rest, one value at a time */
                for (int64_t i = c; i < C; i++) {
                    const T xv = xt[j * C + i];
                    T a = xv * cz[j];
                    if (gut) a += hp[j] * gut[i];
                    if (got)
                        for (int k = 0; k < n; k++) a += hr[k * n + j] * got[k * C + i];
                    for (int q = 0; q < m; q++) {
                        a += gz[j * m + q] * WT[q * C + i];
                        dWT[q * C + i] += gz[j * m + q] * xv;
                    }
                    if (gx) gx[j * C + i] = a;
                }
                continue;
            }
            const VT xv = xs[j] = VLD(xt + j * C + c);
            VT a = xv * cz[j];
            if (gut) a += hp[j] * uv;
            if (got)
                for (int k = 0; k < n; k++) a += hr[k * n + j] * gv[k];
            for (int q = 0; q < m; q++) a += gz[j * m + q] * wv[q];
            if (gx) VST(gx + j * C + c, a);
        }
        if (!vec) break;
        /* dWT[q] += sum_j gz_jq x_j: the streams summed in a register, in the order j = 0, 1, ...
         * (one load and one store of dWT per column and chunk, not one per stream) */
        for (int q = 0; q < m; q++) {
            VT acc = VLD(dWT + q * C + c);
            for (int j = 0; j < n; j++) acc += gz[j * m + q] * xs[j];
            VST(dWT + q * C + c, acc);
        }
    }
}

/* The backward's per-thread sums (rows of `stride` values: dWT [m, C] (w_pre, w_post, then w_res's
 * columns), dsp [n], dspo [n], dsr [n, n], dsa, dsb), each summed over the threads in a fixed order
 * into the parameters' gradients, laid out as the parameters. */
static void FN(hc_bwd_sums)(const T *part, size_t stride, int threads, int n, int64_t C, T *dwp, T *dwq, T *dwr,
                            T *dsp, T *dspo, T *dsr, T *dsa, T *dsb) {
    const int m = HC_COLS(n), nn = n * n;
    const size_t width = (size_t)m * C + 2 * n + nn + 2;
    T *tail[2 * MAXN + MAXN * MAXN + 2];
    for (int j = 0; j < n; j++) tail[j] = dsp + j, tail[n + j] = dspo + j;
    for (int i = 0; i < nn; i++) tail[2 * n + i] = dsr + i;
    tail[2 * n + nn] = dsa, tail[2 * n + nn + 1] = dsb;
    for (size_t i = 0; i < width; i++) {
        T sum = 0;
        for (int th = 0; th < threads; th++) sum += part[stride * th + i];
        const int q = (int)(i / C);
        const int64_t c = (int64_t)(i % C);
        if (q >= m) *tail[i - (size_t)m * C] = sum;
        else if (q == 0) dwp[c] = sum;
        else if (q == 1) dwq[c] = sum;
        else dwr[c * n + (q - 2)] = sum; /* dWT row 2 + k is column k of w_res [C, n] */
    }
}

/* The backward's frame: WT from the parameters, per-thread sums, body(c, t, mine, scratch) for every
 * token t (scratch: `extra` values per thread, for the half entry points' converted rows), then the
 * sums into the parameters' gradients. c->WT, c->sa, c->sb are set here. */
typedef struct {
    const T *x, *gu, *g_out, *z, *r, *WT, *sp, *sr, *g_pre, *g_post, *g_res;
    T *gx, sa, sb;
    const void *aux; /* the half-precision entry points' stream pointers (mhc_cpu_half.h) */
} FN(hc_bwd_ctx);
typedef void (*FN(hc_tok_body))(const FN(hc_bwd_ctx) *c, int64_t t, T *mine, T *scratch, int n, int64_t C);

static int FN(hc_bwd_run)(FN(hc_bwd_ctx) *c, const T *wp, const T *wq, const T *wr, const T *sa, const T *sb,
                          T *dwp, T *dwq, T *dwr, T *dsp, T *dspo, T *dsr, T *dsa, T *dsb, int64_t tokens, int n,
                          int64_t C, int threads, size_t extra, FN(hc_tok_body) body) {
    if (n < 1 || n > MAXN || threads < 1) return 1;
    const int m = HC_COLS(n), nn = n * n;
    const size_t width = (size_t)m * C + 2 * n + nn + 2, stride = (width + 15) & ~(size_t)15;
    T *part = mhc_alloc(sizeof(T) * stride * threads, 1), *WT = FN(hc_pack_w)(wp, wq, wr, n, C);
    int err = !part || !WT ? 2 : 0;
    c->WT = WT, c->sa = *sa, c->sb = *sb;
    if (!err) {
#pragma omp parallel num_threads(threads)
        {
#ifdef _OPENMP
            T *mine = part + stride * omp_get_thread_num();
#else
            T *mine = part;
#endif
            T *scratch = extra ? mhc_alloc(sizeof(T) * extra, 0) : NULL;
            if (extra && !scratch) {
#pragma omp atomic write
                err = 2;
            }
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tokens; t++)
                if (!extra || scratch) body(c, t, mine, scratch, n, C);
            free(scratch);
        }
    }
    if (!err) FN(hc_bwd_sums)(part, stride, threads, n, C, dwp, dwq, dwr, dsp, dspo, dsr, dsa, dsb);
    free(part), free(WT);
    return err;
}

static void FN(hc_bwd_body)(const FN(hc_bwd_ctx) *c, int64_t t, T *mine, T *scratch, int n, int64_t C) {
    const int m = HC_COLS(n), nn = n * n;
    (void)scratch;
    CALL_N(FN(hc_bwd_tok), n, c->x + t * n * C, c->gu ? c->gu + t * C : NULL, c->g_out ? c->g_out + t * n * C : NULL,
           c->z + t * n * m, c->r + t * n, c->WT, c->sp, c->sr, c->sa, c->sb, c->g_pre ? c->g_pre + t * n : NULL,
           c->g_post ? c->g_post + t * n : NULL, c->g_res ? c->g_res + t * nn : NULL,
           c->gx ? c->gx + t * n * C : NULL, mine);
}

/* Backward over the tokens; dwp / dwq [C], dwr [C, n] (as the parameters), dsp / dspo [n], dsr [n, n]
 * (as sr), dsa / dsb (one value each). */
int FN(mhc_hc_bwd)(const T *x, const T *gu, const T *g_out, const T *z, const T *r, const T *wp, const T *wq,
                   const T *wr, const T *sp, const T *sr, const T *sa, const T *sb, const T *g_pre, const T *g_post,
                   const T *g_res, T *gx, T *dwp, T *dwq, T *dwr, T *dsp, T *dspo, T *dsr, T *dsa, T *dsb,
                   int64_t tokens, int n, int64_t C, int threads) {
    FN(hc_bwd_ctx) c = {x, gu, g_out, z, r, NULL, sp, sr, g_pre, g_post, g_res, gx, 0, 0, NULL};
    return FN(hc_bwd_run)(&c, wp, wq, wr, sa, sb, dwp, dwq, dwr, dsp, dspo, dsr, dsa, dsb, tokens, n, C, threads, 0,
                          FN(hc_bwd_body));
}

#undef KB
#undef SHUF
#undef VLD
#undef VST
#undef VT
#undef IV
#undef VSEL
#undef VMAX
#undef VEXP
/* this instantiation's parameters (set by mhc_cpu.c before each include) */
#undef ITYPE
#undef ZMM
#undef VEXP_POLY
#undef T
#undef SUFFIX
#undef TINY
#undef EXP
#undef TANH
#undef HC_COLS
