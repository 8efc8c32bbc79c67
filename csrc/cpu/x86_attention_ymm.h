// The prefill attention's block products and online-softmax step on ymm (AVX2) for attention.cpp's flash loop
// (IsaKernels::qk_block / pv_block / softmax_block; the contracts are in kernels_internal.h): what
// x86_attention_zmm.h does on zmm, for the AVX2 tables. 16 ymm registers: 4 query rows x 16 keys (or 16 output
// columns) of accumulators at a time, a 64-key block in four such pieces. The products are FMAs: this header is
// compiled in a region of its own with FMA on top of AVX2 (avx2_kernels.cpp's other kernels stay without it, bit-exact
// with the reference), and the table points at it only where cpuid has FMA. vmulps + vaddps instead ran a Llama-3-8B
// layer's 2048-token attention at 0.96x torch's SDPA (docs/PERF.md, change 19).
//
// Included inside avx2_kernels.cpp's anonymous namespace, after exp8_nonpos and hsum_ps.

constexpr int kAttnRows8 = 4;  // query rows per register block

// s[r, 0:64] = sum_d q[r, d] * kt[d, 0:64] for r < R (R % 4 == 0): q fp32 [R, D], kt fp32 [D, 64], s fp32 [R, 64].
// Per d and 16 keys: 2 key loads, 4 broadcasts, 8 products.
void attn_qk_block8(const float* q, int64_t R, int64_t D, const float* kt, float* s) {
  for (int64_t r = 0; r < R; r += kAttnRows8)
    for (int c = 0; c < 64; c += 16) {
      __m256 acc[kAttnRows8][2];
      for (int i = 0; i < kAttnRows8; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
      const float* qr = q + r * D;
      for (int64_t d = 0; d < D; ++d) {
        const __m256 k0 = _mm256_loadu_ps(kt + d * 64 + c), k1 = _mm256_loadu_ps(kt + d * 64 + c + 8);
        for (int i = 0; i < kAttnRows8; ++i) {
          const __m256 a = _mm256_broadcast_ss(qr + i * D + d);
          acc[i][0] = _mm256_fmadd_ps(a, k0, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(a, k1, acc[i][1]);
        }
      }
      for (int i = 0; i < kAttnRows8; ++i) {
        _mm256_storeu_ps(s + (r + i) * 64 + c, acc[i][0]);
        _mm256_storeu_ps(s + (r + i) * 64 + c + 8, acc[i][1]);
      }
    }
}

// o[r, 0:D] += sum_{j < 64} p[r, j] * v[j, 0:D] for r < R (R % 4 == 0, D % 16 == 0): p [R, 64], v [64, D],
// o [R, D]. Per key and 16 columns: 2 value loads, 4 broadcasts, 8 products.
void attn_pv_block8(const float* p, int64_t R, const float* v, int64_t D, float* o) {
  for (int64_t r = 0; r < R; r += kAttnRows8)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m256 acc[kAttnRows8][2];
      for (int i = 0; i < kAttnRows8; ++i) {
        acc[i][0] = _mm256_loadu_ps(o + (r + i) * D + d0);
        acc[i][1] = _mm256_loadu_ps(o + (r + i) * D + d0 + 8);
      }
      for (int64_t j = 0; j < 64; ++j) {
        const __m256 w0 = _mm256_loadu_ps(v + j * D + d0), w1 = _mm256_loadu_ps(v + j * D + d0 + 8);
        for (int i = 0; i < kAttnRows8; ++i) {
          const __m256 a = _mm256_broadcast_ss(p + (r + i) * 64 + j);
          acc[i][0] = _mm256_fmadd_ps(a, w0, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(a, w1, acc[i][1]);
        }
      }
      for (int i = 0; i < kAttnRows8; ++i) {
        _mm256_storeu_ps(o + (r + i) * D + d0, acc[i][0]);
        _mm256_storeu_ps(o + (r + i) * D + d0 + 8, acc[i][1]);
      }
    }
}

// The online softmax step of one key block for R rows (softmax_block's contract): row r's first n[r] scores count;
// m[r] <- max(m[r], their max), P = exp(s - m[r]) in place (0 past n[r]), l[r] <- l[r] alpha + sum P, o[r] *= alpha.
void attn_softmax_block8(float* s, int64_t R, const int64_t* n, float* m, float* l, float* o, int64_t D) {
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), ninf = _mm256_set1_ps(-INFINITY);
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * 64;
    const int64_t nr = n[r];
    if (nr <= 0) {
      for (int j = 0; j < 64; j += 8) _mm256_storeu_ps(sr + j, _mm256_setzero_ps());
      continue;
    }
    __m256 valid[8], x[8], mx = ninf;
    for (int j = 0; j < 8; ++j) {  // lane l of piece j is key 8j + l: valid while 8j + l < n
      valid[j] = _mm256_cmp_ps(lane, _mm256_set1_ps((float)(nr - 8 * j)), _CMP_LT_OQ);
      x[j] = _mm256_blendv_ps(ninf, _mm256_loadu_ps(sr + 8 * j), valid[j]);
      mx = _mm256_max_ps(mx, x[j]);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float m_new = std::max(m[r], _mm_cvtss_f32(h));
    const float alpha = expf(m[r] - m_new);  // 0 for the first block (m = -inf)
    const __m256 sh = _mm256_set1_ps(m_new);
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < 8; ++j) {
      const __m256 e = _mm256_and_ps(valid[j], exp8_nonpos(_mm256_sub_ps(x[j], sh)));
      _mm256_storeu_ps(sr + 8 * j, e);
      sum = _mm256_add_ps(sum, e);
    }
    l[r] = l[r] * alpha + hsum_ps(sum);
    m[r] = m_new;
    if (alpha != 1.0f) {
      const __m256 a = _mm256_set1_ps(alpha);
      float* orow = o + r * D;
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) _mm256_storeu_ps(orow + d, _mm256_mul_ps(a, _mm256_loadu_ps(orow + d)));
      for (; d < D; ++d) orow[d] *= alpha;
    }
  }
}
