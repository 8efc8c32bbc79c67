"""The pqk:: custom ops: schemas and fake (meta) implementations, declared once here.

Backends supply the real implementations per device: csrc/cpu/torch_ops.cpp registers the CPU kernels
(TORCH_LIBRARY_IMPL(pqk, CPU, ...)) when prefixquant_kernels._C is imported — which happens at the end of
this module, after the schemas exist; ops/cuda_ops.py registers the CUDA ones, ops/kv.py the KV ops' single
implementation. torch.compile and torch.export see each op as one node and trace it
with the fake, which only allocates the output.

cpu_isa (the CPU kernels' code path; backend.CPU_ISAS maps backend= to it; tests force each to compare them):
  -1 best for this CPU, 0 portable scalar ("cpu:scalar"), 1 AVX2 ("cpu:avx2"), 2 AVX2 with the W4 tile on AVX-VNNI
  vpdpbusd ("cpu:avxvnni"), 3 the same on AVX512-VNNI, EVEX encoding ("cpu:avx512vnni"), 4 that with the prefill
  GEMM on AMX tiles ("cpu:amx").
"""
from __future__ import annotations

import torch

LIB = torch.library.Library("pqk", "DEF")

LIB.define("pack_int4(Tensor q) -> Tensor")
LIB.define("unpack_int4(Tensor packed) -> Tensor")
LIB.define("quantize_static(Tensor x, Tensor scale, int bits, int cpu_isa=-1) -> Tensor")
LIB.define("quantize_per_token(Tensor x, int bits, int cpu_isa=-1) -> (Tensor, Tensor)")
LIB.define(
    "int4_matmul(Tensor a, Tensor w, Tensor a_scale, Tensor w_scale, Tensor? bias, ScalarType out_dtype, "
    "int cpu_isa=-1) -> Tensor"
)
LIB.define(
    "quant_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? a_scale, int a_bits, Tensor? bias, "
    "int cpu_isa=-1) -> Tensor"
)
# quant_linear of n weights over one x (the q|k|v or gate|up projections of a layer's input): out[i] equals
# quant_linear(x, w[i], w_scale[i], a_scale[i], a_bits, bias[i], cpu_isa) bit for bit. The CPU kernel runs a decode
# step's n GEMVs in one parallel region (gemm_shared_a); other devices loop over quant_linear. Inserted by the
# compiled step's graph pass (models/graph_passes.py), not called by modules.
LIB.define(
    "quant_linear_multi(Tensor x, Tensor[] w, Tensor[] w_scale, Tensor?[] a_scale, int a_bits, Tensor?[] bias, "
    "int cpu_isa=-1) -> Tensor[]"
)

LIB.define(
    "int4_matmul_requant(Tensor a, Tensor w, Tensor a_scale, Tensor w_scale, Tensor? bias, float out_scale, "
    "int cpu_isa=-1) -> Tensor"
)
LIB.define(
    "int4_matmul_silu_mul_requant(Tensor a, Tensor w, Tensor a_scale, Tensor w_scale, Tensor? bias, "
    "float out_scale, int cpu_isa=-1) -> Tensor"
)

# The gated MLP's gate|up GEMM on the float input: quantize_static(x, a_scale, 4) then int4_matmul_silu_mul_requant,
# as one op (CUDA: one launch, the quantize in the GEMM's A load).
LIB.define(
    "quant_linear_silu_mul_requant(Tensor x, Tensor w, Tensor w_scale, Tensor a_scale, Tensor? bias, float out_scale, "
    "int cpu_isa=-1) -> Tensor"
)

LIB.define("rmsnorm_quantize(Tensor x, Tensor weight, Tensor scale, int bits, float eps, bool return_normed) "
           "-> (Tensor, Tensor)")
LIB.define("hadamard_transform(Tensor x, bool inverse) -> Tensor")

