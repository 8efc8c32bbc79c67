// The prefill GEMM pieces on zmm (AVX512-VNNI + F/BW/VL): a broadcast-A micro-kernel over W unpacked once per
// panel into the VNNI layout, as oneDNN's int8 kernels do (docs/PERF.md step 13). Used by gemm.cpp's prefill
// driver (gemm_prefill) through IsaKernels::prefill; the decode / small-M path keeps the tile_w4 tiles.
//
// Layouts (kPfNr = 48 output columns per micro panel = 3 zmm of 16 int32 lanes):
//   A panel  uint8 [rows, kp]: natural k order, each byte a ^ 0x80 = a + 128 (u8, vpdpbusd's unsigned operand)
//   W panel  int8  [kq][48][4] per micro panel: dword (q, n) = w[n, 4q .. 4q+3] (signed, sign-extended nibbles
//            for W4); columns past N and k past the block's end are 0
//   vpdpbusd(c, bcast(A[i, 4q..4q+3]), W[q]) adds sum_k (a + 128) * w into c[i, n], so
//   acc = c - 128 * colsum(w[n, :]): the u8 x s8 sign handling is one per-column correction computed while W is
//   unpacked (a vpdpbusd of W against ones), applied in the epilogue. All int32 arithmetic is modular and the true
//   sum fits int32, so the result is exact, for W4 and W8 and any a_bits alike.
//
// Included inside vnni_kernels.cpp's avx512vnni namespace (native build only), after its `#pragma GCC target`.

constexpr int kPfMr = 8;    // A rows per micro-kernel (8 x 3 = 24 accumulators + 3 W + 1 broadcast of 32 zmm)
constexpr int kPfNr = 48;   // W columns per micro panel
// k per W block, at most: the unpacked micro panel (48 x 16384 = 768 KB) streams from L2 to every A tile, which the
// hardware prefetcher keeps up with; 512 (24 KB, in L1) was slower: the int32 partial sums of every tile then went
// through memory once per 512 k (docs/PERF.md step 19).
constexpr int64_t kPfKc = 16384;
constexpr int64_t kPfSideEvery = 16;  // k-steps per block of a side job (PfSide): <= 64 blocks per kernel at K = 4096
constexpr int64_t kPfRows = 2048;             // rows per M-block: c (2048 x 48 int32) is touched once per K block
constexpr int64_t kPfPanelBytes = 16 << 20;  // A panel per M-block (L3): K = 14336 takes 1024-row M-blocks

// The epilogue on 16 columns j0 .. j0+15 (cnt of them valid): out = float(c - 128 colsum) * (a_scale * w_scale)
// (+ bias) -> type t, the scalar dequant_value + bias of quant_math.h lane by lane (separate multiply and add, never
// fused). PfCols holds what the columns share; pf_store16 does one row. This table has no separate epilogue: the
// last K block always ends in pf_kernel_out, straight from the accumulators.
struct PfCols {
  __m512i corr;  // 128 colsum
  __m512 ws, b;  // w_scale, bias (0 without)
  __mmask16 m;   // the valid columns
  int cnt;
};
inline PfCols pf_cols(const int32_t* colsum, const float* w_scale, const float* bias, int j0, int nn) {
  PfCols k;
  k.cnt = std::min(16, nn - j0);
  k.m = (__mmask16)((1u << k.cnt) - 1u);
  k.corr = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(k.m, colsum + j0), 7);
  k.ws = _mm512_maskz_loadu_ps(k.m, w_scale + j0);
  k.b = bias ? _mm512_maskz_loadu_ps(k.m, bias + j0) : _mm512_setzero_ps();
  return k;
}
inline void pf_store16(__m512i c, const PfCols& k, float a_scale, bool bias, void* out, int64_t o, FloatType t) {
  const __m512i acc = _mm512_sub_epi32(c, k.corr);
  const __m512 s = _mm512_mul_ps(_mm512_set1_ps(a_scale), k.ws);
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), s);
  if (bias) y = _mm512_add_ps(y, k.b);
  if (t == FloatType::kFloat32) {
    _mm512_mask_storeu_ps((float*)out + o, k.m, y);
  } else if (t == FloatType::kBFloat16) {
    // f32_to_bf16 (float16.h) on 16 lanes: round to nearest-even, NaN -> quiet NaN
    const __m512i u = _mm512_castps_si512(y);
    const __m512i rnd = _mm512_add_epi32(
        u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    const __m512i r = _mm512_mask_or_epi32(_mm512_srli_epi32(rnd, 16), nan, _mm512_srli_epi32(u, 16),
                                           _mm512_set1_epi32(0x40));
    _mm256_mask_storeu_epi16((uint16_t*)out + o, k.m, _mm512_cvtepi32_epi16(r));
  } else {
    alignas(64) float tmp[16];
    _mm512_store_ps(tmp, y);
    for (int j = 0; j < k.cnt; ++j) store_from_f32(out, o + j, tmp[j], t);
  }
}

