// One decoder layer of a decode step in one call: what a compiled step otherwise runs as ~6 op calls and 4 inductor
// kernels, stitched by ~60 Python statements of inductor's wrapper (docs/PERF.md, change 15).
//
//   x -> RMSNorm -> q|k|v (one parallel region, gemm_shared_a) -> [Qwen3: q/k RMSNorm per head] -> RoPE
//     -> [q, k @ key_rotation] -> [k - key_offset] -> k, v quantized into cache row `pos`
//     -> decode attention over [prefix | body rows 0..pos] -> o -> + x
//     -> RMSNorm -> gate|up (one region) -> SiLU(gate) * up -> [hadamard(. * signs)] -> down -> + residual
//
// The GEMMs quantize their float input with the static scale while packing it (gemm.cpp); the attention reads the
// packed cache in place (kv_cache.cpp). The glue between them is elementwise on a few KB and runs serially here:
// at decode it is ~1 % of the layer, and a parallel region costs ~1 us. Each step follows the eager module's
// formula (HF's LlamaRMSNorm, apply_rotary_pos_emb, act_fn; RotatedLinear's transform), in fp32; sums may differ
// from torch's in order, so the result equals eager to float rounding (a static quantizer downstream can turn
// that into one level, as inductor's fused kernels can: tests/models/test_decode_layer.py).
// A bf16 / fp16 model's hidden states (and RoPE tables) are widened on entry and the output rounded once on exit:
// the layer's glue runs in fp32 where the eager bf16 layer rounds after every op, so the two differ by bf16
// rounding (a few ulp of the output), as inductor's fused bf16 kernels differ from eager. Without this a bf16 model's
// decode step ran op by op: 8.7 vs 5.8 ms for SmolLM2 on a Zen 4 (docs/PERF.md, change 16).
#include <math.h>

#include <vector>

#include "kernels.h"

