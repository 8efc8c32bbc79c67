// How the AMX prefill micro-kernel (csrc/cpu/amx_kernels.cpp) should feed its tiles: the same 2 x 2 tdpbusd loop
// (two A tiles of 16 rows, two B tiles of 16 columns, four int32 C tiles) over data the size of one L2 slice of the
// real GEMM, in variants timed interleaved round by round (docs/PERF.md step 26). Standalone (no torch):
//
//     g++ -O2 benchmarks/amx_tile_loads.cpp -o /tmp/amx_tile_loads && /tmp/amx_tile_loads [K rows panels]
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
// Needs AMX-TILE / AMX-INT8 and Linux's permission for the tile state (arch_prctl, requested below).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
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

enum Variant { kPeak, kRowMajor, kTiled, kTiledA1, kATiled, kTiledPf2, kTiledPf4, kTiledPfA, kVariants };
const char* kNames[kVariants] = {"peak",    "rowmajor",  "tiled",     "tiled-A1",
                                 "A-tiled", "tiled+pf2", "tiled+pf4", "tiled+pfA"};

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
    const int8_t* b = w + s * 2048;
    if (v != kPeak) {
      if (pf)
        for (int l = 0; l < 32; ++l) _mm_prefetch((const char*)b + pf * 2048 + 64 * l, _MM_HINT_T0);
      if (v == kTiledPfA)
        for (int r = 0; r < 32; ++r) _mm_prefetch((const char*)a + r * lda + 64 * (s + 2), _MM_HINT_T0);
      if (v == kATiled)
        _tile_loadd(4, a + 1024 * s, 64);
      else
        _tile_loadd(4, a + 64 * s, lda);
      if (v == kRowMajor) {
        _tile_loadd(6, b, 128);
        _tile_loadd(7, b + 64, 128);
      } else {
        _tile_loadd(6, b, 64);
        _tile_loadd(7, b + 1024, 64);
      }
      if (v != kTiledA1 && v != kATiled) _tile_loadd(5, a + 16 * lda + 64 * s, lda);
    }
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    if (v == kTiledA1) _tile_loadd(5, a + 16 * lda + 64 * s, lda);
    if (v == kATiled) _tile_loadd(5, a + 16 * lda + 1024 * s, 64);
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
  const int rounds = 9;
  std::vector<double> t[kVariants];
  for (int r = 0; r < rounds; ++r) {
    for (int v = 0; v < kVariants; ++v) {
      const auto t0 = std::chrono::steady_clock::now();
      for (long p = 0; p < panels; ++p)
        for (long i = 0; i < rows; i += 32) kernel((Variant)v, A.data() + i * K, K, W + p * K * 32, K / 64, C);
      t[v].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  const double ops = 2.0 * rows * K * 32 * panels;
  printf("K = %ld, %ld rows, %ld panels of 32 columns, one thread, %d interleaved rounds: TOPS median [min-max time]\n",
         K, rows, panels, rounds);
  for (int v = 0; v < kVariants; ++v) {
    std::sort(t[v].begin(), t[v].end());
    printf("  %-10s %.2f TOPS [%.2f-%.2f]\n", kNames[v], ops / t[v][rounds / 2] / 1e12, ops / t[v].back() / 1e12,
           ops / t[v][0] / 1e12);
  }
  _tile_release();
  free(W);
  return 0;
}
