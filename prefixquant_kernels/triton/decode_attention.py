"""Fused decode attention over a PrefixQuant KV cache: one new query token attends to
``[16-bit prefix | 4-bit static body]`` without ever materializing a 16-bit copy of the body.

Flash-decoding structure: the sequence is cut into ``n_splits`` slices; program (b, kv head, slice) loads its
K/V slice — prefix rows as floats, body rows as packed nibbles dequantized in registers with the head's static
scale — and keeps an online softmax (running max m, running sum l, running P·V) for the G = H_q / H_kv query
heads that share the KV head (GQA: K/V are read once per group, not once per query head). A second small
kernel merges the slices: out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s. The slice length adapts to the GPU
(auto_split_len): at batch 1 the (batch x KV head) rows alone are far fewer programs than SMs.

Query-key products are elementwise multiply + row sums rather than tl.dot: a decode step has G (1-8) query rows,
below tl.dot's 16-row minimum, and the step is bound by reading K/V, not by the multiply.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_kv_rows(Pre_ptr, Body_ptr, scale, n, P, N_all, d, D,
                  stride_pn, stride_pd, stride_bn, stride_bd, BITS: tl.constexpr):
    """float32 [BLOCK_N, BLOCK_D] rows n of [prefix (n < P) | body (P <= n < N_all)], 0 elsewhere (and in the
    columns d >= D of a head dim below BLOCK_D: never read, as they lie past the row)."""
    d_ok = d[None, :] < D
    in_pre = n < P
    in_body = (n >= P) & (n < N_all)
    pre = tl.load(Pre_ptr + n[:, None] * stride_pn + d[None, :] * stride_pd,
                  mask=in_pre[:, None] & d_ok, other=0.0).to(tl.float32)
    nb = tl.where(in_body, n - P, 0)
    if BITS == 4:
        # byte d // 2 holds element d in its low (d even) or high (d odd) nibble; sign-extend the nibble
        byte = tl.load(Body_ptr + nb[:, None] * stride_bn + (d[None, :] // 2) * stride_bd,
                       mask=in_body[:, None] & d_ok, other=0).to(tl.int32)
        nib = (byte >> ((d[None, :] % 2) * 4)) & 0xF
        q = nib - ((nib & 0x8) << 1)
    else:
        q = tl.load(Body_ptr + nb[:, None] * stride_bn + d[None, :] * stride_bd,
                    mask=in_body[:, None] & d_ok, other=0).to(tl.int32)
    body = q.to(tl.float32) * scale
    return tl.where(in_pre[:, None], pre, body)


# Context-length arguments are not specialized (Triton would otherwise compile a variant for ==1 / % 16 == 0 of each):
# the compiled variants depend on G, D, bits and dtypes only, never on how long the context has grown.
@triton.jit(do_not_specialize=["P", "T", "SPLIT_LEN", "n_splits"])
def _decode_attention_split_kernel(
    Q_ptr,          # float [B, H_q, D] (any strides): the new token's queries
    PK_ptr, PV_ptr,  # float [B or 1, H_kv, P, D]: 16-bit prefix K/V (a batch-1 prefix is read with stride 0)
    BK_ptr, BV_ptr,  # uint8 [B, H_kv, T, D//2] (BITS 4) / int8 [B, H_kv, T, D] (BITS 8): packed body K/V
    KS_ptr, VS_ptr,  # float32 [H_kv]: static per-head K/V scales
    Len_ptr,        # int64 [1]: body rows filled (HAS_LEN; a preallocated cache's length, read on the device)
    Mask_ptr,       # uint8 [B, >= P + T] (HAS_MASK): 1 = attend (a preallocated cache's padding mask)
    M_ptr, L_ptr,   # float32 [B, H_q, S]: per-slice running max and sum (outputs)
    Acc_ptr,        # float32 [B, H_q, S, D]: per-slice unnormalized P·V (output)
    H_kv, P, T, D, SPLIT_LEN, n_splits,   # int32; SPLIT_LEN: positions per slice (multiple of BLOCK_N)
    sm_scale,       # float32: usually 1 / sqrt(D)
    stride_qb, stride_qh, stride_qd,
    stride_pb, stride_ph, stride_pn, stride_pd,
    stride_bb, stride_bh, stride_bn, stride_bd,
    stride_mb,      # the mask's row stride
    G: tl.constexpr,        # query heads per KV head (H_q / H_kv)
    BLOCK_G: tl.constexpr,  # next power of 2 >= G
    BLOCK_N: tl.constexpr,  # positions per step
    BLOCK_D: tl.constexpr,  # next power of 2 >= D
    BITS: tl.constexpr,     # 4 or 8
    HAS_LEN: tl.constexpr,  # T is the capacity and Len_ptr holds the rows in use
    HAS_MASK: tl.constexpr,
):
    """Slice s of softmax(q k^T * sm_scale) v for the G query heads of KV head h, online-softmax partials."""
    pid = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    b, h = pid // H_kv, pid % H_kv
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < D
    qh = h * G + g
    q = tl.load(Q_ptr + b * stride_qb + qh[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * sm_scale
    k_scale = tl.load(KS_ptr + h)
    v_scale = tl.load(VS_ptr + h)
    pk = PK_ptr + b * stride_pb + h * stride_ph
    pv = PV_ptr + b * stride_pb + h * stride_ph
    bk = BK_ptr + b * stride_bb + h * stride_bh
    bv = BV_ptr + b * stride_bb + h * stride_bh
    if HAS_LEN:   # the split count was sized for the capacity T; slices past the filled rows stay empty
        T = tl.minimum(tl.load(Len_ptr).to(tl.int32), T)
    N_all = P + T
    mrow = Mask_ptr + b * stride_mb   # this sequence's mask row (unused without HAS_MASK)

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    start = s * SPLIT_LEN
    for n0 in range(start, tl.minimum(start + SPLIT_LEN, N_all), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        k = _load_kv_rows(pk, bk, k_scale, n, P, N_all, d, D, stride_pn, stride_pd, stride_bn, stride_bd, BITS)
        v = _load_kv_rows(pv, bv, v_scale, n, P, N_all, d, D, stride_pn, stride_pd, stride_bn, stride_bd, BITS)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)           # [BLOCK_G, BLOCK_N]
        ok = n < N_all
        if HAS_MASK:
            ok = ok & (tl.load(mrow + n, mask=ok, other=0) != 0)
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # a slice with no valid position keeps m = -inf; exp(-inf - -inf) would be NaN, so guard it
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    o = (b * (H_kv * G) + qh) * n_splits + s                          # [BLOCK_G] flat (b, q head, slice)
    tl.store(M_ptr + o, m_i, mask=g_ok)
    tl.store(L_ptr + o, l_i, mask=g_ok)
    tl.store(Acc_ptr + o[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["S"])
def _decode_attention_merge_kernel(
    M_ptr, L_ptr,   # float32 [B * H_q, S]
    Acc_ptr,        # float32 [B * H_q, S, D]
    Out_ptr,        # out dtype [B * H_q, D], contiguous
    S, D,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, M = max_s m_s, over chunks of BLOCK_S slices
    (a fixed BLOCK_S: the split count grows with the context, the compiled kernel does not change). Across chunks
    the running max / sum / accumulator are rescaled like the split kernel's online softmax; with S <= BLOCK_S it is
    exactly the one-shot formula."""
    r = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m_run = tl.full((), float("-inf"), tl.float32)
    l_run = tl.zeros((), tl.float32)
    acc_run = tl.zeros((BLOCK_D,), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        si = s0 + tl.arange(0, BLOCK_S)
        s_ok = si < S
        m = tl.load(M_ptr + r * S + si, mask=s_ok, other=float("-inf"))
        l_s = tl.load(L_ptr + r * S + si, mask=s_ok, other=0.0)
        acc = tl.load(Acc_ptr + (r * S + si[:, None]) * D + d[None, :], mask=s_ok[:, None] & (d[None, :] < D),
                      other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)                     # 0 on the first chunk (m_run = -inf)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_safe))
        l_run = l_run * alpha + tl.sum(w * l_s, axis=0)
        acc_run = acc_run * alpha + tl.sum(w[:, None] * acc, axis=0)
        m_run = m_new
    out = acc_run / tl.where(l_run > 0, l_run, 1.0)   # a row that masks every position: acc = 0, zeros (as on CPU)
    tl.store(Out_ptr + r * D + d, out.to(Out_ptr.dtype.element_ty), mask=d < D)


# Launch constants. The split kernel's per-step product q[:, None, :] * k[None, :, :] (and p * v) is a
# [BLOCK_G, BLOCK_N, BLOCK_D] fp32 tile held in registers: BLOCK_N shrinks as G * D grows so that the tile stays
# within PRODUCT_BUDGET elements (at G = 8, D = 128, BLOCK_N = 16 it was 16384 elements = 128 per thread of 4 warps,
# and ptxas spilled at 255 registers on sm_86/89/90; tests/kv/test_triton_aot.py checks every arch for spills).
PRODUCT_BUDGET = 4096
SCORE_BUDGET = 32    # and the [BLOCK_G, BLOCK_N] score tile within this (G = 8, D = 64, BLOCK_N = 8 spilled on sm_80)
MIN_BLOCK_N = 2
MERGE_BLOCK_S = 32   # slices merged per step of the merge kernel (fixed: any split count, one compiled kernel)


def split_constexprs(G: int, D: int, bits: int, block_n: int = 16, has_len: bool = False,
                     has_mask: bool = False) -> dict:
    """The constexprs of _decode_attention_split_kernel for G query heads per KV head, head dim D."""
    bg, bd = triton.next_power_of_2(G), triton.next_power_of_2(D)
    bn = max(MIN_BLOCK_N, min(triton.next_power_of_2(block_n), PRODUCT_BUDGET // (bg * bd), SCORE_BUDGET // bg))
    if has_mask:   # the mask row's load: at G = 3, D = 64, BLOCK_N = 8 ptxas spilled 8 bytes on sm_80 (4: none)
        bn = max(MIN_BLOCK_N, bn // 2)
    return dict(G=G, BLOCK_G=bg, BLOCK_N=bn, BLOCK_D=bd, BITS=bits, HAS_LEN=has_len, HAS_MASK=has_mask)


MAX_SPLIT_LEN = 256   # positions per slice when the (batch x KV head) programs already fill the GPU
MIN_SPLIT_LEN = 64    # ... and the shortest slice used to reach more programs (each slice costs a partial row)


def auto_split_len(rows: int, n_pos: int, sms: int, block_n: int) -> int:
    """Positions per slice: MAX_SPLIT_LEN, shortened (down to MIN_SPLIT_LEN, a multiple of block_n) until the grid of
    rows (= B * H_kv) x slices reaches two programs per SM: at batch 1, 8 KV heads and 2K context 256 gives 64
    programs on a 108-SM A100, 64 gives 256. SPLIT_LEN and the split count are runtime arguments of the kernel
    (do_not_specialize): a new value never recompiles it."""
    want = -(-2 * max(sms, 1) // max(rows, 1))        # slices per row for two programs per SM
    length = min(MAX_SPLIT_LEN, max(MIN_SPLIT_LEN, -(-n_pos // want)))
    return max(block_n, length // block_n * block_n)  # rounded down: at least `want` slices unless the floor binds


def merge_constexprs(D: int) -> dict:
    """The constexprs of _decode_attention_merge_kernel: independent of the split count."""
    return dict(BLOCK_S=MERGE_BLOCK_S, BLOCK_D=triton.next_power_of_2(D))


def decode_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, body_k: torch.Tensor,
                     body_v: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor, bits: int,
                     sm_scale: float, split_len: int | None = None, block_n: int = 16,
                     body_len: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                     sms: int = 1) -> torch.Tensor:
    """Launch wrapper (inputs validated by ops/kv.py). q [B, H_q, D]; prefix [B|1, H_kv, P, D] (P may be 0);
    body [B, H_kv, T, D//2 or D]; scales float32 [H_kv] -> out [B, H_q, D] in q.dtype. body_len: int64 [1] or
    None, the body rows in use (T is then the capacity: no host read, so a CUDA graph can replay the launch);
    mask: bool [B, >= P + T] (True = attend) or None. split_len: positions per slice (None: auto_split_len for
    `sms`, the GPU's multiprocessors, which the op layer passes; with body_len, sized for the capacity, so a captured
    graph's grid holds as the cache fills)."""
    B, Hq, D = q.shape
    Hkv, P, T = body_k.shape[1], prefix_k.shape[2], body_k.shape[2]
    G = Hq // Hkv
    split_cx = split_constexprs(G, D, bits, block_n, body_len is not None, mask is not None)
    block_n = split_cx["BLOCK_N"]
    if split_len is None:
        split_len = auto_split_len(B * Hkv, P + T, sms, block_n)
    split_len = max(block_n, triton.cdiv(split_len, block_n) * block_n)
    n_splits = max(1, triton.cdiv(P + T, split_len))
    m = torch.empty(B, Hq, n_splits, device=q.device, dtype=torch.float32)
    l_s = torch.empty_like(m)
    acc = torch.empty(B, Hq, n_splits, D, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    # K and V share one set of strides in the kernel; they nearly always agree already
    if prefix_v.stride() != prefix_k.stride():
        prefix_k, prefix_v = prefix_k.contiguous(), prefix_v.contiguous()
    if body_v.stride() != body_k.stride():
        body_k, body_v = body_k.contiguous(), body_v.contiguous()
    pb = 0 if prefix_k.shape[0] == 1 else prefix_k.stride(0)  # a shared batch-1 prefix: batch stride 0
    mask_u8 = None if mask is None else mask.view(torch.uint8)   # bool -> bytes (the same memory)
    _decode_attention_split_kernel[(B * Hkv, n_splits)](
        q, prefix_k, prefix_v, body_k, body_v, k_scale, v_scale,
        body_k if body_len is None else body_len, body_k if mask_u8 is None else mask_u8, m, l_s, acc,
        Hkv, P, T, D, split_len, n_splits, sm_scale,
        q.stride(0), q.stride(1), q.stride(2),
        pb, prefix_k.stride(1), prefix_k.stride(2), prefix_k.stride(3),
        body_k.stride(0), body_k.stride(1), body_k.stride(2), body_k.stride(3),
        0 if mask_u8 is None else mask_u8.stride(0),
        **split_cx,
    )
    _decode_attention_merge_kernel[(B * Hq,)](m, l_s, acc, out, n_splits, D, **merge_constexprs(D))
    return out
