"""Public KV-cache ops: kv_quantize (static per-head, PrefixQuant), kv_quantize_groupwise (KIVI / LogQuant),
kv_dequant_concat and kv_decode_attention. Validation (checks.py) -> backend choice (backend.py) -> one
torch.ops.pqk custom op per public op (schemas and fakes in library.py), whose single implementation (registered
below for every device) runs the chosen backend: the reference (kv_format.py), the Triton kernels or the C++ CPU
kernel. So torch.compile(fullgraph=True) sees each call as one node, and torch.library.opcheck covers every backend.

backend (KV ops; backend.py resolves it, "auto" in the order documented there):
  "auto"       Triton for CUDA tensors when triton is installed, and for CPU tensors under TRITON_INTERPRET=1;
               else on CPU tensors the C++ kernel where the call has one, else the reference
  "reference"  plain PyTorch (prefixquant_kernels/kv_format.py): the definition of the results
  "triton"     the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
  "cpu"        the C++ kernels of the static cache (PrefixQuant's layout): kv_quantize, kv_dequant_concat with no
               16-bit tail or positions, and decode attention over such a cache
"""
from __future__ import annotations

import torch

from .. import kv_format as kvf
from ..format import FLOAT_DTYPES
from . import checks, cuda_ops
from . import library  # noqa: F401  (defines torch.ops.pqk.kv_*)
from .backend import KV_BACKENDS, resolve, triton_available, triton_interpreted  # noqa: F401  (re-exported)

STATIC_BITS = (4, 8)
GROUPWISE_BITS = (2, 4)
_ALL_BITS = (2, 4, 8)


# ---- backend: ops/backend.py (KV_BACKENDS, triton_interpreted, triton_available are re-exported here) -------------

_CPU_STATIC_ONLY = {"cpu": "static bodies without a tail or positions"}


def _kernels():
    from .. import triton as pqk_triton  # imported lazily: triton is optional for the reference path
    return pqk_triton


# ---- KV-specific checks ----------------------------------------------------------------------------------------

def _kv_tensor(t, name: str, op: str, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    return checks.tensor(t, name, op, dtypes, dim=4)


def _head_scale(scale, h: int, op: str, device: torch.device) -> torch.Tensor:
    """float [H], finite and > 0 -> float32 contiguous [H]."""
    if isinstance(scale, torch.Tensor) and scale.dim() != 1:
        checks.fail(op, f"scale must have shape ({h},) (one static scale per KV head), got {tuple(scale.shape)}")
    return checks.channel_vector(scale, "scale", op, h, device, positive=True)


def _group_size(g, name: str, op: str) -> int:
    if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g & (g - 1):
        checks.fail(op, f"{name} must be a power of 2 > 0, got {g!r}")
    return g


def _axis(axis, op: str) -> str:
    if axis not in kvf.GROUP_AXES:
        checks.fail(op, f"axis must be one of {kvf.GROUP_AXES} (values per-token, keys per-channel), got {axis!r}")
    return axis


def _bits(bits, op: str, allowed) -> int:
    checks.bits(bits, "bits", op, _ALL_BITS)
    if bits not in allowed:
        other = ("static per-head scales: use kv_quantize" if bits in STATIC_BITS
                 else "group-wise asymmetric: use kv_quantize_groupwise")
        checks.fail(op, f"bits must be one of {allowed} here, got {bits} ({bits}-bit is {other})")
    return bits


def _divides(n: int, by: int, what: str, op: str, shape) -> None:
    if n % by:
        checks.fail(op, f"{what} must be a multiple of {by}, got {n} (shape {tuple(shape)})")


# ---- ops -------------------------------------------------------------------------------------------------------

def kv_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int = 4, *, backend: str = "auto") -> torch.Tensor:
    """Static symmetric per-KV-head quantization (PrefixQuant's KV cache).

    Args:
        x: float32/bfloat16/float16 [B, H, T, D] (D even for bits=4); any strides.
        scale: float [H], one calibrated scale per KV head, finite and > 0.
        bits: 4 -> uint8 [B, H, T, D//2] (element 2i in the low nibble); 8 -> int8 [B, H, T, D].
    q = clamp(round_half_to_even(x / scale[h])) in fp32, NaN -> 0, Inf saturates (prefixquant_kernels.format).
    """
    op = "kv_quantize"
    _kv_tensor(x, "x", op)
    _bits(bits, op, STATIC_BITS)
    checks.nonempty_last_dim(x, "x", op)
    if bits == 4:
        checks.even_last_dim(x, "x", op)
    s = _head_scale(scale, x.shape[1], op, x.device)
    return torch.ops.pqk.kv_quantize(x, s, bits, resolve(backend, x.device, op).kind)


