// INT4 x INT4 tensor-core GEMM with the dequant (or a requantize) fused into the epilogue.
//
//   out[m, n] = epilogue( sum_k A[m, k] * W[n, k] )        A uint8 [M, K/2], W uint8 [N, K/2] (packed int4)
//
// or, with a static activation scale (pqk_quant_gemm_static), A = quantize(x, x_scale) computed in the kernel's A
// load from the float activation x [M, K]: the linear layer in one launch, no quantized copy of x in global memory.
//
// Read top to bottom: PTX MMA wrappers -> the kernel in named steps (load_stage, mma_stage, epilogue) -> the
// dispatch over tile configs and epilogues -> the extern "C" launcher. Index math lives in gemm_math.cuh (PQK_HD)
// and is executed on the host by csrc/cuda/tests/gemm_harness.cpp.
//
// What runs where:
//   sm_80, sm_86, sm_89: mma.sync.m16n8k64.s4 (IMMA with S4 operands), int32 accumulators.
//   sm_90: Hopper has no INT4 MMA; each s4 fragment register is unpacked to two s8 registers in place and fed
//          to two mma.sync.m16n8k32.s8 (IMMA S8): same tiles, same shared memory, same exact int32 sums.
//          (wgmma would be faster on Hopper; not written.)
// Two implementations, one entry point (pqk_int4_gemm at the bottom chooses):
//   - CUTLASS 2.x (int4_gemm_cutlass.cu) for the plain dequant epilogues to fp16/bf16 on sm_80/86/89: its
//     mainloop (ldmatrix, 128-element K stages) is the tuned one; our part there is the epilogue visitor tree.
//   - this file's kernel for everything else: the requantizing epilogues (their (gate, up) column pairs and nibble
//     packing need per-thread access to the accumulator registers, which an EVT does not give), fp32 out,
//     N % 8 != 0, and sm_90. The packed format already is the s4 register format, and the host harness executes
//     every index computation of this file.
#include <atomic>
#include <type_traits>

#include "cuda_common.cuh"
#include "gemm_cutlass.h"
#include "gemm_math.cuh"

