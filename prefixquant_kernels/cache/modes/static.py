"""KV mode "static" (alias "prefixquant"): PrefixQuant's ``[16-bit prefix | quantized body]``, every token after
the prefix quantized symmetrically with a calibrated per-KV-head scale (one for K, one for V, per layer), 4 or 8
bits. The only mode with a fused decode attention (``decode_attention``: the packed K/V read in place)."""
from __future__ import annotations

import torch

from ... import kv_format
from ...ops import kv as kv_ops
from ..base import PrefixedLayer, Rows, fail, head_scales, nbytes, per_layer
from ..registry import register_kv_mode


@register_kv_mode("static", bits=(4, 8), options=("key_scales", "value_scales"), aliases=("prefixquant",))
class StaticQuantLayer(PrefixedLayer):
    """PrefixQuant: [prefix | 4- or 8-bit body], static per-head scales for K and V (float [H_kv] each, > 0)."""

    def __init__(self, key_scale: torch.Tensor, value_scale: torch.Tensor, prefix_keys=None, prefix_values=None,
                 bits: int | None = None, backend="auto"):
        super().__init__(prefix_keys, prefix_values, backend, bits)
        self.key_scale, self.value_scale = head_scales(key_scale, "key_scale"), head_scales(value_scale, "value_scale")

    @classmethod
    def for_layers(cls, num_layers, prefix_keys, prefix_values, *, backend, bits=None, key_scales=None,
                   value_scales=None, **layer_kw):
        if key_scales is None or value_scales is None:
            fail("mode='prefixquant' ('static') needs key_scales and value_scales (one [H_kv] tensor per layer)")
        ks = per_layer(key_scales, num_layers, "key_scales")
        vs = per_layer(value_scales, num_layers, "value_scales")
        return [cls(head_scales(ks[i], f"key_scales[{i}]"), head_scales(vs[i], f"value_scales[{i}]"),
                    prefix_keys[i], prefix_values[i], bits=bits, backend=backend, **layer_kw)
                for i in range(num_layers)]

    def init_stores(self):
        self.k, self.v = Rows(), Rows()

    def crop_stores(self, m):
        self.k.truncate(m)
        self.v.truncate(m)

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        h = key_states.shape[1]
        for name, s in (("key_scales", self.key_scale), ("value_scales", self.value_scale)):
            if s.numel() != h or s.device != key_states.device:
                fail(f"each of {name} must have shape ({h},) (one scale per KV head) on {key_states.device}, "
                     f"got {tuple(s.shape)} on {s.device}")

    def append(self, key_states, value_states):
        self.k.append(kv_ops.kv_quantize(key_states, self.key_scale, self.bits, backend=self.backend))
        self.v.append(kv_ops.kv_quantize(value_states, self.value_scale, self.bits, backend=self.backend))

    def bodies(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The filled part of the packed K and V bodies ([B, H_kv, T, D/2] uint8 or [..., D] int8)."""
        return self.k.view(), self.v.view()

    def keys_values(self, dtype):
        return tuple(kv_ops.kv_dequant_concat(pre, body, scale, self.bits, dtype, backend=self.backend)
                     for pre, body, scale in zip((self.prefix_keys, self.prefix_values), self.bodies(),
                                                 (self.key_scale, self.value_scale)))

    has_decode_attention = True

    def decode_attention(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query float [B, H_q, 1, D] (after RoPE) -> query.dtype [B, H_q, 1, D]: softmax(q K^T scaling) V over
        the whole cache, K/V read in their stored form (kv_decode_attention: the C++ kernel on CPU, Triton on
        CUDA) instead of dequantized into a float copy first."""
        out = kv_ops.kv_decode_attention(query[:, :, 0], self.prefix_keys, self.prefix_values, *self.bodies(),
                                         self.key_scale, self.value_scale, self.bits, scaling, backend=self.backend)
        return out.unsqueeze(2)

    def body_bytes(self):
        return {"body": self.k.nbytes() + self.v.nbytes(),
                "scales": nbytes(self.key_scale) + nbytes(self.value_scale)}


class PreallocatedStaticLayer(StaticQuantLayer):
    """The "static" mode in buffers allocated once, for ``torch.compile`` and CUDA graphs (transformers'
    ``is_compileable``): the body is uint8 [B, H_kv, max_cache_len, D/2] (int8 [..., D] at 8 bits) and the rows
    filled are counted in ``length``, an int64 [1] tensor, so a step is the same graph at every length: an update
    quantizes the new K/V and ``index_copy_``s them at ``length`` (no reallocation, no host int); the decode
    attention reads the whole buffer with ``body_len=length`` and the step's padding mask (kv_decode_attention).

    A one-token update always returns empty K/V (its attention must call decode_attention: the pqk attention,
    models/attention.py, which the patched forward installs); a longer one (the prefill) returns the float
    [prefix | body] as the growing layer does. Positions follow transformers' static layout: kv index i < P is
    prefix row i, P + j body row j, up to ``get_mask_sizes`` = P + max_cache_len.
    """

    is_compileable = True
    defer_reads = True

    def __init__(self, key_scale, value_scale, prefix_keys=None, prefix_values=None, bits=None, backend="auto",
                 max_cache_len: int = 0):
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len <= 0:
            fail(f"max_cache_len must be a positive int (tokens after the prefix), got {max_cache_len!r}")
        self.max_cache_len = max_cache_len
        self.length = torch.zeros(1, dtype=torch.long)   # before PrefixedLayer.__init__ sets n_tokens = 0
        super().__init__(key_scale, value_scale, prefix_keys, prefix_values, bits=bits, backend=backend)

    def init_stores(self):
        self.k = self.v = None            # allocated at the first update, on the model's device and batch

    # the Python-side count the shared methods (crop, memory report) use: read from / written to the tensor
    # (eager only: a compiled step never touches it)
    @property
    def n_tokens(self) -> int:
        return int(self.length)

    @n_tokens.setter
    def n_tokens(self, n: int) -> None:
        self.length.fill_(n)

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        dev = key_states.device
        row, dt = (d // 2, torch.uint8) if self.bits == 4 else (d, torch.int8)
        self.k = torch.zeros(b, h, self.max_cache_len, row, dtype=dt, device=dev)
        self.v = torch.zeros_like(self.k)
        self.length = self.length.to(dev)
        self.kind = kv_ops.resolve(self.backend, dev, "PrefixQuantCache").kind
        # the decode kernel takes the prefix as tensors (P = 0: empty ones)
        empty = key_states.new_empty(1, h, 0, d)
        self._pk = empty if self.prefix_keys is None else self.prefix_keys
        self._pv = empty if self.prefix_values is None else self.prefix_values
        # the C++ kernel's form: contiguous, None for no prefix
        self._pk_cpu = self._pk.contiguous() if self._pk.shape[2] else None
        self._pv_cpu = self._pv.contiguous() if self._pv.shape[2] else None
        if not torch.compiler.is_compiling():   # fixed addresses: a CUDA graph replays reads / writes of these
            for t in (self.k, self.v, self.length):
                torch._dynamo.mark_static_address(t)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        if not torch.compiler.is_compiling() and int(self.length) + t > self.max_cache_len:
            fail(f"the preallocated cache holds {self.max_cache_len} tokens after the prefix; {int(self.length)} "
                 f"are in it and {t} more came (build it with a larger max_cache_len)")
        pos = self.length + torch.arange(t, device=self.length.device)
        for buf, x, scale in ((self.k, key_states, self.key_scale), (self.v, value_states, self.value_scale)):
            buf.index_copy_(2, pos, self._quantize(x.contiguous(), scale))
        self.length.add_(t)
        if t == 1:
            return key_states[:, :, :0], value_states[:, :, :0]
        return self.keys_values(key_states.dtype)

    def bodies(self):
        n = int(self.length)   # eager only (the prefill and the non-fused attentions)
        return self.k[:, :, :n], self.v[:, :, :n]

    # The step calls the kernels' ops directly: the arguments were validated when the layer was built (scales) and
    # are the layer's own buffers (shapes fixed at lazy_initialization). On the CPU that is the C++ op itself, so
    # a compiled step runs no Python between the graph and the kernel (ops/kv.py's composite op would add one call
    # per K, V and attention per layer and step).
    # Compiled, the quantizer is the format's own torch expression (kv_format.quantize_static: divide, round half
    # to even, clamp, pack two nibbles), not an op call: with a static scale it is elementwise, so inductor fuses it
    # into the kernel that applies RoPE and into the cache's index_copy (two op calls and one kernel fewer per layer
    # and step; bit for bit the op's bytes, tests/kv/test_decode_preallocated.py).
    def _quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return kv_format.quantize_static(x, scale, self.bits)
        if self.kind == "cpu":
            return torch.ops.pqk.kv_quantize_static(x, scale, self.bits)
        return torch.ops.pqk.kv_quantize(x, scale, self.bits, self.kind)

    def decode_attention(self, query: torch.Tensor, scaling: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        """query float [B, H_q, 1, D] -> [B, H_q, 1, D] over the filled rows; mask: bool [B, P + max_cache_len]
        (True = attend) or None."""
        q = query[:, :, 0]
        if self.kind == "cpu":
            out = torch.ops.pqk.kv_decode_static(q.contiguous(), self._pk_cpu, self._pv_cpu, self.k, self.v,
                                                 self.key_scale, self.value_scale, self.bits, scaling, -1,
                                                 self.length, mask)
        else:
            out = torch.ops.pqk.kv_decode_attention(q, self._pk, self._pv, self.k, self.v, self.key_scale,
                                                    self.value_scale, self.bits, scaling, self.kind, self.length,
                                                    mask)
        return out.unsqueeze(2)

    def get_seq_length(self):
        return self.length[0] + self.prefix_len   # a tensor, as transformers' StaticLayer: no recompile per step

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.prefix_len + self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.prefix_len + self.max_cache_len

    def crop_stores(self, m):
        pass   # rows past the new length are overwritten by the next updates

    def select_stores(self, idx):
        self.k, self.v = self.k.index_select(0, idx), self.v.index_select(0, idx)

    def reset(self) -> None:
        """Drop every token after the prefix; the buffers stay (their addresses too)."""
        self.length.zero_()

    def body_bytes(self):
        n = 0 if self.k is None else self.k.numel() * self.k.element_size() * 2
        return {"body": n, "scales": nbytes(self.key_scale) + nbytes(self.value_scale)}


StaticQuantLayer.preallocated = PreallocatedStaticLayer