// The quantize on zmm lanes: quantize_value (quant_math.h) bit for bit, in three vector steps.
//   v = x / s                  the division stays a division: x * (1 / s) with the lanes near a half-integer redone
//                              was slower (bf16 x over a round scale puts many x / s on or next to a half-integer), and
//                              x * (1 / s) with Markstein's two-FMA correction (exact) no faster once its overflow and
//                              NaN guards were in (docs/PERF.md steps 19-20)
//   v = min(hi, max(lo, v))    clamping before rounding is exact (qmin, qmax are integers); vmaxps / vminps return
//                              their second operand when one is NaN, so a NaN lane stays NaN here ...
//   q = cvt(v), rounded to nearest-even by the instruction itself (not MXCSR's mode); a NaN lane converts to the
//                              "integer indefinite" 0x80000000, whose low byte is 0 -- and the bytes are taken by
//                              truncation (vpmovdb / vpmovdw), so NaN -> 0 with no compare or mask of its own.
struct PfQuant {
  __m512 s, lo, hi;
};
inline PfQuant pf_quant_consts(float scale, int qmin, int qmax) {
  return {_mm512_set1_ps(scale), _mm512_set1_ps((float)qmin), _mm512_set1_ps((float)qmax)};
}
inline __m512i pf_quant_lanes(__m512 x, const PfQuant& c) {
  const __m512 v = _mm512_min_ps(c.hi, _mm512_max_ps(c.lo, _mm512_div_ps(x, c.s)));
  return _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// 16 lanes of x -> 16 bytes q + 128 at dst.
inline void pf_quant16(__m512 x, const PfQuant& c, uint8_t* dst) {
  _mm_storeu_si128((__m128i*)dst, _mm_xor_si128(_mm512_cvtepi32_epi8(pf_quant_lanes(x, c)), _mm_set1_epi8((char)0x80)));
}

// 32 bf16 at x -> 32 bytes q + 128 at dst. One 64-byte load holds 16 dwords of two bf16 each: the even element is
// the dword shifted left by 16, the odd one the dword with its low half cleared (bf16 -> fp32 is exact). The two
// int32 results meet again as one word per dword (even byte low, odd byte high) and one vpmovdw stores them in order.
inline void pf_quant32_bf16(const uint16_t* x, const PfQuant& c, uint8_t* dst) {
  const __m512i u = _mm512_loadu_si512((const void*)x);
  const __m512i qe = pf_quant_lanes(_mm512_castsi512_ps(_mm512_slli_epi32(u, 16)), c);
  const __m512i qo = pf_quant_lanes(_mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u))), c);
  // (qe & 0xFF) | (qo << 8): vpternlogd truth table 0xEC = (a & c) | b
  const __m512i w = _mm512_ternarylogic_epi32(qe, _mm512_slli_epi32(qo, 8), _mm512_set1_epi32(0xFF), 0xEC);
  _mm256_storeu_si256((__m256i*)dst, _mm256_xor_si256(_mm512_cvtepi32_epi16(w), _mm256_set1_epi8((char)0x80)));
}

