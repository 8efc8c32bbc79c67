// AVX2 kernels (x86-64). Compiled for AVX2 with a target pragma — placed *after* every include so
// that no inline function from a shared header (STL, float16.h) gets an AVX2 body the linker could
// pick for the portable code — and used only when cpuid reports AVX2 (isa.cpp). FMA is deliberately
// not enabled: fp32 results must stay bit-exact with the reference, so nothing may be contracted.
//
// The W4 tile is x86_tile_w4.h with MaddubsAcc (vpmaddubsw into int16; the integer trick and the
// saturation bounds are explained there). The alternative, the sign trick (|a| and sign(w, a)), costs two
// vpsignb per product and buys nothing when w has 4 bits. CPUs with VNNI run the same tile with one
// vpdpbusd per 32 bytes (vnni_kernels.cpp).
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "../common/quant_math.h"
#include "kernels.h"
#include "kernels_internal.h"

#pragma GCC push_options
#pragma GCC target("avx2,f16c")

namespace pqk {
namespace cpu {
namespace {

// ---- float loads ----------------------------------------------------------------------------------
// 8 elements of type t at x[k] as fp32 (exact: bf16 is the high half of an fp32, fp16 widens exactly)
inline __m256 load8_f32(const void* x, int64_t k, FloatType t) {
  if (t == FloatType::kBFloat16) {
    __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)x + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  if (t == FloatType::kFloat16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)x + k)));
  return _mm256_loadu_ps((const float*)x + k);
}

// quantize_value on 8 lanes: x / scale, NaN -> 0, clamp, round half to even, -> int32.
// Clamping before rounding equals rounding before clamping because qmin/qmax are integers.
inline __m256i quantize8(__m256 x, __m256 scale, __m256 qmin, __m256 qmax) {
  __m256 v = _mm256_div_ps(x, scale);
  v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN lanes -> +0
  v = _mm256_min_ps(_mm256_max_ps(v, qmin), qmax);
  v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(v);
}

// Four int32x8 (values already in int8 range) -> 32 int8 in order. packs work per 128-bit lane and
// leave the dwords as (i0lo, i1lo, i2lo, i3lo | i0hi, i1hi, i2hi, i3hi); the permute restores order.
inline __m256i narrow32(__m256i i0, __m256i i1, __m256i i2, __m256i i3) {
  __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// 64 int8 in natural order (y0 = k 0..31, y1 = k 32..63) -> the 32 even-k bytes and the 32 odd-k bytes.
inline void deinterleave64(__m256i y0, __m256i y1, __m256i* even, __m256i* odd) {
  const __m256i m = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                     0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  // per lane: 8 evens then 8 odds; the 64-bit permute gathers (evens lane0, evens lane1, odds, odds)
  __m256i s0 = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(y0, m), _MM_SHUFFLE(3, 1, 2, 0));
  __m256i s1 = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(y1, m), _MM_SHUFFLE(3, 1, 2, 0));
  *even = _mm256_permute2x128_si256(s0, s1, 0x20);
  *odd = _mm256_permute2x128_si256(s0, s1, 0x31);
}


// ---- the W4 tile: MaddubsAcc (vpmaddubsw into int16, widened every FLUSH chunks) -------------------
#include "x86_tile_w4.h"

// ---- row functions (see kernels_internal.h for the contracts) -----------------------------------------
void quantize_row(const void* x, FloatType t, int64_t K, float scale, int qmin, int qmax, int8_t* q) {
  const __m256 s = _mm256_set1_ps(scale), lo = _mm256_set1_ps((float)qmin), hi = _mm256_set1_ps((float)qmax);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i i0 = quantize8(load8_f32(x, k, t), s, lo, hi);
    __m256i i1 = quantize8(load8_f32(x, k + 8, t), s, lo, hi);
    __m256i i2 = quantize8(load8_f32(x, k + 16, t), s, lo, hi);
    __m256i i3 = quantize8(load8_f32(x, k + 24, t), s, lo, hi);
    _mm256_storeu_si256((__m256i*)(q + k), narrow32(i0, i1, i2, i3));
  }
  for (; k < K; ++k) q[k] = quantize_value(load_as_f32(x, k, t), scale, qmin, qmax);
}

