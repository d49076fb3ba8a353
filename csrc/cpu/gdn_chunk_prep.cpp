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
    // Kt: K transposed (the inner loops of step 3 run over keys j); X: the solutions of step 4, a row per
    // token. Both only reorder loops: every sum keeps its terms in the same order as the CUDA kernel's.
    std::vector<float> K(C * Dk), Kt(Dk * C), Q(C * Dk), A(C * C), B(C), kk(C), qk(C), X(C * (Dk + Dv));
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
      for (int64_t i = 0; i < C; ++i)
        for (int64_t d = 0; d < Dk; ++d) Kt[d * C + i] = K[i * Dk + d];
      // 2. The cumulative log-decay.
      for (int64_t i = 1; i < C; ++i) G[i] += G[i - 1];
      // 3. A (strictly lower) and P (lower with the diagonal).
      float* P = p.P + tile * C * C;
      for (int64_t i = 0; i < C; ++i) {
        // The dot products of row i with keys 0..i, summed over d in order (vectorized across j).
        std::fill(kk.begin(), kk.begin() + i + 1, 0.f);
        std::fill(qk.begin(), qk.begin() + i + 1, 0.f);
        for (int64_t d = 0; d < Dk; ++d) {
          const float kid = K[i * Dk + d], qid = Q[i * Dk + d];
          const float* kt = Kt.data() + d * C;
          if (!M2)
            for (int64_t j = 0; j <= i; ++j) kk[j] += kid * kt[j];
          for (int64_t j = 0; j <= i; ++j) qk[j] += qid * kt[j];
        }
        for (int64_t j = 0; j < C; ++j) {
          float a = 0.f, pq = 0.f;
          if (j <= i) {
            const float decay = static_cast<float>(std::exp(G[i] - G[j]));
            pq = qk[j] * decay;
            if (!M2 && j < i) a = B[i] * kk[j] * decay;
          }
          A[i * C + j] = a;
          P[i * C + j] = pq;
        }
      }
      // 4. GatedDeltaNet: (I + A) [w | u] = [diag(beta e^G) K | diag(beta) V], row by row (each column's
      //    forward substitution subtracts its terms in the order j = 0, 1, ..., i - 1, vectorized across columns).
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
        const int64_t W = Dk + Dv;
        for (int64_t i = 0; i < C; ++i) {
          float* xi = X.data() + i * W;
          const int64_t t = t0 + i;
          const float eb = B[i] * std::exp(G[i]);
          for (int64_t c = 0; c < Dk; ++c) xi[c] = eb * K[i * Dk + c];
          for (int64_t c = 0; c < Dv; ++c)
            xi[Dk + c] = t < p.n ? B[i] * static_cast<float>(v[t * p.v_s0 + hk * p.v_s1 + c]) : 0.f;
          for (int64_t j = 0; j < i; ++j) {
            const float a = A[i * C + j];
            const float* xj = X.data() + j * W;
            for (int64_t c = 0; c < W; ++c) xi[c] -= a * xj[c];
          }
          for (int64_t c = 0; c < Dk; ++c) w[i * Dk + c] = xi[c];
          for (int64_t c = 0; c < Dv; ++c) u[i * Dv + c] = xi[Dk + c];
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
