// CUDA gdn_chunk_prep kernel: the chunk-local part of the chunked gated delta rule, everything of a
// GatedDeltaNet prefill but the chunk-to-chunk recurrence (reference: ahn_rt/ref.py gdn_chunk_prep_ref; the
// math: docs/semantics.md §5 and GdnChunkPrepParams in common.h); with M2 the same for the Mamba2 memory,
// which has no delta correction (no A, no w; reference: ref.py mamba2_chunk_prep_ref, §11.2).
// Test: pytest -m cuda tests/test_prefill.py.
//
// One block per (chunk, head), float32 throughout:
//   1. each warp l2-normalizes rows of k and q into shared memory (q times scale), with beta and alpha;
//   2. one thread forms the cumulative log-decay G of the chunk (64 adds, a fixed order);
//   3. A (strictly lower, kept in shared memory) and P (lower with the diagonal, written out): each thread
//      a 4 x 4 register tile of (i, j) pairs, rows i = ti + 16a and j = tj + 16b, float4 loads over Dk;
//   5a. qg (then Qs's space takes diag(beta) V, the right-hand sides of u);
//   4. (I + A) [w | u] = [diag(beta e^G) K | diag(beta) V] by forward substitution, one column per thread:
//      a column's 64 unknowns stay in registers and no thread waits for another; A is read four
//      entries at a time (a broadcast) into four independent sums; every right-hand side comes from shared
//      memory, so that the kernel fits 128 registers (two blocks per SM);
//   5b. kd_t (transposed) and gl.
// Rows of the shared tiles are padded by 4 floats: the float4 reads of 8 consecutive rows (a quarter warp)
// hit distinct banks.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "../common.h"

namespace ahn_rt {
namespace {

constexpr int kThreads = 256;
constexpr int CH = static_cast<int>(kScanChunk);

constexpr int AP = CH + 4;   // padded row of A

// Ks, Qs, A (float), then G (double: Mamba2's cumulative log-decay is formed in float64), the per-token
// write strength (beta or dt), and per row e^G and e^(G_last - G) (float).
// Qs's space holds beta V (rows of Dv + 4) in step 4: it is as large as either.
inline int64_t prep_smem_bytes(int64_t Dk, int64_t Dv) {
  return (CH * (Dk + 4) + CH * std::max(Dk + 4, Dv + 4) + CH * AP + 3 * CH) * static_cast<int64_t>(sizeof(float)) +
         CH * sizeof(double);
}

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ float exp_of(double x) { return static_cast<float>(exp(x)); }

// F.normalize(x, eps=1e-12)'s divisor in dtype T (Mamba2's q and k): the norm rounded to T, clamped.
template <typename T>
__device__ __forceinline__ float l2_divisor_t(float sum_sq) {
  return fmaxf(round_to<T>(sqrtf(sum_sq)), round_to<T>(1e-12f));
}

// M2 = false: GatedDeltaNet (G float32, as its reference). M2 = true: Mamba2 (G float64, no A, w, beta).
template <typename T, bool M2>
__global__ void __launch_bounds__(kThreads, 2) gdn_chunk_prep_kernel(GdnChunkPrepParams p) {
  using GT = std::conditional_t<M2, double, float>;
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv), KP = Dk + 4;
  const int n = blockIdx.x, h = blockIdx.y;
  const int hk = h / static_cast<int>(p.H / p.Hkv);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* Ks = smem;                  // [CH][KP]  k^
  float* Qs = Ks + CH * KP;          // [CH][KP]  q^ * scale
  float* Am = Qs + CH * std::max(KP, Dv + 4);   // [CH][AP]   (Qs's space: also beta V [CH][Dv + 4])
  GT* G = reinterpret_cast<GT*>(Am + CH * AP);                 // [CH]
  float* Bt = reinterpret_cast<float*>(reinterpret_cast<double*>(Am + CH * AP) + CH);   // [CH]
  float* Eg = Bt + CH;               // [CH]  e^G[i]
  float* Ek = Eg + CH;               // [CH]  e^(G[CH-1] - G[i])
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const int64_t t0 = static_cast<int64_t>(n) * CH;

