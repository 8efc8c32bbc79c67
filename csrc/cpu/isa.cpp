// Which instruction-set implementation runs: detected once from cpuid, overridable for tests and
// benchmarks (the op layer passes an explicit Isa; PQK_CPU_ISA=scalar|avx2|avxvnni|avx512vnni|amx lowers
// the default, never above what the CPU supports).
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "kernels_internal.h"

namespace pqk {
namespace cpu {

#if defined(__x86_64__) || defined(_M_X64)
// libgcc's checks include the OS's XSAVE support for the ymm state (and for the AVX-512 state:
// EVEX-encoded ymm instructions need the opmask registers enabled too).
static bool cpu_avx2() { return __builtin_cpu_supports("avx2"); }
#ifdef PQK_VNNI_EMULATE  // tests: the VNNI tables run an exact AVX2 emulation of vpdpbusd (vnni_kernels.cpp)
static bool cpu_avxvnni() { return cpu_avx2(); }
static bool cpu_avx512vnni() { return cpu_avx2(); }
#else
static bool cpu_avxvnni() { return cpu_avx2() && __builtin_cpu_supports("avxvnni"); }
static bool cpu_avx512vnni() {
  // F + BW for the zmm W4 tile (x86_tile_w4_zmm.h: byte-wise zmm logic, 16-bit shifts), VL for the ymm rows
  return cpu_avx2() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}
#endif
#else
static bool cpu_avx2() { return false; }
static bool cpu_avxvnni() { return false; }
static bool cpu_avx512vnni() { return false; }
#endif

static const IsaKernels* table(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return &scalar_kernels();
    case Isa::kAvx2: return cpu_avx2() ? avx2_kernels() : nullptr;
    case Isa::kAvxVnni: return cpu_avxvnni() ? avxvnni_kernels() : nullptr;
    case Isa::kAvx512Vnni: return cpu_avx512vnni() ? avx512vnni_kernels() : nullptr;
    case Isa::kAmx: return cpu_avx512vnni() ? amx_kernels() : nullptr;  // its own cpuid + OS permission check
    default: return nullptr;
  }
}

bool isa_supported(Isa isa) { return table(isa) != nullptr; }

Isa best_isa() {
  static const Isa best = [] {
    // fastest first: AMX tiles; then the EVEX copy has 32 vector registers, the VEX one 16
    Isa cap = Isa::kAmx;
    if (const char* env = getenv("PQK_CPU_ISA")) {
      for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvxVnni, Isa::kAvx512Vnni, Isa::kAmx})
        if (strcmp(env, isa_name(i)) == 0) cap = i;
    }
    for (Isa i : {Isa::kAmx, Isa::kAvx512Vnni, Isa::kAvxVnni, Isa::kAvx2})
      if (static_cast<int>(i) <= static_cast<int>(cap) && isa_supported(i)) return i;
    return Isa::kScalar;
  }();
  return best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvxVnni: return "avxvnni";
    case Isa::kAvx512Vnni: return "avx512vnni";
    case Isa::kAmx: return "amx";
    case Isa::kAuto: return "auto";
  }
  return "unknown";
}

const IsaKernels& kernels_for(Isa isa) {
  if (isa == Isa::kAuto) isa = best_isa();
  const IsaKernels* k = table(isa);
  return k ? *k : scalar_kernels();
}

}  // namespace cpu
}  // namespace pqk
