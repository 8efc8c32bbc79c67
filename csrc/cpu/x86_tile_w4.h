// The W4 tile of the x86 kernels, shared by avx2_kernels.cpp (vpmaddubsw: MaddubsAcc) and
// vnni_kernels.cpp (vpdpbusd: DpbusdAcc). Only the inner multiply-accumulate differs, so the tile is one
// template over an accumulator policy `Acc`:
//
//   Acc::State                     per (A row, W row) accumulator registers
//   Acc::zero(State&)
//   Acc::add(State&, ulo, ae, uhi, ao)  += sum over 64 k of U * S (U: 32 unsigned bytes, S: 32 signed)
//   Acc::kFlushEvery, Acc::flush(State&)  widen int16 partials every kFlushEvery chunks (0: never)
//   Acc::total(State&) -> __m256i  eight int32 lanes whose sum is the dot product of U and S
//
// The integer trick (both policies): the unsigned operand is U = w + 8 (the nibble XOR 8: 0..15), the
// signed one the A panel, so sum_k U*a = sum_k w*a + 8 * sum_k a and the driver's row sum of A removes
// the 8 * sum_k a.
//
// This header has no includes and no namespace of its own: it is included *inside* each kernel file's
// anonymous namespace, after that file's `#pragma GCC target`, so each file gets its own copy compiled
// for its own instruction set (an inline function shared across files could be linked with the wrong
// one). It needs <immintrin.h>, <string.h>, kChunk and scalar_kernels() from the includer.

constexpr int kDecodePrefetchRows = 8;  // W rows ahead (tile_w4_zmm's MR > 1 tiles; see tile_w4_rows)

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// ---- accumulator policies ---------------------------------------------------------------------------
// AVX2: vpmaddubsw multiplies unsigned by signed bytes and adds adjacent pairs into *saturating* int16.
// No saturation here: a pair is at most 2 * 15 * 128 = 3840. Partials stay in int16 for FLUSH chunks
// (|chunk| <= 2 pairs * 2 * 15 * |a|max: 480 for A4, 7680 for A8, so FLUSH = 64 and 4 fit under 32767)
// before vpmaddwd widens them to int32: 3 instructions per 64 k instead of 4.
template <int FLUSH>
struct MaddubsAcc {
  struct State { __m256i a16, a32; };
  static constexpr int kFlushEvery = FLUSH;
  static void zero(State& s) { s.a16 = s.a32 = _mm256_setzero_si256(); }
  static void add(State& s, __m256i ulo, __m256i ae, __m256i uhi, __m256i ao) {
    s.a16 = _mm256_add_epi16(s.a16, _mm256_add_epi16(_mm256_maddubs_epi16(ulo, ae), _mm256_maddubs_epi16(uhi, ao)));
  }
  static void flush(State& s) {
    s.a32 = _mm256_add_epi32(s.a32, _mm256_madd_epi16(s.a16, _mm256_set1_epi16(1)));
    s.a16 = _mm256_setzero_si256();
  }
  static __m256i total(const State& s) { return s.a32; }
};

// VNNI: vpdpbusd adds the four u8 x s8 products of each dword straight into int32, without saturation:
// 2 instructions per 64 k, no flush. Dp::dot(acc, u, s) is the includer's vpdpbusd (VEX or EVEX
// encoding, or an exact emulation for tests).
template <class Dp>
struct DpbusdAcc {
  struct State { __m256i a32; };
  static constexpr int kFlushEvery = 0;
  static void zero(State& s) { s.a32 = _mm256_setzero_si256(); }
  static void add(State& s, __m256i ulo, __m256i ae, __m256i uhi, __m256i ao) {
    s.a32 = Dp::dot(Dp::dot(s.a32, ulo, ae), uhi, ao);
  }
  static void flush(State&) {}
  static __m256i total(const State& s) { return s.a32; }
};

// acc[MR][NR] = A[0:MR] . W[0:NR], W packed int4 read in its storage order (one 32-byte load = 64 k). MR = 1:
// tile_w4_rows.
//   a: int8 panel [MR, kp] (nibble-split order), a_rowsum: int32 [MR], w: uint8 [NR, K/2] (row stride
//   w_stride bytes), acc: int32 [MR, NR] out.
// Decode (one A row, MR = 1): acc[0:NR] = A . W[0:NR], each W row read start to end before the next, so that a
// thread's contiguous range of tiles is one sequential stream the hardware prefetcher follows across rows (the
// MR > 1 loop below reads the NR rows line by line, NR interleaved streams it restarts on every tile; the zmm twin,
// tile_w4_zmm_rows, measured 17-20 -> 29-40 GB/s, docs/PERF.md step 33; this one 15.8-17.8 -> 21.8-28.5 GB/s with
// the AVX2 table forced on that Zen 4). It replaces the software prefetch of the same line kDecodePrefetchRows rows
// below (two tiles ahead), which had taken the interleaved order from 21.9 to 35-43 GB/s on the AVX2-only EPYC of
// step 7; the row order is unmeasured there. Two accumulator states (even and odd chunks) keep two chains in
// flight: DpbusdAcc's two dependent vpdpbusd per chunk would otherwise bound a core near 3 bytes of W per cycle.
template <int NR, class Acc>
void tile_w4_rows(const int8_t* a, const int32_t* a_rowsum, const uint8_t* w, int64_t w_stride, int64_t K,
                  int32_t* acc) {
  const int64_t row_bytes = K / 2, n_full = row_bytes / 32, tail = row_bytes % 32;
  const __m256i mask0f = _mm256_set1_epi8(0x0F), x88 = _mm256_set1_epi8((char)0x88);
  for (int j = 0; j < NR; ++j) {
    const uint8_t* wr = w + j * w_stride;
    typename Acc::State st[2];
    Acc::zero(st[0]);
    Acc::zero(st[1]);
    // one 64-k chunk c (32 W bytes at src) into st[c & 1], as tile_w4_t's chunk
    auto chunk = [&](const uint8_t* src, int64_t c) __attribute__((always_inline)) {
      const __m256i b = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)src), x88);
      const __m256i ae = _mm256_loadu_si256((const __m256i*)(a + c * kChunk));
      const __m256i ao = _mm256_loadu_si256((const __m256i*)(a + c * kChunk + 32));
      Acc::add(st[c & 1], _mm256_and_si256(b, mask0f), ae, _mm256_and_si256(_mm256_srli_epi16(b, 4), mask0f), ao);
    };
    int since_flush = 0;  // chunks per state since its last flush: every state gets every other chunk
