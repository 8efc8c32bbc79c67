"""The compiled decode step traces one decoder layer and reuses its graph for all (models/layer_region.py): dynamo's
graph of the step calls one subgraph once per layer, and the tokens and logits are those of the eager step."""
import pytest
import torch
from transformers import CompileConfig

import prefixquant_kernels as pqk
from prefixquant_kernels.calibration.pipeline import quantize_model
from prefixquant_kernels.models import compiled_step, layer_region

from .tiny import StubTokenizer, text, tiny_model
from .test_compiled_step import _generate, _prompt

LAYERS = 4


def _model(arch):
    cfg = pqk.QuantConfig(w_bits=4, a_bits=8, kv_bits=4, kv_rotate=True, k_center=True, calib_samples=2,
                          calib_seq_len=64)
    return quantize_model(tiny_model(arch, layers=LAYERS), StubTokenizer(), text(), cfg, progress=False)


def _capturing(monkeypatch, decode_layer_op: bool = False):
    """Compile the step with a backend that keeps dynamo's FX graph and runs it as it is (no inductor: the test
    looks at what dynamo traced). decode_layer_op: whether a layer pqk::decode_layer computes is that one op node
    (else its region)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def config(device):
        cfg = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=None,
                            options={"guard_filter_fn": compiled_step.step_guard_filter})
        cfg._compile_all_devices = True
        return cfg

    monkeypatch.setattr(compiled_step, "compile_config", config)
    # the regions are what this module's tests look at: a layer pqk::decode_layer computes is one op node instead
    monkeypatch.setattr(compiled_step, "DECODE_LAYER_OP", decode_layer_op)
    torch._dynamo.reset()
    return graphs


def _subgraph_calls(gm) -> list[str]:
    """The subgraph each invoke_subgraph node of dynamo's graph calls, in order."""
    return [n.args[0].target for n in gm.graph.nodes
            if n.op == "call_function" and "invoke_subgraph" in str(n.target)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_one_layer_traced_for_all_and_equal_to_eager(arch, monkeypatch):
    graphs = _capturing(monkeypatch)
    model = _model(arch)
    ids, mask = _prompt()
    eager = _generate(model, ids, mask, compiled=False, new=4)
    comp = _generate(model, ids, mask, compiled=True, new=4)
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled for one batch size and capacity"
    calls = _subgraph_calls(graphs[0])
    assert len(calls) == LAYERS and len(set(calls)) == 1, calls
    assert torch.equal(comp.sequences, eager.sequences)
    for a, b in zip(comp.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))


def test_layer_regions_off_traces_every_layer_inline(monkeypatch):
    graphs = _capturing(monkeypatch)
    monkeypatch.setattr(compiled_step, "LAYER_REGIONS", False)
    model = _model("llama")
    _generate(model, *_prompt(batch=1), compiled=True, new=3)
    assert graphs and not _subgraph_calls(graphs[0])
    assert not any(getattr(l.forward, "_pqk_region", False) for l in model.model.layers)


def test_the_wrapper_is_the_layer_itself_outside_a_compiled_step():
    """Eagerly (and for a prefill, or a cache that is not preallocated) the wrapped layer is the layer's forward."""
    model = _model("llama")
    layer_region.install(model)
    layer_region.install(model)                      # idempotent: one wrapper, not two
    layer = model.model.layers[0]
    assert layer.forward._pqk_region and layer.forward.__func__.__closure__ is not None
    x = torch.randn(2, 5, 64)
    pos = torch.arange(5)[None].expand(2, 5)
    emb = model.model.rotary_emb(x, pos)
    torch.testing.assert_close(layer(x, position_embeddings=emb, position_ids=pos),
                               type(layer).forward(layer, x, position_embeddings=emb, position_ids=pos),
                               rtol=0, atol=0)


def test_more_distinct_layers_than_torch_reuses_by_default(monkeypatch):
    """Layers that differ in a constant (here each attention's softmax scale) trace one subgraph each: a model with more
    such layers than nested_compile_region's default reuse cache (8 entries, then a RuntimeError in torch 2.13) still
    compiles and equals eager."""
    graphs = _capturing(monkeypatch)
    layers = 10
    cfg = pqk.QuantConfig(w_bits=4, a_bits=8, kv_bits=4, calib_samples=2, calib_seq_len=64)
    model = quantize_model(tiny_model("llama", layers=layers), StubTokenizer(), text(), cfg, progress=False)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.scaling = layer.self_attn.scaling * (1.0 + 0.01 * i)
    ids, mask = _prompt(batch=1)
    eager = _generate(model, ids, mask, compiled=False, new=3)
    comp = _generate(model, ids, mask, compiled=True, new=3)
    assert len(graphs) == 1     # one subgraph per layer, each used once (dynamo then inlines it): one step graph
    assert torch.equal(comp.sequences, eager.sequences)
    for a, b in zip(comp.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))
