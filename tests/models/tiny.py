"""Tiny random Llama / Mistral / Qwen2 / Qwen3 / Phi-3 models and a stub tokenizer, shared by tests/models and
tests/calibration. Every registered family (prefixquant_kernels/models/arch.py) has a tiny config here."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

from prefixquant_kernels.models.arch import decoder_layers, get_spec

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "phi3": Phi3Config}
# what a family's config needs beyond the shared sizes: Mistral without its sliding window (the window is longer
# than any test sequence anyway; without it the fused decode path applies); Phi-3's special ids inside the vocabulary
EXTRA = {"mistral": dict(sliding_window=None), "phi3": dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)}
VOCAB, BOS, EOS, OUTLIER = 128, 1, 2, 9     # OUTLIER: the token planted_outlier() makes massive


class StubTokenizer:
    """Characters -> ids 3..122 (so BOS=1, EOS=2 never come from text); the interface the pipeline uses."""

    def __init__(self, bos_token_id=BOS, eos_token_id=EOS):
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id

    def encode(self, text, add_special_tokens=False):
        ids = [3 + (ord(c) % 120) for c in text]
        return ([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []) + ids

    def decode(self, ids):
        return "".join(chr(max(i - 3, 0) + 32) for i in ids)


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 2, intermediate: int = 128):
    cfg = CONFIGS[arch](hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, **EXTRA.get(arch, {}))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def text(n_chars: int = 3000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    words = ["the", "cat", "sat", "on", "mat", "and", "dog", "ran", "far", "away", "quick", "brown"]
    idx = torch.randint(0, len(words), (n_chars // 4,), generator=g).tolist()
    return " ".join(words[i] for i in idx)[:n_chars]


def plant_outliers(model, tokens=(BOS, OUTLIER), gain: float = 300.0):
    """Make the model behave like a real LLM: in every layer the down_proj inputs of the given tokens (BOS, which
    starts every sequence, and OUTLIER) become ``gain`` times larger: massive token-wise activations. The hooks sit
    on the embedding and on each MLP activation (the spec's act_fn: mlp.act_fn, Phi-3's mlp.activation_fn), which
    survive the module swap. Returns the hook handles."""
    seen = {}
    handles = [model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: seen.__setitem__("ids", args[0]))]

    def spike(mod, args, out):
        mask = torch.isin(seen["ids"], torch.tensor(tokens))
        return out * torch.where(mask, gain, 1.0).unsqueeze(-1).to(out.dtype)

    spec = get_spec(model)
    acts = {id(a): a for a in (layer.get_submodule(spec.act_fn) for layer in decoder_layers(model))}
    handles += [act.register_forward_hook(spike) for act in acts.values()]
    return handles
