// Block-level math of the online Walsh-Hadamard transform (hadamard.cu), as PQK_HD functions the host harness
// (tests/hadamard_harness.cpp) runs with an emulated block: argument checks, which elements each thread/lane
// touches in each pass, the butterfly, the shuffle schedule, the in-register radix-8 passes and the m-point stage.
//
// y = (H_m (x) H_P) x * scale, n = cols = m * P, P = 2^p. Index convention (prefixquant_kernels/hadamard.py): element
// i = a * P + b of a row, a in [0, m) the slow index, b in [0, P) the fast one. H_P is Sylvester in natural order,
// applied as radix-2 stages on bit 0, 1, ..., p - 1 of b, each mapping (u = bit clear, w = bit set) to (u + w, u - w);
// then y[a, b] = scale * sum_{a'} H_m[a, a'] z[a', b], summed in a' order from 0.0f. hadamard.py's sequential path
// does the same operations in the same order, so the fp32 result is bit-identical (tests/cuda/test_hadamard.py).
//
// One block per row (grid-stride over rows), the row in shared memory as fp32, [n] floats, then H_m as sign bits:
//   pass 1 (global -> registers -> shared): lane l of a warp holds element base + l, base a multiple of 32, so b's
//           bits 0..4 are the lane bits (P is a power of two): stages 0..min(p, 5) - 1 are __shfl_xor_sync
//           butterflies, fused with the load so they cost no shared-memory round trip;
//   pass 2.. (shared -> registers -> shared): bits 5..p-1, three at a time: a thread loads the 8 elements that differ
//           only in those bits, does 3 radix-2 stages in registers, stores them back;
//   last (shared -> global): the m-point stage, 4 output rows a per thread, H_m read from shared memory as bits.
// Radix-8 register passes instead of one shuffle-transpose per warp bit: each pass is one conflict-free shared
// round trip per element for 3 stages, and the same code covers every P without a per-size schedule.
#pragma once

#include <math.h>
#include <stdint.h>

#include "../common/quant_math.h"  // PQK_HD
#include "pqk_cuda.h"              // PQK_ERR_*

#if defined(__CUDA_ARCH__)  // device pass only: g++ (and nvcc's host pass) would warn about the pragma
#define PQK_HAD_UNROLL _Pragma("unroll")
#else
#define PQK_HAD_UNROLL
#endif

