// Which instruction-set implementation runs: detected once from cpuid, overridable for tests and
// benchmarks (the op layer passes an explicit Isa; PQK_CPU_ISA=scalar|avx2 changes the default).
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "kernels_internal.h"

namespace pqk {
namespace cpu {

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2:
#if defined(__x86_64__) || defined(_M_X64)
      // libgcc's check includes the OS's XSAVE support for the ymm state
      return avx2_kernels() != nullptr && __builtin_cpu_supports("avx2");
#else
      return false;
#endif
    default: return false;
  }
}

Isa best_isa() {
  static const Isa best = [] {
    const char* env = getenv("PQK_CPU_ISA");
    if (env && strcmp(env, "scalar") == 0) return Isa::kScalar;
    return isa_supported(Isa::kAvx2) ? Isa::kAvx2 : Isa::kScalar;
  }();
  return best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAuto: return "auto";
  }
  return "unknown";
}

const IsaKernels& kernels_for(Isa isa) {
  if (isa == Isa::kAuto) isa = best_isa();
  if (isa == Isa::kAvx2 && isa_supported(Isa::kAvx2)) return *avx2_kernels();
  return scalar_kernels();
}

}  // namespace cpu
}  // namespace pqk
