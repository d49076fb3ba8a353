// Shared by the checked host entry functions (host/<op>.cpp) and ops.cpp, which registers them: the dtype
// dispatch, the argument checks and the entry functions' declarations.
// Test: pytest tests/test_ops.py tests/test_gemv.py.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

#ifdef AHN_RT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "../common.h"

namespace ahn_rt {

// The Kind of a side tensor that kernels read through load_kind / store_kind.
inline Kind kind_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return Kind::F32;
    case at::kBFloat16: return Kind::BF16;
    case at::kHalf: return Kind::F16;
    default: TORCH_CHECK(false, what, ": dtype must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return Kind::F32;
}

// Calls f(T{}) with T the C++ type of `dtype` (float, c10::BFloat16, c10::Half).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": dtype must be float32, bfloat16 or float16, got ", dtype);
  }
}

// Runs the op's kernel for t's device and dtype: cuda(tag, stream) under a device guard with the launch
// error checked, else cpu(tag) on the CPU (tag: a value of the C++ type of `dtype`).
template <typename Cuda, typename Cpu>
void dispatch_device(const at::Tensor& t, at::ScalarType dtype, const char* op, Cuda&& cuda, Cpu&& cpu) {
#ifdef AHN_RT_WITH_CUDA
  if (t.is_cuda()) {
    const c10::cuda::CUDAGuard guard(t.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_dtype(dtype, op, [&](auto tag) { cuda(tag, static_cast<void*>(stream)); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#else
  (void)cuda;
#endif
  TORCH_CHECK(t.is_cpu(), op, ": no kernel for device ", t.device());
  dispatch_dtype(dtype, op, [&](auto tag) { cpu(tag); });
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", what, " is on ", t.device(), " but the op runs on ",
              ref.device());
}

// pos: int64 [1] on the op's device (the kernels read it there, so a captured graph replays it).
inline void check_pos(const at::Tensor& pos, const at::Tensor& ref, const char* op) {
  check_same_device(ref, pos, op, "pos (int64 [1], kept on the device: the kernel reads it)");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.numel() == 1, op, ": pos must be an int64 tensor [1], got ",
              pos.scalar_type(), " ", pos.sizes());
}

// A 1-D input of n elements (any element stride) on ref's device.
inline void check_vec(const at::Tensor& t, int64_t n, const at::Tensor& ref, const char* op, const char* what) {
  check_same_device(ref, t, op, what);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", what, " must be [", n, "], got ", t.sizes());
}

// check_vec, and t has x's dtype.
inline void check_vec_like(const at::Tensor& t, int64_t n, const at::Tensor& x, const char* op, const char* what) {
  check_vec(t, n, x, op, what);
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", what, " dtype ", t.scalar_type(),
              " must equal x dtype ", x.scalar_type());
}

// The tensors every memory decode step (gdn_decode, mamba2_decode) takes, one row's shapes: state
// [H, Dk, Dv] contiguous float32; q [H, Dk], k [Hkv, Dk], v [Hkv, Dv] of one dtype with contiguous rows
// (rows may be strided), H % Hkv == 0; z [H]; o_proj [H, Dv, Dv] contiguous; out [H, Dv] with a contiguous
// last dim; pos. Returns {H, Hkv, Dk, Dv}.
struct MemoryStepDims {
  int64_t H, Hkv, Dk, Dv;
};
inline MemoryStepDims check_memory_step(const at::Tensor& state, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& z, const at::Tensor& o_proj,
                                        const at::Tensor& out, const at::Tensor& pos, const char* op) {
  TORCH_CHECK(state.dim() == 3, op, ": state must be [H, Dk, Dv], got ", state.sizes());
  const int64_t H = state.size(0), Dk = state.size(1), Dv = state.size(2);
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous(), op,
              ": state must be a contiguous float32 tensor");
  TORCH_CHECK(q.dim() == 2 && q.size(0) == H && q.size(1) == Dk, op, ": q must be [", H, ", ", Dk, "], got ",
              q.sizes());
  TORCH_CHECK(k.dim() == 2 && k.size(1) == Dk && k.size(0) > 0 && H % k.size(0) == 0, op, ": k must be [Hkv, ",
              Dk, "] with H % Hkv == 0, got ", k.sizes());
  const int64_t Hkv = k.size(0);
  TORCH_CHECK(v.dim() == 2 && v.size(0) == Hkv && v.size(1) == Dv, op, ": v must be [", Hkv, ", ", Dv,
              "], got ", v.sizes());
  for (const at::Tensor* t : {&q, &k, &v}) {
    check_same_device(state, *t, op, "q/k/v");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": q, k, v must share one dtype");
    TORCH_CHECK(t->stride(1) == 1, op, ": q/k/v rows must be contiguous (rows may be strided)");
  }
  check_vec(z, H, state, op, "z");
  check_same_device(state, o_proj, op, "o_proj");
  TORCH_CHECK(o_proj.dim() == 3 && o_proj.size(0) == H && o_proj.size(1) == Dv && o_proj.size(2) == Dv, op,
              ": o_proj must be [", H, ", ", Dv, ", ", Dv, "], got ", o_proj.sizes());
  TORCH_CHECK(o_proj.is_contiguous(), op, ": o_proj must be contiguous");
  check_same_device(state, out, op, "out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == H && out.size(1) == Dv && out.stride(1) == 1, op,
              ": out must be [", H, ", ", Dv, "] with a contiguous last dim, got ", out.sizes());
  check_pos(pos, state, op);
  return {H, Hkv, Dk, Dv};
}

