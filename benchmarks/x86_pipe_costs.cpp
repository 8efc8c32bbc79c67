// What an AVX-512 instruction costs *beside* a vpdpbusd loop: which work can ride along the prefill micro-kernel for
// free (docs/PERF.md step 25). Standalone (no torch, no extension):
//
//     g++ -O2 -march=native benchmarks/x86_pipe_costs.cpp -o /tmp/x86_pipe_costs && /tmp/x86_pipe_costs
//
// Each loop is inline assembly (the compiler does not move or spill anything): 12 independent zmm vpdpbusd
// (zmm0-11, the kernel's accumulators), then 6 independent copies of the instruction under test writing zmm12-17 /
// k2-k7 from zmm30/31 (nothing reads them back, so only throughput counts). Reported per instruction, in TSC ticks
// (not core cycles: the ratio is what matters): alone (6 of them), and the cost beside the 12 vpdpbusd in vpdpbusd
// slots: 0 = free (another pipe), 1 = takes a vpdpbusd's place. Needs AVX512-VNNI/BW/VBMI/BF16/IFMA (Zen 4 has all).
#include <x86intrin.h>

#include <cstdint>
#include <cstdio>

#define DP(r) "vpdpbusd %%zmm30,%%zmm31,%%zmm" #r "\n"
#define DP12 DP(0) DP(1) DP(2) DP(3) DP(4) DP(5) DP(6) DP(7) DP(8) DP(9) DP(10) DP(11)
// six copies of `ins` with destinations zmm12-17 (Z6), k2-k7 (K6) or ymm12-17 (Y6); `post` follows the destination
#define Z6(ins, post) ins "%%zmm12" post "\n" ins "%%zmm13" post "\n" ins "%%zmm14" post "\n" ins "%%zmm15" post "\n" \
                      ins "%%zmm16" post "\n" ins "%%zmm17" post "\n"
#define K6(ins) ins "%%k2\n" ins "%%k3\n" ins "%%k4\n" ins "%%k5\n" ins "%%k6\n" ins "%%k7\n"
#define Y6(ins) ins "%%ymm12\n" ins "%%ymm13\n" ins "%%ymm14\n" ins "%%ymm15\n" ins "%%ymm16\n" ins "%%ymm17\n"
// n iterations of body -> TSC ticks per iteration; zmm30 = 0, zmm31 = all ones, k1 = all ones
#define LOOP(body)                                                                                                \
  [](long n) {                                                                                                    \
    const uint64_t t0 = __rdtsc();                                                                                \
    __asm__ volatile("vpxord %%zmm30,%%zmm30,%%zmm30\n vpternlogd $0xff,%%zmm31,%%zmm31,%%zmm31\n"                 \
                     "kxnorq %%k1,%%k1,%%k1\n 1:\n" body "dec %0\n jnz 1b\n"                                      \
                     : "+r"(n)::"memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", \
                       "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm30",   \
                       "xmm31", "k1", "k2", "k3", "k4", "k5", "k6", "k7");                                       \
    return double(__rdtsc() - t0);                                                                                \
  }
#define CASE(name, six) {name, LOOP(six), LOOP(DP12 six)}
#define ZZ "%%zmm30,%%zmm31,"

struct Case {
  const char* name;
  double (*alone)(long);
  double (*beside)(long);
};

int main() {
  const long n = 20000000;
  auto dp = LOOP(DP12);
  dp(n / 10);
  const double base = dp(n) / n;
  printf("12 zmm vpdpbusd: %.2f ticks per iteration\n\n", base);
  const Case cases[] = {
      // multiplies: every one shares the vpdpbusd pipes (the int8 peak is the ceiling: no second multiplier)
      CASE("vpmaddubsw", Z6("vpmaddubsw " ZZ, "")), CASE("vpmaddwd", Z6("vpmaddwd " ZZ, "")),
      CASE("vpmullw", Z6("vpmullw " ZZ, "")), CASE("vpmuludq", Z6("vpmuludq " ZZ, "")),
      CASE("vpmadd52luq", Z6("vpmadd52luq " ZZ, "")), CASE("vdpbf16ps", Z6("vdpbf16ps " ZZ, "")),
      CASE("vmulps", Z6("vmulps " ZZ, "")), CASE("vrcp14ps", Z6("vrcp14ps %%zmm30,", "")),
      CASE("vdivps", Z6("vdivps " ZZ, "")),
      // compares into a mask, saturating and sad arithmetic, gf2p8
      CASE("vpcmpeqb -> k", K6("vpcmpeqb " ZZ)), CASE("vpcmpd -> k", K6("vpcmpd $1," ZZ)),
      CASE("vptestmb -> k", K6("vptestmb " ZZ)), CASE("vpmovb2m", K6("vpmovb2m %%zmm30,")),
      CASE("vpsubusb", Z6("vpsubusb " ZZ, "")), CASE("vpsadbw", Z6("vpsadbw " ZZ, "")),
      CASE("vgf2p8affineqb", Z6("vgf2p8affineqb $0," ZZ, "")),
      // two-table and masked permutes
      CASE("vpermi2b", Z6("vpermi2b " ZZ, "")), CASE("vpermi2w", Z6("vpermi2w " ZZ, "")),
      CASE("vpermi2ps", Z6("vpermi2ps " ZZ, "")), CASE("vpermb {k1}", Z6("vpermb " ZZ, "%{%%k1%}")),
      // the free ones
      CASE("vpermb", Z6("vpermb " ZZ, "")), CASE("vpermw", Z6("vpermw " ZZ, "")), CASE("vpermd", Z6("vpermd " ZZ, "")),
      CASE("vpermps", Z6("vpermps " ZZ, "")), CASE("vpshufb", Z6("vpshufb " ZZ, "")),
      CASE("vpblendmb {k1}", Z6("vpblendmb " ZZ, "%{%%k1%}")), CASE("vpaddw", Z6("vpaddw " ZZ, "")),
      CASE("vpaddd", Z6("vpaddd " ZZ, "")), CASE("vpminuw", Z6("vpminuw " ZZ, "")),
      CASE("vpsrlw", Z6("vpsrlw $3,%%zmm30,", "")), CASE("vpsrlvd", Z6("vpsrlvd " ZZ, "")),
      CASE("vpmovwb", Y6("vpmovwb %%zmm30,")), CASE("vgetmantps", Z6("vgetmantps $0,%%zmm30,", "")),
      CASE("vcvtph2ps", Z6("vcvtph2ps %%ymm30,", "")), CASE("vaddps", Z6("vaddps " ZZ, "")),
  };
  printf("%-16s %18s %26s\n", "instruction", "6 alone: ticks", "beside 12 vpdpbusd: slots");
  for (const Case& c : cases) {
    c.alone(n / 10);
    const double a = c.alone(n) / n, b = c.beside(n) / n;
    printf("%-16s %12.2f (%.2f/op) %16.2f per op\n", c.name, a, a / 6, (b - base) / base * 12 / 6);
  }
}