float row_amax(const void* x, FloatType t, int64_t K) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(__builtin_inff());
  __m256 m = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 a = _mm256_and_ps(load8_f32(x, k, t), absmask);
    a = _mm256_and_ps(a, _mm256_cmp_ps(a, inf, _CMP_LT_OQ));  // Inf and NaN lanes -> 0
    m = _mm256_max_ps(m, a);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, m);
  float amax = 0.0f;
  for (int i = 0; i < 8; ++i) amax = lanes[i] > amax ? lanes[i] : amax;
  for (; k < K; ++k) {
    float v = __builtin_fabsf(load_as_f32(x, k, t));
    if (v <= 3.4028234663852886e38f && v > amax) amax = v;
  }
  return amax;
}

void split_row(const int8_t* q, int64_t K, int8_t* dst) {
  int64_t c = 0;
  for (; c + kChunk <= K; c += kChunk) {
    __m256i e, o;
    deinterleave64(_mm256_loadu_si256((const __m256i*)(q + c)), _mm256_loadu_si256((const __m256i*)(q + c + 32)), &e, &o);
    _mm256_storeu_si256((__m256i*)(dst + c), e);
    _mm256_storeu_si256((__m256i*)(dst + c + 32), o);
  }
  if (c < K) {  // last partial chunk: scalar, zero padded
    for (int64_t j = 0; j < kChunk / 2; ++j) {
      const int64_t ke = c + 2 * j, ko = ke + 1;
      dst[c + j] = ke < K ? q[ke] : 0;
      dst[c + kChunk / 2 + j] = ko < K ? q[ko] : 0;
    }
  }
}

void pack_row(const int8_t* q, int64_t K, uint8_t* p) {
  const __m256i lo_mask = _mm256_set1_epi8(0x0F), hi_mask = _mm256_set1_epi8((char)0xF0);
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    __m256i e, o;
    deinterleave64(_mm256_loadu_si256((const __m256i*)(q + k)), _mm256_loadu_si256((const __m256i*)(q + k + 32)), &e, &o);
    __m256i b = _mm256_or_si256(_mm256_and_si256(e, lo_mask), _mm256_and_si256(_mm256_slli_epi16(o, 4), hi_mask));
    _mm256_storeu_si256((__m256i*)(p + k / 2), b);
  }
  for (; k + 1 < K; k += 2) p[k / 2] = pack_nibbles(q[k], q[k + 1]);
}

int32_t row_sum(const int8_t* q, int64_t n) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i pairs = _mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i*)(q + i)));  // |pair| <= 256
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones16));
  }
  int32_t s = hsum_epi32(acc);
  for (; i < n; ++i) s += q[i];
  return s;
}

// fp32 x8 -> bf16 x8, round to nearest-even (inputs are finite here: q * scale)
inline __m128i f32_to_bf16_8(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                   _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
  r = _mm256_srli_epi32(r, 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

inline void store8(void* out, int64_t k, __m256 v, FloatType t) {
  if (t == FloatType::kFloat32) _mm256_storeu_ps((float*)out + k, v);
  else if (t == FloatType::kFloat16)
    _mm_storeu_si128((__m128i*)((uint16_t*)out + k), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  else _mm_storeu_si128((__m128i*)((uint16_t*)out + k), f32_to_bf16_8(v));
}

void dequant_row4(const uint8_t* p, int64_t K, float scale, void* out, FloatType t) {
  const __m128i m0f = _mm_set1_epi8(0x0F), x8 = _mm_set1_epi8(8);
  const __m256 s = _mm256_set1_ps(scale);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m128i b = _mm_loadu_si128((const __m128i*)(p + k / 2));
    // nibble -> signed byte: (n ^ 8) - 8; unpack lo/hi back into natural element order
    __m128i lo = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(b, m0f), x8), x8);
    __m128i hi = _mm_sub_epi8(_mm_xor_si128(_mm_and_si128(_mm_srli_epi16(b, 4), m0f), x8), x8);
    __m128i e0 = _mm_unpacklo_epi8(lo, hi), e1 = _mm_unpackhi_epi8(lo, hi);
    store8(out, k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e0)), s), t);
    store8(out, k + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(e0, 8))), s), t);
    store8(out, k + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e1)), s), t);
    store8(out, k + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(e1, 8))), s), t);
  }
  for (; k + 1 < K; k += 2) {
    store_from_f32(out, k, (float)low_nibble(p[k / 2]) * scale, t);
    store_from_f32(out, k + 1, (float)high_nibble(p[k / 2]) * scale, t);
  }
}

