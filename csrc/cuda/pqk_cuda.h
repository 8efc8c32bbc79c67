// C interface of the CUDA kernels (libpqk_cuda.so): raw device pointers, a stream, an int status.
//
// Every launcher validates its arguments before launching and returns:
//   0                       success (the launch was queued; cudaGetLastError() was clean)
//   > 0                     a cudaError_t from the launch (pqk_cuda_error_string gives its text)
//   < 0                     a PqkStatus below: bad arguments, nothing was launched
// No launcher synchronizes. The torch binding (prefixquant_kernels/ops/cuda_library.py loads it via ctypes, ops/cuda_ops.py calls it) turns a non-zero status
// into a RuntimeError that names the op.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st* pqk_stream_t;  // == cudaStream_t; nullptr = the legacy default stream

enum PqkStatus {
  PQK_OK = 0,
  PQK_ERR_SHAPE = -1,       // a size is <= 0 or exceeds int32 indexing
  PQK_ERR_K_ALIGN = -2,     // GEMM: K must be a multiple of 32 (the caller pads with zeros or raises)
  PQK_ERR_PTR_ALIGN = -3,   // a pointer is not 16-byte aligned (GEMM operands) / 4-byte (quantize inputs)
  PQK_ERR_N_ALIGN = -4,     // requant epilogues: N must be even (requant) / a multiple of 4 (silu-mul)
  PQK_ERR_ARG = -5,         // an enum/flag argument is out of range, or a scale is not finite and > 0
  PQK_ERR_HADAMARD_SIZE = -6,  // Hadamard: n is not m * 2^k for a supported m, or exceeds the shared-memory limit
  PQK_ERR_UNSUPPORTED = -7,    // GEMM: an explicitly requested CUTLASS config cannot run this epilogue / shape / device
};

const char* pqk_cuda_error_string(int status);

// y = epilogue(A x W^T). a: uint8 [M, K/2] packed int4; w: uint8 [N, K/2]; K % 32 == 0.
// epilogue: 0 fp16 out [M, N], 1 bf16 [M, N], 2 fp32 [M, N], 3 requant -> uint8 [M, N/2],
// 4 silu-mul requant (W rows interleaved gate0, up0, gate1, up1, ...) -> uint8 [M, N/4].
// a_scale: fp32 [1] (a_scale_per_token = 0) or [M] (= 1); w_scale fp32 [N]; bias fp32 [N] or null;
// out_scale: the next layer's static scale (epilogues 3, 4).
// config: -1 auto: CUTLASS (int4_gemm_cutlass.cu) for epilogues 0/1 on sm_80..89 when N % 8 == 0 and out, w_scale
// and bias are 16-byte aligned, else this library's own kernel; tile by M (<= 16 decode, <= 256 mid, else prefill). Forced: 0 / 1 / 2 =
// own decode / mid / prefill tile; 3 = the decode GEMV (M <= 4, no MMA: gemm_math.cuh "decode GEMV";
// PQK_ERR_UNSUPPORTED at M > 4); 10 / 11 / 12 = CUTLASS decode / mid / prefill (PQK_ERR_UNSUPPORTED where it
// cannot run).
// split_k: 1 = none; > 1 splits K over gridDim.z blocks of the own decode tile (config 0, or -1 at M <= 16, which
// then skips CUTLASS; other configs PQK_ERR_UNSUPPORTED), at most one split per 64 of K (PQK_ERR_ARG), with
// split_ws: int32, pqk_gemm_split_k_workspace(m, n) words, 4-byte aligned, ALL ZERO at launch (the caller allocates
// it zeroed; the kernel leaves partial sums in it). Bit-identical to split_k = 1 (exact int32 sums).
int pqk_int4_gemm(const uint8_t* a, const uint8_t* w, void* out, const float* a_scale, int a_scale_per_token,
                  const float* w_scale, const float* bias, float out_scale, int m, int n, int k, int epilogue,
                  int config, int split_k, int32_t* split_ws, pqk_stream_t stream);

// The split-K count auto-dispatch should use for an M x N x K GEMM on a GPU with `sms` multiprocessors (1 at M > 16
// or when ceil(N / 32) blocks already give two per SM; else enough splits for that, each >= 256 of K, at most 16),
// and the workspace (int32 words) a split launch needs. Pure functions: no CUDA call.
int pqk_gemm_split_k(int m, int n, int k, int sms);
long pqk_gemm_split_k_workspace(int m, int n);

