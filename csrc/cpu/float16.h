// Scalar bfloat16 / float16 <-> float32 conversions for the CPU kernels, bit-exact with PyTorch:
// widening is exact; narrowing rounds to nearest-even, overflows to Inf, keeps NaN a (quiet) NaN and
// produces subnormals — the same as c10::BFloat16 / c10::Half. They are written out here (not taken
// from c10) so that the kernel files build without any torch header (only torch_ops.cpp includes torch: setup.py).
#pragma once

#include <stdint.h>
#include <string.h>

namespace pqk {
namespace cpu {

enum class FloatType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int64_t float_type_size(FloatType t) { return t == FloatType::kFloat32 ? 4 : 2; }

inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

inline float bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);  // NaN stays quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                            // round to nearest-even
  return (uint16_t)(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return f32_from_bits(sign | 0x7f800000u | (man << 13));  // Inf / NaN
  if (exp == 0) {
    if (man == 0) return f32_from_bits(sign);                                // +-0
    // subnormal: value = man * 2^-24, exact in fp32
    float v = (float)man * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520 -> Inf
  if (a < 0x38800000u) {
    // result is subnormal (or zero): value / 2^-24 rounded to nearest-even, done in fp32 exactly by
    // adding 0.5 (2^-1) which puts the 2^-24 quantum at the last mantissa bit of the sum.
    float v = f32_from_bits(a) + 0.5f;
    return (uint16_t)(sign | (uint16_t)(f32_bits(v) - 0x3f000000u));
  }
  // normal: rebias exponent, round the 13 dropped bits to nearest-even
  uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u);  // 0xc8000000 = (-112) << 23, mod 2^32
  return (uint16_t)(sign | (uint16_t)(r >> 13));
}

inline float load_as_f32(const void* p, int64_t i, FloatType t) {
  switch (t) {
    case FloatType::kBFloat16: return bf16_to_f32(((const uint16_t*)p)[i]);
    case FloatType::kFloat16: return f16_to_f32(((const uint16_t*)p)[i]);
    default: return ((const float*)p)[i];
  }
}

// n elements of p (type t) from element `at` -> dst fp32 (exact), one loop per type (the compiler vectorizes them)
inline void load_row_as_f32(const void* p, int64_t at, int64_t n, FloatType t, float* dst) {
  if (t == FloatType::kFloat32) {
    memcpy(dst, (const float*)p + at, (size_t)n * sizeof(float));
  } else if (t == FloatType::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(((const uint16_t*)p)[at + i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(((const uint16_t*)p)[at + i]);
  }
}

// v rounded to type t and back to fp32 (a model's `.to(dtype)` between two fp32 computations); fp32: v itself
inline float round_to_type(float v, FloatType t) {
  if (t == FloatType::kBFloat16) return bf16_to_f32(f32_to_bf16(v));
  if (t == FloatType::kFloat16) return f16_to_f32(f32_to_f16(v));
  return v;
}

inline void store_from_f32(void* p, int64_t i, float v, FloatType t) {
  switch (t) {
    case FloatType::kBFloat16: ((uint16_t*)p)[i] = f32_to_bf16(v); break;
    case FloatType::kFloat16: ((uint16_t*)p)[i] = f32_to_f16(v); break;
    default: ((float*)p)[i] = v;
  }
}

}  // namespace cpu
}  // namespace pqk
