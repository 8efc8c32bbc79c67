// What the drivers (gemm.cpp, quantize.cpp) need from an instruction-set implementation
// (scalar_kernels.cpp, avx2_kernels.cpp): a table of row and tile functions over one data layout.
//
// The A panel. The GEMM driver turns a block of A rows (packed int4, int8 or float) into an int8
// panel [rows, kp] that the tile functions read, plus each row's sum and scale:
//   - kp = K rounded up to kChunk (64), tail zero-padded, so tiles never test for the end of A;
//   - with a 4-bit W the K order inside each 64-chunk is "nibble split": the 32 even k first, then the
//     32 odd k. That is the order in which one 32-byte load of packed W yields its low nibbles (even k)
//     and high nibbles (odd k), so W is used straight from its storage format with no reshuffle;
//   - with an 8-bit W the order is natural.
// Building the panel is where a float A is quantized (the fused static path): each element is read
// once, mapped by quantize_value, and written to the panel that the tiles consume from cache.
#pragma once

#include <stdint.h>

#include <string.h>

#include "../common/quant_math.h"
#include "float16.h"
#include "kernels.h"

namespace pqk {
namespace cpu {

constexpr int64_t kChunk = 64;  // K granularity of the A panel (64 int4 = 32 packed bytes = one ymm)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The prefill GEMM (gemm.cpp: gemm_prefill, M >= kPrefillMinM): W unpacked once per panel into a layout of the
// ISA's own, reused by every A row of an M-block; A panel rows natural-order uint8 (a + 128). x86_gemm_zmm.h.
// The epilogue's arguments for PrefillKernels::kernel_out: out[i, j] = float(acc[i, j] - 128 colsum[j]) *
// (a_scale[i] * w_scale[j]) (+ bias[j]) -> type t, j < nn, row stride ldo.
struct PfSide;
struct PfOut {
  const int32_t* colsum;
  const float* a_scale;
  const float* w_scale;
  const float* bias;  // or nullptr
  void* out;
  int64_t ldo;
  FloatType t;
  int nn;
  PfSide* side = nullptr;  // a side job the kernel runs between its k-steps (PrefillKernels::side), or none
  bool a_tiled = false;    // the A tile's layout (pf_a_offset): tiled, or row-major at the kernel's lda; read by a
                           // table with m_split_tiled (the others' kernel_out reads their a_tiled layout only)
};

// A side job for the prefill micro-kernel (gemm.cpp's M split): the next A slice built into its panel, 32 elements
// at a time, from any A source: bf16 x quantized with one static scale, int8 q, or packed int4 (what a fused
// producer's requant epilogue writes). The micro-kernel keeps both multiply pipes busy with vpdpbusd and leaves the
// others idle; quantizing between its k-steps costs ~6 cycles per 32 elements (the two divisions, on the multiply
// pipes) against ~16 as a pass of its own (docs/PERF.md step 24), and the integer sources need no multiply at all
// (step 32). The kernel takes up to one block per kPfSideEvery k-steps and advances src, (row, k) and n32;
// PrefillKernels::side does the rest.
struct PfSide {
  const void* src;    // the next elements, contiguous rows of K, as `kind` says: bf16 [n32 * 32] (kFloat),
                      // int8 [n32 * 32] (kInt8), or uint8 [n32 * 16] packed int4 (kPacked4, element 2i in byte i's
                      // low nibble)
  ASource kind;
  uint8_t* panel;     // the next slice's A panel (one K block of kc == K; PrefillKernels::a_tiled layout)
  int64_t row, k;     // where in it src's next 32 elements go: their panel bytes a + 128 (for bf16, a =
                      // quantize_value, bit for bit)
  int64_t kc;         // the panel's k per row (== K, a multiple of 32)
  bool tiled;         // the panel's layout (pf_a_offset)
  int64_t n32;        // blocks of 32 elements left
  float scale;        // kFloat only: the static scale (finite, > 0)
  int qmin, qmax;     // kFloat only
};

// Byte offset of A element (row, k) in an A panel's K block of kc k per row (PrefillKernels::a_tiled):
//   row-major  uint8 [rows][kc]
//   tiled      uint8 [rows / 16][kc / 64][16][64] (kc % 64 == 0): per 16-row group and 64-k step one contiguous 1 KB
//              AMX tile, loaded at row stride 64. Row-major, a tile's 16 rows sit kc bytes apart: at kc = 4096 all
//              16 lines fall in one L1 set (and 16 pages), and a 2 x 2 tile loop ran 30-40 % slower for it
//              (docs/PERF.md step 27).
// A 16-row group starts at the same byte, row * kc, in both layouts.
inline int64_t pf_a_offset(int64_t row, int64_t k, int64_t kc, bool tiled) {
  return tiled ? (row >> 4) * 16 * kc + (k >> 6) * 1024 + (row & 15) * 64 + (k & 63) : row * kc + k;
}

struct PrefillKernels {
  int mr, nr;      // micro-kernel tile: A rows x W columns (one micro panel)
  int64_t kc;      // k per W block, at most (a multiple of 8)
  int64_t rows;         // A rows per M-block, at most (W is unpacked once per M-block; the int32 c block is rows x nr)
  int64_t panel_bytes;  // and A panel bytes per M-block, at most (rows x K)
  bool w8;         // takes 8-bit W too (AVX2's vpmaddubsw pairs would saturate on W8: that table is W4 only)
  // W rows n0 .. n0+nn-1 (nn <= nr), k in [k0, k0 + kc) -> dst (64-byte aligned, panel_bytes(kc) bytes);
  // colsum[0:nr] += the sum of those w (int32)
  void (*pack_w)(const void* w, int w_bits, int64_t w_stride, int64_t n0, int nn, int64_t k0, int64_t kc,
                 int8_t* dst, int32_t* colsum);
  // c[0:mr, 0:nr] (row stride ldc) = (accumulate ? c : 0) + sum_k (a[i, k] + 128) * w[k, j] over ceil(kc/4)*4 k;
  // a table may skip the columns at and past nn (<= nr, the valid columns of the micro panel) or compute them
  void (*kernel)(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq, int mr, int nn, int32_t* c,
                 int64_t ldc, bool accumulate);
  // out[i, j] = float(c[i, j] - 128 colsum[j]) * (a_scale[i] * w_scale[j]) (+ bias[j]) -> type t; only for a
  // table without kernel_out (nullptr otherwise)
  void (*epilogue)(const int32_t* c, int64_t ldc, int mr, int nn, const int32_t* colsum, const float* a_scale,
                   const float* w_scale, const float* bias, void* out, int64_t ldo, FloatType t);
  // The last K block: kernel, then the epilogue straight from the accumulators (c is read if accumulate, never
  // written). nullptr: kernel, then epilogue (which the table must then give).
  void (*kernel_out)(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq, int mr, int nn, const int32_t* c,
                     int64_t ldc, bool accumulate, const PfOut& ep);
  // One row of A into the panel's K blocks (block b = k in [b kc, (b+1) kc) at dst + b * bstride, dst = the row's
  // pf_a_offset(row, 0, kc, tiled); its k at pf_a_offset(0, k, kc, tiled) from there), each byte a + 128,
  // zero-valued (0x80) past K to a whole block. nullptr: the driver's portable code (gemm.cpp).
  //   pack_a_float: x float [K] of type t quantized with scale to [qmin, qmax] (quantize_value, bit for bit)
  //   pack_a_int8:  q int8 [K]
  void (*pack_a_float)(const void* x, FloatType t, int64_t K, float scale, int qmin, int qmax, int64_t kc,
                       int64_t bstride, bool tiled, uint8_t* dst);
  //   pack_a_int4:  p uint8 [K / 2] packed int4 (element 2i in byte i's low nibble); nullptr: unpacked to int8
  //                 first, then pack_a_int8 (two passes)
  void (*pack_a_int8)(const int8_t* q, int64_t K, int64_t kc, int64_t bstride, bool tiled, uint8_t* dst);
  void (*pack_a_int4)(const uint8_t* p, int64_t K, int64_t kc, int64_t bstride, bool tiled, uint8_t* dst);
  // The side job's own pass: what is left of `side` built now. nullptr: this table's kernel_out runs no side
  // jobs.
  void (*side)(PfSide& side);
  // L2 sub-blocks (gemm.cpp, docs/PERF.md step 20): when one micro panel and >= 64 A rows of the whole K fit in
  // 3/4 of L2, each thread unpacks a chunk of its micro panels at once and runs them all over an L2-sized slice of
  // A rows before the next slice, so A is read from L2 rather than streamed from L3 once per micro panel.
  bool l2_blocks = false;
  // With l2_blocks: where fewer rows of the whole K than this fit L2 beside a micro panel (long K), K is cut into
  // blocks of at most L2 / (2 min_slice_rows) k, so that L2 slices of >= this many rows fit beside a chunk of (at
  // most this many) columns, and each slice runs K block by K block over the chunk (int32 partial sums between the
  // blocks). 0: the L2 rule alone (slices only where >= 64 rows of one K block fit, else none). For AMX, whose tiles
  // consume operands ~6x as fast as vpdpbusd: streaming A from L3 past one panel at a time left it L3-bound
  // (docs/PERF.md steps 26, 27).
  int64_t min_slice_rows = 0;
  // K granule of a W block (kc a multiple of it): the A panel rows and W panels hold whole granules, zero-valued past
  // K. 8 for the vpdpbusd kernels; 64 for AMX, whose tiles take 64 k per step.
  int64_t k_align = 8;
  // Outputs a kernel_out call may leave pending (amx_kernels.cpp stores a tile's outputs during the next call): stored
  // now. The driver calls it at the end of every chunk of micro panels and every slice of rows, before it rewrites
  // the column sums or row scales a pending PfOut points to, and so before each thread's work ends; nothing in
  // between allocates or throws. nullptr: kernel_out leaves nothing pending.
  void (*flush)() = nullptr;
  // The A panel's layout (pf_a_offset): false row-major, true AMX tiles (k_align a multiple of 64, mr of 16). The
  // kernels get the panel's first row of their tile and lda = kc either way.
  bool a_tiled = false;
  // The M split (gemm.cpp) builds its slices tiled where K % 64 == 0, and says so to kernel_out (PfOut::a_tiled):
  // row-major, a tile's 8 rows sit K bytes apart, at K = 4096 all in one L1 set beside the W stream; tiled, 64.
  // Where A streams from L3 (the N split) the row-major panel stays: tiled, it ran 3-33 % slower there (docs/PERF.md
  // step 36).
  bool m_split_tiled = false;
  // The driver takes this table from M = 64 up (gemm.cpp, kPrefillMinM), from M = 32 (kSmallMAnyW) for a table with
  // small_m > 0, and from M = small_m where all of W unpacked is at most kSmallWBytes: its W unpack, once per call,
  // then costs less than the decode tiles' (once per 4 A rows), which grow linearly in M (docs/PERF.md step 31:
  // ~3x at M = 8-16 for a 576 x 960 W on zmm / AMX). 0: from M = 64 only (AVX2's table loses to the tiles below it).
  int64_t small_m = 0;
};

// Byte offset of dword group q (k = 4q .. 4q+3), column c in a micro panel of nr columns: row-major int8 [kq][nr][4],
// or tiled (the AMX B tiles, amx_kernels.cpp; nr % 16 == 0): [kq / 16][nr / 16][16][16][4], per 64-k step one
// contiguous 1 KB tile of 16 groups x 16 columns for every 16 columns.
inline int64_t panel_offset(int64_t q, int c, int nr, bool tiled) {
  return tiled ? (q >> 4) * (nr * 64) + (c >> 4) * 1024 + (q & 15) * 64 + (c & 15) * 4 : q * 4 * nr + c * 4;
}

// The scalar end of a pack_w: the dword groups q in [q_full, ceil(kc / 4)) of one micro panel (dword (q, n) =
// w[n0 + n, k0 + 4q .. 4q+3], at panel_offset), zero padded past kc, colsum[n] += their sum. For the last, partial
// groups when kc is not a multiple of the vector loop's step. tiled: the caller has zeroed those groups' tiles.
inline void pack_w_tail(const void* w, int w_bits, int64_t w_stride, int64_t n0, int nn, int64_t k0, int64_t kc,
                        int64_t q_full, int nr, int8_t* dst, int32_t* colsum, bool tiled = false) {
  const int64_t kq = (kc + 3) / 4;
  if (q_full >= kq) return;
  if (!tiled) memset(dst + q_full * 4 * nr, 0, (size_t)((kq - q_full) * 4 * nr));
  for (int c = 0; c < nn; ++c) {
    int32_t s = 0;
    for (int64_t k = q_full * 4; k < kc; ++k) {
      int8_t v;
      if (w_bits == 4) {
        const uint8_t b = ((const uint8_t*)w)[(n0 + c) * w_stride + (k0 + k) / 2];
        v = ((k0 + k) & 1) ? high_nibble(b) : low_nibble(b);
      } else {
        v = ((const int8_t*)w)[(n0 + c) * w_stride + k0 + k];
      }
      dst[panel_offset(k / 4, c, nr, tiled) + (k % 4)] = v;
      s += v;
    }
    colsum[c] += s;
  }
}

// The 64-byte operand of ldtilecfg (AMX, palette 1): the AMX micro-kernel (amx_kernels.cpp) and the tdpbusd peak loop
// (peak.cpp) fill in their tiles' shapes.
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of tile t
  uint8_t rows[16] = {};    // rows of tile t
};

struct IsaKernels {
  const char* name;
  int mr_max, nr_max;  // largest tile of the tile functions (rows of A x rows of W)
  int nr_decode;       // W rows per tile_w4 call when A has a single row (decode: W streams once)

