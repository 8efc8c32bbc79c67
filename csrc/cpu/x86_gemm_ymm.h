// The prefill GEMM pieces on ymm (AVX2, no VNNI): the same driver (gemm.cpp: gemm_prefill), A panel and W layout
// as the zmm ones (x86_gemm_zmm.h), with vpmaddubsw standing in for vpdpbusd. W4 only (PrefillKernels::w8 false).
//
// Layouts (kPf2Nr = 16 output columns per micro panel = 2 ymm of 8 int32 lanes):
//   A panel  uint8 [rows, kp]: natural k order, each byte a ^ 0x80 = a + 128 (vpmaddubsw's unsigned operand)
//   W panel  int8  [kq][16][4] per micro panel: dword (q, n) = w[n, 4q .. 4q+3], sign-extended nibbles; columns
//            past N and k past the block's end are 0
//
// The integer trick. vpmaddubsw(bcast(A[i, 4q..4q+3]), W[q]) gives, per column n, two int16:
// (a0+128) w0 + (a1+128) w1 and (a2+128) w2 + (a3+128) w3. With |w| <= 8 and a + 128 <= 255 each is within
// +-2 * 255 * 8 = +-4080, so kPf2Flush = 8 of them add up in int16 without overflow (8 * 4080 = 32640 < 32768) —
// a W8 would saturate in the first vpmaddubsw, hence W4 only. Every kPf2Flush steps vpmaddwd with ones widens the
// int16 pairs into the int32 c (in L1), so the inner loop is one vpmaddubsw + one vpaddw per 32 multiply-adds
// (the decode tile, x86_tile_w4.h's MaddubsAcc, makes the same trade). acc = c - 128 * colsum(w[n, :]), applied in
// the epilogue as on zmm; all int32 arithmetic is modular and the true sum fits int32, so the result is exact.
//
// Included inside avx2_kernels.cpp's anonymous namespace, after its `#pragma GCC target("avx2,f16c")`.

constexpr int kPf2Mr = 4;        // A rows per micro-kernel: 4 x 2 int16 accumulators + 2 W + 4 broadcasts + 1 product of 16 ymm
constexpr int kPf2Nr = 16;       // W columns per micro panel
constexpr int64_t kPf2Kc = 512;  // k per W block: a micro panel (16 x 512 = 8 KB) stays in L1 across all A rows
constexpr int64_t kPf2Rows = 1024;            // rows per M-block, at most: one K block of the A panel stays in L2 ...
constexpr int64_t kPf2PanelBytes = 8 << 20;  // ... and the panel of all K in L3 (K = 14336: 584 rows; 1024 was 1.3x slower)
constexpr int kPf2Flush = 8;     // vpmaddubsw steps summed in int16 before widening (the bound above)

