// Portable C++ kernels: the definition the SIMD files are tested against (bit-exact), and the path
// that runs on CPUs without AVX2 (and on aarch64). Plain loops; the compiler vectorizes what it can.
#include <cmath>
#include <math.h>

#include "../common/quant_math.h"
#include "kernels.h"
#include "kernels_internal.h"

namespace pqk {
namespace cpu {
namespace {

void quantize_row(const void* x, FloatType t, int64_t K, float scale, int qmin, int qmax, int8_t* q) {
  for (int64_t k = 0; k < K; ++k) q[k] = quantize_value(load_as_f32(x, k, t), scale, qmin, qmax);
}

float row_amax(const void* x, FloatType t, int64_t K) {
  float amax = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    float v = fabsf(load_as_f32(x, k, t));
    if (v <= 3.4028234663852886e38f && v > amax) amax = v;  // false for NaN and Inf
  }
  return amax;
}

void split_row(const int8_t* q, int64_t K, int8_t* dst) {
  const int64_t kp = round_up(K, kChunk);
  for (int64_t c = 0; c < kp; c += kChunk) {
    for (int64_t j = 0; j < kChunk / 2; ++j) {
      const int64_t ke = c + 2 * j, ko = ke + 1;
      dst[c + j] = ke < K ? q[ke] : 0;
      dst[c + kChunk / 2 + j] = ko < K ? q[ko] : 0;
    }
  }
}

void pack_row(const int8_t* q, int64_t K, uint8_t* p) {
  for (int64_t i = 0; i < K / 2; ++i) p[i] = pack_nibbles(q[2 * i], q[2 * i + 1]);
}

int32_t row_sum(const int8_t* q, int64_t n) {
  int32_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += q[i];
  return s;
}

void dequant_row4(const uint8_t* p, int64_t K, float scale, void* out, FloatType t) {
  for (int64_t i = 0; i < K / 2; ++i) {
    store_from_f32(out, 2 * i, (float)low_nibble(p[i]) * scale, t);
    store_from_f32(out, 2 * i + 1, (float)high_nibble(p[i]) * scale, t);
  }
}

void dot_rows(const float* q, int64_t G, int64_t D, const float* row, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += q[g * D + d] * row[d];
    out[g] = s;
  }
}

void qk_rows_q4(const float* q, int64_t G, int64_t D, int64_t n, const uint8_t* rows, int64_t stride,
                const int64_t* idx, float scale, float* out, int64_t ld) {
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* p = rows + (idx ? idx[j] : j) * stride;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s += q[g * D + d] * (float)(d % 2 ? high_nibble(p[d / 2]) : low_nibble(p[d / 2]));
      out[g * ld + j] = scale * s;
    }
  }
}

void axpy_rows(const float* coef, int64_t G, int64_t D, const float* row, float* acc) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) acc[g * D + d] += coef[g] * row[d];
}

void pv_rows_q4(const float* coef, int64_t ld, int64_t G, int64_t n, const uint8_t* rows, int64_t stride,
                const int64_t* idx, float scale, int64_t D, float* acc) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) {
      float s = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        const uint8_t b = rows[(idx ? idx[j] : j) * stride + d / 2];
        s += coef[g * ld + j] * (float)(d % 2 ? high_nibble(b) : low_nibble(b));
      }
      acc[g * D + d] += scale * s;
    }
}

float exp_rows(float* x, int64_t n, float shift) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

// Signed products directly (no offset trick): byte j of a 32-byte W chunk holds k = 2j (low nibble)
// and 2j+1 (high nibble), which the nibble-split panel stores at j and 32 + j.
void tile_w4(const int8_t* a, int64_t kp, const int32_t* /*a_rowsum*/, int /*a_bits*/,
             const uint8_t* w, int64_t w_stride, int64_t K, int mr, int nr, int32_t* acc) {
  const int64_t row_bytes = K / 2;
  for (int i = 0; i < mr; ++i) {
    for (int j = 0; j < nr; ++j) {
      const int8_t* ai = a + i * kp;
      const uint8_t* wj = w + j * w_stride;
      int32_t s = 0;
      for (int64_t b = 0; b < row_bytes; ++b) {
        const int64_t c = (b / 32) * kChunk, jj = b % 32;
        s += (int32_t)ai[c + jj] * low_nibble(wj[b]) + (int32_t)ai[c + 32 + jj] * high_nibble(wj[b]);
      }
      acc[i * nr + j] = s;
    }
  }
}

void tile_w8(const int8_t* a, int64_t kp, const int8_t* w, int64_t w_stride, int64_t K, int mr, int nr,
             int32_t* acc) {
  for (int i = 0; i < mr; ++i) {
    for (int j = 0; j < nr; ++j) {
      const int8_t* ai = a + i * kp;
      const int8_t* wj = w + j * w_stride;
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += (int32_t)ai[k] * (int32_t)wj[k];
      acc[i * nr + j] = s;
    }
  }
}

const IsaKernels kScalar = {
    "scalar", 4, 4, 4, quantize_row, row_amax, split_row, pack_row, row_sum, dequant_row4,
    dot_rows, qk_rows_q4, axpy_rows, pv_rows_q4, exp_rows, tile_w4, tile_w8, nullptr,
};

}  // namespace

const IsaKernels& scalar_kernels() { return kScalar; }

}  // namespace cpu
}  // namespace pqk
