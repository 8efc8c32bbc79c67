// Host execution of int4_gemm.cu's kernel (g++, no GPU): blocks, warps and lanes are loops; the kernel's own
// gemm_math.cuh functions do every copy plan, swizzle, fragment address, register split (sm_90), output index and
// epilogue; the instructions (cp.async, mma.sync, shfl) are the emulators of harness.h. The result must equal a
// naive int GEMM + the quant_math.h epilogue bit for bit, for every tile config x epilogue x {sm_80, sm_90} path
// on odd M/N and K % 64 == 32 shapes, and for the float-A kernel (pqk_quant_gemm_static: x quantized in the A load)
// against quantize-then-GEMM. Shared memory is poisoned before every stage, so a fragment that reads a byte
// the copy plan did not write gives garbage.
//
// What it does not cover: timing (the cp.async pipeline's wait counts and barriers: on the host each stage is
// copied then consumed) and the fp16/bf16 rounding of the output (device intrinsics; the fp32 value before it is
// compared). Usage: gemm_harness [seed]; exit code 0 iff every case passed.
#include <cmath>
#include <cstdlib>
#include <string>

#include "../gemm_math.cuh"
#include "harness.h"

using namespace pqk;
using namespace pqk::cuda;
using harness::Counter;
using harness::Rng;

