/* Part of mhc_cpu_impl.h, instantiated once per floating type (T, FN, W, SB, ... as mhc_cpu.c and the parts before
 * this one define them): Hyper-Connections' (arXiv 2409.19606) dynamic coefficients with the read, and their
 * backward. */

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
    const T *restrict xt, const T *restrict gut, const T *got, const T *restrict zt, const T *restrict rt,
    const T *restrict WT, const T *sp, const T *sr, T sa, T sb, const T *gpre, const T *gpost, const T *gres,
    T *gx, T *restrict part, const int n, const int64_t C) { /* gx may be got: see the column loop */
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
    /* Every column of g's n rows is read before gx's rows are written there, so gx may be g itself */
    for (int64_t c = 0; c + W <= C || c < C; c += W) {
        const int vec = c + W <= C;
        VT gv[MAXN] = {{0}};
        T gs[MAXN * W]; /* the C % W rest of g's rows */
        if (vec && got)
            for (int k = 0; k < n; k++) gv[k] = VLD(got + k * C + c);
        if (!vec && got)
            for (int k = 0; k < n; k++)
                for (int64_t i = c; i < C; i++) gs[k * W + (i - c)] = got[k * C + i];
        const VT uv = vec && gut ? VLD(gut + c) : (VT){0};
        VT wv[MAXN + 2] = {{0}}, xs[MAXN]; /* wv read only when vec (zeroed: GCC's -Wmaybe-uninitialized) */
        if (vec)
            for (int q = 0; q < m; q++) wv[q] = VLD(WT + q * C + c);
        for (int j = 0; j < n; j++) {
            if (!vec) { /* the C % W rest, one value at a time */
                for (int64_t i = c; i < C; i++) {
                    const T xv = xt[j * C + i];
                    T a = xv * cz[j];
                    if (gut) a += hp[j] * gut[i];
                    if (got)
                        for (int k = 0; k < n; k++) a += hr[k * n + j] * gs[k * W + (i - c)];
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
