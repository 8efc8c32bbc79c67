"""Checkpoints written by the package as it was before the issue-13 restructuring (tests/fixtures/, made by
tests/fixtures/make_checkpoints.py at commit 011f155) still load, through both readers, and compute what they
computed then: the same logits and the same greedy tokens."""
import os

import pytest
import torch

import prefixquant_kernels as pqk

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
EXPECTED = torch.load(os.path.join(HERE, "expected.pt"), weights_only=True)
CASES = sorted(EXPECTED["cases"])


def _load(name: str):
    path = os.path.join(HERE, name)
    if name.startswith("qwen2"):   # written by export_hf: plain from_pretrained takes our quantizer
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(path).eval()
    return pqk.load_quantized(path)


def test_the_fixtures_are_all_there():
    assert CASES == ["llama_w4a8kv4_static", "qwen2_w4a4kv2_kivi_dynamic", "qwen3_w8a8kv8_static"]


@pytest.mark.parametrize("name", CASES)
def test_an_old_checkpoint_loads_and_computes_what_it_did(name):
    model = _load(name)
    want = EXPECTED["cases"][name]
    ids = EXPECTED["ids"]
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert model.pqk_state.cfg.to_dict() == pqk.QuantConfig.from_dict(model.pqk_state.cfg.to_dict()).to_dict()
    torch.testing.assert_close(logits, want["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, want["tokens"])