// ---- decode attention rows (fp32; no FMA, see the file comment) --------------------------------------
inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

void dot_rows(const float* q, int64_t G, int64_t D, const float* row, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();  // two chains: the adds' latency, not their count
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(row + d)));
      a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_loadu_ps(qg + d + 8), _mm256_loadu_ps(row + d + 8)));
    }
    float s = hsum_ps(_mm256_add_ps(a0, a1));
    for (; d < D; ++d) s += qg[d] * row[d];
    out[g] = s;
  }
}

// The decode attention's two passes over packed int4 rows (K: scores, V: the weighted sum). Attention is checked
// against the reference within a tolerance, not bit for bit, so these two use FMA (a function-level target; the
// rest of the file stays without contraction).
#define PQK_ATTN_TARGET __attribute__((target("avx2,fma,f16c")))

// 16 int4 values (8 packed bytes, element 2j in byte j's low nibble, 2j + 1 in its high one) -> the 8 even and
// the 8 odd elements as fp32, in that *split* order: one zero-extending load puts byte j in lane j, and a shift
// left then an arithmetic shift right sign-extends either nibble in place (7 instructions; unpacking into natural
// order took 14, and the unpack is most of the passes' work). The passes keep their own operand in the same split
// order instead: the K pass splits q once per call, the V pass accumulates split and interleaves once per slab.
PQK_ATTN_TARGET inline void unpack16_split_f32(const uint8_t* p, __m256& even, __m256& odd) {
  const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  even = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(x, 28), 28));
  odd = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(x, 24), 28));
}

// v[r] holds 8 partial sums of row r (r < 8) -> the 8 rows' totals in one vector: two levels of vhaddps (pairs,
// then quads within each 128-bit half) and one add of the halves, instead of a 6-instruction reduction per row.
PQK_ATTN_TARGET inline __m256 hsum8x8(const float (*v)[8]) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_load_ps(v[0]), _mm256_load_ps(v[1]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_load_ps(v[2]), _mm256_load_ps(v[3]));
  const __m256 t2 = _mm256_hadd_ps(_mm256_load_ps(v[4]), _mm256_load_ps(v[5]));
  const __m256 t3 = _mm256_hadd_ps(_mm256_load_ps(v[6]), _mm256_load_ps(v[7]));
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [rows 0-3 | 0-3], [rows 4-7 | 4-7]
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// The K pass over n packed rows, GN <= 4 heads, q [GN, D] in split order (see unpack16_split_f32): each row is
// unpacked 16 values at a time into registers and multiplied into the GN query rows (read from L1), two FMA chains
// per head; the chains' sum of 8 rows at a time goes through L1 into hsum8x8.
template <int GN>
PQK_ATTN_TARGET inline void qk_rows_q4_t(const float* q, int64_t D, int64_t n, const uint8_t* rows, int64_t stride,
                                         const int64_t* idx, float scale, float* out, int64_t ld) {
  alignas(32) float part[GN][8][8] = {};
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int nr = (int)std::min<int64_t>(8, n - j0);
    for (int r = 0; r < nr; ++r) {
      const uint8_t* w = rows + (idx ? idx[j0 + r] : j0 + r) * stride;
      __m256 a0[GN], a1[GN];
      for (int g = 0; g < GN; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m256 we, wo;
        unpack16_split_f32(w + d0 / 2, we, wo);
        for (int g = 0; g < GN; ++g) {
          a0[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d0), we, a0[g]);
          a1[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d0 + 8), wo, a1[g]);
        }
      }
      for (int g = 0; g < GN; ++g) _mm256_store_ps(part[g][r], _mm256_add_ps(a0[g], a1[g]));
    }
    for (int g = 0; g < GN; ++g) {
      alignas(32) float tot[8];
      _mm256_store_ps(tot, _mm256_mul_ps(s, hsum8x8(part[g])));
      std::copy(tot, tot + nr, out + g * ld + j0);
    }
  }
}

