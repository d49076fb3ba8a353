// Every ahn_rt op in one place: its schema (TORCH_LIBRARY), its checked host function (host/<op>.cpp)
// registered for CPU and CUDA, and the empty Python module _C. Test: pytest tests/test_ops.py tests/test_gemv.py.
// A new op: a schema and two m.impl lines here, params + launchers in common.h, host/, cpu/, cuda/ <op> files.
#include <Python.h>

#include <torch/library.h>

#include "host/host.h"

// `import ahn_rt._C` loads this library (and so runs TORCH_LIBRARY below); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(ahn_rt, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def(
      "decode_prep(Tensor proj, Tensor inv_freq, Tensor pos, Tensor? q_norm, Tensor? k_norm, float norm_eps, "
      "Tensor? a_log, Tensor? dt_bias, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!)? beta_cache, "
      "Tensor(d!)? alpha_cache, int sinks, int window, Tensor(e!) k_evict, Tensor(f!) v_evict, "
      "Tensor(g!)? beta_evict, Tensor(h!)? alpha_evict, Tensor? slots=None) -> Tensor");
  m.def("swa_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, int sinks, int window, float scale, "
        "Tensor? slots=None) -> Tensor");
  m.def(
      "gdn_decode(Tensor(a!) state, Tensor q, Tensor k, Tensor v, Tensor beta, Tensor alpha, Tensor z, "
      "Tensor norm_weight, Tensor o_proj, Tensor(b!) out, Tensor pos, int sinks, int window, float eps, "
      "Tensor? slots=None) -> ()");
  m.def(
      "mamba2_decode(Tensor(a!) state, Tensor q, Tensor k, Tensor v, Tensor dt, Tensor a_log, Tensor z, "
      "Tensor norm_weight, Tensor o_proj, Tensor(b!) out, Tensor pos, int sinks, int window, float eps, "
      "Tensor? slots=None) -> ()");
  m.def(
      "gemv(Tensor x, Tensor weight, Tensor? bias, Tensor? norm_weight, float norm_eps, Tensor? residual, "
      "bool silu_mul, bool out_float, bool static_weight=False, Tensor? x_add=None) -> Tensor");
  m.def("gdn_chunk_prep(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor alpha, float scale) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("mamba2_chunk_prep(Tensor q, Tensor k, Tensor v, Tensor dt, Tensor a_log) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gdn_chunk_scan(Tensor? w, Tensor u, Tensor kd_t, Tensor qg, Tensor gl, Tensor(a!) state) "
        "-> (Tensor, Tensor)");
  m.def("attn_merge(Tensor[] outs, Tensor[] lses, int[] offsets, int rows) -> Tensor");
  m.def("band_attention(Tensor q, Tensor k, Tensor v, int left, float scale, Tensor? kv_len=None, Tensor? q_len=None) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("gdn_gate_norm(Tensor o, Tensor z, Tensor norm_weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(ahn_rt, CPU, m) {
  m.impl("rms_norm", &ahn_rt::rms_norm);
  m.impl("decode_prep", &ahn_rt::decode_prep);
  m.impl("swa_decode", &ahn_rt::swa_decode);
  m.impl("gdn_decode", &ahn_rt::gdn_decode);
  m.impl("mamba2_decode", &ahn_rt::mamba2_decode);
  m.impl("gemv", &ahn_rt::gemv);
  m.impl("gdn_chunk_prep", &ahn_rt::gdn_chunk_prep);
  m.impl("mamba2_chunk_prep", &ahn_rt::mamba2_chunk_prep);
  m.impl("gdn_chunk_scan", &ahn_rt::gdn_chunk_scan);
  m.impl("attn_merge", &ahn_rt::attn_merge);
  m.impl("band_attention", &ahn_rt::band_attention);
  m.impl("silu_mul", &ahn_rt::silu_mul);
  m.impl("rope", &ahn_rt::rope);
  m.impl("gdn_gate_norm", &ahn_rt::gdn_gate_norm);
}

#ifdef AHN_RT_WITH_CUDA
TORCH_LIBRARY_IMPL(ahn_rt, CUDA, m) {
  m.impl("rms_norm", &ahn_rt::rms_norm);
  m.impl("decode_prep", &ahn_rt::decode_prep);
  m.impl("swa_decode", &ahn_rt::swa_decode);
  m.impl("gdn_decode", &ahn_rt::gdn_decode);
  m.impl("mamba2_decode", &ahn_rt::mamba2_decode);
  m.impl("gemv", &ahn_rt::gemv);
  m.impl("gdn_chunk_prep", &ahn_rt::gdn_chunk_prep);
  m.impl("mamba2_chunk_prep", &ahn_rt::mamba2_chunk_prep);
  m.impl("gdn_chunk_scan", &ahn_rt::gdn_chunk_scan);
  m.impl("attn_merge", &ahn_rt::attn_merge);
  m.impl("band_attention", &ahn_rt::band_attention);
  m.impl("silu_mul", &ahn_rt::silu_mul);
  m.impl("rope", &ahn_rt::rope);
  m.impl("gdn_gate_norm", &ahn_rt::gdn_gate_norm);
}
#endif
