// ahn_rt.gemv: the checked host entry function (checks, device guard, stream, dtype dispatch, launch,
// launch-error check). Kernels: cpu/gemv.cpp, cuda/gemv.cu. Test: pytest tests/test_gemv.py.
#include "host.h"

namespace ahn_rt {

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& norm_weight, double norm_eps,
                const std::optional<at::Tensor>& residual, bool silu_mul, bool out_float, bool static_weight,
                const std::optional<at::Tensor>& x_add) {
  constexpr const char* op = "ahn_rt.gemv";
  TORCH_CHECK(x.dim() == 1 || x.dim() == 2, op, ": x must be [K] or [B, K] (B sequences), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [N, K], got ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  const bool batched = x.dim() == 2;
  const int64_t B = batched ? x.size(0) : 1;
  TORCH_CHECK(x.size(-1) == K, op, ": x has ", x.size(-1), " values per row but weight is [", N, ", ", K, "]");
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ", x.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be row-major contiguous, got strides ", weight.strides());
  TORCH_CHECK(!silu_mul || N % 2 == 0, op, ": silu_mul needs an even N ([gate; up] rows), got N=", N);
  const int64_t N_out = silu_mul ? N / 2 : N;
  if (bias) check_vec_like(*bias, N, x, op, "bias");
  if (norm_weight) check_vec_like(*norm_weight, K, x, op, "norm_weight");
  if (residual) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.dim() == x.dim() && r.size(-1) == N_out && (!batched || r.size(0) == B), op,
                ": residual must be shaped like the output ", (batched ? "[B, " : "["), N_out, "], got ", r.sizes());
    TORCH_CHECK(r.device() == x.device() && r.scalar_type() == x.scalar_type(), op,
                ": residual must be on x's device with x's dtype");
  }
  if (x_add) {
    // x_eff = T(x + x_add), read with x's strides by every kernel: same shape, dtype, device and strides.
    const at::Tensor& a = *x_add;
    TORCH_CHECK(a.sizes() == x.sizes(), op, ": x_add must have x's shape ", x.sizes(), ", got ", a.sizes());
    TORCH_CHECK(a.scalar_type() == x.scalar_type(), op, ": x_add dtype ", a.scalar_type(), " must equal x dtype ",
                x.scalar_type());
    TORCH_CHECK(a.device() == x.device(), op, ": x_add is on ", a.device(), " but x is on ", x.device());
    TORCH_CHECK(a.strides() == x.strides(), op, ": x_add must have x's strides ", x.strides(), ", got ",
                a.strides());
    TORCH_CHECK(!norm_weight, op, ": x_add with norm_weight is not supported (the kernels' RMSNorm path "
                "reads x without x_add)");
    TORCH_CHECK(!silu_mul, op, ": x_add with silu_mul is not supported");
  }
  at::Tensor out = batched ? at::empty({B, N_out}, x.options().dtype(out_float ? at::kFloat : x.scalar_type()))
                           : at::empty({N_out}, x.options().dtype(out_float ? at::kFloat : x.scalar_type()));

  GemvParams p{};
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.norm_weight = norm_weight ? norm_weight->data_ptr() : nullptr;
  p.residual = residual ? residual->data_ptr() : nullptr;
  p.x_add = x_add ? x_add->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.x_stride = x.stride(-1);
  p.x_row_stride = batched ? x.stride(0) : 0;
  p.rows = B;
  p.bias_stride = bias ? bias->stride(0) : 0;
  p.nw_stride = norm_weight ? norm_weight->stride(0) : 0;
  p.res_stride = residual ? residual->stride(-1) : 0;
  p.res_row_stride = residual && batched ? residual->stride(0) : 0;
  p.N = N;
  p.K = K;
  p.N_out = N_out;
  p.norm_eps = static_cast<float>(norm_eps);
  p.silu_mul = silu_mul;
  p.out_float = out_float;
  // Programmatic dependent launch: the kernel streams its first weights before waiting on the previous
  // kernel, which is only correct when no earlier kernel writes them (static_weight: the decode step).
  // AHN_RT_GEMV_PDL=0 turns it off, =1 forces it for every call (benchmark A/B).
  const char* pdl_env = std::getenv("AHN_RT_GEMV_PDL");
  p.pdl = pdl_env != nullptr && *pdl_env != '\0' ? pdl_env[0] != '0' : static_weight;
  if (N_out == 0 || B == 0) return out;
#ifdef AHN_RT_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_dtype(x.scalar_type(), op, [&](auto tag) { gemv_cuda<decltype(tag)>(p, stream); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
#endif
  TORCH_CHECK(x.is_cpu(), op, ": no kernel for device ", x.device());
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) { gemv_cpu<decltype(tag)>(p); });
  return out;
}

}  // namespace ahn_rt
