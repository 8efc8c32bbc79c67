// Per-thread and per-warp math of the activation kernels (quantize.cu), as PQK_HD functions the host harness runs
// (tests/quantize_harness.cpp): which elements a thread visits, in which order it accumulates them, the butterfly
// schedule of the warp reduction and the order warps are combined — so the fp32 sum of squares of RMSNorm is the
// same bits on the host and on the GPU — and the per-element formulas. Quantization itself is quant_math.h's.
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>

#include "../common/quant_math.h"

namespace pqk {
namespace cuda {

constexpr int kRowThreads = 256;             // one block per row for the row kernels (per-token, RMSNorm)
constexpr int kRowWarps = kRowThreads / 32;

// Element pairs of a row handled by thread tid: fn(p, has_second) for pair p = tid, tid + threads, ... (pair p =
// elements 2p, 2p+1: the two nibbles of output byte p; consecutive threads touch consecutive pairs: coalesced).
// cols is even for bits 4; for bits 8 an odd last pair has one element.
template <class Fn>
PQK_HD void for_each_pair(int cols, int tid, int threads, Fn&& fn) {
  for (int p = tid; 2 * p < cols; p += threads) fn(p, 2 * p + 1 < cols);
}

// The thread's partial reduction, acc = step(acc, x) in pair order. load(i) returns element i as fp32.
template <class Load, class Step>
PQK_HD float thread_reduce(Load&& load, int cols, int tid, int threads, float init, Step&& step) {
  float acc = init;
  for_each_pair(cols, tid, threads, [&](int p, bool two) {
    acc = step(acc, load(2 * p));
    if (two) acc = step(acc, load(2 * p + 1));
  });
  return acc;
}

// max |x| over finite x (a NaN or Inf does not poison its row's scale; format.py per_token_scale).
PQK_HD float amax_step(float acc, float x) {
  float a = fabsf(x);
  return (a <= FLT_MAX && a > acc) ? a : acc;
}
PQK_HD float max_combine(float a, float b) { return a > b ? a : b; }
// Sum of squares: x * x then + (the .cu files are built with -fmad=false: no FMA contraction, host-identical).
PQK_HD float sumsq_step(float acc, float x) { return acc + x * x; }
PQK_HD float sum_combine(float a, float b) { return a + b; }

// Warp butterfly: step s (0..4) exchanges with lane ^ butterfly_offset(s) (16, 8, 4, 2, 1); after 5 steps every lane
// holds the same total. Then warp totals are combined in warp order 0, 1, ... by every thread.
PQK_HD int butterfly_offset(int step) { return 16 >> step; }
template <class Combine>
PQK_HD float combine_warps(const float* warp_totals, int warps, Combine&& combine) {
  float r = warp_totals[0];
  for (int w = 1; w < warps; ++w) r = combine(r, warp_totals[w]);
  return r;
}

// RMSNorm in fp32: y = (x * inv_rms) * weight, inv_rms = 1 / sqrt(sum(x^2) / cols + eps). sqrtf and the division
// are IEEE-rounded on the GPU (nvcc's defaults, -prec-sqrt/-prec-div true), so host and device agree bit for bit.
// q is quantized from this fp32 y (not from its 16-bit rounding): fused quantize sees no extra rounding step.
PQK_HD float rms_inv(float sumsq, int cols, float eps) { return 1.0f / sqrtf(sumsq / (float)cols + eps); }
PQK_HD float rms_value(float x, float inv, float w) { return (x * inv) * w; }

// One output unit: bits 4 -> the byte of pair p; bits 8 -> element i. qmax/qmin by bits.
PQK_HD uint8_t quantize_pair4(float x0, float x1, float scale) {
  return pack_nibbles(quantize_value(x0, scale, -8, 7), quantize_value(x1, scale, -8, 7));
}
PQK_HD int8_t quantize8(float x, float scale) { return quantize_value(x, scale, -128, 127); }

// Writes pair p's quantized output into a row of q (uint8 [cols/2] for bits 4, int8 [cols] for bits 8).
PQK_HD void store_quantized_pair(int bits, void* q_row, long p, bool two, float y0, float y1, float scale) {
  if (bits == 4) {
    static_cast<uint8_t*>(q_row)[p] = quantize_pair4(y0, y1, scale);
  } else {
    static_cast<int8_t*>(q_row)[2 * p] = quantize8(y0, scale);
    if (two) static_cast<int8_t*>(q_row)[2 * p + 1] = quantize8(y1, scale);
  }
}

}  // namespace cuda
}  // namespace pqk
