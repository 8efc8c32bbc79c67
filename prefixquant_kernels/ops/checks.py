"""Argument checks shared by the public ops. Each raises TypeError/ValueError with a message of the form
``pqk.<op>: <argument> <what was expected>, got <what came>`` before any kernel runs."""
from __future__ import annotations

import math

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
        if t is not None and t.device != device:
            fail(op, f"{name} must be on {device} like the input, got {t.device}")


def _positive_finite(values: torch.Tensor, name: str, op: str) -> None:
    # Value checks read the data: skipped for device tensors (no host sync) and while torch.compile traces
    # (the values are unknown then; modules validate their scales when they are built or loaded).
    if not values.numel() or values.device.type != "cpu" or torch.compiler.is_compiling():
        return
    if values.numel() == 1:  # one .item() is far cheaper than the vector path below
        v = float(values)
        if not (math.isfinite(v) and v > 0):
            fail(op, f"{name} must be finite and > 0, got {[v]}")
        return
    v = values.detach()
    ok = (v > 0) & (v < math.inf)  # False for NaN, Inf, <= 0
    if not bool(ok.all()):
        fail(op, f"{name} must be finite and > 0, got {v[~ok].flatten()[:4].tolist()}")


def static_scale(scale, name: str, op: str, device: torch.device) -> torch.Tensor:
    """A Python number or a 1-element tensor -> float32 0-dim tensor on `device` (validated)."""
    if isinstance(scale, bool):
        fail(op, f"{name} must be a number or a 1-element tensor, got bool", TypeError)
    if isinstance(scale, (int, float)):
        if not math.isfinite(scale) or scale <= 0:
            fail(op, f"{name} must be finite and > 0, got {scale}")
        return torch.tensor(float(scale), dtype=torch.float32, device=device)
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


def int4_range(q: torch.Tensor, name: str, op: str) -> None:
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        fail(op, f"{name} must hold int4 values in [-8, 7], got range [{int(q.min())}, {int(q.max())}]")
