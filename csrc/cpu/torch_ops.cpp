// The CPU implementations of the pqk:: ops (schemas and fakes live in prefixquant_kernels/ops/library.py).
// Python has validated every argument with messages that name it (prefixquant_kernels/ops/checks.py);
// the TORCH_CHECKs here are the last line against direct torch.ops.pqk calls: an error, never a crash.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <atomic>
#include <cmath>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels.h"

namespace pqk {
namespace cpu {

// The threading hook of kernels.h: torch's pool, so torch.set_num_threads governs the kernels too.
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  at::parallel_for(begin, end, grain, body);
}

namespace {

FloatType float_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kHalf: return FloatType::kFloat16;
    default: TORCH_CHECK(false, "pqk: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

FloatType float_type(at::ScalarType s) {
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf,
              "pqk: out_dtype must be float32, bfloat16 or float16, got ", s);
  return s == at::kFloat ? FloatType::kFloat32 : s == at::kBFloat16 ? FloatType::kBFloat16 : FloatType::kFloat16;
}

Isa to_isa(int64_t isa) {
  TORCH_CHECK(isa >= -1 && isa <= 4,
              "pqk: cpu_isa must be -1 (auto), 0 (scalar), 1 (avx2), 2 (avxvnni), 3 (avx512vnni) or 4 (amx), got ",
              isa);
  Isa r = static_cast<Isa>(isa);
  TORCH_CHECK(r == Isa::kAuto || isa_supported(r), "pqk: cpu_isa ", isa_name(r), " is not supported on this CPU");
  return r;
}

void check_cpu_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "pqk: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "pqk: ", name, " must be a contiguous 2-D tensor, got shape ",
              t.sizes());
}

// A GEMM's output, [M, N] of dtype: at::empty, with the pages of a large one asked to be 2 MB huge pages
// (madvise MADV_HUGEPAGE over the whole 2 MB pages inside it, where there are two or more; the kernel's usual
// "madvise" THP mode grants them only on request). glibc serves an allocation over 32 MB (its largest mmap
// threshold) from fresh mmap'd pages on every call, so the epilogue's first write to each 4 KB page faulted: 14336
// faults per 2048 x 14336 bf16 output, ~17 ms to write 58 MB against ~7 ms on huge pages (docs/PERF.md step 28),
// inside the tile loop's time. Only advice: where THP is off, or the pages are already there (a smaller output
// reused from glibc's heap), nothing changes.
at::Tensor empty_output(int64_t M, int64_t N, const at::TensorOptions& options) {
  at::Tensor out = at::empty({M, N}, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t b = (p + kHuge - 1) & ~(kHuge - 1), e = (p + out.nbytes()) & ~(kHuge - 1);
  if (e >= b + 2 * kHuge) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);  // advice: result unused
#endif
  return out;
}

float scalar_scale(const at::Tensor& s) {
  TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat, "pqk: scale must be a 1-element float32 tensor");
  // a CPU scale is read in place: item() goes through the dispatcher (~1 us, once per GEMM of a decode step)
  float v = s.device().is_cpu() ? *s.data_ptr<float>() : s.item<float>();
  TORCH_CHECK(std::isfinite(v) && v > 0.0f, "pqk: scale must be finite and > 0, got ", v);
  return v;
}

at::Tensor pack_int4_cpu(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() >= 1 && q.size(-1) % 2 == 0,
              "pqk: q must be a contiguous int8 tensor with an even last dim");
  auto sizes = q.sizes().vec();
  sizes.back() /= 2;
  at::Tensor out = at::empty(sizes, q.options().dtype(at::kByte));
  pack_int4(q.data_ptr<int8_t>(), q.numel(), out.data_ptr<uint8_t>());
  return out;
}

at::Tensor unpack_int4_cpu(const at::Tensor& p) {
  TORCH_CHECK(p.scalar_type() == at::kByte && p.is_contiguous() && p.dim() >= 1,
              "pqk: packed must be a contiguous uint8 tensor");
  auto sizes = p.sizes().vec();
  sizes.back() *= 2;
  at::Tensor out = at::empty(sizes, p.options().dtype(at::kChar));
  unpack_int4(p.data_ptr<uint8_t>(), p.numel(), out.data_ptr<int8_t>());
  return out;
}

at::Tensor quantize_out(const at::Tensor& x, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "pqk: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(bits == 8 || x.size(1) % 2 == 0, "pqk: x's last dim must be even for bits=4, got ", x.size(1));
  return bits == 4 ? at::empty({x.size(0), x.size(1) / 2}, x.options().dtype(at::kByte))
                   : at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kChar));
}

at::Tensor quantize_static_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t bits, int64_t cpu_isa) {
  check_cpu_2d(x, "x");
  at::Tensor out = quantize_out(x, bits);
  quantize_static(x.data_ptr(), float_type(x, "x"), x.size(0), x.size(1), scalar_scale(scale), (int)bits,
                  out.data_ptr(), to_isa(cpu_isa));
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x, int64_t bits, int64_t cpu_isa) {
  check_cpu_2d(x, "x");
  at::Tensor out = quantize_out(x, bits);
  at::Tensor scales = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  quantize_per_token(x.data_ptr(), float_type(x, "x"), x.size(0), x.size(1), (int)bits, out.data_ptr(),
                     scales.data_ptr<float>(), to_isa(cpu_isa));
  return {out, scales};
}

// Shared by both GEMM entry points: W, its scales and the bias.
void set_weight(GemmArgs& g, const at::Tensor& w, const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias) {
  check_cpu_2d(w, "w");
  TORCH_CHECK(w.scalar_type() == at::kByte || w.scalar_type() == at::kChar, "pqk: w must be uint8 or int8");
  g.w_bits = w.scalar_type() == at::kByte ? 4 : 8;
  g.N = w.size(0);
  TORCH_CHECK(w.size(1) * (g.w_bits == 4 ? 2 : 1) == g.K, "pqk: w's K (", w.size(1), " stored) does not match A's K ", g.K);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == g.N,
              "pqk: w_scale must be a contiguous float32 tensor of ", g.N, " elements");
  g.w = w.data_ptr();
  g.w_scale = w_scale.data_ptr<float>();
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == g.N,
                "pqk: bias must be a contiguous float32 tensor of ", g.N, " elements");
    g.bias = bias->data_ptr<float>();
  }
}

