// CPU decode_prep kernel: one layer's optional q/k RMSNorm, RoPE at pos, AHN gates and the ring write with
// eviction (reference: ahn_rt/ref.py decode_prep_ref; bf16/fp16 rounding follows its per-op order).
// Test: pytest tests/test_ops.py -k decode_prep.
#include <cmath>
#include <vector>

#include "../common.h"

namespace ahn_rt {

namespace {

// One head row of q or k: optional RMSNorm, then rotate-half RoPE; returns the values rounded to T.
template <typename T>
void norm_rope_row(const T* proj, int64_t stride, const T* norm_w, float eps, const float* cs, const float* sn,
                   int64_t D, float* x, float* y) {
  for (int64_t i = 0; i < D; ++i) x[i] = static_cast<float>(proj[i * stride]);
  if (norm_w != nullptr) {
    double ss = 0.0;
    for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float rs = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(D)) + eps);
    for (int64_t i = 0; i < D; ++i) x[i] = round_to<T>(static_cast<float>(norm_w[i]) * round_to<T>(x[i] * rs));
  }
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    // x * cos + rotate_half(x) * sin, each product and the sum rounded to T as torch does.
    y[i] = round_to<T>(round_to<T>(x[i] * cs[i]) + round_to<T>(-x[i + half] * sn[i]));
    y[i + half] = round_to<T>(round_to<T>(x[i + half] * cs[i]) + round_to<T>(x[i] * sn[i]));
  }
}

}  // namespace

template <typename T>
void decode_prep_cpu(const DecodePrepParams& p) {
  const int64_t pos = *p.pos;
  const int64_t slot = ring_slot(pos, p.sinks, p.window);
  const bool gated = p.dt_bias != nullptr;  // an AHN memory: its gates are kept per slot and evicted
  const bool evict = gated && pos >= p.sinks + p.window;
  const int64_t D = p.D, half = D / 2, H = p.H, Hkv = p.Hkv;
  const T* proj = static_cast<const T*>(p.proj);
  const int64_t ps = p.proj_stride;
  std::vector<float> cs(half), sn(half), x(D), y(D);
  for (int64_t i = 0; i < half; ++i) {
    const float angle = static_cast<float>(pos) * p.inv_freq[i];
    cs[i] = round_to<T>(std::cos(angle));
    sn[i] = round_to<T>(std::sin(angle));
  }
  const T* qn = static_cast<const T*>(p.q_norm);
  const T* kn = static_cast<const T*>(p.k_norm);
  T* q_out = static_cast<T*>(p.q_out);
  for (int64_t h = 0; h < H; ++h) {
    norm_rope_row<T>(proj + h * D * ps, ps, qn, p.norm_eps, cs.data(), sn.data(), D, x.data(), y.data());
    for (int64_t i = 0; i < D; ++i) q_out[h * D + i] = T(y[i]);
  }
  T* kc = static_cast<T*>(p.k_cache);
  T* vc = static_cast<T*>(p.v_cache);
  T* ke = static_cast<T*>(p.k_evict);
  T* ve = static_cast<T*>(p.v_evict);
  for (int64_t j = 0; j < Hkv; ++j) {
    T* krow = kc + j * p.kc_s0 + slot * p.kc_s1;
    T* vrow = vc + j * p.vc_s0 + slot * p.vc_s1;
    if (evict) {
      for (int64_t i = 0; i < D; ++i) {
        ke[j * p.ke_s0 + i] = krow[i];
        ve[j * p.ve_s0 + i] = vrow[i];
      }
    }
    norm_rope_row<T>(proj + (H + j) * D * ps, ps, kn, p.norm_eps, cs.data(), sn.data(), D, x.data(), y.data());
    const T* vsrc = proj + (H + Hkv + j) * D * ps;
    for (int64_t i = 0; i < D; ++i) {
      krow[i] = T(y[i]);
      vrow[i] = vsrc[i * ps];
    }
  }
  if (!gated) return;
  // alpha = -exp(a_log) softplus(a + dt_bias) and beta = sigmoid(b) (GatedDeltaNet); without a_log the
  // float32 gate is dt = softplus(a + dt_bias) and there is no beta (Mamba2).
  const bool has_beta = p.a_log != nullptr;
  T* bc = static_cast<T*>(p.beta_cache);
  T* be = static_cast<T*>(p.beta_evict);
  const T* a = proj + (H + 2 * Hkv) * D * ps;
  const T* b = a + H * ps;
  for (int64_t h = 0; h < H; ++h) {
    float* aslot = p.alpha_cache + slot * p.ac_s0 + h * p.ac_s1;
    T* bslot = has_beta ? bc + slot * p.bc_s0 + h * p.bc_s1 : nullptr;
    if (evict) {
      p.alpha_evict[h * p.ae_s0] = *aslot;
      if (has_beta) be[h * p.be_s0] = *bslot;
    }
    const float av = softplus(static_cast<float>(a[h * ps]) + load_kind(p.dt_bias, p.dt_bias_kind, h));
    if (!has_beta) {
      *aslot = av;
      continue;
    }
    *aslot = -std::exp(load_kind(p.a_log, p.a_log_kind, h)) * av;
    *bslot = T(1.f / (1.f + std::exp(-static_cast<float>(b[h * ps]))));
  }
}

template void decode_prep_cpu<float>(const DecodePrepParams&);
template void decode_prep_cpu<c10::BFloat16>(const DecodePrepParams&);
template void decode_prep_cpu<c10::Half>(const DecodePrepParams&);

}  // namespace ahn_rt
