"""Rotation: orthogonal matrices, the float function unchanged, undone exactly after a failure."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels.calibration import rotation, scales
from prefixquant_kernels.models.rotated_linear import RotatedLinear

from ..models.tiny import BOS, StubTokenizer, text, tiny_model


@pytest.mark.parametrize("n", [64, 48, 1])
def test_random_orthogonal(n):
    q = rotation.random_orthogonal(n, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    if n == 64:   # randomized Hadamard: every entry +-1/sqrt(n)
        assert torch.allclose(q.abs(), torch.full_like(q, n ** -0.5))


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False), ("qwen3", False)])
def test_rotation_keeps_the_float_model(arch, tied):
    model = tiny_model(arch)
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    with torch.no_grad():
        for layer in model.model.layers:   # non-trivial norm weights, so the folding is exercised
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    ids = torch.tensor([[BOS, 5, 9, 17, 33, 60, 100]])
    with torch.no_grad():
        want = model(ids).logits
        rotation.rotate_model(model, seed=0)
        got = model(ids).logits
    assert isinstance(model.model.layers[0].mlp.down_proj, RotatedLinear)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_failure_after_rotation_restores_the_model(monkeypatch):
    model = tiny_model("llama")
    model.lm_head.weight = model.get_input_embeddings().weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(scales, "search_kv_scales", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("planted")))
    cfg = pqk.QuantConfig(w_bits=8, a_bits=8, kv_bits=8, rotate=True, calib_samples=2, calib_seq_len=64)
    with pytest.raises(RuntimeError, match="planted"):
        pqk.quantize_model(model, StubTokenizer(), text(), cfg, progress=False)
    assert all(isinstance(layer.mlp.down_proj, torch.nn.Linear) for layer in model.model.layers)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rotated_quantized_model_follows_the_float_model():
    model, ref = tiny_model("qwen3"), tiny_model("qwen3")
    cfg = pqk.QuantConfig(w_bits=8, a_bits=8, kv_bits=8, rotate=True, calib_samples=4, calib_seq_len=64)
    pqk.quantize_model(model, StubTokenizer(), text(), cfg, progress=False)
    assert isinstance(model.model.layers[1].mlp.down_proj.linear, pqk.nn.QuantLinear)
    ids = torch.tensor([StubTokenizer().encode(text(100, seed=9))])
    st = model.pqk_state
    with torch.no_grad():
        want = ref(torch.cat([st.prefix_ids.unsqueeze(0), ids], 1)).logits[:, st.prefix_len:]
        got = model(ids).logits
    sqnr = 10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean())
    assert sqnr > 25, f"rotated W8A8KV8 SQNR {sqnr:.1f} dB"
