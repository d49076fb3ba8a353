// CPU kernels of the prefill's fused elementwise steps: attn_merge, silu_mul, rope, gate_norm (references:
// ahn_rt/ref.py attn_merge_ref, silu_mul_ref, rope_ref, gdn_gate_norm_ref).
// Test: pytest tests/test_prefill.py.
#include <algorithm>
#include <cmath>
#include <limits>

#include <ATen/Parallel.h>

#include "../common.h"

namespace ahn_rt {

template <typename T>
void attn_merge_cpu(const AttnMergeParams& p) {
  at::parallel_for(0, p.rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t h = 0; h < p.H; ++h) {
        float w[kMergeMaxParts];
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < p.parts; ++i) {
          const int64_t j = r - p.off[i];
          w[i] = (j >= 0 && j < p.n[i]) ? p.lse[i][h * p.lse_s0[i] + j] : -std::numeric_limits<float>::infinity();
          m = std::max(m, w[i]);
        }
        float sum = 0.f;
        for (int64_t i = 0; i < p.parts; ++i) sum += std::exp(w[i] - m);
        const float total = m + std::log(sum);
        for (int64_t i = 0; i < p.parts; ++i) w[i] = std::exp(w[i] - total);
        T* out = static_cast<T*>(p.out) + (r * p.H + h) * p.D;
        for (int64_t d = 0; d < p.D; ++d) {
          float acc = 0.f;
          for (int64_t i = 0; i < p.parts; ++i) {
            const int64_t j = r - p.off[i];
            if (j < 0 || j >= p.n[i]) continue;
            acc += w[i] * static_cast<float>(static_cast<const T*>(p.o[i])[j * p.o_s0[i] + h * p.o_s1[i] + d]);
          }
          out[d] = T(acc);
        }
      }
  });
}

template <typename T>
void silu_mul_cpu(const SiluMulParams& p) {
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = static_cast<const T*>(p.x) + r * p.x_s0;
      T* out = static_cast<T*>(p.out) + r * p.N;
      for (int64_t c = 0; c < p.N; ++c) {
        const float g = static_cast<float>(x[c]);
        const float s = round_to<T>(g / (1.f + std::exp(-g)));
        out[c] = T(s * static_cast<float>(x[p.N + c]));
      }
    }
  });
}

template <typename T>
void rope_cpu(const RopeParams& p) {
  const int64_t half = p.D / 2;
  at::parallel_for(0, p.T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < p.nh; ++h) {
        const T* x = static_cast<const T*>(p.x) + t * p.x_s0 + h * p.x_s1;
        const T* c = static_cast<const T*>(p.cos) + t * p.D;
        const T* s = static_cast<const T*>(p.sin) + t * p.D;
        T* out = static_cast<T*>(p.out) + (t * p.nh + h) * p.D;
        for (int64_t d = 0; d < half; ++d) {
          const float x1 = static_cast<float>(x[d]), x2 = static_cast<float>(x[d + half]);
          const float a1 = round_to<T>(x1 * static_cast<float>(c[d]));
          const float b1 = round_to<T>(-x2 * static_cast<float>(s[d]));
          const float a2 = round_to<T>(x2 * static_cast<float>(c[d + half]));
          const float b2 = round_to<T>(x1 * static_cast<float>(s[d + half]));
          out[d] = T(a1 + b1);
          out[d + half] = T(a2 + b2);
        }
      }
  });
}

template <typename T>
void gate_norm_cpu(const GateNormParams& p) {
  at::parallel_for(0, p.n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t h = 0; h < p.H; ++h) {
        const T* o = static_cast<const T*>(p.o) + r * p.o_s0 + h * p.o_s1;
        float ss = 0.f;
        for (int64_t d = 0; d < p.D; ++d) ss += static_cast<float>(o[d]) * static_cast<float>(o[d]);
        const float rs = 1.f / std::sqrt(ss / static_cast<float>(p.D) + p.eps);
        const float z = load_kind(p.z, p.z_kind, r * p.z_s0 + h * p.z_s1);
        const float sig = 1.f / (1.f + std::exp(-z));
        T* y = static_cast<T*>(p.y) + (r * p.H + h) * p.D;
        for (int64_t d = 0; d < p.D; ++d) {
          const float v = static_cast<float>(o[d]) * rs * load_kind(p.w, p.w_kind, d * p.w_s0);
          y[d] = T(v * z * sig);
        }
      }
  });
}

template void attn_merge_cpu<float>(const AttnMergeParams&);
template void attn_merge_cpu<c10::BFloat16>(const AttnMergeParams&);
template void attn_merge_cpu<c10::Half>(const AttnMergeParams&);
template void silu_mul_cpu<float>(const SiluMulParams&);
template void silu_mul_cpu<c10::BFloat16>(const SiluMulParams&);
template void silu_mul_cpu<c10::Half>(const SiluMulParams&);

template void rope_cpu<float>(const RopeParams&);
template void rope_cpu<c10::BFloat16>(const RopeParams&);
template void rope_cpu<c10::Half>(const RopeParams&);
template void gate_norm_cpu<float>(const GateNormParams&);
template void gate_norm_cpu<c10::BFloat16>(const GateNormParams&);
template void gate_norm_cpu<c10::Half>(const GateNormParams&);

}  // namespace ahn_rt
