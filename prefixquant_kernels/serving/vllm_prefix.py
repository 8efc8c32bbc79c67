"""The 16-bit prefix in vLLM: every request starts with the checkpoint's prefix tokens, whose keys and values come
from the checkpoint (``pqk_state.prefix_keys_i`` / ``prefix_values_i``), never from the quantized model.

Two pieces, both active only for a model whose quantization_config is this package's and whose
``kv_transfer_config`` names ``PrefixKVConnector`` (``python -m prefixquant_kernels serve`` sets it):

* ``prefix_prompts()`` (installed by the plugin, serving/__init__.py): the engine's input processor puts the P
  prefix ids in front of every prompt, as ``model.generate`` does on the Hugging Face path (the user's leading BOS
  is dropped when the prefix already ends with it: PrefixQuantState.with_prefix's rule).
* ``PrefixKVConnector``, a vLLM KV connector. Scheduler side: a new request whose prompt starts with the prefix
  reports its first P tokens as already computed (``get_num_new_matched_tokens``), so vLLM schedules only the rest;
  the slots vLLM allocated for those P positions go to the worker in the step's metadata. Worker side, before the
  forward (``start_load_kv``): each attention layer writes the stored K / V into those slots with its backend's
  own cache write (``layer.impl.do_kv_cache_update``: the layout and the cache dtype are the backend's). A layer
  on the static KV backend (serving/vllm_attention.py: a checkpoint with a static 4/8-bit KV body) gets nothing
  written: that backend holds the prefix in 16 bits beside the body and reads it from the checkpoint.

What is written: K after RoPE (as vLLM caches it). A checkpoint with ``kv_rotate`` stores K rotated by the Q/K
Hadamard ``R`` (``pqk_state.qk_rotation``; with ``k_center`` minus a per-head offset too, added back first);
vLLM's attention does not rotate Q, so the connector stores ``K R^T`` (R is orthogonal: ``q . k`` is the same
either way). Each tensor-parallel rank writes its own KV heads.

vLLM's automatic prefix caching stays correct: a cached block holds the same prefix K / V the connector writes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole)

from ..calibration.hf_quantizer import QUANT_METHOD
from . import CONNECTOR, CONNECTOR_MODULE
_WEIGHTS = "model.safetensors"


def _fail(msg: str, exc: type[Exception] = ValueError):
    raise exc(f"pqk vLLM plugin: {msg}")


@dataclasses.dataclass(frozen=True)
class Prefix:
    """The checkpoint's prefix: ids [P]; keys / values per layer float32 [P, H_kv, D] (K unrotated, module doc)."""
    ids: tuple[int, ...]
    bos_id: int | None
    num_layers: int
    path: str

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s prefix keys and values, float32 [P, H_kv, D]."""
        from safetensors import safe_open
        with safe_open(os.path.join(self.path, _WEIGHTS), "pt") as f:
            names = set(f.keys())
            out = []
            for kind in ("prefix_keys", "prefix_values"):
                key = f"pqk_state.{kind}_{layer}"
                if key not in names:
                    _fail(f"{key} is missing from {os.path.join(self.path, _WEIGHTS)}")
                t = f.get_tensor(key).float()                      # [1, H_kv, P, D]
                if t.dim() != 4 or t.shape[0] != 1 or t.shape[2] != len(self.ids):
                    _fail(f"{key} has shape {tuple(t.shape)}, expected [1, H_kv, {len(self.ids)}, D]")
                out.append(t[0].transpose(0, 1).contiguous())      # [P, H_kv, D]
            offset = f"pqk_state.key_offsets_{layer}"
            if offset in names:                                   # k_center: K was stored as K R - mu: add mu back
                out[0] = out[0] + f.get_tensor(offset).float()    # [H_kv, D] over [P, H_kv, D]
            if "pqk_state.qk_rotation" in names:                   # K was stored as K R: undo it
                r = f.get_tensor("pqk_state.qk_rotation").float()
                out[0] = out[0] @ r.T
        return out[0], out[1]


def _quantization_config(path: str) -> dict | None:
    try:
        with open(os.path.join(path, "config.json")) as f:
            q = json.load(f).get("quantization_config")
    except (OSError, ValueError):
        return None
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


def checkpoint_stamp(path: str) -> tuple:
    """(mtime ns, size) of directory ``path``'s config.json and weights (None where absent): the key, beside the
    path, of what this module and vllm_attention.py keep from a checkpoint, so one rewritten in place is read
    again by the next engine of the same process."""
    stamp = []
    for name in ("config.json", _WEIGHTS):
        try:
            st = os.stat(os.path.join(path, name))
            stamp.append((st.st_mtime_ns, st.st_size))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def read_prefix(path: str) -> Prefix | None:
    """The prefix of the pqk checkpoint in directory ``path``; None for another model or a checkpoint without one."""
    return _read_prefix(path, checkpoint_stamp(path))


@functools.lru_cache(maxsize=8)
def _read_prefix(path: str, stamp: tuple) -> Prefix | None:
    q = _quantization_config(path)
    if q is None:
        return None
    state = q.get("state") or {}
    p = state.get("prefix_len", 0)
    if not p:
        return None
    from safetensors import safe_open
    try:
        with safe_open(os.path.join(path, _WEIGHTS), "pt") as f:
            ids = f.get_tensor("pqk_state.prefix_ids")
    except Exception as e:      # a missing file or tensor: name both
        _fail(f"cannot read pqk_state.prefix_ids from {os.path.join(path, _WEIGHTS)}: {e}")
    if ids.dim() != 1 or ids.numel() != p:
        _fail(f"pqk_state.prefix_ids has shape {tuple(ids.shape)}, the config says prefix_len {p}")
    return Prefix(tuple(int(i) for i in ids), state.get("bos_id"), int(state["num_layers"]), path)


def rank_heads(total: int, heads: int, layer: int) -> int:
    """The first of this tensor-parallel rank's ``heads`` KV heads among the checkpoint's ``total`` (layer
    ``layer``, for the message): vLLM gives each rank H / tp heads, or (fewer heads than ranks) each head to
    tp / H ranks."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    rank, tp = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    h0 = rank * heads if total >= tp else rank // (tp // total)
    if h0 + heads > total:
        _fail(f"layer {layer}: the checkpoint has {total} KV heads, this rank wants heads {h0}..{h0 + heads - 1}")
    return h0


