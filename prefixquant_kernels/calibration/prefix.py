"""PrefixQuant's prefix: which tokens to put first (discovery on down_proj inputs) and their 16-bit K/V.

Discovery (PrefixQuant, training-free): for every decoder layer, hook the down_proj input ``x [T, C]`` of each
calibration sample; per token ``r_t = max_c |x_tc|``; token t is an outlier when ``r_t > eta * median_t(r)``.
``o = ceil(max over layers of the mean count per sample of outliers at positions >= 1)`` (position 0, the attention
sink of every sequence, is BOS's job); the prefix is the ``o`` most frequent outlier token ids at positions >= 1,
then BOS (a Qwen tokenizer without one: EOS), so the user's own BOS is not needed after it. This reproduces the
paper's prefixes: Llama-2-7B ``. \n [BOS]`` (o = 2), Llama-3-8B ``[BOS]`` (o = 0). The down_proj of each layer and
whether a family falls back to EOS come from its ArchSpec (models/arch.py).
"""
from __future__ import annotations

import math
import time
from collections import Counter

import torch

from ..models.arch import decoder_layers, get_spec


def _fail(msg: str, exc: type[Exception] = ValueError, op: str = "find_prefix_tokens"):
    raise exc(f"pqk.{op}: {msg}")


def prefix_end_token(model, tokenizer, op: str = "quantize_model") -> int:
    """The token the prefix ends with: BOS, or EOS for Qwen tokenizers without a BOS; ValueError otherwise."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        return int(bos)
    eos = getattr(tokenizer, "eos_token_id", None)
    if get_spec(model).bos_fallback_eos and eos is not None:
        return int(eos)
    _fail(f"the tokenizer has no bos_token_id (model_type={model.config.model_type!r} needs one to end the prefix; "
          "give prefix_tokens explicitly or set tokenizer.bos_token_id)", ValueError, op)


def check_token_ids(ids: torch.Tensor, vocab: int, what: str, op: str) -> None:
    """ValueError unless every id is one of the model's vocab embeddings (the embedding would raise an IndexError
    deep in torch otherwise: a tokenizer of another model, say)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        _fail(f"{what} holds token ids outside the model's vocabulary [0, {vocab}): from {int(ids.min())} to "
              f"{int(ids.max())} (a tokenizer of another model?)", ValueError, op)


