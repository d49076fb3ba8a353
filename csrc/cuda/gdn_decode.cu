// CUDA AHN memory step for one decoded token, ONE launch: grid (ceil(Dv / W), H) in thread-block clusters
// of ceil(Dv / W) <= 8 blocks, one cluster per head (sm_90 clusters; 8 is the portable cluster size).
// Block b owns state columns [b W, b W + W) of its head (the columns of S are independent in the delta
// rule). Every global load it needs (its state slice, q, k, v_j, beta, g, z, norm weight, its W rows of
// o_proj, its piece of out, pos) is issued up front, so the block waits for memory once. The per-head
// RMSNorm over Dv and o_proj cross the blocks through distributed shared memory, not device memory:
//   1. decay + delta update + o_j = (S^T q)_j for its columns (state written back), o_j rounded to T;
//   2. cluster barrier: every block sums the cluster's partial sums of squares -> the exact rms scale, so
//      y_j = round_T(o_j * rs * w_j * z * sigmoid(z)) is rounded as the reference rounds it;
//   3. partial m = y_slice @ o_proj[h][slice, :] over all Dv outputs into shared memory; cluster barrier;
//   4. block b sums the cluster's partials for ITS output columns, rounds to T and adds into out;
//      a last cluster barrier keeps every block's shared memory alive until its peers have read it.
// No counters or scratch in device memory: nothing to reset between calls or graph replays.
// A no-op while pos < sinks + window (pos read on the device; every store is predicated on it).
// Before (H200, 3B shape): ~11.7 us per call in a CUDA graph. Now ~10.2 us: ncu shows the kernel is not
// memory-bound (DRAM 2.6%) but issue-latency-bound (~1 warp/scheduler, 13 cycles per instruction):
// 64-bit index math, int64 division in the o_proj product loop and runtime-dtype switches. Next: 32-bit
// indices, compile-time row/column mapping for the o_proj partial, templated side-tensor dtypes.
// Test: pytest -m cuda tests/test_ops.py -k gdn; timing: bench/ops_bench.py.
#include <cstdint>

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "../common.h"

namespace ahn_rt {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;  // >= Dk (q / k: one element per thread) and >= Dv (the output sums)
constexpr int kMaxD = 256;
constexpr int kMaxSlices = 8;  // blocks per cluster (the portable maximum)

// Sum a per-thread value of column group (ty, tx, e) over ty; the result for column tx * 4 + e lands in
// out[W]. Lanes of a warp with equal tx are TX apart: shuffle over ty inside the warp, then over the warps.
template <int W>
__device__ __forceinline__ void sum_over_rows(float (&v)[4], float (*red)[W], float* out) {
  constexpr int TX = W / 4;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, tx = tid % TX;
#pragma unroll
  for (int e = 0; e < 4; ++e)
#pragma unroll
    for (int o = TX; o < 32; o <<= 1) v[e] += __shfl_xor_sync(0xffffffffu, v[e], o);
  if (lane < TX) {
#pragma unroll
    for (int e = 0; e < 4; ++e) red[warp][tx * 4 + e] = v[e];
  }
  __syncthreads();
  if (tid < W) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) s += red[w][tid];
    out[tid] = s;
  }
  __syncthreads();
}

