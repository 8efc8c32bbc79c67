// The CPU GEMM driver: blocking, threading, the A panel (where a float A is quantized), the dequant
// epilogue. The inner products are the instruction-set tiles (kernels_internal.h).
//
//   for each block of MB rows of A (serial):
//     build the int8 panel of those rows              (parallel over rows; fused quantize for float A)
//     for each block of W tiles (parallel over N):    packed W block (<= kWBlockBytes) stays in L2 while ...
//       for each tile of mr panel rows:               ... each A tile (in L1) passes over it
//         for each tile of nr W rows in the block:
//           int32 tile -> y = acc * (a_scale * w_scale) + bias -> out dtype
//
// Why this order: W is the big operand (N*K/2 bytes, e.g. 8 MB at 4096x4096) and is read from memory
// once per M-block; inside a block the operand re-read from L2 is packed W (half a byte per k) rather
// than the int8 panel (docs/PERF.md, step 2). At decode there is one M-block and W streams exactly once.
#include <string.h>

#include <algorithm>
#include <vector>

#include "../common/quant_math.h"
#include "kernels.h"
#include "kernels_internal.h"

namespace pqk {
namespace cpu {

namespace {

constexpr int64_t kPanelBytes = 256 * 1024;   // A panel per M-block: a quarter of a 1 MB L2
constexpr int64_t kWBlockBytes = 128 * 1024;  // W tiles revisited by every A tile (docs/PERF.md, step 2)


// Row m of A -> panel row (kp int8, order per W's bits, zero padded); returns the row's scale.
float build_panel_row(const GemmArgs& g, const IsaKernels& ker, int64_t m, int64_t kp, int8_t* dst,
                      int8_t* tmp /* int8 [K] scratch */) {
  const int64_t K = g.K;
  const bool split = g.w_bits == 4;
  float scale = 0.0f;
  if (g.a_source != ASource::kFloat) scale = g.a_scale_per_row ? g.a_scale[m] : g.a_scale[0];

  if (g.a_source == ASource::kPacked4 && split) {
    // Packed int4 is already "nibble split": byte j of a 32-byte chunk holds k = 2j and 2j + 1.
    const uint8_t* p = (const uint8_t*)g.a + m * (K / 2);
    memset(dst, 0, (size_t)kp);
    for (int64_t b = 0; b < K / 2; ++b) {
      const int64_t c = (b / 32) * kChunk, j = b % 32;
      dst[c + j] = low_nibble(p[b]);
      dst[c + 32 + j] = high_nibble(p[b]);
    }
    return scale;
  }

  const int8_t* q = tmp;  // natural-order int8 row
  switch (g.a_source) {
    case ASource::kPacked4:
      unpack_int4((const uint8_t*)g.a + m * (K / 2), K / 2, tmp);  // serial: K is small
      break;
    case ASource::kInt8:
      q = (const int8_t*)g.a + m * K;
      break;
    case ASource::kFloat: {
      const void* x = (const char*)g.a + m * K * float_type_size(g.a_float_type);
      const int qmax = qmax_for_bits(g.a_bits);
      scale = g.a_scale ? g.a_scale[0] : per_token_scale_from_amax(ker.row_amax(x, g.a_float_type, K), qmax);
      ker.quantize_row(x, g.a_float_type, K, scale, qmin_for_bits(g.a_bits), qmax, tmp);
      break;
    }
  }
  if (split) {
    ker.split_row(q, K, dst);
  } else {
    memcpy(dst, q, (size_t)K);
    memset(dst + K, 0, (size_t)(kp - K));
  }
  return scale;
}

}  // namespace

void gemm(const GemmArgs& g, Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  const int64_t M = g.M, N = g.N, K = g.K;
  if (M == 0 || N == 0) return;
  const int64_t kp = round_up(std::max<int64_t>(K, 1), kChunk);
  const int mr = ker.mr_max;
  const bool w4 = g.w_bits == 4;
  const int64_t w_stride = w4 ? K / 2 : K;  // bytes per W row
  // rows per M-block: as many as fit kPanelBytes, a multiple of mr, at least mr
  const int64_t mb_max = std::min<int64_t>(M, std::max<int64_t>(mr, kPanelBytes / kp / mr * mr));
  // Decode (one A row): wider W tiles, so each A load serves more W rows; W streams from memory once.
  const bool decode = mb_max == 1;
  const int nr = decode && w4 ? ker.nr_decode : ker.nr_max;

  std::vector<int8_t> panel((size_t)(mb_max * kp));
  std::vector<int32_t> rowsum((size_t)mb_max);
  std::vector<float> rscale((size_t)mb_max);
  const int64_t n_tiles = (N + nr - 1) / nr;
  // W tiles per task: enough work to amortize scheduling, ~64 KB of W
  const int64_t tile_grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, nr * w_stride));
  // W tiles per L2 block (see the loop below)
  const int64_t tiles_per_block = std::max<int64_t>(1, kWBlockBytes / std::max<int64_t>(1, nr * w_stride));

  for (int64_t m0 = 0; m0 < M; m0 += mb_max) {
    const int64_t mb = std::min(mb_max, M - m0);
    parallel_for(0, mb, 1, [&](int64_t b, int64_t e) {
      std::vector<int8_t> tmp((size_t)K);
      for (int64_t r = b; r < e; ++r) {
        int8_t* dst = panel.data() + r * kp;
        rscale[r] = build_panel_row(g, ker, m0 + r, kp, dst, tmp.data());
        rowsum[r] = ker.row_sum(dst, kp);
        if (g.a_scale_out) g.a_scale_out[m0 + r] = rscale[r];
      }
    });
    parallel_for(0, n_tiles, tile_grain, [&](int64_t tb, int64_t te) {
      int32_t acc[16 * 16];
      // A block of this task's W tiles stays in L2 while every A tile (in L1) passes over it: W is read
      // from L2 in its packed 4-bit form (half a byte per k), the cheapest operand to stream.
      for (int64_t b0 = tb; b0 < te; b0 += tiles_per_block) {
        const int64_t b1 = std::min(te, b0 + tiles_per_block);
        for (int64_t i0 = 0; i0 < mb; i0 += mr) {
          const int mm = (int)std::min<int64_t>(mr, mb - i0);
          const int8_t* a = panel.data() + i0 * kp;
          for (int64_t t = b0; t < b1; ++t) {
            const int64_t n0 = t * nr;
            const int nn = (int)std::min<int64_t>(nr, N - n0);
            const void* w_tile = (const char*)g.w + n0 * w_stride;
            if (w4) {
              ker.tile_w4(a, kp, rowsum.data() + i0, g.a_bits, (const uint8_t*)w_tile, w_stride, K, mm, nn, acc);
            } else {
              ker.tile_w8(a, kp, (const int8_t*)w_tile, w_stride, K, mm, nn, acc);
            }
            for (int i = 0; i < mm; ++i) {
              const int64_t row = m0 + i0 + i;
              for (int j = 0; j < nn; ++j) {
                float y = dequant_value(acc[i * nn + j], rscale[i0 + i], g.w_scale[n0 + j]);
                if (g.bias) y += g.bias[n0 + j];
                store_from_f32(g.out, row * N + n0 + j, y, g.out_type);
              }
            }
          }
        }
      }
    });
  }
}

}  // namespace cpu
}  // namespace pqk
