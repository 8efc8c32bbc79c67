// How the AMX prefill micro-kernel (csrc/cpu/amx_kernels.cpp) should feed its tiles: the same 2 x 2 tdpbusd loop
// (two A tiles of 16 rows, two B tiles of 16 columns, four int32 C tiles) over data the size of one L2 slice of the
// real GEMM, in variants timed interleaved round by round (docs/PERF.md step 26). Standalone (no torch):
//
//     g++ -O2 benchmarks/amx_tile_loads.cpp -o /tmp/amx_tile_loads && /tmp/amx_tile_loads [K rows panels rounds]
//
// Default K = 4096, rows = 352 (A: rows x K u8, 1.4 MB), panels = 16 (W: 16 micro panels of 32 columns x K, 2 MB).
// Variants (W layout per 64-k step; what else the loop does):
//   peak        no tile loads at all (the tdpbusd ceiling on this core)
//   rowmajor    W [kq][32][4]: the two B tiles' rows interleaved, stride 128
//   tiled       W [step][2][16][64]: each B tile 1 KB contiguous, stride 64 (panel_offset's tiled layout); all
//               four tiles loaded, then the four tdpbusd
//   tiled-A1    tiled, the second A tile loaded after the first two tdpbusd
//   A-tiled     tiled-A1 with A in tile order too: per 16 rows and 64-k step one contiguous 1 KB (stride 64), not 16
//               rows K bytes apart (pf_a_offset, kernels_internal.h)                        <- amx_kernels.cpp
//   tiled+pf2   tiled, the B tiles of the step 2 ahead prefetched into L1 (32 prefetcht0)
//   tiled+pf4   the same 4 steps ahead
//   tiled+pfA   tiled+pf2, and the A rows of the step 2 ahead prefetched too
//   A-pf2       A-tiled, the two A tiles of the step 2 ahead prefetched into L1 (32 prefetcht0)
//   A-in-L1     A-tiled, but A read from its first two steps only (stays in L1): what feeding A costs; wrong sums
//   B-in-L1     A-tiled, but W read from its first two steps only: what feeding W costs; wrong sums
//   1x2-dbuf    16 rows x 32 columns (two C tiles), A and B tiles double-buffered (the next step's three loads
//               issued before this step's two tdpbusd: no wait for a tile register, but 3 loads per 2 tdpbusd)
//   2x1-dbuf    32 rows x 16 columns, the same double buffering (W in one column group's tile order)
// The VM of docs/PERF.md runs at two speeds (the bare tdpbusd loop ~2x faster in one); each round is put with the
// fast or the slow side by its own `peak` (above or below the geometric mean of the 5th and 95th percentile rounds'
// peaks, where those differ by 1.5x or more; else all rounds are one side), and each side reported apart.
// Needs AMX-TILE / AMX-INT8 and Linux's permission for the tile state (arch_prctl, requested below).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#pragma GCC target("amx-tile,amx-int8")

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

enum Variant {
  kPeak, kRowMajor, kTiled, kTiledA1, kATiled, kTiledPf2, kTiledPf4, kTiledPfA, kAPf2, kAInL1, kBInL1, k1x2Dbuf,
  k2x1Dbuf, kVariants
};
const char* kNames[kVariants] = {"peak",    "rowmajor",  "tiled",     "tiled-A1", "A-tiled",  "tiled+pf2", "tiled+pf4",
                                 "tiled+pfA", "A-pf2", "A-in-L1", "B-in-L1", "1x2-dbuf", "2x1-dbuf"};

