"""The compiled decode step (models/compiled_step.py): ``model.generate()`` of a quantized model runs its one-token
steps as one torch.compile(fullgraph=True) graph over the preallocated cache (modes/static.py's
PreallocatedStaticLayer). Compiled == eager (greedy tokens identical, logits to float rounding) for tiny Llama /
Qwen2 / Qwen3, batch 4 with left padding; the preallocated cache == the growing one, bit for bit, eagerly; no
recompile for a second call of similar length; the calls that cannot take the path run eagerly."""
import logging

import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels.calibration.pipeline import quantize_model
from prefixquant_kernels.models import compiled_step

from .tiny import BOS, StubTokenizer, text, tiny_model

_MODELS: dict = {}


def _quantized(arch, kv_rotate=True, a_bits=8):
    key = (arch, kv_rotate, a_bits)
    if key not in _MODELS:
        cfg = pqk.QuantConfig(w_bits=4, a_bits=a_bits, kv_bits=4, kv_rotate=kv_rotate, calib_samples=2,
                              calib_seq_len=64)
        _MODELS[key] = quantize_model(tiny_model(arch), StubTokenizer(), text(), cfg, progress=False)
    return _MODELS[key]


def _prompt(batch=4, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (batch, t), generator=g)
    ids[:, 0] = BOS
    mask = torch.ones_like(ids)
    if batch > 2:    # left padding of different lengths
        mask[1, :3] = 0
        mask[2, :1] = 0
    return ids, mask


def _generate(model, ids, mask, compiled, new=10):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pqk_compile=compiled)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_compiled_generate_equals_eager(arch):
    model = _quantized(arch)
    ids, mask = _prompt()
    eager = _generate(model, ids, mask, compiled=False)
    assert not hasattr(model, "_compiled_call")
    comp = _generate(model, ids, mask, compiled=True)
    assert hasattr(model, "_compiled_call"), "generate did not take the compiled path"
    assert model.pqk_state.info["compile_seconds"] > 0
    assert torch.equal(comp.sequences, eager.sequences)
    assert comp.sequences.shape == (4, 9 + 10)
    # float rounding: inductor sums the fused norms in another order; a static activation quantizer downstream may
    # turn a 1e-7 difference into a one-level flip (as in test_fused_decode), a wrong step is off by far more
    for a, b in zip(comp.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0.03 * float(b.abs().max()))
    close = torch.stack([(a - b).abs() <= 1e-4 for a, b in zip(comp.logits, eager.logits)])
    assert close.float().mean() > 0.5


def test_no_recompile_for_a_similar_call_and_the_log_line(caplog):
    model = _quantized("llama")
    ids, mask = _prompt(seed=1)
    _generate(model, ids, mask, compiled=True)        # compiles (or reuses) the graph of this shape
    torch._dynamo.utils.counters.clear()
    ids2, mask2 = _prompt(seed=2, t=11)               # another prompt length, the same capacity bucket
    with caplog.at_level(logging.WARNING, logger="prefixquant_kernels"):
        out = _generate(model, ids2, mask2, compiled=True, new=7)
    assert out.sequences.shape == (4, 11 + 7)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0, "a second call recompiled"
    eager = _generate(model, ids2, mask2, compiled=False, new=7)
    assert torch.equal(out.sequences, eager.sequences)


