// The W4 tile on zmm (AVX512-VNNI): x86_tile_w4.h's tile with each vpdpbusd twice as wide, for the
// avx512vnni table (vnni_kernels.cpp). Same A panel, same W storage, same result bits.
//
// One iteration covers two 64-k chunks c, c+1 = 64 bytes of a packed W row (one cache line, one zmm load):
//   lo = nibbles ^ 8 of the low halves  = [even k of c | even k of c+1]   (32 + 32 bytes)
//   hi = the same of the high halves    = [odd k of c  | odd k of c+1]
// while the panel holds chunk c as [32 even k | 32 odd k], so one zmm load of the panel at chunk c is
// [even c | odd c]. Two 128-bit-lane shuffles per W row (vshufi64x2) give U1 = [even c | odd c] and
// U2 = [even c+1 | odd c+1], which meet the panel's chunks c and c+1 directly: 2 vpdpbusd per 128 k per
// (A row, W row), the shuffles amortized over the MR A rows. The integer trick is the one of
// x86_tile_w4.h: U = w + 8 is unsigned, the driver's 8 * rowsum(a) correction removes the +8.
//
// Included inside vnni_kernels.cpp's avx512vnni namespace, after its `#pragma GCC target` (avx512f,
// avx512vnni, ...); needs kChunk and scalar_kernels() like x86_tile_w4.h.

// The first n (1..63) bytes of a 64-byte line, as a byte mask: the K tail's load. A masked load never touches the
// bytes it leaves out, so it neither reads past W nor needs the zero-padded copy the tails made before (a libc
// memcpy and a store-to-load forwarding stall per row: at K = 576, 288 bytes a row, the tail was ~half of a decode
// row's time; docs/PERF.md change 22).
inline __mmask64 tail_mask(int64_t n) { return (__mmask64)((1ull << n) - 1); }

// Decode (one A row, MR = 1): acc[0:NR] = A . W[0:NR], each W row read start to end before the next. The tile's
// rows are adjacent in W (w_stride = K / 2), and the driver hands each thread a contiguous range of tiles, so W
// streams as one sequential read per thread, which the hardware prefetcher follows across rows and tiles. Read
// line by line across the NR rows (the MR > 1 loop below, which shares each W line among the A rows), the same
// bytes were NR interleaved streams K / 2 bytes long: 17-20 GB/s against 29-40 for this order and 32-52 for a
// plain read (torch amax) on the Zen 4 of docs/PERF.md step 33, 4096 -> 14336 on 2 threads. Two accumulators per
// row (chunks c and c + 1) keep two vpdpbusd chains in flight.
template <int NR>
void tile_w4_zmm_rows(const int8_t* a, const int32_t* a_rowsum, const uint8_t* w, int64_t w_stride, int64_t K,
                      int32_t* acc) {
  const int64_t row_bytes = K / 2, n_pairs = row_bytes / 64, rem = row_bytes % 64;
  const __m512i mask0f = _mm512_set1_epi8(0x0F), x88 = _mm512_set1_epi8((char)0x88);
  for (int j = 0; j < NR; ++j) {
    const uint8_t* wr = w + j * w_stride;
    __m512i s1 = _mm512_setzero_si512(), s2 = _mm512_setzero_si512();
    // 64 W bytes = chunks c and c + 1 (as `pair` below), `raw` loaded; two = false: only chunk c exists (the K tail)
    auto line = [&](__m512i raw, int64_t c, bool two) __attribute__((always_inline)) {
      const __m512i b = _mm512_xor_si512(raw, x88);
      const __m512i lo = _mm512_and_si512(b, mask0f), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask0f);
      s1 = _mm512_dpbusd_epi32(s1, _mm512_shuffle_i64x2(lo, hi, 0x44),
                               _mm512_loadu_si512((const void*)(a + c * kChunk)));
      if (two)
        s2 = _mm512_dpbusd_epi32(s2, _mm512_shuffle_i64x2(lo, hi, 0xEE),
                                 _mm512_loadu_si512((const void*)(a + (c + 1) * kChunk)));
    };
#pragma GCC unroll 4
    for (int64_t p = 0; p < n_pairs; ++p) line(_mm512_loadu_si512((const void*)(wr + p * 64)), 2 * p, true);
    if (rem)  // 1..63 bytes left: loaded masked, zeros past them (as the panel's zero A, they add nothing)
      line(_mm512_maskz_loadu_epi8(tail_mask(rem), wr + n_pairs * 64), 2 * n_pairs, rem > 32);
    acc[j] = _mm512_reduce_add_epi32(_mm512_add_epi32(s1, s2)) - 8 * a_rowsum[0];
  }
}

