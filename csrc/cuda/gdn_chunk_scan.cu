// CUDA gdn_chunk_scan kernel: the chunk-to-chunk recurrence of the chunked gated delta rule, the one
// sequential part of a GatedDeltaNet prefill (reference: ahn_rt/ref.py gdn_chunk_scan_ref; the math and the
// parallel parts around it: docs/semantics.md §5). Test: pytest -m cuda tests/test_prefill.py.
//
// One block per (head, slice of kScanCols state columns): the columns of the state are independent in the
// delta rule, so a block owns S[:, j0:j0+16] for the whole prompt, in shared memory, float32. Per chunk of
// 64 tokens the block stages w, qg (rows) and kd (transposed) in shared memory and does
//   1. v_new = u - w S and o_inter = qg S     (each thread: 4 rows x 1 column, float4 over Dk)
//   2. S <- gl S + kd^T v_new                 (each thread: Dk/16 state rows x 1 column, float4 over C)
// with two block barriers. The tiles are double-buffered: chunk n + 1's are copied in (cp.async) while
// chunk n computes. Rows are padded by 4 floats so the float4 reads of a quarter warp hit distinct banks.
// All arithmetic is float32 FMA in a fixed order: the result does not depend on the grid.
#include <cstdint>

#include <cuda_runtime.h>

#include "../common.h"

namespace ahn_rt {
namespace {

constexpr int kThreads = 256;
constexpr int BV = static_cast<int>(kScanCols);
constexpr int CH = static_cast<int>(kScanChunk);
constexpr int CP = CH + 4;  // padded row of the transposed tiles (kd^T, v_new^T)

// One stage of the pipeline: w and qg [CH][Dk + 4], kd^T [Dk][CP].
__host__ __device__ inline int64_t scan_stage_floats(int64_t Dk) { return 2 * CH * (Dk + 4) + Dk * CP; }
__host__ __device__ inline int64_t scan_smem_floats(int64_t Dk) {
  return BV * (Dk + 4) + 2 * scan_stage_floats(Dk) + BV * CP;
}

// Chunk n's w (kDelta), qg and kd^T tiles into one stage (16-byte copies, in flight until cp_async_wait).
template <bool kDelta>
__device__ __forceinline__ void scan_stage_load(const GdnChunkScanParams& p, int h, int n, float* stage) {
  const int Dk = static_cast<int>(p.Dk), DKP = Dk + 4, dk4 = Dk / 4, N = static_cast<int>(p.N);
  float* Ws = stage;
  float* Qs = Ws + CH * DKP;
  float* Kt = Qs + CH * DKP;
  const int64_t tile = (static_cast<int64_t>(h) * N + n) * CH;
  const float* w = kDelta ? p.w + tile * Dk : nullptr;
  const float* q = p.qg + tile * Dk;
  const float* k = p.kd_t + tile * Dk;
  for (int i = threadIdx.x; i < CH * dk4; i += kThreads) {
    const int r = i / dk4, c = i % dk4;
    if constexpr (kDelta) cp_async16(Ws + r * DKP + 4 * c, w + 4 * i);
    cp_async16(Qs + r * DKP + 4 * c, q + 4 * i);
  }
  for (int i = threadIdx.x; i < Dk * (CH / 4); i += kThreads) {
    const int kk = i / (CH / 4), c = i % (CH / 4);
    cp_async16(Kt + kk * CP + 4 * c, k + 4 * i);
  }
}

__device__ inline float dot4(float4 a, float4 b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

// kDelta = false: no w (Mamba2's rule), v_new = u.
template <bool kDelta>
__global__ void __launch_bounds__(kThreads) gdn_chunk_scan_kernel(GdnChunkScanParams p) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv), N = static_cast<int>(p.N);
  const int DKP = Dk + 4;
  const int h = blockIdx.y, j0 = blockIdx.x * BV;
  const int t = threadIdx.x, j = t & (BV - 1), rb = t >> 4;
  const bool col_ok = j0 + j < Dv;
  float* St = smem;                                  // [BV][DKP]  the state slice, transposed
  float* stages = St + BV * DKP;                     // 2 x {Ws [CH][DKP], Qs [CH][DKP], Kt [Dk][CP]}
  float* Ut = stages + 2 * scan_stage_floats(Dk);    // [BV][CP]   v_new^T
  const int stage_floats = static_cast<int>(scan_stage_floats(Dk));

