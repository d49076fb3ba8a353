// The ahn_rt op schemas (TORCH_LIBRARY) and their checked host entry functions: every device / dtype /
// shape / stride check, the device guard and current stream, the dtype dispatch, the launch and the
// launch-error check live here, once. Kernels are in cpu/*.cpp and cuda/*.cu; each backend file
// registers these functions for its dispatch key. Test: pytest tests/test_ops.py (-m cuda on a GPU).
#include <Python.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#ifdef AHN_RT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include "common.h"

// `import ahn_rt._C` loads this library (and so runs TORCH_LIBRARY below); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace ahn_rt {
namespace {

Kind kind_of(const at::Tensor& t, const char* what) {
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

void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", what, " is on ", t.device(), " but the op runs on ",
              ref.device());
}

void check_pos(const at::Tensor& pos, const at::Tensor& ref, const char* op) {
  check_same_device(ref, pos, op, "pos (int64 [1], kept on the device: the kernel reads it)");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.numel() == 1, op, ": pos must be an int64 tensor [1], got ",
              pos.scalar_type(), " ", pos.sizes());
}

void check_vec(const at::Tensor& t, int64_t n, const at::Tensor& ref, const char* op, const char* what) {
  check_same_device(ref, t, op, what);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", what, " must be [", n, "], got ", t.sizes());
}

#ifdef AHN_RT_WITH_CUDA
// Number of SMs of the current device (cached per device).
int64_t sm_count() {
  static std::mutex mu;
  static std::vector<int> counts;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  if (counts.size() <= static_cast<size_t>(dev)) counts.resize(dev + 1, 0);
  if (counts[dev] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[dev], cudaDevAttrMultiProcessorCount, dev));
  return counts[dev];
}

// Shared memory per SM of the current device (cached per device): how many swa_decode blocks fit at once.
int64_t smem_per_sm() {
  static std::mutex mu;
  static std::vector<int> bytes;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  if (bytes.size() <= static_cast<size_t>(dev)) bytes.resize(dev + 1, 0);
  if (bytes[dev] == 0)
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes[dev], cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  return bytes[dev];
}
#endif

}  // namespace

// ---------------------------------------------------------------------------------------------
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  constexpr const char* op = "ahn_rt.rms_norm";
  TORCH_CHECK(x_in.dim() == 1 || x_in.dim() == 2, op, ": x must be [N, d] (or [d]), got ", x_in.sizes());
  const at::Tensor x = x_in.dim() == 1 ? x_in.unsqueeze(0) : x_in;
  const int64_t n = x.size(0), d = x.size(1);
  check_vec(weight, d, x, op, "weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  TORCH_CHECK(d == 0 || x.stride(1) == 1, op, ": x's last dim must be contiguous (rows may be strided)");
  TORCH_CHECK(weight.stride(0) == 1 || d <= 1, op, ": weight must be contiguous");
  at::Tensor out = at::empty({n, d}, x.options());
  RmsNormParams p{};
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  p.n = n;
  p.d = d;
  p.x_stride = x.stride(0);
  p.eps = static_cast<float>(eps);
  if (n > 0 && d > 0) {
#ifdef AHN_RT_WITH_CUDA
    if (x.is_cuda()) {
      const c10::cuda::CUDAGuard guard(x.device());
      cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      dispatch_dtype(x.scalar_type(), op, [&](auto tag) { rms_norm_cuda<decltype(tag)>(p, stream); });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return x_in.dim() == 1 ? out.squeeze(0) : out;
    }
#endif
    TORCH_CHECK(x.is_cpu(), op, ": no kernel for device ", x.device());
    dispatch_dtype(x.scalar_type(), op, [&](auto tag) { rms_norm_cpu<decltype(tag)>(p); });
  }
  return x_in.dim() == 1 ? out.squeeze(0) : out;
}

