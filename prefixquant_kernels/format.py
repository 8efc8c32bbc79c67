"""The int4/int8 format and quantization convention — in plain PyTorch, the definition every backend
matches bit for bit (csrc/common/quant_math.h is its C++ transcription).

Quantization (symmetric, signed, b = 4 or 8)::

    q = clamp(round_half_to_even(x / scale), -2**(b-1), 2**(b-1) - 1)

computed in float32 (``x.float() / scale``). Non-finite inputs saturate: ``+Inf -> qmax``,
``-Inf -> qmin``, ``NaN -> 0``.

Dynamic per-token scale (the baseline PrefixQuant removes): ``scale = max|x_row| / qmax`` over the
row's *finite* values (a NaN/Inf does not poison its row's scale); a row with no finite non-zero
value gets ``scale = 1``.

int4 packing: two values per byte along the last dim; element ``2i`` in the LOW nibble of byte ``i``,
element ``2i+1`` in the HIGH nibble (CUTLASS ``int4b_t`` order). The packed last dim is ``K // 2``.

Dequantization of an integer product (the GEMM epilogue), in float32 and in this order::

    y = acc.float() * (a_scale * w_scale) + bias
"""
from __future__ import annotations

import torch

__all__ = [
    "qmin",
    "qmax",
    "pack_int4",
    "unpack_int4",
    "quantize",
    "per_token_scale",
    "FLOAT_DTYPES",
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def qmin(bits: int) -> int:
    return -(1 << (bits - 1))


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [..., K] with values in [-8, 7] (K even) -> uint8 [..., K // 2]."""
    lo = q[..., 0::2].to(torch.uint8) & 0x0F
    hi = q[..., 1::2].to(torch.uint8) & 0x0F
    return lo | (hi << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> int8 [..., K] (sign-extended nibbles)."""
    lo = (p & 0x0F).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    q = torch.stack([lo, hi], dim=-1).flatten(-2)
    return q - ((q & 0x08) << 1)  # nibble >= 8 is negative: subtract 16


def quantize(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """float [..., K] -> int8 [..., K] (unpacked). scale: scalar or a tensor broadcastable to x."""
    v = x.float() / (scale if isinstance(scale, torch.Tensor) else torch.tensor(scale, dtype=torch.float32))
    v = torch.nan_to_num(v, nan=0.0)  # +-Inf -> +-max float, clamped below
    return torch.round(v).clamp_(qmin(bits), qmax(bits)).to(torch.int8)


def per_token_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float [..., K] -> float32 [...]: max |x| over the finite values of each row, / qmax (1 if 0)."""
    ax = x.float().abs()
    amax = torch.where(torch.isfinite(ax), ax, torch.zeros((), dtype=torch.float32)).amax(dim=-1)
    return torch.where(amax > 0, amax / qmax(bits), torch.ones((), dtype=torch.float32))


def interleave_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[I, ...] and [I, ...] -> [2I, ...] with row 2j = gate[j], row 2j+1 = up[j]: the weight (and w_scale / bias)
    layout of int4_matmul_silu_mul_requant, whose epilogue finds gate_j and up_j in one thread's accumulator pair."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"interleave_rows: gate and up must have the same shape and dtype, got {tuple(gate.shape)} "
                         f"{gate.dtype} and {tuple(up.shape)} {up.dtype}")
    return torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])
