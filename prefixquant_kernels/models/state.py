"""PrefixQuantState: what a quantized model carries besides its QuantLinear modules — the prefix token ids, the
16-bit prefix K/V of every layer, the static per-head KV scales and the QuantConfig. Attached to the model as the
submodule ``model.pqk_state``, so its tensors are buffers of ``model.state_dict()`` (saved with the checkpoint).
"""
from __future__ import annotations

import torch
from torch import nn

from ..cache.factory import build_cache
from ..cache.registry import kv_mode
from ..config import QuantConfig


class PrefixQuantState(nn.Module):
    """Buffers (per decoder layer i): ``prefix_keys_i`` / ``prefix_values_i`` fp16 [1, H_kv, P, D] (if P > 0),
    ``key_scales_i`` / ``value_scales_i`` fp32 [H_kv] (static KV mode); ``prefix_ids`` int64 [P]; ``qk_rotation``
    fp32 [D, D] (cfg.resolved_kv_rotate: the online Hadamard on Q/K after RoPE, shared by every layer; the prefix
    keys are stored already rotated); ``key_offsets_i`` fp32 [H_kv, D] (cfg.resolved_k_center: subtracted from
    every key after the rotation, the stored prefix keys included).

    cfg: the QuantConfig; bos_id: the BOS the prefix ends with (dropped from a user's input, not doubled);
    info: discovery report (prefix tokens, outlier count, seconds), JSON-serializable.
    """

    def __init__(self, cfg: QuantConfig, num_layers: int, num_kv_heads: int, head_dim: int, prefix_len: int,
                 bos_id: int | None, info: dict | None = None):
        super().__init__()
        self.cfg, self.num_layers, self.bos_id = cfg, num_layers, bos_id
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.info = dict(info or {})
        # the static per-head KV scales: buffers of the modes that take them ("static"); calibrated by the pipeline
        self._has_kv_scales = kv_mode(cfg.resolved_kv_mode).static_scales
        self.register_buffer("prefix_ids", torch.zeros(prefix_len, dtype=torch.long))
        for i in range(num_layers):
            if prefix_len:
                for n in ("prefix_keys", "prefix_values"):
                    self.register_buffer(f"{n}_{i}", torch.zeros(1, num_kv_heads, prefix_len, head_dim,
                                                                  dtype=torch.float16))
            if self._has_kv_scales:
                for n in ("key_scales", "value_scales"):
                    self.register_buffer(f"{n}_{i}", torch.ones(num_kv_heads, dtype=torch.float32))
        if cfg.resolved_kv_rotate:
            self.register_buffer("qk_rotation", torch.eye(head_dim, dtype=torch.float32))
        if cfg.resolved_k_center:
            for i in range(num_layers):
                self.register_buffer(f"key_offsets_{i}", torch.zeros(num_kv_heads, head_dim, dtype=torch.float32))

    @property
    def prefix_len(self) -> int:
        return self.prefix_ids.numel()

    def _list(self, name: str):
        return [getattr(self, f"{name}_{i}") for i in range(self.num_layers)]

    def set_prefix(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        for i, (k, v) in enumerate(zip(keys, values)):
            getattr(self, f"prefix_keys_{i}").copy_(k[:1])
            getattr(self, f"prefix_values_{i}").copy_(v[:1])

    def set_kv_scales(self, key_scales: list[torch.Tensor], value_scales: list[torch.Tensor]) -> None:
        for i, (k, v) in enumerate(zip(key_scales, value_scales)):
            getattr(self, f"key_scales_{i}").copy_(k)
            getattr(self, f"value_scales_{i}").copy_(v)

    def set_key_offsets(self, offsets: list[torch.Tensor]) -> None:
        for i, mu in enumerate(offsets):
            getattr(self, f"key_offsets_{i}").copy_(mu)

    @property
    def rotates_qk(self) -> bool:
        return self.cfg.resolved_kv_rotate

    def set_qk_rotation(self, rotation: torch.Tensor) -> None:
        self.qk_rotation.copy_(rotation)

    def make_cache(self, batch_size: int = 1, backend: str = "auto", max_cache_len: int | None = None):
        """A fresh pqk.PrefixQuantCache holding the prefix (counted in its length), in the config's KV mode
        (built by cache/factory.py's build_cache from the mode's name; the mode takes what it needs of the scales
        and of cfg.kv_window). max_cache_len: preallocate room for that many tokens after the prefix, a cache
        torch.compile can run over ("static" mode only: ``can_preallocate``); None: a growing cache."""
        mode = self.cfg.resolved_kv_mode
        kw = {} if max_cache_len is None else {"max_cache_len": max_cache_len}
        if self.prefix_len:
            kw.update(prefix_keys=self._list("prefix_keys"), prefix_values=self._list("prefix_values"))
        if self._has_kv_scales:
            kw.update(key_scales=self._list("key_scales"), value_scales=self._list("value_scales"))
        if self.rotates_qk:
            kw.update(key_rotation=self.qk_rotation)
        if self.cfg.resolved_k_center:
            kw.update(key_offsets=self._list("key_offsets"))
        return build_cache(self.num_layers, mode, self.cfg.kv_bits, window=self.cfg.kv_window, backend=backend, **kw)

    @property
    def can_preallocate(self) -> bool:
        """Whether the KV mode has a preallocated (compileable) form: make_cache(max_cache_len=...)."""
        return kv_mode(self.cfg.resolved_kv_mode).preallocated is not None

    def drops_bos(self, input_ids: torch.Tensor) -> bool:
        """Whether the user's ids start with the BOS the prefix already ends with (then it is dropped)."""
        return (self.prefix_len > 0 and self.bos_id is not None and input_ids.shape[1] > 0
                and int(self.prefix_ids[-1]) == self.bos_id and bool((input_ids[:, 0] == self.bos_id).all()))

    def with_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """User ids [B, T] -> (prefix + ids [B, P + T'], mask or None); T' = T - 1 when the user's BOS is dropped."""
        if not self.prefix_len:
            return input_ids, attention_mask
        drop = self.drops_bos(input_ids)
        ids = input_ids[:, 1:] if drop else input_ids
        pre = self.prefix_ids.to(ids.device).unsqueeze(0).expand(ids.shape[0], -1)
        ids = torch.cat([pre, ids], 1)
        if attention_mask is not None:
            m = attention_mask[:, 1:] if drop else attention_mask
            attention_mask = torch.cat([torch.ones_like(pre, dtype=m.dtype), m], 1)
        return ids, attention_mask

    def extend_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """A 2-D mask over the user's tokens -> one over [prefix | tokens]."""
        if not self.prefix_len or attention_mask.dim() != 2:
            return attention_mask
        ones = attention_mask.new_ones(attention_mask.shape[0], self.prefix_len)
        return torch.cat([ones, attention_mask], 1)

    def layout(self) -> dict:
        """What load_quantized needs to rebuild this module before loading its buffers."""
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "prefix_len": self.prefix_len, "bos_id": self.bos_id, "info": self.info}

    def extra_repr(self) -> str:
        return f"{self.cfg.name}, prefix={self.prefix_ids.tolist()}"
