// A torch-free driver of the CPU kernels, built with -fsanitize=address,undefined by
// tests/cpu/test_sanitizers.py. It runs every kernel family on every instruction set this CPU has over
// odd shapes, with threads, and checks each result against a naive loop written here from
// csrc/common/quant_math.h (so a wrong answer fails too, not only a bad memory access).
//
// Usage: sanitize_harness [seed]   -> prints "N passed, M failed" and exits non-zero on any failure.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <random>
#include <thread>
#include <memory>
#include <vector>

#include "../../common/quant_math.h"
#include "../float16.h"
#include "../kernels.h"

namespace pqk {
namespace cpu {
// Two threads over disjoint halves, like at::parallel_for with two workers.
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  if (end <= begin) return;
  const int64_t mid = begin + (end - begin) / 2;
  if (end - begin < 2 * (grain > 0 ? grain : 1)) { body(begin, end); return; }
  std::thread t([&] { body(begin, mid); });
  body(mid, end);
  t.join();
}
}  // namespace cpu
}  // namespace pqk

using namespace pqk;
using namespace pqk::cpu;

static int g_pass = 0, g_fail = 0;
static std::mt19937 rng;

static void check(bool ok, const char* what, int64_t M, int64_t N, int64_t K, const char* isa) {
  if (ok) { ++g_pass; return; }
  ++g_fail;
  fprintf(stderr, "FAIL %s isa=%s M=%lld N=%lld K=%lld\n", what, isa, (long long)M, (long long)N, (long long)K);
}

static int8_t rand_q(int bits) {
  std::uniform_int_distribution<int> d(qmin_for_bits(bits), qmax_for_bits(bits));
  return (int8_t)d(rng);
}

// bf16: a float A given as bf16 (the values 0.5 q are exact in bf16), the prefill GEMM's 32-wide quantize and side job
static void test_gemm(int64_t M, int64_t N, int64_t K, int a_bits, int w_bits, ASource src, Isa isa,
                      bool bf16 = false) {
  // exact operands
  std::vector<int8_t> aq(M * K), wq(N * K);
  for (auto& v : aq) v = rand_q(a_bits);
  for (auto& v : wq) v = rand_q(w_bits);
  std::vector<uint8_t> ap(M * K / 2), wp(N * K / 2);
  for (int64_t i = 0; i < M * K / 2; ++i) ap[i] = pack_nibbles(aq[2 * i], aq[2 * i + 1]);
  for (int64_t i = 0; i < N * K / 2; ++i) wp[i] = pack_nibbles(wq[2 * i], wq[2 * i + 1]);
  std::vector<float> af(M * K);  // float A whose static quantization (scale 0.5) gives back aq exactly
  for (int64_t i = 0; i < M * K; ++i) af[i] = 0.5f * aq[i];
  std::vector<uint16_t> ab(M * K);  // the same as bf16: the upper half of each float
  for (int64_t i = 0; i < M * K; ++i) { uint32_t u; memcpy(&u, &af[i], 4); ab[i] = (uint16_t)(u >> 16); }
  std::vector<float> ws(N), bias(N);
  for (int64_t n = 0; n < N; ++n) { ws[n] = 1.0f; bias[n] = (float)(n % 7) - 3.0f; }
  const float a_scale = src == ASource::kFloat ? 0.5f : 1.0f;

  GemmArgs g;
  g.M = M; g.N = N; g.K = K;
  g.a_source = src;
  g.a = src == ASource::kPacked4 ? (const void*)ap.data() : src == ASource::kInt8 ? (const void*)aq.data()
      : bf16 ? (const void*)ab.data() : (const void*)af.data();
  if (bf16) g.a_float_type = FloatType::kBFloat16;
  g.a_bits = a_bits;
  g.a_scale = &a_scale;
  g.w = w_bits == 4 ? (const void*)wp.data() : (const void*)wq.data();
  g.w_bits = w_bits;
  g.w_scale = ws.data();
  g.bias = bias.data();
  std::vector<float> out(M * N, -12345.0f);  // poisoned
  g.out = out.data();
  g.out_type = FloatType::kFloat32;
  gemm(g, isa);

  bool ok = true;
  for (int64_t m = 0; m < M && ok; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += (int64_t)aq[m * K + k] * wq[n * K + k];
      float want = dequant_value((int32_t)acc, a_scale, ws[n]) + bias[n];
      if (out[m * N + n] != want) { ok = false; break; }
    }
  char what[64];
  snprintf(what, sizeof what, "gemm W%dA%d src=%d%s", w_bits, a_bits, (int)src, bf16 ? " bf16" : "");
  check(ok, what, M, N, K, isa_name(isa));
}

