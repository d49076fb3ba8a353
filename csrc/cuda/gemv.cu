// CUDA fused decode GEMV kernels (ahn_rt.gemv: B >= 1 rows, i.e. one token of each of B sequences) and
// their launchers. Test: pytest -m cuda tests/test_gemv.py; timing: python bench/gemv_bench.py (on a GPU).
//
// bf16 / fp16: tensor cores (mma.sync m16n8k16, fp32 accumulate). A block owns 16 output rows (a silu_mul
// block: 16 gate rows and their 16 up rows) and all B <= 32 sequences; its warps (8, or 16 when the row
// tiles are few) split K into fixed slices of 32-column chunks and stream their weights with 16-byte
// non-allocating loads. Each lane's 16 bytes of a row (8 consecutive k) feed two mma steps under one fixed
// k permutation that x uses too, so the loads stay contiguous. x comes straight from L1/L2 (RMS-normalized
// on the fly when asked; every block computes the sums of squares itself); the warps' partial sums are added in warp order in shared
// memory; bias / SiLU(gate) * up / residual epilogue with one rounding.
// Batch invariance: the value of (row, sequence) is the same sum in the same order whatever B is and
// whatever the other rows hold (an mma output column depends on its own column of x alone; the chunk
// split depends on K alone), so a sequence's logits do not depend on its batch.
//
// fp32 (tests and references only): the CUDA-core kernel below; x is staged in shared memory as float32,
// warps own whole rows; one sequence per launch (the host runs B rows one after another).
// K % (16 / sizeof(T)) != 0 or a misaligned weight / x takes element-wise loads into the same fragments.
// Measurements and tried variants: bench/gemv_notes.md.
#include <cstdint>
#include <type_traits>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common.h"