namespace pqk {
namespace cuda {
namespace {

// c += a * b over one 16x8x64 int4 tile. a: 4 regs, b: 2 regs, c: 4 int32 (layouts in gemm_math.cuh).
__device__ __forceinline__ void mma_k64(const uint32_t (&a)[4], const uint32_t (&b)[2], int32_t (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Hopper: two k32 s8 MMAs on unpacked nibbles (gemm_math.cuh: sm90_operands explains why K may be permuted).
  uint32_t a8[2][4], b8[2][2];
  sm90_operands(a, b, a8, b8);
#pragma unroll
  for (int s = 0; s < 2; ++s)
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a8[s][0]), "r"(a8[s][1]), "r"(a8[s][2]), "r"(a8[s][3]), "r"(b8[s][0]), "r"(b8[s][1]));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Step 1: issue the async copies of K tile kt (A rows m0.., W rows n0..) into one stage (plan: gemm_math.cuh).
// An invalid chunk still needs a legal address for the instruction: the matrix base (src-size 0: nothing is read).
template <class Cfg>
__device__ __forceinline__ void load_stage(uint8_t* stage, const uint8_t* a, const uint8_t* w, int m0, int n0, int kt,
                                           int prob_m, int prob_n, int k_bytes) {
  load_stage_plan<Cfg>(threadIdx.x, m0, n0, kt, prob_m, prob_n, k_bytes,
                       [&](bool is_w, int sh_off, long gl_off, bool ok) {
                         cp_async16(stage + sh_off, (is_w ? w : a) + gl_off, ok);
                       });
}

// Step 2: one k64 step of the warp tile from one stage: fragments via 32-bit shared loads (conflict-free thanks to
// the swizzle), then MT x NT MMAs. (ldmatrix.x4 would load an A fragment in one instruction; with 32-byte rows a
// plain LDS.32 per register costs the same bank wavefronts, and its address is the harness-checked a_frag_smem.)
template <class Cfg>
__device__ __forceinline__ void mma_stage(const uint8_t* stage, int wr0, int wc0, int lane,
                                          int32_t (&acc)[Cfg::MT][Cfg::NT][4]) {
  uint32_t af[Cfg::MT][4], bf[Cfg::NT][2];
  load_fragments<Cfg>(stage, wr0, wc0, lane, af, bf);
#pragma unroll
  for (int i = 0; i < Cfg::MT; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::NT; ++j) mma_k64(af[i], bf[j], acc[i][j]);
}

// Step 1' (float A, pqk_quant_gemm_static): the thread's A chunk of a tile, raw from global memory into registers
// (16-byte loads: 4 for fp16/bf16, 8 for fp32; rows are 64-byte multiples since K % 32 == 0), issued before the MMAs
// of the current tile and quantized + stored after them, so the load latency hides behind the tensor-core work.
template <class XT>
struct AChunkRegs {
  static constexpr int kVecs = kChunkElems * (int)sizeof(XT) / 16;
  uint4 raw[kVecs];
  AChunk ch;
};

template <class Cfg, class XT>
__device__ __forceinline__ void fetch_a_chunk(AChunkRegs<XT>& r, const XT* x, int m0, int kt, int prob_m, int prob_k) {
  r.ch = a_chunk_plan<Cfg>(threadIdx.x, m0, kt, prob_m, prob_k);
  if (r.ch.valid) {
    const uint4* src = reinterpret_cast<const uint4*>(x + r.ch.x_off);
#pragma unroll
    for (int q = 0; q < AChunkRegs<XT>::kVecs; ++q) r.raw[q] = __ldg(src + q);
  }
}

// Word j of the packed chunk = elements 8j .. 8j + 7 = 16 bytes of fp16/bf16 (raw[j]) or 32 of fp32 (raw[2j],
// raw[2j + 1]), converted exactly and quantized 8 at a time (fewer live registers than all 32 floats at once: at 32
// the 256-thread prefill tile spilled). Register arithmetic only.
__device__ __forceinline__ float half_bits_to_float(uint32_t h) {  // cvt.f32.f16 on the raw bits: exact
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)h));
  return f;
}
__device__ __forceinline__ void to_floats(const uint4& r, float* v, const __half*) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) { v[2 * i] = half_bits_to_float(w[i] & 0xFFFFu); v[2 * i + 1] = half_bits_to_float(w[i] >> 16); }
}
__device__ __forceinline__ void to_floats(const uint4& r, float* v, const __nv_bfloat16*) {
  // bf16 is the top half of an fp32: the conversion is a shift.
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) { v[2 * i] = __uint_as_float(w[i] << 16); v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u); }
}
__device__ __forceinline__ void to_floats(const uint4& r, float* v, const float*) {
  v[0] = __uint_as_float(r.x); v[1] = __uint_as_float(r.y); v[2] = __uint_as_float(r.z); v[3] = __uint_as_float(r.w);
}

// 16-byte loads per 8 values of XT: 1 (fp16/bf16) or 2 (fp32).
template <class XT>
constexpr int kVecsPerWord = (int)sizeof(XT) / 2;

// 8 values of x (raw: kVecsPerWord<XT> 16-byte words) -> one packed word, quantized with the static scale.
template <class XT>
__device__ __forceinline__ uint32_t quantize_word(const uint4* raw, float x_scale) {
  float v[8];
#pragma unroll
  for (int q = 0; q < kVecsPerWord<XT>; ++q) to_floats(raw[q], v + q * (8 / kVecsPerWord<XT>), (const XT*)nullptr);
  return quantize_pack8(v, x_scale);
}

template <class XT>
__device__ __forceinline__ void store_a_chunk(const AChunkRegs<XT>& r, uint8_t* stage, float x_scale) {
  if (!r.ch.owner) return;
  uint32_t words[4] = {0u, 0u, 0u, 0u};  // out of the matrix: zeros, as cp.async with src-size 0
  if (r.ch.valid) {
#pragma unroll
    for (int j = 0; j < 4; ++j) words[j] = quantize_word<XT>(r.raw + j * kVecsPerWord<XT>, x_scale);
  }
  *reinterpret_cast<uint4*>(stage + r.ch.smem_off) = make_uint4(words[0], words[1], words[2], words[3]);
}

template <int EPI>
struct OutType { using T = uint8_t; };
template <> struct OutType<kEpiF16> { using T = __half; };
template <> struct OutType<kEpiBF16> { using T = __nv_bfloat16; };
template <> struct OutType<kEpiF32> { using T = float; };

