"""A quantized model's float glue on the CPU: every RMSNorm of a supported family (each decoder layer's input and
post-attention norms, Qwen3's q / k norms, the final norm) runs ``pqk::rms_norm`` (csrc/cpu/float_ops.cpp) where its
input is a CPU tensor of the weight's dtype and no backward is needed, else the module's own forward.

Hugging Face's RMSNorm is ~8 torch ops, each a pass over the whole activation (to fp32, pow, mean, add, rsqrt, mul,
back to the model's type, times the weight); the op is one pass with the same two roundings (bit-identical in bf16
on the shapes measured; fp32 may differ by an ulp of the variance: the op sums the squares in double). On SmolLM2's
512-token bf16 prefill (61 norms) it took 26 ms of 339 off (7.8 %, one interleaved A/B; docs/PERF.md, change 18).

Installed by models/patch.py's ``swap``, on the module instances (an instance ``forward``): the modules keep their
class, weight and state dict, so models/decode_layer.py and the checkpoints still read them as before.
"""
from __future__ import annotations

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
