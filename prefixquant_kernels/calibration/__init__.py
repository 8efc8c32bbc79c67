"""Calibration: from a float Hugging Face model to a quantized one (the PrefixQuant pipeline).

config.py (QuantConfig) -> prefix.py (prefix discovery, prefix K/V) -> scales.py (activation / KV scales) ->
weights.py (RTN clip search, GPTQ) -> pipeline.py (quantize_model) -> evaluate.py (evaluate_perplexity) ->
checkpoint.py (save_quantized / load_quantized) -> hf_quantizer.py (export_hf, the transformers quantizer hook);
import_prefixquant.py reads a checkpoint written by PrefixQuant's own code. Needs transformers (the config alone
does not).
"""
from .config import QuantConfig  # noqa: F401


def __getattr__(name):
    # the pipeline imports transformers: loaded on first use
    if name == "quantize_model":
        from .pipeline import quantize_model
        return quantize_model
    if name == "find_prefix_tokens":
        from .prefix import find_prefix_tokens
        return find_prefix_tokens
    if name in ("evaluate_perplexity", "evaluate_perplexity_decode", "window_nlls", "paired_ratio"):
        from . import evaluate
        return getattr(evaluate, name)
    if name in ("save_quantized", "load_quantized"):
        from . import checkpoint
        return getattr(checkpoint, name)
    if name == "load_prefixquant":   # (calibration.import_prefixquant is the module: its name is the function's)
        from .import_prefixquant import load_prefixquant
        return load_prefixquant
    if name == "export_hf":
        from .hf_quantizer import export_hf
        return export_hf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