def uses_connector(vllm_config) -> bool:
    kv = getattr(vllm_config, "kv_transfer_config", None)
    return kv is not None and kv.kv_connector == CONNECTOR and kv.kv_connector_module_path == CONNECTOR_MODULE


def with_prefix(ids: list[int], prefix: Prefix) -> list[int]:
    """prefix + ids, the user's leading BOS dropped when the prefix ends with it (not doubled)."""
    body = ids[1:] if (ids and prefix.bos_id is not None and prefix.ids[-1] == prefix.bos_id
                       and ids[0] == prefix.bos_id) else ids
    return [*prefix.ids, *body]


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    import warnings
    warnings.warn(msg, stacklevel=3)


# ---- the prompts ----------------------------------------------------------------------------------------------

def prefix_prompts() -> None:
    """Make vLLM's InputProcessor put the prefix in front of every prompt of a pqk model served with the
    connector (idempotent). The request's length checks are redone for the longer prompt."""
    from vllm.v1.engine.input_processor import InputProcessor
    orig = InputProcessor.process_inputs
    if getattr(orig, "_pqk_patched", False):
        return

    @functools.wraps(orig)
    def process_inputs(self, *args, **kwargs):
        req = orig(self, *args, **kwargs)
        prefix = read_prefix(self.vllm_config.model_config.model)
        if prefix is None or req.prompt_token_ids is None:
            return req
        if not uses_connector(self.vllm_config):
            _warn_once(f"pqk vLLM plugin: {self.vllm_config.model_config.model} has a {len(prefix.ids)}-token 16-bit "
                       f"prefix, but vLLM runs without {CONNECTOR}: requests run without it (static activation "
                       "scales see the outlier tokens the prefix was made for). Start it with "
                       "`python -m prefixquant_kernels serve` or pass its --kv-transfer-config.")
            return req
        ids = with_prefix(list(req.prompt_token_ids), prefix)
        limit = self.vllm_config.model_config.max_model_len
        if len(ids) >= limit:
            _fail(f"the prompt is {len(ids)} tokens with the {len(prefix.ids)}-token prefix, max_model_len is "
                  f"{limit}")
        sp = req.sampling_params
        if sp is not None and sp.max_tokens is not None:
            sp.max_tokens = min(sp.max_tokens, limit - len(ids))
        req.prompt_token_ids = ids
        return req

    process_inputs._pqk_patched = True
    InputProcessor.process_inputs = process_inputs


