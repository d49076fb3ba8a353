// CUDA mamba2_decode kernels and their launcher: the Mamba2 memory step for one decoded token in two
// launches. Test: pytest -m cuda tests/test_ops.py -k mamba2; timing: bench/decode_latency.py --ahn-impl mamba2.
//
// Semantics: docs/semantics.md §11.2; reference: ahn_rt/ref.py mamba2_decode_ref.
//   1. mamba2_state_kernel, grid (column slices, H, rows): the columns of a head's state are independent
//      (M <- exp(dt A) M + dt k^ v^T is elementwise), so each block owns W state columns of one head: it
//      normalizes q and k (every warp over the whole vectors, no barrier), updates its slice in registers
//      and writes it back, reduces o = M^T q^ over the Dk rows, and stores o (rounded to T) to o_buf with
//      its slice's sum of squares of y = o * silu(z).
//   2. mamba2_out_kernel, grid (H, 32-column slices, rows): the RMSNorm spans all H * Dv values of y, so it
//      needs every head's o. Launched with programmatic dependent launch: each block loads its o_proj
//      columns, the norm weight, z and out while the state kernel still runs, then waits for it, sums its
//      partial sums of squares in one fixed order (the same bits in every block), forms y (rounded to T) and
//      adds round_T(y @ o_proj[h][:, cols]) to out.
// No counters or scratch that outlive a call (o_buf is the host's per-call allocation): nothing to reset
// between calls or graph replays. Both kernels are no-ops while pos < sinks + window (pos read on the device).
#include <cstdint>

#include <cuda_runtime.h>

#include "../common.h"
#include "launch.cuh"

namespace ahn_rt {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxD = 256;      // Dk, Dv <= 256 (host/mamba2_decode.cpp checks)
constexpr int kLanes = kMaxD / 32;
constexpr int kMaxSlices = static_cast<int>(kMamba2Slices);  // state kernel blocks per head (Dv / W <= 8)
constexpr int kRowsPerWarp = kMaxD / kWarps;   // output kernel: o_proj rows per warp

// F.normalize(x, eps=1e-12)'s divisor in dtype T, from the warp's sum of squares: the norm rounded to T,
// clamped to eps (rounded to T).
template <typename T>
__device__ __forceinline__ float l2_divisor(float sum_sq) {
  return fmaxf(round_to<T>(sqrtf(sum_sq)), round_to<T>(1e-12f));
}

// T: q/k/v (model) dtype; W: state columns per block.
template <typename T, int W>
__global__ void __launch_bounds__(kThreads) mamba2_state_kernel(const Mamba2DecodeParams p0) {
  const Mamba2DecodeParams p = p0.row(blockIdx.z);  // grid z: row of a batched call
  constexpr int TX = W / 4;                           // threads across the W columns (4 each)
  constexpr int TY = kThreads / TX;                   // state row lanes
  constexpr int R = (kMaxD + TY - 1) / TY;            // rows per thread: ty + TY r
  __shared__ __align__(16) float s_red[kWarps][W];
  pdl_launch_dependents();  // the output kernel may start now: it preloads what this kernel does not write
  if (*p.pos < p.sinks + p.window) return;  // no token left the window: the same for the whole grid

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, tx = tid % TX, ty = tid / TX;
  const int64_t h = blockIdx.y, Dk = p.Dk, Dv = p.Dv;
  const int64_t kvh = h / (p.H / p.Hkv);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * W + tx * 4;
  float* S = p.state + h * Dk * Dv;
  const bool vec = reinterpret_cast<uintptr_t>(S) % 16 == 0 && Dv % 4 == 0 && col + 4 <= Dv;

  // ---- every global load up front ----
  float s[R][4];
  load_state_rows<R, TY>(S, Dk, Dv, col, ty, vec, s);
  const T* qh = static_cast<const T*>(p.q) + h * p.q_stride;
  const T* kh = static_cast<const T*>(p.k) + kvh * p.k_stride;
  const T* vh = static_cast<const T*>(p.v) + kvh * p.v_stride;
  float qq = 0.f, kk = 0.f;
#pragma unroll
  for (int l = 0; l < kLanes; ++l) {
    const int64_t i = lane + 32 * l;
    if (i < Dk) {
      const float qv = static_cast<float>(qh[i]), kv = static_cast<float>(kh[i]);
      qq = fmaf(qv, qv, qq);
      kk = fmaf(kv, kv, kk);
    }
  }
  float qr[R], kr[R], vv[4];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = ty + TY * r;
    qr[r] = i < Dk ? static_cast<float>(qh[i]) : 0.f;
    kr[r] = i < Dk ? static_cast<float>(kh[i]) : 0.f;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) vv[e] = col + e < Dv ? static_cast<float>(vh[col + e]) : 0.f;
  const float dt = load_kind(p.dt, p.dt_kind, h * p.dt_stride);
  const float a = -expf(load_kind(p.a_log, p.a_log_kind, h));

