// KV cache on the CPU: [16-bit prefix | static-quantized body] -> one attention-ready tensor, written row by
// row straight into the output (no concatenation copies). Parallel over (batch, head, row).
#include <string.h>

#include <algorithm>
#include <vector>

#include "../common/quant_math.h"
#include "kernels.h"
#include "kernels_internal.h"

namespace pqk {
namespace cpu {

void kv_dequant_concat_static(const void* prefix, FloatType pt, int64_t prefix_batch, int64_t P, const void* body,
                              int bits, const float* scale, int64_t B, int64_t H, int64_t T, int64_t D, void* out,
                              FloatType ot, Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  const int64_t N = P + T, osz = float_type_size(ot), psz = float_type_size(pt);
  const int64_t body_row = bits == 4 ? D / 2 : D;  // bytes per body row
  parallel_for(0, B * H * N, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / N, n = r % N, b = bh / H, h = bh % H;
      char* dst = (char*)out + r * D * osz;
      if (n < P) {  // prefix row: batch 1 is shared by every sequence
        const char* src = (const char*)prefix + (((prefix_batch == 1 ? 0 : b) * H + h) * P + n) * D * psz;
        if (pt == ot) {
          memcpy(dst, src, (size_t)(D * osz));
        } else {
          for (int64_t d = 0; d < D; ++d) store_from_f32(dst, d, load_as_f32(src, d, pt), ot);
        }
        continue;
      }
      const char* q = (const char*)body + (bh * T + (n - P)) * body_row;
      if (bits == 4) {
        ker.dequant_row4((const uint8_t*)q, D, scale[h], dst, ot);
      } else {
        for (int64_t d = 0; d < D; ++d) store_from_f32(dst, d, (float)((const int8_t*)q)[d] * scale[h], ot);
      }
    }
  });
}

void kv_quantize_static(const void* x, FloatType xt, const float* scale, int bits, int64_t B, int64_t H, int64_t T,
                        int64_t D, void* out, Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  const int64_t xsz = float_type_size(xt), out_row = bits == 4 ? D / 2 : D;
  parallel_for(0, B * H * T, 64, [&](int64_t r0, int64_t r1) {
    std::vector<int8_t> q((size_t)D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = (r / T) % H;
      int8_t* dst = bits == 4 ? q.data() : (int8_t*)out + r * out_row;
      ker.quantize_row((const char*)x + r * D * xsz, xt, D, scale[h], qmin_for_bits(bits), qmax_for_bits(bits), dst);
      if (bits == 4) ker.pack_row(q.data(), D, (uint8_t*)out + r * out_row);
    }
  });
}

// One task per (sequence, KV head): its G query heads' scores over all P + T positions, then the V pass.
// Each K/V row is decoded once (prefix: widened; body: the integers as fp32, *unscaled*) into an L1 buffer and
// used by all G heads; the per-head scale is applied once per score and once per V coefficient instead of per
// element. sm_scale is folded into q. Memory per task: G * (P + T) scores, e.g. 4 * 2049 fp32 = 32 KB.
void kv_decode_attention_static(const void* q, FloatType qt, int64_t B, int64_t Hq, int64_t D,
                                const void* prefix_k, const void* prefix_v, FloatType pt, int64_t prefix_batch,
                                int64_t P, const void* k_body, const void* v_body, int64_t body_sb, int64_t body_sh,
                                int bits, const float* k_scale, const float* v_scale, int64_t Hkv, int64_t T,
                                const bool* mask, int64_t mask_stride, float sm_scale, void* out, Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  const int64_t G = Hq / Hkv, N = P + T, body_row = bits == 4 ? D / 2 : D;
  parallel_for(0, B * Hkv, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> qf((size_t)(G * D)), acc((size_t)(G * D)), row((size_t)D), scores((size_t)(G * N)),
        coef((size_t)G), dots((size_t)G);
    std::vector<int64_t> pos;
    pos.reserve((size_t)N);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / Hkv, h = r % Hkv;
      const int64_t q0 = (b * Hq + h * G) * D;  // first element of query head h*G in q and out
      for (int64_t i = 0; i < G * D; ++i) qf[i] = load_as_f32(q, q0 + i, qt) * sm_scale;
      // row n of K or V (n < P: the prefix, else the body) -> row as fp32; returns the row's scale
      auto load_row = [&](const void* prefix, const void* body, const float* scale, int64_t n) -> float {
        if (n < P) {
          const int64_t base = (((prefix_batch == 1 ? 0 : b) * Hkv + h) * P + n) * D;
          for (int64_t d = 0; d < D; ++d) row[d] = load_as_f32(prefix, base + d, pt);
          return 1.0f;
        }
        const char* src = (const char*)body + (b * body_sb + h * body_sh + (n - P)) * body_row;
        if (bits == 4) {
          ker.dequant_row4((const uint8_t*)src, D, 1.0f, row.data(), FloatType::kFloat32);
        } else {
          for (int64_t d = 0; d < D; ++d) row[d] = (float)((const int8_t*)src)[d];
        }
        return scale[h];
      };
      // the attended positions: all P + T, or those the row's mask allows (a preallocated cache's left padding)
      pos.clear();
      for (int64_t n = 0; n < N; ++n)
        if (mask == nullptr || mask[b * mask_stride + n]) pos.push_back(n);
      const int64_t Nv = (int64_t)pos.size();
      for (int64_t j = 0; j < Nv; ++j) {
        const int64_t n = pos[(size_t)j];
        float s;
        if (n >= P && bits == 4 && D % 64 == 0) {  // packed row straight into registers (no fp32 copy)
          ker.dot_rows_q4(qf.data(), G, D, (const uint8_t*)k_body + (b * body_sb + h * body_sh + (n - P)) * body_row,
                          dots.data());
          s = k_scale[h];
        } else {
          s = load_row(prefix_k, k_body, k_scale, n);
          ker.dot_rows(qf.data(), G, D, row.data(), dots.data());
        }
        for (int64_t g = 0; g < G; ++g) scores[g * N + j] = dots[g] * s;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      if (Nv == 0) {  // every position masked: the row is all zeros (a padding row of a left-padded batch)
        for (int64_t i = 0; i < G * D; ++i) store_from_f32(out, q0 + i, 0.0f, qt);
        continue;
      }
      std::vector<float> inv((size_t)G);
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * N;
        float mx = sg[0];
        for (int64_t j = 1; j < Nv; ++j) mx = sg[j] > mx ? sg[j] : mx;
        inv[g] = 1.0f / ker.exp_rows(sg, Nv, mx);
      }
      for (int64_t j = 0; j < Nv; ++j) {
        const int64_t n = pos[(size_t)j];
        const float s = load_row(prefix_v, v_body, v_scale, n);
        for (int64_t g = 0; g < G; ++g) coef[g] = scores[g * N + j] * s;
        ker.axpy_rows(coef.data(), G, D, row.data(), acc.data());
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) store_from_f32(out, q0 + g * D + d, acc[g * D + d] * inv[g], qt);
    }
  });
}

}  // namespace cpu
}  // namespace pqk
