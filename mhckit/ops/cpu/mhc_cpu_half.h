/* Half-precision streams (bfloat16, float16) for the mhckit CPU kernels; included by mhc_cpu.c once per
 * format after the float instantiation, with HSUF (the name suffix), CVT_IN (2-byte values -> float)
 * and CVT_OUT (float -> 2-byte values, round to nearest even) defined.
 *
 * The streams x, y, u, the write-back's output and every stream gradient are stored in the 2-byte
 * format; the coefficients (h_pre, h_post, h_res, r, z), phi, bias, the gates and their gradients
 * are float32, and all arithmetic is the float kernels': a block of tokens (or one token for the
 * read / write-back ops) is converted to float in per-thread scratch, computed as in the float32
 * path, and each stream result is rounded once when it is stored. That is what mhckit's PyTorch ops
 * do with half streams (PAPER_NOTES: coefficients in fp32, streams stay in their dtype): they cast
 * x to float32, compute, and cast the result back (`.to(x.dtype)`). */

#define HF(name) CAT(name, HSUF)

/* ---- coefficients (Eq. 7-9) with the read u, forward ---- */
int HF(mhc_coeffs_fwd)(const uint16_t *x, const float *phi, float *z, const float *bias, const float *gates,
                       double rms_eps, float *r, float *h_pre, float *h_post, float *h_res, uint16_t *u,
                       int64_t tokens, int n, int64_t C, int iters, int threads) {
    if (!mhc_tail_ok(n, iters)) return 1;
    const int K = 2 * n + mhc_kres(n, iters), nn = n * n;
    const int64_t nC = n * C, blocks = (tokens + SB - 1) / SB;
    int KP = 0, err = 0;
    const float *phiP = NULL;
    float *own = NULL;
    if (phi && !(phiP = pack_phi_f32(phi, nC, K, &KP, &own))) return 2;
#pragma omp parallel num_threads(threads)
    {
        float *xb = mhc_alloc(sizeof(float) * SB * (nC + C), 0), *ub = xb ? xb + SB * nC : NULL;
        if (!xb) {
#pragma omp atomic write
            err = 2;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (!xb) continue;
            const int64_t t0 = b * SB;
            const int lanes = tokens - t0 < SB ? (int)(tokens - t0) : SB;
            CVT_IN(x + t0 * nC, xb, lanes * nC);
            coeffs_fwd_block_f32(xb, phiP, KP, z + t0 * K, bias, gates, rms_eps, r + t0, h_pre + t0 * n,
                                 h_post + t0 * n, h_res ? h_res + t0 * nn : NULL, u ? ub : NULL, lanes, n, C, iters);
            if (u) CVT_OUT(ub, u + t0 * C, lanes * C);
        }
        free(xb);
    }
    free(own);
    return err;
}

/* ---- coefficients, backward: the block's stream rows in float scratch (s->extra) ---- */
typedef struct {
    const uint16_t *x, *gu, *g_out;
    uint16_t *gx;
} HF(bwd_aux);

static void HF(coeffs_bwd_body)(const void *ctx, scratch_t_f32 *s, int64_t t0, int lanes, int me) {
    const coeffs_bwd_ctx_f32 *c = ctx;
    const HF(bwd_aux) *a = c->aux;
    const int64_t C = c->C, nC = c->n * C;
    float *xb = s->extra, *p = xb + SB * nC, *gub = NULL, *gob = NULL, *gxb = NULL;
    if (a->gu) gub = p, p += SB * C;
    if (a->g_out) gob = p, p += SB * nC;
    if (a->gx) gxb = p;
    CVT_IN(a->x + t0 * nC, xb, lanes * nC);
    if (gub) CVT_IN(a->gu + t0 * C, gub, lanes * C);
    if (gob) CVT_IN(a->g_out + t0 * nC, gob, lanes * nC);
    coeffs_bwd_block_f32(c, s, xb, gub, gob, gxb, t0, lanes, me);
    if (gxb) CVT_OUT(gxb, a->gx + t0 * nC, lanes * nC);
}