// One step of the full 4-row micro-kernel in inline asm: GCC compiled the intrinsics with a register copy per
// accumulator per step (it kept each new sum in a fresh register and copied it back: 8 vmovdqa in a 31-op loop,
// perf annotate), which the front end pays for. Here each accumulator stays in its register. For q: w0, w1 = W[q]
// (columns 0-7, 8-15); per row i: t = bcast(A[i, 4q .. 4q+3]); s[i][0] += maddubs(t, w0); s[i][1] += maddubs(t, w1).
#define PQK_PF2_STEP4(s00, s01, s10, s11, s20, s21, s30, s31, a0, a1, a2, a3, w)                     \
  __asm__("vmovdqa (%[wp]), %%ymm12\n\t"                                                               \
          "vmovdqa 32(%[wp]), %%ymm13\n\t"                                                             \
          "vpbroadcastd (%[pa0]), %%ymm14\n\t"                                                         \
          "vpmaddubsw %%ymm12, %%ymm14, %%ymm15\n\t"                                                   \
          "vpaddw %%ymm15, %[r00], %[r00]\n\t"                                                         \
          "vpmaddubsw %%ymm13, %%ymm14, %%ymm14\n\t"                                                   \
          "vpaddw %%ymm14, %[r01], %[r01]\n\t"                                                         \
          "vpbroadcastd (%[pa1]), %%ymm14\n\t"                                                         \
          "vpmaddubsw %%ymm12, %%ymm14, %%ymm15\n\t"                                                   \
          "vpaddw %%ymm15, %[r10], %[r10]\n\t"                                                         \
          "vpmaddubsw %%ymm13, %%ymm14, %%ymm14\n\t"                                                   \
          "vpaddw %%ymm14, %[r11], %[r11]\n\t"                                                         \
          "vpbroadcastd (%[pa2]), %%ymm14\n\t"                                                         \
          "vpmaddubsw %%ymm12, %%ymm14, %%ymm15\n\t"                                                   \
          "vpaddw %%ymm15, %[r20], %[r20]\n\t"                                                         \
          "vpmaddubsw %%ymm13, %%ymm14, %%ymm14\n\t"                                                   \
          "vpaddw %%ymm14, %[r21], %[r21]\n\t"                                                         \
          "vpbroadcastd (%[pa3]), %%ymm14\n\t"                                                         \
          "vpmaddubsw %%ymm12, %%ymm14, %%ymm15\n\t"                                                   \
          "vpaddw %%ymm15, %[r30], %[r30]\n\t"                                                         \
          "vpmaddubsw %%ymm13, %%ymm14, %%ymm14\n\t"                                                   \
          "vpaddw %%ymm14, %[r31], %[r31]\n\t"                                                         \
          : [r00] "+x"(s00), [r01] "+x"(s01), [r10] "+x"(s10), [r11] "+x"(s11), [r20] "+x"(s20),           \
            [r21] "+x"(s21), [r30] "+x"(s30), [r31] "+x"(s31)                                            \
          : [pa0] "r"(a0), [pa1] "r"(a1), [pa2] "r"(a2), [pa3] "r"(a3), [wp] "r"(w)                      \
          : "xmm12", "xmm13", "xmm14", "xmm15", "memory")

// c[0:MR, 0:16] (row stride ldc) (+)= A[0:MR, 0:4 kq] . Wp (one micro panel, kq dwords deep).
template <int MR>
void pf2_kernel_t(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq, int32_t* c, int64_t ldc,
                  bool accumulate) {
  if (!accumulate)
    for (int i = 0; i < MR; ++i) memset(c + i * ldc, 0, kPf2Nr * sizeof(int32_t));
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t q0 = 0; q0 < kq; q0 += kPf2Flush) {
    const int64_t q1 = std::min<int64_t>(q0 + kPf2Flush, kq);
    // s[i][j]: int16 pairs of row i, columns 8j .. 8j+7, over the steps q0 .. q1-1
    __m256i s[MR][2];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) s[i][0] = s[i][1] = _mm256_setzero_si256();
    if constexpr (MR == 4) {
      __m256i s00 = s[0][0], s01 = s[0][1], s10 = s[1][0], s11 = s[1][1];
      __m256i s20 = s[2][0], s21 = s[2][1], s30 = s[3][0], s31 = s[3][1];
#pragma GCC unroll 1
      for (int64_t q = q0; q < q1; ++q)
        PQK_PF2_STEP4(s00, s01, s10, s11, s20, s21, s30, s31, a + 4 * q, a + lda + 4 * q, a + 2 * lda + 4 * q,
                      a + 3 * lda + 4 * q, wp + q * 64);
      s[0][0] = s00, s[0][1] = s01, s[1][0] = s10, s[1][1] = s11;
      s[2][0] = s20, s[2][1] = s21, s[3][0] = s30, s[3][1] = s31;
    } else {   // the last rows of an M-block (fewer than 4): intrinsics
#pragma GCC unroll 1
      for (int64_t q = q0; q < q1; ++q) {
        const __m256i w0 = _mm256_load_si256((const __m256i*)(wp + q * 64));
        const __m256i w1 = _mm256_load_si256((const __m256i*)(wp + q * 64 + 32));
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
          int32_t v;
          memcpy(&v, a + i * lda + 4 * q, 4);
          const __m256i ab = _mm256_set1_epi32(v);   // A[i, 4q .. 4q+3], u8, in every dword
          s[i][0] = _mm256_add_epi16(_mm256_maddubs_epi16(ab, w0), s[i][0]);
          s[i][1] = _mm256_add_epi16(_mm256_maddubs_epi16(ab, w1), s[i][1]);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
      for (int j = 0; j < 2; ++j) {
        __m256i* ci = (__m256i*)(c + i * ldc + 8 * j);
        _mm256_storeu_si256(ci, _mm256_add_epi32(_mm256_loadu_si256(ci), _mm256_madd_epi16(s[i][j], ones)));
      }
  }
}

