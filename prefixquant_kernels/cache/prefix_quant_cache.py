"""PrefixQuantCache: a transformers v5 ``Cache`` holding each layer's K/V as
``[16-bit prefix | quantized body | 16-bit tokens]`` (layout and formats: prefixquant_kernels/kv_format.py).

Tested with transformers 5.23 (``Cache(layers=...)``, ``CacheLayerMixin``: ``lazy_initialization``,
``update(key, value, *args, **kwargs)``, ``get_mask_sizes``, ``get_seq_length``, ``get_max_length``).

Modes (one layer class each; ``update`` appends the new tokens and returns the whole history, built by
``kv_dequant_concat`` in one kernel):

* ``"prefixquant"``: every token after the prefix in 4 bits with static per-head scales (given per layer).
* ``"kivi"``: 2-bit; keys per-channel in groups of ``group_size`` tokens, quantized a block of
  ``residual_length`` tokens at a time (the block waits in 16 bits until it fills); values per-token in groups
  of ``group_size`` channels, with a sliding 16-bit window of the ``residual_length`` most recent tokens.
* ``"logquant"``: 2-bit like KIVI, but the 16-bit tokens are LogQuant's: a recent list L and a sparse list S
  (window W): when |L| > 2W, ``S = (S + L[:W])[::2]`` (the first time ``S = L[:W]``) and ``L = L[W:]``; the
  tokens that leave S + L are quantized (values at once; keys once ``group_size`` of them have left, waiting
  in 16 bits until then). At most 3W (+ group_size - 1 pending keys) 16-bit tokens.
* ``"fp16"``: no quantization (the comparison): the prefix and the tokens, in the model's dtype.

The prefix (PrefixQuant's outlier tokens; ``[1 or B, H_kv, P, D]`` per layer, any mode) counts in the
sequence length: pass ``input_ids`` that start with the P prefix tokens, generate() then feeds only the rest.
A batch-1 prefix serves every sequence of the batch (read with batch stride 0: never copied).

Beyond greedy / sampling (the methods generate() and assisted generation call):

* ``reorder_cache(beam_idx)`` (beam search), ``batch_select_indices(indices)``, ``batch_repeat_interleave(r)``:
  select batch rows of every tensor that has a batch dim (packed bodies, their group scales/zeros, the 16-bit
  rows). Every quantizer here works per batch row, so the result is bit-exact with a cache fed the selected
  sequences from the start. A batch-1 prefix is left alone (never copied); a per-sequence prefix is selected too.
  generate(num_beams=N) runs B*N sequences: give a batch-1 prefix, or one already repeat_interleaved by N.
* ``crop(-k)`` removes the k newest tokens (transformers >= 5 semantics; ``crop(0)`` is a no-op; k may reach
  into the prefix, which is then cut as a view). "fp16" and "prefixquant" store every token on its own, so a
  cropped cache is bit-exact with one built from the shorter sequence. "kivi" and "logquant" cannot un-quantize:
  after a crop the cache returns, for every remaining position, exactly the values it returned before the crop
  (a 2-bit token stays 2-bit, a 16-bit one stays 16-bit). The one change of representation: a key group (G
  tokens quantized together per channel) that loses some of its tokens is dissolved, and its remaining tokens
  move to the 16-bit rows as their dequantized values (bit-exact), waiting to be re-quantized in a new group.
  So the state can differ from a freshly built cache of the shorter sequence (which would hold some of those
  tokens in 16 bits): ``is_croppable`` is False for these two modes, True for the others.
* ``reset()`` drops every token after the prefix (the prefix and scales stay).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..ops import kv as kv_ops

MODES = ("prefixquant", "kivi", "logquant", "fp16")
_OP = "PrefixQuantCache"


def _fail(msg: str, exc: type[Exception] = ValueError):
    raise exc(f"pqk.{_OP}: {msg}")


class _Rows:
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


def _index(rows, device) -> torch.Tensor:
    return torch.as_tensor(rows, dtype=torch.long, device=device)


def _concat_16bit(prefix: torch.Tensor | None, tail: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """[prefix | tail] with no quantized body (the dequant-concat kernel with Nq = 0)."""
    b, h, _, d = tail.shape
    empty = torch.empty(b, h, 0, d // 2, dtype=torch.uint8, device=tail.device)
    return kv_ops.kv_dequant_concat(prefix, empty, torch.ones(h, device=tail.device), 4, dtype, tail=tail,
                                    backend=backend)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class _PrefixedLayer(CacheLayerMixin):
    """What every mode shares: the 16-bit prefix, the token count, the mask sizes, the memory report."""

    is_sliding = False
    is_compileable = False
    is_croppable = True    # crop(-k) restores exactly the state before the last k tokens (not kivi/logquant)
    # Fused decode (PrefixQuantCache.deferred_reads): a layer with decode_attention() may answer a one-token
    # update() with empty K/V instead of building the whole float history, for an attention that calls
    # decode_attention() (or keys_values() if it cannot) instead of reading K/V.
    defer_reads = False
    has_decode_attention = False

    def __init__(self, prefix_keys: torch.Tensor | None, prefix_values: torch.Tensor | None, backend: str):
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.prefix_len = 0 if prefix_keys is None else prefix_keys.shape[2]
        self.backend = backend
        self.n_tokens = 0  # tokens after the prefix
        self.init_stores()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.batch = b
        for name, pre in (("prefix_keys", self.prefix_keys), ("prefix_values", self.prefix_values)):
            if pre is not None and (pre.shape[0] not in (1, b) or pre.shape[1] != h or pre.shape[3] != d
                                    or pre.device != key_states.device):
                beams = (f" (beam search runs batch * num_beams sequences: give a batch-1 prefix, or "
                         f"repeat_interleave it by num_beams)" if pre.shape[0] > 1 and b % pre.shape[0] == 0 else "")
                _fail(f"{name} must have shape (1 or {b}, {h}, P, {d}) on {key_states.device} to match the "
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
        return {"prefix": _nbytes(self.prefix_keys) + _nbytes(self.prefix_values), **self.body_bytes()}

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
        """Remove the -tokens_to_remove newest tokens (validated by PrefixQuantCache; see the module doc)."""
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
        raise NotImplementedError

    def crop_stores(self, m: int) -> None:
        """Keep the first m tokens after the prefix (m < n_tokens)."""
        raise NotImplementedError

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError

    def keys_values(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def body_bytes(self) -> dict[str, int]:
        raise NotImplementedError



class Fp16Layer(_PrefixedLayer):
    """[prefix | tokens], nothing quantized: the memory and accuracy baseline."""

    def __init__(self, prefix_keys=None, prefix_values=None, backend="auto"):
        super().__init__(prefix_keys, prefix_values, backend)

    def init_stores(self):
        self.k, self.v = _Rows(), _Rows()

    def select_stores(self, idx):
        self.k.select_batch(idx)
        self.v.select_batch(idx)

    def crop_stores(self, m):
        self.k.truncate(m)
        self.v.truncate(m)

    def append(self, key_states, value_states):
        self.k.append(key_states)
        self.v.append(value_states)

    def keys_values(self, dtype):
        return (_concat_16bit(self.prefix_keys, self.k.view(), dtype, self.backend),
                _concat_16bit(self.prefix_values, self.v.view(), dtype, self.backend))

    def body_bytes(self):
        return {"fp16": self.k.nbytes() + self.v.nbytes()}


class StaticQuantLayer(_PrefixedLayer):
    """PrefixQuant: [prefix | 4-bit body], static per-head scales for K and V."""

    def __init__(self, key_scale: torch.Tensor, value_scale: torch.Tensor, prefix_keys=None, prefix_values=None,
                 bits: int = 4, backend="auto"):
        super().__init__(prefix_keys, prefix_values, backend)
        self.key_scale, self.value_scale, self.bits = key_scale, value_scale, bits

    def init_stores(self):
        self.k, self.v = _Rows(), _Rows()

    def select_stores(self, idx):  # packed rows: each token quantized on its own with the static scales
        self.k.select_batch(idx)
        self.v.select_batch(idx)

    def crop_stores(self, m):
        self.k.truncate(m)
        self.v.truncate(m)

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        h = key_states.shape[1]
        for name, s in (("key_scales", self.key_scale), ("value_scales", self.value_scale)):
            if s.numel() != h or s.device != key_states.device:
                _fail(f"each of {name} must have shape ({h},) (one scale per KV head) on {key_states.device}, "
                      f"got {tuple(s.shape)} on {s.device}")

    def append(self, key_states, value_states):
        self.k.append(kv_ops.kv_quantize(key_states, self.key_scale, self.bits, backend=self.backend))
        self.v.append(kv_ops.kv_quantize(value_states, self.value_scale, self.bits, backend=self.backend))

    def keys_values(self, dtype):
        return tuple(kv_ops.kv_dequant_concat(pre, rows.view(), scale, self.bits, dtype, backend=self.backend)
                     for pre, rows, scale in ((self.prefix_keys, self.k, self.key_scale),
                                              (self.prefix_values, self.v, self.value_scale)))

    has_decode_attention = True

    def decode_attention(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query float [B, H_q, 1, D] (after RoPE) -> query.dtype [B, H_q, 1, D]: softmax(q K^T scaling) V over
        the whole cache, K/V read in their stored form (kv_decode_attention: the C++ kernel on CPU, Triton on
        CUDA) instead of dequantized into a float copy first."""
        out = kv_ops.kv_decode_attention(query[:, :, 0], self.prefix_keys, self.prefix_values, self.k.view(),
                                         self.v.view(), self.key_scale, self.value_scale, self.bits, scaling,
                                         backend=self.backend)
        return out.unsqueeze(2)

    def body_bytes(self):
        return {"body": self.k.nbytes() + self.v.nbytes(),
                "scales": _nbytes(self.key_scale) + _nbytes(self.value_scale)}


