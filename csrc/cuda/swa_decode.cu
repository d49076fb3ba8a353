// CUDA sliding-window + sinks decode attention, flash-decoding style: grid (splits, Hkv), each block
// reads one split of the K/V cache of one kv head ONCE with 16-byte loads and serves all G query heads
// of it (scores in shared memory, fp32 online softmax pieces), then a combine kernel merges the splits.
// Splits are fixed by the capacity C (ops.cpp), not by pos: splits past the valid slots exit at once and
// the combine ignores them, so one captured graph serves every decode step.
// Measured (H200, bf16, 16 q / 2 kv heads, D=128, 32k window): ~55 us per layer = ~610 GB/s, far below the
// copy bandwidth: the CUDA-core dot products (16 lanes per key, a 4-step shuffle per key and head) cost
// more than the bytes; G=1 reaches ~1.9 TB/s. Next step: QK^T and PV for the G heads on tensor cores (mma).
// Test: pytest -m cuda tests/test_ops.py -k swa_decode; timing: bench/ops_bench.py.
#include <cstdint>

#include <cuda_runtime.h>

#include "../common.h"

namespace ahn_rt {
namespace {

constexpr int kThreads = 128;                 // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 8;                     // query heads per register pass
constexpr float kLog2e = 1.4426950408889634f;

// 8 consecutive elements as floats: one 16-byte load for 2-byte types, two for float (aligned path).
template <typename T>
__device__ __forceinline__ void load8(const T* ptr, bool aligned, float (&f)[8]) {
  if (aligned) {
    if constexpr (sizeof(T) == 2) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(ptr));
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int k = 0; k < 8; ++k) f[k] = static_cast<float>(e[k]);
    } else {
      const float4 a = __ldg(reinterpret_cast<const float4*>(ptr));
      const float4 b = __ldg(reinterpret_cast<const float4*>(ptr) + 1);
      f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
      f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] = static_cast<float>(ptr[k]);
  }
}

// 8 consecutive elements from shared memory (rows are 16-byte aligned: D % 8 == 0).
template <typename T>
__device__ __forceinline__ void lds8(const T* ptr, float (&f)[8]) {
  if constexpr (sizeof(T) == 2) {
    const uint4 u = *reinterpret_cast<const uint4*>(ptr);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] = static_cast<float>(e[k]);
  } else {
    const float4 a = reinterpret_cast<const float4*>(ptr)[0];
    const float4 b = reinterpret_cast<const float4*>(ptr)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
  }
}

// 16-byte global -> shared copy that does not hold a register (sm_80+ cp.async, L2 only).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

// Copy rows [0, nk) of one cache tile (row stride `stride` elements) into shared memory [nk][D]:
// all of it in flight at once with cp.async when 16-byte aligned, else element by element.
template <typename T>
__device__ __forceinline__ void stage_tile(T* dst, const T* src, int64_t stride, int nk, int D, bool aligned) {
  constexpr int VEC = 16 / sizeof(T);
  const int per_row = D / VEC;
  if (aligned) {
    for (int i = threadIdx.x; i < nk * per_row; i += blockDim.x) {
      const int t = i / per_row, c = i % per_row;
      cp_async16(dst + t * D + c * VEC, src + t * stride + c * VEC);
    }
  } else {
    for (int i = threadIdx.x; i < nk * D; i += blockDim.x) {
      const int t = i / D, c = i % D;
      dst[t * D + c] = src[t * stride + c];
    }
  }
}

__device__ __forceinline__ bool aligned16(const void* p, int64_t s0, int64_t s1, int64_t esize) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && ((s0 * esize) % 16 == 0) && ((s1 * esize) % 16 == 0);
}

