// VNNI kernels (x86-64): the AVX2 table with the W4 tile's multiply-accumulate done by vpdpbusd
// (x86_tile_w4.h, DpbusdAcc: 2 instructions per 64 k instead of vpmaddubsw's 3 plus the int16 flush).
// Two copies of the tile, each compiled for its own encoding and picked by cpuid (isa.cpp):
//   "avxvnni"     VEX vpdpbusd ymm (AVX-VNNI: Alder Lake and later client cores, Zen 5)
//   "avx512vnni"  EVEX vpdpbusd zmm (AVX512-VNNI + F/BW/VL: Ice Lake / Sapphire Rapids servers, Zen 4/5):
//                 x86_tile_w4_zmm.h, 128 k per iteration on the AVX2 panel layout (two lane shuffles of W
//                 instead of a new layout), tiles up to 4 x 4; 1.56x the ymm tile on one thread (docs/PERF.md step 12)
// Every other row function (quantize, split, pack, dequant) and the W8 tile are the AVX2 ones: they are
// load/store or vpmaddwd bound, where VNNI changes nothing.
//
// Testing without VNNI hardware (the AVX2-only machines this project also runs on). With PQK_VNNI_EMULATE defined (the
// sanitizer harness builds so; never the extension), both copies are compiled for plain AVX2 and Dp::dot
// is an exact emulation of vpdpbusd, so the tile logic of both tables runs — bit for bit against the
// reference — on any AVX2 CPU. What the emulation cannot test is the instruction itself; its semantics
// (u8 x s8, four products summed into the int32 lane, no saturation) are the ones emulated below.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include <algorithm>

#include "../common/quant_math.h"
#include "kernels.h"
#include "kernels_internal.h"

namespace pqk {
namespace cpu {
const IsaKernels* avx2_kernels();
}  // namespace cpu
}  // namespace pqk

// ---- AVX-VNNI (VEX) -----------------------------------------------------------------------------------
#pragma GCC push_options
#ifdef PQK_VNNI_EMULATE
#pragma GCC target("avx2,f16c")
#else
#pragma GCC target("avx2,f16c,avxvnni")
#endif
namespace pqk {
namespace cpu {
namespace avxvnni {

#ifdef PQK_VNNI_EMULATE
// vpdpbusd, exactly: per dword lane, acc + u0*s0 + u1*s1 + u2*s2 + u3*s3 (u unsigned, s signed bytes).
// Even and odd bytes are widened to int16 (u zero-, s sign-extended; a product is at most 255 * 128 in
// magnitude, so it fits) and vpmaddwd sums each pair of products into int32: no saturation anywhere.
struct Dp {
  static __m256i dot(__m256i acc, __m256i u, __m256i s) {
    const __m256i lo8 = _mm256_set1_epi16(0x00FF);
    __m256i ue = _mm256_and_si256(u, lo8), uo = _mm256_srli_epi16(u, 8);
    __m256i se = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8), so = _mm256_srai_epi16(s, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(ue, se), _mm256_madd_epi16(uo, so)));
  }
};
#else
struct Dp {
  static __m256i dot(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
};
#endif

#include "x86_tile_w4.h"

void tile_w4(const int8_t* a, int64_t kp, const int32_t* rs, int a_bits, const uint8_t* w, int64_t ws,
             int64_t K, int mr, int nr, int32_t* acc) {
  tile_w4_dispatch<DpbusdAcc<Dp>>(a, kp, rs, a_bits, w, ws, K, mr, nr, acc);
}

}  // namespace avxvnni
}  // namespace cpu
}  // namespace pqk
#pragma GCC pop_options