static void test_quantize(int64_t M, int64_t K, int bits, Isa isa) {
  std::vector<float> x(M * K);
  std::normal_distribution<float> d(0.0f, 3.0f);
  for (auto& v : x) v = d(rng);
  if (M * K > 3) { x[0] = __builtin_nanf(""); x[1] = __builtin_inff(); x[2] = -__builtin_inff(); x[3] = 2.5f; }
  const float scale = 0.5f;
  const int64_t out_bytes = bits == 4 ? M * K / 2 : M * K;
  std::vector<uint8_t> out(out_bytes, 0xA5), out_tok(out_bytes, 0xA5);
  std::vector<float> scales(M, -1.0f);
  quantize_static(x.data(), FloatType::kFloat32, M, K, scale, bits, out.data(), isa);
  quantize_per_token(x.data(), FloatType::kFloat32, M, K, bits, out_tok.data(), scales.data(), isa);
  const int lo = qmin_for_bits(bits), hi = qmax_for_bits(bits);
  bool ok = true, ok_tok = true;
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      float v = __builtin_fabsf(x[m * K + k]);
      if (v <= 3.4e38f && v > amax) amax = v;
    }
    const float s = per_token_scale_from_amax(amax, hi);
    ok_tok = ok_tok && scales[m] == s;
    for (int64_t k = 0; k < K; ++k) {
      int8_t want = quantize_value(x[m * K + k], scale, lo, hi);
      int8_t want_tok = quantize_value(x[m * K + k], s, lo, hi);
      int8_t got, got_tok;
      if (bits == 4) {
        uint8_t b = out[(m * K + k) / 2], bt = out_tok[(m * K + k) / 2];
        got = k % 2 ? high_nibble(b) : low_nibble(b);
        got_tok = k % 2 ? high_nibble(bt) : low_nibble(bt);
      } else {
        got = (int8_t)out[m * K + k];
        got_tok = (int8_t)out_tok[m * K + k];
      }
      ok = ok && got == want;
      ok_tok = ok_tok && got_tok == want_tok;
    }
  }
  check(ok, bits == 4 ? "quantize_static 4" : "quantize_static 8", M, 0, K, isa_name(isa));
  check(ok_tok, bits == 4 ? "quantize_per_token 4" : "quantize_per_token 8", M, 0, K, isa_name(isa));
}

static void test_kv_dequant(int64_t B, int64_t H, int64_t P, int64_t T, int64_t D, int64_t prefix_batch, Isa isa) {
  std::vector<uint8_t> body(B * H * T * D / 2);
  for (auto& v : body) v = (uint8_t)(rng() & 0xFF);
  std::vector<float> scale(H), prefix(prefix_batch * H * P * D);
  for (int64_t h = 0; h < H; ++h) scale[h] = 0.25f + 0.5f * (float)h;
  for (auto& v : prefix) v = (float)(rng() % 1000) - 500.0f;
  std::vector<float> out(B * H * (P + T) * D, -7.0f);
  kv_dequant_concat_static(prefix.data(), FloatType::kFloat32, prefix_batch, P, body.data(), 4, scale.data(), B, H, T,
                           D, out.data(), FloatType::kFloat32, isa);
  bool ok = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t n = 0; n < P + T; ++n)
        for (int64_t d = 0; d < D; ++d) {
          float want;
          if (n < P) {
            want = prefix[(((prefix_batch == 1 ? 0 : b) * H + h) * P + n) * D + d];
          } else {
            uint8_t byte = body[((b * H + h) * T + (n - P)) * (D / 2) + d / 2];
            want = (float)(d % 2 ? high_nibble(byte) : low_nibble(byte)) * scale[h];
          }
          ok = ok && out[((b * H + h) * (P + T) + n) * D + d] == want;
        }
  check(ok, "kv_dequant_concat_static", B * H, P + T, D, isa_name(isa));
}

// kv_quantize_static: every element against quantize_value with its head's scale (and the nibble packing).
static void test_kv_quantize(int64_t B, int64_t H, int64_t T, int64_t D, int bits, Isa isa) {
  std::vector<float> x(B * H * T * D), scale(H);
  std::normal_distribution<float> nd(0.0f, 6.0f);
  for (auto& v : x) v = nd(rng);
  for (int64_t h = 0; h < H; ++h) scale[h] = 0.3f + 0.2f * (float)h;
  const int64_t row = bits == 4 ? D / 2 : D;
  std::vector<uint8_t> out(B * H * T * row + 1, 0xA5);  // one canary byte past the end
  kv_quantize_static(x.data(), FloatType::kFloat32, scale.data(), bits, B, H, T, D, out.data(), isa);
  bool ok = out.back() == 0xA5;
  for (int64_t r = 0; r < B * H * T; ++r)
    for (int64_t d = 0; d < D; ++d) {
      const int want = quantize_value(x[r * D + d], scale[(r / T) % H], qmin_for_bits(bits), qmax_for_bits(bits));
      const int got = bits == 8 ? (int)(int8_t)out[r * row + d]
                                : (d % 2 ? high_nibble(out[r * row + d / 2]) : low_nibble(out[r * row + d / 2]));
      ok = ok && got == want;
    }
  check(ok, bits == 4 ? "kv_quantize_static 4" : "kv_quantize_static 8", B * H * T, 0, D, isa_name(isa));
}

