// The reciprocal path of the prefill panel's quantize (x86_gemm_zmm.h pf_quotient16<true>: y = x * (1 / s), then
// Markstein's correction y + (x - y s) (1 / s) in two FMAs) against the division (pf_quotient16<false>), bit for
// bit, on the same code the extension runs (the header is included here under the same target). Run by
// tests/cpu/test_recip_division.py.
//
// The quotient's rounding depends only on the significands of x and s (their exponents shift it, in the range
// the caller admits), so x and s in [1, 2) cover every case of a normal quotient:
//   bf16 x: all 2^7 significands x all 2^23 scale significands (exhaustive, ~0.2 s)
//   fp16 x: all 2^10 significands x all 2^23 scale significands (exhaustive, ~1.5 s)
//   fp32 x: all 2^23 significands x `scales` scale significands (the all-ones one, 1.0, then pseudo-random)
// Usage: recip_division_check [scales]   -> prints the counts, exits 1 on any mismatch.
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>

#include "../../common/quant_math.h"
#include "../kernels.h"
#include "../kernels_internal.h"

#pragma GCC push_options
#pragma GCC target("avx2,f16c,avx512f,avx512bw,avx512vnni,avx512vl")
namespace pqk {
namespace cpu {
namespace check {
#include "../x86_gemm_zmm.h"

float from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// x significands: `xbits` stored bits (7 bf16, 10 fp16, 23 fp32), all of them; scales: the given significands.
// Returns the number of lanes where the two paths differ.
long long compare(int xbits, const uint32_t* scale_mant, int64_t n_scales, long long* checked) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 lo = _mm512_set1_ps(-1e30f), hi = _mm512_set1_ps(1e30f);  // no clamp: the raw quotient
  const uint32_t nx = 1u << xbits;
  long long bad = 0;
  for (int64_t si = 0; si < n_scales; ++si) {
    const float s = from_bits(0x3f800000u | scale_mant[si]);
    const __m512 vs = _mm512_set1_ps(s), vr = _mm512_set1_ps(1.0f / s), bound = _mm512_set1_ps(s * 1048576.0f);
    for (uint32_t x0 = 0; x0 < nx; x0 += 16) {
      const __mmask16 m = (__mmask16)(nx - x0 >= 16 ? 0xFFFF : (1u << (nx - x0)) - 1u);
      const __m512i xi = _mm512_slli_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)x0), lane), 23 - xbits);
      const __m512 x = _mm512_castsi512_ps(_mm512_or_si512(xi, _mm512_set1_epi32(0x3f800000)));
      const __m512 a = pf_quotient16<true>(x, vs, vr, bound, lo, hi);
      const __m512 b = pf_quotient16<false>(x, vs, vr, bound, lo, hi);
      const __mmask16 diff = _mm512_mask_cmpneq_epi32_mask(m, _mm512_castps_si512(a), _mm512_castps_si512(b));
      if (diff && bad < 3) {
        alignas(64) float xa[16];
        _mm512_store_ps(xa, x);
        printf("mismatch: x = %a, s = %a\n", xa[__builtin_ctz(diff)], s);
      }
      bad += __builtin_popcount(diff);
      *checked += __builtin_popcount(m);
    }
  }
  return bad;
}

int run(int64_t fp32_scales) {
  const int64_t all = 1 << 23;
  uint32_t* every = (uint32_t*)malloc(sizeof(uint32_t) * all);
  for (int64_t i = 0; i < all; ++i) every[i] = (uint32_t)i;
  uint32_t* some = (uint32_t*)malloc(sizeof(uint32_t) * std::max<int64_t>(fp32_scales, 2));
  uint32_t seed = 12345;
  for (int64_t i = 0; i < fp32_scales; ++i) {
    seed = seed * 1664525u + 1013904223u;  // a fixed LCG: the same sample on every run
    some[i] = i == 0 ? 0x7FFFFFu : i == 1 ? 0u : (seed >> 9);
  }
  int failed = 0;
  const struct { const char* name; int xbits; const uint32_t* s; int64_t n; } cases[] = {
      {"bf16", 7, every, all}, {"fp16", 10, every, all}, {"fp32", 23, some, fp32_scales}};
  for (const auto& c : cases) {
    long long checked = 0;
    const long long bad = compare(c.xbits, c.s, c.n, &checked);
    printf("%s x: %lld pairs, %lld mismatches\n", c.name, checked, bad);
    failed |= bad != 0;
  }
  free(every);
  free(some);
  return failed;
}
}  // namespace check
}  // namespace cpu
}  // namespace pqk
#pragma GCC pop_options

int main(int argc, char** argv) {
  if (!__builtin_cpu_supports("avx512f")) {
    printf("no AVX-512F on this CPU\n");
    return 2;
  }
  return pqk::cpu::check::run(argc > 1 ? atoll(argv[1]) : 64);
}