namespace {

struct Problem {
  int m, n, k;
  std::vector<uint8_t> a, w;  // [m, k/2], [n, k/2]
  std::vector<float> a_scale, w_scale, bias;
  bool per_token, has_bias;
  float out_scale;
  std::vector<float> x;       // float-A problems (pqk_quant_gemm_static): x [m, k]; a = quantize(x, a_scale[0])
};

Problem make_problem(int m, int n, int k, bool per_token, bool has_bias, Rng& rng) {
  Problem p{m, n, k, {}, {}, {}, {}, {}, per_token, has_bias, 0.0f, {}};
  p.a.resize((size_t)m * k / 2);
  p.w.resize((size_t)n * k / 2);
  for (auto& x : p.a) x = rng.byte();  // every nibble value -8..7, not CUTLASS's [-1, 1]
  for (auto& x : p.w) x = rng.byte();
  p.a_scale.resize(per_token ? m : 1);
  for (auto& s : p.a_scale) s = rng.uniform(0.01f, 0.2f);
  p.w_scale.resize(n);
  for (auto& s : p.w_scale) s = rng.uniform(0.001f, 0.05f);
  p.bias.resize(n);
  for (auto& b : p.bias) b = rng.uniform(-2.0f, 2.0f);
  p.out_scale = rng.uniform(0.5f, 3.0f);
  return p;
}

// A float-A problem: x over the whole int4 range and past it (clamped), a few NaN / +-Inf / huge values; A is
// x quantized element by element with the static scale (quant_math.h written out here, not quantize_pack8).
Problem make_float_problem(int m, int n, int k, bool has_bias, Rng& rng) {
  Problem p = make_problem(m, n, k, false, has_bias, rng);
  const float s = p.a_scale[0];
  p.x.resize((size_t)m * k);
  for (auto& v : p.x) v = rng.uniform(-10.0f, 10.0f) * s;
  const float specials[] = {NAN, INFINITY, -INFINITY, 3e38f, -3e38f, 7.5f * s, -8.5f * s, 0.5f * s};
  for (int i = 0; i < 8 && i < m * k; ++i) p.x[(size_t)(rng.next() % ((uint64_t)m * k))] = specials[i];
  for (size_t i = 0; i < p.a.size(); ++i)
    p.a[i] = pack_nibbles(quantize_value(p.x[2 * i], s, -8, 7), quantize_value(p.x[2 * i + 1], s, -8, 7));
  return p;
}

EpilogueParams params(const Problem& p) {
  return EpilogueParams{p.a_scale.data(), p.per_token ? 1 : 0, p.w_scale.data(), p.has_bias ? p.bias.data() : nullptr,
                        p.out_scale};
}

// The naive truth: int32 sums of sign-extended nibbles.
std::vector<int32_t> naive_acc(const Problem& p) {
  std::vector<int32_t> acc((size_t)p.m * p.n);
  const int kb = p.k / 2;
  for (int r = 0; r < p.m; ++r)
    for (int c = 0; c < p.n; ++c) {
      int32_t s = 0;
      for (int i = 0; i < kb; ++i) {
        uint8_t x = p.a[(size_t)r * kb + i], y = p.w[(size_t)c * kb + i];
        s += low_nibble(x) * low_nibble(y) + high_nibble(x) * high_nibble(y);
      }
      acc[(size_t)r * p.n + c] = s;
    }
  return acc;
}

// The reference epilogue, written out (not epi_dequant): acc * (a_s * w_s) + bias, in fp32.
float ref_y(const Problem& p, const std::vector<int32_t>& acc, int r, int c) {
  float y = dequant_value(acc[(size_t)r * p.n + c], p.a_scale[p.per_token ? r : 0], p.w_scale[c]);
  return p.has_bias ? y + p.bias[c] : y;
}

// Runs the kernel's code for every block, warp and lane. Returns the fp32 values (EPI 0-2: [m, n]) or the bytes
// (EPI 3: [m, n/2], 4: [m, n/4]) it would store; untouched outputs keep a sentinel so missing stores show.
// splits > 1: split-K (int4_gemm.cu: split_k_reduce): the splits of a tile run in reverse order (any order must give
// the same bits), each publishes its partial sums into the workspace; the last one collects and runs the epilogue.
template <class Cfg>
void run_kernel(const Problem& p, int epi, bool sm90, std::vector<float>& yf, std::vector<uint8_t>& yq,
                int splits = 1) {
  const EpilogueParams ep = params(p);
  const int k_bytes = p.k / 2, k_tiles_all = (p.k + kBK - 1) / kBK;
  const int warps = Cfg::kThreads / 32;
  yf.assign((size_t)p.m * p.n, NAN);
  yq.assign((size_t)p.m * (epi == kEpiRequant ? p.n / 2 : p.n / 4), 0xEE);
  std::vector<uint8_t> smem(Cfg::STAGES * Cfg::kStageBytes);
  using Acc = int32_t[Cfg::MT][Cfg::NT][4];
  std::vector<Acc> acc((size_t)warps * 32);
  std::vector<int32_t> ws(splits > 1 ? split_k_workspace_words<Cfg>(p.m, p.n) : 0, 0);
  const int grid_x = (p.n + Cfg::BN - 1) / Cfg::BN;
  for (int by = 0; by < (p.m + Cfg::BM - 1) / Cfg::BM; ++by)
    for (int bx = 0; bx < grid_x; ++bx)
     for (int z = splits - 1; z >= 0; --z) {
      const int m0 = by * Cfg::BM, n0 = bx * Cfg::BN;
      std::memset(acc.data(), 0, acc.size() * sizeof(Acc));
      for (int kt = split_k_begin(k_tiles_all, splits, z); kt < split_k_begin(k_tiles_all, splits, z + 1); ++kt) {
        uint8_t* stage = smem.data() + (kt % Cfg::STAGES) * Cfg::kStageBytes;
        std::memset(stage, 0xCD, Cfg::kStageBytes);  // poison: unwritten bytes are not zero
        const bool float_a = !p.x.empty();
        auto copy = [&](bool is_w, int sh, long gl, bool ok) {
          if (ok) std::memcpy(stage + sh, (is_w ? p.w.data() : p.a.data()) + gl, 16);
          else std::memset(stage + sh, 0, 16);  // cp.async with src-size 0
        };
        for (int tid = 0; tid < Cfg::kThreads; ++tid) {
          if (!float_a) {
            load_stage_plan<Cfg>(tid, m0, n0, kt, p.m, p.n, k_bytes, copy);
            continue;
          }
          // The quantizing A load (int4_gemm.cu: fetch_a_chunk + store_a_chunk): W by "cp.async", A from x.
          load_stage_plan<Cfg, false>(tid, m0, n0, kt, p.m, p.n, k_bytes, copy);
          const AChunk ch = a_chunk_plan<Cfg>(tid, m0, kt, p.m, p.k);
          if (!ch.owner) continue;
          uint32_t words[4] = {0, 0, 0, 0};
          for (int j = 0; ch.valid && j < 4; ++j) {
            float v[8];
            std::memcpy(v, p.x.data() + ch.x_off + 8 * j, sizeof v);
            words[j] = quantize_pack8(v, p.a_scale[0]);
          }
          std::memcpy(stage + ch.smem_off, words, 16);
        }
        for (int warp = 0; warp < warps; ++warp) {
          uint32_t af[32][Cfg::MT][4], bf[32][Cfg::NT][2];
          for (int lane = 0; lane < 32; ++lane)
            load_fragments<Cfg>(stage, warp_row0<Cfg>(warp), warp_col0<Cfg>(warp), lane, af[lane], bf[lane]);
          for (int i = 0; i < Cfg::MT; ++i)
            for (int j = 0; j < Cfg::NT; ++j) {
              uint32_t a[32][4], b[32][2];
              int32_t c[32][4];
              for (int l = 0; l < 32; ++l) {
                std::memcpy(a[l], af[l][i], sizeof a[l]);
                std::memcpy(b[l], bf[l][j], sizeof b[l]);
                std::memcpy(c[l], acc[warp * 32 + l][i][j], sizeof c[l]);
              }
              if (sm90) {  // mma_k64's Hopper branch: sm90_operands, then two k32 s8 MMAs
                uint32_t a8[2][32][4], b8[2][32][2];
                for (int l = 0; l < 32; ++l) {
                  uint32_t la[2][4], lb[2][2];
                  sm90_operands(a[l], b[l], la, lb);
                  for (int s = 0; s < 2; ++s) {
                    std::memcpy(a8[s][l], la[s], sizeof la[s]);
                    std::memcpy(b8[s][l], lb[s], sizeof lb[s]);
                  }
                }
                for (int s = 0; s < 2; ++s) harness::emu_mma_m16n8k32_s8(a8[s], b8[s], c);
              } else {
                harness::emu_mma_m16n8k64_s4(a, b, c);
              }
              for (int l = 0; l < 32; ++l) std::memcpy(acc[warp * 32 + l][i][j], c[l], sizeof c[l]);
            }
        }
      }
      if (splits > 1) {  // split_k_reduce: publish, count, the last split collects
        for (int warp = 0; warp < warps; ++warp)
          for (int lane = 0; lane < 32; ++lane)
            split_k_publish<Cfg>(acc[warp * 32 + lane], ws.data(), m0 + warp_row0<Cfg>(warp), n0 + warp_col0<Cfg>(warp),
                                 lane, p.m, p.n, [](int32_t* q, int32_t v) { *q += v; });
        int32_t& counter = ws[(size_t)p.m * p.n + by * grid_x + bx];
        if (++counter != splits) continue;
        for (int warp = 0; warp < warps; ++warp)
          for (int lane = 0; lane < 32; ++lane)
            split_k_collect<Cfg>(acc[warp * 32 + lane], ws.data(), m0 + warp_row0<Cfg>(warp), n0 + warp_col0<Cfg>(warp),
                                 lane, p.m, p.n, [](const int32_t* q) { return *q; });
      }
      // Epilogue, per warp; the silu-mul one in two phases around the emulated shuffle.
      for (int warp = 0; warp < warps; ++warp) {
        const int row0 = m0 + warp_row0<Cfg>(warp), col0 = n0 + warp_col0<Cfg>(warp);
        std::vector<int8_t> q(32 * Cfg::MT * Cfg::NT * 2, 0);
        auto slot = [](int lane, int i, int j, int h) { return ((lane * Cfg::MT + i) * Cfg::NT + j) * 2 + h; };
        for (int lane = 0; lane < 32; ++lane) {
          const Acc& ac = acc[warp * 32 + lane];
          for_each_acc_pair<Cfg>(row0, col0, lane, [&](int i, int j, int h, int row, int col) {
            const bool ok = row < p.m && col < p.n;
            if (!ok) return;
            const int32_t a0 = ac[i][j][2 * h], a1 = ac[i][j][2 * h + 1];
            if (epi == kEpiSiluMulRequant) {
              q[slot(lane, i, j, h)] = epi_silu_mul_q(a0, a1, row, col, ep);
            } else if (epi == kEpiRequant) {
              yq[(size_t)row * (p.n / 2) + col / 2] = epi_requant_pair(a0, a1, row, col, ep);
            } else {
              yf[(size_t)row * p.n + col] = epi_dequant(a0, row, col, ep);
              if (col + 1 < p.n) yf[(size_t)row * p.n + col + 1] = epi_dequant(a1, row, col + 1, ep);
            }
          });
        }
        if (epi != kEpiSiluMulRequant) continue;
        for (int lane = 0; lane < 32; ++lane)
          for_each_acc_pair<Cfg>(row0, col0, lane, [&](int i, int j, int h, int row, int col) {
            const int8_t partner = q[slot(lane ^ 1, i, j, h)];  // __shfl_xor_sync(.., q, 1)
            if (row < p.m && col < p.n && (lane & 1) == 0)
              yq[(size_t)row * (p.n / 4) + col / 4] = pack_nibbles(q[slot(lane, i, j, h)], partner);
          });
      }
    }
}

// Outputs that differ from the naive GEMM + reference epilogue (first: the flat index of the first one).
long mismatches(const Problem& p, int epi, const std::vector<float>& yf, const std::vector<uint8_t>& yq, long& first) {
  const std::vector<int32_t> acc = naive_acc(p);
  const int m = p.m, n = p.n;
  long bad = 0;
  first = -1;
  if (epi <= kEpiF32) {
    for (int r = 0; r < m; ++r)
      for (int c = 0; c < n; ++c)
        if (!harness::same_bits(yf[(size_t)r * n + c], ref_y(p, acc, r, c)) && bad++ == 0) first = (long)r * n + c;
  } else if (epi == kEpiRequant) {
    for (int r = 0; r < m; ++r)
      for (int c = 0; c < n; c += 2) {
        uint8_t want = pack_nibbles(quantize_value(ref_y(p, acc, r, c), p.out_scale, -8, 7),
                                    quantize_value(ref_y(p, acc, r, c + 1), p.out_scale, -8, 7));
        if (yq[(size_t)r * (n / 2) + c / 2] != want && bad++ == 0) first = (long)r * n + c;
      }
  } else {
    for (int r = 0; r < m; ++r)
      for (int j = 0; j < n / 2; j += 2) {
        int8_t h[2];
        for (int d = 0; d < 2; ++d) {
          float g = ref_y(p, acc, r, 2 * (j + d)), u = ref_y(p, acc, r, 2 * (j + d) + 1);
          h[d] = quantize_value(g / (1.0f + std::exp(-g)) * u, p.out_scale, -8, 7);
        }
        if (yq[(size_t)r * (n / 4) + j / 2] != pack_nibbles(h[0], h[1]) && bad++ == 0) first = (long)r * n + 2 * j;
      }
  }
  return bad;
}

void report(const std::string& name, int m, int n, int k, int epi, const char* path, bool float_a, bool per_token,
            bool has_bias, int splits, long bad, long first, Counter& cnt) {
  std::string what = name + " m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k) +
                     " epi=" + std::to_string(epi) + " " + path +
                     (float_a ? " float-A" : per_token ? " per-token" : " per-tensor") + (has_bias ? " bias" : "") +
                     " splits=" + std::to_string(splits) + " mismatches=" + std::to_string(bad) +
                     " first(flat)=" + std::to_string(first);
  cnt.check(bad == 0, what.c_str());
}

template <class Cfg>
void check_case(const char* cfg_name, int m, int n, int k, int epi, bool sm90, bool per_token, bool has_bias,
                Rng& rng, Counter& cnt, bool float_a = false, int splits = 1) {
  Problem p = float_a ? make_float_problem(m, n, k, has_bias, rng) : make_problem(m, n, k, per_token, has_bias, rng);
  std::vector<float> yf;
  std::vector<uint8_t> yq;
  run_kernel<Cfg>(p, epi, sm90, yf, yq, splits);
  long first;
  const long bad = mismatches(p, epi, yf, yq, first);
  report(cfg_name, m, n, k, epi, sm90 ? "sm90" : "sm80", float_a, per_token, has_bias, splits, bad, first, cnt);
}

// ---- the decode GEMV (int4_gemm.cu: int4_gemv_kernel), block by block and thread by thread -------------------
// Thread t of block b takes chunks t, t + kGemvThreads, ... of W rows 4b .. 4b + 3, loads (here: copies) the
// 16-byte words, and calls the kernel's gemv_chunk; float A is quantized per chunk with quantize_pack8 as the
// kernel does. The warp shuffles and the shared-memory sum are integer sums (any order: the same bits).
template <int MR>
void run_gemv(const Problem& p, int epi, bool float_a, std::vector<float>& yf, std::vector<uint8_t>& yq) {
  const EpilogueParams ep = params(p);
  yf.assign((size_t)p.m * p.n, NAN);
  yq.assign((size_t)p.m * (epi == kEpiRequant ? p.n / 2 : p.n / 4), 0xEE);
  const int chunks = p.k / kGemvChunkElems, kb = p.k / 2;
  auto word = [](const uint8_t* b) { uint32_t v; std::memcpy(&v, b, 4); return v; };
  for (int n0 = 0; n0 < p.n; n0 += kGemvRows) {
    int32_t dot[MR * kGemvRows] = {};
    for (int t = 0; t < kGemvThreads; ++t) {
      int32_t acc[MR][kGemvRows] = {}, asum[MR] = {};
      for (int c = t; c < chunks; c += kGemvThreads) {
        uint32_t wd[kGemvRows][4] = {}, ad[MR][4] = {};
        for (int r = 0; r < kGemvRows; ++r)
          if (n0 + r < p.n)
            for (int j = 0; j < 4; ++j) wd[r][j] = word(&p.w[(size_t)(n0 + r) * kb + c * 16 + 4 * j]);
        for (int m = 0; m < MR && m < p.m; ++m)
          for (int j = 0; j < 4; ++j) {
            if (float_a) {
              float v[8];
              for (int e = 0; e < 8; ++e) v[e] = p.x[(size_t)m * p.k + c * kGemvChunkElems + 8 * j + e];
              ad[m][j] = quantize_pack8(v, p.a_scale[0]);
            } else {
              ad[m][j] = word(&p.a[(size_t)m * kb + c * 16 + 4 * j]);
            }
          }
        gemv_chunk<MR>(ad, wd, acc, asum);
      }
      for (int m = 0; m < MR; ++m)
        for (int r = 0; r < kGemvRows; ++r) dot[m * kGemvRows + r] += gemv_dot(acc[m][r], asum[m]);
    }
    for (int t = 0; t < MR * kGemvRows; ++t)
      gemv_epilogue(epi, t, dot, n0, p.m, p.n, ep, [&](long i, float v) { yf[(size_t)i] = v; },
                        [&](long i, uint8_t q) { yq[(size_t)i] = q; });
  }
}

void check_gemv_case(int m, int n, int k, int epi, bool per_token, bool has_bias, bool float_a, Rng& rng,
                     Counter& cnt) {
  Problem p = float_a ? make_float_problem(m, n, k, has_bias, rng) : make_problem(m, n, k, per_token, has_bias, rng);
  std::vector<float> yf;
  std::vector<uint8_t> yq;
  if (m == 1)
    run_gemv<1>(p, epi, float_a, yf, yq);  // the launcher's choice: MR = 1 for one row, kGemvMaxM for 2..4
  else
    run_gemv<kGemvMaxM>(p, epi, float_a, yf, yq);
  long first;
  const long bad = mismatches(p, epi, yf, yq, first);
  report("gemv", m, n, k, epi, "any sm", float_a, per_token, has_bias, 1, bad, first, cnt);
}

// Every row count up to kGemvMaxM, N with a partial last block, K of one chunk, of one chunk per thread and of more
// chunks than threads (the grid-stride loop), every epilogue, packed A (per tensor / per token) and float A; and the
// mixed-sign dp4a against its definition on edge bytes.
void gemv_sweep(Rng& rng, Counter& cnt) {
  const int shapes[][2] = {{5, 32}, {36, 96}, {130, 4096}, {8, 8224}};
  for (int m = 1; m <= kGemvMaxM; ++m)
    for (auto& s : shapes)
      for (int epi = kEpiF16; epi <= kEpiSiluMulRequant; ++epi) {
        if (epi == kEpiBF16) continue;
        const int n = epi == kEpiRequant ? (s[0] + 1) / 2 * 2 : epi == kEpiSiluMulRequant ? (s[0] + 3) / 4 * 4 : s[0];
        check_gemv_case(m, n, s[1], epi, (m + epi) % 2 == 0, (epi + n) % 2 == 1, false, rng, cnt);
        if (epi == kEpiF32 || epi == kEpiSiluMulRequant) check_gemv_case(m, n, s[1], epi, false, m % 2 == 0, true, rng, cnt);
      }
  bool ok = true;
  const uint32_t vals[] = {0u, 0xFFFFFFFFu, 0x80808080u, 0x7F7F7F7Fu, 0x0F0F0F0Fu, 0x01FF807Fu};
  for (uint32_t ua : vals)
    for (uint32_t sb : vals) {
      int32_t want = 7;
      for (int j = 0; j < 4; ++j) want += (int32_t)((ua >> (8 * j)) & 0xFF) * (int32_t)(int8_t)(sb >> (8 * j));
      ok = ok && dp4a_us(ua, sb, 7) == want;
    }
  cnt.check(ok, "dp4a_us (u8 x s8)");
}

// Every fragment load of a warp (one 32-bit LDS per register) must touch 32 distinct banks and be 4-byte aligned.
template <class Cfg>
void check_banks(const char* cfg_name, Counter& cnt) {
  bool ok = true;
  for (int warp = 0; warp < Cfg::kThreads / 32; ++warp) {
    for (int i = 0; i < Cfg::MT; ++i)
      for (int r = 0; r < 4; ++r) {
        unsigned banks = 0;
        for (int lane = 0; lane < 32; ++lane) {
          int off = a_frag_smem(warp_row0<Cfg>(warp) + i * 16, lane, r);
          ok &= off % 4 == 0;
          banks |= 1u << ((off / 4) % 32);
        }
        ok &= banks == 0xFFFFFFFFu;
      }
    for (int j = 0; j < Cfg::NT; ++j)
      for (int r = 0; r < 2; ++r) {
        unsigned banks = 0;
        for (int lane = 0; lane < 32; ++lane) banks |= 1u << ((b_frag_smem(warp_col0<Cfg>(warp) + j * 8, lane, r) / 4) % 32);
        ok &= banks == 0xFFFFFFFFu;
      }
  }
  cnt.check(ok, (std::string("bank conflicts ") + cfg_name).c_str());
}

// sm90's SWAR unpack against quant_math.h's low_nibble/high_nibble, on every byte value in every position.
void check_unpack(Counter& cnt) {
  bool ok = true;
  for (uint32_t v = 0; v < 256; ++v)
    for (int pos = 0; pos < 4; ++pos) {
      uint32_t x = (v << (8 * pos)) | (0x9Au << (8 * ((pos + 1) % 4)));
      uint32_t evens, odds;
      unpack_s4x8_to_s8x8(x, evens, odds);
      for (int j = 0; j < 4; ++j) {
        uint8_t byte = (uint8_t)(x >> (8 * j));
        ok &= harness::sbyte(evens, j) == low_nibble(byte) && harness::sbyte(odds, j) == high_nibble(byte);
      }
    }
  cnt.check(ok, "unpack_s4x8_to_s8x8");
}

// The CUTLASS path's epilogue compute node (DequantBiasFn, run by CUTLASS on fragments of 8 outputs) against the
// reference for every element of random problems: the AccFetch conversion is static_cast<float> (CUTLASS's
// NumericConverter<float, int>), a missing bias is the RowBroadcast null default 0.0f. What this cannot cover is
// CUTLASS's own broadcast indexing (which row/col scale meets which accumulator): the GPU tests do.
struct HostFrag {  // the two members of cutlass::Array<float, 8> that DequantBiasFn uses
  static constexpr int kElements = 8;
  float v[kElements];
  float& operator[](int i) { return v[i]; }
  const float& operator[](int i) const { return v[i]; }
};

void check_cutlass_dequant_fn(Rng& rng, Counter& cnt) {
  for (int t = 0; t < 8; ++t) {
    const bool per_token = t & 1, has_bias = t & 2;
    Problem p = make_problem(3 + t, 40, 32 * (1 + t), per_token, has_bias, rng);
    std::vector<int32_t> acc = naive_acc(p);
    long bad = 0;
    for (int r = 0; r < p.m; ++r)
      for (int c0 = 0; c0 < p.n; c0 += HostFrag::kElements) {
        HostFrag fa, fs, fw, fb;
        for (int i = 0; i < HostFrag::kElements; ++i) {
          fa[i] = static_cast<float>(acc[(size_t)r * p.n + c0 + i]);
          fs[i] = p.a_scale[per_token ? r : 0];
          fw[i] = p.w_scale[c0 + i];
          fb[i] = has_bias ? p.bias[c0 + i] : 0.0f;
        }
        const HostFrag y = DequantBiasFn<HostFrag>{}(fa, fs, fw, fb);
        for (int i = 0; i < HostFrag::kElements; ++i)
          bad += !harness::same_bits(y[i], ref_y(p, acc, r, c0 + i)) ||
                 !harness::same_bits(y[i], epi_dequant(acc[(size_t)r * p.n + c0 + i], r, c0 + i, params(p)));
      }
    cnt.check(bad == 0, ("cutlass DequantBiasFn" + std::string(per_token ? " per-token" : " per-tensor") +
                         (has_bias ? " bias" : "") + " mismatches=" + std::to_string(bad)).c_str());
  }
}

template <class Cfg>
void sweep(const char* name, Rng& rng, Counter& cnt) {
  check_banks<Cfg>(name, cnt);
  // (m, n, k): odd M and N, K = 32 (one half-filled stage), K % 64 == 32, several stages, M/N past one tile
  const int shapes[][3] = {{1, 8, 32}, {3, 20, 96}, {17, 37, 160}, {Cfg::BM + 5, Cfg::BN + 12, 288}, {2, 132, 64}};
  for (auto& s : shapes)
    for (int epi = kEpiF16; epi <= kEpiSiluMulRequant; ++epi) {
      if (epi == kEpiBF16) continue;  // fp32 value identical to kEpiF16 before the device cast
      int n = epi == kEpiRequant ? (s[1] + 1) / 2 * 2 : epi == kEpiSiluMulRequant ? (s[1] + 3) / 4 * 4 : s[1];
      for (int sm90 = 0; sm90 < 2; ++sm90) {
        check_case<Cfg>(name, s[0], n, s[2], epi, sm90 == 1, (epi + s[0]) % 2 == 0, (epi + s[1]) % 2 == 1, rng, cnt);
        // pqk_quant_gemm_static: the float-x dequant (fp32 value before the output cast) and silu-mul epilogues
        if (epi == kEpiF32 || epi == kEpiSiluMulRequant)
          check_case<Cfg>(name, s[0], n, s[2], epi, sm90 == 1, false, (epi + s[0]) % 2 == 1, rng, cnt, true);
      }
    }
}

}  // namespace

