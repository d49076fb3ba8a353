// CUDA fused decode GEMV kernel (ahn_rt.gemv, batch 1) and its launcher.
// Test: pytest -m cuda tests/test_gemv.py; timing: python bench/gemv_bench.py (on a GPU).
//
// The step is bound by reading the weights once: a persistent grid of 256-thread blocks; each block stages
// x (RMS-normalized if asked; each block does the sum of squares itself) in shared memory as float32, while
// its warps' first weight loads are already in flight; each warp owns whole rows and streams them with
// 16-byte non-allocating loads, 8 per lane in flight; warp-shuffle reduction; bias / SiLU(gate) * up /
// residual epilogue with one rounding. K % (16 / sizeof(T)) != 0 or a misaligned weight takes a scalar path.
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

// Programmatic dependent launch (sm_90): no-ops unless the launch set the PDL attribute.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
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

// AHN_RT_GEMV_PDL=1 launches with programmatic dependent launch (the weight prefetch overlaps the end of
// the previous kernel). Read on every call so that a benchmark can compare both in one process.
bool pdl_enabled() { return env_flag("AHN_RT_GEMV_PDL"); }

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
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, p);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // a bad launch configuration is not sticky: leave no stale error behind
    TORCH_CHECK(false, "ahn_rt.gemv: launch failed (grid ", blocks, ", shared memory ", smem, " B): ",
                cudaGetErrorString(e));
  }
}

}  // namespace

template <typename T>
void gemv_cuda(const GemvParams& p, void* stream_ptr) {
  constexpr int VEC = VecOf<T>::n;
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const bool vector = p.K % VEC == 0 && (reinterpret_cast<uintptr_t>(p.weight) & 15) == 0;
  // silu_mul: a task is the (gate, up) row pair of one output. Else one row, 8 x 16 B per lane in flight.
  if (p.silu_mul) {
    if (vector) launch<T, 2, 4, true>(p, stream);
    else launch<T, 2, 4, false>(p, stream);
  } else {
    if (vector) launch<T, 1, 8, true>(p, stream);
    else launch<T, 1, 8, false>(p, stream);
  }
}

template void gemv_cuda<float>(const GemvParams&, void*);
template void gemv_cuda<c10::BFloat16>(const GemvParams&, void*);
template void gemv_cuda<c10::Half>(const GemvParams&, void*);

}  // namespace ahn_rt