// ---------------------------------------------------------------------------------------------
at::Tensor decode_prep(const at::Tensor& proj, const at::Tensor& inv_freq, const at::Tensor& pos,
                       const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                       double norm_eps, const std::optional<at::Tensor>& a_log,
                       const std::optional<at::Tensor>& dt_bias, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const std::optional<at::Tensor>& beta_cache,
                       const std::optional<at::Tensor>& alpha_cache, int64_t sinks, int64_t window,
                       const at::Tensor& k_evict, const at::Tensor& v_evict,
                       const std::optional<at::Tensor>& beta_evict,
                       const std::optional<at::Tensor>& alpha_evict) {
  constexpr const char* op = "ahn_rt.decode_prep";
  const auto dtype = proj.scalar_type();
  TORCH_CHECK(proj.dim() == 1, op, ": proj must be 1-D [P], got ", proj.sizes());
  TORCH_CHECK(k_cache.dim() == 3, op, ": k_cache must be [Hkv, C, D], got ", k_cache.sizes());
  const int64_t Hkv = k_cache.size(0), C = k_cache.size(1), D = k_cache.size(2), P = proj.size(0);
  TORCH_CHECK(Hkv > 0 && D > 0 && D % 2 == 0, op, ": need Hkv > 0 and an even head dim D, got k_cache ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache ", v_cache.sizes(), " must match k_cache ",
              k_cache.sizes());
  TORCH_CHECK(sinks >= 0 && window >= 1 && sinks + window <= C, op, ": need sinks >= 0, window >= 1 and ",
              "sinks + window <= C; got sinks=", sinks, " window=", window, " C=", C);
  const bool gated = a_log.has_value();
  TORCH_CHECK(dt_bias.has_value() == gated && beta_cache.has_value() == gated &&
                  alpha_cache.has_value() == gated && beta_evict.has_value() == gated &&
                  alpha_evict.has_value() == gated,
              op, ": a_log, dt_bias, beta_cache, alpha_cache, beta_evict, alpha_evict are given together or not ",
              "at all");
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), op, ": q_norm and k_norm are given together");
  int64_t H;
  if (gated) {
    TORCH_CHECK(beta_cache->dim() == 2 && beta_cache->size(0) == C, op, ": beta_cache must be [C, H] with C=",
                C, ", got ", beta_cache->sizes());
    H = beta_cache->size(1);
    TORCH_CHECK(P >= (H + 2 * Hkv) * D + 2 * H, op, ": proj has ", P, " values; the gated layout needs at least ",
                (H + 2 * Hkv) * D + 2 * H);
  } else {
    TORCH_CHECK(P > 2 * Hkv * D && (P - 2 * Hkv * D) % D == 0, op, ": proj of ", P,
                " values is not [q (H*D) | k | v] for D=", D, ", Hkv=", Hkv);
    H = (P - 2 * Hkv * D) / D;
  }
  check_pos(pos, proj, op);
  check_vec(inv_freq, D / 2, proj, op, "inv_freq");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.stride(0) == 1, op,
              ": inv_freq must be contiguous float32");
  for (const at::Tensor* t : {&k_cache, &v_cache}) {
    check_same_device(proj, *t, op, "k_cache/v_cache");
    TORCH_CHECK(t->scalar_type() == dtype, op, ": caches must have proj's dtype ", dtype);
    TORCH_CHECK(t->stride(2) == 1, op, ": caches must be contiguous along D");
  }
  for (const at::Tensor* t : {&k_evict, &v_evict}) {
    check_same_device(proj, *t, op, "k_evict/v_evict");
    TORCH_CHECK(t->dim() == 2 && t->size(0) == Hkv && t->size(1) == D, op, ": k_evict/v_evict must be [", Hkv,
                ", ", D, "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == dtype && t->stride(1) == 1, op, ": evict buffers must have dtype ", dtype,
                " and a contiguous last dim");
  }
  if (q_norm.has_value()) {
    for (const at::Tensor* t : {&*q_norm, &*k_norm}) {
      check_vec(*t, D, proj, op, "q_norm/k_norm");
      TORCH_CHECK(t->scalar_type() == dtype && t->stride(0) == 1, op, ": q_norm/k_norm must be contiguous ", dtype);
    }
  }
  at::Tensor q_out = at::empty({H, D}, proj.options());
  DecodePrepParams p{};
  p.proj = proj.data_ptr();
  p.proj_stride = proj.stride(0);
  p.inv_freq = inv_freq.data_ptr<float>();
  p.pos = pos.data_ptr<int64_t>();
  p.q_norm = q_norm.has_value() ? q_norm->data_ptr() : nullptr;
  p.k_norm = k_norm.has_value() ? k_norm->data_ptr() : nullptr;
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.kc_s0 = k_cache.stride(0);
  p.kc_s1 = k_cache.stride(1);
  p.vc_s0 = v_cache.stride(0);
  p.vc_s1 = v_cache.stride(1);
  p.k_evict = k_evict.data_ptr();
  p.v_evict = v_evict.data_ptr();
  p.ke_s0 = k_evict.stride(0);
  p.ve_s0 = v_evict.stride(0);
  if (gated) {
    check_vec(*a_log, H, proj, op, "a_log");
    check_vec(*dt_bias, H, proj, op, "dt_bias");
    p.a_log = a_log->data_ptr();
    p.a_log_kind = kind_of(*a_log, "a_log");
    p.dt_bias = dt_bias->data_ptr();
    p.dt_bias_kind = kind_of(*dt_bias, "dt_bias");
    TORCH_CHECK(a_log->stride(0) == 1 && dt_bias->stride(0) == 1, op, ": a_log/dt_bias must be contiguous");
    check_same_device(proj, *beta_cache, op, "beta_cache");
    TORCH_CHECK(beta_cache->scalar_type() == dtype, op, ": beta_cache must have proj's dtype ", dtype);
    check_same_device(proj, *alpha_cache, op, "alpha_cache");
    TORCH_CHECK(alpha_cache->dim() == 2 && alpha_cache->size(0) == C && alpha_cache->size(1) == H, op,
                ": alpha_cache must be [", C, ", ", H, "], got ", alpha_cache->sizes());
    TORCH_CHECK(alpha_cache->scalar_type() == at::kFloat, op, ": alpha_cache must be float32");
    check_vec(*beta_evict, H, proj, op, "beta_evict");
    TORCH_CHECK(beta_evict->scalar_type() == dtype, op, ": beta_evict must have proj's dtype ", dtype);
    check_vec(*alpha_evict, H, proj, op, "alpha_evict");
    TORCH_CHECK(alpha_evict->scalar_type() == at::kFloat, op, ": alpha_evict must be float32");
    p.beta_cache = beta_cache->data_ptr();
    p.bc_s0 = beta_cache->stride(0);
    p.bc_s1 = beta_cache->stride(1);
    p.alpha_cache = alpha_cache->data_ptr<float>();
    p.ac_s0 = alpha_cache->stride(0);
    p.ac_s1 = alpha_cache->stride(1);
    p.beta_evict = beta_evict->data_ptr();
    p.be_s0 = beta_evict->stride(0);
    p.alpha_evict = alpha_evict->data_ptr<float>();
    p.ae_s0 = alpha_evict->stride(0);
  }
  p.q_out = q_out.data_ptr();
  p.H = H;
  p.Hkv = Hkv;
  p.D = D;
  p.sinks = sinks;
  p.window = window;
  p.norm_eps = static_cast<float>(norm_eps);
