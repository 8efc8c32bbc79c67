"""A tiny random Llama (or Qwen2) quantized and exported with pqk.export_hf, sized for vLLM's CPU attention (head_dim 32: its
kernels take multiples of 32) and for tensor parallel 2 (4 query / 2 KV heads). Run in the test environment
(transformers 5.23): ``python -m tests.serving.tiny_checkpoint OUT [--kv-bits 16] [--a-bits 8]``."""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import prefixquant_kernels as pqk
from tests.models.tiny import BOS, EOS, VOCAB, StubTokenizer, plant_outliers, text


CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}   # Qwen2: q/k/v biases


def tiny_model(arch: str = "llama", intermediate: int = 256, seed: int = 0):
    """intermediate 256 = 2^8: the down_proj rotation is a Hadamard; 304 = 19 * 16: hadamard_factor rejects it, so
    the rotation is dense."""
    cfg = CONFIGS[arch](hidden_size=128, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, max_position_embeddings=512,
                        initializer_range=0.2, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if arch == "qwen2":     # biases start at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
    return model


def write(out: str, *, arch: str = "llama", intermediate: int = 256, w_bits: int = 4, a_bits: int = 8,
          kv_bits: int = 16, seed: int = 0, k_center: bool = False, kv_mode: str = "auto") -> None:
    model = tiny_model(arch, intermediate, seed)
    hooks = plant_outliers(model)    # massive activations on BOS and one token, as a real LLM has: a real prefix
    cfg = pqk.QuantConfig(w_bits=w_bits, a_bits=a_bits, kv_bits=kv_bits, calib_samples=4, calib_seq_len=64,
                          weight_method="rtn", k_center=k_center, kv_mode=kv_mode)
    model = pqk.quantize_model(model, StubTokenizer(), text(), cfg, progress=False)
    for h in hooks:
        h.remove()
    model.config.dtype = torch.float32
    pqk.export_hf(model, out, overwrite=True, float_dtype="float32")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--arch", default="llama", choices=sorted(CONFIGS))
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--kv-bits", type=int, default=16)
    a = ap.parse_args()
    write(a.out, arch=a.arch, intermediate=a.intermediate, w_bits=a.w_bits, a_bits=a.a_bits, kv_bits=a.kv_bits)
