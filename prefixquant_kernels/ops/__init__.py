"""The op layer: every public op validates its arguments, picks a backend (backend.py) and calls either
the PyTorch reference or a torch.ops.pqk kernel (schemas and fakes in library.py)."""
from .backend import available_backends
from .linear import int4_matmul, int4_matmul_requant, int4_matmul_silu_mul_requant, quant_linear
from .quantize import pack_int4, quantize_per_token, quantize_static, unpack_int4
from .transform import hadamard_transform, rmsnorm_quantize

__all__ = [
    "available_backends",
    "hadamard_transform",
    "int4_matmul",
    "int4_matmul_requant",
    "int4_matmul_silu_mul_requant",
    "pack_int4",
    "quant_linear",
    "quantize_per_token",
    "quantize_static",
    "rmsnorm_quantize",
    "unpack_int4",
]