// Step 3: the epilogue straight from the accumulator registers (no shared-memory staging).
template <class Cfg, int EPI>
__device__ __forceinline__ void epilogue(const int32_t (&acc)[Cfg::MT][Cfg::NT][4], void* out, const EpilogueParams& ep,
                                         int row0, int col0, int lane, int prob_m, int prob_n) {
  for_each_acc_pair<Cfg>(row0, col0, lane, [&](int i, int j, int h, int row, int col) {
    const int32_t acc0 = acc[i][j][2 * h], acc1 = acc[i][j][2 * h + 1];
    const bool ok = row < prob_m && col < prob_n;  // col even; requant needs prob_n even, so then col + 1 < prob_n
    if constexpr (EPI == kEpiSiluMulRequant) {
      // Every lane shuffles (out-of-range ones with q = 0): a full-mask shuffle must not diverge.
      const int8_t q = ok ? epi_silu_mul_q(acc0, acc1, row, col, ep) : (int8_t)0;
      const int8_t partner = (int8_t)__shfl_xor_sync(0xffffffffu, (int)q, 1);
      if (ok && (lane & 1) == 0) static_cast<uint8_t*>(out)[(long)row * (prob_n / 4) + col / 4] = pack_nibbles(q, partner);
    } else if constexpr (EPI == kEpiRequant) {
      if (ok) static_cast<uint8_t*>(out)[(long)row * (prob_n / 2) + col / 2] = epi_requant_pair(acc0, acc1, row, col, ep);
    } else {
      typename OutType<EPI>::T* o = static_cast<typename OutType<EPI>::T*>(out);
      if (ok) store_float(o, (long)row * prob_n + col, epi_dequant(acc0, row, col, ep));
      if (ok && col + 1 < prob_n) store_float(o, (long)row * prob_n + col + 1, epi_dequant(acc1, row, col + 1, ep));
    }
  });
}

// Step 3' (split-K, gridDim.z > 1): add this block's int32 partial sums into the workspace; the tile's last block
// to arrive (counter) loads the full sums into acc and returns true (it runs the epilogue), the others false.
// Integer sums: bit-identical in any order. __threadfence before the counter makes this block's adds visible to
// the block that sees the final count; the last block's fence orders its loads after that observation.
template <class Cfg>
__device__ __forceinline__ bool split_k_reduce(int32_t (&acc)[Cfg::MT][Cfg::NT][4], int32_t* ws, int row0, int col0,
                                               int lane, int prob_m, int prob_n) {
  __shared__ int last;
  split_k_publish<Cfg>(acc, ws, row0, col0, lane, prob_m, prob_n, [](int32_t* p, int32_t v) { atomicAdd(p, v); });
  __threadfence();
  __syncthreads();
  unsigned* counter = reinterpret_cast<unsigned*>(ws + (long)prob_m * prob_n) + blockIdx.y * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.z - 1;
  __syncthreads();
  if (!last) return false;
  __threadfence();
  split_k_collect<Cfg>(acc, ws, row0, col0, lane, prob_m, prob_n, [](const int32_t* p) { return __ldcg(p); });
  return true;
}

