// CUDA kernels of the prefill's fused elementwise steps: attn_merge, silu_mul, rope, gate_norm (references:
// ahn_rt/ref.py attn_merge_ref, silu_mul_ref, rope_ref, gdn_gate_norm_ref). Test: pytest -m cuda
// tests/test_prefill.py.
//
// attn_merge: one thread per 16-byte vector of one (row, head) of the output (one element where a part's
// strides or alignment do not allow vectors); every thread forms the log-sum-exp weights of the parts
// that cover its row (at most kMergeMaxParts) and sums them in part order. One pass over the partial
// outputs instead of a chain of float32 elementwise ops.
// silu_mul: one thread per 16-byte vector of the output (or per element, as above), both ops rounded to T
// as torch's silu then mul.
// rope: one thread per rotation pair (i, i + D/2), each op rounded as torch's, no fused multiply-add.
// gate_norm: one warp per (row, head), the lanes holding D/32 values each.
#include <cstdint>
#include <initializer_list>

#include <cuda_runtime.h>

#include "../common.h"

namespace ahn_rt {
namespace {

// V consecutive elements of T, read or written as one vector (16 bytes when V = 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// A Pack loaded and stored as 16-byte words when it is 16 bytes (a struct copy of 16-bit elements may
// compile to element loads and stores), else copied as it is.
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* src) {
  Pack<T, V> r;
  if constexpr (sizeof(Pack<T, V>) == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(src);
    memcpy(&r, &u, 16);
  } else {
    r = *reinterpret_cast<const Pack<T, V>*>(src);
  }
  return r;
}

// One 16-byte global store (a plain uint4 store was split into four by the compiler in attn_merge).
__device__ __forceinline__ void st_global16(void* dst, uint4 w) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
               : "memory");
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T, V>& y) {
  if constexpr (sizeof(Pack<T, V>) == 16 && sizeof(T) == 2) {
    st_global16(dst, make_uint4(pack2(y.v[0], y.v[1]), pack2(y.v[2], y.v[3]), pack2(y.v[4], y.v[5]),
                                pack2(y.v[6], y.v[7])));
  } else if constexpr (sizeof(Pack<T, V>) == 16) {
    st_global16(dst, make_uint4(__float_as_uint(y.v[0]), __float_as_uint(y.v[1]), __float_as_uint(y.v[2]),
                                __float_as_uint(y.v[3])));
  } else {
    *reinterpret_cast<Pack<T, V>*>(dst) = y;
  }
}

// True when every pointer is 16-byte aligned and every stride a multiple of V = 16 / sizeof(T) elements: the
// kernels below then move 16 bytes per thread access, else one element.
template <typename T>
bool vec16_ok(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  constexpr int64_t V = 16 / sizeof(T);
  for (const void* q : ptrs)
    if (reinterpret_cast<uintptr_t>(q) % 16 != 0) return false;
  for (int64_t st : strides)
    if (st % V != 0) return false;
  return true;
}

template <typename T, int V>
__global__ void attn_merge_kernel(AttnMergeParams p) {
  const int64_t per_head = p.D / V;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.rows * p.H * per_head) return;
  const int64_t rh = t / per_head, d0 = (t - rh * per_head) * V;
  const int64_t r = rh / p.H, h = rh - r * p.H;
  float w[kMergeMaxParts];
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kMergeMaxParts; ++i) {
    w[i] = -INFINITY;
    if (i < p.parts) {
      const int64_t j = r - p.off[i];
      if (j >= 0 && j < p.n[i]) w[i] = p.lse[i][h * p.lse_s0[i] + j];
    }
    m = fmaxf(m, w[i]);
  }
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kMergeMaxParts; ++i) sum += (i < p.parts) ? expf(w[i] - m) : 0.f;
  const float total = m + logf(sum);
  // The loads of every covering part are issued before the sums (parts in order, one fma chain per element).
  Pack<T, V> x[kMergeMaxParts];
#pragma unroll
  for (int i = 0; i < kMergeMaxParts; ++i) {
    w[i] = (i < p.parts) ? expf(w[i] - total) : 0.f;
    const int64_t j = r - p.off[i];
    if (i < p.parts && j >= 0 && j < p.n[i])
      x[i] = load_pack<T, V>(static_cast<const T*>(p.o[i]) + j * p.o_s0[i] + h * p.o_s1[i] + d0);
    else
      w[i] = 0.f;
  }
  Pack<T, V> y;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < kMergeMaxParts; ++i)
      if (w[i] != 0.f) acc += w[i] * static_cast<float>(x[i].v[e]);
    y.v[e] = T(acc);
  }
  store_pack<T, V>(static_cast<T*>(p.out) + rh * p.D + d0, y);
}

template <typename T, int V>
__global__ void silu_mul_kernel(SiluMulParams p) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (i >= p.rows * p.N) return;
  const int64_t r = i / p.N, c = i - r * p.N;
  const T* x = static_cast<const T*>(p.x) + r * p.x_s0 + c;
  const Pack<T, V> g = load_pack<T, V>(x), u = load_pack<T, V>(x + p.N);
  Pack<T, V> y;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float gf = static_cast<float>(g.v[e]);
    const float s = round_to<T>(gf / (1.f + expf(-gf)));
    y.v[e] = T(s * static_cast<float>(u.v[e]));
  }
  store_pack<T, V>(static_cast<T*>(p.out) + i, y);
}


