"""prefixquant_kernels: kernels for statically quantized LLMs (PrefixQuant).

    import prefixquant_kernels as pqk
    p = pqk.pack_int4(q)                         # int8 [..., K] in [-8, 7] -> uint8 [..., K // 2]
    a = pqk.quantize_static(x, 0.05, bits=4)     # static per-tensor scale: elementwise, fusable
    a, s = pqk.quantize_per_token(x, bits=4)     # the dynamic baseline
    y = pqk.int4_matmul(a, w, a_scale, w_scale, bias=None, out_dtype=torch.float16)
    lin = pqk.nn.QuantLinear.from_float(linear, w_bits=4, a_bits=4, act_scale=0.05)
    kv = pqk.kv_quantize(k, k_scale, bits=4)     # KV cache: static per-head 4-bit, [B, H, T, D] -> [B, H, T, D//2]
    k_all = pqk.kv_dequant_concat(prefix_k, kv, k_scale, bits=4)   # [16-bit prefix | dequantized body]
    cache = pqk.PrefixQuantCache(n_layers, mode="prefixquant", ...)  # a transformers v5 Cache

Data flow of the source tree: format.py (the bit format) -> csrc/ (kernels) + reference.py -> ops/ (the
dispatching op layer, torch.library custom ops) -> nn/ (modules); kv_format.py -> triton/ -> ops/kv.py -> cache/
(the quantized KV cache).
"""
from . import format, kv_format, nn, ops, reference  # noqa: F401  (format shadows the builtin only as an attribute)
from .ops import (
    available_backends,
    hadamard_transform,
    int4_matmul,
    int4_matmul_requant,
    int4_matmul_silu_mul_requant,
    pack_int4,
    quant_linear,
    quant_linear_silu_mul_requant,
    quantize_per_token,
    quantize_static,
    rmsnorm_quantize,
    unpack_int4,
)
from .ops.kv import (kv_decode_attention, kv_decode_paged, kv_dequant_concat, kv_quantize, kv_quantize_groupwise,
                     kv_write_paged)


_CALIBRATION_EXPORTS = ("QuantConfig", "quantize_model", "find_prefix_tokens", "evaluate_perplexity",
                        "evaluate_perplexity_decode", "window_nlls", "paired_ratio",
                        "save_quantized", "load_quantized", "export_hf", "import_prefixquant", "load_prefixquant")

# AutoModelForCausalLM.from_pretrained(path) of a pqk.export_hf checkpoint: our quantizer is registered with
# transformers when transformers imports its quantizer registry (an import hook: no transformers import here, which
# would cost seconds); an older transformers without the API only gets a warning (calibration/hf_quantizer.py).
from .calibration.hf_quantizer import install_import_hook as _install_hf_hook  # noqa: E402

_install_hf_hook()


def __getattr__(name):
    # PrefixQuantCache subclasses transformers' Cache: imported on first use, so transformers stays optional
    if name == "PrefixQuantCache":
        from .cache import PrefixQuantCache
        return PrefixQuantCache
    # the model pipeline (calibration/) needs transformers too: imported on first use
    if name in ("import_prefixquant", "load_prefixquant"):   # from the module of the same name, not the module
        from .calibration import import_prefixquant as module
        return getattr(module, name)
    if name == "fuse_mlps":  # models/ needs transformers' module layout only at call time, but stays lazy too
        from .models.fused_mlp import fuse_mlps
        return fuse_mlps
    if name == "quantize_lm_head":
        from .models.lm_head import quantize_lm_head
        return quantize_lm_head
    if name in _CALIBRATION_EXPORTS:
        from . import calibration
        return getattr(calibration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "hadamard_transform",
    "evaluate_perplexity",
    "evaluate_perplexity_decode",
    "export_hf",
    "find_prefix_tokens",
    "format",
    "fuse_mlps",
    "quantize_lm_head",
    "import_prefixquant",
    "int4_matmul",
    "int4_matmul_requant",
    "int4_matmul_silu_mul_requant",
    "kv_decode_attention",
    "kv_decode_paged",
    "kv_write_paged",
    "kv_dequant_concat",
    "kv_format",
    "kv_quantize",
    "kv_quantize_groupwise",
    "load_prefixquant",
    "load_quantized",
    "nn",
    "ops",
    "pack_int4",
    "paired_ratio",
    "PrefixQuantCache",
    "QuantConfig",
    "quantize_model",
    "quant_linear",
    "quant_linear_silu_mul_requant",
    "quantize_per_token",
    "quantize_static",
    "rmsnorm_quantize",
    "reference",
    "save_quantized",
    "unpack_int4",
    "window_nlls",
]
