// CPU kernels of prefixquant_kernels: the interface between the torch binding (csrc/cpu/torch_ops.cpp)
// and the kernel files. Nothing here includes a torch header: the same files build into the Python
// extension and into the sanitizer harness (csrc/cpu/tests/sanitize_harness.cpp).
//
// All tensors are dense row-major; the binding has checked shapes, dtypes and scales before any call.
#pragma once

#include <stdint.h>

#include <functional>

#include "float16.h"

namespace pqk {
namespace cpu {

// ---- instruction sets -------------------------------------------------------------------------------
// Each kernel family has a portable C++ version and SIMD versions; `Isa` picks one. kAuto = the best the
// running CPU supports (checked with cpuid at run time, so one binary runs on any x86-64 or aarch64).
// kAvxVnni / kAvx512Vnni are the AVX2 kernels with the W4 tile on vpdpbusd (vnni_kernels.cpp); kAmx is kAvx512Vnni
// with the prefill GEMM on AMX tiles (amx_kernels.cpp).
enum class Isa : int { kAuto = -1, kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3, kAmx = 4 };
Isa best_isa();                 // highest supported by this CPU and this build
bool isa_supported(Isa isa);    // kScalar is always supported
const char* isa_name(Isa isa);

// ---- threading ---------------------------------------------------------------------------------------
// Provided by the host program: at::parallel_for in the extension (honours torch.set_num_threads),
// a plain loop in the sanitizer harness. body(begin, end) is called on disjoint sub-ranges.
void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& body);

// ---- format ------------------------------------------------------------------------------------------
// q: int8 [n] with n even, values in [-8, 7] -> out: uint8 [n / 2] (element 2i low nibble of byte i)
void pack_int4(const int8_t* q, int64_t n, uint8_t* out);
// p: uint8 [n_bytes] -> out: int8 [2 * n_bytes]
void unpack_int4(const uint8_t* p, int64_t n_bytes, int8_t* out);

// ---- activation quantization -------------------------------------------------------------------------
// x: float32/bf16/fp16 [M, K] (K even when bits == 4), scale: fp32 > 0, finite.
// out: bits == 4 -> uint8 [M, K/2] packed; bits == 8 -> int8 [M, K].
void quantize_static(const void* x, FloatType xt, int64_t M, int64_t K, float scale, int bits,
                     void* out, Isa isa);
// Same, with a per-row scale = max|x_row| (finite values) / qmax written to scales_out: fp32 [M].
void quantize_per_token(const void* x, FloatType xt, int64_t M, int64_t K, int bits, void* out,
                        float* scales_out, Isa isa);

// ---- KV cache ----------------------------------------------------------------------------------------
// out [B, H, P + T, D] (type ot) = [prefix (type pt; batch 1 or B, read with batch stride 0 when 1) |
//                                   body (int4 packed [B, H, T, D/2] or int8 [B, H, T, D]) * scale[h]]
void kv_dequant_concat_static(const void* prefix, FloatType pt, int64_t prefix_batch, int64_t P,
                              const void* body, int bits, const float* scale, int64_t B, int64_t H, int64_t T,
                              int64_t D, void* out, FloatType ot, Isa isa);

// out = the static cache's body rows of x: x [B, H, T, D] (type xt) quantized with scale[h] (quantize_value, bits
// 4 or 8) -> int4 packed uint8 [B, H, T, D/2] (D even) or int8 [B, H, T, D]. Parallel over rows.
void kv_quantize_static(const void* x, FloatType xt, const float* scale, int bits, int64_t B, int64_t H, int64_t T,
                        int64_t D, void* out, Isa isa);

// Where a static cache's body rows live: body row n (0-based, after the prefix) of sequence b and KV head h has
// its K codes at k + row(b, h, n) * stride and its V codes at v + row(b, h, n) * stride.
//   strided (a cache of its own: [B, Hkv, capacity, row] buffers, views [.., :T, ..] of them):
//     row = b * batch_rows + h * head_rows + n, stride = one row's bytes (D / 2 packed int4, D int8);
//   paged (vLLM's cache: uint8 [blocks, Hkv, block_size, 2 * row], a token-head's K codes then its V codes):
//     the body's first position is `start` (the prefix takes positions 0 .. start-1 of every sequence), position
//     p = start + n sits in block table[b * table_stride + p / block_size] at p % block_size, so
//     row = (block * Hkv + h) * block_size + p % block_size, stride = 2 * row bytes, v = k + row bytes.
struct KVBody {
  const uint8_t* k = nullptr;
  const uint8_t* v = nullptr;
  int64_t stride = 0;
  int64_t batch_rows = 0, head_rows = 0;  // strided
  const int32_t* table = nullptr;  // paged: int32 [B, table_stride] block ids
  int64_t table_stride = 0, block_size = 1, hkv = 1, start = 0;
  int64_t row(int64_t b, int64_t h, int64_t n) const {
    if (table == nullptr) return b * batch_rows + h * head_rows + n;
    const int64_t p = start + n;
    return ((int64_t)table[b * table_stride + p / block_size] * hkv + h) * block_size + p % block_size;
  }
  // paged: row(b, h, n0 + i) for i < count into out, one division per call instead of one per row
  void paged_rows(int64_t b, int64_t h, int64_t n0, int64_t count, int64_t* out) const {
    int64_t blk = (start + n0) / block_size, off = (start + n0) % block_size;
    for (int64_t i = 0; i < count; ++i) {
      out[i] = ((int64_t)table[b * table_stride + blk] * hkv + h) * block_size + off;
      if (++off == block_size) off = 0, ++blk;
    }
  }
};
inline KVBody strided_body(const void* k, const void* v, int64_t batch_rows, int64_t head_rows, int64_t row_bytes) {
  KVBody body;
  body.k = (const uint8_t*)k, body.v = (const uint8_t*)v, body.stride = row_bytes;
  body.batch_rows = batch_rows, body.head_rows = head_rows;
  return body;
}

// Decode attention of one new token over a static cache, without materializing a float K/V:
// out [B, Hq, D] (type qt) = softmax(q K^T * sm_scale) V per query head, K/V = [prefix | body * scale[h]].
//   q [B, Hq, D] type qt; prefix_k/v [prefix_batch, Hkv, P, D] type pt (P may be 0, pointers then unused);
//   body: where the int4 packed (D/2 bytes) or int8 (D bytes) body rows are (KVBody: strided or paged);
//   k_scale/v_scale fp32 [Hkv].
//   Hq = G * Hkv: query head h*G + g reads KV head h (GQA), so each K/V row is decoded once for its G heads.
//   T: the body rows of every sequence, or body_lens int64 [B] (each sequence's own count; no mask then).
//   mask: bool [B, >= P + T] (row stride mask_stride), true = attend, or nullptr (attend to all P + T); a row
//   that masks everything gets zeros. A preallocated cache passes T = the filled body rows and its padding mask.
void kv_decode_attention_static(const void* q, FloatType qt, int64_t B, int64_t Hq, int64_t D,
                                const void* prefix_k, const void* prefix_v, FloatType pt, int64_t prefix_batch,
                                int64_t P, const KVBody& body, int bits, const float* k_scale, const float* v_scale,
                                int64_t Hkv, int64_t T, const int64_t* body_lens, const bool* mask,
                                int64_t mask_stride, float sm_scale, void* out, Isa isa);

// 1 / sqrt(mean(x[0:n]^2) + eps), the sum of squares in double (float_ops.cpp; HF's RMSNorm's factor).
float rms_inv(const float* x, int64_t n, float eps);

// SiLU(g) * up in place, fp32 [n] (float_ops.cpp; the decode layer's MLP): g[i] = g[i] / (1 + e^-g[i]) * up[i],
// torch's silu formula; with a vector exp on the x86 tables (within 2e-7 relative of expf's), else expf.
void silu_mul(float* g, const float* up, int64_t n, Isa isa);

// HF's RMSNorm over `rows` contiguous rows of n (float_ops.cpp): out = to_t(w * to_t(x * rms_inv(x))), the products
// in fp32; x [rows, n], w [n] and out [rows, n] all of type t (rounded twice in a bf16 / fp16 model, as the module).
void rms_norm_rows(const void* x, const void* w, FloatType t, int64_t rows, int64_t n, float eps, void* out, Isa isa);
// HF's apply_rotary_pos_emb on one of q / k (float_ops.cpp; models/float_ops.py), with its roundings: out =
// x cos + rotate_half(x) sin, each product and the sum rounded to type t. x [B, H, T, D] at element strides (xb, xh,
// xt, 1); cos / sin [B or 1, T, D] contiguous (cb: their batch stride, T D or 0); out [B, H, T, D] contiguous; D even.
void rope_rows(const void* x, int64_t xb, int64_t xh, int64_t xt, const void* cos, const void* sin, int64_t cb,
               FloatType t, int64_t B, int64_t H, int64_t T, int64_t D, void* out, Isa isa);

// Prefill attention over [prefix | prompt] (attention.cpp; models/prefix_attention.py): q [B, Hq, T, D], k / v
// [B, Hkv, P + T, D] (the P prefix keys first), all of type t, contiguous; out [B, T, Hq, D] of type t =
// softmax(q k^T scale) v with query t attending to keys 0 .. P + t. Hq a multiple of Hkv, T >= 1.
void prefix_causal_attention(const void* q, const void* k, const void* v, FloatType t, int64_t B, int64_t Hq,
                             int64_t Hkv, int64_t T, int64_t P, int64_t D, float scale, void* out, Isa isa);
// Whether isa's table has the attention blocks (else prefix_causal_attention runs portable ones, slower than SDPA).
bool attention_blocks(Isa isa);

// The new tokens' K and V quantized into a paged static cache (vLLM's: uint8 [blocks, H, block_size, 2 * row],
// a token-head's K codes then its V codes, row = D / 2 (bits 4, packed as kv_quantize_static packs) or D (bits 8)):
//   k / v [T, H, D] type xt, element (t, h, d) of k at t * ks_t + h * ks_h + d, of v at t * vs_t + h * vs_h + d;
//   slots int64 [T]: token t goes to block slots[t] / block_size, offset slots[t] % block_size; < 0: skipped;
//   k_scale / v_scale fp32 [H]; k_offset fp32 [H, D] or nullptr: K - k_offset[h] in fp32, rounded to xt, is what
//   is quantized (the cache's k_center, as transform_keys computes it). Parallel over (token, head, K / V).
void kv_write_paged_static(const void* k, int64_t ks_t, int64_t ks_h, const void* v, int64_t vs_t, int64_t vs_h,
                           FloatType xt, int64_t T, int64_t H, int64_t D, const int64_t* slots, const float* k_scale,
                           const float* v_scale, const float* k_offset, int bits, uint8_t* cache, int64_t block_size,
                           Isa isa);

// ---- GEMM with fused quantize and dequant ------------------------------------------------------------
// y[m, n] = a_scale(m) * w_scale[n] * sum_k A[m, k] * W[n, k]  (+ bias[n]),  exact int32 accumulation.
// A arrives in one of three forms; a float A is quantized while the kernel packs it (static scale:
// an elementwise map, no pass over the data beforehand) or per token (the dynamic baseline).
enum class ASource : int {
  kPacked4 = 0,  // uint8 [M, K/2], already quantized, a_scale given
  kInt8 = 1,     // int8  [M, K],   already quantized, a_scale given
  kFloat = 2,    // float [M, K] of type a_float_type, quantized to a_bits inside the GEMM
};

struct GemmArgs {
  int64_t M = 0, N = 0, K = 0;            // problem size; K even when either operand is 4-bit
  ASource a_source = ASource::kPacked4;
  const void* a = nullptr;                // see ASource
  FloatType a_float_type = FloatType::kFloat32;
  int a_bits = 4;                         // 4 or 8 (for kFloat: the bits to quantize to)
  const float* a_scale = nullptr;         // fp32 [M] if a_scale_per_row, else fp32 [1]; nullptr with
  bool a_scale_per_row = false;           //   kFloat means dynamic per-token quantization
  const void* w = nullptr;                // w_bits 4: uint8 [N, K/2];  w_bits 8: int8 [N, K]
  int w_bits = 4;
  const float* w_scale = nullptr;         // fp32 [N], per output channel
  const float* bias = nullptr;            // fp32 [N] or nullptr
  void* out = nullptr;                    // [M, N] of out_type
  FloatType out_type = FloatType::kFloat32;
};
void gemm(const GemmArgs& args, Isa isa);
// n GEMMs over the same float A (the q|k|v or gate|up projections of one input; same M, K, a_bits, w_bits): at
// decode (M == 1) one parallel region over the W tiles of all n, and A quantized once per distinct static scale;
// otherwise gemm() n times. Each out equals gemm(args[i]) bit for bit.
void gemm_shared_a(const GemmArgs* args, int n, Isa isa);

// ---- one decoder layer of a decode step ----------------------------------------------------------------
// A static quantized linear of the layer: y = quant_linear(x, w, w_scale, a_scale (static), a_bits, bias).
struct LayerLinear {
  const void* w = nullptr;          // w_bits 4: uint8 [N, K/2];  w_bits 8: int8 [N, K]
  int w_bits = 4, a_bits = 4;
  const float* w_scale = nullptr;   // fp32 [N]
  float a_scale = 1.0f;             // the static per-tensor activation scale, finite and > 0
  const float* bias = nullptr;      // fp32 [N] or nullptr
  int64_t N = 0, K = 0;
};

// A Llama / Qwen2 / Qwen3 decoder layer for one new token per sequence over a static preallocated cache, as the
// model's eager forward computes it (decode_layer.cpp): every tensor fp32 unless said otherwise, rows contiguous.
struct DecodeLayerArgs {
  int64_t B = 0, H = 0, Hq = 0, Hkv = 0, D = 0, I = 0;  // sequences, hidden, q heads, kv heads, head dim, MLP width
  const void* x = nullptr;          // [B, H] the residual stream in, of type xt
  FloatType xt = FloatType::kFloat32;  // x's and out's type: the layer computes in fp32, rounds its output once
  const void* cos = nullptr;        // [B, D] RoPE at each sequence's position, of type ct (row stride cos_stride:
  const void* sin = nullptr;        //   D, or 0 when all sequences share one position)
  FloatType ct = FloatType::kFloat32;
  int64_t cos_stride = 0;
  const float* norm1 = nullptr;     // [H] input RMSNorm weight
  float eps1 = 1e-6f;
  LayerLinear q, k, v;              // N = Hq*D, Hkv*D, Hkv*D; K = H
  const float* q_norm = nullptr;    // [D] Qwen3's per-head RMSNorm on q and k before RoPE, or nullptr
  const float* k_norm = nullptr;    // [D]
  float qk_eps = 1e-6f;
  const float* key_rotation = nullptr;  // [D, D]: q and k (after RoPE) -> x @ R, or nullptr
  const float* key_offset = nullptr;    // [Hkv, D]: k -= offset[h] after the rotation (key centering), or nullptr
  void* k_cache = nullptr;          // the body buffers: uint8 [.., capacity, D/2] (kv_bits 4) or int8 [.., D];
  void* v_cache = nullptr;          //   row (b, h, t) at (b * cache_sb + h * cache_sh + t) rows
  int64_t cache_sb = 0, cache_sh = 0;
  int kv_bits = 4;
  int64_t pos = 0;                  // filled body rows: the new K/V go to row pos, attention reads pos + 1
  const float* k_scale = nullptr;   // [Hkv]
  const float* v_scale = nullptr;   // [Hkv]
  const void* prefix_k = nullptr;   // [prefix_batch, Hkv, P, D] of type pt, or nullptr with P = 0
  const void* prefix_v = nullptr;
  FloatType pt = FloatType::kFloat32;
  int64_t prefix_batch = 1, P = 0;
  const bool* mask = nullptr;       // bool [B, >= P + pos + 1] (stride mask_stride), true = attend, or nullptr
  int64_t mask_stride = 0;
  float sm_scale = 1.0f;
  LayerLinear o;                    // N = H, K = Hq*D
  const float* norm2 = nullptr;     // [H] post-attention RMSNorm weight
  float eps2 = 1e-6f;
  LayerLinear gate, up;             // N = I, K = H
  const float* down_signs = nullptr;  // [I]: down's input -> hadamard(x * signs) (RotatedLinear), or nullptr
  const float* had_m = nullptr;       // [had_n, had_n] +-1: the H_m of I = had_n * 2^p (hadamard.py's factor)
  int64_t had_n = 1;
  LayerLinear down;                 // N = H, K = I
  void* out = nullptr;              // [B, H] the residual stream out, of type xt (may not alias x)
};
void decode_layer(const DecodeLayerArgs& args, Isa isa);

// x float [n] <- (H_m (x) H_{2^p}) x / sqrt(n) in place, n = m 2^p (hadamard.py's hadamard_factor); hm float [m, m]
// of +-1, row-major (H_m^T for the inverse transform); tmp float [n] scratch (unused when m = 1). Bit-identical to
// hadamard.py's "sequential" form and to the CUDA kernel in fp32 (hadamard.cpp).
void hadamard(float* x, int64_t n, const float* hm, int64_t m, float* tmp);

// ---- benchmark only ------------------------------------------------------------------------------------
// The int8 multiply-accumulate peak of `isa` on all parallel_for threads, measured for `seconds`: a throughput loop
// of vpdpbusd zmm (avx512vnni) / vpdpbusd ymm (avxvnni) / vpmaddubsw ymm (avx2), in int ops (2 per MAC) / s / 1e12;
// 0 for scalar or an ISA this CPU lacks (peak.cpp).
double int8_peak_tops(Isa isa, double seconds);

}  // namespace cpu
}  // namespace pqk
