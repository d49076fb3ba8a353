// ahn_rt.mamba2_decode: the checked host entry function (checks, device guard, stream, dtype dispatch, CUDA
// scratch, launch, launch-error check). Kernels: cpu/mamba2_decode.cpp, cuda/mamba2_decode.cu.
// Test: pytest tests/test_ops.py -k mamba2.
#include "host.h"

namespace ahn_rt {

namespace {

constexpr const char* op = "ahn_rt.mamba2_decode";

// The checks and launch of one row's tensors (unbatched shapes). Batched (B > 0): the tensors are row 0 /
// entry 0 of the batched ones and `batch` fills the params' batch fields.
template <typename Batch>
void run(const at::Tensor& state, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         const at::Tensor& dt, const at::Tensor& a_log, const at::Tensor& z, const at::Tensor& norm_weight,
         const at::Tensor& o_proj, const at::Tensor& out, const at::Tensor& pos, int64_t sinks, int64_t window,
         double eps, int64_t B, Batch&& batch) {
  const MemoryStepDims d = check_memory_step(state, q, k, v, z, o_proj, out, pos, op);
  const int64_t H = d.H, Dk = d.Dk, Dv = d.Dv;
  check_vec(dt, H, state, op, "dt");
  check_vec(a_log, H, state, op, "a_log");
  TORCH_CHECK(a_log.stride(0) == 1, op, ": a_log must be contiguous");
  check_vec(norm_weight, H * Dv, state, op, "norm_weight (over all H * Dv values)");
  TORCH_CHECK(norm_weight.stride(0) == 1, op, ": norm_weight must be contiguous");

  Mamba2DecodeParams p{};
  p.state = state.data_ptr<float>();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dt = dt.data_ptr();
  p.a_log = a_log.data_ptr();
  p.z = z.data_ptr();
  p.norm_weight = norm_weight.data_ptr();
  p.o_proj = o_proj.data_ptr();
  p.out = out.data_ptr();
  p.pos = pos.data_ptr<int64_t>();
  p.q_stride = q.stride(0);
  p.k_stride = k.stride(0);
  p.v_stride = v.stride(0);
  p.dt_stride = dt.stride(0);
  p.z_stride = z.stride(0);
  p.out_stride = out.stride(0);
  p.H = H;
  p.Hkv = d.Hkv;
  p.Dk = Dk;
  p.Dv = Dv;
  p.sinks = sinks;
  p.window = window;
  p.eps = static_cast<float>(eps);
  p.dt_kind = kind_of(dt, "dt");
  p.a_log_kind = kind_of(a_log, "a_log");
  p.z_kind = kind_of(z, "z");
  p.nw_kind = kind_of(norm_weight, "norm_weight");
  p.op_kind = kind_of(o_proj, "o_proj");
  p.out_kind = kind_of(out, "out");
  batch(p);
  if (H == 0 || Dk == 0 || Dv == 0) return;
#ifdef AHN_RT_WITH_CUDA
  if (state.is_cuda()) {
    TORCH_CHECK(Dk <= 256 && Dv <= 256, op, ": CUDA supports Dk, Dv <= 256, got ", Dk, ", ", Dv);
    TORCH_CHECK(p.batch <= 65535 && H <= 65535, op, ": CUDA takes at most 65535 rows and 65535 heads per call, got ",
                p.batch, " rows, ", H, " heads");
    const c10::cuda::CUDAGuard guard(state.device());
    // Per row: every head's o [H, Dv] and the state kernel's sums of squares [H, kMamba2Slices], read by
    // the output kernel (the norm crosses heads); from the caching allocator, so a captured graph keeps its own.
    const int64_t row_floats = H * Dv + H * kMamba2Slices;
    at::Tensor o_buf = at::empty({std::max<int64_t>(B, 1), row_floats}, state.options());
    p.o_buf = o_buf.data_ptr<float>();
    p.ob_rb = row_floats * static_cast<int64_t>(sizeof(float));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_dtype(q.scalar_type(), op, [&](auto tag) { mamba2_decode_cuda<decltype(tag)>(p, stream); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#endif
  TORCH_CHECK(state.is_cpu(), op, ": no kernel for device ", state.device());
  dispatch_dtype(q.scalar_type(), op, [&](auto tag) {
    for (int64_t b = 0; b < p.batch; ++b) mamba2_decode_cpu<decltype(tag)>(p.row(b));
  });
}

}  // namespace

void mamba2_decode(const at::Tensor& state, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& dt, const at::Tensor& a_log, const at::Tensor& z, const at::Tensor& norm_weight,
                   const at::Tensor& o_proj, const at::Tensor& out, const at::Tensor& pos, int64_t sinks,
                   int64_t window, double eps, const std::optional<at::Tensor>& slots) {
  if (!slots) {
    run(state, q, k, v, dt, a_log, z, norm_weight, o_proj, out, pos, sinks, window, eps, 0,
        [](Mamba2DecodeParams&) {});
    return;
  }
  // Batched: q [B, H, Dk], z [B, H], out [B, H, Dv] by row; state [N, H, Dk, Dv], the evicted token
  // k [N, Hkv, Dk], v [N, Hkv, Dv], dt [N, H] and pos [N] by state entry slots[b].
  const int64_t B = check_memory_step_batch(state, q, k, v, z, out, pos, *slots, op);
  check_lead(dt, 2, state.size(0), op, "dt", "[N, H]");
  run(state.select(0, 0), q.select(0, 0), k.select(0, 0), v.select(0, 0), dt.select(0, 0), a_log, z.select(0, 0),
      norm_weight, o_proj, out.select(0, 0), pos.narrow(0, 0, 1), sinks, window, eps, B,
      [&](Mamba2DecodeParams& p) {
        set_memory_step_batch(p, *slots, state, q, k, v, z, out);
        p.dt_eb = lead_bytes(dt);
      });
}

}  // namespace ahn_rt
