"""Public GEMM ops: int4_matmul (quantized A in) and quant_linear (float A in, quantized inside the
kernel with a static or per-token scale); int4_matmul_requant and int4_matmul_silu_mul_requant (quantized A in,
packed int4 out, quantized with the *next* layer's static scale inside the GEMM's epilogue — only static scales
allow this: a per-token scale of the output would need the whole output row first).
Validation -> backend choice -> reference or kernel.

    pqk::int4_matmul_requant / _silu_mul_requant   CPU: the C++ GEMM (fp32 out) + the C++ static quantize
                                                   CUDA: pqk_int4_gemm epilogue 3 / 4 (one launch, ops/cuda_ops.py)
    pqk::quant_linear (static a_scale) / pqk::quant_linear_silu_mul_requant
                                                   CUDA: pqk_quant_gemm_static (the quantize in the GEMM's A load:
                                                   one launch); CPU: the C++ quantize + GEMM
"""
from __future__ import annotations

import torch

from .. import reference
from . import checks
from . import library  # noqa: F401  (defines torch.ops.pqk.*)
from .backend import Backend, resolve

_QTYPES = (torch.uint8, torch.int8)  # uint8 = packed int4, int8 = int8


def _weight(op: str, w, w_scale, bias, k: int, device: torch.device, a_bits: int):
    checks.tensor(w, "w", op, _QTYPES, dim=2)
    checks.weight_k(w, k, op, a_bits)
    checks.same_device(op, device, w=w)
    n = w.shape[0]
    ws = checks.channel_vector(w_scale, "w_scale", op, n, device, positive=True)
    b = None if bias is None else checks.channel_vector(bias, "bias", op, n, device, positive=False)
    return w.contiguous(), ws, b


def _quantized_operands(op: str, a_packed, w_packed, a_scale, w_scale, bias):
    """The checked operands of a GEMM on quantized A: (A as 2-D contiguous [M, K/2 or K], a_scale float32 0-dim or
    [M], w contiguous, w_scale float32 [N], bias float32 [N] or None)."""
    checks.tensor(a_packed, "a_packed", op, _QTYPES)
    checks.nonempty_last_dim(a_packed, "a_packed", op)
    dev = a_packed.device
    a2 = a_packed.reshape(-1, a_packed.shape[-1]).contiguous()
    a_s = checks.row_scales(a_scale, "a_scale", op, a2.shape[0], dev)
    w, w_s, b = _weight(op, w_packed, w_scale, bias, checks.packed_k(a_packed), dev,
                        4 if a_packed.dtype == torch.uint8 else 8)
    return a2, a_s, w, w_s, b


def _quantized_backend(op: str, backend: str, a2: torch.Tensor, w: torch.Tensor):
    w4a4 = a2.dtype == torch.uint8 and w.dtype == torch.uint8
    return resolve(backend, a2.device, op, None if w4a4 else {"cuda": "int8 operands (the CUDA GEMM is W4A4)"})


def int4_matmul(a_packed: torch.Tensor, w_packed: torch.Tensor, a_scale, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16, *,
                backend: str = "auto") -> torch.Tensor:
    """y[m, n] = a_scale(m) * w_scale[n] * sum_k A[m, k] * W[n, k] (+ bias[n]), exact int32 accumulation: K is at
    most 2^25 - 1 (W4A4), 2^21 - 1 (W4A8, W8A4) or 131071 (W8A8), where a sum of K extreme products still fits.

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
    out_dtype = checks.out_dtype(out_dtype, op)
    a2, a_s, w, w_s, b = _quantized_operands(op, a_packed, w_packed, a_scale, w_scale, bias)
    be = _quantized_backend(op, backend, a2, w)
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
    Returns x.dtype [..., N], bit-exact with quantize_static/quantize_per_token followed by int4_matmul (whose
    limit on K applies). A number as a_scale is checked as the float32 the kernels take (1e-50 is 0 there).
    """
    op = "quant_linear"
    checks.float_tensor(x, "x", op)
    checks.nonempty_last_dim(x, "x", op)
    checks.bits(a_bits, "a_bits", op)
    dev = x.device
    a_s = None if a_scale is None else checks.static_scale(a_scale, "a_scale", op, dev)
    w, w_s, b = _weight(op, w_packed, w_scale, bias, x.shape[-1], dev, a_bits)
    return quant_linear_prevalidated(x, w, w_s, a_s, a_bits, b, backend)


