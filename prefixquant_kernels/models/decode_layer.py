"""A decoder layer of the compiled CPU decode step as one op: ``pqk::decode_layer`` (csrc/cpu/decode_layer.cpp).

Traced as the model's code, one decode layer is ~6 pqk op calls and 4 inductor kernels stitched by ~60 Python
statements of inductor's wrapper. The op runs the same layer in one C++ call: RMSNorm, q|k|v, Qwen3's q/k norms,
RoPE, the cache's key rotation and offset, the quantized cache write, the decode attention, o, the residuals,
gate|up, SiLU-mul, down_proj's online Hadamard and down (docs/PERF.md, change 15).

Which layers: a Llama / Qwen2 / Qwen3 decoder layer (no sliding window) whose seven linears are static
``QuantLinear``s on the CPU kernels (down_proj may be a Hadamard-form ``RotatedLinear`` around one), with RMSNorms
and a SiLU MLP, run with float32, bfloat16 or float16 hidden states over a static cache on the CPU kernels, no hooks
(a bf16 / fp16 layer's norm weights and linear scales are registered as float32 copies: the op computes in fp32 and
rounds its output once). Any other layer (a fused QuantGatedMLP, a dense rotation, dynamic activations, the
reference backend) keeps its traced forward (models/layer_region.py).

The module side of a layer (its norms, linears and rotation, ~40 values) is registered into a C++ slot by
``register`` (layer_region.install, outside the trace, at every ``get_compiled_call``: a generate call sees the
model's current tensors); the traced step passes the slot number and the cache's tensors. ``_Slot`` releases the slot
when its layer is garbage-collected, so the registry holds no model's weights longer than the model lives.
"""
from __future__ import annotations

import torch

from .. import _extension
from ..hadamard import hadamard_factor, hadamard_matrix
from ..nn.quant_linear import QuantLinear
from ..ops.backend import resolve
from .attention import _key_mask
from .rotated_linear import RotatedLinear

LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


class _Slot:
    """A registered slot, held by its layer (``layer._pqk_decode_slot``); released with the layer."""

    def __init__(self, index: int):
        self.index = index

    def __del__(self):
        c = getattr(_extension, "_C", None)    # at interpreter exit the module may be gone
        if c is not None:
            c.decode_layer_release(self.index)


FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)   # the hidden states' dtypes the op takes


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as a contiguous float32 tensor (itself when it is one): what the op reads of a module."""
    return None if t is None else t.float().contiguous()


def _is_rms_norm(mod) -> bool:
    return (type(mod).__name__.endswith("RMSNorm") and isinstance(getattr(mod, "weight", None), torch.Tensor)
            and mod.weight.dtype in FLOAT_TYPES and isinstance(getattr(mod, "variance_epsilon", None), float))


def _linear(mod, device) -> tuple | None:
    """(cpu_isa, [w, w_scale, a_scale, bias], a_bits) of a static QuantLinear that runs on the CPU kernels."""
    if type(mod) is not QuantLinear or not mod.is_static:
        return None
    be = resolve(mod.backend, device, "quant_linear")
    if be.kind != "cpu":
        return None
    return be.cpu_isa, [mod.weight, _f32(mod.w_scale), _f32(mod.act_scale), _f32(mod.bias)], mod.a_bits


def _module_args(layer) -> tuple | None:
    """decode_layer_register's arguments after the slot for this layer, or None when the op does not compute it."""
    if type(layer).__name__ not in LAYERS:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(attn, "sliding_window", None) is not None or type(getattr(mlp, "act_fn", None)).__name__ not in (
            "SiLUActivation", "SiLU"):
        return None
    norms = [layer.input_layernorm, layer.post_attention_layernorm,
             getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)]
    if not all(_is_rms_norm(n) for n in norms[:2]) or not (
            (norms[2] is None and norms[3] is None) or all(_is_rms_norm(n) for n in norms[2:])):
        return None
    down, rotation = getattr(mlp, "down_proj", None), []
    if isinstance(down, RotatedLinear):
        if down.form != "hadamard":
            return None
        m, _ = hadamard_factor(down.in_features)
        rotation, down = [_f32(down.signs), hadamard_matrix(m, torch.float32)], down.linear
    device = layer.input_layernorm.weight.device
    lins = [_linear(getattr(attn, n, None), device) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    lins += [_linear(getattr(mlp, n, None), device) for n in ("gate_proj", "up_proj")] + [_linear(down, device)]
    if any(l is None for l in lins) or len({l[0] for l in lins}) != 1:
        return None
    bits = [l[2] for l in lins]
    if len(set(bits[:3])) != 1 or bits[4] != bits[5]:
        return None                     # the shared-input linears quantize their input once: one a_bits each
    return (attn.head_dim, [None if n is None else _f32(n.weight) for n in norms],
            [norms[0].variance_epsilon, norms[1].variance_epsilon,
             1e-6 if norms[2] is None else norms[2].variance_epsilon],
            [l[1] for l in lins], [bits[0], bits[3], bits[4], bits[6]], rotation, float(attn.scaling), lins[0][0])


def register(layer) -> None:
    """Register (or refresh) the layer's module side in its slot; a layer the op does not compute loses its slot."""
    args = _module_args(layer) if _extension.cpu_available() else None
    slot = layer.__dict__.get("_pqk_decode_slot")
    if args is None:
        layer.__dict__.pop("_pqk_decode_slot", None)
        return
    index = _extension._C.decode_layer_register(-1 if slot is None else slot.index, *args)
    if slot is None:
        layer.__dict__["_pqk_decode_slot"] = _Slot(index)


def slot_of(layer, cache_layer, hidden: torch.Tensor) -> int | None:
    """The layer's slot when this call can take the op (read while dynamo traces the step), else None."""
    slot = layer.__dict__.get("_pqk_decode_slot")
    if (slot is None or hidden.dtype not in FLOAT_TYPES or hidden.device.type != "cpu"
            or getattr(cache_layer, "kind", None) != "cpu"):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
        return None                     # the op calls no module: a hook would not run
    return slot.index


def forward(slot: int, hidden, attention_mask, cos, sin, k, v, length, key_scale, value_scale, pk, pv, key_rotation,
            key_offset) -> torch.Tensor:
    """hidden float32 / bf16 / fp16 [B, 1, hidden] -> the layer's output (its dtype); the cache tensors as
    layer_region.layer_tensors gives them (k, v: the body buffers, length: int64 [1], advanced here; pk / pv: the
    prefix or None)."""
    out = torch.ops.pqk.decode_layer(hidden, cos.contiguous(), sin.contiguous(), _key_mask(attention_mask), k, v,
                                     length, key_scale, value_scale, pk, pv, key_rotation, key_offset, slot)
    length.add_(1)   # here, not in the op (ops/library.py says why)
    return out