/* As mhc_coeffs_bwd_f32 with half x, gu, g_out, gx; phi is required (the matmuls run here, so that
 * gx is rounded once). */
int HF(mhc_coeffs_bwd)(const uint16_t *x, const uint16_t *gu, const uint16_t *g_out, const float *z, const float *r,
                       const float *bias, const float *gates, const float *g_pre, const float *g_post,
                       const float *g_res, const float *phi, float *gzr, uint16_t *gx, float *dphi, float *dbias,
                       float *dalpha, int64_t tokens, int n, int64_t C, int iters, int threads) {
    if (!phi || n < 1 || n > MAXN) return 1;
    const int64_t nC = n * C;
    const HF(bwd_aux) a = {x, gu, g_out, gx};
    const size_t extra = SB * ((size_t)nC * (1 + (g_out != NULL) + (gx != NULL)) + (gu ? (size_t)C : 0));
    return coeffs_bwd_run_f32(NULL, NULL, NULL, z, r, bias, gates, g_pre, g_post, g_res, phi, gzr, NULL, dphi, dbias,
                              dalpha, tokens, n, C, iters, threads, HF(coeffs_bwd_body), extra, &a, NULL);
}

/* ---- the stream read and write-back (Eq. 3), one token at a time through float scratch ---- */

/* for every token t: BODY, with float scratch `buf` of `width` values per thread (err = 2 without) */
#define PER_TOKEN(width, ...)                                                                                       \
    do {                                                                                                            \
        int err_ = 0;                                                                                               \
        _Pragma("omp parallel num_threads(threads)") {                                                              \
            float *buf = mhc_alloc(sizeof(float) * (size_t)(width), 0);                                            \
            if (!buf) {                                                                                             \
                _Pragma("omp atomic write") err_ = 2;                                                               \
            }                                                                                                       \
            _Pragma("omp for schedule(static)") for (int64_t t = 0; t < tokens; t++) {                              \
                if (buf) __VA_ARGS__                                                                                \
            }                                                                                                       \
            free(buf);                                                                                              \
        }                                                                                                           \
        return err_;                                                                                                \
    } while (0)

int HF(mhc_pre_fwd)(const uint16_t *x, const float *h, uint16_t *u, int64_t tokens, int n, int64_t C, int threads) {
    const int64_t nC = n * C, cp = (C + 15) & ~(int64_t)15; /* scratch rows start on cache lines */
    PER_TOKEN(n * cp + cp, {
        float *xb = buf + cp, *ub = buf;
        CVT_IN(x + t * nC, xb, nC);
        CALL_N(pre_tok_f32, n, xb, h + t * n, ub);
        CVT_OUT(ub, u + t * C, C);
    });
}

int HF(mhc_pre_bwd)(const uint16_t *x, const float *h, const uint16_t *gu, uint16_t *gx, float *gh, int64_t tokens,
                    int n, int64_t C, int threads) {
    const int64_t nC = n * C, cp = (C + 15) & ~(int64_t)15;
    PER_TOKEN(2 * n * cp + cp, {
        float *gub = buf, *xb = buf + cp, *gxb = xb + nC;
        CVT_IN(gu + t * C, gub, C);
        if (gh) CVT_IN(x + t * nC, xb, nC);
        CALL_N(pre_bwd_tok_f32, n, xb, h ? h + t * n : NULL, gub, gx ? gxb : NULL, gh ? gh + t * n : NULL);
        if (gx) CVT_OUT(gxb, gx + t * nC, nC);
    });
}

int HF(mhc_post_res_fwd)(const uint16_t *x, const uint16_t *y, const float *hp, const float *hr, uint16_t *out,
                         int64_t tokens, int n, int64_t C, int threads) {
    const int64_t nC = n * C, cp = (C + 15) & ~(int64_t)15;
    PER_TOKEN(2 * n * cp + cp, {
        float *yb = buf, *xb = buf + cp, *ob = xb + nC;
        CVT_IN(x + t * nC, xb, nC);
        CVT_IN(y + t * C, yb, C);
        CALL_N(post_res_tok_f32, n, xb, yb, hp + t * n, hr ? hr + t * n * n : NULL, ob);
        CVT_OUT(ob, out + t * nC, nC);
    });
}

