// ahn_rt.gdn_chunk_prep and ahn_rt.mamba2_chunk_prep: the checked host entry functions (shapes, dtypes, device guard, stream, launch,
// launch-error check). Kernels: cpu/gdn_chunk_prep.cpp, cuda/gdn_chunk_prep.cu.
// Test: pytest tests/test_prefill.py -k prep.
#include <string>

#include "host.h"

namespace ahn_rt {

namespace {

// The checks and the launch of both ops: beta/alpha are GatedDeltaNet's [n, H] gates, or Mamba2's dt [n, H]
// and A_log [H]. Returns (w (undefined for Mamba2), u, kd_t, qg, gl, P).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_prep(
    const char* op, bool mamba2, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& beta, const at::Tensor& alpha, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q, k, v must be [n, H, Dk], [n, Hkv, Dk], ",
              "[n, Hkv, Dv], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t n = q.size(0), H = q.size(1), Dk = q.size(2), Hkv = k.size(1), Dv = v.size(2);
  TORCH_CHECK(k.size(0) == n && v.size(0) == n && k.size(2) == Dk && v.size(1) == Hkv, op,
              ": q, k, v must be [n, H, Dk], [n, Hkv, Dk], [n, Hkv, Dv], got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": the query heads (", H, ") must be a multiple of the kv heads (",
              Hkv, ")");
  const char* b_name = mamba2 ? "dt" : "beta";
  const char* a_name = mamba2 ? "a_log" : "alpha";
  for (auto [t, what] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&beta, b_name},
                         std::pair{&alpha, a_name}}) {
    check_same_device(q, *t, op, what);
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, op,
              ": q, k and v need a contiguous last dim");
  TORCH_CHECK(beta.dim() == 2 && beta.size(0) == n && beta.size(1) == H, op, ": ", b_name, " must be [", n,
              ", ", H, "], got ", beta.sizes());
  if (mamba2) {
    check_vec(alpha, H, q, op, "a_log");
  } else {
    TORCH_CHECK(alpha.dim() == 2 && alpha.size(0) == n && alpha.size(1) == H, op, ": alpha must be [", n, ", ",
                H, "], got ", alpha.sizes());
  }
  GdnChunkPrepParams p{};
  p.beta_kind = kind_of(beta, (std::string(op) + ": " + b_name).c_str());
  p.alpha_kind = kind_of(alpha, (std::string(op) + ": " + a_name).c_str());
  p.mamba2 = mamba2;
  const int64_t C = kScanChunk, N = (n + C - 1) / C;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor w = mamba2 ? at::Tensor() : at::empty({H, N, C, Dk}, f32), u = at::empty({H, N, C, Dv}, f32);
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
  p.a_s0 = mamba2 ? 0 : alpha.stride(0);
  p.a_s1 = mamba2 ? alpha.stride(0) : alpha.stride(1);
  p.scale = static_cast<float>(scale);
  p.w = mamba2 ? nullptr : w.data_ptr<float>();
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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gdn_chunk_prep(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta, const at::Tensor& alpha,
    double scale) {
  return chunk_prep("ahn_rt.gdn_chunk_prep", false, q, k, v, beta, alpha, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mamba2_chunk_prep(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dt, const at::Tensor& a_log) {
  auto [w, u, kd_t, qg, gl, P] = chunk_prep("ahn_rt.mamba2_chunk_prep", true, q, k, v, dt, a_log, 1.0);
  return {u, kd_t, qg, gl, P};
}

}  // namespace ahn_rt
