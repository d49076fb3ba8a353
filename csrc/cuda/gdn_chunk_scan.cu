// CUDA gdn_chunk_scan kernel: the chunk-to-chunk recurrence of the chunked gated delta rule, the one
// sequential part of a GatedDeltaNet prefill (reference: ahn_rt/ref.py gdn_chunk_scan_ref; the math and the
// parallel parts around it: docs/semantics.md §5). Test: pytest -m cuda tests/test_prefill.py.
//
// One block per (head, slice of kScanCols state columns): the columns of the state are independent in the
// delta rule, so a block owns S[:, j0:j0+16] for the whole prompt, in shared memory, float32. Per chunk of
// 64 tokens the block stages w, qg (rows) and kd (transposed) in shared memory and does
//   1. v_new = u - w S and o_inter = qg S     (each thread: 4 rows x 1 column, float4 over Dk)
//   2. S <- gl S + kd^T v_new                 (each thread: Dk/16 state rows x 1 column, float4 over C)
// with two block barriers. The tiles are double-buffered: chunk n + 1's are copied in (cp.async) while
// chunk n computes. Rows are padded by 4 floats so the float4 reads of a quarter warp hit distinct banks.
// All arithmetic is float32 FMA in a fixed order: the result does not depend on the grid. With Dk a multiple
// of 16 the tensor-core kernel further down runs instead (the same products, split tf32 mma).
#include <cstdint>

#include <cuda_runtime.h>

#include "../common.h"

namespace ahn_rt {
namespace {

constexpr int kThreads = 256;
constexpr int BV = static_cast<int>(kScanCols);
constexpr int CH = static_cast<int>(kScanChunk);
constexpr int CP = CH + 4;  // padded row of the transposed tiles (kd^T, v_new^T)

// One stage of the pipeline: w and qg [CH][Dk + 4], kd^T [Dk][CP].
__host__ __device__ inline int64_t scan_stage_floats(int64_t Dk) { return 2 * CH * (Dk + 4) + Dk * CP; }
__host__ __device__ inline int64_t scan_smem_floats(int64_t Dk) {
  return BV * (Dk + 4) + 2 * scan_stage_floats(Dk) + BV * CP;
}

// Chunk n's w (kDelta), qg and kd^T tiles into one stage (16-byte copies, in flight until cp_async_wait).
template <bool kDelta>
__device__ __forceinline__ void scan_stage_load(const GdnChunkScanParams& p, int h, int n, float* stage) {
  const int Dk = static_cast<int>(p.Dk), DKP = Dk + 4, dk4 = Dk / 4, N = static_cast<int>(p.N);
  float* Ws = stage;
  float* Qs = Ws + CH * DKP;
  float* Kt = Qs + CH * DKP;
  const int64_t tile = (static_cast<int64_t>(h) * N + n) * CH;
  const float* w = kDelta ? p.w + tile * Dk : nullptr;
  const float* q = p.qg + tile * Dk;
  const float* k = p.kd_t + tile * Dk;
  for (int i = threadIdx.x; i < CH * dk4; i += kThreads) {
    const int r = i / dk4, c = i % dk4;
    if constexpr (kDelta) cp_async16(Ws + r * DKP + 4 * c, w + 4 * i);
    cp_async16(Qs + r * DKP + 4 * c, q + 4 * i);
  }
  for (int i = threadIdx.x; i < Dk * (CH / 4); i += kThreads) {
    const int kk = i / (CH / 4), c = i % (CH / 4);
    cp_async16(Kt + kk * CP + 4 * c, k + 4 * i);
  }
}

__device__ inline float dot4(float4 a, float4 b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

// kDelta = false: no w (Mamba2's rule), v_new = u.
template <bool kDelta>
__global__ void __launch_bounds__(kThreads) gdn_chunk_scan_kernel(GdnChunkScanParams p) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int Dk = static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv), N = static_cast<int>(p.N);
  const int DKP = Dk + 4;
  const int h = blockIdx.y, j0 = blockIdx.x * BV;
  const int t = threadIdx.x, j = t & (BV - 1), rb = t >> 4;
  const bool col_ok = j0 + j < Dv;
  float* St = smem;                                  // [BV][DKP]  the state slice, transposed
  float* stages = St + BV * DKP;                     // 2 x {Ws [CH][DKP], Qs [CH][DKP], Kt [Dk][CP]}
  float* Ut = stages + 2 * scan_stage_floats(Dk);    // [BV][CP]   v_new^T
  const int stage_floats = static_cast<int>(scan_stage_floats(Dk));