// Split-K on the decode tile: every split count up to one per K tile (uneven shares included), packed and float A,
// every epilogue; and the auto policy's choices.
void split_sweep(Rng& rng, Counter& cnt) {
  const int shapes[][3] = {{1, 40, 288}, {5, 36, 640}, {16, 68, 96}};  // (m, n, k): 5, 10, 2 K tiles (K % 64 == 32)
  for (auto& s : shapes) {
    const int k_tiles = (s[2] + kBK - 1) / kBK;
    for (int splits = 2; splits <= k_tiles; ++splits)
      for (int epi = kEpiF16; epi <= kEpiSiluMulRequant; ++epi) {
        if (epi == kEpiBF16) continue;
        int n = epi == kEpiRequant ? (s[1] + 1) / 2 * 2 : epi == kEpiSiluMulRequant ? (s[1] + 3) / 4 * 4 : s[1];
        check_case<DecodeConfig>("decode", s[0], n, s[2], epi, splits % 2 == 0, (epi + splits) % 2 == 0, epi % 2 == 0,
                                 rng, cnt, false, splits);
        if (epi == kEpiF32 || epi == kEpiSiluMulRequant)
          check_case<DecodeConfig>("decode", s[0], n, s[2], epi, splits % 2 == 1, false, true, rng, cnt, true, splits);
      }
  }
  // auto policy: no split at M > 16 or with enough blocks; k/v of Llama-3-8B on 108 SMs splits 7 ways; a short K
  // caps the splits at K / 256.
  bool ok = auto_split_k<DecodeConfig>(17, 1024, 4096, 108) == 1 && auto_split_k<DecodeConfig>(1, 14336, 4096, 108) == 1 &&
            auto_split_k<DecodeConfig>(1, 1024, 4096, 108) == 7 && auto_split_k<DecodeConfig>(1, 4096, 4096, 108) == 2 &&
            auto_split_k<DecodeConfig>(1, 1024, 512, 108) == 2 && auto_split_k<DecodeConfig>(1, 64, 8192, 132) == 16 &&
            auto_split_k<DecodeConfig>(1, 64, 128, 132) == 1;
  cnt.check(ok, "auto_split_k policy");
}

int main(int argc, char** argv) {
  Rng rng(argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1);
  Counter cnt;
  check_unpack(cnt);
  check_cutlass_dequant_fn(rng, cnt);
  sweep<DecodeConfig>("decode", rng, cnt);
  sweep<MidConfig>("mid", rng, cnt);
  sweep<PrefillConfig>("prefill", rng, cnt);
  split_sweep(rng, cnt);
  gemv_sweep(rng, cnt);
  return cnt.finish("gemm_harness");
}
