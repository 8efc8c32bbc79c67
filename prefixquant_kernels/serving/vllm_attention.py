"""PrefixQuant's KV cache inside vLLM: ``[16-bit prefix | static 4/8-bit body]``, attended with this package's KV ops.

vLLM's paged cache holds one dtype for every token, so a 16-bit prefix beside a quantized body needs an attention
backend of its own. ``PrefixQuantAttentionBackend`` is vLLM's CPU backend (``CPU_ATTN``, which the plugin overrides
with it: serving/__init__.py) plus, when the process serves a pqk checkpoint whose KV mode is "static" (the
checkpoint's ``kv_bits`` 4 or 8, calibrated per-head scales), this:

* **The page** (``customize_spec``): per token and KV head, ``C = 2 * D * bits / 8`` bytes, the K codes then the V
  codes, in kv_format.py's static format (bits 4: two codes per byte along D). vLLM sizes its blocks from it: a
  4-bit body takes D bytes per token-head, 1/4 of a bf16 cache and 1/8 of fp32.
* **The write** (``do_kv_cache_update``, before each forward): the new keys are transformed as the Hugging Face
  path's cache transforms them (the Q/K Hadamard after RoPE, ``- mu`` with k_center), then K and V are quantized
  with the layer's static per-head scales into their slots: one ``kv_write_paged`` call (the C++ kernel on CPU
  writes each row into its page; ``- mu`` inside it, as ``transform_keys`` rounds it).
* **The attention** (``forward``): the prefix K / V come from the checkpoint in 16 bits (never from the cache: the
  prefix connector reports those P positions computed and writes nothing for this backend). The one-token queries
  of all requests run as one ``kv_decode_paged`` call: the C++ kernel reads each request's body positions
  P .. L-1 from its blocks through the block table, packed, dequantized in registers. A longer query (a prefill
  chunk) runs alone: its body gathered from its blocks, ``kv_dequant_concat`` + causal SDPA. The queries are
  rotated by the same Hadamard as K.
  The codes are those the Hugging Face path's PrefixQuantCache writes and the decode kernel is its kernel (the
  body read through the block table), so vLLM and ``model.generate`` compute the same function
  (tests/serving/test_vllm.py).

Any other model (no pqk checkpoint, a 16-bit or group-wise KV mode, ``--kv-cache-dtype fp8``, or
``PQK_VLLM_FLOAT_KV=1``) runs vLLM's CPU attention unchanged. Each engine gets its own plan (``current_plan``): a
process that builds several engines one after another (vLLM's in-process engine) never reuses another's.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import replace

import torch
from vllm.config import get_current_vllm_config, get_current_vllm_config_or_none
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from ..cache.factory import rotate_heads
from ..calibration.config import QuantConfig
from ..ops import kv as kv_ops
from ..ops.backend import resolve
from .vllm_prefix import (_WEIGHTS, _fail, _quantization_config, _warn_once, checkpoint_stamp, rank_heads,
                          read_prefix, uses_connector)


# PQK_VLLM_FLOAT_KV=1: serve a static-KV checkpoint on vLLM's own 16-bit cache (the prefix connector then writes the
# prefix there): the A/B of benchmarks/serving.py, or for a user who wants vLLM's attention kernel over the memory
FLOAT_KV_ENV = "PQK_VLLM_FLOAT_KV"


@dataclasses.dataclass
class KVPlan:
    """This process's static KV format: ``bits`` 4 or 8, ``prefix_len`` P (0 when the prefix connector is off: the
    prompts then carry no prefix), the checkpoint directory ``path``; per layer its tensors for this rank (layer())."""
    bits: int
    prefix_len: int
    path: str
    layers: dict = dataclasses.field(default_factory=dict)
    # the KV ops' kernel here: "cpu" (the C++ ops, called directly: the scales and prefix were checked at load, the
    # C++ ops check the slots and blocks they touch, and the public ops' Python checks cost as much as the kernels
    # at one token, tokens x layers x steps times) or the reference (no extension built), through the public ops
    kind: str = dataclasses.field(default_factory=lambda: resolve("auto", torch.device("cpu"),
                                                                  "kv_decode_attention").kind)

    def code_bytes(self, head_size: int) -> int:
        """Bytes of one token-head's K (or V) codes."""
        return head_size * self.bits // 8

    def validate(self, num_layers: int) -> None:
        """Fail at load, naming the tensor, when a layer's scales or prefix are missing or malformed."""
        from safetensors import safe_open
        with safe_open(os.path.join(self.path, _WEIGHTS), "pt") as f:
            names = set(f.keys())
            for i in range(num_layers):
                wanted = [f"key_scales_{i}", f"value_scales_{i}"]
                if self.prefix_len:
                    wanted += [f"prefix_keys_{i}", f"prefix_values_{i}"]
                for name in wanted:
                    key = f"pqk_state.{name}"
                    if key not in names:
                        _fail(f"{key} is missing from {os.path.join(self.path, _WEIGHTS)} (the static "
                              f"{self.bits}-bit KV body needs it)")
                    t = f.get_tensor(key).float()
                    if name.startswith("prefix"):
                        if t.dim() != 4 or t.shape[0] != 1 or t.shape[2] != self.prefix_len:
                            _fail(f"{key} has shape {tuple(t.shape)}, expected [1, H_kv, {self.prefix_len}, D]")
                    elif t.dim() != 1 or not bool(torch.isfinite(t).all() and (t > 0).all()):
                        _fail(f"{key} must be finite scales > 0, one per KV head; got {t.tolist()}")

    def layer(self, index: int, heads: int, dtype: torch.dtype) -> dict:
        """Layer ``index``'s tensors for this rank's ``heads`` KV heads: key_scale / value_scale float32 [H];
        prefix_k / prefix_v dtype [1, H, P, D] as the checkpoint stores them (K already rotated / centered) or None;
        rotation float32 [D, D] or None; offset float32 [H, D] or None."""
        if index not in self.layers:
            from safetensors import safe_open
            with safe_open(os.path.join(self.path, _WEIGHTS), "pt") as f:
                names = set(f.keys())

                def get(name: str, required: bool = True):
                    key = f"pqk_state.{name}"
                    if key not in names:
                        if required:
                            _fail(f"{key} is missing from {os.path.join(self.path, _WEIGHTS)}")
                        return None
                    return f.get_tensor(key).float()

                ks, vs = get(f"key_scales_{index}"), get(f"value_scales_{index}")
                h0 = rank_heads(ks.numel(), heads, index)
                t = {"key_scale": ks[h0:h0 + heads].contiguous(), "value_scale": vs[h0:h0 + heads].contiguous(),
                     "rotation": get("qk_rotation", required=False), "offset": get(f"key_offsets_{index}", False)}
                if t["offset"] is not None:
                    t["offset"] = t["offset"][h0:h0 + heads].contiguous()
                t["prefix_k"] = t["prefix_v"] = None
                if self.prefix_len:      # [1, H_all, P, D] (validate() checked the shapes)
                    t["prefix_k"] = get(f"prefix_keys_{index}")[:, h0:h0 + heads].to(dtype).contiguous()
                    t["prefix_v"] = get(f"prefix_values_{index}")[:, h0:h0 + heads].to(dtype).contiguous()
            self.layers[index] = t
        return self.layers[index]


