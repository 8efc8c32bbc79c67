"""The op layer: every public op validates its arguments (checks.py), picks a backend (backend.py) and calls either
the PyTorch reference or a torch.ops.pqk custom op (schemas and fakes in library.py; CPU kernels in csrc/cpu, CUDA
kernels in cuda_ops.py over cuda_library.py, Triton kernels in prefixquant_kernels/triton)."""
from . import cuda_ops  # noqa: F401  (registers the CUDA implementations of the pqk:: ops)
from .backend import available_backends
from .linear import (int4_matmul, int4_matmul_requant, int4_matmul_silu_mul_requant, quant_linear,
                     quant_linear_silu_mul_requant)
from .quantize import pack_int4, quantize_per_token, quantize_static, unpack_int4
from .transform import hadamard_transform, rms_norm, rmsnorm_quantize, rope

__all__ = [
    "available_backends",
    "hadamard_transform",
    "int4_matmul",
    "int4_matmul_requant",
    "int4_matmul_silu_mul_requant",
    "pack_int4",
    "quant_linear",
    "quant_linear_silu_mul_requant",
    "quantize_per_token",
    "quantize_static",
    "rms_norm",
    "rmsnorm_quantize",
    "rope",
    "unpack_int4",
]