// 1x2-dbuf: C (16 x 32) in tmm0, 1; A tiled (a + 1024 s); B tiles of step s in tmm4, 5 (s even) or tmm6, 7 (odd),
// A in tmm2 / tmm3
void kernel_1x2(const uint8_t* a, const int8_t* w, long steps, int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_loadd(2, a, 64);
  _tile_loadd(4, w, 64);
  _tile_loadd(5, w + 1024, 64);
  for (long s = 0; s < steps; s += 2) {  // steps even
    const int8_t* b = w + (s + 1) * 2048;
    _tile_loadd(3, a + 1024 * (s + 1), 64);
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b + 1024, 64);
    _tile_dpbusd(0, 2, 4);
    _tile_dpbusd(1, 2, 5);
    if (s + 2 < steps) {
      _tile_loadd(2, a + 1024 * (s + 2), 64);
      _tile_loadd(4, b + 2048, 64);
      _tile_loadd(5, b + 3072, 64);
    }
    _tile_dpbusd(0, 3, 6);
    _tile_dpbusd(1, 3, 7);
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
}

// 2x1-dbuf: C (32 x 16) in tmm0, 1; A rows 0-15 / 16-31 in tmm2, 3 (s even) or tmm4, 5 (odd); the column group's
// B tile of step s at w + 1024 s in tmm6 / tmm7
void kernel_2x1(const uint8_t* a, const uint8_t* a1, const int8_t* w, long steps, int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_loadd(2, a, 64);
  _tile_loadd(3, a1, 64);
  _tile_loadd(6, w, 64);
  for (long s = 0; s < steps; s += 2) {
    _tile_loadd(4, a + 1024 * (s + 1), 64);
    _tile_loadd(5, a1 + 1024 * (s + 1), 64);
    _tile_loadd(7, w + 1024 * (s + 1), 64);
    _tile_dpbusd(0, 2, 6);
    _tile_dpbusd(1, 3, 6);
    if (s + 2 < steps) {
      _tile_loadd(2, a + 1024 * (s + 2), 64);
      _tile_loadd(3, a1 + 1024 * (s + 2), 64);
      _tile_loadd(6, w + 1024 * (s + 2), 64);
    }
    _tile_dpbusd(0, 4, 7);
    _tile_dpbusd(1, 5, 7);
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
}

// Whether the variant reads A in tile order (pf_a_offset) rather than as rows K bytes apart
bool a_tiled(Variant v) { return v == kATiled || v >= kAPf2; }

// One call: C (32 x 32 int32) = A[32 rows, stride lda] . W panel over `steps` 64-k steps.
void kernel(Variant v, const uint8_t* a, long lda, const int8_t* w, long steps, int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  if (v == kPeak) {
    _tile_loadd(4, a, lda);
    _tile_loadd(5, a + 16 * lda, lda);
    _tile_loadd(6, w, 64);
    _tile_loadd(7, w + 1024, 64);
  }
  const int pf = v == kTiledPf2 || v == kTiledPfA ? 2 : v == kTiledPf4 ? 4 : 0;
  for (long s = 0; s < steps; ++s) {
    const int8_t* b = w + (v == kBInL1 ? (s & 1) : s) * 2048;
    const long sa = v == kAInL1 ? (s & 1) : s;  // the A step read
    if (v == kAPf2)
      for (int l = 0; l < 16; ++l) {
        _mm_prefetch((const char*)a + 1024 * (s + 2) + 64 * l, _MM_HINT_T0);
        _mm_prefetch((const char*)a + 16 * lda + 1024 * (s + 2) + 64 * l, _MM_HINT_T0);
      }
    if (v != kPeak) {
      if (pf)
        for (int l = 0; l < 32; ++l) _mm_prefetch((const char*)b + pf * 2048 + 64 * l, _MM_HINT_T0);
      if (v == kTiledPfA)
        for (int r = 0; r < 32; ++r) _mm_prefetch((const char*)a + r * lda + 64 * (s + 2), _MM_HINT_T0);
      if (a_tiled(v))
        _tile_loadd(4, a + 1024 * sa, 64);
      else
        _tile_loadd(4, a + 64 * s, lda);
      if (v == kRowMajor) {
        _tile_loadd(6, b, 128);
        _tile_loadd(7, b + 64, 128);
      } else {
        _tile_loadd(6, b, 64);
        _tile_loadd(7, b + 1024, 64);
      }
      if (!a_tiled(v) && v != kTiledA1) _tile_loadd(5, a + 16 * lda + 64 * s, lda);
    }
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    if (v == kTiledA1) _tile_loadd(5, a + 16 * lda + 64 * s, lda);
    if (a_tiled(v)) _tile_loadd(5, a + 16 * lda + 1024 * sa, 64);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 512, 128);
  _tile_stored(3, c + 528, 128);
}

int main(int argc, char** argv) {
  const long K = argc > 1 ? atol(argv[1]) : 4096, rows = argc > 2 ? atol(argv[2]) : 352,
             panels = argc > 3 ? atol(argv[3]) : 16;
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
    printf("no AMX tile state on this machine\n");
    return 1;
  }
  static const TileConfig cfg;
  _tile_loadconfig(&cfg);
  // patterned bytes (as a real GEMM's operands vary), not one constant
  std::vector<uint8_t> A((size_t)(rows * K));
  for (size_t i = 0; i < A.size(); ++i) A[i] = (uint8_t)(i * 7 + 3);
  const size_t wbytes = (size_t)(panels * K * 32 + 8 * 2048);  // + the prefetches past the last panel
  int8_t* W = (int8_t*)aligned_alloc(64, wbytes);
  for (size_t i = 0; i < wbytes; ++i) W[i] = (int8_t)(i * 13 + 1);
  alignas(64) static int32_t C[32 * 32];
  const int rounds = argc > 4 ? atoi(argv[4]) : 9;
  std::vector<double> t[kVariants];  // seconds, per round
  for (int r = 0; r < rounds; ++r) {
    for (int v = 0; v < kVariants; ++v) {
      const auto t0 = std::chrono::steady_clock::now();
      for (long p = 0; p < panels; ++p) {
        const int8_t* wp = W + p * K * 32;
        for (long i = 0; i < rows; i += 32) {
          const uint8_t* a = A.data() + i * K;
          if (v == k1x2Dbuf) {
            kernel_1x2(a, wp, K / 64, C);
            kernel_1x2(a + 16 * K, wp, K / 64, C);
          } else if (v == k2x1Dbuf) {
            kernel_2x1(a, a + 16 * K, wp, K / 64, C);
            kernel_2x1(a, a + 16 * K, wp + 16 * K, K / 64, C);
          } else {
            kernel((Variant)v, a, K, wp, K / 64, C);
          }
        }
      }
      t[v].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  const double ops = 2.0 * rows * K * 32 * panels;
  std::vector<double> pt = t[kPeak];  // the peak's times, sorted
  std::sort(pt.begin(), pt.end());
  const double lo = pt[rounds / 20], hi = pt[rounds - 1 - rounds / 20];
  const bool two = hi / lo >= 1.5;  // peak times: two sides seen
  const double cut = std::sqrt(lo * hi);
  printf("K = %ld, %ld rows, %ld panels of 32 columns, one thread, %d interleaved rounds: TOPS median [min-max]\n", K,
         rows, panels, rounds);
  for (int fast = 1; fast >= 0; --fast) {
    std::vector<int> in;  // this side's rounds
    for (int r = 0; r < rounds; ++r)
      if (!two || (t[kPeak][r] < cut) == (bool)fast) in.push_back(r);
    if (in.empty() || (!two && !fast)) continue;
    printf(" %s: %zu rounds\n", !two ? "one side of the VM" : fast ? "fast side" : "slow side", in.size());
    for (int v = 0; v < kVariants; ++v) {
      std::vector<double> x;
      for (int r : in) x.push_back(ops / t[v][r] / 1e12);
      std::sort(x.begin(), x.end());
      printf("  %-10s %.2f TOPS [%.2f-%.2f]\n", kNames[v], x[x.size() / 2], x.front(), x.back());
    }
  }
  _tile_release();
  free(W);
  return 0;
}
