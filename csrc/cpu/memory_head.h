// The last part of the CPU memory steps (cpu/gdn_decode.cpp, cpu/mamba2_decode.cpp): one head's grouped
// o_proj over its output y and the sum added into the attention output (docs/semantics.md §6).
#pragma once

#include <cstdint>

#include "../common.h"

namespace ahn_rt {

// out[h * out_stride + c] += round_T(sum_i y[i] * round_T(o_proj[h][i][c])) for c < Dv, with o_proj
// [H, Dv, Dv] stored (in, out) and y [Dv] already rounded to T; m [Dv] is scratch. fp32 accumulation in
// row order i, as the references' einsum in T.
template <typename T>
void add_grouped_o_proj(const float* y, int64_t h, int64_t Dv, const void* o_proj, Kind op_kind, void* out,
                        Kind out_kind, int64_t out_stride, float* m) {
  for (int64_t c = 0; c < Dv; ++c) m[c] = 0.f;
  for (int64_t i = 0; i < Dv; ++i) {
    const int64_t row = (h * Dv + i) * Dv;
    for (int64_t c = 0; c < Dv; ++c) m[c] += y[i] * round_to<T>(load_kind(o_proj, op_kind, row + c));
  }
  for (int64_t c = 0; c < Dv; ++c) {
    const int64_t idx = h * out_stride + c;
    store_kind(out, out_kind, idx, load_kind(out, out_kind, idx) + round_to<T>(m[c]));
  }
}

}  // namespace ahn_rt