PQK_ATTN_TARGET void qk_rows_q4(const float* q, int64_t G, int64_t D, int64_t n, const uint8_t* rows,
                                int64_t stride, const int64_t* idx, float scale, float* out, int64_t ld) {
  std::vector<float> qs((size_t)(G * D));  // q in split order: per 16 columns, the even ones then the odd ones
  for (int64_t i = 0; i < G * D; i += 16)
    for (int j = 0; j < 8; ++j) {
      qs[i + j] = q[i + 2 * j];
      qs[i + 8 + j] = q[i + 2 * j + 1];
    }
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const float* qg = qs.data() + g0 * D;
    float* o = out + g0 * ld;
    switch (G - g0 < 4 ? G - g0 : 4) {
      case 1: qk_rows_q4_t<1>(qg, D, n, rows, stride, idx, scale, o, ld); break;
      case 2: qk_rows_q4_t<2>(qg, D, n, rows, stride, idx, scale, o, ld); break;
      case 3: qk_rows_q4_t<3>(qg, D, n, rows, stride, idx, scale, o, ld); break;
      default: qk_rows_q4_t<4>(qg, D, n, rows, stride, idx, scale, o, ld); break;
    }
  }
}

// The V pass over n packed rows at once, 16 columns (8 bytes per row) at a time: the 2 x GN accumulators of the
// slab stay in registers over all n rows (GN <= 4 heads: 8 accumulators + 2 unpacked W + a broadcast coefficient
// within the 16 ymm), where a row-at-a-time axpy loads and stores the whole [G, D] accumulator for every row.
// They accumulate the even and the odd columns apart (unpack16_split_f32) and are interleaved back once, at the
// end: vunpck{l,h}ps pair even/odd within 128-bit halves, vperm2f128 puts the halves in column order.
template <int GN>
PQK_ATTN_TARGET inline void pv_slab_q4(const float* coef, int64_t ld, int64_t n, const uint8_t* rows,
                                       int64_t stride, const int64_t* idx, __m256 scale, int64_t D, int64_t d0,
                                       float* acc) {
  __m256 a0[GN], a1[GN];
  for (int g = 0; g < GN; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m256 we, wo;
    unpack16_split_f32(rows + (idx ? idx[j] : j) * stride + d0 / 2, we, wo);
    for (int g = 0; g < GN; ++g) {
      const __m256 c = _mm256_broadcast_ss(coef + g * ld + j);
      a0[g] = _mm256_fmadd_ps(c, we, a0[g]);
      a1[g] = _mm256_fmadd_ps(c, wo, a1[g]);
    }
  }
  for (int g = 0; g < GN; ++g) {
    const __m256 lo = _mm256_unpacklo_ps(a0[g], a1[g]), hi = _mm256_unpackhi_ps(a0[g], a1[g]);
    float* o = acc + g * D + d0;
    _mm256_storeu_ps(o, _mm256_fmadd_ps(scale, _mm256_permute2f128_ps(lo, hi, 0x20), _mm256_loadu_ps(o)));
    _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(scale, _mm256_permute2f128_ps(lo, hi, 0x31), _mm256_loadu_ps(o + 8)));
  }
}

PQK_ATTN_TARGET void pv_rows_q4(const float* coef, int64_t ld, int64_t G, int64_t n, const uint8_t* rows,
                                int64_t stride, const int64_t* idx, float scale, int64_t D, float* acc) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const float* c = coef + g0 * ld;
    float* a = acc + g0 * D;
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      switch (G - g0 < 4 ? G - g0 : 4) {
        case 1: pv_slab_q4<1>(c, ld, n, rows, stride, idx, s, D, d0, a); break;
        case 2: pv_slab_q4<2>(c, ld, n, rows, stride, idx, s, D, d0, a); break;
        case 3: pv_slab_q4<3>(c, ld, n, rows, stride, idx, s, D, d0, a); break;
        default: pv_slab_q4<4>(c, ld, n, rows, stride, idx, s, D, d0, a); break;
      }
    }
  }
}