namespace pqk {
namespace cpu {

namespace {

// out[i] = w[i] * (x[i] * rsqrt(mean(x^2) + eps)): HF's RMSNorm in fp32 (rms_inv: float_ops.cpp)
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  const float r = rms_inv(x, n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// x[d] <- x[d] cos[d] + rotate_half(x)[d] sin[d], rotate_half(x) = [-x[D/2:], x[:D/2]]: one head, in place
void rope(float* x, const float* cos, const float* sin, int64_t D, float* tmp) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < D; ++d) tmp[d] = x[d] * cos[d] + (d < h ? -x[d + h] : x[d - h]) * sin[d];
  for (int64_t d = 0; d < D; ++d) x[d] = tmp[d];
}

// x [D] <- x @ R (R [D, D] row-major): out[j] = sum_i x[i] R[i, j]
void rotate_row(float* x, const float* R, int64_t D, float* tmp) {
  for (int64_t j = 0; j < D; ++j) tmp[j] = 0.0f;
  for (int64_t i = 0; i < D; ++i) {
    const float xi = x[i];
    const float* r = R + i * D;
    for (int64_t j = 0; j < D; ++j) tmp[j] += xi * r[j];
  }
  for (int64_t j = 0; j < D; ++j) x[j] = tmp[j];
}

GemmArgs gemm_args(const LayerLinear& l, int64_t M, const float* a, float* out) {
  GemmArgs g;
  g.M = M;
  g.N = l.N;
  g.K = l.K;
  g.a_source = ASource::kFloat;
  g.a = a;
  g.a_float_type = FloatType::kFloat32;
  g.a_bits = l.a_bits;
  g.a_scale = &l.a_scale;
  g.w = l.w;
  g.w_bits = l.w_bits;
  g.w_scale = l.w_scale;
  g.bias = l.bias;
  g.out = out;
  g.out_type = FloatType::kFloat32;
  return g;
}

// n linears over one input: one parallel region when their bits agree (gemm_shared_a's condition), else one by one
void linears(const GemmArgs* g, int n, Isa isa) {
  bool same = true;
  for (int i = 1; i < n; ++i) same = same && g[i].a_bits == g[0].a_bits && g[i].w_bits == g[0].w_bits;
  if (same) {
    gemm_shared_a(g, n, isa);
  } else {
    for (int i = 0; i < n; ++i) gemm(g[i], isa);
  }
}

}  // namespace

void decode_layer(const DecodeLayerArgs& a, Isa isa) {
  const int64_t B = a.B, H = a.H, D = a.D, Hq = a.Hq, Hkv = a.Hkv, I = a.I;
  const int64_t QN = Hq * D, KN = Hkv * D;
  std::vector<float> t((size_t)(B * H)), q((size_t)(B * QN)), k((size_t)(B * KN)), v((size_t)(B * KN));
  std::vector<float> attn((size_t)(B * QN)), h1((size_t)(B * H)), o((size_t)(B * H));
  std::vector<float> gt((size_t)(B * I)), up((size_t)(B * I)), tmp((size_t)(I > D ? I : D));
  // x, cos and sin as fp32: the caller's buffers where they are fp32 already, else widened copies
  std::vector<float> xw, cw, sw;
  auto widen = [](const void* p, FloatType t, int64_t n, std::vector<float>& dst) -> const float* {
    if (t == FloatType::kFloat32) return (const float*)p;
    dst.resize((size_t)n);
    load_row_as_f32(p, 0, n, t, dst.data());
    return dst.data();
  };
  const float* x = widen(a.x, a.xt, B * H, xw);
  const int64_t cos_n = (a.cos_stride ? B : 1) * D;
  const float* cos_all = widen(a.cos, a.ct, cos_n, cw);
  const float* sin_all = widen(a.sin, a.ct, cos_n, sw);

  // ---- attention ----
  for (int64_t b = 0; b < B; ++b) rms_norm(x + b * H, a.norm1, H, a.eps1, t.data() + b * H);
  const GemmArgs qkv[3] = {gemm_args(a.q, B, t.data(), q.data()), gemm_args(a.k, B, t.data(), k.data()),
                           gemm_args(a.v, B, t.data(), v.data())};
  linears(qkv, 3, isa);

  const int64_t row_bytes = a.kv_bits == 4 ? D / 2 : D;
  for (int64_t b = 0; b < B; ++b) {
    const float* cos = cos_all + b * a.cos_stride;
    const float* sin = sin_all + b * a.cos_stride;
    for (int64_t h = 0; h < Hq; ++h) {
      float* x = q.data() + (b * Hq + h) * D;
      if (a.q_norm) rms_norm(x, a.q_norm, D, a.qk_eps, x);
      rope(x, cos, sin, D, tmp.data());
      if (a.key_rotation) rotate_row(x, a.key_rotation, D, tmp.data());
    }
    for (int64_t h = 0; h < Hkv; ++h) {
      float* x = k.data() + (b * Hkv + h) * D;
      if (a.k_norm) rms_norm(x, a.k_norm, D, a.qk_eps, x);
      rope(x, cos, sin, D, tmp.data());
      if (a.key_rotation) rotate_row(x, a.key_rotation, D, tmp.data());
      if (a.key_offset)
        for (int64_t d = 0; d < D; ++d) x[d] -= a.key_offset[h * D + d];
      // the new K/V rows into the cache's row pos, quantized with the head's static scale (one row: no region)
      const int64_t r = (b * a.cache_sb + h * a.cache_sh + a.pos) * row_bytes;
      kv_quantize_static(x, FloatType::kFloat32, a.k_scale + h, a.kv_bits, 1, 1, 1, D, (char*)a.k_cache + r, isa);
      kv_quantize_static(v.data() + (b * Hkv + h) * D, FloatType::kFloat32, a.v_scale + h, a.kv_bits, 1, 1, 1, D,
                         (char*)a.v_cache + r, isa);
    }
  }
  kv_decode_attention_static(q.data(), FloatType::kFloat32, B, Hq, D, a.prefix_k, a.prefix_v, a.pt, a.prefix_batch,
                             a.P, strided_body(a.k_cache, a.v_cache, a.cache_sb, a.cache_sh, row_bytes),
                             a.kv_bits, a.k_scale, a.v_scale, Hkv, a.pos + 1, nullptr, a.mask, a.mask_stride,
                             a.sm_scale, attn.data(), isa);
  const GemmArgs og = gemm_args(a.o, B, attn.data(), o.data());
  gemm(og, isa);
  for (int64_t i = 0; i < B * H; ++i) h1[i] = x[i] + o[i];

  // ---- MLP ----
  for (int64_t b = 0; b < B; ++b) rms_norm(h1.data() + b * H, a.norm2, H, a.eps2, t.data() + b * H);
  const GemmArgs gu[2] = {gemm_args(a.gate, B, t.data(), gt.data()), gemm_args(a.up, B, t.data(), up.data())};
  linears(gu, 2, isa);
  silu_mul(gt.data(), up.data(), B * I, isa);  // SiLU(gate) * up (torch's silu: x / (1 + e^-x))
  if (a.down_signs) {
    for (int64_t b = 0; b < B; ++b) {
      float* x = gt.data() + b * I;
      for (int64_t i = 0; i < I; ++i) x[i] *= a.down_signs[i];
      hadamard(x, I, a.had_m, a.had_n, tmp.data());
    }
  }
  const GemmArgs dg = gemm_args(a.down, B, gt.data(), o.data());
  gemm(dg, isa);
  for (int64_t i = 0; i < B * H; ++i) store_from_f32(a.out, i, h1[i] + o[i], a.xt);
}

}  // namespace cpu
}  // namespace pqk
