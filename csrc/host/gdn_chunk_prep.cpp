// ahn_rt.gdn_chunk_prep: the checked host entry function (shapes, dtypes, device guard, stream, launch,
// launch-error check). Kernels: cpu/gdn_chunk_prep.cpp, cuda/gdn_chunk_prep.cu.
// Test: pytest tests/test_prefill.py -k prep.
#include "host.h"

namespace ahn_rt {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gdn_chunk_prep(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const at::Tensor& alpha,
    double scale) {
  constexpr const char* op = "ahn_rt.gdn_chunk_prep";
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q, k, v must be [n, H, Dk], [n, Hkv, Dk], ",
              "[n, Hkv, Dv], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t n = q.size(0), H = q.size(1), Dk = q.size(2), Hkv = k.size(1), Dv = v.size(2);
  TORCH_CHECK(k.size(0) == n && v.size(0) == n && k.size(2) == Dk && v.size(1) == Hkv, op,
              ": q, k, v must be [n, H, Dk], [n, Hkv, Dk], [n, Hkv, Dv], got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": the query heads (", H, ") must be a multiple of the kv heads (",
              Hkv, ")");
  for (auto [t, what] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&beta, "beta"},
                         std::pair{&alpha, "alpha"}}) {
    check_same_device(q, *t, op, what);
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, op,
              ": q, k and v need a contiguous last dim");
  for (auto [t, what] : {std::pair{&beta, "beta"}, std::pair{&alpha, "alpha"}}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == n && t->size(1) == H, op, ": ", what, " must be [", n, ", ", H,
                "], got ", t->sizes());
  }
  GdnChunkPrepParams p{};
  p.beta_kind = kind_of(beta, "ahn_rt.gdn_chunk_prep: beta");
  p.alpha_kind = kind_of(alpha, "ahn_rt.gdn_chunk_prep: alpha");
  const int64_t C = kScanChunk, N = (n + C - 1) / C;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor w = at::empty({H, N, C, Dk}, f32), u = at::empty({H, N, C, Dv}, f32);
  at::Tensor kd_t = at::empty({H, N, Dk, C}, f32), qg = at::empty({H, N, C, Dk}, f32);
  at::Tensor gl = at::empty({H, N}, f32), P = at::empty({H, N, C, C}, f32);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.beta = beta.data_ptr();
  p.alpha = alpha.data_ptr();
  p.q_s0 = q.stride(0);
  p.q_s1 = q.stride(1);
  p.k_s0 = k.stride(0);
  p.k_s1 = k.stride(1);
  p.v_s0 = v.stride(0);
  p.v_s1 = v.stride(1);
  p.b_s0 = beta.stride(0);
  p.b_s1 = beta.stride(1);
  p.a_s0 = alpha.stride(0);
  p.a_s1 = alpha.stride(1);
  p.scale = static_cast<float>(scale);
  p.w = w.data_ptr<float>();
  p.u = u.data_ptr<float>();
  p.kd_t = kd_t.data_ptr<float>();
  p.qg = qg.data_ptr<float>();
  p.gl = gl.data_ptr<float>();
  p.P = P.data_ptr<float>();
  p.n = n;
  p.H = H;
  p.Hkv = Hkv;
  p.N = N;
  p.C = C;
  p.Dk = Dk;
  p.Dv = Dv;
  if (N == 0 || H == 0) return {w, u, kd_t, qg, gl, P};
  dispatch_device(
      q, q.scalar_type(), op,
      [&](auto tag, void* stream) { gdn_chunk_prep_cuda<decltype(tag)>(p, stream); },
      [&](auto tag) { gdn_chunk_prep_cpu<decltype(tag)>(p); });
  return {w, u, kd_t, qg, gl, P};
}

}  // namespace ahn_rt