void axpy_rows(const float* coef, int64_t G, int64_t D, const float* row, float* acc) {
  for (int64_t g = 0; g < G; ++g) {
    const __m256 c = _mm256_set1_ps(coef[g]);
    float* ag = acc + g * D;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      _mm256_storeu_ps(ag + d, _mm256_add_ps(_mm256_loadu_ps(ag + d), _mm256_mul_ps(c, _mm256_loadu_ps(row + d))));
    for (; d < D; ++d) ag[d] += coef[g] * row[d];
  }
}

// 2^i * e^f for an integer-valued i in [-126, 128] and a reduced f (|f| <= ln 2 / 2 or a little more): e^f by its
// degree-6 Taylor polynomial (relative error < 2e-7), 2^i straight into the exponent field (i = 128: all ones, +inf).
inline __m256 exp8_scaled(__m256 f, __m256 i) {
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(0.5f));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(1.0f));
  p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// exp(x) for x <= 0 (softmax after the max shift): 2^(x log2 e) = 2^i * e^f, i = round(x log2 e),
// f = (x log2 e - i) ln 2; x is clamped at -87 (e^-87 ~ 1.6e-38, still normal); a NaN x stays NaN (vmaxps returns
// its second operand when one is NaN). The same steps as x86_attention_zmm.h's attn_exp16_nonpos.
inline __m256 exp8_nonpos(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 i = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return exp8_scaled(_mm256_mul_ps(_mm256_sub_ps(t, i), _mm256_set1_ps(0.69314718055994531f)), i);
}

// exp(x) for x in [-87, 89] (the caller clamps), ~2e-7 relative at every x: f = x - i ln 2 in two steps with
// ln 2 = C1 + C2 (Cody and Waite; C1 = 355 / 512 has 9 bits, so i C1 is exact), where exp8_nonpos's f, from x log2 e
// rounded, is off by up to |x| 6e-8 (4e-6 relative at x = 70: a softmax rarely reaches there, SiLU's e^-g does).
// From x ~ 88.4, i = 128 gives +inf (e^88.72 is FLT_MAX).
inline __m256 exp8(__m256 x) {
  const __m256 i = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(i, _mm256_set1_ps(0.693359375f))),
                                 _mm256_mul_ps(i, _mm256_set1_ps(-2.12194440e-4f)));
  return exp8_scaled(f, i);
}

// SiLU(x) * u on 8 lanes: x / (1 + e^-x) * u in the scalar loop's order, e^-x with -x clamped to [-87, 89] (below,
// 1 + e^-x is 1 either way; above, +inf as expf's is). A NaN x stays NaN; x = -inf gives -inf / inf = NaN, as
// torch's silu does.
inline __m256 silu_mul8(__m256 x, __m256 u) {
  const __m256 nx = _mm256_xor_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 e = exp8(_mm256_min_ps(_mm256_set1_ps(89.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), nx)));
  return _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

// IsaKernels::silu_mul_row: 2.1-2.3 % of SmolLM2's decode step against expf per element (docs/PERF.md, change
// 25); the last n % 8 through the same vector code, padded.
void silu_mul_row(float* g, const float* up, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(g + i, silu_mul8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(up + i)));
  if (i < n) {
    alignas(32) float tg[8] = {}, tu[8] = {};
    std::copy(g + i, g + n, tg);
    std::copy(up + i, up + n, tu);
    _mm256_store_ps(tg, silu_mul8(_mm256_load_ps(tg), _mm256_load_ps(tu)));
    std::copy(tg, tg + (n - i), g + i);
  }
}

