"""The pqk:: custom ops: schemas and fake (meta) implementations, declared once here.

Backends supply the real implementations per device: csrc/cpu/torch_ops.cpp registers the CPU kernels
(TORCH_LIBRARY_IMPL(pqk, CPU, ...)) when prefixquant_kernels._C is imported — which happens at the end of
this module, after the schemas exist. torch.compile and torch.export see each op as one node and trace it
with the fake, which only allocates the output.

cpu_isa: -1 = best for this CPU, 0 = portable scalar, 1 = AVX2 (tests force each to compare them).
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

LIB.define(
    "kv_dequant_static(Tensor? prefix, Tensor body, Tensor scale, int bits, ScalarType out_dtype, int cpu_isa=-1) "
    "-> Tensor"
)


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


@torch.library.register_fake("pqk::kv_dequant_static")
def _kv_dequant_static_fake(prefix, body, scale, bits, out_dtype, cpu_isa=-1):
    b, h, t, db = body.shape
    p = 0 if prefix is None else prefix.shape[2]
    return body.new_empty([b, h, p + t, db * (2 if bits == 4 else 1)], dtype=out_dtype)


from .. import _extension  # noqa: E402,F401  (registers the CPU kernels; must follow the schemas)
