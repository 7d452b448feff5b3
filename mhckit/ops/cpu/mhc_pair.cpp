// The fused sublayer pair of mhckit/ops/carry.py (CoeffsCarryFunction, HCCarryFunction, ReadCarryFunction,
// PostCarryFunction) as C++ autograd Functions on the same C kernels (mhc_cpu.c), so that a sublayer's forward is two dispatcher calls from
// Python and its backward runs no Python at all. Same maths, same kernel calls, same outputs bit for bit
// as the Python pair, except that a write-back's backward may be joined to the next sublayer's coefficient
// backward (mhc_coeffs_bwd_post: same bits, one pass fewer); see mhckit/ops/cpu/_pair.py for how it is
// built, when it runs and when the join holds.
//
// The kernels are not linked: mhckit/ops/cpu/_pair.py hands over the addresses of the ctypes-loaded
// library's entry points once (mhckit_pair::set_kernels), per kernel and stream dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

typedef int (*coeffs_fwd_t)(const void *, const void *, void *, const void *, const void *, double, void *, void *,
                            void *, void *, void *, int64_t, int, int64_t, int, int);
typedef int (*coeffs_bwd_t)(const void *, const void *, const void *, const void *, const void *, const void *,
                            const void *, const void *, const void *, const void *, const void *, void *, void *,
                            void *, void *, void *, int64_t, int, int64_t, int, int);
typedef int (*coeffs_bwd_post_t)(const void *, const void *, const void *, const void *, const void *, const void *,
                                 const void *, const void *, const void *, const void *, const void *, void *, void *,
                                 void *, void *, void *, int64_t, int, int64_t, int, int, const void *, const void *,
                                 void *, void *);
typedef int (*post_res_fwd_t)(const void *, const void *, const void *, const void *, void *, int64_t, int, int64_t,
                              int);
typedef int (*post_res_bwd_t)(const void *, const void *, const void *, const void *, const void *, void *, void *,
                              void *, void *, int64_t, int, int64_t, int);
typedef int (*hc_fwd_t)(const void *, const void *, const void *, const void *, const void *, const void *,
                        const void *, const void *, const void *, double, void *, void *, void *, void *, void *,
                        void *, int64_t, int, int64_t, int);
typedef int (*hc_bwd_t)(const void *, const void *, const void *, const void *, const void *, const void *,
                        const void *, const void *, const void *, const void *, const void *, const void *,
                        const void *, const void *, const void *, void *, void *, void *, void *, void *, void *,
                        void *, void *, void *, int64_t, int, int64_t, int);
typedef int (*pre_fwd_t)(const void *, const void *, void *, int64_t, int, int64_t, int);
typedef int (*read_bwd_t)(const void *, const void *, const void *, const void *, const void *, void *, void *,
                          void *, int64_t, int, int64_t, int);

enum { K_COEFFS_FWD, K_COEFFS_BWD, K_POST_RES_FWD, K_POST_RES_BWD, K_HC_FWD, K_HC_BWD, K_PRE_FWD, K_READ_BWD,
       K_COEFFS_BWD_POST, N_KERNELS };
constexpr int N_DTYPES = 4;  // float32, float64, bfloat16, float16
constexpr int64_t IDENTITY = -2;  // mhckit.ops.cpu.IDENTITY: no h_res

std::array<std::atomic<int64_t>, N_KERNELS * N_DTYPES> g_kernels{};
std::atomic<int64_t> g_calls{0};     // kernel calls so far (benchmarks count them)
std::atomic<bool> g_skip{false};     // benchmarks: every kernel call returns at once, having done nothing
std::atomic<int64_t> g_reused{0};    // backwards that wrote dx into their output gradient's buffer (tests)
std::atomic<int64_t> g_joined{0};    // write-back backwards whose results the next coefficient backward made
std::atomic<bool> g_join{true};      // whether the coefficient backward may make them (tests switch it off)

int dtype_code(at::ScalarType s) {
    switch (s) {
        case at::kFloat: return 0;
        case at::kDouble: return 1;
        case at::kBFloat16: return 2;
        case at::kHalf: return 3;
        default: TORCH_CHECK(false, "mhckit_pair: streams of ", s, " are not taken (float32, float64, bfloat16, float16)");
    }
}

