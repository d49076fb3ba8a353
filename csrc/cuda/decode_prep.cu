// CUDA decode_prep kernel and its launcher: one layer's decode front (q/k norm, RoPE, gates, ring write) in
// ONE launch. Test: pytest -m cuda tests/test_ops.py -k decode_prep.
//
// Blocks [0, H) produce q (optional RMSNorm, RoPE), [H, H+Hkv) write k into its ring slot (ring_slot,
// docs/semantics.md §7), [H+Hkv, H+2Hkv) write v, and the last block (AHN layers) writes the gates; each
// evicts the slot's old content first when pos >= sinks + window (§3). pos is read on the device, so a
// captured graph replays it for every token.
#include <cuda_runtime.h>

#include "../common.h"
#include "launch.cuh"

namespace ahn_rt {
namespace {

constexpr int kPrepThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kPrepThreads) decode_prep_kernel(const DecodePrepParams p0) {
  pdl_wait();  // a no-op without PDL (AHN_RT_DECODE_PDL=0); everything below may need the previous kernel
  const DecodePrepParams p = p0.row(blockIdx.y);  // grid y: row of a batched call
  __shared__ float red[32];
  const int64_t pos = *p.pos;
  const int64_t slot = ring_slot(pos, p.sinks, p.window);
  const bool gated = p.dt_bias != nullptr;  // an AHN memory: its gates are kept per slot and evicted
  const bool evict = gated && pos >= p.sinks + p.window;
  const int64_t H = p.H, Hkv = p.Hkv, D = p.D, half = D / 2, ps = p.proj_stride;
  const T* proj = static_cast<const T*>(p.proj);
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;

  if (row < H + Hkv) {  // q head or k head: norm + RoPE
    const bool is_q = row < H;
    const int64_t j = row - H;
    const T* src = proj + row * D * ps;
    const T* nw = static_cast<const T*>(is_q ? p.q_norm : p.k_norm);
    float rs = 1.f;
    if (nw != nullptr) {
      float ss = 0.f;
      for (int64_t i = tid; i < D; i += blockDim.x) {
        const float v = static_cast<float>(src[i * ps]);
        ss += v * v;
      }
      ss = block_sum(ss, red);
      rs = 1.f / sqrtf(ss / static_cast<float>(D) + p.norm_eps);
    }
    T* dst;
    if (is_q) {
      dst = static_cast<T*>(p.q_out) + row * D;
    } else {
      dst = static_cast<T*>(p.k_cache) + j * p.kc_s0 + slot * p.kc_s1;
      if (evict) {
        T* ke = static_cast<T*>(p.k_evict) + j * p.ke_s0;
        for (int64_t i = tid; i < D; i += blockDim.x) ke[i] = dst[i];
      }
      __syncthreads();  // every old value is read before any thread overwrites the slot
    }
    for (int64_t i = tid; i < half; i += blockDim.x) {
      float x0 = static_cast<float>(src[i * ps]);
      float x1 = static_cast<float>(src[(i + half) * ps]);
      if (nw != nullptr) {
        x0 = round_to<T>(static_cast<float>(nw[i]) * round_to<T>(x0 * rs));
        x1 = round_to<T>(static_cast<float>(nw[i + half]) * round_to<T>(x1 * rs));
      }
      // HF RoPE: fp32 angle = float(pos) * inv_freq, cos/sin rounded to the model dtype (docs/semantics.md §1).
      const float angle = static_cast<float>(pos) * p.inv_freq[i];
      const float c = round_to<T>(cosf(angle)), s = round_to<T>(sinf(angle));
      // x * cos + rotate_half(x) * sin with torch's per-op rounding.
      dst[i] = T(round_to<T>(x0 * c) + round_to<T>(-x1 * s));
      dst[i + half] = T(round_to<T>(x1 * c) + round_to<T>(x0 * s));
    }
  } else if (row < H + 2 * Hkv) {  // v head: a copy (same thread reads the old value, then writes)
    const int64_t j = row - H - Hkv;
    const T* src = proj + row * D * ps;
    T* dst = static_cast<T*>(p.v_cache) + j * p.vc_s0 + slot * p.vc_s1;
    T* ve = static_cast<T*>(p.v_evict) + j * p.ve_s0;
    for (int64_t i = tid; i < D; i += blockDim.x) {
      if (evict) ve[i] = dst[i];
      dst[i] = src[i * ps];
    }
  } else if (gated) {  // gates: alpha = -exp(a_log) softplus(a + dt_bias), beta = sigmoid(b); no a_log: dt
    const bool has_beta = p.a_log != nullptr;
    const T* a = proj + (H + 2 * Hkv) * D * ps;
    const T* b = a + H * ps;
    T* bc = static_cast<T*>(p.beta_cache);
    T* be = static_cast<T*>(p.beta_evict);
    for (int64_t h = tid; h < H; h += blockDim.x) {
      float* aslot = p.alpha_cache + slot * p.ac_s0 + h * p.ac_s1;
      T* bslot = has_beta ? bc + slot * p.bc_s0 + h * p.bc_s1 : nullptr;
      if (evict) {
        p.alpha_evict[h * p.ae_s0] = *aslot;
        if (has_beta) be[h * p.be_s0] = *bslot;
      }
      const float av = softplus(static_cast<float>(a[h * ps]) + load_kind(p.dt_bias, p.dt_bias_kind, h));
      if (has_beta) {
        *aslot = -expf(load_kind(p.a_log, p.a_log_kind, h)) * av;
        *bslot = T(1.f / (1.f + expf(-static_cast<float>(b[h * ps]))));
      } else {
        *aslot = av;
      }
    }
  }
}

}  // namespace

template <typename T>
void decode_prep_cuda(const DecodePrepParams& p, void* stream) {
  const int64_t blocks = p.H + 2 * p.Hkv + (p.dt_bias != nullptr ? 1 : 0);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.batch));
  (void)launch_ex(decode_prep_kernel<T>, grid, dim3(kPrepThreads), 0, static_cast<cudaStream_t>(stream), decode_pdl_on(), 0,
                  p);  // errors: the host's launch check
}

template void decode_prep_cuda<float>(const DecodePrepParams&, void*);
template void decode_prep_cuda<c10::BFloat16>(const DecodePrepParams&, void*);
template void decode_prep_cuda<c10::Half>(const DecodePrepParams&, void*);

}  // namespace ahn_rt