# The plan of the engine built last in this process and what it was made for. A process may build more than one
# engine one after another (vLLM's in-process engine: VLLM_ENABLE_V1_MULTIPROCESSING=0, or LLM() twice in a
# notebook): a plan is reused only for the same model, files, connector and cache dtype.
_PLAN: KVPlan | None = None
_PLAN_KEY: tuple | None = None


def current_plan(vllm_config=None) -> KVPlan | None:
    """The static KV plan of the engine ``vllm_config`` describes (default: vLLM's current config, which is set
    while an engine builds its model and its cache), made once per engine; without a config, the plan of the
    engine built last."""
    global _PLAN, _PLAN_KEY
    config = vllm_config if vllm_config is not None else get_current_vllm_config_or_none()
    model = getattr(getattr(config, "model_config", None), "model", None)
    if model is None:
        return _PLAN
    key = (model, checkpoint_stamp(model), uses_connector(config), config.cache_config.cache_dtype,
           os.environ.get(FLOAT_KV_ENV) == "1")
    if key != _PLAN_KEY:
        _PLAN, _PLAN_KEY = plan_for(config), key
    return _PLAN


def plan_for(vllm_config) -> KVPlan | None:
    """The static KV plan of the model ``vllm_config`` serves, or None (not a pqk checkpoint, its KV mode is not
    "static", or vLLM was asked for another cache dtype)."""
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None:
        return None
    q = _quantization_config(model_config.model)
    if q is None:
        return None
    cfg = QuantConfig.from_dict(q["quant_config"])
    if cfg.resolved_kv_mode != "static" or os.environ.get(FLOAT_KV_ENV) == "1":
        return None
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype != "auto":
        _warn_once(f"pqk vLLM plugin: --kv-cache-dtype {cache_dtype} replaces the checkpoint's static "
                   f"{cfg.kv_bits}-bit KV body and stores the 16-bit prefix in {cache_dtype} too")
        return None
    prefix = read_prefix(model_config.model) if uses_connector(vllm_config) else None
    plan = KVPlan(cfg.kv_bits, len(prefix.ids) if prefix is not None else 0, model_config.model)
    plan.validate(int(q["state"]["num_layers"]))
    return plan


