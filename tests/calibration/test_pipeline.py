"""quantize_model end to end on tiny models: the modes' accuracy ordering on a model with planted massive
activations (the PrefixQuant claim), evaluate_perplexity's protocol, save/load round trip, bad inputs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import prefixquant_kernels as pqk

from ..models.tiny import BOS, StubTokenizer, plant_outliers, text, tiny_model

SMALL = dict(calib_samples=4, calib_seq_len=64)


def _quantize(arch, planted=False, **kw):
    model = tiny_model(arch)
    if planted:
        plant_outliers(model, tokens=(BOS,))
    return pqk.quantize_model(model, StubTokenizer(), text(), pqk.QuantConfig(**{**SMALL, **kw}), progress=False)


def test_evaluate_perplexity_protocol_on_the_float_model():
    model, tok = tiny_model("llama"), StubTokenizer()
    t = text(600, seed=3)
    ids = tok.encode(t)
    want_nll, n = 0.0, 0
    with torch.no_grad():
        for w in range(len(ids) // 64):
            win = torch.tensor(ids[w * 64:(w + 1) * 64])
            logits = model(torch.cat([torch.tensor([BOS]), win]).unsqueeze(0)).logits[0]
            want_nll += float(F.cross_entropy(logits[1:-1], win[1:], reduction="sum"))
            n += 63
    assert pqk.evaluate_perplexity(model, tok, t, seq_len=64) == pytest.approx(math.exp(want_nll / n), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        pqk.evaluate_perplexity(model, tok, "abc", seq_len=64)
    with pytest.raises(ValueError, match="text is empty"):
        pqk.evaluate_perplexity(model, tok, "", seq_len=64)


def _logit_error(model, ref):
    """Mean squared logit error vs the float model given the same context (prefix or BOS first)."""
    ids = torch.tensor([StubTokenizer().encode(text(200, seed=5))])
    st = model.pqk_state
    lead = st.prefix_ids.unsqueeze(0) if st.prefix_len else torch.tensor([[BOS]])
    with torch.no_grad():
        want = ref(torch.cat([lead, ids], 1)).logits[:, lead.shape[1]:]
        got = model(ids if st.prefix_len else torch.cat([lead, ids], 1)).logits[:, -ids.shape[1]:]
    return float((got - want).pow(2).mean())


@pytest.mark.parametrize("arch", ["llama", "phi3"])     # phi3: the claim holds with fused qkv / gate_up points
def test_static_with_prefix_vs_dynamic_vs_static_without_prefix_on_planted_outliers(arch):
    ref = tiny_model(arch)
    plant_outliers(ref, tokens=(BOS,))
    common = dict(w_bits=8, a_bits=4, kv_bits=8, weight_method="rtn")
    static_prefix = _quantize(arch, True, act_quant="static", prefix=True, **common)
    dynamic = _quantize(arch, True, act_quant="dynamic", prefix=False, **common)
    static_plain = _quantize(arch, True, act_quant="static", prefix=False, **common)
    assert static_prefix.pqk_state.prefix_ids.tolist() == [BOS]
    e_sp, e_dyn, e_s = (_logit_error(m, ref) for m in (static_prefix, dynamic, static_plain))
    assert e_sp <= 1.5 * e_dyn, (e_sp, e_dyn)       # static + prefix: as good as per-token dynamic
    assert e_s > 3 * e_sp, (e_s, e_sp)              # static calibrated with the sink token: much worse


@pytest.mark.parametrize("arch,kw", [
    ("qwen2", dict(w_bits=4, a_bits=8, kv_bits=4)),                     # bias, GPTQ, static KV4, kv_rotate (auto)
    ("llama", dict(w_bits=8, a_bits=8, kv_bits=4, act_quant="dynamic", prefix=False)),   # dynamic KV4, kv_rotate
    ("qwen3", dict(w_bits=8, a_bits=8, kv_bits=8, act_quant="dynamic", prefix=False)),  # dynamic KV, no prefix
    ("llama", dict(w_bits=8, a_bits=8, kv_bits=2, kv_mode="kivi")),
    ("llama", dict(w_bits=8, a_bits=4, kv_bits=8, rotate=True, weight_method="rtn")),   # RotatedLinear saved
    ("mistral", dict(w_bits=4, a_bits=8, kv_bits=4)),                   # GPTQ, static KV4, rotate + kv_rotate
    ("phi3", dict(w_bits=4, a_bits=8, kv_bits=4)),                      # fused qkv / gate_up: the same, split by spec
    ("phi3", dict(w_bits=8, a_bits=8, kv_bits=8, act_quant="dynamic", prefix=False)),
])
def test_save_load_round_trip(tmp_path, arch, kw):
    model = _quantize(arch, **kw)
    pqk.save_quantized(model, str(tmp_path), float_dtype="float32")
    loaded = pqk.load_quantized(str(tmp_path))
    assert loaded.pqk_state.cfg == model.pqk_state.cfg
    assert torch.equal(loaded.pqk_state.prefix_ids, model.pqk_state.prefix_ids)
    assert loaded.pqk_state.rotates_qk == model.pqk_state.rotates_qk == model.pqk_state.cfg.resolved_kv_rotate
    assert loaded.config._attn_implementation == model.config._attn_implementation
    if model.pqk_state.rotates_qk:
        assert torch.equal(loaded.pqk_state.qk_rotation, model.pqk_state.qk_rotation)
    ids = torch.tensor([[BOS, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(loaded(ids[:, 1:]).logits, model(ids[:, 1:]).logits)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(ids, **gen), model.generate(ids, **gen))


def test_load_refuses_foreign_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint written by pqk.save_quantized"):
        pqk.load_quantized(str(tmp_path))
    with pytest.raises(ValueError, match="not quantized"):
        pqk.save_quantized(tiny_model("llama"), str(tmp_path))
    model = _quantize("llama", w_bits=8, a_bits=8, kv_bits=8)
    pqk.save_quantized(model, str(tmp_path), float_dtype="float32")
    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["intermediate_size"] = 96                               # a checkpoint of another config
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj: checkpoint has \[128, 64\].*builds \[96, 64\]"):
        pqk.load_quantized(str(tmp_path))
    meta_file = tmp_path / "pqk_config.json"
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 7
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="this package reads 'prefixquant-kernels' version 1"):
        pqk.load_quantized(str(tmp_path))


def test_bad_inputs_leave_the_model_untouched():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="calibration text is empty"):
        pqk.quantize_model(model, StubTokenizer(), [], pqk.QuantConfig(**SMALL), progress=False)
    with pytest.raises(ValueError, match="tokenizer has no bos_token_id"):
        pqk.quantize_model(model, StubTokenizer(bos_token_id=None), text(), pqk.QuantConfig(**SMALL), progress=False)
    with pytest.raises(TypeError, match="cfg must be a pqk.QuantConfig"):
        pqk.quantize_model(model, StubTokenizer(), text(), {"w_bits": 4}, progress=False)
    with pytest.raises(ValueError, match=r"prefix_tokens \[500\] contain ids >= the vocabulary size"):
        pqk.quantize_model(model, StubTokenizer(), text(), pqk.QuantConfig(prefix_tokens=[500], **SMALL),
                           progress=False)
    assert not any(isinstance(m, pqk.nn.QuantLinear) for m in model.modules())
    assert getattr(model, "pqk_state", None) is None


def test_a_nan_weight_or_a_foreign_tokenizer_is_refused_and_the_model_left_alone():
    """A fuzzer's finds: a NaN weight gave NaN scales and a model that failed on every forward afterwards; token ids
    past the vocabulary an IndexError from inside torch's embedding. Both are named before anything changes."""
    cheap = pqk.QuantConfig(calib_samples=2, calib_seq_len=32, prefix_tokens=[BOS], act_clip_search=False,
                            weight_method="rtn")
    model = tiny_model("llama", layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight holds NaN or inf values"):
        pqk.quantize_model(model, StubTokenizer(), text(), cheap, progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k].nan_to_num(), v.nan_to_num()) for k, v in before.items())
    assert getattr(model, "pqk_state", None) is None

    class Foreign(StubTokenizer):   # ids of a larger vocabulary
        def encode(self, t, add_special_tokens=False):
            return [i + 10**6 for i in super().encode(t, add_special_tokens=add_special_tokens)]

    model = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match=r"calibration text holds token ids outside the model's vocabulary \[0, "):
        pqk.quantize_model(model, Foreign(), text(), cheap, progress=False)
    with pytest.raises(ValueError, match=r"^pqk.find_prefix_tokens: the tokenized calibration text holds token ids"):
        pqk.find_prefix_tokens(model, Foreign(), text())
    for kw, name in ((dict(seq_len=0), "seq_len"), (dict(n_samples=0), "n_samples"), (dict(max_len=-1), "max_len")):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            pqk.find_prefix_tokens(model, StubTokenizer(), text(), **kw)