  // ---- q^ = q / |q|, k^ = k / |k| in T (every warp over the whole vectors: no barrier) ----
  const float qn = l2_divisor<T>(warp_sum(qq)), kn = l2_divisor<T>(warp_sum(kk));
  const float decay = expf(__fmul_rn(dt, a));

  // ---- M' = exp(dt A) M + (dt k^) v^T, each product and the sum rounded once as torch does; o = M'^T q^ ----
  float o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = ty + TY * r;
    if (i < Dk) {
      const float qhat = round_to<T>(qr[r] / qn), dk = __fmul_rn(dt, round_to<T>(kr[r] / kn));
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[r][e] = __fadd_rn(__fmul_rn(s[r][e], decay), __fmul_rn(dk, vv[e]));
        o[e] = fmaf(qhat, s[r][e], o[e]);
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
  // Sum over the row lanes: lanes with equal tx are TX apart in a warp, then over the warps in order.
#pragma unroll
  for (int off = TX; off < 32; off <<= 1)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] += __shfl_xor_sync(0xffffffffu, o[e], off);
  if (lane < TX) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s_red[warp][lane * 4 + e] = o[e];
  }
  __syncthreads();
  // o in q.dtype (mamba2_recurrent_ref returns q.dtype) and this slice's sum of squares of y = o * silu(z)
  // (warp 0; W <= 32), for the output kernel's RMSNorm over every head.
  if (warp == 0) {
    const int64_t c = static_cast<int64_t>(blockIdx.x) * W + lane;
    float y = 0.f;
    if (lane < W && c < Dv) {
      float t = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) t += s_red[w][lane];
      const float oc = round_to<T>(t);
      p.o_buf[h * Dv + c] = oc;
      const float z = load_kind(p.z, p.z_kind, h * p.z_stride);
      y = oc * (z * (1.f / (1.f + expf(-z))));
    }
    const float ss = warp_sum(y * y);
    float* parts = p.o_buf + p.H * Dv + h * kMaxSlices;
    if (lane == 0) parts[blockIdx.x] = ss;
    if (blockIdx.x == 0 && lane >= gridDim.x && lane < kMaxSlices) parts[lane] = 0.f;  // slices this Dv lacks
  }
}

// out[t] = w[base + warp + kWarps t] for the rows below n (else 0), every load issued together.
template <typename TW>
__device__ __forceinline__ void load_rows(const void* w, int64_t base, int64_t n, int warp, float (&out)[kRowsPerWarp]) {
  const TW* p = static_cast<const TW*>(w) + base;
#pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
    const int64_t i = warp + kWarps * t;
    out[t] = i < n ? static_cast<float>(p[i]) : 0.f;
  }
}