class _GroupwiseStore:
    """One of K or V in 2 bits: a packed body with fp16 group scales/zeros, plus 16-bit rows; each row of either
    part knows its position (counted after the prefix), so bodies can be filled in any order (LogQuant)."""

    def __init__(self, bits: int, group_size: int, axis: str, backend: str, in_order: bool):
        self.bits, self.group_size, self.axis, self.backend = bits, group_size, axis, backend
        self.in_order = in_order        # the body is filled in position order (KIVI), not scattered (LogQuant)
        self.packed, self.scale, self.zero = _Rows(), _Rows(), _Rows()
        self.body_pos = _Rows()         # int32 [1, 1, Nq, 1]: position of each body row (if not in_order)
        self.fp = _Rows()               # 16-bit rows
        self.fp_pos: list[int] = []     # position of each 16-bit row

    def add_fp(self, x: torch.Tensor, positions: list[int]) -> None:
        self.fp.append(x)
        self.fp_pos.extend(positions)

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
            return _concat_16bit(prefix, tail, dtype, self.backend)
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
                            None, self.packed.take(_index(dead_rows, dev)), self.scale.take(_index(dead, dev)),
                            self.bits, self.fp.buf.dtype, zero=self.zero.take(_index(dead, dev)),
                            group_size=g, axis="channel", backend=self.backend)
                        restored = x.index_select(2, _index(back, dev))
                        restored_pos = [bpos[dead_rows[k]] for k in back]
            self.packed.keep(_index(rows, dev))
            self.scale.keep(_index(groups, dev))
            self.zero.keep(_index(groups, dev))
            if not self.in_order:
                self.body_pos.keep(_index(rows, dev))
        stay = [r for r, p in enumerate(self.fp_pos) if p < m]
        if restored is not None:  # restored rows first: for an in-order store they precede every 16-bit row
            self.fp.replace(torch.cat([restored, self.fp.take(_index(stay, restored.device))], 2))
        elif self.fp.buf is not None:
            self.fp.keep(_index(stay, self.fp.buf.device))
        self.fp_pos = restored_pos + [self.fp_pos[r] for r in stay]
        return restored_pos


