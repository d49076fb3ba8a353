// CUDA AHN memory step for one decoded token, ONE launch: grid (ceil(Dv / 16), H). Each block owns 16
// state columns of one head (the columns of S are independent in the delta rule), so ~128 blocks share
// the state traffic; it does decay + delta update + read for its columns in registers and writes its
// piece of o. The last block of a head to arrive (an int counter that it resets to 0: graph-replay safe)
// does the per-head RMSNorm * w * swish(z) and the o_proj matvec and adds into out.
// A no-op while pos < sinks + window (pos read on the device).
// Measured (H200, 3B shape): ~11.5 us per call in a CUDA graph, bound by a chain of ~10 dependent memory
// round trips (pos, loads, fence + counter, o_buf, o_proj batches, out), not by bytes.
// Test: pytest -m cuda tests/test_ops.py -k gdn; timing: bench/ops_bench.py.
#include <cstdint>

#include <cuda_runtime.h>

#include "../common.h"

namespace ahn_rt {
namespace {

constexpr int kThreads = 256;
constexpr int kCols = static_cast<int>(kGdnCols);  // 16 columns per block: 4 threads x float4
constexpr int kTx = kCols / 4;                     // 4
constexpr int kTy = kThreads / kTx;                // 64 row lanes
constexpr int kMaxRows = 256 / kTy;                // 4 rows per thread: Dk <= 256
constexpr int kMaxD = 256;

// Sum a per-thread value of column group (ty, tx, e) over ty; result for column tx*4+e in out[16].
// Lanes of a warp with equal tx are 4 apart: shuffle over ty inside the warp, then over the 8 warps.
__device__ __forceinline__ void sum_over_rows(float (&v)[4], float (*red)[kCols], float* out) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, tx = tid % kTx;
#pragma unroll
  for (int e = 0; e < 4; ++e)
#pragma unroll
    for (int o = kTx; o < 32; o <<= 1) v[e] += __shfl_xor_sync(0xffffffffu, v[e], o);
  if (lane < kTx) {
#pragma unroll
    for (int e = 0; e < 4; ++e) red[warp][tx * 4 + e] = v[e];
  }
  __syncthreads();
  if (tid < kCols) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += red[w][tid];
    out[tid] = s;
  }
  __syncthreads();
}

