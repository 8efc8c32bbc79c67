// KV cache on the CPU: [16-bit prefix | static-quantized body] -> one attention-ready tensor, written row by
// row straight into the output (no concatenation copies). Parallel over (batch, head, row).
#include <string.h>

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

}  // namespace cpu
}  // namespace pqk