def kv_quantize_groupwise(x: torch.Tensor, bits: int = 2, group_size: int = 32, axis: str = "token", *,
                          backend: str = "auto"):
    """Group-wise asymmetric quantization (KIVI / LogQuant); the format is defined in kv_format.

    Args:
        x: float32/bfloat16/float16 [B, H, T, D]; any strides.
        bits: 2 (or 4).
        group_size: G, a power of 2. axis "token": groups of G channels of one token (D % G == 0; values);
            axis "channel": groups of G tokens of one channel (T % G == 0; keys).
    Returns (packed uint8 [B, H, T, D*bits//8], scale fp16, zero fp16), scale/zero [B, H, T, D//G] (token)
    or [B, H, T//G, D] (channel).
    """
    op = "kv_quantize_groupwise"
    _kv_tensor(x, "x", op)
    _bits(bits, op, GROUPWISE_BITS)
    _group_size(group_size, "group_size", op)
    _axis(axis, op)
    checks.nonempty_last_dim(x, "x", op)
    _divides(x.shape[3], 8 // bits, "x's head dim D", op, x.shape)
    if axis == "token":
        _divides(x.shape[3], group_size, "x's head dim D (axis='token')", op, x.shape)
    else:
        _divides(x.shape[2], group_size, "x's token count T (axis='channel')", op, x.shape)
    return torch.ops.pqk.kv_quantize_groupwise(x, bits, group_size, axis, resolve(backend, x.device, op).kind)


def _positions(body_pos, tail_pos, nq: int, nt: int, op: str, device: torch.device):
    """Validate the row positions (both or neither; together a permutation of range(nq + nt)) -> int32."""
    if body_pos is None and tail_pos is None:
        return None, None
    if body_pos is None or tail_pos is None:
        checks.fail(op, "body_pos and tail_pos must be given together (or neither)")
    out = []
    for name, pos, n in (("body_pos", body_pos, nq), ("tail_pos", tail_pos, nt)):
        checks.tensor(pos, name, op, (torch.int32, torch.int64), dim=1)
        if pos.numel() != n:
            checks.fail(op, f"{name} must have shape ({n},), got {tuple(pos.shape)}")
        checks.same_device(op, device, **{name: pos})
        out.append(pos.to(torch.int32).contiguous())
    if device.type == "cpu" and not torch.compiler.is_compiling():
        allpos = torch.cat(out).long().sort().values
        if not torch.equal(allpos, torch.arange(nq + nt)):
            checks.fail(op, f"body_pos and tail_pos together must be a permutation of range({nq + nt})")
    return out[0], out[1]


def kv_dequant_concat(prefix: torch.Tensor | None, packed: torch.Tensor, scale: torch.Tensor, bits: int = 4,
                      out_dtype: torch.dtype = torch.float16, *, zero: torch.Tensor | None = None,
                      group_size: int | None = None, axis: str | None = None, tail: torch.Tensor | None = None,
                      body_pos: torch.Tensor | None = None, tail_pos: torch.Tensor | None = None,
                      backend: str = "auto") -> torch.Tensor:
    """One attention-ready tensor from the three parts of a cache: [prefix | dequantized body | tail].

    Args:
        prefix: float [1 or B, H, P, D] (the 16-bit outlier-token prefix; batch 1 is shared, not copied) or None.
        packed: the body, as returned by kv_quantize (static: uint8 [B, H, Nq, D//2] / int8 [B, H, Nq, D]) or
            kv_quantize_groupwise (uint8 [B, H, Nq, D*bits//8]).
        scale: static: float [H]; group-wise: the fp16 group scales kv_quantize_groupwise returned.
        bits: 4 or 8 (static), 2 or 4 (group-wise, when zero is given).
        zero: the fp16 group zero points (group-wise) or None (static symmetric).
        group_size, axis: the grouping (group-wise only), as given to kv_quantize_groupwise.
        tail: float [B, H, Nt, D] 16-bit tokens (KIVI's recent window, LogQuant's selected tokens) or None.
        body_pos, tail_pos: int [Nq], [Nt]: output rows (counted after the prefix) of each body / tail row,
            together a permutation of range(Nq + Nt); None: the body, then the tail.
    Returns out_dtype [B, H, P + Nq + Nt, D]. Body values are q * scale (+ zero) in fp32, cast once.
    """
    op = "kv_dequant_concat"
    groupwise = zero is not None
    checks.tensor(packed, "packed", op, (torch.uint8, torch.int8), dim=4)
    checks.bits(bits, "bits", op, _ALL_BITS)
    _bits(bits, op, GROUPWISE_BITS if groupwise else STATIC_BITS)
    want_q = torch.int8 if bits == 8 else torch.uint8
    if packed.dtype != want_q:
        checks.fail(op, f"packed must be {str(want_q).replace('torch.', '')} for bits={bits}, got "
                        f"{str(packed.dtype).replace('torch.', '')}", TypeError)
    out_dtype = checks.out_dtype(out_dtype, op)
    b, h, nq, nbytes = packed.shape
    d = nbytes * 8 // bits
    dev = packed.device
    if d == 0:
        checks.fail(op, f"packed's last dim must be > 0, got shape {tuple(packed.shape)}")
    if groupwise:
        _group_size(group_size, "group_size", op)
        _axis(axis, op)
        sz_shape = (b, h, nq // group_size, d) if axis == "channel" else (b, h, nq, d // group_size)
        for name, t in (("scale", scale), ("zero", zero)):
            checks.tensor(t, name, op, (torch.float16,), dim=4)
            if tuple(t.shape) != sz_shape or (axis == "channel" and nq % group_size) or (
                    axis == "token" and d % group_size):
                checks.fail(op, f"{name} must have shape {sz_shape} (axis={axis!r}, group_size={group_size}, "
                                f"packed {tuple(packed.shape)}), got {tuple(t.shape)}")
            checks.same_device(op, packed.device, **{name: t})
        s = scale
    else:
        if group_size is not None or axis is not None:
            checks.fail(op, "group_size and axis are for group-wise bodies (pass zero=) only")
        s = _head_scale(scale, h, op, dev)
    p = 0
    if prefix is not None:
        _kv_tensor(prefix, "prefix", op)
        checks.same_device(op, packed.device, prefix=prefix)
        if prefix.shape[0] not in (1, b) or prefix.shape[1] != h or prefix.shape[3] != d:
            checks.fail(op, f"prefix must have shape (1 or {b}, {h}, P, {d}) to match packed "
                            f"{tuple(packed.shape)} ({bits}-bit: D = {d}), got {tuple(prefix.shape)}")
        p = prefix.shape[2]
    nt = 0
    if tail is not None:
        _kv_tensor(tail, "tail", op)
        checks.same_device(op, packed.device, tail=tail)
        if (tail.shape[0], tail.shape[1], tail.shape[3]) != (b, h, d):
            checks.fail(op, f"tail must have shape ({b}, {h}, Nt, {d}) to match packed {tuple(packed.shape)}, "
                            f"got {tuple(tail.shape)}")
        nt = tail.shape[2]
    bpos, tpos = _positions(body_pos, tail_pos, nq, nt, op, dev)
    be = resolve(backend, dev, op, None if not groupwise and nt == 0 and bpos is None else _CPU_STATIC_ONLY).kind
    return torch.ops.pqk.kv_dequant_concat(prefix if p else None, packed, s, zero, bits, group_size or 1, axis,
                                           tail if nt else None, bpos, tpos, out_dtype, be)


def _prefix(prefix_k, prefix_v, q: torch.Tensor, hkv: int, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode ops' prefix: float [1 or B, hkv, P, D] each, or both None (-> empty [1, hkv, 0, D])."""
    B, _, D = q.shape
    if (prefix_k is None) != (prefix_v is None):
        checks.fail(op, "prefix_k and prefix_v must be given together (or neither)")
    if prefix_k is None:
        prefix_k = prefix_v = q.new_empty(1, hkv, 0, D)
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _kv_tensor(t, name, op)
        if t.shape[0] not in (1, B) or t.shape[1] != hkv or t.shape[3] != D or t.shape != prefix_k.shape:
            checks.fail(op, f"{name} must be [1 or {B}, {hkv}, P, {D}] (and match prefix_k), got {tuple(t.shape)}")
    if prefix_v.dtype != prefix_k.dtype:
        checks.fail(op, f"prefix_v must have prefix_k's dtype {prefix_k.dtype}, got {prefix_v.dtype}", TypeError)
    return prefix_k, prefix_v


def _body_len_value(n: int, T: int, P: int) -> None:
    """body_len's value (read on the host): in [0, T], and something left to attend to."""
    op = "kv_decode_attention"
    if not 0 <= n <= T:
        checks.fail(op, f"body_len must be in [0, T = {T}] (the body's capacity), got {n}")
    if P + n == 0:
        checks.fail(op, "the cache is empty (P + body_len == 0): nothing to attend to")


def _head_dim(q: torch.Tensor, op: str) -> int:
    """q [B, H_q, D] -> D, which must be > 0."""
    if q.shape[2] == 0:
        checks.fail(op, f"q's head dim D must be > 0, got shape {tuple(q.shape)}")
    return q.shape[2]


def kv_decode_attention(q: torch.Tensor, prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None,
                        k_packed: torch.Tensor, v_packed: torch.Tensor, k_scale: torch.Tensor,
                        v_scale: torch.Tensor, bits: int = 4, sm_scale: float | None = None, *,
                        backend: str = "auto", body_len: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token over a PrefixQuant cache ``[16-bit prefix | static-quantized body]``.

    The Triton kernel reads the packed body and dequantizes it in registers (never materializing a 16-bit
    copy), splits the sequence across programs and reads each KV head once for its G = H_q / H_kv query heads.

    Args:
        q: float [B, H_q, D], the new token's queries (after RoPE); H_q a multiple of H_kv.
        prefix_k, prefix_v: float [B or 1, H_kv, P, D] (P may be 0), or None for no prefix.
        k_packed, v_packed: as kv_quantize returned them: uint8 [B, H_kv, T, D//2] (bits 4) or int8 [..., D].
        k_scale, v_scale: float [H_kv] static per-head scales.
        sm_scale: softmax scale (a finite real number), default 1/sqrt(D).
        body_len: int64 one-element tensor on q's device, or None: the body rows in use, in [0, T] with
            P + body_len > 0, T then being the capacity of a preallocated cache (cache/modes/static.py). A tensor,
            not an int, so a compiled step (and a CUDA graph) reads the length where it is, never on the host
            (its value is checked here where that is free: a CPU tensor, outside torch.compile).
        mask: bool [B, >= P + T] on q's device (True = attend), or None: which positions each sequence attends
            to (a left-padded batch); a row that masks every position gives zeros.
    Returns q.dtype [B, H_q, D] = softmax(q K^T * sm_scale) V over the P + T positions (or those allowed).
    """
    op = "kv_decode_attention"
    checks.tensor(q, "q", op, FLOAT_DTYPES, dim=3)
    _bits(bits, op, STATIC_BITS)
    qt = (torch.uint8,) if bits == 4 else (torch.int8,)
    _kv_tensor(k_packed, "k_packed", op, qt)
    _kv_tensor(v_packed, "v_packed", op, qt)
    B, Hq, D = q.shape
    _head_dim(q, op)
    Bk, Hkv, T, Dp = k_packed.shape
    if v_packed.shape != k_packed.shape:
        checks.fail(op, f"v_packed must have k_packed's shape {tuple(k_packed.shape)}, got {tuple(v_packed.shape)}")
    if Bk != B or Dp * (2 if bits == 4 else 1) != D:
        checks.fail(op, f"k_packed must be [{B}, H_kv, T, {D // 2 if bits == 4 else D}] for q of shape {tuple(q.shape)}, "
                        f"got {tuple(k_packed.shape)}")
    if Hkv == 0 or Hq % Hkv:
        checks.fail(op, f"q's head count {Hq} must be a multiple of the KV head count {Hkv} (> 0)")
    dev = q.device
    checks.same_device(op, dev, k_packed=k_packed, v_packed=v_packed, prefix_k=prefix_k, prefix_v=prefix_v)
    ks = _head_scale(k_scale, Hkv, op, dev)
    vs = _head_scale(v_scale, Hkv, op, dev)
    prefix_k, prefix_v = _prefix(prefix_k, prefix_v, q, Hkv, op)
    if prefix_k.shape[2] + T == 0:
        checks.fail(op, "the cache is empty (P + T == 0): nothing to attend to")
    if body_len is not None:
        checks.tensor(body_len, "body_len", op, (torch.int64,), min_dim=0)
        if body_len.numel() != 1:
            checks.fail(op, f"body_len must hold one element, got shape {tuple(body_len.shape)}")
        # its value, where reading it costs no sync and no graph break (a CUDA one is checked by the reference only)
        if body_len.device.type == "cpu" and not torch.compiler.is_compiling():
            _body_len_value(int(body_len), T, prefix_k.shape[2])
    if mask is not None:
        checks.tensor(mask, "mask", op, (torch.bool,), dim=2)
        if mask.shape[0] != B or mask.shape[1] < prefix_k.shape[2] + T:
            checks.fail(op, f"mask must be [{B}, >= P + T = {prefix_k.shape[2] + T}], got {tuple(mask.shape)}")
    checks.same_device(op, dev, body_len=body_len, mask=mask)
    scale = checks.sm_scale(sm_scale, op, D)
    be = resolve(backend, dev, op).kind
    return torch.ops.pqk.kv_decode_attention(q, prefix_k, prefix_v, k_packed, v_packed, ks, vs, bits, scale, be,
                                             body_len=body_len, mask=mask)


def _paged_cache(cache, h: int, d: int, bits: int, op: str) -> tuple[int, int]:
    """cache uint8 [blocks, h, block_size, 2 * c] (c = d // 2 for bits 4, d for 8) -> (blocks, block_size)."""
    checks.tensor(cache, "cache", op, (torch.uint8,), dim=4)
    c = d // 2 if bits == 4 else d
    if cache.shape[1] != h or cache.shape[3] != 2 * c or cache.shape[2] == 0:
        checks.fail(op, f"cache must be [blocks, {h}, block_size > 0, {2 * c}] (per token-head its {c} K code bytes "
                        f"then its {c} V code bytes), got {tuple(cache.shape)}")
    return cache.shape[0], cache.shape[2]


def kv_write_paged(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: torch.Tensor, v_scale: torch.Tensor, bits: int = 4, *,
                   key_offset: torch.Tensor | None = None, backend: str = "auto") -> None:
    """Quantize new tokens' K and V with static per-head scales into a paged cache, in place (vLLM's layout).

    Args:
        key, value: float [T, H, D] (one dtype and shape), the new tokens (K after RoPE and any rotation).
        cache: uint8 [blocks, H, block_size, 2 * c], c = D // 2 (bits 4: two codes per byte, as kv_quantize packs)
            or D (bits 8): per token-head its K codes, then its V codes. Written in place.
        slot_mapping: int64 [n], n <= T: token t goes to block slot // block_size, offset slot % block_size;
            a slot < 0 is skipped (padding).
        k_scale, v_scale: float [H] static per-head scales.
        key_offset: float [H, D] or None: K - key_offset[h] (in fp32, rounded to K's dtype) is what is quantized,
            as the cache's k_center (transform_keys) shifts it.
    Every argument is checked before the cache is touched; a slot written twice in one call keeps one of them.
    """
    op = "kv_write_paged"
    _bits(bits, op, STATIC_BITS)
    checks.tensor(key, "key", op, FLOAT_DTYPES, dim=3)
    checks.tensor(value, "value", op, FLOAT_DTYPES, dim=3)
    if value.shape != key.shape or value.dtype != key.dtype:
        checks.fail(op, f"value must have key's shape {tuple(key.shape)} and dtype {key.dtype}, got "
                        f"{tuple(value.shape)} {value.dtype}")
    T, H, D = key.shape
    if bits == 4 and D % 2:
        checks.fail(op, f"bits=4 packs two codes per byte: key's head dim must be even, got {D}")
    blocks, bs = _paged_cache(cache, H, D, bits, op)
    checks.tensor(slot_mapping, "slot_mapping", op, (torch.int64,), dim=1)
    if slot_mapping.shape[0] > T:
        checks.fail(op, f"slot_mapping has {slot_mapping.shape[0]} slots for {T} tokens")
    dev = key.device
    checks.same_device(op, dev, value=value, cache=cache, slot_mapping=slot_mapping, key_offset=key_offset)
    ks, vs = _head_scale(k_scale, H, op, dev), _head_scale(v_scale, H, op, dev)
    if slot_mapping.numel() and int(slot_mapping.max()) >= blocks * bs:
        checks.fail(op, f"slot_mapping holds slot {int(slot_mapping.max())}, past the cache's {blocks * bs} slots")
    if key_offset is not None:
        checks.tensor(key_offset, "key_offset", op, FLOAT_DTYPES, dim=2)
        if tuple(key_offset.shape) != (H, D):
            checks.fail(op, f"key_offset must be [{H}, {D}] (one offset row per KV head), got "
                            f"{tuple(key_offset.shape)}")
    be = resolve(backend, dev, op).kind
    torch.ops.pqk.kv_write_paged(key, value, cache, slot_mapping, ks, vs, bits, key_offset, be)


def kv_decode_paged(q: torch.Tensor, prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None,
                    cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, k_scale: torch.Tensor,
                    v_scale: torch.Tensor, bits: int = 4, sm_scale: float | None = None, *,
                    backend: str = "auto") -> torch.Tensor:
    """kv_decode_attention over a paged cache: each sequence's one new token attends to the 16-bit prefix and to
    its own body, read from the cache's pages through its block table row (no gathered copy on the C++ path).

    Args:
        q: float [B, H_q, D]; H_q a multiple of the cache's H_kv.
        prefix_k, prefix_v: float [1 or B, H_kv, P, D], or None (P = 0).
        cache: uint8 [blocks, H_kv, block_size, 2 * c] as kv_write_paged writes it.
        block_table: int32 or int64 [B, width]: sequence b's position p is in block block_table[b, p // block_size].
        seq_lens: int [B]: sequence b has P <= seq_lens[b] <= width * block_size positions; its body is positions
            P .. seq_lens[b] - 1 (the prefix's positions hold no codes). A sequence with none attends to nothing
            and gets zeros.
        k_scale, v_scale: float [H_kv] static per-head scales; sm_scale: default 1/sqrt(D).
    Returns q.dtype [B, H_q, D].
    """
    op = "kv_decode_paged"
    checks.tensor(q, "q", op, FLOAT_DTYPES, dim=3)
    _bits(bits, op, STATIC_BITS)
    B, Hq, D = q.shape
    _head_dim(q, op)
    checks.tensor(cache, "cache", op, (torch.uint8,), dim=4)
    Hkv = cache.shape[1]
    if Hkv == 0 or Hq % Hkv:
        checks.fail(op, f"q's head count {Hq} must be a multiple of the cache's KV head count {Hkv}")
    if bits == 4 and D % 2:
        checks.fail(op, f"bits=4 packs two codes per byte: q's head dim must be even, got {D}")
    blocks, bs = _paged_cache(cache, Hkv, D, bits, op)
    checks.tensor(block_table, "block_table", op, (torch.int32, torch.int64), dim=2)
    checks.tensor(seq_lens, "seq_lens", op, (torch.int32, torch.int64), dim=1)
    if block_table.shape[0] != B or seq_lens.shape[0] != B:
        checks.fail(op, f"block_table [{B}, width] and seq_lens [{B}] must have q's batch {B}, got "
                        f"{tuple(block_table.shape)} and {tuple(seq_lens.shape)}")
    dev = q.device
    checks.same_device(op, dev, cache=cache, block_table=block_table, seq_lens=seq_lens, prefix_k=prefix_k,
                       prefix_v=prefix_v)
    ks, vs = _head_scale(k_scale, Hkv, op, dev), _head_scale(v_scale, Hkv, op, dev)
    prefix_k, prefix_v = _prefix(prefix_k, prefix_v, q, Hkv, op)
    P, width = prefix_k.shape[2], block_table.shape[1]
    lens = seq_lens.long()
    bad = (lens < P) | (lens > width * bs)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0])
        checks.fail(op, f"seq_lens[{b}] = {int(lens[b])} is outside [P = {P}, width * block_size = {width * bs}]")
    used = torch.arange(width, device=dev)[None] * bs < lens[:, None]       # [B, width] blocks holding positions
    used &= (torch.arange(width, device=dev)[None] >= P // bs) & (lens > P)[:, None]   # of body positions
    wrong = used & ((block_table < 0) | (block_table >= blocks))
    if bool(wrong.any()):
        b, i = (int(x) for x in torch.nonzero(wrong)[0])
        checks.fail(op, f"block_table[{b}, {i}] = {int(block_table[b, i])} is not a block of the cache's {blocks}")
    scale = checks.sm_scale(sm_scale, op, D)
    be = resolve(backend, dev, op).kind
    return torch.ops.pqk.kv_decode_paged(q, prefix_k, prefix_v, cache, block_table, seq_lens, ks, vs, bits, scale,
                                         be)


# ---- the custom ops' implementations: inputs validated, backend resolved by the public ops above -----------------
# Registered for CompositeExplicitAutograd (every device; no autograd: these ops run under inference only). Each
# returns freshly allocated contiguous tensors (never a view of an input), as the schemas and fakes promise: the
# reference's elementwise math would otherwise keep a strided input's layout (opcheck caught that), hence the
# .contiguous() on its results (free when they already are).

def _impl(name: str):
    def register(fn):
        library.LIB.impl(name, fn, "CompositeExplicitAutograd")
        return fn
    return register


@_impl("kv_quantize")
def _kv_quantize_impl(x, scale, bits, backend):
    if backend == "cpu":  # the C++ kernel: the GEMM's quantize_row / pack_row, one scale per head
        return torch.ops.pqk.kv_quantize_static(x.contiguous(), scale.contiguous(), bits)
    if backend == "triton":
        return _kernels().kv_quantize_static(x, scale, bits)
    return kvf.quantize_static(x, scale, bits).contiguous()


@_impl("kv_quantize_groupwise")
def _kv_quantize_groupwise_impl(x, bits, group_size, axis, backend):
    if backend == "triton":
        return _kernels().kv_quantize_groupwise(x, bits, group_size, axis)
    return tuple(t.contiguous() for t in kvf.quantize_groupwise(x, bits, group_size, axis))


@_impl("kv_dequant_concat")
def _kv_dequant_concat_impl(prefix, packed, scale, zero, bits, group_size, axis, tail, body_pos, tail_pos,
                            out_dtype, backend):
    if backend == "cpu":  # the C++ kernel: static body, no tail or positions (checked by the public op)
        pre = None if prefix is None else prefix.contiguous()
        return torch.ops.pqk.kv_dequant_static(pre, packed.contiguous(), scale, bits, out_dtype)
    if backend == "triton":
        return _kernels().kv_dequant_concat(prefix, packed, scale, zero, bits, group_size, axis, tail, body_pos,
                                            tail_pos, out_dtype)
    if zero is not None:
        body = kvf.dequantize_groupwise(packed, scale, zero, bits, group_size, axis)
    else:
        body = kvf.dequantize_static(packed, scale, bits)
    return kvf.dequant_concat(prefix, body, tail, body_pos, tail_pos, out_dtype)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself when its rows are contiguous and its batch/head strides whole rows (e.g. the cache's [:, :, :T]
    view of a larger buffer: the C++ decode kernel reads it in place), else a contiguous copy."""
    row = t.shape[3]
    # a size-1 dim's stride is never stepped, so any value is as good: one that passes the checks below (and the
    # C++ op's: K's and V's strides equal), which .contiguous() leaves as it is (it sees nothing to copy)
    canon = [s if n > 1 else (1 if d == 3 else row) for d, (n, s) in enumerate(zip(t.shape, t.stride()))]
    if canon != list(t.stride()):
        t = t.as_strided(t.shape, canon)
    ok = t.stride(3) == 1 and t.stride(2) == row and t.stride(1) % row == 0 and t.stride(0) % row == 0
    return t if ok else t.contiguous()


@_impl("kv_decode_attention")
def _kv_decode_attention_impl(q, prefix_k, prefix_v, k_packed, v_packed, k_scale, v_scale, bits, sm_scale, backend,
                              body_len=None, mask=None):
    if mask is not None and mask.stride(-1) != 1:
        mask = mask.contiguous()
    if backend == "cpu":  # the C++ kernel reads the packed body in place (csrc/cpu/kv_cache.cpp)
        pre_k = prefix_k.contiguous() if prefix_k.shape[2] else None
        pre_v = prefix_v.contiguous() if prefix_v.shape[2] else None
        k, v = _rows_contiguous(k_packed), _rows_contiguous(v_packed)
        if k.stride() != v.stride():
            k, v = k.contiguous(), v.contiguous()
        return torch.ops.pqk.kv_decode_static(q.contiguous(), pre_k, pre_v, k, v, k_scale.contiguous(),
                                              v_scale.contiguous(), bits, sm_scale, -1, body_len, mask)
    if backend == "triton":
        from ..triton.decode_attention import decode_attention
        return decode_attention(q, prefix_k, prefix_v, k_packed, v_packed, k_scale, v_scale, bits, sm_scale,
                                body_len=body_len, mask=mask, sms=cuda_ops.sm_count(q.device))
    if body_len is not None:   # the reference reads the length on the host (it is never in a CUDA graph)
        n = int(body_len)
        _body_len_value(n, k_packed.shape[2], prefix_k.shape[2])   # here too: the public op checks a CPU one only
        k_packed, v_packed = k_packed[:, :, :n], v_packed[:, :, :n]
    if mask is not None:
        mask = mask[:, :prefix_k.shape[2] + k_packed.shape[2]]
    return kvf.decode_attention(q, prefix_k, prefix_v, k_packed, v_packed, k_scale, v_scale, bits,
                                sm_scale, mask).contiguous()


@_impl("kv_write_paged")
def _kv_write_paged_impl(key, value, cache, slot_mapping, k_scale, v_scale, bits, key_offset, backend):
    if backend == "cpu" and cache.is_contiguous():   # the C++ kernel writes each row into its page
        off = None if key_offset is None else key_offset.float().contiguous()
        k = key if key.stride(2) == 1 else key.contiguous()          # rows contiguous, any token / head strides
        v = value if value.stride(2) == 1 else value.contiguous()
        torch.ops.pqk.kv_write_paged_static(k, v, cache, slot_mapping.contiguous(), k_scale.contiguous(),
                                            v_scale.contiguous(), bits, off)
        return
    kvf.write_paged(key, value, cache, slot_mapping, k_scale, v_scale, bits, key_offset)


@_impl("kv_decode_paged")
def _kv_decode_paged_impl(q, prefix_k, prefix_v, cache, block_table, seq_lens, k_scale, v_scale, bits, sm_scale,
                          backend):
    if backend == "cpu" and cache.is_contiguous():   # the C++ kernel reads the pages in place
        pre_k = prefix_k.contiguous() if prefix_k.shape[2] else None
        pre_v = prefix_v.contiguous() if prefix_v.shape[2] else None
        table = block_table.to(torch.int32)
        if table.stride(1) != 1:
            table = table.contiguous()
        return torch.ops.pqk.kv_decode_paged_static(q.contiguous(), pre_k, pre_v, cache, table, seq_lens,
                                                    k_scale.contiguous(), v_scale.contiguous(), bits, sm_scale)
    return kvf.decode_paged(q, prefix_k, prefix_v, cache, block_table, seq_lens, k_scale, v_scale, bits,
                            sm_scale).contiguous()
