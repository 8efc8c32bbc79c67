"""Triton kernels for the quantized KV cache (formats: prefixquant_kernels/kv_format.py).

Data flow: new K/V ``[B, H, T, D]`` -> quantize (static per-head, or group-wise asymmetric) -> packed body ->
dequant-concat: ``[prefix | body | 16-bit tail]`` written straight into one preallocated ``[B, H, P+N, D]``.

Tricks used throughout, chosen so the kernels give the reference's bits on a GPU *and* under TRITON_INTERPRET=1:
* division is ``tl.div_rn`` (IEEE round-to-nearest): a plain ``/`` on fp32 lowers to an approximate divide.
* round-half-to-even is ``(v + 1.5 * 2^23) - 1.5 * 2^23`` on a value already clamped to the integer range:
  fp32 addition rounds to nearest even at the unit place there. (``libdevice.rint`` would do on a GPU but has
  no interpreter implementation.) Clamping before rounding equals clamping after, as the bounds are integers.
* packing: a tile of BITS-bit fields ``[R, C]`` is reshaped to ``[R, C // PER, PER]`` and summed after
  shifting field j by BITS*j (disjoint bit fields, so the sum is an OR).
* unpacking reads byte ``d // PER`` for every column d (repeated addresses hit the same cache line) and
  shifts by ``BITS * (d % PER)``: no reshape needed on the way out.

Launch wrappers take validated tensors (the op layer, ops/kv.py, checks them) and return fresh outputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23


@triton.jit
def _round_half_even(v):
    """fp32 -> fp32 rounded to the nearest integer, ties to even (|v| < 2^22)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _pack_fields(q, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """int32 [ROWS, COLS] fields -> int32 [ROWS, COLS*BITS//8] bytes: element PER*i+j at bits BITS*j of byte i."""
    PER: tl.constexpr = 8 // BITS
    q3 = tl.reshape(q & ((1 << BITS) - 1), (ROWS, COLS // PER, PER))
    shift = tl.arange(0, PER) * BITS
    return tl.sum(q3 << shift[None, None, :], axis=2)


@triton.jit
def _kv_quantize_static_kernel(
    X_ptr,          # float32/bf16/fp16 [B, H, T, D], any strides
    Scale_ptr,      # float32 [H], one static scale per KV head
    Out_ptr,        # uint8 [B, H, T, D//2] (BITS=4) or int8 [B, H, T, D] (BITS=8), contiguous
    H, T, D,        # int32 sizes
    stride_xb, stride_xh, stride_xt, stride_xd,
    BITS: tl.constexpr,      # 4 or 8
    BLOCK_T: tl.constexpr,   # tokens per program
    BLOCK_D: tl.constexpr,   # next power of 2 >= D
):
    """out = pack(clamp(round_half_even(x / scale[h]), -2^(BITS-1), 2^(BITS-1)-1)), NaN -> 0."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    x = tl.load(X_ptr + b * stride_xb + h * stride_xh + t[:, None] * stride_xt + d[None, :] * stride_xd,
                mask=(t[:, None] < T) & (d[None, :] < D), other=0.0).to(tl.float32)
    v = tl.div_rn(x, tl.load(Scale_ptr + h))
    v = tl.where(v != v, 0.0, v)  # NaN -> 0; +-Inf survive to the clamp and saturate
    v = tl.minimum(tl.maximum(v, -(1 << (BITS - 1)) * 1.0), ((1 << (BITS - 1)) - 1) * 1.0)
    q = _round_half_even(v).to(tl.int32)
    out_row = pid_bh * T + t[:, None]  # the output is contiguous [B*H, T, D*BITS//8]
    if BITS == 8:
        tl.store(Out_ptr + out_row * D + d[None, :], q.to(tl.int8), mask=(t[:, None] < T) & (d[None, :] < D))
    else:
        packed = _pack_fields(q, BLOCK_T, BLOCK_D, BITS)
        d2 = tl.arange(0, BLOCK_D // 2)
        tl.store(Out_ptr + out_row * (D // 2) + d2[None, :], packed.to(tl.uint8),
                 mask=(t[:, None] < T) & (d2[None, :] < D // 2))


@triton.jit
def _kv_quantize_groupwise_kernel(
    X_ptr,          # float32/bf16/fp16 [B, H, T, D], any strides
    Out_ptr,        # uint8 [B, H, T, D*BITS//8], contiguous
    Scale_ptr,      # fp16 [B, H, T, D//G] (axis token) or [B, H, T//G, D] (axis channel), contiguous
    Zero_ptr,       # fp16, same shape as Scale
    H, T, D,        # int32 sizes
    stride_xb, stride_xh, stride_xt, stride_xd,
    BITS: tl.constexpr,          # 2 or 4
    G: tl.constexpr,             # group size (power of 2)
    AXIS_CHANNEL: tl.constexpr,  # False: groups of G channels of a token; True: groups of G tokens of a channel
    BLOCK_T: tl.constexpr,       # tokens per program (== G when AXIS_CHANNEL)
    BLOCK_D: tl.constexpr,       # next power of 2 >= D
):
    """zero = fp16(min), scale = fp16((max-min)/(2^BITS-1)) per group; q = clamp(rhe((x-zero)/scale), 0, 2^BITS-1)."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    pid_bh = tl.program_id(0).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    ok = (t[:, None] < T) & (d[None, :] < D)
    x = tl.load(X_ptr + b * stride_xb + h * stride_xh + t[:, None] * stride_xt + d[None, :] * stride_xd,
                mask=ok, other=0.0).to(tl.float32)
    x = tl.where(x != x, 0.0, x)
    x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)  # the fp16 range: scale and zero are stored in fp16
    if AXIS_CHANNEL:
        # one program = one group of G tokens; every channel is its own group: reduce over the tokens (axis 0)
        mn = tl.min(x, axis=0)
        mx = tl.max(x, axis=0)
        zero16 = mn.to(tl.float16)
        scale16 = tl.div_rn(mx - mn, LEVELS * 1.0).to(tl.float16)
        s = scale16.to(tl.float32)[None, :]
        z = zero16.to(tl.float32)[None, :]
        v = tl.where(s > 0, tl.div_rn(x - z, tl.where(s > 0, s, 1.0)), 0.0)
        sz_off = (pid_bh * (T // G) + tl.program_id(1)) * D + d
        tl.store(Scale_ptr + sz_off, scale16, mask=d < D)
        tl.store(Zero_ptr + sz_off, zero16, mask=d < D)
    else:
        # groups of G consecutive channels: view the tile as [BLOCK_T, BLOCK_D // G, G], reduce the last axis
        NG: tl.constexpr = BLOCK_D // G
        x3 = tl.reshape(x, (BLOCK_T, NG, G))
        mn = tl.min(x3, axis=2)
        mx = tl.max(x3, axis=2)
        zero16 = mn.to(tl.float16)
        scale16 = tl.div_rn(mx - mn, LEVELS * 1.0).to(tl.float16)
        s = scale16.to(tl.float32)[:, :, None]
        z = zero16.to(tl.float32)[:, :, None]
        v3 = tl.where(s > 0, tl.div_rn(x3 - z, tl.where(s > 0, s, 1.0)), 0.0)
        v = tl.reshape(v3, (BLOCK_T, BLOCK_D))
        g = tl.arange(0, NG)
        sz_off = (pid_bh * T + t[:, None]) * (D // G) + g[None, :]
        sz_ok = (t[:, None] < T) & (g[None, :] < D // G)
        tl.store(Scale_ptr + sz_off, scale16, mask=sz_ok)
        tl.store(Zero_ptr + sz_off, zero16, mask=sz_ok)
    q = _round_half_even(tl.minimum(tl.maximum(v, 0.0), LEVELS * 1.0)).to(tl.int32)
    packed = _pack_fields(q, BLOCK_T, BLOCK_D, BITS)
    NB: tl.constexpr = BLOCK_D * BITS // 8
    db = tl.arange(0, NB)
    tl.store(Out_ptr + (pid_bh * T + t[:, None]) * (D * BITS // 8) + db[None, :], packed.to(tl.uint8),
             mask=(t[:, None] < T) & (db[None, :] < D * BITS // 8))


@triton.jit
def _kv_dequant_concat_kernel(
    Prefix_ptr,     # 16/32-bit float [1 or B, H, P, D] (batch stride 0 when shared), unused if P == 0
    Body_ptr,       # uint8 [B, H, Nq, D*BITS//8] packed, or int8 [B, H, Nq, D] (BITS=8)
    Scale_ptr,      # float32 [H] (static) or fp16 group scales [B, H, Nq, D//G] / [B, H, Nq//G, D]
    Zero_ptr,       # fp16, same shape as the group scales (unused when static)
    Tail_ptr,       # 16/32-bit float [B, H, Nt, D] (unused if Nt == 0)
    BodyPos_ptr,    # int32 [Nq]: output row (after the prefix) of each body row (used if HAS_POS)
    TailPos_ptr,    # int32 [Nt]: output row (after the prefix) of each tail row (used if HAS_POS)
    Out_ptr,        # out dtype [B, H, P + Nq + Nt, D], contiguous
    H, P, NQ, NT, D,  # int32 sizes
    stride_pb, stride_ph, stride_pt, stride_pd,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_sb, stride_sh, stride_st, stride_sd,   # group scale/zero strides (static: only stride_sh used)
    stride_tb, stride_th, stride_tt, stride_td,
    BITS: tl.constexpr,        # 2, 4 or 8
    GROUPWISE: tl.constexpr,   # False: symmetric static per head; True: asymmetric group-wise
    G: tl.constexpr,           # group size (GROUPWISE)
    AXIS_CHANNEL: tl.constexpr,  # group-wise axis (GROUPWISE)
    HAS_POS: tl.constexpr,     # rows scattered by BodyPos/TailPos (LogQuant) instead of [body | tail]
    BLOCK_T: tl.constexpr,     # source rows per program
    BLOCK_D: tl.constexpr,     # next power of 2 >= D
):
    """out[b, h] = [prefix ; body_q * scale (+ zero) ; tail], body and tail rows at their positions."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    r = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # source row: prefix, then body, then tail
    d = tl.arange(0, BLOCK_D)
    dm = d[None, :] < D
    is_pre = r < P
    is_body = (r >= P) & (r < P + NQ)
    is_tail = (r >= P + NQ) & (r < P + NQ + NT)
    i = tl.where(is_body, r - P, 0)        # body row
    j = tl.where(is_tail, r - P - NQ, 0)   # tail row

    pre = tl.load(Prefix_ptr + b * stride_pb + h * stride_ph + r[:, None] * stride_pt + d[None, :] * stride_pd,
                  mask=is_pre[:, None] & dm, other=0.0).to(tl.float32)

    bm = is_body[:, None] & dm
    q_base = Body_ptr + b * stride_qb + h * stride_qh + i[:, None] * stride_qt
    if BITS == 8:
        q = tl.load(q_base + d[None, :] * stride_qd, mask=bm, other=0).to(tl.int32)
    else:
        PER: tl.constexpr = 8 // BITS
        byte = tl.load(q_base + (d[None, :] // PER) * stride_qd, mask=bm, other=0).to(tl.int32)
        q = (byte >> ((d[None, :] % PER) * BITS)) & ((1 << BITS) - 1)
        if not GROUPWISE:
            q = q - ((q & (1 << (BITS - 1))) << 1)  # sign-extend the two's-complement field
    if GROUPWISE:
        if AXIS_CHANNEL:
            s_off = b * stride_sb + h * stride_sh + (i[:, None] // G) * stride_st + d[None, :] * stride_sd
        else:
            s_off = b * stride_sb + h * stride_sh + i[:, None] * stride_st + (d[None, :] // G) * stride_sd
        s = tl.load(Scale_ptr + s_off, mask=bm, other=0.0).to(tl.float32)
        z = tl.load(Zero_ptr + s_off, mask=bm, other=0.0).to(tl.float32)
        body = q.to(tl.float32) * s
        body = body + z  # a GPU build may contract these into an FMA: within one fp32 rounding of the reference
    else:
        body = q.to(tl.float32) * tl.load(Scale_ptr + h * stride_sh)

    tail = tl.load(Tail_ptr + b * stride_tb + h * stride_th + j[:, None] * stride_tt + d[None, :] * stride_td,
                   mask=is_tail[:, None] & dm, other=0.0).to(tl.float32)

    if HAS_POS:
        bpos = tl.load(BodyPos_ptr + i, mask=is_body, other=0)
        tpos = tl.load(TailPos_ptr + j, mask=is_tail, other=0)
        dest = tl.where(is_pre, r, P + tl.where(is_body, bpos, tpos))
    else:
        dest = r
    val = tl.where(is_pre[:, None], pre, tl.where(is_body[:, None], body, tail))
    n_out = P + NQ + NT
    tl.store(Out_ptr + (pid_bh * n_out + dest[:, None].to(tl.int64)) * D + d[None, :],
             val.to(Out_ptr.dtype.element_ty), mask=(r[:, None] < n_out) & dm)


# ---- launch wrappers ------------------------------------------------------------------------------------------

_BLOCK_T = 16


def _block_d(d: int) -> int:
    return triton.next_power_of_2(d)


def kv_quantize_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """x float [B, H, T, D], scale float32 [H] contiguous -> uint8 [B, H, T, D//2] (4) / int8 [B, H, T, D] (8)."""
    b, h, t, d = x.shape
    out = torch.empty(b, h, t, d * bits // 8, dtype=torch.uint8 if bits == 4 else torch.int8, device=x.device)
    if out.numel():
        grid = (b * h, triton.cdiv(t, _BLOCK_T))
        _kv_quantize_static_kernel[grid](x, scale, out, h, t, d, *x.stride(),
                                         BITS=bits, BLOCK_T=_BLOCK_T, BLOCK_D=_block_d(d))
    return out


def kv_quantize_groupwise(x: torch.Tensor, bits: int, group_size: int, axis: str):
    """x float [B, H, T, D] -> (packed uint8 [B, H, T, D*bits//8], scale fp16, zero fp16); see kv_format."""
    b, h, t, d = x.shape
    channel = axis == "channel"
    sz_shape = (b, h, t // group_size, d) if channel else (b, h, t, d // group_size)
    out = torch.empty(b, h, t, d * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(sz_shape, dtype=torch.float16, device=x.device)
    zero = torch.empty(sz_shape, dtype=torch.float16, device=x.device)
    if out.numel():
        block_t = group_size if channel else _BLOCK_T
        grid = (b * h, triton.cdiv(t, block_t))
        _kv_quantize_groupwise_kernel[grid](x, out, scale, zero, h, t, d, *x.stride(), BITS=bits, G=group_size,
                                            AXIS_CHANNEL=channel, BLOCK_T=block_t, BLOCK_D=_block_d(d))
    return out, scale, zero


def kv_dequant_concat(prefix: torch.Tensor | None, packed: torch.Tensor, scale: torch.Tensor,
                      zero: torch.Tensor | None, bits: int, group_size: int, axis: str | None,
                      tail: torch.Tensor | None, body_pos: torch.Tensor | None, tail_pos: torch.Tensor | None,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """[prefix | dequant(packed) | tail] -> out_dtype [B, H, P + Nq + Nt, D] in one kernel, no torch.cat.

    prefix may have batch 1 (read with batch stride 0); body_pos/tail_pos int32 (both or neither).
    """
    b, h, nq, _ = packed.shape
    d = packed.shape[3] * 8 // bits
    p = 0 if prefix is None else prefix.shape[2]
    nt = 0 if tail is None else tail.shape[2]
    out = torch.empty(b, h, p + nq + nt, d, dtype=out_dtype, device=packed.device)
    if out.numel() == 0:
        return out
    dummy = torch.empty(1, 1, 1, 1, dtype=out_dtype, device=packed.device)
    pre = dummy if p == 0 else prefix
    pre_strides = list(pre.stride())
    if pre.shape[0] == 1:
        pre_strides[0] = 0  # the prefix shared by every sequence of the batch
    tl_ = dummy if nt == 0 else tail
    groupwise = zero is not None
    s_strides = scale.stride() if groupwise else (0, scale.stride(0), 0, 0)
    has_pos = body_pos is not None
    bpos = body_pos if has_pos else torch.zeros(1, dtype=torch.int32, device=packed.device)
    tpos = tail_pos if has_pos and tail_pos is not None and tail_pos.numel() else bpos
    grid = (b * h, triton.cdiv(p + nq + nt, _BLOCK_T))
    _kv_dequant_concat_kernel[grid](
        pre, packed, scale, zero if groupwise else scale, tl_, bpos, tpos, out,
        h, p, nq, nt, d,
        *pre_strides, *packed.stride(), *s_strides, *tl_.stride(),
        BITS=bits, GROUPWISE=groupwise, G=group_size if groupwise else 1,
        AXIS_CHANNEL=groupwise and axis == "channel", HAS_POS=has_pos, BLOCK_T=_BLOCK_T, BLOCK_D=_block_d(d))
    return out
