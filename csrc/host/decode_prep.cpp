// ahn_rt.decode_prep: the checked host entry function (checks, device guard, stream, dtype dispatch, launch,
// launch-error check). Kernels: cpu/decode_prep.cpp, cuda/decode_prep.cu.
// Test: pytest tests/test_ops.py -k decode_prep.
#include "host.h"

namespace ahn_rt {

namespace {

constexpr const char* op = "ahn_rt.decode_prep";

// The checks and launch of one row's tensors (unbatched shapes). Batched (B > 0): the tensors are row 0 /
// entry 0 of the batched ones, the output is [B, H, D] and `batch` fills the params' batch fields.
template <typename Batch>
at::Tensor run(const at::Tensor& proj, const at::Tensor& inv_freq, const at::Tensor& pos,
               const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm, double norm_eps,
               const std::optional<at::Tensor>& a_log, const std::optional<at::Tensor>& dt_bias,
               const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& beta_cache,
               const std::optional<at::Tensor>& alpha_cache, int64_t sinks, int64_t window,
               const at::Tensor& k_evict, const at::Tensor& v_evict, const std::optional<at::Tensor>& beta_evict,
               const std::optional<at::Tensor>& alpha_evict, int64_t B, Batch&& batch) {
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
  // Gates: GatedDeltaNet gives a_log, dt_bias and both gate fields (beta, alpha); Mamba2 gives dt_bias and
  // the float32 field alone (alpha holds dt); no memory gives none of them.
  const bool gated = dt_bias.has_value(), has_beta = a_log.has_value();
  TORCH_CHECK(alpha_cache.has_value() == gated && alpha_evict.has_value() == gated, op,
              ": dt_bias, alpha_cache and alpha_evict are given together or not at all");
  TORCH_CHECK(beta_cache.has_value() == has_beta && beta_evict.has_value() == has_beta && (gated || !has_beta), op,
              ": a_log, beta_cache and beta_evict are given together, and only with dt_bias");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), op, ": q_norm and k_norm are given together");
  int64_t H;
  if (gated) {
    TORCH_CHECK(alpha_cache->dim() == 2 && alpha_cache->size(0) == C, op, ": alpha_cache must be [C, H] with C=",
                C, ", got ", alpha_cache->sizes());
    H = alpha_cache->size(1);
    const int64_t rows = has_beta ? 2 * H : H;  // [a | b | ...] or [dt | ...]
    TORCH_CHECK(P >= (H + 2 * Hkv) * D + rows, op, ": proj has ", P, " values; the gated layout needs at least ",
                (H + 2 * Hkv) * D + rows);
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
    check_vec(*dt_bias, H, proj, op, "dt_bias");
    dt_bias_kind = kind_of(*dt_bias, "dt_bias");
    TORCH_CHECK(dt_bias->stride(0) == 1, op, ": dt_bias must be contiguous");
    check_same_device(proj, *alpha_cache, op, "alpha_cache");
    TORCH_CHECK(alpha_cache->scalar_type() == at::kFloat, op, ": alpha_cache must be float32");
    check_vec(*alpha_evict, H, proj, op, "alpha_evict");
    TORCH_CHECK(alpha_evict->scalar_type() == at::kFloat, op, ": alpha_evict must be float32");
  }
  if (has_beta) {
    check_vec(*a_log, H, proj, op, "a_log");
    a_log_kind = kind_of(*a_log, "a_log");
    TORCH_CHECK(a_log->stride(0) == 1, op, ": a_log must be contiguous");
    check_same_device(proj, *beta_cache, op, "beta_cache");
    TORCH_CHECK(beta_cache->dim() == 2 && beta_cache->size(0) == C && beta_cache->size(1) == H, op,
                ": beta_cache must be [", C, ", ", H, "], got ", beta_cache->sizes());
    TORCH_CHECK(beta_cache->scalar_type() == dtype, op, ": beta_cache must have proj's dtype ", dtype);
    check_vec(*beta_evict, H, proj, op, "beta_evict");
    TORCH_CHECK(beta_evict->scalar_type() == dtype, op, ": beta_evict must have proj's dtype ", dtype);
  }

  at::Tensor q_out = B > 0 ? at::empty({B, H, D}, proj.options()) : at::empty({H, D}, proj.options());
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
    p.dt_bias = dt_bias->data_ptr();
    p.dt_bias_kind = dt_bias_kind;
    p.alpha_cache = alpha_cache->data_ptr<float>();
    p.ac_s0 = alpha_cache->stride(0);
    p.ac_s1 = alpha_cache->stride(1);
    p.alpha_evict = alpha_evict->data_ptr<float>();
    p.ae_s0 = alpha_evict->stride(0);
  }
  if (has_beta) {
    p.a_log = a_log->data_ptr();
    p.a_log_kind = a_log_kind;
    p.beta_cache = beta_cache->data_ptr();
    p.bc_s0 = beta_cache->stride(0);
    p.bc_s1 = beta_cache->stride(1);
    p.beta_evict = beta_evict->data_ptr();
    p.be_s0 = beta_evict->stride(0);
  }
  p.q_out = q_out.data_ptr();
  p.H = H;
  p.Hkv = Hkv;
  p.D = D;
  p.sinks = sinks;
  p.window = window;
  p.norm_eps = static_cast<float>(norm_eps);
  if (B > 0) {
    p.q_rb = H * D * static_cast<int64_t>(q_out.element_size());
    batch(p);
  }