float exp_rows(float* x, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
    _mm256_storeu_ps(x + i, v);
    acc = _mm256_add_ps(acc, v);
  }
  float sum = hsum_ps(acc);
  if (i < n) {  // the tail through the same vector code (the padding lanes are discarded)
    alignas(32) float t[8];
    for (int j = 0; j < 8; ++j) t[j] = i + j < n ? x[i + j] - shift : -100.0f;
    _mm256_store_ps(t, exp8_nonpos(_mm256_load_ps(t)));
    for (int j = 0; i + j < n; ++j) {
      x[i + j] = t[j];
      sum += t[j];
    }
  }
  return sum;
}

// W8 decode (one A row, e.g. an int8 lm_head): each W row read start to end before the next, one sequential stream
// per thread, as the W4 decode tiles (x86_tile_w4.h tile_w4_rows, docs/PERF.md step 33); two accumulators (the
// two 16-byte halves of each 32 bytes). Against tile_w8_t's line-by-line loop (with the prefetch it then had), on the
// Zen 4: 1 x 4096 -> 32000 5.3-5.7 -> 4.3-4.5 ms, SmolLM2's 1 x 576 -> 49152 1.53 -> 0.94 ms.
template <int NR>
void tile_w8_rows(const int8_t* a, const int8_t* w, int64_t w_stride, int64_t K, int32_t* acc) {
  auto dot16 = [&](__m256i s, const int8_t* ak, const int8_t* wk) __attribute__((always_inline)) {
    return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)ak)),
                                                 _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)wk))));
  };
  for (int j = 0; j < NR; ++j) {
    const int8_t* wr = w + j * w_stride;
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      s0 = dot16(s0, a + k, wr + k);
      s1 = dot16(s1, a + k + 16, wr + k + 16);
    }
    for (; k < K; k += 16) {  // tail: zero-padded copies of W (A is zero padded in the panel)
      alignas(16) int8_t t[16] = {0};
      memcpy(t, wr + k, (size_t)std::min<int64_t>(16, K - k));
      s0 = dot16(s0, a + k, t);
    }
    acc[j] = hsum_epi32(_mm256_add_epi32(s0, s1));
  }
}

// W8: sign-extend both operands to int16 and use vpmaddwd (exact: |a*w| <= 2^14, pair <= 2^15).
template <int MR, int NR>
void tile_w8_t(const int8_t* a, int64_t kp, const int8_t* w, int64_t w_stride, int64_t K, int32_t* acc) {
  if constexpr (MR == 1) return tile_w8_rows<NR>(a, w, w_stride, K, acc);
  __m256i acc32[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc32[i][j] = _mm256_setzero_si256();
  auto step = [&](const int8_t* const* wrow, int64_t k) __attribute__((always_inline)) {
    __m256i w16[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) w16[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)wrow[j]));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      __m256i a16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(a + i * kp + k)));
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc32[i][j] = _mm256_add_epi32(acc32[i][j], _mm256_madd_epi16(a16, w16[j]));
    }
  };
  const int8_t* wrow[NR];
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (int j = 0; j < NR; ++j) wrow[j] = w + j * w_stride + k;
    step(wrow, k);
  }
  if (k < K) {  // tail: zero-padded copies of W (A is zero padded in the panel)
    alignas(16) int8_t wtail[NR][16];
    memset(wtail, 0, sizeof(wtail));
    for (int j = 0; j < NR; ++j) {
      memcpy(wtail[j], w + j * w_stride + k, (size_t)(K - k));
      wrow[j] = wtail[j];
    }
    step(wrow, k);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i * NR + j] = hsum_epi32(acc32[i][j]);
}

// ---- the float glue of a prefill (float_ops.cpp: IsaKernels::rms_norm_row) ------------------------------------
// 8 fp32 lanes rounded to type t and back (bf16: nearest-even, a NaN kept as f32_to_bf16 keeps it: quiet; fp16:
// vcvtps2ph's nearest-even); fp32: as they are. store8 then writes them exactly. The row below is instantiated per
// type (with a runtime type its branches and constants are redone for every 8 elements).
inline __m256 round8_to(__m256 v, FloatType t) {
  if (t == FloatType::kFloat16)
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (t != FloatType::kBFloat16) return v;
  const __m256i u = _mm256_castps_si256(v), hi = _mm256_set1_epi32((int)0xffff0000u);
  const __m256i r = _mm256_and_si256(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                           _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)))),
      hi);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i q = _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), hi);
  return _mm256_castsi256_ps(_mm256_blendv_epi8(r, q, nan));
}

