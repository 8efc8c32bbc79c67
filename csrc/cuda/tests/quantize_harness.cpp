// Host execution of quantize.cu's kernels (g++, no GPU): threads of a row block are loops, the warp butterfly runs
// on harness::shfl_xor, and every per-thread loop, reduction step, combine order and formula is quantize_math.cuh's
// own code. Checked against naive references written from format.py: static and per-token quantization bit-exact
// (NaN/Inf included; max is order-free), RMSNorm's fp32 output within 2 ulp-scale of a float64 reference and its int
// codes equal except where the float64 value sits within 1e-4 of a rounding tie.
// Usage: quantize_harness [seed]; exit code 0 iff every case passed.
#include <cmath>
#include <cstdlib>
#include <string>

#include "../quantize_math.cuh"
#include "harness.h"

using namespace pqk;
using namespace pqk::cuda;
using harness::Counter;
using harness::Rng;

namespace {

enum Mode { kStatic, kPerToken, kRmsNorm };

// The row kernel for one row: returns the block-reduced value every thread sees.
template <class Step, class Combine>
float emulate_block_reduce(const float* xr, int cols, float init, Step step, Combine combine) {
  std::vector<float> v(kRowThreads);
  for (int tid = 0; tid < kRowThreads; ++tid)
    v[tid] = thread_reduce([&](int i) { return xr[i]; }, cols, tid, kRowThreads, init, step);
  for (int s = 0; s < 5; ++s) {
    std::vector<float> other = harness::shfl_xor(v, butterfly_offset(s));
    for (int l = 0; l < kRowThreads; ++l) v[l] = combine(v[l], other[l]);
  }
  float totals[kRowWarps];
  for (int w = 0; w < kRowWarps; ++w) totals[w] = v[w * 32];  // lane 0 of each warp writes
  return combine_warps(totals, kRowWarps, combine);
}

void check_case(Mode mode, int bits, int rows, int cols, bool specials, Rng& rng, Counter& cnt) {
  std::vector<float> x((size_t)rows * cols), w(cols);
  for (auto& e : x) e = rng.uniform(-3.0f, 3.0f);
  for (auto& e : w) e = rng.uniform(0.5f, 1.5f);
  if (specials && x.size() >= 4) {
    x[0] = NAN; x[1] = INFINITY; x[x.size() - 1] = -INFINITY; x[x.size() / 2] = 1e30f;
  }
  const float scale = rng.uniform(0.05f, 0.5f), eps = 1e-6f;
  const int ob = bits == 4 ? cols / 2 : cols;  // output bytes per row
  std::vector<uint8_t> q((size_t)rows * ob, 0xEE);
  std::vector<float> y((size_t)rows * cols, NAN), scales(rows, NAN);
  long bad = 0;
  const int qmn = -(1 << (bits - 1)), qmx = (1 << (bits - 1)) - 1;
  for (int r = 0; r < rows; ++r) {
    const float* xr = x.data() + (size_t)r * cols;
    float s = scale, inv = 0.0f;
    if (mode == kPerToken) {
      s = per_token_scale_from_amax(emulate_block_reduce(xr, cols, 0.0f, amax_step, max_combine), qmax_for_bits(bits));
      scales[r] = s;
    } else if (mode == kRmsNorm) {
      inv = rms_inv(emulate_block_reduce(xr, cols, 0.0f, sumsq_step, sum_combine), cols, eps);
    }
    // the output pass (static: the flat kernel visits the same pairs; rows do not matter for it)
    for (int tid = 0; tid < kRowThreads; ++tid)
      for_each_pair(cols, tid, kRowThreads, [&](int p, bool two) {
        float y0 = xr[2 * p], y1 = two ? xr[2 * p + 1] : 0.0f;
        if (mode == kRmsNorm) {
          y0 = rms_value(y0, inv, w[2 * p]);
          if (two) y1 = rms_value(y1, inv, w[2 * p + 1]);
          y[(size_t)r * cols + 2 * p] = y0;
          if (two) y[(size_t)r * cols + 2 * p + 1] = y1;
        }
        store_quantized_pair(bits, q.data() + (size_t)r * ob, p, two, y0, y1, s);
      });
    // naive references
    double ss = 0.0;
    float amax = 0.0f;
    for (int i = 0; i < cols; ++i) {
      ss += (double)xr[i] * xr[i];
      if (std::isfinite(xr[i]) && std::fabs(xr[i]) > amax) amax = std::fabs(xr[i]);
    }
    const float s_ref = mode == kPerToken ? (amax > 0 ? amax / (float)qmx : 1.0f) : scale;
    if (mode == kPerToken && !harness::same_bits(s_ref, scales[r])) ++bad;
    const double inv_ref = 1.0 / std::sqrt(ss / cols + eps);
    for (int i = 0; i < cols; ++i) {
      int got = bits == 4 ? (i % 2 ? high_nibble(q[(size_t)r * ob + i / 2]) : low_nibble(q[(size_t)r * ob + i / 2]))
                          : (int8_t)q[(size_t)r * ob + i];
      if (mode != kRmsNorm) {
        float v = xr[i] / s_ref;  // format.py: float32 x / scale, NaN -> 0, saturate, round half even
        int want = v != v ? 0 : v <= qmn ? qmn : v >= qmx ? qmx : (int)std::nearbyint(v);
        bad += got != want;
      } else {
        double yr = (double)xr[i] * inv_ref * w[i];
        float yk = y[(size_t)r * cols + i];
        bad += !(std::fabs(yk - yr) <= 1e-5 * std::fabs(yr) + 1e-30);
        double v = yr / scale;
        bool near_tie = std::fabs(std::fabs(v - std::floor(v)) - 0.5) < 1e-4;
        int want = v <= qmn ? qmn : v >= qmx ? qmx : (int)std::nearbyint(v);
        bad += got != want && !near_tie;
      }
    }
  }
  std::string what = std::string(mode == kStatic ? "static" : mode == kPerToken ? "per-token" : "rmsnorm") +
                     " bits=" + std::to_string(bits) + " rows=" + std::to_string(rows) + " cols=" + std::to_string(cols) +
                     " mismatches=" + std::to_string(bad);
  cnt.check(bad == 0, what.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  Rng rng(argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1);
  Counter cnt;
  const int shapes[][2] = {{1, 2}, {3, 30}, {2, 512}, {5, 1000}, {2, 4098}, {1, 11008}};
  for (int mode = kStatic; mode <= kRmsNorm; ++mode)
    for (int bits : {4, 8})
      for (auto& s : shapes) check_case((Mode)mode, bits, s[0], s[1], mode != kRmsNorm, rng, cnt);
  check_case(kPerToken, 8, 3, 31, true, rng, cnt);  // odd cols: int8 only
  return cnt.finish("quantize_harness");
}