at::Tensor int4_matmul_cpu(const at::Tensor& a, const at::Tensor& w, const at::Tensor& a_scale,
                           const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                           int64_t cpu_isa) {
  check_cpu_2d(a, "a");
  TORCH_CHECK(a.scalar_type() == at::kByte || a.scalar_type() == at::kChar, "pqk: a must be uint8 or int8");
  GemmArgs g;
  g.a_source = a.scalar_type() == at::kByte ? ASource::kPacked4 : ASource::kInt8;
  g.a_bits = a.scalar_type() == at::kByte ? 4 : 8;
  g.M = a.size(0);
  g.K = a.size(1) * (g.a_bits == 4 ? 2 : 1);
  g.a = a.data_ptr();
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && a_scale.is_contiguous() &&
                  (a_scale.numel() == 1 || (a_scale.dim() == 1 && a_scale.numel() == g.M)),
              "pqk: a_scale must be a float32 scalar or [M] tensor");
  g.a_scale_per_row = a_scale.numel() != 1;  // [M] (a [1] tensor and a scalar mean the same)
  g.a_scale = a_scale.data_ptr<float>();
  set_weight(g, w, w_scale, bias);
  at::Tensor out = empty_output(g.M, g.N, a.options().dtype(out_dtype));
  g.out = out.data_ptr();
  g.out_type = float_type(out_dtype);
  gemm(g, to_isa(cpu_isa));
  return out;
}

// The A side of a GEMM on a float x [M, K] (checked by the caller) quantized to a_bits inside the GEMM: with the
// static scale a_scale (read into *static_scale, which g then points to), or per token where a_scale is absent.
GemmArgs float_x_args(const at::Tensor& x, int64_t a_bits, const c10::optional<at::Tensor>& a_scale,
                      float* static_scale) {
  GemmArgs g;
  g.a_source = ASource::kFloat;
  g.a_float_type = float_type(x, "x");
  g.a_bits = (int)a_bits;
  g.M = x.size(0);
  g.K = x.size(1);
  g.a = x.data_ptr();
  if (a_scale.has_value()) {
    *static_scale = scalar_scale(*a_scale);
    g.a_scale = static_scale;
  }
  return g;
}

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                            const c10::optional<at::Tensor>& a_scale, int64_t a_bits,
                            const c10::optional<at::Tensor>& bias, int64_t cpu_isa) {
  check_cpu_2d(x, "x");
  TORCH_CHECK(a_bits == 4 || a_bits == 8, "pqk: a_bits must be 4 or 8, got ", a_bits);
  float static_scale = 0.0f;
  GemmArgs g = float_x_args(x, a_bits, a_scale, &static_scale);
  set_weight(g, w, w_scale, bias);
  at::Tensor out = empty_output(g.M, g.N, x.options());
  g.out = out.data_ptr();
  g.out_type = g.a_float_type;
  gemm(g, to_isa(cpu_isa));
  return out;
}

// quant_linear for n weights over one x (q|k|v, gate|up): out[i] == quant_linear(x, w[i], w_scale[i], a_scale[i],
// a_bits, bias[i]) bit for bit; at decode one parallel region for all (gemm_shared_a).
std::vector<at::Tensor> quant_linear_multi_cpu(const at::Tensor& x, at::TensorList w, at::TensorList w_scale,
                                               const c10::List<c10::optional<at::Tensor>>& a_scale, int64_t a_bits,
                                               const c10::List<c10::optional<at::Tensor>>& bias, int64_t cpu_isa) {
  check_cpu_2d(x, "x");
  TORCH_CHECK(a_bits == 4 || a_bits == 8, "pqk: a_bits must be 4 or 8, got ", a_bits);
  const size_t n = w.size();
  TORCH_CHECK(n >= 1, "pqk: w must hold at least one weight");
  TORCH_CHECK(w_scale.size() == n && a_scale.size() == n && bias.size() == n, "pqk: w (", n, "), w_scale (",
              w_scale.size(), "), a_scale (", a_scale.size(), ") and bias (", bias.size(), ") must be lists of one length");
  std::vector<GemmArgs> gs(n);
  std::vector<float> static_scales(n, 0.0f);   // gs[i].a_scale points here
  std::vector<at::Tensor> outs;
  outs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    GemmArgs& g = gs[i];
    g = float_x_args(x, a_bits, a_scale.get(i), &static_scales[i]);
    set_weight(g, w[i], w_scale[i], bias.get(i));
    TORCH_CHECK(g.w_bits == gs[0].w_bits, "pqk: every w must have one dtype (w[0] ", w[0].scalar_type(), ", w[", i,
                "] ", w[i].scalar_type(), ")");
    outs.push_back(empty_output(g.M, g.N, x.options()));
    g.out = outs.back().data_ptr();
    g.out_type = g.a_float_type;
  }
  gemm_shared_a(gs.data(), (int)n, to_isa(cpu_isa));
  return outs;
}

at::Tensor kv_dequant_static_cpu(const c10::optional<at::Tensor>& prefix, const at::Tensor& body,
                                 const at::Tensor& scale, int64_t bits, at::ScalarType out_dtype, int64_t cpu_isa) {
  TORCH_CHECK(body.device().is_cpu() && body.dim() == 4 && body.is_contiguous(), "pqk: body must be a contiguous 4-D CPU tensor");
  TORCH_CHECK((bits == 4 && body.scalar_type() == at::kByte) || (bits == 8 && body.scalar_type() == at::kChar),
              "pqk: body must be uint8 for bits=4 or int8 for bits=8");
  const int64_t B = body.size(0), H = body.size(1), T = body.size(2), D = body.size(3) * (bits == 4 ? 2 : 1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == H,
              "pqk: scale must be a contiguous float32 tensor of ", H, " elements");
  int64_t P = 0, pb = 1;
  const void* pp = nullptr;
  FloatType pt = FloatType::kFloat32;
  if (prefix.has_value()) {
    TORCH_CHECK(prefix->dim() == 4 && prefix->is_contiguous() && (prefix->size(0) == 1 || prefix->size(0) == B) &&
                    prefix->size(1) == H && prefix->size(3) == D, "pqk: prefix must be a contiguous [1 or B, H, P, D] tensor");
    P = prefix->size(2);
    pb = prefix->size(0);
    pp = prefix->data_ptr();
    pt = float_type(*prefix, "prefix");
  }
  at::Tensor out = at::empty({B, H, P + T, D}, body.options().dtype(out_dtype));
  kv_dequant_concat_static(pp, pt, pb, P, body.data_ptr(), (int)bits, scale.data_ptr<float>(), B, H, T, D,
                           out.data_ptr(), float_type(out_dtype), to_isa(cpu_isa));
  return out;
}