  float* state = p.state + static_cast<int64_t>(h) * Dk * Dv;
  scan_stage_load<kDelta>(p, h, 0, stages);
  cp_async_commit();
  for (int i = t; i < BV * Dk; i += kThreads) {
    const int jj = i / Dk, k = i % Dk;
    St[jj * DKP + k] = (j0 + jj < Dv) ? state[static_cast<int64_t>(k) * Dv + j0 + jj] : 0.f;
  }
  const int dk4 = Dk / 4;
  for (int n = 0; n < N; ++n) {
    const int64_t tile = (static_cast<int64_t>(h) * N + n) * CH;
    if (n + 1 < N) scan_stage_load<kDelta>(p, h, n + 1, stages + ((n + 1) & 1) * stage_floats);
    cp_async_commit();
    float uu[4];   // this chunk's u and gl, loaded while the copies land
#pragma unroll
    for (int m = 0; m < 4; ++m) uu[m] = col_ok ? p.u[(tile + rb + 16 * m) * Dv + j0 + j] : 0.f;
    const float g = p.gl[static_cast<int64_t>(h) * N + n];
    cp_async_wait<1>();   // chunk n's stage has landed (chunk n + 1's may still be in flight)
    __syncthreads();
    float* Ws = stages + (n & 1) * stage_floats;
    float* Qs = Ws + CH * DKP;
    float* Kt = Qs + CH * DKP;
    // 1. v_new = u - w S, o_inter = qg S for rows rb + 16 m, column j.
    float au[4] = {0.f, 0.f, 0.f, 0.f}, ao[4] = {0.f, 0.f, 0.f, 0.f};
    const float4* s_row = reinterpret_cast<const float4*>(St + j * DKP);
    for (int c = 0; c < dk4; ++c) {
      const float4 s = s_row[c];
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const int r = rb + 16 * m;
        if constexpr (kDelta) au[m] = dot4(reinterpret_cast<const float4*>(Ws + r * DKP)[c], s, au[m]);
        ao[m] = dot4(reinterpret_cast<const float4*>(Qs + r * DKP)[c], s, ao[m]);
      }
    }
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int r = rb + 16 * m;
      float un = 0.f;
      if (col_ok) {
        const int64_t o = (tile + r) * Dv + j0 + j;
        un = uu[m] - au[m];
        p.v_new[o] = un;
        p.o_inter[o] = ao[m];
      }
      Ut[j * CP + r] = un;
    }
    __syncthreads();
    // 2. S <- gl S + kd^T v_new for state rows kb + 16 m, column j.
    const float4* u_row = reinterpret_cast<const float4*>(Ut + j * CP);
    for (int k = rb; k < Dk; k += 16) {
      float acc = g * St[j * DKP + k];
      const float4* kd_row = reinterpret_cast<const float4*>(Kt + k * CP);
#pragma unroll 4
      for (int c = 0; c < CH / 4; ++c) acc = dot4(kd_row[c], u_row[c], acc);
      St[j * DKP + k] = acc;
    }
    __syncthreads();
  }
  for (int i = t; i < BV * Dk; i += kThreads) {
    const int jj = i / Dk, k = i % Dk;
    if (j0 + jj < Dv) state[static_cast<int64_t>(k) * Dv + j0 + jj] = St[jj * DKP + k];
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core variant (Dk a multiple of 16): the same two products per chunk on mma.sync m16n8k8 tf32 with
// split operands (x = hi + lo, both tf32; a b = a_lo b_hi + a_hi b_lo + a_hi b_hi, the lo x lo term below
// float32's rounding): float32-level accuracy at tensor-core speed. One block per (head, 16 state columns),
// 8 warps:
//   1. warp w < 4: rows 16w.. of w S (v_new = u - w S), warp w >= 4: rows 16(w-4).. of qg S (o_inter);
//      the A operand (w or qg) from the staged tile, the B operand (S) from shared memory;
//   2. warp w: state rows 16w.. of S <- gl S + kd^T v_new, kept in registers (accumulator layout) across
//      chunks; A (kd^T) from the staged tile, B (v_new) from shared memory.
// S and v_new are the B operand of every warp, so they are written to shared memory already split (hi, lo),
// once per chunk by the warp that computes them, instead of being split again by each of the 8 warps that
// read them. The three products of a step go to three accumulators (lo hi, hi lo, hi hi) summed at the end,
// so no mma waits on the one before it in its own step: the dependent chain of an accumulator is one mma
// per k-step. DK > 0: Dk fixed at compile time (the 3B shape's 128 and 64; every loop unrolled), 0: Dk at
// run time. The stage's kd^T rows are XOR-swizzled (16-byte units) instead of padded, which leaves room for
// the split S and v_new in the shared memory of one block.
// Fragments (PTX m16n8k8 .tf32, g = lane / 4, q = lane % 4): A a0 (g, q), a1 (g + 8, q), a2 (g, q + 4),
// a3 (g + 8, q + 4); B b0 (q, g), b1 (q + 4, g); C c0, c1 (g, 2q + {0, 1}), c2, c3 (g + 8, 2q + {0, 1}).
// Bank use: the A tiles' row stride Dk + 4 (w, qg) and kd^T's swizzle put a fragment's 32 lanes on 32 banks;
// the split rows' stride of 20 8-byte words puts each half warp's 8-byte loads on 16 distinct bank pairs.
constexpr int SP2 = BV + 4;  // row stride of the split S and v_new, in 8-byte (hi, lo) words

__host__ __device__ inline int64_t scan_tc_stage_floats(int64_t Dk) { return 2 * CH * (Dk + 4) + Dk * CH; }
__host__ __device__ inline int64_t scan_tc_smem_bytes(int64_t Dk) {
  return 2 * scan_tc_stage_floats(Dk) * 4 + (Dk + CH) * SP2 * 8;
}

struct Tf32 {
  uint32_t hi, lo;
};
// x = hi + lo with hi the nearest tf32 (ties away from zero, as cvt.rna.tf32 rounds), in two integer
// instructions instead of the conversion (a carry out of the mantissa moves into the exponent as it should).
// x - hi is exact in float32 and lo goes to the mma as it is: PTX leaves the low 13 bits of a .tf32 operand
// to the implementation, sm_80 / sm_90 tensor cores truncate them (CUTLASS's round_half_ulp_truncate relies on
// the same), and what they drop weighs under 2^-21 |x|. Unlike cvt.rna (which leaves inf and NaN alone) a NaN
// may round to hi = +-0 or inf; lo = x - hi is then NaN, and the lo terms of the three products carry it.
__device__ __forceinline__ uint32_t round_tf32(uint32_t bits) { return (bits + 0x1000u) & 0xffffe000u; }
__device__ __forceinline__ Tf32 split_tf32(float x) {
  const uint32_t hi = round_tf32(__float_as_uint(x));
  return {hi, __float_as_uint(x - __uint_as_float(hi))};
}
__device__ __forceinline__ uint2 split_word(float x) {
  const Tf32 s = split_tf32(x);
  return make_uint2(s.hi, s.lo);
}
__device__ __forceinline__ void mma_tf32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// The three products of a split A (16 x 8) and a split B (8 x 8) into their three accumulators.
__device__ __forceinline__ void mma3(float (&hh)[4], float (&lh)[4], float (&hl)[4], const Tf32 (&a)[4],
                                     const uint2 (&b)[2]) {
  mma_tf32(lh, a[0].lo, a[1].lo, a[2].lo, a[3].lo, b[0].x, b[1].x);
  mma_tf32(hl, a[0].hi, a[1].hi, a[2].hi, a[3].hi, b[0].y, b[1].y);
  mma_tf32(hh, a[0].hi, a[1].hi, a[2].hi, a[3].hi, b[0].x, b[1].x);
}
// d[nt] += A B[:, 8 nt ..] (nt < 2) for a 16-row A whose element (row, k) is at A[row * lda + col(row, k)] and
// the split [K][SP2] B; K a multiple of 8, one k-step of 8 after another. col: the A tile's column map
// (padded: k; swizzled kd^T: k ^ 4 (row % 8)), row % 8 == g for both of a lane's rows.
template <int K, typename Col>
__device__ __forceinline__ void mma_split_rows16(float (&d)[2][4], const float* A, int lda, const uint2* B, int Krt,
                                                 int g, int q, Col col) {
  float lh[2][4] = {}, hl[2][4] = {};
  const int kend = K > 0 ? K : Krt;
#pragma unroll
  for (int k0 = 0; k0 < kend; k0 += 8) {
    Tf32 a[4];
    a[0] = split_tf32(A[g * lda + col(k0 + q)]);
    a[1] = split_tf32(A[(g + 8) * lda + col(k0 + q)]);
    a[2] = split_tf32(A[g * lda + col(k0 + q + 4)]);
    a[3] = split_tf32(A[(g + 8) * lda + col(k0 + q + 4)]);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const uint2 b[2] = {B[(k0 + q) * SP2 + 8 * nt + g], B[(k0 + q + 4) * SP2 + 8 * nt + g]};
      mma3(d[nt], lh[nt], hl[nt], a, b);
    }
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) d[nt][e] += lh[nt][e] + hl[nt][e];
}

