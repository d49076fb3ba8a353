// CUDA swa_decode kernels (sliding-window + sinks decode attention, flash-decoding style) and their launcher.
// Test: pytest -m cuda tests/test_ops.py -k swa_decode; timing: bench/ops_bench.py.
//
// Which keys a query attends: docs/semantics.md §2; slot layout: §7. Grid (splits, Hkv[, head groups]):
// each block reads one split of the K/V cache of one kv head ONCE and serves all G query heads of it,
// then a combine kernel merges the splits. Splits are fixed by the capacity C (host/swa_decode.cpp), not
// by pos: splits past the valid slots exit at once and the combine reads only the ceil(n / chunk) valid
// ones, so one captured graph serves every decode step. In a batch the tensor-core kernel's blocks loop
// over the splits (p.split_blocks per kv head and row), so the grid stays about one wave whatever B is.
// fp16 / bf16: tensor cores (mma.sync m16n8k16, fp32 accumulate). The G <= 16 query heads of a kv head
// are the M rows (padded to 16), keys the N columns: S = Q K^T on 64-key tiles staged by 16-byte cp.async
// into a 2-stage shared-memory ring, online softmax in registers, O += P V with P (rounded to the input
// dtype, as FlashAttention-2 does) as the A operand. Each of the 4 warps owns 16 keys of a tile and keeps
// its own (m, l, O); the warps merge once per split. fp32 (tests only) keeps the CUDA-core kernel.
// Measurements and open leads: bench/README.md, "Kernel design notes and measurements".
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common.h"
#include "launch.cuh"

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
__global__ void __launch_bounds__(kThreads) swa_split_scalar_kernel(const SwaDecodeParams p0) {
  pdl_wait();  // a no-op without PDL (AHN_RT_DECODE_PDL=0); everything below may need the previous kernel
  const SwaDecodeParams p = p0.row(blockIdx.y / p0.Hkv);  // grid y: (row, kv head)
  constexpr int LPK = DT / 8;   // lanes per key (each owns 8 dims)
  constexpr int KPW = 32 / LPK; // keys per warp step
  constexpr int KSTEP = kWarps * KPW;
  extern __shared__ __align__(16) unsigned char s_raw[];
  __shared__ float s_acc[kGroup * DT];        // cross-warp sum of P @ V for one head group

  const int64_t split = blockIdx.x, j = blockIdx.y % p0.Hkv;
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

// ---------------------------------------------------------------------------------------------
// Tensor-core split kernel (fp16 / bf16)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte cp.async; src_bytes = 0 zero-fills the 16 bytes without reading global memory (PTX ISA, cp.async).
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8, and receives (row l / 4,
// columns 2 (l % 4) + {0, 1}) of each (transposed with .trans): the mma fragment layouts (PTX ISA,
// "Matrix Fragments for mma.m16n8k16").
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <typename T> struct Mma;
template <> struct Mma<c10::BFloat16> {
  // Two floats rounded to one packed pair, the lower index in the low half.
  static __device__ __forceinline__ uint32_t pack(float lo, float hi, float& rlo, float& rhi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    rlo = __low2float(v);
    rhi = __high2float(v);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  // d += a (16x16, row) * b (16x8, col), fp32 accumulate.
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<c10::Half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi, float& rlo, float& rhi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    rlo = __low2float(v);
    rhi = __high2float(v);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

constexpr int kTile = static_cast<int>(kSwaTileKeys);  // keys per pipeline stage: 16 per warp
constexpr int kStages = static_cast<int>(kSwaStages);
static_assert(kTile == 16 * kWarps, "each warp owns 16 keys of a tile");

// DT: head-dim tile (64, 128 or 256), D <= DT; columns [D, DT) of Q, K and V in shared memory are zero.
// Shared memory (dynamic, swa_mma_smem_bytes): Q [16][DT + 8], then kStages x {K, V} [kTile][DT + 8].
// The 16-byte row pad puts the 8 rows that one ldmatrix reads in 8 different bank groups.
template <typename T, int DT>
__global__ void __launch_bounds__(kThreads) swa_split_mma_kernel(const SwaDecodeParams p0) {
  pdl_wait();  // a no-op without PDL (AHN_RT_DECODE_PDL=0); everything below may need the previous kernel
  const SwaDecodeParams p = p0.row(blockIdx.y / p0.Hkv);  // grid y: (row, kv head)
  constexpr int LD = DT + 8;
  constexpr int LDO = DT + 4;  // fp32 rows of the cross-warp merge buffer
  extern __shared__ __align__(16) unsigned char s_raw[];
  __shared__ float s_m[kWarps][16], s_l[kWarps][16];
  T* sQ = reinterpret_cast<T*>(s_raw);
  T* sKV = sQ + 16 * LD;

  const int64_t j = blockIdx.y % p0.Hkv;
  const int g0 = blockIdx.z * 16;
  const int64_t pos = *p.pos;
  const int64_t n = max(int64_t(0), min(pos + 1, p.sinks + p.window));
  if (static_cast<int64_t>(blockIdx.x) * p.chunk >= n) return;  // whole block: no valid split
  const int G = static_cast<int>(p.H / p.Hkv);
  const int gc = min(16, G - g0);
  const int D = static_cast<int>(p.D);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool al = aligned16(p.k_cache, p.kc_s0, p.kc_s1, sizeof(T)) &&
                  aligned16(p.v_cache, p.vc_s0, p.vc_s1, sizeof(T));

  // Q rows g0 .. g0 + 15 (zero past G and past D), once for every split of this block.
  const T* q = static_cast<const T*>(p.q);
  for (int i = tid; i < 16 * DT; i += kThreads) {
    const int r = i / DT, c = i % DT;
    sQ[r * LD + c] = (r < gc && c < D) ? q[(j * G + g0 + r) * p.q_stride + c] : T(0.f);
  }

  // Splits blockIdx.x, + gridDim.x, ... (one each when the grid covers them all); a split's sums do not
  // depend on which block runs it.
  for (int64_t split = blockIdx.x; split * p.chunk < n; split += gridDim.x) {
  const int64_t k0 = split * p.chunk;
  const int nk = static_cast<int>(min(p.chunk, n - k0));
  const int ntiles = (nk + kTile - 1) / kTile;
  const T* kbase = static_cast<const T*>(p.k_cache) + j * p.kc_s0 + k0 * p.kc_s1;
  const T* vbase = static_cast<const T*>(p.v_cache) + j * p.vc_s0 + k0 * p.vc_s1;

  // Rows [0, nk) of tile t into stage t % kStages; rows past nk are zero (the test poisons them with NaN,
  // and 0 * NaN would reach O through P V).
  auto load_tile = [&](int t) {
    T* sK = sKV + (t % kStages) * 2 * kTile * LD;
    T* sV = sK + kTile * LD;
    const int r0 = t * kTile;
    if (al) {
      const int per_row = D / 8;
      for (int i = tid; i < kTile * per_row; i += kThreads) {
        const int r = i / per_row, c = (i % per_row) * 8;
        const bool ok = r0 + r < nk;
        const int64_t rr = ok ? r0 + r : 0;
        cp_async16_zfill(sK + r * LD + c, kbase + rr * p.kc_s1 + c, ok);
        cp_async16_zfill(sV + r * LD + c, vbase + rr * p.vc_s1 + c, ok);
      }
    } else {
      for (int i = tid; i < kTile * D; i += kThreads) {
        const int r = i / D, c = i % D;
        const bool ok = r0 + r < nk;
        sK[r * LD + c] = ok ? kbase[(r0 + r) * p.kc_s1 + c] : T(0.f);
        sV[r * LD + c] = ok ? vbase[(r0 + r) * p.vc_s1 + c] : T(0.f);
      }
    }
  };
  load_tile(0);
  cp_async_commit();
  if (ntiles > 1) load_tile(1);
  cp_async_commit();

  // Zero pad columns of the stages (cp.async never writes them; the merge below overwrites the stages).
  if (D < DT) {
    const int w = DT - D;
    for (int i = tid; i < kStages * 2 * kTile * w; i += kThreads) sKV[(i / w) * LD + D + i % w] = T(0.f);
  }

  const float qscale = p.scale * kLog2e;  // scores in log2 units: exp2 below
  const int quad = lane >> 2, qlane = lane & 3;
  float o[DT / 8][4];
#pragma unroll
  for (int t = 0; t < DT / 8; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[t][e] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};  // rows quad and quad + 8

  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<1>();  // tile t has landed (only tile t + 1 may still be in flight)
    __syncthreads();
    const T* sK = sKV + (t % kStages) * 2 * kTile * LD + warp * 16 * LD;  // this warp's 16 keys
    const T* sV = sK + kTile * LD;
    const int kw = t * kTile + warp * 16;
    if (kw < nk) {
      // ---- S (16 heads x 16 keys) = Q K^T ----
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int ks = 0; ks < DT / 16; ++ks) {
        uint32_t a[4], b[4];
        ldsm_x4(a, sQ + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + ks * 16 + (lane >> 4) * 8);
        ldsm_x4(b, sK + ((lane & 7) + (lane >> 4) * 8) * LD + ks * 16 + ((lane >> 3) & 1) * 8);
        Mma<T>::mma(s[0], a, b[0], b[1]);
        Mma<T>::mma(s[1], a, b[2], b[3]);
      }
      // ---- online softmax (log2 units); element e of n-tile nt: row quad + 8 (e / 2), key 8 nt + 2 qlane + e % 2
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool ok = kw + nt * 8 + 2 * qlane + (e & 1) < nk;
          s[nt][e] = ok ? s[nt][e] * qscale : -INFINITY;
          mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
        }
      float m_use[2], corr[2];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
        mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
        const float m_new = fmaxf(m_r[hh], mx[hh]);
        m_use[hh] = m_new == -INFINITY ? 0.f : m_new;  // no valid key yet: avoid (-inf) - (-inf)
        corr[hh] = exp2f(m_r[hh] - m_use[hh]);
        m_r[hh] = m_new;
        l_r[hh] *= corr[hh];
      }
      uint32_t pa[4];
      float pr[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = exp2f(s[nt][e] - m_use[e >> 1]);
        // A fragment of P (16 x 16 keys): {row, keys 0-7}, {row + 8, keys 0-7}, {row, keys 8-15}, {row + 8, 8-15}
        pa[2 * nt] = Mma<T>::pack(s[nt][0], s[nt][1], pr[nt][0], pr[nt][1]);
        pa[2 * nt + 1] = Mma<T>::pack(s[nt][2], s[nt][3], pr[nt][2], pr[nt][3]);
        // l sums the rounded P that the P V product uses (thread-partial; the quad is summed at the end).
        l_r[0] += pr[nt][0] + pr[nt][1];
        l_r[1] += pr[nt][2] + pr[nt][3];
      }
      // ---- O = diag(corr) O + P V ----
#pragma unroll
      for (int dt = 0; dt < DT / 8; ++dt) {
        o[dt][0] *= corr[0];
        o[dt][1] *= corr[0];
        o[dt][2] *= corr[1];
        o[dt][3] *= corr[1];
      }
#pragma unroll
      for (int dt = 0; dt < DT / 16; ++dt) {
        uint32_t b[4];
        ldsm_x4_trans(b, sV + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + dt * 16 + (lane >> 4) * 8);
        Mma<T>::mma(o[2 * dt], pa, b[0], b[1]);
        Mma<T>::mma(o[2 * dt + 1], pa, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with stage t % kStages
    if (t + kStages < ntiles) load_tile(t + kStages);
    cp_async_commit();
  }
  cp_async_wait<0>();  // (only empty groups can be left) before the stages are reused below

  // ---- merge the 4 warps: M = max_w m_w, O = sum_w 2^(m_w - M) O_w, L = sum_w 2^(m_w - M) l_w ----
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l_r[hh] += __shfl_xor_sync(0xffffffffu, l_r[hh], 1);
    l_r[hh] += __shfl_xor_sync(0xffffffffu, l_r[hh], 2);
  }
  if (qlane == 0) {
    s_m[warp][quad] = m_r[0];
    s_m[warp][quad + 8] = m_r[1];
    s_l[warp][quad] = l_r[0];
    s_l[warp][quad + 8] = l_r[1];
  }
  __syncthreads();
  float sc[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = quad + 8 * hh;
    float M = s_m[0][r];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) M = fmaxf(M, s_m[w][r]);  // finite: key 0 of the split is warp 0's
    sc[hh] = exp2f(m_r[hh] - M);  // 0 for a warp that saw no valid key
  }
  float* s_o = reinterpret_cast<float*>(sKV);  // [kWarps][16][LDO], fits in the stages
#pragma unroll
  for (int dt = 0; dt < DT / 8; ++dt) {
    const int c = dt * 8 + 2 * qlane;
    *reinterpret_cast<float2*>(s_o + (warp * 16 + quad) * LDO + c) = make_float2(o[dt][0] * sc[0], o[dt][1] * sc[0]);
    *reinterpret_cast<float2*>(s_o + (warp * 16 + quad + 8) * LDO + c) =
        make_float2(o[dt][2] * sc[1], o[dt][3] * sc[1]);
  }
  __syncthreads();
  for (int i = tid; i < gc * D; i += kThreads) {
    const int r = i / D, d = i % D;
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) a += s_o[(w * 16 + r) * LDO + d];
    p.o_part[((j * G + g0 + r) * p.nsplit + split) * p.D + d] = a;
  }
  if (tid < gc) {
    float M = s_m[0][tid];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) M = fmaxf(M, s_m[w][tid]);
    float L = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) L += exp2f(s_m[w][tid] - M) * s_l[w][tid];
    float* ml = p.ml_part + ((j * G + g0 + tid) * p.nsplit + split) * 2;
    ml[0] = M;
    ml[1] = L;
  }
  __syncthreads();  // the merge buffer (the stages) and s_m / s_l are read before the next split reuses them
  }
}

