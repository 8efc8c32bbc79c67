"""quantize_lm_head: the output projection as a W8A8 QuantLinear (int8 weights per output channel, the hidden
state quantized per token inside the GEMM), for decode speed on a CPU: at batch 1 the lm_head of a small model is
its largest GEMV (SmolLM2: 576 x 49152, 56 MB in bf16, 3.6-6.5 ms a step through oneDNN; W8A8 1.4 ms on
AVX512-VNNI, docs/PERF.md "Compiled decode step"). llama.cpp's SmolLM2 GGUF keeps its output matrix in Q8_0, the
same precision class. A transform applied after quantize_model / load_quantized (checkpoints keep the float
lm_head); the input embedding keeps its float weight when the two were tied. Its effect on the logits:
docs/ACCURACY.md.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.quant_linear import QuantLinear


def quantize_lm_head(model, bits: int = 8) -> QuantLinear:
    """Replace ``model.get_output_embeddings()`` (an nn.Linear) by a W``bits``A8 QuantLinear with per-token
    activation scales; returns it. bits: 8 (4 is allowed, for experiments: a 4-bit output matrix moves logits
    visibly). ValueError / TypeError for another width or an output layer that is not a float nn.Linear."""
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"pqk.quantize_lm_head: bits must be 8 (or 4), got {bits!r}")
    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear):
        raise ValueError("pqk.quantize_lm_head: the lm_head is already quantized")
    if not isinstance(head, nn.Linear) or not head.weight.is_floating_point():
        raise TypeError(f"pqk.quantize_lm_head: the output embeddings must be a float torch.nn.Linear, got "
                        f"{type(head).__name__}")
    with torch.no_grad():
        q = QuantLinear.from_float(head, w_bits=bits, a_bits=8, act_scale=None)
    emb = model.get_input_embeddings()
    if emb is not None and emb.weight is head.weight:   # tied: the embedding keeps the float matrix
        model.config.tie_word_embeddings = False
    model.set_output_embeddings(q)
    return q