// T: q/k/v dtype (the model dtype), TP: o_proj dtype, W: state columns per block.
template <typename T, typename TP, int W>
__global__ void __launch_bounds__(kThreads) gdn_decode_kernel(GdnDecodeParams p) {
  constexpr int TX = W / 4;                          // threads across a row (4 columns each)
  constexpr int TY = kThreads / TX;                  // row lanes
  constexpr int R = (kMaxD + TY - 1) / TY;           // rows per thread for Dk <= 256
  constexpr int NW = (W * kMaxD + kThreads - 1) / kThreads;  // o_proj values per thread (W rows x Dv cols)
  __shared__ float s_q[kMaxD], s_k[kMaxD], s_red[2][kThreads / 32];
  __shared__ float s_rows[kThreads / 32][W];
  __shared__ float s_col[W], s_y[W];
  __shared__ float s_prod[W][kMaxD];
  __shared__ float s_part[kMaxD];  // this block's y_slice @ o_proj[h][slice, :], read by the cluster
  __shared__ float s_ss;           // this block's sum of o_j^2, read by the cluster

  cg::cluster_group cluster = cg::this_cluster();
  const int nsl = static_cast<int>(cluster.num_blocks());  // == gridDim.x: one cluster per head
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  const int64_t h = blockIdx.y, Dk = p.Dk, Dv = p.Dv;
  const int64_t kvh = h / (p.H / p.Hkv);
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * W;
  const int wv = static_cast<int>(min(static_cast<int64_t>(W), Dv - j0));  // valid columns of this slice

  // ---- 1. every load, up front and independent of each other ----
  const int64_t pos = *p.pos;
  float* S = p.state + h * Dk * Dv;
  const int64_t col = j0 + tx * 4;
  const bool vec = (reinterpret_cast<uintptr_t>(p.state) % 16 == 0) && (Dv % 4 == 0) && (col + 4 <= Dv);
  float s[R][4];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = ty + TY * r;
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
  float qi = 0.f, ki = 0.f;
  if (tid < Dk) {
    qi = static_cast<float>(static_cast<const T*>(p.q)[h * p.q_stride + tid]);
    ki = static_cast<float>(static_cast<const T*>(p.k)[kvh * p.k_stride + tid]);
  }
  float vj = 0.f, nwj = 0.f, outj = 0.f;
  if (tid < wv) {
    vj = static_cast<float>(static_cast<const T*>(p.v)[kvh * p.v_stride + j0 + tid]);
    nwj = load_kind(p.norm_weight, p.nw_kind, j0 + tid);
    outj = load_kind(p.out, p.out_kind, h * p.out_stride + j0 + tid);
  }
  const float decay = expf(load_kind(p.g, p.g_kind, h * p.g_stride));
  const float beta = load_kind(p.beta, p.beta_kind, h * p.beta_stride);
  const float zf = load_kind(p.z, p.z_kind, h * p.z_stride);
  // o_proj rows j0 .. j0 + wv - 1 (contiguous: wv * Dv values), element e = tid + kThreads * u.
  const TP* wo = static_cast<const TP*>(p.o_proj) + (h * Dv + j0) * Dv;
  const int nwo = wv * static_cast<int>(Dv);
  float wr[NW];
#pragma unroll
  for (int u = 0; u < NW; ++u) {
    const int e = tid + kThreads * u;
    wr[u] = e < nwo ? static_cast<float>(wo[e]) : 0.f;
  }
  const bool active = pos >= p.sinks + p.window;

  // ---- 2. l2norm(q) * Dk^-0.5 and l2norm(k) as x / (||x|| + 1e-6) (fla fused_recurrent, AHN_SPEC §3) ----
  {
    const int lane = tid & 31, warp = tid >> 5;
    const float qq = warp_sum(qi * qi), kk = warp_sum(ki * ki);
    if (lane == 0) {
      s_red[0][warp] = qq;
      s_red[1][warp] = kk;
    }
    __syncthreads();
    float tq = 0.f, tk = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) {
      tq += s_red[0][w];
      tk += s_red[1][w];
    }
    const float qn = sqrtf(tq) + 1e-6f, kn = sqrtf(tk) + 1e-6f, scale = 1.f / sqrtf(static_cast<float>(Dk));
    if (tid < Dk) {
      s_q[tid] = qi / qn * scale;
      s_k[tid] = ki / kn;
    }
    __syncthreads();
  }

  // ---- 3. S <- exp(g) S; u = beta (v - S^T k); S <- S + k u^T; o = S^T q ----
  float a[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = ty + TY * r;
    if (i < Dk) {
      const float kr = s_k[i];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[r][e] *= decay;
        a[e] = fmaf(kr, s[r][e], a[e]);
      }
    }
  }
  sum_over_rows<W>(a, s_rows, s_col);
  if (tid < W) s_col[tid] = beta * (vj - s_col[tid]);  // thread tid loaded v_j for column tid
  __syncthreads();
  float u[4], o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int e = 0; e < 4; ++e) u[e] = s_col[tx * 4 + e];
  __syncthreads();  // s_col is rewritten by the next reduction
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = ty + TY * r;
    if (i < Dk) {
      const float kr = s_k[i], qr = s_q[i];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[r][e] = fmaf(kr, u[e], s[r][e]);
        o[e] = fmaf(qr, s[r][e], o[e]);
      }
      if (active) {
        if (vec) {
          *reinterpret_cast<float4*>(S + i * Dv + col) = make_float4(s[r][0], s[r][1], s[r][2], s[r][3]);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (col + e < Dv) S[i * Dv + col + e] = s[r][e];
        }
      }
    }
  }
  sum_over_rows<W>(o, s_rows, s_col);
  // o in q.dtype (gdn_recurrent_ref returns o.to(q.dtype)); W <= 32: warp 0 holds the slice.
  const float oj = tid < wv ? round_to<T>(s_col[tid]) : 0.f;
  if (tid < 32) {
    const float ss = warp_sum(oj * oj);
    if (tid == 0) s_ss = ss;
  }
  cluster.sync();  // (a) every block's s_ss is visible to the cluster

  // ---- 4. y_j = round_T(o_j * rs * w_j * z * sigmoid(z)) with rs over all Dv columns of the head ----
  if (tid < W) {
    // All peer reads issued together (unrolled), summed in rank order (the same sum in every block).
    float ssr[kMaxSlices];
#pragma unroll
    for (int r = 0; r < kMaxSlices; ++r) ssr[r] = r < nsl ? *cluster.map_shared_rank(&s_ss, r) : 0.f;
    float ss = 0.f;
#pragma unroll
    for (int r = 0; r < kMaxSlices; ++r) ss += ssr[r];
    const float rs = 1.f / sqrtf(ss / static_cast<float>(Dv) + p.eps);
    const float sig = 1.f / (1.f + expf(-zf));
    s_y[tid] = tid < wv ? round_to<T>(oj * rs * nwj * zf * sig) : 0.f;
  }
  __syncthreads();
  // ---- 5. partial m = y_slice @ o_proj[h][slice, :] (o_proj rounded to T, fp32 accumulate) ----
