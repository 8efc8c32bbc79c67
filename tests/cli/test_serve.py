"""`serve`: the vllm serve command line it builds, and what it refuses before starting anything (no vLLM needed;
tests/serving runs the plugin itself in vLLM)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from prefixquant_kernels.__main__ import main

from .test_errors import _copy, _err, checkpoint  # noqa: F401  (checkpoint: the module fixture)
from .test_cli import float_dir  # noqa: F401


def test_dry_run_prints_the_vllm_command_with_the_prefix_connector(checkpoint, capsys):  # noqa: F811
    assert main(["serve", "--checkpoint", checkpoint, "--port", "8123", "--dry-run", "--", "--max-num-seqs", "4"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"python -m vllm.entrypoints.openai.api_server --model {os.path.abspath(checkpoint)} "
                          "--host 127.0.0.1 --port 8123 ")
    assert out.endswith("--max-num-seqs 4")
    kv = json.loads(out.split("--kv-transfer-config ")[1].split(" --max-num-seqs")[0])
    assert kv == {"kv_connector": "PrefixKVConnector", "kv_role": "kv_both",
                  "kv_connector_module_path": "prefixquant_kernels.serving.vllm_prefix"}


def test_refuses_a_checkpoint_vllm_cannot_serve(checkpoint, tmp_path, capsys):  # noqa: F811
    plain = _copy(checkpoint, str(tmp_path / "plain"))       # as save_quantized writes it: no quantization_config
    cfg = json.load(open(os.path.join(plain, "config.json")))
    del cfg["quantization_config"]
    json.dump(cfg, open(os.path.join(plain, "config.json"), "w"))
    assert "has no prefixquant_kernels quantization_config" in _err(capsys, ["serve", "--checkpoint", plain])
    no_tok = _copy(checkpoint, str(tmp_path / "no_tok"))
    for f in os.listdir(no_tok):
        if f.startswith(("tokenizer", "vocab", "special_tokens", "merges")):
            os.remove(os.path.join(no_tok, f))
    assert "no tokenizer saved with it" in _err(capsys, ["serve", "--checkpoint", no_tok])
    assert "--checkpoint" in _err(capsys, ["serve", "--checkpoint", str(tmp_path / "absent")])
    assert "--port" in _err(capsys, ["serve", "--checkpoint", checkpoint, "--port", "0"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_it_says_how_to_install_it(checkpoint, capsys):  # noqa: F811
    assert "vLLM is not installed in this environment" in _err(capsys, ["serve", "--checkpoint", checkpoint])
