"""prefixquant_kernels: kernels for statically quantized LLMs (PrefixQuant).

    import prefixquant_kernels as pqk
    p = pqk.pack_int4(q)                         # int8 [..., K] in [-8, 7] -> uint8 [..., K // 2]
    a = pqk.quantize_static(x, 0.05, bits=4)     # static per-tensor scale: elementwise, fusable
    a, s = pqk.quantize_per_token(x, bits=4)     # the dynamic baseline
    y = pqk.int4_matmul(a, w, a_scale, w_scale, bias=None, out_dtype=torch.float16)
    lin = pqk.nn.QuantLinear.from_float(linear, w_bits=4, a_bits=4, act_scale=0.05)

Data flow of the source tree: format.py (the bit format) -> csrc/ (kernels) + reference.py -> ops/ (the
dispatching op layer, torch.library custom ops) -> nn/ (modules).
"""
from . import format, nn, ops, reference  # noqa: F401  (format shadows the builtin only as an attribute)
from .ops import (
    available_backends,
    int4_matmul,
    pack_int4,
    quant_linear,
    quantize_per_token,
    quantize_static,
    unpack_int4,
)

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "format",
    "int4_matmul",
    "nn",
    "ops",
    "pack_int4",
    "quant_linear",
    "quantize_per_token",
    "quantize_static",
    "reference",
    "unpack_int4",
]
