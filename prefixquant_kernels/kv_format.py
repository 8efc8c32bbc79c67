"""The KV-cache quantization formats in plain PyTorch: the definition every KV kernel matches.

A cache tensor (keys or values) of one layer is ``[B, H, N, D]`` (batch, KV heads, tokens, head dim) and is
held in three parts, in this order along the tokens::

    [ 16-bit prefix (P tokens) | quantized body (Nq tokens) | 16-bit tokens (Nt tokens) ]

The prefix (PrefixQuant's outlier tokens) is never quantized; the 16-bit tokens are KIVI's recent window or
LogQuant's log-selected tokens. ``dequant_concat`` puts all three into one ``[B, H, P + Nq + Nt, D]`` tensor.

**Static symmetric, per KV head (PrefixQuant; bits 4 or 8).** The convention of ``format.py`` with one
calibrated float32 scale per head::

    q[b, h, t, d] = clamp(round_half_to_even(x[b, h, t, d] / scale[h]), -2^(b-1), 2^(b-1)-1)   (fp32)
    x_hat = q * scale[h]                                                                      (fp32)

NaN -> 0, +-Inf saturate. bits=4: packed along D with ``format.pack_int4`` (element 2i in the low nibble
of byte i) -> uint8 ``[B, H, T, D//2]``; bits=8: int8 ``[B, H, T, D]``.

**Group-wise asymmetric (KIVI / LogQuant; bits 2 or 4).** Over each group of G values, in float32::

    v    = clamp(nan_to_num(x, nan=0), -65504, 65504)       # the fp16 range: scale and zero are stored in fp16
    zero = fp16(min(v))                                       # rounded to nearest even
    scale = fp16((max(v) - min(v)) / (2^b - 1))               # fp32 division, then rounded to fp16
    q = clamp(round_half_to_even((v - zero) / scale), 0, 2^b - 1)  if scale > 0  else 0
    x_hat = q * scale + zero                                  # fp32 multiply, then fp32 add (no fused FMA)

The quantizer divides by the *stored* fp16 scale and subtracts the stored fp16 zero, so dequantization
inverts exactly what was rounded. Groups (``axis``):

* ``"token"`` (values, per-token): G consecutive channels of one token; scale/zero ``[B, H, T, D//G]``.
* ``"channel"`` (keys, per-channel): G consecutive tokens of one channel; scale/zero ``[B, H, T//G, D]``.

Packing (unsigned, any b dividing 8): ``8 // b`` values per byte along D, element ``(8//b)*i + j`` at bits
``b*j .. b*j + b-1`` of byte i. For b=2: element 4i+j at bits 2j..2j+1 -> uint8 ``[B, H, T, D//4]``; for
b=4 the nibble order is that of ``format.pack_int4``.
"""
from __future__ import annotations

import torch

from . import format as fmt

__all__ = [
    "FP16_MAX",
    "GROUP_AXES",
    "pack_bits",
    "unpack_bits",
    "quantize_static",
    "dequantize_static",
    "quantize_groupwise",
    "dequantize_groupwise",
    "body_positions",
    "dequant_concat",
]

