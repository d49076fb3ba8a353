// CUDA fused decode GEMV kernels (ahn_rt.gemv: B >= 1 rows, i.e. one token of each of B sequences) and
// their launchers. Test: pytest -m cuda tests/test_gemv.py; timing: python bench/gemv_bench.py (on a GPU).
//
// bf16 / fp16: tensor cores (mma.sync m16n8k16, fp32 accumulate). A block owns 16 output rows (a silu_mul
// block: 16 gate rows and their 16 up rows) and all B <= 32 sequences; its 8 warps split K into 8 fixed
// slices of 32-column chunks and stream their weights with 16-byte non-allocating loads. Each lane's 16
// bytes of a row (8 consecutive k) feed two mma steps under one fixed k permutation that x uses too, so
// the loads stay contiguous. x comes straight from L1/L2 (RMS-normalized on the fly when asked; every
// block computes the sums of squares itself); the 8 warps' partial sums are added in warp order in shared
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
constexpr int kMmaWarps = 8;
// Warps that split K for one row tile (1, 2, 4 or 8): the fewest that still give about kMmaTargetWarps warps
// in all. It depends on the shape alone (never on B), so a row's summation order does too.
constexpr int64_t kMmaTargetWarps = 4096;
inline int mma_split(int64_t tiles) {
  int ks = 1;
  while (ks < kMmaWarps && tiles * ks < kMmaTargetWarps) ks *= 2;
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

// Shared-memory ring of one warp: a stage is MT * 16 weight rows x CW chunks of 32 k (CW * 64 bytes a row,
// unpadded). Piece e (16 bytes) of row r sits at piece e ^ 4 (r & 1): the 8 lanes of an LDS.128 phase read
// pieces 4j + t of rows g and g + 1, which then fall in opposite halves of the 32 banks (no conflicts).
template <int MT, int CW>
struct MmaStage {
  static_assert(CW % 2 == 0, "the swizzle needs an even chunk count");
  static constexpr int kRows = 16 * MT;
  static constexpr int kPitch = CW * 64;
  static constexpr int kBytes = kRows * kPitch;
  static constexpr int kPieces = kRows * CW * 4;  // 16-byte pieces per stage: a multiple of 32
  __device__ __forceinline__ static int offset(int r, int e) { return r * kPitch + 16 * (e ^ ((r & 1) << 2)); }
};

// Bytes of x staged in shared memory (normalized, in fragment order: chunk c, sequence b, lane slot t) for
// NT column tiles; 0 when the caller's budget is smaller.
inline int64_t mma_xs_bytes(int64_t K, int NT) { return (K + 31) / 32 * 8 * NT * 64; }

// A task is 16 output rows (MT row tiles: 2 with silu_mul, gate and up) x one K slice. A block runs groups of
// 8 / ks tasks, ks warps each (warp w: task w / ks, K slice w % ks), group blockIdx.x, + gridDim.x, ...
// (persistent). Each warp streams the weights of its tasks, stage after stage, through its own ring of S
// stages with cp.async (S - 1 stages in flight while one is multiplied; row segments read contiguously),
// then takes the mma fragments out of shared memory. x: staged once per block in shared memory (xs_on), or
// read per chunk from L1 / L2 (large B x K). NT column tiles of 8 sequences; WVEC: 16-byte aligned rows
// (cp.async), else element-wise loads into the same ring.
template <typename T, int MT, int NT, int CW, int S, bool WVEC>
__global__ void __launch_bounds__(kThreads, 2) gemv_mma_kernel(const GemvParams p, const int ks, const bool xs_on) {
  static_assert(kThreads == 32 * kMmaWarps, "one warp per K slice");
  using St = MmaStage<MT, CW>;
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ float part[kMmaWarps][MT][16][8 * NT];
  __shared__ float rs_s[8 * NT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  unsigned char* ring = dyn_smem + warp * S * St::kBytes;
  uint4* xs = reinterpret_cast<uint4*>(dyn_smem + kMmaWarps * S * St::kBytes);
  const int64_t K = p.K, B = p.rows;
  const int64_t limit = p.silu_mul ? p.N_out : p.N;  // outputs (rows of tile 0)
  const int tpb = kMmaWarps / ks;                    // tasks per group
  const int64_t groups = ((limit + 15) / 16 + tpb - 1) / tpb;
  const int64_t nch = (K + 31) / 32, cpw = (nch + ks - 1) / ks;
  const int64_t c_begin = std::min<int64_t>(nch, (warp % ks) * cpw), c_end = std::min<int64_t>(nch, c_begin + cpw);
  // Stages per task, the same for every warp of the block (so that the barriers below line up).
  const int nst = static_cast<int>(std::max<int64_t>(1, (cpw + CW - 1) / CW));
  const int64_t my_groups = blockIdx.x < groups ? (groups - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  const int64_t nq = my_groups * nst;  // stages this warp streams
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * tpb * 16;  // rows between a warp's tasks
  pdl_launch_dependents();

  const T* W = static_cast<const T*>(p.weight);
  // The producer side: stage fq (stage fs of the task whose first row is fi0) -> ring slot fq % S.
  int64_t fq = 0, fi0 = (static_cast<int64_t>(blockIdx.x) * tpb + warp / ks) * 16;
  int fs = 0;
  auto fill_next = [&]() {
    if (fq < nq) {
      const int64_t c0 = c_begin + static_cast<int64_t>(fs) * CW;
      unsigned char* dst = ring + (fq % S) * St::kBytes;
#pragma unroll
      for (int pc = lane; pc < St::kPieces; pc += 32) {
        const int r = pc / (CW * 4), e = pc % (CW * 4);
        const int64_t row = std::min<int64_t>(fi0 + r % 16, limit - 1) + (r / 16) * p.N_out;
        const int64_t k = (c0 + e / 4) * 32 + 8 * (e % 4);
        const bool in = c0 + e / 4 < c_end && k < K;
        const T* src = W + row * K;
        unsigned char* d = dst + St::offset(r, e);
        if constexpr (WVEC) {
          cp_async16_zfill(d, in ? static_cast<const void*>(src + k) : static_cast<const void*>(src), in ? 16 : 0);
        } else {
          *reinterpret_cast<uint4*>(d) = in ? load8<T, false, false>(src, 1, k, K) : make_uint4(0u, 0u, 0u, 0u);
        }
      }
      if (++fs == nst) {
        fs = 0;
        fi0 += row_step;
      }
    }
    ++fq;
    cp_async_commit();  // one group per stage (empty past the end), so that wait<S - 1> counts stages
  };
  // Weights never depend on earlier kernels: start streaming before waiting on them (with PDL).
#pragma unroll
  for (int q = 0; q < S - 1; ++q) fill_next();
  pdl_wait();

  const T* X = static_cast<const T*>(p.x);
  const T* nw = static_cast<const T*>(p.norm_weight);
  const bool x_vec = p.x_stride == 1 && (reinterpret_cast<uintptr_t>(X) & 15) == 0 && K % 8 == 0 &&
                     (B == 1 || p.x_row_stride % 8 == 0) &&
                     (nw == nullptr || (p.nw_stride == 1 && (reinterpret_cast<uintptr_t>(nw) & 15) == 0));
  if (nw != nullptr) {
    // rs[b] = 1 / sqrt(mean(x[b]^2) + eps): sequence b is summed by one warp in one fixed order.
    for (int64_t b = warp; b < B; b += kMmaWarps) {
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
  // x's 8 k at k of sequence b (zero past B and K), normalized as rms_norm_ref (nw * round(x * rs), in T).
  auto x8 = [&](int64_t b, int64_t k) {
    if (b >= B || k >= K) return make_uint4(0u, 0u, 0u, 0u);
    const T* xb = X + b * p.x_row_stride;
    uint4 r = x_vec ? load8<T, true, false>(xb, 1, k, K) : load8<T, false, false>(xb, p.x_stride, k, K);
    if (nw != nullptr) {
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
    return r;
  };
  if (xs_on) {  // xs[(c * 8 NT + b) * 4 + t] = x8(b, 32 c + 8 t)
    for (int64_t i = threadIdx.x; i < nch * 8 * NT * 4; i += kThreads) {
      const int64_t c = i / (8 * NT * 4), b = (i / 4) % (8 * NT);
      xs[i] = x8(b, c * 32 + 8 * (i % 4));
    }
    __syncthreads();
  }

  float acc[MT][NT][4];
  auto zero_acc = [&]() {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.f;
  };
  zero_acc();

  const T* bias = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  int cs = 0;  // the consumer's stage within its task
  int64_t ci0 = (static_cast<int64_t>(blockIdx.x) * tpb) * 16;  // the consumer's group's first row
  for (int64_t q = 0; q < nq; ++q) {
    fill_next();
    cp_async_wait<S - 1>();  // this lane's pieces of stage q have landed
    __syncwarp();            // ... and every other lane's
    // The mma steps of stage q, chunk by chunk in k order (the summation order of a row).
    const unsigned char* src = ring + (q % S) * St::kBytes;
    const int64_t c0 = c_begin + static_cast<int64_t>(cs) * CW;
#pragma unroll
    for (int j = 0; j < CW; ++j) {
      const int64_t c = c0 + j;
      if (c < c_end) {
        uint4 xv[NT];  // column g of tile n: sequence n * 8 + g, this lane's 8 k of chunk c
#pragma unroll
        for (int n = 0; n < NT; ++n) xv[n] = xs_on ? xs[(c * 8 * NT + n * 8 + g) * 4 + t] : x8(n * 8 + g, c * 32 + 8 * t);
        // k permutation: lane (g, t) holds k = 8t .. 8t+7 of the chunk; step s takes 8t+4s .. 8t+4s+3 as the
        // fragment's k {2t, 2t+1, 2t+8, 2t+9}, for A (rows g, g+8) and B (column g) alike.
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const uint4 lo = *reinterpret_cast<const uint4*>(src + St::offset(m * 16 + g, 4 * j + t));
          const uint4 hi = *reinterpret_cast<const uint4*>(src + St::offset(m * 16 + g + 8, 4 * j + t));
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            mma16816<T>(acc[m][n], lo.x, hi.x, lo.y, hi.y, xv[n].x, xv[n].y);
            mma16816<T>(acc[m][n], lo.z, hi.z, lo.w, hi.w, xv[n].z, xv[n].w);
          }
        }
      }
    }
    __syncwarp();  // slot q % S is refilled by the next iteration's fill
    if (++cs < nst) continue;
    cs = 0;

    // Task done. Accumulator (m, n): e0, e1 = row g, columns 2t, 2t+1; e2, e3 = row g + 8.
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        part[warp][m][g][n * 8 + 2 * t] = acc[m][n][0];
        part[warp][m][g][n * 8 + 2 * t + 1] = acc[m][n][1];
        part[warp][m][g + 8][n * 8 + 2 * t] = acc[m][n][2];
        part[warp][m][g + 8][n * 8 + 2 * t + 1] = acc[m][n][3];
      }
    zero_acc();
    __syncthreads();
    for (int o = threadIdx.x; o < tpb * 16 * B; o += kThreads) {
      const int tl = o / (16 * static_cast<int>(B)), r = o & 15;
      const int64_t b = (o / 16) % B, i = ci0 + tl * 16 + r;
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
    ci0 += row_step;
    __syncthreads();  // part is rewritten by the next task
  }
  cp_async_wait<0>();
}

// AHN_RT_GEMV_PDL=1 launches with programmatic dependent launch (the weight prefetch overlaps the end of
// the previous kernel). Read on every call so that a benchmark can compare both in one process.
bool pdl_enabled() { return env_flag("AHN_RT_GEMV_PDL"); }

// Launches `kernel` with `blocks` x kThreads threads, optionally with programmatic dependent launch.
template <typename Kernel, typename... Args>
void launch_kernel(Kernel kernel, int64_t blocks, size_t smem, cudaStream_t stream, const Args&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(kThreads);
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

  launch_kernel(kernel, blocks, smem, stream, p);
}

// AHN_RT_GEMV_RING_NARROW=1 (benchmark A/B): half the stage size, so that two blocks fit on an SM.
bool ring_narrow() { return env_flag("AHN_RT_GEMV_RING_NARROW"); }

template <typename T, int MT, int NT, int CW, int S>
void launch_mma(const GemvParams& p, cudaStream_t stream) {
  const int64_t tiles = ((p.silu_mul ? p.N_out : p.N) + 15) / 16;
  const int ks = mma_split(tiles);
  const int64_t groups = (tiles + kMmaWarps / ks - 1) / (kMmaWarps / ks);
  const bool wvec = p.K % 8 == 0 && (reinterpret_cast<uintptr_t>(p.weight) & 15) == 0;
  auto kernel = wvec ? gemv_mma_kernel<T, MT, NT, CW, S, true> : gemv_mma_kernel<T, MT, NT, CW, S, false>;
  const DeviceInfo dev = device_info();
  constexpr int64_t kStatic = static_cast<int64_t>(sizeof(float)) * (kMmaWarps * MT * 16 * 8 * NT + 8 * NT);
  const int64_t ring = static_cast<int64_t>(kMmaWarps) * S * MmaStage<MT, CW>::kBytes;
  // x goes to shared memory when it fits without costing a block per SM (xs is at most 32 KiB per 8 rows).
  const int64_t xs = mma_xs_bytes(p.K, NT);
  const int64_t blocks_ring = std::min<int64_t>(2, dev.smem_per_sm / (ring + kStatic + 1024));
  const bool xs_on = xs <= 32 * 1024 * NT && ring + xs + kStatic <= dev.smem_optin &&
                     dev.smem_per_sm / (ring + xs + kStatic + 1024) >= blocks_ring;
  const int64_t smem = ring + (xs_on ? xs : 0);
  const int64_t per_sm = std::max<int64_t>(1, std::min<int64_t>(2, dev.smem_per_sm / (smem + kStatic + 1024)));
  TORCH_CHECK(smem + kStatic <= dev.smem_optin, "ahn_rt.gemv: ", smem + kStatic, " B of shared memory per block; the device allows ", dev.smem_optin);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    TORCH_CHECK(e == cudaSuccess, "ahn_rt.gemv: cudaFuncSetAttribute: ", cudaGetErrorString(e));
  }
  // Persistent grid: every group runs in the first wave, or each block loops over several.
  const int64_t blocks = std::min<int64_t>(groups, static_cast<int64_t>(dev.sms) * per_sm);
  launch_kernel(kernel, blocks, static_cast<size_t>(smem), stream, p, ks, xs_on);
}

// Ring shapes (chunks per stage CW, stages S): 8 warps x 4 stages of 4 KiB of weights (12 KiB in flight per
// warp), or (narrow) 4 stages of 2 KiB for MT = 1 and 2 of 4 KiB for MT = 2.
template <typename T, int MT, int NT>
void launch_mma_ring(const GemvParams& p, cudaStream_t stream) {
  if (ring_narrow()) launch_mma<T, MT, NT, 2, MT == 1 ? 4 : 2>(p, stream);
  else launch_mma<T, MT, NT, MT == 1 ? 4 : 2, 4>(p, stream);
}

template <typename T, int MT>
void launch_mma_rows(const GemvParams& p, cudaStream_t stream) {
  if (p.rows <= 8) launch_mma_ring<T, MT, 1>(p, stream);
  else if (p.rows <= 16) launch_mma_ring<T, MT, 2>(p, stream);
  else launch_mma_ring<T, MT, 4>(p, stream);
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
