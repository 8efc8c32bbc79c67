// Device helpers shared by the .cu files: PTX wrappers and 16-bit float conversions. Device-only (nvcc).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "pqk_cuda.h"

namespace pqk {
namespace cuda {

// x_dtype codes of the C interface.
enum FloatCode : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

__device__ __forceinline__ float load_float(const __half* p, long i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p, long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load_float(const float* p, long i) { return p[i]; }
__device__ __forceinline__ void store_float(__half* p, long i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, long i, float v) { p[i] = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_float(float* p, long i, float v) { p[i] = v; }

// 16-byte global->shared async copy; src_bytes = 0 zero-fills the destination without reading (out-of-range tiles).
// .cg: cache in L2 only — each operand byte is used once per block from shared memory, L1 would only be polluted.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Status of a launch that was just queued: the launcher's return value.
inline int launch_status() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? PQK_OK : static_cast<int>(e);
}

inline bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

}  // namespace cuda
}  // namespace pqk
