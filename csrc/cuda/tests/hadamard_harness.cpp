// Host execution of hadamard.cu's kernel (g++, no GPU): a block is emulated phase by phase between its barriers —
// pass 1 warp by warp with __shfl_xor_sync emulated over the 32 lanes (harness::shfl_xor), the register passes and
// the m-point stage thread by thread — and every index, butterfly, schedule and the sign-bit table are
// hadamard_math.cuh's own code. Rows are independent (a grid-stride loop), so they run one after the other.
//
//   hadamard_harness run <in.bin> <out.bin>
//       in:  int32 [4] = m, rows, cols, 0; fp32 had_m [m * m] (only if m > 1); fp32 x [rows * cols]
//       out: fp32 y [rows * cols], the values the kernel rounds to its output dtype (before that rounding)
//       Checks every row against a float64 reference written from the definition (popcount signs, no butterflies)
//       and prints "hadamard_harness: N passed, M failed"; tests/cuda/test_hadamard.py also compares the output
//       bit for bit with prefixquant_kernels/hadamard.py.
//   hadamard_harness check <m> <rows> <cols>...
//       prints "status S smem B" per triple: the launcher's argument check (hadamard_shape) and shared-memory need.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../hadamard_math.cuh"
#include "harness.h"

using namespace pqk;
using namespace pqk::cuda;