// XT = uint8_t: A is packed int4 (pqk_int4_gemm). XT = __half / __nv_bfloat16 / float: A is the float activation x,
// quantized in the load with the static scale ep.a_scale[0] (pqk_quant_gemm_static; steps 1' above).
template <class Cfg, int EPI, class XT>
__global__ void __launch_bounds__(Cfg::kThreads) int4_gemm_kernel(
    const XT* __restrict__ a,       // uint8 [prob_m, prob_k / 2] packed int4, or fp16/bf16/fp32 [prob_m, prob_k]
    const uint8_t* __restrict__ w,  // uint8 [prob_n, prob_k / 2]: packed int4 weights, one row per output channel
    void* __restrict__ out,         // EPI 0/1/2: fp16/bf16/fp32 [prob_m, prob_n]; 3: uint8 [prob_m, prob_n / 2];
                                    //   4: uint8 [prob_m, prob_n / 4]
    EpilogueParams ep,              // scales (fp32 device pointers), bias, requant scale
    int prob_m, int prob_n, int prob_k,  // prob_k % 32 == 0
    int32_t* __restrict__ split_ws) {    // gridDim.z > 1 (split-K): int32 [M, N] sums + uint32 per-tile counters,
                                         //   all zero at launch (gemm_math.cuh: split_k_workspace_words); else null
  constexpr bool kFloatA = !std::is_same<XT, uint8_t>::value;
  __shared__ __align__(16) uint8_t smem[Cfg::STAGES * Cfg::kStageBytes];
  const int k_bytes = prob_k / 2;
  // This block's K tiles [kt0, kt0 + k_tiles) (all of K unless split): the last one of K may be half zero-filled
  // (K % 64 == 32). Tile indices below are relative to kt0.
  // Only the decode tile splits (compile time: the split code in the 256-thread prefill tile made it spill).
  constexpr bool kSplit = std::is_same<Cfg, DecodeConfig>::value;
  const int splits = kSplit ? (int)gridDim.z : 1, z = kSplit ? (int)blockIdx.z : 0;
  const int k_tiles_all = (prob_k + kBK - 1) / kBK;
  const int kt0 = split_k_begin(k_tiles_all, splits, z);
  const int k_tiles = split_k_begin(k_tiles_all, splits, z + 1) - kt0;
  const int m0 = blockIdx.y * Cfg::BM, n0 = blockIdx.x * Cfg::BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr0 = warp_row0<Cfg>(warp), wc0 = warp_col0<Cfg>(warp);
  const float x_scale = kFloatA ? ep.a_scale[0] : 0.0f;  // the static scale (float A: per-tensor only)

  int32_t acc[Cfg::MT][Cfg::NT][4];
#pragma unroll
  for (int i = 0; i < Cfg::MT; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  // Issues (relative) tile t's copies into stage st (float A: W by cp.async, A into the registers xr).
  auto load = [&](int t, uint8_t* st, AChunkRegs<XT>& xr) {
    t += kt0;
    if constexpr (kFloatA) {
      load_stage_plan<Cfg, false>(threadIdx.x, m0, n0, t, prob_m, prob_n, k_bytes,
                                  [&](bool, int sh_off, long gl_off, bool ok) { cp_async16(st + sh_off, w + gl_off, ok); });
      fetch_a_chunk<Cfg>(xr, a, m0, t, prob_m, prob_k);
    } else {
      load_stage<Cfg>(st, a, w, m0, n0, t, prob_m, prob_n, k_bytes);
    }
  };
  AChunkRegs<XT> xr;

  // Prologue: STAGES-1 tiles in flight. A group is committed even when empty so wait_group counts stay uniform.
#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < k_tiles) {
      load(s, smem + s * Cfg::kStageBytes, xr);
      if constexpr (kFloatA) store_a_chunk(xr, smem + s * Cfg::kStageBytes, x_scale);
    }
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Cfg::STAGES - 2>();  // tile kt has landed (for this thread) ...
    __syncthreads();                   // ... for all threads; and everyone finished reading tile kt-1's stage
    const int pf = kt + Cfg::STAGES - 1;  // refill the stage tile kt-1 used
    uint8_t* pf_stage = smem + (pf % Cfg::STAGES) * Cfg::kStageBytes;
    if (pf < k_tiles) load(pf, pf_stage, xr);
    cp_async_commit();
    mma_stage<Cfg>(smem + (kt % Cfg::STAGES) * Cfg::kStageBytes, wr0, wc0, lane, acc);
    // Float A: quantize tile pf's chunk now (its loads had the MMAs to land). Stage pf is read at iteration pf, after
    // at least one more barrier; its last reader (tile kt-1) finished before this iteration's barrier.
    if constexpr (kFloatA)
      if (pf < k_tiles) store_a_chunk(xr, pf_stage, x_scale);
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits

  if constexpr (kSplit)
    if (splits > 1 && !split_k_reduce<Cfg>(acc, split_ws, m0 + wr0, n0 + wc0, lane, prob_m, prob_n)) return;
  epilogue<Cfg, EPI>(acc, out, ep, m0 + wr0, n0 + wc0, lane, prob_m, prob_n);
}

