"""evaluate_perplexity: the same protocol for the float model and every quantized mode.

The text's tokens (no special tokens) are cut into non-overlapping windows of seq_len; each window is scored on
its last seq_len - 1 tokens, each predicted from the window tokens before it and a start that differs by mode:
``[BOS]`` (float model, no-prefix modes) or the 16-bit prefix in the KV cache (prefix modes, which end with BOS).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _fail(msg: str, exc: type[Exception] = ValueError):
    raise exc(f"pqk.evaluate_perplexity: {msg}")


def _windows(model, tokenizer, text, seq_len: int, max_windows):
    """The shared protocol of both evaluations: (token ids, number of windows, the model's pqk_state or None, the
    start tokens ([BOS], or none when the prefix is in the cache), device). Checks text and the window count."""
    if not isinstance(text, str) or not text.strip():
        _fail("text is empty")
    ids = tokenizer.encode(text, add_special_tokens=False)
    n_win = len(ids) // seq_len
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    if n_win == 0:
        _fail(f"text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    state = getattr(model, "pqk_state", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    with_prefix = state is not None and state.prefix_len > 0
    start = [] if with_prefix or bos is None else [int(bos)]
    return ids, n_win, state, start, next(model.parameters()).device


@torch.no_grad()
def window_nlls(model, tokenizer, text: str, seq_len: int = 512, *, max_windows: int | None = None,
                progress: bool = True) -> list[float]:
    """The mean NLL (nats per token) of each window of ``evaluate_perplexity``'s protocol, in text order: what
    ``paired_ratio`` compares two models on. A quantized model runs with its PrefixQuantCache. progress: a tqdm bar
    "evaluation" over the windows (one forward of seq_len tokens each), to stderr."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        _fail(f"seq_len must be an int >= 2, got {seq_len!r}")
    ids, n_win, state, start, dev = _windows(model, tokenizer, text, seq_len, max_windows)
    was_training = model.training
    model.eval()
    nlls = []
    try:
        from tqdm.auto import tqdm
        windows = tqdm(range(n_win), desc="evaluation", unit="window", disable=not progress, dynamic_ncols=True)
        for w in windows:
            win = torch.tensor(ids[w * seq_len:(w + 1) * seq_len], dtype=torch.long, device=dev)
            inp = torch.cat([torch.tensor(start, dtype=torch.long, device=dev), win]).unsqueeze(0)
            cache = state.make_cache(1) if state is not None else None
            logits = model(inp, past_key_values=cache, use_cache=cache is not None).logits[0]
            pred = logits[len(start):-1].float()
            nlls.append(float(F.cross_entropy(pred, win[1:], reduction="sum")) / (seq_len - 1))
    finally:
        model.train(was_training)
    return nlls


def evaluate_perplexity(model, tokenizer, text: str, seq_len: int = 512, *, max_windows: int | None = None,
                        progress: bool = True) -> float:
    """exp(mean NLL) over the windows (module doc; every window scores seq_len - 1 tokens, so the mean of
    ``window_nlls`` is the mean over all tokens)."""
    return perplexity(window_nlls(model, tokenizer, text, seq_len, max_windows=max_windows, progress=progress))


def perplexity(nlls: list[float]) -> float:
    """exp of the mean of ``window_nlls`` (equal-length windows: the mean over all their tokens)."""
    return math.exp(sum(nlls) / len(nlls))


def _t_quantile_975(dof: int) -> float:
    """Student t's 97.5 % quantile, Cornish-Fisher expansion around the normal's 1.95996 (within 1 % of the exact
    value from 5 degrees of freedom up: 2.547 vs 2.571 at 5, 2.356 vs 2.365 at 7, 2.0025 at 57)."""
    z = 1.959964
    return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)


def paired_ratio(nll_a: list[float], nll_b: list[float]) -> tuple[float, float, float]:
    """Perplexity of model A over model B on the same windows (two ``window_nlls`` lists), with a 95 % interval
    from the per-window differences: (ratio, low, high) = exp(mean(d) + (0, -t, +t) * sd(d) / sqrt(n)),
    d = nll_a - nll_b. Paired, so the windows' own difficulty (far larger than the models' difference) cancels;
    the interval is for these windows' text as a sample of such text, not for the quantizer's rounding luck."""
    for name, x in (("nll_a", nll_a), ("nll_b", nll_b)):
        if not isinstance(x, (list, tuple)) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in x):
            raise ValueError(f"pqk.paired_ratio: {name} must be a list of finite floats (window_nlls)")
    if len(nll_a) != len(nll_b) or len(nll_a) < 6:
        raise ValueError(f"pqk.paired_ratio: nll_a and nll_b must hold the same windows, at least 6, got "
                         f"{len(nll_a)} and {len(nll_b)}")
    d = [a - b for a, b in zip(nll_a, nll_b)]
    n = len(d)
    mean = sum(d) / n
    half = _t_quantile_975(n - 1) * math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


@torch.no_grad()
def evaluate_perplexity_decode(model, tokenizer, text: str, seq_len: int = 512, decode: int = 128, *,
                               max_windows: int | None = None, progress: bool = True) -> float:
    """Prefill-then-decode perplexity: the windows and starts of ``evaluate_perplexity``, but each window's first
    ``seq_len - decode`` tokens are prefilled in one forward and its last ``decode`` tokens are fed one at a time
    (teacher forcing), each step reading the cache the way generation does; exp(mean NLL) of the ``decode`` tokens
    only. The setting KV caches with a 16-bit window (KIVI, LogQuant) are built for: a query attends to the cache
    as it stands at that step (which tokens are still 16-bit depends on the step), whereas a prefilled window scores
    every position in one pass. On a float model it equals ``evaluate_perplexity`` restricted to those tokens (up to
    float rounding)."""
    from transformers import DynamicCache

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        _fail(f"seq_len must be an int >= 2, got {seq_len!r}")
    if isinstance(decode, bool) or not isinstance(decode, int) or not (1 <= decode < seq_len):
        _fail(f"decode must be an int in [1, seq_len), got {decode!r}")
    ids, n_win, state, start, dev = _windows(model, tokenizer, text, seq_len, max_windows)
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    c0 = seq_len - decode
    try:
        from tqdm.auto import tqdm
        windows = tqdm(range(n_win), desc="evaluation (decode)", unit="window", disable=not progress,
                       dynamic_ncols=True)
        for w in windows:
            win = torch.tensor(ids[w * seq_len:(w + 1) * seq_len], dtype=torch.long, device=dev)
            cache = state.make_cache(1) if state is not None else DynamicCache(config=model.config)
            inp = torch.cat([torch.tensor(start, dtype=torch.long, device=dev), win[:c0]]).unsqueeze(0)
            logits = model(inp, past_key_values=cache, use_cache=True).logits[0, -1]
            for t in range(c0, seq_len):
                nll += float(F.cross_entropy(logits.float().unsqueeze(0), win[t:t + 1]))
                n += 1
                if t + 1 < seq_len:
                    logits = model(win[t:t + 1].unsqueeze(0), past_key_values=cache, use_cache=True).logits[0, -1]
    finally:
        model.train(was_training)
    return math.exp(nll / n)
