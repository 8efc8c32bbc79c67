// The float glue of a prefill that a Hugging Face model runs as chains of small torch ops, one pass per row here
// (models/float_ops.py puts it in the model; docs/PERF.md, change 18). Rows in parallel; each row through the ISA
// table's vector row (avx2_kernels.cpp, inherited by the AVX-512 tables) or the portable loop below.
//
//   rms_inv        1 / sqrt(mean(x^2) + eps) of one fp32 row, the sum of squares in double (decode_layer.cpp too)
//   rms_norm_rows  HF's LlamaRMSNorm (and Qwen2/3's, Mistral's, Phi-3's), with its roundings: in a bf16 / fp16 model
//                  h = x rsqrt(mean(x^2) + eps) in fp32 is rounded to the model's type, and w * h is rounded again.
//                  torch runs it as ~8 full-tensor passes (to fp32, pow, mean, add, rsqrt, mul, to bf16, mul).
//   silu_mul       SiLU(gate) * up of one decode step's MLP rows (decode_layer.cpp), in place, fp32
//   rope_rows      HF's apply_rotary_pos_emb on one of q / k: out = x cos + rotate_half(x) sin with torch's roundings
//                  (each product, then the sum, rounded to the model's type); torch runs it as ~7 passes (two muls,
//                  two slices, a negation, a cat, an add), and its output keeps x's transposed layout, which the
//                  attention then copies: here out is [B, H, T, D] contiguous.
#include <math.h>

#include <algorithm>
#include <vector>

#include "float16.h"
#include "kernels.h"
#include "kernels_internal.h"

namespace pqk {
namespace cpu {

float rms_inv(const float* x, int64_t n, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += (double)x[i] * x[i];
  return 1.0f / sqrtf((float)(ss / (double)n) + eps);
}

namespace {

void rms_norm_row_portable(const void* x, const void* w, FloatType t, int64_t n, float eps, void* out, float* tmp) {
  load_row_as_f32(x, 0, n, t, tmp);
  const float inv = rms_inv(tmp, n, eps);
  for (int64_t i = 0; i < n; ++i) store_from_f32(out, i, load_as_f32(w, i, t) * round_to_type(tmp[i] * inv, t), t);
}

void rope_row_portable(const void* x, const void* c, const void* s, FloatType t, int64_t D, void* out) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float r = d < h ? -load_as_f32(x, d + h, t) : load_as_f32(x, d - h, t);
    store_from_f32(out, d, round_to_type(load_as_f32(x, d, t) * load_as_f32(c, d, t), t) +
                               round_to_type(r * load_as_f32(s, d, t), t), t);
  }
}

void silu_mul_portable(float* g, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.0f + expf(-g[i])) * up[i];
}

// a task of at least ~32K elements: a decode step's single row stays on the calling thread
int64_t rows_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n)); }

}  // namespace

void rms_norm_rows(const void* x, const void* w, FloatType t, int64_t rows, int64_t n, float eps, void* out,
                   Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  const auto row = ker.rms_norm_row ? ker.rms_norm_row : rms_norm_row_portable;
  const int64_t es = float_type_size(t);
  parallel_for(0, rows, rows_grain(n), [&](int64_t r0, int64_t r1) {
    std::vector<float> tmp((size_t)n);
    for (int64_t r = r0; r < r1; ++r)
      row((const char*)x + r * n * es, w, t, n, eps, (char*)out + r * n * es, tmp.data());
  });
}

void silu_mul(float* g, const float* up, int64_t n, Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  (ker.silu_mul_row ? ker.silu_mul_row : silu_mul_portable)(g, up, n);
}

void rope_rows(const void* x, int64_t xb, int64_t xh, int64_t xt, const void* cos, const void* sin, int64_t cb,
               FloatType t, int64_t B, int64_t H, int64_t T, int64_t D, void* out, Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  const auto row = ker.rope_row ? ker.rope_row : rope_row_portable;
  const int64_t es = float_type_size(t);
  parallel_for(0, B * H * T, rows_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // row r = (b, h, i) of out
      const int64_t b = r / (H * T), hh = r / T % H, i = r % T;
      const int64_t c = (b * cb + i * D) * es;
      row((const char*)x + (b * xb + hh * xh + i * xt) * es, (const char*)cos + c, (const char*)sin + c, t, D,
          (char*)out + r * D * es);
    }
  });
}

}  // namespace cpu
}  // namespace pqk
