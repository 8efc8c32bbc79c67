// KV cache on the CPU: [16-bit prefix | static-quantized body] -> one attention-ready tensor, written row by
// row straight into the output (no concatenation copies). Parallel over (batch, head, row).
#include <string.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/quant_math.h"
#include "kernels.h"
#include "kernels_internal.h"

namespace pqk {
namespace cpu {

void kv_dequant_concat_static(const void* prefix, FloatType pt, int64_t prefix_batch, int64_t P, const void* body,
                              int bits, const float* scale, int64_t B, int64_t H, int64_t T, int64_t D, void* out,
                              FloatType ot, Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  const int64_t N = P + T, osz = float_type_size(ot), psz = float_type_size(pt);
  const int64_t body_row = bits == 4 ? D / 2 : D;  // bytes per body row
  parallel_for(0, B * H * N, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / N, n = r % N, b = bh / H, h = bh % H;
      char* dst = (char*)out + r * D * osz;
      if (n < P) {  // prefix row: batch 1 is shared by every sequence
        const char* src = (const char*)prefix + (((prefix_batch == 1 ? 0 : b) * H + h) * P + n) * D * psz;
        if (pt == ot) {
          memcpy(dst, src, (size_t)(D * osz));
        } else {
          for (int64_t d = 0; d < D; ++d) store_from_f32(dst, d, load_as_f32(src, d, pt), ot);
        }
        continue;
      }
      const char* q = (const char*)body + (bh * T + (n - P)) * body_row;
      if (bits == 4) {
        ker.dequant_row4((const uint8_t*)q, D, scale[h], dst, ot);
      } else {
        for (int64_t d = 0; d < D; ++d) store_from_f32(dst, d, (float)((const int8_t*)q)[d] * scale[h], ot);
      }
    }
  });
}

void kv_quantize_static(const void* x, FloatType xt, const float* scale, int bits, int64_t B, int64_t H, int64_t T,
                        int64_t D, void* out, Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  const int64_t xsz = float_type_size(xt), out_row = bits == 4 ? D / 2 : D;
  parallel_for(0, B * H * T, 64, [&](int64_t r0, int64_t r1) {
    std::vector<int8_t> q((size_t)D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = (r / T) % H;
      int8_t* dst = bits == 4 ? q.data() : (int8_t*)out + r * out_row;
      ker.quantize_row((const char*)x + r * D * xsz, xt, D, scale[h], qmin_for_bits(bits), qmax_for_bits(bits), dst);
      if (bits == 4) ker.pack_row(q.data(), D, (uint8_t*)out + r * out_row);
    }
  });
}

// The paged write: one task per (token, head, K or V) row, straight from key / value into its page. A K row with
// an offset goes through a row of xt first: K - offset computed in fp32 and rounded to xt, then quantized from
// there, so the codes equal kv_quantize_static's of transform_keys' result (which rounds to the key's dtype).
void kv_write_paged_static(const void* k, int64_t ks_t, int64_t ks_h, const void* v, int64_t vs_t, int64_t vs_h,
                           FloatType xt, int64_t T, int64_t H, int64_t D, const int64_t* slots, const float* k_scale,
                           const float* v_scale, const float* k_offset, int bits, uint8_t* cache, int64_t block_size,
                           Isa isa) {
  const IsaKernels& ker = kernels_for(isa);
  const int64_t xsz = float_type_size(xt), row = bits == 4 ? D / 2 : D;
  parallel_for(0, T * H * 2, 32, [&](int64_t r0, int64_t r1) {
    std::vector<int8_t> q((size_t)D);
    std::vector<char> shifted((size_t)(k_offset ? D * xsz : 0));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / (2 * H), h = r / 2 % H, side = r % 2;  // side 0: K, 1: V
      if (slots[t] < 0) continue;
      const char* src = side ? (const char*)v + (t * vs_t + h * vs_h) * xsz
                             : (const char*)k + (t * ks_t + h * ks_h) * xsz;
      if (side == 0 && k_offset) {
        for (int64_t d = 0; d < D; ++d)
          store_from_f32(shifted.data(), d, load_as_f32(src, d, xt) - k_offset[h * D + d], xt);
        src = shifted.data();
      }
      const int64_t block = slots[t] / block_size, off = slots[t] % block_size;
      uint8_t* dst = cache + ((block * H + h) * block_size + off) * 2 * row + side * row;
      int8_t* codes = bits == 4 ? q.data() : (int8_t*)dst;
      ker.quantize_row(src, xt, D, (side ? v_scale : k_scale)[h], qmin_for_bits(bits), qmax_for_bits(bits), codes);
      if (bits == 4) ker.pack_row(q.data(), D, dst);
    }
  });
}

