"""QuantGatedMLP: a Llama/Qwen MLP, ``down(SiLU(gate(x)) * up(x))``, as two launches for static W4A4.

Static scales make the whole chain elementwise between GEMMs, so each quantize folds into a neighbour:

    h = quant_linear_silu_mul_requant(x, gate_up, ..., act_scale,      int4 [M, I/2]: x quantized in the GEMM's A
                                      down_act_scale)                  load, gate and up in ONE GEMM (rows
                                                                       interleaved), SiLU(g) * u and the down_proj
                                                                       quantize in its epilogue
    y = int4_matmul(h, down, down_act_scale, ...)                      x.dtype [M, H]

versus the unfused path's two quantizes, three GEMMs and the float SiLU·mul between them (with the float h
written and read back). A per-token (dynamic) down_proj scale cannot do this: it needs all of h's row first.
Not for rotated models: the online Hadamard sits between SiLU·mul and down_proj's quantize.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import format as fmt
from ..ops import checks
from ..ops.linear import int4_matmul, quant_linear_silu_mul_requant
from .quant_linear import Fp32Scales, QuantLinear


class QuantGatedMLP(Fp32Scales):
    """Buffers: ``gate_up_weight`` uint8 [2I, K/2] (gate/up rows interleaved, ``format.interleave_rows``),
    ``gate_up_scale`` fp32 [2I], ``act_scale`` fp32 0-dim (the shared gate/up input scale), ``down_weight`` uint8
    [H, I/2], ``down_scale`` fp32 [H], ``down_act_scale`` fp32 0-dim. Input float [..., K] -> same dtype [..., H]."""

    _FP32 = ("gate_up_scale", "act_scale", "down_scale", "down_act_scale")

    def __init__(self, hidden_size: int, intermediate_size: int, out_features: int | None = None, *,
                 backend: str = "auto"):
        super().__init__()
        op = "QuantGatedMLP"
        if hidden_size % 2 or intermediate_size % 2:
            checks.fail(op, f"hidden_size and intermediate_size must be even (int4 packing, gate/up pairs), got "
                            f"{hidden_size} and {intermediate_size}")
        self.in_features, self.intermediate_size = hidden_size, intermediate_size
        self.out_features = hidden_size if out_features is None else out_features
        self.backend = backend
        self.register_buffer("gate_up_weight", torch.zeros(2 * intermediate_size, hidden_size // 2, dtype=torch.uint8))
        self.register_buffer("gate_up_scale", torch.ones(2 * intermediate_size))
        self.register_buffer("act_scale", torch.ones(()))
        self.register_buffer("down_weight", torch.zeros(self.out_features, intermediate_size // 2, dtype=torch.uint8))
        self.register_buffer("down_scale", torch.ones(self.out_features))
        self.register_buffer("down_act_scale", torch.ones(()))
        self._down_act_scale = 1.0  # Python float of down_act_scale: the epilogue takes it by value (no sync)
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync_scales())

    def _sync_scales(self) -> None:
        self._check_state({"act_scale": self.act_scale, "down_act_scale": self.down_act_scale})
        self._down_act_scale = float(self.down_act_scale)  # once, when built or loaded

    def _check_state(self, buffers: dict) -> None:
        op = "QuantGatedMLP"
        for name in ("act_scale", "down_act_scale"):
            if (s := buffers.get(name)) is not None:
                checks.static_scale(s, name, op, s.device)

    @staticmethod
    def check_fusable(gate, up, down, op: str = "QuantGatedMLP.from_quant_linears") -> None:
        """Raises TypeError / ValueError (naming the part) unless gate, up, down are static W4A4 QuantLinears without
        bias, gate and up alike with one shared input scale and down reading their output."""
        for name, lin in (("gate", gate), ("up", up), ("down", down)):
            if not isinstance(lin, QuantLinear):
                checks.fail(op, f"{name} must be a QuantLinear, got {type(lin).__name__}", TypeError)
            if lin.w_bits != 4 or lin.a_bits != 4 or not lin.is_static or lin.bias is not None:
                checks.fail(op, f"{name} must be static W4A4 without bias, got {lin.extra_repr()}")
        if gate.weight.shape != up.weight.shape:
            checks.fail(op, f"gate and up must have the same shape, got {tuple(gate.weight.shape)} and "
                            f"{tuple(up.weight.shape)}")
        if not torch.equal(gate.act_scale, up.act_scale):
            checks.fail(op, f"gate and up must share one input scale, got {float(gate.act_scale):.6g} and "
                            f"{float(up.act_scale):.6g}")
        if down.in_features != gate.out_features:
            checks.fail(op, f"down.in_features must be {gate.out_features} (gate's out_features), got "
                            f"{down.in_features}")

    @classmethod
    def from_quant_linears(cls, gate: QuantLinear, up: QuantLinear, down: QuantLinear, *,
                           backend: str | None = None) -> "QuantGatedMLP":
        """Fuse three static W4A4 QuantLinears without bias; gate and up must share their input scale (they read the
        same activation; PrefixQuant calibrates one quantizer for both). check_fusable says what is required."""
        cls.check_fusable(gate, up, down)
        mod = cls(gate.in_features, gate.out_features, down.out_features,
                  backend=gate.backend if backend is None else backend).to(gate.weight.device)
        with torch.no_grad():
            mod.gate_up_weight.copy_(fmt.interleave_rows(gate.weight, up.weight))
            mod.gate_up_scale.copy_(fmt.interleave_rows(gate.w_scale, up.w_scale))
            mod.act_scale.copy_(gate.act_scale)
            mod.down_weight.copy_(down.weight)
            mod.down_scale.copy_(down.w_scale)
            mod.down_act_scale.copy_(down.act_scale)
        mod._sync_scales()
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = "QuantGatedMLP"
        checks.float_tensor(x, "x", op)
        if x.shape[-1] != self.in_features:
            checks.fail(op, f"x's last dim must be {self.in_features}, got shape {tuple(x.shape)}")
        h = quant_linear_silu_mul_requant(x, self.gate_up_weight, self.gate_up_scale, self.act_scale,
                                          self._down_act_scale, backend=self.backend)
        return int4_matmul(h, self.down_weight, self.down_act_scale, self.down_scale, None, x.dtype,
                           backend=self.backend)

    def extra_repr(self) -> str:
        return (f"hidden={self.in_features}, intermediate={self.intermediate_size}, out={self.out_features}, "
                f"W4A4 static act_scale={float(self.act_scale):.4g} down_act_scale={self._down_act_scale:.4g}, "
                f"backend={self.backend!r}")