template <typename T>
__global__ void rope_kernel(RopeParams p) {
  const int64_t half = p.D / 2;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.T * p.nh * half) return;
  const int64_t t = i / (p.nh * half), h = (i / half) % p.nh, d = i % half;
  const T* x = static_cast<const T*>(p.x) + t * p.x_s0 + h * p.x_s1;
  const T* c = static_cast<const T*>(p.cos) + t * p.D;
  const T* s = static_cast<const T*>(p.sin) + t * p.D;
  T* out = static_cast<T*>(p.out) + (t * p.nh + h) * p.D;
  const float x1 = static_cast<float>(x[d]), x2 = static_cast<float>(x[d + half]);
  const float a1 = round_to<T>(__fmul_rn(x1, static_cast<float>(c[d])));
  const float b1 = round_to<T>(__fmul_rn(-x2, static_cast<float>(s[d])));
  const float a2 = round_to<T>(__fmul_rn(x2, static_cast<float>(c[d + half])));
  const float b2 = round_to<T>(__fmul_rn(x1, static_cast<float>(s[d + half])));
  out[d] = T(__fadd_rn(a1, b1));
  out[d + half] = T(__fadd_rn(a2, b2));
}

template <typename T>
__global__ void gate_norm_kernel(GateNormParams p) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (warp >= p.n * p.H) return;
  const int64_t r = warp / p.H, h = warp % p.H;
  const T* o = static_cast<const T*>(p.o) + r * p.o_s0 + h * p.o_s1;
  float ss = 0.f;
  for (int64_t d = lane; d < p.D; d += 32) {
    const float v = static_cast<float>(o[d]);
    ss = fmaf(v, v, ss);
  }
  const float rs = rsqrtf(warp_sum(ss) / static_cast<float>(p.D) + p.eps);
  const float z = load_kind(p.z, p.z_kind, r * p.z_s0 + h * p.z_s1);
  const float sig = 1.f / (1.f + expf(-z));
  T* y = static_cast<T*>(p.y) + (r * p.H + h) * p.D;
  for (int64_t d = lane; d < p.D; d += 32) {
    const float v = __fmul_rn(__fmul_rn(static_cast<float>(o[d]), rs), load_kind(p.w, p.w_kind, d * p.w_s0));
    y[d] = T(__fmul_rn(__fmul_rn(v, z), sig));
  }
}

}  // namespace

template <typename T>
void attn_merge_cuda(const AttnMergeParams& p, void* stream) {
  constexpr int V = 16 / sizeof(T);
  bool vec = p.D % V == 0 && vec16_ok<T>({p.out}, {});
  for (int64_t i = 0; i < p.parts && vec; ++i) vec = vec16_ok<T>({p.o[i]}, {p.o_s0[i], p.o_s1[i]});
  const int64_t threads_needed = p.rows * p.H * (vec ? p.D / V : p.D);
  const int threads = 256;
  const auto blocks = static_cast<unsigned>((threads_needed + threads - 1) / threads);
  const auto st = static_cast<cudaStream_t>(stream);
  if (vec)
    attn_merge_kernel<T, V><<<blocks, threads, 0, st>>>(p);
  else
    attn_merge_kernel<T, 1><<<blocks, threads, 0, st>>>(p);
}

template <typename T>
void silu_mul_cuda(const SiluMulParams& p, void* stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = p.N % V == 0 && vec16_ok<T>({p.x, p.out}, {p.x_s0});
  const int64_t n = p.rows * p.N / (vec ? V : 1);
  const int threads = 256;
  const auto blocks = static_cast<unsigned>((n + threads - 1) / threads);
  const auto st = static_cast<cudaStream_t>(stream);
  if (vec)
    silu_mul_kernel<T, V><<<blocks, threads, 0, st>>>(p);
  else
    silu_mul_kernel<T, 1><<<blocks, threads, 0, st>>>(p);
}

template <typename T>
void rope_cuda(const RopeParams& p, void* stream) {
  const int64_t n = p.T * p.nh * (p.D / 2);
  const int threads = 256;
  rope_kernel<T><<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0,
                   static_cast<cudaStream_t>(stream)>>>(p);
}

template <typename T>
void gate_norm_cuda(const GateNormParams& p, void* stream) {
  const int64_t warps = p.n * p.H;
  const int threads = 256;
  gate_norm_kernel<T><<<static_cast<unsigned>((warps * 32 + threads - 1) / threads), threads, 0,
                        static_cast<cudaStream_t>(stream)>>>(p);
}

template void attn_merge_cuda<float>(const AttnMergeParams&, void*);
template void attn_merge_cuda<c10::BFloat16>(const AttnMergeParams&, void*);
template void attn_merge_cuda<c10::Half>(const AttnMergeParams&, void*);
template void silu_mul_cuda<float>(const SiluMulParams&, void*);
template void silu_mul_cuda<c10::BFloat16>(const SiluMulParams&, void*);
template void silu_mul_cuda<c10::Half>(const SiluMulParams&, void*);

template void rope_cuda<float>(const RopeParams&, void*);
template void rope_cuda<c10::BFloat16>(const RopeParams&, void*);
template void rope_cuda<c10::Half>(const RopeParams&, void*);
template void gate_norm_cuda<float>(const GateNormParams&, void*);
template void gate_norm_cuda<c10::BFloat16>(const GateNormParams&, void*);
template void gate_norm_cuda<c10::Half>(const GateNormParams&, void*);

}  // namespace ahn_rt
