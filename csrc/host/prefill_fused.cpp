// ahn_rt.attn_merge, silu_mul, rope and gdn_gate_norm: the checked host entry functions of the prefill's
// fused elementwise steps (kernels: cpu/ and cuda/ prefill_fused). Test: pytest tests/test_prefill.py.
#include "host.h"

namespace ahn_rt {

at::Tensor attn_merge(at::TensorList outs, at::TensorList lses, at::IntArrayRef offsets, int64_t rows) {
  constexpr const char* op = "ahn_rt.attn_merge";
  const int64_t P = static_cast<int64_t>(outs.size());
  TORCH_CHECK(P >= 1 && P <= kMergeMaxParts, op, ": takes 1 to ", kMergeMaxParts, " parts, got ", P);
  TORCH_CHECK(static_cast<int64_t>(lses.size()) == P && static_cast<int64_t>(offsets.size()) == P, op,
              ": outs, lses and offsets must have one entry per part");
  const at::Tensor& o0 = outs[0];
  TORCH_CHECK(o0.dim() == 3, op, ": each out must be [n, H, D], got ", o0.sizes());
  const int64_t H = o0.size(1), D = o0.size(2);
  AttnMergeParams p{};
  for (int64_t i = 0; i < P; ++i) {
    const at::Tensor& o = outs[i];
    const at::Tensor& l = lses[i];
    check_same_device(o0, o, op, "outs");
    check_same_device(o0, l, op, "lses");
    TORCH_CHECK(o.dim() == 3 && o.size(1) == H && o.size(2) == D && o.stride(2) == 1, op,
                ": each out must be [n, ", H, ", ", D, "] with a contiguous last dim, got ", o.sizes());
    TORCH_CHECK(o.scalar_type() == o0.scalar_type(), op, ": outs must share one dtype");
    TORCH_CHECK(l.scalar_type() == at::kFloat && l.dim() == 2 && l.size(0) == H && l.size(1) == o.size(0) &&
                    l.stride(1) == 1, op, ": each lse must be float32 [", H, ", n] with contiguous rows, got ",
                l.sizes());
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + o.size(0) <= rows, op, ": part ", i, " covers rows [",
                offsets[i], ", ", offsets[i] + o.size(0), ") outside [0, ", rows, ")");
    p.o[i] = o.data_ptr();
    p.lse[i] = l.data_ptr<float>();
    p.off[i] = offsets[i];
    p.n[i] = o.size(0);
    p.o_s0[i] = o.stride(0);
    p.o_s1[i] = o.stride(1);
    p.lse_s0[i] = l.stride(0);
  }
  at::Tensor out = at::empty({rows, H, D}, o0.options());
  p.parts = P;
  p.rows = rows;
  p.H = H;
  p.D = D;
  p.out = out.data_ptr();
  if (rows == 0 || H == 0 || D == 0) return out;
  dispatch_device(
      o0, o0.scalar_type(), op,
      [&](auto tag, void* stream) { attn_merge_cuda<decltype(tag)>(p, stream); },
      [&](auto tag) { attn_merge_cpu<decltype(tag)>(p); });
  return out;
}

at::Tensor silu_mul(const at::Tensor& x) {
  constexpr const char* op = "ahn_rt.silu_mul";
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0 && x.stride(1) == 1, op,
              ": x must be [rows, 2N] with a contiguous last dim, got ", x.sizes());
  const int64_t N = x.size(1) / 2;
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  SiluMulParams p{x.data_ptr(), out.data_ptr(), x.size(0), N, x.stride(0)};
  if (x.numel() == 0) return out;
  dispatch_device(
      x, x.scalar_type(), op, [&](auto tag, void* stream) { silu_mul_cuda<decltype(tag)>(p, stream); },
      [&](auto tag) { silu_mul_cpu<decltype(tag)>(p); });
  return out;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* op = "ahn_rt.rope";
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, op,
              ": x must be [T, heads, D] with D even and a contiguous last dim, got ", x.sizes());
  const int64_t T = x.size(0), D = x.size(2);
  for (auto [t, what] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    check_same_device(x, *t, op, what);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T && t->size(1) == D && t->is_contiguous(), op, ": ", what,
                " must be a contiguous [", T, ", ", D, "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", what, " must have x's dtype ", x.scalar_type());
  }
  at::Tensor out = at::empty(x.sizes(), x.options());
  RopeParams p{x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), T, x.size(1), D, x.stride(0),
               x.stride(1)};
  if (out.numel() == 0) return out;
  dispatch_device(
      x, x.scalar_type(), op, [&](auto tag, void* stream) { rope_cuda<decltype(tag)>(p, stream); },
      [&](auto tag) { rope_cpu<decltype(tag)>(p); });
  return out;
}

at::Tensor gdn_gate_norm(const at::Tensor& o, const at::Tensor& z, const at::Tensor& norm_weight, double eps) {
  constexpr const char* op = "ahn_rt.gdn_gate_norm";
  TORCH_CHECK(o.dim() == 3 && o.stride(2) == 1, op, ": o must be [n, H, D] with a contiguous last dim, got ",
              o.sizes());
  const int64_t n = o.size(0), H = o.size(1), D = o.size(2);
  check_same_device(o, z, op, "z");
  TORCH_CHECK(z.dim() == 2 && z.size(0) == n && z.size(1) == H, op, ": z must be [", n, ", ", H, "], got ",
              z.sizes());
  check_vec(norm_weight, D, o, op, "norm_weight");
  GateNormParams p{};
  p.z_kind = kind_of(z, "ahn_rt.gdn_gate_norm: z");
  p.w_kind = kind_of(norm_weight, "ahn_rt.gdn_gate_norm: norm_weight");
  at::Tensor y = at::empty({n, H, D}, o.options());
  p.o = o.data_ptr();
  p.z = z.data_ptr();
  p.w = norm_weight.data_ptr();
  p.y = y.data_ptr();
  p.n = n;
  p.H = H;
  p.D = D;
  p.o_s0 = o.stride(0);
  p.o_s1 = o.stride(1);
  p.z_s0 = z.stride(0);
  p.z_s1 = z.stride(1);
  p.w_s0 = norm_weight.stride(0);
  p.eps = static_cast<float>(eps);
  if (y.numel() == 0) return y;
  dispatch_device(
      o, o.scalar_type(), op, [&](auto tag, void* stream) { gate_norm_cuda<decltype(tag)>(p, stream); },
      [&](auto tag) { gate_norm_cpu<decltype(tag)>(p); });
  return y;
}

}  // namespace ahn_rt
