// The prefill attention's block products for bf16 inputs on zmm with AVX512-BF16 (IsaKernels::qk_block_bf16 /
// pv_block_bf16, contracts in kernels_internal.h), for attention.cpp's flash loop. `vdpbf16ps` adds two bf16
// products into each fp32 lane per instruction, twice what the fp32 FMA of x86_attention_zmm.h does in the same
// issue slot (both take one of the two multiply pipes' slots on Zen 4: docs/PERF.md step 25), so the two products
// take half the instructions. The operands are pairs: one dword holds two bf16, the even index in the low half.
//   Q . K^T: the pair runs along d. A key row read as dwords already is that (d = 2p, 2p + 1 in dword p), so the
//            key block is only transposed by dword: kt2 [D / 2][64].
//   P . V:   the pair runs along the keys: dword (i, d) = (v[2i, d], v[2i + 1, d]) in v2 [32][D], and P's row is
//            rounded to bf16 pairs (`vcvtne2ps2bf16`, nearest-even), as torch's CPU flash attention rounds its
//            probabilities to the input type before the P . V product.
// The instruction takes denormal inputs as zero and flushes denormal results: a product below ~1e-38 is lost
// against sums of order 1 (scores, probabilities), which the output's bf16 rounding hides anyway.
//
// Included inside vnni_kernels.cpp's avx512vnni namespace (native build only) in a region compiled with
// avx512bf16 on top of the table's target; the table points at these only where cpuid reports AVX512-BF16.

// s[r, 0:64] = scale * sum_d q[r, d] k[j, d] for r < R: q bf16 [R, D] (R % 4 == 0, D even), kt2 uint32 [D / 2][64]
// (key j's dword p at [p][j]), s fp32 [R, 64]. Per pair of d: 4 key loads, 4 broadcasts, 16 vdpbf16ps.
void attn_qk_block_bf16(const uint16_t* q, int64_t R, int64_t D, const uint32_t* kt2, float scale, float* s) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < R; r += kAttnRows) {
    __m512 acc[kAttnRows][4];
#pragma GCC unroll 4
    for (int i = 0; i < kAttnRows; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
    const uint16_t* qr = q + r * D;
    for (int64_t p = 0; p < D / 2; ++p) {
      const uint32_t* k = kt2 + p * 64;
      __m512bh kv[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) kv[j] = (__m512bh)_mm512_loadu_si512((const void*)(k + 16 * j));
#pragma GCC unroll 4
      for (int i = 0; i < kAttnRows; ++i) {
        uint32_t pair;
        memcpy(&pair, qr + i * D + 2 * p, 4);
        const __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, kv[j]);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < kAttnRows; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(s + (r + i) * 64 + 16 * j, _mm512_mul_ps(acc[i][j], sc));
  }
}

// o[r, 0:D] += sum_{j < 64} bf16(p[r, j]) v[j, 0:D] for rows r .. r + 3, columns d0 .. d0 + 16 NJ - 1: pp the 4
// rows' probabilities as 32 bf16 pairs each, v2 as attn_pv_block_bf16's.
template <int NJ>
inline void attn_pv_cols_bf16(const uint32_t (*pp)[32], int64_t r, int64_t D, int64_t d0, const uint32_t* v2,
                              float* o) {
  __m512 acc[kAttnRows][NJ];
#pragma GCC unroll 4
  for (int i = 0; i < kAttnRows; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_loadu_ps(o + (r + i) * D + d0 + 16 * j);
  for (int64_t k = 0; k < 32; ++k) {
    __m512bh w[NJ];
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) w[j] = (__m512bh)_mm512_loadu_si512((const void*)(v2 + k * D + d0 + 16 * j));
#pragma GCC unroll 4
    for (int i = 0; i < kAttnRows; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)pp[i][k]);
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, w[j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < kAttnRows; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) _mm512_storeu_ps(o + (r + i) * D + d0 + 16 * j, acc[i][j]);
}

// o[r, 0:D] += sum_{j < 64} bf16(p[r, j]) v[j, 0:D] for r < R: p fp32 [R, 64] (R % 4 == 0), v2 uint32 [32][D]
// (keys 2i, 2i + 1 of column d at [i][d]), o fp32 [R, D], D % 16 == 0.
void attn_pv_block_bf16(const float* p, int64_t R, const uint32_t* v2, int64_t D, float* o) {
  alignas(64) uint32_t pp[kAttnRows][32];
  for (int64_t r = 0; r < R; r += kAttnRows) {
#pragma GCC unroll 4
    for (int i = 0; i < kAttnRows; ++i) {  // 64 probabilities -> 32 pairs: the low 16 bf16 from the second operand
      const float* pr = p + (r + i) * 64;
      _mm512_store_si512((void*)pp[i], (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(pr + 16), _mm512_loadu_ps(pr)));
      _mm512_store_si512((void*)(pp[i] + 16),
                         (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(pr + 48), _mm512_loadu_ps(pr + 32)));
    }
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) attn_pv_cols_bf16<4>(pp, r, D, d0, v2, o);
    switch ((D - d0) / 16) {
      case 3: attn_pv_cols_bf16<3>(pp, r, D, d0, v2, o); break;
      case 2: attn_pv_cols_bf16<2>(pp, r, D, d0, v2, o); break;
      case 1: attn_pv_cols_bf16<1>(pp, r, D, d0, v2, o); break;
      default: break;
    }
  }
}