  // 1. Rows (two at a time per warp, so that the second row's loads are in flight with the first's sums).
#pragma unroll 2
  for (int s = 0; s < CH / (kThreads / 32); ++s) {
    const int i = warp + s * (kThreads / 32);
    const int64_t t = t0 + i;
    const bool ok = t < p.n;
    const T* kr = k + t * p.k_s0 + hk * p.k_s1;
    const T* qr = q + t * p.q_s0 + h * p.q_s1;
    float ssk = 0.f, ssq = 0.f;
    for (int d = lane; d < Dk; d += 32) {
      const float kv = ok ? static_cast<float>(kr[d]) : 0.f;
      const float qv = ok ? static_cast<float>(qr[d]) : 0.f;
      Ks[i * KP + d] = kv;
      Qs[i * KP + d] = qv;
      ssk = fmaf(kv, kv, ssk);
      ssq = fmaf(qv, qv, ssq);
    }
    if constexpr (M2) {   // q / max(|q|, eps) in T, no scale; the padding rows stay 0 (in fp16 eps rounds
                          // to 0, and 0 / 0 would poison the state through 0 * NaN)
      const float sk = warp_sum(ssk), sq = warp_sum(ssq);
      const float kn = ok ? l2_divisor_t<T>(sk) : 1.f, qn = ok ? l2_divisor_t<T>(sq) : 1.f;
      for (int d = lane; d < Dk; d += 32) {
        Ks[i * KP + d] = round_to<T>(Ks[i * KP + d] / kn);
        Qs[i * KP + d] = round_to<T>(Qs[i * KP + d] / qn);
      }
    } else {
      const float kn = sqrtf(warp_sum(ssk)) + kGdnL2Eps, qn = sqrtf(warp_sum(ssq)) + kGdnL2Eps;
      for (int d = lane; d < Dk; d += 32) {
        Ks[i * KP + d] = Ks[i * KP + d] / kn;
        Qs[i * KP + d] = Qs[i * KP + d] / qn * p.scale;
      }
    }
    if (lane == 0) {
      // beta and the log-decay alpha (GatedDeltaNet), or dt and dt * A with A = -exp(A_log) (Mamba2)
      const float b = ok ? load_kind(p.beta, p.beta_kind, t * p.b_s0 + h * p.b_s1) : 0.f;
      Bt[i] = b;
      if constexpr (M2) {
        G[i] = __fmul_rn(b, -expf(load_kind(p.alpha, p.alpha_kind, h * p.a_s1)));
      } else {
        G[i] = ok ? load_kind(p.alpha, p.alpha_kind, t * p.a_s0 + h * p.a_s1) : 0.f;
      }
    }
  }
  __syncthreads();
  // 2. The cumulative log-decay.
  if (threadIdx.x == 0) {
    GT g = 0;
    for (int i = 0; i < CH; ++i) {
      g += G[i];
      G[i] = g;
    }
  }
  __syncthreads();