#ifdef AHN_RT_WITH_CUDA
  if (proj.is_cuda()) {
    TORCH_CHECK(D <= 512, op, ": CUDA supports head dims up to 512, got ", D);
    const c10::cuda::CUDAGuard guard(proj.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_dtype(dtype, op, [&](auto tag) { decode_prep_cuda<decltype(tag)>(p, stream); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return q_out;
  }
#endif
  TORCH_CHECK(proj.is_cpu(), op, ": no kernel for device ", proj.device());
  dispatch_dtype(dtype, op, [&](auto tag) { decode_prep_cpu<decltype(tag)>(p); });
  return q_out;
}

// ---------------------------------------------------------------------------------------------
at::Tensor swa_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& pos, int64_t sinks, int64_t window, double scale) {
  constexpr const char* op = "ahn_rt.swa_decode";
  TORCH_CHECK(q.dim() == 2, op, ": q must be [H, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), op,
              ": k_cache and v_cache must be [Hkv, C, D] of one shape, got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  const int64_t H = q.size(0), D = q.size(1), Hkv = k_cache.size(0), C = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D, op, ": q head dim ", D, " != cache head dim ", k_cache.size(2));
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": H=", H, " must be a multiple of Hkv=", Hkv);
  TORCH_CHECK(D > 0 && D % 8 == 0 && D <= 256, op, ": head dim must be a multiple of 8 and <= 256, got ", D);
  TORCH_CHECK(sinks >= 0 && window >= 1 && sinks + window <= C, op, ": need sinks >= 0, window >= 1 and ",
              "sinks + window <= C; got sinks=", sinks, " window=", window, " C=", C);
  for (const at::Tensor* t : {&k_cache, &v_cache}) {
    check_same_device(q, *t, op, "k_cache/v_cache");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": caches must have q's dtype ", q.scalar_type());
    TORCH_CHECK(t->stride(2) == 1, op, ": caches must be contiguous along D");
  }
  TORCH_CHECK(q.stride(1) == 1, op, ": q's last dim must be contiguous (rows may be strided)");
  check_pos(pos, q, op);
  at::Tensor out = at::empty({H, D}, q.options());
  SwaDecodeParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.pos = pos.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.q_stride = q.stride(0);
  p.kc_s0 = k_cache.stride(0);
  p.kc_s1 = k_cache.stride(1);
  p.vc_s0 = v_cache.stride(0);
  p.vc_s1 = v_cache.stride(1);
  p.H = H;
  p.Hkv = Hkv;
  p.C = C;
  p.D = D;
  p.sinks = sinks;
  p.window = window;
  p.scale = static_cast<float>(scale);
  if (H == 0) return out;
#ifdef AHN_RT_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    // Split the capacity C (not the valid length: one launch serves every step of a captured graph).
    const int64_t sms = sm_count();
    const int64_t G = H / Hkv;
    TORCH_CHECK(G <= 256, op, ": CUDA supports up to 256 query heads per kv head, got ", G);
    int64_t chunk;
    if (q.scalar_type() != at::kFloat) {
      // Tensor-core path: size the splits so that a full cache is one wave of resident blocks (blocks per
      // SM from the shared memory of one block, at most 4), i.e. 2-4 blocks per SM each streaming ~100+
      // KiB: enough bytes in flight for the bandwidth, no tail wave. A short valid length n then runs
      // ceil(n / chunk) splits and the combine reads only those. Chunks are whole warp slices (16 keys).
      const int64_t smem = swa_mma_smem_bytes(D) + 1024;  // + static merge buffers and the reserved 1 KiB
      const int64_t per_sm = std::max<int64_t>(1, std::min<int64_t>(4, smem_per_sm() / smem));
      const int64_t groups = Hkv * ((G + 15) / 16);
      const int64_t slots = std::max<int64_t>(1, sms * per_sm / groups);
      chunk = std::max<int64_t>(32, ((C + slots - 1) / slots + 15) / 16 * 16);
    } else {
      // fp32 (CUDA cores, tests only): about 8 blocks per SM; a split's K and V tiles are staged in shared
      // memory (<= 32 KiB together) and its scores for the G heads too (<= 8 KiB).
      const int64_t per_head = std::max<int64_t>(1, (8 * sms + Hkv - 1) / Hkv);
      chunk = std::max<int64_t>(16, (C + per_head - 1) / per_head);
      const int64_t tile_max = std::min<int64_t>(32768 / (2 * D * q.element_size()), 2048 / G);
      chunk = std::max<int64_t>(8, std::min(chunk, tile_max) / 8 * 8);
    }
    p.chunk = chunk;
    p.nsplit = (C + chunk - 1) / chunk;
    TORCH_CHECK(p.nsplit <= 8192, op, ": too many splits (", p.nsplit, ") for C=", C, " with ", G,
                " query heads per kv head");
    at::Tensor o_part = at::empty({H, p.nsplit, D}, q.options().dtype(at::kFloat));
    at::Tensor ml_part = at::empty({H, p.nsplit, 2}, q.options().dtype(at::kFloat));
    p.o_part = o_part.data_ptr<float>();
    p.ml_part = ml_part.data_ptr<float>();
    dispatch_dtype(q.scalar_type(), op, [&](auto tag) { swa_decode_cuda<decltype(tag)>(p, stream); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
#endif
  TORCH_CHECK(q.is_cpu(), op, ": no kernel for device ", q.device());
  dispatch_dtype(q.scalar_type(), op, [&](auto tag) { swa_decode_cpu<decltype(tag)>(p); });
  return out;
}

// ---------------------------------------------------------------------------------------------
void gdn_decode(const at::Tensor& state, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& beta, const at::Tensor& alpha, const at::Tensor& z,
                const at::Tensor& norm_weight, const at::Tensor& o_proj, const at::Tensor& out,
                const at::Tensor& pos, int64_t sinks, int64_t window, double eps) {
  constexpr const char* op = "ahn_rt.gdn_decode";
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
  check_vec(beta, H, state, op, "beta");
  check_vec(alpha, H, state, op, "alpha");
  check_vec(z, H, state, op, "z");
  check_vec(norm_weight, Dv, state, op, "norm_weight");
  TORCH_CHECK(norm_weight.stride(0) == 1, op, ": norm_weight must be contiguous");
  check_same_device(state, o_proj, op, "o_proj");
  TORCH_CHECK(o_proj.dim() == 3 && o_proj.size(0) == H && o_proj.size(1) == Dv && o_proj.size(2) == Dv, op,
              ": o_proj must be [", H, ", ", Dv, ", ", Dv, "], got ", o_proj.sizes());
  TORCH_CHECK(o_proj.is_contiguous(), op, ": o_proj must be contiguous");
  check_same_device(state, out, op, "out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == H && out.size(1) == Dv && out.stride(1) == 1, op,
              ": out must be [", H, ", ", Dv, "] with a contiguous last dim, got ", out.sizes());
  check_pos(pos, state, op);
  GdnDecodeParams p{};
  p.state = state.data_ptr<float>();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.beta = beta.data_ptr();
  p.alpha = alpha.data_ptr();
  p.z = z.data_ptr();
  p.norm_weight = norm_weight.data_ptr();
  p.o_proj = o_proj.data_ptr();
  p.out = out.data_ptr();
  p.pos = pos.data_ptr<int64_t>();
  p.q_stride = q.stride(0);
  p.k_stride = k.stride(0);
  p.v_stride = v.stride(0);
  p.beta_stride = beta.stride(0);
  p.alpha_stride = alpha.stride(0);
  p.z_stride = z.stride(0);
  p.out_stride = out.stride(0);
  p.H = H;
  p.Hkv = Hkv;
  p.Dk = Dk;
  p.Dv = Dv;
  p.sinks = sinks;
  p.window = window;
  p.eps = static_cast<float>(eps);
  p.beta_kind = kind_of(beta, "beta");
  p.alpha_kind = kind_of(alpha, "alpha");
  p.z_kind = kind_of(z, "z");
  p.nw_kind = kind_of(norm_weight, "norm_weight");
  p.op_kind = kind_of(o_proj, "o_proj");
  p.out_kind = kind_of(out, "out");
  if (H == 0 || Dk == 0 || Dv == 0) return;
#ifdef AHN_RT_WITH_CUDA
  if (state.is_cuda()) {
    TORCH_CHECK(Dk <= 256 && Dv <= 256, op, ": CUDA supports Dk, Dv <= 256, got ", Dk, ", ", Dv);
    const c10::cuda::CUDAGuard guard(state.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_dtype(q.scalar_type(), op, [&](auto tag) { gdn_decode_cuda<decltype(tag)>(p, stream); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#endif
  TORCH_CHECK(state.is_cpu(), op, ": no kernel for device ", state.device());
  dispatch_dtype(q.scalar_type(), op, [&](auto tag) { gdn_decode_cpu<decltype(tag)>(p); });
}

}  // namespace ahn_rt

TORCH_LIBRARY(ahn_rt, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def(
      "decode_prep(Tensor proj, Tensor inv_freq, Tensor pos, Tensor? q_norm, Tensor? k_norm, float norm_eps, "
      "Tensor? a_log, Tensor? dt_bias, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!)? beta_cache, "
      "Tensor(d!)? alpha_cache, int sinks, int window, Tensor(e!) k_evict, Tensor(f!) v_evict, "
      "Tensor(g!)? beta_evict, Tensor(h!)? alpha_evict) -> Tensor");
  m.def("swa_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, int sinks, int window, float scale) "
        "-> Tensor");
  m.def(
      "gdn_decode(Tensor(a!) state, Tensor q, Tensor k, Tensor v, Tensor beta, Tensor alpha, Tensor z, "
      "Tensor norm_weight, Tensor o_proj, Tensor(b!) out, Tensor pos, int sinks, int window, float eps) -> ()");
}
