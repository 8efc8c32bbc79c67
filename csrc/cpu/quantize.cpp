// Standalone activation quantization and int4 (un)packing, row-parallel. The GEMM does not call
// these: it quantizes inside its panel build (gemm.cpp); these serve quantize_static /
// quantize_per_token / pack_int4 / unpack_int4 and the KV cache.
#include <vector>

#include "../common/quant_math.h"
#include "kernels.h"
#include "kernels_internal.h"

namespace pqk {
namespace cpu {

namespace {
constexpr int64_t kPackGrain = 1 << 16;  // bytes per task for the memory-bound (un)packing loops

}  // namespace

void pack_int4(const int8_t* q, int64_t n, uint8_t* out) {
  const IsaKernels& ker = kernels_for(Isa::kAuto);
  parallel_for(0, n / 2, kPackGrain, [&](int64_t b, int64_t e) { ker.pack_row(q + 2 * b, 2 * (e - b), out + b); });
}

void unpack_int4(const uint8_t* p, int64_t n_bytes, int8_t* out) {
  parallel_for(0, n_bytes, kPackGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      out[2 * i] = low_nibble(p[i]);
      out[2 * i + 1] = high_nibble(p[i]);
    }
  });
}

namespace {
// Row-parallel quantization; scales_out == nullptr: the static `scale`, else per row (written there).
void quantize_rows(const void* x, FloatType xt, int64_t M, int64_t K, float scale, int bits, void* out,
                   float* scales_out, Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  const int qmin = qmin_for_bits(bits), qmax = qmax_for_bits(bits);
  parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    std::vector<int8_t> q(bits == 4 ? K : 0);
    for (int64_t m = b; m < e; ++m) {
      const void* xr = (const char*)x + m * K * float_type_size(xt);
      float s = scale;
      if (scales_out) scales_out[m] = s = per_token_scale_from_amax(ker.row_amax(xr, xt, K), qmax);
      int8_t* qr = bits == 4 ? q.data() : (int8_t*)out + m * K;
      ker.quantize_row(xr, xt, K, s, qmin, qmax, qr);
      if (bits == 4) ker.pack_row(qr, K, (uint8_t*)out + m * (K / 2));
    }
  });
}
}  // namespace

void quantize_static(const void* x, FloatType xt, int64_t M, int64_t K, float scale, int bits, void* out,
                     Isa isa) {
  quantize_rows(x, xt, M, K, scale, bits, out, nullptr, isa);
}

void quantize_per_token(const void* x, FloatType xt, int64_t M, int64_t K, int bits, void* out,
                        float* scales_out, Isa isa) {
  quantize_rows(x, xt, M, K, 0.0f, bits, out, scales_out, isa);
}

}  // namespace cpu
}  // namespace pqk
