// CPU gdn_decode kernel, the AHN memory step for one decoded token (reference: ahn_rt/ref.py gdn_decode_ref).
// Test: pytest tests/test_ops.py -k gdn.
//
// Gated-delta update of the fp32 state [H, Dk, Dv] in place (docs/semantics.md §5), the read, the per-head
// RMSNorm * w * swish(z) gate and the grouped o_proj (§6), added into out; a no-op while pos < sinks + window.
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>

#include "../common.h"
#include "memory_head.h"

namespace ahn_rt {

template <typename T>
void gdn_decode_cpu(const GdnDecodeParams& p) {
  if (*p.pos < p.sinks + p.window) return;
  const int64_t Dk = p.Dk, Dv = p.Dv, G = p.H / p.Hkv;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const float scale = 1.f / std::sqrt(static_cast<float>(Dk));
  at::parallel_for(0, p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Dk), kf(Dk), u(Dv), o(Dv), y(Dv);
    for (int64_t h = begin; h < end; ++h) {
      const int64_t j = h / G;
      double qq = 0.0, kk = 0.0;
      for (int64_t i = 0; i < Dk; ++i) {
        qf[i] = static_cast<float>(q[h * p.q_stride + i]);
        kf[i] = static_cast<float>(k[j * p.k_stride + i]);
        qq += static_cast<double>(qf[i]) * qf[i];
        kk += static_cast<double>(kf[i]) * kf[i];
      }
      // l2norm as x / (||x|| + 1e-6) (fla fused_recurrent, docs/semantics.md §5), then q * Dk^-0.5.
      const float qn = std::sqrt(static_cast<float>(qq)) + 1e-6f, kn = std::sqrt(static_cast<float>(kk)) + 1e-6f;
      for (int64_t i = 0; i < Dk; ++i) {
        qf[i] = qf[i] / qn * scale;
        kf[i] = kf[i] / kn;
      }
      const float decay = std::exp(load_kind(p.alpha, p.alpha_kind, h * p.alpha_stride));
      const float b = load_kind(p.beta, p.beta_kind, h * p.beta_stride);
      float* S = p.state + h * Dk * Dv;
      for (int64_t c = 0; c < Dv; ++c) u[c] = 0.f;
      for (int64_t i = 0; i < Dk; ++i)
        for (int64_t c = 0; c < Dv; ++c) {
          S[i * Dv + c] *= decay;
          u[c] += kf[i] * S[i * Dv + c];
        }
      for (int64_t c = 0; c < Dv; ++c) {
        u[c] = b * (static_cast<float>(v[j * p.v_stride + c]) - u[c]);
        o[c] = 0.f;
      }
      for (int64_t i = 0; i < Dk; ++i)
        for (int64_t c = 0; c < Dv; ++c) {
          S[i * Dv + c] += kf[i] * u[c];
          o[c] += qf[i] * S[i * Dv + c];
        }
      // Output head: o is rounded to the model dtype first (gdn_recurrent_ref returns q.dtype).
      double ss = 0.0;
      for (int64_t c = 0; c < Dv; ++c) {
        o[c] = round_to<T>(o[c]);
        ss += static_cast<double>(o[c]) * o[c];
      }
      const float rs = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(Dv)) + p.eps);
      const float zf = load_kind(p.z, p.z_kind, h * p.z_stride);
      const float sig = 1.f / (1.f + std::exp(-zf));
      for (int64_t c = 0; c < Dv; ++c)
        y[c] = round_to<T>(o[c] * rs * load_kind(p.norm_weight, p.nw_kind, c) * zf * sig);
      add_grouped_o_proj<T>(y.data(), h, Dv, p.o_proj, p.op_kind, p.out, p.out_kind, p.out_stride, u.data());
    }
  });
}

template void gdn_decode_cpu<float>(const GdnDecodeParams&);
template void gdn_decode_cpu<c10::BFloat16>(const GdnDecodeParams&);
template void gdn_decode_cpu<c10::Half>(const GdnDecodeParams&);

}  // namespace ahn_rt