#pragma unroll
  for (int uu = 0; uu < NW; ++uu) {
    const int e = tid + kThreads * uu;
    if (e < nwo) s_prod[e / Dv][e % Dv] = s_y[e / Dv] * round_to<T>(wr[uu]);
  }
  __syncthreads();
  if (tid < Dv) {
    float m = 0.f;
    for (int i = 0; i < wv; ++i) m += s_prod[i][tid];
    s_part[tid] = m;
  }
  cluster.sync();  // (b) every block's s_part is visible to the cluster
  // ---- 6. output columns of this slice: sum the cluster's partials, round to T, add into out ----
  if (tid < wv) {
    float mr[kMaxSlices];
#pragma unroll
    for (int r = 0; r < kMaxSlices; ++r) mr[r] = r < nsl ? cluster.map_shared_rank(s_part, r)[j0 + tid] : 0.f;
    float m = 0.f;
#pragma unroll
    for (int r = 0; r < kMaxSlices; ++r) m += mr[r];
    if (active) store_kind(p.out, p.out_kind, h * p.out_stride + j0 + tid, outj + round_to<T>(m));
  }
  cluster.sync();  // (c) no block leaves (freeing its shared memory) while a peer may still read it
}

template <typename T, typename TP, int W>
void launch(const GdnDecodeParams& p, cudaStream_t stream) {
  const unsigned nsl = static_cast<unsigned>((p.Dv + W - 1) / W);  // <= 8
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(nsl, static_cast<unsigned>(p.H));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = nsl;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // A launch error is left for the caller's cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK in ops.cpp).
  (void)cudaLaunchKernelEx(&cfg, gdn_decode_kernel<T, TP, W>, p);
}

template <typename T, typename TP>
void launch_w(const GdnDecodeParams& p, cudaStream_t stream) {
  switch (gdn_slice_cols(p.Dv)) {
    case 8: launch<T, TP, 8>(p, stream); break;
    case 16: launch<T, TP, 16>(p, stream); break;
    default: launch<T, TP, 32>(p, stream);
  }
}

}  // namespace

template <typename T>
void gdn_decode_cuda(const GdnDecodeParams& p, void* stream) {
  // ops.cpp checked Dk, Dv <= 256 (shared arrays above, kThreads and R).
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.op_kind) {
    case Kind::BF16: launch_w<T, c10::BFloat16>(p, s); break;
    case Kind::F16: launch_w<T, c10::Half>(p, s); break;
    default: launch_w<T, float>(p, s);
  }
}

template void gdn_decode_cuda<float>(const GdnDecodeParams&, void*);
template void gdn_decode_cuda<c10::BFloat16>(const GdnDecodeParams&, void*);
template void gdn_decode_cuda<c10::Half>(const GdnDecodeParams&, void*);

}  // namespace ahn_rt