// ---- AVX512-VNNI (EVEX, on ymm) -----------------------------------------------------------------------
#pragma GCC push_options
#ifdef PQK_VNNI_EMULATE
#pragma GCC target("avx2,f16c")
#else
#pragma GCC target("avx2,f16c,avx512f,avx512bw,avx512vnni,avx512vl")
#endif
namespace pqk {
namespace cpu {
namespace avx512vnni {

#ifdef PQK_VNNI_EMULATE
using Dp = avxvnni::Dp;  // the emulation is encoding-independent
#else
struct Dp {
  static __m256i dot(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
};
#endif

#include "x86_tile_w4.h"

#ifdef PQK_VNNI_EMULATE
// No zmm without AVX-512: the emulated build runs the ymm tile with the emulated vpdpbusd (the zmm tile is
// tested natively, against the reference, wherever the CPU has AVX512-VNNI: tests/ops, tests/cpu).
void tile_w4(const int8_t* a, int64_t kp, const int32_t* rs, int a_bits, const uint8_t* w, int64_t ws,
             int64_t K, int mr, int nr, int32_t* acc) {
  tile_w4_dispatch<DpbusdAcc<Dp>>(a, kp, rs, a_bits, w, ws, K, mr, nr, acc);
}
#else
#include "x86_tile_w4_zmm.h"
#include "x86_gemm_zmm.h"
#include "x86_attention_zmm.h"

const PrefillKernels kPrefill = {kPfMr,       kPfNr,           kPfKc,          kPfRows,  kPfPanelBytes,
                                 /*w8=*/true, pf_pack_w,       pf_kernel,      nullptr,  pf_kernel_out,
                                 pf_pack_a_float, pf_pack_a_int8, pf_pack_a_int4, pf_side, /*l2_blocks=*/true,
                                 /*min_slice_rows=*/0, /*k_align=*/8, /*flush=*/nullptr, /*a_tiled=*/false,
                                 /*m_split_tiled=*/true, /*small_m=*/8};

void tile_w4(const int8_t* a, int64_t kp, const int32_t* rs, int a_bits, const uint8_t* w, int64_t ws,
             int64_t K, int mr, int nr, int32_t* acc) {
  tile_w4_zmm_dispatch(a, kp, rs, a_bits, w, ws, K, mr, nr, acc);
}
#endif

}  // namespace avx512vnni
}  // namespace cpu
}  // namespace pqk
#pragma GCC pop_options

#ifndef PQK_VNNI_EMULATE
// ---- the prefill attention's bf16 blocks: AVX512-BF16 on top of the table above (set only where cpuid has it) ----
#pragma GCC push_options
#pragma GCC target("avx2,f16c,avx512f,avx512bw,avx512vnni,avx512vl,avx512bf16")
namespace pqk {
namespace cpu {
namespace avx512vnni {
#include "x86_attention_bf16.h"
}  // namespace avx512vnni
}  // namespace cpu
}  // namespace pqk
#pragma GCC pop_options
#endif

namespace pqk {
namespace cpu {

// The AVX2 table with the VNNI tile (built on first use: avx2_kernels() lives in another file).
static IsaKernels with_tile(const char* name, decltype(IsaKernels::tile_w4) tile) {
  IsaKernels k = *avx2_kernels();
  k.name = name;
  k.tile_w4 = tile;
  return k;
}

const IsaKernels* avxvnni_kernels() {
  static const IsaKernels k = with_tile("avxvnni", avxvnni::tile_w4);
  return &k;
}

const IsaKernels* avx512vnni_kernels() {
  static const IsaKernels k = [] {
    IsaKernels t = with_tile("avx512vnni", avx512vnni::tile_w4);
#ifndef PQK_VNNI_EMULATE
    t.nr_max = avx512vnni::kZmmNr;  // the zmm tile is 4 x 4 (x86_tile_w4_zmm.h)
    t.prefill = &avx512vnni::kPrefill;  // x86_gemm_zmm.h
    t.qk_block = avx512vnni::attn_qk_block;  // x86_attention_zmm.h
    t.pv_block = avx512vnni::attn_pv_block;
    t.softmax_block = avx512vnni::attn_softmax_block;
    if (__builtin_cpu_supports("avx512bf16")) {  // x86_attention_bf16.h
      t.qk_block_bf16 = avx512vnni::attn_qk_block_bf16;
      t.pv_block_bf16 = avx512vnni::attn_pv_block_bf16;
    }
#endif
    return t;
  }();
  return &k;
}

}  // namespace cpu
}  // namespace pqk

#else  // not x86-64

#include "kernels_internal.h"
namespace pqk {
namespace cpu {
const IsaKernels* avxvnni_kernels() { return nullptr; }
const IsaKernels* avx512vnni_kernels() { return nullptr; }
}  // namespace cpu
}  // namespace pqk

#endif