// Flash-decoding on the CPU: the attended positions of each sequence are cut into equal chunks of at most
// kChunkRows (128; 64 / 192 / 256 were slower on the Zen 5, docs/PERF.md change 24), and a task is one (sequence,
// KV head, chunk): its G query heads' scores over the chunk, their softmax numerators relative to the chunk's own
// max, and the unnormalized P·V. A serial pass then merges the chunks of each (sequence, KV head):
// out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c, M = max_c m_c. Chunks keep both threads busy at batch 1
// (SmolLM2 has 3 KV heads: one task per head left one of 2 threads idle half the time).
// The body rows of a task are read packed, each unpacked into registers once per pass and used by all G heads
// (qk_rows_q4, pv_rows_q4); the prefix rows are widened into an fp32 row. The per-head scale is applied once per
// score and once to the V sum instead of per element. sm_scale is folded into q.
void kv_decode_attention_static(const void* q, FloatType qt, int64_t B, int64_t Hq, int64_t D,
                                const void* prefix_k, const void* prefix_v, FloatType pt, int64_t prefix_batch,
                                int64_t P, const KVBody& body, int bits, const float* k_scale, const float* v_scale,
                                int64_t Hkv, int64_t T, const int64_t* body_lens, const bool* mask,
                                int64_t mask_stride, float sm_scale, void* out, Isa isa) {
  constexpr int64_t kChunkRows = 128;
  const IsaKernels& ker = kernels_for(isa);
  const int64_t G = Hq / Hkv, N = P + T;
  // the attended positions of each sequence: all N (or P + its body_lens), or those its mask row allows
  // A sequence whose attended positions are exactly 0..n-1 (no left padding: every row of a batch-1 step) is read
  // as an unmasked one (dense): its rows by offset, not through the index list.
  std::vector<std::vector<int64_t>> pos((size_t)(mask ? B : 0));
  std::vector<int64_t> n_att((size_t)B, N), chunk0((size_t)B + 1, 0), crows((size_t)B, kChunkRows);
  std::vector<char> dense((size_t)B, 1);
  for (int64_t b = 0; b < B; ++b) {
    if (body_lens) n_att[(size_t)b] = P + body_lens[b];
    if (mask) {  // dense: a run of allowed positions from 0, then none (found without building the list)
      const bool* row = mask + b * mask_stride;
      int64_t n = 0, e;
      while (n < N && row[n]) ++n;
      for (e = n; e < N && !row[e];) ++e;
      dense[(size_t)b] = e == N;
      if (dense[(size_t)b]) {
        n_att[(size_t)b] = n;
      } else {
        for (int64_t i = 0; i < N; ++i)
          if (row[i]) pos[(size_t)b].push_back(i);
        n_att[(size_t)b] = (int64_t)pos[(size_t)b].size();
      }
    }
    // the fewest chunks of at most kChunkRows, of equal size (rounded up to 8 rows): 514 positions are 5 chunks of
    // 104, not 4 of 128 and one of 2, whose 15 tasks gave one thread 8 full ones and the other 4 and 3 stubs
    const int64_t nc = (n_att[(size_t)b] + kChunkRows - 1) / kChunkRows;
    if (nc > 0) crows[(size_t)b] = round_up((n_att[(size_t)b] + nc - 1) / nc, 8);
    chunk0[(size_t)b + 1] = chunk0[(size_t)b] + nc;
  }
  const int64_t n_chunks = chunk0[(size_t)B];   // per KV head
  // per (chunk, KV head): the G running maxima, numerator sums and unnormalized P·V [G, D]
  std::vector<float> part_m((size_t)(n_chunks * Hkv * G)), part_l(part_m.size()), part_acc(part_m.size() * D);
  // task t = (chunk c, KV head h): its sequence b and the chunk's attended positions [j0, j0 + nj) of b's n_att
  auto task = [&](int64_t t, int64_t& b, int64_t& h, int64_t& j0, int64_t& nj) {
    const int64_t c = t / Hkv;
    h = t % Hkv;
    b = std::upper_bound(chunk0.begin(), chunk0.end(), c) - chunk0.begin() - 1;
    j0 = (c - chunk0[(size_t)b]) * crows[(size_t)b];
    nj = std::min(crows[(size_t)b], n_att[(size_t)b] - j0);
  };
  // The cache of a layer is cold when its decode attention starts (a decode step streams every layer's weights
  // through L3 in between), and a task's rows (4 KB of K and of V at 128 rows, D = 64) were read on demand, at
  // DRAM latency. Each task now asks for the next one's body rows before it starts (and a thread's first task for
  // its own), so they arrive while it computes: ~3 % of SmolLM2's decode step with the equal chunks above
  // (docs/PERF.md, change 25). Where the rows are consecutive (a dense sequence, a strided body) only.
  auto prefetch_task = [&](int64_t t) {
    int64_t b, h, j0, nj;
    task(t, b, h, j0, nj);
    const int64_t lo = std::max(j0, P);  // the chunk's body positions [lo, j0 + nj)
    if ((mask && !dense[(size_t)b]) || body.table || lo >= j0 + nj) return;
    const int64_t first = body.row(b, h, lo - P) * body.stride, end = body.row(b, h, j0 + nj - P) * body.stride;
    for (int64_t o = first; o < end; o += 64) {
      __builtin_prefetch(body.k + o);
      __builtin_prefetch(body.v + o);
    }
  };
  parallel_for(0, n_chunks * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qf((size_t)(G * D)), row((size_t)D), scores((size_t)(G * kChunkRows)), coef((size_t)G),
        dots((size_t)G);
    std::vector<int64_t> body_idx((size_t)(mask || body.table ? kChunkRows : 0));  // rows of an indexed chunk
    prefetch_task(t0);
    for (int64_t t = t0; t < t1; ++t) {
      if (t + 1 < t1) prefetch_task(t + 1);
      int64_t b, h, j0, nj;
      task(t, b, h, j0, nj);
      const bool masked = mask && !dense[(size_t)b];
      auto pos_at = [&](int64_t j) { return masked ? pos[(size_t)b][(size_t)j] : j; };
      const int64_t q0 = (b * Hq + h * G) * D;  // first element of query head h*G in q and out
      if (qt == FloatType::kFloat32) {  // a loop the compiler vectorizes
        for (int64_t i = 0; i < G * D; ++i) qf[i] = ((const float*)q)[q0 + i] * sm_scale;
      } else {
        for (int64_t i = 0; i < G * D; ++i) qf[i] = load_as_f32(q, q0 + i, qt) * sm_scale;
      }
      // row n of K or V (n < P: the prefix, else the body) -> row as fp32; returns the row's scale
      auto load_row = [&](const void* prefix, const uint8_t* codes, const float* scale, int64_t n) -> float {
        if (n < P) {
          const int64_t base = (((prefix_batch == 1 ? 0 : b) * Hkv + h) * P + n) * D;
          load_row_as_f32(prefix, base, D, pt, row.data());
          return 1.0f;
        }
        const uint8_t* src = codes + body.row(b, h, n - P) * body.stride;
        if (bits == 4) {
          ker.dequant_row4((const uint8_t*)src, D, 1.0f, row.data(), FloatType::kFloat32);
        } else {
          for (int64_t d = 0; d < D; ++d) row[d] = (float)((const int8_t*)src)[d];
        }
        return scale[h];
      };
      // Both passes: the positions ascend, so the prefix rows come first; they (and every row of a layout the
      // packed passes do not take) go row by row through an fp32 copy, the body rows in one call per pass that
      // reads them packed and applies the head's scale once per score (K) or once to the weighted sum (V).
      const bool packed = bits == 4 && D % 16 == 0;
      int64_t jb = 0;  // the chunk's first row the packed passes take
      while (jb < nj && (!packed || pos_at(j0 + jb) < P)) ++jb;
      const uint8_t *k_rows = nullptr, *v_rows = nullptr;
      const int64_t* idx = nullptr;
      if (jb < nj) {
        if (masked || body.table) {  // the body rows this chunk attends to, by index (a mask, or pages)
          if (masked) {
            for (int64_t i = jb; i < nj; ++i) body_idx[i - jb] = body.row(b, h, pos_at(j0 + i) - P);
          } else {  // consecutive positions through the pages
            body.paged_rows(b, h, j0 + jb - P, nj - jb, body_idx.data());
          }
          idx = body_idx.data();
          k_rows = body.k, v_rows = body.v;
        } else {  // consecutive rows
          const int64_t first = body.row(b, h, j0 + jb - P) * body.stride;
          k_rows = body.k + first, v_rows = body.v + first;
        }
      }
      for (int64_t j = 0; j < jb; ++j) {
        const float s = load_row(prefix_k, body.k, k_scale, pos_at(j0 + j));
        ker.dot_rows(qf.data(), G, D, row.data(), dots.data());
        for (int64_t g = 0; g < G; ++g) scores[g * kChunkRows + j] = dots[g] * s;
      }
      if (jb < nj)
        ker.qk_rows_q4(qf.data(), G, D, nj - jb, k_rows, body.stride, idx, k_scale[h], scores.data() + jb, kChunkRows);
      float* m = part_m.data() + t * G;
      float* l = part_l.data() + t * G;
      float* acc = part_acc.data() + t * G * D;
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * kChunkRows;
        // four independent max chains (one chain waited on each compare's latency); a NaN sg[0] stays the max,
        // as in one chain, and a later NaN is skipped by every chain alike
        float mx[4] = {sg[0], sg[0], sg[0], sg[0]};
        int64_t j = 1;
        for (; j + 4 <= nj; j += 4)
          for (int u = 0; u < 4; ++u) mx[u] = sg[j + u] > mx[u] ? sg[j + u] : mx[u];
        for (; j < nj; ++j) mx[0] = sg[j] > mx[0] ? sg[j] : mx[0];
        for (int u = 1; u < 4; ++u) mx[0] = mx[u] > mx[0] ? mx[u] : mx[0];
        m[g] = mx[0];
        if (mx[0] == -INFINITY) {  // every score of the chunk is -inf: weight 0 for all (exp(s - mx) would be NaN,
          std::fill(sg, sg + nj, 0.0f);  // which the merge's 0 * acc then spread to the other chunks' finite result)
          l[g] = 0.0f;
        } else {
          l[g] = ker.exp_rows(sg, nj, mx[0]);
        }
      }
      std::fill(acc, acc + G * D, 0.0f);
      for (int64_t j = 0; j < jb; ++j) {
        const float s = load_row(prefix_v, body.v, v_scale, pos_at(j0 + j));
        for (int64_t g = 0; g < G; ++g) coef[g] = scores[g * kChunkRows + j] * s;
        ker.axpy_rows(coef.data(), G, D, row.data(), acc);
      }
      if (jb < nj)
        ker.pv_rows_q4(scores.data() + jb, kChunkRows, G, nj - jb, v_rows, body.stride, idx, v_scale[h], D, acc);
    }
  });
  // merge the chunks of each (sequence, KV head); a sequence with no attended position gets zeros
  std::vector<float> y((size_t)D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t o = (b * Hq + h * G + g) * D;
        float M = -INFINITY, L = 0.0f;
        for (int64_t c = chunk0[(size_t)b]; c < chunk0[(size_t)b + 1]; ++c) M = std::max(M, part_m[(c * Hkv + h) * G + g]);
        std::fill(y.begin(), y.end(), 0.0f);
        for (int64_t c = chunk0[(size_t)b]; c < chunk0[(size_t)b + 1]; ++c) {
          const int64_t t = c * Hkv + h;
          const float w = std::exp(part_m[t * G + g] - M);
          L += w * part_l[t * G + g];
          const float* a = part_acc.data() + (t * G + g) * D;
          for (int64_t d = 0; d < D; ++d) y[d] += w * a[d];
        }
        const float inv = L > 0.0f ? 1.0f / L : 0.0f;
        for (int64_t d = 0; d < D; ++d) store_from_f32(out, o + d, y[d] * inv, qt);
      }
}

}  // namespace cpu
}  // namespace pqk