namespace pqk {
namespace cuda {

constexpr int kHadThreads = 512;                // threads per block (16 warps); each row pass strides by this
constexpr int kHadWarps = kHadThreads / 32;
constexpr int kHadRowTile = 4;                  // m-stage: output rows a per thread (every m in the list is 4k)
constexpr int kHadRegBits = 3;                  // bits per register pass: 8 values per thread

struct HadamardShape {
  int m;      // the non-power-of-two factor (1 or a supported m)
  int p;      // log2(P)
  int n;      // cols = m * 2^p
  int words;  // 32-bit words per row of H_m's sign bits: ceil(m / 32)
};

PQK_HD bool hadamard_m_supported(int m) {
  switch (m) {
    case 1: case 12: case 20: case 28: case 36: case 40: case 52: case 60: case 108: case 140: case 156: case 172:
      return true;
    default:
      return false;
  }
}

// The launcher's checks (before any CUDA call): PQK_OK and *s filled, or the status to return.
PQK_HD int hadamard_shape(int m, int rows, int cols, HadamardShape* s) {
  if (rows <= 0 || cols <= 0) return PQK_ERR_SHAPE;
  if (!hadamard_m_supported(m) || cols % m != 0) return PQK_ERR_HADAMARD_SIZE;
  const int P = cols / m;
  if ((P & (P - 1)) != 0) return PQK_ERR_HADAMARD_SIZE;  // P must be a power of two
  int p = 0;
  while ((1 << p) < P) ++p;
  s->m = m;
  s->p = p;
  s->n = cols;
  s->words = (m + 31) / 32;
  return PQK_OK;
}

// Dynamic shared memory of a block: the fp32 row, then H_m's sign bits. The launcher compares it with the device's
// opt-in maximum per block (sm_80: 163 KB, sm_86/89: 99 KB, sm_90: 227 KB) and returns PQK_ERR_HADAMARD_SIZE above.
PQK_HD long hadamard_smem_bytes(const HadamardShape& s) { return 4L * s.n + 4L * s.m * s.words; }

// 1/sqrt(n) rounded once from double: equal to hadamard.py's float32(1 / math.sqrt(n)).
inline float hadamard_default_scale(int n) { return (float)(1.0 / sqrt((double)n)); }

// ---- the butterfly -------------------------------------------------------------------------------------------
// One radix-2 stage at one element: `mine` is this element, `other` its partner across the stage's bit; the element
// with the bit clear gets u + w, the one with the bit set gets u - w = other - mine (u is always the bit-clear one).
PQK_HD float hadamard_butterfly(float mine, float other, bool upper) { return upper ? other - mine : mine + other; }

// ---- pass 1: shuffles ------------------------------------------------------------------------------------------
// Lane bits are b's bits 0..4, so stages 0..shuffle_stages-1 exchange with lane ^ (1 << j), j ascending.
PQK_HD int hadamard_shuffle_stages(int p) { return p < 5 ? p : 5; }
PQK_HD int hadamard_lane_mask(int j) { return 1 << j; }

// ---- passes 2..: three bits in registers ---------------------------------------------------------------------
PQK_HD int hadamard_reg_bits(int p, int lo) { return p - lo < kHadRegBits ? p - lo : kHadRegBits; }

// Group g of the pass on bits [lo, lo + nb): the 2^nb elements base + (e << lo), e < 2^nb. g's low lo bits stay in
// place (consecutive threads -> consecutive words: no bank conflicts, lo >= 5), its other bits move above the pass's
// bits. Those cover b's high bits and a alike, since i = a * P + b with P a power of two.
PQK_HD int hadamard_group_base(int g, int lo, int nb) {
  return ((g >> lo) << (lo + nb)) | (g & ((1 << lo) - 1));
}

// One thread's work on group g: load 8 (nb < 3: 2^nb) elements, stages lo, lo + 1, lo + 2 as register index bits
// 0, 1, 2, store. Fully unrolled with compile-time indices: the values stay in registers.
PQK_HD void hadamard_group_pass(float* row, int g, int lo, int nb) {
  const int base = hadamard_group_base(g, lo, nb), cnt = 1 << nb;
  float v[1 << kHadRegBits];
  PQK_HAD_UNROLL
  for (int e = 0; e < (1 << kHadRegBits); ++e) v[e] = e < cnt ? row[base + (e << lo)] : 0.0f;
  PQK_HAD_UNROLL
  for (int k = 0; k < kHadRegBits; ++k) {
    if (k >= nb) break;
    PQK_HAD_UNROLL
    for (int e = 0; e < (1 << kHadRegBits); ++e) {
      if (e & (1 << k)) continue;
      const float u = v[e], w = v[e | (1 << k)];
      v[e] = u + w;
      v[e | (1 << k)] = u - w;
    }
  }
  PQK_HAD_UNROLL
  for (int e = 0; e < (1 << kHadRegBits); ++e)
    if (e < cnt) row[base + (e << lo)] = v[e];
}

// ---- last pass: the m-point stage ----------------------------------------------------------------------------
// H_m as sign bits: bit k of word q of row a is set iff H_m[a, 32q + k] < 0. 4.1 KB for m = 172 instead of 116 KB of
// fp32, and the product with +-1 becomes a conditional negation (exact, like the multiply it replaces).
PQK_HD uint32_t hadamard_sign_word(const float* had_m, int m, int a, int q) {
  uint32_t w = 0;
  for (int k = 0; k < 32 && 32 * q + k < m; ++k) w |= (uint32_t)(had_m[a * m + 32 * q + k] < 0.0f) << k;
  return w;
}

// Work items of the last pass: m == 1: one per element (only the scale); else one per (4 rows a, column b).
PQK_HD int hadamard_out_items(const HadamardShape& s) { return s.m == 1 ? s.n : (s.m / kHadRowTile) << s.p; }

// Item w: rows a0..a0+3 = 4 * (w >> p) + r of column b = w mod P. Consecutive threads take consecutive b, so the
// shared reads rows[a' * P + b] hit distinct banks (or broadcast when P < 32) and the global stores are coalesced.
// Each z[a', b] read from shared memory serves 4 outputs.
//
// hadamard_accumulate adds the terms a' in [a_lo, a_hi) to acc (rows holds z's subrows a_lo .. a_hi - 1, P floats
// each), a' ascending. Splitting [0, m) into consecutive ranges therefore performs the same fp32 additions in the
// same order as one call over [0, m): the chunked kernel (rows longer than shared memory) is bit-identical too.
PQK_HD void hadamard_accumulate(const float* rows, const uint32_t* hbits, const HadamardShape& s, int w, int a_lo,
                                int a_hi, float (&acc)[kHadRowTile]) {
  const int P = 1 << s.p, b = w & (P - 1), a0 = (w >> s.p) * kHadRowTile;
  for (int q = a_lo >> 5; q < ((a_hi + 31) >> 5); ++q) {
    uint32_t bits[kHadRowTile];
    PQK_HAD_UNROLL
    for (int r = 0; r < kHadRowTile; ++r) bits[r] = hbits[(a0 + r) * s.words + q];
    const int k0 = a_lo - 32 * q > 0 ? a_lo - 32 * q : 0, k1 = a_hi - 32 * q < 32 ? a_hi - 32 * q : 32;
    for (int k = k0; k < k1; ++k) {
      const float z = rows[(32 * q + k - a_lo) * P + b];
      PQK_HAD_UNROLL
      for (int r = 0; r < kHadRowTile; ++r) acc[r] = acc[r] + (((bits[r] >> k) & 1u) ? -z : z);
    }
  }
}

// The 4 outputs of item w: store(i, v) writes output element i.
template <class Store>
PQK_HD void hadamard_store_item(const HadamardShape& s, int w, const float (&acc)[kHadRowTile], float scale,
                                Store&& store) {
  const int P = 1 << s.p, b = w & (P - 1), a0 = (w >> s.p) * kHadRowTile;
  PQK_HAD_UNROLL
  for (int r = 0; r < kHadRowTile; ++r) store((a0 + r) * P + b, acc[r] * scale);
}

template <class Store>
PQK_HD void hadamard_out_item(const float* row, const uint32_t* hbits, const HadamardShape& s, int w, float scale,
                              Store&& store) {
  if (s.m == 1) {
    store(w, row[w] * scale);
    return;
  }
  float acc[kHadRowTile];
  PQK_HAD_UNROLL
  for (int r = 0; r < kHadRowTile; ++r) acc[r] = 0.0f;
  hadamard_accumulate(row, hbits, s, w, 0, s.m, acc);
  hadamard_store_item(s, w, acc, scale, store);
}

// ---- rows longer than shared memory: the chunked kernel ------------------------------------------------------
// H_P acts on each subrow a (P contiguous elements) on its own, so the row can pass through shared memory a few
// subrows at a time: chunk [a_lo, a_hi) is loaded, butterflied exactly as in the one-chunk kernel, and its terms
// are added to accumulators each thread keeps in registers for its fixed output items (hadamard_accumulate: same
// additions, same order). Registers bound the row: kHadChunkItems items of 4 outputs per thread, so
// n <= 512 * 14 * 4 = 28672: exactly Llama-3-70B's intermediate size 28 * 1024, the one brief size that does not
// fit sm_86/89's 99 KB. 14 x 4 accumulators take 124-128 registers at 512 threads; 16 items spilled on sm_80/90.
constexpr int kHadChunkItems = 14;

PQK_HD int hadamard_items_per_thread(const HadamardShape& s) {
  return (hadamard_out_items(s) + kHadThreads - 1) / kHadThreads;
}

// Subrows per chunk that fit `budget` bytes of shared memory next to H_m's sign bits, at most m; 0 when the chunked
// kernel cannot take the shape: m == 1 (a power-of-two n has no a' sum to split), more items per thread than
// kHadChunkItems, or not even one subrow fits.
PQK_HD int hadamard_chunk_rows(const HadamardShape& s, long budget) {
  if (s.m == 1 || hadamard_items_per_thread(s) > kHadChunkItems) return 0;
  const long per_row = 4L << s.p, avail = budget - 4L * s.m * s.words;
  if (avail < per_row) return 0;
  return avail / per_row < s.m ? (int)(avail / per_row) : s.m;
}

PQK_HD long hadamard_chunked_smem_bytes(const HadamardShape& s, int chunk_rows) {
  return ((long)chunk_rows << s.p) * 4L + 4L * s.m * s.words;
}

}  // namespace cuda
}  // namespace pqk