LIB.define(
    "kv_dequant_static(Tensor? prefix, Tensor body, Tensor scale, int bits, ScalarType out_dtype, int cpu_isa=-1) "
    "-> Tensor"
)
LIB.define("kv_quantize_static(Tensor x, Tensor scale, int bits, int cpu_isa=-1) -> Tensor")
LIB.define(
    "kv_decode_static(Tensor q, Tensor? prefix_k, Tensor? prefix_v, Tensor k_body, Tensor v_body, Tensor k_scale, "
    "Tensor v_scale, int bits, float sm_scale, int cpu_isa=-1, Tensor? body_len=None, Tensor? mask=None) -> Tensor"
)
# The static body in a paged cache (vLLM's uint8 [blocks, H, block_size, 2 * row]: a token-head's K codes, then its
# V codes): the new tokens written into their slots, and decode attention reading the pages through the block
# table. csrc/cpu/kernels.h (KVBody, kv_write_paged_static); the public ops: ops/kv.py.
LIB.define(
    "kv_write_paged_static(Tensor key, Tensor value, Tensor(a!) cache, Tensor slot_mapping, Tensor k_scale, "
    "Tensor v_scale, int bits, Tensor? key_offset=None, int cpu_isa=-1) -> ()"
)
LIB.define(
    "kv_decode_paged_static(Tensor q, Tensor? prefix_k, Tensor? prefix_v, Tensor cache, Tensor block_table, "
    "Tensor seq_lens, Tensor k_scale, Tensor v_scale, int bits, float sm_scale, int cpu_isa=-1) -> Tensor"
)


# One decoder layer (Llama / Qwen2 / Qwen3) of a decode step on the CPU, over a static preallocated cache: x float32,
# bfloat16 or float16 [B, 1, hidden] -> the layer's output [B, 1, hidden] in x's dtype (cos / sin float32 or x's);
# the new token's K/V written (quantized) into row `length` of k_cache / v_cache. `layer`: the slot its module-side
# tensors were registered in (models/decode_layer.py, outside the traced step). The cache side: k_scale / v_scale
# [Hkv], the prefix [1 or B, Hkv, P, D] or None, the cache's key_rotation [D, D] (q rotated too) and key_offset
# [Hkv, D] or None, mask bool [B, >= P + length + 1] or None.
# The caller advances length: were the op to mutate it, inductor may recompute a later layer's RoPE / mask from it
# after this call (seen in torch 2.13: a fused kernel that re-read layer 0's advanced length for layer 1's
# positions), while an in-graph add_ is ordered with its readers. csrc/cpu/decode_layer.cpp.
# Prefill attention over [prefix | prompt] on the CPU (models/prefix_attention.py): q [B, H_q, T, D], k / v
# [B, H_kv, prefix_len + T, D] of q's dtype -> [B, T, H_q, D]; query t attends to keys 0 .. prefix_len + t.
# csrc/cpu/attention.cpp.
LIB.define(
    "prefix_causal_attention(Tensor q, Tensor k, Tensor v, int prefix_len, float scale, int cpu_isa=-1) -> Tensor"
)
# HF's RMSNorm with its roundings (ops/transform.py rms_norm; csrc/cpu/float_ops.cpp): x [..., N] float, weight [N]
# of x's dtype -> x's shape and dtype.
LIB.define("rms_norm(Tensor x, Tensor weight, float eps, int cpu_isa=-1) -> Tensor")
# HF's apply_rotary_pos_emb on one of q / k (ops/transform.py rope; csrc/cpu/float_ops.cpp): x [B, H, T, D], cos /
# sin [B or 1, T, D] of x's dtype -> [B, H, T, D] contiguous.
LIB.define("rope(Tensor x, Tensor cos, Tensor sin, int cpu_isa=-1) -> Tensor")
LIB.define(
    "decode_layer(Tensor x, Tensor cos, Tensor sin, Tensor? mask, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor length, Tensor k_scale, Tensor v_scale, Tensor? prefix_k, Tensor? prefix_v, Tensor? key_rotation, "
    "Tensor? key_offset, int layer) -> Tensor"
)
# A contiguous copy that inductor cannot fuse into its readers: the compiled CPU decode step's attention mask, made
# once per step (models/attention.py, _step_mask) and read by every layer's decode_layer. Without it inductor
# recomputes the mask (a compare over the cache's capacity) into each layer's input: a parallel kernel per layer.
LIB.define("materialize(Tensor x) -> Tensor")


