// CPU kernel of band_attention (reference: ahn_rt/ref.py band_attention_ref): each (head, query) row in
// float32, the band's scores, their log-sum-exp, the weighted sum of the values.
// Test: pytest tests/test_band_attention.py.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

#include "../common.h"

namespace ahn_rt {

template <typename T>
void band_attention_cpu(const BandAttentionParams& p) {
  const int64_t G = p.H / p.Hkv, shift = p.n - p.nq;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.H * p.nq, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> s, acc(p.D), qf(p.D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r / p.nq, i = r % p.nq, hk = h / G;
      const int64_t hi = i + shift;                                      // the row's diagonal key
      const int64_t lo = p.left > 0 ? std::max<int64_t>(0, hi - p.left + 1) : 0;
      for (int64_t d = 0; d < p.D; ++d) qf[d] = static_cast<float>(q[i * p.q_s0 + h * p.q_s1 + d]);
      s.assign(hi - lo + 1, 0.f);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = lo; j <= hi; ++j) {
        const T* kr = k + j * p.k_s0 + hk * p.k_s1;
        float dot = 0.f;
        for (int64_t d = 0; d < p.D; ++d) dot += qf[d] * static_cast<float>(kr[d]);
        s[j - lo] = dot * p.scale;
        m = std::max(m, s[j - lo]);
      }
      float sum = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = lo; j <= hi; ++j) {
        const float w = std::exp(s[j - lo] - m);
        sum += w;
        const T* vr = v + j * p.v_s0 + hk * p.v_s1;
        for (int64_t d = 0; d < p.D; ++d) acc[d] += w * static_cast<float>(vr[d]);
      }
      T* o = out + (i * p.H + h) * p.D;
      for (int64_t d = 0; d < p.D; ++d) o[d] = T(acc[d] / sum);
      p.lse[h * p.Tq + i] = m + std::log(sum);
    }
  });
}

template void band_attention_cpu<float>(const BandAttentionParams&);
template void band_attention_cpu<c10::BFloat16>(const BandAttentionParams&);
template void band_attention_cpu<c10::Half>(const BandAttentionParams&);

}  // namespace ahn_rt
