/* Part of mhc_cpu_sinkhorn.h, included once per vector type: exp of every lane and the Sinkhorn-Knopp
 * steps on vectors of lanes (one token per lane), forward and backward. Every operation is lane-wise,
 * so a token's result does not depend on the vector width it ran in. Before each include: VT / IV the
 * vector types (SKW lanes of T / ITYPE), SK(name) the names of this instantiation. */

/* exp of every lane. float: Cody-Waite reduction x = k ln2 + r, the Cephes degree-6 polynomial for
 * e^r (~1 ulp, like PyTorch's SLEEF expf), 2^k applied as two exact power-of-two factors so that
 * overflow (inf) and gradual underflow (subnormals, 0) come out as from expf; all in vector ops.
 * double: libm's exp per lane (the float64 path is for checks, not speed). */
static inline VT SK(vexp)(VT x) {
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
    for (int l = 0; l < SKW; l++) r[l] = EXP(x[l]);
    return r;
#endif
}

/* A Sinkhorn step depends on the one before (sum -> divide -> scale), so one vector per entry leaves
 * the core waiting on latencies. The forward that keeps nothing runs HH = 2 vectors of W tokens side
 * by side (entry i of the block is m[i * HH + h]; SB = 2W tokens); the kept-iterate forward and the
 * backward run HH = 1 (measured faster there with 8-lane vectors: their stores and loads of the kept
 * iterates fill the gaps), in vectors of SL lanes (mhc_cpu_sinkhorn.h): with AVX-512 one 16-lane
 * vector per entry, the same latency chain for twice the tokens. */

/* s = sum of p[0..n): (p0 + p1) + (p2 + p3) for n = 4 (a shorter dependency chain), else in order */
static inline __attribute__((always_inline)) VT SK(vsum)(const VT *p, const int n) {
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
static inline __attribute__((always_inline)) void SK(skb_step)(VT *m, const int n, const int ROWS, const int HH,
                                                                int st, VT *ys, VT *cs) {
    const VT zero = {0}, tiny = zero + TINY, one = zero + 1;
    for (int a = 0; a < n; a++)
        for (int h = 0; h < HH; h++) {
            VT p[MAXN];
            for (int b = 0; b < n; b++) p[b] = m[(ROWS ? a * n + b : b * n + a) * HH + h];
            const VT s = SK(vsum)(p, n);
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
static inline __attribute__((always_inline)) void SK(skb_fwd_n)(VT *m, const int n, const int HH, int iters, VT *m0,
                                                                 VT *ys, VT *cs) {
    const int steps = 2 * iters - 1;
    for (int j = 0; j < n; j++)
        for (int h = 0; h < HH; h++) {
            VT mx = m[j * HH + h];
            for (int k = 1; k < n; k++) mx = VMAX(mx, m[(k * n + j) * HH + h]);
            VT p[MAXN];
            for (int k = 0; k < n; k++) p[k] = m[(k * n + j) * HH + h] = SK(vexp)(m[(k * n + j) * HH + h] - mx);
            const VT s = SK(vsum)(p, n);
            for (int k = 0; k < n; k++) m[(k * n + j) * HH + h] /= s;
        }
    if (m0) memcpy(m0, m, sizeof(VT) * n * n * HH);
    for (int st = 0; st < steps; st += 2) { /* rows, then columns (except after the last rows) */
        SK(skb_step)(m, n, 1, HH, st, ys, cs);
        if (st + 1 < steps) SK(skb_step)(m, n, 0, HH, st + 1, ys, cs);
    }
}

/* The reverse of kept step st (ROWS compile-time) on the gradient g:
 *     g = (g - [unclamped] sum_d(g * y)) * c. */
static inline __attribute__((always_inline)) void SK(skb_step_bwd)(VT *g, const int n, const int ROWS, const int HH,
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
static inline __attribute__((always_inline)) void SK(skb_bwd_n)(VT *g, const int n, const int HH, int iters,
                                                                 const VT *m0, const VT *ys, const VT *cs) {
    const int steps = 2 * iters - 1;
    for (int st = steps - 1; st >= 0; st -= 2) { /* steps - 1 is a rows step; then columns, rows, ... */
        SK(skb_step_bwd)(g, n, 1, HH, st, ys, cs);
        if (st >= 1) SK(skb_step_bwd)(g, n, 0, HH, st - 1, ys, cs);
    }
    for (int j = 0; j < n; j++)
        for (int h = 0; h < HH; h++) {
            VT p[MAXN];
            for (int k = 0; k < n; k++) p[k] = g[(k * n + j) * HH + h] * m0[(k * n + j) * HH + h];
            const VT d = SK(vsum)(p, n);
            for (int k = 0; k < n; k++) {
                const int i = (k * n + j) * HH + h;
                g[i] = m0[i] * (g[i] - d);
            }
        }
}