#pragma GCC unroll 2
    for (int64_t c = 0; c < n_full; ++c) {
      chunk(wr + c * 32, c);
      if (Acc::kFlushEvery && ++since_flush == 2 * Acc::kFlushEvery) {
        Acc::flush(st[0]);
        Acc::flush(st[1]);
        since_flush = 0;
      }
    }
    if (tail) {  // as tile_w4_t: the row's last bytes zero-padded
      alignas(32) uint8_t wtail[32];
      memset(wtail, 0, sizeof(wtail));
      memcpy(wtail, wr + n_full * 32, (size_t)tail);
      chunk(wtail, n_full);
    }
    if (Acc::kFlushEvery) {
      Acc::flush(st[0]);
      Acc::flush(st[1]);
    }
    acc[j] = hsum_epi32(_mm256_add_epi32(Acc::total(st[0]), Acc::total(st[1]))) - 8 * a_rowsum[0];
  }
}

template <int MR, int NR, class Acc>
void tile_w4_t(const int8_t* a, int64_t kp, const int32_t* a_rowsum, const uint8_t* w, int64_t w_stride,
               int64_t K, int32_t* acc) {
  if constexpr (MR == 1) return tile_w4_rows<NR, Acc>(a, a_rowsum, w, w_stride, K, acc);
  const int64_t row_bytes = K / 2, n_full = row_bytes / 32, tail = row_bytes % 32;
  const __m256i mask0f = _mm256_set1_epi8(0x0F), x88 = _mm256_set1_epi8((char)0x88);
  typename Acc::State st[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) Acc::zero(st[i][j]);

  // one 64-k chunk: U = nibble ^ 8 (low = even k, high = odd k), S = the panel's even / odd halves
  auto chunk = [&](const uint8_t* const* wrow, int64_t c) __attribute__((always_inline)) {
    __m256i wlo[NR], whi[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      __m256i b = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)wrow[j]), x88);
      wlo[j] = _mm256_and_si256(b, mask0f);
      whi[j] = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask0f);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256i ae = _mm256_loadu_si256((const __m256i*)(a + i * kp + c * kChunk));
      const __m256i ao = _mm256_loadu_si256((const __m256i*)(a + i * kp + c * kChunk + 32));
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) Acc::add(st[i][j], wlo[j], ae, whi[j], ao);
    }
  };
  auto flush = [&]() __attribute__((always_inline)) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) Acc::flush(st[i][j]);
  };

  const uint8_t* wrow[NR];
  int since_flush = 0;
  for (int64_t c = 0; c < n_full; ++c) {
    for (int j = 0; j < NR; ++j) wrow[j] = w + j * w_stride + c * 32;
    chunk(wrow, c);
    if (Acc::kFlushEvery && ++since_flush == Acc::kFlushEvery) { flush(); since_flush = 0; }
  }
  if (tail) {
    // The last W bytes of a row may end anywhere: copy them into zeroed 32-byte buffers (a zero byte is
    // w = 0, and the panel pads A with 0, so the padding contributes nothing).
    alignas(32) uint8_t wtail[NR][32];
    memset(wtail, 0, sizeof(wtail));
    for (int j = 0; j < NR; ++j) {
      memcpy(wtail[j], w + j * w_stride + n_full * 32, (size_t)tail);
      wrow[j] = wtail[j];
    }
    chunk(wrow, n_full);
  }
  if (Acc::kFlushEvery) flush();
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i * NR + j] = hsum_epi32(Acc::total(st[i][j])) - 8 * a_rowsum[i];
}

// Runtime (mr, nr) -> the instantiation; acc is written with row stride nr. The instantiated shapes
// are those the driver asks for with mr_max = 4, nr_max = 2, nr_decode = 4 (kernels_internal.h).
template <class Acc>
void tile_w4_dispatch(const int8_t* a, int64_t kp, const int32_t* rs, int a_bits, const uint8_t* w, int64_t ws,
                      int64_t K, int mr, int nr, int32_t* acc) {
#define PQK_W4(MR_, NR_) \
  if (mr == MR_ && nr == NR_) return tile_w4_t<MR_, NR_, Acc>(a, kp, rs, w, ws, K, acc);
  PQK_W4(4, 2) PQK_W4(3, 2) PQK_W4(2, 2) PQK_W4(1, 2) PQK_W4(4, 1) PQK_W4(3, 1) PQK_W4(2, 1) PQK_W4(1, 1)
  PQK_W4(1, 4) PQK_W4(1, 3)
#undef PQK_W4
  scalar_kernels().tile_w4(a, kp, rs, a_bits, w, ws, K, mr, nr, acc);  // a shape not instantiated
}