at::ScalarType coef_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

template <typename F>
F kernel(int which, at::ScalarType s) {
    const int64_t p = g_kernels[which * N_DTYPES + dtype_code(s)].load(std::memory_order_relaxed);
    TORCH_CHECK(p != 0, "mhckit_pair: the compiled CPU kernels were not handed over for ", s, " streams");
    g_calls.fetch_add(1, std::memory_order_relaxed);
    return reinterpret_cast<F>(p);
}

// the kernel calls, each skipped while g_skip is set (the kernels' outputs then hold whatever memory they got)
template <typename F, typename... A>
int run(int which, at::ScalarType s, A... args) {
    F f = kernel<F>(which, s);
    return g_skip.load(std::memory_order_relaxed) ? 0 : f(args...);
}

void check(int err, const char *name) {
    TORCH_CHECK(err == 0, "mhckit CPU kernel ", name, " failed (code ", err, ": 1 bad n/iters, 2 out of memory)");
}

const void *ptr(const Tensor &t) { return t.defined() ? t.data_ptr() : nullptr; }
void *mptr(const Tensor &t) { return t.defined() ? t.data_ptr() : nullptr; }
Tensor contig(const Tensor &t, at::ScalarType s) {
    if (!t.defined()) return t;
    Tensor r = t.scalar_type() == s ? t : t.to(s);
    return r.is_contiguous() ? r : r.contiguous();
}

std::vector<int64_t> lead_with(const Tensor &x, std::initializer_list<int64_t> tail) {
    std::vector<int64_t> s(x.sizes().begin(), x.sizes().end() - 2);
    s.insert(s.end(), tail);
    return s;
}

// mhckit.ops.carry._exclusive: g is ours to overwrite (nobody else holds its TensorImpl or its storage,
// and it is a whole, contiguous, unshifted storage of x's shape and dtype)
bool exclusive(const Tensor &g, const Tensor &x) {
    return g.defined() && g.use_count() == 1 && !g.is_view() &&
           g.storage().use_count() == 1 && g.is_contiguous() && g.storage_offset() == 0 &&
           g.storage().nbytes() == static_cast<size_t>(g.numel()) * g.element_size() &&
           g.scalar_type() == x.scalar_type() && g.sizes() == x.sizes();
}

// whether a backward that needs dx writes it into g (its reuse flag from forward, and g exclusive); counted
bool take_buffer(AutogradContext *ctx, bool need_x, const Tensor &g, const Tensor &x) {
    const bool take = need_x && ctx->saved_data["reuse"].toBool() && exclusive(g, x);
    if (take) g_reused.fetch_add(1, std::memory_order_relaxed);
    return take;
}

void no_double_backward(const variable_list &grads, const char *name) {
    if (!at::GradMode::is_enabled()) return;
    for (const auto &g : grads)
        TORCH_CHECK(!(g.defined() && g.requires_grad()), "mhckit: ", name,
                    " (the fused sublayer pair on the CPU kernels) is differentiable once only: its backward cannot be "
                    "differentiated again (create_graph=True); use backend='reference' for higher derivatives");
}

struct PostCarry : public torch::autograd::Function<PostCarry> {
    static Tensor forward(AutogradContext *ctx, const Tensor &carrier, const Tensor &y_in, const Tensor &h_post_in,
                          const std::optional<Tensor> &h_res_opt) {
        const Tensor h_res_in = h_res_opt.has_value() ? *h_res_opt : Tensor();
        const at::ScalarType dt = carrier.scalar_type(), cd = coef_type(dt);
        const int64_t n = carrier.size(-2), c = carrier.size(-1), t = carrier.numel() / (n * c);
        TORCH_CHECK(carrier.is_contiguous(), "mhckit_pair::post_carry: the carrier must be contiguous");
        const Tensor y = contig(y_in, dt), h_post = contig(h_post_in, cd), h_res = contig(h_res_in, cd);
        Tensor out = at::empty(carrier.sizes(), carrier.options());
        check(run<post_res_fwd_t>(K_POST_RES_FWD, dt, ptr(carrier), ptr(y), ptr(h_post), ptr(h_res), mptr(out), t,
                                                          (int)n, c, at::get_num_threads()),
              "mhc_post_res_fwd");
        ctx->save_for_backward({y, h_post});
        return out;
    }