// 32 elements of packed int4 (16 bytes, element 2i in byte i's low nibble) -> their 32 bytes a + 128, in order.
// The nibbles are split (and, shift) and interleaved back into element order (vpunpck), then one 16-entry table
// lookup (vpshufb) maps each nibble n, a two's-complement int4, to a + 128 = (n ^ 8) + 120: n = 7 -> 135, 8 -> 120.
// No multiply: all on the pipes vpdpbusd leaves idle (docs/PERF.md step 24's table).
inline __m256i pf_int4x32_to_u8(__m128i b) {
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  const __m256i nib = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(lo, hi)),
                                              _mm_unpackhi_epi8(lo, hi), 1);
  const __m256i lut = _mm256_setr_epi8((char)128, (char)129, (char)130, (char)131, (char)132, (char)133, (char)134,
                                       (char)135, 120, 121, 122, 123, 124, 125, 126, 127, (char)128, (char)129,
                                       (char)130, (char)131, (char)132, (char)133, (char)134, (char)135, 120, 121, 122,
                                       123, 124, 125, 126, 127);
  return _mm256_shuffle_epi8(lut, nib);
}

// One block of the side job, which then points at the next (32 | kc: a block never crosses a row or a 64-k piece).
// The source's kind is the same for every block of a job (one predictable branch per 16 k-steps of the kernel).
inline void pf_side_block(PfSide& side, const PfQuant& qc) {
  uint8_t* d = side.panel + pf_a_offset(side.row, side.k, side.kc, side.tiled);
  const char* src = (const char*)side.src;
  if (side.kind == ASource::kFloat) {
    pf_quant32_bf16((const uint16_t*)src, qc, d);
    side.src = src + 64;
  } else if (side.kind == ASource::kInt8) {
    const __m256i q = _mm256_loadu_si256((const __m256i*)src);
    _mm256_storeu_si256((__m256i*)d, _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80)));
    side.src = src + 32;
  } else {
    _mm256_storeu_si256((__m256i*)d, pf_int4x32_to_u8(_mm_loadu_si128((const __m128i*)src)));
    side.src = src + 16;
  }
  side.k += 32;
  if (side.k == side.kc) {
    side.k = 0;
    ++side.row;
  }
  --side.n32;
}

// PrefillKernels::side: what is left of the side job, now.
void pf_side(PfSide& side) {
  const PfQuant qc = pf_quant_consts(side.scale, side.qmin, side.qmax);
  while (side.n32 > 0) pf_side_block(side, qc);
}

