/* Part of mhc_cpu_impl.h, instantiated once per floating type (T, FN, W, SB, ... as mhc_cpu.c and the parts before
 * this one define them): the stream read (h_pre x) and write-back (h_res x + h_post y), per token, and their
 * backward. */

/* ---- stream read and write-back: x [T, n, C], y / u [T, C], coefficients [T, n] / [T, n, n] ---- */
/* Per token, the C axis is walked in vectors of XW values (below; one load of each x[j] chunk serves every
 * output), with a scalar loop for the C % XW rest. n = 4 gets a compile-time-n copy (see *_tok). */

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

/* The per-token stream functions below walk the C axis in vectors of XW values: 16-lane XV vectors where
 * the float instantiation targets AVX-512 (ZMM), else the W-lane VT. With C = 64 a token's stream row is 4
 * such vectors instead of 8: half the instructions for the same work (measured against the 8-lane build
 * in one process on an Intel Xeon host, 1024 tokens, n = 4, C = 64, 1 and 2 threads: the coefficient
 * backward 0.90-0.94x the time, its forward and the write-back's 0.95-1.0x). The element-wise functions
 * give the same values at either width; the dot products sum their lanes in a fixed tree per width, so
 * an AVX-512 build's dots differ from an AVX2 build's by rounding. */
#if ZMM
#define XW 16
typedef T FN(xv) __attribute__((vector_size(XW * sizeof(T)), aligned(sizeof(T))));
typedef ITYPE FN(xi) __attribute__((vector_size(XW * sizeof(T)), aligned(sizeof(T))));
#else
#define XW W
typedef VT FN(xv);
typedef IV FN(xi);
#endif
#define XV FN(xv)
#define XI FN(xi)
#define XLD(p) (*(const XV *)(p))
#define XST(p, v) (*(XV *)(p) = (v))
#if defined(__clang__)
#define XSHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define XSHUF(a, b, ...) __builtin_shuffle(a, b, (XI){__VA_ARGS__})
#endif

/* the XW lanes of v summed in a fixed order (16 lanes: lane i + lane i + 8 first, then as hsum) */
static inline T FN(xhsum)(XV v) {
#if XW == 16
    VT h;
    for (int l = 0; l < 8; l++) h[l] = v[l] + v[l + 8];
    return FN(hsum)(h);
#else
    return FN(hsum)(v);
#endif
}

/* s[i] = xhsum-like sum of a[i] for XW vectors at once (XW = 8: FN(reduce8); 16: four levels of pairwise
 * shuffles and adds, 45 vector operations instead of 16 horizontal sums) */