// ---- the decode GEMV (config kGemv, M <= kGemvMaxM; the plan and its arithmetic: gemm_math.cuh "decode GEMV") ----
// One row of A's chunk c as 4 packed words: packed A (16 bytes, L2-served: every block reads A) or, float A, the 32
// values of x quantized with the static scale (quantize_pack8: the bits of pqk_quantize_static).
template <class XT>
__device__ __forceinline__ void gemv_load_a(const XT* a, int m, int c, int prob_k, float x_scale, uint32_t (&wd)[4]) {
  if constexpr (std::is_same<XT, uint8_t>::value) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(a + (long)m * (prob_k / 2)) + c);
    wd[0] = v.x; wd[1] = v.y; wd[2] = v.z; wd[3] = v.w;
  } else {
    const uint4* src = reinterpret_cast<const uint4*>(a + (long)m * prob_k + (long)c * kGemvChunkElems);
    uint4 raw[4 * kVecsPerWord<XT>];
#pragma unroll
    for (int q = 0; q < 4 * kVecsPerWord<XT>; ++q) raw[q] = __ldg(src + q);
#pragma unroll
    for (int j = 0; j < 4; ++j) wd[j] = quantize_word<XT>(raw + j * kVecsPerWord<XT>, x_scale);
  }
}

template <int MR, int EPI, class XT>
__global__ void __launch_bounds__(kGemvThreads) int4_gemv_kernel(
    const XT* __restrict__ a,       // uint8 [prob_m, prob_k / 2] packed int4, or fp16/bf16/fp32 [prob_m, prob_k]
    const uint8_t* __restrict__ w,  // uint8 [prob_n, prob_k / 2]: packed int4 weights, one row per output channel
    void* __restrict__ out,         // as int4_gemm_kernel: EPI 0/1/2 float [prob_m, prob_n]; 3: uint8 [prob_m,
                                    //   prob_n / 2]; 4: uint8 [prob_m, prob_n / 4]
    EpilogueParams ep,              // scales (fp32 device pointers), bias, requant scale; float A: a_scale[0] static
    int prob_m, int prob_n, int prob_k) {  // prob_m <= MR, prob_k % 32 == 0; block b: W rows 4b .. 4b + 3
  constexpr bool kFloatA = !std::is_same<XT, uint8_t>::value;
  const int n0 = blockIdx.x * kGemvRows, chunks = prob_k / kGemvChunkElems;
  const float x_scale = kFloatA ? ep.a_scale[0] : 0.0f;
  int32_t acc[MR][kGemvRows], asum[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    asum[m] = 0;
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) acc[m][r] = 0;
  }
#pragma unroll 2
  for (int c = threadIdx.x; c < chunks; c += kGemvThreads) {
    uint32_t wd[kGemvRows][4], ad[MR][4];
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {  // W is read once per step: streaming loads (evict first)
      uint4 v = make_uint4(0u, 0u, 0u, 0u);  // a row past N: zero nibbles, w = 0, adds nothing (and is not stored)
      if (n0 + r < prob_n) v = __ldcs(reinterpret_cast<const uint4*>(w + (long)(n0 + r) * (prob_k / 2)) + c);
      wd[r][0] = v.x; wd[r][1] = v.y; wd[r][2] = v.z; wd[r][3] = v.w;
    }
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      if (m < prob_m) {
        gemv_load_a(a, m, c, prob_k, x_scale, ad[m]);
      } else {
        ad[m][0] = ad[m][1] = ad[m][2] = ad[m][3] = 0u;  // a row past M: a = 0 adds nothing
      }
    }
    gemv_chunk<MR>(ad, wd, acc, asum);
  }
  // dot products: this thread's, summed over the warp (shuffles), then over the warps (shared memory)
  __shared__ int32_t red[kGemvThreads / 32][MR * kGemvRows];
  __shared__ int32_t dot[MR * kGemvRows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
      int32_t d = gemv_dot(acc[m][r], asum[m]);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
      if (lane == 0) red[warp][m * kGemvRows + r] = d;
    }
  __syncthreads();
  if (threadIdx.x < MR * kGemvRows) {
    int32_t d = 0;
#pragma unroll
    for (int i = 0; i < kGemvThreads / 32; ++i) d += red[i][threadIdx.x];
    dot[threadIdx.x] = d;
  }
  __syncthreads();
  if (threadIdx.x >= MR * kGemvRows) return;
  using OutT = typename OutType<EPI>::T;
  gemv_epilogue(EPI, threadIdx.x, dot, n0, prob_m, prob_n, ep,
                [&](long i, float v) { if constexpr (EPI <= kEpiF32) store_float(static_cast<OutT*>(out), i, v); },
                [&](long i, uint8_t q) { static_cast<uint8_t*>(out)[i] = q; });
}

