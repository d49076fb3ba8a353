// ahn_rt.rms_norm: the checked host entry function (checks, device guard, stream, dtype dispatch, launch,
// launch-error check). Kernels: cpu/rms_norm.cpp, cuda/rms_norm.cu. Test: pytest tests/test_ops.py -k rms_norm.
#include "host.h"

namespace ahn_rt {

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  constexpr const char* op = "ahn_rt.rms_norm";
  TORCH_CHECK(x_in.dim() == 1 || x_in.dim() == 2, op, ": x must be [N, d] (or [d]), got ", x_in.sizes());
  const at::Tensor x = x_in.dim() == 1 ? x_in.unsqueeze(0) : x_in;
  const int64_t n = x.size(0), d = x.size(1);
  check_vec_like(weight, d, x, op, "weight");
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

}  // namespace ahn_rt
