// Shared by host/*.cpp, cpu/*.cpp and cuda/*.cu: the params struct and launchers of every op, dtype and
// ring-slot helpers, device reductions, env_flag and device_info. Test: pytest tests/test_ops.py tests/test_gemv.py.
//
// Params hold raw pointers and strides in ELEMENTS; the dtype helpers mirror torch's rounding.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>

#if defined(AHN_RT_WITH_CUDA)
#include <initializer_list>
#include <mutex>
#include <utility>
#include <vector>

#include <cuda_runtime_api.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#if defined(__CUDACC__)
#define AHN_HD __host__ __device__ __forceinline__
#else
#define AHN_HD inline
#endif

namespace ahn_rt {

// Dtype of a small side tensor (gates, norm weights, o_proj, out) that kernels read or write through
// a runtime switch; the big streams (q/k/v, caches) are template parameters instead.
enum class Kind : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

AHN_HD float load_kind(const void* p, Kind kind, int64_t i) {
  switch (kind) {
    case Kind::BF16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case Kind::F16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

AHN_HD void store_kind(void* p, Kind kind, int64_t i, float v) {
  switch (kind) {
    case Kind::BF16: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v); break;
    case Kind::F16: static_cast<c10::Half*>(p)[i] = c10::Half(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// Round a float to T and back: what one torch elementwise op in dtype T does to its fp32 result
// (torch computes bf16/fp16 elementwise math in fp32 and rounds each op's output, round-to-nearest-even).
template <typename T>
AHN_HD float round_to(float x) { return static_cast<float>(T(x)); }
template <>
AHN_HD float round_to<float>(float x) { return x; }

AHN_HD float round_kind(float x, Kind kind) {
  switch (kind) {
    case Kind::BF16: return static_cast<float>(c10::BFloat16(x));
    case Kind::F16: return static_cast<float>(c10::Half(x));
    default: return x;
  }
}

// Slot of absolute position p in the sinks + ring cache (ahn_rt/ref.py: ring_slot).
AHN_HD int64_t ring_slot(int64_t p, int64_t sinks, int64_t window) {
  return p < sinks ? p : sinks + (p - sinks) % window;
}

// torch.nn.functional.softplus with its defaults (beta=1, threshold=20).
AHN_HD float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

#if defined(__CUDACC__)
// Two 16-bit floats (bf16 / fp16) as one 32-bit word, lo in the low half: for 16-byte stores.
template <typename T> __device__ __forceinline__ uint16_t bits_of(T v) {
  uint16_t u;
  memcpy(&u, &v, 2);
  return u;
}
template <typename T> __device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return static_cast<uint32_t>(bits_of(lo)) | (static_cast<uint32_t>(bits_of(hi)) << 16);
}

// Rows ty, ty + TY, ... (R of them; those past Dk read as zero) of columns col .. col + 3 of a row-major
// float32 state [Dk, Dv] (zero past Dv): one 16-byte load per row when vec (16-byte aligned rows and
// col + 4 <= Dv). The state slice of the generic memory-step kernels (gdn_decode, mamba2_decode).
template <int R, int TY>
__device__ __forceinline__ void load_state_rows(const float* S, int64_t Dk, int64_t Dv, int64_t col, int ty,
                                                bool vec, float (&s)[R][4]) {
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
}

// ---------------------------------------------------------------------------------------------
// Device reductions. Block versions need blockDim.x to be a multiple of 32 and `red` to hold 32 floats;
// every thread gets the result, and `red` may be reused right after.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? red[lane] : 0.f;
  t = warp_sum(t);
  __syncthreads();
  return t;
}
// 16-byte global -> shared copy that does not hold a register (sm_80+ cp.async, L2 only). Copies issued
// since the last commit form a group; cp_async_wait<N> waits until at most N groups are in flight.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait<0>();
}
// Programmatic dependent launch (sm_90): no-ops unless the launch set the PDL attribute. A kernel launched
// with it may start while the previous kernel still runs (once that one's blocks all called
// pdl_launch_dependents or exited); before pdl_wait it may read only what that previous kernel does not write.
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
__device__ __forceinline__ float block_max(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? red[lane] : -INFINITY;
  t = warp_max(t);
  __syncthreads();
  return t;
}
#endif

// ---------------------------------------------------------------------------------------------
// Params (pointers + strides in elements). Shapes in the comments; the host checks them.
// ---------------------------------------------------------------------------------------------
struct RmsNormParams {
  const void* x;       // [n, d], row stride x_stride, last dim contiguous
  const void* weight;  // [d], contiguous, same dtype as x
  void* out;           // [n, d] contiguous
  int64_t n, d, x_stride;
  float eps;
};

// Batched decode ops (an op called with `slots`): row b of the call reads and writes the state entry
// slots[b] of tensors whose leading dim indexes entries (caches, gates, memory, positions, eviction
// scratch) and row b of tensors whose leading dim indexes rows (proj, q, z, outputs). Each params struct
// keeps those leading strides in BYTES (0 when unbatched) and `row(b)` returns a copy with every pointer
// moved to row b / entry slots[b]; kernels call it with b from a grid dimension (slots read on the
// device), the CPU host path per row. Unbatched: slots == nullptr, batch == 1, row(0) == the params.
template <typename P>
AHN_HD P* moved(P* ptr, int64_t bytes) {
  return ptr == nullptr ? ptr : reinterpret_cast<P*>(reinterpret_cast<char*>(ptr) + bytes);
}
template <typename P>
AHN_HD const P* moved(const P* ptr, int64_t bytes) {
  return ptr == nullptr ? ptr : reinterpret_cast<const P*>(reinterpret_cast<const char*>(ptr) + bytes);
}

struct DecodePrepParams {
  // [P], stride proj_stride: [q (H*D) | k (Hkv*D) | v (Hkv*D) | memory rows]; the memory rows are
  // [a (H) | b (H) | g (H)] with a_log (GatedDeltaNet), [dt (H) | g (H)] with dt_bias alone (Mamba2).
  const void* proj;
  const float* inv_freq; // [D/2] float32, contiguous
  const int64_t* pos;    // [1] absolute position, read on the device
  const void* q_norm;    // [D] or null (same dtype as proj)
  const void* k_norm;    // [D] or null
  const void* a_log;     // [H] or null (a_log_kind): alpha = -exp(a_log) softplus(a + dt_bias), beta = sigmoid(b)
  const void* dt_bias;   // [H] or null (dt_bias_kind); without a_log: alpha = dt = softplus(a + dt_bias), no beta
  void* k_cache;         // [Hkv, C, D], last dim contiguous
  void* v_cache;
  void* beta_cache;      // [C, H] (dtype of proj) or null (given with a_log)
  float* alpha_cache;    // [C, H] float32 or null (given with dt_bias: gated, evicts)
  void* k_evict;         // [Hkv, D]
  void* v_evict;
  void* beta_evict;      // [H]
  float* alpha_evict;    // [H]
  void* q_out;           // [H, D] contiguous
  int64_t proj_stride;
  int64_t kc_s0, kc_s1, vc_s0, vc_s1;  // cache strides (head, slot)
  int64_t bc_s0, bc_s1, ac_s0, ac_s1;  // beta/alpha cache strides (slot, head)
  int64_t ke_s0, ve_s0, be_s0, ae_s0;  // evict strides (head)
  int64_t H, Hkv, D, sinks, window;
  float norm_eps;
  Kind a_log_kind, dt_bias_kind;
  // Batched call: rows move proj / q_out, entries move pos, the caches, the gate caches and the scratch.
  const int64_t* slots = nullptr;  // [batch] or null
  int64_t batch = 1;
  int64_t proj_rb = 0, q_rb = 0;                                   // bytes per row
  int64_t kc_eb = 0, vc_eb = 0, bc_eb = 0, ac_eb = 0;              // bytes per entry
  int64_t ke_eb = 0, ve_eb = 0, be_eb = 0, ae_eb = 0;
  AHN_HD DecodePrepParams row(int64_t b) const {
    DecodePrepParams r = *this;
    const int64_t e = slots != nullptr ? slots[b] : 0;
    r.proj = moved(proj, b * proj_rb);
    r.q_out = moved(q_out, b * q_rb);
    r.pos = pos + e;
    r.k_cache = moved(k_cache, e * kc_eb);
    r.v_cache = moved(v_cache, e * vc_eb);
    r.beta_cache = moved(beta_cache, e * bc_eb);
    r.alpha_cache = moved(alpha_cache, e * ac_eb);
    r.k_evict = moved(k_evict, e * ke_eb);
    r.v_evict = moved(v_evict, e * ve_eb);
    r.beta_evict = moved(beta_evict, e * be_eb);
    r.alpha_evict = moved(alpha_evict, e * ae_eb);
    return r;
  }
};

struct SwaDecodeParams {
  const void* q;        // [H, D], row stride q_stride
  const void* k_cache;  // [Hkv, C, D], last dim contiguous
  const void* v_cache;
  const int64_t* pos;   // [1]
  void* out;            // [H, D] contiguous
  float* o_part;        // CUDA scratch [H, nsplit, D] float32 (unnormalized partial outputs)
  float* ml_part;       // CUDA scratch [H, nsplit, 2] float32 (running max in log2 units, sum)
  int64_t q_stride, kc_s0, kc_s1, vc_s0, vc_s1;
  int64_t H, Hkv, C, D, sinks, window;
  int64_t chunk, nsplit;  // CUDA: keys per split, splits per kv head (fixed from C and the device)
  int64_t split_blocks = 0;  // CUDA tensor-core kernel: blocks along the splits, each taking every
                             // split_blocks-th split (<= nsplit; 0: nsplit)
  float scale;
  // Batched call: rows move q, out and the CUDA scratch; entries move pos and the caches.
  const int64_t* slots = nullptr;  // [batch] or null
  int64_t batch = 1;
  int64_t q_rb = 0, out_rb = 0, op_rb = 0, ml_rb = 0;  // bytes per row
  int64_t kc_eb = 0, vc_eb = 0;                         // bytes per entry
  AHN_HD SwaDecodeParams row(int64_t b) const {
    SwaDecodeParams r = *this;
    const int64_t e = slots != nullptr ? slots[b] : 0;
    r.q = moved(q, b * q_rb);
    r.out = moved(out, b * out_rb);
    r.o_part = moved(o_part, b * op_rb);
    r.ml_part = moved(ml_part, b * ml_rb);
    r.pos = pos + e;
    r.k_cache = moved(k_cache, e * kc_eb);
    r.v_cache = moved(v_cache, e * vc_eb);
    return r;
  }
};

struct GdnDecodeParams {
  float* state;              // [H, Dk, Dv] float32, contiguous
  const void* q;             // [H, Dk], row stride q_stride   (dtype T)
  const void* k;             // [Hkv, Dk], row stride k_stride (dtype T)
  const void* v;             // [Hkv, Dv], row stride v_stride (dtype T)
  const void* beta;          // [H], stride beta_stride
  const void* alpha;         // [H], stride alpha_stride: log-decay of the evicted token
  const void* z;             // [H], stride z_stride
  const void* norm_weight;   // [Dv] contiguous
  const void* o_proj;        // [H, Dv, Dv] contiguous (in, out)
  void* out;                 // [H, Dv], row stride out_stride, last dim contiguous
  const int64_t* pos;        // [1]
  int64_t q_stride, k_stride, v_stride, beta_stride, alpha_stride, z_stride, out_stride;
  int64_t H, Hkv, Dk, Dv, sinks, window;
  float eps;
  Kind beta_kind, alpha_kind, z_kind, nw_kind, op_kind, out_kind;
  // Batched call: rows move q, z and out; entries move pos, the state and the evicted token (k, v, beta, alpha).
  const int64_t* slots = nullptr;  // [batch] or null
  int64_t batch = 1;
  int64_t q_rb = 0, z_rb = 0, out_rb = 0;                          // bytes per row
  int64_t state_eb = 0, k_eb = 0, v_eb = 0, beta_eb = 0, alpha_eb = 0;  // bytes per entry
  AHN_HD GdnDecodeParams row(int64_t b) const {
    GdnDecodeParams r = *this;
    const int64_t e = slots != nullptr ? slots[b] : 0;
    r.q = moved(q, b * q_rb);
    r.z = moved(z, b * z_rb);
    r.out = moved(out, b * out_rb);
    r.pos = pos + e;
    r.state = moved(state, e * state_eb);
    r.k = moved(k, e * k_eb);
    r.v = moved(v, e * v_eb);
    r.beta = moved(beta, e * beta_eb);
    r.alpha = moved(alpha, e * alpha_eb);
    return r;
  }
};

// The Mamba2 memory step of a decoded token (reference: ahn_rt/ref.py mamba2_decode_ref; docs/semantics.md
// §11.2): M <- exp(dt A) M + dt k^ v^T, o = M^T q^, then an RMSNorm over all H*Dv values of o * silu(z) and
// the grouped o_proj. The norm crosses heads, so CUDA runs two kernels: the state step writes o (rounded to
// T) to the float32 scratch o_buf, the output kernel reads all of it.
struct Mamba2DecodeParams {
  float* state;              // [H, Dk, Dv] float32, contiguous
  const void* q;             // [H, Dk], row stride q_stride   (dtype T)
  const void* k;             // [Hkv, Dk], row stride k_stride (dtype T)
  const void* v;             // [Hkv, Dv], row stride v_stride (dtype T)
  const void* dt;            // [H], stride dt_stride: dt of the evicted token
  const void* a_log;         // [H] contiguous
  const void* z;             // [H], stride z_stride
  const void* norm_weight;   // [H * Dv] contiguous
  const void* o_proj;        // [H, Dv, Dv] contiguous (in, out)
  void* out;                 // [H, Dv], row stride out_stride, last dim contiguous
  float* o_buf;              // CUDA scratch: o [H, Dv] (rounded to T), then sums of squares [H, kMamba2Slices]
  const int64_t* pos;        // [1]
  int64_t q_stride, k_stride, v_stride, dt_stride, z_stride, out_stride;
  int64_t H, Hkv, Dk, Dv, sinks, window;
  float eps;
  Kind dt_kind, a_log_kind, z_kind, nw_kind, op_kind, out_kind;
  // Batched call: rows move q, z, out and o_buf; entries move pos, the state and the evicted token (k, v, dt).
  const int64_t* slots = nullptr;  // [batch] or null
  int64_t batch = 1;
  int64_t q_rb = 0, z_rb = 0, out_rb = 0, ob_rb = 0;       // bytes per row
  int64_t state_eb = 0, k_eb = 0, v_eb = 0, dt_eb = 0;      // bytes per entry
  AHN_HD Mamba2DecodeParams row(int64_t b) const {
    Mamba2DecodeParams r = *this;
    const int64_t e = slots != nullptr ? slots[b] : 0;
    r.q = moved(q, b * q_rb);
    r.z = moved(z, b * z_rb);
    r.out = moved(out, b * out_rb);
    r.o_buf = moved(o_buf, b * ob_rb);
    r.pos = pos + e;
    r.state = moved(state, e * state_eb);
    r.k = moved(k, e * k_eb);
    r.v = moved(v, e * v_eb);
    r.dt = moved(dt, e * dt_eb);
    return r;
  }
};

// mamba2_decode CUDA: state-kernel blocks per head (each W = gdn_slice_cols(Dv) state columns), i.e. the
// per-head sums of squares its output kernel reads from o_buf (block 0 zeroes the slices a Dv lacks).
constexpr int64_t kMamba2Slices = 8;

// out = [residual +] epilogue(weight @ rms_norm?(x [+ x_add]) [+ bias]) (reference: ahn_rt/ref.py gemv_ref).
struct GemvParams {
  const void* x;            // [rows, K], strides x_row_stride, x_stride (dtype T)
  const void* weight;       // [N, K] row-major contiguous (dtype T)
  const void* bias;         // [N], stride bias_stride, or null (dtype T)
  const void* norm_weight;  // [K], stride nw_stride, or null (dtype T): RMSNorm x first
  const void* residual;     // [rows, N_out], strides res_row_stride, res_stride, or null (dtype T)
  void* out;                // [rows, N_out] contiguous: float32 if out_float, else T
  int64_t x_stride, bias_stride, nw_stride, res_stride;
  int64_t rows = 1;         // tokens of different sequences (CPU: each weight row read once for all)
  int64_t x_row_stride = 0, res_row_stride = 0;
  int64_t N, K;             // weight rows, columns
  int64_t N_out;            // N, or N / 2 with silu_mul (rows [0, N/2) gate, [N/2, N) up)
  float norm_eps;
  bool silu_mul, out_float;
  bool pdl = false;         // CUDA: launch with programmatic dependent launch (weights written by no earlier kernel)
  // [rows, K] with x's strides, or null (dtype T): the GEMV multiplies x_eff = T(float(x) + float(x_add)) (never
  // with norm_weight or silu_mul). Last, so the other members keep their offsets.
  const void* x_add = nullptr;
};

// The sequential part of the chunked gated delta rule (reference: ahn_rt/ref.py gdn_chunk_scan_ref;
// docs/semantics.md §5): for each chunk n of C tokens, with S the state at the chunk's start,
//   v_new[n] = u[n] - w[n] S,   o_inter[n] = qg[n] S,   S <- gl[n] S + kd[n]^T v_new[n].
// Everything float32 and contiguous.
struct GdnChunkScanParams {
  const float* w;      // [H, N, C, Dk], or null: no delta correction (Mamba2), v_new = u
  const float* u;      // [H, N, C, Dv]
  const float* kd_t;   // [H, N, Dk, C]  (kd transposed: the update reads it column by column)
  const float* qg;     // [H, N, C, Dk]
  const float* gl;     // [H, N]
  float* state;        // [H, Dk, Dv], read, then overwritten with the final state
  float* v_new;        // [H, N, C, Dv]
  float* o_inter;      // [H, N, C, Dv]
  int64_t H, N, C, Dk, Dv;
};

// The chunk-local part of the chunked gated delta rule (reference: ahn_rt/ref.py gdn_chunk_prep_ref;
// docs/semantics.md §5): the n tokens in N chunks of C = kScanChunk (rows past n count as k = v = q = 0,
// beta = alpha = 0). Per head h and chunk, with k^, q^ the l2-normalized rows (q^ times scale) and G the
// cumulative log-decay:  A_ij = beta_i e^(G_i - G_j) k^_i.k^_j (j < i),  (I + A) [w | u] =
// [diag(beta e^G) K^ | diag(beta) V],  kd_t = (K^ e^(G_C - G))^T,  qg = e^G Q^,  gl = e^(G_C),
// P = tril(Q^ K^T e^(G_i - G_j)) (diagonal included). The outputs are gdn_chunk_scan's inputs and P.
// With mamba2 (ahn_rt.mamba2_chunk_prep): the Mamba2 memory's chunk form, no delta correction: k^, q^ are
// F.normalize in T (eps 1e-12, no scale), beta holds dt, alpha holds A_log [H], G the cumulative
// dt * (-exp(A_log)) in float64, u = diag(dt) V, and there is no A and no w.
struct GdnChunkPrepParams {
  const void* q;       // [n, H, Dk] (T), strides q_s0, q_s1, last dim 1
  const void* k;       // [n, Hkv, Dk] (T), strides k_s0, k_s1: query head h reads kv head h / (H / Hkv)
  const void* v;       // [n, Hkv, Dv] (T), strides v_s0, v_s1
  const void* beta;    // [n, H] (beta_kind), strides b_s0, b_s1 (Mamba2: dt)
  const void* alpha;   // [n, H] (alpha_kind), strides a_s0, a_s1: the log-decay (<= 0) (Mamba2: A_log [H], a_s1)
  int64_t q_s0, q_s1, k_s0, k_s1, v_s0, v_s1, b_s0, b_s1, a_s0, a_s1;
  Kind beta_kind, alpha_kind;
  float scale;
  bool mamba2;
  float* w;            // [H, N, C, Dk]   all outputs float32, contiguous (Mamba2: no w, null)
  float* u;            // [H, N, C, Dv]
  float* kd_t;         // [H, N, Dk, C]
  float* qg;           // [H, N, C, Dk]
  float* gl;           // [H, N]
  float* P;            // [H, N, C, C]
  int64_t n, H, Hkv, N, C, Dk, Dv;
};
// The l2 normalization of the gated delta rule's q and k: x / (||x|| + eps) (ahn_rt/ref.py L2_EPS).
constexpr float kGdnL2Eps = 1e-6f;

// Prefill attention: the partial results of up to kMergeMaxParts kernel calls, each over a block of keys
// for rows [off, off + n) of the chunk, combined by log-sum-exp (reference: ahn_rt/ref.py attn_merge_ref).
// 16: a steady chunk at the 3B geometry is 9 to 11 calls (ladder pieces, the band, the causal block), all
// merged in one pass, each output rounded once.
constexpr int kMergeMaxParts = 16;
struct AttnMergeParams {
  const void* o[kMergeMaxParts];      // [n, H, D] (dtype T), strides o_s0 (row), o_s1 (head), last dim 1
  const float* lse[kMergeMaxParts];   // [H, n] float32, head stride lse_s0, row stride 1
  int64_t off[kMergeMaxParts], n[kMergeMaxParts], o_s0[kMergeMaxParts], o_s1[kMergeMaxParts],
      lse_s0[kMergeMaxParts];
  int64_t parts, rows, H, D;
  void* out;                          // [rows, H, D] contiguous (dtype T)
};

// Attention of Tq queries over n >= Tq keys under a bottom-right causal diagonal: query i sees key j iff
// j <= i + (n - Tq) and, with left > 0, j > i + (n - Tq) - left (the `left` keys ending at its diagonal).
// q [Tq, H, D] (strides q_s0, q_s1), k / v [n, Hkv, D] (strides k_s0, k_s1 / v_s0, v_s1), last dims 1; H a
// multiple of Hkv (query head h reads kv head h / (H / Hkv)). out [Tq, H, D] contiguous (dtype T); lse
// [H, Tq] float32 contiguous, the natural log-sum-exp of each row's scaled scores. With a kv_len tensor
// (int32 [1]) only the first kv_len rows of k / v are keys (n = kv_len; the CPU kernel gets it read; on CUDA
// the caller keeps Tq <= kv_len <= the rows, which the host cannot check without a sync, and the rows past
// kv_len finite). With a q_len tensor likewise only the first q_len rows of q are queries (nq = q_len, the
// diagonal at the corner of nq x n): out and lse rows past them are not written on CUDA, zero and -inf on the
// CPU; Tq stays the buffers' row count (lse's stride).
struct BandAttentionParams {
  const void *q, *k, *v;
  void* out;
  float* lse;
  int64_t Tq, nq, n, H, Hkv, D, left;
  int64_t q_s0, q_s1, k_s0, k_s1, v_s0, v_s1;
  float scale;
};

// y = silu(x[:, :N]) * x[:, N:] for x [rows, 2N] (row stride x_s0), both ops rounded to T as torch does.
struct SiluMulParams {
  const void* x;
  void* out;           // [rows, N] contiguous
  int64_t rows, N, x_s0;
};

// Rotate-half RoPE of a prefill chunk: out = x * cos + rotate_half(x) * sin with every op rounded to T as
// torch's (mul, mul, add). x [T, nh, D] (strides x_s0, x_s1, last dim 1); cos, sin [T, D] contiguous (T);
// out [T, nh, D] contiguous.
struct RopeParams {
  const void* x;
  const void* cos;
  const void* sin;
  void* out;
  int64_t T, nh, D, x_s0, x_s1;
};

// The GatedDeltaNet output norm of a prefill chunk: y = (o * rsqrt(mean(o^2) + eps)) * w * z * sigmoid(z)
// per (row, head) in float32, rounded once to T. o [n, H, D] (strides o_s0, o_s1, last dim 1, T);
// z [n, H] (z_kind, strides z_s0, z_s1); w [D] (w_kind, stride w_s0); y [n, H, D] contiguous (T).
struct GateNormParams {
  const void* o;
  const void* z;
  const void* w;
  void* y;
  int64_t n, H, D, o_s0, o_s1, z_s0, z_s1, w_s0;
  Kind z_kind, w_kind;
  float eps;
};

// ---------------------------------------------------------------------------------------------
// Launchers. T is float, c10::BFloat16 or c10::Half (explicitly instantiated in the backend files).
// ---------------------------------------------------------------------------------------------
template <typename T> void rms_norm_cpu(const RmsNormParams& p);
template <typename T> void decode_prep_cpu(const DecodePrepParams& p);
template <typename T> void swa_decode_cpu(const SwaDecodeParams& p);
template <typename T> void gdn_decode_cpu(const GdnDecodeParams& p);
template <typename T> void mamba2_decode_cpu(const Mamba2DecodeParams& p);
template <typename T> void gemv_cpu(const GemvParams& p);
void gdn_chunk_scan_cpu(const GdnChunkScanParams& p);
template <typename T> void gdn_chunk_prep_cpu(const GdnChunkPrepParams& p);
template <typename T> void attn_merge_cpu(const AttnMergeParams& p);
template <typename T> void band_attention_cpu(const BandAttentionParams& p);
template <typename T> void silu_mul_cpu(const SiluMulParams& p);
template <typename T> void rope_cpu(const RopeParams& p);
template <typename T> void gate_norm_cpu(const GateNormParams& p);

// `stream` is a cudaStream_t (kept as void*: the CPU build of this header needs no CUDA headers).
template <typename T> void rms_norm_cuda(const RmsNormParams& p, void* stream);
template <typename T> void decode_prep_cuda(const DecodePrepParams& p, void* stream);
template <typename T> void swa_decode_cuda(const SwaDecodeParams& p, void* stream);
template <typename T> void gdn_decode_cuda(const GdnDecodeParams& p, void* stream);
template <typename T> void mamba2_decode_cuda(const Mamba2DecodeParams& p, void* stream);
template <typename T> void gemv_cuda(const GemvParams& p, void* stream);
void gdn_chunk_scan_cuda(const GdnChunkScanParams& p, void* stream);
template <typename T> void gdn_chunk_prep_cuda(const GdnChunkPrepParams& p, void* stream);
template <typename T> void attn_merge_cuda(const AttnMergeParams& p, void* stream);
template <typename T> void silu_mul_cuda(const SiluMulParams& p, void* stream);
template <typename T> void rope_cuda(const RopeParams& p, void* stream);
template <typename T> void gate_norm_cuda(const GateNormParams& p, void* stream);

// swa_decode CUDA tensor-core path (fp16 / bf16): keys per shared-memory pipeline stage (16 per warp of
// 4), stages, and the dynamic shared memory of one block: Q [16][DT + 8] + stages x {K, V} [64][DT + 8]
// with DT the head-dim tile (64, 128 or 256; rows padded by 16 bytes against bank conflicts).
constexpr int64_t kSwaTileKeys = 64;
constexpr int64_t kSwaStages = 2;
inline int64_t swa_head_tile(int64_t D) { return D <= 64 ? 64 : (D <= 128 ? 128 : 256); }
inline int64_t swa_mma_smem_bytes(int64_t D) {
  return (16 + kSwaStages * 2 * kSwaTileKeys) * (swa_head_tile(D) + 8) * 2;
}

// GDN CUDA kernel: one cluster of ceil(Dv / W) <= 8 blocks per head, block b owning state columns
// [b W, b W + W) with W = gdn_slice_cols(Dv) (8, 16 or 32).
inline int64_t gdn_slice_cols(int64_t Dv) { return Dv <= 64 ? 8 : (Dv <= 128 ? 16 : 32); }

// gdn_chunk_scan CUDA kernel: one block per (head, slice of kScanCols state columns); chunks of exactly
// kScanChunk tokens; Dk a multiple of 4 and at most kScanMaxDk (its tiles live in shared memory).
constexpr int64_t kScanCols = 16;
constexpr int64_t kScanChunk = 64;
constexpr int64_t kScanMaxDk = 128;

// gemv CUDA kernels: sequences per launch (the host runs larger B in groups).
constexpr int64_t kGemvMaxRows = 32;

// ---------------------------------------------------------------------------------------------
// Host-side helpers shared by the host entry functions and the CUDA launchers.
// ---------------------------------------------------------------------------------------------
// A kernel A/B switch from the environment (AHN_RT_GEMV_SIMT, AHN_RT_GDN_GENERIC, ...): `on_by_default` when
// `name` is unset or empty, else true unless its value starts with '0'. Reads the environment on every call; a
// caller that wants one value for the whole process caches the result.
inline bool env_flag(const char* name, bool on_by_default = false) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return on_by_default;
  return v[0] != '0';
}

#if defined(AHN_RT_WITH_CUDA)
// Attributes of the current CUDA device, read once per device: SM count, shared memory per SM, and the
// largest opt-in shared memory of one block.
struct DeviceInfo {
  int sms = 0;
  int smem_per_sm = 0;
  int smem_optin = 0;
};

inline DeviceInfo device_info() {
  static std::mutex mu;
  static std::vector<DeviceInfo> infos;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  TORCH_CHECK(e == cudaSuccess, "ahn_rt: cudaGetDevice: ", cudaGetErrorString(e));
  std::lock_guard<std::mutex> lock(mu);
  if (infos.size() <= static_cast<size_t>(dev)) infos.resize(dev + 1);
  DeviceInfo& d = infos[dev];
  if (d.sms == 0) {
    for (auto [attr, out] : {std::pair{cudaDevAttrMultiProcessorCount, &d.sms},
                             std::pair{cudaDevAttrMaxSharedMemoryPerMultiprocessor, &d.smem_per_sm},
                             std::pair{cudaDevAttrMaxSharedMemoryPerBlockOptin, &d.smem_optin}}) {
      e = cudaDeviceGetAttribute(out, attr, dev);
      TORCH_CHECK(e == cudaSuccess, "ahn_rt: cudaDeviceGetAttribute: ", cudaGetErrorString(e));
    }
  }
  return d;
}
#endif

}  // namespace ahn_rt