template <int MR, int EPI, class XT>
int launch_gemv(const XT* a, const uint8_t* w, void* out, const EpilogueParams& ep, int m, int n, int k,
                cudaStream_t stream) {
  int4_gemv_kernel<MR, EPI, XT><<<(n + kGemvRows - 1) / kGemvRows, kGemvThreads, 0, stream>>>(a, w, out, ep, m, n, k);
  return launch_status();
}

// M = 1 (batch-1 decode) gets its own instantiation; 2..kGemvMaxM share the 4-row one (rows past M read nothing).
template <int EPI, class XT>
int launch_gemv_m(const XT* a, const uint8_t* w, void* out, const EpilogueParams& ep, int m, int n, int k,
                  cudaStream_t s) {
  return m == 1 ? launch_gemv<1, EPI, XT>(a, w, out, ep, m, n, k, s) : launch_gemv<kGemvMaxM, EPI, XT>(a, w, out, ep, m, n, k, s);
}

// The GEMV in the tile dispatchers' place (config kGemv): dispatch_epilogue<GemvTag> / dispatch_x_dtype<GemvTag>.
struct GemvTag {};

template <class Cfg, int EPI, class XT = uint8_t>
int launch(const XT* a, const uint8_t* w, void* out, const EpilogueParams& ep, int m, int n, int k, int splits,
           int32_t* split_ws, cudaStream_t stream) {
  if constexpr (std::is_same<Cfg, GemvTag>::value) {
    return launch_gemv_m<EPI, XT>(a, w, out, ep, m, n, k, stream);  // (no split-K: check_split refuses it)
  } else {
    dim3 grid((n + Cfg::BN - 1) / Cfg::BN, (m + Cfg::BM - 1) / Cfg::BM, splits);
    int4_gemm_kernel<Cfg, EPI, XT><<<grid, Cfg::kThreads, 0, stream>>>(a, w, out, ep, m, n, k, split_ws);
    return launch_status();
  }
}

template <class Cfg>
int dispatch_epilogue(int epi, const uint8_t* a, const uint8_t* w, void* out, const EpilogueParams& ep, int m, int n,
                      int k, int sp, int32_t* ws, cudaStream_t s) {
  switch (epi) {
    case kEpiF16: return launch<Cfg, kEpiF16>(a, w, out, ep, m, n, k, sp, ws, s);
    case kEpiBF16: return launch<Cfg, kEpiBF16>(a, w, out, ep, m, n, k, sp, ws, s);
    case kEpiF32: return launch<Cfg, kEpiF32>(a, w, out, ep, m, n, k, sp, ws, s);
    case kEpiRequant: return launch<Cfg, kEpiRequant>(a, w, out, ep, m, n, k, sp, ws, s);
    case kEpiSiluMulRequant: return launch<Cfg, kEpiSiluMulRequant>(a, w, out, ep, m, n, k, sp, ws, s);
    default: return PQK_ERR_ARG;
  }
}

// pqk_quant_gemm_static: x of type XT, dequant to XT's own dtype (the linear's output) or the silu-mul requant.
template <class Cfg, class XT>
int dispatch_float_a(int epi, const void* x, const uint8_t* w, void* out, const EpilogueParams& ep, int m, int n,
                     int k, int sp, int32_t* ws, cudaStream_t s) {
  constexpr int kSame = std::is_same<XT, __half>::value ? kEpiF16 : std::is_same<XT, float>::value ? kEpiF32 : kEpiBF16;
  const XT* a = static_cast<const XT*>(x);
  if (epi == kSame) return launch<Cfg, kSame, XT>(a, w, out, ep, m, n, k, sp, ws, s);
  if (epi == kEpiSiluMulRequant) return launch<Cfg, kEpiSiluMulRequant, XT>(a, w, out, ep, m, n, k, sp, ws, s);
  return PQK_ERR_ARG;
}

