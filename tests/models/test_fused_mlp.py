"""QuantGatedMLP and fuse_mlps: the fused MLP (quantize -> gate/up + SiLU·mul + requant GEMM -> down GEMM) against
the exact composition of the reference ops and against the unfused QuantLinear MLP; what cannot be fused is left
alone (rotated, dynamic, W8) or refused (strict); bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prefixquant_kernels as pqk
from prefixquant_kernels import format as fmt
from prefixquant_kernels import reference
from prefixquant_kernels.calibration import quantize_model
from prefixquant_kernels.nn import QuantGatedMLP, QuantLinear

from ..conftest import BACKENDS
from .tiny import StubTokenizer, text, tiny_model


def _linears(gen, k=64, i=96, h=64, scale_in=0.05, scale_mid=0.02):
    def lin(n_in, n_out, s):
        return QuantLinear.from_float(nn.Linear(n_in, n_out, bias=False), 4, 4, act_scale=s)
    torch.manual_seed(int(torch.randint(0, 2**30, (1,), generator=gen)))
    return lin(k, i, scale_in), lin(k, i, scale_in), lin(i, h, scale_mid)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 7, 64)])
def test_module_equals_reference_composition(gen, backend, shape):
    gate, up, down = _linears(gen)
    mlp = QuantGatedMLP.from_quant_linears(gate, up, down, backend=backend)
    x = torch.randn(shape, generator=gen) * 2
    y = mlp(x)
    # the same math spelled with the reference ops on the *unfused* weights
    x2 = x.reshape(-1, 64)
    a = reference.quantize_static(x2, gate.act_scale, 4)
    g = reference.int4_matmul(a, gate.weight, gate.act_scale, gate.w_scale, None, torch.float32)
    u = reference.int4_matmul(a, up.weight, up.act_scale, up.w_scale, None, torch.float32)
    h = reference.quantize_static(reference.silu_mul(g, u), down.act_scale, 4)
    want = reference.int4_matmul(h, down.weight, down.act_scale, down.w_scale, None, torch.float32)
    assert y.shape == (*shape[:-1], 64) and y.dtype == x.dtype
    assert torch.equal(y.reshape(-1, 64), want)


def test_module_close_to_unfused_mlp(gen):
    """Versus the unfused path (torch's F.silu, h quantized by down_proj's QuantLinear): the same quantizers, so
    only SiLU's float rounding differs — a rare one-step change of one h level."""
    gate, up, down = _linears(gen)
    x = torch.randn(33, 64, generator=gen) * 2
    unfused = down(nn.functional.silu(gate(x)) * up(x))
    fused = QuantGatedMLP.from_quant_linears(gate, up, down)(x)
    assert torch.allclose(fused, unfused, rtol=0, atol=0.02 * float(unfused.abs().max()))
    assert (fused == unfused).float().mean() > 0.9


def test_state_dict_round_trip(gen):
    gate, up, down = _linears(gen)
    mlp = QuantGatedMLP.from_quant_linears(gate, up, down)
    other = QuantGatedMLP(64, 96, 64)
    other.load_state_dict(mlp.state_dict())
    x = torch.randn(4, 64, generator=gen)
    assert torch.equal(other(x), mlp(x))
    assert other._down_act_scale == pytest.approx(float(down.act_scale))
    bad = mlp.state_dict()
    bad["down_act_scale"] = torch.tensor(0.0)
    bad["down_scale"] = torch.full_like(bad["down_scale"], 2.0)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="down_act_scale"):
        other.load_state_dict(bad)
    # checked before any copy: nothing of `bad` got in, and the Python float still agrees
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    assert other._down_act_scale == pytest.approx(float(down.act_scale))


def test_a_dtype_cast_keeps_the_scales_in_fp32(gen):
    mlp = QuantGatedMLP.from_quant_linears(*_linears(gen))
    x = torch.randn(4, 64, generator=gen).half()
    want = mlp(x)
    mlp.half()
    for name in QuantGatedMLP._FP32:
        assert getattr(mlp, name).dtype == torch.float32, name
    assert torch.equal(mlp(x), want)


