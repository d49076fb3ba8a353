// CUDA fused decode GEMV kernels (ahn_rt.gemv: B >= 1 rows, i.e. one token of each of B sequences) and
// their launchers. Test: pytest -m cuda tests/test_gemv.py; timing: python bench/gemv_bench.py (on a GPU).
//
// bf16 / fp16: the tensor-core kernel (mma.sync m16n8k16, fp32 accumulate; its section below). A block owns
// 16 output rows (a silu_mul block: 16 gate rows and their 16 up rows) and all B <= 32 sequences; its warps
// split K into fixed slices of 32-column chunks; each lane's 16 bytes of a row (8 consecutive k) feed two
// mma steps under one fixed k permutation that x uses too; the warps' partial sums are added in warp order.
// Batch invariance: an mma output column depends on its own column of x alone, and the chunk split depends
// on the shape alone, so a (row, sequence) value is the same sum in the same order whatever B is.
// fp32, and bf16 / fp16 with AHN_RT_GEMV_SIMT=1 (an A/B switch for benchmarks): the SIMT kernel (CUDA-core
// FMAs, whole rows per warp; its comment says how the order of every sum is fixed by K alone). It is
// faster at B = 1 and slower at B >= 8 than the tensor-core kernel (bench/gemv_notes.md).
// K % (16 / sizeof(T)) != 0 or a misaligned weight / x takes element-wise loads into the same vectors.
// x_add (GemvParams::x_add, never with norm_weight or silu_mul): both kernels have an XADD instance that adds it
// to x as x is loaded (x_eff = T(float(x) + float(x_add)), element-wise, so every sum keeps its order); the
// default instances (XADD false) are the kernels without it, instantiated and dispatched as before.
// Measurements and tried variants: bench/gemv_notes.md.
#include <cstdint>
#include <type_traits>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common.h"
#include "launch.cuh"

namespace ahn_rt {
namespace {

template <typename T> struct VecOf { static constexpr int n = 16 / sizeof(T); };

// 16 bytes of weights that are read exactly once: skip L1 (read-only path) and ask L2 for 256-byte sectors.
__device__ __forceinline__ uint4 ld_stream(const uint4* ptr) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(ptr));
  return r;
}

// 16 bytes -> 16 / sizeof(T) floats.
template <typename T> __device__ __forceinline__ void unpack(const uint4& u, float* f);
template <> __device__ __forceinline__ void unpack<float>(const uint4& u, float* f) {
  f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y); f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
}
template <> __device__ __forceinline__ void unpack<c10::BFloat16>(const uint4& u, float* f) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 is the top half of a float: element 2i is the low 16 bits
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
template <> __device__ __forceinline__ void unpack<c10::Half>(const uint4& u, float* f) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], 4);
    const float2 v = __half22float2(h);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

// 16 / sizeof(T) elements src[k ..] (element stride `stride`) as 16 bytes, zero at and past K. VECTOR: one
// 16-byte load (the caller checked alignment, unit stride and K % (16 / sizeof(T)) == 0); STREAM: ld_stream.
template <typename T, bool VECTOR, bool STREAM>
__device__ __forceinline__ uint4 load_vec(const T* src, int64_t stride, int64_t k, int64_t K) {
  constexpr int n = VecOf<T>::n;
  if constexpr (VECTOR) {
    if (k >= K) return make_uint4(0u, 0u, 0u, 0u);
    const uint4* ptr = reinterpret_cast<const uint4*>(src + k);
    if constexpr (STREAM) return ld_stream(ptr);
    else return __ldg(ptr);
  } else {
    T e[n];
#pragma unroll
    for (int i = 0; i < n; ++i) e[i] = k + i < K ? src[(k + i) * stride] : T(0.f);
    uint4 r;
    memcpy(&r, e, 16);
    return r;
  }
}

// ---------------------------------------------------------------------------------------------
// SIMT kernel (every dtype), 1 .. kGemvMaxRows sequences per launch.
// ---------------------------------------------------------------------------------------------
// The summation order of one (row, sequence) value, fixed by K alone: lane l of the row's warp takes the
// 16-byte vectors v = l, l + 32, l + 64, ... of the row in that order; each vector's products are one fma
// chain (element 0 first) added to the lane's sum; the 32 lane sums meet in the xor butterfly of warp_sum
// (16, 8, 4, 2, 1). How many rows a warp owns (R), how many vectors per lane are in flight (U), how many
// sequences a launch holds (NB) and how much of x a block stages at a time change none of that, so every
// B gets the same bits for a sequence: batch invariance by construction. The bits do change with K.
//
// A warp owns R whole rows (with silu_mul R / 2 gate rows and their up rows), streams them with 16-byte
// non-allocating loads (a warp instruction reads 512 contiguous bytes of a row), two groups of U vectors
// per lane in flight; x of every sequence (RMS-normalized first when asked, rounded to T as rms_norm_ref)
// is staged in shared memory as T, a K piece at a time when all of it does not fit kSimtXsBytes. Persistent
// grid: every warp runs the same number of row tasks.
constexpr int kSimtWarps = 8;
constexpr int kSimtThreads = 32 * kSimtWarps;
constexpr int64_t kSimtXsBytes = 64 * 1024;

