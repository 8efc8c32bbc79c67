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


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False), ("qwen3", False), ("mistral", False),
                                       ("phi3", True), ("phi3", False)])   # phi3: folded into qkv_proj / gate_up_proj
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


@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_rotated_quantized_model_follows_the_float_model(arch):
    model, ref = tiny_model(arch), tiny_model(arch)
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


# 48 = 12 * 4 and 128 factor (hadamard form, H_12 not symmetric), 76 = 19 * 4 does not (dense fallback)
@pytest.mark.parametrize("inter,form", [(48, "hadamard"), (128, "hadamard"), (76, "dense")])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_down_proj_rotation_form_keeps_the_float_model(arch, inter, form):
    model = tiny_model(arch, intermediate=inter)
    ids = torch.tensor([[BOS, 5, 9, 17, 33, 60, 100, 3, 4]])
    with torch.no_grad():
        want = model(ids).logits
        rotation.rotate_model(model, seed=0)
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    sd = model.state_dict()
    for i, layer in enumerate(model.model.layers):
        down = layer.mlp.down_proj
        assert isinstance(down, RotatedLinear) and down.form == form
        key = f"model.layers.{i}.mlp.down_proj."
        if form == "hadamard":   # [I] signs, never an [I, I] matrix
            assert tuple(sd[key + "signs"].shape) == (inter,) and key + "rotation" not in sd
            assert set(sd[key + "signs"].unique().tolist()) <= {-1.0, 1.0}
            torch.testing.assert_close(down.signs.double(), rotation.random_signs(inter, 1 + i), rtol=0, atol=0)
        else:
            assert tuple(sd[key + "rotation"].shape) == (inter, inter) and key + "signs" not in sd
            torch.testing.assert_close(down.rotation, rotation.random_orthogonal(inter, 1 + i).float())


def test_down_rotation_seeds_and_forms():
    a, b = rotation.down_rotation(48, 3), rotation.down_rotation(48, 4)
    assert a.shape == (48,) and torch.equal(a, rotation.down_rotation(48, 3)) and not torch.equal(a, b)
    assert rotation.down_rotation(76, 3).shape == (76, 76)
    assert torch.equal(rotation.down_rotation(76, 3), rotation.random_orthogonal(76, 3))


@pytest.mark.parametrize("inter,form", [(48, "hadamard"), (76, "dense")])
def test_rotated_checkpoint_round_trip(tmp_path, inter, form):
    import json
    from transformers import AutoModelForCausalLM

    cfg = pqk.QuantConfig(w_bits=8, a_bits=8, kv_bits=8, rotate=True, calib_samples=2, calib_seq_len=32,
                          weight_method="rtn", act_clip_search=False, prefix_tokens=[BOS])
    model = pqk.quantize_model(tiny_model("llama", intermediate=inter), StubTokenizer(), text(), cfg, progress=False)
    assert all(layer.mlp.down_proj.form == form for layer in model.model.layers)
    pqk.export_hf(model, str(tmp_path), float_dtype="float32")
    meta = json.loads((tmp_path / "pqk_config.json").read_text())
    assert meta["rotations"] == {f"model.layers.{i}.mlp.down_proj": form for i in range(2)}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref = model(ids).logits
    for loaded in (pqk.load_quantized(str(tmp_path)), AutoModelForCausalLM.from_pretrained(str(tmp_path))):
        for layer, orig in zip(loaded.model.layers, model.model.layers):
            assert layer.mlp.down_proj.form == form
            for k, v in orig.mlp.down_proj.named_buffers(recurse=False):
                assert torch.equal(getattr(layer.mlp.down_proj, k), v)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, ref)
    # a checkpoint without the record (written before the Hadamard form): dense rotations
    del meta["rotations"]
    (tmp_path / "pqk_config.json").write_text(json.dumps(meta))
    if form == "dense":
        with torch.no_grad():
            assert torch.equal(pqk.load_quantized(str(tmp_path))(ids).logits, ref)
    else:   # holds signs, the skeleton expects [I, I]: refused, not silently wrong
        with pytest.raises(ValueError, match="do not match the model"):
            pqk.load_quantized(str(tmp_path))
    meta["rotations"] = {"model.layers.0.mlp.down_proj": "fast"}
    (tmp_path / "pqk_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'rotations' must map rotated modules"):
        pqk.load_quantized(str(tmp_path))
