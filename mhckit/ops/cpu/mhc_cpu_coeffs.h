/* Part of mhc_cpu_impl.h, instantiated once per floating type (T, FN, W, SB, ... as mhc_cpu.c and the parts before
 * this one define them): mHC's coefficients (Eq. 7-9): RMS, the projection with phi, the tail and the read in one
 * pass, and the backward. */

/* ---- mHC coefficients (Eq. 7-9) ------------------------------------------------------------------ */

#define KB (3 * W) /* projection columns per register block: 4 tokens x 3 vectors of accumulators */

/* phi [nC, K] for the projection blocks, rows KP apart: phi itself (KP = K) when K is a multiple of W,
 * since every block then loads exactly its own columns (the last block of K - kb columns loads
 * ceil((K - kb) / W) vectors of W, the AVX-512 blocks 8, 16 or 24 columns: all of them K's), e.g. mHC's 24
 * logits at n = 4, mHC-lite's 32, the identity's 8; else a copy zero padded to KP = K rounded up to KB
 * in *own (the caller frees it; NULL returned when out of memory), so that no load runs past the end of
 * phi. The copy used to be made on every call: at one token and C = 576 it took ~13 of the forward's ~35 us
 * (a 221 KB calloc and copy), twice that for mHC-lite (K padded to 48). */
static const T *FN(pack_phi)(const T *phi, int64_t nC, int K, int *KP, T **own) {
    *own = NULL;
    if (K % W == 0) {
        *KP = K;
        return phi;
    }
    *KP = (K + KB - 1) / KB * KB;
    T *p = *own = calloc((size_t)nC * *KP, sizeof(T));
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
    const T *phiP = NULL;
    T *own = NULL;
    if (phi && !(phiP = FN(pack_phi)(phi, nC, K, &KP, &own))) return 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t t0 = b * SB;
        const int lanes = tokens - t0 < SB ? (int)(tokens - t0) : SB;
        FN(coeffs_fwd_block)(x + t0 * nC, phiP, KP, z + t0 * K, bias, gates, rms_eps, r + t0, h_pre + t0 * n,
                             h_post + t0 * n, h_res ? h_res + t0 * nn : NULL, u ? u + t0 * C : NULL, lanes, n, C,
                             iters);
    }
    free(own);
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
 * gx += gzr phi^T. dbias / dalpha are summed per thread, then over threads in a fixed order.
 * gx may be g_out itself (the caller's buffer reused: no 1 MB of fresh, cold lines to fetch for writing):
 * a block reads its tokens' g_out rows (the dots, then coeffs_gx_tok column by column) before writing
 * their gx rows, and the matmul terms then update gx in place; 2-byte streams are converted to float
 * scratch per block first. */
/* y_prev, h_post_prev and the outputs dy_prev, dh_post_prev of mhc_coeffs_bwd_post (each may be NULL) */
typedef struct {
    const T *y, *hp;
    T *gy, *gp;
} FN(post_prev);

typedef struct {
    const T *x, *gu, *g_out, *z, *r, *bias, *gates, *gk, *g_pre, *g_post, *g_res, *phiT, *zero;
    T *gzr, *gx, *part, *dphiP; /* part: per thread 2K sums; dphiP: per thread [nC, KP], [K, nC] with ZMM (NULL: no dphi) */
    int64_t C, tokens;
    int n, iters;
    const void *aux; /* the half-precision entry points' stream pointers (mhc_cpu_half.h) */
    FN(post_prev) prev; /* the previous sublayer's write-back backward on gx (mhc_coeffs_bwd_post; all NULL: none) */
} FN(coeffs_bwd_ctx);

/* The previous sublayer's write-back backward (x = h_res x_prev + h_post_prev y_prev: its dy_prev and
 * dh_post_prev) on the block's finished gx rows, while they are in cache: FN(post_bwd_tok), as
 * mhc_post_res_bwd runs it, so the values are bitwise that kernel's. */
static void FN(coeffs_bwd_post_prev)(const FN(coeffs_bwd_ctx) *c, const T *gx, int64_t t0, int lanes) {
    const FN(post_prev) *p = &c->prev;
    const int n = c->n;
    const int64_t C = c->C, nC = n * C;
    for (int l = 0; l < lanes; l++) {
        const int64_t t = t0 + l;
        FN(post_bwd_tok)(p->hp + t * n, p->y ? p->y + t * C : NULL, gx + l * nC, p->gy ? p->gy + t * C : NULL,
                         p->gp ? p->gp + t * n : NULL, n, C);
    }
}

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
        if (c->x && t + lanes < c->tokens) { /* the next block's rows of this lane (NULL x: half streams) */
            const int64_t tn = t + lanes;
            mhc_prefetch(c->x + tn * nC, sizeof(T) * nC);
            if (c->g_out) mhc_prefetch(c->g_out + tn * nC, sizeof(T) * nC);
            if (c->gu) mhc_prefetch(c->gu + tn * C, sizeof(T) * C);
            if (c->gx && c->gx != c->g_out) mhc_prefetch_w(c->gx + tn * nC, sizeof(T) * nC);
        }
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
    if (gx && (c->prev.gy || c->prev.gp)) FN(coeffs_bwd_post_prev)(c, gx, t0, lanes);
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
    if (gx && (c->prev.gy || c->prev.gp)) FN(coeffs_bwd_post_prev)(c, gx, t0, lanes);
}

