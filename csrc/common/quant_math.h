// The package's quantization convention, as scalar math shared by every C++/CUDA backend.
//
// This header is the single C++ statement of the format that prefixquant_kernels/format.py defines in
// PyTorch (the reference). Every kernel quantizes, packs and dequantizes through these functions (or a
// SIMD transcription that is tested bit-exact against them), so all backends agree bit for bit.
//
//   q = clamp(round_half_to_even(x / scale), -2^(b-1), 2^(b-1) - 1)       b = 4 or 8
//   NaN -> 0;  +Inf -> qmax;  -Inf -> qmin  (saturate; documented in format.py)
//   int4 packing: element 2i in the LOW nibble of byte i, element 2i+1 in the HIGH nibble (CUTLASS int4b_t order)
//
// The functions are PQK_HD so the CUDA kernels (csrc/cuda) use the very same code on the device.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define PQK_HD __host__ __device__ __forceinline__
#else
#define PQK_HD inline
#endif

namespace pqk {

PQK_HD int qmin_for_bits(int bits) { return -(1 << (bits - 1)); }
PQK_HD int qmax_for_bits(int bits) { return (1 << (bits - 1)) - 1; }

// Round half to even (torch.round's rule): rint rounds in the current rounding mode, which is
// round-to-nearest-even unless someone changed it (nothing in a PyTorch process does).
PQK_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return __builtin_rintf(v);
#endif
}

// x / scale -> clamped, rounded integer in [qmin, qmax]; NaN -> 0.
// scale must be finite and > 0 (the op layer checks this before any kernel runs).
PQK_HD int8_t quantize_value(float x, float scale, int qmin, int qmax) {
  float v = x / scale;
  if (!(v == v)) return 0;                       // NaN
  if (v < (float)qmin) return (int8_t)qmin;      // also -Inf
  if (v > (float)qmax) return (int8_t)qmax;      // also +Inf
  return (int8_t)(int)round_half_even(v);
}

// Two int4 values (each in [-8, 7]) -> one byte: lo is the even element.
PQK_HD uint8_t pack_nibbles(int8_t lo, int8_t hi) {
  return (uint8_t)(((uint8_t)lo & 0x0F) | (((uint8_t)hi & 0x0F) << 4));
}

// Sign-extend the low / high nibble of a byte.
PQK_HD int8_t low_nibble(uint8_t b) { return (int8_t)((int)((b & 0x0F) ^ 0x08) - 8); }
PQK_HD int8_t high_nibble(uint8_t b) { return (int8_t)((int)((b >> 4) ^ 0x08) - 8); }

// Dynamic per-token scale: max |x| over the finite values of a row, divided by qmax.
// A row with no finite non-zero value gets scale 1 (every q is then 0 or saturated).
PQK_HD float per_token_scale_from_amax(float amax, int qmax) {
  return amax > 0.0f ? amax / (float)qmax : 1.0f;
}

// The dequant epilogue's scale: y = float(acc) * (a_scale * w_scale) [+ bias], in this order, in fp32,
// with no fused multiply-add — the PyTorch reference performs the identical operations, so the
// fp32 result is bit-exact across backends.
PQK_HD float dequant_value(int32_t acc, float a_scale, float w_scale) {
  float s = a_scale * w_scale;
  return (float)acc * s;
}

}  // namespace pqk