// slots of a batched decode op: int64 [B] (B >= 1), contiguous, on ref's device, indexing entries [0, n)
// of the per-entry tensors, B <= n. On the CPU each slot is checked in range and distinct; on CUDA that is
// the caller's contract (a check would cost a host sync; the kernels read slots on the device, so a
// captured graph replays whatever the slots buffer holds then). Returns B.
inline int64_t check_slots(const at::Tensor& slots, int64_t n, const at::Tensor& ref, const char* op) {
  check_same_device(ref, slots, op, "slots");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) >= 1 && slots.is_contiguous(), op,
              ": slots must be a contiguous int64 tensor [B] with B >= 1, got ", slots.scalar_type(), " ",
              slots.sizes());
  TORCH_CHECK(slots.size(0) <= n, op, ": ", slots.size(0), " slots for ", n,
              " state entries; each row needs its own entry");
  if (slots.is_cpu()) {
    const int64_t* s = slots.data_ptr<int64_t>();
    std::vector<bool> seen(static_cast<size_t>(std::max<int64_t>(n, 0)), false);
    for (int64_t b = 0; b < slots.size(0); ++b) {
      TORCH_CHECK(s[b] >= 0 && s[b] < n, op, ": slots[", b, "] = ", s[b], " is outside the ", n, " state entries");
      TORCH_CHECK(!seen[s[b]], op, ": slot ", s[b], " appears twice; each row needs its own state entry");
      seen[s[b]] = true;
    }
  }
  return slots.size(0);
}

// pos of a batched call: one position per state entry, int64 [N], contiguous (kernels read pos + slot).
inline void check_entry_pos(const at::Tensor& pos, int64_t n, const char* op) {
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == n && pos.stride(0) == 1, op,
              ": with slots, pos must be a contiguous int64 tensor [N] (one position per state entry), got ",
              pos.sizes());
}

// A tensor of a batched call: `dim` dims, leading size n (B rows or N entries).
inline void check_lead(const at::Tensor& t, int64_t dim, int64_t n, const char* op, const char* what,
                       const char* shape) {
  TORCH_CHECK(t.dim() == dim && t.size(0) == n, op, ": with slots, ", what, " must be ", shape, " with leading size ",
              n, ", got ", t.sizes());
}

// Bytes between consecutive rows / entries of a batched tensor (0 for an absent one).
inline int64_t lead_bytes(const at::Tensor& t) { return t.stride(0) * static_cast<int64_t>(t.element_size()); }
inline int64_t lead_bytes(const std::optional<at::Tensor>& t) { return t ? lead_bytes(*t) : 0; }
// Row 0 / entry 0 of an optional batched tensor.
inline std::optional<at::Tensor> first(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->select(0, 0)) : std::nullopt;
}