void pf2_kernel(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq, int mr, int /*nn*/, int32_t* c,
                int64_t ldc, bool accumulate) {
  switch (mr) {
    case 4: return pf2_kernel_t<4>(a, lda, wp, kq, c, ldc, accumulate);
    case 3: return pf2_kernel_t<3>(a, lda, wp, kq, c, ldc, accumulate);
    case 2: return pf2_kernel_t<2>(a, lda, wp, kq, c, ldc, accumulate);
    default: return pf2_kernel_t<1>(a, lda, wp, kq, c, ldc, accumulate);
  }
}

// One micro panel: W4 rows n0 .. n0 + nn - 1 (nn <= 16; the rest are zero columns), k in [k0, k0 + kc) -> dst
// int8 [ceil(kc / 4)][16][4] (32-byte aligned), colsum[0:16] += sum over those k of w. k0 % 8 == 0, w_bits == 4.
void pf2_pack_w(const void* w, int w_bits, int64_t w_stride, int64_t n0, int nn, int64_t k0, int64_t kc, int8_t* dst,
                int32_t* colsum) {
  (void)w_bits;  // 4: the table says w8 = false, so the driver never passes an 8-bit W
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i vindex = _mm256_mullo_epi32(lane, _mm256_set1_epi32((int)w_stride));
  const __m256i m0f = _mm256_set1_epi8(0x0F), x8 = _mm256_set1_epi8(8);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  const int64_t n8 = kc / 8;  // whole 8-k groups = one dword of packed W per row
  for (int g = 0; g < 2; ++g) {
    const int valid = std::max(0, std::min(8, nn - 8 * g));
    const __m256i vm = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), lane);   // lanes (columns) inside N
    const uint8_t* base = (const uint8_t*)w + (n0 + 8 * g) * w_stride + k0 / 2;
    __m256i cs = _mm256_setzero_si256();
    int8_t* out = dst + 32 * g;
    for (int64_t e = 0; e < n8; ++e) {
      // dword of lane c = bytes of row c: (k0, k1) (k2, k3) (k4, k5) (k6, k7) as (low, high) nibbles
      const __m256i d = valid ? _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int*)(base + 4 * e),
                                                            vindex, vm, 1)
                              : _mm256_setzero_si256();
      // nibbles -> signed bytes: lo = w(k0), w(k2), w(k4), w(k6); hi = the odd k
      const __m256i lo = _mm256_sub_epi8(_mm256_xor_si256(_mm256_and_si256(d, m0f), x8), x8);
      const __m256i hi = _mm256_sub_epi8(_mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(d, 4), m0f), x8), x8);
      // per 128-bit lane (columns 4l .. 4l+3): ul = [c0: k0-3][c0: k4-7][c1: k0-3][c1: k4-7], uh the same for c2, c3;
      // the dword shuffle makes them [c0 k0-3][c1 k0-3][c0 k4-7][c1 k4-7], and the 64-bit unpacks pair them up
      const __m256i ul = _mm256_shuffle_epi32(_mm256_unpacklo_epi8(lo, hi), _MM_SHUFFLE(3, 1, 2, 0));
      const __m256i uh = _mm256_shuffle_epi32(_mm256_unpackhi_epi8(lo, hi), _MM_SHUFFLE(3, 1, 2, 0));
      const __m256i o1 = _mm256_unpacklo_epi64(ul, uh);   // dword c = w[c, k0 .. k3]
      const __m256i o2 = _mm256_unpackhi_epi64(ul, uh);   // dword c = w[c, k4 .. k7]
      _mm256_store_si256((__m256i*)(out + (2 * e) * 64), o1);
      _mm256_store_si256((__m256i*)(out + (2 * e + 1) * 64), o2);
      // column sums: vpmaddubsw against ones (pairs, |.| <= 16) then vpmaddwd against ones (the dword's 4 k)
      cs = _mm256_add_epi32(cs, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, o1), ones16));
      cs = _mm256_add_epi32(cs, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, o2), ones16));
    }
    __m256i* cg = (__m256i*)(colsum + 8 * g);
    _mm256_storeu_si256(cg, _mm256_add_epi32(_mm256_loadu_si256(cg), cs));
  }
  pack_w_tail(w, 4, w_stride, n0, nn, k0, kc, 2 * n8, kPf2Nr, dst, colsum);  // kc not a multiple of 8
}