// One level of the transposing warp reduction: C groups of G values per lane. While more than one group
// is left, each lane sends the half it gives up and adds its partner's copy of the half it keeps; then the
// plain butterfly. Every value meets its 31 partners in warp_sum's order (16, 8, 4, 2, 1), and + commutes,
// so each sum has warp_sum's bits; afterwards lane l holds groups base .. base + max(C / 32, 1) - 1.
template <int O, int C, int G, int N>
__device__ __forceinline__ void xpose_sum(float (&a)[N], int lane, int& base) {
  if constexpr (O > 0) {
    if constexpr (C > 1) {
      constexpr int H = C / 2;
      const bool up = (lane & O) != 0;
#pragma unroll
      for (int i = 0; i < H * G; ++i) {
        const float send = up ? a[i] : a[i + H * G];
        const float keep = up ? a[i + H * G] : a[i];
        a[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
      }
      if (up) base += H;
      xpose_sum<O / 2, H, G, N>(a, lane, base);
    } else {
#pragma unroll
      for (int i = 0; i < G; ++i) a[i] += __shfl_xor_sync(0xffffffffu, a[i], O);
      xpose_sum<O / 2, 1, G, N>(a, lane, base);
    }
  }
}

template <typename T, bool SILU, int R, int U, int NB, bool WVEC, int MINB, bool XADD>
__global__ void __launch_bounds__(kSimtThreads, MINB) gemv_simt_kernel(const GemvParams p, const int pv,
                                                                       const int rounds) {
  constexpr int VEC = VecOf<T>::n;
  constexpr int P = SILU ? R / 2 : R;  // outputs per task
  constexpr int GV = 32 * U;           // vectors per weight group (all lanes)
  static_assert(!SILU || R % 2 == 0, "silu_mul tasks hold gate and up rows in pairs");
  static_assert(!(XADD && SILU), "x_add is not taken with silu_mul");
  extern __shared__ uint4 xs[];        // [B][pv] vectors of x (of the current K piece)
  __shared__ float rs_s[NB];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t K = p.K, B = p.rows;
  const int64_t nvec = (K + VEC - 1) / VEC, ngroups = (nvec + GV - 1) / GV;
  const int gpp = pv / GV;             // groups per piece
  const bool multi = ngroups > gpp;    // x is staged piece by piece, for every task again
  const int64_t limit = SILU ? p.N_out : p.N;
  const int64_t ntasks = (limit + P - 1) / P;
  const int64_t tstride = static_cast<int64_t>(gridDim.x) * kSimtWarps;
  const int64_t task0 = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp;
  pdl_launch_dependents();

  const T* W = static_cast<const T*>(p.weight);
  // Row r of a task (clamped: loads stay in bounds; clamped rows are never stored).
  auto row_of = [&](int64_t task, int r) -> int64_t {
    if constexpr (SILU) return std::min<int64_t>(task * P + r % P, limit - 1) + (r >= P ? p.N_out : 0);
    else return std::min<int64_t>(task * R + r, limit - 1);
  };
  uint4 wa[R][U], wb[R][U];
  auto issue = [&](uint4 (&w)[R][U], int64_t task, int64_t grp) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const T* row = W + row_of(task, r) * K;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = grp * GV + u * 32 + lane;
        w[r][u] = v < nvec ? load_vec<T, WVEC, true>(row, 1, v * VEC, K) : make_uint4(0u, 0u, 0u, 0u);
      }
    }
  };
  // Weights never depend on earlier kernels: start streaming before waiting on them (with PDL).
  if (task0 < ntasks && ngroups > 0) issue(wa, task0, 0);
  pdl_wait();

  const T* X = static_cast<const T*>(p.x);
  // XADD: x_add has x's strides; never with norm_weight (the host refuses it), so the norm path compiles out.
  const T* XA = static_cast<const T*>(p.x_add);
  const T* nw = XADD ? nullptr : static_cast<const T*>(p.norm_weight);
  const bool x_vec = p.x_stride == 1 && (reinterpret_cast<uintptr_t>(X) & 15) == 0 && K % VEC == 0 &&
                     (B == 1 || p.x_row_stride % VEC == 0) &&
                     (nw == nullptr || (p.nw_stride == 1 && (reinterpret_cast<uintptr_t>(nw) & 15) == 0)) &&
                     (!XADD || (reinterpret_cast<uintptr_t>(XA) & 15) == 0);
  auto x_at = [&](const T* src, int64_t stride, int64_t k) {
    return x_vec ? load_vec<T, true, false>(src, 1, k, K) : load_vec<T, false, false>(src, stride, k, K);
  };
  if (nw != nullptr && K > 0) {
    // rs[b] = 1 / sqrt(mean(x[b]^2) + eps): sequence b is summed by one warp in one fixed order.
    for (int64_t b = warp; b < B; b += kSimtWarps) {
      const T* xb = X + b * p.x_row_stride;
      float ss = 0.f;
#pragma unroll 4
      for (int64_t v = lane; v < nvec; v += 32) {
        float f[VEC];
        unpack<T>(x_at(xb, p.x_stride, v * VEC), f);
#pragma unroll
        for (int e = 0; e < VEC; ++e) ss = fmaf(f[e], f[e], ss);
      }
      ss = warp_sum(ss);
      if (lane == 0) rs_s[b] = 1.f / sqrtf(ss / static_cast<float>(K) + p.norm_eps);
    }
    __syncthreads();
  }
  // x vectors [piece * pv, piece * pv + pv) of every sequence into xs (normalized: nw * round(x * rs); XADD:
  // round(x + x_add)).
  auto stage = [&](int64_t piece) {
    const int64_t v0 = piece * pv;
    const int n = static_cast<int>(std::min<int64_t>(pv, nvec - v0));
    for (int i = threadIdx.x; i < static_cast<int>(B) * n; i += kSimtThreads) {
      const int b = i / n, j = i - b * n;
      const int64_t k = (v0 + j) * VEC;
      uint4 r = x_at(X + b * p.x_row_stride, p.x_stride, k);
      if constexpr (XADD) {
        float xf[VEC], af[VEC];
        unpack<T>(r, xf);
        unpack<T>(x_at(XA + b * p.x_row_stride, p.x_stride, k), af);
        T o[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[e] = T(xf[e] + af[e]);
        memcpy(&r, o, 16);
      }
      if (nw != nullptr) {
        float xf[VEC], nf[VEC];
        unpack<T>(r, xf);
        unpack<T>(x_at(nw, p.nw_stride, k), nf);
        const float rs = rs_s[b];
        T o[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[e] = T(nf[e] * round_to<T>(xf[e] * rs));
        memcpy(&r, o, 16);
      }
      xs[static_cast<int64_t>(b) * pv + j] = r;
    }
  };
  if (!multi) stage(0);
  __syncthreads();

  float acc[R][NB];
  // The products of weight group `grp` (in w) with every sequence's x, vector by vector in order.
  auto consume = [&](const uint4 (&w)[R][U], int64_t grp) {
    const int64_t v0 = multi ? grp / gpp * pv : 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = grp * GV + u * 32 + lane;
      if (v < nvec) {
        float wf[R][VEC];
#pragma unroll
        for (int r = 0; r < R; ++r) unpack<T>(w[r][u], wf[r]);
        const uint4* xv = xs + (v - v0);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          if (b < B) {
            float xf[VEC];
            unpack<T>(xv[static_cast<int64_t>(b) * pv], xf);
#pragma unroll
            for (int r = 0; r < R; ++r) {
              float s = wf[r][0] * xf[0];
#pragma unroll
              for (int e = 1; e < VEC; ++e) s = fmaf(wf[r][e], xf[e], s);
              acc[r][b] += s;
            }
          }
        }
      }
    }
  };
  auto piece_edge = [&](int64_t grp) {  // block-uniform: every warp runs the same groups and rounds
    if (multi && grp % gpp == 0) {
      __syncthreads();
      stage(grp / gpp);
      __syncthreads();
    }
  };

  const T* bias = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  for (int round = 0; round < rounds; ++round) {
    const int64_t task = task0 + static_cast<int64_t>(round) * tstride;
    const bool have = task < ntasks;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int b = 0; b < NB; ++b) acc[r][b] = 0.f;
    // Group g is multiplied while g + 1 streams (buffers wa, wb in turn; wa holds group 0 on entry).
    for (int64_t grp = 0; grp < ngroups; grp += 2) {
      piece_edge(grp);
      if (have && grp + 1 < ngroups) issue(wb, task, grp + 1);
      if (have) consume(wa, grp);
      if (grp + 1 < ngroups) {
        piece_edge(grp + 1);
        if (have && grp + 2 < ngroups) issue(wa, task, grp + 2);
        if (have) consume(wb, grp + 1);
      }
    }
    // The next task's first group streams while this one is reduced and stored.
    if (task + tstride < ntasks && ngroups > 0) issue(wa, task + tstride, 0);
    if (!have) continue;

    // Values: NG groups of G (silu: the gate and up sums of one output) per (output, sequence).
    constexpr int G = SILU ? 2 : 1, NG = P * NB;
    float a[NG * G];
