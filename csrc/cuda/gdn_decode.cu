// CUDA gdn_decode kernels and their launcher: the AHN memory step for one decoded token in ONE launch, one
// thread-block cluster per head (sm_90). Test: pytest -m cuda tests/test_ops.py -k gdn;
// timing: bench/ops_bench.py --only gdn.
//
// Gated delta rule: docs/semantics.md §5; output head (RMSNorm, swish gate, grouped o_proj): §6.
// The columns of the state S [Dk, Dv] are independent in the delta rule, so each block of a head's cluster
// owns a slice of W state columns; the per-head RMSNorm over Dv and o_proj cross the blocks through
// distributed shared memory, never device memory. No counters or scratch in device memory: nothing to
// reset between calls or graph replays. A no-op while pos < sinks + window (pos read on the device first;
// an inactive row reads and stores nothing else). Reference: ahn_rt/ref.py gdn_decode_ref (o and
// y rounded to the model dtype T, o_proj rounded to T, fp32 accumulation, m rounded to T before it is added
// into out).
//
// Fast path (gdn_fast_kernel: Dk = Dv = 128 or 64 at compile time, 16-byte aligned state and o_proj):
//   0. the position first (a row still filling its window leaves here, having read nothing else); then
//      every global load up front with 32-bit in-head indices: the block's state slice [Dk, W] (float4),
//      the o_proj COLUMN slice Wo[h][:, j0:j0+W] (16-byte loads; the block's own output columns), q / k
//      (each warp loads all of them: norms without a block barrier), v, beta, alpha, z, norm weight, out;
//   1. warp-redundant ||q||, ||k|| and q.k; one block reduction gives a_c = k.S'_c and b_c = q.S'_c
//      together (S' = exp(alpha) S), u_c = beta (v_c - a_c), S'' = S' + k u^T (written back) and
//      o_c = q.S''_c = b_c + u_c (q.k): one block barrier instead of two;
//   2. ONE cluster barrier publishes o (rounded to T); every warp reads all Dv o values from its peers
//      (the sum of squares in one fixed order, identical in every block), so each block forms y for ALL
//      rows and m_c = sum_i y_i Wo[i][c] for its own W output columns: no second exchange of partials;
//   3. a split cluster barrier (arrive after the last peer read, wait before exit) keeps each block's
//      shared memory alive while its peers read it.
// Generic fallback (gdn_decode_kernel: any Dk, Dv <= 256, any alignment): the previous design, blocks of
// W = gdn_slice_cols(Dv) columns that exchange sums of squares and o_proj partials (3 cluster barriers).
// AHN_RT_GDN_GENERIC=1 in the environment forces the fallback (env_flag, read once; for A/B timing in
// bench/ops_bench.py). Measurements and open leads: bench/README.md, "Kernel design notes and measurements".
#include <cstdint>
#include <utility>

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "../common.h"
#include "launch.cuh"

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
__global__ void __launch_bounds__(kThreads) gdn_decode_kernel(const GdnDecodeParams p0) {
  pdl_wait();  // a no-op without PDL (AHN_RT_DECODE_PDL=0); everything below may need the previous kernel
  const GdnDecodeParams p = p0.row(blockIdx.z);  // grid z: row of a batched call
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

  // ---- 1. the position alone, then every load up front and independent of each other ----
  // No token left the window yet: nothing to do and nothing read (as in gdn_fast_kernel).
  if (*p.pos < p.sinks + p.window) return;
  float* S = p.state + h * Dk * Dv;
  const int64_t col = j0 + tx * 4;
  const bool vec = (reinterpret_cast<uintptr_t>(p.state) % 16 == 0) && (Dv % 4 == 0) && (col + 4 <= Dv);
  float s[R][4];
  load_state_rows<R, TY>(S, Dk, Dv, col, ty, vec, s);
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
  const float decay = expf(load_kind(p.alpha, p.alpha_kind, h * p.alpha_stride));
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

  // ---- 2. l2norm(q) * Dk^-0.5 and l2norm(k) as x / (||x|| + 1e-6) (fla fused_recurrent, docs/semantics.md §5) ----
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

  // ---- 3. S <- exp(alpha) S; u = beta (v - S^T k); S <- S + k u^T; o = S^T q ----
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
      if (vec) {
        *reinterpret_cast<float4*>(S + i * Dv + col) = make_float4(s[r][0], s[r][1], s[r][2], s[r][3]);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (col + e < Dv) S[i * Dv + col + e] = s[r][e];
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
    store_kind(p.out, p.out_kind, h * p.out_stride + j0 + tid, outj + round_to<T>(m));
  }
  cluster.sync();  // (c) no block leaves (freeing its shared memory) while a peer may still read it
}

