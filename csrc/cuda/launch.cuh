// The one launcher of the decode step's CUDA kernels (gemv, decode_prep, swa_decode, gdn_decode, mamba2_decode).
#pragma once
#include <cuda_runtime.h>

#include "../common.h"

namespace ahn_rt {

// kernel(args...) on grid x block threads with `smem` bytes of dynamic shared memory.
// pdl: programmatic dependent launch. The kernel may be scheduled while the previous kernel of the stream
//   finishes (once that one's blocks have all called pdl_launch_dependents or exited); it must call pdl_wait
//   (common.h) before it touches anything an earlier kernel reads or writes, and it may call
//   pdl_launch_dependents so that the next kernel is scheduled early in turn. Without the attribute both
//   are no-ops.
// cluster_x > 0: thread-block clusters of cluster_x blocks along x (sm_90).
// Returns the launch's error; a bad configuration is not sticky, so the caller reports it (or leaves it for
// cudaGetLastError, as C10_CUDA_KERNEL_LAUNCH_CHECK reads it).
template <typename... KArgs, typename... Args>
inline cudaError_t launch_ex(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             bool pdl, unsigned cluster_x, const Args&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (cluster_x > 0) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster_x;
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

// PDL for decode_prep, swa_decode and gdn_decode: on unless AHN_RT_DECODE_PDL=0 (read once). Those kernels
// wait first (pdl_wait) and never call pdl_launch_dependents: the next kernel is scheduled as their blocks
// exit, so only the launch itself overlaps (about 1% of a batch-1 step; letting it be scheduled right after
// the wait measured slower: bench/README.md).
inline bool decode_pdl_on() {
  static const bool on = env_flag("AHN_RT_DECODE_PDL", true);
  return on;
}

}  // namespace ahn_rt