static inline XV FN(xreduce)(const XV *a) {
#if XW == 16
    XV b[8], c[4], d[2];
    for (int i = 0; i < 8; i++) /* b[i][2m + r] = lanes 2m, 2m + 1 of a[2i + r] summed */
        b[i] = XSHUF(a[2 * i], a[2 * i + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
               XSHUF(a[2 * i], a[2 * i + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    for (int i = 0; i < 4; i++) /* c[i][4h + r] = lanes 4h .. 4h + 3 of a[4i + r] */
        c[i] = XSHUF(b[2 * i], b[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
               XSHUF(b[2 * i], b[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    for (int i = 0; i < 2; i++) /* d[i][8h + r] = lanes 8h .. 8h + 7 of a[8i + r] */
        d[i] = XSHUF(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
               XSHUF(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    return XSHUF(d[0], d[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           XSHUF(d[0], d[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
#else
    return FN(reduce8)(a);
#endif
}

/* out[i] = the sum of a[i]'s lanes for i < count (XW * ceil(count / XW) vectors are read: a has room for
 * them; the padding is zeroed here) */
static inline void FN(reduce_many)(XV *a, int count, T *out) {
    for (int i = 0; i < count; i += XW) {
        for (int p = count; p < i + XW; p++) a[p] = (XV){0};
        const XV s = FN(xreduce)(a + i);
        for (int l = 0; l < XW && i + l < count; l++) out[i + l] = s[l];
    }
}

/* dot product with XW independent partial sums (vectorised without -ffast-math) */
static inline T FN(dot)(const T *a, const T *b, int64_t C) {
    XV acc = {0};
    int64_t c = 0;
    for (; c + XW <= C; c += XW) acc += XLD(a + c) * XLD(b + c);
    T s = FN(xhsum)(acc);
    for (; c < C; c++) s += a[c] * b[c];
    return s;
}

/* u[c] = sum_j h[j] x[j, c] */
static inline __attribute__((always_inline)) void FN(pre_tok)(const T *restrict xt, const T *restrict h,
                                                               T *restrict u, const int n, const int64_t C) {
    int64_t c = 0;
    for (; c + XW <= C; c += XW) {
        XV acc = h[0] * XLD(xt + c);
        for (int j = 1; j < n; j++) acc += h[j] * XLD(xt + j * C + c);
        XST(u + c, acc);
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
    XV acc[MAXN + XW];
    for (int j = 0; j < n; j++) acc[j] = (XV){0};
    int64_t c = 0;
    for (; c + XW <= C; c += XW) {
        const XV g = XLD(gu + c);
        for (int j = 0; j < n; j++) {
            if (gx) XST(gx + j * C + c, h[j] * g);
            if (gh) acc[j] += g * XLD(xt + j * C + c);
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
            for (c = 0; c + XW <= C; c += XW) XST(o + k * C + c, hp[k] * XLD(yt + c) + XLD(xt + k * C + c));
            for (; c < C; c++) o[k * C + c] = hp[k] * yt[c] + xt[k * C + c];
        }
        return;
    }
    for (; c + XW <= C; c += XW) {
        XV xv[MAXN];
        for (int j = 0; j < n; j++) xv[j] = XLD(xt + j * C + c);
        const XV yv = XLD(yt + c);
        for (int k = 0; k < n; k++) {
            XV acc = hp[k] * yv;
            for (int j = 0; j < n; j++) acc += hr[k * n + j] * xv[j];
            XST(o + k * C + c, acc);
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
    for (; c + XW <= C; c += XW) {
        XV gv[MAXN] = {{0}};
        for (int k = 0; k < n; k++) gv[k] = XLD(gt + k * C + c);
        if (gx)
            for (int j = 0; j < n; j++) {
                XV acc = hr[j] * gv[0];
                for (int k = 1; k < n; k++) acc += hr[k * n + j] * gv[k];
                XST(gx + j * C + c, acc);
            }
        if (gy) {
            XV acc = hp[0] * gv[0];
            for (int k = 1; k < n; k++) acc += hp[k] * gv[k];
            XST(gy + c, acc);
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
 * registers (m = nx + hasy columns: x[0..nx), then y; ks * m <= 24 with AVX-512, else 12), then reduced together
 * (FN(reduce_many)). Each dot sums its XW lanes in the order of c, so the result does not depend on ks.
 * (A runtime m left the partial sums in memory, one store-to-load chain per FMA: the write-back's
 * backward took ~3x the time of its forward.) */
static inline __attribute__((always_inline)) void FN(dots_tok)(const T *restrict xt, const T *restrict yt,
                                                                const T *restrict gt, T *restrict gpost,
                                                                T *restrict gres, const int n, const int64_t C,
                                                                const int nx, const int hasy) {
    const int m = nx + hasy;
    const int regs = XW == 16 ? 24 : 12; /* partial sums kept in registers (of 32 AVX-512 / 16 AVX2 ones) */
    const int ks = m * 4 <= regs ? 4 : m * 2 <= regs ? 2 : 1;
    XV acc[MAXN * (MAXN + 3) + XW];
    T sums[MAXN * (MAXN + 3)] ALIGNED;
    const int64_t c0 = C - C % XW;
    for (int k0 = 0; k0 < n; k0 += ks) {
        const int kn = n - k0 < ks ? n - k0 : ks;
        XV a[4][MAXN + 3];
        for (int q = 0; q < ks; q++)
            for (int j = 0; j < m; j++) a[q][j] = (XV){0};
        for (int64_t c = 0; c < c0; c += XW) {
            XV g[4];
            for (int q = 0; q < ks; q++) g[q] = q < kn ? XLD(gt + (k0 + q) * C + c) : (XV){0};
            for (int j = 0; j < m; j++) {
                const XV v = j < nx ? XLD(xt + j * C + c) : XLD(yt + c);
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
 * compile-time constant at the call) leaves the norm term out (x is then not read: no 0 * inf).
 * gx may be g itself (got == gx, no `restrict` on either): each vector of columns of all n rows of g
 * is read before gx's rows are written there. */
static inline __attribute__((always_inline)) void FN(coeffs_gx_tok)(const T *restrict xt, const T *restrict gut,
                                                                     const T *got, const T *restrict hp,
                                                                     const T *restrict hr, const T coef,
                                                                     const int withx, T *gx, const int n,
                                                                     const int64_t C) {
    int64_t c = 0;
    if (got && !hr) { /* h_res = I: g[j] itself (a loop of its own: the general one below keeps its code) */
        for (int j = 0; j < n; j++) {
            for (c = 0; c + XW <= C; c += XW) {
                XV acc = withx ? XLD(xt + j * C + c) * coef : (XV){0};
                if (gut) acc += hp[j] * XLD(gut + c);
                XST(gx + j * C + c, acc + XLD(got + j * C + c));
            }
            for (; c < C; c++) {
                T acc = withx ? xt[j * C + c] * coef : 0;
                if (gut) acc += hp[j] * gut[c];
                gx[j * C + c] = acc + got[j * C + c];
            }
        }
        return;
    }
    for (; c + XW <= C; c += XW) {
        XV gv[MAXN] = {{0}};
        if (got)
            for (int k = 0; k < n; k++) gv[k] = XLD(got + k * C + c);
        const XV u = gut ? XLD(gut + c) : (XV){0};
        for (int j = 0; j < n; j++) {
            XV acc = withx ? XLD(xt + j * C + c) * coef : (XV){0};
            if (gut) acc += hp[j] * u;
            if (got)
                for (int k = 0; k < n; k++) acc += hr[k * n + j] * gv[k];
            XST(gx + j * C + c, acc);
        }
    }
    for (; c < C; c++) { /* the last columns, g's n values read first as above */
        T gs[MAXN] = {0};
        if (got)
            for (int k = 0; k < n; k++) gs[k] = got[k * C + c];
        for (int j = 0; j < n; j++) {
            T acc = withx ? xt[j * C + c] * coef : 0;
            if (gut) acc += hp[j] * gut[c];
            if (got)
                for (int k = 0; k < n; k++) acc += hr[k * n + j] * gs[k];
            gx[j * C + c] = acc;
        }
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

/* The write-back's own backward for one token: gy = sum_k h_post[k] g[k], gpost[k] = <g[k], y> (either output
 * NULL). One out-of-line function for mhc_post_res_bwd and mhc_coeffs_bwd_post (the write-back's backward
 * joined to the next sublayer's coefficient backward), so that both give the same bits: inlined into each,
 * the compiler vectorised the generic-n code differently (fp64, n = 3: last-bit differences). */
static __attribute__((noinline)) void FN(post_bwd_tok)(const T *hp, const T *yt, const T *gt, T *gy, T *gpost, int n,
                                                       int64_t C) {
    if (gy) CALL_N(FN(post_res_bwd_tok), n, hp, NULL, gt, NULL, gy);
    if (gpost) CALL_N(FN(post_res_dots_tok), n, NULL, yt, gt, gpost, NULL);
}

int FN(mhc_post_res_bwd)(const T *x, const T *y, const T *hp, const T *hr, const T *g, T *gx, T *gy, T *gpost, T *gres,
                         int64_t tokens, int n, int64_t C, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++) {
        const T *gt = g + t * n * C;
        if (!gx && !gres) { /* the write-back's own backward (the pair's; h_res's terms are the coefficients') */
            FN(post_bwd_tok)(hp + t * n, y ? y + t * C : NULL, gt, gy ? gy + t * C : NULL, gpost ? gpost + t * n : NULL,
                             n, C);
            continue;
        }
        if (gx || gy)
            CALL_N(FN(post_res_bwd_tok), n, hp + t * n, gx ? hr + t * n * n : NULL, gt, gx ? gx + t * n * C : NULL,
                   gy ? gy + t * C : NULL);
        if (gpost || gres)
            CALL_N(FN(post_res_dots_tok), n, gres ? x + t * n * C : NULL, gpost ? y + t * C : NULL, gt,
                   gpost ? gpost + t * n : NULL, gres ? gres + t * n * n : NULL);
    }
    return 0;
}