def test_bad_input(gen):
    gate, up, down = _linears(gen)
    with pytest.raises(ValueError, match="share one input scale"):
        QuantGatedMLP.from_quant_linears(gate, QuantLinear.from_float(nn.Linear(64, 96, bias=False), 4, 4,
                                                                      act_scale=0.07), down)
    with pytest.raises(ValueError, match="static W4A4"):
        QuantGatedMLP.from_quant_linears(gate, up, QuantLinear.from_float(nn.Linear(96, 64, bias=False), 4, 4))
    with pytest.raises(TypeError, match="QuantLinear"):
        QuantGatedMLP.from_quant_linears(gate, up, nn.Linear(96, 64))
    with pytest.raises(ValueError, match="in_features"):
        QuantGatedMLP.from_quant_linears(gate, up, QuantLinear.from_float(nn.Linear(64, 64, bias=False), 4, 4,
                                                                          act_scale=0.02))
    mlp = QuantGatedMLP.from_quant_linears(gate, up, down)
    with pytest.raises(ValueError, match="last dim"):
        mlp(torch.randn(3, 63))
    with pytest.raises(TypeError, match="x"):
        mlp(torch.ones(3, 64, dtype=torch.int32))


def _w4a4(rotate: bool, act_quant: str = "static", arch: str = "llama"):
    model = tiny_model(arch)
    cfg = pqk.QuantConfig(w_bits=4, a_bits=4, kv_bits=16, rotate=rotate, act_quant=act_quant, calib_samples=2,
                          calib_seq_len=64)
    return quantize_model(model, StubTokenizer(), text(), cfg, progress=False)


# the families with separate gate_proj / up_proj (QuantGatedMLP takes the two linears; Phi-3's fused gate_up_proj is
# reported unfusable: test_fused_gate_up_is_reported_unfusable)
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_fuse_mlps_on_a_quantized_model(arch):
    model = _w4a4(rotate=False, arch=arch)
    ids = torch.tensor([StubTokenizer().encode(text(200, seed=3))])
    with torch.no_grad():
        before = model(ids).logits
        assert pqk.fuse_mlps(model) == len(model.model.layers)
        assert all(isinstance(layer.mlp, QuantGatedMLP) for layer in model.model.layers)
        after = model(ids).logits
    assert torch.allclose(after, before, rtol=0, atol=0.05 * float(before.abs().max()))
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.9
    assert pqk.fuse_mlps(model) == 0  # already fused: nothing left to do


def test_fused_gate_up_is_reported_unfusable():
    model = _w4a4(rotate=False, arch="phi3")
    mlps = [layer.mlp for layer in model.model.layers]
    assert pqk.fuse_mlps(model) == 0
    assert [layer.mlp for layer in model.model.layers] == mlps
    with pytest.raises(ValueError, match=r"layer 0's MLP cannot be fused: phi3 has one fused mlp\.gate_up_proj"):
        pqk.fuse_mlps(model, strict=True)


def test_non_silu_activation_is_not_fused():
    model = _w4a4(rotate=False)
    model.config.hidden_act = "gelu"
    assert pqk.fuse_mlps(model) == 0
    with pytest.raises(ValueError, match="not SiLU"):
        pqk.fuse_mlps(model, strict=True)


@pytest.mark.parametrize("rotate,act_quant", [(True, "static"), (False, "dynamic")])
def test_unfusable_layers_are_left_alone(rotate, act_quant):
    model = _w4a4(rotate=rotate, act_quant=act_quant)
    mlps = [layer.mlp for layer in model.model.layers]
    assert pqk.fuse_mlps(model) == 0
    assert [layer.mlp for layer in model.model.layers] == mlps
    with pytest.raises(ValueError, match="layer 0's MLP cannot be fused"):
        pqk.fuse_mlps(model, strict=True)


def test_interleaved_weights_are_the_quant_linears(gen):
    gate, up, down = _linears(gen)
    mlp = QuantGatedMLP.from_quant_linears(gate, up, down)
    assert torch.equal(mlp.gate_up_weight[0::2], gate.weight) and torch.equal(mlp.gate_up_weight[1::2], up.weight)
    assert torch.equal(fmt.unpack_int4(mlp.down_weight), fmt.unpack_int4(down.weight))