// kv_decode_attention_static: against softmax(q K^T s) V in double from the dequantized cache; fp32 tolerance.
// masked: the preallocated cache's call: T of Tc = T + 5 rows filled (strides of the capacity) and a padding mask.
// paged: the same rows in a vLLM-style paged cache (16-position blocks in shuffled order, the prefix's positions
// left empty, an allocation of exactly the blocks), every other sequence's body a third shorter (body_lens).
enum class Layout { kStrided, kMasked, kPaged };
static void test_kv_decode(int64_t B, int64_t Hkv, int64_t G, int64_t P, int64_t T, int64_t D, int bits, Isa isa,
                           Layout layout = Layout::kStrided) {
  const bool masked = layout == Layout::kMasked, paged = layout == Layout::kPaged;
  const int64_t Hq = Hkv * G, row = bits == 4 ? D / 2 : D, N = P + T, Tc = masked ? T + 5 : T;
  std::vector<uint8_t> kb(B * Hkv * Tc * row), vb(kb.size());
  std::unique_ptr<bool[]> mask(new bool[(size_t)(B * (N + 5))]);
  for (int64_t i = 0; i < B * (N + 5); ++i) mask[i] = (i % (N + 5)) < P || (rng() % 10) < 7;
  for (auto& v : kb) v = (uint8_t)(rng() & 0xFF);
  for (auto& v : vb) v = (uint8_t)(rng() & 0xFF);
  std::vector<float> q(B * Hq * D), pk(Hkv * P * D), pv(Hkv * P * D), ks(Hkv), vs(Hkv);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& v : q) v = nd(rng);
  for (auto& v : pk) v = 4.0f * nd(rng);
  for (auto& v : pv) v = 4.0f * nd(rng);
  for (int64_t h = 0; h < Hkv; ++h) ks[h] = 0.1f + 0.05f * (float)h, vs[h] = 0.2f + 0.1f * (float)h;
  std::vector<float> out(B * Hq * D, -7.0f);
  const float sm = 1.0f / sqrtf((float)D);
  KVBody body = strided_body(kb.data(), vb.data(), Hkv * Tc, Tc, row);
  constexpr int64_t bs = 16;
  const int64_t width = (N + bs - 1) / bs;
  std::vector<int32_t> table(B * width);
  std::vector<int64_t> lens(B);
  std::vector<uint8_t> cache;
  if (paged) {
    for (int64_t i = 0; i < B * width; ++i) table[i] = (int32_t)i;
    std::shuffle(table.begin(), table.end(), rng);
    cache.assign(B * width * Hkv * bs * 2 * row, 0x5A);
    for (int64_t b = 0; b < B; ++b) {
      lens[b] = T - (b % 2) * (T / 3);
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t n = 0; n < T; ++n) {
          const int64_t p = P + n, blk = table[b * width + p / bs];
          uint8_t* dst = cache.data() + ((blk * Hkv + h) * bs + p % bs) * 2 * row;
          memcpy(dst, kb.data() + ((b * Hkv + h) * Tc + n) * row, row);
          memcpy(dst + row, vb.data() + ((b * Hkv + h) * Tc + n) * row, row);
        }
    }
    body.k = cache.data(), body.v = cache.data() + row, body.stride = 2 * row;
    body.table = table.data(), body.table_stride = width, body.block_size = bs, body.hkv = Hkv, body.start = P;
  }
  kv_decode_attention_static(q.data(), FloatType::kFloat32, B, Hq, D, pk.data(), pv.data(), FloatType::kFloat32, 1, P,
                             body, bits, ks.data(), vs.data(), Hkv, T, paged ? lens.data() : nullptr,
                             masked ? mask.get() : nullptr, N + 5, sm, out.data(), isa);
  auto attended = [&](int64_t b, int64_t n) {
    return paged ? n < P + lens[b] : !masked || mask[b * (N + 5) + n];
  };
  auto elem = [&](const std::vector<uint8_t>& body, const std::vector<float>& pre, const std::vector<float>& sc,
                  int64_t b, int64_t h, int64_t n, int64_t d) -> double {
    if (n < P) return pre[(h * P + n) * D + d];
    const uint8_t* r = body.data() + ((b * Hkv + h) * Tc + (n - P)) * row;
    const int v = bits == 8 ? (int)(int8_t)r[d] : (d % 2 ? high_nibble(r[d / 2]) : low_nibble(r[d / 2]));
    return v * (double)sc[h];
  };
  bool ok = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hq = 0; hq < Hq; ++hq) {
      const int64_t h = hq / G;
      std::vector<double> s(N);
      double mx = -1e300, sum = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        if (!attended(b, n)) {
          s[n] = -1e300;
          continue;
        }
        double dot = 0.0;
        for (int64_t d = 0; d < D; ++d) dot += q[(b * Hq + hq) * D + d] * elem(kb, pk, ks, b, h, n, d);
        s[n] = dot * sm;
        mx = s[n] > mx ? s[n] : mx;
      }
      for (auto& v : s) sum += (v = exp(v - mx));
      for (int64_t d = 0; d < D; ++d) {
        double o = 0.0;
        for (int64_t n = 0; n < N; ++n)
          if (attended(b, n)) o += s[n] * elem(vb, pv, vs, b, h, n, d);
        o = sum > 0 ? o / sum : 0.0;
        ok = ok && fabs(out[(b * Hq + hq) * D + d] - o) <= 1e-4 * (1.0 + fabs(o));
      }
    }
  check(ok, masked ? "kv_decode_attention_static masked" : paged ? "kv_decode_attention_static paged"
                                                                : "kv_decode_attention_static",
        B * Hq, N, D, isa_name(isa));
}