// DT: head-dim tile (64, 128 or 256); D <= DT, a multiple of 8: lane slices past D are masked off.
// Shared memory (dynamic): K tile [chunk][D], V tile [chunk][D] (both staged at once with cp.async, so
// the whole split is one memory round trip), then the scores [G][chunk].
template <typename T, int DT>
__global__ void __launch_bounds__(kThreads) swa_split_kernel(SwaDecodeParams p) {
  constexpr int LPK = DT / 8;   // lanes per key (each owns 8 dims)
  constexpr int KPW = 32 / LPK; // keys per warp step
  constexpr int KSTEP = kWarps * KPW;
  extern __shared__ __align__(16) unsigned char s_raw[];
  __shared__ float s_acc[kGroup * DT];        // cross-warp sum of P @ V for one head group

  const int64_t split = blockIdx.x, j = blockIdx.y;
  const int64_t pos = *p.pos;
  const int64_t n = max(int64_t(0), min(pos + 1, p.sinks + p.window));
  const int64_t k0 = split * p.chunk;
  if (k0 >= n) return;  // whole block: nothing valid in this split
  const int nk = static_cast<int>(min(p.chunk, n - k0));
  const int G = static_cast<int>(p.H / p.Hkv);
  const int chunk = static_cast<int>(p.chunk);
  const int D = static_cast<int>(p.D);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int dl = lane % LPK, ksub = lane / LPK;
  const bool dim_ok = dl * 8 < D;
  T* sK = reinterpret_cast<T*>(s_raw);
  T* sV = sK + chunk * D;
  float* s_score = reinterpret_cast<float*>(sV + chunk * D);  // [G][chunk]

  stage_tile<T>(sK, static_cast<const T*>(p.k_cache) + j * p.kc_s0 + k0 * p.kc_s1, p.kc_s1, nk, D,
                aligned16(p.k_cache, p.kc_s0, p.kc_s1, sizeof(T)));
  stage_tile<T>(sV, static_cast<const T*>(p.v_cache) + j * p.vc_s0 + k0 * p.vc_s1, p.vc_s1, nk, D,
                aligned16(p.v_cache, p.vc_s0, p.vc_s1, sizeof(T)));

  const T* q = static_cast<const T*>(p.q);
  const float qscale = p.scale * kLog2e;  // scores in log2 units: exp2 below

  // ---- scores s[g][t] = (q_g . k_t) * scale * log2(e) ----
  for (int g0 = 0; g0 < G; g0 += kGroup) {
    const int gc = min(kGroup, G - g0);
    float qr[kGroup][8];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
#pragma unroll
      for (int e = 0; e < 8; ++e) qr[g][e] = 0.f;
      if (g < gc && dim_ok) {
        const T* qrow = q + (j * G + g0 + g) * p.q_stride + dl * 8;
#pragma unroll
        for (int e = 0; e < 8; ++e) qr[g][e] = static_cast<float>(qrow[e]) * qscale;
      }
    }
    if (g0 == 0) {
      cp_async_wait_all();
      __syncthreads();  // the tiles are in shared memory
    }
    for (int base = warp * KPW; base < nk; base += KSTEP) {
      const int t = base + ksub;
      float kv[8];
      if (t < nk && dim_ok) {
        lds8<T>(sK + t * D + dl * 8, kv);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) kv[e] = 0.f;
      }
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        if (g < gc) {  // uniform: every lane takes part in the shuffles
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < 8; ++e) dot = fmaf(qr[g][e], kv[e], dot);
#pragma unroll
          for (int o = LPK / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
          if (dl == 0 && t < nk) s_score[(g0 + g) * chunk + t] = dot;
        }
      }
    }
  }
  __syncthreads();

  // ---- per head: max and sum of exp2 over this split; scores become probabilities ----
  for (int g = warp; g < G; g += kWarps) {
    float* sc = s_score + g * chunk;
    float m = -INFINITY;
    for (int t = lane; t < nk; t += 32) m = fmaxf(m, sc[t]);
    m = warp_max(m);
    float l = 0.f;
    for (int t = lane; t < nk; t += 32) {
      const float e = exp2f(sc[t] - m);
      sc[t] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) {
      float* ml = p.ml_part + ((j * G + g) * p.nsplit + split) * 2;
      ml[0] = m;
      ml[1] = l;
    }
  }
  __syncthreads();

  // ---- o[g] = sum_t p[g][t] v_t (unnormalized) ----
  for (int g0 = 0; g0 < G; g0 += kGroup) {
    const int gc = min(kGroup, G - g0);
    float acc[kGroup][8];
#pragma unroll
    for (int g = 0; g < kGroup; ++g)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
    for (int base = warp * KPW; base < nk; base += KSTEP) {
      const int t = base + ksub;
      if (t < nk && dim_ok) {
        float vv[8];
        lds8<T>(sV + t * D + dl * 8, vv);
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          if (g < gc) {
            const float pw = s_score[(g0 + g) * chunk + t];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(pw, vv[e], acc[g][e]);
          }
        }
      }
    }
    // Sum over the KPW key lanes of a warp, then over the warps in turn (float atomics on shared memory
    // are compare-and-swap loops; 4 barriers are cheaper than 4-way contended CAS loops).
