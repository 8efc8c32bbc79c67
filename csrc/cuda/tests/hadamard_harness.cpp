// Host execution of hadamard.cu's kernel (g++, no GPU): a block is emulated phase by phase between its barriers —
// pass 1 warp by warp with __shfl_xor_sync emulated over the 32 lanes (harness::shfl_xor), the register passes and
// the m-point stage thread by thread — and every index, butterfly, schedule and the sign-bit table are
// hadamard_math.cuh's own code. Rows are independent (a grid-stride loop), so they run one after the other.
//
//   hadamard_harness run <in.bin> <out.bin> [smem_budget]
//       in:  int32 [4] = m, rows, cols, 0; fp32 had_m [m * m] (only if m > 1); fp32 x [rows * cols]
//       out: fp32 y [rows * cols], the values the kernel rounds to its output dtype (before that rounding)
//       Checks every row against a float64 reference written from the definition (popcount signs, no butterflies)
//       and prints "hadamard_harness: N passed, M failed"; tests/cuda/test_hadamard.py also compares the output
//       bit for bit with prefixquant_kernels/hadamard.py.
//       With smem_budget (bytes of opt-in shared memory): the kernel the launcher would pick on such a device —
//       hadamard_chunked_kernel when the row does not fit (prints "path chunked chunk_rows R"; exit 3 with
//       status -6 when no kernel can take it).
//   hadamard_harness check <m> <rows> <cols>...
//       prints "status S smem B chunk_rows_99k R" per triple: the launcher's argument check (hadamard_shape), the
//       one-chunk kernel's shared-memory need, and the chunked kernel's subrows per chunk at sm_86/89's 99 KB.
#include <array>
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

// hadamard.cu's butterflies(): `count` elements of src -> dst (H_P on each subrow), pass 1 warp by warp with
// __shfl_xor_sync emulated over the 32 lanes, then the register passes thread by thread (between two barriers).
void emulate_butterflies(const float* src, float* dst, int count, const HadamardShape& s) {
  for (int warp = 0; warp < kHadWarps; ++warp)
    for (int base = warp * 32; base < count; base += kHadThreads) {
      std::vector<float> v(32);
      for (int lane = 0; lane < 32; ++lane) v[lane] = base + lane < count ? src[base + lane] : 0.0f;
      for (int j = 0; j < hadamard_shuffle_stages(s.p); ++j) {
        const int mask = hadamard_lane_mask(j);
        std::vector<float> other = harness::shfl_xor(v, mask);
        for (int lane = 0; lane < 32; ++lane) v[lane] = hadamard_butterfly(v[lane], other[lane], (lane & mask) != 0);
      }
      for (int lane = 0; lane < 32; ++lane)
        if (base + lane < count) dst[base + lane] = v[lane];
    }
  for (int lo = 5; lo < s.p; lo += kHadRegBits) {
    const int nb = hadamard_reg_bits(s.p, lo);
    for (int tid = 0; tid < kHadThreads; ++tid)
      for (int g = tid; g < (count >> nb); g += kHadThreads) hadamard_group_pass(dst, g, lo, nb);
  }
}

// One block of hadamard_kernel on one row: x_row -> y_row (fp32, before the dtype rounding of store_float).
// written counts each output element's stores (must end at exactly 1).
void emulate_row(const float* x_row, float* y_row, const uint32_t* hbits, const HadamardShape& s, float scale,
                 std::vector<int>& written) {
  std::vector<float> row_sh(s.n);
  emulate_butterflies(x_row, row_sh.data(), s.n, s);
  for (int tid = 0; tid < kHadThreads; ++tid)
    for (int w = tid; w < hadamard_out_items(s); w += kHadThreads)
      hadamard_out_item(row_sh.data(), hbits, s, w, scale, [&](int i, float v) {
        y_row[i] = v;
        ++written[i];
      });
}

