"""Prefill attention over ``[16-bit prefix | the prompt]`` without a materialized mask.

With P prefix tokens in the cache, a prompt of T tokens attends to P + T keys: every query sees the whole prefix,
and the prompt's own keys causally. That is a causal mask aligned to the bottom right, which torch's SDPA cannot
express (``is_causal`` aligns top-left when T != P + T), so transformers builds a [T, P + T] mask and the CPU
kernel runs its slower masked path (measured on one Llama-3-8B layer at T = 2048: 539 ms vs 294 ms causal).

The trick: put P placeholder (zero) queries in front of the prompt's. The attention is then square, (P + T) x
(P + T), and plain top-left ``is_causal``: query P + i sees keys 0 .. P + i, i.e. the whole prefix and prompt keys
0 .. i — exactly the mask above. The P placeholder rows are computed and dropped (P is 1-4 tokens, T thousands),
and each real row's softmax is untouched by them (rows are independent). One fused causal kernel call, no mask,
no merge; grouped-query attention stays grouped (``enable_gqa``).

On a CPU whose kernel table has the attention blocks (zmm on cpu:avx512vnni / cpu:amx; ymm with FMA on cpu:avx2 /
cpu:avxvnni), the C++ flash loop ``pqk::prefix_causal_attention`` (csrc/cpu/attention.cpp) runs instead, without
the placeholders: it visits no key block above the diagonal, widens each key row once for all G query heads of its
KV head (bf16 inputs on a CPU with AVX512-BF16 stay bf16, on `vdpbf16ps`), and ran SmolLM2's 512-token prefill
attention in 2.3 ms a layer in fp32 and 1.5 ms in bf16 against SDPA's 4.1-4.8 (docs/PERF.md, changes 17-18); the
ymm blocks, timed on the same Zen 4 against torch at its AVX2 capability, 1.7-1.9x SDPA there and 1.18x at a
Llama-3-8B layer's 2048 tokens (change 19; not yet on an AVX2-only CPU). Not where autograd needs a backward
(calibration's fine-tuning), nor on the scalar table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _cpu_kernel(query, key, value) -> bool:
    """Does pqk::prefix_causal_attention take this call (see the module doc)? Where the kernel table has the
    attention blocks: the table says so (`cpu_attention_blocks`), not its name (an AVX2 CPU without FMA, as a VM can
    report, gets no ymm blocks)."""
    from .. import _extension
    return (query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))
            and _extension.cpu_available() and _extension._C.cpu_attention_blocks())


def prefix_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_len: int,
                            scaling: float) -> torch.Tensor:
    """query float [B, H_q, T, D]; key, value [B, H_kv, P + T, D] (the P prefix keys first), H_q = G * H_kv
    -> query.dtype [B, T, H_q, D] (the layout transformers' attention functions return): softmax(q k^T * scaling) v
    with query t attending to the prefix and to prompt keys 0..t."""
    b, hq, t, d = query.shape
    hkv, p = key.shape[1], prefix_len
    if key.shape[2] != p + t or value.shape != key.shape or hq % hkv:
        raise ValueError(f"pqk.prefix_causal_attention: key/value must be [B, H_kv, {p} + {t}, D] with H_q a "
                         f"multiple of H_kv, got query {tuple(query.shape)}, key {tuple(key.shape)}")
    key, value = key.to(query.dtype), value.to(query.dtype)
    if _cpu_kernel(query, key, value):
        return torch.ops.pqk.prefix_causal_attention(query, key, value, p, scaling)
    return sdpa_prefix_causal(query, key, value, p, scaling)


def sdpa_prefix_causal(query, key, value, prefix_len: int, scaling: float) -> torch.Tensor:
    """The SDPA path of prefix_causal_attention (checked arguments, key / value of query's dtype): the P placeholder
    queries, one causal kernel call, the placeholders' rows dropped."""
    b, hq, _, d = query.shape
    p = prefix_len
    q = torch.cat([query.new_zeros(b, hq, p, d), query], 2) if p else query
    out = F.scaled_dot_product_attention(q, key, value, is_causal=True, scale=scaling, enable_gqa=hq != key.shape[1])
    return out[:, :, p:].transpose(1, 2).contiguous()
