// The CUTLASS INT4 GEMM path (int4_gemm_cutlass.cu) as seen by the dispatcher in int4_gemm.cu.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace pqk {
namespace cuda {

// pqk_int4_gemm `config` codes of the CUTLASS tiles (0..2 are int4_gemm.cu's own tiles; -1 = auto).
enum CutlassConfig : int { kCutlassDecode = 10, kCutlassMid = 11, kCutlassPrefill = 12 };

// Which shapes the CUTLASS path takes (the caller has checked the epilogue is fp16/bf16 dequant): K % 32 == 0 (A/W
// rows 16-byte aligned: the caller already pads K), N % 8 == 0 (128-bit output stores), and out, w_scale and bias
// 16-byte aligned (the RowBroadcast visitors load 4 floats at a time; a_scale is read one element at a time).
inline bool cutlass_takes(int n, int k, const void* out, const float* w_scale, const float* bias) {
  auto a16 = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
  return k % 32 == 0 && n % 8 == 0 && a16(out) && a16(w_scale) && (bias == nullptr || a16(bias));
}

// out = half|bf16( acc * (a_scale * w_scale) + bias ), as int4_gemm.cu's dequant epilogue. a: uint8 [m, k/2],
// w: uint8 [n, k/2] (packed int4, 16-byte aligned), out: fp16 (out_is_bf16 = 0) / bf16 [m, n], a_scale fp32 [1] or
// [m] (a_scale_per_token), w_scale fp32 [n], bias fp32 [n] or null; config: a CutlassConfig. Returns a PqkStatus /
// cudaError_t like every launcher.
int cutlass_dequant_gemm(const uint8_t* a, const uint8_t* w, void* out, int out_is_bf16, const float* a_scale,
                         int a_scale_per_token, const float* w_scale, const float* bias, int m, int n, int k,
                         int config, cudaStream_t stream);

}  // namespace cuda
}  // namespace pqk