template <class Cfg>
int dispatch_x_dtype(int x_dtype, int epi, const void* x, const uint8_t* w, void* out, const EpilogueParams& ep,
                     int m, int n, int k, int sp, int32_t* ws, cudaStream_t s) {
  switch (x_dtype) {
    case kF16: return dispatch_float_a<Cfg, __half>(epi, x, w, out, ep, m, n, k, sp, ws, s);
    case kBF16: return dispatch_float_a<Cfg, __nv_bfloat16>(epi, x, w, out, ep, m, n, k, sp, ws, s);
    case kF32: return dispatch_float_a<Cfg, float>(epi, x, w, out, ep, m, n, k, sp, ws, s);
    default: return PQK_ERR_ARG;
  }
}

// Compute capability (major * 10 + minor) of the current device, read once per device (attribute queries are not
// stream operations: fine inside a CUDA graph capture); -1 if it cannot be read.
int current_sm() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};  // 0 = not read yet
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return -1;
  if (dev < kMaxDevices && cached[dev].load(std::memory_order_relaxed) != 0) return cached[dev].load();
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return -1;
  if (dev < kMaxDevices) cached[dev].store(major * 10 + minor);
  return major * 10 + minor;
}

// The CUTLASS kernels are built for sm_80/86/89 only (cuda_build.FILE_ARCHS); other 8.x devices run the sm_80 code.
bool cutlass_arch(int sm) { return sm >= 80 && sm < 90; }

}  // namespace
}  // namespace cuda
}  // namespace pqk

namespace pqk {
namespace cuda {
namespace {
// The split-K arguments, checked: 1 = no split; > 1 only on the own decode tile (config 0 or auto at M <= 16),
// with a 4-byte aligned workspace, and at most one split per K tile. Sets config to 0 for a split. 0 if fine.
int check_split(int split_k, const int32_t* ws, int m, int k, int& config) {
  if (split_k < 1 || split_k > (k + kBK - 1) / kBK) return PQK_ERR_ARG;
  if (split_k == 1) return PQK_OK;
  if (ws == nullptr || !aligned(ws, 4)) return PQK_ERR_ARG;
  if (!(config == 0 || (config == -1 && m <= 16))) return PQK_ERR_UNSUPPORTED;
  config = 0;
  return PQK_OK;
}
}  // namespace
}  // namespace cuda
}  // namespace pqk

extern "C" int pqk_int4_gemm(const uint8_t* a, const uint8_t* w, void* out, const float* a_scale,
                             int a_scale_per_token, const float* w_scale, const float* bias, float out_scale, int m,
                             int n, int k, int epilogue, int config, int split_k, int32_t* split_ws,
                             pqk_stream_t stream) {
  using namespace pqk::cuda;
  if (m <= 0 || n <= 0 || k <= 0) return PQK_ERR_SHAPE;
  if (k % 32 != 0) return PQK_ERR_K_ALIGN;
  if (!aligned(a, 16) || !aligned(w, 16)) return PQK_ERR_PTR_ALIGN;
  const bool own_config = config >= -1 && config <= kGemv, cutlass_config = config >= kCutlassDecode && config <= kCutlassPrefill;
  if (epilogue < kEpiF16 || epilogue > kEpiSiluMulRequant || !(own_config || cutlass_config)) return PQK_ERR_ARG;
  if ((epilogue == kEpiRequant && n % 2 != 0) || (epilogue == kEpiSiluMulRequant && n % 4 != 0)) return PQK_ERR_N_ALIGN;
  if (epilogue >= kEpiRequant && !(out_scale > 0.0f && out_scale < INFINITY)) return PQK_ERR_ARG;
  if (a_scale == nullptr || w_scale == nullptr || out == nullptr) return PQK_ERR_ARG;
  if (const int st = check_split(split_k, split_ws, m, k, config)) return st;
  if (config == kGemv && m > kGemvMaxM) return PQK_ERR_UNSUPPORTED;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const bool cutlass_ok = (epilogue == kEpiF16 || epilogue == kEpiBF16) && cutlass_takes(n, k, out, w_scale, bias);
  if (config == -1 && cutlass_ok && cutlass_arch(current_sm()))
    config = m <= 16 ? kCutlassDecode : m <= 256 ? kCutlassMid : kCutlassPrefill;
  if (cutlass_config || config >= kCutlassDecode) {
    if (!cutlass_ok || !cutlass_arch(current_sm())) return PQK_ERR_UNSUPPORTED;
    return cutlass_dequant_gemm(a, w, out, epilogue == kEpiBF16, a_scale, a_scale_per_token, w_scale, bias, m, n, k,
                                config, s);
  }
  EpilogueParams ep{a_scale, a_scale_per_token ? 1 : 0, w_scale, bias, out_scale};
  if (config < 0) config = m <= 16 ? 0 : m <= 256 ? 1 : 2;
  if (config == kGemv) return dispatch_epilogue<GemvTag>(epilogue, a, w, out, ep, m, n, k, 1, nullptr, s);
  if (config == 0) return dispatch_epilogue<DecodeConfig>(epilogue, a, w, out, ep, m, n, k, split_k, split_ws, s);
  if (config == 1) return dispatch_epilogue<MidConfig>(epilogue, a, w, out, ep, m, n, k, 1, nullptr, s);
  return dispatch_epilogue<PrefillConfig>(epilogue, a, w, out, ep, m, n, k, 1, nullptr, s);
}

