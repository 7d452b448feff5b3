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
