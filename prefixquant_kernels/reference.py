"""Reference implementations of the ops, in plain PyTorch: the truth every backend is tested against.

Inputs are assumed validated (the op layer, prefixquant_kernels/ops, checks them). 2-D in, 2-D out.
"""
from __future__ import annotations

import torch

from . import format as fmt


def quantize_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """x float [M, K], scale float32 0-dim -> uint8 [M, K/2] (bits 4) or int8 [M, K] (bits 8)."""
    q = fmt.quantize(x, scale, bits)
    return fmt.pack_int4(q) if bits == 4 else q


def quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x float [M, K] -> (quantized as in quantize_static, scales float32 [M])."""
    s = fmt.per_token_scale(x, bits)
    q = fmt.quantize(x, s.unsqueeze(-1), bits)
    return (fmt.pack_int4(q) if bits == 4 else q), s


def int_matmul_exact(a_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K] -> int32 [M, N], exact.

    float64 represents every partial sum exactly (|sum| <= K * 2^14 < 2^53), so a float64 matmul is an
    exact integer matmul here — and far faster than torch's integer matmul on CPUs without VNNI.
    """
    return (a_q.double() @ w_q.double().T).to(torch.int32)


def _as_int8(t: torch.Tensor) -> torch.Tensor:
    return fmt.unpack_int4(t) if t.dtype == torch.uint8 else t


def dequant_epilogue(acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y = acc * (a_scale * w_scale) [+ bias] in float32, then cast. a_scale: 0-dim/[1] or [M]."""
    a_s = a_scale.reshape(-1, 1) if a_scale.numel() != 1 else a_scale.reshape(1, 1)
    y = acc.float() * (a_s * w_scale.reshape(1, -1))
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int4_matmul(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """a: uint8 [M, K/2] (int4) or int8 [M, K]; w: uint8 [N, K/2] or int8 [N, K] -> out_dtype [M, N]."""
    acc = int_matmul_exact(_as_int8(a), _as_int8(w))
    return dequant_epilogue(acc, a_scale, w_scale, bias, out_dtype)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SiLU(g) * u in float32 as the kernels compute it: g / (1 + exp(-g)) * u."""
    return g / (1.0 + torch.exp(-g)) * u


def int4_matmul_requant(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None, out_scale: float) -> torch.Tensor:
    """int4_matmul's fp32 value quantized with the next layer's static scale: uint8 [M, N/2] packed int4."""
    y = int4_matmul(a, w, a_scale, w_scale, bias, torch.float32)
    return fmt.pack_int4(fmt.quantize(y, torch.tensor(out_scale, dtype=torch.float32), 4))


def int4_matmul_silu_mul_requant(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                                 bias: torch.Tensor | None, out_scale: float) -> torch.Tensor:
    """w's rows interleave gate and up (row 2j = gate_j, 2j+1 = up_j; format.interleave_rows): y = int4_matmul fp32
    [M, N], h_j = silu(y[:, 2j]) * y[:, 2j+1] -> quantized with out_scale, uint8 [M, N/4] packed int4."""
    y = int4_matmul(a, w, a_scale, w_scale, bias, torch.float32)
    h = silu_mul(y[:, 0::2], y[:, 1::2])
    return fmt.pack_int4(fmt.quantize(h, torch.tensor(out_scale, dtype=torch.float32), 4))


def quant_linear_silu_mul_requant(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor,
                                  bias: torch.Tensor | None, out_scale: float) -> torch.Tensor:
    """x float [M, K] quantized to int4 with the static a_scale, then int4_matmul_silu_mul_requant: uint8 [M, N/4]."""
    a = fmt.pack_int4(fmt.quantize(x, a_scale, 4))
    return int4_matmul_silu_mul_requant(a, w, a_scale, w_scale, bias, out_scale)


def quant_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor | None,
                 a_bits: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x float [M, K] -> x.dtype [M, N]: quantize x (static if a_scale is given, else per token), then
    int4_matmul. The reference is unfused; the kernels must give the same bits."""
    if a_scale is None:
        s = fmt.per_token_scale(x, a_bits)
        a_q = fmt.quantize(x, s.unsqueeze(-1), a_bits)
    else:
        s = a_scale
        a_q = fmt.quantize(x, a_scale, a_bits)
    acc = int_matmul_exact(a_q, _as_int8(w))
    return dequant_epilogue(acc, s, w_scale, bias, x.dtype)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x float [M, K], weight float [K] -> fp32 [M, K]: x / sqrt(mean(x^2) + eps) * weight, all in fp32, never
    rounded: what the fused rmsnorm_quantize quantizes. (rms_norm below is the model's module, with its roundings.)"""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm (Qwen2/3, Mistral, Phi-3 alike), op for op: x in fp32 times
    rsqrt(mean(x^2) + eps), rounded to x.dtype, times weight (rounded again in a bf16 / fp16 model): what pqk::rms_norm
    computes. (rmsnorm above is the all-fp32 form the fused rmsnorm_quantize takes.)"""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's apply_rotary_pos_emb (Llama; Qwen2/3 and Mistral alike) on one of q / k, op for op:
    x cos + rotate_half(x) sin with cos / sin [B or 1, T, D] broadcast over the heads of x [B, H, T, D],
    rotate_half(x) = [-x[..., D/2:], x[..., :D/2]]; each product and the sum rounded to x.dtype."""
    h = x.shape[-1] // 2
    return x * cos.unsqueeze(1) + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin.unsqueeze(1)


def rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (quantize_static(rmsnorm(x)) packed as quantize_static returns it, rmsnorm(x) rounded to x.dtype): the fp32
    normed value is what gets quantized (pqk_rmsnorm_quantize does the same), not its 16-bit rounding."""
    y = rmsnorm(x, weight, eps)
    return quantize_static(y, scale, bits), y.to(x.dtype)