at::Tensor kv_quantize_static_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t bits, int64_t cpu_isa) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(), "pqk: x must be a contiguous [B, H, T, D] CPU tensor");
  TORCH_CHECK(bits == 4 || bits == 8, "pqk: bits must be 4 or 8, got ", bits);
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  TORCH_CHECK(bits == 8 || D % 2 == 0, "pqk: bits=4 needs an even head dim, got ", D);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == H,
              "pqk: scale must be a contiguous float32 tensor of ", H, " elements");
  at::Tensor out = at::empty({B, H, T, bits == 4 ? D / 2 : D}, x.options().dtype(bits == 4 ? at::kByte : at::kChar));
  kv_quantize_static(x.data_ptr(), float_type(x, "x"), scale.data_ptr<float>(), (int)bits, B, H, T, D, out.data_ptr(),
                     to_isa(cpu_isa));
  return out;
}

// The decode attention's cache side, checked alike for kv_decode_static and decode_layer (op: the messages' prefix):
// the prefix K/V [1 or B, Hkv, P, D], contiguous, one dtype (both or neither; P = 0 without), and the padding mask,
// bool [B, >= positions] with contiguous rows (true = attend), or none.
struct PrefixArgs {
  const void* k = nullptr;
  const void* v = nullptr;
  FloatType type = FloatType::kFloat32;
  int64_t batch = 1, P = 0;
};

PrefixArgs prefix_args(const c10::optional<at::Tensor>& prefix_k, const c10::optional<at::Tensor>& prefix_v,
                       int64_t B, int64_t Hkv, int64_t D, const char* op) {
  TORCH_CHECK(prefix_k.has_value() == prefix_v.has_value(), op, "prefix_k and prefix_v go together");
  PrefixArgs r;
  if (!prefix_k.has_value()) return r;
  const at::Tensor &pk = *prefix_k, &pv = *prefix_v;
  TORCH_CHECK(pk.device().is_cpu() && pk.dim() == 4 && pk.is_contiguous() && pv.is_contiguous() &&
                  pk.sizes() == pv.sizes() && pk.scalar_type() == pv.scalar_type() &&
                  (pk.size(0) == 1 || pk.size(0) == B) && pk.size(1) == Hkv && pk.size(3) == D,
              op, "prefix_k / prefix_v must be contiguous [1 or B, Hkv, P, D] CPU tensors of one dtype, got ",
              pk.sizes(), " and ", pv.sizes());
  r.k = pk.data_ptr();
  r.v = pv.data_ptr();
  r.type = float_type(pk, "prefix_k");
  r.batch = pk.size(0);
  r.P = pk.size(2);
  return r;
}

// (data, row stride) of the mask; (nullptr, 0) without one
std::pair<const bool*, int64_t> mask_args(const c10::optional<at::Tensor>& mask, int64_t B, int64_t positions,
                                          const char* op) {
  if (!mask.has_value()) return {nullptr, 0};
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B &&
                  m.size(1) >= positions && m.stride(1) == 1,
              op, "mask must be a bool [", B, ", >= ", positions, "] CPU tensor with contiguous rows, got ",
              m.scalar_type(), " ", m.sizes());
  return {m.data_ptr<bool>(), m.stride(0)};
}

at::Tensor kv_decode_static_cpu(const at::Tensor& q, const c10::optional<at::Tensor>& prefix_k,
                                const c10::optional<at::Tensor>& prefix_v, const at::Tensor& k_body,
                                const at::Tensor& v_body, const at::Tensor& k_scale, const at::Tensor& v_scale,
                                int64_t bits, double sm_scale, int64_t cpu_isa,
                                const c10::optional<at::Tensor>& body_len, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.is_contiguous(), "pqk: q must be a contiguous [B, Hq, D] CPU tensor");
  TORCH_CHECK(bits == 4 || bits == 8, "pqk: bits must be 4 or 8, got ", bits);
  const at::ScalarType bt = bits == 4 ? at::kByte : at::kChar;
  // rows contiguous; batch / head strides free but equal for K and V (views of the cache's buffers)
  for (const at::Tensor* t : {&k_body, &v_body})
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 4 && t->scalar_type() == bt && t->sizes() == k_body.sizes() &&
                    t->stride(3) == 1 && t->stride(2) == t->size(3) && t->stride(1) % t->size(3) == 0 &&
                    t->stride(0) % t->size(3) == 0 && t->strides() == k_body.strides(),
                "pqk: k_body/v_body must be [B, Hkv, T, D/2 (uint8) or D (int8)] with contiguous rows, equal shapes "
                "and strides");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_body.size(1), T = k_body.size(2);
  TORCH_CHECK(k_body.size(0) == B && k_body.size(3) * (bits == 4 ? 2 : 1) == D && Hkv > 0 && Hq % Hkv == 0,
              "pqk: k_body's shape does not match q's");
  for (const at::Tensor* t : {&k_scale, &v_scale})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == Hkv,
                "pqk: k_scale/v_scale must be contiguous float32 tensors of ", Hkv, " elements");
  const PrefixArgs pre = prefix_args(prefix_k, prefix_v, B, Hkv, D, "pqk: ");
  const int64_t P = pre.P;
  // A preallocated cache (cache/modes/static.py) passes its whole buffer as the body and the filled length as a
  // tensor, so a compiled step needs no host-side int: here, on the CPU, it is read directly.
  int64_t T_used = T;
  if (body_len.has_value()) {
    const at::Tensor& n = *body_len;
    TORCH_CHECK(n.device().is_cpu() && n.numel() == 1 && n.scalar_type() == at::kLong,
                "pqk: body_len must be a one-element int64 CPU tensor");
    T_used = *n.data_ptr<int64_t>();   // in place, as scalar_scale reads a scale (no dispatcher call)
    TORCH_CHECK(T_used >= 0 && T_used <= T, "pqk: body_len ", T_used, " is outside the body's capacity [0, ", T, "]");
  }
  const auto [mask_ptr, mask_stride] = mask_args(mask, B, P + T_used, "pqk: ");
  TORCH_CHECK(P + T_used > 0, "pqk: the cache is empty");
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  const int64_t row = k_body.size(3);
  kv_decode_attention_static(q.data_ptr(), float_type(q, "q"), B, Hq, D, pre.k, pre.v, pre.type, pre.batch, P,
                             strided_body(k_body.data_ptr(), v_body.data_ptr(), k_body.stride(0) / row,
                                          k_body.stride(1) / row, row),
                             (int)bits, k_scale.data_ptr<float>(), v_scale.data_ptr<float>(), Hkv, T_used, nullptr,
                             mask_ptr, mask_stride, (float)sm_scale, out.data_ptr(), to_isa(cpu_isa));
  return out;
}

