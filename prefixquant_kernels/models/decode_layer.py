"""A decoder layer of the compiled CPU decode step as one op: ``pqk::decode_layer`` (csrc/cpu/decode_layer.cpp).

Traced as the model's code, one decode layer is ~6 pqk op calls and 4 inductor kernels stitched by ~60 Python
statements of inductor's wrapper: ~115 us a layer on 2 AVX2 cores around ~200 us of GEMV and attention (SmolLM2,
docs/PERF.md, change 15). The op runs the same layer in one C++ call: RMSNorm, q|k|v, Qwen3's q/k norms, RoPE, the
cache's key rotation and offset, the quantized cache write, the decode attention, o, the residuals, gate|up,
SiLU-mul, down_proj's online Hadamard and down.

``op_inputs(layer, cache_layer, hidden)`` says whether a layer is one the op computes exactly as its modules do, and
collects the modules' tensors if so: a Llama / Qwen2 / Qwen3 decoder layer (no sliding window) whose seven linears
are static ``QuantLinear``s on the CPU kernels (down_proj may be a Hadamard-form ``RotatedLinear`` around one), with
RMSNorms, a SiLU MLP, float32 hidden states and a static cache on the CPU kernels. Any other layer (a fused
QuantGatedMLP, a dense rotation, dynamic activations, bf16, the reference backend) keeps its traced forward
(models/layer_region.py). Read while dynamo traces; the step's graph then holds one op node per layer.
"""
from __future__ import annotations

import torch

from ..hadamard import hadamard_factor, hadamard_matrix
from ..nn.quant_linear import QuantLinear
from ..ops.backend import resolve
from .attention import _key_mask
from .rotated_linear import RotatedLinear

LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")

_HADAMARD: dict[int, torch.Tensor] = {}   # m -> float32 [m, m] H_m (down_proj's online Hadamard), made once


def _is_rms_norm(mod) -> bool:
    return (type(mod).__name__.endswith("RMSNorm") and isinstance(getattr(mod, "weight", None), torch.Tensor)
            and mod.weight.dtype == torch.float32 and isinstance(getattr(mod, "variance_epsilon", None), float))


def _linear(mod, device) -> tuple | None:
    """(cpu_isa, (w, w_scale, a_scale, bias, a_bits)) of a static QuantLinear that runs on the CPU kernels."""
    if type(mod) is not QuantLinear or not mod.is_static:
        return None
    be = resolve(mod.backend, device, "quant_linear")
    return (be.cpu_isa, (mod.weight, mod.w_scale, mod.act_scale, mod.bias, mod.a_bits)) if be.kind == "cpu" else None


def prepare(layer) -> None:
    """Before tracing: build the H_m a layer's Hadamard-form down_proj needs (outside the trace: hadamard_matrix
    checks its construction with data-dependent asserts)."""
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if isinstance(down, RotatedLinear) and down.form == "hadamard":
        m, _ = hadamard_factor(down.in_features)
        if m not in _HADAMARD:
            _HADAMARD[m] = hadamard_matrix(m, torch.float32)


def op_inputs(layer, cache_layer, hidden: torch.Tensor) -> dict | None:
    """The module side of one layer's pqk::decode_layer call, or None when the op does not compute this layer (the
    module docstring says which do)."""
    if (type(layer).__name__ not in LAYERS or hidden.dtype != torch.float32 or hidden.device.type != "cpu"
            or getattr(cache_layer, "kind", None) != "cpu"):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
        return None                     # the op calls no module: a hook would not run
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(attn, "sliding_window", None) is not None or type(getattr(mlp, "act_fn", None)).__name__ not in (
            "SiLUActivation", "SiLU"):
        return None
    if not (_is_rms_norm(layer.input_layernorm) and _is_rms_norm(layer.post_attention_layernorm)):
        return None
    qk_norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
    if any(n is not None for n in qk_norms) and not all(n is not None and _is_rms_norm(n) for n in qk_norms):
        return None
    down = getattr(mlp, "down_proj", None)
    signs = had = None
    if isinstance(down, RotatedLinear):
        if down.form != "hadamard":
            return None
        m, _ = hadamard_factor(down.in_features)
        if m not in _HADAMARD:   # made by prepare() before the trace (its construction is not traceable)
            return None
        signs, had, down = down.signs, _HADAMARD[m], down.linear
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
    lins = [_linear(getattr(attn if i < 4 else mlp, n, None), hidden.device) for i, n in enumerate(names)]
    lins.append(_linear(down, hidden.device))
    if any(l is None for l in lins) or len({isa for isa, _ in lins}) != 1:
        return None
    (q, k, v, o, g, u, d) = [args for _, args in lins]
    if len({q[4], k[4], v[4]}) != 1 or g[4] != u[4]:
        return None                     # the shared-input linears quantize their input once: one a_bits each
    return {"norm1": layer.input_layernorm, "norm2": layer.post_attention_layernorm, "q_norm": qk_norms[0],
            "k_norm": qk_norms[1], "qkv": (q, k, v), "o": o, "gate_up": (g, u), "down": d, "down_signs": signs,
            "down_had": had, "sm_scale": attn.scaling, "cpu_isa": lins[0][0]}


def forward(mods: dict, hidden, attention_mask, cos, sin, key_rotation, consts, k, v, length, key_scale,
            value_scale, pk, pv, key_offset) -> torch.Tensor:
    """hidden float32 [B, 1, hidden] -> the layer's output; the cache tensors as layer_region.layer_tensors gives
    them (k, v: the body buffers, length: int64 [1], pk / pv: the prefix or None); consts: (kv bits, ...)."""
    qn, kn = mods["q_norm"], mods["k_norm"]
    (q, k_, v_), (g, u), o, d = mods["qkv"], mods["gate_up"], mods["o"], mods["down"]
    out = torch.ops.pqk.decode_layer(
        hidden, cos.contiguous(), sin.contiguous(), _key_mask(attention_mask), mods["norm1"].weight.contiguous(),
        mods["norm1"].variance_epsilon, [q[0], k_[0], v_[0]], [q[1], k_[1], v_[1]], [q[2], k_[2], v_[2]],
        [q[3], k_[3], v_[3]], q[4], None if qn is None else qn.weight.contiguous(),
        None if kn is None else kn.weight.contiguous(),
        1e-6 if qn is None else qn.variance_epsilon, key_rotation, key_offset, k, v, length, key_scale, value_scale,
        pk, pv, consts[0], mods["sm_scale"], o[0], o[1], o[2], o[3], o[4], mods["norm2"].weight.contiguous(),
        mods["norm2"].variance_epsilon, [g[0], u[0]], [g[1], u[1]], [g[2], u[2]], [g[3], u[3]], g[4],
        mods["down_signs"], mods["down_had"], d[0], d[1], d[2], d[3], d[4], cpu_isa=mods["cpu_isa"])
    length.add_(1)   # here, not in the op (ops/library.py says why)
    return out