    static variable_list backward(AutogradContext *ctx, const variable_list &grads) {
        no_double_backward(grads, "mhc_post_res");
        const Tensor &g_in = grads[0];
        const bool need_y = ctx->needs_input_grad(1), need_post = ctx->needs_input_grad(2);
        Tensor gy, gp;
        auto &sd = ctx->saved_data;
        if (sd.count("joined")) {  // made by the next sublayer's coefficient backward (CoeffsCarry)
            const Tensor g = sd.at("joined").toTensor();
            const int64_t version = sd.at("joined_version").toInt();
            if (sd.count("joined_gy")) gy = sd.at("joined_gy").toTensor();
            if (sd.count("joined_gp")) gp = sd.at("joined_gp").toTensor();
            for (const char *k : {"joined", "joined_version", "joined_gy", "joined_gp"}) sd.erase(k);
            // only if this gradient is the very tensor they were made from, unchanged (no other consumer of
            // the write-back's output added to it, no hook replaced or modified it)
            if (g_in.defined() && g_in.unsafeGetTensorImpl() == g.unsafeGetTensorImpl() && g_in._version() == version &&
                gy.defined() == need_y && gp.defined() == need_post) {
                g_joined.fetch_add(1, std::memory_order_relaxed);
                return {ctx->needs_input_grad(0) ? g_in : Tensor(), gy, gp, Tensor()};
            }
            gy = gp = Tensor();
        }
        auto saved = ctx->get_saved_variables();
        const Tensor &y = saved[0], &h_post = saved[1];
        if (need_y || need_post) {
            const at::ScalarType dt = g_in.scalar_type();
            const int64_t n = g_in.size(-2), c = g_in.size(-1), t = g_in.numel() / (n * c);
            Tensor g = contig(g_in, dt);
            gy = need_y ? at::empty(y.sizes(), y.options()) : Tensor();
            gp = need_post ? at::empty(h_post.sizes(), h_post.options()) : Tensor();
            check(run<post_res_bwd_t>(K_POST_RES_BWD, dt, nullptr, ptr(y), ptr(h_post), nullptr, ptr(g), nullptr,
                                                              mptr(gy), mptr(gp), nullptr, t, (int)n, c,
                                                              at::get_num_threads()),
                  "mhc_post_res_bwd");
        }
        return {ctx->needs_input_grad(0) ? g_in : Tensor(), gy, gp, Tensor()};
    }
};

struct CoeffsCarry : public torch::autograd::Function<CoeffsCarry> {
    // (u, h_pre, h_post, h_res (an empty stand-in for the identity), carrier)
    static variable_list forward(AutogradContext *ctx, const Tensor &x_in, const Tensor &phi_in,
                                 const Tensor &bias_in, const Tensor &alpha_in, int64_t iters, double rms_eps,
                                 bool here, bool reuse) {
        const at::ScalarType dt = x_in.scalar_type(), cd = coef_type(dt);
        // the kernels read whole contiguous rows (as mhckit.ops.cpu's wrappers hand them over)
        const Tensor x = contig(x_in, dt), phi = contig(phi_in, cd), bias = contig(bias_in, cd),
                     alpha = contig(alpha_in, cd);
        const int64_t n = x.size(-2), c = x.size(-1), t = x.numel() / (n * c), k = phi.size(1);
        const auto f32 = x.options().dtype(cd);
        Tensor z = here ? at::empty({t, k}, f32) : at::mm(x.view({t, n * c}), phi);
        Tensor r = at::empty({t, 1}, f32);
        Tensor h_pre = at::empty(lead_with(x, {n}), f32), h_post = at::empty(lead_with(x, {n}), f32);
        Tensor h_res = iters == IDENTITY ? Tensor() : at::empty(lead_with(x, {n, n}), f32);
        Tensor u = at::empty(lead_with(x, {c}), x.options());
        check(run<coeffs_fwd_t>(K_COEFFS_FWD, dt, ptr(x), here ? ptr(phi) : nullptr, mptr(z), ptr(bias), ptr(alpha),
                                                      rms_eps, mptr(r), mptr(h_pre), mptr(h_post), mptr(h_res),
                                                      mptr(u), t, (int)n, c, (int)iters, at::get_num_threads()),
              "mhc_coeffs_fwd");
        ctx->save_for_backward({x, phi, bias, alpha, r, z});
        // x made by the previous sublayer's write-back (the C++ pair's PostCarry): this backward's dx is that
        // write-back's output gradient, and it can run that backward on it too (the node outlives this one's
        // backward: it is the grad_fn at the end of this node's edge for x)
        const auto prev = x_in.grad_fn();
        auto *post = dynamic_cast<torch::autograd::CppNode<PostCarry> *>(prev.get());
        ctx->saved_data["prev"] = static_cast<int64_t>(
            post != nullptr && (dt == at::kFloat || dt == at::kDouble) && here ? reinterpret_cast<intptr_t>(post) : 0);
        ctx->saved_data["iters"] = iters;
        ctx->saved_data["here"] = here;
        ctx->saved_data["reuse"] = reuse;
        ctx->set_materialize_grads(false);
        // autograd takes no undefined outputs: the identity's h_res is an empty stand-in (Python: None)
        return {u, h_pre, h_post, h_res.defined() ? h_res : at::empty({0}, f32), x.view(x.sizes())};
    }