  float* state = p.state + static_cast<int64_t>(h) * Dk * Dv;
  scan_stage_load<kDelta>(p, h, 0, stages);
  cp_async_commit();
  for (int i = t; i < BV * Dk; i += kThreads) {
    const int jj = i / Dk, k = i % Dk;
    St[jj * DKP + k] = (j0 + jj < Dv) ? state[static_cast<int64_t>(k) * Dv + j0 + jj] : 0.f;
  }
  const int dk4 = Dk / 4;
  for (int n = 0; n < N; ++n) {
    const int64_t tile = (static_cast<int64_t>(h) * N + n) * CH;
    if (n + 1 < N) scan_stage_load<kDelta>(p, h, n + 1, stages + ((n + 1) & 1) * stage_floats);
    cp_async_commit();
    float uu[4];   // this chunk's u and gl, loaded while the copies land
#pragma unroll
    for (int m = 0; m < 4; ++m) uu[m] = col_ok ? p.u[(tile + rb + 16 * m) * Dv + j0 + j] : 0.f;
    const float g = p.gl[static_cast<int64_t>(h) * N + n];
    cp_async_wait<1>();   // chunk n's stage has landed (chunk n + 1's may still be in flight)
    __syncthreads();
    float* Ws = stages + (n & 1) * stage_floats;
    float* Qs = Ws + CH * DKP;
    float* Kt = Qs + CH * DKP;
    // 1. v_new = u - w S, o_inter = qg S for rows rb + 16 m, column j.
    float au[4] = {0.f, 0.f, 0.f, 0.f}, ao[4] = {0.f, 0.f, 0.f, 0.f};
    const float4* s_row = reinterpret_cast<const float4*>(St + j * DKP);
    for (int c = 0; c < dk4; ++c) {
      const float4 s = s_row[c];
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const int r = rb + 16 * m;
        if constexpr (kDelta) au[m] = dot4(reinterpret_cast<const float4*>(Ws + r * DKP)[c], s, au[m]);
        ao[m] = dot4(reinterpret_cast<const float4*>(Qs + r * DKP)[c], s, ao[m]);
      }
    }
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int r = rb + 16 * m;
      float un = 0.f;
      if (col_ok) {
        const int64_t o = (tile + r) * Dv + j0 + j;
        un = uu[m] - au[m];
        p.v_new[o] = un;
        p.o_inter[o] = ao[m];
      }
      Ut[j * CP + r] = un;
    }
    __syncthreads();
    // 2. S <- gl S + kd^T v_new for state rows kb + 16 m, column j.
    const float4* u_row = reinterpret_cast<const float4*>(Ut + j * CP);
    for (int k = rb; k < Dk; k += 16) {
      float acc = g * St[j * DKP + k];
      const float4* kd_row = reinterpret_cast<const float4*>(Kt + k * CP);
#pragma unroll 4
      for (int c = 0; c < CH / 4; ++c) acc = dot4(kd_row[c], u_row[c], acc);
      St[j * DKP + k] = acc;
    }
    __syncthreads();
  }
  for (int i = t; i < BV * Dk; i += kThreads) {
    const int jj = i / Dk, k = i % Dk;
    if (j0 + jj < Dv) state[static_cast<int64_t>(k) * Dv + j0 + jj] = St[jj * DKP + k];
  }
}

}  // namespace

void gdn_chunk_scan_cuda(const GdnChunkScanParams& p, void* stream) {
  const size_t smem = static_cast<size_t>(scan_smem_floats(p.Dk)) * sizeof(float);
  const DeviceInfo info = device_info();
  TORCH_CHECK(static_cast<int64_t>(smem) <= info.smem_optin, "ahn_rt.gdn_chunk_scan: needs ", smem,
              " bytes of shared memory per block, the device allows ", info.smem_optin);
  // The opt-in limit is set once per device (to the device's maximum, whatever this call's Dk needs).
  static thread_local int configured_device = -1;
  int dev = 0;
  cudaGetDevice(&dev);
  if (configured_device != dev) {
    for (auto kernel : {gdn_chunk_scan_kernel<true>, gdn_chunk_scan_kernel<false>})
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, info.smem_optin);
    configured_device = dev;
  }
  const dim3 grid(static_cast<unsigned>((p.Dv + BV - 1) / BV), static_cast<unsigned>(p.H));
  auto kernel = p.w != nullptr ? gdn_chunk_scan_kernel<true> : gdn_chunk_scan_kernel<false>;
  kernel<<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p);
}

}  // namespace ahn_rt