// kv_write_paged_static: each kept token's K (minus its head's offset, rounded to bf16) and V rows equal
// kv_quantize_static's of the same values, at their slot; every other byte of the cache unchanged. bf16 K / V,
// V strided apart from K (a [T, 3H, D] projection's views), two slots skipped.
static void test_kv_write_paged(int64_t T, int64_t H, int64_t D, int bits, Isa isa) {
  const int64_t row = bits == 4 ? D / 2 : D, bs = 8, blocks = T / 2 + 3;
  std::normal_distribution<float> nd(0.0f, 6.0f);
  std::vector<uint16_t> qkv(T * 3 * H * D);
  for (auto& v : qkv) v = f32_to_bf16(nd(rng));
  std::vector<float> ks(H), vs(H), off(H * D);
  for (int64_t h = 0; h < H; ++h) ks[h] = 0.3f + 0.2f * (float)h, vs[h] = 0.5f + 0.1f * (float)h;
  for (auto& v : off) v = nd(rng) / 8.0f;
  std::vector<int64_t> slots(blocks * bs);
  for (int64_t i = 0; i < blocks * bs; ++i) slots[i] = i;
  std::shuffle(slots.begin(), slots.end(), rng);
  slots.resize(T);
  slots[1] = slots[T - 1] = -1;
  std::vector<uint8_t> cache(blocks * H * bs * 2 * row, 0xA5), want = cache;  // want: the untouched bytes + rows
  const uint16_t *k = qkv.data() + H * D, *v = qkv.data() + 2 * H * D;
  kv_write_paged_static(k, 3 * H * D, D, v, 3 * H * D, D, FloatType::kBFloat16, T, H, D, slots.data(), ks.data(),
                        vs.data(), off.data(), bits, cache.data(), bs, isa);
  std::vector<uint16_t> shifted(D);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      if (slots[t] < 0) continue;
      uint8_t* dst = want.data() + (((slots[t] / bs) * H + h) * bs + slots[t] % bs) * 2 * row;
      const uint16_t* kr = k + (t * 3 * H + h) * D;
      for (int64_t d = 0; d < D; ++d) shifted[d] = f32_to_bf16(bf16_to_f32(kr[d]) - off[h * D + d]);
      kv_quantize_static(shifted.data(), FloatType::kBFloat16, ks.data() + h, bits, 1, 1, 1, D, dst, Isa::kScalar);
      kv_quantize_static(v + (t * 3 * H + h) * D, FloatType::kBFloat16, vs.data() + h, bits, 1, 1, 1, D, dst + row,
                         Isa::kScalar);
    }
  check(cache == want, bits == 4 ? "kv_write_paged_static 4" : "kv_write_paged_static 8", T * H, 0, D,
        isa_name(isa));
}