/* x is only read for gres, y only for gpost (either may then be NULL), as in the float kernel */
int HF(mhc_post_res_bwd)(const uint16_t *x, const uint16_t *y, const float *hp, const float *hr, const uint16_t *g,
                         uint16_t *gx, uint16_t *gy, float *gpost, float *gres, int64_t tokens, int n, int64_t C,
                         int threads) {
    const int64_t nC = n * C, cp = (C + 15) & ~(int64_t)15;
    PER_TOKEN(3 * n * cp + 2 * cp, {
        float *yb = buf, *gyb = buf + cp, *gb = buf + 2 * cp, *xb = gb + nC, *gxb = xb + nC;
        CVT_IN(g + t * nC, gb, nC);
        if (gx || gy) {
            CALL_N(post_res_bwd_tok_f32, n, hp + t * n, gx ? hr + t * n * n : NULL, gb, gx ? gxb : NULL,
                   gy ? gyb : NULL);
            if (gx) CVT_OUT(gxb, gx + t * nC, nC);
            if (gy) CVT_OUT(gyb, gy + t * C, C);
        }
        if (gpost || gres) {
            if (gres) CVT_IN(x + t * nC, xb, nC);
            if (gpost) CVT_IN(y + t * C, yb, C);
            CALL_N(post_res_dots_tok_f32, n, gres ? xb : NULL, gpost ? yb : NULL, gb, gpost ? gpost + t * n : NULL,
                   gres ? gres + t * n * n : NULL);
        }
    });
}

/* The read's backward joined by its write-back's (HC's static coefficients; see mhc_read_bwd_f32): half
 * x, gu, g, gx; float32 coefficients and their gradients. x is only converted for the dots. */
int HF(mhc_read_bwd)(const uint16_t *x, const float *h_pre, const float *h_res, const uint16_t *gu, const uint16_t *g,
                     uint16_t *gx, float *gh_pre, float *gh_res, int64_t tokens, int n, int64_t C, int threads) {
    if (n < 1 || n > MAXN || (gh_pre && !gu) || (gh_res && !g)) return 1;
    const int64_t nC = n * C, cp = (C + 15) & ~(int64_t)15, np = (nC + 15) & ~(int64_t)15;
    PER_TOKEN(cp + 3 * np, {
        float *gub = buf, *xb = buf + cp, *gb = xb + np, *gxb = gb + np;
        if (gh_pre || gh_res) CVT_IN(x + t * nC, xb, nC);
        if (gu) CVT_IN(gu + t * C, gub, C);
        if (g) CVT_IN(g + t * nC, gb, nC);
        if (gh_pre) CALL_N(pre_bwd_tok_f32, n, xb, NULL, gub, NULL, gh_pre + t * n);
        if (gh_res) CALL_N(post_res_dots_tok_f32, n, xb, NULL, gb, NULL, gh_res + t * n * n);
        if (gx) {
            CALL_N(coeffs_gx_tok_f32, n, xb, gu ? gub : NULL, g ? gb : NULL, h_pre + t * n, h_res + t * n * n, 0, 0,
                   gxb);
            CVT_OUT(gxb, gx + t * nC, nC);
        }
    });
}

/* ---- Hyper-Connections' dynamic coefficients with the read (mhc_hc_fwd / _bwd): half x, u, gu, g_out,
 * gx; parameters, coefficients and their gradients float32 ---- */

