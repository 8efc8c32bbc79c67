"""fuse_mlps: replace each quantized decoder layer's MLP by ``pqk.nn.QuantGatedMLP`` (gate+up+SiLU·mul+requant in
one GEMM, then down_proj) where that is exact in structure: static W4A4 gate/up/down without bias, no online
rotation in front of down_proj, a SiLU activation, gate and up sharing their input scale, gate and up separate
linears (a family with a fused gate_up_proj, Phi-3, is reported unfusable: QuantGatedMLP takes the two linears).
Other layers are left as they are. In place; a transform applied after quantize_model / load_quantized
(checkpoints keep the unfused layout). The MLP's linears come from the family's ArchSpec (models/arch.py).
"""
from __future__ import annotations

from torch import nn

from ..nn.quant_mlp import QuantGatedMLP
from .arch import ArchSpec, decoder_layers, get_spec, set_module


def _module_or_none(layer: nn.Module, path: str) -> nn.Module | None:
    try:                    # an already fused MLP has no gate_proj: check_fusable reports it
        return layer.get_submodule(path)
    except AttributeError:
        return None


def _fusable(layer: nn.Module, spec: ArchSpec, hidden_act: str | None) -> str | None:
    """None if the layer's MLP can be fused, else why not. hidden_act: the model config's (transformers' own SiLU
    module is not an nn.SiLU, so the config is what says which activation act_fn is)."""
    if spec.fused_gate_up:
        return (f"{spec.model_type} has one fused {spec.gate} (QuantGatedMLP takes separate gate and up linears)")
    if hidden_act not in ("silu", "swish"):
        return f"activation is {hidden_act!r}, not SiLU"
    try:  # the module's own requirements (a rotated down_proj is a RotatedLinear, not a QuantLinear)
        QuantGatedMLP.check_fusable(*(_module_or_none(layer, n) for n in (spec.gate, spec.up, spec.down)),
                                    op="fuse_mlps")
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def fuse_mlps(model, *, strict: bool = False) -> int:
    """Fuse every fusable MLP of a quantized model; returns how many were fused. strict=True raises
    ValueError naming the first layer that cannot be fused (and fuses nothing)."""
    spec = get_spec(model)
    layers = decoder_layers(model)
    plan = []
    for i, layer in enumerate(layers):
        why = _fusable(layer, spec, getattr(model.config, "hidden_act", None))
        if why is None:
            plan.append(layer)
        elif strict:
            raise ValueError(f"pqk.fuse_mlps: layer {i}'s MLP cannot be fused: {why}")
    for layer in plan:
        set_module(layer, spec.mlp, QuantGatedMLP.from_quant_linears(
            *(layer.get_submodule(n) for n in (spec.gate, spec.up, spec.down))))
    return len(plan)