namespace ahn_rt {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMinBlocksPerSm = 3;  // caps registers at 80 / thread; 24 warps per SM x 4 KiB in flight

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

// Shared-memory layout of the staged x: VEC-element vector v lives in VEC / 4 float4 planes, plane q at
// float4 index q * nvp + v (nvp = vectors, padded). A warp reading 32 consecutive vectors then reads 32
// consecutive float4s per plane: no bank conflicts. Element k of x:
template <typename T>
__device__ __forceinline__ int64_t xs_index(int64_t k, int64_t nvp) {
  constexpr int VEC = VecOf<T>::n;
  const int64_t v = k / VEC;
  const int e = static_cast<int>(k % VEC);
  return ((e >> 2) * nvp + v) * 4 + (e & 3);
}

// Raw 16-byte vectors (G == VEC: the caller checked alignment, unit stride and K % VEC == 0) or single
// strided elements (G == 1) of a 1-D input; zeros at and past K. Raw vectors are unpacked at use, so that
// staging holds few registers while the first weight chunk is in flight.
template <typename T, int G>
struct Group {
  using Raw = std::conditional_t<G == 1, float, uint4>;
  static constexpr int kUnroll = G == 1 ? 8 : 4;  // independent loads per thread per round
  __device__ __forceinline__ static Raw load(const T* src, int64_t stride, int64_t K, int64_t g) {
    if constexpr (G == 1) {
      return g < K ? static_cast<float>(src[g * stride]) : 0.f;
    } else {
      return g * G < K ? __ldg(reinterpret_cast<const uint4*>(src) + g) : make_uint4(0u, 0u, 0u, 0u);
    }
  }
  __device__ __forceinline__ static void to_float(const Raw& r, float* f) {
    if constexpr (G == 1) f[0] = r;
    else unpack<T>(r, f);
  }
};

// xs[0 .. nvp * VEC) = x (normalized as rms_norm_ref when norm_weight is given), zero past K. Every thread
// of the block calls it; ends with a barrier. G elements per load (see Group).
template <typename T, int G>
__device__ void stage_x(const GemvParams& p, float* xs, int64_t nvp, float* red) {
  using Gr = Group<T, G>;
  constexpr int UN = Gr::kUnroll;
  const T* x = static_cast<const T*>(p.x);
  const T* nw = static_cast<const T*>(p.norm_weight);
  const int64_t K = p.K, ngroups = nvp * VecOf<T>::n / G;
  float ss = 0.f;
  for (int64_t base = threadIdx.x; base < ngroups; base += kThreads * UN) {
    typename Gr::Raw raw[UN];
#pragma unroll
    for (int j = 0; j < UN; ++j) raw[j] = Gr::load(x, p.x_stride, K, base + j * kThreads);
#pragma unroll
    for (int j = 0; j < UN; ++j) {
      const int64_t g = base + j * kThreads;
      if (g < ngroups) {
        float f[G];
        Gr::to_float(raw[j], f);
#pragma unroll
        for (int e = 0; e < G; ++e) ss += f[e] * f[e];
        if constexpr (G == VecOf<T>::n) {  // whole vector: one float4 per plane, conflict-free
          float4* xs4 = reinterpret_cast<float4*>(xs);
#pragma unroll
          for (int q = 0; q < G / 4; ++q)
            xs4[q * nvp + g] = make_float4(f[4 * q], f[4 * q + 1], f[4 * q + 2], f[4 * q + 3]);
        } else {
#pragma unroll
          for (int e = 0; e < G; ++e) xs[xs_index<T>(g * G + e, nvp)] = f[e];
        }
      }
    }
  }
  if (nw != nullptr) {
    ss = block_sum(ss, red);
    const float rs = 1.f / sqrtf(ss / static_cast<float>(K) + p.norm_eps);
    // Each thread rescales the elements it wrote itself: no barrier needed in between.
    for (int64_t base = threadIdx.x; base < ngroups; base += kThreads * UN) {
      typename Gr::Raw raw[UN];
#pragma unroll
      for (int j = 0; j < UN; ++j) raw[j] = Gr::load(nw, p.nw_stride, K, base + j * kThreads);
#pragma unroll
      for (int j = 0; j < UN; ++j) {
        const int64_t g = base + j * kThreads;
        float f[G];
        Gr::to_float(raw[j], f);
#pragma unroll
        for (int e = 0; e < G; ++e) {
          const int64_t k = g * G + e;
          if (k < K) {
            float& v = xs[xs_index<T>(k, nvp)];
            v = round_to<T>(f[e] * round_to<T>(v * rs));
          }
        }
      }
    }
  }
  __syncthreads();
}

// Row r of task t: silu_mul pairs gate row t with up row t + N_out (R == 2); else rows t * R .. t * R + R - 1,
// clamped to N - 1 so that loads stay in bounds (clamped rows are not written).
template <int R>
__device__ __forceinline__ int64_t task_row(const GemvParams& p, int64_t t, int r) {
  if (p.silu_mul) return t + r * p.N_out;
  const int64_t row = t * R + r;
  return row < p.N ? row : p.N - 1;
}

// acc[r] holds lane partial sums of row r's dot product: reduce, add bias, epilogue, store (lane 0).
template <typename T, int R>
__device__ __forceinline__ void finish_task(const GemvParams& p, int64_t t, float (&acc)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = warp_sum(acc[r]);
  if ((threadIdx.x & 31) != 0) return;
  const T* bias = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  float y[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    y[r] = acc[r];
    if (bias != nullptr) y[r] += static_cast<float>(bias[task_row<R>(p, t, r) * p.bias_stride]);
  }
  auto store = [&](int64_t i, float v) {
    if (res != nullptr) v = static_cast<float>(res[i * p.res_stride]) + v;
    if (p.out_float)
      static_cast<float*>(p.out)[i] = v;
    else
      static_cast<T*>(p.out)[i] = T(v);
  };
  if constexpr (R == 2) {
    if (p.silu_mul) {
      store(t, y[0] / (1.f + expf(-y[0])) * y[1]);
      return;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = t * R + r;
    if (row < p.N) store(row, y[r]);
  }
}

// R rows per warp task, U 16-byte loads per row per lane in flight; VECTOR: 16-byte path (rows 16-byte
// aligned, K % VEC == 0), else element-wise loads. Dynamic shared memory: the staged x.
template <typename T, int R, int U, bool VECTOR>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) gemv_kernel(const GemvParams p) {
  constexpr int VEC = VecOf<T>::n;
  extern __shared__ float4 xs4[];
  __shared__ float red[32];
  float* xs = reinterpret_cast<float*>(xs4);
  const int lane = threadIdx.x & 31;
  const int64_t nvec = (p.K + VEC - 1) / VEC;
  const int64_t nvp = (nvec + 32 * U - 1) / (32 * U) * (32 * U);  // padded: chunk loops need no x guard
  const int64_t ntasks = p.silu_mul ? p.N_out : (p.N + R - 1) / R;
  const int64_t total_warps = static_cast<int64_t>(gridDim.x) * kWarps;
  int64_t task = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  // Let the next kernel (if it was launched with PDL) start its own weight prefetch now.
  pdl_launch_dependents();

  if constexpr (VECTOR) {
    const uint4* W = static_cast<const uint4*>(p.weight);
    uint4 w[R][U];
    auto issue = [&](int64_t t, int64_t c) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint4* row = W + task_row<R>(p, t, r) * nvec;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t v = c + lane + 32 * u;
          w[r][u] = v < nvec ? ld_stream(row + v) : make_uint4(0u, 0u, 0u, 0u);
        }
      }
    };
    // Weights never depend on earlier kernels: start streaming the first chunk before waiting on them.
    bool preloaded = task < ntasks;
    if (preloaded) issue(task, 0);
    pdl_wait();
    const bool x_vec = p.x_stride == 1 && (reinterpret_cast<uintptr_t>(p.x) & 15) == 0 &&
                       (p.norm_weight == nullptr ||
                        (p.nw_stride == 1 && (reinterpret_cast<uintptr_t>(p.norm_weight) & 15) == 0));
    if (x_vec)
      stage_x<T, VEC>(p, xs, nvp, red);
    else
      stage_x<T, 1>(p, xs, nvp, red);

    for (; task < ntasks; task += total_warps) {
      float acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = 0.f;
      for (int64_t c = 0; c < nvec; c += 32 * U) {
        if (!preloaded) issue(task, c);
        preloaded = false;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t v = c + lane + 32 * u;
          float xv[VEC];
#pragma unroll
          for (int q = 0; q < VEC / 4; ++q) {
            const float4 t4 = xs4[q * nvp + v];
            xv[4 * q] = t4.x; xv[4 * q + 1] = t4.y; xv[4 * q + 2] = t4.z; xv[4 * q + 3] = t4.w;
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float wf[VEC];
            unpack<T>(w[r][u], wf);
            float s = wf[0] * xv[0];  // one short chain per load: U independent chains per row
#pragma unroll
            for (int e = 1; e < VEC; ++e) s = fmaf(wf[e], xv[e], s);
            acc[r] += s;
          }
        }
      }
      finish_task<T, R>(p, task, acc);
    }
  } else {
    pdl_wait();
    stage_x<T, 1>(p, xs, nvp, red);
    const T* W = static_cast<const T*>(p.weight);
    for (; task < ntasks; task += total_warps) {
      float acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const T* row = W + task_row<R>(p, task, r) * p.K;
        for (int64_t k0 = 0; k0 < p.K; k0 += 32 * U) {
          float wv[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int64_t k = k0 + lane + 32 * u;
            wv[u] = k < p.K ? static_cast<float>(row[k]) : 0.f;
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int64_t k = k0 + lane + 32 * u;
            if (k < p.K) acc[r] = fmaf(wv[u], xs[xs_index<T>(k, nvp)], acc[r]);
          }
        }
      }
      finish_task<T, R>(p, task, acc);
    }
  }
}