// One row of HF's RMSNorm (rms_norm_rows' contract, float_ops.cpp): x widened into tmp [n] while the squares are
// summed in double (a float's square is exact there), then out = to_t(w * to_t(x * inv)).
template <FloatType t>
void rms_norm_row_t(const void* x, const void* w, int64_t n, float eps, void* out, float* tmp) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = load8_f32(x, i, t);
    _mm256_storeu_ps(tmp + i, v);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    s0 = _mm256_add_pd(s0, _mm256_mul_pd(lo, lo));
    s1 = _mm256_add_pd(s1, _mm256_mul_pd(hi, hi));
  }
  alignas(32) double l[4];
  _mm256_store_pd(l, _mm256_add_pd(s0, s1));
  double ss = (l[0] + l[1]) + (l[2] + l[3]);
  for (; i < n; ++i) {
    tmp[i] = load_as_f32(x, i, t);
    ss += (double)tmp[i] * tmp[i];
  }
  const float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
  const __m256 r = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 h = round8_to(_mm256_mul_ps(_mm256_loadu_ps(tmp + i), r), t);
    store8(out, i, round8_to(_mm256_mul_ps(load8_f32(w, i, t), h), t), t);
  }
  for (; i < n; ++i)  // the same two roundings in scalar code (store_from_f32 makes the second)
    store_from_f32(out, i, load_as_f32(w, i, t) * round_to_type(tmp[i] * inv, t), t);
}

// One head row of HF's RoPE (rope_rows' contract, float_ops.cpp): both halves 8 lanes at a time, each product and
// the sum rounded to t as torch rounds them (no FMA in this region: the product is rounded before the add).
template <FloatType t>
void rope_row_t(const void* x, const void* c, const void* s, int64_t D, void* out) {
  const int64_t h = D / 2;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t d = 0;
  for (; d + 8 <= h; d += 8) {
    const __m256 x1 = load8_f32(x, d, t), x2 = load8_f32(x, d + h, t);
    const __m256 lo = _mm256_add_ps(round8_to(_mm256_mul_ps(x1, load8_f32(c, d, t)), t),
                                    round8_to(_mm256_mul_ps(_mm256_xor_ps(x2, sign), load8_f32(s, d, t)), t));
    const __m256 hi = _mm256_add_ps(round8_to(_mm256_mul_ps(x2, load8_f32(c, d + h, t)), t),
                                    round8_to(_mm256_mul_ps(x1, load8_f32(s, d + h, t)), t));
    store8(out, d, lo, t);  // store8 rounds the sum
    store8(out, d + h, hi, t);
  }
  for (; d < h; ++d) {  // the same roundings in scalar code (store_from_f32 makes the last)
    const float x1 = load_as_f32(x, d, t), x2 = load_as_f32(x, d + h, t);
    store_from_f32(out, d, round_to_type(x1 * load_as_f32(c, d, t), t) + round_to_type(-x2 * load_as_f32(s, d, t), t),
                   t);
    store_from_f32(
        out, d + h, round_to_type(x2 * load_as_f32(c, d + h, t), t) + round_to_type(x1 * load_as_f32(s, d + h, t), t),
        t);
  }
}

void rope_row(const void* x, const void* c, const void* s, FloatType t, int64_t D, void* out) {
  switch (t) {
    case FloatType::kBFloat16: return rope_row_t<FloatType::kBFloat16>(x, c, s, D, out);
    case FloatType::kFloat16: return rope_row_t<FloatType::kFloat16>(x, c, s, D, out);
    default: return rope_row_t<FloatType::kFloat32>(x, c, s, D, out);
  }
}

void rms_norm_row(const void* x, const void* w, FloatType t, int64_t n, float eps, void* out, float* tmp) {
  switch (t) {
    case FloatType::kBFloat16: return rms_norm_row_t<FloatType::kBFloat16>(x, w, n, eps, out, tmp);
    case FloatType::kFloat16: return rms_norm_row_t<FloatType::kFloat16>(x, w, n, eps, out, tmp);
    default: return rms_norm_row_t<FloatType::kFloat32>(x, w, n, eps, out, tmp);
  }
}