#ifdef AHN_RT_WITH_CUDA
  if (proj.is_cuda()) {
    TORCH_CHECK(D <= 512, op, ": CUDA supports head dims up to 512, got ", D);
    TORCH_CHECK(p.batch <= 65535, op, ": CUDA takes at most 65535 rows per call (grid y), got ", p.batch);
    const c10::cuda::CUDAGuard guard(proj.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_dtype(dtype, op, [&](auto tag) { decode_prep_cuda<decltype(tag)>(p, stream); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return q_out;
  }
#endif
  TORCH_CHECK(proj.is_cpu(), op, ": no kernel for device ", proj.device());
  dispatch_dtype(dtype, op, [&](auto tag) {
    for (int64_t b = 0; b < p.batch; ++b) decode_prep_cpu<decltype(tag)>(p.row(b));
  });
  return q_out;
}

}  // namespace

at::Tensor decode_prep(const at::Tensor& proj, const at::Tensor& inv_freq, const at::Tensor& pos,
                       const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                       double norm_eps, const std::optional<at::Tensor>& a_log,
                       const std::optional<at::Tensor>& dt_bias, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const std::optional<at::Tensor>& beta_cache,
                       const std::optional<at::Tensor>& alpha_cache, int64_t sinks, int64_t window,
                       const at::Tensor& k_evict, const at::Tensor& v_evict,
                       const std::optional<at::Tensor>& beta_evict,
                       const std::optional<at::Tensor>& alpha_evict, const std::optional<at::Tensor>& slots) {
  if (!slots) {
    return run(proj, inv_freq, pos, q_norm, k_norm, norm_eps, a_log, dt_bias, k_cache, v_cache, beta_cache,
               alpha_cache, sinks, window, k_evict, v_evict, beta_evict, alpha_evict, 0, [](DecodePrepParams&) {});
  }
  // Batched: proj [B, P] and q [B, H, D] by row; pos [N], caches [N, Hkv, C, D], gate caches [N, C, H],
  // evict buffers [N, Hkv, D] / [N, H] by state entry slots[b].
  TORCH_CHECK(k_cache.dim() == 4, op, ": with slots, k_cache must be [N, Hkv, C, D], got ", k_cache.sizes());
  const int64_t N = k_cache.size(0);
  const int64_t B = check_slots(*slots, N, proj, op);
  check_lead(proj, 2, B, op, "proj", "[B, P]");
  check_lead(v_cache, 4, N, op, "v_cache", "[N, Hkv, C, D]");
  check_lead(k_evict, 3, N, op, "k_evict", "[N, Hkv, D]");
  check_lead(v_evict, 3, N, op, "v_evict", "[N, Hkv, D]");
  for (const auto* t : {&beta_cache, &alpha_cache})
    if (*t) check_lead(**t, 3, N, op, "beta_cache/alpha_cache", "[N, C, H]");
  for (const auto* t : {&beta_evict, &alpha_evict})
    if (*t) check_lead(**t, 2, N, op, "beta_evict/alpha_evict", "[N, H]");
  check_entry_pos(pos, N, op);
  const int64_t* slot_ptr = slots->data_ptr<int64_t>();
  return run(proj.select(0, 0), inv_freq, pos.narrow(0, 0, 1), q_norm, k_norm, norm_eps, a_log, dt_bias,
             k_cache.select(0, 0), v_cache.select(0, 0), first(beta_cache), first(alpha_cache), sinks, window,
             k_evict.select(0, 0), v_evict.select(0, 0), first(beta_evict), first(alpha_evict), B,
             [&](DecodePrepParams& p) {
               p.slots = slot_ptr;
               p.batch = B;
               p.proj_rb = lead_bytes(proj);
               p.kc_eb = lead_bytes(k_cache);
               p.vc_eb = lead_bytes(v_cache);
               p.bc_eb = lead_bytes(beta_cache);
               p.ac_eb = lead_bytes(alpha_cache);
               p.ke_eb = lead_bytes(k_evict);
               p.ve_eb = lead_bytes(v_evict);
               p.be_eb = lead_bytes(beta_evict);
               p.ae_eb = lead_bytes(alpha_evict);
             });
}

}  // namespace ahn_rt