#pragma unroll
    for (int g = 0; g < kGroup; ++g)
#pragma unroll
      for (int e = 0; e < 8; ++e)
#pragma unroll
        for (int o = LPK; o < 32; o <<= 1) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
    for (int w = 0; w < kWarps; ++w) {
      if (warp == w && ksub == 0 && dim_ok) {
#pragma unroll
        for (int g = 0; g < kGroup; ++g)
          if (g < gc)
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              float* dst = &s_acc[g * DT + dl * 8 + e];
              *dst = (w == 0 ? 0.f : *dst) + acc[g][e];
            }
      }
      __syncthreads();
    }
    for (int i = tid; i < gc * D; i += kThreads) {
      const int g = i / D, d = i % D;
      p.o_part[((j * G + g0 + g) * p.nsplit + split) * p.D + d] = s_acc[g * DT + d];
    }
    __syncthreads();  // s_acc is reused by the next head group
  }
}

// Grid (H, ceil(D / 32)): merge the valid splits of one query head for 32 dims (weights 2^(m_s - M) / L),
// round to T. Lane = dim, the 32 warps take interleaved splits (few dependent loads per thread).
constexpr int kCombineThreads = 1024;
constexpr int kCombineWarps = kCombineThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) swa_combine_kernel(SwaDecodeParams p) {
  extern __shared__ float s_w[];  // [nsplit]
  __shared__ float red[32];
  __shared__ float s_o[kCombineWarps][33];
  const int64_t h = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int d = blockIdx.y * 32 + lane;
  const int D = static_cast<int>(p.D);
  const int64_t pos = *p.pos;
  const int64_t n = max(int64_t(0), min(pos + 1, p.sinks + p.window));
  const int nvalid = static_cast<int>((n + p.chunk - 1) / p.chunk);
  const float* ml = p.ml_part + h * p.nsplit * 2;
  float m = -INFINITY;
  for (int s = tid; s < nvalid; s += kCombineThreads) m = fmaxf(m, ml[2 * s]);
  m = block_max(m, red);
  float l = 0.f;
  for (int s = tid; s < nvalid; s += kCombineThreads) {
    const float w = exp2f(ml[2 * s] - m);
    s_w[s] = w;
    l += w * ml[2 * s + 1];
  }
  l = block_sum(l, red);  // its barriers also publish s_w
  const float* o = p.o_part + h * p.nsplit * p.D;
  float acc = 0.f;
  if (d < D) {
#pragma unroll 4
    for (int s = warp; s < nvalid; s += kCombineWarps) acc = fmaf(s_w[s], o[static_cast<int64_t>(s) * D + d], acc);
  }
  s_o[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && d < D) {
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < kCombineWarps; ++w) a += s_o[w][lane];
    static_cast<T*>(p.out)[h * p.D + d] = T(nvalid > 0 ? a / l : 0.f);
  }
}

template <typename T, int DT>
void launch(const SwaDecodeParams& p, cudaStream_t stream) {
  const size_t smem = 2 * static_cast<size_t>(p.chunk) * p.D * sizeof(T) +
                      static_cast<size_t>(p.H / p.Hkv) * p.chunk * sizeof(float);
  const dim3 grid(static_cast<unsigned>(p.nsplit), static_cast<unsigned>(p.Hkv));
  swa_split_kernel<T, DT><<<grid, kThreads, smem, stream>>>(p);
  const dim3 cgrid(static_cast<unsigned>(p.H), static_cast<unsigned>((p.D + 31) / 32));
  swa_combine_kernel<T><<<cgrid, kCombineThreads, p.nsplit * sizeof(float), stream>>>(p);
}

}  // namespace

template <typename T>
void swa_decode_cuda(const SwaDecodeParams& p, void* stream) {
  // ops.cpp keeps the K/V tiles <= 32 KiB and the scores <= 8 KiB (dynamic), with kGroup * DT * 4 <= 8 KiB
  // static: within the 48 KiB that needs no opt-in; nsplit * 4 bytes for the combine is below 32 KiB.
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.D <= 64) launch<T, 64>(p, s);
  else if (p.D <= 128) launch<T, 128>(p, s);
  else launch<T, 256>(p, s);
}

template void swa_decode_cuda<float>(const SwaDecodeParams&, void*);
template void swa_decode_cuda<c10::BFloat16>(const SwaDecodeParams&, void*);
template void swa_decode_cuda<c10::Half>(const SwaDecodeParams&, void*);

}  // namespace ahn_rt