// ---------------------------------------------------------------------------------------------
// Tensor-core kernel (bf16 / fp16), B <= 32 sequences per launch.
// ---------------------------------------------------------------------------------------------
// Blocks of 8 warps, or of 16 when the row tiles (no SiLU pairs) are no more than the SMs (o_proj and down
// of a 3B layer have 128: at 8 warps per tile that is half a wave of 8-warp blocks, with the SMs idle on
// loads; a 16-warp block at up to 128 registers still fits an SM). Warps that split K for one row tile
// (1, 2, 4, 8 or 16): the fewest that still give about kMmaTargetWarps warps in all. Both depend on the
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

template <typename T> __device__ __forceinline__ uint16_t bits_of(T v) {
  uint16_t u;
  memcpy(&u, &v, 2);
  return u;
}
template <typename T> __device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return static_cast<uint32_t>(bits_of(lo)) | (static_cast<uint32_t>(bits_of(hi)) << 16);
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

// 8 consecutive elements src[k .. k + 8) (element stride `stride`) as 4 packed pairs, zero at and past K.
// VEC: one 16-byte load (the caller checked alignment, unit stride and K % 8 == 0).
template <typename T, bool VEC, bool STREAM>
__device__ __forceinline__ uint4 load8(const T* src, int64_t stride, int64_t k, int64_t K) {
  if constexpr (VEC) {
    if (k >= K) return make_uint4(0u, 0u, 0u, 0u);
    const uint4* ptr = reinterpret_cast<const uint4*>(src + k);
    if constexpr (STREAM) return ld_stream(ptr);
    else return __ldg(ptr);
  } else {
    T e[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = k + i < K ? src[(k + i) * stride] : T(0.f);
    return make_uint4(pack2(e[0], e[1]), pack2(e[2], e[3]), pack2(e[4], e[5]), pack2(e[6], e[7]));
  }
}

// A task is 16 output rows; MT row tiles (2 with silu_mul: gate, up), NT column tiles of 8 sequences, U
// chunks of 32 k per warp in flight, WVEC: 16-byte weight loads, WARPS: warps per block. A block runs
// WARPS / ks tasks, ks warps each (warp w: task w / ks, K slice w % ks).
template <typename T, int MT, int NT, int U, bool WVEC, int WARPS>
__global__ void __launch_bounds__(32 * WARPS, 16 / WARPS) gemv_mma_kernel(const GemvParams p, const int ks) {
  constexpr int kBlock = 32 * WARPS;
  __shared__ float part[WARPS][MT][16][8 * NT];
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
          wv[u][m][h] = in ? load8<T, WVEC, true>(wrow[m][h], 1, k, K) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  // Weights never depend on earlier kernels: start streaming before waiting on them (with PDL).
  if (c_begin < c_end) issue(wa, c_begin);
  pdl_wait();

  const T* X = static_cast<const T*>(p.x);
  const T* nw = static_cast<const T*>(p.norm_weight);
  const bool x_vec = p.x_stride == 1 && (reinterpret_cast<uintptr_t>(X) & 15) == 0 && K % 8 == 0 &&
                     (B == 1 || p.x_row_stride % 8 == 0) &&
                     (nw == nullptr || (p.nw_stride == 1 && (reinterpret_cast<uintptr_t>(nw) & 15) == 0));
  if (nw != nullptr) {
    // rs[b] = 1 / sqrt(mean(x[b]^2) + eps): sequence b is summed by one warp in one fixed order.
    for (int64_t b = warp; b < B; b += WARPS) {
      const T* xb = X + b * p.x_row_stride;
      float ss = 0.f;
      for (int64_t k = 8 * lane; k < K; k += 256) {  // lane: 8 consecutive k at a time, in k order
        const uint4 r = x_vec ? load8<T, true, false>(xb, 1, k, K) : load8<T, false, false>(xb, p.x_stride, k, K);
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
        if (b < B && c + u < c_end && k < K) {
          const T* xb = X + b * p.x_row_stride;
          r = x_vec ? load8<T, true, false>(xb, 1, k, K) : load8<T, false, false>(xb, p.x_stride, k, K);
          if (nw != nullptr) {  // xn = nw * round(x * rs), rounded to T: as rms_norm_ref
            const uint4 wn = x_vec ? load8<T, true, false>(nw, 1, k, K) : load8<T, false, false>(nw, p.nw_stride, k, K);
            float xf[8], nf[8];
            unpack<T>(r, xf);
            unpack<T>(wn, nf);
            const float rs = rs_s[b];
            T o[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) o[e] = T(nf[e] * round_to<T>(xf[e] * rs));
            r = make_uint4(pack2(o[0], o[1]), pack2(o[2], o[3]), pack2(o[4], o[5]), pack2(o[6], o[7]));
          }
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
  // Chunk groups in order (the summation order of a row): group c is multiplied while c + U loads.
  for (int64_t c = c_begin; c < c_end; c += 2 * U) {
    if (c + U < c_end) issue(wb, c + U);
    consume(wa, c);
    if (c + U < c_end) {
      if (c + 2 * U < c_end) issue(wa, c + 2 * U);
      consume(wb, c + U);
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

// AHN_RT_GEMV_PDL=1 launches with programmatic dependent launch (the weight prefetch overlaps the end of
// the previous kernel). Read on every call so that a benchmark can compare both in one process.
bool pdl_enabled() { return env_flag("AHN_RT_GEMV_PDL"); }

// Launches `kernel` with `blocks` x `threads` threads, optionally with programmatic dependent launch.
template <typename Kernel, typename... Args>
void launch_kernel(Kernel kernel, int64_t blocks, int threads, size_t smem, cudaStream_t stream, const Args&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(static_cast<unsigned>(threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, args...);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // a bad launch configuration is not sticky: leave no stale error behind
    TORCH_CHECK(false, "ahn_rt.gemv: launch failed (grid ", blocks, ", shared memory ", smem, " B): ",
                cudaGetErrorString(e));
  }
}

template <typename T, int R, int U, bool VECTOR>
void launch(const GemvParams& p, cudaStream_t stream) {
  constexpr int VEC = VecOf<T>::n;
  const DeviceInfo dev = device_info();
  const int64_t nvec = (p.K + VEC - 1) / VEC;
  const int64_t nvp = (nvec + 32 * U - 1) / (32 * U) * (32 * U);
  const size_t smem = static_cast<size_t>(nvp) * VEC * sizeof(float);
  TORCH_CHECK(smem + sizeof(float) * 32 <= static_cast<size_t>(dev.smem_optin), "ahn_rt.gemv: K=", p.K,
              " needs ", smem, " bytes of shared memory; the device allows ", dev.smem_optin);
  auto kernel = gemv_kernel<T, R, U, VECTOR>;
  // The 48 KiB default covers dynamic + static shared memory (red[32]): opt in above it.
  if (smem + 32 * sizeof(float) > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    TORCH_CHECK(e == cudaSuccess, "ahn_rt.gemv: cudaFuncSetAttribute: ", cudaGetErrorString(e));
  }
  // Persistent grid: at most the blocks that fit at once (shared memory: x plus ~1 KiB reserved per block),
  // then as few warps as keep the tasks per warp at their minimum, so that every warp gets the same count.
  const int64_t per_block_smem = static_cast<int64_t>(smem) + 32 * sizeof(float) + 1024;
  const int64_t fit = std::max<int64_t>(1, std::min<int64_t>(kMinBlocksPerSm, dev.smem_per_sm / per_block_smem));
  const int64_t max_warps = static_cast<int64_t>(dev.sms) * fit * kWarps;
  const int64_t ntasks = p.silu_mul ? p.N_out : (p.N + R - 1) / R;
  const int64_t per_warp = (ntasks + max_warps - 1) / max_warps;
  const int64_t warps = (ntasks + per_warp - 1) / per_warp;
  const int64_t blocks = (warps + kWarps - 1) / kWarps;

  launch_kernel(kernel, blocks, kThreads, smem, stream, p);
}

template <typename T, int MT, int NT, int U>
void launch_mma(const GemvParams& p, cudaStream_t stream) {
  const int64_t tiles = ((p.silu_mul ? p.N_out : p.N) + 15) / 16;
  const int warps = mma_block_warps(tiles, MT);
  const int ks = mma_split(tiles, warps);
  const int64_t blocks = (tiles + warps / ks - 1) / (warps / ks);
  const bool wvec = p.K % 8 == 0 && (reinterpret_cast<uintptr_t>(p.weight) & 15) == 0;
  if constexpr (MT == 1) {
    if (warps == kMmaWideWarps) {
      if (wvec) launch_kernel(gemv_mma_kernel<T, MT, NT, U, true, kMmaWideWarps>, blocks, 32 * warps, 0, stream, p, ks);
      else launch_kernel(gemv_mma_kernel<T, MT, NT, U, false, kMmaWideWarps>, blocks, 32 * warps, 0, stream, p, ks);
      return;
    }
  }
  if (wvec) launch_kernel(gemv_mma_kernel<T, MT, NT, U, true, kMmaWarps>, blocks, 32 * warps, 0, stream, p, ks);
  else launch_kernel(gemv_mma_kernel<T, MT, NT, U, false, kMmaWarps>, blocks, 32 * warps, 0, stream, p, ks);
}

// Chunks per buffer: at most about 20 16-byte registers of weights (two buffers) and x per lane, so that
// two blocks fit on an SM.
template <typename T, int MT>
void launch_mma_rows(const GemvParams& p, cudaStream_t stream) {
  if (p.rows <= 8) launch_mma<T, MT, 1, MT == 1 ? 4 : 2>(p, stream);
  else if (p.rows <= 16) launch_mma<T, MT, 2, 2>(p, stream);
  else launch_mma<T, MT, 4, MT == 1 ? 2 : 1>(p, stream);
}

}  // namespace

template <typename T>
void gemv_cuda(const GemvParams& p, void* stream_ptr) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  if constexpr (std::is_same_v<T, float>) {
    // One sequence per launch: rows one after another.
    for (int64_t b = 0; b < p.rows; ++b) {
      GemvParams q = p;
      q.rows = 1;
      q.x = static_cast<const float*>(p.x) + b * p.x_row_stride;
      if (p.residual != nullptr) q.residual = static_cast<const float*>(p.residual) + b * p.res_row_stride;
      q.out = static_cast<float*>(p.out) + b * p.N_out;
      constexpr int VEC = VecOf<float>::n;
      const bool vector = q.K % VEC == 0 && (reinterpret_cast<uintptr_t>(q.weight) & 15) == 0;
      if (q.silu_mul) {
        if (vector) launch<float, 2, 4, true>(q, stream);
        else launch<float, 2, 4, false>(q, stream);
      } else {
        if (vector) launch<float, 1, 8, true>(q, stream);
        else launch<float, 1, 8, false>(q, stream);
      }
    }
  } else {
    // Groups of at most 32 sequences (a sequence's values do not depend on its group).
    for (int64_t b0 = 0; b0 < p.rows; b0 += kGemvMmaRows) {
      GemvParams q = p;
      q.rows = std::min<int64_t>(kGemvMmaRows, p.rows - b0);
      q.x = static_cast<const T*>(p.x) + b0 * p.x_row_stride;
      if (p.residual != nullptr) q.residual = static_cast<const T*>(p.residual) + b0 * p.res_row_stride;
      q.out = p.out_float ? static_cast<void*>(static_cast<float*>(p.out) + b0 * p.N_out)
                          : static_cast<void*>(static_cast<T*>(p.out) + b0 * p.N_out);
      if (q.silu_mul) launch_mma_rows<T, 2>(q, stream);
      else launch_mma_rows<T, 1>(q, stream);
    }
  }
}

template void gemv_cuda<float>(const GemvParams&, void*);
template void gemv_cuda<c10::BFloat16>(const GemvParams&, void*);
template void gemv_cuda<c10::Half>(const GemvParams&, void*);

}  // namespace ahn_rt