// ---- prefix_causal_attention: the prefill attention over [prefix | prompt] (attention.cpp) --------------------------
at::Tensor prefix_causal_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       int64_t prefix_len, double scale, int64_t cpu_isa) {
  const char* op = "pqk.prefix_causal_attention: ";
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && q.dim() == 4 && k.dim() == 4 &&
                  v.dim() == 4, op, "query, key and value must be 4-D CPU tensors, got ", q.sizes(), ", ", k.sizes(),
              " and ", v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), P = prefix_len;
  TORCH_CHECK(P >= 0 && T >= 1 && D >= 1 && Hkv >= 1 && Hq % Hkv == 0 && k.sizes() == v.sizes() &&
                  k.size(0) == B && k.size(2) == P + T && k.size(3) == D,
              op, "key / value must be [B, H_kv, prefix_len + T, D] = [", B, ", H_kv, ", P, " + ", T, ", ", D,
              "] with H_q (", Hq, ") a multiple of H_kv, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              "query, key and value must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
              v.scalar_type());
  TORCH_CHECK(std::isfinite(scale), op, "scale must be finite, got ", scale);
  const FloatType t = float_type(q, "query");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty({B, T, Hq, D}, q.options());
  prefix_causal_attention(qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), t, B, Hq, Hkv, T, P, D, (float)scale,
                          out.data_ptr(), to_isa(cpu_isa));
  return out;
}

// ---- rope: HF's apply_rotary_pos_emb on one of q / k (float_ops.cpp; ops/transform.py rope) ----------------------
at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t cpu_isa) {
  const char* op = "pqk.rope: ";
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), op,
              "x, cos and sin must be CPU tensors");
  TORCH_CHECK(x.dim() == 4 && x.size(3) >= 2 && x.size(3) % 2 == 0, op, "x must be [B, H, T, D] with D even, got ",
              x.sizes());
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3);
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && (cos.size(0) == B || cos.size(0) == 1) &&
                  cos.size(1) == T && cos.size(2) == D,
              op, "cos and sin must be [", B, " or 1, ", T, ", ", D, "], got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), op,
              "cos and sin must have x's dtype ", x.scalar_type(), ", got ", cos.scalar_type(), " and ",
              sin.scalar_type());
  const FloatType t = float_type(x, "x");
  const at::Tensor xc = x.stride(3) == 1 ? x : x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor out = at::empty({B, H, T, D}, x.options());
  rope_rows(xc.data_ptr(), xc.stride(0), xc.stride(1), xc.stride(2), cc.data_ptr(), sc.data_ptr(),
            cos.size(0) == 1 ? 0 : T * D, t, B, H, T, D, out.data_ptr(), to_isa(cpu_isa));
  return out;
}

// ---- rms_norm: HF's RMSNorm (float_ops.cpp; ops/transform.py rms_norm) --------------------------------------------
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t cpu_isa) {
  const char* op = "pqk.rms_norm: ";
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, "x and weight must be CPU tensors");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, op, "x must have a non-empty last dim, got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, "weight must be [", x.size(-1), "], got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, "weight must have x's dtype ", x.scalar_type(), ", got ",
              weight.scalar_type());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, "eps must be finite and >= 0, got ", eps);
  const FloatType t = float_type(x, "x");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.size(-1);
  rms_norm_rows(xc.data_ptr(), wc.data_ptr(), t, x.numel() / n, n, (float)eps, out.data_ptr(), to_isa(cpu_isa));
  return out;
}

// ---- decode_layer ------------------------------------------------------------------------------------------------
// The op's schema: ops/library.py; the kernel: decode_layer.cpp; the Python side: models/decode_layer.py.
// A layer's module-side arguments (norms, seven linears, q/k norms, down's Hadamard: ~40 values, fixed while a model
// generates) are registered into a slot by decode_layer_register, from Python outside the traced step (once per
// generate call), and the op names its layer by slot: converting them from Python at every call cost ~25 us of a
// ~190 us layer (docs/PERF.md, change 15). The cache-side tensors, which differ per cache, are the op's arguments.

const float* f32(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n,
              "pqk.decode_layer: ", name, " must be a contiguous float32 CPU tensor of ", n, " elements, got ",
              t.scalar_type(), " ", t.sizes());
  return t.data_ptr<float>();
}

const float* f32_opt(const c10::optional<at::Tensor>& t, int64_t n, const char* name) {
  return t.has_value() ? f32(*t, n, name) : nullptr;
}

