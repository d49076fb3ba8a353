// ahn_rt.gdn_chunk_scan: the checked host entry function (shapes, dtypes, device guard, stream, launch,
// launch-error check). Kernels: cpu/gdn_chunk_scan.cpp, cuda/gdn_chunk_scan.cu.
// Test: pytest tests/test_prefill.py -k scan.
#include "host.h"

namespace ahn_rt {

std::tuple<at::Tensor, at::Tensor> gdn_chunk_scan(const std::optional<at::Tensor>& w, const at::Tensor& u,
                                                  const at::Tensor& kd_t, const at::Tensor& qg, const at::Tensor& gl,
                                                  const at::Tensor& state) {
  constexpr const char* op = "ahn_rt.gdn_chunk_scan";
  TORCH_CHECK(state.dim() == 3, op, ": state must be [H, Dk, Dv], got ", state.sizes());
  const int64_t H = state.size(0), Dk = state.size(1), Dv = state.size(2);
  TORCH_CHECK(u.dim() == 4 && u.size(0) == H && u.size(3) == Dv, op, ": u must be [", H, ", N, C, ", Dv,
              "], got ", u.sizes());
  const int64_t N = u.size(1), C = u.size(2);
  auto check = [&](const at::Tensor& t, std::initializer_list<int64_t> shape, const char* what) {
    check_same_device(state, t, op, what);
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, ": ", what, " must be ", at::IntArrayRef(shape),
                ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), op, ": ", what,
                " must be a contiguous float32 tensor");
  };
  check(state, {H, Dk, Dv}, "state");
  if (w) check(*w, {H, N, C, Dk}, "w");
  check(u, {H, N, C, Dv}, "u");
  check(kd_t, {H, N, Dk, C}, "kd_t");
  check(qg, {H, N, C, Dk}, "qg");
  check(gl, {H, N}, "gl");
  at::Tensor v_new = at::empty_like(u);
  at::Tensor o_inter = at::empty_like(u);
  GdnChunkScanParams p{};
  p.w = w ? w->data_ptr<float>() : nullptr;   // none: no delta correction (v_new = u)
  p.u = u.data_ptr<float>();
  p.kd_t = kd_t.data_ptr<float>();
  p.qg = qg.data_ptr<float>();
  p.gl = gl.data_ptr<float>();
  p.state = state.data_ptr<float>();
  p.v_new = v_new.data_ptr<float>();
  p.o_inter = o_inter.data_ptr<float>();
  p.H = H;
  p.N = N;
  p.C = C;
  p.Dk = Dk;
  p.Dv = Dv;
  if (H == 0 || N == 0 || C == 0 || Dv == 0) return {v_new, o_inter};
#ifdef AHN_RT_WITH_CUDA
  if (state.is_cuda()) {
    TORCH_CHECK(C == kScanChunk && Dk % 4 == 0 && Dk <= kScanMaxDk, op, ": CUDA takes chunks of ", kScanChunk,
                " tokens and Dk a multiple of 4 up to ", kScanMaxDk, ", got C=", C, ", Dk=", Dk);
    const c10::cuda::CUDAGuard guard(state.device());
    gdn_chunk_scan_cuda(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {v_new, o_inter};
  }
#endif
  TORCH_CHECK(state.is_cpu(), op, ": no kernel for device ", state.device());
  gdn_chunk_scan_cpu(p);
  return {v_new, o_inter};
}

}  // namespace ahn_rt