def _store_bits(layer) -> int:
    """The bits of a group-wise layer's stores: at construction the layer's; on reset() the stores' own (callers
    such as models/kv_cache.build_cache set layer.k.bits / layer.v.bits after construction)."""
    k = getattr(layer, "k", None)
    return layer.bits if k is None else k.bits


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}


class KiviLayer(_PrefixedLayer):
    """KIVI: keys per-channel, quantized R tokens at a time; values per-token with a sliding 16-bit window of R."""

    def __init__(self, group_size: int = 32, residual_length: int = 128, prefix_keys=None, prefix_values=None,
                 bits: int = 2, backend="auto"):
        self.residual_length, self.group_size, self.bits = residual_length, group_size, bits
        super().__init__(prefix_keys, prefix_values, backend)

    is_croppable = False  # a crop cannot un-quantize (module doc)

    def init_stores(self):
        bits = _store_bits(self)
        self.k = _GroupwiseStore(bits, self.group_size, "channel", self.backend, in_order=True)
        self.v = _GroupwiseStore(bits, self.group_size, "token", self.backend, in_order=True)

    def select_stores(self, idx):
        self.k.select_batch(idx)
        self.v.select_batch(idx)

    def crop_stores(self, m):
        # keys: whole R-blocks stay quantized, a dissolved group's tokens rejoin the 16-bit block (and are
        # re-quantized when it fills); values: the 16-bit window holds fewer than R tokens until it refills
        self.k.crop(m)
        self.v.crop(m)

    def append(self, key_states, value_states):
        pos = list(range(self.n_tokens, self.n_tokens + key_states.shape[2]))
        r = self.residual_length
        self.k.add_fp(key_states, pos)
        full = len(self.k.fp_pos) // r * r      # keys: whole blocks of R leave the residual
        self.k.quantize_fp_rows(list(range(full)))
        self.v.add_fp(value_states, pos)
        over = max(len(self.v.fp_pos) - r, 0)   # values: the oldest beyond the window of R
        self.v.quantize_fp_rows(list(range(over)))

    def keys_values(self, dtype):
        return self.k.assemble(self.prefix_keys, dtype), self.v.assemble(self.prefix_values, dtype)

    def body_bytes(self):
        return _add(self.k.nbytes(), self.v.nbytes())