@dataclasses.dataclass
class _Step:
    """What every layer of one step shares (PrefixQuantAttentionImpl._step): the one-token queries' rows in the
    batch (int64 [B], or None when they are all the step's tokens, in order), their block tables (int32 [B, width])
    and lengths (int [B]); per longer query (a prefill chunk): its first and end row, its body's cache rows [1, H,
    L - P] (_rows), its causal mask (bool [n, L])."""
    decode_queries: torch.Tensor | None = None
    decode_table: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    chunks: list = dataclasses.field(default_factory=list)


def _stamp(*tensors: torch.Tensor) -> tuple | None:
    """The tensors and their version counters (an in-place write bumps one), or None where one has no counter (an
    inference-mode tensor): what says a tensor seen before still holds what it held."""
    try:
        return tuple((t, t._version) for t in tensors)
    except RuntimeError:
        return None


def _same(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(
        x[0] is y[0] and x[1] == y[1] for x, y in zip(a, b))


class PrefixQuantAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention, or (for a pqk static-KV checkpoint) the ``[16-bit prefix | static body]`` cache of the
    module doc."""

    @classmethod
    def customize_spec(cls, spec):
        spec = super().customize_spec(spec)
        plan = current_plan()
        if plan is None:
            return spec
        return replace(spec, dtype=torch.uint8, state_content_bytes=2 * plan.code_bytes(spec.head_size))

    @staticmethod
    def get_impl_cls():
        return PrefixQuantAttentionImpl


class PrefixQuantAttentionImpl(CPUAttentionBackendImpl):
    """CPUAttentionBackendImpl, or the static KV body when ``self.plan`` is set (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = current_plan(get_current_vllm_config())
        if self.plan is not None:
            if self.alibi_slopes is not None or self.sliding_window != -1 or self.logits_soft_cap \
                    or self.sinks is not None:
                _fail("the static KV body runs plain causal softmax attention: no ALiBi, sliding window, softcap "
                      "or sinks", NotImplementedError)
            if self.plan.bits == 4 and self.head_size % 2:
                _fail(f"a 4-bit KV body needs an even head_size, got {self.head_size}")

    # -- helpers --
    def _tensors(self, layer, dtype: torch.dtype) -> dict:
        t = getattr(self, "_layer_tensors", None)
        if t is None:        # once per layer: the index parsed from its name, the tensors read from the checkpoint
            from vllm.model_executor.models.utils import extract_layer_index
            t = self._layer_tensors = self.plan.layer(extract_layer_index(layer.layer_name), self.num_kv_heads,
                                                      dtype)
        return t

    def _split(self, cache: torch.Tensor) -> tuple[int, int]:
        """cache uint8 [blocks, H, block_size, C] -> (block_size, bytes of one side's codes)."""
        c = self.plan.code_bytes(self.head_size)
        if cache.dtype != torch.uint8 or cache.dim() != 4 or cache.shape[-1] != 2 * c:
            _fail(f"the KV cache is {cache.dtype} {tuple(cache.shape)}; the static {self.plan.bits}-bit body "
                  f"needs uint8 [blocks, {self.num_kv_heads}, block_size, {2 * c}] (customize_spec)")
        return cache.shape[2], c

    def _kernel(self, cache: torch.Tensor) -> bool:
        """Whether the C++ paged ops run: the extension is built and the cache is one contiguous buffer (a padded
        page layout goes through the public ops' reference)."""
        return self.plan.kind == "cpu" and cache.is_contiguous()

    def _codes_dtype(self) -> torch.dtype:
        return torch.uint8 if self.plan.bits == 4 else torch.int8

    @staticmethod
    def _rows(cache: torch.Tensor, table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The cache rows of positions ``pos`` (int64 [B, N]) of B requests whose block tables are ``table`` (int
        [B, width]): int64 [B, H, N], row (block * H + head) * block_size + offset of the cache's [blocks, H,
        block_size] token-heads."""
        _, h, bs, _ = cache.shape
        blocks = torch.gather(table.long(), 1, (pos // bs).clamp_(max=table.shape[1] - 1))           # [B, N]
        return (blocks[:, None] * h + torch.arange(h)[None, :, None]) * bs + (pos % bs)[:, None]

    def _gather(self, cache: torch.Tensor, rows: torch.Tensor, c: int):
        """The stored K and V codes of cache rows ``rows`` (int64 [B, H, N], _rows): two ``codes dtype [B, H, N,
        c]`` tensors with contiguous rows, the layout kv_decode_attention reads in place. The cache seen as rows
        of c bytes (a token-head's K row, then its V row) makes each side one index_select (a [.., 2c] gather split
        afterwards would be copied again)."""
        nb, h, bs, _ = cache.shape
        dt = self._codes_dtype()
        if not cache.is_contiguous():     # a padded page layout: index the 4-D view (slower, same bytes)
            b_, h_, o_ = rows // (h * bs), rows // bs % h, rows % bs
            return cache[..., :c][b_, h_, o_].view(dt), cache[..., c:][b_, h_, o_].view(dt)
        flat = cache.view(nb * h * bs * 2, c)
        idx = rows.reshape(-1) * 2
        shape = (*rows.shape, c)
        return (flat.index_select(0, idx).view(shape).view(dt), flat.index_select(0, idx + 1).view(shape).view(dt))

    def _step(self, attn_metadata, cache: torch.Tensor) -> _Step:
        """This step's layout (_Step), the same for every layer: made by the first layer that runs, kept on vLLM's
        metadata object (one per step, shared by the layers of a KV cache group) for the others, while the
        metadata's tensors are unchanged (_stamp: should vLLM reuse the object for a later step)."""
        key = (tuple(cache.shape), self.plan.prefix_len)
        stamp = _stamp(attn_metadata.query_start_loc, attn_metadata.seq_lens, attn_metadata.block_table)
        got = getattr(attn_metadata, "_pqk_step", None)
        if got is not None and got[0] == key and _same(got[1], stamp):
            return got[2]
        p = self.plan.prefix_len
        starts, lens = attn_metadata.query_start_loc, attn_metadata.seq_lens
        nq = starts[1:] - starts[:-1]
        if bool((lens < p + nq).any()):
            i = int(torch.nonzero(lens < p + nq)[0])
            _fail(f"request {i} has {int(lens[i])} tokens, fewer than the {p}-token prefix and its {int(nq[i])} new "
                  "ones: its prompt did not start with the prefix (the connector adds it)", RuntimeError)
        table = attn_metadata.block_table
        step = _Step()
        decode = torch.nonzero(nq == 1)[:, 0]
        if decode.numel():
            step.decode_table, step.decode_lens = table[decode].to(torch.int32), lens[decode]
            if decode.numel() != attn_metadata.num_actual_tokens:     # else the queries are rows 0 .. B-1
                step.decode_queries = starts[decode]
        for i in torch.nonzero(nq > 1)[:, 0].tolist():
            q0, q1, length = int(starts[i]), int(starts[i + 1]), int(lens[i])
            n = q1 - q0
            # query j sits at position length - n + j and sees positions 0 .. length - n + j
            allowed = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
            step.chunks.append((q0, q1, self._rows(cache, table[i:i + 1], torch.arange(p, length)[None]), allowed))
        attn_metadata._pqk_step = (key, stamp, step)
        return step

    # -- vLLM's hooks --
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """key / value [T', H, D] (T' >= the T slots: padding after them); slot_mapping int64 [T] (-1: skip)."""
        if self.plan is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        self._split(kv_cache)
        t = self._tensors(layer, key.dtype)
        n = slot_mapping.shape[0]
        k = key[:n] if t["rotation"] is None else rotate_heads(key[:n], t["rotation"])          # [T, H, D]
        if self._kernel(kv_cache):
            torch.ops.pqk.kv_write_paged_static(k, value, kv_cache, slot_mapping, t["key_scale"], t["value_scale"],
                                                self.plan.bits, t["offset"])
        else:
            kv_ops.kv_write_paged(k, value[:n], kv_cache, slot_mapping, t["key_scale"], t["value_scale"],
                                  self.plan.bits, key_offset=t["offset"])

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query [T', H_q, D]; output [T', H_q * D] (or [T', H_q, D]); the prefix from the checkpoint, the body
        from the cache (module doc): the one-token queries of all requests in one decode-attention call, each
        longer one (a prefill chunk) on its own."""
        if self.plan is None or attn_metadata is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            _fail("fused output quantization is not supported by the static KV body", NotImplementedError)
        _, c = self._split(kv_cache)
        t = self._tensors(layer, query.dtype)
        bits = self.plan.bits
        step = self._step(attn_metadata, kv_cache)
        n_tok = attn_metadata.num_actual_tokens
        out = output[:n_tok].view(n_tok, self.num_heads, self.head_size)
        q_all = query[:n_tok]
        if t["rotation"] is not None:       # K is cached rotated: rotate Q alike (q . k unchanged)
            q_all = rotate_heads(q_all, t["rotation"])
        if step.decode_table is not None:
            rows = step.decode_queries
            q = q_all if rows is None else q_all[rows]
            if self._kernel(kv_cache):       # the C++ kernel reads the pages in place
                o = torch.ops.pqk.kv_decode_paged_static(q.contiguous(), t["prefix_k"], t["prefix_v"], kv_cache,
                                                         step.decode_table, step.decode_lens, t["key_scale"],
                                                         t["value_scale"], bits, self.scale)
            else:
                o = kv_ops.kv_decode_paged(q, t["prefix_k"], t["prefix_v"], kv_cache, step.decode_table,
                                           step.decode_lens, t["key_scale"], t["value_scale"], bits, self.scale)
            if rows is None:
                out.copy_(o)                                                                  # [B, H_q, D]
            else:
                out[rows] = o.to(out.dtype)
        for q0, q1, body_rows, allowed in step.chunks:
            kc, vc = self._gather(kv_cache, body_rows, c)
            k = kv_ops.kv_dequant_concat(t["prefix_k"], kc, t["key_scale"], bits, q_all.dtype)   # [1, H, L, D]
            v = kv_ops.kv_dequant_concat(t["prefix_v"], vc, t["value_scale"], bits, q_all.dtype)
            o = torch.nn.functional.scaled_dot_product_attention(
                q_all[q0:q1].transpose(0, 1)[None], k, v, attn_mask=allowed, scale=self.scale,
                enable_gqa=True)[0].transpose(0, 1)                                           # [n, H_q, D]
            out[q0:q1] = o.to(out.dtype)
        return output
