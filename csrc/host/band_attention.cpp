// ahn_rt.band_attention: the checked host entry function of the prefill's window attention over a linear
// key buffer (semantics: common.h BandAttentionParams). CPU: cpu/band_attention.cpp. CUDA: cuDNN's fused
// attention through cudnn-frontend (cuda/band_attention_cudnn.cpp), compiled where the build found
// cudnn-frontend's and cuDNN's headers; without them the CUDA call fails with a message saying so.
// Test: pytest tests/test_band_attention.py.
#include <limits>

#include "host.h"

namespace ahn_rt {

#if defined(AHN_RT_WITH_CUDA) && defined(AHN_RT_WITH_CUDNN_FE)
// p's pointers, sizes and strides (n: the buffers' rows); q for its device and dtype; kv_len on the device.
void band_attention_cudnn(const BandAttentionParams& p, const at::Tensor& q, const std::optional<at::Tensor>& kv_len,
                          const std::optional<at::Tensor>& q_len);
#endif

std::tuple<at::Tensor, at::Tensor> band_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  int64_t left, double scale,
                                                  const std::optional<at::Tensor>& kv_len,
                                                  const std::optional<at::Tensor>& q_len) {
  constexpr const char* op = "ahn_rt.band_attention";
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q must be [Tq, H, D] and k, v [n, Hkv, D], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t Tq = q.size(0), H = q.size(1), D = q.size(2), n = k.size(0), Hkv = k.size(1);
  TORCH_CHECK(v.size(0) == n && v.size(1) == Hkv && k.size(2) == D && v.size(2) == D, op,
              ": k and v must both be [n, Hkv, ", D, "], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, op, ": the query heads (", H, ") must be a multiple of the key heads (",
              Hkv, ")");
  check_same_device(q, k, op, "k");
  // The keys and queries in use: n and Tq, or the first kv_len rows of k / v and q_len rows of q (on CUDA
  // their values stay on the device, unread: the caller keeps q_len <= kv_len, q_len <= Tq, kv_len <= n).
  auto count = [&](const std::optional<at::Tensor>& t, const char* name, int64_t rows, const char* of) {
    if (!t.has_value()) return rows;
    const at::Tensor& c = *t;
    check_same_device(q, c, op, name);
    TORCH_CHECK(c.scalar_type() == at::kInt && c.numel() == 1 && c.is_contiguous(), op, ": ", name,
                " must be an int32 tensor of one element, got ", c.scalar_type(), " ", c.sizes());
    if (!q.is_cpu()) return rows;
    const int64_t v = c.item<int32_t>();
    TORCH_CHECK(v >= 0 && v <= rows, op, ": ", name, " ", v, " is outside [0, ", rows, "] (the rows of ", of, ")");
    return v;
  };
  const int64_t keys = count(kv_len, "kv_len", n, "k, v");
  const int64_t queries = count(q_len, "q_len", Tq, "q");
  TORCH_CHECK(queries <= keys, op, ": more queries (", queries, ") than keys (", keys,
              "): the bottom-right diagonal needs Tq <= n");
  check_same_device(q, v, op, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share one dtype");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, op, ": the last dims must be contiguous");
  at::Tensor out = at::empty({Tq, H, D}, q.options());
  at::Tensor lse = at::empty({H, Tq}, q.options().dtype(at::kFloat));
  if (q.is_cpu() && queries < Tq) {   // the rows past q_len: defined on the CPU (not written on CUDA)
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
  }
  if (Tq == 0 || H == 0 || D == 0) return {out, lse};
  BandAttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.Tq = Tq;
  p.nq = queries;
  p.n = keys;
  p.H = H;
  p.Hkv = Hkv;
  p.D = D;
  p.left = left;
  p.q_s0 = q.stride(0);
  p.q_s1 = q.stride(1);
  p.k_s0 = k.stride(0);
  p.k_s1 = k.stride(1);
  p.v_s0 = v.stride(0);
  p.v_s1 = v.stride(1);
  p.scale = static_cast<float>(scale);
  if (q.is_cuda()) {
#if defined(AHN_RT_WITH_CUDA) && defined(AHN_RT_WITH_CUDNN_FE)
    const c10::cuda::CUDAGuard guard(q.device());
    band_attention_cudnn(p, q, kv_len, q_len);
    return {out, lse};
#else
    TORCH_CHECK(false, op, ": this ahn_rt build has no CUDA path (it was built without cudnn-frontend's or "
                "cuDNN 9's headers: see setup.py; pip install nvidia-cudnn-frontend, then rebuild)");
#endif
  }
  TORCH_CHECK(q.is_cpu(), op, ": no kernel for device ", q.device());
  dispatch_dtype(q.scalar_type(), op, [&](auto tag) { band_attention_cpu<decltype(tag)>(p); });
  return {out, lse};
}

}  // namespace ahn_rt