// One cluster of `slices` blocks per head and row (grid slices x H x batch). A launch error is left for the caller's
// cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK in host/gdn_decode.cpp).
void launch_clusters(void (*kernel)(GdnDecodeParams), unsigned slices, unsigned threads, const GdnDecodeParams& p,
                     cudaStream_t stream) {
  (void)launch_ex(kernel, dim3(slices, static_cast<unsigned>(p.H), static_cast<unsigned>(p.batch)), dim3(threads), 0,
                  stream, decode_pdl_on(), slices, p);
}

template <typename T, typename TP, int W>
void launch(const GdnDecodeParams& p, cudaStream_t stream) {
  const unsigned nsl = static_cast<unsigned>((p.Dv + W - 1) / W);  // <= 8
  launch_clusters(gdn_decode_kernel<T, TP, W>, nsl, kThreads, p, stream);
}

template <typename T, typename TP>
void launch_w(const GdnDecodeParams& p, cudaStream_t stream) {
  switch (gdn_slice_cols(p.Dv)) {
    case 8: launch<T, TP, 8>(p, stream); break;
    case 16: launch<T, TP, 16>(p, stream); break;
    default: launch<T, TP, 32>(p, stream);
  }
}

// ---------------------------------------------------------------------------------------------
// Fast path: compile-time DK, DV; a cluster of NS blocks of NT threads per head, W = DV / NS columns each.
// ---------------------------------------------------------------------------------------------
template <int DK, int DV, int NS, int NT, typename TP>
struct GdnFast {
  static constexpr int W = DV / NS;          // state columns = output columns of one block
  static constexpr int TX = W / 4;           // threads across the W columns (one float4 each)
  static constexpr int TY = NT / TX;         // state row lanes
  static constexpr int R = DK / TY;          // state rows per thread: rows ty + TY r
  static constexpr int NWARP = NT / 32;
  static constexpr int VE = 16 / static_cast<int>(sizeof(TP));  // o_proj values per 16-byte load
  static constexpr int VPR = W / VE;         // 16-byte loads per row of the o_proj column slice
  static constexpr int NV = DV * VPR / NT;   // o_proj rows per thread: rows tid / VPR + (NT / VPR) v
  static constexpr int QL = DK / 32, OL = DV / 32;  // q / k / o values per lane (whole vectors per warp)
  static_assert(NS >= 1 && NS <= kMaxSlices && DV % NS == 0 && W % 4 == 0, "slice");
  static_assert(32 % TX == 0 && NT % TX == 0 && DK % TY == 0 && R >= 1, "state mapping");
  static_assert(W % VE == 0 && 32 % VPR == 0 && NT % VPR == 0 && (DV * VPR) % NT == 0 && NV >= 1, "o_proj");
  static_assert(DK % 32 == 0 && DV % 32 == 0 && NT % 32 == 0 && W <= NT, "warps");
};

template <typename TP, int VE>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&w)[VE]) {
  const TP* e = reinterpret_cast<const TP*>(&raw);
#pragma unroll
  for (int i = 0; i < VE; ++i) w[i] = static_cast<float>(e[i]);
}