// c[0:MR, 0:16 NJ] (row stride ldc) (+)= A[0:MR, 0:4 kq] . Wp (the first NJ zmm columns of one micro panel, kq
// dwords deep). NJ < 3 serves the last micro panel of an N that is not a multiple of 48 (N = 1024: 21 panels and
// 16 columns), which would otherwise spend a full panel's vpdpbusd on zero columns.
// A: row-major (row i at a + i lda), or TILED (pf_a_offset: row i at a + 64 i, each 64-k piece 1 KB on). Both are
// walked a piece of 16 k-steps at a time: A[i, 4q] at a + i rs + (q / 16) ps + 4 (q % 16).
// ep != nullptr: instead of storing c, write ep's outputs (PrefillKernels::kernel_out).
// ep->side (PfSide, kernels_internal.h): one block of 32 of the side job after every kPfSideEvery k-steps (one
// piece), until it runs out; the 24 accumulators stay in registers: the side job's constants are made afresh per
// block (pf_quant_consts; hoisted out of the loop they took the registers, and one accumulator went to the stack
// and back every k-step: checked in the disassembly).
template <int MR, int NJ, bool TILED>
void pf_kernel_t(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq, int32_t* c, int64_t ldc,
                 bool accumulate, const PfOut* ep) {
  static_assert(kPfSideEvery == 16, "a side block per 64-k piece");
  __m512i s[MR][NJ];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NJ; ++j)
      s[i][j] = accumulate ? _mm512_loadu_si512((const void*)(c + i * ldc + 16 * j)) : _mm512_setzero_si512();
  const int64_t rs = TILED ? 64 : lda, ps = TILED ? 1024 : 64;
  auto step = [&](const uint8_t* ap, int64_t q, int64_t e) __attribute__((always_inline)) {  // e = q % 16
    __m512i w[NJ];
#pragma GCC unroll 3
    for (int j = 0; j < NJ; ++j) w[j] = _mm512_load_si512((const void*)(wp + q * 192 + 64 * j));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t v;
      memcpy(&v, ap + i * rs + 4 * e, 4);
      const __m512i ab = _mm512_set1_epi32(v);
#pragma GCC unroll 3
      for (int j = 0; j < NJ; ++j) s[i][j] = _mm512_dpbusd_epi32(s[i][j], ab, w[j]);
    }
  };
  auto piece = [&](int64_t q0, int64_t n) __attribute__((always_inline)) {  // k-steps q0 .. q0 + n - 1, q0 % 16 == 0
    const uint8_t* ap = a + (q0 >> 4) * ps;
#pragma GCC unroll 2
    for (int64_t e = 0; e < n; ++e) step(ap, q0 + e, e);
  };
  int64_t q = 0;
  if (PfSide* side = ep ? ep->side : nullptr) {
    for (; side->n32 > 0 && q + 16 <= kq; q += 16) {
      piece(q, 16);
      pf_side_block(*side, pf_quant_consts(side->scale, side->qmin, side->qmax));
    }
  }
  for (; q + 16 <= kq; q += 16) piece(q, 16);
  if (q < kq) piece(q, kq - q);
  if (ep) {  // the last K block: the epilogue straight from the accumulators, c is not written
#pragma GCC unroll 3
    for (int j = 0; j < NJ; ++j) {
      const PfCols k = pf_cols(ep->colsum, ep->w_scale, ep->bias, 16 * j, ep->nn);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i)
        pf_store16(s[i][j], k, ep->a_scale[i], ep->bias != nullptr, ep->out, i * ep->ldo + 16 * j, ep->t);
    }
    return;
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NJ; ++j) _mm512_storeu_si512((void*)(c + i * ldc + 16 * j), s[i][j]);
}

template <int MR, bool TILED>
void pf_kernel_mr(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq, int nn, int32_t* c, int64_t ldc,
                  bool accumulate, const PfOut* ep) {
  if (nn > 32) return pf_kernel_t<MR, 3, TILED>(a, lda, wp, kq, c, ldc, accumulate, ep);
  if (nn > 16) return pf_kernel_t<MR, 2, TILED>(a, lda, wp, kq, c, ldc, accumulate, ep);
  return pf_kernel_t<MR, 1, TILED>(a, lda, wp, kq, c, ldc, accumulate, ep);
}

template <bool TILED>
void pf_kernel_ep(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq, int mr, int nn, int32_t* c,
                  int64_t ldc, bool accumulate, const PfOut* ep) {
  switch (mr) {
    case 8: return pf_kernel_mr<8, TILED>(a, lda, wp, kq, nn, c, ldc, accumulate, ep);
    case 7: return pf_kernel_mr<7, TILED>(a, lda, wp, kq, nn, c, ldc, accumulate, ep);
    case 6: return pf_kernel_mr<6, TILED>(a, lda, wp, kq, nn, c, ldc, accumulate, ep);
    case 5: return pf_kernel_mr<5, TILED>(a, lda, wp, kq, nn, c, ldc, accumulate, ep);
    case 4: return pf_kernel_mr<4, TILED>(a, lda, wp, kq, nn, c, ldc, accumulate, ep);
    case 3: return pf_kernel_mr<3, TILED>(a, lda, wp, kq, nn, c, ldc, accumulate, ep);
    case 2: return pf_kernel_mr<2, TILED>(a, lda, wp, kq, nn, c, ldc, accumulate, ep);
    default: return pf_kernel_mr<1, TILED>(a, lda, wp, kq, nn, c, ldc, accumulate, ep);
  }
}