// w, w_scale, a_scale (static, 0-dim), bias or None: one linear as registered
LayerLinear layer_linear(const std::vector<c10::optional<at::Tensor>>& l, int64_t a_bits, int64_t N, int64_t K,
                         const char* name) {
  TORCH_CHECK(l.size() == 4 && l[0].has_value() && l[1].has_value() && l[2].has_value(), "pqk.decode_layer: ", name,
              " must be [w, w_scale, a_scale, bias or None]");
  const at::Tensor &w = *l[0], &a_scale = *l[2];
  TORCH_CHECK(a_bits == 4 || a_bits == 8, "pqk.decode_layer: ", name, "'s a_bits must be 4 or 8, got ", a_bits);
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() &&
                  ((w.scalar_type() == at::kByte && w.size(1) * 2 == K) ||
                   (w.scalar_type() == at::kChar && w.size(1) == K)) && w.size(0) == N,
              "pqk.decode_layer: ", name, "'s weight must be a contiguous [", N, ", ", K / 2, "] uint8 (int4) or [", N,
              ", ", K, "] int8 CPU tensor, got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(a_scale.device().is_cpu(), "pqk.decode_layer: ", name, "'s a_scale must be on the CPU");
  LayerLinear r;
  r.w = w.data_ptr();
  r.w_bits = w.scalar_type() == at::kByte ? 4 : 8;
  r.a_bits = (int)a_bits;
  r.w_scale = f32(*l[1], N, "a w_scale");
  r.a_scale = scalar_scale(a_scale);
  r.bias = f32_opt(l[3], N, "a bias");
  r.N = N;
  r.K = K;
  return r;
}

struct LayerEntry {
  std::vector<at::Tensor> keep;   // the registered tensors: alive while the entry is
  DecodeLayerArgs args;           // the module-side fields; the op fills in the rest per call
  Isa isa = Isa::kAuto;
};

std::mutex g_layers_mu;
std::vector<std::shared_ptr<const LayerEntry>> g_layers;   // slot -> entry, nullptr once released

// Registers one layer (slot < 0: a new slot, else that slot is refreshed) and returns its slot. linears: q, k, v, o,
// gate, up, down, each [w, w_scale, a_scale, bias or None]; a_bits: q|k|v, o, gate|up, down; norms: [norm1, norm2,
// q_norm or None, k_norm or None]; eps: [eps1, eps2, qk_eps]; down_rotation: [signs [I], H_m [m, m]] or None.
int64_t decode_layer_register(int64_t slot, int64_t head_dim, const std::vector<c10::optional<at::Tensor>>& norms,
                              const std::vector<double>& eps,
                              const std::vector<std::vector<c10::optional<at::Tensor>>>& linears,
                              const std::vector<int64_t>& a_bits,
                              const std::vector<c10::optional<at::Tensor>>& down_rotation, double sm_scale,
                              int64_t cpu_isa) {
  const char* op = "pqk.decode_layer_register: ";
  TORCH_CHECK(norms.size() == 4 && norms[0].has_value() && norms[1].has_value() && eps.size() == 3 &&
                  linears.size() == 7 && a_bits.size() == 4 && (down_rotation.empty() || down_rotation.size() == 2),
              op, "norms must hold 4, eps 3, linears 7, a_bits 4 and down_rotation 0 or 2 entries");
  auto e = std::make_shared<LayerEntry>();
  DecodeLayerArgs& a = e->args;
  for (const auto* group : {&norms, &down_rotation})
    for (const auto& t : *group)
      if (t.has_value()) e->keep.push_back(*t);
  for (const auto& l : linears)
    for (const auto& t : l)
      if (t.has_value()) e->keep.push_back(*t);
  TORCH_CHECK(linears[0].size() == 4 && linears[0][0].has_value() && linears[1].size() == 4 &&
                  linears[1][0].has_value() && linears[4].size() == 4 && linears[4][0].has_value(),
              op, "each linear must be [w, w_scale, a_scale, bias or None]");
  a.D = head_dim;
  a.H = norms[0]->numel();
  const int64_t QN = linears[0][0]->size(0), KN = linears[1][0]->size(0);
  TORCH_CHECK(a.D > 0 && a.D % 2 == 0 && QN % a.D == 0 && KN % a.D == 0 && (QN / a.D) % (KN / a.D) == 0, op,
              "head_dim ", a.D, " must be even and divide q's ", QN, " and k's ", KN,
              " outputs into a multiple of the KV heads");
  a.Hq = QN / a.D;
  a.Hkv = KN / a.D;
  a.I = linears[4][0]->size(0);
  a.norm1 = f32(*norms[0], a.H, "norm1");
  a.norm2 = f32(*norms[1], a.H, "norm2");
  TORCH_CHECK(norms[2].has_value() == norms[3].has_value(), op, "q_norm and k_norm go together");
  a.q_norm = f32_opt(norms[2], a.D, "q_norm");
  a.k_norm = f32_opt(norms[3], a.D, "k_norm");
  a.eps1 = (float)eps[0];
  a.eps2 = (float)eps[1];
  a.qk_eps = (float)eps[2];
  a.q = layer_linear(linears[0], a_bits[0], QN, a.H, "q");
  a.k = layer_linear(linears[1], a_bits[0], KN, a.H, "k");
  a.v = layer_linear(linears[2], a_bits[0], KN, a.H, "v");
  a.o = layer_linear(linears[3], a_bits[1], a.H, QN, "o");
  a.gate = layer_linear(linears[4], a_bits[2], a.I, a.H, "gate");
  a.up = layer_linear(linears[5], a_bits[2], a.I, a.H, "up");
  a.down = layer_linear(linears[6], a_bits[3], a.H, a.I, "down");
  if (!down_rotation.empty()) {
    TORCH_CHECK(down_rotation[0].has_value() && down_rotation[1].has_value(), op, "down_rotation is [signs, H_m]");
    const at::Tensor& hm = *down_rotation[1];
    TORCH_CHECK(hm.dim() == 2 && hm.size(0) == hm.size(1) && hm.size(0) > 0 && a.I % hm.size(0) == 0 &&
                    ((a.I / hm.size(0)) & (a.I / hm.size(0) - 1)) == 0,
                op, "down_rotation's H_m must be square [m, m] with ", a.I, " = m * 2^p, got ", hm.sizes());
    a.down_signs = f32(*down_rotation[0], a.I, "down_rotation's signs");
    a.had_n = hm.size(0);
    a.had_m = f32(hm, a.had_n * a.had_n, "down_rotation's H_m");
  }
  a.sm_scale = (float)sm_scale;
  e->isa = to_isa(cpu_isa);
  std::lock_guard<std::mutex> lock(g_layers_mu);
  if (slot < 0) {
    g_layers.push_back(std::move(e));
    return (int64_t)g_layers.size() - 1;
  }
  TORCH_CHECK(slot < (int64_t)g_layers.size(), op, "slot ", slot, " was never registered");
  g_layers[slot] = std::move(e);
  return slot;
}