# ---- the connector --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PrefixKVMetadata(KVConnectorMetadata):
    """Scheduler -> worker for one step: the cache slots [P] of each request whose prefix K / V must be written."""
    slots: list[list[int]] = dataclasses.field(default_factory=list)


class PrefixKVConnector(KVConnectorBase_V1):
    """Writes the checkpoint's 16-bit prefix K / V into every new request's first P cache slots (module doc)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.prefix = read_prefix(vllm_config.model_config.model)
        if self.prefix is None:
            _fail(f"{CONNECTOR} serves a prefixquant_kernels checkpoint with a prefix; "
                  f"{vllm_config.model_config.model!r} is not one")
        self.block_size = vllm_config.cache_config.block_size
        self._pending: list[list[int]] = []        # scheduler: slots of requests scheduled since the last step
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # worker: layer -> this rank's K, V

    # -- scheduler side --
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        p = len(self.prefix.ids)
        ids = request.prompt_token_ids
        if num_computed_tokens or ids is None or len(ids) <= p or tuple(ids[:p]) != self.prefix.ids:
            return 0, False     # already cached (prefix caching), or a prompt that does not start with the prefix
        return p, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        if num_external_tokens:
            block_ids = blocks.get_block_ids()[0]
            bs = self.block_size
            self._pending.append([block_ids[i // bs] * bs + i % bs for i in range(num_external_tokens)])

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta, self._pending = PrefixKVMetadata(self._pending), []
        return meta

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return False, None

    # -- worker side --
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._kv_caches = kv_caches

    def _layer_kv(self, layer: int, heads: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's prefix K, V [P, heads, D] in the cache's compute dtype (read once per layer)."""
        if layer not in self._kv:
            k, v = self.prefix.kv(layer)
            h0 = rank_heads(k.shape[1], heads, layer)
            self._kv[layer] = tuple(t[:, h0:h0 + heads].to(device=device, dtype=dtype).contiguous()
                                    for t in (k, v))
        return self._kv[layer]

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, PrefixKVMetadata) or not meta.slots:
            return
        from vllm.model_executor.models.utils import extract_layer_index
        for name, cache in self._kv_caches.items():
            layer = forward_context.no_compile_layers[name]
            if getattr(layer.impl, "plan", None) is not None:
                continue        # the static KV backend reads the prefix from the checkpoint (vllm_attention.py)
            k, v = self._layer_kv(extract_layer_index(name), layer.num_kv_heads, layer.dtype
                                  if hasattr(layer, "dtype") else torch.get_default_dtype(), cache.device)
            n = len(meta.slots)
            slots = torch.tensor([s for req in meta.slots for s in req], dtype=torch.long, device=cache.device)
            layer.impl.do_kv_cache_update(layer, k.repeat(n, 1, 1), v.repeat(n, 1, 1), cache, slots)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self):
        return