void pf_kernel(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq, int mr, int nn, int32_t* c, int64_t ldc,
               bool accumulate) {
  pf_kernel_ep<false>(a, lda, wp, kq, mr, nn, c, ldc, accumulate, nullptr);  // the N split: row-major A
}

void pf_kernel_out(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq, int mr, int nn, const int32_t* c,
                   int64_t ldc, bool accumulate, const PfOut& ep) {
  if (ep.a_tiled) return pf_kernel_ep<true>(a, lda, wp, kq, mr, nn, const_cast<int32_t*>(c), ldc, accumulate, &ep);
  pf_kernel_ep<false>(a, lda, wp, kq, mr, nn, const_cast<int32_t*>(c), ldc, accumulate, &ep);  // c is only read
}

// ---- the A panel: one row of A straight into its K blocks as u8 (a + 128) ------------------------------------
// dst: block b holds k in [b kc, (b + 1) kc) at dst + b * bstride, k at pf_a_offset(0, k, kc, tiled) in it; bytes
// past K up to a whole block are 0x80 (a = 0). The row's pieces of 16 / 32 / 64 k never cross a 64-k piece (kc is
// a multiple of 64 where tiled).

// 16 elements of x (type t) from x[k] as fp32 (exact widening); lanes past `cnt` read nothing and are 0
inline __m512 pf_load16(const void* x, int64_t k, FloatType t, __mmask16 m) {
  if (t == FloatType::kBFloat16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t*)x + k)), 16));
  if (t == FloatType::kFloat16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t*)x + k));
  return _mm512_maskz_loadu_ps(m, (const float*)x + k);
}

// The bytes [n, kc) of a row's K block at d: 0x80, one 64-k piece at a time where tiled.
inline void pf_pad_a(uint8_t* d, int64_t n, int64_t kc, bool tiled) {
  if (!tiled) {
    if (n < kc) memset(d + n, 0x80, (size_t)(kc - n));
    return;
  }
  for (int64_t k = n; k < kc; k = (k | 63) + 1)
    memset(d + pf_a_offset(0, k, kc, true), 0x80, (size_t)(std::min(kc, (k | 63) + 1) - k));
}

// x: float [K] of type t, quantized with `scale` to [qmin, qmax] (quantize_value) -> dst, the panel row.
void pf_pack_a_float(const void* x, FloatType t, int64_t K, float scale, int qmin, int qmax, int64_t kc,
                     int64_t bstride, bool tiled, uint8_t* dst) {
  const PfQuant qc = pf_quant_consts(scale, qmin, qmax);
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += kc, ++b) {
    uint8_t* d = dst + b * bstride;
    const int64_t n = std::min(kc, K - k0);
    int64_t k = 0;
    if (t == FloatType::kBFloat16)
      for (; k + 32 <= n; k += 32) pf_quant32_bf16((const uint16_t*)x + k0 + k, qc, d + pf_a_offset(0, k, kc, tiled));
    for (; k + 16 <= n; k += 16) pf_quant16(pf_load16(x, k0 + k, t, 0xFFFF), qc, d + pf_a_offset(0, k, kc, tiled));
    if (k < n) {  // the row's last < 16 elements: quantized into a scratch, then copied
      alignas(16) uint8_t tail[16];
      pf_quant16(pf_load16(x, k0 + k, t, (__mmask16)((1u << (n - k)) - 1u)), qc, tail);
      memcpy(d + pf_a_offset(0, k, kc, tiled), tail, (size_t)(n - k));
      k = n;
    }
    pf_pad_a(d, n, kc, tiled);
  }
}

// q: int8 [K] (already quantized) -> dst, the panel row (each byte q ^ 0x80).
void pf_pack_a_int8(const int8_t* q, int64_t K, int64_t kc, int64_t bstride, bool tiled, uint8_t* dst) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += kc, ++b) {
    uint8_t* d = dst + b * bstride;
    const int64_t n = std::min(kc, K - k0);
    for (int64_t k = 0; k < n; k += 64) {  // k0 and k are multiples of 64 where tiled: one piece per store
      const __mmask64 m = n - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (n - k)) - 1);
      _mm512_mask_storeu_epi8(d + pf_a_offset(0, k, kc, tiled), m,
                              _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, q + k0 + k), flip));
    }
    pf_pad_a(d, n, kc, tiled);
  }
}

