// CPU swa_decode kernel, sliding-window + sinks decode attention: one query per head over the valid cache
// slots [0, min(pos + 1, sinks + window)), fp32 softmax (reference: ahn_rt/ref.py swa_decode_ref).
// Test: pytest tests/test_ops.py -k swa_decode.
#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>

#include "../common.h"

namespace ahn_rt {

template <typename T>
void swa_decode_cpu(const SwaDecodeParams& p) {
  const int64_t pos = *p.pos;
  const int64_t n = std::max<int64_t>(0, std::min(pos + 1, p.sinks + p.window));
  const int64_t G = p.H / p.Hkv, D = p.D;
  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(D), acc(D), s(n);
    for (int64_t h = begin; h < end; ++h) {
      const int64_t j = h / G;
      for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(q[h * p.q_stride + d]);
      float m = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        const T* kr = kc + j * p.kc_s0 + t * p.kc_s1;
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += qf[d] * static_cast<float>(kr[d]);
        s[t] = dot * p.scale;
        m = std::max(m, s[t]);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float l = 0.f;
      for (int64_t t = 0; t < n; ++t) {
        const float e = std::exp(s[t] - m);
        l += e;
        const T* vr = vc + j * p.vc_s0 + t * p.vc_s1;
        for (int64_t d = 0; d < D; ++d) acc[d] += e * static_cast<float>(vr[d]);
      }
      for (int64_t d = 0; d < D; ++d) out[h * D + d] = T(acc[d] / l);
    }
  });
}

template void swa_decode_cpu<float>(const SwaDecodeParams&);
template void swa_decode_cpu<c10::BFloat16>(const SwaDecodeParams&);
template void swa_decode_cpu<c10::Half>(const SwaDecodeParams&);

}  // namespace ahn_rt