// T: model dtype, TP: o_proj dtype. Grid (H, column slices of 32, rows).
template <typename T, typename TP>
__global__ void __launch_bounds__(kThreads) mamba2_out_kernel(const Mamba2DecodeParams p0) {
  const Mamba2DecodeParams p = p0.row(blockIdx.z);  // grid z: row of a batched call
  __shared__ float s_m[kWarps][32];
  if (*p.pos < p.sinks + p.window) return;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t h = blockIdx.x, Dv = p.Dv, H = p.H;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * 32 + lane;  // this lane's output column
  const bool cv = c < Dv;
  // ---- before the state kernel finishes (PDL): every load of what it does not write — the o_proj column
  //      slice (rows warp + 8 t), the norm weight of those rows, the gate, out ----
  const TP* wo = static_cast<const TP*>(p.o_proj) + h * Dv * Dv;
  float wr[kRowsPerWarp], orow[kRowsPerWarp], nw[kRowsPerWarp];
#pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
    const int64_t i = warp + kWarps * t;
    wr[t] = i < Dv && cv ? static_cast<float>(wo[i * Dv + c]) : 0.f;
  }
  // The norm weight's dtype is switched on once, outside the unrolled loads (a switch per load would split
  // them into separate branches that are not issued together).
  switch (p.nw_kind) {
    case Kind::BF16: load_rows<c10::BFloat16>(p.norm_weight, h * Dv, Dv, warp, nw); break;
    case Kind::F16: load_rows<c10::Half>(p.norm_weight, h * Dv, Dv, warp, nw); break;
    default: load_rows<float>(p.norm_weight, h * Dv, Dv, warp, nw);
  }
  const float z = load_kind(p.z, p.z_kind, h * p.z_stride);
  const int64_t out_i = h * p.out_stride + c;
  const float outc = tid < 32 && cv ? load_kind(p.out, p.out_kind, out_i) : 0.f;
  // ---- then the state kernel's results: o of this head's rows and the per-(head, slice) sums of squares ----
  pdl_wait();
  load_rows<float>(p.o_buf, h * Dv, Dv, warp, orow);
  // sum of squares of y = o * silu(z) over all H * Dv values: the partials of every (head, slice), summed by
  // every warp in one fixed order (lane l takes partials l, l + 32, ...; then a fixed shuffle tree), so
  // every block gets the same bits
  const int64_t nparts = H * kMaxSlices;
  const float* parts = p.o_buf + H * Dv;
  float ss = 0.f;
#pragma unroll 4
  for (int64_t e = lane; e < nparts; e += 32) ss += parts[e];
  ss = warp_sum(ss);
  const float rs = 1.f / sqrtf(ss / static_cast<float>(H * Dv) + p.eps);
  const float g = z * (1.f / (1.f + expf(-z)));

  // ---- m_c = sum_i y_i round_T(Wo[i][c]), y_i = round_T(o_i g rs w_i); rows by warp, then the warps in order ----
  float acc = 0.f;
#pragma unroll
  for (int t = 0; t < kRowsPerWarp; ++t) {
    const float y = round_to<T>(orow[t] * g * rs * nw[t]);
    acc = fmaf(y, round_to<T>(wr[t]), acc);
  }
  s_m[warp][lane] = acc;
  __syncthreads();
  if (tid < 32 && cv) {
    float m = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m += s_m[w][tid];
    store_kind(p.out, p.out_kind, out_i, outc + round_to<T>(m));
  }
}

template <typename T, int W>
void launch_state(const Mamba2DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.Dv + W - 1) / W), static_cast<unsigned>(p.H),
                  static_cast<unsigned>(p.batch));
  // Without PDL: the output kernel, which this one lets start at once, reads the attention output (the
  // previous kernel's) before its pdl_wait, so this kernel must start after that one has finished.
  (void)launch_ex(mamba2_state_kernel<T, W>, grid, dim3(kThreads), 0, stream, false, 0, p);
}

template <typename T, typename TP>
void launch(const Mamba2DecodeParams& p, cudaStream_t stream) {
  switch (gdn_slice_cols(p.Dv)) {  // 8, 16 or 32 columns per block: Dv / W <= 8 blocks per head
    case 8: launch_state<T, 8>(p, stream); break;
    case 16: launch_state<T, 16>(p, stream); break;
    default: launch_state<T, 32>(p, stream);
  }
  // The output kernel with programmatic dependent launch: it preloads o_proj and its other inputs while the
  // state kernel runs and waits (pdl_wait) only for o and the sums of squares.
  (void)launch_ex(mamba2_out_kernel<T, TP>,
                  dim3(static_cast<unsigned>(p.H), static_cast<unsigned>((p.Dv + 31) / 32), static_cast<unsigned>(p.batch)),
                  dim3(kThreads), 0, stream, true, 0, p);  // errors: the host's launch check
}

}  // namespace

template <typename T>
void mamba2_decode_cuda(const Mamba2DecodeParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.op_kind) {
    case Kind::BF16: launch<T, c10::BFloat16>(p, s); break;
    case Kind::F16: launch<T, c10::Half>(p, s); break;
    default: launch<T, float>(p, s);
  }
}

template void mamba2_decode_cuda<float>(const Mamba2DecodeParams&, void*);
template void mamba2_decode_cuda<c10::BFloat16>(const Mamba2DecodeParams&, void*);
template void mamba2_decode_cuda<c10::Half>(const Mamba2DecodeParams&, void*);

}  // namespace ahn_rt