// decode_layer: every optional part on (biases, q/k norms, key rotation + offset, prefix, mask, Hadamard down with
// m = 12), two sequences at different positions of a strided cache. Under the sanitizers; the result and the
// written cache rows must equal the scalar ISA's (the GEMMs are bit-exact across ISAs, the attention's sums may
// differ in order: tolerance), and no other cache row may change. Numerics against the model: the Python tests.
static void test_decode_layer(int kv_bits, Isa isa) {
  const int64_t B = 2, H = 48, Hq = 4, Hkv = 2, D = 16, I = 24, cap = 9, P = 2, pos = 5;
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  auto vec = [&](int64_t n, float lo = -1.0f, float scale = 1.0f) {
    std::vector<float> v((size_t)n);
    for (auto& x : v) x = lo >= 0.0f ? lo + scale * (u(rng) + 1.0f) : scale * u(rng);
    return v;
  };
  std::vector<std::vector<uint8_t>> ws;
  std::vector<std::vector<float>> fs;
  auto linear = [&](int64_t N, int64_t K, bool bias) {
    ws.emplace_back((size_t)(N * K / 2));
    for (auto& b : ws.back()) b = (uint8_t)(rng() & 0xFF);
    fs.push_back(vec(N, 0.001f, 0.01f));
    LayerLinear l;
    l.w = ws.back().data();
    l.w_scale = fs.back().data();
    l.a_scale = 0.05f;
    l.a_bits = 4;
    if (bias) { fs.push_back(vec(N)); l.bias = fs.back().data(); }
    l.N = N;
    l.K = K;
    return l;
  };
  ws.reserve(16);
  fs.reserve(32);
  DecodeLayerArgs a;
  a.B = B; a.H = H; a.Hq = Hq; a.Hkv = Hkv; a.D = D; a.I = I;
  auto x = vec(B * H), cosv = vec(B * D), sinv = vec(B * D), n1 = vec(H, 0.5f, 0.5f), n2 = vec(H, 0.5f, 0.5f);
  auto qn = vec(D, 0.5f, 0.5f), kn = vec(D, 0.5f, 0.5f), rot = vec(D * D, -1.0f, 0.25f), off = vec(Hkv * D, -1.0f, 0.1f);
  auto ks = vec(Hkv, 0.05f, 0.05f), vsc = vec(Hkv, 0.05f, 0.05f), pk = vec(Hkv * P * D), pv = vec(Hkv * P * D);
  auto signs = vec(I);
  for (auto& v : signs) v = v < 0 ? -1.0f : 1.0f;
  std::vector<float> hm(12 * 12);
  for (int64_t i = 0; i < 12; ++i)        // a +-1 matrix stands in for H_12: the harness checks memory and ISAs
    for (int64_t j = 0; j < 12; ++j) hm[i * 12 + j] = ((i * 7 + j * 3) % 5) < 2 ? -1.0f : 1.0f;
  a.x = x.data(); a.cos = cosv.data(); a.sin = sinv.data(); a.cos_stride = D;
  a.norm1 = n1.data(); a.norm2 = n2.data(); a.eps1 = a.eps2 = a.qk_eps = 1e-6f;
  a.q = linear(Hq * D, H, true); a.k = linear(Hkv * D, H, true); a.v = linear(Hkv * D, H, true);
  a.o = linear(H, Hq * D, false); a.gate = linear(I, H, false); a.up = linear(I, H, false); a.down = linear(H, I, false);
  a.q_norm = qn.data(); a.k_norm = kn.data(); a.key_rotation = rot.data(); a.key_offset = off.data();
  const int64_t row = kv_bits == 4 ? D / 2 : D, stride_b = Hkv * (cap + 3);   // rows; +3: strided, as a view
  std::vector<uint8_t> kc((size_t)(B * stride_b * row)), vc(kc.size());
  for (auto& b : kc) b = (uint8_t)(rng() & 0xFF);
  for (auto& b : vc) b = (uint8_t)(rng() & 0xFF);
  a.cache_sb = stride_b; a.cache_sh = cap + 3; a.kv_bits = kv_bits; a.pos = pos;
  a.k_scale = ks.data(); a.v_scale = vsc.data();
  a.prefix_k = pk.data(); a.prefix_v = pv.data(); a.pt = FloatType::kFloat32; a.prefix_batch = 1; a.P = P;
  std::unique_ptr<bool[]> mask(new bool[(size_t)(B * (P + cap))]);
  for (int64_t i = 0; i < B * (P + cap); ++i) mask[i] = (i % (P + cap)) != P;   // each sequence masks one position
  a.mask = mask.get(); a.mask_stride = P + cap; a.sm_scale = 0.25f;
  a.down_signs = signs.data(); a.had_m = hm.data(); a.had_n = 12;
  std::vector<float> out((size_t)(B * H)), ref(out.size());
  auto run = [&](Isa which, std::vector<float>& dst, std::vector<uint8_t>& k, std::vector<uint8_t>& v) {
    a.out = dst.data(); a.k_cache = k.data(); a.v_cache = v.data();
    decode_layer(a, which);
  };
  std::vector<uint8_t> k0 = kc, v0 = vc, k1 = kc, v1 = vc;
  run(Isa::kScalar, ref, k0, v0);
  run(isa, out, k1, v1);
  bool ok = true;
  float amax = 0.0f;
  for (float r : ref) amax = fmaxf(amax, fabsf(r));
  for (size_t i = 0; i < out.size(); ++i) ok = ok && std::isfinite(out[i]) && fabsf(out[i] - ref[i]) <= 1e-4f * amax + 1e-6f;
  for (size_t i = 0; i < kc.size(); ++i) {
    const int64_t r = (int64_t)i / row, t = r % (cap + 3);
    const bool written = t == pos;
    ok = ok && k1[i] == k0[i] && v1[i] == v0[i];              // the same rows, whatever the ISA
    ok = ok && (written || (k1[i] == kc[i] && v1[i] == vc[i]));  // no other row touched
  }
  check(ok, "decode_layer", B, H, I, isa_name(isa));
  // bf16 hidden states and RoPE tables: widened on entry, the output rounded once, so the result is the fp32 call's
  // on the widened inputs, rounded, and the same cache rows
  std::vector<uint16_t> x16(x.size()), c16(cosv.size()), s16(sinv.size()), o16(out.size());
  std::vector<float> xw(x.size()), cw(cosv.size()), sw(sinv.size());
  for (size_t i = 0; i < x.size(); ++i) xw[i] = bf16_to_f32(x16[i] = f32_to_bf16(x[i]));
  for (size_t i = 0; i < cosv.size(); ++i) {
    cw[i] = bf16_to_f32(c16[i] = f32_to_bf16(cosv[i]));
    sw[i] = bf16_to_f32(s16[i] = f32_to_bf16(sinv[i]));
  }
  std::vector<uint8_t> k2 = kc, v2 = vc, k3 = kc, v3 = vc;
  a.x = xw.data(); a.cos = cw.data(); a.sin = sw.data();
  run(isa, ref, k2, v2);
  a.x = x16.data(); a.cos = c16.data(); a.sin = s16.data(); a.xt = a.ct = FloatType::kBFloat16;
  a.out = o16.data(); a.k_cache = k3.data(); a.v_cache = v3.data();
  decode_layer(a, isa);
  bool ok16 = k2 == k3 && v2 == v3;
  for (size_t i = 0; i < o16.size(); ++i) ok16 = ok16 && o16[i] == f32_to_bf16(ref[i]);
  check(ok16, "decode_layer bf16", B, H, I, isa_name(isa));
}

