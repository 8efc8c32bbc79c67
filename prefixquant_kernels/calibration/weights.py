"""Weight quantization: per-output-channel symmetric RTN with a clip search, and GPTQ (Frantar et al., 2022).

Both return float weights that are exactly ``q * scale[n]`` (q integer in the b-bit range), with the scale per
output channel, so ``QuantLinear.from_float(linear, w_scale=scale)`` recovers the same integers.
"""
from __future__ import annotations

import torch

from .. import format as fmt

CLIP_RATIOS = torch.linspace(1.0, 0.55, 10).tolist()   # PrefixQuant's weight clip grid


def fake_quant(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize with the package's format (format.quantize) -> float32."""
    return fmt.quantize(w, scale, bits).float() * scale


def rtn_clip_scale(weight: torch.Tensor, bits: int, ratios=CLIP_RATIOS) -> torch.Tensor:
    """float [N, K] -> fp32 [N]: per row, ``ratio * max|w| / qmax`` with the ratio minimizing ||w - Q(w)||^2."""
    w = weight.detach().float()
    base = fmt.per_token_scale(w, bits)                              # max|w_row| / qmax (1 for a zero row)
    best_err = torch.full((w.shape[0],), float("inf"))
    best = base.clone()
    for r in ratios:
        s = base * r
        err = (fake_quant(w, s.unsqueeze(1), bits) - w).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def rtn(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (fake-quantized float32 [N, K], scale fp32 [N]) with the clip search."""
    s = rtn_clip_scale(weight, bits)
    return fake_quant(weight.float(), s.unsqueeze(1), bits), s


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, *, scale: torch.Tensor | None = None,
         block: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ with fixed per-channel scales: quantize columns left to right, each column's rounding error spread
    over the columns not yet quantized through the inverse Hessian (its Cholesky factor).

    weight float [N, K]; hessian float [K, K] = sum of x x^T over calibration inputs; scale fp32 [N] (default: the
    RTN clip search) -> (fake-quantized float32 [N, K], scale).
    """
    w = weight.detach().float().clone()
    n, k = w.shape
    s = rtn_clip_scale(w, bits) if scale is None else scale.float()
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    except RuntimeError:  # not positive definite even after damping (degenerate calibration): fall back to RTN
        return fake_quant(w, s.unsqueeze(1), bits), s
    sc = s.unsqueeze(1)
    qmin, qmax = fmt.qmin(bits), fmt.qmax(bits)
    out = torch.empty_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i:i + 1]
            q = torch.round(col / sc).clamp_(qmin, qmax) * sc
            out[:, i1 + i:i1 + i + 1] = q
            e = (col - q) / h1[i, i]
            w1[:, i:] -= e @ h1[i:i + 1, i:]
            err1[:, i:i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return out, s
