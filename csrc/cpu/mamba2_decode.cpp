// CPU mamba2_decode kernel, the Mamba2 memory step for one decoded token (reference: ahn_rt/ref.py
// mamba2_decode_ref). Test: pytest tests/test_ops.py -k mamba2.
//
// Scalar-decay update of the fp32 state [H, Dk, Dv] in place and the read (docs/semantics.md §11.2), then
// the RMSNorm over all H * Dv values of o * silu(z), the norm weight and the grouped o_proj, added into out;
// a no-op while pos < sinks + window.
#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>

#include "../common.h"
#include "memory_head.h"

namespace ahn_rt {

namespace {

// F.normalize(x, eps=1e-12) in dtype T as torch computes it: the norm rounded to T, clamped, then each
// x / norm rounded to T.
template <typename T>
void l2_normalize(const T* x, int64_t n, float* out) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(static_cast<float>(x[i])) * static_cast<float>(x[i]);
  const float nrm = std::max(round_to<T>(std::sqrt(static_cast<float>(ss))), round_to<T>(1e-12f));
  for (int64_t i = 0; i < n; ++i) out[i] = round_to<T>(static_cast<float>(x[i]) / nrm);
}

}  // namespace

template <typename T>
void mamba2_decode_cpu(const Mamba2DecodeParams& p) {
  if (*p.pos < p.sinks + p.window) return;
  const int64_t H = p.H, Dk = p.Dk, Dv = p.Dv, G = p.H / p.Hkv;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  std::vector<float> o(H * Dv), gate(H);
  // ---- the state step and the read, per head: o_h = M_h'^T q^ (rounded to T) ----
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Dk), kf(Dk), acc(Dv);
    for (int64_t h = begin; h < end; ++h) {
      const int64_t j = h / G;
      l2_normalize<T>(q + h * p.q_stride, Dk, qf.data());
      l2_normalize<T>(k + j * p.k_stride, Dk, kf.data());
      const float dt = load_kind(p.dt, p.dt_kind, h * p.dt_stride);
      const float decay = std::exp(dt * -std::exp(load_kind(p.a_log, p.a_log_kind, h)));
      float* S = p.state + h * Dk * Dv;
      for (int64_t c = 0; c < Dv; ++c) acc[c] = 0.f;
      for (int64_t i = 0; i < Dk; ++i) {
        const float dk = dt * kf[i];
        for (int64_t c = 0; c < Dv; ++c) {
          const float s = S[i * Dv + c] * decay + dk * static_cast<float>(v[j * p.v_stride + c]);
          S[i * Dv + c] = s;
          acc[c] += qf[i] * s;
        }
      }
      for (int64_t c = 0; c < Dv; ++c) o[h * Dv + c] = round_to<T>(acc[c]);
      const float zf = load_kind(p.z, p.z_kind, h * p.z_stride);
      gate[h] = zf * (1.f / (1.f + std::exp(-zf)));
    }
  });
  // ---- RMSNorm over all H * Dv values of y = o * silu(z) ----
  double ss = 0.0;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t c = 0; c < Dv; ++c) {
      const float y = o[h * Dv + c] * gate[h];
      ss += static_cast<double>(y) * y;
    }
  const float rs = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(H * Dv)) + p.eps);
  // ---- y rounded to T, the grouped o_proj (rounded to T, fp32 accumulate), m rounded to T, added into out ----
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(Dv), m(Dv);
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t i = 0; i < Dv; ++i)
        y[i] = round_to<T>(o[h * Dv + i] * gate[h] * rs * load_kind(p.norm_weight, p.nw_kind, h * Dv + i));
      add_grouped_o_proj<T>(y.data(), h, Dv, p.o_proj, p.op_kind, p.out, p.out_kind, p.out_stride, m.data());
    }
  });
}

template void mamba2_decode_cpu<float>(const Mamba2DecodeParams&);
template void mamba2_decode_cpu<c10::BFloat16>(const Mamba2DecodeParams&);
template void mamba2_decode_cpu<c10::Half>(const Mamba2DecodeParams&);

}  // namespace ahn_rt
