// Prefill attention over [16-bit prefix | the prompt] (models/prefix_attention.py's semantics): query t of T
// attends to the P prefix keys and to prompt keys 0..t, a causal mask aligned to the bottom right. A flash loop
// in fp32: each key row is widened once and used by every query block and all G query heads of its KV head
// (grouped-query attention stays grouped), and the key blocks above the diagonal are never visited.
//
//   per (sequence b, KV head h), once: K widened to fp32 and transposed per block of 64 keys (kt [D, 64]),
//     V widened to fp32 rows, zero past the keys                                   parallel over (b, h)
//     (bf16 inputs with AVX512-BF16: K and V stay bf16, as the pairs of x86_attention_bf16.h)
//   task = (b, h, block of kQBlock query positions)          parallel, costly and cheap blocks paired
//     Q: the G heads' rows of the block, fp32, times scale                        R = G * kQBlock rows
//     for each block of 64 keys up to the block's last query (P + t1):
//       S = Q . K^T (qk_block); n[r] = the keys row r attends to in this block (its position bounds them)
//       online softmax per row (softmax_block): m' = max(m, max S[:n]), P = exp(S - m') (0 past n),
//       l = l e^(m - m') + sum P, O = O e^(m - m')
//       O += P . V (pv_block)
//     out[b, t, head, :] = O / l
// torch's CPU SDPA took ~5.4 ms for SmolLM2's 512-token prefill attention per layer on the Zen 4, causal or not
// (it does not skip the masked blocks at T x (P + T)), ~37 % of the whole prefill (docs/PERF.md, change 17).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "kernels_internal.h"

namespace pqk {
namespace cpu {

namespace {

constexpr int64_t kQBlock = 16;  // query positions per task: R = 16 G rows (48 for SmolLM2's G = 3)
constexpr int64_t kKBlock = 64;  // keys per block (IsaKernels::qk_block / pv_block)

// The portable block products (IsaKernels::qk_block / pv_block's contracts, any D).
void qk_block_portable(const float* q, int64_t R, int64_t D, const float* kt, float* s) {
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * kKBlock;
    for (int64_t j = 0; j < kKBlock; ++j) sr[j] = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float a = q[r * D + d];
      const float* k = kt + d * kKBlock;
      for (int64_t j = 0; j < kKBlock; ++j) sr[j] += a * k[j];
    }
  }
}

void pv_block_portable(const float* p, int64_t R, const float* v, int64_t D, float* o) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < kKBlock; ++j) {
      const float a = p[r * kKBlock + j];
      for (int64_t d = 0; d < D; ++d) o[r * D + d] += a * v[j * D + d];
    }
}

// The online softmax step (IsaKernels::softmax_block's contract), a row at a time.
void softmax_block_portable(float* s, int64_t R, const int64_t* n, float* m, float* l, float* o, int64_t D) {
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * kKBlock;
    const int64_t nr = n[r];
    if (nr <= 0) {  // the whole block lies past this row's position
      std::fill(sr, sr + kKBlock, 0.0f);
      continue;
    }
    float mx = sr[0];
    for (int64_t j = 1; j < nr; ++j) mx = sr[j] > mx ? sr[j] : mx;
    const float m_new = std::max(m[r], mx);
    const float alpha = expf(m[r] - m_new);  // 0 for the first block (m = -inf)
    float sum = 0.0f;
    for (int64_t j = 0; j < nr; ++j) sum += sr[j] = expf(sr[j] - m_new);
    l[r] = l[r] * alpha + sum;
    std::fill(sr + nr, sr + kKBlock, 0.0f);
    m[r] = m_new;
    if (alpha != 1.0f)
      for (int64_t d = 0; d < D; ++d) o[r * D + d] *= alpha;
  }
}

}  // namespace

bool attention_blocks(Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  return ker.qk_block && ker.pv_block && ker.softmax_block;
}

