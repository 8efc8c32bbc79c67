// The prefill attention's two block products on zmm (fp32 FMA), for attention.cpp's flash loop
// (IsaKernels::qk_block / pv_block; the contracts are in kernels_internal.h). A block is 64 keys: the scores of
// 4 query rows against it are 4 x 4 zmm accumulators, and the same 16 hold 4 rows x 64 output columns of P . V.
//
// Included inside vnni_kernels.cpp's avx512vnni namespace (native build only), after its `#pragma GCC target`.

constexpr int kAttnRows = 4;  // query rows per register block (4 x 4 accumulators + 4 loads of 32 zmm)

// s[r, 0:64] = sum_d q[r, d] * kt[d, 0:64] for r < R; q fp32 [R, D] (R % 4 == 0), kt fp32 [D, 64] (the key
// block transposed: one zmm row of 16 keys per d), s fp32 [R, 64]. Per d: 4 key loads, 4 broadcasts, 16 FMA.
void attn_qk_block(const float* q, int64_t R, int64_t D, const float* kt, float* s) {
  for (int64_t r = 0; r < R; r += kAttnRows) {
    __m512 acc[kAttnRows][4];
#pragma GCC unroll 4
    for (int i = 0; i < kAttnRows; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
    const float* qr = q + r * D;
    for (int64_t d = 0; d < D; ++d) {
      const float* k = kt + d * 64;
      const __m512 k0 = _mm512_loadu_ps(k), k1 = _mm512_loadu_ps(k + 16), k2 = _mm512_loadu_ps(k + 32),
                   k3 = _mm512_loadu_ps(k + 48);
#pragma GCC unroll 4
      for (int i = 0; i < kAttnRows; ++i) {
        const __m512 a = _mm512_set1_ps(qr[i * D + d]);
        acc[i][0] = _mm512_fmadd_ps(a, k0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(a, k1, acc[i][1]);
        acc[i][2] = _mm512_fmadd_ps(a, k2, acc[i][2]);
        acc[i][3] = _mm512_fmadd_ps(a, k3, acc[i][3]);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < kAttnRows; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(s + (r + i) * 64 + 16 * j, acc[i][j]);
  }
}

// o[r, 0:D] += sum_{j < 64} p[r, j] * v[j, 0:D] for r < R; p fp32 [R, 64] (R % 4 == 0), v fp32 [64, D], o fp32
// [R, D]; D % 16 == 0. Per 64 output columns of 4 rows: per key, 4 value loads, 4 broadcasts, 16 FMA; a last
// piece of 16-48 columns takes fewer accumulators.
template <int NJ>
inline void attn_pv_cols(const float* p, int64_t r, int64_t D, int64_t d0, const float* v, float* o) {
  __m512 acc[kAttnRows][NJ];
#pragma GCC unroll 4
  for (int i = 0; i < kAttnRows; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_loadu_ps(o + (r + i) * D + d0 + 16 * j);
  for (int64_t k = 0; k < 64; ++k) {
    __m512 w[NJ];
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) w[j] = _mm512_loadu_ps(v + k * D + d0 + 16 * j);
#pragma GCC unroll 4
    for (int i = 0; i < kAttnRows; ++i) {
      const __m512 a = _mm512_set1_ps(p[(r + i) * 64 + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_fmadd_ps(a, w[j], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < kAttnRows; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) _mm512_storeu_ps(o + (r + i) * D + d0 + 16 * j, acc[i][j]);
}

void attn_pv_block(const float* p, int64_t R, const float* v, int64_t D, float* o) {
  for (int64_t r = 0; r < R; r += kAttnRows) {
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) attn_pv_cols<4>(p, r, D, d0, v, o);
    switch ((D - d0) / 16) {
      case 3: attn_pv_cols<3>(p, r, D, d0, v, o); break;
      case 2: attn_pv_cols<2>(p, r, D, d0, v, o); break;
      case 1: attn_pv_cols<1>(p, r, D, d0, v, o); break;
      default: break;
    }
  }
}

// exp(x) on 16 lanes for x <= 0 (softmax after the max shift): avx2_kernels.cpp's exp8_nonpos on zmm (2^i * e^(f ln 2),
// degree-6 Taylor, relative error < 2e-7; clamped at -87; -inf -> e^-87, which the caller masks to 0).
inline __m512 attn_exp16_nonpos(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 i = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, i), _mm512_set1_ps(0.69314718055994531f));
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(0.5f));
  p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(1.0f));
  p = _mm512_add_ps(_mm512_mul_ps(p, f), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(i), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// The online softmax step of one key block for R rows (IsaKernels::softmax_block): row r's first n[r] scores count
// (n[r] <= 0: none); with them m[r] <- max(m[r], max s), P = exp(s - m[r]) in place (0 past n[r]), l[r] <- l[r]
// alpha + sum P and o[r, 0:D] *= alpha, alpha = exp(m_old - m_new). The scalar loop it replaces (a dependent max
// chain, SSE2 glue) cost more than the block products themselves (2.2 of 4.0 ms at SmolLM2's shape).
void attn_softmax_block(float* s, int64_t R, const int64_t* n, float* m, float* l, float* o, int64_t D) {
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * 64;
    const int64_t nr = n[r];
    if (nr <= 0) {
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(sr + 16 * j, _mm512_setzero_ps());
      continue;
    }
    __mmask16 valid[4];
    __m512 x[4];
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < 4; ++j) {
      const int64_t c = std::max<int64_t>(0, std::min<int64_t>(16, nr - 16 * j));
      valid[j] = (__mmask16)((1u << c) - 1u);
      x[j] = _mm512_loadu_ps(sr + 16 * j);
      mx = _mm512_mask_max_ps(mx, valid[j], mx, x[j]);
    }
    const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
    const float alpha = expf(m[r] - m_new);  // 0 for the first block (m = -inf)
    const __m512 sh = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      const __m512 e = _mm512_maskz_mov_ps(valid[j], attn_exp16_nonpos(_mm512_sub_ps(x[j], sh)));
      _mm512_storeu_ps(sr + 16 * j, e);
      sum = _mm512_add_ps(sum, e);
    }
    l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
    m[r] = m_new;
    if (alpha != 1.0f) {
      const __m512 a = _mm512_set1_ps(alpha);
      float* orow = o + r * D;
      int64_t d = 0;
      for (; d + 16 <= D; d += 16) _mm512_storeu_ps(orow + d, _mm512_mul_ps(a, _mm512_loadu_ps(orow + d)));
      for (; d < D; ++d) orow[d] *= alpha;
    }
  }
}