// acc[MR][NR] = A[0:MR] . W[0:NR]; arguments as tile_w4_t (x86_tile_w4.h). MR = 1: tile_w4_zmm_rows.
template <int MR, int NR>
void tile_w4_zmm(const int8_t* a, int64_t kp, const int32_t* a_rowsum, const uint8_t* w, int64_t w_stride,
                 int64_t K, int32_t* acc) {
  if constexpr (MR == 1) return tile_w4_zmm_rows<NR>(a, a_rowsum, w, w_stride, K, acc);
  const int64_t row_bytes = K / 2, n_pairs = row_bytes / 64, rem = row_bytes % 64;
  const __m512i mask0f = _mm512_set1_epi8(0x0F), x88 = _mm512_set1_epi8((char)0x88);
  __m512i st[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) st[i][j] = _mm512_setzero_si512();

  // Chunks c, c+1 from 64 W bytes per row at wrow[j]; `two` = false: only chunk c exists (the K tail),
  // whose U1 still comes from the first 32 bytes and whose A load stays inside the panel's chunk c.
  // tail: each row's first `tail` bytes only (the K tail, loaded masked: zeros past them); 0 = the whole line.
  auto pair = [&](const uint8_t* const* wrow, int64_t c, bool two, int64_t tail = 0) __attribute__((always_inline)) {
    __m512i u1[NR], u2[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m512i raw = tail ? _mm512_maskz_loadu_epi8(tail_mask(tail), wrow[j]) : _mm512_loadu_si512(wrow[j]);
      const __m512i b = _mm512_xor_si512(raw, x88);
      const __m512i lo = _mm512_and_si512(b, mask0f), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask0f);
      u1[j] = _mm512_shuffle_i64x2(lo, hi, 0x44);  // lanes lo0 lo1 hi0 hi1 = [even c | odd c]
      u2[j] = _mm512_shuffle_i64x2(lo, hi, 0xEE);  // lanes lo2 lo3 hi2 hi3 = [even c+1 | odd c+1]
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i a1 = _mm512_loadu_si512((const void*)(a + i * kp + c * kChunk));
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) st[i][j] = _mm512_dpbusd_epi32(st[i][j], u1[j], a1);
      if (two) {
        const __m512i a2 = _mm512_loadu_si512((const void*)(a + i * kp + (c + 1) * kChunk));
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) st[i][j] = _mm512_dpbusd_epi32(st[i][j], u2[j], a2);
      }
    }
  };

  const uint8_t* wrow[NR];
  for (int64_t p = 0; p < n_pairs; ++p) {
    for (int j = 0; j < NR; ++j) wrow[j] = w + j * w_stride + p * 64;
    // Tiles of 3-4 W rows (M = 2..4: this loop) prefetch the line kDecodePrefetchRows rows below, two tiles ahead,
    // as the decode tiles did before they read W row by row (x86_tile_w4.h, tile_w4_rows).
    if (NR >= 3)
      for (int j = 0; j < NR; ++j) _mm_prefetch((const char*)(wrow[j] + kDecodePrefetchRows * w_stride), _MM_HINT_T0);
    pair(wrow, 2 * p, true);
  }
  if (rem) {
    // 1..63 bytes left (one or two chunks, the last maybe partial): loaded masked, zeros past them (a zero byte
    // is w + 8 = 8 against the panel's zero A: it adds nothing). A second chunk exists in the panel iff rem > 32.
    for (int j = 0; j < NR; ++j) wrow[j] = w + j * w_stride + n_pairs * 64;
    pair(wrow, 2 * n_pairs, rem > 32, rem);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i * NR + j] = _mm512_reduce_add_epi32(st[i][j]) - 8 * a_rowsum[i];
}

// Runtime (mr, nr) -> the instantiation: every shape up to 4 x 4 (kZmmNr: 32 zmm registers hold 16 accumulators,
// 8 unpacked W operands and 2 A loads; the ymm tiles stop at 4 x 2).
constexpr int kZmmNr = 4;
inline void tile_w4_zmm_dispatch(const int8_t* a, int64_t kp, const int32_t* rs, int a_bits, const uint8_t* w,
                                 int64_t ws, int64_t K, int mr, int nr, int32_t* acc) {
#define PQK_W4Z(MR_, NR_) \
  if (mr == MR_ && nr == NR_) return tile_w4_zmm<MR_, NR_>(a, kp, rs, w, ws, K, acc);
  PQK_W4Z(4, 4) PQK_W4Z(3, 4) PQK_W4Z(2, 4) PQK_W4Z(1, 4) PQK_W4Z(4, 3) PQK_W4Z(3, 3) PQK_W4Z(2, 3) PQK_W4Z(1, 3)
  PQK_W4Z(4, 2) PQK_W4Z(3, 2) PQK_W4Z(2, 2) PQK_W4Z(1, 2) PQK_W4Z(4, 1) PQK_W4Z(3, 1) PQK_W4Z(2, 1) PQK_W4Z(1, 1)
#undef PQK_W4Z
  scalar_kernels().tile_w4(a, kp, rs, a_bits, w, ws, K, mr, nr, acc);
}