  // x: float [K] of type t -> q: int8 [K] natural order, q = quantize_value(x, scale, qmin, qmax)
  void (*quantize_row)(const void* x, FloatType t, int64_t K, float scale, int qmin, int qmax, int8_t* q);
  // max |x| over the finite elements of x: float [K] (0 if none)
  float (*row_amax)(const void* x, FloatType t, int64_t K);
  // q: int8 [K] natural order -> dst: int8 [round_up(K, 64)] nibble-split order, zero padded
  void (*split_row)(const int8_t* q, int64_t K, int8_t* dst);
  // q: int8 [K] natural order, K even -> p: uint8 [K/2] packed int4
  void (*pack_row)(const int8_t* q, int64_t K, uint8_t* p);
  // sum of q: int8 [n]
  int32_t (*row_sum)(const int8_t* q, int64_t n);
  // p: uint8 [K/2] packed int4 -> out: [K] of type t, out[k] = float(q[k]) * scale rounded once (KV cache)
  void (*dequant_row4)(const uint8_t* p, int64_t K, float scale, void* out, FloatType t);
  // Decode attention rows (kv_cache.cpp), all fp32: q [G, D] (row stride D), row [D]:
  //   dot_rows:  out[g] = sum_d q[g, d] * row[d]
  //   axpy_rows: acc[g, d] += coef[g] * row[d]
  //   exp_rows:  x[i] = exp(x[i] - shift) for i < n, returns their sum (the softmax numerators)
  void (*dot_rows)(const float* q, int64_t G, int64_t D, const float* row, float* out);
  //   qk_rows_q4: out[g * ld + j] = scale * sum_d q[g, d] * w_j[d] (the K pass over n body rows at once): w_j
  //   the int4 row rows + r_j * stride, uint8 [D/2] (unscaled), r_j = idx ? idx[j] : j; D % 16 == 0
  void (*qk_rows_q4)(const float* q, int64_t G, int64_t D, int64_t n, const uint8_t* rows, int64_t stride,
                     const int64_t* idx, float scale, float* out, int64_t ld);
  void (*axpy_rows)(const float* coef, int64_t G, int64_t D, const float* row, float* acc);
  //   pv_rows_q4: acc[g, d] += scale * sum_{j < n} coef[g * ld + j] * w_j[d] (the V pass over n body rows at
  //   once): w_j the int4 row rows + r_j * stride, uint8 [D/2] (unscaled), r_j = idx ? idx[j] : j; D % 16 == 0
  void (*pv_rows_q4)(const float* coef, int64_t ld, int64_t G, int64_t n, const uint8_t* rows, int64_t stride,
                     const int64_t* idx, float scale, int64_t D, float* acc);
  float (*exp_rows)(float* x, int64_t n, float shift);

