"""A quantized model's float glue on the CPU: every RMSNorm of a supported family (each decoder layer's input and
post-attention norms, Qwen3's q / k norms, the final norm) runs ``pqk::rms_norm`` (csrc/cpu/float_ops.cpp) where its
input is a CPU tensor of the weight's dtype and no backward is needed, else the module's own forward; and the rotary
embedding of q / k (``apply_rotary_pos_emb`` of Llama, Qwen2/3, Mistral) runs ``pqk::rope`` under the same terms.

Hugging Face's RMSNorm is ~8 torch ops, each a pass over the whole activation (to fp32, pow, mean, add, rsqrt, mul,
back to the model's type, times the weight); the op is one pass with the same two roundings (bit-identical in bf16
on the shapes measured; fp32 may differ by an ulp of the variance: the op sums the squares in double). On SmolLM2's
512-token bf16 prefill (61 norms) it took 26 ms of 339 off (7.8 %, one interleaved A/B; docs/PERF.md, change 18).

Installed by models/patch.py's ``swap``, on the module instances (an instance ``forward``): the modules keep their
class, weight and state dict, so models/decode_layer.py and the checkpoints still read them as before.

The rotary embedding is a function of the modeling module, which the attention forward looks up by name: it is
replaced there (``use_cpp_rope``), for every model of that family in the process, by a function that takes the op
only where it is bit-identical to the original (CPU, one dtype, the [B, H, T, D] / [B, T, D] layout, no backward)
and calls the original otherwise. torch's version is ~7 passes (two products, two slices, a negation, a cat, a sum)
and leaves q / k in the projection's transposed layout, which the attention then copies; the op's output is
contiguous. On SmolLM2's 512-token bf16 prefill the rotary embedding took ~7-16 ms of ~268 (PERF change 20).
"""
from __future__ import annotations

import sys
import types

import torch

from .. import _extension

NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Phi3RMSNorm"})  # one formula


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if (hidden_states.device.type == "cpu" and hidden_states.dtype == w.dtype
            and not (torch.is_grad_enabled() and (hidden_states.requires_grad or w.requires_grad))):
        return torch.ops.pqk.rms_norm(hidden_states, w, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def use_cpp_norms(model) -> int:
    """Point every RMSNorm of a known family in `model` at pqk::rms_norm (idempotent); returns how many were set.
    Nothing is set without the C++ extension."""
    if not _extension.cpu_available():
        return 0
    n = 0
    for mod in model.modules():
        if type(mod).__name__ in NORMS and "forward" not in vars(mod):
            mod.forward = types.MethodType(_rms_norm_forward, mod)
            n += 1
    return n


# one formula: Llama's apply_rotary_pos_emb / rotate_half (Phi-3's rotates a partial dim, Gemma's differ)
ROPE_MODULES = frozenset({"transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
                          "transformers.models.qwen3.modeling_qwen3", "transformers.models.mistral.modeling_mistral"})


def _rope_function(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (unsqueeze_dim == 1 and q.device.type == "cpu" and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3
                and q.dtype == k.dtype == cos.dtype == sin.dtype and cos.shape == sin.shape
                and q.shape[-1] % 2 == 0 and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:]
                and cos.shape[0] in (1, q.shape[0]) and cos.shape[1:] == q.shape[2:]
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, cos, sin)))):
            return torch.ops.pqk.rope(q, cos, sin), torch.ops.pqk.rope(k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.pqk_original = original
    return apply_rotary_pos_emb


def use_cpp_rope(model) -> bool:
    """Point the rotary embedding of `model`'s modeling module at pqk::rope (idempotent; a family outside
    ROPE_MODULES keeps its own); True where it was set now. Nothing is set without the C++ extension."""
    name = type(model).__module__
    module = sys.modules.get(name)
    if not _extension.cpu_available() or name not in ROPE_MODULES or module is None:
        return False
    current = getattr(module, "apply_rotary_pos_emb", None)
    if current is None or hasattr(current, "pqk_original"):
        return False
    module.apply_rotary_pos_emb = _rope_function(current)
    return True
