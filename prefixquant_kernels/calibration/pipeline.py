"""quantize_model: a float Hugging Face causal LM of a registered family (models/arch.py: Llama, Mistral, Qwen2,
Qwen3, Phi-3) -> the same model running on the package's kernels. The layout (which linears, which quantizer
points, head_dim) is the family's ArchSpec.

Steps (training-free PrefixQuant; the config decides which apply):
1. prefix: the given tokens, or find them (prefix.py) on the calibration text; optionally rotate (rotation.py:
   the residual stream and down_proj input; with kv_rotate, V folded offline and the Q/K rotation after RoPE);
   the prefix's 16-bit K/V (one float forward; keys rotated by the Q/K rotation).
2. record (scales.collect): one float forward per batch of calibration samples (scales.CALIB_BATCH), the
   prefix in front and excluded; every quantizer point of every layer recorded by hooks in that one pass.
3. weights (weights.py): per-channel RTN with a clip search, or GPTQ on the recorded Hessians.
4. static activation scales (clip search on the layer output) and per-head KV scales (scales.py).
   Steps 3 + 4 run on one intra-op thread (small ops; _one_thread). Each stage has its own progress bar.
4b. with ``cfg.finetune``: block-wise fine-tuning of the scales (and weights) found so far (finetune.py), each
   block against the float one, the prefix in place; the replacements are rebuilt from the learned values.
5. swap (models.patch): every linear of the spec -> QuantLinear, ``model.pqk_state`` for the KV cache.

Nothing in the model changes before step 5 but the optional rotations (undone on error), and step 5 only
assigns prebuilt modules: an error anywhere leaves the model as it was.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..cache.registry import kv_mode
from ..cache.factory import rotate_heads
from ..models import attention
from ..models.arch import decoder_layers, float_linears, get_spec, resolve
from ..models.patch import swap
from ..models.state import PrefixQuantState
from ..nn import QuantLinear
from . import prefix as pfx
from . import finetune as ft
from . import rotation as rot
from . import scales as sc
from . import weights as wq
from .config import QuantConfig


def _fail(msg: str, exc: type[Exception] = ValueError):
    raise exc(f"pqk.quantize_model: {msg}")


def _quant_linear(linear: nn.Linear, w: torch.Tensor, w_scale: torch.Tensor, cfg: QuantConfig,
                  act_scale: float | None) -> QuantLinear:
    tmp = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    tmp.weight = nn.Parameter(w, requires_grad=False)
    if linear.bias is not None:
        tmp.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
    return QuantLinear.from_float(tmp, cfg.w_bits, cfg.a_bits, act_scale, w_scale=w_scale)


@contextlib.contextmanager
def _one_thread():
    """Step 3 + 4 is thousands of small ops (GPTQ's column loop, the clip and KV grid searches): with 2 intra-op
    threads on 2 busy cores each op waits on the other thread's barrier, 20-80x slower than 1 thread (docs/PERF.md,
    "calibration in minutes"); the forwards keep the caller's thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _bar(progress: bool, total: int, desc: str, unit: str):
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)


