// The int8 peak of this CPU, measured: a throughput loop of the instruction each ISA's GEMM is built on, run on
// every thread of parallel_for for a given time (benchmarks/cpu_peak.py reports the GEMMs as % of it).
//   avx512vnni  vpdpbusd zmm   (64 u8 x s8 MACs = 128 int ops per instruction)
//   avxvnni     vpdpbusd ymm   (32 MACs = 64 ops)
//   avx2        vpmaddubsw ymm (32 MACs = 64 ops; a real AVX2 int8 GEMM also needs vpmaddwd / vpaddw to widen)
//   amx         tdpbusd        (16 x 16 x 64 = 16384 MACs per instruction, four tiles in flight)
// Benchmark-only: nothing in the ops calls it.
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <chrono>

#include "kernels.h"
#include "kernels_internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace pqk {
namespace cpu {
namespace {

// Inline asm, so the compiler can neither drop the work nor shuffle the accumulators through the stack (it did,
// with intrinsics: a register copy per instruction). 16 accumulators (vpdpbusd: 5-cycle latency, up to 2 per
// cycle needs 10 in flight); vpmaddubsw overwrites its destination, so it has no chain at all.
#define PQK_R16(OP, A, B, P)                                                                                  \
  OP " %%" P A ", %%" P B ", %%" P "0\n\t" OP " %%" P A ", %%" P B ", %%" P "1\n\t" OP " %%" P A ", %%" P B      \
     ", %%" P "2\n\t" OP " %%" P A ", %%" P B ", %%" P "3\n\t" OP " %%" P A ", %%" P B ", %%" P "4\n\t" OP " %%" \
     P A ", %%" P B ", %%" P "5\n\t" OP " %%" P A ", %%" P B ", %%" P "6\n\t" OP " %%" P A ", %%" P B ", %%" P   \
     "7\n\t" OP " %%" P A ", %%" P B ", %%" P "8\n\t" OP " %%" P A ", %%" P B ", %%" P "9\n\t" OP " %%" P A     \
     ", %%" P B ", %%" P "10\n\t" OP " %%" P A ", %%" P B ", %%" P "11\n\t" OP " %%" P A ", %%" P B ", %%" P    \
     "12\n\t" OP " %%" P A ", %%" P B ", %%" P "13\n\t"

__attribute__((target("avx2"), noinline)) void loop_avx2(int64_t iters) {
  // 14 destinations (ymm0-13), sources ymm14, ymm15: VEX reaches 16 registers
  __asm__ volatile(
      "vpxor %%ymm14, %%ymm14, %%ymm14\n\tvpxor %%ymm15, %%ymm15, %%ymm15\n\t"
      "1:\n\t" PQK_R16("vpmaddubsw", "15", "14", "ymm") "dec %0\n\tjnz 1b\n\t"
      : "+r"(iters)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
        "xmm13", "xmm14", "xmm15", "cc");
}

__attribute__((target("avx2,avxvnni"), noinline)) void loop_avxvnni(int64_t iters) {
  __asm__ volatile(
      "vpxor %%ymm14, %%ymm14, %%ymm14\n\tvpxor %%ymm15, %%ymm15, %%ymm15\n\t"
      "1:\n\t" PQK_R16("%{vex%} vpdpbusd", "15", "14", "ymm") "dec %0\n\tjnz 1b\n\t"
      : "+r"(iters)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
        "xmm13", "xmm14", "xmm15", "cc");
}

__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni"), noinline)) void loop_avx512vnni(int64_t iters) {
  __asm__ volatile(
      "vpxord %%zmm14, %%zmm14, %%zmm14\n\tvpxord %%zmm15, %%zmm15, %%zmm15\n\t"
      "1:\n\t" PQK_R16("vpdpbusd", "15", "14", "zmm") "dec %0\n\tjnz 1b\n\t"
      : "+r"(iters)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
        "xmm13", "xmm14", "xmm15", "cc");
}
#undef PQK_R16

// tdpbusd on four independent 16 x 16 int32 tiles from two A and two B tiles (16 x 64 bytes each, loaded once): the
// AMX prefill micro-kernel's instruction (amx_kernels.cpp) without its tile loads. 16384 MACs per instruction.
__attribute__((target("amx-tile,amx-int8"), noinline)) void loop_amx(int64_t iters) {
  static const AmxTileConfig cfg = [] {  // tiles 0-7: 16 rows of 64 bytes
    AmxTileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = 16;
    }
    return c;
  }();
  alignas(64) static const int8_t src[16 * 64] = {};
  _tile_loadconfig(&cfg);
  _tile_loadd(4, src, 64);
  _tile_loadd(5, src, 64);
  _tile_loadd(6, src, 64);
  _tile_loadd(7, src, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_release();
}

}  // namespace

double int8_peak_tops(Isa isa, double seconds) {
  if (isa == Isa::kAuto) isa = best_isa();
  if (isa == Isa::kScalar || !isa_supported(isa)) return 0.0;
  void (*loop)(int64_t) = isa == Isa::kAmx ? loop_amx : isa == Isa::kAvx512Vnni ? loop_avx512vnni
                        : isa == Isa::kAvxVnni ? loop_avxvnni : loop_avx2;
  const double ops_per_iter = isa == Isa::kAmx ? 4.0 * 16 * 16 * 64 * 2 : 14.0 * (isa == Isa::kAvx512Vnni ? 128 : 64);
  const int64_t chunk = isa == Isa::kAmx ? 1 << 12 : 1 << 16;
  std::atomic<int64_t> total{0};
  using clk = std::chrono::steady_clock;
  const auto t0 = clk::now();
  // one body per thread (parallel_for splits the range evenly), each running until `seconds` have passed
  parallel_for(0, 1 << 20, 1, [&](int64_t, int64_t) {
    int64_t n = 0;
    do {
      loop(chunk);
      n += chunk;
    } while (std::chrono::duration<double>(clk::now() - t0).count() < seconds);
    total += n;
  });
  const double dt = std::chrono::duration<double>(clk::now() - t0).count();
  return (double)total.load() * ops_per_iter / dt / 1e12;
}

}  // namespace cpu
}  // namespace pqk

#else
namespace pqk {
namespace cpu {
double int8_peak_tops(Isa, double) { return 0.0; }
}  // namespace cpu
}  // namespace pqk
#endif
