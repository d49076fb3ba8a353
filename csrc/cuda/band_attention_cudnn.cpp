// band_attention on CUDA: cuDNN's fused attention (the library torch ships) through cudnn-frontend's graph
// API, which exposes what torch's SDPA entry does not: the diagonal aligned to the bottom-right corner
// (Tq queries are the last Tq of n keys) and a left bound (a sliding window of `left` keys). One execution
// plan per call layout (sizes, strides, dtype, bound, scale), built on first use and kept per thread, as torch
// keeps its own cuDNN plans (the prefill builds them at load: ops.warm_prefill_attention). Compiled only when
// setup.py finds cudnn-frontend's and cuDNN's headers. Semantics and CPU twin: common.h BandAttentionParams,
// cpu/band_attention.cpp. Test: pytest -m cuda tests/test_band_attention.py.
#include <dlfcn.h>

#include <array>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <unordered_map>

#include <ATen/cudnn/Handle.h>

#include <cudnn_frontend.h>

#include "../host/host.h"

// cudnn-frontend is built with NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING (setup.py): it reaches cuDNN, the CUDA
// runtime and NVRTC through dlopen / dlsym instead of link-time symbols. This is its handle to cuDNN: the
// library torch has loaded (RTLD_NOLOAD finds it by soname), so both use one cuDNN.
namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;
}

namespace ahn_rt {

namespace {

namespace fe = cudnn_frontend;

void load_cudnn() {
  static std::once_flag once;
  static std::string why;   // dlopen's reason, kept: later calls report it too
  std::call_once(once, [] {
    void* h = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_NOLOAD);
    if (!h) h = dlopen("libcudnn.so.9", RTLD_NOW);
    if (!h) {
      const char* e = dlerror();
      why = e ? e : "not found";
    }
    cudnn_frontend::cudnn_dlhandle = h;
  });
  TORCH_CHECK(cudnn_frontend::cudnn_dlhandle != nullptr, "ahn_rt.band_attention: cannot load libcudnn.so.9 (",
              why, "); set AHN_RT_PREFILL_BAND=0");
}

// uids of the graph's tensors in the variant pack
enum : int64_t { kQ = 1, kK, kV, kO, kStats, kSeqQ, kSeqKV };

// What a plan depends on: device, dtype, padded (kv_len or q_len given), the scale's bits, then BandAttentionParams'
// sizes, bound and strides. A flat array: no padding bytes, compared and hashed element by element.
using PlanKey = std::array<int64_t, 16>;

PlanKey plan_key(const BandAttentionParams& p, const at::Tensor& q, bool padded) {
  uint32_t scale_bits = 0;
  std::memcpy(&scale_bits, &p.scale, sizeof(p.scale));
  return {q.get_device(), static_cast<int64_t>(q.scalar_type()), padded, scale_bits, p.Tq, p.n, p.H, p.Hkv, p.D,
          p.left > 0 ? p.left : 0, p.q_s0, p.q_s1, p.k_s0, p.k_s1, p.v_s0, p.v_s1};
}

struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t x : k) h = (h ^ static_cast<size_t>(x)) * 1099511628211ull;
    return h;
  }
};

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace = 0;
};

void check(const fe::error_t& status, const char* what) {
  TORCH_CHECK(status.is_good(), "ahn_rt.band_attention: cuDNN ", what, ": ",
              const_cast<fe::error_t&>(status).get_message(),
              " (AHN_RT_PREFILL_BAND=0 runs the prefill without it)");
}

