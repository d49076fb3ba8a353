// ahn_rt.decode_prep: the checked host entry function (checks, device guard, stream, dtype dispatch, launch,
// launch-error check). Kernels: cpu/decode_prep.cpp, cuda/decode_prep.cu.
// Test: pytest tests/test_ops.py -k decode_prep.
#include "host.h"

namespace ahn_rt {

at::Tensor decode_prep(const at::Tensor& proj, const at::Tensor& inv_freq, const at::Tensor& pos,
                       const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                       double norm_eps, const std::optional<at::Tensor>& a_log,
                       const std::optional<at::Tensor>& dt_bias, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const std::optional<at::Tensor>& beta_cache,
                       const std::optional<at::Tensor>& alpha_cache, int64_t sinks, int64_t window,
                       const at::Tensor& k_evict, const at::Tensor& v_evict,
                       const std::optional<at::Tensor>& beta_evict,
                       const std::optional<at::Tensor>& alpha_evict) {
  constexpr const char* op = "ahn_rt.decode_prep";
  const auto dtype = proj.scalar_type();
  TORCH_CHECK(proj.dim() == 1, op, ": proj must be 1-D [P], got ", proj.sizes());
  TORCH_CHECK(k_cache.dim() == 3, op, ": k_cache must be [Hkv, C, D], got ", k_cache.sizes());
  const int64_t Hkv = k_cache.size(0), C = k_cache.size(1), D = k_cache.size(2), P = proj.size(0);
  TORCH_CHECK(Hkv > 0 && D > 0 && D % 2 == 0, op, ": need Hkv > 0 and an even head dim D, got k_cache ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache ", v_cache.sizes(), " must match k_cache ",
              k_cache.sizes());
  TORCH_CHECK(sinks >= 0 && window >= 1 && sinks + window <= C, op, ": need sinks >= 0, window >= 1 and ",
              "sinks + window <= C; got sinks=", sinks, " window=", window, " C=", C);
  const bool gated = a_log.has_value();
  TORCH_CHECK(dt_bias.has_value() == gated && beta_cache.has_value() == gated &&
                  alpha_cache.has_value() == gated && beta_evict.has_value() == gated &&
                  alpha_evict.has_value() == gated,
              op, ": a_log, dt_bias, beta_cache, alpha_cache, beta_evict, alpha_evict are given together or not ",
              "at all");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), op, ": q_norm and k_norm are given together");
  int64_t H;
  if (gated) {
    TORCH_CHECK(beta_cache->dim() == 2 && beta_cache->size(0) == C, op, ": beta_cache must be [C, H] with C=",
                C, ", got ", beta_cache->sizes());
    H = beta_cache->size(1);
    TORCH_CHECK(P >= (H + 2 * Hkv) * D + 2 * H, op, ": proj has ", P, " values; the gated layout needs at least ",
                (H + 2 * Hkv) * D + 2 * H);
  } else {
    TORCH_CHECK(P > 2 * Hkv * D && (P - 2 * Hkv * D) % D == 0, op, ": proj of ", P,
                " values is not [q (H*D) | k | v] for D=", D, ", Hkv=", Hkv);
    H = (P - 2 * Hkv * D) / D;
  }
  check_pos(pos, proj, op);
  check_vec(inv_freq, D / 2, proj, op, "inv_freq");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.stride(0) == 1, op,
              ": inv_freq must be contiguous float32");
  for (const at::Tensor* t : {&k_cache, &v_cache}) {
    check_same_device(proj, *t, op, "k_cache/v_cache");
    TORCH_CHECK(t->scalar_type() == dtype, op, ": caches must have proj's dtype ", dtype);
    TORCH_CHECK(t->stride(2) == 1, op, ": caches must be contiguous along D");
  }
  for (const at::Tensor* t : {&k_evict, &v_evict}) {
    check_same_device(proj, *t, op, "k_evict/v_evict");
    TORCH_CHECK(t->dim() == 2 && t->size(0) == Hkv && t->size(1) == D, op, ": k_evict/v_evict must be [", Hkv,
                ", ", D, "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == dtype && t->stride(1) == 1, op, ": evict buffers must have dtype ", dtype,
                " and a contiguous last dim");
  }
  if (q_norm.has_value()) {
    for (const at::Tensor* t : {&*q_norm, &*k_norm}) {
      check_vec(*t, D, proj, op, "q_norm/k_norm");
      TORCH_CHECK(t->scalar_type() == dtype && t->stride(0) == 1, op, ": q_norm/k_norm must be contiguous ", dtype);
    }
  }
  Kind a_log_kind = Kind::F32, dt_bias_kind = Kind::F32;
  if (gated) {
    check_vec(*a_log, H, proj, op, "a_log");
    check_vec(*dt_bias, H, proj, op, "dt_bias");
    a_log_kind = kind_of(*a_log, "a_log");
    dt_bias_kind = kind_of(*dt_bias, "dt_bias");
    TORCH_CHECK(a_log->stride(0) == 1 && dt_bias->stride(0) == 1, op, ": a_log/dt_bias must be contiguous");
    check_same_device(proj, *beta_cache, op, "beta_cache");
    TORCH_CHECK(beta_cache->scalar_type() == dtype, op, ": beta_cache must have proj's dtype ", dtype);
    check_same_device(proj, *alpha_cache, op, "alpha_cache");
    TORCH_CHECK(alpha_cache->dim() == 2 && alpha_cache->size(0) == C && alpha_cache->size(1) == H, op,
                ": alpha_cache must be [", C, ", ", H, "], got ", alpha_cache->sizes());
    TORCH_CHECK(alpha_cache->scalar_type() == at::kFloat, op, ": alpha_cache must be float32");
    check_vec(*beta_evict, H, proj, op, "beta_evict");
    TORCH_CHECK(beta_evict->scalar_type() == dtype, op, ": beta_evict must have proj's dtype ", dtype);
    check_vec(*alpha_evict, H, proj, op, "alpha_evict");
    TORCH_CHECK(alpha_evict->scalar_type() == at::kFloat, op, ": alpha_evict must be float32");
  }

  at::Tensor q_out = at::empty({H, D}, proj.options());
  DecodePrepParams p{};
  p.proj = proj.data_ptr();
  p.proj_stride = proj.stride(0);
  p.inv_freq = inv_freq.data_ptr<float>();
  p.pos = pos.data_ptr<int64_t>();
  p.q_norm = q_norm.has_value() ? q_norm->data_ptr() : nullptr;
  p.k_norm = k_norm.has_value() ? k_norm->data_ptr() : nullptr;
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.kc_s0 = k_cache.stride(0);
  p.kc_s1 = k_cache.stride(1);
  p.vc_s0 = v_cache.stride(0);
  p.vc_s1 = v_cache.stride(1);
  p.k_evict = k_evict.data_ptr();
  p.v_evict = v_evict.data_ptr();
  p.ke_s0 = k_evict.stride(0);
  p.ve_s0 = v_evict.stride(0);
  if (gated) {
    p.a_log = a_log->data_ptr();
    p.a_log_kind = a_log_kind;
    p.dt_bias = dt_bias->data_ptr();
    p.dt_bias_kind = dt_bias_kind;
    p.beta_cache = beta_cache->data_ptr();
    p.bc_s0 = beta_cache->stride(0);
    p.bc_s1 = beta_cache->stride(1);
    p.alpha_cache = alpha_cache->data_ptr<float>();
    p.ac_s0 = alpha_cache->stride(0);
    p.ac_s1 = alpha_cache->stride(1);
    p.beta_evict = beta_evict->data_ptr();
    p.be_s0 = beta_evict->stride(0);
    p.alpha_evict = alpha_evict->data_ptr<float>();
    p.ae_s0 = alpha_evict->stride(0);
  }
  p.q_out = q_out.data_ptr();
  p.H = H;
  p.Hkv = Hkv;
  p.D = D;
  p.sinks = sinks;
  p.window = window;
  p.norm_eps = static_cast<float>(norm_eps);
#ifdef AHN_RT_WITH_CUDA
  if (proj.is_cuda()) {
    TORCH_CHECK(D <= 512, op, ": CUDA supports head dims up to 512, got ", D);
    const c10::cuda::CUDAGuard guard(proj.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_dtype(dtype, op, [&](auto tag) { decode_prep_cuda<decltype(tag)>(p, stream); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return q_out;
  }
#endif
  TORCH_CHECK(proj.is_cpu(), op, ": no kernel for device ", proj.device());
  dispatch_dtype(dtype, op, [&](auto tag) { decode_prep_cpu<decltype(tag)>(p); });
  return q_out;
}

}  // namespace ahn_rt