def logquant_select(sparse: list[int], recent: list[int], window: int) -> tuple[list[int], list[int], list[int]]:
    """LogQuant's selection, applied until |recent| <= 2W -> (sparse, recent, positions that left)."""
    left = []
    while len(recent) > 2 * window:
        if not sparse:
            sparse, recent = recent[:window], recent[window:]
            continue
        merged = sparse + recent[:window]
        sparse, recent = merged[::2], recent[window:]
        left.extend(merged[1::2])
    return sparse, recent, left


class LogQuantLayer(_PrefixedLayer):
    """LogQuant: the 16-bit tokens at log-spaced positions (sparse list S + recent list L, window W); the others
    in 2 bits (keys per-channel once group_size of them have left, values per-token at once)."""

    def __init__(self, window: int = 32, group_size: int = 32, prefix_keys=None, prefix_values=None,
                 bits: int = 2, backend="auto"):
        self.window, self.group_size, self.bits = window, group_size, bits
        super().__init__(prefix_keys, prefix_values, backend)

    is_croppable = False  # a crop cannot un-quantize (module doc)

    def init_stores(self):
        self.sparse: list[int] = []
        self.recent: list[int] = []
        bits = _store_bits(self)
        self.k = _GroupwiseStore(bits, self.group_size, "channel", self.backend, in_order=False)
        self.v = _GroupwiseStore(bits, self.group_size, "token", self.backend, in_order=False)
        self._pending_keys: list[int] = []   # positions that left S + L, keys not yet a full group

    def select_stores(self, idx):
        self.k.select_batch(idx)
        self.v.select_batch(idx)

    def crop_stores(self, m):
        # S and L lose their positions >= m (the newest: L's end, S's only if L empties); the selection goes on
        # from there. Keys of a dissolved group wait again as pending keys, ahead of the ones pending already.
        self.sparse = [p for p in self.sparse if p < m]
        self.recent = [p for p in self.recent if p < m]
        restored = self.k.crop(m)
        self._pending_keys = restored + [p for p in self._pending_keys if p < m]
        self.v.crop(m)

    def append(self, key_states, value_states):
        pos = list(range(self.n_tokens, self.n_tokens + key_states.shape[2]))
        self.k.add_fp(key_states, pos)
        self.v.add_fp(value_states, pos)
        self.sparse, self.recent, left = logquant_select(self.sparse, self.recent + pos, self.window)
        if left:
            v_row = {p: i for i, p in enumerate(self.v.fp_pos)}
            self.v.quantize_fp_rows([v_row[p] for p in left])
            self._pending_keys.extend(left)
            g = self.k.group_size
            ready = len(self._pending_keys) // g * g
            if ready:
                k_row = {p: i for i, p in enumerate(self.k.fp_pos)}
                self.k.quantize_fp_rows([k_row[p] for p in self._pending_keys[:ready]])
                self._pending_keys = self._pending_keys[ready:]

    def keys_values(self, dtype):
        return self.k.assemble(self.prefix_keys, dtype), self.v.assemble(self.prefix_values, dtype)

    def fp16_positions(self) -> list[int]:
        """The positions (after the prefix) held in 16 bits for both K and V: S + L."""
        return self.sparse + self.recent

    def body_bytes(self):
        return _add(self.k.nbytes(), self.v.nbytes())