  // acc: int32 [mr, nr] (row stride nr) = A[0:mr] . W[0:nr] over K, exact.
  //   a: int8 panel rows (stride kp, nibble-split order), a_rowsum: int32 [mr] (sum of each A row),
  //   w: uint8 [nr, K/2] packed int4 rows (stride w_stride bytes), a_bits: 4 or 8 (bounds |A|)
  void (*tile_w4)(const int8_t* a, int64_t kp, const int32_t* a_rowsum, int a_bits, const uint8_t* w,
                  int64_t w_stride, int64_t K, int mr, int nr, int32_t* acc);
  //   a: int8 panel rows (stride kp, natural order), w: int8 [nr, K] rows (stride w_stride)
  void (*tile_w8)(const int8_t* a, int64_t kp, const int8_t* w, int64_t w_stride, int64_t K, int mr,
                  int nr, int32_t* acc);
  const PrefillKernels* prefill;  // nullptr: prefill runs on the tiles above
  // The prefill attention's block products (attention.cpp), fp32; nullptr: attention.cpp's portable loops.
  //   qk_block: s[r, 0:64] = sum_d q[r, d] * kt[d, 0:64] for r < R (R % 4 == 0): q [R, D], kt [D, 64] (a block of
  //             64 keys, transposed), s [R, 64]
  //   pv_block: o[r, 0:D] += sum_{j < 64} p[r, j] * v[j, 0:D] for r < R (R % 4 == 0, D % 16 == 0): p [R, 64],
  //             v [64, D], o [R, D]
  void (*qk_block)(const float* q, int64_t R, int64_t D, const float* kt, float* s) = nullptr;
  void (*pv_block)(const float* p, int64_t R, const float* v, int64_t D, float* o) = nullptr;
  //   softmax_block: the online softmax step of one block (s [R, 64]): row r's first n[r] scores count (none if
  //             <= 0); m[r] <- max(m[r], their max), s[r] <- exp(s[r] - m[r]) (0 past n[r]), l[r] <- l[r] alpha +
  //             sum s[r], o[r, 0:D] *= alpha, alpha = exp(m_old - m_new)
  void (*softmax_block)(float* s, int64_t R, const int64_t* n, float* m, float* l, float* o, int64_t D) = nullptr;
  // The same two products for bf16 inputs where the CPU has AVX512-BF16 (x86_attention_bf16.h, vdpbf16ps);
  // nullptr: the fp32 blocks above run on the widened inputs. A pair is a uint32 holding two bf16, the even index in
  // the low half.
  //   qk_block_bf16: s[r, 0:64] = scale sum_d q[r, d] k[j, d] for r < R (R % 4 == 0): q bf16 [R, D] (D even), kt2
  //             [D / 2][64] pairs (key j's d = 2p, 2p + 1 at [p][j]), s fp32 [R, 64]
  //   pv_block_bf16: o[r, 0:D] += sum_{j < 64} bf16(p[r, j]) v[j, 0:D] for r < R (R % 4 == 0, D % 16 == 0): p fp32
  //             [R, 64], rounded to bf16 inside; v2 [32][D] pairs (keys 2i, 2i + 1 of column d at [i][d]); o [R, D]
  void (*qk_block_bf16)(const uint16_t* q, int64_t R, int64_t D, const uint32_t* kt2, float scale, float* s) = nullptr;
  void (*pv_block_bf16)(const float* p, int64_t R, const uint32_t* v2, int64_t D, float* o) = nullptr;
  // One row of HF's RMSNorm (float_ops.cpp; nullptr: its portable loop): out = to_t(w * to_t(x * rms_inv(x))), x, w
  // and out [n] of type t (the module's two roundings in a bf16 / fp16 model); tmp fp32 [n]
  void (*rms_norm_row)(const void* x, const void* w, FloatType t, int64_t n, float eps, void* out,
                       float* tmp) = nullptr;
  // One head row of HF's apply_rotary_pos_emb (float_ops.cpp; nullptr: its portable loop): out[d] =
  // to_t(to_t(x[d] c[d]) + to_t(rotate_half(x)[d] s[d])), rotate_half(x) = [-x[D/2:], x[:D/2]]; x, c, s, out [D] of
  // type t, D even (torch's three ops in a bf16 / fp16 model, each rounded)
  void (*rope_row)(const void* x, const void* c, const void* s, FloatType t, int64_t D, void* out) = nullptr;
  // silu_mul's vector loop (float_ops.cpp; nullptr: its expf loop): g[i] = g[i] / (1 + e^-g[i]) * up[i], fp32 [n]
  void (*silu_mul_row)(float* g, const float* up, int64_t n) = nullptr;
};

const IsaKernels& scalar_kernels();
const IsaKernels* avx2_kernels();  // nullptr when not built for x86-64
const IsaKernels* avxvnni_kernels();     // the AVX2 table with a vpdpbusd W4 tile (VEX); nullptr off x86-64
const IsaKernels* avx512vnni_kernels();  // the same with the EVEX encoding (AVX512-VNNI + VL)
const IsaKernels* amx_kernels();         // avx512vnni with the prefill GEMM on AMX tiles; nullptr where AMX is unusable
const IsaKernels& kernels_for(Isa isa);  // isa must be supported (kAuto resolved)

}  // namespace cpu
}  // namespace pqk
