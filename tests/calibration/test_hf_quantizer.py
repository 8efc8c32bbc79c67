"""The transformers quantizer hook: pqk.export_hf(model, path) -> AutoModelForCausalLM.from_pretrained(path) is the
same quantized model (tiny random Llama, Qwen2, Mistral and Phi-3, transformers 5.23)."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import prefixquant_kernels as pqk
from prefixquant_kernels.calibration import hf_quantizer as hq

from ..models.tiny import BOS, StubTokenizer, text, tiny_model

CHEAP = dict(calib_samples=2, calib_seq_len=32, prefix_tokens=[BOS], act_clip_search=False, weight_method="rtn")


def _quantized(arch, **kw):
    return pqk.quantize_model(tiny_model(arch), StubTokenizer(), text(), pqk.QuantConfig(**{**CHEAP, **kw}),
                              progress=False)


def rounded(model, dtype=torch.bfloat16):
    """A copy of ``model`` whose float tensors outside the quantized modules (embedding, lm_head, norms) are rounded
    to ``dtype``: what a checkpoint stored with float_dtype=dtype holds, computing in float32."""
    import copy
    from prefixquant_kernels.models.rotated_linear import RotatedLinear
    from prefixquant_kernels.models.state import PrefixQuantState
    out = copy.deepcopy(model)
    exact = tuple(n + "." for n, m in out.named_modules() if isinstance(m, (pqk.nn.QuantLinear, RotatedLinear,
                                                                             PrefixQuantState)))
    stored = set(out.state_dict())      # not RoPE's inv_freq: a non-persistent buffer, recomputed at load
    with torch.no_grad():
        for k, t in {**dict(out.named_parameters()), **dict(out.named_buffers())}.items():
            if t.dtype == torch.float32 and k in stored and not k.startswith(exact):
                t.copy_(t.to(dtype).float())
    return out


@pytest.mark.parametrize("arch,kw", [
    ("llama", dict(w_bits=4, a_bits=8, kv_bits=4)),                     # rotated: RotatedLinear + Q/K rotation
    ("qwen2", dict(w_bits=8, a_bits=4, kv_bits=8, rotate=False)),       # qkv bias, no rotation
    ("mistral", dict(w_bits=4, a_bits=8, kv_bits=4)),
    ("phi3", dict(w_bits=4, a_bits=8, kv_bits=4)),                      # fused qkv_proj / gate_up_proj, rotated
])
def test_from_pretrained_returns_the_quantized_model(tmp_path, arch, kw):
    model = _quantized(arch, **kw)
    hq.export_hf(model, str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "prefixquant_kernels"
    assert cfg["dtype"] == "float32"            # computes in fp32; embedding / lm_head / norms stored in bf16
    model = rounded(model)                       # what the checkpoint holds: the same model, floats in bf16

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert type(loaded) is type(model)
    assert isinstance(loaded.model.layers[0].get_submodule(pqk.models.get_spec(loaded).q), pqk.nn.QuantLinear)
    assert loaded.pqk_state.cfg == model.pqk_state.cfg
    ids = torch.tensor([[BOS, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref = model(ids[:, 1:]).logits
        assert torch.equal(loaded(ids[:, 1:]).logits, ref)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = loaded.generate(ids, **gen)
    assert out.shape == (1, 12) and torch.equal(out, model.generate(ids, **gen))

    # the same directory still loads with pqk.load_quantized, and transformers' save_pretrained round-trips
    with torch.no_grad():
        assert torch.equal(pqk.load_quantized(str(tmp_path))(ids[:, 1:]).logits, ref)
    loaded.save_pretrained(str(tmp_path / "resaved"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "resaved"))
    with torch.no_grad():
        assert torch.equal(again(ids[:, 1:]).logits, ref)


def test_a_tampered_or_foreign_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        hq.export_hf(tiny_model("llama"), str(tmp_path / "float"))
    model = _quantized("llama", w_bits=8, a_bits=8, kv_bits=8, rotate=False)
    hq.export_hf(model, str(tmp_path))
    cfg_file = tmp_path / "config.json"
    good = json.loads(cfg_file.read_text())

    bad = json.loads(json.dumps(good))
    bad["quantization_config"]["format_version"] = 7
    cfg_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="version 7; this package reads 'prefixquant-kernels' version 1"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))

    bad = json.loads(json.dumps(good))
    bad["intermediate_size"] = 96                                      # a config of another model
    cfg_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj: checkpoint has \[\d+, \d+\].*the config builds"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))

    bad = json.loads(json.dumps(good))
    bad["num_hidden_layers"] = 3
    cfg_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="do not match a llama with 3 layers"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_registration_is_guarded(monkeypatch):
    from transformers.quantizers import auto
    assert auto.AUTO_QUANTIZER_MAPPING[hq.QUANT_METHOD].__name__ == "PrefixQuantHfQuantizer"
    # a transformers without the registration API: a warning, no error
    monkeypatch.setattr(hq, "_registered", False)
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, hq.QUANT_METHOD)
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, hq.QUANT_METHOD)
    monkeypatch.delattr(auto, "register_quantizer")
    with pytest.warns(UserWarning, match="no quantizer registration API.*pqk.load_quantized"):
        assert hq.register() is False


def test_import_hook_registers_when_transformers_loads_its_quantizers():
    """In a fresh interpreter: importing the package does not import transformers' quantizers (seconds), and
    importing them afterwards registers ours."""
    code = ("import sys, prefixquant_kernels\n"
            "assert 'transformers.quantizers.auto' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\n"
            "assert 'prefixquant_kernels' in M, sorted(M)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
