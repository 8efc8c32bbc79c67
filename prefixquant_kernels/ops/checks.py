"""Argument checks, the only ones: the public ops (ops/*.py) and the CUDA implementations of the custom ops
(ops/cuda_ops.py, which torch.ops.pqk.* can reach directly) call these. Each raises TypeError/ValueError with a
message of the form ``pqk.<op>: <argument> <what was expected>, got <what came>`` before any kernel runs; none
reads device memory (value checks run on CPU tensors only)."""
from __future__ import annotations

import math
import numbers
import struct

import torch

from ..format import FLOAT_DTYPES


def fail(op: str, msg: str, exc: type[Exception] = ValueError):
    raise exc(f"pqk.{op}: {msg}")


def tensor(t, name: str, op: str, dtypes=None, min_dim: int = 1, dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        fail(op, f"{name} must have dtype in ({want}), got {str(t.dtype).replace('torch.', '')}", TypeError)
    if dim is not None and t.dim() != dim:
        fail(op, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        fail(op, f"{name} must have at least {min_dim} dim(s), got shape {tuple(t.shape)}")
    return t


def float_tensor(t, name: str, op: str) -> torch.Tensor:
    return tensor(t, name, op, FLOAT_DTYPES)


def activation(x, bits_: int, op: str, bits_name: str = "bits") -> None:
    """x: float [..., K], K > 0 (even for 4 bits); bits_ 4 or 8: the input of a quantizer."""
    float_tensor(x, "x", op)
    bits(bits_, bits_name, op)
    nonempty_last_dim(x, "x", op)
    if bits_ == 4:
        even_last_dim(x, "x", op)


def bits(b, name: str, op: str, allowed=(4, 8)) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or b not in allowed:
        fail(op, f"{name} must be one of {allowed}, got {b!r}")
    return b


def even_last_dim(t: torch.Tensor, name: str, op: str) -> None:
    if t.shape[-1] % 2:
        fail(op, f"{name}'s last dim must be even for 4-bit packing, got {t.shape[-1]} (shape {tuple(t.shape)})")


def nonempty_last_dim(t: torch.Tensor, name: str, op: str) -> None:
    if t.shape[-1] == 0:
        fail(op, f"{name}'s last dim (K) must be > 0, got shape {tuple(t.shape)}")


def same_device(op: str, device: torch.device, **named) -> None:
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):  # checked here too: it may run before tensor()
            fail(op, f"{name} must be a torch.Tensor or None, got {type(t).__name__}", TypeError)
        if t is not None and t.device != device:
            fail(op, f"{name} must be on {device} like the input, got {t.device}")


def _positive_finite(values: torch.Tensor, name: str, op: str) -> None:
    # Value checks read the data: skipped for device tensors (no host sync) and while torch.compile traces
    # (the values are unknown then; modules validate their scales when they are built or loaded).
    if not values.numel() or values.device.type != "cpu" or torch.compiler.is_compiling():
        return
    if values.numel() <= 64:  # a few values (a per-head scale): one host read, checked in Python -- the vector path
        vals = values.detach().flatten().tolist()  # below is ~6 torch ops, ~4 ms of a SmolLM2 prefill's KV calls
        bad = [v for v in vals if not (math.isfinite(v) and v > 0)]
        if bad:
            fail(op, f"{name} must be finite and > 0, got {bad[:4]}")
        return
    v = values.detach()
    ok = (v > 0) & (v < math.inf)  # False for NaN, Inf, <= 0
    if not bool(ok.all()):
        fail(op, f"{name} must be finite and > 0, got {v[~ok].flatten()[:4].tolist()}")


def as_float32(v) -> float:
    """A real number as the kernels see it, rounded to float32 (a Python float of that value): 1e-50 -> 0.0, and
    anything past float32's range (or an int past float's: 10**400) -> inf, never an OverflowError."""
    try:
        return struct.unpack("f", struct.pack("f", float(v)))[0]
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _short(v) -> str:
    """repr(v), cut short (an int of 400 digits is a valid Python number)."""
    r = repr(v)
    return r if len(r) <= 24 else r[:20] + "..."


def _real(v) -> bool:
    """A real number (Python, NumPy), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def static_scale(scale, name: str, op: str, device: torch.device) -> torch.Tensor:
    """A Python number or a 1-element tensor -> float32 0-dim tensor on `device` (validated)."""
    if isinstance(scale, bool):
        fail(op, f"{name} must be a number or a 1-element tensor, got bool", TypeError)
    if _real(scale):
        s32 = as_float32(scale)   # checked as the kernels get it: 1e-50 would be 0 there, 1e39 inf
        if not (0.0 < s32 < math.inf):
            fail(op, f"{name} must be finite and > 0 (in float32), got {_short(scale)}")
        return torch.tensor(s32, dtype=torch.float32, device=device)
    if not isinstance(scale, torch.Tensor):
        fail(op, f"{name} must be a number or a 1-element tensor, got {type(scale).__name__}", TypeError)
    if scale.numel() != 1:
        fail(op, f"{name} must be a scalar (static per-tensor scale), got shape {tuple(scale.shape)}")
    if not scale.is_floating_point():
        fail(op, f"{name} must be a floating-point tensor, got {scale.dtype}", TypeError)
    same_device(op, device, **{name: scale})
    # already a float32 0-dim tensor (a module's buffer, the usual case): no detach/reshape/cast ops per call
    plain = scale.dtype == torch.float32 and scale.dim() == 0 and not scale.requires_grad
    s = scale if plain else scale.detach().reshape(()).to(torch.float32)
    _positive_finite(s, name, op)
    return s


def row_scales(scale, name: str, op: str, rows: int, device: torch.device) -> torch.Tensor:
    """Static (number / 1-element tensor) or per-row ([rows] or leading-dims-shaped) -> float32 tensor:
    0-dim for static, [rows] contiguous for per-row."""
    if not isinstance(scale, torch.Tensor) or scale.numel() == 1:
        return static_scale(scale, name, op, device)
    if not scale.is_floating_point():
        fail(op, f"{name} must be a floating-point tensor, got {scale.dtype}", TypeError)
    if scale.numel() != rows:
        fail(op, f"{name} must be a scalar or have one scale per row ({rows}), got shape {tuple(scale.shape)}")
    same_device(op, device, **{name: scale})
    s = scale.detach().reshape(rows).to(torch.float32).contiguous()
    _positive_finite(s, name, op)
    return s


def channel_vector(v, name: str, op: str, n: int, device: torch.device, positive: bool) -> torch.Tensor:
    """[n] float tensor -> float32 contiguous [n] (validated)."""
    tensor(v, name, op, FLOAT_DTYPES)
    if v.numel() != n or v.dim() != 1:
        fail(op, f"{name} must have shape ({n},), got {tuple(v.shape)}")
    same_device(op, device, **{name: v})
    out = v.detach().to(torch.float32).contiguous()
    if positive:
        _positive_finite(out, name, op)
    return out


def out_dtype(d, op: str) -> torch.dtype:
    if d not in FLOAT_DTYPES:
        fail(op, f"out_dtype must be one of float32, bfloat16, float16, got {d}", TypeError)
    return d


def packed_k(t: torch.Tensor) -> int:
    """K of a quantized operand: uint8 [..., K // 2] (packed int4) or int8 [..., K]."""
    return t.shape[-1] * (2 if t.dtype == torch.uint8 else 1)


def weight_k(w: torch.Tensor, k: int, op: str, a_bits: int) -> None:
    """w: uint8 [N, K // 2] (packed int4) or int8 [N, K] with the activations' K, short enough for every backend's
    int32 accumulator to hold the sum exactly (exact_k)."""
    wk = packed_k(w)
    if wk != k:
        fail(op, f"w's in_features K must be {k} to match the activations, got w of shape {tuple(w.shape)} "
                 f"({w.dtype}: K = {wk})")
    exact_k(k, a_bits, 4 if w.dtype == torch.uint8 else 8, op)


def exact_k(k: int, a_bits: int, w_bits: int, op: str) -> None:
    """Every backend sums K products a * w in int32 (vpdpbusd, mma, the reference's int32 matmul): exact while
    K * max|a| * max|w| < 2^31, i.e. K <= 131071 for W8A8, 2^21 - 1 for W4A8 / W8A4, 2^25 - 1 for W4A4. Past that
    the sum wraps (silently, and not alike on every backend)."""
    k_max = (2**31 - 1) // ((8 if a_bits == 4 else 128) * (8 if w_bits == 4 else 128))
    if k > k_max:
        fail(op, f"K = {k} is too long for an exact int32 sum of W{w_bits}A{a_bits} products: at most {k_max}")


def norm_weight(weight, op: str, k: int, device: torch.device, dtypes=FLOAT_DTYPES) -> None:
    """The RMSNorm weight: a float [K] tensor on the input's device."""
    tensor(weight, "weight", op, dtypes)
    if tuple(weight.shape) != (k,):
        fail(op, f"weight must have shape ({k},), got {tuple(weight.shape)}")
    same_device(op, device, weight=weight)


def eps(e, op: str) -> float:
    if not _real(e) or not (0.0 <= as_float32(e) < math.inf):
        fail(op, f"eps must be a finite float >= 0, got {_short(e)}")
    return float(e)


def sm_scale(s, op: str, d: int) -> float:
    """The attention's softmax scale: a finite real number (a Python or NumPy one), or None for 1 / sqrt(d)."""
    if s is None:
        return d ** -0.5
    if not _real(s):
        fail(op, f"sm_scale must be a real number or None, got {type(s).__name__}", TypeError)
    if not math.isfinite(as_float32(s)):   # the kernels take it as float32
        fail(op, f"sm_scale must be finite (in float32), got {_short(s)}")
    return float(s)


def hadamard_size(x: torch.Tensor, op: str) -> int:
    """x.shape[-1] = m * 2^p with a known H_m (hadamard.hadamard_factor) -> m."""
    from ..hadamard import hadamard_factor

    try:
        m, _ = hadamard_factor(x.shape[-1])
    except ValueError as e:
        why = str(e)
    else:
        return m
    fail(op, f"x.shape[-1]: {why}")


def out_scale(s, op: str) -> float:
    """The next layer's static scale as a Python float (the kernels take it by value: no device read, no sync)."""
    if isinstance(s, torch.Tensor) and s.numel() == 1 and s.device.type == "cpu":
        s = s.item()
    if not _real(s):
        fail(op, f"out_scale must be a number (the next layer's static scale), got {type(s).__name__}", TypeError)
    if not (0.0 < as_float32(s) < math.inf):   # as the epilogue takes it, a float32
        fail(op, f"out_scale must be finite and > 0 (in float32), got {_short(s)}")
    return float(s)


def requant_n(n: int, n_multiple: int, op: str) -> None:
    """N of a GEMM with a packed int4 output: a multiple of 2 (requant) or 4 (SiLU-mul: gate/up rows interleaved)."""
    if n % n_multiple:
        fail(op, f"w's out_features N must be a multiple of {n_multiple} "
                 f"({'gate/up rows interleaved, ' if n_multiple == 4 else ''}packed int4 out), got N = {n}")


# ---- limits of the CUDA launchers (ops/cuda_ops.py) -----------------------------------------------------------

INT32_MAX = 2**31 - 1


def launch_sizes(op: str, **sizes: int) -> None:
    """The CUDA launchers take int sizes: each must be in [1, 2^31 - 1] (ctypes would silently wrap a larger one)."""
    for name, v in sizes.items():
        if not 0 < v <= INT32_MAX:
            fail(op, f"{name} = {v} is outside the CUDA kernels' range [1, 2^31 - 1]")


def int4_range(q: torch.Tensor, name: str, op: str) -> None:
    # reads the values: CPU tensors only, outside torch.compile (as _positive_finite)
    if not q.numel() or q.device.type != "cpu" or torch.compiler.is_compiling():
        return
    if int(q.min()) < -8 or int(q.max()) > 7:
        fail(op, f"{name} must hold int4 values in [-8, 7], got range [{int(q.min())}, {int(q.max())}]")