// prefix_causal_attention: query t attends to keys 0 .. P + t; against a naive softmax in double, a poisoned output
// (every element must be written), T not a multiple of the 16-query block, S past a 64-key block. fp32 inputs, or
// bf16 (the reference on the same bf16 values, widened; the output's tolerance the bf16 rounding of it and of P:
// where the CPU has AVX512-BF16 the avx512vnni / amx tables run the vdpbf16ps blocks of x86_attention_bf16.h).
static void test_prefix_attention(int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t P, int64_t D, Isa isa,
                                  FloatType t = FloatType::kFloat32) {
  const int64_t S = P + T, G = Hq / Hkv;
  const bool half = t == FloatType::kBFloat16;
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<float> q((size_t)(B * Hq * T * D)), k((size_t)(B * Hkv * S * D)), v(k.size());
  std::vector<uint16_t> q16(half ? q.size() : 0), k16(half ? k.size() : 0), v16(half ? v.size() : 0);
  for (auto* x : {&q, &k, &v})
    for (auto& e : *x) e = half ? bf16_to_f32(f32_to_bf16(u(rng))) : u(rng);
  for (size_t i = 0; i < q16.size(); ++i) q16[i] = f32_to_bf16(q[i]);
  for (size_t i = 0; i < k16.size(); ++i) k16[i] = f32_to_bf16(k[i]), v16[i] = f32_to_bf16(v[i]);
  std::vector<float> out((size_t)(B * T * Hq * D), NAN);
  std::vector<uint16_t> out16(half ? out.size() : 0, 0x7FC0);  // bf16 NaN
  const float scale = 1.0f / sqrtf((float)D);
  if (half)
    prefix_causal_attention(q16.data(), k16.data(), v16.data(), t, B, Hq, Hkv, T, P, D, scale, out16.data(), isa);
  else
    prefix_causal_attention(q.data(), k.data(), v.data(), t, B, Hq, Hkv, T, P, D, scale, out.data(), isa);
  for (size_t i = 0; i < out16.size(); ++i) out[i] = bf16_to_f32(out16[i]);
  const double tol = half ? 1.5e-2 : 1e-4;
  bool ok = true;
  std::vector<double> p((size_t)S);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const float* qr = q.data() + ((b * Hq + h) * T + t) * D;
        const int64_t kv = (b * Hkv + h / G) * S * D, n = P + t + 1;
        double mx = -1e300, sum = 0.0;
        for (int64_t j = 0; j < n; ++j) {
          double s = 0.0;
          for (int64_t d = 0; d < D; ++d) s += (double)qr[d] * k[kv + j * D + d];
          p[j] = s * scale;
          mx = std::max(mx, p[j]);
        }
        for (int64_t j = 0; j < n; ++j) sum += p[j] = exp(p[j] - mx);
        for (int64_t d = 0; d < D; ++d) {
          double o = 0.0;
          for (int64_t j = 0; j < n; ++j) o += p[j] * v[kv + j * D + d];
          const float got = out[((b * T + t) * Hq + h) * D + d];
          ok = ok && std::isfinite(got) && fabs(got - o / sum) <= tol;
        }
      }
  check(ok, half ? "prefix_causal_attention bf16" : "prefix_causal_attention", T, P, D, isa_name(isa));
}

// rms_norm_rows: against HF's formula in double per row (fp32: to fp32 rounding; bf16: the module's two roundings,
// so at most a bf16 ulp where the variance's last bit differs); odd n, a tail past the vector width.
static void test_rms_norm(int64_t rows, int64_t n, FloatType t, Isa isa) {
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  const bool half = t == FloatType::kBFloat16;
  std::vector<float> x((size_t)(rows * n)), w((size_t)n);
  for (auto& e : x) e = half ? bf16_to_f32(f32_to_bf16(u(rng))) : u(rng);
  for (auto& e : w) e = half ? bf16_to_f32(f32_to_bf16(u(rng))) : u(rng);
  std::vector<uint16_t> x16(half ? x.size() : 0), w16(half ? w.size() : 0), o16(half ? x.size() : 0, 0x7FC0);
  for (size_t i = 0; i < x16.size(); ++i) x16[i] = f32_to_bf16(x[i]);
  for (size_t i = 0; i < w16.size(); ++i) w16[i] = f32_to_bf16(w[i]);
  std::vector<float> out(x.size(), NAN);
  if (half)
    rms_norm_rows(x16.data(), w16.data(), t, rows, n, 1e-6f, o16.data(), isa);
  else
    rms_norm_rows(x.data(), w.data(), t, rows, n, 1e-6f, out.data(), isa);
  for (size_t i = 0; i < o16.size(); ++i) out[i] = bf16_to_f32(o16[i]);
  bool ok = true;
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += (double)x[r * n + i] * x[r * n + i];
    const double inv = 1.0 / sqrt(ss / (double)n + 1e-6);
    for (int64_t i = 0; i < n; ++i) {
      const double want = w[i] * (x[r * n + i] * inv), got = out[r * n + i];
      ok = ok && std::isfinite(got) && fabs(got - want) <= (half ? 1.6e-2 : 1e-5) * fabs(want) + 1e-30;
    }
  }
  check(ok, half ? "rms_norm_rows bf16" : "rms_norm_rows", rows, n, 0, isa_name(isa));
}

