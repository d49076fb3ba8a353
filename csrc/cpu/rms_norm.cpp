// CPU RMSNorm kernel (Qwen: normalize in fp32, round to x.dtype, multiply by weight in x.dtype; reference:
// ahn_rt/ref.py rms_norm_ref). Test: pytest tests/test_ops.py -k rms_norm.
#include <cmath>

#include <ATen/Parallel.h>

#include "../common.h"

namespace ahn_rt {

template <typename T>
void rms_norm_cpu(const RmsNormParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * p.x_stride;
      T* orow = out + r * p.d;
      double ss = 0.0;
      for (int64_t i = 0; i < p.d; ++i) {
        const float v = static_cast<float>(xr[i]);
        ss += static_cast<double>(v) * v;
      }
      const float rs = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(p.d)) + p.eps);
      for (int64_t i = 0; i < p.d; ++i)
        orow[i] = T(static_cast<float>(w[i]) * round_to<T>(static_cast<float>(xr[i]) * rs));
    }
  });
}

template void rms_norm_cpu<float>(const RmsNormParams&);
template void rms_norm_cpu<c10::BFloat16>(const RmsNormParams&);
template void rms_norm_cpu<c10::Half>(const RmsNormParams&);

}  // namespace ahn_rt
