// CPU gdn_chunk_scan kernel: the chunk-to-chunk recurrence of the chunked gated delta rule (reference:
// ahn_rt/ref.py gdn_chunk_scan_ref; docs/semantics.md §5). Heads run in parallel; within a head the chunks
// are sequential. Test: pytest tests/test_prefill.py -k scan.
#include <vector>

#include <ATen/Parallel.h>

#include "../common.h"

namespace ahn_rt {

void gdn_chunk_scan_cpu(const GdnChunkScanParams& p) {
  const int64_t N = p.N, C = p.C, Dk = p.Dk, Dv = p.Dv;
  at::parallel_for(0, p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc_u(Dv), acc_o(Dv);
    for (int64_t h = begin; h < end; ++h) {
      float* S = p.state + h * Dk * Dv;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t tile = (h * N + n) * C;
        const float* w = p.w ? p.w + tile * Dk : nullptr;
        const float* qg = p.qg + tile * Dk;
        const float* u = p.u + tile * Dv;
        const float* kd_t = p.kd_t + tile * Dk;   // [Dk, C] of this chunk
        float* vn = p.v_new + tile * Dv;
        float* oi = p.o_inter + tile * Dv;
        for (int64_t r = 0; r < C; ++r) {
          for (int64_t j = 0; j < Dv; ++j) acc_u[j] = acc_o[j] = 0.f;
          for (int64_t k = 0; k < Dk; ++k) {
            const float a = w ? w[r * Dk + k] : 0.f, b = qg[r * Dk + k];
            const float* row = S + k * Dv;
            for (int64_t j = 0; j < Dv; ++j) {
              acc_u[j] += a * row[j];
              acc_o[j] += b * row[j];
            }
          }
          for (int64_t j = 0; j < Dv; ++j) {
            vn[r * Dv + j] = u[r * Dv + j] - acc_u[j];
            oi[r * Dv + j] = acc_o[j];
          }
        }
        const float g = p.gl[h * N + n];
        for (int64_t k = 0; k < Dk; ++k) {
          float* row = S + k * Dv;
          for (int64_t j = 0; j < Dv; ++j) row[j] *= g;
          for (int64_t r = 0; r < C; ++r) {
            const float a = kd_t[k * C + r];
            for (int64_t j = 0; j < Dv; ++j) row[j] += a * vn[r * Dv + j];
          }
        }
      }
    }
  });
}

}  // namespace ahn_rt