def test_compile_time_is_logged(caplog):
    model = _quantized("llama", kv_rotate=False, a_bits=4)   # a fresh model: its first compiled call logs
    ids, mask = _prompt(batch=1)
    with caplog.at_level(logging.WARNING, logger="prefixquant_kernels"):
        _generate(model, ids, None, compiled=True, new=4)
    assert any("compiled the decode step in" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kv_rotate", [True, False])
def test_preallocated_cache_equals_growing_cache_eagerly(kv_rotate):
    model = _quantized("llama", kv_rotate=kv_rotate)
    ids, _ = _prompt(batch=2)

    def run(cache):
        outs = []
        with torch.no_grad():
            outs.append(model(ids[:, 1:], past_key_values=cache).logits[:, -1])
            for t in range(6):
                outs.append(model(torch.full((2, 1), 5 + 7 * t), past_key_values=cache).logits[:, -1])
        return torch.stack(outs, 1)

    grow = model.pqk_state.make_cache(2)
    pre = model.pqk_state.make_cache(2, max_cache_len=32)
    assert pre.is_compileable and not grow.is_compileable
    a, b = run(grow), run(pre)
    assert torch.equal(a, b)
    assert int(pre.get_seq_length()) == grow.get_seq_length() == model.pqk_state.prefix_len + 8 + 6


def test_plan_runs_eagerly_where_the_path_does_not_apply():
    model = _quantized("llama")
    ids, _ = _prompt(batch=1)
    full = torch.cat([model.pqk_state.prefix_ids[None], ids[:, 1:]], 1)
    assert compiled_step.plan(model, model.pqk_state, full, {"max_new_tokens": 5}) == compiled_step.CAPACITY_STEP
    assert compiled_step.plan(model, model.pqk_state, full, {"max_new_tokens": 300}) == 2 * compiled_step.CAPACITY_STEP
    assert compiled_step.plan(model, model.pqk_state, full, {"max_new_tokens": 5, "num_beams": 2}) is None
    assert compiled_step.plan(model, model.pqk_state, full, {"max_new_tokens": 5, "disable_compile": True}) is None
    kivi = pqk.QuantConfig(w_bits=8, a_bits=8, kv_mode="kivi", kv_bits=4, calib_samples=2, calib_seq_len=64)
    other = quantize_model(tiny_model("llama"), StubTokenizer(), text(), kivi, progress=False)
    assert not other.pqk_state.can_preallocate
    assert compiled_step.plan(other, other.pqk_state, full, {"max_new_tokens": 5}) is None
    out = other.generate(ids, max_new_tokens=3, do_sample=False)   # and it still generates, eagerly
    assert out.shape == (1, 9 + 3) and not hasattr(other, "_compiled_call")


def test_preallocated_cache_bad_input():
    model = _quantized("llama")
    st = model.pqk_state
    with pytest.raises(TypeError, match="pqk_compile"):
        model.generate(torch.tensor([[BOS, 5, 6]]), max_new_tokens=2, pqk_compile="yes")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_cache_len"):
            st.make_cache(1, max_cache_len=bad)
    with pytest.raises(ValueError, match="max_cache_len.*'static'"):
        pqk.PrefixQuantCache(2, "kivi", max_cache_len=16)
    cache = st.make_cache(1, max_cache_len=4)
    ids = torch.randint(3, 120, (1, 6))
    with pytest.raises(ValueError, match="holds 4 tokens"):
        with torch.no_grad():
            model(ids, past_key_values=cache)


def test_preallocated_crop_and_reset_match_the_growing_cache():
    """crop(-k) then more tokens, and reset(): the preallocated layer overwrites the rows past its new length, so
    it answers as the growing cache does after the same calls."""
    model = _quantized("llama")
    ids, _ = _prompt(batch=1, t=12)

    def run(cache):
        outs = []
        with torch.no_grad():
            model(ids[:, 1:], past_key_values=cache)
            cache.crop(-4)
            outs.append(model(ids[:, 5:8], past_key_values=cache).logits)
            outs.append(model(torch.tensor([[7]]), past_key_values=cache).logits)
            n = int(cache.get_seq_length())
            cache.reset()
            outs.append(model(ids[:, 1:4], past_key_values=cache).logits)
        return outs, n

    (a, na), (b, nb) = run(model.pqk_state.make_cache(1)), run(model.pqk_state.make_cache(1, max_cache_len=32))
    assert na == nb == model.pqk_state.prefix_len + 11 - 4 + 3 + 1
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_guard_filter_keeps_the_inputs_and_one_guard_on_the_model(monkeypatch):
    """step_guard_filter drops dynamo's guards on the model's modules and tensors (thousands per step on a real
    model) but keeps the cache's and the inputs' tensor guards and the one on the model's _pqk_graph_key."""
    model = _quantized("qwen2")
    seen, real = [], compiled_step.step_guard_filter

    def recording(entries):
        keep = real(entries)
        seen.extend(zip(entries, keep))
        return keep

    monkeypatch.setattr(compiled_step, "step_guard_filter", recording)
    _generate(model, *_prompt(batch=1, seed=3), compiled=True, new=3)
    kept = [e for e, k in seen if k]
    dropped = [e for e, k in seen if not k]
    assert any(e.guard_type == "TENSOR_MATCH" and e.name.startswith("self.") for e in dropped)
    assert not [e.name for e in kept if e.name.startswith("self.") and e.name != compiled_step.KEY_SOURCE]
    assert any(e.name == compiled_step.KEY_SOURCE for e in kept)
    tensors = {e.name for e in kept if e.guard_type == "TENSOR_MATCH"}
    assert "input_ids" in tensors
    assert any(n.startswith("past_key_values.layers[0].") for n in tensors)


def test_a_changed_model_compiles_again(caplog):
    """With the model's own guards dropped, _pqk_graph_key is what tells a changed model from the one compiled: a norm
    weight with other strides (same values) must not run in the graph that indexes it densely."""
    model = _quantized("llama", kv_rotate=False)
    ids, mask = _prompt(seed=4)
    _generate(model, ids, mask, compiled=True)
    key = model._pqk_graph_key
    assert compiled_step.refresh_graph_key(model) == key, "an unchanged model got a new key"
    norm = model.model.layers[0].input_layernorm
    old = norm.weight
    strided = torch.zeros(2 * old.numel(), dtype=old.dtype)[::2]
    strided.copy_(old.detach())
    norm.weight = torch.nn.Parameter(strided, requires_grad=old.requires_grad)
    try:
        with caplog.at_level(logging.WARNING, logger="prefixquant_kernels"):
            comp = _generate(model, ids, mask, compiled=True)
        assert model._pqk_graph_key != key
        assert any("step compiles again" in r.getMessage() for r in caplog.records)
        eager = _generate(model, ids, mask, compiled=False)
        assert torch.equal(comp.sequences, eager.sequences)
        for a, b in zip(comp.logits, eager.logits):
            torch.testing.assert_close(a, b, rtol=0, atol=0.03 * float(b.abs().max()))
        handle = norm.register_forward_hook(lambda *a: None)     # a hook is a change too
        k2 = compiled_step.refresh_graph_key(model)
        handle.remove()
        assert k2 != key and compiled_step.refresh_graph_key(model) != k2
    finally:
        norm.weight = old


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compile_config_is_accepted_by_torch_compile(device):
    """torch.compile refuses a mode and options together (the first GPU run failed on exactly that: mode
    "reduce-overhead" beside the guard filter's option); the CUDA config asks for CUDA graphs through the option."""
    cfg = compiled_step.compile_config(torch.device(device)).to_dict()
    assert cfg["options"]["guard_filter_fn"] is compiled_step.step_guard_filter
    assert cfg["options"].get("triton.cudagraphs", False) == (device == "cuda")
    torch.compile(lambda x: x + 1, **cfg)   # raises RuntimeError on a bad combination, before any tracing
