// ahn_rt.swa_decode: the checked host entry function (checks, device guard, stream, CUDA split sizing, dtype
// dispatch, launch, launch-error check). Kernels: cpu/swa_decode.cpp, cuda/swa_decode.cu.
// Test: pytest tests/test_ops.py -k swa_decode.
#include <algorithm>

#include "host.h"

namespace ahn_rt {

namespace {

constexpr const char* op = "ahn_rt.swa_decode";

// The checks and launch of one row's tensors (unbatched shapes). Batched (B > 0): the tensors are row 0 /
// entry 0 of the batched ones, the output is [B, H, D] and `batch` fills the params' batch fields.
template <typename Batch>
at::Tensor run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos,
               int64_t sinks, int64_t window, double scale, int64_t B, Batch&& batch) {
  TORCH_CHECK(q.dim() == 2, op, ": q must be [H, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), op,
              ": k_cache and v_cache must be [Hkv, C, D] of one shape, got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  const int64_t H = q.size(0), D = q.size(1), Hkv = k_cache.size(0), C = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D, op, ": q head dim ", D, " != cache head dim ", k_cache.size(2));
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": H=", H, " must be a multiple of Hkv=", Hkv);
  TORCH_CHECK(D > 0 && D % 8 == 0 && D <= 256, op, ": head dim must be a multiple of 8 and <= 256, got ", D);
  TORCH_CHECK(sinks >= 0 && window >= 1 && sinks + window <= C, op, ": need sinks >= 0, window >= 1 and ",
              "sinks + window <= C; got sinks=", sinks, " window=", window, " C=", C);
  for (const at::Tensor* t : {&k_cache, &v_cache}) {
    check_same_device(q, *t, op, "k_cache/v_cache");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": caches must have q's dtype ", q.scalar_type());
    TORCH_CHECK(t->stride(2) == 1, op, ": caches must be contiguous along D");
  }
  TORCH_CHECK(q.stride(1) == 1, op, ": q's last dim must be contiguous (rows may be strided)");
  check_pos(pos, q, op);
  at::Tensor out = B > 0 ? at::empty({B, H, D}, q.options()) : at::empty({H, D}, q.options());
  SwaDecodeParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.pos = pos.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.q_stride = q.stride(0);
  p.kc_s0 = k_cache.stride(0);
  p.kc_s1 = k_cache.stride(1);
  p.vc_s0 = v_cache.stride(0);
  p.vc_s1 = v_cache.stride(1);
  p.H = H;
  p.Hkv = Hkv;
  p.C = C;
  p.D = D;
  p.sinks = sinks;
  p.window = window;
  p.scale = static_cast<float>(scale);
  if (B > 0) {
    p.out_rb = H * D * static_cast<int64_t>(out.element_size());
    batch(p);
  }
  if (H == 0) return out;
#ifdef AHN_RT_WITH_CUDA
  if (q.is_cuda()) {
    const int64_t G = H / Hkv;
    TORCH_CHECK(G <= 256, op, ": CUDA supports up to 256 query heads per kv head, got ", G);
    TORCH_CHECK(Hkv * p.batch <= 65535, op, ": CUDA takes at most 65535 (row, kv head) pairs per call (grid y), got ",
                p.batch, " rows x ", Hkv, " kv heads");
    const c10::cuda::CUDAGuard guard(q.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    // Split the capacity C (not the valid length: one launch serves every step of a captured graph).
    const DeviceInfo dev = device_info();
    const int64_t sms = dev.sms;
    int64_t chunk;
    if (q.scalar_type() != at::kFloat) {
      // Tensor-core path: size the splits so that a full cache is one wave of resident blocks (blocks per
      // SM from the shared memory of one block, at most 4), i.e. 2-4 blocks per SM each streaming ~100+
      // KiB: enough bytes in flight for the bandwidth, no tail wave. A short valid length n then runs
      // ceil(n / chunk) splits and the combine reads only those. Chunks are whole warp slices (16 keys).
      const int64_t smem = swa_mma_smem_bytes(D) + 1024;  // + static merge buffers and the reserved 1 KiB
      const int64_t per_sm = std::max<int64_t>(1, std::min<int64_t>(4, dev.smem_per_sm / smem));
      const int64_t groups = Hkv * ((G + 15) / 16);
      const int64_t slots = std::max<int64_t>(1, sms * per_sm / groups);
      chunk = std::max<int64_t>(32, ((C + slots - 1) / slots + 15) / 16 * 16);
      // A batch of rows shares the same resident blocks: each (row, kv head, head group) gets
      // slots / batch blocks that loop over its splits, so that a short valid length does not launch
      // (and schedule) batch x nsplit blocks that exit at once, and a full one is still one wave.
      p.split_blocks = std::max<int64_t>(1, slots / p.batch);
    } else {
      // fp32 (CUDA cores, tests only): about 8 blocks per SM; a split's K and V tiles are staged in shared
      // memory (<= 32 KiB together) and its scores for the G heads too (<= 8 KiB).
      const int64_t per_head = std::max<int64_t>(1, (8 * sms + Hkv - 1) / Hkv);
      chunk = std::max<int64_t>(16, (C + per_head - 1) / per_head);
      const int64_t tile_max = std::min<int64_t>(32768 / (2 * D * q.element_size()), 2048 / G);
      chunk = std::max<int64_t>(8, std::min(chunk, tile_max) / 8 * 8);
    }
    p.chunk = chunk;
    p.nsplit = (C + chunk - 1) / chunk;
    p.split_blocks = p.split_blocks > 0 ? std::min(p.split_blocks, p.nsplit) : p.nsplit;
    TORCH_CHECK(p.nsplit <= 8192, op, ": too many splits (", p.nsplit, ") for C=", C, " with ", G,
                " query heads per kv head");
    at::Tensor o_part = at::empty({p.batch, H, p.nsplit, D}, q.options().dtype(at::kFloat));
    at::Tensor ml_part = at::empty({p.batch, H, p.nsplit, 2}, q.options().dtype(at::kFloat));
    p.op_rb = H * p.nsplit * D * static_cast<int64_t>(sizeof(float));
    p.ml_rb = H * p.nsplit * 2 * static_cast<int64_t>(sizeof(float));
    p.o_part = o_part.data_ptr<float>();
    p.ml_part = ml_part.data_ptr<float>();
    dispatch_dtype(q.scalar_type(), op, [&](auto tag) { swa_decode_cuda<decltype(tag)>(p, stream); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
#endif
  TORCH_CHECK(q.is_cpu(), op, ": no kernel for device ", q.device());
  dispatch_dtype(q.scalar_type(), op, [&](auto tag) {
    for (int64_t b = 0; b < p.batch; ++b) swa_decode_cpu<decltype(tag)>(p.row(b));
  });
  return out;
}

}  // namespace

at::Tensor swa_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& pos, int64_t sinks, int64_t window, double scale,
                      const std::optional<at::Tensor>& slots) {
  if (!slots) return run(q, k_cache, v_cache, pos, sinks, window, scale, 0, [](SwaDecodeParams&) {});
  // Batched: q [B, H, D] by row; pos [N] and the caches [N, Hkv, C, D] by state entry slots[b].
  TORCH_CHECK(k_cache.dim() == 4, op, ": with slots, k_cache must be [N, Hkv, C, D], got ", k_cache.sizes());
  const int64_t N = k_cache.size(0);
  const int64_t B = check_slots(*slots, N, q, op);
  check_lead(q, 3, B, op, "q", "[B, H, D]");
  check_lead(v_cache, 4, N, op, "v_cache", "[N, Hkv, C, D]");
  check_entry_pos(pos, N, op);
  const int64_t* slot_ptr = slots->data_ptr<int64_t>();
  return run(q.select(0, 0), k_cache.select(0, 0), v_cache.select(0, 0), pos.narrow(0, 0, 1), sinks, window, scale,
             B, [&](SwaDecodeParams& p) {
               p.slots = slot_ptr;
               p.batch = B;
               p.q_rb = lead_bytes(q);
               p.kc_eb = lead_bytes(k_cache);
               p.vc_eb = lead_bytes(v_cache);
             });
}

}  // namespace ahn_rt