// rope_rows: against x cos + rotate_half(x) sin in double (fp32: to a few fp32 roundings; bf16: the three
// roundings, at most ~2 bf16 ulps of the larger product); x a transposed view (strides of [B, T, H, D]), cos / sin
// per batch row; D / 2 past the vector width with a tail (planted: the tail's rotated half with the wrong sign,
// caught on every table with the AVX2 row).
static void test_rope(int64_t B, int64_t H, int64_t T, int64_t D, FloatType t, Isa isa) {
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  const bool half = t == FloatType::kBFloat16;
  auto r = [&] { return half ? bf16_to_f32(f32_to_bf16(u(rng))) : u(rng); };
  std::vector<float> x((size_t)(B * T * H * D)), c((size_t)(B * T * D)), s(c.size());
  for (auto& e : x) e = r();
  for (auto& e : c) e = r();
  for (auto& e : s) e = r();
  std::vector<float> out(x.size(), NAN);
  std::vector<uint16_t> x16(half ? x.size() : 0), c16(half ? c.size() : 0), s16(half ? c.size() : 0),
      o16(half ? x.size() : 0, 0x7FC0);
  for (size_t i = 0; i < x16.size(); ++i) x16[i] = f32_to_bf16(x[i]);
  for (size_t i = 0; i < c16.size(); ++i) c16[i] = f32_to_bf16(c[i]), s16[i] = f32_to_bf16(s[i]);
  const int64_t xb = T * H * D, xh = D, xt = H * D;  // x stored [B, T, H, D], read as [B, H, T, D]
  if (half)
    rope_rows(x16.data(), xb, xh, xt, c16.data(), s16.data(), T * D, t, B, H, T, D, o16.data(), isa);
  else
    rope_rows(x.data(), xb, xh, xt, c.data(), s.data(), T * D, t, B, H, T, D, out.data(), isa);
  for (size_t i = 0; i < o16.size(); ++i) out[i] = bf16_to_f32(o16[i]);
  bool ok = true;
  const int64_t h2 = D / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hh = 0; hh < H; ++hh)
      for (int64_t i = 0; i < T; ++i)
        for (int64_t d = 0; d < D; ++d) {
          const float* xr = &x[b * xb + hh * xh + i * xt];
          const double p = (double)xr[d] * c[(b * T + i) * D + d],
                       q = (d < h2 ? -(double)xr[d + h2] : (double)xr[d - h2]) * s[(b * T + i) * D + d];
          const double got = out[((b * H + hh) * T + i) * D + d];
          ok = ok && std::isfinite(got) && fabs(got - (p + q)) <= (half ? 1.6e-2 : 1e-6) * (fabs(p) + fabs(q)) + 1e-30;
        }
  check(ok, half ? "rope_rows bf16" : "rope_rows", B * H * T, D, 0, isa_name(isa));
}

// silu_mul: against g / (1 + e^-g) * up in double, relative 1e-6 (the vector exp's 2e-7 and four roundings), over
// [-100, 100] (absolute 1e-35 where g < -88: a float e^-g overflows there), with the edges planted: +-0, +-inf, NaN,
// +-87.5 .. 89.5 (the clamps), and n = 29: a tail past the last 8 lanes.
static void test_silu_mul(int64_t n, Isa isa) {
  std::uniform_real_distribution<float> u(-100.0f, 100.0f);
  std::vector<float> g((size_t)n), up((size_t)n);
  for (int64_t i = 0; i < n; ++i) g[i] = u(rng), up[i] = u(rng) / 50.0f;
  const float edge[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 87.5f, -87.5f, 88.6f, -88.6f, 89.5f, -89.5f, 1e-30f};
  for (int64_t i = 0; i < n && i < 12; ++i) g[(size_t)(i * 7 % n)] = edge[i];
  std::vector<float> out = g;
  silu_mul(out.data(), up.data(), n, isa);
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    const double x = g[i], want = x / (1.0 + exp(-x)) * up[i];
    const double got = out[i];
    if (std::isnan(want) || std::isinf(want)) {
      ok = ok && (std::isnan(want) ? std::isnan(got) : got == want);
    } else {
      // + 1e-35: where e^-g passes FLT_MAX (g < -88.72; the vector exp from -88.4) the float result is -0 and the
      // exact one below 3e-37 * |up|
      ok = ok && std::isfinite(got) && fabs(got - want) <= 1e-6 * fabs(want) + 1e-35;
    }
  }
  check(ok, "silu_mul", n, 0, 0, isa_name(isa));
}