def _quantized_shape(x: torch.Tensor, bits: int) -> tuple[list[int], torch.dtype]:
    if bits == 4:
        return [*x.shape[:-1], x.shape[-1] // 2], torch.uint8
    return list(x.shape), torch.int8


@torch.library.register_fake("pqk::pack_int4")
def _pack_int4_fake(q):
    return q.new_empty([*q.shape[:-1], q.shape[-1] // 2], dtype=torch.uint8)


@torch.library.register_fake("pqk::unpack_int4")
def _unpack_int4_fake(packed):
    return packed.new_empty([*packed.shape[:-1], packed.shape[-1] * 2], dtype=torch.int8)


@torch.library.register_fake("pqk::int4_matmul_requant")
def _int4_matmul_requant_fake(a, w, a_scale, w_scale, bias, out_scale, cpu_isa=-1):
    return a.new_empty([a.shape[0], w.shape[0] // 2], dtype=torch.uint8)


@torch.library.register_fake("pqk::int4_matmul_silu_mul_requant")
def _int4_matmul_silu_mul_requant_fake(a, w, a_scale, w_scale, bias, out_scale, cpu_isa=-1):
    return a.new_empty([a.shape[0], w.shape[0] // 4], dtype=torch.uint8)


@torch.library.register_fake("pqk::quant_linear_silu_mul_requant")
def _quant_linear_silu_mul_requant_fake(x, w, w_scale, a_scale, bias, out_scale, cpu_isa=-1):
    return x.new_empty([x.shape[0], w.shape[0] // 4], dtype=torch.uint8)


@torch.library.register_fake("pqk::quantize_static")
def _quantize_static_fake(x, scale, bits, cpu_isa=-1):
    shape, dtype = _quantized_shape(x, bits)
    return x.new_empty(shape, dtype=dtype)


@torch.library.register_fake("pqk::quantize_per_token")
def _quantize_per_token_fake(x, bits, cpu_isa=-1):
    shape, dtype = _quantized_shape(x, bits)
    return x.new_empty(shape, dtype=dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("pqk::int4_matmul")
def _int4_matmul_fake(a, w, a_scale, w_scale, bias, out_dtype, cpu_isa=-1):
    return a.new_empty([a.shape[0], w.shape[0]], dtype=out_dtype)


@torch.library.register_fake("pqk::quant_linear")
def _quant_linear_fake(x, w, w_scale, a_scale, a_bits, bias, cpu_isa=-1):
    return x.new_empty([x.shape[0], w.shape[0]], dtype=x.dtype)


@torch.library.register_fake("pqk::quant_linear_multi")
def _quant_linear_multi_fake(x, w, w_scale, a_scale, a_bits, bias, cpu_isa=-1):
    return [x.new_empty([x.shape[0], wi.shape[0]], dtype=x.dtype) for wi in w]


@torch.library.impl(LIB, "quant_linear_multi", "CompositeExplicitAutograd")
def _quant_linear_multi_loop(x, w, w_scale, a_scale, a_bits, bias, cpu_isa=-1):
    """Every device without its own kernel (CUDA): one quant_linear per weight."""
    return [torch.ops.pqk.quant_linear(x, *args, a_bits, b, cpu_isa) for *args, b in zip(w, w_scale, a_scale, bias)]


@torch.library.register_fake("pqk::kv_dequant_static")
def _kv_dequant_static_fake(prefix, body, scale, bits, out_dtype, cpu_isa=-1):
    b, h, t, db = body.shape
    p = 0 if prefix is None else prefix.shape[2]
    return body.new_empty([b, h, p + t, db * (2 if bits == 4 else 1)], dtype=out_dtype)


@torch.library.register_fake("pqk::rmsnorm_quantize")
def _rmsnorm_quantize_fake(x, weight, scale, bits, eps, return_normed):
    shape, dtype = _quantized_shape(x, bits)
    return x.new_empty(shape, dtype=dtype), x.new_empty(list(x.shape) if return_normed else [0])


@torch.library.register_fake("pqk::hadamard_transform")
def _hadamard_transform_fake(x, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pqk::kv_quantize_static")
def _kv_quantize_static_fake(x, scale, bits, cpu_isa=-1):
    return x.new_empty([*x.shape[:-1], x.shape[-1] // 2 if bits == 4 else x.shape[-1]],
                       dtype=torch.uint8 if bits == 4 else torch.int8)


@torch.library.register_fake("pqk::kv_decode_static")
def _kv_decode_static_fake(q, prefix_k, prefix_v, k_body, v_body, k_scale, v_scale, bits, sm_scale, cpu_isa=-1,
                           body_len=None, mask=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("pqk::kv_write_paged_static")
def _kv_write_paged_static_fake(key, value, cache, slot_mapping, k_scale, v_scale, bits, key_offset=None,
                                cpu_isa=-1):
    return None


@torch.library.register_fake("pqk::kv_decode_paged_static")
def _kv_decode_paged_static_fake(q, prefix_k, prefix_v, cache, block_table, seq_lens, k_scale, v_scale, bits,
                                 sm_scale, cpu_isa=-1):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("pqk::prefix_causal_attention")
def _prefix_causal_attention_fake(q, k, v, prefix_len, scale, cpu_isa=-1):
    b, hq, t, d = q.shape
    return q.new_empty(b, t, hq, d)


@torch.library.register_fake("pqk::rms_norm")
def _rms_norm_fake(x, weight, eps, cpu_isa=-1):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.impl(LIB, "materialize", "CompositeExplicitAutograd")
def _materialize(x):
    return x.clone(memory_format=torch.contiguous_format)


@torch.library.register_fake("pqk::materialize")
def _materialize_fake(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pqk::rope")
def _rope_fake(x, cos, sin, cpu_isa=-1):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pqk::decode_layer")
def _decode_layer_fake(x, *args, **kwargs):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- KV-cache ops (ops/kv.py). One implementation each, registered by ops/kv.py for every device
# (CompositeExplicitAutograd); it runs the backend named by `backend` ("reference" | "triton" | "cpu"), which the
# public wrapper has already resolved (ops/backend.py) and validated. Arguments and shapes: the docstrings in ops/kv.py.

LIB.define("kv_quantize(Tensor x, Tensor scale, int bits, str backend) -> Tensor")
LIB.define(
    "kv_quantize_groupwise(Tensor x, int bits, int group_size, str axis, str backend) -> (Tensor, Tensor, Tensor)"
)
LIB.define(
    "kv_dequant_concat(Tensor? prefix, Tensor packed, Tensor scale, Tensor? zero, int bits, int group_size, "
    "str? axis, Tensor? tail, Tensor? body_pos, Tensor? tail_pos, ScalarType out_dtype, str backend) -> Tensor"
)
LIB.define(
    "kv_decode_attention(Tensor q, Tensor prefix_k, Tensor prefix_v, Tensor k_packed, Tensor v_packed, "
    "Tensor k_scale, Tensor v_scale, int bits, float sm_scale, str backend, Tensor? body_len=None, "
    "Tensor? mask=None) -> Tensor"
)
LIB.define(
    "kv_write_paged(Tensor key, Tensor value, Tensor(a!) cache, Tensor slot_mapping, Tensor k_scale, Tensor v_scale, "
    "int bits, Tensor? key_offset, str backend) -> ()"
)
LIB.define(
    "kv_decode_paged(Tensor q, Tensor prefix_k, Tensor prefix_v, Tensor cache, Tensor block_table, Tensor seq_lens, "
    "Tensor k_scale, Tensor v_scale, int bits, float sm_scale, str backend) -> Tensor"
)


@torch.library.register_fake("pqk::kv_quantize")
def _kv_quantize_fake(x, scale, bits, backend):
    shape, dtype = _quantized_shape(x, bits)
    return x.new_empty(shape, dtype=dtype)


@torch.library.register_fake("pqk::kv_quantize_groupwise")
def _kv_quantize_groupwise_fake(x, bits, group_size, axis, backend):
    b, h, t, d = x.shape
    sz = [b, h, t // group_size, d] if axis == "channel" else [b, h, t, d // group_size]
    return (x.new_empty([b, h, t, d * bits // 8], dtype=torch.uint8), x.new_empty(sz, dtype=torch.float16),
            x.new_empty(sz, dtype=torch.float16))


@torch.library.register_fake("pqk::kv_dequant_concat")
def _kv_dequant_concat_fake(prefix, packed, scale, zero, bits, group_size, axis, tail, body_pos, tail_pos,
                            out_dtype, backend):
    b, h, nq, nbytes = packed.shape
    p = 0 if prefix is None else prefix.shape[2]
    nt = 0 if tail is None else tail.shape[2]
    return packed.new_empty([b, h, p + nq + nt, nbytes * 8 // bits], dtype=out_dtype)


@torch.library.register_fake("pqk::kv_decode_attention")
def _kv_decode_attention_fake(q, prefix_k, prefix_v, k_packed, v_packed, k_scale, v_scale, bits, sm_scale,
                              backend, body_len=None, mask=None):
    return q.new_empty(q.shape)  # contiguous, like both implementations


@torch.library.register_fake("pqk::kv_write_paged")
def _kv_write_paged_fake(key, value, cache, slot_mapping, k_scale, v_scale, bits, key_offset, backend):
    return None


@torch.library.register_fake("pqk::kv_decode_paged")
def _kv_decode_paged_fake(q, prefix_k, prefix_v, cache, block_table, seq_lens, k_scale, v_scale, bits, sm_scale,
                          backend):
    return q.new_empty(q.shape)


from .. import _extension  # noqa: E402,F401  (registers the CPU kernels; must follow the schemas)