#pragma unroll
    for (int i = 0; i < P; ++i)
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        a[(i * NB + b) * G] = acc[i][b];
        if constexpr (SILU) a[(i * NB + b) * G + 1] = acc[P + i][b];
      }
    int base = 0;
    xpose_sum<16, NG, G, NG * G>(a, lane, base);
    constexpr int HELD = NG >= 32 ? NG / 32 : 1;  // groups per lane; below 32, 32 / NG lanes share each
    if (NG < 32 && (lane & (32 / NG - 1)) != 0) continue;
#pragma unroll
    for (int c = 0; c < HELD; ++c) {
      const int q = base + c, i = q / NB, b = q % NB;
      const int64_t o = task * P + i;
      if (b >= B || o >= limit) continue;
      float y = a[c * G];
      if (bias != nullptr) y += static_cast<float>(bias[o * p.bias_stride]);
      if constexpr (SILU) {
        float yu = a[c * G + 1];
        if (bias != nullptr) yu += static_cast<float>(bias[(o + p.N_out) * p.bias_stride]);
        y = y / (1.f + expf(-y)) * yu;
      }
      if (res != nullptr) y = static_cast<float>(res[b * p.res_row_stride + o * p.res_stride]) + y;
      if (p.out_float)
        static_cast<float*>(p.out)[b * p.N_out + o] = y;
      else
        static_cast<T*>(p.out)[b * p.N_out + o] = T(y);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel (bf16 / fp16), B <= 32 sequences per launch.
// ---------------------------------------------------------------------------------------------
// Blocks of 8 warps, or of 16 when the row tiles (no SiLU pairs) are no more than the SMs (o_proj and down
// of a 3B layer have 128: at 8 warps per tile that is half a wave of 8-warp blocks, with the SMs idle on
// loads; a 16-warp block at up to 128 registers still fits an SM). Warps that split K for one row tile
// (1, 2, 4, 8 or 16): the fewest that still give about kMmaTargetWarps warps in all, and at most two for
// the SiLU pair tiles of gate_up (measured no slower at batch 1 and faster at batch 16). Both depend on the
// shape and the device alone (never on B), so a row's summation order does too.
constexpr int kMmaWarps = 8;
constexpr int kMmaWideWarps = 16;
constexpr int64_t kMmaTargetWarps = 4096;
inline int mma_block_warps(int64_t tiles, int mt) {
  return mt == 1 && tiles * kMmaWarps < kMmaTargetWarps && tiles <= device_info().sms ? kMmaWideWarps : kMmaWarps;
}
inline int mma_split(int64_t tiles, int warps) {
  int ks = 1;
  while (ks < warps && tiles * ks < kMmaTargetWarps) ks *= 2;
  return ks;
}

// d += a (16 x 16, row) * b (16 x 8, col), fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// A task is 16 output rows; MT row tiles (2 with silu_mul: gate, up), NT column tiles of 8 sequences, U
// chunks of 32 k per warp in flight, WVEC: 16-byte weight loads, WARPS: warps per block. A block runs
// WARPS / ks tasks, ks warps each (warp w: task w / ks, K slice w % ks).
// xs_vs > 0: the block first stages x of every sequence (RMS-normalized when asked) in shared memory, rows of
// xs_vs 16-byte vectors (zero past K), and the mma steps read it there; 0: each warp loads (and normalizes)
// its own x from L1 / L2 as it goes. Same values either way, so the same bits.
// XADD (MT == 1, no norm_weight): x_vector adds x_add to x as it loads it.
// EARLY (batch 1): the second weight buffer is issued before the RMS prologue and the x staging too.
template <typename T, int MT, int NT, int U, bool WVEC, int WARPS, bool XADD, bool EARLY>
__global__ void __launch_bounds__(32 * WARPS, 16 / WARPS) gemv_mma_kernel(const GemvParams p, const int ks,
                                                                          const int xs_vs) {
  static_assert(!XADD || MT == 1, "x_add is not taken with silu_mul");
  constexpr int kBlock = 32 * WARPS;
  __shared__ float part[WARPS][MT][16][8 * NT];
  extern __shared__ uint4 xs[];  // [B][xs_vs] when staged
  __shared__ float rs_s[8 * NT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t K = p.K, B = p.rows;
  const int64_t limit = p.silu_mul ? p.N_out : p.N;  // outputs (rows of tile 0)
  const int tpb = WARPS / ks;  // tasks per block
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) * tpb + warp / ks) * 16;  // this warp's first row
  const int64_t nch = (K + 31) / 32, cpw = (nch + ks - 1) / ks;
  const int64_t c_begin = std::min<int64_t>(nch, (warp % ks) * cpw), c_end = std::min<int64_t>(nch, c_begin + cpw);
  pdl_launch_dependents();

  const T* W = static_cast<const T*>(p.weight);
  const T* wrow[MT][2];  // this lane's rows g and g + 8 of each tile (clamped: loads stay in bounds)
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      wrow[m][h] = W + (std::min<int64_t>(i0 + g + 8 * h, limit - 1) + m * p.N_out) * K;

  // Two register buffers of U chunks: the loads of one group are in flight while the other is multiplied.
  uint4 wa[U][MT][2], wb[U][MT][2];
  auto issue = [&](uint4 (&wv)[U][MT][2], int64_t c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = (c + u) * 32 + 8 * t;
      const bool in = c + u < c_end;
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          wv[u][m][h] = in ? load_vec<T, WVEC, true>(wrow[m][h], 1, k, K) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  // Weights never depend on earlier kernels: start streaming before waiting on them (with PDL). EARLY: both
  // buffers start before the RMS prologue and the x staging, so that those run under two groups' loads
  // (measured faster at batch 1, slower at batch 8 and 16: bench/gemv_notes.md). The same loads in the same
  // order either way, so the same bits.
  if (c_begin < c_end) issue(wa, c_begin);
  if (EARLY && c_begin + U < c_end) issue(wb, c_begin + U);
  pdl_wait();

  const T* X = static_cast<const T*>(p.x);
  // XADD: x_add has x's strides; never with norm_weight (the host refuses it), so the norm path compiles out.
  const T* XA = static_cast<const T*>(p.x_add);
  const T* nw = XADD ? nullptr : static_cast<const T*>(p.norm_weight);
  const bool x_vec = p.x_stride == 1 && (reinterpret_cast<uintptr_t>(X) & 15) == 0 && K % 8 == 0 &&
                     (B == 1 || p.x_row_stride % 8 == 0) &&
                     (nw == nullptr || (p.nw_stride == 1 && (reinterpret_cast<uintptr_t>(nw) & 15) == 0)) &&
                     (!XADD || (reinterpret_cast<uintptr_t>(XA) & 15) == 0);
  if (nw != nullptr) {
    // rs[b] = 1 / sqrt(mean(x[b]^2) + eps): sequence b is summed by one warp in one fixed order (the loads
    // of four steps in flight at once: unrolling does not change the order).
    for (int64_t b = warp; b < B; b += WARPS) {
      const T* xb = X + b * p.x_row_stride;
      float ss = 0.f;
#pragma unroll 4
      for (int64_t k = 8 * lane; k < K; k += 256) {  // lane: 8 consecutive k at a time, in k order
        const uint4 r = x_vec ? load_vec<T, true, false>(xb, 1, k, K) : load_vec<T, false, false>(xb, p.x_stride, k, K);
        float f[8];
        unpack<T>(r, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss = fmaf(f[e], f[e], ss);
      }
      ss = warp_sum(ss);
      if (lane == 0) rs_s[b] = 1.f / sqrtf(ss / static_cast<float>(K) + p.norm_eps);
    }
    __syncthreads();
  }
  // x of sequence b, the 8 k from k on (k < K), as the mma steps take it: xn = nw * round(x * rs), rounded
  // to T as rms_norm_ref, when normalizing; XADD: round(x + x_add).
  auto x_vector = [&](int64_t b, int64_t k) -> uint4 {
    const T* xb = X + b * p.x_row_stride;
    uint4 r = x_vec ? load_vec<T, true, false>(xb, 1, k, K) : load_vec<T, false, false>(xb, p.x_stride, k, K);
    if constexpr (XADD) {
      const T* ab = XA + b * p.x_row_stride;
      const uint4 a = x_vec ? load_vec<T, true, false>(ab, 1, k, K) : load_vec<T, false, false>(ab, p.x_stride, k, K);
      float xf[8], af[8];
      unpack<T>(r, xf);
      unpack<T>(a, af);
      T o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = T(xf[e] + af[e]);
      r = make_uint4(pack2(o[0], o[1]), pack2(o[2], o[3]), pack2(o[4], o[5]), pack2(o[6], o[7]));
    }
    if (nw != nullptr) {
      const uint4 wn = x_vec ? load_vec<T, true, false>(nw, 1, k, K) : load_vec<T, false, false>(nw, p.nw_stride, k, K);
      float xf[8], nf[8];
      unpack<T>(r, xf);
      unpack<T>(wn, nf);
      const float rs = rs_s[b];
      T o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = T(nf[e] * round_to<T>(xf[e] * rs));
      r = make_uint4(pack2(o[0], o[1]), pack2(o[2], o[3]), pack2(o[4], o[5]), pack2(o[6], o[7]));
    }
    return r;
  };
  if (xs_vs > 0) {
    const int64_t nv = nch * 4;  // vectors of a staged row: whole chunks, zero past K
    for (int64_t i = threadIdx.x; i < B * nv; i += kBlock) {
      const int64_t b = i / nv, v = i % nv;
      xs[b * xs_vs + v] = 8 * v < K ? x_vector(b, 8 * v) : make_uint4(0u, 0u, 0u, 0u);
    }
    __syncthreads();
  }

  float acc[MT][NT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.f;

  // x of chunk group c (from L1 / L2), then the mma steps of the group's weights in `wv`, chunk by chunk.
  auto consume = [&](const uint4 (&wv)[U][MT][2], int64_t c) {
    uint4 xv[U][NT];  // column g of tile n: sequence n * 8 + g, this lane's 8 k of chunk c + u
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = (c + u) * 32 + 8 * t;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int64_t b = n * 8 + g;
        uint4 r = make_uint4(0u, 0u, 0u, 0u);
        if (b < B && c + u < c_end) {
          if (xs_vs > 0) r = xs[b * xs_vs + (c + u) * 4 + t];
          else if (k < K) r = x_vector(b, k);
        }
        xv[u][n] = r;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (c + u < c_end) {
        // k permutation: lane (g, t) holds k = 8t .. 8t+7 of the chunk; step s takes 8t+4s .. 8t+4s+3 as the
        // fragment's k {2t, 2t+1, 2t+8, 2t+9}, for A (rows g, g+8) and B (column g) alike.
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const uint4& lo = wv[u][m][0];
          const uint4& hi = wv[u][m][1];
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            mma16816<T>(acc[m][n], lo.x, hi.x, lo.y, hi.y, xv[u][n].x, xv[u][n].y);
            mma16816<T>(acc[m][n], lo.z, hi.z, lo.w, hi.w, xv[u][n].z, xv[u][n].w);
          }
        }
      }
    }
  };
  // Chunk groups in order (the summation order of a row): group c is multiplied while c + U loads; a buffer
  // is refilled (two groups on) as soon as it has been multiplied.
  for (int64_t c = c_begin; c < c_end; c += 2 * U) {
    if (!EARLY && c + U < c_end) issue(wb, c + U);
    consume(wa, c);
    if (c + U < c_end) {
      if (c + 2 * U < c_end) issue(wa, c + 2 * U);
      consume(wb, c + U);
      if (EARLY && c + 3 * U < c_end) issue(wb, c + 3 * U);
    }
  }

  // Accumulator (m, n): e0, e1 = row g, columns 2t, 2t+1; e2, e3 = row g + 8.
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      part[warp][m][g][n * 8 + 2 * t] = acc[m][n][0];
      part[warp][m][g][n * 8 + 2 * t + 1] = acc[m][n][1];
      part[warp][m][g + 8][n * 8 + 2 * t] = acc[m][n][2];
      part[warp][m][g + 8][n * 8 + 2 * t + 1] = acc[m][n][3];
    }
  __syncthreads();

  const T* bias = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  for (int o = threadIdx.x; o < tpb * 16 * B; o += kBlock) {
    const int tl = o / (16 * static_cast<int>(B)), r = o & 15;
    const int64_t b = (o / 16) % B, i = (static_cast<int64_t>(blockIdx.x) * tpb + tl) * 16 + r;
    if (i >= limit) continue;
    float y[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float s = part[tl * ks][m][r][b];  // the K slices in order
      for (int w = 1; w < ks; ++w) s += part[tl * ks + w][m][r][b];
      if (bias != nullptr) s += static_cast<float>(bias[(i + m * p.N_out) * p.bias_stride]);
      y[m] = s;
    }
    float v = y[0];
    if constexpr (MT == 2) v = y[0] / (1.f + expf(-y[0])) * y[1];
    if (res != nullptr) v = static_cast<float>(res[b * p.res_row_stride + i * p.res_stride]) + v;
    if (p.out_float)
      static_cast<float*>(p.out)[b * p.N_out + i] = v;
    else
      static_cast<T*>(p.out)[b * p.N_out + i] = T(v);
  }
}