// Drops a slot's tensors (the layer's module is gone); the slot number is not reused.
void decode_layer_release(int64_t slot) {
  std::lock_guard<std::mutex> lock(g_layers_mu);
  if (slot >= 0 && slot < (int64_t)g_layers.size()) g_layers[slot].reset();
}

at::Tensor decode_layer_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            const c10::optional<at::Tensor>& mask, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& length, const at::Tensor& k_scale,
                            const at::Tensor& v_scale, const c10::optional<at::Tensor>& prefix_k,
                            const c10::optional<at::Tensor>& prefix_v, const c10::optional<at::Tensor>& key_rotation,
                            const c10::optional<at::Tensor>& key_offset, int64_t layer) {
  const char* op = "pqk.decode_layer: ";
  std::shared_ptr<const LayerEntry> entry;
  {
    std::lock_guard<std::mutex> lock(g_layers_mu);
    TORCH_CHECK(layer >= 0 && layer < (int64_t)g_layers.size() && g_layers[layer], op, "layer ", layer,
                " is not a registered slot (models/decode_layer.py registers a model's layers)");
    entry = g_layers[layer];
  }
  DecodeLayerArgs a = entry->args;
  const at::ScalarType xs = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && (xs == at::kFloat || xs == at::kBFloat16 || xs == at::kHalf) && x.dim() == 3 &&
                  x.size(1) == 1 && x.size(2) == a.H && x.is_contiguous(),
              op, "x must be a contiguous float32, bfloat16 or float16 [B, 1, ", a.H, "] CPU tensor, got ", xs, " ",
              x.sizes());
  a.B = x.size(0);
  const int64_t row = k_cache.dim() == 4 ? k_cache.size(3) : 0;
  const at::ScalarType bt = row == a.D / 2 ? at::kByte : at::kChar;
  TORCH_CHECK(k_cache.device().is_cpu() && k_cache.dim() == 4 && k_cache.size(0) == a.B && k_cache.size(1) == a.Hkv &&
                  (row == a.D / 2 || row == a.D) && k_cache.scalar_type() == bt && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == bt &&
                  v_cache.device().is_cpu(),
              op, "k_cache and v_cache must be contiguous CPU tensors [", a.B, ", ", a.Hkv, ", capacity, ", a.D / 2,
              "] uint8 (4-bit KV) or [..., ", a.D, "] int8 (8-bit) of one shape, got ", k_cache.scalar_type(), " ",
              k_cache.sizes(), " and ", v_cache.scalar_type(), " ", v_cache.sizes());
  a.kv_bits = bt == at::kByte ? 4 : 8;
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3 && (cos.size(0) == a.B || cos.size(0) == 1) &&
                  cos.size(1) == 1, op, "cos and sin must be [B or 1, 1, D], got ", cos.sizes(), " and ", sin.sizes());
  a.x = x.data_ptr();
  a.xt = float_type(x, "x");
  // cos / sin: float32 or x's dtype (a bf16 model's rotary embedding gives bf16)
  TORCH_CHECK(cos.device().is_cpu() && sin.device().is_cpu() && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.scalar_type() == sin.scalar_type() &&
                  (cos.scalar_type() == at::kFloat || cos.scalar_type() == xs) && cos.size(2) == a.D,
              op, "cos and sin must be contiguous CPU tensors of one dtype, float32 or x's (", xs, "), [B or 1, 1, ",
              a.D, "], got ", cos.scalar_type(), " ", cos.sizes(), " and ", sin.scalar_type(), " ", sin.sizes());
  a.cos = cos.data_ptr();
  a.sin = sin.data_ptr();
  a.ct = float_type(cos, "cos");
  a.cos_stride = cos.size(0) == 1 ? 0 : a.D;
  a.key_rotation = f32_opt(key_rotation, a.D * a.D, "key_rotation");
  a.key_offset = f32_opt(key_offset, a.Hkv * a.D, "key_offset");
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.cache_sb = k_cache.stride(0) / row;
  a.cache_sh = k_cache.stride(1) / row;
  TORCH_CHECK(length.device().is_cpu() && length.scalar_type() == at::kLong && length.numel() == 1,
              op, "length must be a one-element int64 CPU tensor");
  a.pos = *length.data_ptr<int64_t>();
  const int64_t capacity = k_cache.size(2);
  TORCH_CHECK(a.pos >= 0 && a.pos < capacity, op, "the preallocated cache holds ", capacity,
              " tokens after the prefix and length says ", a.pos, " are filled: no row is left for this token");
  a.k_scale = f32(k_scale, a.Hkv, "k_scale");
  a.v_scale = f32(v_scale, a.Hkv, "v_scale");
  for (const float* s : {a.k_scale, a.v_scale})
    for (int64_t h = 0; h < a.Hkv; ++h)
      TORCH_CHECK(std::isfinite(s[h]) && s[h] > 0.0f, op, "k_scale / v_scale must be finite and > 0, got ", s[h]);
  const PrefixArgs pre = prefix_args(prefix_k, prefix_v, a.B, a.Hkv, a.D, op);
  a.prefix_k = pre.k;
  a.prefix_v = pre.v;
  a.pt = pre.type;
  a.prefix_batch = pre.batch;
  a.P = pre.P;
  std::tie(a.mask, a.mask_stride) = mask_args(mask, a.B, a.P + a.pos + 1, op);
  at::Tensor out = at::empty_like(x);
  a.out = out.data_ptr();
  decode_layer(a, entry->isa);
  return out;
}

}  // namespace