  const int64_t tile = static_cast<int64_t>(h) * p.N + n;   // (h, n): the output tiles' index
  // The per-row exponentials of steps 4 and 5, once per row (read after step 3's barrier).
  if (threadIdx.x < CH) {
    Eg[threadIdx.x] = exp_of(G[threadIdx.x]);
  } else if (threadIdx.x < 2 * CH) {
    const int i = threadIdx.x - CH;
    Ek[i] = exp_of(G[CH - 1] - G[i]);
  }
  // 3. A and P: thread (ti, tj) owns rows i = ti + 16a, columns j = tj + 16b (a, b < 4).
  float* P = p.P + tile * CH * CH;
  {
    const int ti = threadIdx.x >> 4, tj = threadIdx.x & 15;
    float kk[4][4], qk[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) kk[a][b] = qk[a][b] = 0.f;
    for (int d = 0; d < Dk; d += 4) {
      float4 ki[4], qi[4], kj[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        if constexpr (!M2) ki[a] = ld4(Ks + (ti + 16 * a) * KP + d);
        qi[a] = ld4(Qs + (ti + 16 * a) * KP + d);
        kj[a] = ld4(Ks + (tj + 16 * a) * KP + d);
      }
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          if constexpr (!M2) {
            kk[a][b] = fmaf(ki[a].x, kj[b].x, kk[a][b]);
            kk[a][b] = fmaf(ki[a].y, kj[b].y, kk[a][b]);
            kk[a][b] = fmaf(ki[a].z, kj[b].z, kk[a][b]);
            kk[a][b] = fmaf(ki[a].w, kj[b].w, kk[a][b]);
          }
          qk[a][b] = fmaf(qi[a].x, kj[b].x, qk[a][b]);
          qk[a][b] = fmaf(qi[a].y, kj[b].y, qk[a][b]);
          qk[a][b] = fmaf(qi[a].z, kj[b].z, qk[a][b]);
          qk[a][b] = fmaf(qi[a].w, kj[b].w, qk[a][b]);
        }
    }
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int i = ti + 16 * a, j = tj + 16 * b;
        float av = 0.f, pq = 0.f;
        if (j <= i) {
          const float decay = exp_of(G[i] - G[j]);
          pq = qk[a][b] * decay;
          if (!M2 && j < i) av = Bt[i] * kk[a][b] * decay;
        }
        if constexpr (!M2) Am[i * AP + j] = av;
        P[i * CH + j] = pq;
      }
  }
  __syncthreads();

  // 5a. qg = e^G Q^ (Qs is free afterwards). qg's (row, column) advance by kThreads without an integer
  // division (Dk is not a compile-time constant).
  float* qg = p.qg + tile * CH * Dk;
  {
    const int di = kThreads / Dk, dd = kThreads % Dk;
    int i = threadIdx.x / Dk, d = threadIdx.x % Dk;
    for (int e = threadIdx.x; e < CH * Dk; e += kThreads) {
      qg[e] = Eg[i] * Qs[i * KP + d];
      i += di;
      d += dd;
      if (d >= Dk) {
        d -= Dk;
        ++i;
      }
    }
  }

  // 4. GatedDeltaNet: forward substitution, one column of [w | u] per thread. Mamba2: u = v * dt.
  float* u = p.u + tile * CH * Dv;
  if constexpr (M2) {
    for (int e = threadIdx.x; e < CH * Dv; e += kThreads) {
      const int i = e / Dv, c = e % Dv;
      const int64_t t = t0 + i;
      u[e] = t < p.n ? static_cast<float>(v[t * p.v_s0 + hk * p.v_s1 + c]) * Bt[i] : 0.f;
    }
  } else {
  // The right-hand sides of u, beta_i v_i, staged where Qs was (rows of VP floats): read from shared memory
  // in the substitution's chain, not from global memory (the kernel then fits 128 registers: 2 blocks per SM).
  float* Vs = Qs;
  const int VP = Dv + 4;
  __syncthreads();   // every qg read of Qs is done
  for (int e = threadIdx.x; e < CH * Dv; e += kThreads) {
    const int i = e / Dv, c = e % Dv;
    const int64_t t = t0 + i;
    Vs[i * VP + c] = t < p.n ? Bt[i] * static_cast<float>(v[t * p.v_s0 + hk * p.v_s1 + c]) : 0.f;
  }
  __syncthreads();
  float* w = p.w + tile * CH * Dk;
  for (int c = threadIdx.x; c < Dk + Dv; c += kThreads) {
    const bool is_w = c < Dk;
    float x[CH];
#pragma unroll
    for (int i = 0; i < CH; ++i) x[i] = 0.f;   // A_ij = 0 for j >= i: the float4 reads past j = i - 1 see 0 * 0
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      // Eg[i] = expf(G[i]) (G is float here)
      const float r = is_w ? (Bt[i] * Eg[i]) * Ks[i * KP + c] : Vs[i * VP + c - Dk];
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma unroll
      for (int j = 0; j < i; j += 4) {
        const float4 a = ld4(Am + i * AP + j);
        s0 = fmaf(a.x, x[j], s0);
        s1 = fmaf(a.y, x[j + 1], s1);
        s2 = fmaf(a.z, x[j + 2], s2);
        s3 = fmaf(a.w, x[j + 3], s3);
      }
      x[i] = r - ((s0 + s1) + (s2 + s3));
    }
    if (is_w) {
#pragma unroll
      for (int i = 0; i < CH; ++i) w[i * Dk + c] = x[i];
    } else {
#pragma unroll
      for (int i = 0; i < CH; ++i) u[i * Dv + c - Dk] = x[i];
    }
  }

  }

  // 5b. kd_t, gl.
  float* kd_t = p.kd_t + tile * CH * Dk;
  for (int e = threadIdx.x; e < Dk * CH; e += kThreads) {
    const int d = e / CH, i = e % CH;   // CH is a constant: shifts
    kd_t[e] = Ks[i * KP + d] * Ek[i];
  }
  if (threadIdx.x == 0) p.gl[tile] = Eg[CH - 1];
}

template <typename T, bool M2>
void launch_prep(const GdnChunkPrepParams& p, int64_t smem, const DeviceInfo& info, cudaStream_t stream) {
  // The opt-in limit is set once per device, dtype and mode (to the device's maximum).
  static thread_local int configured_device = -1;
  int dev = 0;
  cudaGetDevice(&dev);
  if (configured_device != dev) {
    cudaFuncSetAttribute(gdn_chunk_prep_kernel<T, M2>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         info.smem_optin);
    configured_device = dev;
  }
  const dim3 grid(static_cast<unsigned>(p.N), static_cast<unsigned>(p.H));
  gdn_chunk_prep_kernel<T, M2><<<grid, kThreads, smem, stream>>>(p);
}

}  // namespace

template <typename T>
void gdn_chunk_prep_cuda(const GdnChunkPrepParams& p, void* stream) {
  TORCH_CHECK(p.Dk % 4 == 0, "ahn_rt.gdn_chunk_prep: CUDA takes Dk a multiple of 4, got ", p.Dk);
  const int64_t smem = prep_smem_bytes(p.Dk, p.Dv);
  const DeviceInfo info = device_info();
  TORCH_CHECK(smem <= info.smem_optin, "ahn_rt.gdn_chunk_prep: needs ", smem,
              " bytes of shared memory per block, the device allows ", info.smem_optin);
  if (p.mamba2) {
    launch_prep<T, true>(p, smem, info, static_cast<cudaStream_t>(stream));
  } else {
    launch_prep<T, false>(p, smem, info, static_cast<cudaStream_t>(stream));
  }
}

template void gdn_chunk_prep_cuda<float>(const GdnChunkPrepParams&, void*);
template void gdn_chunk_prep_cuda<c10::BFloat16>(const GdnChunkPrepParams&, void*);
template void gdn_chunk_prep_cuda<c10::Half>(const GdnChunkPrepParams&, void*);

}  // namespace ahn_rt