// p: uint8 [K / 2] packed int4 (already quantized; K even) -> dst, the panel row (pf_int4x32_to_u8, 32 elements
// at a time; a block's last < 32 with masked loads and stores). One pass: the portable path unpacked to int8 first.
void pf_pack_a_int4(const uint8_t* p, int64_t K, int64_t kc, int64_t bstride, bool tiled, uint8_t* dst) {
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += kc, ++b) {
    uint8_t* d = dst + b * bstride;
    const int64_t n = std::min(kc, K - k0);  // even: K and kc are
    for (int64_t k = 0; k < n; k += 32) {    // k0 + k even, so the block's bytes start at (k0 + k) / 2
      const int64_t cnt = std::min<int64_t>(32, n - k);
      const __mmask32 m = cnt == 32 ? ~(__mmask32)0 : (((__mmask32)1 << cnt) - 1);
      const __m128i src = _mm_maskz_loadu_epi8((__mmask16)(((uint32_t)1 << ((cnt + 1) / 2)) - 1), p + (k0 + k) / 2);
      _mm256_mask_storeu_epi8(d + pf_a_offset(0, k, kc, tiled), m, pf_int4x32_to_u8(src));
    }
    pf_pad_a(d, n, kc, tiled);
  }
}

// r[0:16] = 16 rows of 16 dwords -> r[e] = dword e of rows 0..15 (a 16 x 16 dword transpose in 64 shuffles: pairs
// of rows interleaved by dword, then by qword, then 128-bit lanes gathered across the four row quads).
inline void pf_transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);      // per lane: a0 b0 a1 b1
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);  // a2 b2 a3 b3
  }
  for (int j = 0; j < 4; ++j) {  // u[4j + m], lane L = dword 4L + m of rows 4j .. 4j+3
    u[4 * j + 0] = _mm512_unpacklo_epi64(t[4 * j], t[4 * j + 2]);
    u[4 * j + 1] = _mm512_unpackhi_epi64(t[4 * j], t[4 * j + 2]);
    u[4 * j + 2] = _mm512_unpacklo_epi64(t[4 * j + 1], t[4 * j + 3]);
    u[4 * j + 3] = _mm512_unpackhi_epi64(t[4 * j + 1], t[4 * j + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // dword 4L + m = lane L of u[m], u[4+m], u[8+m], u[12+m]
    const __m512i v0 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x44), v1 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xEE);
    r[m] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + m] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + m] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + m] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// One micro panel: W rows n0 .. n0 + nn - 1 (nn <= NR; the rest are zero columns), k in [k0, k0 + kc) -> dst