// Launches `kernel` with `blocks` x `threads` threads, optionally with programmatic dependent launch.
template <typename Kernel, typename... Args>
void launch_kernel(Kernel kernel, int64_t blocks, int threads, size_t smem, cudaStream_t stream, bool pdl,
                   const Args&... args) {
  const cudaError_t e = launch_ex(kernel, dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads)),
                                  smem, stream, pdl, 0, args...);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // a bad launch configuration is not sticky: leave no stale error behind
    TORCH_CHECK(false, "ahn_rt.gemv: launch failed (grid ", blocks, ", shared memory ", smem, " B): ",
                cudaGetErrorString(e));
  }
}

template <typename T, bool SILU, int R, int U, int NB, int MINB, bool XADD>
void launch_simt(const GemvParams& p, cudaStream_t stream) {
  constexpr int VEC = VecOf<T>::n;
  constexpr int64_t GV = 32 * U;
  const DeviceInfo dev = device_info();
  // x piece: whole weight groups of every sequence, as many as fit kSimtXsBytes (all of K when they do).
  const int64_t groups = (p.K + VEC * GV - 1) / (VEC * GV);
  const int64_t fit = std::max<int64_t>(1, kSimtXsBytes / (16 * GV * p.rows));
  const int64_t pv = GV * std::max<int64_t>(1, std::min(groups, fit));
  const size_t smem = static_cast<size_t>(pv * p.rows * 16);
  const bool wvec = p.K % VEC == 0 && (reinterpret_cast<uintptr_t>(p.weight) & 15) == 0;
  auto kernel = wvec ? gemv_simt_kernel<T, SILU, R, U, NB, true, MINB, XADD>
                     : gemv_simt_kernel<T, SILU, R, U, NB, false, MINB, XADD>;
  if (smem + NB * sizeof(float) > 48 * 1024) {  // the default covers dynamic + static (rs_s): opt in above it
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    TORCH_CHECK(e == cudaSuccess, "ahn_rt.gemv: cudaFuncSetAttribute: ", cudaGetErrorString(e));
  }
  // Persistent grid: at most the blocks that fit at once, then as few warps as keep every warp's task
  // count at its minimum.
  constexpr int P = SILU ? R / 2 : R;
  const int64_t ntasks = ((SILU ? p.N_out : p.N) + P - 1) / P;
  const int64_t per_sm = std::max<int64_t>(1, std::min<int64_t>(MINB, dev.smem_per_sm / (static_cast<int64_t>(smem) + 1024)));
  const int64_t max_warps = static_cast<int64_t>(dev.sms) * per_sm * kSimtWarps;
  const int64_t rounds = (ntasks + max_warps - 1) / max_warps;
  const int64_t warps = (ntasks + rounds - 1) / rounds;
  const int64_t blocks = (warps + kSimtWarps - 1) / kSimtWarps;
  launch_kernel(kernel, blocks, kSimtThreads, smem, stream, p.pdl, p, static_cast<int>(pv), static_cast<int>(rounds));
}