namespace {

// One block of hadamard_kernel on one row: x_row -> y_row (fp32, before the dtype rounding of store_float).
void emulate_row(const float* x_row, float* y_row, const uint32_t* hbits, const HadamardShape& s, float scale) {
  std::vector<float> row_sh(s.n);
  // pass 1: warp by warp, all 32 lanes of an iteration at once
  for (int warp = 0; warp < kHadWarps; ++warp)
    for (int base = warp * 32; base < s.n; base += kHadThreads) {
      std::vector<float> v(32);
      for (int lane = 0; lane < 32; ++lane) v[lane] = base + lane < s.n ? x_row[base + lane] : 0.0f;
      for (int j = 0; j < hadamard_shuffle_stages(s.p); ++j) {
        const int mask = hadamard_lane_mask(j);
        std::vector<float> other = harness::shfl_xor(v, mask);
        for (int lane = 0; lane < 32; ++lane) v[lane] = hadamard_butterfly(v[lane], other[lane], (lane & mask) != 0);
      }
      for (int lane = 0; lane < 32; ++lane)
        if (base + lane < s.n) row_sh[base + lane] = v[lane];
    }
  // register passes, thread by thread (between two barriers)
  for (int lo = 5; lo < s.p; lo += kHadRegBits) {
    const int nb = hadamard_reg_bits(s.p, lo);
    for (int tid = 0; tid < kHadThreads; ++tid)
      for (int g = tid; g < (s.n >> nb); g += kHadThreads) hadamard_group_pass(row_sh.data(), g, lo, nb);
  }
  // m-point stage
  std::vector<int> written(s.n, 0);
  for (int tid = 0; tid < kHadThreads; ++tid)
    for (int w = tid; w < hadamard_out_items(s); w += kHadThreads)
      hadamard_out_item(row_sh.data(), hbits, s, w, scale, [&](int i, float v) {
        y_row[i] = v;
        ++written[i];
      });
  for (int i = 0; i < s.n; ++i)
    if (written[i] != 1) y_row[i] = NAN;  // an element written twice or never: the check below fails
}

// float64 reference from the definition: z[a', b] = sum_b' (-1)^popcount(b & b') x[a', b'], y = H_m z / sqrt(n).
void reference_row(const float* x_row, double* y_row, const std::vector<float>& had, const HadamardShape& s) {
  const int P = 1 << s.p;
  std::vector<double> z(s.n);
  for (int a = 0; a < s.m; ++a)
    for (int b = 0; b < P; ++b) {
      double acc = 0.0;
      for (int b2 = 0; b2 < P; ++b2) acc += (__builtin_popcount(b & b2) & 1 ? -1.0 : 1.0) * x_row[a * P + b2];
      z[a * P + b] = acc;
    }
  for (int a = 0; a < s.m; ++a)
    for (int b = 0; b < P; ++b) {
      double acc = 0.0;
      for (int a2 = 0; a2 < s.m; ++a2) acc += (s.m == 1 ? 1.0 : (double)had[a * s.m + a2]) * z[a2 * P + b];
      y_row[a * P + b] = acc / std::sqrt((double)s.n);
    }
}

int run(const char* in_path, const char* out_path) {
  FILE* f = std::fopen(in_path, "rb");
  if (!f) return std::fprintf(stderr, "cannot open %s\n", in_path), 2;
  int32_t hdr[4];
  if (std::fread(hdr, 4, 4, f) != 4) return std::fprintf(stderr, "short header\n"), 2;
  const int m = hdr[0], rows = hdr[1], cols = hdr[2];
  HadamardShape s;
  if (int st = hadamard_shape(m, rows, cols, &s)) return std::fprintf(stderr, "bad shape, status %d\n", st), 2;
  std::vector<float> had(m > 1 ? (size_t)m * m : 0), x((size_t)rows * cols), y((size_t)rows * cols);
  if (std::fread(had.data(), 4, had.size(), f) != had.size() || std::fread(x.data(), 4, x.size(), f) != x.size())
    return std::fprintf(stderr, "short input\n"), 2;
  std::fclose(f);

  // the kernel's prologue: H_m's sign bits (done by each block; here once)
  std::vector<uint32_t> hbits((size_t)s.m * s.words, 0);
  if (s.m > 1)
    for (int q = 0; q < s.m * s.words; ++q) hbits[q] = hadamard_sign_word(had.data(), s.m, q / s.words, q % s.words);
  const float scale = hadamard_default_scale(s.n);

  harness::Counter cnt;
  std::vector<double> ref(s.n);
  for (int r = 0; r < rows; ++r) {
    const float* xr = x.data() + (size_t)r * cols;
    float* yr = y.data() + (size_t)r * cols;
    emulate_row(xr, yr, hbits.data(), s, scale);
    reference_row(xr, ref.data(), had, s);
    // fp32 error of p butterfly stages and an m-term sum, relative to the row's rms (|y| ~ rms(x))
    double ss = 0.0, worst = 0.0;
    for (int i = 0; i < s.n; ++i) ss += (double)xr[i] * xr[i];
    const double tol = 4e-7 * (s.p + s.m + 1) * std::sqrt(ss / s.n) + 1e-30;
    for (int i = 0; i < s.n; ++i) {
      const double err = std::fabs((double)yr[i] - ref[i]);
      worst = err > worst || err != err ? err : worst;
    }
    std::string what = "m=" + std::to_string(m) + " cols=" + std::to_string(cols) + " row=" + std::to_string(r) +
                       " max_err=" + std::to_string(worst) + " tol=" + std::to_string(tol);
    cnt.check(worst <= tol, what.c_str());
  }
  FILE* o = std::fopen(out_path, "wb");
  if (!o || std::fwrite(y.data(), 4, y.size(), o) != y.size()) return std::fprintf(stderr, "cannot write\n"), 2;
  std::fclose(o);
  return cnt.finish("hadamard_harness");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "run") == 0) return run(argv[2], argv[3]);
  if (argc >= 5 && (argc - 2) % 3 == 0 && std::strcmp(argv[1], "check") == 0) {
    for (int i = 2; i < argc; i += 3) {
      HadamardShape s;
      const int st = hadamard_shape(std::atoi(argv[i]), std::atoi(argv[i + 1]), std::atoi(argv[i + 2]), &s);
      std::printf("status %d smem %ld\n", st, st == PQK_OK ? hadamard_smem_bytes(s) : 0L);
    }
    return 0;
  }
  std::fprintf(stderr, "usage: hadamard_harness run <in> <out> | check <m> <rows> <cols>...\n");
  return 2;
}
