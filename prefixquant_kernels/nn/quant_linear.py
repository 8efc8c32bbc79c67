"""QuantLinear: a drop-in nn.Linear replacement running W4/W8 x A4/A8 on the package's kernels."""
from __future__ import annotations

import torch
from torch import nn

from .. import format as fmt
from ..ops import checks
from ..ops.linear import quant_linear_prevalidated
from ..ops.backend import BACKENDS


def quantize_weight(weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None):
    """Per-output-channel symmetric RTN: float [N, K] -> (packed uint8 [N, K/2] or int8 [N, K], fp32 [N]).

    scale: optional fp32 [N] (e.g. from a clip search or GPTQ); default max|w_row| / qmax (1 for a zero row).
    """
    w = weight.detach().float()
    s = fmt.per_token_scale(w, bits) if scale is None else scale.detach().float().reshape(-1)
    q = fmt.quantize(w, s.unsqueeze(1), bits)
    return (fmt.pack_int4(q) if bits == 4 else q), s.contiguous()


class Fp32Scales(nn.Module):
    """A module whose scale / bias buffers (``_FP32``) the kernels read as float32: ``.half()``, ``.to(dtype)`` and
    the like move them but keep their dtype (cast to fp16, a scale would lose bits, and a small one become 0), and
    ``load_state_dict`` checks the incoming values (``_check_state``) before any is copied in."""

    _FP32: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.register_load_state_dict_pre_hook(self._check_incoming)

    def _apply(self, fn, recurse=True):
        kept = {n: b for n in self._FP32 if (b := self._buffers.get(n)) is not None}
        super()._apply(fn, recurse)
        for n, old in kept.items():
            new = self._buffers[n]
            if new.dtype != old.dtype:   # a dtype cast: the fp32 values, on the device fn moved them to
                self._buffers[n] = old.to(device=new.device)
        return self

    def _check_incoming(self, module, state_dict, prefix, *args):
        self._check_state({n: state_dict[prefix + n] for n in self._FP32 if prefix + n in state_dict})

    def _check_state(self, buffers: dict) -> None:
        """Raises ValueError / TypeError for scale values forward() cannot trust (name -> tensor)."""


class QuantLinear(Fp32Scales):
    """y = quant_linear(x): x is quantized to a_bits with a static per-tensor scale (``act_scale``) or
    per token (``act_scale=None``) inside the GEMM; weights are int4 (packed) or int8 per output channel.

    Buffers: ``weight`` uint8 [N, K/2] (w_bits 4) or int8 [N, K] (w_bits 8); ``w_scale`` fp32 [N];
    ``act_scale`` fp32 0-dim (static) or absent; ``bias`` fp32 [N] or absent; these three stay fp32 through a
    module cast (``model.half()``: Fp32Scales), and a state_dict is checked before it is loaded.
    Input float32/bfloat16/float16 [..., K]; output the same dtype [..., N].
    """

    _FP32 = ("w_scale", "act_scale", "bias")

    def __init__(self, in_features: int, out_features: int, *, w_bits: int = 4, a_bits: int = 4,
                 bias: bool = False, static: bool = True, backend: str = "auto"):
        super().__init__()
        op = "QuantLinear"
        for name, v, least in (("in_features", in_features, 1), ("out_features", out_features, 0)):
            if isinstance(v, bool) or not isinstance(v, int):
                checks.fail(op, f"{name} must be an int, got {type(v).__name__}", TypeError)
            if v < least:
                checks.fail(op, f"{name} must be >= {least}, got {v}")
        checks.bits(w_bits, "w_bits", op)
        checks.bits(a_bits, "a_bits", op)
        checks.exact_k(in_features, a_bits, w_bits, op)
        if w_bits == 4 and in_features % 2:
            checks.fail(op, f"in_features must be even for w_bits=4 (two int4 per byte), got {in_features}")
        if backend not in BACKENDS:
            checks.fail(op, f"backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.backend = w_bits, a_bits, backend
        wshape = (out_features, in_features // 2) if w_bits == 4 else (out_features, in_features)
        self.register_buffer("weight", torch.zeros(wshape, dtype=torch.uint8 if w_bits == 4 else torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("act_scale", torch.ones((), dtype=torch.float32) if static else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)

    def _validate_buffers(self) -> None:
        """The scales forward() trusts: checked when built (from_float) and before load_state_dict copies."""
        self._check_state({"w_scale": self.w_scale, "act_scale": self.act_scale})

    def _check_state(self, buffers: dict) -> None:
        op = "QuantLinear"
        if (w_scale := buffers.get("w_scale")) is not None:
            checks.channel_vector(w_scale, "w_scale", op, self.out_features, w_scale.device, positive=True)
        if (act_scale := buffers.get("act_scale")) is not None:
            checks.static_scale(act_scale, "act_scale", op, act_scale.device)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int = 4, a_bits: int = 4, act_scale=None, *,
                   w_scale: torch.Tensor | None = None, backend: str = "auto") -> "QuantLinear":
        """Quantize an nn.Linear. act_scale: a number / 1-element tensor (static) or None (per token)."""
        op = "QuantLinear.from_float"
        if not isinstance(linear, nn.Linear):
            checks.fail(op, f"linear must be a torch.nn.Linear, got {type(linear).__name__}", TypeError)
        if not linear.weight.is_floating_point():
            checks.fail(op, f"linear.weight must be floating point, got {linear.weight.dtype}", TypeError)
        dev = linear.weight.device
        s_act = None if act_scale is None else checks.static_scale(act_scale, "act_scale", op, dev)
        if w_scale is not None:
            w_scale = checks.channel_vector(w_scale, "w_scale", op, linear.out_features, dev, positive=True)
        mod = cls(linear.in_features, linear.out_features, w_bits=w_bits, a_bits=a_bits,
                  bias=linear.bias is not None, static=act_scale is not None, backend=backend).to(dev)
        q, s = quantize_weight(linear.weight, w_bits, w_scale)
        mod.weight.copy_(q)
        mod.w_scale.copy_(s)
        if s_act is not None:
            mod.act_scale.copy_(s_act)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        return mod

    @property
    def is_static(self) -> bool:
        return self.act_scale is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = "QuantLinear"
        checks.float_tensor(x, "x", op)
        if x.shape[-1] != self.in_features:
            checks.fail(op, f"x's last dim must be in_features={self.in_features}, got shape {tuple(x.shape)}")
        checks.same_device(op, self.weight.device, x=x)
        return quant_linear_prevalidated(x, self.weight, self.w_scale, self.act_scale, self.a_bits, self.bias,
                                         self.backend)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 [N, K] weight this module computes with (for references and error analysis)."""
        q = fmt.unpack_int4(self.weight) if self.w_bits == 4 else self.weight
        return q.float() * self.w_scale.unsqueeze(1)

    def extra_repr(self) -> str:
        act = f"static act_scale={float(self.act_scale):.4g}" if self.is_static else "dynamic per-token"
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
                f"a_bits={self.a_bits}, {act}, bias={self.bias is not None}, backend={self.backend!r}")
