// ahn_rt.l2_prefetch: the checked host entry function. Kernel: cuda/l2_prefetch.cu; on the CPU it checks its
// arguments and does nothing (a CPU has no L2 that this could fill ahead of a kernel; the reference,
// ahn_rt/ref.py l2_prefetch_ref, does nothing either). Test: pytest tests/test_ops.py -k l2_prefetch.
#include "host.h"

namespace ahn_rt {

void l2_prefetch(at::TensorList tensors, bool evict_last) {
  constexpr const char* op = "ahn_rt.l2_prefetch";
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) <= kPrefetchMaxParts, op, ": at most ", kPrefetchMaxParts,
              " tensors per call, got ", tensors.size());
  if (tensors.empty()) return;
  const at::Device dev = tensors[0].device();
  L2PrefetchParams p{};
  p.evict_last = evict_last;
  int64_t chunks = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == dev, op, ": every tensor must be on one device; tensor ", i, " is on ", t.device(),
                ", tensor 0 on ", dev);
    TORCH_CHECK(t.is_contiguous(), op, ": tensor ", i, " is not contiguous (a prefetch covers one span of memory; "
                "pass contiguous views)");
    // The span trimmed inward to 16-byte boundaries (what the bulk prefetch takes): never outside the tensor.
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t end = begin + static_cast<uintptr_t>(t.numel()) * t.element_size();
    const uintptr_t a = (begin + 15) & ~uintptr_t(15), b = end & ~uintptr_t(15);
    if (t.numel() == 0 || b <= a) continue;
    p.ptr[p.parts] = reinterpret_cast<const void*>(a);
    p.bytes[p.parts] = static_cast<int64_t>(b - a);
    chunks += (p.bytes[p.parts] + kPrefetchChunk - 1) / kPrefetchChunk;
    p.chunk_end[p.parts] = chunks;
    ++p.parts;
  }
  if (p.parts == 0) return;
#ifdef AHN_RT_WITH_CUDA
  if (dev.is_cuda()) {
    const c10::cuda::CUDAGuard guard(dev);
    l2_prefetch_cuda(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#endif
  TORCH_CHECK(dev.is_cpu(), op, ": no kernel for device ", dev);
}

}  // namespace ahn_rt