// The heavy part of pqk::hadamard_transform's CPU kernel (ops/transform.py): x float32 [R, n] contiguous, each row
// replaced in place by (H_m (x) H_{2^p}) row / sqrt(n) (hadamard.cpp); hm float32 [m, m] contiguous, +-1 (H_m^T for
// the inverse). Rows split over threads; a row is ~n (log2(n / m) + m) flops, so a task gets >= 16K elements.
void hadamard_rows_(at::Tensor x, const at::Tensor& hm) {
  const char* op = "pqk.hadamard_rows_: ";
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), op,
              "x must be a contiguous float32 CPU tensor [R, n]");
  TORCH_CHECK(hm.device().is_cpu() && hm.scalar_type() == at::kFloat && hm.dim() == 2 && hm.is_contiguous() &&
                  hm.size(0) == hm.size(1) && hm.size(0) >= 1, op, "hm must be a contiguous float32 [m, m]");
  const int64_t R = x.size(0), n = x.size(1), m = hm.size(0);
  TORCH_CHECK(n > 0 && n % m == 0 && ((n / m) & (n / m - 1)) == 0, op, "x.shape[1] = ", n, " is not m * 2^p for m = ",
              m);
  float* px = x.data_ptr<float>();
  const float* ph = hm.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / n), [&](int64_t r0, int64_t r1) {
    std::vector<float> tmp(m > 1 ? n : 0);
    for (int64_t r = r0; r < r1; ++r) pqk::cpu::hadamard(px + r * n, n, ph, m, tmp.data());
  });
}

// ---- the static body in a paged cache (vLLM's): uint8 [blocks, H, block_size, 2 * row], row = D / 2 (bits 4) or
// D (bits 8) bytes, a token-head's K codes then its V codes (kernels.h: KVBody, kv_write_paged_static) ----

// cache -> (blocks, block size, row bytes), checked against H KV heads of head dim D
std::tuple<int64_t, int64_t, int64_t> paged_cache_args(const at::Tensor& cache, int64_t H, int64_t D, int64_t bits,
                                                       const char* op) {
  TORCH_CHECK(bits == 4 || bits == 8, op, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(bits == 8 || D % 2 == 0, op, "bits=4 needs an even head dim, got ", D);
  const int64_t row = bits == 4 ? D / 2 : D;
  TORCH_CHECK(cache.device().is_cpu() && cache.scalar_type() == at::kByte && cache.dim() == 4 &&
                  cache.is_contiguous() && cache.size(1) == H && cache.size(3) == 2 * row,
              op, "cache must be a contiguous uint8 CPU tensor [blocks, ", H, ", block_size, ", 2 * row, "], got ",
              cache.scalar_type(), " ", cache.sizes());
  return {cache.size(0), cache.size(2), row};
}

void kv_write_paged_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& cache,
                        const at::Tensor& slot_mapping, const at::Tensor& k_scale, const at::Tensor& v_scale,
                        int64_t bits, const c10::optional<at::Tensor>& key_offset, int64_t cpu_isa) {
  const char* op = "pqk.kv_write_paged_static: ";
  TORCH_CHECK(key.device().is_cpu() && key.dim() == 3 && key.stride(2) == 1 && value.sizes() == key.sizes() &&
                  value.stride(2) == 1 && value.scalar_type() == key.scalar_type() && value.device().is_cpu(),
              op, "key and value must be CPU tensors [T, H, D] of one dtype and shape, with contiguous rows; got ",
              key.sizes(), " and ", value.sizes());
  const int64_t H = key.size(1), D = key.size(2);
  const auto [blocks, bs, row] = paged_cache_args(cache, H, D, bits, op);
  TORCH_CHECK(slot_mapping.device().is_cpu() && slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.is_contiguous() && slot_mapping.size(0) <= key.size(0),
              op, "slot_mapping must be a contiguous int64 CPU tensor [n], n <= key.shape[0] = ", key.size(0));
  const int64_t T = slot_mapping.size(0);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)   // all checked before any row is written
    TORCH_CHECK(slots[t] < blocks * bs, op, "slot_mapping[", t, "] = ", slots[t], " is past the cache's ",
                blocks * bs, " slots");
  for (const at::Tensor* s : {&k_scale, &v_scale})
    TORCH_CHECK(s->device().is_cpu() && s->scalar_type() == at::kFloat && s->is_contiguous() && s->numel() == H,
                op, "k_scale / v_scale must be contiguous float32 CPU tensors of ", H, " elements");
  const float* off = nullptr;
  if (key_offset.has_value()) {
    const at::Tensor& o = *key_offset;
    TORCH_CHECK(o.device().is_cpu() && o.scalar_type() == at::kFloat && o.is_contiguous() && o.dim() == 2 &&
                    o.size(0) == H && o.size(1) == D,
                op, "key_offset must be a contiguous float32 CPU tensor [", H, ", ", D, "], got ", o.sizes());
    off = o.data_ptr<float>();
  }
  kv_write_paged_static(key.data_ptr(), key.stride(0), key.stride(1), value.data_ptr(), value.stride(0),
                        value.stride(1), float_type(key, "key"), T, H, D, slots, k_scale.data_ptr<float>(),
                        v_scale.data_ptr<float>(), off, (int)bits, cache.data_ptr<uint8_t>(), bs, to_isa(cpu_isa));
}

