// pqk_cuda_error_string: the text of a launcher status (pqk_cuda.h).
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