// T: q/k/v (model) dtype, TP: o_proj dtype.
template <typename T, typename TP, int DK, int DV, int NS, int NT>
__global__ void __launch_bounds__(NT) gdn_fast_kernel(const GdnDecodeParams p0) {
  pdl_wait();  // a no-op without PDL (AHN_RT_DECODE_PDL=0); everything below may need the previous kernel
  const GdnDecodeParams p = p0.row(blockIdx.z);  // grid z: row of a batched call
  using C = GdnFast<DK, DV, NS, NT, TP>;
  constexpr int W = C::W, TX = C::TX, TY = C::TY, R = C::R, NWARP = C::NWARP, VE = C::VE, VPR = C::VPR,
                NV = C::NV, QL = C::QL, OL = C::OL;
  __shared__ __align__(16) float s_red[2][NWARP][W];  // per-warp partial k.S' and q.S' of the W columns
  __shared__ __align__(16) float s_o[W];              // o of this block's columns (rounded to T): cluster-read
  __shared__ __align__(16) float s_m[NWARP][W];       // per-warp partial m of this block's output columns

  cg::cluster_group cluster = cg::this_cluster();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tx = tid % TX, ty = tid / TX;             // state mapping
  const int cgp = tid % VPR, wrow = tid / VPR;         // o_proj mapping
  const int h = blockIdx.y, j0 = static_cast<int>(blockIdx.x) * W;  // blockIdx.x == cluster rank
  const int kvh = h / static_cast<int>(p.H / p.Hkv);

  // ---- 0. the position alone, then every global load up front and independent of each other ----
  // No token left the window yet: nothing to do, and nothing read (the state, Dk x Dv floats of every head and
  // row, is the bulk of the kernel's bytes). The test depends on pos only, so it is the same for every thread
  // of a row's blocks, and no barrier has been reached: the row's clusters leave together. Testing first costs
  // the active path one dependent load (the position) before the others issue.
  if (*p.pos < p.sinks + p.window) return;
  float4* S = reinterpret_cast<float4*>(p.state + static_cast<int64_t>(h) * (DK * DV));
  float4 s[R];
#pragma unroll
  for (int r = 0; r < R; ++r) s[r] = S[(ty + TY * r) * (DV / 4) + j0 / 4 + tx];
  const TP* wo = static_cast<const TP*>(p.o_proj) + static_cast<int64_t>(h) * (DV * DV) + j0 + cgp * VE;
  uint4 wraw[NV];
#pragma unroll
  for (int v = 0; v < NV; ++v)
    wraw[v] = __ldg(reinterpret_cast<const uint4*>(wo + (wrow + (NT / VPR) * v) * DV));
  const T* qh = static_cast<const T*>(p.q) + h * p.q_stride;
  const T* kh = static_cast<const T*>(p.k) + kvh * p.k_stride;
  const T* vh = static_cast<const T*>(p.v) + kvh * p.v_stride + j0 + tx * 4;
  float qa[QL], ka[QL], qr[R], kr[R], vv[4], nw[NV];
#pragma unroll
  for (int l = 0; l < QL; ++l) {
    qa[l] = static_cast<float>(qh[lane + 32 * l]);
    ka[l] = static_cast<float>(kh[lane + 32 * l]);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    qr[r] = static_cast<float>(qh[ty + TY * r]);
    kr[r] = static_cast<float>(kh[ty + TY * r]);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) vv[e] = static_cast<float>(vh[e]);
#pragma unroll
  for (int v = 0; v < NV; ++v) nw[v] = load_kind(p.norm_weight, p.nw_kind, wrow + (NT / VPR) * v);
  const int64_t out_i = h * p.out_stride + j0 + tid;
  const float outj = tid < W ? load_kind(p.out, p.out_kind, out_i) : 0.f;
  const float decay = expf(load_kind(p.alpha, p.alpha_kind, h * p.alpha_stride));
  const float beta = load_kind(p.beta, p.beta_kind, h * p.beta_stride);
  const float zf = load_kind(p.z, p.z_kind, h * p.z_stride);

  // ---- 1. l2norm(q) * Dk^-0.5 and l2norm(k) as x / (||x|| + 1e-6) (fla fused_recurrent, docs/semantics.md §5),
  //         every warp over the whole vectors (no block barrier), and q.k of the normalized vectors ----
  float tq = 0.f, tk = 0.f;
#pragma unroll
  for (int l = 0; l < QL; ++l) {
    tq = fmaf(qa[l], qa[l], tq);
    tk = fmaf(ka[l], ka[l], tk);
  }
  const float qn = sqrtf(warp_sum(tq)) + 1e-6f, kn = sqrtf(warp_sum(tk)) + 1e-6f;
  const float scale = 1.f / sqrtf(static_cast<float>(DK));
  float tqk = 0.f;
#pragma unroll
  for (int l = 0; l < QL; ++l) tqk = fmaf(qa[l] / qn * scale, ka[l] / kn, tqk);
  const float qk = warp_sum(tqk);

  // ---- 2. S' = exp(alpha) S; a = S'^T k and b = S'^T q in one reduction over the Dk rows ----
  float a[4] = {0.f, 0.f, 0.f, 0.f}, b[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int r = 0; r < R; ++r) {
    qr[r] = qr[r] / qn * scale;
    kr[r] = kr[r] / kn;
    float* sr = reinterpret_cast<float*>(&s[r]);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sr[e] *= decay;
      a[e] = fmaf(kr[r], sr[e], a[e]);
      b[e] = fmaf(qr[r], sr[e], b[e]);
    }
  }