// Rows per task, vectors per lane in flight and sequences per launch by batch size: more rows per warp
// share each x load as B grows (registers: two weight buffers of R x U vectors and R x NB sums).
template <typename T, bool SILU, bool XADD>
void launch_simt_rows(const GemvParams& p, cudaStream_t stream) {
  if (p.rows == 1) {
    if constexpr (SILU) launch_simt<T, true, 2, 2, 1, 3, XADD>(p, stream);
    else launch_simt<T, false, 1, 4, 1, 3, XADD>(p, stream);
  } else if (p.rows <= 4) {
    launch_simt<T, SILU, 2, 2, 4, 2, XADD>(p, stream);
  } else if (p.rows <= 8) {
    launch_simt<T, SILU, 2, 2, 8, 2, XADD>(p, stream);
  } else if (p.rows <= 16) {
    launch_simt<T, SILU, 2, 2, 16, 2, XADD>(p, stream);
  } else {
    launch_simt<T, SILU, 2, 1, 32, 2, XADD>(p, stream);
  }
}

// Staged x (gemv_mma_kernel's xs_vs): only for a GEMV that normalizes x, when every sequence's row fits
// kMmaXsBytes in all, and where it measured faster (bench/README.md, twelfth session): with several tasks per
// block (tpb > 1: the LM head), whose warps would each load and normalize all of x again, at every B; with one
// task per block (its warps split K, so x is read once per block either way) only for B <= kMmaXsMaxRowsOneTask:
// there it takes the x loads and the norm off each chunk's critical path, while at B >= 4 normalizing all of
// x before the first mma costs more than it saves. The choice may depend on B: both paths give the same bits.
// A row's stride is 4 mod 8 vectors (64 mod 128 bytes): a 16-byte shared load is served a quarter warp at a
// time, lanes 8q .. 8q + 7 reading 64 contiguous bytes of each of two consecutive rows, which then cover the 32
// banks once (with a multiple of 8 vectors both halves would hit the same 16 banks: a two-way conflict).
constexpr int64_t kMmaXsBytes = 72 * 1024;
constexpr int64_t kMmaXsMaxRowsOneTask = 2;
inline int mma_staged_row(const GemvParams& p, int tpb) {
  // AHN_RT_GEMV_X_UNSTAGED=1: never stage (a benchmark A/B switch, read on every call as AHN_RT_GEMV_SIMT is).
  if (p.norm_weight == nullptr || env_flag("AHN_RT_GEMV_X_UNSTAGED")) return 0;
  if (tpb == 1 && p.rows > kMmaXsMaxRowsOneTask) return 0;
  const int64_t nv = (p.K + 31) / 32 * 4;
  const int64_t vs = (nv + 7) / 8 * 8 + 4;
  return p.rows * vs * 16 <= kMmaXsBytes ? static_cast<int>(vs) : 0;
}