@torch.no_grad()
def quantize_model(model, tokenizer, calib_texts, cfg: QuantConfig | None = None, *, progress: bool = True):
    """Quantize ``model`` in place (see module doc) and return it; ``model.pqk_state.info`` reports the prefix
    tokens, the outlier count o and the seconds each step took.

    model: a transformers *ForCausalLM of a registered model_type (models/arch.py REGISTRY) (CPU). tokenizer: has
    ``encode``, ``bos_token_id`` (Qwen: ``eos_token_id`` suffices), ``decode``. calib_texts: str or list of str (keep it
    disjoint from any evaluation text).
    """
    cfg = QuantConfig() if cfg is None else cfg
    if not isinstance(cfg, QuantConfig):
        _fail(f"cfg must be a pqk.QuantConfig, got {type(cfg).__name__}", TypeError)
    spec = get_spec(model)
    if getattr(model, "pqk_state", None) is not None:
        _fail("the model is already quantized (it has a pqk_state)")
    float_linears(model)
    for name, p in model.named_parameters():   # NaN / inf weights would give NaN scales, and the model a broken state
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            _fail(f"the model's {name} holds NaN or inf values: nothing to calibrate from")
    kv_rotate = cfg.resolved_kv_rotate
    if kv_rotate:
        attention.check_attention(model)
    info: dict = {"config": cfg.name, "model_type": spec.model_type}
    t_all = time.perf_counter()
    was_training = model.training
    saved = None
    model.eval()
    try:
        vocab = model.get_input_embeddings().num_embeddings
        samples = pfx.tokenize_calibration(tokenizer, calib_texts, cfg.calib_samples, cfg.calib_seq_len, vocab=vocab)
        end = pfx.prefix_end_token(model, tokenizer) if cfg.prefix else getattr(tokenizer, "bos_token_id", None)
        if end is not None:
            pfx.check_token_ids(torch.tensor([int(end)]), vocab, "the prefix's end token (BOS)", "quantize_model")
        n_layers = len(decoder_layers(model))
        static_kv = kv_mode(cfg.resolved_kv_mode).static_scales   # the mode takes calibrated per-head scales

        # 1. prefix
        t = time.perf_counter()
        prefix_ids: list[int] = []
        if cfg.prefix:
            if cfg.prefix_tokens is not None:
                prefix_ids = list(cfg.prefix_tokens)
                info["prefix_source"] = "given"
            else:
                starts = torch.cat([torch.full((samples.shape[0], 1), end, dtype=torch.long), samples], 1)
                with _bar(progress, starts.shape[0], "prefix search", "sample") as bar:
                    token_max = pfx.record_down_proj_max(model, starts, progress=bar)
                prefix_ids, found = pfx.select_prefix_tokens(starts, token_max, cfg.eta, end, cfg.max_prefix_len)
                info.update(prefix_source="found", o=found["o"], layer_mean_outliers=found["layer_mean_outliers"],
                            outlier_token_counts=found["outlier_token_counts"])
            vocab = model.get_input_embeddings().num_embeddings
            if any(t_ >= vocab for t_ in prefix_ids):
                _fail(f"prefix_tokens {prefix_ids} contain ids >= the vocabulary size {vocab}")
            info["prefix_ids"] = prefix_ids
            info["prefix_tokens"] = [pfx._decode(tokenizer, t_) for t_ in prefix_ids]
        info["prefix_seconds"] = time.perf_counter() - t
        h_qk = None
        if cfg.rotate or kv_rotate:  # after discovery (outlier tokens are found on the model as given), first
            t = time.perf_counter()
            saved = rot.backup(model)
            if cfg.rotate:
                rot.rotate_model(model, cfg.seed)
            if kv_rotate:
                h_qk = rot.rotate_kv(model, cfg.seed).float()
            info["rotate_seconds"] = time.perf_counter() - t
        if prefix_ids:
            pk, pv = pfx.prefix_kv(model, prefix_ids)
            pk_unrotated = pk
            if h_qk is not None:    # stored as the cache holds every key: rotated
                pk = [rotate_heads(k, h_qk) for k in pk]
        linears = float_linears(model)

        # 2. record
        t = time.perf_counter()
        if prefix_ids:
            lead = torch.tensor(prefix_ids, dtype=torch.long)
        else:
            lead = torch.tensor([] if end is None else [end], dtype=torch.long)
        inputs = torch.cat([lead.expand(samples.shape[0], -1), samples], 1)
        skip = len(prefix_ids)
        use_gptq = cfg.resolved_weight_method == "gptq"
        rows = max(1, -(-cfg.max_calib_rows // samples.shape[0]))
        with _bar(progress, inputs.shape[0], "calibration", "sample") as bar:
            stats = sc.collect(model, inputs, skip, rows, hessian=use_gptq, kv=static_kv, seed=cfg.seed,
                               qk_rotation=h_qk, progress=bar)
        info["record_seconds"] = time.perf_counter() - t

        # 3 + 4. weights, activation and KV scales, layer by layer: replacements built, not yet swapped
        t = time.perf_counter()
        replacements: dict[str, QuantLinear] = {}
        w_init: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # the fine-tuning's start (cfg.finetune)
        act_scales: dict[str, float] = {}
        k_scales, v_scales, k_offsets = [], [], []
        secs = {"weights": 0.0, "act_scales": 0.0, "kv_scales": 0.0}
        bar = _bar(progress, n_layers, "quantize layer", "layer")
        with bar, _one_thread():
            for i, st in enumerate(stats):
                bar.set_description(f"quantize layer {i + 1}/{n_layers}")
                for p, names in spec.points.items():
                    full = [resolve(model, spec.layer_prefix(i) + n) for n in names]
                    mods = [linears[n] for n in full]
                    w = torch.cat([m.weight.detach().float() for m in mods], 0)
                    t_ = time.perf_counter()
                    if use_gptq:
                        wq_, ws = wq.gptq(w, st.hessian[p], cfg.w_bits, block=cfg.gptq_block, damp=cfg.gptq_damp)
                    else:
                        wq_, ws = wq.rtn(w, cfg.w_bits)
                    secs["weights"] += time.perf_counter() - t_
                    a_s = None
                    if cfg.act_quant == "static":
                        t_ = time.perf_counter()
                        a_s = sc.search_act_scale(st.rows[p], wq_, cfg.a_bits, st.amax[p], cfg.act_clip_search)
                        act_scales[f"{i}.{p}"] = a_s
                        secs["act_scales"] += time.perf_counter() - t_
                    off = 0
                    for n, m in zip(full, mods):
                        rows_n = slice(off, off + m.out_features)
                        replacements[n] = _quant_linear(m, wq_[rows_n], ws[rows_n], cfg, a_s)
                        if cfg.finetune:
                            w_init[n] = (wq_[rows_n], ws[rows_n])
                        off += m.out_features
                if static_kv:
                    t_ = time.perf_counter()
                    keys = st.k
                    if cfg.resolved_k_center:   # the keys' mean over the calibration tokens, per head, channel
                        mu = torch.cat(keys, 1).mean(1)                                   # [H_kv, D]
                        k_offsets.append(mu)
                        keys = [k - mu[:, None] for k in keys]
                    ks, vs = sc.search_kv_scales(st.q, keys, st.v, cfg.kv_bits)
                    k_scales.append(ks)
                    v_scales.append(vs)
                    secs["kv_scales"] += time.perf_counter() - t_
                stats[i] = None  # free the recorded rows of this layer
                bar.update(1)
        info["quantize_seconds"] = time.perf_counter() - t
        info.update({f"{k}_seconds": v for k, v in secs.items()})

        # 4b. block-wise fine-tuning
        if cfg.finetune:
            t = time.perf_counter()
            with _bar(progress, n_layers, "finetune layer", "layer") as bar:
                learned, learned_act, losses = ft.finetune_blocks(
                    model, spec, cfg, samples if prefix_ids else inputs,
                    (pk_unrotated, pv) if prefix_ids else None, (k_scales, v_scales) if static_kv else None,
                    w_init, act_scales, qk_rotation=h_qk, k_offsets=k_offsets or None, progress=bar)
            for n, (w, ws, a_s) in learned.items():
                replacements[n] = _quant_linear(linears[n], w, ws, cfg, a_s)
            act_scales.update(learned_act)
            info["finetune_seconds"] = time.perf_counter() - t
            info["finetune_loss"] = losses

        h_kv, head_dim = model.config.num_key_value_heads, spec.head_dim(model.config)
        state = PrefixQuantState(cfg, n_layers, h_kv, head_dim, len(prefix_ids), end if cfg.prefix else None, info)
        if prefix_ids:
            state.prefix_ids.copy_(torch.tensor(prefix_ids))
            if k_offsets:   # stored as the cache holds every key: centered
                pk = [k - mu[None, :, None] for k, mu in zip(pk, k_offsets)]
            state.set_prefix([k.to(torch.float16) for k in pk], [v.to(torch.float16) for v in pv])
        if static_kv:
            state.set_kv_scales(k_scales, v_scales)
        if h_qk is not None:
            state.set_qk_rotation(h_qk)
        if k_offsets:
            state.set_key_offsets(k_offsets)
        state.act_scales = act_scales
        state.info["seconds"] = time.perf_counter() - t_all     # the state holds a copy of info
        state.to(next(model.parameters()).device)
    except BaseException:
        if saved is not None:
            rot.undo(model, saved)     # the rotation was the only change: undone, the model is as it was
        raise
    finally:
        model.train(was_training)
    # 5. swap: only assignments from here on
    swap(model, replacements, state)
    return model