Plan build(const BandAttentionParams& key, at::ScalarType dtype, bool padded, cudnnHandle_t handle) {
  auto graph = std::make_shared<fe::graph::Graph>();
  const fe::DataType_t io = dtype == at::kBFloat16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF;
  graph->set_io_data_type(io)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  // [Tq, H, D] rows as cuDNN's [batch 1, heads, sequence, head dim] with the same strides
  auto q = graph->tensor(fe::graph::Tensor_attributes().set_name("q").set_uid(kQ)
                             .set_dim({1, key.H, key.Tq, key.D})
                             .set_stride({key.Tq * key.q_s0, key.q_s1, key.q_s0, 1}));
  auto k = graph->tensor(fe::graph::Tensor_attributes().set_name("k").set_uid(kK)
                             .set_dim({1, key.Hkv, key.n, key.D})
                             .set_stride({key.n * key.k_s0, key.k_s1, key.k_s0, 1}));
  auto v = graph->tensor(fe::graph::Tensor_attributes().set_name("v").set_uid(kV)
                             .set_dim({1, key.Hkv, key.n, key.D})
                             .set_stride({key.n * key.v_s0, key.v_s1, key.v_s0, 1}));
  auto attrs = fe::graph::SDPA_attributes()
                   .set_name("band")
                   .set_generate_stats(true)
                   .set_attn_scale(key.scale)
                   .set_diagonal_alignment(fe::DiagonalAlignment_t::BOTTOM_RIGHT)
                   .set_diagonal_band_right_bound(0);
  if (key.left > 0) attrs.set_diagonal_band_left_bound(static_cast<int>(key.left));
  if (padded) {   // cuDNN's padding mask: the first seq_len_kv keys and seq_len_q queries of the buffers
    auto seq = [&](const char* name, int64_t uid) {
      return graph->tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid)
                               .set_dim({1, 1, 1, 1}).set_stride({1, 1, 1, 1})
                               .set_data_type(fe::DataType_t::INT32));
    };
    attrs.set_padding_mask(true).set_seq_len_q(seq("seq_q", kSeqQ)).set_seq_len_kv(seq("seq_kv", kSeqKV));
  }
  auto [o, stats] = graph->sdpa(q, k, v, attrs);
  o->set_output(true).set_uid(kO).set_dim({1, key.H, key.Tq, key.D})
      .set_stride({key.Tq * key.H * key.D, key.D, key.H * key.D, 1});
  stats->set_output(true).set_uid(kStats).set_data_type(fe::DataType_t::FLOAT)
      .set_dim({1, key.H, key.Tq, 1}).set_stride({key.H * key.Tq, key.Tq, 1, 1});
  check(graph->validate(), "graph validation");
  check(graph->build_operation_graph(handle), "operation graph");
  check(graph->create_execution_plans({fe::HeurMode_t::A}), "heuristics");
  check(graph->check_support(handle), "support check");
  check(graph->build_plans(handle), "plan build");
  Plan plan;
  plan.graph = graph;
  plan.workspace = graph->get_workspace_size();
  return plan;
}

}  // namespace

void band_attention_cudnn(const BandAttentionParams& p, const at::Tensor& q, const std::optional<at::Tensor>& kv_len,
                          const std::optional<at::Tensor>& q_len) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "ahn_rt.band_attention: on CUDA q, k and v must be bfloat16 or float16, got ", q.scalar_type());
  for (auto [ptr, s0, s1] : {std::tuple{p.q, p.q_s0, p.q_s1}, std::tuple{p.k, p.k_s0, p.k_s1},
                             std::tuple{p.v, p.v_s0, p.v_s1}})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (s0 * 2) % 16 == 0 && (s1 * 2) % 16 == 0,
                "ahn_rt.band_attention: on CUDA q, k and v must start and have rows on 16-byte boundaries");
  const bool padded = kv_len.has_value() || q_len.has_value();
  const PlanKey key = plan_key(p, q, padded);

  load_cudnn();
  cudnnHandle_t handle = at::native::getCudnnHandle();
  check(fe::detail::set_stream(handle, c10::cuda::getCurrentCUDAStream().stream()) == CUDNN_STATUS_SUCCESS
            ? fe::error_t{} : fe::error_t{fe::error_code_t::CUDNN_BACKEND_API_FAILED, "cudnnSetStream failed"},
        "stream");
  thread_local std::unordered_map<PlanKey, Plan, PlanKeyHash> plans;
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, build(p, q.scalar_type(), padded, handle)).first;
  const Plan& plan = it->second;
  at::Tensor workspace = at::empty({std::max<int64_t>(plan.workspace, 1)}, q.options().dtype(at::kByte));
  std::unordered_map<int64_t, void*> pack = {
      {kQ, const_cast<void*>(p.q)}, {kK, const_cast<void*>(p.k)}, {kV, const_cast<void*>(p.v)},
      {kO, p.out}, {kStats, p.lse}};
  if (padded) {   // the counts as cuDNN reads them: the given device int32s, else the buffers' rows as a
                  // device int32, one per (device, value), kept
    thread_local std::unordered_map<int64_t, at::Tensor> counts;
    auto whole = [&](int64_t rows) {
      const int64_t ck = rows * 64 + q.get_device();
      auto c = counts.find(ck);
      if (c == counts.end()) c = counts.emplace(ck, at::full({1}, rows, q.options().dtype(at::kInt))).first;
      return c->second.data_ptr();
    };
    pack[kSeqQ] = q_len.has_value() ? const_cast<void*>(q_len->data_ptr()) : whole(p.Tq);
    pack[kSeqKV] = kv_len.has_value() ? const_cast<void*>(kv_len->data_ptr()) : whole(p.n);
  }
  check(plan.graph->execute(handle, pack, workspace.data_ptr()), "execution");
}

}  // namespace ahn_rt