    static variable_list backward(AutogradContext *ctx, const variable_list &grads) {
        no_double_backward(grads, "mhc_coeffs_pre");
        const Tensor &g_out_in = grads[4];
        auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &phi = saved[1], &bias = saved[2], &alpha = saved[3], &r = saved[4], &z = saved[5];
        const bool need_x = ctx->needs_input_grad(0), need_phi = ctx->needs_input_grad(1);
        const bool free = take_buffer(ctx, need_x, g_out_in, x);
        const int64_t iters = ctx->saved_data["iters"].toInt();
        const bool here = ctx->saved_data["here"].toBool();
        const at::ScalarType dt = x.scalar_type(), cd = coef_type(dt);
        const int64_t n = x.size(-2), c = x.size(-1), t = x.numel() / (n * c), k = z.size(-1);
        const auto f32 = x.options().dtype(cd);
        Tensor gu = contig(grads[0], dt), g_pre = contig(grads[1], cd), g_post = contig(grads[2], cd);
        Tensor g_res = contig(grads[3], cd), g_out = contig(g_out_in, dt);
        Tensor gzr = here ? Tensor() : at::empty({t, k}, f32);
        Tensor gx = !need_x ? Tensor() : free ? g_out : at::empty(x.sizes(), x.options());
        Tensor dphi = here && need_phi ? at::empty({n * c, k}, f32) : Tensor();
        Tensor dbias = at::empty({k}, f32), dalpha = at::empty({3}, f32);
        auto *post = reinterpret_cast<torch::autograd::CppNode<PostCarry> *>(
            static_cast<intptr_t>(ctx->saved_data["prev"].toInt()));
        Tensor y_prev, hp_prev, gy_prev, gp_prev;
        if (post != nullptr && gx.defined() && g_join.load(std::memory_order_relaxed)) {
            AutogradContext &pc = post->ctx_;
            const bool ny = pc.needs_input_grad(1), np = pc.needs_input_grad(2);
            if (ny || np) {
                auto prev_saved = pc.get_saved_variables();
                y_prev = prev_saved[0], hp_prev = prev_saved[1];
                if (y_prev.scalar_type() == dt && y_prev.numel() == t * c && hp_prev.scalar_type() == cd &&
                    hp_prev.numel() == t * n) {
                    gy_prev = ny ? at::empty(y_prev.sizes(), y_prev.options()) : Tensor();
                    gp_prev = np ? at::empty(hp_prev.sizes(), hp_prev.options()) : Tensor();
                }
            }
        }
        if (gy_prev.defined() || gp_prev.defined()) {
            check(run<coeffs_bwd_post_t>(K_COEFFS_BWD_POST, dt, ptr(x), ptr(gu), ptr(g_out), ptr(z), ptr(r), ptr(bias),
                                         ptr(alpha), ptr(g_pre), ptr(g_post), ptr(g_res), ptr(phi), mptr(gzr),
                                         mptr(gx), mptr(dphi), mptr(dbias), mptr(dalpha), t, (int)n, c, (int)iters,
                                         at::get_num_threads(), ptr(y_prev), ptr(hp_prev), mptr(gy_prev),
                                         mptr(gp_prev)),
                  "mhc_coeffs_bwd_post");
            auto &sd = post->ctx_.saved_data;
            sd["joined"] = gx;
            sd["joined_version"] = static_cast<int64_t>(gx._version());
            if (gy_prev.defined()) sd["joined_gy"] = gy_prev;
            if (gp_prev.defined()) sd["joined_gp"] = gp_prev;
        } else {
            check(run<coeffs_bwd_t>(K_COEFFS_BWD, dt, ptr(x), ptr(gu), ptr(g_out), ptr(z), ptr(r), ptr(bias),
                                    ptr(alpha), ptr(g_pre), ptr(g_post), ptr(g_res), here ? ptr(phi) : nullptr,
                                    mptr(gzr), mptr(gx), mptr(dphi), mptr(dbias), mptr(dalpha), t, (int)n, c,
                                    (int)iters, at::get_num_threads()),
                  "mhc_coeffs_bwd");
        }
        if (!here) {
            if (need_phi) dphi = at::mm(x.view({t, n * c}).t(), gzr);
            if (gx.defined()) gx.view({t, n * c}).addmm_(gzr, phi.t());
        }
        return {gx, need_phi ? dphi : Tensor(), dbias, dalpha, Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

// Hyper-Connections' dynamic coefficients with the read (mhckit.ops.carry.HCCarryFunction): inputs x, sp, spo,
// sr, wp, wq, wr, sa, sb (as HCCoefficients holds them), eps; (u, h_pre, h_post, h_res, carrier)
struct HCCarry : public torch::autograd::Function<HCCarry> {
    static variable_list forward(AutogradContext *ctx, const Tensor &x_in, const Tensor &sp_in, const Tensor &spo_in,
                                 const Tensor &sr_in, const Tensor &wp_in, const Tensor &wq_in, const Tensor &wr_in,
                                 const Tensor &sa_in, const Tensor &sb_in, double eps, bool reuse) {
        const at::ScalarType dt = x_in.scalar_type(), cd = coef_type(dt);
        const Tensor x = contig(x_in, dt), sp = contig(sp_in, cd), spo = contig(spo_in, cd), sr = contig(sr_in, cd),
                     wp = contig(wp_in, cd), wq = contig(wq_in, cd), wr = contig(wr_in, cd), sa = contig(sa_in, cd),
                     sb = contig(sb_in, cd);
        const int64_t n = x.size(-2), c = x.size(-1), t = x.numel() / (n * c);
        const auto f32 = x.options().dtype(cd);
        Tensor z = at::empty({t, n, n + 2}, f32), r = at::empty({t, n}, f32);
        Tensor h_pre = at::empty(lead_with(x, {n}), f32), h_post = at::empty(lead_with(x, {n}), f32);
        Tensor h_res = at::empty(lead_with(x, {n, n}), f32), u = at::empty(lead_with(x, {c}), x.options());
        check(run<hc_fwd_t>(K_HC_FWD, dt, ptr(x), ptr(wp), ptr(wq), ptr(wr), ptr(sp), ptr(spo), ptr(sr), ptr(sa),
                            ptr(sb), eps, mptr(z), mptr(r), mptr(h_pre), mptr(h_post), mptr(h_res), mptr(u), t,
                            (int)n, c, at::get_num_threads()),
              "mhc_hc_fwd");
        ctx->save_for_backward({x, sp, spo, sr, wp, wq, wr, sa, sb, z, r});
        ctx->saved_data["reuse"] = reuse;
        ctx->set_materialize_grads(false);
        return {u, h_pre, h_post, h_res, x.view(x.sizes())};
    }

    static variable_list backward(AutogradContext *ctx, const variable_list &grads) {
        no_double_backward(grads, "hc_coeffs");
        auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &sp = saved[1], &sr = saved[3], &wp = saved[4], &wq = saved[5], &wr = saved[6],
                     &sa = saved[7], &sb = saved[8], &z = saved[9], &r = saved[10];
        bool need[9];
        for (int i = 0; i < 9; i++) need[i] = ctx->needs_input_grad(i);
        const bool free = take_buffer(ctx, need[0], grads[4], x);
        const at::ScalarType dt = x.scalar_type(), cd = coef_type(dt);
        const int64_t n = x.size(-2), c = x.size(-1), t = x.numel() / (n * c);
        const auto f32 = x.options().dtype(cd);
        Tensor gu = contig(grads[0], dt), g_pre = contig(grads[1], cd), g_post = contig(grads[2], cd);
        Tensor g_res = contig(grads[3], cd), g_out = contig(grads[4], dt);
        Tensor gx = !need[0] ? Tensor() : free ? g_out : at::empty(x.sizes(), x.options());
        Tensor dwp = at::empty({c}, f32), dwq = at::empty({c}, f32), dwr = at::empty({c, n}, f32);
        Tensor dsp = at::empty({n}, f32), dspo = at::empty({n}, f32), dsr = at::empty({n, n}, f32);
        Tensor dsa = at::empty(sa.sizes(), f32), dsb = at::empty(sb.sizes(), f32);
        check(run<hc_bwd_t>(K_HC_BWD, dt, ptr(x), ptr(gu), ptr(g_out), ptr(z), ptr(r), ptr(wp), ptr(wq), ptr(wr),
                            ptr(sp), ptr(sr), ptr(sa), ptr(sb), ptr(g_pre), ptr(g_post), ptr(g_res), mptr(gx),
                            mptr(dwp), mptr(dwq), mptr(dwr), mptr(dsp), mptr(dspo), mptr(dsr), mptr(dsa), mptr(dsb), t,
                            (int)n, c, at::get_num_threads()),
              "mhc_hc_bwd");
        // which coefficients got a gradient (as HCCarryFunction): h_pre (through u or itself), h_post, h_res
        // (itself or the write-back); a parameter that reaches none of them gets None, as autograd gives
        const bool pre = gu.defined() || g_pre.defined(), post = g_post.defined(), res = g_res.defined() || g_out.defined();
        const bool reach[9] = {pre || post || res, pre, post, res, pre, post, res, pre || res, post};
        const Tensor all[9] = {gx, dsp, dspo, dsr, dwp, dwq, dwr, dsa, dsb};
        variable_list out;
        for (int i = 0; i < 9; i++) out.push_back(need[i] && reach[i] ? all[i] : Tensor());
        out.push_back(Tensor());  // eps
        out.push_back(Tensor());  // reuse
        return out;
    }
};

// The read of coefficients computed elsewhere (static HC; mhckit.ops.carry.ReadCarryFunction): (u, carrier)
struct ReadCarry : public torch::autograd::Function<ReadCarry> {
    static variable_list forward(AutogradContext *ctx, const Tensor &x_in, const Tensor &h_pre_in,
                                 const Tensor &h_res_in, bool reuse) {
        const at::ScalarType dt = x_in.scalar_type(), cd = coef_type(dt);
        const Tensor x = contig(x_in, dt), h_pre = contig(h_pre_in, cd), h_res = contig(h_res_in, cd);
        const int64_t n = x.size(-2), c = x.size(-1), t = x.numel() / (n * c);
        Tensor u = at::empty(lead_with(x, {c}), x.options());
        check(run<pre_fwd_t>(K_PRE_FWD, dt, ptr(x), ptr(h_pre), mptr(u), t, (int)n, c, at::get_num_threads()),
              "mhc_pre_fwd");
        ctx->save_for_backward({x, h_pre, h_res});
        ctx->saved_data["reuse"] = reuse;
        ctx->set_materialize_grads(false);
        return {u, x.view(x.sizes())};
    }

    static variable_list backward(AutogradContext *ctx, const variable_list &grads) {
        no_double_backward(grads, "mhc_pre");
        auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &h_pre = saved[1], &h_res = saved[2];
        const bool need_x = ctx->needs_input_grad(0), need_pre = ctx->needs_input_grad(1),
                   need_res = ctx->needs_input_grad(2);
        const bool free = take_buffer(ctx, need_x, grads[1], x);
        const at::ScalarType dt = x.scalar_type(), cd = coef_type(dt);
        const int64_t n = x.size(-2), c = x.size(-1), t = x.numel() / (n * c);
        const auto f32 = x.options().dtype(cd);
        Tensor gu = contig(grads[0], dt), g = contig(grads[1], dt);
        Tensor gx = !need_x ? Tensor() : free ? g : at::empty(x.sizes(), x.options());
        Tensor gp = need_pre && gu.defined() ? at::empty(lead_with(x, {n}), f32) : Tensor();
        Tensor gr = need_res && g.defined() ? at::empty(lead_with(x, {n, n}), f32) : Tensor();
        check(run<read_bwd_t>(K_READ_BWD, dt, ptr(x), ptr(h_pre), ptr(h_res), ptr(gu), ptr(g), mptr(gx), mptr(gp),
                              mptr(gr), t, (int)n, c, at::get_num_threads()),
              "mhc_read_bwd");
        return {gx, gp, gr, Tensor()};
    }
};

std::vector<Tensor> hc_carry(const Tensor &x, const Tensor &sp, const Tensor &spo, const Tensor &sr, const Tensor &wp,
                             const Tensor &wq, const Tensor &wr, const Tensor &sa, const Tensor &sb, double eps,
                             bool reuse) {
    return HCCarry::apply(x, sp, spo, sr, wp, wq, wr, sa, sb, eps, reuse);
}

std::vector<Tensor> read_carry(const Tensor &x, const Tensor &h_pre, const Tensor &h_res, bool reuse) {
    return ReadCarry::apply(x, h_pre, h_res, reuse);
}

std::vector<Tensor> coeffs_carry(const Tensor &x, const Tensor &phi, const Tensor &bias, const Tensor &alpha,
                                 int64_t iters, double rms_eps, bool here, bool reuse) {
    return CoeffsCarry::apply(x, phi, bias, alpha, iters, rms_eps, here, reuse);
}

Tensor post_carry(const Tensor &carrier, const Tensor &y, const Tensor &h_post, const std::optional<Tensor> &h_res) {
    return PostCarry::apply(carrier, y, h_post, h_res);
}

void set_kernels(at::IntArrayRef table) {
    TORCH_CHECK(table.size() == g_kernels.size(), "mhckit_pair::set_kernels: expected ", g_kernels.size(),
                " addresses, got ", table.size());
    for (size_t i = 0; i < table.size(); i++) g_kernels[i].store(table[i]);
}

std::vector<int64_t> kernel_table() {
    std::vector<int64_t> t;
    for (const auto &p : g_kernels) t.push_back(p.load());
    return t;
}

void set_skip(bool on) { g_skip.store(on); }

int64_t calls() { return g_calls.load(); }

int64_t reused() { return g_reused.load(); }

int64_t joined() { return g_joined.load(); }

void set_join(bool on) { g_join.store(on); }

int64_t abi_version() { return 3; }

}  // namespace

TORCH_LIBRARY(mhckit_pair, m) {
    m.def("coeffs_carry(Tensor x, Tensor phi, Tensor bias, Tensor alpha, int iters, float rms_eps, bool here, "
          "bool reuse) -> Tensor[]");
    m.def("post_carry(Tensor carrier, Tensor y, Tensor h_post, Tensor? h_res) -> Tensor");
    m.def("hc_carry(Tensor x, Tensor sp, Tensor spo, Tensor sr, Tensor wp, Tensor wq, Tensor wr, Tensor sa, Tensor sb, "
          "float eps, bool reuse) -> Tensor[]");
    m.def("read_carry(Tensor x, Tensor h_pre, Tensor h_res, bool reuse) -> Tensor[]");
    m.def("set_kernels(int[] table) -> ()", &set_kernels);
    m.def("kernel_table() -> int[]", &kernel_table);
    m.def("set_skip(bool on) -> ()", &set_skip);
    m.def("calls() -> int", &calls);
    m.def("reused() -> int", &reused);
    m.def("joined() -> int", &joined);
    m.def("set_join(bool on) -> ()", &set_join);
    m.def("abi_version() -> int", &abi_version);
}

TORCH_LIBRARY_IMPL(mhckit_pair, CompositeImplicitAutograd, m) {
    m.impl("coeffs_carry", &coeffs_carry);
    m.impl("post_carry", &post_carry);
    m.impl("hc_carry", &hc_carry);
    m.impl("read_carry", &read_carry);
}
