// Index math and epilogue functors of the INT4 tensor-core GEMM (int4_gemm.cu), as PQK_HD functions.
//
// Everything the GEMM computes that is not an instruction (cp.async, mma.sync, shfl) lives here, so the host
// harness (csrc/cuda/tests/gemm_harness.cpp, compiled with g++) runs the *same* code: which 16-byte chunk each thread
// copies, where it lands in shared memory (swizzle), which shared-memory word each lane loads into which MMA
// fragment register, which output element each accumulator register is, the sm_90 nibble unpack, and the
// epilogues. The harness supplies the instructions as emulators written from the PTX ISA fragment tables.
//
// Operands (see prefixquant_kernels/format.py): A uint8 [M, K/2] and W uint8 [N, K/2], two int4 per byte,
// element 2i in the low nibble — exactly the register order mma.m16n8k64.s4 wants (element 0 = low nibble),
// so a 32-bit word of packed bytes *is* a fragment register: no shuffling of weights offline.
#pragma once

#include <math.h>
#include <stdint.h>

#include "../common/quant_math.h"

// Full unrolling of the fixed-trip loops over fragments: the accumulators must stay in registers.
#if defined(__CUDA_ARCH__)  // device pass only: g++ (and nvcc's host pass) would warn about the pragma
#define PQK_UNROLL _Pragma("unroll")
#else
#define PQK_UNROLL
#endif

