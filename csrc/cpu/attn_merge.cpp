// CPU attn_merge and silu_mul kernels (references: ahn_rt/ref.py attn_merge_ref, silu_mul_ref).
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

template void attn_merge_cpu<float>(const AttnMergeParams&);
template void attn_merge_cpu<c10::BFloat16>(const AttnMergeParams&);
template void attn_merge_cpu<c10::Half>(const AttnMergeParams&);
template void silu_mul_cpu<float>(const SiluMulParams&);
template void silu_mul_cpu<c10::BFloat16>(const SiluMulParams&);
template void silu_mul_cpu<c10::Half>(const SiluMulParams&);

}  // namespace ahn_rt