// One block of hadamard_chunked_kernel on one row, chunk_rows subrows at a time: thread tid's item j is
// w = tid + j * kHadThreads, its accumulators live across chunks (the kernel's registers).
void emulate_row_chunked(const float* x_row, float* y_row, const uint32_t* hbits, const HadamardShape& s,
                         float scale, int chunk_rows, std::vector<int>& written) {
  const int items = hadamard_out_items(s);
  std::vector<float> chunk_sh((size_t)chunk_rows << s.p);
  std::vector<std::array<float, kHadRowTile>> acc((size_t)kHadThreads * kHadChunkItems);
  for (auto& a : acc) a.fill(0.0f);
  for (int a_lo = 0; a_lo < s.m; a_lo += chunk_rows) {
    const int a_hi = a_lo + chunk_rows < s.m ? a_lo + chunk_rows : s.m;
    emulate_butterflies(x_row + ((size_t)a_lo << s.p), chunk_sh.data(), (a_hi - a_lo) << s.p, s);
    for (int tid = 0; tid < kHadThreads; ++tid)
      for (int j = 0; j < kHadChunkItems; ++j)
        if (tid + j * kHadThreads < items) {
          float (&a)[kHadRowTile] = *reinterpret_cast<float(*)[kHadRowTile]>(acc[(size_t)tid * kHadChunkItems + j].data());
          hadamard_accumulate(chunk_sh.data(), hbits, s, tid + j * kHadThreads, a_lo, a_hi, a);
        }
  }
  for (int tid = 0; tid < kHadThreads; ++tid)
    for (int j = 0; j < kHadChunkItems; ++j)
      if (tid + j * kHadThreads < items) {
        const float (&a)[kHadRowTile] =
            *reinterpret_cast<const float(*)[kHadRowTile]>(acc[(size_t)tid * kHadChunkItems + j].data());
        hadamard_store_item(s, tid + j * kHadThreads, a, scale, [&](int i, float v) {
          y_row[i] = v;
          ++written[i];
        });
      }
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

// budget < 0: the one-chunk kernel (as on a GPU whose shared memory holds the row); else the launcher's choice for
// a device with `budget` bytes of opt-in shared memory (the chunked kernel when the row does not fit).
int run(const char* in_path, const char* out_path, long budget) {
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
  int chunk_rows = 0;  // 0: the one-chunk kernel
  if (budget >= 0 && hadamard_smem_bytes(s) > budget) {
    chunk_rows = hadamard_chunk_rows(s, budget);
    if (chunk_rows == 0) return std::fprintf(stderr, "status %d: no kernel for this shape and budget\n",
                                             PQK_ERR_HADAMARD_SIZE), 3;
    if (hadamard_chunked_smem_bytes(s, chunk_rows) > budget) return std::fprintf(stderr, "chunk over budget\n"), 2;
  }
  std::printf("path %s chunk_rows %d\n", chunk_rows ? "chunked" : "one-chunk", chunk_rows);

  harness::Counter cnt;
  std::vector<double> ref(s.n);
  for (int r = 0; r < rows; ++r) {
    const float* xr = x.data() + (size_t)r * cols;
    float* yr = y.data() + (size_t)r * cols;
    std::vector<int> written(s.n, 0);
    if (chunk_rows) emulate_row_chunked(xr, yr, hbits.data(), s, scale, chunk_rows, written);
    else emulate_row(xr, yr, hbits.data(), s, scale, written);
    for (int i = 0; i < s.n; ++i)
      if (written[i] != 1) yr[i] = NAN;  // an element written twice or never: the check below fails
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
  if ((argc == 4 || argc == 5) && std::strcmp(argv[1], "run") == 0)
    return run(argv[2], argv[3], argc == 5 ? std::atol(argv[4]) : -1L);
  if (argc >= 5 && (argc - 2) % 3 == 0 && std::strcmp(argv[1], "check") == 0) {
    for (int i = 2; i < argc; i += 3) {
      HadamardShape s;
      const int st = hadamard_shape(std::atoi(argv[i]), std::atoi(argv[i + 1]), std::atoi(argv[i + 2]), &s);
      // chunk rows for sm_86/89's 99 KB opt-in (101376 bytes) when the row does not fit there
      const int cr = st == PQK_OK && hadamard_smem_bytes(s) > 101376 ? hadamard_chunk_rows(s, 101376) : 0;
      std::printf("status %d smem %ld chunk_rows_99k %d\n", st, st == PQK_OK ? hadamard_smem_bytes(s) : 0L, cr);
    }
    return 0;
  }
  std::fprintf(stderr, "usage: hadamard_harness run <in> <out> | check <m> <rows> <cols>...\n");
  return 2;
}
