"""Public format and activation-quantization ops: pack_int4, unpack_int4, quantize_static,
quantize_per_token. Validation -> backend choice -> reference or torch.ops.pqk kernel."""
from __future__ import annotations

import torch

from .. import format as fmt
from .. import reference
from . import checks
from . import library  # noqa: F401  (defines torch.ops.pqk.*)
from .backend import resolve


def pack_int4(q: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """int8 [..., K] with values in [-8, 7], K even -> uint8 [..., K // 2].

    Element 2i goes to the low nibble of byte i, element 2i+1 to the high nibble (CUTLASS int4b_t order).
    Raises ValueError for values outside [-8, 7] (they would be silently truncated otherwise); the values are read
    on CPU tensors only (no device read, no host sync: a GPU tensor's are the caller's to keep in range).
    """
    op = "pack_int4"
    checks.tensor(q, "q", op, (torch.int8,))
    checks.even_last_dim(q, "q", op)
    checks.int4_range(q, "q", op)
    be = resolve(backend, q.device, op)
    if be.kind == "reference":
        return fmt.pack_int4(q)
    return torch.ops.pqk.pack_int4(q.contiguous())


def unpack_int4(packed: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """uint8 [..., K // 2] -> int8 [..., K] in [-8, 7] (inverse of pack_int4)."""
    op = "unpack_int4"
    checks.tensor(packed, "packed", op, (torch.uint8,))
    be = resolve(backend, packed.device, op)
    if be.kind == "reference":
        return fmt.unpack_int4(packed)
    return torch.ops.pqk.unpack_int4(packed.contiguous())


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> contiguous [M, K] (a view when x is already contiguous; x itself when already [M, K])."""
    if x.dim() == 2 and x.is_contiguous():
        return x
    return x.reshape(-1, x.shape[-1]).contiguous()


def _unrows(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[M, K'] -> [..., K'] with x's leading dims (out itself when x was 2-D)."""
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


def quantize_static(x: torch.Tensor, scale, bits: int = 4, *, backend: str = "auto") -> torch.Tensor:
    """Quantize with one static per-tensor scale: an elementwise map, no reduction over the data.

    Args:
        x: float32/bfloat16/float16 [..., K] (K even for bits=4).
        scale: the static scale, a Python number or a 1-element tensor; finite and > 0.
        bits: 4 -> packed uint8 [..., K // 2];  8 -> int8 [..., K].
    NaN maps to 0, +-Inf saturate to the int range (see prefixquant_kernels.format).
    """
    op = "quantize_static"
    checks.activation(x, bits, op)
    s = checks.static_scale(scale, "scale", op, x.device)
    be = resolve(backend, x.device, op)
    x2 = _rows(x)
    if be.kind == "reference":
        out = reference.quantize_static(x2, s, bits)
    else:
        out = torch.ops.pqk.quantize_static(x2, s, bits, be.cpu_isa)
    return _unrows(out, x)


def quantize_per_token(x: torch.Tensor, bits: int = 4, *, backend: str = "auto"):
    """Dynamic per-token quantization (the baseline static scales replace).

    Returns (q, scales): q as in quantize_static, scales float32 [M] with M = the product of x's leading
    dims; scale = max |x_row| over finite values / qmax (1 for an all-zero row).
    """
    op = "quantize_per_token"
    checks.activation(x, bits, op)
    be = resolve(backend, x.device, op)
    x2 = _rows(x)
    if be.kind == "reference":
        q, s = reference.quantize_per_token(x2, bits)
    else:
        q, s = torch.ops.pqk.quantize_per_token(x2, bits, be.cpu_isa)
    return _unrows(q, x), s
