// ahn_rt.gdn_decode: the checked host entry function (checks, device guard, stream, dtype dispatch, launch,
// launch-error check). Kernels: cpu/gdn_decode.cpp, cuda/gdn_decode.cu. Test: pytest tests/test_ops.py -k gdn.
#include "host.h"

namespace ahn_rt {

namespace {

constexpr const char* op = "ahn_rt.gdn_decode";

// The checks and launch of one row's tensors (unbatched shapes). Batched: the tensors are row 0 / entry 0
// of the batched ones and `batch` fills the params' batch fields.
template <typename Batch>
void run(const at::Tensor& state, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         const at::Tensor& beta, const at::Tensor& alpha, const at::Tensor& z, const at::Tensor& norm_weight,
         const at::Tensor& o_proj, const at::Tensor& out, const at::Tensor& pos, int64_t sinks, int64_t window,
         double eps, Batch&& batch) {
  const MemoryStepDims d = check_memory_step(state, q, k, v, z, o_proj, out, pos, op);
  const int64_t H = d.H, Hkv = d.Hkv, Dk = d.Dk, Dv = d.Dv;
  check_vec(beta, H, state, op, "beta");
  check_vec(alpha, H, state, op, "alpha");
  check_vec(norm_weight, Dv, state, op, "norm_weight");
  TORCH_CHECK(norm_weight.stride(0) == 1, op, ": norm_weight must be contiguous");
  const Kind beta_kind = kind_of(beta, "beta"), alpha_kind = kind_of(alpha, "alpha"), z_kind = kind_of(z, "z"),
             nw_kind = kind_of(norm_weight, "norm_weight"), op_kind = kind_of(o_proj, "o_proj"),
             out_kind = kind_of(out, "out");

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
  p.beta_kind = beta_kind;
  p.alpha_kind = alpha_kind;
  p.z_kind = z_kind;
  p.nw_kind = nw_kind;
  p.op_kind = op_kind;
  p.out_kind = out_kind;
  batch(p);
  if (H == 0 || Dk == 0 || Dv == 0) return;
#ifdef AHN_RT_WITH_CUDA
  if (state.is_cuda()) {
    TORCH_CHECK(Dk <= 256 && Dv <= 256, op, ": CUDA supports Dk, Dv <= 256, got ", Dk, ", ", Dv);
    TORCH_CHECK(p.batch <= 65535, op, ": CUDA takes at most 65535 rows per call (grid z), got ", p.batch);
    const c10::cuda::CUDAGuard guard(state.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_dtype(q.scalar_type(), op, [&](auto tag) { gdn_decode_cuda<decltype(tag)>(p, stream); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#endif
  TORCH_CHECK(state.is_cpu(), op, ": no kernel for device ", state.device());
  dispatch_dtype(q.scalar_type(), op, [&](auto tag) {
    for (int64_t b = 0; b < p.batch; ++b) gdn_decode_cpu<decltype(tag)>(p.row(b));
  });
}

}  // namespace

void gdn_decode(const at::Tensor& state, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& beta, const at::Tensor& alpha, const at::Tensor& z,
                const at::Tensor& norm_weight, const at::Tensor& o_proj, const at::Tensor& out,
                const at::Tensor& pos, int64_t sinks, int64_t window, double eps,
                const std::optional<at::Tensor>& slots) {
  if (!slots) {
    run(state, q, k, v, beta, alpha, z, norm_weight, o_proj, out, pos, sinks, window, eps, [](GdnDecodeParams&) {});
    return;
  }
  // Batched: q [B, H, Dk], z [B, H], out [B, H, Dv] by row; state [N, H, Dk, Dv], the evicted token
  // k [N, Hkv, Dk], v [N, Hkv, Dv], beta, alpha [N, H] and pos [N] by state entry slots[b].
  check_memory_step_batch(state, q, k, v, z, out, pos, *slots, op);
  const int64_t N = state.size(0);
  check_lead(beta, 2, N, op, "beta", "[N, H]");
  check_lead(alpha, 2, N, op, "alpha", "[N, H]");
  run(state.select(0, 0), q.select(0, 0), k.select(0, 0), v.select(0, 0), beta.select(0, 0), alpha.select(0, 0),
      z.select(0, 0), norm_weight, o_proj, out.select(0, 0), pos.narrow(0, 0, 1), sinks, window, eps,
      [&](GdnDecodeParams& p) {
        set_memory_step_batch(p, *slots, state, q, k, v, z, out);
        p.beta_eb = lead_bytes(beta);
        p.alpha_eb = lead_bytes(alpha);
      });
}

}  // namespace ahn_rt