def quant_linear_backend(backend: str, device: torch.device, w: torch.Tensor, a_bits: int) -> Backend:
    """What quant_linear runs for ``backend`` on ``device`` with weights ``w`` (uint8 W4 / int8 W8) and a_bits."""
    w4a4 = a_bits == 4 and w.dtype == torch.uint8
    return resolve(backend, device, "quant_linear",
                   None if w4a4 else {"cuda": f"W{8 if w.dtype == torch.int8 else 4}A{a_bits} (the CUDA GEMM is W4A4)"})


def quant_linear_prevalidated(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor | None,
                              a_bits: int, bias: torch.Tensor | None, backend: str | Backend) -> torch.Tensor:
    """quant_linear after validation: w contiguous, w_scale/bias float32 [N], a_scale float32 0-dim or None,
    all checked. For callers that own validated buffers (QuantLinear), so a decode step does not re-read
    every scale; x is still checked by the caller. backend: a backend= string, or what quant_linear_backend
    resolved for these weights once (the vLLM plugin's layers)."""
    be = backend if isinstance(backend, Backend) else quant_linear_backend(backend, x.device, w, a_bits)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if be.kind == "reference":
        y = reference.quant_linear(x2, w, w_scale, a_scale, a_bits, bias)
    else:
        y = torch.ops.pqk.quant_linear(x2, w, w_scale, a_scale, a_bits, bias, be.cpu_isa)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _requant(op: str, a_packed, w_packed, a_scale, w_scale, out_scale, bias, backend: str, n_multiple: int):
    a2, a_s, w, w_s, b = _quantized_operands(op, a_packed, w_packed, a_scale, w_scale, bias)
    checks.requant_n(w.shape[0], n_multiple, op)
    s_out = checks.out_scale(out_scale, op)
    be = _quantized_backend(op, backend, a2, w)
    if be.kind == "reference":
        y = getattr(reference, op)(a2, w, a_s, w_s, b, s_out)
    else:
        y = getattr(torch.ops.pqk, op)(a2, w, a_s, w_s, b, s_out, be.cpu_isa)
    return y.reshape(*a_packed.shape[:-1], y.shape[-1])