// Grid (H, ceil(D / 32), batch): merge the valid splits of one query head for 32 dims (weights
// 2^(m_s - M) / L), round to T. Lane = dim, the 8 warps take interleaved splits. (8, not 32: at batch 16
// and a short context, 1024-thread blocks that each merge a handful of splits took 12 us per call.)
constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) swa_combine_kernel(const SwaDecodeParams p0) {
  pdl_wait();  // a no-op without PDL (AHN_RT_DECODE_PDL=0); everything below may need the previous kernel
  const SwaDecodeParams p = p0.row(blockIdx.z);  // grid z: row
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
  // Four independent sums per thread (splits warp + 8 (4 i + r) into sum r, the tail into sum 0): a long
  // cache's ~190 valid splits are ~6 dependent steps per warp, not ~24.
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (d < D) {
    int s = warp;
    for (; s + 3 * kCombineWarps < nvalid; s += 4 * kCombineWarps) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int sr = s + r * kCombineWarps;
        acc[r] = fmaf(s_w[sr], o[static_cast<int64_t>(sr) * D + d], acc[r]);
      }
    }
    for (; s < nvalid; s += kCombineWarps) acc[0] = fmaf(s_w[s], o[static_cast<int64_t>(s) * D + d], acc[0]);
  }
  s_o[warp][lane] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
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
  if constexpr (sizeof(T) == 2) {
    const size_t smem = static_cast<size_t>(swa_mma_smem_bytes(p.D));
    auto kernel = swa_split_mma_kernel<T, DT>;
    // Above 48 KiB a block needs the opt-in (host/swa_decode.cpp sized the chunk for this footprint).
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    // The largest shared-memory carveout for both kernels, so an SM need not be reconfigured between them.
    cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    cudaFuncSetAttribute(swa_combine_kernel<T>, cudaFuncAttributePreferredSharedMemoryCarveout,
                         cudaSharedmemCarveoutMaxShared);
    const dim3 grid(static_cast<unsigned>(p.split_blocks), static_cast<unsigned>(p.Hkv * p.batch),
                    static_cast<unsigned>((p.H / p.Hkv + 15) / 16));
    (void)launch_ex(kernel, grid, dim3(kThreads), smem, stream, decode_pdl_on(), 0, p);
  } else {
    const size_t smem = 2 * static_cast<size_t>(p.chunk) * p.D * sizeof(T) +
                        static_cast<size_t>(p.H / p.Hkv) * p.chunk * sizeof(float);
    const dim3 grid(static_cast<unsigned>(p.nsplit), static_cast<unsigned>(p.Hkv * p.batch));
    (void)launch_ex(swa_split_scalar_kernel<T, DT>, grid, dim3(kThreads), smem, stream, decode_pdl_on(), 0, p);
  }
  const dim3 cgrid(static_cast<unsigned>(p.H), static_cast<unsigned>((p.D + 31) / 32), static_cast<unsigned>(p.batch));
  (void)launch_ex(swa_combine_kernel<T>, cgrid, dim3(kCombineThreads), p.nsplit * sizeof(float), stream, decode_pdl_on(), 0, p);
  // launch errors: the host's launch check (cudaGetLastError)
}

}  // namespace

template <typename T>
void swa_decode_cuda(const SwaDecodeParams& p, void* stream) {
  // fp32 (CUDA cores): host/swa_decode.cpp keeps the K/V tiles <= 32 KiB and the scores <= 8 KiB (dynamic),
  // with kGroup * DT * 4 <= 8 KiB static: within the 48 KiB that needs no opt-in. fp16 / bf16: the dynamic
  // size is swa_mma_smem_bytes(D) (opt-in above). nsplit * 4 bytes for the combine is at most 32 KiB.
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.D <= 64) launch<T, 64>(p, s);
  else if (p.D <= 128) launch<T, 128>(p, s);
  else launch<T, 256>(p, s);
}

template void swa_decode_cuda<float>(const SwaDecodeParams&, void*);
template void swa_decode_cuda<c10::BFloat16>(const SwaDecodeParams&, void*);
template void swa_decode_cuda<c10::Half>(const SwaDecodeParams&, void*);

}  // namespace ahn_rt