static int HF(hc_fwd_tokens)(const uint16_t *x, const float *WT, const float *sp, const float *spo, const float *sr,
                             float sa, float sb, double eps, float *z, float *r, float *h_pre, float *h_post,
                             float *h_res, uint16_t *u, int64_t tokens, int n, int64_t C, int threads) {
    const int m = n + 2;
    const int64_t nC = n * C, cp = (C + 15) & ~(int64_t)15;
    PER_TOKEN(n * cp + cp, {
        float *ub = buf, *xb = buf + cp;
        CVT_IN(x + t * nC, xb, nC);
        CALL_N(hc_fwd_tok_f32, n, xb, WT, sp, spo, sr, sa, sb, eps, z + t * n * m, r + t * n, h_pre + t * n,
               h_post + t * n, h_res + t * n * n, u ? ub : NULL);
        if (u) CVT_OUT(ub, u + t * C, C);
    });
}

int HF(mhc_hc_fwd)(const uint16_t *x, const float *wp, const float *wq, const float *wr, const float *sp,
                   const float *spo, const float *sr, const float *sa, const float *sb, double eps, float *z, float *r,
                   float *h_pre, float *h_post, float *h_res, uint16_t *u, int64_t tokens, int n, int64_t C,
                   int threads) {
    if (n < 1 || n > MAXN) return 1;
    float *WT = hc_pack_w_f32(wp, wq, wr, n, C);
    if (!WT) return 2;
    const int err = HF(hc_fwd_tokens)(x, WT, sp, spo, sr, *sa, *sb, eps, z, r, h_pre, h_post, h_res, u, tokens, n, C,
                                      threads);
    free(WT);
    return err;
}

/* one token: its stream rows converted into the thread's scratch (gu, x, g_out, gx rows on cache lines) */
static void HF(hc_bwd_body)(const hc_bwd_ctx_f32 *c, int64_t t, float *mine, float *scratch, int n, int64_t C) {
    const HF(bwd_aux) *a = c->aux; /* the stream pointers, as the coefficient backward's */
    const int m = n + 2, nn = n * n;
    const int64_t nC = n * C, cp = (C + 15) & ~(int64_t)15, np = (nC + 15) & ~(int64_t)15;
    float *gub = scratch, *xb = scratch + cp, *gob = xb + np, *gxb = gob + np;
    CVT_IN(a->x + t * nC, xb, nC);
    if (a->gu) CVT_IN(a->gu + t * C, gub, C);
    if (a->g_out) CVT_IN(a->g_out + t * nC, gob, nC);
    CALL_N(hc_bwd_tok_f32, n, xb, a->gu ? gub : NULL, a->g_out ? gob : NULL, c->z + t * n * m, c->r + t * n, c->WT,
           c->sp, c->sr, c->sa, c->sb, c->g_pre ? c->g_pre + t * n : NULL, c->g_post ? c->g_post + t * n : NULL,
           c->g_res ? c->g_res + t * nn : NULL, a->gx ? gxb : NULL, mine);
    if (a->gx) CVT_OUT(gxb, a->gx + t * nC, nC);
}

int HF(mhc_hc_bwd)(const uint16_t *x, const uint16_t *gu, const uint16_t *g_out, const float *z, const float *r,
                   const float *wp, const float *wq, const float *wr, const float *sp, const float *sr,
                   const float *sa, const float *sb, const float *g_pre, const float *g_post, const float *g_res,
                   uint16_t *gx, float *dwp, float *dwq, float *dwr, float *dsp, float *dspo, float *dsr, float *dsa,
                   float *dsb, int64_t tokens, int n, int64_t C, int threads) {
    const HF(bwd_aux) a = {x, gu, g_out, gx};
    hc_bwd_ctx_f32 c = {NULL, NULL, NULL, z, r, NULL, sp, sr, g_pre, g_post, g_res, NULL, 0, 0, &a};
    const int64_t cp = (C + 15) & ~(int64_t)15, np = ((int64_t)n * C + 15) & ~(int64_t)15;
    return hc_bwd_run_f32(&c, wp, wq, wr, sa, sb, dwp, dwq, dwr, dsp, dspo, dsr, dsa, dsb, tokens, n, C, threads,
                          (size_t)(cp + 3 * np), HF(hc_bwd_body));
}

#undef PER_TOKEN
#undef HF
#undef HSUF
#undef CVT_IN
#undef CVT_OUT
