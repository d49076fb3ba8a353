// The fused decode GEMV (ahn_rt.gemv): its params struct and backend launchers, shared by the checked host
// entry function (gemv.cpp), the CPU loop (cpu/gemv.cpp) and the CUDA kernel (cuda/gemv.cu).
// out = [residual +] epilogue(weight @ rms_norm?(x) [+ bias]); reference: ahn_rt/ref_gemv.py gemv_ref.
#pragma once

#include <cstdint>

#include "common.h"

namespace ahn_rt {

struct GemvParams {
  const void* x;            // [K], stride x_stride (dtype T)
  const void* weight;       // [N, K] row-major contiguous (dtype T)
  const void* bias;         // [N], stride bias_stride, or null (dtype T)
  const void* norm_weight;  // [K], stride nw_stride, or null (dtype T): RMSNorm x first
  const void* residual;     // [N_out], stride res_stride, or null (dtype T)
  void* out;                // [N_out] contiguous: float32 if out_float, else T
  int64_t x_stride, bias_stride, nw_stride, res_stride;
  int64_t N, K;             // weight rows, columns
  int64_t N_out;            // N, or N / 2 with silu_mul (rows [0, N/2) gate, [N/2, N) up)
  float norm_eps;
  bool silu_mul, out_float;
};

// T is float, c10::BFloat16 or c10::Half. `stream` is a cudaStream_t (void* keeps CUDA headers out).
template <typename T> void gemv_cpu(const GemvParams& p);
template <typename T> void gemv_cuda(const GemvParams& p, void* stream);

// Largest K the CUDA kernel takes: x is staged in shared memory as float32 (K * 4 bytes, padded).
constexpr int64_t kGemvCudaMaxK = 49152;

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& norm_weight, double norm_eps,
                const std::optional<at::Tensor>& residual, bool silu_mul, bool out_float);

}  // namespace ahn_rt