def tokenize_calibration(tokenizer, texts, n_samples: int, seq_len: int, op: str = "quantize_model",
                         vocab: int | None = None) -> torch.Tensor:
    """Concatenate the texts' tokens (no special tokens) and cut n_samples chunks of seq_len -> int64 [S, seq_len].
    Fewer samples when the text is short; ValueError when it holds less than one chunk, or (vocab given) when the
    tokenizer gave ids the model has no embedding for."""
    if isinstance(texts, str):
        texts = [texts]
    texts = [t for t in (texts or []) if isinstance(t, str) and t.strip()]
    if not texts:
        _fail("calibration text is empty: give a non-empty string or list of strings", ValueError, op)
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t, add_special_tokens=False))
        if len(ids) >= n_samples * seq_len:
            break
    n = min(n_samples, len(ids) // seq_len)
    if n == 0:
        _fail(f"calibration text has {len(ids)} tokens, fewer than one sample of calib_seq_len={seq_len}",
              ValueError, op)
    out = torch.tensor(ids[:n * seq_len], dtype=torch.long).reshape(n, seq_len)
    if vocab is not None:
        check_token_ids(out, vocab, "the tokenized calibration text", op)
    return out


def select_prefix_tokens(token_ids: torch.Tensor, token_max: list[torch.Tensor], eta: float, end_token: int,
                         max_len: int = 8) -> tuple[list[int], dict]:
    """The selection rule on recorded activations (no model: testable on synthetic data).

    token_ids: int64 [S, T] (the samples); token_max: per layer, float [S, T] = max_c |down_proj input|.
    -> (prefix token ids ending with end_token, info with o, per-token outlier counts, per-layer mean counts).
    """
    out_any = torch.zeros_like(token_ids[:, 1:], dtype=torch.bool)
    means = []
    for r in token_max:
        r = r.float()
        med = r.median(dim=1, keepdim=True).values.clamp_min(torch.finfo(torch.float32).tiny)
        is_out = (r > eta * med)[:, 1:]                      # position 0 is not counted (module doc)
        means.append(float(is_out.sum(1).float().mean()))
        out_any |= is_out
    o = min(math.ceil(max(means) - 1e-9) if means else 0, max_len)
    counts = Counter(token_ids[:, 1:][out_any].tolist())
    counts.pop(end_token, None)
    tokens = [t for t, _ in counts.most_common(o)]
    prefix = tokens + [end_token]
    return prefix, {"o": o, "layer_mean_outliers": means, "outlier_token_counts": dict(counts.most_common(16))}


def record_down_proj_max(model, samples: torch.Tensor, *, progress=None, batch_size: int | None = None
                         ) -> list[torch.Tensor]:
    """Per layer, float [S, T]: max over channels of |down_proj input| for each sample and position. One float
    forward per batch of samples (scales.CALIB_BATCH; inference mode, no logits but the last position's);
    progress: a tqdm bar advanced by one per sample."""
    from .scales import CALIB_BATCH, batches, forward_no_logits
    spec = get_spec(model)
    layers = decoder_layers(model)
    rec: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.get_submodule(spec.down).register_forward_pre_hook(
        lambda m, args, i=i: rec[i].append(args[0].detach().abs().amax(-1).float()))
        for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for sl in batches(samples.shape[0], CALIB_BATCH if batch_size is None else batch_size):
                forward_no_logits(model, samples[sl])
                if progress is not None:
                    progress.update(sl.stop - sl.start)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(r, 0) for r in rec]


def find_prefix_tokens(model, tokenizer, calib_texts, threshold: float = 64.0, *, n_samples: int = 16,
                       seq_len: int = 256, max_len: int = 8, return_info: bool = False):
    """PrefixQuant's prefix tokens for a float model (module doc) -> list of ids (and an info dict if asked:
    o, the tokens as text, the per-layer mean outlier counts, seconds taken)."""
    t0 = time.perf_counter()
    if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and threshold > 1):
        _fail(f"threshold must be a number > 1, got {threshold!r}")
    for name, v in (("n_samples", n_samples), ("seq_len", seq_len), ("max_len", max_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            _fail(f"{name} must be an int >= 1, got {v!r}")
    vocab = model.get_input_embeddings().num_embeddings
    end = prefix_end_token(model, tokenizer, "find_prefix_tokens")
    check_token_ids(torch.tensor([end]), vocab, "the prefix's end token (BOS)", "find_prefix_tokens")
    samples = tokenize_calibration(tokenizer, calib_texts, n_samples, seq_len, "find_prefix_tokens", vocab)
    samples = torch.cat([torch.full((samples.shape[0], 1), end, dtype=torch.long), samples], 1)  # a natural start
    token_max = record_down_proj_max(model, samples)
    prefix, info = select_prefix_tokens(samples, token_max, float(threshold), end, max_len)
    info["tokens"] = [_decode(tokenizer, t) for t in prefix]
    info["ids"] = prefix
    info["seconds"] = time.perf_counter() - t0
    return (prefix, info) if return_info else prefix


def _decode(tokenizer, t: int) -> str:
    try:
        return tokenizer.decode([t])
    except Exception:  # noqa: BLE001  (a stub tokenizer may not decode; the id is reported anyway)
        return str(t)


@torch.no_grad()
def prefix_kv(model, prefix_ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One float forward of the prefix tokens -> per layer K (after RoPE / k_norm) and V, [1, H_kv, P, D]."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    model(torch.tensor([prefix_ids], dtype=torch.long, device=model.device), past_key_values=cache, use_cache=True)
    return [l.keys.detach() for l in cache.layers], [l.values.detach() for l in cache.layers]
