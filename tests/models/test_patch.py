"""The module swap on every registered family (tiny Llama / Mistral / Qwen2 / Qwen3 / Phi-3): what is replaced, the
patched forward/generate (prefix in the cache, BOS not doubled), class- and instance-level patching, all-or-nothing
on failure, unsupported models, a new family as one registry entry."""
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import prefixquant_kernels as pqk
from prefixquant_kernels.calibration.pipeline import quantize_model
from prefixquant_kernels.models import REGISTRY, ArchSpec, patch_class, swap
from prefixquant_kernels.models.patch import float_linears, get_spec

from .tiny import BOS, CONFIGS, StubTokenizer, text, tiny_model

W8 = dict(w_bits=8, a_bits=8, kv_bits=8, calib_samples=4, calib_seq_len=64)


_CACHE = {}


def _quantized(arch):
    """(quantized W8A8KV8 static + prefix, float reference), built once per architecture (tests only read them)."""
    if arch not in _CACHE:
        model, ref = tiny_model(arch), tiny_model(arch)
        _CACHE[arch] = quantize_model(model, StubTokenizer(), text(), pqk.QuantConfig(**W8), progress=False), ref
    return _CACHE[arch]


def test_registry_is_keyed_by_model_type():
    assert set(REGISTRY) == {"llama", "mistral", "qwen2", "qwen3", "phi3"} == set(CONFIGS)
    assert get_spec("qwen2").qkv_bias and get_spec("qwen3").qk_norm
    assert get_spec("phi3").fused_qkv and get_spec("phi3").fused_gate_up and not get_spec("mistral").fused_qkv
    assert get_spec("mistral").points == get_spec("llama").points       # Mistral: Llama's module names


def test_phi3_points_are_its_fused_linears():
    spec = get_spec("phi3")
    assert spec.points == {"qkv": ("self_attn.qkv_proj",), "o": ("self_attn.o_proj",),
                           "gate_up": ("mlp.gate_up_proj",), "down": ("mlp.down_proj",)}
    cfg = tiny_model("phi3").config                  # 4 query heads, 2 KV heads of 16: [q 64 | k 32 | v 32] rows
    assert spec.qkv_rows(cfg) == (slice(0, 64), slice(64, 96), slice(96, 128))
    assert spec.head_dim(cfg) == 16


def test_a_spec_is_all_separate_or_one_fused_linear():
    with pytest.raises(ValueError, match="all separate linears or one fused"):
        ArchSpec("half-fused", q="self_attn.q_proj", k="self_attn.kv_proj", v="self_attn.kv_proj")


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_swap_replaces_every_decoder_linear(arch):
    model, _ = _quantized(arch)
    spec = get_spec(model)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, pqk.nn.QuantLinear)}
    assert len(quant) == 2 * len(spec.linears) == 2 * (4 if arch == "phi3" else 7)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.startswith("model.layers"))
    assert isinstance(model.lm_head, nn.Linear)                      # the head stays in float
    layer = model.model.layers[0]
    assert (layer.get_submodule(spec.q).bias is not None) == (arch == "qwen2")   # Qwen2's qkv bias carried over
    assert hasattr(layer.self_attn, "q_norm") == (arch == "qwen3")             # Qwen3's q/k norm untouched
    assert all(m.is_static for m in quant.values())


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_quantized_logits_follow_the_float_model_with_the_same_prefix(arch):
    model, ref = _quantized(arch)
    st = model.pqk_state
    ids = torch.tensor([StubTokenizer().encode(text(40, seed=1))])
    with torch.no_grad():
        want = ref(torch.cat([st.prefix_ids.unsqueeze(0), ids], 1)).logits[:, st.prefix_len:]
        got = model(ids).logits                 # the patched forward supplies the cache with the prefix
    sqnr = 10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean())
    assert sqnr > 25, f"W8A8KV8 SQNR {sqnr:.1f} dB"


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_generate_puts_the_prefix_first_and_does_not_double_bos(arch):
    model, _ = _quantized(arch)
    assert model.pqk_state.prefix_ids.tolist()[-1] == BOS
    body = torch.tensor([[5, 6, 7, 8]])
    with_bos = torch.cat([torch.tensor([[BOS]]), body], 1)
    out_a = model.generate(with_bos, max_new_tokens=4, do_sample=False, pad_token_id=0)
    out_b = model.generate(body, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out_a[:, :5], with_bos) and torch.equal(out_b[:, :4], body)   # the user's ids come back
    assert torch.equal(out_a[:, 5:], out_b[:, 4:])   # BOS after a prefix ending with BOS is dropped, not doubled
    assert out_a.shape[1] == 9


def test_class_level_patch_is_inert_without_state():
    class MyLlama(LlamaForCausalLM):
        pass
    patch_class(MyLlama)
    patch_class(MyLlama)                                   # idempotent
    ref = tiny_model("llama")
    torch.manual_seed(0)
    model = MyLlama(ref.config).eval()
    model.load_state_dict(ref.state_dict())
    ids = torch.tensor([[BOS, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0),
                       ref.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0))


def test_unsupported_architecture_is_refused():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"unsupported architecture model_type='gpt2'.*llama"):
        quantize_model(model, StubTokenizer(), text(), pqk.QuantConfig(**W8), progress=False)


def test_swap_with_a_bad_target_leaves_the_model_untouched():
    model = tiny_model("llama")
    before = dict(float_linears(model))
    good = pqk.nn.QuantLinear.from_float(before["model.layers.0.self_attn.q_proj"], 8, 8, 0.1)
    with pytest.raises(ValueError, match="cannot swap"):
        swap(model, {"model.layers.0.self_attn.q_proj": good, "model.layers.9.mlp.down_proj": good})
    assert float_linears(model) == before and not hasattr(model, "pqk_state")


def test_failure_during_quantization_leaves_the_model_untouched(monkeypatch):
    from prefixquant_kernels.calibration import scales
    model = tiny_model("qwen3")
    sd = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(*a, **k):
        raise RuntimeError("planted failure in the KV scale search")
    monkeypatch.setattr(scales, "search_kv_scales", boom)
    with pytest.raises(RuntimeError, match="planted failure"):
        quantize_model(model, StubTokenizer(), text(), pqk.QuantConfig(**W8), progress=False)
    assert not any(isinstance(m, pqk.nn.QuantLinear) for m in model.modules())
    assert getattr(model, "pqk_state", None) is None and "forward" not in vars(model)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_quantizing_twice_is_refused():
    model, _ = _quantized("llama")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, StubTokenizer(), text(), pqk.QuantConfig(**W8), progress=False)


def test_a_llama_named_family_is_one_registry_entry():
    """A family with Llama's module names needs nothing but its ArchSpec: quantize, generate, fail without it."""
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
    cfg.model_type = "toy-llama"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    assert model.config.model_type == "toy-llama"
    with pytest.raises(ValueError, match="unsupported architecture model_type='toy-llama'"):
        quantize_model(model, StubTokenizer(), text(), pqk.QuantConfig(**W8), progress=False)
    REGISTRY["toy-llama"] = ArchSpec("toy-llama")
    try:
        quantize_model(model, StubTokenizer(), text(), pqk.QuantConfig(**W8), progress=False)
        assert sum(isinstance(m, pqk.nn.QuantLinear) for m in model.modules()) == 2 * 7
        out = model.generate(torch.tensor([[BOS, 5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 7)
    finally:
        del REGISTRY["toy-llama"]