// Partial sums of y @ o_proj[h] for the output head: thread (row group rg, column c) sums rows
// rg, rg + R, ... into part[rg * Dv + c]. Loads are batched 16 at a time so that they overlap (a plain loop
// waits for each load before the next FMA: ~64 memory latencies in a row).
template <typename T, typename TP>
__device__ __forceinline__ void o_proj_partial(const GdnDecodeParams& p, int64_t h, const float* y, float* part) {
  const int Dv = static_cast<int>(p.Dv);
  const int R = max(1, kThreads / Dv);
  const int c = threadIdx.x % Dv, rg = threadIdx.x / Dv;
  if (rg >= R) return;
  const TP* w = static_cast<const TP*>(p.o_proj) + h * p.Dv * p.Dv + c;
  float acc = 0.f;
  int i = rg;
  for (; i + 15 * R < Dv; i += 16 * R) {
    float wv[16];
#pragma unroll
    for (int u = 0; u < 16; ++u) wv[u] = static_cast<float>(w[static_cast<int64_t>(i + u * R) * Dv]);
#pragma unroll
    for (int u = 0; u < 16; ++u) acc = fmaf(y[i + u * R], round_to<T>(wv[u]), acc);
  }
  for (; i < Dv; i += R) acc = fmaf(y[i], round_to<T>(static_cast<float>(w[static_cast<int64_t>(i) * Dv])), acc);
  part[rg * Dv + c] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gdn_decode_kernel(GdnDecodeParams p) {
  if (*p.pos < p.sinks + p.window) return;
  __shared__ float s_q[kMaxD], s_k[kMaxD], s_y[kMaxD], s_red[32];
  __shared__ float s_rows[kThreads / 32][kCols];
  __shared__ float s_col[kCols];
  __shared__ float s_part[kThreads];
  __shared__ bool s_last;
  const int tid = threadIdx.x, tx = tid % kTx, ty = tid / kTx;
  const int64_t h = blockIdx.y, Dk = p.Dk, Dv = p.Dv;
  const int64_t kvh = h / (p.H / p.Hkv);
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kCols;

  // Issue the loads that do not depend on anything first (v_j, gates), so their latency overlaps.
  float vj = 0.f;
  if (tid < kCols && j0 + tid < Dv) vj = static_cast<float>(static_cast<const T*>(p.v)[kvh * p.v_stride + j0 + tid]);
  const float decay = expf(load_kind(p.g, p.g_kind, h * p.g_stride));
  const float beta = load_kind(p.beta, p.beta_kind, h * p.beta_stride);

  // This thread's piece of S: rows ty + kTy * r, columns col .. col + 3 (loaded before the q/k norms).
  float* S = p.state + h * Dk * Dv;
  const int64_t col = j0 + tx * 4;
  const bool vec = (reinterpret_cast<uintptr_t>(p.state) % 16 == 0) && (Dv % 4 == 0) && (col + 4 <= Dv);
  float s[kMaxRows][4];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    const int64_t i = ty + kTy * r;
#pragma unroll
    for (int e = 0; e < 4; ++e) s[r][e] = 0.f;
    if (i < Dk) {
      if (vec) {
        const float4 v = *reinterpret_cast<const float4*>(S + i * Dv + col);
        s[r][0] = v.x; s[r][1] = v.y; s[r][2] = v.z; s[r][3] = v.w;
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (col + e < Dv) s[r][e] = S[i * Dv + col + e];
      }
    }
  }

  // l2norm(q) * Dk^-0.5 and l2norm(k) as x / (||x|| + 1e-6) (fla fused_recurrent, AHN_SPEC §3).
  const T* q = static_cast<const T*>(p.q) + h * p.q_stride;
  const T* k = static_cast<const T*>(p.k) + kvh * p.k_stride;
  float qq = 0.f, kk = 0.f;
  for (int64_t i = tid; i < Dk; i += kThreads) {
    const float a = static_cast<float>(q[i]), b = static_cast<float>(k[i]);
    s_q[i] = a;
    s_k[i] = b;
    qq += a * a;
    kk += b * b;
  }
  qq = block_sum(qq, s_red);
  kk = block_sum(kk, s_red);
  const float qn = sqrtf(qq) + 1e-6f, kn = sqrtf(kk) + 1e-6f, scale = 1.f / sqrtf(static_cast<float>(Dk));
  for (int64_t i = tid; i < Dk; i += kThreads) {
    s_q[i] = s_q[i] / qn * scale;
    s_k[i] = s_k[i] / kn;
  }
  __syncthreads();
  float a[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    const int64_t i = ty + kTy * r;
    if (i < Dk) {
      const float ki = s_k[i];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[r][e] *= decay;                   // S <- exp(g) S
        a[e] = fmaf(ki, s[r][e], a[e]);     // (S^T k)_j, decayed S
      }
    }
  }
  sum_over_rows(a, s_rows, s_col);
  if (tid < kCols) {  // u_j = beta (v_j - (S^T k)_j)
    s_col[tid] = beta * (vj - s_col[tid]);
  }
  __syncthreads();
  float u[4], o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int e = 0; e < 4; ++e) u[e] = s_col[tx * 4 + e];
  __syncthreads();  // s_col is rewritten by the next reduction
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    const int64_t i = ty + kTy * r;
    if (i < Dk) {
      const float ki = s_k[i], qi = s_q[i];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[r][e] = fmaf(ki, u[e], s[r][e]);  // S <- S + k u^T
        o[e] = fmaf(qi, s[r][e], o[e]);     // o = S^T q (updated S)
      }
      if (vec) {
        *reinterpret_cast<float4*>(S + i * Dv + col) = make_float4(s[r][0], s[r][1], s[r][2], s[r][3]);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (col + e < Dv) S[i * Dv + col + e] = s[r][e];
      }
    }
  }
  sum_over_rows(o, s_rows, s_col);
  if (tid < kCols && j0 + tid < Dv) p.o_buf[h * Dv + j0 + tid] = round_to<T>(s_col[tid]);  // o in q.dtype

  // Last block of this head to arrive does the output head (threadFenceReduction pattern).
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int prev = atomicAdd(p.counter + h, 1);
    s_last = prev == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (tid == 0) p.counter[h] = 0;  // ready for the next call / graph replay

  float ss = 0.f;
  for (int64_t c = tid; c < Dv; c += kThreads) {
    const float v = __ldcg(p.o_buf + h * Dv + c);  // written by other blocks: read through L2
    s_y[c] = v;
    ss += v * v;
  }
  ss = block_sum(ss, s_red);
  const float rs = 1.f / sqrtf(ss / static_cast<float>(Dv) + p.eps);
  const float zf = load_kind(p.z, p.z_kind, h * p.z_stride);
  const float sig = 1.f / (1.f + expf(-zf));
  for (int64_t c = tid; c < Dv; c += kThreads)
    s_y[c] = round_to<T>(s_y[c] * rs * load_kind(p.norm_weight, p.nw_kind, c) * zf * sig);
  __syncthreads();
  // m = y @ o_proj[h] (in q.dtype, fp32 accumulate); threads: column c, row group rg of R.
  switch (p.op_kind) {
    case Kind::BF16: o_proj_partial<T, c10::BFloat16>(p, h, s_y, s_part); break;
    case Kind::F16: o_proj_partial<T, c10::Half>(p, h, s_y, s_part); break;
    default: o_proj_partial<T, float>(p, h, s_y, s_part);
  }
  __syncthreads();
  const int R = max(1, kThreads / static_cast<int>(Dv));
  for (int64_t cc = tid; cc < Dv; cc += kThreads) {
    float m = 0.f;
    for (int g = 0; g < R; ++g) m += s_part[g * Dv + cc];
    const int64_t idx = h * p.out_stride + cc;
    store_kind(p.out, p.out_kind, idx, load_kind(p.out, p.out_kind, idx) + round_to<T>(m));
  }
}

}  // namespace

template <typename T>
void gdn_decode_cuda(const GdnDecodeParams& p, void* stream) {
  // ops.cpp checked Dk, Dv <= 256 (shared arrays above and kMaxRows).
  const dim3 grid(static_cast<unsigned>((p.Dv + kCols - 1) / kCols), static_cast<unsigned>(p.H));
  gdn_decode_kernel<T><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
}

template void gdn_decode_cuda<float>(const GdnDecodeParams&, void*);
template void gdn_decode_cuda<c10::BFloat16>(const GdnDecodeParams&, void*);
template void gdn_decode_cuda<c10::Half>(const GdnDecodeParams&, void*);

}  // namespace ahn_rt
