"""Public GEMM ops: int4_matmul (quantized A in) and quant_linear (float A in, quantized inside the
kernel with a static or per-token scale). Validation -> backend choice -> reference or kernel."""
from __future__ import annotations

import torch

from .. import reference
from . import checks
from . import library  # noqa: F401  (defines torch.ops.pqk.*)
from .backend import resolve

_QTYPES = (torch.uint8, torch.int8)  # uint8 = packed int4, int8 = int8


def _k_of(t: torch.Tensor) -> int:
    return t.shape[-1] * (2 if t.dtype == torch.uint8 else 1)


def _weight(op: str, w, w_scale, bias, k: int, device: torch.device):
    checks.tensor(w, "w", op, _QTYPES, dim=2)
    if _k_of(w) != k:
        checks.fail(op, f"w's in_features K must be {k} to match the activations, got w of shape {tuple(w.shape)} "
                        f"({w.dtype}: K = {_k_of(w)})")
    checks.same_device(op, device, w=w)
    n = w.shape[0]
    ws = checks.channel_vector(w_scale, "w_scale", op, n, device, positive=True)
    b = None if bias is None else checks.channel_vector(bias, "bias", op, n, device, positive=False)
    return w.contiguous(), ws, b


def int4_matmul(a_packed: torch.Tensor, w_packed: torch.Tensor, a_scale, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16, *,
                backend: str = "auto") -> torch.Tensor:
    """y[m, n] = a_scale(m) * w_scale[n] * sum_k A[m, k] * W[n, k] (+ bias[n]), exact int32 accumulation.

    Args:
        a_packed: uint8 [..., K // 2] packed int4, or int8 [..., K] (W4A8 / W8A8).
        w_packed: uint8 [N, K // 2] packed int4, or int8 [N, K]; rows are output channels.
        a_scale: static per-tensor (number or 1-element tensor) or per-token tensor with one scale per row
            of A (M = product of A's leading dims); finite and > 0.
        w_scale: float [N] per-output-channel scales, finite and > 0.
        bias: optional float [N].
        out_dtype: float16 (default), bfloat16 or float32.
    Returns out_dtype [..., N]. The fp32 epilogue is y = acc * (a_scale * w_scale) + bias.
    """
    op = "int4_matmul"
    checks.tensor(a_packed, "a_packed", op, _QTYPES)
    checks.nonempty_last_dim(a_packed, "a_packed", op)
    out_dtype = checks.out_dtype(out_dtype, op)
    dev = a_packed.device
    a2 = a_packed.reshape(-1, a_packed.shape[-1]).contiguous()
    a_s = checks.row_scales(a_scale, "a_scale", op, a2.shape[0], dev)
    w, w_s, b = _weight(op, w_packed, w_scale, bias, _k_of(a_packed), dev)
    w4a4 = a2.dtype == torch.uint8 and w.dtype == torch.uint8
    be = resolve(backend, dev, op, cuda_unsupported=None if w4a4 else "int8 operands (the CUDA GEMM is W4A4)")
    if be.kind == "reference":
        y = reference.int4_matmul(a2, w, a_s, w_s, b, out_dtype)
    else:
        y = torch.ops.pqk.int4_matmul(a2, w, a_s, w_s, b, out_dtype, be.cpu_isa)
    return y.reshape(*a_packed.shape[:-1], w.shape[0])


def quant_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, a_scale=None, a_bits: int = 4,
                 bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """A quantized linear layer on float activations, quantize fused into the GEMM.

    Args:
        x: float32/bfloat16/float16 [..., K].
        w_packed: uint8 [N, K // 2] (int4) or int8 [N, K]; w_scale: float [N]; bias: optional float [N].
        a_scale: static per-tensor scale (number or 1-element tensor), or None for dynamic per-token
            quantization (the baseline: a max-reduction over each row first).
        a_bits: 4 or 8, the bits x is quantized to.
    Returns x.dtype [..., N], bit-exact with quantize_static/quantize_per_token followed by int4_matmul.
    """
    op = "quant_linear"
    checks.float_tensor(x, "x", op)
    checks.nonempty_last_dim(x, "x", op)
    checks.bits(a_bits, "a_bits", op)
    dev = x.device
    a_s = None if a_scale is None else checks.static_scale(a_scale, "a_scale", op, dev)
    w, w_s, b = _weight(op, w_packed, w_scale, bias, x.shape[-1], dev)
    return quant_linear_prevalidated(x, w, w_s, a_s, a_bits, b, backend)


def quant_linear_prevalidated(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor | None,
                              a_bits: int, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """quant_linear after validation: w contiguous, w_scale/bias float32 [N], a_scale float32 0-dim or None,
    all checked. For callers that own validated buffers (QuantLinear), so a decode step does not re-read
    every scale; x is still checked by the caller."""
    w4a4 = a_bits == 4 and w.dtype == torch.uint8
    be = resolve(backend, x.device, "quant_linear",
                 cuda_unsupported=None if w4a4 else f"W{8 if w.dtype == torch.int8 else 4}A{a_bits} "
                                                    "(the CUDA GEMM is W4A4)")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if be.kind == "reference":
        y = reference.quant_linear(x2, w, w_scale, a_scale, a_bits, bias)
    else:
        y = torch.ops.pqk.quant_linear(x2, w, w_scale, a_scale, a_bits, bias, be.cpu_isa)
    return y.reshape(*x.shape[:-1], w.shape[0])