template <typename Kernel>
void launch_mma_kernel(Kernel kernel, const GemvParams& p, int64_t blocks, int warps, int ks, int xs_vs,
                       cudaStream_t stream) {
  size_t smem = static_cast<size_t>(xs_vs) * p.rows * 16;
  if (smem > 0) {
    // Dynamic shared memory past 48 KiB less the static part needs the kernel's opt-in (always the same
    // size, so that threads launching the same kernel never shrink it under each other). A device whose
    // blocks cannot have that much (static part + 72 KiB) runs unstaged: the same bits.
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(kMmaXsBytes));
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      xs_vs = 0;
      smem = 0;
    }
  }
  launch_kernel(kernel, blocks, 32 * warps, smem, stream, p.pdl, p, ks, xs_vs);
}

template <typename T, int MT, int NT, int U, bool XADD, bool EARLY = false>
void launch_mma(const GemvParams& p, cudaStream_t stream) {
  const int64_t tiles = ((p.silu_mul ? p.N_out : p.N) + 15) / 16;
  const int warps = mma_block_warps(tiles, MT);
  const int ks = MT == 2 ? std::min(2, mma_split(tiles, warps)) : mma_split(tiles, warps);
  const int64_t blocks = (tiles + warps / ks - 1) / (warps / ks);
  const bool wvec = p.K % 8 == 0 && (reinterpret_cast<uintptr_t>(p.weight) & 15) == 0;
  const int xs_vs = mma_staged_row(p, warps / ks);
  if constexpr (MT == 1) {
    if (warps == kMmaWideWarps) {
      if (wvec) launch_mma_kernel(gemv_mma_kernel<T, MT, NT, U, true, kMmaWideWarps, XADD, EARLY>, p, blocks, warps, ks, xs_vs, stream);
      else launch_mma_kernel(gemv_mma_kernel<T, MT, NT, U, false, kMmaWideWarps, XADD, EARLY>, p, blocks, warps, ks, xs_vs, stream);
      return;
    }
  }
  if (wvec) launch_mma_kernel(gemv_mma_kernel<T, MT, NT, U, true, kMmaWarps, XADD, EARLY>, p, blocks, warps, ks, xs_vs, stream);
  else launch_mma_kernel(gemv_mma_kernel<T, MT, NT, U, false, kMmaWarps, XADD, EARLY>, p, blocks, warps, ks, xs_vs, stream);
}