// ---- the prefill attention's blocks on ymm (attention.cpp: IsaKernels::qk_block / pv_block / softmax_block) -------
// with FMA on top of AVX2 for these only (nothing else in this file may be contracted)
#pragma GCC push_options
#pragma GCC target("avx2,f16c,fma")
#include "x86_attention_ymm.h"
#pragma GCC pop_options

constexpr int kMR = 4, kNR = 2, kNRDecode = 4;

// FLUSH: A4 bounds a chunk's partial sum by 480, A8 by 7680 (MaddubsAcc in x86_tile_w4.h)
void tile_w4(const int8_t* a, int64_t kp, const int32_t* rs, int a_bits, const uint8_t* w, int64_t ws,
             int64_t K, int mr, int nr, int32_t* acc) {
  if (a_bits == 4) tile_w4_dispatch<MaddubsAcc<64>>(a, kp, rs, a_bits, w, ws, K, mr, nr, acc);
  else tile_w4_dispatch<MaddubsAcc<4>>(a, kp, rs, a_bits, w, ws, K, mr, nr, acc);
}

void tile_w8(const int8_t* a, int64_t kp, const int8_t* w, int64_t ws, int64_t K, int mr, int nr, int32_t* acc) {
#define PQK_W8(MR_, NR_) \
  if (mr == MR_ && nr == NR_) return tile_w8_t<MR_, NR_>(a, kp, w, ws, K, acc);
  PQK_W8(4, 2) PQK_W8(3, 2) PQK_W8(2, 2) PQK_W8(1, 2) PQK_W8(4, 1) PQK_W8(3, 1) PQK_W8(2, 1) PQK_W8(1, 1)
  // the AVX-512 tables' nr_max is 4 (their W4 tile): without these, W8 on them fell to the scalar tile (4.2 ms for
  // a 1 x 576 -> 49152 GEMV, as slow as bf16); MR <= 2 keeps NR = 4 within the 16 ymm registers
  PQK_W8(2, 4) PQK_W8(1, 4) PQK_W8(2, 3) PQK_W8(1, 3)
#undef PQK_W8
  scalar_kernels().tile_w8(a, kp, w, ws, K, mr, nr, acc);  // a shape not instantiated
}

// ---- the prefill GEMM pieces (M >= 64, W4): x86_gemm_ymm.h ---------------------------------------------------
#include "x86_gemm_ymm.h"

const PrefillKernels kPrefill = {kPf2Mr,     kPf2Nr,     kPf2Kc,       kPf2Rows, kPf2PanelBytes, /*w8=*/false,
                                 pf2_pack_w, pf2_kernel, pf2_epilogue, nullptr,  nullptr,        nullptr,
                                 /*pack_a_int4=*/nullptr, /*side=*/nullptr};

const IsaKernels kAvx2 = [] {
  IsaKernels k = {
      "avx2", kMR, kNR, kNRDecode, quantize_row, row_amax, split_row, pack_row, row_sum, dequant_row4,
      dot_rows, qk_rows_q4, axpy_rows, pv_rows_q4, exp_rows, tile_w4, tile_w8, &kPrefill,
  };
  k.rms_norm_row = rms_norm_row;
  k.rope_row = rope_row;
  k.silu_mul_row = silu_mul_row;
  if (__builtin_cpu_supports("fma")) {  // x86_attention_ymm.h (the AVX-512 tables put their zmm blocks over these)
    k.qk_block = attn_qk_block8;
    k.pv_block = attn_pv_block8;
    k.softmax_block = attn_softmax_block8;
  }
  return k;
}();

}  // namespace

const IsaKernels* avx2_kernels() { return &kAvx2; }

}  // namespace cpu
}  // namespace pqk

#pragma GCC pop_options

#else  // not x86-64

#include "kernels_internal.h"
namespace pqk {
namespace cpu {
const IsaKernels* avx2_kernels() { return nullptr; }
}  // namespace cpu
}  // namespace pqk

#endif
