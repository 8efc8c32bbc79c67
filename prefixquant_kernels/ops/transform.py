"""Public ops that transform an activation before a quantized GEMM: ``rmsnorm_quantize`` (the fused RMSNorm +
static quantize that feeds a layer's q/k/v or gate/up GEMMs), ``rms_norm`` (Hugging Face's RMSNorm as one op, what a
quantized model's norms run on the CPU: models/float_ops.py), ``rope`` (its rotary embedding of q / k, likewise)
and ``hadamard_transform`` (the online Walsh-Hadamard
rotation of the down_proj input). Validation -> backend choice (ops/backend.py) -> one ``torch.ops.pqk`` custom op
(schemas and fakes in library.py). Kernels per device:

    pqk::rmsnorm_quantize    CPU: PyTorch (reference.rmsnorm_quantize)   CUDA: pqk_rmsnorm_quantize (ops/cuda_ops.py)
    pqk::rms_norm            CPU: C++ (csrc/cpu/float_ops.cpp)            CUDA: PyTorch (reference.rms_norm)
    pqk::rope                CPU: C++ (csrc/cpu/float_ops.cpp)            CUDA: PyTorch (reference.rope)
    pqk::hadamard_transform  CPU: C++ (csrc/cpu/hadamard.cpp)            CUDA: pqk_hadamard (ops/cuda_ops.py)

On CPU tensors backend "auto" / "cpu*" run the custom op (one node for torch.compile), "reference" the PyTorch
implementation directly; hadamard_transform calls its op's CPU kernel without the dispatch where nothing traces,
intercepts or differentiates the call (backend.eager_cpu_call). rmsnorm_quantize has no C++ CPU kernel (its op
runs the PyTorch one); hadamard_transform's CPU kernel is C++, bit-identical to hadamard.py's "sequential" form (and
so to the CUDA kernel) in fp32: ~45 small torch ops per call (one per butterfly half-stage) made it ~0.5 ms at one
token, most of a decode step's rotation.
"""
from __future__ import annotations

import torch

from .. import _extension
from .. import hadamard as had
from .. import reference
from . import checks
from . import library  # noqa: F401  (defines torch.ops.pqk.*)
from .backend import eager_cpu_call, resolve


def rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, scale, bits: int = 4, eps: float = 1e-6, *,
                     return_normed: bool = False, backend: str = "auto"):
    """Fused RMSNorm + static quantize: y = x / sqrt(mean(x^2) + eps) * weight (fp32), q = quantize_static(y, scale).

    Args:
        x: float32/bfloat16/float16 [..., K] (K even for bits=4).
        weight: float [K], the norm's weight (any float dtype; the CUDA kernel reads it in x.dtype).
        scale: the static scale of the next GEMM's input, a number or a 1-element tensor; finite and > 0.
        bits: 4 -> packed uint8 [..., K // 2]; 8 -> int8 [..., K].
        eps: finite, >= 0.
        return_normed: also return y in x.dtype (for a residual branch or an unquantized consumer).
    Returns q, or (q, y) with return_normed.
    """
    op = "rmsnorm_quantize"
    checks.activation(x, bits, op)
    checks.norm_weight(weight, op, x.shape[-1], x.device)
    eps = checks.eps(eps, op)
    if not isinstance(return_normed, bool):
        checks.fail(op, f"return_normed must be a bool, got {return_normed!r}", TypeError)
    s = checks.static_scale(scale, "scale", op, x.device)
    be = resolve(backend, x.device, op)
    x2 = x.reshape(-1, x.shape[-1])
    if be.kind == "reference":
        q, y = reference.rmsnorm_quantize(x2, weight, s, bits, eps)
    else:
        w = weight.to(x.dtype) if x.device.type == "cuda" else weight
        q, y = torch.ops.pqk.rmsnorm_quantize(x2.contiguous(), w.contiguous(), s, bits, eps, return_normed)
    q = q.reshape(*x.shape[:-1], q.shape[-1])
    return (q, y.reshape(x.shape)) if return_normed else q


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """Hugging Face's RMSNorm (LlamaRMSNorm; Qwen2/3, Mistral and Phi-3 are the same), with its roundings:
    h = x * rsqrt(mean(x^2) + eps) in fp32, rounded to x.dtype, then weight * h in x.dtype.

    Args:
        x: float32/bfloat16/float16 [..., N].
        weight: [N] of x's dtype (a weight of another dtype: the module's own formula, which promotes).
        eps: finite, >= 0.
    Returns x's shape and dtype. The CPU kernel sums the squares in double (torch in fp32, in its own order), so the
    two can differ by an ulp of the variance: equal to float rounding, not bit for bit.
    """
    op = "rms_norm"
    checks.float_tensor(x, "x", op)
    checks.nonempty_last_dim(x, "x", op)
    checks.norm_weight(weight, op, x.shape[-1], x.device)
    eps = checks.eps(eps, op)
    be = resolve(backend, x.device, op)
    if be.kind != "cpu" or weight.dtype != x.dtype:
        return reference.rms_norm(x, weight, eps)
    return torch.ops.pqk.rms_norm(x, weight, eps, be.cpu_isa)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Hugging Face's rotary embedding (apply_rotary_pos_emb of Llama, Qwen2/3, Mistral) on one of q / k:
    x cos + rotate_half(x) sin, rotate_half(x) = [-x[..., D/2:], x[..., :D/2]], with torch's roundings (each
    product and the sum rounded to x.dtype): bit-identical to the model's own formula.

    Args:
        x: float32/bfloat16/float16 [B, H, T, D], D even, any strides (the model's q / k are transposed views).
        cos, sin: [B or 1, T, D] of x's dtype (the model's position embeddings; another dtype: the model's formula,
            which promotes), on x's device.
    Returns x's dtype, [B, H, T, D] (contiguous from the CPU kernel).
    """
    op = "rope"
    checks.tensor(x, "x", op, checks.FLOAT_DTYPES, dim=4)
    if x.shape[-1] == 0 or x.shape[-1] % 2:
        checks.fail(op, f"x's last dim (D) must be even and > 0, got shape {tuple(x.shape)}")
    b, _, t, d = x.shape
    for name, c in (("cos", cos), ("sin", sin)):
        checks.tensor(c, name, op, checks.FLOAT_DTYPES, dim=3)
        if c.shape[0] not in (1, b) or tuple(c.shape[1:]) != (t, d):
            checks.fail(op, f"{name} must be [{b} or 1, {t}, {d}] (x [B, H, T, D]), got {tuple(c.shape)}")
        checks.same_device(op, x.device, **{name: c})
    if cos.shape != sin.shape:
        checks.fail(op, f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    be = resolve(backend, x.device, op)
    if be.kind != "cpu" or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return reference.rope(x, cos, sin)
    return torch.ops.pqk.rope(x, cos, sin, be.cpu_isa)


def hadamard_transform(x: torch.Tensor, *, inverse: bool = False, backend: str = "auto") -> torch.Tensor:
    """The online Walsh-Hadamard rotation y = (H_m (x) H_{2^p}) x / sqrt(n) along the last dim (hadamard.py has the
    definition, the index convention and the list of m). x: float16/bfloat16/float32 [..., n], n = m * 2^p; other n
    raise ValueError naming x (use a dense orthogonal rotation there: calibration.rotation.random_orthogonal).
    inverse=True applies the transpose. Returns x's shape and dtype."""
    op = "hadamard_transform"
    checks.float_tensor(x, "x", op)
    checks.nonempty_last_dim(x, "x", op)
    if not isinstance(inverse, bool):
        checks.fail(op, f"inverse must be a bool, got {inverse!r}", TypeError)
    checks.hadamard_size(x, op)
    be = resolve(backend, x.device, op)
    if be.kind == "reference":
        return had.hadamard_transform(x, inverse=inverse)
    if be.kind == "cpu" and eager_cpu_call(x):     # the op's own CPU kernel, without its dispatch (~12 us)
        return _hadamard_cpu(x, inverse)
    return torch.ops.pqk.hadamard_transform(x.contiguous(), inverse)


# ---- the CPU kernels of the two custom ops: the PyTorch implementations ----------------------------------------

@torch.library.register_kernel("pqk::rmsnorm_quantize", "cpu")
def _rmsnorm_quantize_cpu(x, weight, scale, bits, eps, return_normed):
    q, y = reference.rmsnorm_quantize(x, weight, scale, bits, eps)
    return q.contiguous(), (y.contiguous() if return_normed else x.new_empty([0]))


def _hadamard_cpu(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The CPU kernel of pqk::hadamard_transform (also called directly by hadamard_transform, see eager_cpu_call)."""
    if not _extension.cpu_available() or x.dtype == torch.float64:     # fp64: the PyTorch one computes in fp64
        return had.hadamard_transform(x, inverse=inverse).contiguous()
    # the C++ kernel transforms fp32 rows in place: one contiguous fp32 copy of x
    y = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    n = y.shape[-1]
    _extension._C.hadamard_rows_(y.view(-1, n), had.factor_matrix(had.hadamard_factor(n)[0], inverse))
    return y.to(x.dtype)


torch.library.register_kernel("pqk::hadamard_transform", "cpu", _hadamard_cpu)


# ---- autograd: the transform is orthogonal, so its backward is the transform the other way --------------------------
# (y = x R with R orthogonal -> dL/dx = dL/dy R^T = the inverse transform of the gradient). Block-wise fine-tuning
# (calibration/finetune.py) backpropagates through the online rotation of a RotatedLinear.

def _hadamard_setup_context(ctx, inputs, output):
    ctx.inverse = inputs[1]


def _hadamard_backward(ctx, grad):
    return torch.ops.pqk.hadamard_transform(grad.contiguous(), not ctx.inverse), None


torch.library.register_autograd("pqk::hadamard_transform", _hadamard_backward, setup_context=_hadamard_setup_context)
