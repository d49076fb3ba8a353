// CPU fused decode GEMV kernel (ahn_rt.gemv; reference: ahn_rt/ref.py gemv_ref). Test: pytest tests/test_gemv.py.
//
// x is normalized once into a float32 buffer, then rows are split over threads (at::parallel_for), float32
// dot products with 16 independent accumulators (the compiler vectorizes them), fused bias / SiLU(gate) * up /
// residual epilogue, one rounding.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define AHN_RT_X86 1
#endif

#include "../common.h"

namespace ahn_rt {
namespace {

template <typename T>
float dot_row(const T* w, const float* x, int64_t K) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<float>(w[k + j]) * x[k + j];
  }
  float s = 0.f;
  for (; k < K; ++k) s += static_cast<float>(w[k]) * x[k];
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

#ifdef AHN_RT_X86
// fp16 rows: torch's scalar c10::Half -> float conversion (bit manipulation, as built into extensions) keeps
// the loop above from vectorizing, which made fp16 decode about 3x slower than bf16. With F16C the
// conversion is one instruction per 8 values; chosen at run time, so the build still runs on any x86-64.
__attribute__((target("avx2,fma,f16c"))) float dot_row_f16c(const c10::Half* w, const float* x, int64_t K) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m128i h0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
    const __m128i h1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 8));
    acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(h0), _mm256_loadu_ps(x + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(h1), _mm256_loadu_ps(x + k + 8), acc1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(acc0, acc1));
  float s = 0.f;
  for (; k < K; ++k) s += static_cast<float>(w[k]) * x[k];
  for (int j = 0; j < 8; ++j) s += lanes[j];
  return s;
}

bool has_f16c() {
  static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  return v;
}
#endif

template <typename T>
float dot(const T* w, const float* x, int64_t K) {
#ifdef AHN_RT_X86
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (has_f16c()) return dot_row_f16c(w, x, K);
  }
#endif
  return dot_row(w, x, K);
}

}  // namespace

template <typename T>
void gemv_cpu(const GemvParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  const T* nw = static_cast<const T*>(p.norm_weight);
  const T* res = static_cast<const T*>(p.residual);
  const T* xa = static_cast<const T*>(p.x_add);  // x's strides (checked by the host function)
  const int64_t K = p.K;

  // x_eff = T(x + x_add) with x_add, else x; xn = norm_weight * (x_eff * rsqrt(mean(x_eff^2) + eps)).to(T), as
  // rms_norm_ref; else x_eff. Kept as float32, one row per sequence.
  const int64_t B = p.rows;
  std::vector<float> xn(static_cast<size_t>(B * K));
  for (int64_t b = 0; b < B; ++b) {
    float* xb = xn.data() + b * K;
    for (int64_t k = 0; k < K; ++k) xb[k] = static_cast<float>(x[b * p.x_row_stride + k * p.x_stride]);
    if (xa != nullptr) {
      for (int64_t k = 0; k < K; ++k)
        xb[k] = round_to<T>(xb[k] + static_cast<float>(xa[b * p.x_row_stride + k * p.x_stride]));
    }
    if (nw != nullptr && K > 0) {
      double ss = 0.0;
      for (int64_t k = 0; k < K; ++k) ss += static_cast<double>(xb[k]) * xb[k];
      const float rs = 1.f / std::sqrt(static_cast<float>(ss / static_cast<double>(K)) + p.norm_eps);
      for (int64_t k = 0; k < K; ++k)
        xb[k] = round_to<T>(static_cast<float>(nw[k * p.nw_stride]) * round_to<T>(xb[k] * rs));
    }
  }

  const int64_t half = p.silu_mul ? p.N_out : 0;  // up row of output i is i + half
  auto row_value = [&](int64_t r, int64_t b) {
    float y = dot(w + r * K, xn.data() + b * K, K);
    if (bias != nullptr) y += static_cast<float>(bias[r * p.bias_stride]);
    return y;
  };
  // ~64 KiB of weights per task keeps the split cheap for small K and fine-grained for large N. A row of
  // weights serves every sequence while it is in cache; each (sequence, output) value is computed exactly
  // as with one sequence, so a sequence's result does not depend on its neighbours.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, p.N_out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t b = 0; b < B; ++b) {
        float y = row_value(i, b);
        if (p.silu_mul) {
          const float up = row_value(i + half, b);
          y = y / (1.f + std::exp(-y)) * up;
        }
        if (res != nullptr) y = static_cast<float>(res[b * p.res_row_stride + i * p.res_stride]) + y;
        if (p.out_float)
          static_cast<float*>(p.out)[b * p.N_out + i] = y;
        else
          static_cast<T*>(p.out)[b * p.N_out + i] = T(y);
      }
    }
  });
}

template void gemv_cpu<float>(const GemvParams&);
template void gemv_cpu<c10::BFloat16>(const GemvParams&);
template void gemv_cpu<c10::Half>(const GemvParams&);

}  // namespace ahn_rt