int main(int argc, char** argv) {
  rng.seed(argc > 1 ? (unsigned)atoi(argv[1]) : 1234u);
  const Isa isas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvxVnni, Isa::kAvx512Vnni, Isa::kAmx};
  // M >= 64: the prefill GEMM where the table has one (avx2 for W4: x86_gemm_ymm.h; avx512vnni, native builds:
  // x86_gemm_zmm.h; amx: amx_kernels.cpp): N across micro panels with a
  // partial last one, K across the 512-k W blocks with a tail that is not a multiple of 8 (or of 4 for W8)
  const int64_t shapes[][3] = {{1, 1, 2},    {1, 13, 64},  {1, 7, 190},   {1, 5, 4222},       {3, 5, 66},
                               {5, 3, 130},  {17, 9, 200}, {70, 7, 126},  {4, 33, 4096 + 2},  {67, 101, 1030},
                               {64, 48, 8}};
  for (Isa isa : isas) {
    if (!isa_supported(isa)) { printf("skip isa %s (not supported here)\n", isa_name(isa)); continue; }
    for (auto& s : shapes) {
      for (int w_bits : {4, 8})
        for (int a_bits : {4, 8}) {
          test_gemm(s[0], s[1], s[2], a_bits, w_bits, ASource::kFloat, isa);
          test_gemm(s[0], s[1], s[2], a_bits, w_bits, a_bits == 4 ? ASource::kPacked4 : ASource::kInt8, isa);
        }
      test_quantize(s[0], s[2], 4, isa);
      test_quantize(s[0], s[2] + 1, 8, isa);
    }
    // The prefill GEMM's M split with 8-row slices (PQK_PREFILL_SPLIT / _SUBROWS, read per call): each thread's
    // slices in turn, and for a bf16, int8 or packed int4 A with K % 32 == 0 each next slice built by the
    // micro-kernels' side job into the second of two slice buffers (x86_gemm_zmm.h PfSide), the rest by
    // PrefillKernels::side. K = 64 / 256: the slices tiled (PrefillKernels::m_split_tiled, 16-row groups; planted:
    // slice buffers of whole 8-row tiles, not 16-row groups, a heap-buffer-overflow); K = 1030 row-major.
    setenv("PQK_PREFILL_SPLIT", "m", 1);
    setenv("PQK_PREFILL_SUBROWS", "16", 1);
    const int64_t msplit_shapes[][3] = {{203, 800, 64}, {130, 60, 256}, {67, 101, 1030}};
    for (auto& s : msplit_shapes)
      for (int w_bits : {4, 8})
        for (int a_bits : {4, 8}) {
          test_gemm(s[0], s[1], s[2], a_bits, w_bits, ASource::kFloat, isa, true);
          test_gemm(s[0], s[1], s[2], a_bits, w_bits, ASource::kFloat, isa);
          test_gemm(s[0], s[1], s[2], a_bits, w_bits, a_bits == 4 ? ASource::kPacked4 : ASource::kInt8, isa);
        }
    unsetenv("PQK_PREFILL_SPLIT");
    unsetenv("PQK_PREFILL_SUBROWS");
    test_kv_dequant(2, 3, 3, 37, 64, 1, isa);
    test_kv_dequant(1, 2, 0, 5, 128, 1, isa);
    test_kv_dequant(2, 2, 4, 9, 34, 2, isa);
    test_kv_quantize(2, 3, 7, 64, 4, isa);
    test_kv_quantize(1, 2, 5, 34, 4, isa);
    test_kv_quantize(2, 2, 3, 13, 8, isa);
    test_kv_decode(2, 2, 3, 2, 37, 64, 4, isa);
    test_kv_decode(1, 3, 1, 0, 9, 34, 8, isa);
    test_kv_decode(1, 1, 4, 1, 1, 6, 4, isa);
    test_kv_decode(1, 2, 5, 1, 45, 96, 4, isa);  // 6 column slabs of 16, heads in groups of 4 + 1
    test_kv_decode(1, 2, 2, 1, 19, 48, 4, isa);  // D % 32 == 16: an odd number of 16-column slabs
    test_kv_decode(2, 3, 3, 1, 300, 64, 4, isa, Layout::kMasked);   // several 128-position chunks, strided rows
    test_kv_decode(1, 2, 2, 0, 20, 34, 8, isa, Layout::kMasked);
    test_kv_decode(3, 3, 3, 2, 300, 64, 4, isa, Layout::kPaged);    // pages across chunks, shorter bodies
    test_kv_decode(2, 2, 2, 0, 21, 34, 8, isa, Layout::kPaged);
    test_kv_write_paged(13, 3, 64, 4, isa);
    test_kv_write_paged(6, 2, 34, 8, isa);
    test_decode_layer(4, isa);
    test_decode_layer(8, isa);
    test_prefix_attention(2, 4, 2, 37, 3, 64, isa);
    test_prefix_attention(1, 3, 1, 70, 0, 24, isa);
    test_rms_norm(37, 576, FloatType::kFloat32, isa);
    test_rms_norm(5, 19, FloatType::kBFloat16, isa);
    test_rms_norm(9, 4099, FloatType::kBFloat16, isa);
    test_silu_mul(1536, isa);
    test_silu_mul(29, isa);
    test_rope(2, 3, 5, 64, FloatType::kFloat32, isa);
    test_rope(1, 2, 7, 42, FloatType::kBFloat16, isa);  // D / 2 = 21: two vectors of 8 and a tail of 5
    test_prefix_attention(2, 4, 2, 37, 3, 64, isa, FloatType::kBFloat16);
    test_prefix_attention(1, 6, 2, 131, 1, 80, isa, FloatType::kBFloat16);  // D = 64 + 16: a 1-wide column piece
    test_prefix_attention(1, 2, 1, 20, 2, 8, isa, FloatType::kBFloat16);    // D % 16 != 0: the fp32 blocks
  }
  printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
