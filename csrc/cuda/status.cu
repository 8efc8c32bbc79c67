// pqk_cuda_error_string: the text of a launcher status; pqk_cuda_probe: can the kernels run here (pqk_cuda.h).
#include <cuda_runtime.h>

#include "pqk_cuda.h"

extern "C" const char* pqk_cuda_error_string(int status) {
  switch (status) {
    case PQK_OK: return "success";
    case PQK_ERR_SHAPE: return "invalid shape (a size <= 0, too large, or an odd last dim for int4)";
    case PQK_ERR_K_ALIGN: return "K must be a multiple of 32 for the int4 tensor-core GEMM";
    case PQK_ERR_PTR_ALIGN: return "operand pointer is not 16-byte aligned";
    case PQK_ERR_N_ALIGN: return "N must be even (requant) or a multiple of 4 (silu-mul requant)";
    case PQK_ERR_ARG: return "invalid argument (dtype/epilogue/config code, null pointer, or non-positive scale)";
    case PQK_ERR_HADAMARD_SIZE:
      return "Hadamard size must be m * 2^k with m in {1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172} and fit "
             "shared memory";
    case PQK_ERR_UNSUPPORTED:
      return "the requested CUTLASS GEMM config needs a fp16/bf16 dequant epilogue, N % 8 == 0, 16-byte aligned "
             "out / w_scale / bias and an sm_80..89 device";
    default: return status > 0 ? cudaGetErrorString(static_cast<cudaError_t>(status)) : "unknown pqk status";
  }
}

namespace {
// Compiled for the same archs as every other kernel of the library (cuda_build.ARCHS): if the device has no image
// of it, it has none of the GEMM / quantize / Hadamard kernels either.
__global__ void pqk_probe_kernel() {}
}  // namespace

extern "C" int pqk_cuda_probe(int device, int* driver_version, int* runtime_version, int* sm) {
  int drv = 0, rt = 0, major = 0, minor = 0;
  // Neither needs a driver nor creates a context: cudaDriverGetVersion gives 0 when no driver is installed.
  const cudaError_t drv_err = cudaDriverGetVersion(&drv);
  cudaRuntimeGetVersion(&rt);
  if (driver_version) *driver_version = drv;
  if (runtime_version) *runtime_version = rt;
  if (sm) *sm = 0;
  if (drv_err != cudaSuccess) return static_cast<int>(drv_err);
  // The first call that initializes the runtime is the authority on driver compatibility (a newer minor version of
  // the runtime may run on an older driver of the same major version): cudaErrorInsufficientDriver when it cannot.
  cudaError_t e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (e != cudaSuccess) {
    cudaGetLastError();  // leave no sticky-looking error for the next launch's cudaGetLastError()
    return static_cast<int>(e);
  }
  if (sm) *sm = major * 10 + minor;
  int previous = 0;
  e = cudaGetDevice(&previous);
  if (e == cudaSuccess && previous != device) e = cudaSetDevice(device);
  if (e == cudaSuccess) {
    cudaFuncAttributes attr;
    e = cudaFuncGetAttributes(&attr, pqk_probe_kernel);  // cudaErrorNoKernelImageForDevice without an image
    if (previous != device) cudaSetDevice(previous);
  }
  cudaGetLastError();
  return static_cast<int>(e);
}