def _per_layer(x, n: int, name: str) -> list:
    if x is None:
        return [None] * n
    if not isinstance(x, Sequence) or isinstance(x, torch.Tensor) or len(x) != n:
        _fail(f"{name} must be a list with one entry per layer ({n}), got {type(x).__name__}"
              + (f" of length {len(x)}" if isinstance(x, Sequence) else ""), TypeError)
    return list(x)


def _check_prefix(pk, pv, i: int) -> None:
    if (pk is None) != (pv is None):
        _fail(f"prefix_keys[{i}] and prefix_values[{i}] must both be given or both be None")
    if pk is None:
        return
    for name, t in ((f"prefix_keys[{i}]", pk), (f"prefix_values[{i}]", pv)):
        kv_ops.checks.tensor(t, name, _OP, kv_ops.FLOAT_DTYPES, dim=4)
    if pk.shape != pv.shape:
        _fail(f"prefix_keys[{i}] and prefix_values[{i}] must have the same shape, got {tuple(pk.shape)} and "
              f"{tuple(pv.shape)}")


def _head_scales(scale, name: str) -> torch.Tensor:
    """A float [H_kv] tensor, finite and > 0 -> float32 (H_kv is checked against the model at the first update)."""
    kv_ops.checks.tensor(scale, name, _OP, kv_ops.FLOAT_DTYPES, dim=1)
    return kv_ops.checks.channel_vector(scale, name, _OP, scale.numel(), scale.device, positive=True)


def _check_positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        _fail(f"{name} must be a positive int, got {v!r}")
    return v


