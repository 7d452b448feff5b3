/* Part of mhc_cpu_impl.h, instantiated once per floating type (T, FN, W, SB, ... as mhc_cpu.c and the parts before
 * this one define them): the coefficient tail: gates, sigmoids and the Sinkhorn / permutation-mixture / identity
 * h_res of a block of tokens, and its backward. */

/* ---- coefficient tail on one block of <= SB tokens (pointers at the block's first row) --------- */

/* sigmoid(bias + gate * a) for the SB lanes of a column a (contiguous) */
static inline void FN(sigmoid_lanes)(const T *a, T bias, T gate, VT *out) {
    for (int h = 0; h < HH_; h++) out[h] = 1 / (1 + VEXP(-(bias + VLD(a + h * W) * gate)));
}

/* sigmoid(bias[i] + gate * z[l, i]) for the SB lanes of column i (absent lanes: z = 0) */
static inline void FN(sigmoid_col)(const T *z, int K, int i, T bias, T gate, int lanes, VT *out) {
    T a[SB] ALIGNED;
    for (int l = 0; l < SB; l++) a[l] = l < lanes ? z[l * K + i] : 0;
    FN(sigmoid_lanes)(a, bias, gate, out);
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
#if ZMM /* the block's z rows as columns of 16 lanes, and the coefficients back to rows, by register transposes */
    T zT[2 * MAXN][SB] ALIGNED, hT[2 * MAXN][SB] ALIGNED;
    zmm_rows_to_cols(z, K, lanes, 2 * n, zT);
    for (int i = 0; i < 2 * n; i++) {
        VT sg[HH_];
        FN(sigmoid_lanes)(zT[i], bias[i], gates[i < n ? 0 : 1], sg);
        for (int h = 0; h < HH_; h++) VST(hT[i] + h * W, i < n ? sg[h] : 2 * sg[h]);
    }
    zmm_cols_to_rows((const float(*)[SB])hT, n, h_pre, n, lanes);
    zmm_cols_to_rows((const float(*)[SB])(hT + n), n, h_post, n, lanes);
    if (iters == MHC_IDENTITY) return;
    if (iters != MHC_PERMUTATIONS) {
        for (int c0 = 0; c0 < nn; c0 += 16) { /* absent lanes: 0, then bias (their results are not written) */
            zmm_rows_to_cols(z + 2 * n + c0, K, lanes, nn - c0 < 16 ? nn - c0 : 16, m + c0);
            for (int i = c0; i < c0 + 16 && i < nn; i++)
                for (int h = 0; h < HH_; h++) VST(m[i] + h * W, bias[2 * n + i] + VLD(m[i] + h * W) * gates[2]);
        }
        FN(skb_fwd2)(m, n, iters);
        for (int c0 = 0; c0 < nn; c0 += 16)
            zmm_cols_to_rows((const float(*)[SB])(m + c0), nn - c0 < 16 ? nn - c0 : 16, h_res + c0, nn, lanes);
        return;
    }
#else
    for (int i = 0; i < 2 * n; i++) {
        VT sg[HH_];
        FN(sigmoid_col)(z, K, i, bias[i], gates[i < n ? 0 : 1], lanes, sg);
        for (int l = 0; l < lanes; l++) {
            if (i < n) h_pre[l * n + i] = sg[l / W][l % W];
            else h_post[l * n + i - n] = 2 * sg[l / W][l % W];
        }
    }
#endif
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
#if ZMM /* as the forward: columns of 16 lanes in, rows out, by register transposes */
    {
        T zT[2 * MAXN][SB] ALIGNED, gT[2 * MAXN][SB] ALIGNED, dT[2 * MAXN][SB] ALIGNED;
        zmm_rows_to_cols(z, K, lanes, 2 * n, zT);
        if (g_pre) zmm_rows_to_cols(g_pre, n, lanes, n, gT);
        if (g_post) zmm_rows_to_cols(g_post, n, lanes, n, gT + n);
        for (int i = 0; i < 2 * n; i++) { /* d sigmoid = s (1 - s); h_post carries a factor 2 */
            const int pre = i < n;
            VT sg[HH_];
            FN(sigmoid_lanes)(zT[i], bias[i], gates[pre ? 0 : 1], sg);
            for (int h = 0; h < HH_; h++) {
                const VT dsg = (T)(pre ? 1 : 2) * sg[h] * (1 - sg[h]);
                VST(dT[i] + h * W, (pre ? g_pre : g_post) ? VLD(gT[i] + h * W) * dsg : (VT){0});
                if (pre) VST(zT[i] + h * W, sg[h]); /* zT's pre columns now hold h_pre */
            }
        }
        zmm_cols_to_rows((const float(*)[SB])dT, 2 * n, da, K, lanes);
        if (hpre) zmm_cols_to_rows((const float(*)[SB])zT, n, hpre, n, lanes);
    }
#else
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
#endif
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