static void FN(coeffs_bwd_body)(const void *ctx, FN(scratch_t) *s, int64_t t0, int lanes, int me) {
    const FN(coeffs_bwd_ctx) *c = ctx;
    const int64_t C = c->C, nC = c->n * C;
    FN(coeffs_bwd_block)(c, s, c->x + t0 * nC, c->gu ? c->gu + t0 * C : NULL, c->g_out ? c->g_out + t0 * nC : NULL,
                         c->gx ? c->gx + t0 * nC : NULL, t0, lanes, me);
}

/* The backward with `body` run on every block (given `extra` per-thread scratch values and `aux`). */
static int FN(coeffs_bwd_run)(const T *x, const T *gu, const T *g_out, const T *z, const T *r, const T *bias,
                              const T *gates, const T *g_pre, const T *g_post, const T *g_res, const T *phi, T *gzr,
                              T *gx, T *dphi, T *dbias, T *dalpha, int64_t tokens, int n, int64_t C, int iters,
                              int threads, FN(block_body) body, size_t extra, const void *aux,
                              const FN(post_prev) *prev) {
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
        if (phiT) {
#if ZMM
            zmm_transpose_to(phi, nC, K, phiT, nC);
#else
            for (int64_t i = 0; i < nC; i++)
                for (int k = 0; k < K; k++) phiT[k * nC + i] = phi[i * K + k];
#endif
        }
    }
    int err = !part || (phi && (!phiT || !dphiP || !zero)) ? 2 : 0;
    if (!err) {
        const FN(coeffs_bwd_ctx) c = {x, gu, g_out, z, r, bias, gates, gk, g_pre, g_post, g_res, phiT, zero,
                                      gzr, gx, part, dphi ? dphiP : NULL, C, tokens, n, iters, aux,
                                      prev ? *prev : (FN(post_prev)){NULL, NULL, NULL, NULL}};
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
#if ZMM /* per thread [K, nC]: summed and transposed in tiles (the same sums in the same order) */
        if (phi && dphi) zmm_sum_transpose(dphiP, threads, (int64_t)nC * KP, nC, K, dphi);
#else
        if (phi && dphi)
            for (int64_t i = 0; i < nC; i++)
                for (int k = 0; k < K; k++) {
                    T sum = 0;
                    for (int th = 0; th < threads; th++) sum += dphiP[((size_t)th * nC + i) * KP + k]; /* [nC, KP] */
                    dphi[i * K + k] = sum;
                }
#endif
    }
    free(part), free(phiT), free(dphiP), free(zero);
    return err;
}

int FN(mhc_coeffs_bwd)(const T *x, const T *gu, const T *g_out, const T *z, const T *r, const T *bias, const T *gates,
                       const T *g_pre, const T *g_post, const T *g_res, const T *phi, T *gzr, T *gx, T *dphi, T *dbias,
                       T *dalpha, int64_t tokens, int n, int64_t C, int iters, int threads) {
    return FN(coeffs_bwd_run)(x, gu, g_out, z, r, bias, gates, g_pre, g_post, g_res, phi, gzr, gx, dphi, dbias, dalpha,
                              tokens, n, C, iters, threads, FN(coeffs_bwd_body), 0, NULL, NULL);
}

/* mhc_coeffs_bwd, and on its gx (finished per block, in cache) the backward of the previous sublayer's
 * write-back x = h_res_prev x_prev + h_post_prev[k] y_prev, whose output gradient that gx is:
 *     gy_prev = sum_k h_post_prev[k] gx[k],  gp_prev[k] = <gx[k], y_prev>   (each if not NULL)
 * as mhc_post_res_bwd computes them (bitwise): one pass over the stream gradient instead of two. Needs the
 * projection here (phi) and gx; 1 otherwise. */
int FN(mhc_coeffs_bwd_post)(const T *x, const T *gu, const T *g_out, const T *z, const T *r, const T *bias,
                            const T *gates, const T *g_pre, const T *g_post, const T *g_res, const T *phi, T *gzr, T *gx,
                            T *dphi, T *dbias, T *dalpha, int64_t tokens, int n, int64_t C, int iters, int threads,
                            const T *y_prev, const T *hp_prev, T *gy_prev, T *gp_prev) {
    if (!phi || !gx || !hp_prev || (gp_prev && !y_prev)) return 1;
    const FN(post_prev) prev = {y_prev, hp_prev, gy_prev, gp_prev};
    return FN(coeffs_bwd_run)(x, gu, g_out, z, r, bias, gates, g_pre, g_post, g_res, phi, gzr, gx, dphi, dbias, dalpha,
                              tokens, n, C, iters, threads, FN(coeffs_bwd_body), 0, NULL, &prev);
}