// The batched form of a memory step (gdn_decode, mamba2_decode), checked up to the memory's own gates:
// state [N, H, Dk, Dv], pos [N] and the evicted token k [N, Hkv, Dk], v [N, Hkv, Dv] by entry; q [B, H, Dk],
// z [B, H] and out [B, H, Dv] by row. Returns B.
inline int64_t check_memory_step_batch(const at::Tensor& state, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& z, const at::Tensor& out,
                                       const at::Tensor& pos, const at::Tensor& slots, const char* op) {
  TORCH_CHECK(state.dim() == 4, op, ": with slots, state must be [N, H, Dk, Dv], got ", state.sizes());
  const int64_t N = state.size(0);
  const int64_t B = check_slots(slots, N, state, op);
  check_lead(q, 3, B, op, "q", "[B, H, Dk]");
  check_lead(z, 2, B, op, "z", "[B, H]");
  check_lead(out, 3, B, op, "out", "[B, H, Dv]");
  check_lead(k, 3, N, op, "k", "[N, Hkv, Dk]");
  check_lead(v, 3, N, op, "v", "[N, Hkv, Dv]");
  check_entry_pos(pos, N, op);
  return B;
}

// The batch fields that every memory-step params struct has (GdnDecodeParams, Mamba2DecodeParams).
template <typename P>
void set_memory_step_batch(P& p, const at::Tensor& slots, const at::Tensor& state, const at::Tensor& q,
                           const at::Tensor& k, const at::Tensor& v, const at::Tensor& z, const at::Tensor& out) {
  p.slots = slots.data_ptr<int64_t>();
  p.batch = slots.size(0);
  p.q_rb = lead_bytes(q);
  p.z_rb = lead_bytes(z);
  p.out_rb = lead_bytes(out);
  p.state_eb = lead_bytes(state);
  p.k_eb = lead_bytes(k);
  p.v_eb = lead_bytes(v);
}

// ---------------------------------------------------------------------------------------------
// The checked host entry functions, one per op (host/<op>.cpp); ops.cpp registers them for CPU and CUDA.
// ---------------------------------------------------------------------------------------------
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor decode_prep(const at::Tensor& proj, const at::Tensor& inv_freq, const at::Tensor& pos,
                       const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                       double norm_eps, const std::optional<at::Tensor>& a_log,
                       const std::optional<at::Tensor>& dt_bias, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const std::optional<at::Tensor>& beta_cache,
                       const std::optional<at::Tensor>& alpha_cache, int64_t sinks, int64_t window,
                       const at::Tensor& k_evict, const at::Tensor& v_evict,
                       const std::optional<at::Tensor>& beta_evict,
                       const std::optional<at::Tensor>& alpha_evict, const std::optional<at::Tensor>& slots);
at::Tensor swa_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& pos, int64_t sinks, int64_t window, double scale,
                      const std::optional<at::Tensor>& slots);
void gdn_decode(const at::Tensor& state, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& beta, const at::Tensor& alpha, const at::Tensor& z,
                const at::Tensor& norm_weight, const at::Tensor& o_proj, const at::Tensor& out,
                const at::Tensor& pos, int64_t sinks, int64_t window, double eps,
                const std::optional<at::Tensor>& slots);
void mamba2_decode(const at::Tensor& state, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& dt, const at::Tensor& a_log, const at::Tensor& z, const at::Tensor& norm_weight,
                   const at::Tensor& o_proj, const at::Tensor& out, const at::Tensor& pos, int64_t sinks,
                   int64_t window, double eps, const std::optional<at::Tensor>& slots);
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& norm_weight, double norm_eps,
                const std::optional<at::Tensor>& residual, bool silu_mul, bool out_float, bool static_weight,
                const std::optional<at::Tensor>& x_add);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gdn_chunk_prep(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const at::Tensor& alpha,
    double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mamba2_chunk_prep(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dt, const at::Tensor& a_log);
std::tuple<at::Tensor, at::Tensor> gdn_chunk_scan(const std::optional<at::Tensor>& w, const at::Tensor& u, const at::Tensor& kd_t,
                                                  const at::Tensor& qg, const at::Tensor& gl,
                                                  const at::Tensor& state);
at::Tensor attn_merge(at::TensorList outs, at::TensorList lses, at::IntArrayRef offsets, int64_t rows);
std::tuple<at::Tensor, at::Tensor> band_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  int64_t left, double scale,
                                                  const std::optional<at::Tensor>& kv_len,
                                                  const std::optional<at::Tensor>& q_len);
at::Tensor silu_mul(const at::Tensor& x);
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor gdn_gate_norm(const at::Tensor& o, const at::Tensor& z, const at::Tensor& norm_weight, double eps);

}  // namespace ahn_rt