class PrefixQuantCache(Cache):
    """A transformers v5 Cache of [16-bit prefix | quantized body | 16-bit tokens] per layer (see module doc).

    Args:
        num_layers: the model's number of decoder layers.
        mode: "prefixquant" | "kivi" | "logquant" | "fp16".
        key_scales, value_scales: "prefixquant" only: one float [H_kv] tensor per layer (static per-head scales).
        prefix_keys, prefix_values: optional, one [1 or B, H_kv, P, D] tensor per layer (any mode).
        group_size: kivi/logquant: G (keys: G tokens per channel group; values: G channels per token group).
        residual_length: kivi: R, a multiple of G.   window: logquant: W.
        backend: "auto" | "reference" | "triton", as in the KV ops.

        cache = PrefixQuantCache(cfg.num_hidden_layers, "prefixquant", key_scales=ks, value_scales=vs,
                                 prefix_keys=pk, prefix_values=pv)
        model.generate(prefix_ids_then_prompt, past_key_values=cache, max_new_tokens=32)
    """

    # A model patched by pqk (models/patch.py) runs its one-token steps with this cache under deferred_reads():
    # "prefixquant" layers then attend over the packed K/V in place. False: every step builds float K/V.
    fused_decode = True

    def __init__(self, num_layers: int, mode: str = "prefixquant", *, key_scales=None, value_scales=None,
                 prefix_keys=None, prefix_values=None, group_size: int = 32, residual_length: int = 128,
                 window: int = 32, backend: str = "auto"):
        _check_positive_int(num_layers, "num_layers")
        if mode not in MODES:
            _fail(f"mode must be one of {MODES}, got {mode!r}")
        if backend not in kv_ops.KV_BACKENDS:
            _fail(f"backend must be one of {kv_ops.KV_BACKENDS}, got {backend!r}")
        pks = _per_layer(prefix_keys, num_layers, "prefix_keys")
        pvs = _per_layer(prefix_values, num_layers, "prefix_values")
        for i, (pk, pv) in enumerate(zip(pks, pvs)):
            _check_prefix(pk, pv, i)
        self.mode = mode
        if mode == "prefixquant":
            if key_scales is None or value_scales is None:
                _fail("mode='prefixquant' needs key_scales and value_scales (one [H_kv] tensor per layer)")
            ks = _per_layer(key_scales, num_layers, "key_scales")
            vs = _per_layer(value_scales, num_layers, "value_scales")
            layers = [StaticQuantLayer(_head_scales(ks[i], f"key_scales[{i}]"), _head_scales(vs[i], f"value_scales[{i}]"),
                                       pks[i], pvs[i], backend=backend) for i in range(num_layers)]
        else:
            if key_scales is not None or value_scales is not None:
                _fail(f"key_scales/value_scales are for mode='prefixquant', not {mode!r}")
            g = kv_ops._group_size(group_size, "group_size", _OP)
            if mode == "kivi":
                _check_positive_int(residual_length, "residual_length")
                if residual_length % g:
                    _fail(f"residual_length must be a multiple of group_size ({g}), got {residual_length}")
                layers = [KiviLayer(g, residual_length, pks[i], pvs[i], backend=backend) for i in range(num_layers)]
            elif mode == "logquant":
                _check_positive_int(window, "window")
                layers = [LogQuantLayer(window, g, pks[i], pvs[i], backend=backend) for i in range(num_layers)]
            else:
                layers = [Fp16Layer(pks[i], pvs[i], backend=backend) for i in range(num_layers)]
        super().__init__(layers=layers)

    @contextlib.contextmanager
    def deferred_reads(self):
        """Within the block, a one-token update() of a "prefixquant" layer returns empty K/V ([B, H, 0, D]) and
        does not dequantize the history: the caller promises an attention that notices the empty K/V and calls
        the layer's decode_attention(query, scaling) (or keys_values(dtype)) instead. The patched model forward
        (models/patch.py) opens it around a decode step, with the pqk attention (models/qk_rotation.py)."""
        for layer in self.layers:
            layer.defer_reads = True
        try:
            yield self
        finally:
            for layer in self.layers:
                layer.defer_reads = False

    # ---- beam search, contrastive / assisted generation (module doc); arguments checked once, for all layers

    def _batch_index(self, idx, name: str) -> torch.Tensor:
        """A 1-D integer tensor (or list) of batch rows in [0, batch) -> int64 (on idx's device)."""
        if not isinstance(idx, torch.Tensor):
            idx = torch.as_tensor(idx)
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            _fail(f"{name} must be a 1-D integer tensor of batch indices, got {idx.dtype} of shape "
                  f"{tuple(idx.shape)}", TypeError)
        b = self.layers[0].batch_size()
        if b is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= b):  # one sync per call
            _fail(f"{name} must hold batch indices in [0, {b}), got values in [{int(idx.min())}, {int(idx.max())}]")
        return idx.long()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence i continues beam beam_idx[i] (int [B*num_beams])."""
        idx = self._batch_index(beam_idx, "beam_idx")
        for layer in self.layers:
            layer.reorder_cache(idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences `indices` (int [B']), in that order."""
        idx = self._batch_index(indices, "indices")
        for layer in self.layers:
            layer.batch_select_indices(idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each sequence `repeats` times in place (batch B -> B * repeats, as repeat_interleave)."""
        _check_positive_int(repeats, "repeats")
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the k = -tokens_to_remove newest tokens (transformers >= 5: a negative count; 0 is a no-op)."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            _fail(f"tokens_to_remove must be an int <= 0, got {tokens_to_remove!r}", TypeError)
        if tokens_to_remove > 0:
            _fail(f"crop takes minus the number of tokens to remove (transformers >= 5), got {tokens_to_remove}; "
                  f"to keep the first n tokens call crop(n - cache.get_seq_length())")
        n = self.get_seq_length()
        if -tokens_to_remove > n:
            _fail(f"crop({tokens_to_remove}) removes more tokens than the cache holds ({n})")
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the tensors held, by part, summed over layers (a shared prefix counted once per layer)."""
        total: dict[str, int] = {}
        for layer in self.layers:
            total = _add(total, layer.memory_bytes())
        total["total"] = sum(total.values())
        return total

    def bytes_per_token_per_layer(self) -> float:
        """Total bytes held / (layers * batch * tokens after the prefix): the cost of one more token."""
        layer = self.layers[0]
        n = layer.n_tokens
        if n == 0:
            return 0.0
        m = self.memory_bytes()
        b = layer.batch
        return (m["total"] - m.get("prefix", 0)) / (len(self.layers) * n * b)