at::Tensor kv_decode_paged_cpu(const at::Tensor& q, const c10::optional<at::Tensor>& prefix_k,
                               const c10::optional<at::Tensor>& prefix_v, const at::Tensor& cache,
                               const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& k_scale,
                               const at::Tensor& v_scale, int64_t bits, double sm_scale, int64_t cpu_isa) {
  const char* op = "pqk.kv_decode_paged_static: ";
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.is_contiguous(), op,
              "q must be a contiguous [B, Hq, D] CPU tensor");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(cache.dim() == 4 && cache.size(1) > 0 && Hq % cache.size(1) == 0, op, "cache must be [blocks, Hkv, "
              "block_size, bytes] with Hkv dividing q's ", Hq, " heads, got ", cache.sizes());
  const int64_t Hkv = cache.size(1);
  const auto [blocks, bs, row] = paged_cache_args(cache, Hkv, D, bits, op);
  TORCH_CHECK(block_table.device().is_cpu() && block_table.scalar_type() == at::kInt && block_table.dim() == 2 &&
                  block_table.size(0) == B && block_table.stride(1) == 1,
              op, "block_table must be an int32 CPU tensor [", B, ", width] with contiguous rows, got ",
              block_table.scalar_type(), " ", block_table.sizes());
  TORCH_CHECK(seq_lens.device().is_cpu() && (seq_lens.scalar_type() == at::kInt ||
                                             seq_lens.scalar_type() == at::kLong) && seq_lens.dim() == 1 &&
                  seq_lens.size(0) == B,
              op, "seq_lens must be an int32 or int64 CPU tensor [", B, "]");
  for (const at::Tensor* t : {&k_scale, &v_scale})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == Hkv,
                op, "k_scale / v_scale must be contiguous float32 CPU tensors of ", Hkv, " elements");
  const PrefixArgs pre = prefix_args(prefix_k, prefix_v, B, Hkv, D, op);
  const int64_t P = pre.P, width = block_table.size(1);
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  const int64_t* len = lens.data_ptr<int64_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  std::vector<int64_t> body_lens((size_t)B);
  int64_t T = 0;
  for (int64_t b = 0; b < B; ++b) {  // every page the call reads is checked first: no read outside the cache
    TORCH_CHECK(len[b] >= P && len[b] <= width * bs, op, "seq_lens[", b, "] = ", len[b], " is outside [P = ", P,
                ", block_table width * block_size = ", width * bs, "]");
    for (int64_t i = P / bs; len[b] > P && i * bs < len[b]; ++i) {  // the blocks of body positions P .. len-1
      const int32_t blk = table[b * block_table.stride(0) + i];
      TORCH_CHECK(blk >= 0 && blk < blocks, op, "block_table[", b, ", ", i, "] = ", blk, " is not a block of the "
                  "cache's ", blocks);
    }
    body_lens[(size_t)b] = len[b] - P;
    T = std::max(T, len[b] - P);
  }
  KVBody body;
  body.k = cache.data_ptr<uint8_t>(), body.v = body.k + row, body.stride = 2 * row;
  body.table = table, body.table_stride = block_table.stride(0), body.block_size = bs, body.hkv = Hkv, body.start = P;
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  kv_decode_attention_static(q.data_ptr(), float_type(q, "q"), B, Hq, D, pre.k, pre.v, pre.type, pre.batch, P, body,
                             (int)bits, k_scale.data_ptr<float>(), v_scale.data_ptr<float>(), Hkv, T,
                             body_lens.data(), nullptr, 0, (float)sm_scale, out.data_ptr(), to_isa(cpu_isa));
  return out;
}

TORCH_LIBRARY_IMPL(pqk, CPU, m) {
  m.impl("kv_decode_static", &kv_decode_static_cpu);
  m.impl("kv_quantize_static", &kv_quantize_static_cpu);
  m.impl("kv_dequant_static", &kv_dequant_static_cpu);
  m.impl("kv_write_paged_static", &kv_write_paged_cpu);
  m.impl("kv_decode_paged_static", &kv_decode_paged_cpu);
  m.impl("pack_int4", &pack_int4_cpu);
  m.impl("unpack_int4", &unpack_int4_cpu);
  m.impl("quantize_static", &quantize_static_cpu);
  m.impl("quantize_per_token", &quantize_per_token_cpu);
  m.impl("int4_matmul", &int4_matmul_cpu);
  m.impl("quant_linear", &quant_linear_cpu);
  m.impl("quant_linear_multi", &quant_linear_multi_cpu);
  m.impl("decode_layer", &decode_layer_cpu);
  m.impl("prefix_causal_attention", &prefix_causal_attention_cpu);
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rope", &rope_cpu);
}

}  // namespace cpu
}  // namespace pqk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prefixquant_kernels C++ CPU kernels (ops are registered as torch.ops.pqk.*)";
  m.def("best_cpu_isa", [] { return pqk::cpu::isa_name(pqk::cpu::best_isa()); });
  // benchmark only (benchmarks/cpu_peak.py): the measured int8 peak of an ISA (an int as in Isa), on torch's threads
  m.def("int8_peak_tops", [](int isa, double seconds) {
    return pqk::cpu::int8_peak_tops(static_cast<pqk::cpu::Isa>(isa), seconds);
  });
  // models/decode_layer.py: a layer's module-side arguments of pqk::decode_layer, by slot (see decode_layer_register)
  m.def("decode_layer_register", &pqk::cpu::decode_layer_register);
  // ops/transform.py: the CPU kernel of pqk::hadamard_transform
  m.def("hadamard_rows_", &pqk::cpu::hadamard_rows_);
  m.def("decode_layer_release", &pqk::cpu::decode_layer_release);
  m.def("cpu_isa_supported", [](int isa) { return pqk::cpu::isa_supported(static_cast<pqk::cpu::Isa>(isa)); });
  // models/prefix_attention.py: whether the table pqk::prefix_causal_attention runs on has the attention blocks
  // (IsaKernels::qk_block / pv_block / softmax_block); without them its portable blocks are slower than SDPA
  m.def("cpu_attention_blocks", [] { return pqk::cpu::attention_blocks(pqk::cpu::Isa::kAuto); });
  // How many distinct threads ran the chunks of one kernels' parallel_for over `n` items (grain 1): equals
  // torch.get_num_threads() when the threading hook really is parallel (tests/cpu/test_threads.py; a build without
  // -fopenmp compiles at::parallel_for's pragma away and runs everything on one thread, silently).
  m.def("parallel_threads_used", [](int64_t n) {
    std::vector<std::atomic<int>> seen(at::get_num_threads());
    pqk::cpu::parallel_for(0, n, 1, [&](int64_t, int64_t) {
      const int t = at::get_thread_num();
      if (t >= 0 && t < (int)seen.size()) seen[t].store(1);
    });
    int used = 0;
    for (auto& s : seen) used += s.load();
    return used;
  });
}