namespace pqk {
namespace cuda {

// ---- tile geometry -------------------------------------------------------------------------------------------
// One pipeline stage covers kBK = 64 K elements = 32 packed bytes per row = two 16-byte cp.async chunks, i.e.
// one m16n8k64 step. (A 128-element stage with padded rows was the alternative; 64 + swizzle needs no padding
// and keeps 3-4 stages of a 128x128 tile inside 48 KB of static shared memory.)
constexpr int kBK = 64;          // K elements per stage
constexpr int kRowBytes = 32;    // packed bytes per tile row per stage
constexpr int kChunkBytes = 16;  // cp.async granularity; K % 32 == 0 makes every chunk all-in or all-out of K

template <int BM_, int BN_, int WM_, int WN_, int STAGES_>
struct TileConfig {
  static constexpr int BM = BM_;            // block tile rows (M)
  static constexpr int BN = BN_;            // block tile cols (N)
  static constexpr int WM = WM_;            // warps along M
  static constexpr int WN = WN_;            // warps along N
  static constexpr int STAGES = STAGES_;    // cp.async pipeline depth
  static constexpr int kThreads = 32 * WM * WN;
  static constexpr int WTM = BM / WM;       // warp tile rows
  static constexpr int WTN = BN / WN;       // warp tile cols
  static constexpr int MT = WTM / 16;       // m16 MMA tiles per warp
  static constexpr int NT = WTN / 8;        // n8 MMA tiles per warp
  static constexpr int kAChunks = BM * 2;   // 16-byte chunks of A per stage
  static constexpr int kBChunks = BN * 2;
  static constexpr int kStageBytes = (BM + BN) * kRowBytes;
  static_assert(WTM % 16 == 0 && WTN % 8 == 0, "warp tile must be a whole number of m16n8 MMA tiles");
};

// Tile configurations chosen by M (int4_gemm.cu: select_config). Thresholds are wave-count heuristics, not
// measurements: decode keeps many blocks along N (M <= 16 fills one m16 tile); mid halves the M tile so that
// M = 32..256 still launches >= 2 blocks per SM on a 4096-wide N; prefill uses the largest tile.
using DecodeConfig = TileConfig<16, 32, 1, 4, 4>;     // 128 threads, warp 16x8
using MidConfig = TileConfig<64, 128, 2, 2, 3>;       // 128 threads, warp 32x64: 2x8 MMAs, 64 acc regs
using PrefillConfig = TileConfig<128, 128, 2, 4, 3>;  // 256 threads, warp 64x32: 4x4 MMAs, 64 acc regs

// Shared-memory byte offset of 16-byte chunk c (0 or 1) of tile row r. XOR swizzle: rows are 32 bytes (8 banks),
// so without it the 8 rows a fragment load touches (g = 0..7) would hit only 16 distinct banks (rows g and g+4
// collide: 2-way conflict). Flipping the chunk for rows 4..7 of every 8 spreads one load over all 32 banks
// (checked on the host: test "bank conflicts" in the harness).
PQK_HD int smem_chunk_offset(int r, int c) { return r * kRowBytes + ((c ^ ((r >> 2) & 1)) << 4); }

// Global->shared copy plan: chunk i of a stage (thread tid copies i = tid, tid + kThreads, ...) is row i/2,
// chunk i%2 — consecutive threads read consecutive 16-byte pieces of a row: coalesced.
PQK_HD int load_chunk_row(int i) { return i >> 1; }
PQK_HD int load_chunk_col(int i) { return i & 1; }

// Is chunk (row, c) of the stage at K byte offset k_byte inside the matrix? Outside -> zero-filled (zeros add
// nothing to the dot products; this is how odd M, N and K % 64 == 32 are handled without padding in memory).
PQK_HD bool load_chunk_valid(int row_global, int rows, int k_byte, int c, int k_bytes) {
  return row_global < rows && k_byte + c * kChunkBytes < k_bytes;
}

// ---- mma.m16n8k64.row.col.s32.s4.s4.s32 fragments (PTX ISA, "Matrix fragments for mma.m16n8k64") ------------
// g = lane / 4 (groupID), t = lane % 4 (threadID_in_group).
// A 16x64: 4 regs; reg r holds row g + 8*(r&1), K cols t*8 .. t*8+7 + 32*(r>>1)  -> packed bytes t*4..t*4+3 of
//          chunk r>>1 of that row, i.e. 32-bit word t of the chunk.
// B 64x8 (K contiguous per column n = a row of W): 2 regs; reg r holds K rows t*8..t*8+7 + 32*r of column g.
// C 16x8 s32: c0,c1 row g cols 2t, 2t+1; c2,c3 row g+8.
PQK_HD int a_frag_row(int lane, int reg) { return (lane >> 2) + ((reg & 1) << 3); }
PQK_HD int a_frag_chunk(int reg) { return reg >> 1; }
PQK_HD int b_frag_row(int lane) { return lane >> 2; }
PQK_HD int b_frag_chunk(int reg) { return reg; }
PQK_HD int frag_word_byte(int lane) { return (lane & 3) << 2; }
PQK_HD int c_frag_row(int lane, int e) { return (lane >> 2) + ((e >> 1) << 3); }
PQK_HD int c_frag_col(int lane, int e) { return ((lane & 3) << 1) + (e & 1); }

// Shared-memory byte offset (within the A / B part of a stage) of fragment register `reg` for the MMA tile whose
// first row (A: M row, B: N row of W) is tile_row0.
PQK_HD int a_frag_smem(int tile_row0, int lane, int reg) {
  return smem_chunk_offset(tile_row0 + a_frag_row(lane, reg), a_frag_chunk(reg)) + frag_word_byte(lane);
}
PQK_HD int b_frag_smem(int tile_row0, int lane, int reg) {
  return smem_chunk_offset(tile_row0 + b_frag_row(lane), b_frag_chunk(reg)) + frag_word_byte(lane);
}

// Warp w's tile origin inside the block tile (warps laid out WM x WN, M-major).
template <class Cfg>
PQK_HD int warp_row0(int warp) { return (warp / Cfg::WN) * Cfg::WTM; }
template <class Cfg>
PQK_HD int warp_col0(int warp) { return (warp % Cfg::WN) * Cfg::WTN; }

// Step 1 of the kernel as a plan: every 16-byte copy thread `tid` issues for K tile kt, handed to
// copy(is_w, smem_byte_offset, global_byte_offset, valid) — cp.async on the device, memcpy in the host harness.
// kWithA = false: the W chunks only (the A part of the stage is filled by the quantizing load below).
template <class Cfg, bool kWithA = true, class Copy>
PQK_HD void load_stage_plan(int tid, int m0, int n0, int kt, int prob_m, int prob_n, int k_bytes, Copy&& copy) {
  const int k_byte = kt * kRowBytes;
  for (int i = (kWithA ? 0 : Cfg::kAChunks) + tid; i < Cfg::kAChunks + Cfg::kBChunks; i += Cfg::kThreads) {
    const bool is_w = i >= Cfg::kAChunks;
    const int ci = is_w ? i - Cfg::kAChunks : i;
    const int r = load_chunk_row(ci), c = load_chunk_col(ci);
    const int row_g = (is_w ? n0 : m0) + r;
    const bool ok = load_chunk_valid(row_g, is_w ? prob_n : prob_m, k_byte, c, k_bytes);
    copy(is_w, (is_w ? Cfg::BM * kRowBytes : 0) + smem_chunk_offset(r, c),
         ok ? (long)row_g * k_bytes + k_byte + c * kChunkBytes : 0L, ok);
  }
}

// ---- static quantize in the A load (pqk_quant_gemm_static: float x in, no quantize launch before the GEMM) -------
// A static per-tensor scale makes quantizing A elementwise, so the GEMM does it while loading: A chunk (r, c) of a
// stage (16 packed bytes = 32 int4 elements of row m0 + r) is read as the 32 floats x[m0 + r, k0 .. k0 + 31],
// k0 = kt * kBK + c * 32, into registers, quantized with quant_math.h's quantize_value (the function
// pqk_quantize_static runs, so the bits equal quantize-then-GEMM's), packed (element 2i in the low nibble) and stored
// where cp.async would have put the packed chunk. The W half of the stage still goes by cp.async. Every tile config
// has at most one A chunk per thread, so thread tid owns chunk tid (same row/column split as load_stage_plan).
constexpr int kChunkElems = 2 * kChunkBytes;  // int4 elements per 16-byte chunk

struct AChunk {
  bool owner;     // the thread owns an A chunk of the stage (tid < kAChunks)
  bool valid;     // ... inside the matrix; else the stage gets zero bytes (as cp.async's src-size 0)
  long x_off;     // element offset of x[row, k0] (0 when !valid)
  int smem_off;   // byte offset in the stage's A part
};

template <class Cfg>
PQK_HD AChunk a_chunk_plan(int tid, int m0, int kt, int prob_m, int prob_k) {
  static_assert(Cfg::kAChunks <= Cfg::kThreads, "the quantizing A load gives each thread at most one chunk");
  const int r = load_chunk_row(tid), c = load_chunk_col(tid), row_g = m0 + r;
  const bool owner = tid < Cfg::kAChunks;
  const bool ok = owner && load_chunk_valid(row_g, prob_m, kt * kRowBytes, c, prob_k / 2);
  return AChunk{owner, ok, ok ? (long)row_g * prob_k + kt * kBK + c * kChunkElems : 0L, smem_chunk_offset(r, c)};
}

// 8 floats -> one little-endian word of 4 packed bytes (element 2b in the low nibble of byte b).
PQK_HD uint32_t quantize_pack8(const float (&v)[8], float scale) {
  uint32_t wd = 0;
  PQK_UNROLL
  for (int b = 0; b < 4; ++b)
    wd |= (uint32_t)pack_nibbles(quantize_value(v[2 * b], scale, -8, 7), quantize_value(v[2 * b + 1], scale, -8, 7))
          << (8 * b);
  return wd;
}

// Step 2a: lane's fragment registers of the warp tile (origin wr0, wc0) from one stage (A part at stage,
// W part at stage + BM * kRowBytes). Plain 32-bit loads; the swizzle makes each one conflict-free.
template <class Cfg>
PQK_HD void load_fragments(const uint8_t* stage, int wr0, int wc0, int lane, uint32_t (&af)[Cfg::MT][4],
                           uint32_t (&bf)[Cfg::NT][2]) {
  const uint8_t* b_sh = stage + Cfg::BM * kRowBytes;
  PQK_UNROLL
  for (int i = 0; i < Cfg::MT; ++i)
    PQK_UNROLL
    for (int r = 0; r < 4; ++r) af[i][r] = *reinterpret_cast<const uint32_t*>(stage + a_frag_smem(wr0 + i * 16, lane, r));
  PQK_UNROLL
  for (int j = 0; j < Cfg::NT; ++j)
    PQK_UNROLL
    for (int r = 0; r < 2; ++r) bf[j][r] = *reinterpret_cast<const uint32_t*>(b_sh + b_frag_smem(wc0 + j * 8, lane, r));
}

// Step 3 iteration: fn(i, j, h, row, col) for every accumulator pair of the lane: acc[i][j][2h] is (row, col),
// acc[i][j][2h+1] is (row, col + 1); col is even. row0/col0: the warp tile's origin in the output.
template <class Cfg, class Fn>
PQK_HD void for_each_acc_pair(int row0, int col0, int lane, Fn&& fn) {
  PQK_UNROLL
  for (int i = 0; i < Cfg::MT; ++i)
    PQK_UNROLL
    for (int j = 0; j < Cfg::NT; ++j)
      PQK_UNROLL
      for (int h = 0; h < 2; ++h) fn(i, j, h, row0 + i * 16 + c_frag_row(lane, 2 * h), col0 + j * 8 + c_frag_col(lane, 2 * h));
}

// ---- split-K (decode: too few blocks along N to fill the GPU) -------------------------------------------------
// At M <= 16 the grid is ceil(N / BN) blocks: 32 for a Llama-3-8B k/v projection (N = 1024) on a 108-SM A100. With
// gridDim.z = splits > 1, block z computes the K tiles [split_k_begin(z), split_k_begin(z + 1)) and adds its int32
// partial sums into a workspace with atomics; integer addition is associative, so the sums, and everything the
// epilogue computes from them, are bit-identical in any arrival order. The last block of an output tile to arrive
// (a per-tile counter) reads the sums back and runs the epilogue; the others write nothing else.
constexpr int kMinSplitTiles = 4;   // at least 4 K tiles (256 of K) per split: the pipeline needs a few stages
constexpr int kMaxSplits = 16;

// First K tile of split z: an even share, the first k_tiles % splits splits one tile more.
PQK_HD int split_k_begin(int k_tiles, int splits, int z) {
  const int q = k_tiles / splits, r = k_tiles % splits;
  return z * q + (z < r ? z : r);
}

// The auto policy (pqk_gemm_split_k): the decode tile only (M <= 16), enough blocks for two per SM.
template <class Cfg>
PQK_HD int auto_split_k(int m, int n, int k, int sms) {
  if (m > 16 || sms <= 0) return 1;
  const int blocks = (n + Cfg::BN - 1) / Cfg::BN, k_tiles = (k + kBK - 1) / kBK;
  if (blocks >= 2 * sms) return 1;
  int splits = (2 * sms + blocks - 1) / blocks;
  const int most = k_tiles / kMinSplitTiles;
  if (splits > most) splits = most;
  if (splits > kMaxSplits) splits = kMaxSplits;
  return splits < 1 ? 1 : splits;
}

// The workspace a split launch needs: int32 sums [M, N] then one uint32 counter per output tile; all zero at
// launch (the caller allocates it zeroed).
template <class Cfg>
PQK_HD long split_k_workspace_words(int m, int n) {
  return (long)m * n + (long)((m + Cfg::BM - 1) / Cfg::BM) * ((n + Cfg::BN - 1) / Cfg::BN);
}

// Publish (every split) and collect (the last one): the lane's accumulators in the sums [M, N] at ws. add(ptr, v)
// is atomicAdd on the device; load(ptr) an L2 read (__ldcg) after the counter said every split has added.
template <class Cfg, class Add>
PQK_HD void split_k_publish(const int32_t (&acc)[Cfg::MT][Cfg::NT][4], int32_t* ws, int row0, int col0, int lane,
                            int prob_m, int prob_n, Add&& add) {
  for_each_acc_pair<Cfg>(row0, col0, lane, [&](int i, int j, int h, int row, int col) {
    if (row >= prob_m) return;
    if (col < prob_n) add(ws + (long)row * prob_n + col, acc[i][j][2 * h]);
    if (col + 1 < prob_n) add(ws + (long)row * prob_n + col + 1, acc[i][j][2 * h + 1]);
  });
}
template <class Cfg, class Load>
PQK_HD void split_k_collect(int32_t (&acc)[Cfg::MT][Cfg::NT][4], const int32_t* ws, int row0, int col0, int lane,
                            int prob_m, int prob_n, Load&& load) {
  for_each_acc_pair<Cfg>(row0, col0, lane, [&](int i, int j, int h, int row, int col) {
    const bool in_row = row < prob_m;
    acc[i][j][2 * h] = in_row && col < prob_n ? load(ws + (long)row * prob_n + col) : 0;
    acc[i][j][2 * h + 1] = in_row && col + 1 < prob_n ? load(ws + (long)row * prob_n + col + 1) : 0;
  });
}

// ---- sm_90: no INT4 MMA. Unpack one s4 register (8 nibbles) into two s8 registers for mma.m16n8k32.s8 --------
// A k32 s8 fragment gives thread t the K elements t*4..t*4+3 in reg 0 (A: a0/a1, B: b0) and 16+t*4.. in reg 2 (A)
// / reg 1 (B). A k64 s4 register of thread t holds K = t*8..t*8+7. Feeding its even nibbles as the "t*4" register
// and its odd nibbles as the "16+t*4" register permutes K — identically for A and B, because both are indexed by
// t — and a dot product does not care about the order of its terms. So: two k32 MMAs per k64 step, no data
// movement between lanes, and the unpack is 4 logic ops per 4 elements (SWAR, instead of 8 low_nibble/high_nibble
// calls per register: ~3x fewer instructions in the inner loop). Per byte: u = nibble ^ 8 in 0..15, then
// (u + 0x78) ^ 0x80 = u - 8 mod 256 = the sign-extended nibble; u + 0x78 <= 0x87 never carries into the next byte.
// The harness checks it against quant_math.h's low_nibble/high_nibble on every byte value.
// evens: byte j = element 2j (low nibble of byte j); odds: byte j = element 2j+1.
PQK_HD uint32_t sext_nibbles_in_bytes(uint32_t v) { return ((v ^ 0x08080808u) + 0x78787878u) ^ 0x80808080u; }
PQK_HD void unpack_s4x8_to_s8x8(uint32_t x, uint32_t& evens, uint32_t& odds) {
  evens = sext_nibbles_in_bytes(x & 0x0F0F0F0Fu);
  odds = sext_nibbles_in_bytes((x >> 4) & 0x0F0F0F0Fu);
}

// The operands of the two k32 s8 MMAs that replace one k64 s4 MMA on sm_90: a8[s] = {a0, a1, a2, a3} and
// b8[s] = {b0, b1} of MMA s (s = 0: K 0..31 of the step, from s4 regs 0/1 and B reg 0; s = 1: regs 2/3, B reg 1).
PQK_HD void sm90_operands(const uint32_t (&a)[4], const uint32_t (&b)[2], uint32_t (&a8)[2][4], uint32_t (&b8)[2][2]) {
  PQK_UNROLL
  for (int s = 0; s < 2; ++s) {
    uint32_t lo0, hi0, lo1, hi1;
    unpack_s4x8_to_s8x8(a[2 * s], lo0, hi0);      // row g
    unpack_s4x8_to_s8x8(a[2 * s + 1], lo1, hi1);  // row g + 8
    a8[s][0] = lo0; a8[s][1] = lo1; a8[s][2] = hi0; a8[s][3] = hi1;
    unpack_s4x8_to_s8x8(b[s], b8[s][0], b8[s][1]);
  }
}

// ---- epilogues ------------------------------------------------------------------------------------------------
enum Epilogue : int {
  kEpiF16 = 0,          // y = acc * (a_s * w_s) [+ bias] -> fp16 [M, N]
  kEpiBF16 = 1,         // same -> bf16 [M, N]
  kEpiF32 = 2,          // same -> fp32 [M, N]
  kEpiRequant = 3,      // q = quantize(y, out_scale) -> packed int4 uint8 [M, N/2]
  kEpiSiluMulRequant = 4,  // W rows interleaved gate/up: h = silu(y[2j]) * y[2j+1], q = quantize(h) -> uint8 [M, N/4]
};

struct EpilogueParams {
  const float* a_scale;   // fp32 [1] (per-tensor, a_scale_stride 0) or [M] (per-token, stride 1)
  int a_scale_stride;     // 0 or 1
  const float* w_scale;   // fp32 [N] per output channel
  const float* bias;      // fp32 [N] or nullptr
  float out_scale;        // requant epilogues: the next layer's static activation scale (> 0)
};

// The dequant epilogue, in the reference's order: acc * (a_s * w_s), then + bias (fp32, no FMA: the .cu files are
// compiled with -fmad=false, so this is bit-exact with prefixquant_kernels.reference.dequant_epilogue).
PQK_HD float epi_dequant(int32_t acc, int row, int col, const EpilogueParams& p) {
  float y = dequant_value(acc, p.a_scale[row * p.a_scale_stride], p.w_scale[col]);
  if (p.bias != nullptr) y = y + p.bias[col];
  return y;
}

// The CUTLASS path's dequant (int4_gemm_cutlass.cu: the compute node of its epilogue visitor tree) applies this to
// fragments (cutlass::Array<float, N>; any type with kElements and operator[] works, which is how the host harness
// runs it without CUTLASS). acc arrives already converted int32 -> fp32 (round to nearest, exact below 2^24 and
// identical to (float)acc above); bias is 0.0f where there is none (exact: y is never -0.0 because scales are > 0).
// Same operations in the same order as epi_dequant, so both GEMM paths give the same bits.
template <class Frag>
struct DequantBiasFn {
  PQK_HD Frag operator()(const Frag& acc, const Frag& a_scale, const Frag& w_scale, const Frag& bias) const {
    Frag y;
    PQK_UNROLL
    for (int i = 0; i < Frag::kElements; ++i) y[i] = acc[i] * (a_scale[i] * w_scale[i]) + bias[i];
    return y;
  }
};

// SiLU(g) * u in fp32: g / (1 + exp(-g)) * u. expf is correctly rounded nowhere: the device expf is within 2 ulp
// of the host's, so a GPU result may differ from the host harness by one int4 step at a rounding boundary.
PQK_HD float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

PQK_HD int8_t requant4(float y, float out_scale) { return quantize_value(y, out_scale, -8, 7); }

// kEpiRequant: the two columns of one accumulator pair -> one packed byte at out[row, col / 2].
PQK_HD uint8_t epi_requant_pair(int32_t acc0, int32_t acc1, int row, int col, const EpilogueParams& p) {
  return pack_nibbles(requant4(epi_dequant(acc0, row, col, p), p.out_scale),
                      requant4(epi_dequant(acc1, row, col + 1, p), p.out_scale));
}

// kEpiSiluMulRequant: (col, col + 1) = (gate_j, up_j) with j = col / 2 -> int4 h_j. Bytes hold (h_j, h_j+1) for
// even j, so lanes t and t^1 (j and j + 1) pair up through a shuffle; the even lane writes out[row, col / 4].
PQK_HD int8_t epi_silu_mul_q(int32_t acc_gate, int32_t acc_up, int row, int col, const EpilogueParams& p) {
  return requant4(silu_mul(epi_dequant(acc_gate, row, col, p), epi_dequant(acc_up, row, col + 1, p)), p.out_scale);
}

// ---- decode GEMV (int4_gemm.cu: int4_gemv_kernel, config kGemv; M <= kGemvMaxM) ---------------------------------
// At M <= 4 the GEMM is a read of W. The tensor-core tiles compute 16 rows for 1 real one and, on sm_90, unpack
// every s4 register for two s8 MMAs; measured on an H200 they read W at 7-25 % of HBM bandwidth (docs/PERF.md step
// 21). The GEMV instead streams W with 16-byte loads and multiplies in the integer ALU:
//   - a block owns kGemvRows = 4 consecutive W rows (4 output columns: the requant epilogues' pairs and the silu-mul
//     quads stay in one block); its kGemvThreads threads split K in 32-element chunks (16 bytes of one W row),
//     thread t taking chunks t, t + kGemvThreads, ... (adjacent threads read adjacent 16 bytes: coalesced);
//   - per chunk the thread loads its A chunk (16 bytes per row of A, served from L2) and unpacks it once to s8
//     (sext_nibbles_in_bytes), then for each of the 4 W rows: the W nibbles stay UNSIGNED, u = nibble ^ 8 = w + 8
//     in 0..15 (one LOP3 for the even elements, SHF + LOP3 for the odd), and dp4a(u8 x s8) accumulates
//     sum u * a = sum w * a + 8 * sum a; the thread also sums its A elements, and acc - 8 * sum a is the exact
//     int32 dot product (|acc| <= 15 * 8 * K: no overflow below K = 17 M);
//   - the partial sums meet through warp shuffles and shared memory; threads 0 .. M*4-1 run the epilogue.
// Bit-identical to the tiles (the same exact int32 sums, the same epilogue functions).
constexpr int kGemv = 3;          // its config number in pqk_int4_gemm / pqk_quant_gemm_static
constexpr int kGemvMaxM = 4;
constexpr int kGemvRows = 4;
constexpr int kGemvThreads = 128;
constexpr int kGemvChunkElems = 32;  // one 16-byte chunk of a packed row

// dp4a with an unsigned-bytes first operand and signed-bytes second: c + sum_j ua[j] * sb[j] (PTX dp4a.u32.s32).
PQK_HD int32_t dp4a_us(uint32_t ua, uint32_t sb, int32_t c) {
#if defined(__CUDA_ARCH__)
  int32_t d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(ua), "r"(sb), "r"(c));
  return d;
#else
  for (int j = 0; j < 4; ++j) c += (int32_t)((ua >> (8 * j)) & 0xFFu) * (int32_t)(int8_t)((sb >> (8 * j)) & 0xFFu);
  return c;
#endif
}

// The unsigned nibbles u = w + 8 of one packed word: evens (byte j = element 2j), odds (element 2j + 1).
PQK_HD void unpack_u4x8(uint32_t w, uint32_t& evens, uint32_t& odds) {
  evens = (w & 0x0F0F0F0Fu) ^ 0x08080808u;
  odds = ((w >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u;
}

// One chunk of the GEMV for MR rows of A: a[m] = the 4 packed words of A row m's chunk, w[r] = those of W row r.
// acc[m][r] += sum (w + 8) * a over the chunk, asum[m] += sum a; the dot product is acc - 8 * asum (gemv_dot).
template <int MR>
PQK_HD void gemv_chunk(const uint32_t (&a)[MR][4], const uint32_t (&w)[kGemvRows][4], int32_t (&acc)[MR][kGemvRows],
                       int32_t (&asum)[MR]) {
  PQK_UNROLL
  for (int j = 0; j < 4; ++j) {
    uint32_t ae[MR], ao[MR];
    PQK_UNROLL
    for (int m = 0; m < MR; ++m) {
      unpack_s4x8_to_s8x8(a[m][j], ae[m], ao[m]);
      asum[m] = dp4a_us(0x01010101u, ae[m], dp4a_us(0x01010101u, ao[m], asum[m]));
    }
    PQK_UNROLL
    for (int r = 0; r < kGemvRows; ++r) {
      uint32_t ue, uo;
      unpack_u4x8(w[r][j], ue, uo);
      PQK_UNROLL
      for (int m = 0; m < MR; ++m) acc[m][r] = dp4a_us(ue, ae[m], dp4a_us(uo, ao[m], acc[m][r]));
    }
  }
}

PQK_HD int32_t gemv_dot(int32_t acc, int32_t asum) { return acc - 8 * asum; }

// The epilogue of one block (W rows n0 .. n0 + 3) for the final dot products dot[m * kGemvRows + r] (shared memory
// in the kernel: read at run-time indices, which a register array would turn into local memory), run by thread t
// in [0, MR * kGemvRows): row m = t / 4, column n0 + t % 4. store_f(index, value): a float output at out[index]
// (EPI 0-2, [M, N]); store_q(index, byte): a packed byte (requant: [M, N/2]; silu-mul: [M, N/4]).
template <class StoreF, class StoreQ>
PQK_HD void gemv_epilogue(int epi, int t, const int32_t* dot, int n0, int prob_m, int prob_n,
                          const EpilogueParams& ep, StoreF&& store_f, StoreQ&& store_q) {
  const int m = t / kGemvRows, r = t % kGemvRows, col = n0 + r;
  const int32_t* d = dot + m * kGemvRows;
  if (m >= prob_m || col >= prob_n) return;
  if (epi == kEpiRequant) {  // prob_n even: col + 1 < prob_n
    if (r % 2 == 0) store_q((long)m * (prob_n / 2) + col / 2, epi_requant_pair(d[r], d[r + 1], m, col, ep));
  } else if (epi == kEpiSiluMulRequant) {  // prob_n % 4 == 0: the block's 4 rows are (gate, up) of h_j and h_j+1
    if (r == 0)
      store_q((long)m * (prob_n / 4) + n0 / 4, pack_nibbles(epi_silu_mul_q(d[0], d[1], m, n0, ep),
                                                            epi_silu_mul_q(d[2], d[3], m, n0 + 2, ep)));
  } else {
    store_f((long)m * prob_n + col, epi_dequant(d[r], m, col, ep));
  }
}

}  // namespace cuda
}  // namespace pqk
