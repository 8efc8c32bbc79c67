"""What every KV cache mode shares (prefixquant_kernels/cache/modes/ builds on it): ``PrefixedLayer``, the base
layer (the 16-bit prefix, the token count, mask sizes, batch selection, crop, reset, the memory report);
``Rows``, a buffer grown along the token dim; ``GroupwiseStore``, one of K or V held group-wise quantized
(KIVI / LogQuant / per-token dynamic); and the argument checks. A mode subclasses PrefixedLayer and fills in
its stores (``init_stores``, ``append``, ``keys_values``, ...); the layout and the crop / beam semantics are
in docs/KV_CACHE.md.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    from transformers.cache_utils import CacheLayerMixin
except ImportError:   # QuantConfig reads the modes' declarations (names, bits) without transformers; a layer is
    CacheLayerMixin = object  # only ever built by PrefixQuantCache, which needs transformers

from ..ops import kv as kv_ops

OP = "PrefixQuantCache"   # the public class every argument error names


def fail(msg: str, exc: type[Exception] = ValueError):
    raise exc(f"pqk.{OP}: {msg}")


class Rows:
    """A [B, H, n, X] tensor grown along dim 2 in a buffer of doubling capacity: an append copies only the new
    rows (amortized), never the history. ``view`` is the filled part."""

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.n = 0

    def append(self, x: torch.Tensor) -> None:
        need = self.n + x.shape[2]
        if self.buf is None or need > self.buf.shape[2]:
            cap = max(need, 2 * (0 if self.buf is None else self.buf.shape[2]), 16)
            new = x.new_empty(*x.shape[:2], cap, *x.shape[3:])
            if self.n:
                new[:, :, :self.n] = self.buf[:, :, :self.n]
            self.buf = new
        self.buf[:, :, self.n:need] = x
        self.n = need

    def view(self) -> torch.Tensor | None:
        return None if self.buf is None else self.buf[:, :, :self.n]

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The given rows (a copy), e.g. the tokens about to be quantized."""
        return self.buf.index_select(2, rows.to(self.buf.device))

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the given rows, in that order (compaction after tokens leave)."""
        kept = self.take(rows)
        self.buf[:, :, :kept.shape[2]] = kept
        self.n = kept.shape[2]

    def truncate(self, n: int) -> None:
        """Keep the first n rows (no copy: the capacity stays for later appends)."""
        self.n = min(self.n, n)

    def select_batch(self, idx: torch.Tensor) -> None:
        """Batch rows idx (int64 [B']), repeats allowed. index_select over the whole buffer, spare capacity
        included (at most 2x the filled part): one copy, and the next append still finds room, where selecting
        only the filled part would make that append reallocate and copy the history a second time."""
        if self.buf is not None:
            self.buf = self.buf.index_select(0, idx.to(self.buf.device))

    def replace(self, x: torch.Tensor) -> None:
        """Hold exactly x (a rebuild, for the rare crop that reorders rows)."""
        self.buf, self.n = None, 0
        self.append(x)

    def nbytes(self) -> int:
        v = self.view()
        return 0 if v is None else v.numel() * v.element_size()


def row_index(rows, device) -> torch.Tensor:
    return torch.as_tensor(rows, dtype=torch.long, device=device)


def concat_16bit(prefix: torch.Tensor | None, tail: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """[prefix | tail] with no quantized body (the dequant-concat kernel with Nq = 0)."""
    b, h, _, d = tail.shape
    empty = torch.empty(b, h, 0, d // 2, dtype=torch.uint8, device=tail.device)
    return kv_ops.kv_dequant_concat(prefix, empty, torch.ones(h, device=tail.device), 4, dtype, tail=tail,
                                    backend=backend)


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()



def add_bytes(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}



def per_layer(x, n: int, name: str) -> list:
    if x is None:
        return [None] * n
    if not isinstance(x, Sequence) or isinstance(x, torch.Tensor) or len(x) != n:
        fail(f"{name} must be a list with one entry per layer ({n}), got {type(x).__name__}"
              + (f" of length {len(x)}" if isinstance(x, Sequence) else ""), TypeError)
    return list(x)


def check_prefix(pk, pv, i: int) -> None:
    if (pk is None) != (pv is None):
        fail(f"prefix_keys[{i}] and prefix_values[{i}] must both be given or both be None")
    if pk is None:
        return
    for name, t in ((f"prefix_keys[{i}]", pk), (f"prefix_values[{i}]", pv)):
        kv_ops.checks.tensor(t, name, OP, kv_ops.FLOAT_DTYPES, dim=4)
    if pk.shape != pv.shape:
        fail(f"prefix_keys[{i}] and prefix_values[{i}] must have the same shape, got {tuple(pk.shape)} and "
              f"{tuple(pv.shape)}")


def head_scales(scale, name: str) -> torch.Tensor:
    """A float [H_kv] tensor, finite and > 0 -> float32 (H_kv is checked against the model at the first update)."""
    kv_ops.checks.tensor(scale, name, OP, kv_ops.FLOAT_DTYPES, dim=1)
    return kv_ops.checks.channel_vector(scale, name, OP, scale.numel(), scale.device, positive=True)


def check_positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        fail(f"{name} must be a positive int, got {v!r}")
    return v



class PrefixedLayer(CacheLayerMixin):
    """What every mode shares: the 16-bit prefix, the token count, the mask sizes, the memory report.

    A mode's constructor takes ``prefix_keys``, ``prefix_values`` ([1 or B, H_kv, P, D] or None), ``bits`` (one
    of its registered widths: ``supported_bits``, set by registry.register_kv_mode), ``backend`` and its own
    arguments, and validates them; ``for_layers`` builds one layer per decoder layer from PrefixQuantCache's
    arguments.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True    # crop(-k) restores exactly the state before the last k tokens (not kivi/logquant)
    # Fused decode (PrefixQuantCache.deferred_reads): a layer with decode_attention() may answer a one-token
    # update() with empty K/V instead of building the whole float history, for an attention that calls
    # decode_attention() (or keys_values() if it cannot) instead of reading K/V.
    defer_reads = False
    has_decode_attention = False

    def __init__(self, prefix_keys: torch.Tensor | None, prefix_values: torch.Tensor | None, backend: str,
                 bits: int | None = None):
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.prefix_len = 0 if prefix_keys is None else prefix_keys.shape[2]
        if backend not in kv_ops.KV_BACKENDS:
            fail(f"backend must be one of {kv_ops.KV_BACKENDS}, got {backend!r}")
        self.backend = backend
        self.bits = self.check_bits(bits)
        self.n_tokens = 0  # tokens after the prefix
        self.init_stores()

    @classmethod
    def check_bits(cls, bits: int | None) -> int | None:
        """bits, or the mode's default (its first width) for None; ValueError if the mode does not support it."""
        supported = getattr(cls, "supported_bits", None)
        if supported is None:   # a layer class no mode registered: no declared widths to check against
            return bits
        if bits is None:
            return supported[0]
        if isinstance(bits, bool) or bits not in supported:
            fail(f"bits={bits!r} is not supported by mode={cls.kv_mode!r} (supported: {supported})")
        return bits

    @classmethod
    def for_layers(cls, num_layers: int, prefix_keys: list, prefix_values: list, *, backend: str,
                   bits: int | None = None, **options) -> list:
        """One layer per decoder layer (prefix_keys / prefix_values: one tensor or None per layer; options: the
        mode's own constructor arguments, the same for every layer). A mode with per-layer data (e.g. static
        scales) overrides this."""
        return [cls(prefix_keys=prefix_keys[i], prefix_values=prefix_values[i], bits=bits, backend=backend,
                    **options) for i in range(num_layers)]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.batch = b
        for name, pre in (("prefix_keys", self.prefix_keys), ("prefix_values", self.prefix_values)):
            if pre is not None and (pre.shape[0] not in (1, b) or pre.shape[1] != h or pre.shape[3] != d
                                    or pre.device != key_states.device):
                beams = (f" (beam search runs batch * num_beams sequences: give a batch-1 prefix, or "
                         f"repeat_interleave it by num_beams)" if pre.shape[0] > 1 and b % pre.shape[0] == 0 else "")
                fail(f"{name} must have shape (1 or {b}, {h}, P, {d}) on {key_states.device} to match the "
                      f"model's key states {tuple(key_states.shape)}, got {tuple(pre.shape)} on {pre.device}"
                      + beams)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.append(key_states, value_states)
        self.n_tokens += key_states.shape[2]
        if self.defer_reads and self.has_decode_attention and key_states.shape[2] == 1:
            return key_states[:, :, :0], value_states[:, :, :0]   # deferred: see PrefixQuantCache.deferred_reads
        return self.keys_values(key_states.dtype)

    def get_seq_length(self) -> int:
        return self.prefix_len + self.n_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the tensors this layer holds, by part (prefix counted once, however large the batch)."""
        return {"prefix": nbytes(self.prefix_keys) + nbytes(self.prefix_values), **self.body_bytes()}

    def batch_size(self) -> int | None:
        """The batch the layer holds: the model's once initialized, else a per-sequence prefix's, else None."""
        if self.is_initialized:
            return self.batch
        if self.prefix_keys is not None and self.prefix_keys.shape[0] > 1:
            return self.prefix_keys.shape[0]
        return None

    def select_batch(self, idx: torch.Tensor) -> None:
        """Keep batch rows idx (int64 [B'], in [0, batch), repeats allowed), in that order. Validated by
        PrefixQuantCache. A batch-1 prefix is shared by every row and stays as it is (no copy)."""
        for name in ("prefix_keys", "prefix_values"):
            pre = getattr(self, name)
            if pre is not None and pre.shape[0] > 1:
                setattr(self, name, pre.index_select(0, idx.to(pre.device)))  # a new tensor: the user's is untouched
        if self.is_initialized:
            self.select_stores(idx.to(self.device))
            self.batch = idx.numel()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        b = self.batch_size()
        if b is not None:
            self.select_batch(torch.arange(b).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the -tokens_to_remove newest tokens (validated by PrefixQuantCache; semantics: docs/KV_CACHE.md)."""
        k = -tokens_to_remove
        if k == 0:
            return
        keep = self.get_seq_length() - k
        if keep < self.prefix_len:  # into the prefix: cut it as a view (the user's tensor is untouched)
            self.prefix_keys = self.prefix_keys[:, :, :keep]
            self.prefix_values = self.prefix_values[:, :, :keep]
            self.prefix_len = keep
        m = max(keep - self.prefix_len, 0)
        if m < self.n_tokens:
            self.crop_stores(m)
            self.n_tokens = m

    def reset(self) -> None:
        """Drop every token after the prefix; the prefix and the scales stay."""
        self.init_stores()
        self.n_tokens = 0
        self.is_initialized = False

    # per mode
    def init_stores(self) -> None:
        raise NotImplementedError

    def select_stores(self, idx: torch.Tensor) -> None:
        """Batch rows idx of the stores. Every mode keeps K and V in ``self.k`` / ``self.v`` (Rows or GroupwiseStore,
        both with ``select_batch``); each quantizer works per batch row, so selecting rows is exact."""
        self.k.select_batch(idx)
        self.v.select_batch(idx)

    def crop_stores(self, m: int) -> None:
        """Keep the first m tokens after the prefix (m < n_tokens)."""
        raise NotImplementedError

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError

    def keys_values(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def body_bytes(self) -> dict[str, int]:
        raise NotImplementedError


class GroupwiseStore:
    """One of K or V in 2 or 4 bits: a packed body with fp16 group scales/zeros, plus 16-bit rows; each row of
    either part knows its position (counted after the prefix), so bodies can be filled in any order (LogQuant)."""

    def __init__(self, bits: int, group_size: int, axis: str, backend: str, in_order: bool):
        self.bits, self.group_size, self.axis, self.backend = bits, group_size, axis, backend
        self.in_order = in_order        # the body is filled in position order (KIVI), not scattered (LogQuant)
        self.packed, self.scale, self.zero = Rows(), Rows(), Rows()
        self.body_pos = Rows()         # int32 [1, 1, Nq, 1]: position of each body row (if not in_order)
        self.fp = Rows()               # 16-bit rows
        self.fp_pos: list[int] = []     # position of each 16-bit row

    def add_fp(self, x: torch.Tensor, positions: list[int]) -> None:
        self.fp.append(x)
        self.fp_pos.extend(positions)

    def quantize_append(self, x: torch.Tensor) -> None:
        """Quantize x [B, H, T, D] straight into an in-order body, after the rows it holds (no 16-bit rows may
        wait: per-token groups, e.g. the dynamic mode's)."""
        p, s, z = kv_ops.kv_quantize_groupwise(x, self.bits, self.group_size, self.axis, backend=self.backend)
        self.packed.append(p)
        self.scale.append(s)
        self.zero.append(z)

    def quantize_fp_rows(self, rows: list[int]) -> None:
        """Move the given 16-bit rows (indices into fp, in this order) to the body; keep the others in order."""
        if not rows:
            return
        dev = self.fp.buf.device
        x = self.fp.take(torch.tensor(rows, device=dev))
        p, s, z = kv_ops.kv_quantize_groupwise(x, self.bits, self.group_size, self.axis, backend=self.backend)
        self.packed.append(p)
        self.scale.append(s)
        self.zero.append(z)
        if not self.in_order:  # an in-order body needs no positions
            pos = torch.tensor([self.fp_pos[r] for r in rows], dtype=torch.int32, device=dev)
            self.body_pos.append(pos.reshape(1, 1, -1, 1))
        gone = set(rows)
        stay = [r for r in range(len(self.fp_pos)) if r not in gone]
        self.fp.keep(torch.tensor(stay, dtype=torch.long, device=dev))
        self.fp_pos = [self.fp_pos[r] for r in stay]

    def assemble(self, prefix: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        tail = self.fp.view()
        if self.packed.n == 0:
            return concat_16bit(prefix, tail, dtype, self.backend)
        nq = self.packed.n
        kw = {}
        if not self.in_order:  # LogQuant: body and 16-bit rows scattered to their positions
            body_pos = self.body_pos.view().reshape(nq)
            kw = {"body_pos": body_pos,
                  "tail_pos": torch.tensor(self.fp_pos, dtype=torch.int32, device=body_pos.device)}
        return kv_ops.kv_dequant_concat(prefix, self.packed.view(), self.scale.view(), self.bits, dtype,
                                        zero=self.zero.view(), group_size=self.group_size, axis=self.axis,
                                        tail=tail if tail is not None and tail.shape[2] else None,
                                        backend=self.backend, **kw)

    def nbytes(self) -> dict[str, int]:
        return {"body": self.packed.nbytes(), "scales": self.scale.nbytes() + self.zero.nbytes(),
                "fp16": self.fp.nbytes(), "positions": self.body_pos.nbytes()}

    def select_batch(self, idx: torch.Tensor) -> None:
        """Batch rows idx: the groups never span sequences, so selecting rows of each part is exact.
        body_pos has batch 1 (the positions are the same for every sequence) and stays."""
        for rows in (self.packed, self.scale, self.zero, self.fp):
            rows.select_batch(idx)

    def crop(self, m: int) -> list[int]:
        """Drop every row at a position >= m. Per-token groups (axis "token") drop with their rows; a per-channel
        group (axis "channel": G body rows sharing one scale/zero per channel) that loses any row is dissolved,
        its other rows moving to the front of the 16-bit rows as their dequantized values (what assemble
        returned for them: q * scale + zero in fp32, cast once to the 16-bit dtype). Returns those positions."""
        nq = self.packed.n
        restored, restored_pos = None, []
        if nq:
            dev = self.packed.buf.device
            bpos = list(range(nq)) if self.in_order else self.body_pos.view().reshape(-1).tolist()
            if self.axis == "token":
                rows = [i for i in range(nq) if bpos[i] < m]
                groups = rows                          # one scale/zero row per body row
            else:
                g = self.group_size
                dead = sorted({i // g for i in range(nq) if bpos[i] >= m})
                groups = [j for j in range(nq // g) if j not in set(dead)]
                rows = [i for j in groups for i in range(j * g, (j + 1) * g)]
                if dead:
                    dead_rows = [i for j in dead for i in range(j * g, (j + 1) * g)]
                    back = [k for k, i in enumerate(dead_rows) if bpos[i] < m]
                    if back:
                        x = kv_ops.kv_dequant_concat(
                            None, self.packed.take(row_index(dead_rows, dev)), self.scale.take(row_index(dead, dev)),
                            self.bits, self.fp.buf.dtype, zero=self.zero.take(row_index(dead, dev)),
                            group_size=g, axis="channel", backend=self.backend)
                        restored = x.index_select(2, row_index(back, dev))
                        restored_pos = [bpos[dead_rows[k]] for k in back]
            self.packed.keep(row_index(rows, dev))
            self.scale.keep(row_index(groups, dev))
            self.zero.keep(row_index(groups, dev))
            if not self.in_order:
                self.body_pos.keep(row_index(rows, dev))
        stay = [r for r, p in enumerate(self.fp_pos) if p < m]
        if restored is not None:  # restored rows first: for an in-order store they precede every 16-bit row
            self.fp.replace(torch.cat([restored, self.fp.take(row_index(stay, restored.device))], 2))
        elif self.fp.buf is not None:
            self.fp.keep(row_index(stay, self.fp.buf.device))
        self.fp_pos = restored_pos + [self.fp_pos[r] for r in stay]
        return restored_pos


