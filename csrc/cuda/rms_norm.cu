// CUDA RMSNorm kernel and its launcher (one block per row; fp32 sum of squares, rounding as rms_norm_ref).
// Test: pytest -m cuda tests/test_ops.py -k rms_norm (on a GPU; see scripts/device_check.sh).
#include <cuda_runtime.h>

#include "../common.h"

namespace ahn_rt {
namespace {

template <typename T>
__global__ void __launch_bounds__(256) rms_norm_kernel(RmsNormParams p) {
  __shared__ float red[32];
  const T* x = static_cast<const T*>(p.x) + blockIdx.x * p.x_stride;
  const T* w = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + blockIdx.x * p.d;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < p.d; i += blockDim.x) {
    const float v = static_cast<float>(x[i]);
    ss += v * v;
  }
  ss = block_sum(ss, red);
  const float rs = 1.f / sqrtf(ss / static_cast<float>(p.d) + p.eps);
  for (int64_t i = threadIdx.x; i < p.d; i += blockDim.x)
    out[i] = T(static_cast<float>(w[i]) * round_to<T>(static_cast<float>(x[i]) * rs));
}

}  // namespace

template <typename T>
void rms_norm_cuda(const RmsNormParams& p, void* stream) {
  const int threads = p.d >= 1024 ? 256 : (p.d >= 256 ? 128 : 64);
  // Rows go on grid.x (up to 2^31 - 1); the host checked n > 0.
  rms_norm_kernel<T><<<static_cast<unsigned>(p.n), threads, 0, static_cast<cudaStream_t>(stream)>>>(p);
}

template void rms_norm_cuda<float>(const RmsNormParams&, void*);
template void rms_norm_cuda<c10::BFloat16>(const RmsNormParams&, void*);
template void rms_norm_cuda<c10::Half>(const RmsNormParams&, void*);

}  // namespace ahn_rt