// Chunks per buffer: at most about 20 16-byte registers of weights (two buffers) and x per lane, so that
// two blocks fit on an SM.
template <typename T, int MT, bool XADD>
void launch_mma_rows(const GemvParams& p, cudaStream_t stream) {
  if (p.rows == 1) launch_mma<T, MT, 1, MT == 1 ? 4 : 2, XADD, true>(p, stream);
  else if (p.rows <= 8) launch_mma<T, MT, 1, MT == 1 ? 4 : 2, XADD>(p, stream);
  else if (p.rows <= 16) launch_mma<T, MT, 2, 2, XADD>(p, stream);
  else launch_mma<T, MT, 4, MT == 1 ? 2 : 1, XADD>(p, stream);
}

}  // namespace

template <typename T>
void gemv_cuda(const GemvParams& p, void* stream_ptr) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  // Groups of at most kGemvMaxRows sequences (a sequence's values do not depend on its group).
  for (int64_t b0 = 0; b0 < p.rows; b0 += kGemvMaxRows) {
    GemvParams q = p;
    q.rows = std::min<int64_t>(kGemvMaxRows, p.rows - b0);
    q.x = static_cast<const T*>(p.x) + b0 * p.x_row_stride;
    if (p.residual != nullptr) q.residual = static_cast<const T*>(p.residual) + b0 * p.res_row_stride;
    if (p.x_add != nullptr) q.x_add = static_cast<const T*>(p.x_add) + b0 * p.x_row_stride;  // x's strides
    q.out = p.out_float ? static_cast<void*>(static_cast<float*>(p.out) + b0 * p.N_out)
                        : static_cast<void*>(static_cast<T*>(p.out) + b0 * p.N_out);
    if constexpr (!std::is_same_v<T, float>) {
      if (!env_flag("AHN_RT_GEMV_SIMT")) {
        // x_add comes without silu_mul and norm_weight (the host refuses them): only MT == 1 has XADD.
        if (q.silu_mul) launch_mma_rows<T, 2, false>(q, stream);
        else if (q.x_add != nullptr) launch_mma_rows<T, 1, true>(q, stream);
        else launch_mma_rows<T, 1, false>(q, stream);
        continue;
      }
    }
    if (q.silu_mul) launch_simt_rows<T, true, false>(q, stream);
    else if (q.x_add != nullptr) launch_simt_rows<T, false, true>(q, stream);
    else launch_simt_rows<T, false, false>(q, stream);
  }
}

template void gemv_cuda<float>(const GemvParams&, void*);
template void gemv_cuda<c10::BFloat16>(const GemvParams&, void*);
template void gemv_cuda<c10::Half>(const GemvParams&, void*);

}  // namespace ahn_rt