void prefix_causal_attention(const void* q, const void* k, const void* v, FloatType t, int64_t B, int64_t Hq,
                             int64_t Hkv, int64_t T, int64_t P, int64_t D, float scale, void* out, Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  const auto qk_block = ker.qk_block ? ker.qk_block : qk_block_portable;
  const auto pv_block = ker.pv_block && D % 16 == 0 ? ker.pv_block : pv_block_portable;
  const auto softmax_block = ker.softmax_block ? ker.softmax_block : softmax_block_portable;
  // bf16 inputs where the table has the vdpbf16ps blocks: the products on bf16 pairs, nothing widened (2x the fp32
  // FMA's products per instruction). PQK_ATTN_BF16_DOT=0 keeps the fp32 blocks (tests, A/B).
  const char* dot_env = getenv("PQK_ATTN_BF16_DOT");
  const bool bf16 = t == FloatType::kBFloat16 && ker.qk_block_bf16 && ker.pv_block_bf16 && D % 16 == 0 &&
                    !(dot_env && strcmp(dot_env, "0") == 0);
  const int64_t G = Hq / Hkv, S = P + T, R = G * kQBlock;
  const int64_t n_qb = (T + kQBlock - 1) / kQBlock, n_kb = (S + kKBlock - 1) / kKBlock;
  // K and V of every (b, h) widened to fp32 once (each key row is read by up to n_qb query blocks): K transposed per
  // block of 64 keys (kt [n_kb][D][64]), V as rows ([n_kb * 64][D]); past S they keep the vectors' zeros.
  const int64_t kv_f = n_kb * kKBlock * D;  // floats per (b, h) in each
  std::vector<float> kt_all((size_t)(bf16 ? 0 : B * Hkv * kv_f)), v_all(kt_all.size());
  // The bf16 path's pairs instead: K as dwords transposed per block (kt2 [n_kb][D / 2][64]: a key row's dword p is
  // its d = 2p, 2p + 1), V with each pair of keys interleaved by column (v2 [n_kb * 32][D]); zero past S.
  const int64_t kv_w = kv_f / 2;  // pairs per (b, h) in each
  std::vector<uint32_t> kt2_all((size_t)(bf16 ? B * Hkv * kv_w : 0)), v2_all(kt2_all.size());
  if (bf16) parallel_for(0, B * Hkv, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t bh = h0; bh < h1; ++bh)
      for (int64_t j = 0; j < S; ++j) {
        const uint16_t* kr = (const uint16_t*)k + (bh * S + j) * D;
        const uint16_t* vr = (const uint16_t*)v + (bh * S + j) * D;
        uint32_t* kb = kt2_all.data() + bh * kv_w + (j / kKBlock) * (D / 2) * kKBlock + j % kKBlock;
        uint32_t* vb = v2_all.data() + bh * kv_w + (j / 2) * D;  // block j / 64 starts at pair row (j / 64) 32
        for (int64_t p = 0; p < D / 2; ++p) memcpy(kb + p * kKBlock, kr + 2 * p, 4);
        const int shift = (int)(j % 2) * 16;
        for (int64_t d = 0; d < D; ++d) vb[d] |= (uint32_t)vr[d] << shift;
      }
  });
  else parallel_for(0, B * Hkv, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> row((size_t)D);
    for (int64_t bh = h0; bh < h1; ++bh) {
      float* kt = kt_all.data() + bh * kv_f;
      float* vr = v_all.data() + bh * kv_f;
      for (int64_t j = 0; j < S; ++j) {
        float* kb = kt + (j / kKBlock) * D * kKBlock + j % kKBlock;
        load_row_as_f32(k, (bh * S + j) * D, D, t, row.data());
        for (int64_t d = 0; d < D; ++d) kb[d * kKBlock] = row[d];
        load_row_as_f32(v, (bh * S + j) * D, D, t, vr + j * D);
      }
    }
  });
  // Task i -> (b, h, query block): within each (b, h), blocks in the order 0, n-1, 1, n-2, ...: a block's cost grows
  // with its position, and parallel_for hands each thread a contiguous range of tasks, so neighbours pair a cheap
  // block with a costly one.
  parallel_for(0, B * Hkv * n_qb, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf((size_t)(R * D)), o((size_t)(R * D)), s((size_t)(R * kKBlock)), m((size_t)R), l((size_t)R);
    std::vector<uint16_t> qh((size_t)(bf16 ? R * D : 0));  // the bf16 path's Q rows, as given (scale: on S)
    std::vector<int64_t> n((size_t)R);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bh = i / n_qb, z = i % n_qb, b = bh / Hkv, h = bh % Hkv;
      const int64_t qb = z % 2 == 0 ? z / 2 : n_qb - 1 - z / 2;
      const int64_t t0 = qb * kQBlock, nt = std::min(kQBlock, T - t0);
      // Q rows r = g * kQBlock + u: head h G + g, position t0 + u, times scale; rows past T repeat the last position
      // (computed, never stored)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t u = 0; u < kQBlock; ++u) {
          const int64_t src = ((b * Hq + h * G + g) * T + t0 + std::min(u, nt - 1)) * D;
          if (bf16) {
            memcpy(qh.data() + (g * kQBlock + u) * D, (const uint16_t*)q + src, (size_t)D * 2);
            continue;
          }
          float* dst = qf.data() + (g * kQBlock + u) * D;
          load_row_as_f32(q, src, D, t, dst);
          for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
        }
      std::fill(o.begin(), o.end(), 0.0f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0f);
      const int64_t kend = P + t0 + nt;  // keys 0 .. kend - 1 are attended by some row of the block
      for (int64_t j0 = 0; j0 < kend; j0 += kKBlock) {
        const int64_t nk = std::min(kKBlock, kend - j0);
        if (bf16)
          ker.qk_block_bf16(qh.data(), R, D, kt2_all.data() + bh * kv_w + j0 * D / 2, scale, s.data());
        else
          qk_block(qf.data(), R, D, kt_all.data() + bh * kv_f + j0 * D, s.data());
        for (int64_t r = 0; r < R; ++r)  // row r's last key: P + its position; none past the block's nk
          n[r] = std::min(nk, P + t0 + std::min(r % kQBlock, nt - 1) - j0 + 1);
        softmax_block(s.data(), R, n.data(), m.data(), l.data(), o.data(), D);
        if (bf16)
          ker.pv_block_bf16(s.data(), R, v2_all.data() + bh * kv_w + j0 * D / 2, D, o.data());
        else
          pv_block(s.data(), R, v_all.data() + bh * kv_f + j0 * D, D, o.data());
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t u = 0; u < nt; ++u) {
          const int64_t r = g * kQBlock + u;
          const float inv = 1.0f / l[r];
          const int64_t dst = ((b * T + t0 + u) * Hq + h * G + g) * D;
          for (int64_t d = 0; d < D; ++d) store_from_f32(out, dst + d, o[r * D + d] * inv, t);
        }
    }
  });
}

}  // namespace cpu
}  // namespace pqk