#pragma unroll
  for (int o = TX; o < 32; o <<= 1)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      a[e] += __shfl_xor_sync(0xffffffffu, a[e], o);
      b[e] += __shfl_xor_sync(0xffffffffu, b[e], o);
    }
  if (lane < TX) {
    *reinterpret_cast<float4*>(&s_red[0][warp][lane * 4]) = make_float4(a[0], a[1], a[2], a[3]);
    *reinterpret_cast<float4*>(&s_red[1][warp][lane * 4]) = make_float4(b[0], b[1], b[2], b[3]);
  }
  __syncthreads();

  // ---- 3. u = beta (v - a); S'' = S' + k u^T (written back); o = S''^T q = b + u (q.k), rounded to T ----
  float u[4];
  {
    float4 at = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < NWARP; ++w) {
      const float4 t = *reinterpret_cast<const float4*>(&s_red[0][w][tx * 4]);
      at.x += t.x; at.y += t.y; at.z += t.z; at.w += t.w;
    }
    u[0] = beta * (vv[0] - at.x);
    u[1] = beta * (vv[1] - at.y);
    u[2] = beta * (vv[2] - at.z);
    u[3] = beta * (vv[3] - at.w);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float* sr = reinterpret_cast<float*>(&s[r]);
#pragma unroll
    for (int e = 0; e < 4; ++e) sr[e] = fmaf(kr[r], u[e], sr[e]);
    S[(ty + TY * r) * (DV / 4) + j0 / 4 + tx] = s[r];
  }
  if (tid < TX) {  // ty == 0, tx == tid
    float4 bt = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < NWARP; ++w) {
      const float4 t = *reinterpret_cast<const float4*>(&s_red[1][w][tid * 4]);
      bt.x += t.x; bt.y += t.y; bt.z += t.z; bt.w += t.w;
    }
    // o in q.dtype (gdn_recurrent_ref returns o.to(q.dtype)).
    *reinterpret_cast<float4*>(&s_o[tid * 4]) =
        make_float4(round_to<T>(fmaf(u[0], qk, bt.x)), round_to<T>(fmaf(u[1], qk, bt.y)),
                    round_to<T>(fmaf(u[2], qk, bt.z)), round_to<T>(fmaf(u[3], qk, bt.w)));
  }
  cluster.sync();  // every block's s_o is visible to the cluster

  // ---- 4. RMSNorm over all Dv columns of the head: every warp reads the whole o from the cluster and sums
  //         the squares in one fixed order (the same bits in every warp of every block) ----
  float ss = 0.f;