def int4_matmul_requant(a_packed: torch.Tensor, w_packed: torch.Tensor, a_scale, w_scale: torch.Tensor,
                        out_scale: float, bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """q = quantize(int4_matmul(a, w, a_scale, w_scale, bias) in fp32, out_scale, 4 bits): a linear layer whose
    output is already the next W4A4 GEMM's input (e.g. v_proj -> a 4-bit cache, or any chain of static layers).

    Args as int4_matmul (a_packed uint8 [..., K // 2] / int8 [..., K], w [N, K // 2] / [N, K], N even), plus
        out_scale: the consumer's static per-tensor scale (a number, finite and > 0).
    Returns uint8 [..., N // 2] packed int4, bit-exact with reference.int4_matmul_requant.
    """
    return _requant("int4_matmul_requant", a_packed, w_packed, a_scale, w_scale, out_scale, bias, backend, 2)


def int4_matmul_silu_mul_requant(a_packed: torch.Tensor, w_gate_up: torch.Tensor, a_scale, w_scale: torch.Tensor,
                                 out_scale: float, bias: torch.Tensor | None = None, *,
                                 backend: str = "auto") -> torch.Tensor:
    """The gated MLP's first half in one GEMM: gate and up projections, SiLU(gate) * up, quantized with down_proj's
    static input scale — the int4 output feeds down_proj's int4_matmul directly.

    Args:
        a_packed: as int4_matmul (the quantized MLP input).
        w_gate_up: uint8 [2I, K // 2] (or int8 [2I, K]) with gate and up rows interleaved (row 2j = gate_j,
            2j+1 = up_j): ``format.interleave_rows(w_gate, w_up)``; I even.
        w_scale: float [2I], interleaved the same way; bias: optional float [2I].
        out_scale: down_proj's static input scale.
    Returns uint8 [..., I // 2] packed int4. The SiLU uses exp: the CUDA kernel's expf may differ from torch's by an
    ulp, which can move a value at a rounding boundary by one int4 step (the CPU backend is bit-exact).
    """
    return _requant("int4_matmul_silu_mul_requant", a_packed, w_gate_up, a_scale, w_scale, out_scale, bias, backend,
                    4)


def quant_linear_silu_mul_requant(x: torch.Tensor, w_gate_up: torch.Tensor, w_scale: torch.Tensor, a_scale,
                                  out_scale: float, bias: torch.Tensor | None = None, *,
                                  backend: str = "auto") -> torch.Tensor:
    """int4_matmul_silu_mul_requant on the float input: x quantized to int4 with the static a_scale inside the op
    (CUDA: inside the GEMM's A load, one launch; no int4 copy of x in memory).

    Args:
        x: float32/bfloat16/float16 [..., K]; a_scale: the static per-tensor scale (number or 1-element tensor).
        w_gate_up, w_scale, bias, out_scale: as int4_matmul_silu_mul_requant (W4: w uint8 [2I, K // 2], I even).
    Returns uint8 [..., I // 2] packed int4, bit-exact with quantize_static + int4_matmul_silu_mul_requant (the
    CUDA kernel's expf caveat of that op applies).
    """
    op = "quant_linear_silu_mul_requant"
    checks.float_tensor(x, "x", op)
    checks.nonempty_last_dim(x, "x", op)
    dev = x.device
    a_s = checks.static_scale(a_scale, "a_scale", op, dev)
    checks.tensor(w_gate_up, "w_gate_up", op, (torch.uint8,), dim=2)
    w, w_s, b = _weight(op, w_gate_up, w_scale, bias, x.shape[-1], dev, 4)
    checks.requant_n(w.shape[0], 4, op)
    s_out = checks.out_scale(out_scale, op)
    be = resolve(backend, dev, op)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if be.kind == "reference":
        y = reference.quant_linear_silu_mul_requant(x2, w, w_s, a_s, b, s_out)
    else:
        y = torch.ops.pqk.quant_linear_silu_mul_requant(x2, w, w_s, a_s, b, s_out, be.cpu_isa)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _int4_matmul_requant_cpu(a, w, a_scale, w_scale, bias, out_scale, cpu_isa=-1):
    # The C++ GEMM's fp32 output is bit-exact with the reference's, and so is its static quantize.
    y = torch.ops.pqk.int4_matmul(a, w, a_scale, w_scale, bias, torch.float32, cpu_isa)
    return torch.ops.pqk.quantize_static(y, torch.tensor(out_scale, dtype=torch.float32), 4, cpu_isa)


def _int4_matmul_silu_mul_requant_cpu(a, w, a_scale, w_scale, bias, out_scale, cpu_isa=-1):
    y = torch.ops.pqk.int4_matmul(a, w, a_scale, w_scale, bias, torch.float32, cpu_isa)
    h = reference.silu_mul(y[:, 0::2], y[:, 1::2]).contiguous()
    return torch.ops.pqk.quantize_static(h, torch.tensor(out_scale, dtype=torch.float32), 4, cpu_isa)


def _quant_linear_silu_mul_requant_cpu(x, w, w_scale, a_scale, bias, out_scale, cpu_isa=-1):
    a = torch.ops.pqk.quantize_static(x, a_scale, 4, cpu_isa)
    return _int4_matmul_silu_mul_requant_cpu(a, w, a_scale, w_scale, bias, out_scale, cpu_isa)


torch.library.register_kernel("pqk::int4_matmul_requant", "cpu", _int4_matmul_requant_cpu)
torch.library.register_kernel("pqk::quant_linear_silu_mul_requant", "cpu", _quant_linear_silu_mul_requant_cpu)
torch.library.register_kernel("pqk::int4_matmul_silu_mul_requant", "cpu", _int4_matmul_silu_mul_requant_cpu)