// Chunk n's w (kDelta), qg and kd^T tiles into one stage (16-byte copies, in flight until cp_async_wait):
// w, qg rows padded to Dk + 4 floats; kd^T row kk's 16-byte unit c at unit c ^ (kk % 8) of a CH-float row.
template <bool kDelta, int DK>
__device__ __forceinline__ void scan_tc_stage_load(const GdnChunkScanParams& p, int h, int n, float* stage) {
  const int Dk = DK > 0 ? DK : static_cast<int>(p.Dk), DKP = Dk + 4, dk4 = Dk / 4;
  float* Ws = stage;
  float* Qs = Ws + CH * DKP;
  float* Kt = Qs + CH * DKP;
  const int64_t tile = (static_cast<int64_t>(h) * p.N + n) * CH * Dk;
  const float* w = kDelta ? p.w + tile : nullptr;
  const float* q = p.qg + tile;
  const float* k = p.kd_t + tile;
#pragma unroll 4
  for (int i = threadIdx.x; i < CH * dk4; i += kThreads) {
    const int r = i / dk4, c = i % dk4;
    if constexpr (kDelta) cp_async16(Ws + r * DKP + 4 * c, w + 4 * i);
    cp_async16(Qs + r * DKP + 4 * c, q + 4 * i);
  }
#pragma unroll 4
  for (int i = threadIdx.x; i < Dk * (CH / 4); i += kThreads) {
    const int kk = i / (CH / 4), c = i % (CH / 4);
    cp_async16(Kt + kk * CH + 4 * (c ^ (kk & 7)), k + 4 * i);
  }
}