#pragma unroll
  for (int l = 0; l < OL; ++l) {
    const int i = lane + 32 * l;
    const float oi = cluster.map_shared_rank(s_o, i / W)[i % W];
    ss = fmaf(oi, oi, ss);
  }
  ss = warp_sum(ss);
  float ow[NV];
#pragma unroll
  for (int v = 0; v < NV; ++v) {
    const int i = wrow + (NT / VPR) * v;
    ow[v] = cluster.map_shared_rank(s_o, i / W)[i % W];
  }
  auto token = cluster.barrier_arrive();  // this block reads no peer's shared memory after this point
  const float rs = 1.f / sqrtf(ss / static_cast<float>(DV) + p.eps);
  const float sig = 1.f / (1.f + expf(-zf));

  // ---- 5. y_i = round_T(o_i * rs * w_i * z * sigmoid(z)); m_c = sum_i y_i round_T(Wo[i][c]) over all Dv
  //         rows i for this block's W output columns c ----
  float m[VE];
#pragma unroll
  for (int e = 0; e < VE; ++e) m[e] = 0.f;
#pragma unroll
  for (int v = 0; v < NV; ++v) {
    const float y = round_to<T>(ow[v] * rs * nw[v] * zf * sig);
    float wv[VE];
    unpack16<TP, VE>(wraw[v], wv);
#pragma unroll
    for (int e = 0; e < VE; ++e) m[e] = fmaf(y, round_to<T>(wv[e]), m[e]);
  }
#pragma unroll
  for (int o = VPR; o < 32; o <<= 1)
#pragma unroll
    for (int e = 0; e < VE; ++e) m[e] += __shfl_xor_sync(0xffffffffu, m[e], o);
  if (lane < VPR) {
#pragma unroll
    for (int e = 0; e < VE; ++e) s_m[warp][lane * VE + e] = m[e];
  }
  __syncthreads();
  // ---- 6. out[h][j0 + c] += round_T(m_c) ----
  if (tid < W) {
    float mc = 0.f;
#pragma unroll
    for (int w = 0; w < NWARP; ++w) mc += s_m[w][tid];
    store_kind(p.out, p.out_kind, out_i, outj + round_to<T>(mc));
  }
  cluster.barrier_wait(std::move(token));  // no block leaves while a peer may still read its s_o
}

template <typename T, typename TP, int DK, int DV, int NS, int NT>
void launch_fast(const GdnDecodeParams& p, cudaStream_t stream) {
  launch_clusters(gdn_fast_kernel<T, TP, DK, DV, NS, NT>, NS, NT, p, stream);
}

bool force_generic() {
  static const bool v = env_flag("AHN_RT_GDN_GENERIC");
  return v;
}

template <typename T, typename TP>
void launch_any(const GdnDecodeParams& p, cudaStream_t stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(p.state) % 16 == 0 && p.state_eb % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(p.o_proj) % 16 == 0;
  if (aligned && !force_generic()) {
    if (p.Dk == 128 && p.Dv == 128) return launch_fast<T, TP, 128, 128, 8, 256>(p, stream);
    if (p.Dk == 64 && p.Dv == 64) return launch_fast<T, TP, 64, 64, 4, 128>(p, stream);
  }
  launch_w<T, TP>(p, stream);
}

}  // namespace

template <typename T>
void gdn_decode_cuda(const GdnDecodeParams& p, void* stream) {
  // host/gdn_decode.cpp checked Dk, Dv <= 256 (generic kernel: shared arrays, kThreads and R).
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.op_kind) {
    case Kind::BF16: launch_any<T, c10::BFloat16>(p, s); break;
    case Kind::F16: launch_any<T, c10::Half>(p, s); break;
    default: launch_any<T, float>(p, s);
  }
}

template void gdn_decode_cuda<float>(const GdnDecodeParams&, void*);
template void gdn_decode_cuda<c10::BFloat16>(const GdnDecodeParams&, void*);
template void gdn_decode_cuda<c10::Half>(const GdnDecodeParams&, void*);

}  // namespace ahn_rt