// out[i, 0:nn] (row stride ldo, type t) = float(c[i, j] - 128 colsum[j]) * (a_scale[i] * w_scale[j]) (+ bias[j]),
// the scalar dequant_value + bias of quant_math.h lane by lane (separate multiply and add, never fused: this file
// is built without FMA).
void pf2_epilogue(const int32_t* c, int64_t ldc, int mr, int nn, const int32_t* colsum, const float* a_scale,
                  const float* w_scale, const float* bias, void* out, int64_t ldo, FloatType t) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int j0 = 0; j0 < nn; j0 += 8) {
    const int cnt = std::min(8, nn - j0);
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), lane);
    const __m256i corr = _mm256_slli_epi32(_mm256_maskload_epi32(colsum + j0, m), 7);
    const __m256 ws = _mm256_maskload_ps(w_scale + j0, m);
    const __m256 b = bias ? _mm256_maskload_ps(bias + j0, m) : _mm256_setzero_ps();
    for (int i = 0; i < mr; ++i) {
      const __m256i acc = _mm256_sub_epi32(_mm256_loadu_si256((const __m256i*)(c + i * ldc + j0)), corr);
      const __m256 s = _mm256_mul_ps(_mm256_set1_ps(a_scale[i]), ws);
      __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), s);
      if (bias) y = _mm256_add_ps(y, b);
      const int64_t o = i * ldo + j0;
      if (t == FloatType::kFloat32) {
        _mm256_maskstore_ps((float*)out + o, m, y);
      } else if (t == FloatType::kBFloat16) {
        // float16.h's f32_to_bf16 on 8 lanes: round to nearest-even, NaN -> quiet NaN
        const __m256i u = _mm256_castps_si256(y);
        const __m256i rnd = _mm256_add_epi32(
            u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
        const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                               _mm256_set1_epi32(0x7f800000));
        const __m256i r = _mm256_blendv_epi8(_mm256_srli_epi32(rnd, 16),
                                             _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
        // 8 dwords <= 0xffff -> 8 words: packus works per 128-bit lane, the 64-bit permute joins the two halves
        const __m128i h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
        if (cnt == 8) {
          _mm_storeu_si128((__m128i*)((uint16_t*)out + o), h);
        } else {
          alignas(16) uint16_t tmp[8];
          _mm_store_si128((__m128i*)tmp, h);
          memcpy((uint16_t*)out + o, tmp, (size_t)cnt * 2);
        }
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, y);
        for (int j = 0; j < cnt; ++j) store_from_f32(out, o + j, tmp[j], t);
      }
    }
  }
}