// The static-scale linear in one launch: y = epilogue(quantize(x, *x_scale) x W^T), the int4 quantize done inside the
// GEMM's A load (int4_gemm.cu), bit-exact with pqk_quantize_static followed by pqk_int4_gemm. x fp16 (x_dtype 0) /
// bf16 (1) / fp32 (2) [M, K], 16-byte aligned; w uint8 [N, K/2]; K % 32 == 0. x_scale: fp32 [1] on the device (the
// static per-tensor scale, > 0). epilogue: x_dtype's own dequant code (0 / 1 / 2: out x.dtype [M, N]) or 4 (silu-mul
// requant with out_scale, W rows interleaved gate/up -> uint8 [M, N/4]); others PQK_ERR_ARG. config: -1 auto, 0 / 1 / 2
// forced own decode / mid / prefill tile, 3 the decode GEMV (M <= 4: each thread quantizes its own A chunk); the
// CUTLASS codes 10..12 -> PQK_ERR_UNSUPPORTED (CUTLASS reads packed A).
// split_k, split_ws: as pqk_int4_gemm.
int pqk_quant_gemm_static(const void* x, int x_dtype, const float* x_scale, const uint8_t* w, void* out,
                          const float* w_scale, const float* bias, float out_scale, int m, int n, int k, int epilogue,
                          int config, int split_k, int32_t* split_ws, pqk_stream_t stream);

// Static quantize: x fp16 (x_dtype 0) / bf16 (1) / fp32 (2) [rows, cols] -> bits 4: uint8 [rows, cols/2],
// bits 8: int8 [rows, cols]. scale: fp32 [1] on the device.
int pqk_quantize_static(const void* x, int x_dtype, void* out, const float* scale, int bits, int rows, int cols,
                        pqk_stream_t stream);

// Dynamic per-token quantize (the baseline): as above plus scales_out fp32 [rows].
int pqk_quantize_per_token(const void* x, int x_dtype, void* out, float* scales_out, int bits, int rows, int cols,
                           pqk_stream_t stream);

// Fused RMSNorm + static quantize: y = x * (1 / sqrt(mean(x^2) + eps)) * weight (fp32), q = quantize(y, scale).
// x fp16/bf16 [rows, cols]; weight same dtype [cols]; q uint8 [rows, cols/2] (bits 4) or int8 [rows, cols];
// normed_out: same dtype as x [rows, cols] or null.
int pqk_rmsnorm_quantize(const void* x, int x_dtype, const void* weight, float eps, const float* scale, int bits,
                         void* q_out, void* normed_out, int rows, int cols, pqk_stream_t stream);

// Online Walsh-Hadamard transform of each row: y = (H_m (x) H_{2^p}) x / sqrt(n), n = cols = m * 2^p, element
// a * 2^p + b of a row = entry (a, b) (the 2^p factor is the fast index; prefixquant_kernels/hadamard.py).
// x, y fp16 (x_dtype 0) / bf16 (1) / fp32 (2) [rows, cols] (may alias); had_m: fp32 [m, m] with +-1 entries
// (hadamard.hadamard_matrix(m); its transpose gives the inverse transform; null if m == 1).
// m must be 1 or one of 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172 and cols / m a power of two, else
// PQK_ERR_HADAMARD_SIZE; also when 4 * cols bytes exceed the device's shared memory per block (hadamard.cu).
int pqk_hadamard(const void* x, void* y, int x_dtype, const float* had_m, int m, int rows, int cols,
                 pqk_stream_t stream);

// Which instruction the GEMM uses on a device of this compute capability (major*10+minor), for reports:
// "imma.s4 (...)" (sm_80/86/89), "imma.s8-unpacked" (sm_90), "none" (not compiled for it).
const char* pqk_int4_gemm_path(int sm);

// Whether this library's kernels can run on CUDA device `device` here, asked once before the first launch
// (prefixquant_kernels/ops/cuda_library.py: backend='auto' falls back, backend='cuda' raises with the reason).
// Returns 0 if they can, else the cudaError_t (> 0) that every launch would return:
//   cudaErrorInsufficientDriver (35)      the installed driver cannot run the CUDA runtime linked into the library, or
//                                         there is no driver (e.g. a CUDA 13 build needs driver >= 580); as the runtime
//                                         itself decides on initialization (minor-version compatibility included)
//   cudaErrorNoKernelImageForDevice (209) the library has no kernel image for the device's arch (not built for it)
//   any other error of cudaDeviceGetAttribute / cudaSetDevice / cudaFuncGetAttributes (no device, bad ordinal, ...)
// Writes (each may be null): the CUDA version the driver supports and the runtime's (1000 * major + 10 * minor,
// 0 if there is no driver), the device's compute capability (major * 10 + minor, 0 if unknown). Leaves the calling
// thread's current device as it found it; creates the device's primary context (as any launch would).
int pqk_cuda_probe(int device, int* driver_version, int* runtime_version, int* sm);

#ifdef __cplusplus
}
#endif
