// CUDA l2_prefetch kernel: bulk prefetches (cp.async.bulk.prefetch.L2, sm_90) of a few byte ranges into L2,
// one thread per kPrefetchChunk bytes; the kernel ends as soon as they are issued and nothing waits for them.
// The decode step issues it on its side stream for the weights of the GEMVs ahead (model.py, _prefetch), so
// that their DRAM reads overlap the window attention's latency-bound kernels. Reference: ahn_rt/ref.py
// l2_prefetch_ref (nothing to compute). Test: pytest -m cuda tests/test_ops.py -k l2_prefetch.
#include <cstdint>

#include <cuda_runtime.h>

#include "../common.h"

namespace ahn_rt {
namespace {

constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads) l2_prefetch_kernel(const L2PrefetchParams p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= p.chunk_end[p.parts - 1]) return;
  int i = 0;
  while (c >= p.chunk_end[i]) ++i;
  const int64_t first = i == 0 ? 0 : p.chunk_end[i - 1];
  const int64_t off = (c - first) * kPrefetchChunk;
  const auto size = static_cast<uint32_t>(min(kPrefetchChunk, p.bytes[i] - off));  // a multiple of 16
  const char* src = static_cast<const char*>(p.ptr[i]) + off;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (p.evict_last) {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
    asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(src), "r"(size), "l"(policy)
                 : "memory");
  } else {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(size) : "memory");
  }
#else
  // Before Hopper: one prefetch per 128-byte line of the chunk.
  for (uint32_t b = 0; b < size; b += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(src + b));
#endif
}

}  // namespace

void l2_prefetch_cuda(const L2PrefetchParams& p, void* stream) {
  const int64_t chunks = p.chunk_end[p.parts - 1];
  const auto blocks = static_cast<unsigned>((chunks + kThreads - 1) / kThreads);
  l2_prefetch_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
}

}  // namespace ahn_rt
