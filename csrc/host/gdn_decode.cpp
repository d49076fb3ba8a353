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
  TORCH_CHECK(state.dim() == 4, op, ": with slots, state must be [N, H, Dk, Dv], got ", state.sizes());
  const int64_t N = state.size(0);
  const int64_t B = check_slots(*slots, N, state, op);
  check_lead(q, 3, B, op, "q", "[B, H, Dk]");
  check_lead(z, 2, B, op, "z", "[B, H]");
  check_lead(out, 3, B, op, "out", "[B, H, Dv]");
  check_lead(k, 3, N, op, "k", "[N, Hkv, Dk]");
  check_lead(v, 3, N, op, "v", "[N, Hkv, Dv]");
  check_lead(beta, 2, N, op, "beta", "[N, H]");
  check_lead(alpha, 2, N, op, "alpha", "[N, H]");
  check_entry_pos(pos, N, op);
  const int64_t* slot_ptr = slots->data_ptr<int64_t>();
  run(state.select(0, 0), q.select(0, 0), k.select(0, 0), v.select(0, 0), beta.select(0, 0), alpha.select(0, 0),
      z.select(0, 0), norm_weight, o_proj, out.select(0, 0), pos.narrow(0, 0, 1), sinks, window, eps,
      [&](GdnDecodeParams& p) {
        p.slots = slot_ptr;
        p.batch = B;
        p.q_rb = lead_bytes(q);
        p.z_rb = lead_bytes(z);
        p.out_rb = lead_bytes(out);
        p.state_eb = lead_bytes(state);
        p.k_eb = lead_bytes(k);
        p.v_eb = lead_bytes(v);
        p.beta_eb = lead_bytes(beta);
        p.alpha_eb = lead_bytes(alpha);
      });
}

}  // namespace ahn_rt