// int8 [ceil(kc / 4)][NR][4] (64-byte aligned), colsum[0:NR] += sum over those k of w. k0 % 8 == 0. NR = 48 for the
// vpdpbusd micro-kernel (pf_pack_w), 32 for the AMX one (amx_kernels.cpp), which stores it TILED (panel_offset,
// kernels_internal.h: one contiguous 1 KB B tile per 16 columns and 64 k).
// A group's 16 columns are read 64 bytes of each row at a time and transposed in registers (pf_transpose16): a
// gather of one dword from each of 16 rows K bytes apart touches the same 16 lines 16 times over, and with K = 4096
// all 16 lines sit in one L1 set (8 ways). A row's last < 16 dwords still use the gather.
template <int NR, bool TILED = false>
void pf_pack_w_t(const void* w, int w_bits, int64_t w_stride, int64_t n0, int nn, int64_t k0, int64_t kc, int8_t* dst,
                 int32_t* colsum) {
  static_assert(NR % 16 == 0, "a micro panel is whole groups of 16 columns");
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i ones = _mm512_set1_epi8(1), m0f = _mm512_set1_epi8(0x0F), x8 = _mm512_set1_epi8(8);
  // W4: dword (col c) of U_lo lane l = [c=4l+r, r<2: o1 o2 ...]: see the comment at the permutes
  const __m512i idx1 = _mm512_setr_epi32(0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, 12, 14, 28, 30);
  const __m512i idx2 = _mm512_add_epi32(idx1, _mm512_set1_epi32(1));
  const int64_t n_dw = w_bits == 4 ? kc / 8 : kc / 4;  // whole dwords of W per row in the block (8 or 4 k each)
  const int64_t n_blk = n_dw / 16 * 16;                 // of which in whole blocks of 16 (transposed)
  for (int g = 0; g < NR / 16; ++g) {
    const int valid = std::max(0, std::min(16, nn - 16 * g));
    const __mmask16 vm = (__mmask16)((1u << valid) - 1u);
    const __m512i vindex = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)w_stride));
    const uint8_t* base = (const uint8_t*)w + (n0 + 16 * g) * w_stride + (w_bits == 4 ? k0 / 2 : k0);
    __m512i cs = _mm512_setzero_si512();
    int8_t* out = dst + panel_offset(0, 16 * g, NR, TILED);  // + at(q): dword group q of this group's 16 columns
    auto at = [](int64_t q) { return panel_offset(q, 0, NR, TILED); };
    __m512i blk[16];
    for (int64_t e = 0; e < n_dw; ++e) {
      __m512i d;  // dword e of the group's 16 rows (0 for rows past nn)
      if (e < n_blk) {
        if (e % 16 == 0) {  // the next 16 dwords of every row, transposed
          for (int c = 0; c < 16; ++c)
            blk[c] = c < valid ? _mm512_loadu_si512((const void*)(base + c * w_stride + 4 * e)) : _mm512_setzero_si512();
          pf_transpose16(blk);
        }
        d = blk[e % 16];
      } else {
        d = valid ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), vm, vindex, base + 4 * e, 1)
                  : _mm512_setzero_si512();
      }
      if (w_bits == 4) {
        // nibbles -> signed bytes: lo = w(k), w(k+2), w(k+4), w(k+6); hi = the odd k
        const __m512i lo = _mm512_sub_epi8(_mm512_xor_si512(_mm512_and_si512(d, m0f), x8), x8);
        const __m512i hi = _mm512_sub_epi8(_mm512_xor_si512(_mm512_and_si512(_mm512_srli_epi16(d, 4), m0f), x8), x8);
        // per 128-bit lane l: ul dwords = [c4l: k0-3][c4l: k4-7][c4l+1: k0-3][c4l+1: k4-7], uh the same for 4l+2, 4l+3
        const __m512i ul = _mm512_unpacklo_epi8(lo, hi), uh = _mm512_unpackhi_epi8(lo, hi);
        const __m512i o1 = _mm512_permutex2var_epi32(ul, idx1, uh), o2 = _mm512_permutex2var_epi32(ul, idx2, uh);
        _mm512_store_si512((void*)(out + at(2 * e)), o1);
        _mm512_store_si512((void*)(out + at(2 * e + 1)), o2);
        cs = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(cs, ones, o1), ones, o2);
      } else {
        _mm512_store_si512((void*)(out + at(e)), d);
        cs = _mm512_dpbusd_epi32(cs, ones, d);
      }
    }
    _mm512_storeu_si512((void*)(colsum + 16 * g),
                        _mm512_add_epi32(_mm512_loadu_si512((const void*)(colsum + 16 * g)), cs));
  }
  // kc not a multiple of 8 / 4: the dword groups past the vector loop's
  pack_w_tail(w, w_bits, w_stride, n0, nn, k0, kc, w_bits == 4 ? 2 * n_dw : n_dw, NR, dst, colsum, TILED);
}
void pf_pack_w(const void* w, int w_bits, int64_t w_stride, int64_t n0, int nn, int64_t k0, int64_t kc, int8_t* dst,
               int32_t* colsum) {
  pf_pack_w_t<kPfNr>(w, w_bits, w_stride, n0, nn, k0, kc, dst, colsum);
}