template <bool kDelta, int DK>
__global__ void __launch_bounds__(kThreads, 1) gdn_chunk_scan_tc_kernel(GdnChunkScanParams p) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const int Dk = DK > 0 ? DK : static_cast<int>(p.Dk), Dv = static_cast<int>(p.Dv), N = static_cast<int>(p.N);
  const int DKP = Dk + 4;
  const int h = blockIdx.y, j0 = blockIdx.x * BV;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  const int stage_floats = static_cast<int>(scan_tc_stage_floats(Dk));
  float* stages = smem;                                            // 2 x {Ws, Qs [CH][DKP], Kt [Dk][CH]}
  uint2* S2 = reinterpret_cast<uint2*>(stages + 2 * stage_floats);  // [Dk][SP2] the state slice, split
  uint2* V2 = S2 + Dk * SP2;                                        // [CH][SP2] v_new, split
  float* state = p.state + static_cast<int64_t>(h) * Dk * Dv;
  // This warp's 16 rows: step 1 rows 16 m of w (product 0) or qg (1), both column tiles; step 2 state rows r0.
  const int m = warp & 3, prod = warp >> 2, r0 = 16 * warp;
  const bool owns = r0 < Dk;                                       // step 2: state rows r0 .. r0 + 15
  const auto padded = [](int k) { return k; };
  const auto swizzled = [g](int k) { return k ^ (g << 2); };       // kd^T rows r0 + g, r0 + g + 8: row % 8 = g

  scan_tc_stage_load<kDelta, DK>(p, h, 0, stages);
  cp_async_commit();
  // Accumulator element e of column tile nt: row r0 + g + 8 (e / 2), column 8 nt + 2 q + e % 2.
  float s[2][4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = r0 + g + 8 * (e >> 1), c = 8 * nt + 2 * q + (e & 1);
      s[nt][e] = owns && j0 + c < Dv ? state[static_cast<int64_t>(r) * Dv + j0 + c] : 0.f;
      if (owns) S2[r * SP2 + c] = split_word(s[nt][e]);
    }
  cp_async_wait<0>();
  __syncthreads();   // chunk 0's stage and the split S
  for (int n = 0; n < N; ++n) {
    const int64_t tile = (static_cast<int64_t>(h) * N + n) * CH;
    if (n + 1 < N) scan_tc_stage_load<kDelta, DK>(p, h, n + 1, stages + ((n + 1) & 1) * stage_floats);
    cp_async_commit();
    float uu[2][4];                              // this chunk's u (step 1, product 0), loaded while copies land
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 16 * m + g + 8 * (e >> 1), c = 8 * nt + 2 * q + (e & 1);
        uu[nt][e] = prod == 0 && j0 + c < Dv ? p.u[(tile + r) * Dv + j0 + c] : 0.f;
      }
    const float gn = p.gl[static_cast<int64_t>(h) * N + n];
    const float* Ws = stages + (n & 1) * stage_floats;
    const float* Qs = Ws + CH * DKP;
    const float* Kt = Qs + CH * DKP;

    // 1. w S (product 0) and qg S (product 1), 16 rows x 16 columns per warp.
    float d[2][4] = {};
    if (kDelta || prod == 1)
      mma_split_rows16<DK>(d, (prod == 0 ? Ws : Qs) + 16 * m * DKP, DKP, S2, Dk, g, q, padded);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 16 * m + g + 8 * (e >> 1), c = 8 * nt + 2 * q + (e & 1);
        const bool ok = j0 + c < Dv;
        const int64_t o = (tile + r) * Dv + j0 + c;
        if (prod == 0) {
          const float un = ok ? uu[nt][e] - d[nt][e] : 0.f;
          if (ok) p.v_new[o] = un;
          V2[r * SP2 + c] = split_word(un);
        } else if (ok) {
          p.o_inter[o] = d[nt][e];
        }
      }
    __syncthreads();

    // 2. S <- gl S + kd^T v_new for this warp's 16 state rows.
    if (owns) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= gn;
      mma_split_rows16<CH>(s, Kt + r0 * CH, CH, V2, CH, g, q, swizzled);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          S2[(r0 + g + 8 * (e >> 1)) * SP2 + 8 * nt + 2 * q + (e & 1)] = split_word(s[nt][e]);
    }
    // Two barriers a chunk: this one publishes the split S and chunk n + 1's stage (its copies were issued
    // at the top of this chunk) and frees chunk n's stage for the copies of chunk n + 2.
    cp_async_wait<0>();
    __syncthreads();
  }
  if (owns) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = r0 + g + 8 * (e >> 1), c = 8 * nt + 2 * q + (e & 1);
        if (j0 + c < Dv) state[static_cast<int64_t>(r) * Dv + j0 + c] = s[nt][e];
      }
  }
}