extern "C" int pqk_quant_gemm_static(const void* x, int x_dtype, const float* x_scale, const uint8_t* w, void* out,
                                     const float* w_scale, const float* bias, float out_scale, int m, int n, int k,
                                     int epilogue, int config, int split_k, int32_t* split_ws, pqk_stream_t stream) {
  using namespace pqk::cuda;
  if (m <= 0 || n <= 0 || k <= 0) return PQK_ERR_SHAPE;
  if (k % 32 != 0) return PQK_ERR_K_ALIGN;
  if (!aligned(x, 16) || !aligned(w, 16)) return PQK_ERR_PTR_ALIGN;
  if (x_dtype < kF16 || x_dtype > kF32 || !(epilogue == x_dtype || epilogue == kEpiSiluMulRequant)) return PQK_ERR_ARG;
  if (config >= kCutlassDecode && config <= kCutlassPrefill) return PQK_ERR_UNSUPPORTED;  // CUTLASS reads packed A
  if (config < -1 || config > kGemv) return PQK_ERR_ARG;
  if (epilogue == kEpiSiluMulRequant && n % 4 != 0) return PQK_ERR_N_ALIGN;
  if (epilogue == kEpiSiluMulRequant && !(out_scale > 0.0f && out_scale < INFINITY)) return PQK_ERR_ARG;
  if (x_scale == nullptr || w_scale == nullptr || out == nullptr) return PQK_ERR_ARG;
  if (const int st = check_split(split_k, split_ws, m, k, config)) return st;
  if (config == kGemv && m > kGemvMaxM) return PQK_ERR_UNSUPPORTED;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  EpilogueParams ep{x_scale, 0, w_scale, bias, out_scale};
  if (config < 0) config = m <= 16 ? 0 : m <= 256 ? 1 : 2;
  if (config == kGemv) return dispatch_x_dtype<GemvTag>(x_dtype, epilogue, x, w, out, ep, m, n, k, 1, nullptr, s);
  if (config == 0) return dispatch_x_dtype<DecodeConfig>(x_dtype, epilogue, x, w, out, ep, m, n, k, split_k, split_ws, s);
  if (config == 1) return dispatch_x_dtype<MidConfig>(x_dtype, epilogue, x, w, out, ep, m, n, k, 1, nullptr, s);
  return dispatch_x_dtype<PrefillConfig>(x_dtype, epilogue, x, w, out, ep, m, n, k, 1, nullptr, s);
}

extern "C" int pqk_gemm_split_k(int m, int n, int k, int sms) {
  return pqk::cuda::auto_split_k<pqk::cuda::DecodeConfig>(m, n, k, sms);
}

extern "C" long pqk_gemm_split_k_workspace(int m, int n) {
  return pqk::cuda::split_k_workspace_words<pqk::cuda::DecodeConfig>(m, n);
}

extern "C" const char* pqk_int4_gemm_path(int sm) {
  if (sm == 80 || sm == 86 || sm == 89) return "imma.s4 (CUTLASS for fp16/bf16 dequant, pqk for requant)";
  if (sm == 90) return "imma.s8-unpacked";
  return "none";
}
