"""fuse_mlps: replace each quantized decoder layer's MLP by ``pqk.nn.QuantGatedMLP`` (gate+up+SiLU·mul+requant in
one GEMM, then down_proj) where that is exact in structure: static W4A4 gate/up/down without bias, no online
rotation in front of down_proj, a SiLU activation, gate and up sharing their input scale. Other layers are left as
they are. In place; a transform applied after quantize_model / load_quantized (checkpoints keep the unfused layout).
"""
from __future__ import annotations

from torch import nn

from ..nn.quant_mlp import QuantGatedMLP
from .patch import decoder_layers


def _fusable(mlp: nn.Module, hidden_act: str | None) -> str | None:
    """None if mlp can be fused, else why not. hidden_act: the model config's (transformers' own SiLU module is not an
    nn.SiLU, so the config is what says which activation act_fn is)."""
    if hidden_act not in ("silu", "swish"):
        return f"activation is {hidden_act!r}, not SiLU"
    try:  # the module's own requirements (a rotated down_proj is a RotatedLinear, not a QuantLinear)
        QuantGatedMLP.check_fusable(*(getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")),
                                    op="fuse_mlps")
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def fuse_mlps(model, *, strict: bool = False) -> int:
    """Fuse every fusable MLP of a quantized Llama/Qwen model; returns how many were fused. strict=True raises
    ValueError naming the first layer that cannot be fused (and fuses nothing)."""
    layers = decoder_layers(model)
    plan = []
    for i, layer in enumerate(layers):
        why = _fusable(layer.mlp, getattr(model.config, "hidden_act", None))
        if why is None:
            plan.append(layer)
        elif strict:
            raise ValueError(f"pqk.fuse_mlps: layer {i}'s MLP cannot be fused: {why}")
    for layer in plan:
        m = layer.mlp
        layer.mlp = QuantGatedMLP.from_quant_linears(m.gate_proj, m.up_proj, m.down_proj)
    return len(plan)