template <bool kDelta>
void launch_scan_tc(const GdnChunkScanParams& p, const dim3& grid, size_t smem, cudaStream_t st) {
  if (p.Dk == 128) gdn_chunk_scan_tc_kernel<kDelta, 128><<<grid, kThreads, smem, st>>>(p);
  else if (p.Dk == 64) gdn_chunk_scan_tc_kernel<kDelta, 64><<<grid, kThreads, smem, st>>>(p);
  else gdn_chunk_scan_tc_kernel<kDelta, 0><<<grid, kThreads, smem, st>>>(p);
}

}  // namespace

void gdn_chunk_scan_cuda(const GdnChunkScanParams& p, void* stream) {
  const size_t smem = static_cast<size_t>(scan_smem_floats(p.Dk)) * sizeof(float);
  const DeviceInfo info = device_info();
  TORCH_CHECK(static_cast<int64_t>(smem) <= info.smem_optin, "ahn_rt.gdn_chunk_scan: needs ", smem,
              " bytes of shared memory per block, the device allows ", info.smem_optin);
  // The opt-in limit is set once per device (to the device's maximum, whatever this call's Dk needs).
  static thread_local int configured_device = -1;
  int dev = 0;
  cudaGetDevice(&dev);
  if (configured_device != dev) {
    for (auto kernel : {gdn_chunk_scan_kernel<true>, gdn_chunk_scan_kernel<false>})
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, info.smem_optin);
    for (auto kernel : {gdn_chunk_scan_tc_kernel<true, 128>, gdn_chunk_scan_tc_kernel<true, 64>,
                        gdn_chunk_scan_tc_kernel<true, 0>, gdn_chunk_scan_tc_kernel<false, 128>,
                        gdn_chunk_scan_tc_kernel<false, 64>, gdn_chunk_scan_tc_kernel<false, 0>})
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, info.smem_optin);
    configured_device = dev;
  }
  const dim3 grid(static_cast<unsigned>((p.Dv + BV - 1) / BV), static_cast<unsigned>(p.H));
  const auto st = static_cast<cudaStream_t>(stream);
  // The tensor-core kernel takes whole 16-row tiles of the state; AHN_RT_GDN_SCAN_SIMT=1 forces the
  // CUDA-core one (a bench A/B switch, read once per process).
  static const bool simt_only = env_flag("AHN_RT_GDN_SCAN_SIMT");
  if (p.Dk % 16 == 0 && !simt_only) {
    const size_t tc_smem = static_cast<size_t>(scan_tc_smem_bytes(p.Dk));
    TORCH_CHECK(static_cast<int64_t>(tc_smem) <= info.smem_optin, "ahn_rt.gdn_chunk_scan: needs ", tc_smem,
                " bytes of shared memory per block, the device allows ", info.smem_optin);
    if (p.w != nullptr) launch_scan_tc<true>(p, grid, tc_smem, st);
    else launch_scan_tc<false>(p, grid, tc_smem, st);
    return;
  }
  auto kernel = p.w != nullptr ? gdn_chunk_scan_kernel<true> : gdn_chunk_scan_kernel<false>;
  kernel<<<grid, kThreads, smem, st>>>(p);
}

}  // namespace ahn_rt