FP16_MAX = 65504.0
GROUP_AXES = ("token", "channel")


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., K] with values in [0, 2^bits) (K a multiple of 8 // bits) -> uint8 [..., K * bits // 8]."""
    per = 8 // bits
    q = q.reshape(*q.shape[:-1], q.shape[-1] // per, per).to(torch.uint8)
    out = torch.zeros(q.shape[:-1], dtype=torch.uint8, device=q.device)
    for j in range(per):
        out |= q[..., j] << (bits * j)
    return out


def unpack_bits(p: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., K * bits // 8] -> uint8 [..., K] (inverse of pack_bits)."""
    per, mask = 8 // bits, (1 << bits) - 1
    q = torch.stack([(p >> (bits * j)) & mask for j in range(per)], dim=-1)
    return q.flatten(-2)


def _per_head(scale: torch.Tensor) -> torch.Tensor:
    return scale.float().reshape(1, -1, 1, 1)


def quantize_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """x float [B, H, T, D], scale float32 [H] -> uint8 [B, H, T, D//2] (bits 4) or int8 [B, H, T, D] (bits 8)."""
    q = fmt.quantize(x, _per_head(scale), bits)
    return fmt.pack_int4(q) if bits == 4 else q


def dequantize_static(packed: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of quantize_static up to rounding -> float32 [B, H, T, D]."""
    q = fmt.unpack_int4(packed) if bits == 4 else packed
    return q.float() * _per_head(scale)


def _grouped(v: torch.Tensor, group_size: int, axis: str) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, T, D//G, G] (axis token) or [B, H, T//G, G, D] (axis channel)."""
    b, h, t, d = v.shape
    if axis == "token":
        return v.reshape(b, h, t, d // group_size, group_size)
    return v.reshape(b, h, t // group_size, group_size, d)


def _red_dim(axis: str) -> int:
    return -1 if axis == "token" else -2


def quantize_groupwise(x: torch.Tensor, bits: int, group_size: int, axis: str):
    """x float [B, H, T, D] -> (packed uint8 [B, H, T, D*bits//8], scale fp16, zero fp16) (shapes: module doc)."""
    v = torch.nan_to_num(x.float(), nan=0.0).clamp(-FP16_MAX, FP16_MAX)
    g = _grouped(v, group_size, axis)
    red = _red_dim(axis)
    mn, mx = g.amin(dim=red, keepdim=True), g.amax(dim=red, keepdim=True)
    zero16 = mn.to(torch.float16)
    scale16 = ((mx - mn) / ((1 << bits) - 1)).to(torch.float16)
    s, z = scale16.float(), zero16.float()
    q = torch.round((g - z) / s).clamp_(0, (1 << bits) - 1)
    q = torch.where(s > 0, q, torch.zeros((), dtype=q.dtype, device=q.device)).to(torch.uint8)
    return pack_bits(q.reshape(x.shape), bits), scale16.squeeze(red), zero16.squeeze(red)


def dequantize_groupwise(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                         group_size: int, axis: str) -> torch.Tensor:
    """Inverse of quantize_groupwise up to rounding -> float32 [B, H, T, D]."""
    q = unpack_bits(packed, bits).float()
    g = _grouped(q, group_size, axis)
    red = _red_dim(axis)
    y = g * scale.float().unsqueeze(red)
    y = y + zero.float().unsqueeze(red)
    return y.reshape(q.shape)


def body_positions(n_body: int, tail_pos: torch.Tensor | None, device=None) -> torch.Tensor:
    """Where the body rows go when the tail's rows go to ``tail_pos``: the complement of tail_pos in
    [0, n_body + len(tail_pos)), increasing (int64 [n_body]). No tail_pos: the body comes first."""
    if tail_pos is None:
        return torch.arange(n_body, device=device)
    n = n_body + tail_pos.numel()
    free = torch.ones(n, dtype=torch.bool, device=tail_pos.device)
    free[tail_pos.long()] = False
    return free.nonzero().flatten()


def dequant_concat(prefix: torch.Tensor | None, body: torch.Tensor, tail: torch.Tensor | None,
                   body_pos: torch.Tensor | None, tail_pos: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """[prefix | body and tail rows at their positions] -> out_dtype [B, H, P + Nq + Nt, D].

    prefix: [1 or B, H, P, D] or None; body: dequantized float32 [B, H, Nq, D]; tail: 16-bit [B, H, Nt, D] or
    None; body_pos / tail_pos: row positions after the prefix (None: body then tail, in order).
    """
    b, h, nq, d = body.shape
    p = 0 if prefix is None else prefix.shape[2]
    nt = 0 if tail is None else tail.shape[2]
    out = torch.empty(b, h, p + nq + nt, d, dtype=out_dtype, device=body.device)
    if p:
        out[:, :, :p] = prefix.expand(b, h, p, d).to(out_dtype)
    bp = torch.arange(nq, device=body.device) if body_pos is None else body_pos.long()
    out[:, :, p + bp] = body.to(out_dtype)
    if nt:
        tp = nq + torch.arange(nt, device=body.device) if tail_pos is None else tail_pos.long()
        out[:, :, p + tp] = tail.to(out_dtype)
    return out


def decode_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, k_packed: torch.Tensor,
                     v_packed: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, bits: int,
                     sm_scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference decode attention: dequantize the body, put the prefix in front, attend in fp32 (GQA by
    repeating each KV head for its H_q / H_kv query heads). q [B, H_q, D] -> q.dtype [B, H_q, D].
    mask: bool [B, P + T] (True = attend) or None; a row that masks every position gives zeros. A masked
    position takes no part at all (its V is not multiplied by 0, so an inf there stays out); NaN / inf scores
    among the attended positions go through the softmax as they come (an all -inf row: NaN), as without a mask."""
    B, Hq, D = q.shape
    k = torch.cat([prefix_k.float().expand(B, -1, -1, -1), dequantize_static(k_packed, k_scale, bits).float()], 2)
    v = torch.cat([prefix_v.float().expand(B, -1, -1, -1), dequantize_static(v_packed, v_scale, bits).float()], 2)
    g = Hq // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = torch.einsum("bhd,bhnd->bhn", q.float() * sm_scale, k)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
        v = v.masked_fill(~mask[:, None, :, None], 0.0)
    p = torch.softmax(s, dim=-1)
    if mask is not None:   # a row with no attended position: softmax gives NaN, the row attends to nothing
        p = torch.where(mask.any(-1)[:, None, None], p, 0.0)
    return torch.einsum("bhn,bhnd->bhd", p, v).to(q.dtype)


# ---- the static body in a paged cache (vLLM's) -----------------------------------------------------------------
# cache uint8 [blocks, H, block_size, 2 * c], c = D // 2 (bits 4) or D (bits 8): per token-head its K codes, then
# its V codes, each as quantize_static lays out one row. Position p of a sequence whose block table row is
# ``table`` sits in block table[p // block_size] at offset p % block_size. The ops: ops/kv.py (kv_write_paged,
# kv_decode_paged); the C++ kernels: csrc/cpu/kernels.h (KVBody, kv_write_paged_static).

def write_paged(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                k_scale: torch.Tensor, v_scale: torch.Tensor, bits: int,
                key_offset: torch.Tensor | None = None) -> None:
    """Reference paged write: token t < n = len(slot_mapping) of key / value float [T >= n, H, D] quantized with
    the per-head static scales into slot slot_mapping[t] (int64; < 0: skipped) of ``cache`` (in place). K is first
    shifted, ``(K.float() - key_offset[h]).to(K.dtype)`` (key_offset float [H, D] or None), as transform_keys does."""
    n, bs, c = slot_mapping.shape[0], cache.shape[2], cache.shape[3] // 2
    k, v = key[:n], value[:n]
    if key_offset is not None:
        k = (k.float() - key_offset.float()).to(k.dtype)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for x, scale, side in ((k, k_scale, slice(0, c)), (v, v_scale, slice(c, 2 * c))):
        codes = quantize_static(x.transpose(0, 1)[None], scale, bits)[0].transpose(0, 1)   # [n, H, c]
        cache[slots // bs, :, slots % bs, side] = codes.view(torch.uint8)[keep]


def decode_paged(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, cache: torch.Tensor,
                 block_table: torch.Tensor, seq_lens: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
                 bits: int, sm_scale: float) -> torch.Tensor:
    """Reference paged decode attention: sequence b (q float [B, H_q, D]) attends to the prefix (float [1 or B,
    H_kv, P, D]) and to its body positions P .. seq_lens[b] - 1, read from ``cache`` through its row of
    block_table (int [B, width]): the body gathered into [B, H_kv, N, c] (N = the longest body; the others' padding
    masked) and attended by decode_attention."""
    B, P = q.shape[0], prefix_k.shape[2]
    bs, c2 = cache.shape[2], cache.shape[3]
    c = c2 // 2
    lens = seq_lens.long() - P                                                              # [B] body rows
    width = int(lens.max()) if B else 0
    pos = P + torch.arange(width, device=q.device)
    valid = torch.arange(width, device=q.device)[None] < lens[:, None]                      # [B, N]
    idx = (pos // bs)[None].expand(B, -1).clamp(max=max(block_table.shape[1] - 1, 0))
    blocks = torch.where(valid, block_table.long().gather(1, idx), 0) if width else idx    # padding: block 0
    codes = cache[blocks, :, (pos % bs)[None].expand(B, -1)].transpose(1, 2)               # [B, H_kv, N, 2c]
    dt = torch.uint8 if bits == 4 else torch.int8
    kb, vb = codes[..., :c].view(dt), codes[..., c:].view(dt)
    mask = torch.cat([torch.ones(B, P, dtype=torch.bool, device=q.device), valid], 1)
    return decode_attention(q, prefix_k, prefix_v, kb, vb, k_scale, v_scale, bits, sm_scale, mask)
