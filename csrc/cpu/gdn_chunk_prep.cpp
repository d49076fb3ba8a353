// CPU gdn_chunk_prep kernel: the chunk-local part of the chunked gated delta rule (reference: ahn_rt/ref.py
// gdn_chunk_prep_ref, and mamba2_chunk_prep_ref with p.mamba2; the math: GdnChunkPrepParams in common.h,
// docs/semantics.md §5, §11.2). The (head, chunk) tiles are independent and run in parallel; each follows
// the CUDA kernel's steps in the same order.
// Test: pytest tests/test_prefill.py -k prep.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

#include "../common.h"

namespace ahn_rt {

namespace {

// F.normalize(x, eps=1e-12)'s divisor in dtype T (Mamba2's q and k): the norm rounded to T, clamped.
template <typename T>
float l2_divisor_t(float sum_sq) {
  return std::max(round_to<T>(std::sqrt(sum_sq)), round_to<T>(1e-12f));
}

template <typename T, bool M2>
void prep_cpu(const GdnChunkPrepParams& p) {
  using GT = std::conditional_t<M2, double, float>;
  const int64_t C = p.C, Dk = p.Dk, Dv = p.Dv, G_ = p.H / p.Hkv;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  at::parallel_for(0, p.H * p.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> K(C * Dk), Q(C * Dk), A(C * C), B(C), x(C);
    std::vector<GT> G(C);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t h = tile / p.N, n = tile % p.N, hk = h / G_, t0 = n * C;
      // 1. Rows: k^, q^ * scale, beta, alpha (zero past n).
      for (int64_t i = 0; i < C; ++i) {
        const int64_t t = t0 + i;
        const bool ok = t < p.n;
        float ssk = 0.f, ssq = 0.f;
        for (int64_t d = 0; d < Dk; ++d) {
          const float kv = ok ? static_cast<float>(k[t * p.k_s0 + hk * p.k_s1 + d]) : 0.f;
          const float qv = ok ? static_cast<float>(q[t * p.q_s0 + h * p.q_s1 + d]) : 0.f;
          K[i * Dk + d] = kv;
          Q[i * Dk + d] = qv;
          ssk += kv * kv;
          ssq += qv * qv;
        }
        if constexpr (M2) {   // the padding rows stay 0 (in fp16 eps rounds to 0: no 0 / 0)
          const float kn = ok ? l2_divisor_t<T>(ssk) : 1.f, qn = ok ? l2_divisor_t<T>(ssq) : 1.f;
          for (int64_t d = 0; d < Dk; ++d) {
            K[i * Dk + d] = round_to<T>(K[i * Dk + d] / kn);
            Q[i * Dk + d] = round_to<T>(Q[i * Dk + d] / qn);
          }
        } else {
          const float kn = std::sqrt(ssk) + kGdnL2Eps, qn = std::sqrt(ssq) + kGdnL2Eps;
          for (int64_t d = 0; d < Dk; ++d) {
            K[i * Dk + d] = K[i * Dk + d] / kn;
            Q[i * Dk + d] = Q[i * Dk + d] / qn * p.scale;
          }
        }
        B[i] = ok ? load_kind(p.beta, p.beta_kind, t * p.b_s0 + h * p.b_s1) : 0.f;
        if constexpr (M2) {
          const float a = -std::exp(load_kind(p.alpha, p.alpha_kind, h * p.a_s1));
          G[i] = B[i] * a;
        } else {
          G[i] = ok ? load_kind(p.alpha, p.alpha_kind, t * p.a_s0 + h * p.a_s1) : 0.f;
        }
      }
      // 2. The cumulative log-decay.
      for (int64_t i = 1; i < C; ++i) G[i] += G[i - 1];
      // 3. A (strictly lower) and P (lower with the diagonal).
      float* P = p.P + tile * C * C;
      for (int64_t i = 0; i < C; ++i) {
        for (int64_t j = 0; j < C; ++j) {
          float a = 0.f, pq = 0.f;
          if (j <= i) {
            float kk = 0.f, qk = 0.f;
            for (int64_t d = 0; d < Dk; ++d) {
              if (!M2) kk += K[i * Dk + d] * K[j * Dk + d];
              qk += Q[i * Dk + d] * K[j * Dk + d];
            }
            const float decay = static_cast<float>(std::exp(G[i] - G[j]));
            pq = qk * decay;
            if (!M2 && j < i) a = B[i] * kk * decay;
          }
          A[i * C + j] = a;
          P[i * C + j] = pq;
        }
      }
      // 4. GatedDeltaNet: (I + A) [w | u] = [diag(beta e^G) K | diag(beta) V], column by column.
      //    Mamba2: u = V dt.
      float* u = p.u + tile * C * Dv;
      if constexpr (M2) {
        for (int64_t i = 0; i < C; ++i) {
          const int64_t t = t0 + i;
          for (int64_t c = 0; c < Dv; ++c)
            u[i * Dv + c] = t < p.n ? static_cast<float>(v[t * p.v_s0 + hk * p.v_s1 + c]) * B[i] : 0.f;
        }
      } else {
        float* w = p.w + tile * C * Dk;
        for (int64_t c = 0; c < Dk + Dv; ++c) {
          for (int64_t i = 0; i < C; ++i) {
            float r;
            if (c < Dk) {
              r = (B[i] * std::exp(G[i])) * K[i * Dk + c];
            } else {
              const int64_t t = t0 + i;
              r = t < p.n ? B[i] * static_cast<float>(v[t * p.v_s0 + hk * p.v_s1 + c - Dk]) : 0.f;
            }
            for (int64_t j = 0; j < i; ++j) r -= A[i * C + j] * x[j];
            x[i] = r;
            if (c < Dk) {
              w[i * Dk + c] = r;
            } else {
              u[i * Dv + c - Dk] = r;
            }
          }
        }
      }
      // 5. qg, kd_t, gl.
      const GT gC = G[C - 1];
      float* qg = p.qg + tile * C * Dk;
      float* kd_t = p.kd_t + tile * C * Dk;
      for (int64_t i = 0; i < C; ++i) {
        const float e = static_cast<float>(std::exp(G[i])), ed = static_cast<float>(std::exp(gC - G[i]));
        for (int64_t d = 0; d < Dk; ++d) {
          qg[i * Dk + d] = e * Q[i * Dk + d];
          kd_t[d * C + i] = K[i * Dk + d] * ed;
        }
      }
      p.gl[tile] = static_cast<float>(std::exp(gC));
    }
  });
}

}  // namespace

template <typename T>
void gdn_chunk_prep_cpu(const GdnChunkPrepParams& p) {
  if (p.mamba2) {
    prep_cpu<T, true>(p);
  } else {
    prep_cpu<T, false>(p);
  }
}

template void gdn_chunk_prep_cpu<float>(const GdnChunkPrepParams&);
template void gdn_chunk_prep_cpu<c10::BFloat16>(const GdnChunkPrepParams&);
template void gdn_chunk_prep_cpu<c10::Half>(const GdnChunkPrepParams&);

}  // namespace ahn_rt
