"""QuantLinear: built from nn.Linear, computes with its own quantized weight exactly as the op layer
defines, keeps bias and dtype, and approximates the float layer as well as its bit widths allow."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import format as fmt
from prefixquant_kernels.nn import QuantLinear

from ..conftest import BACKENDS


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.detach().double(), approx.detach().double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (4, 8), (8, 8), (8, 4)])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_equals_reference_from_same_quantized_values(backend, w_bits, a_bits, static, dtype, gen):
    lin = torch.nn.Linear(130, 37, bias=True)
    x = torch.randn(2, 5, 130, generator=gen).to(dtype)
    act_scale = float(x.float().abs().max()) / fmt.qmax(a_bits) if static else None
    mod = QuantLinear.from_float(lin, w_bits, a_bits, act_scale=act_scale, backend=backend)
    y = mod(x)
    assert y.dtype == dtype and y.shape == (2, 5, 37)
    # reference built from the module's own quantized weight (so only the kernel is measured)
    s = torch.tensor(act_scale) if static else fmt.per_token_scale(x, a_bits).unsqueeze(-1)
    xq = fmt.quantize(x, s, a_bits).double()
    wq = (fmt.unpack_int4(mod.weight) if w_bits == 4 else mod.weight).double()
    want = (xq @ wq.T) * s.double() * mod.w_scale.double() + lin.bias.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-3)


@pytest.mark.parametrize("w_bits,a_bits,min_db", [(8, 8, 30.0), (4, 8, 15.0), (4, 4, 10.0)])
def test_accuracy_against_float_layer(w_bits, a_bits, min_db, gen):
    lin = torch.nn.Linear(1024, 256, bias=False)
    x = torch.randn(64, 1024, generator=gen)
    mod = QuantLinear.from_float(lin, w_bits, a_bits, act_scale=None)
    assert _sqnr_db(lin(x), mod(x)) > min_db


def test_bias_none_and_buffers(gen):
    lin = torch.nn.Linear(64, 8, bias=False)
    mod = QuantLinear.from_float(lin, 4, 4, act_scale=0.1)
    assert mod.bias is None and mod.weight.dtype == torch.uint8 and mod.weight.shape == (8, 32)
    assert set(dict(mod.named_buffers())) == {"weight", "w_scale", "act_scale"}
    assert "static" in repr(mod)
    dyn = QuantLinear.from_float(lin, 8, 4, act_scale=None)
    assert dyn.act_scale is None and dyn.weight.dtype == torch.int8 and "dynamic" in repr(dyn)


def test_zero_weight_row_gets_unit_scale():
    lin = torch.nn.Linear(64, 3, bias=False)
    with torch.no_grad():
        lin.weight[1] = 0
    mod = QuantLinear.from_float(lin, 4, 8, act_scale=0.1)
    assert mod.w_scale[1] == 1.0
    assert torch.all(mod(torch.randn(4, 64))[:, 1] == 0)


def test_state_dict_roundtrip(gen):
    lin = torch.nn.Linear(128, 16, bias=True)
    mod = QuantLinear.from_float(lin, 4, 4, act_scale=0.07)
    fresh = QuantLinear(128, 16, w_bits=4, a_bits=4, bias=True, static=True)
    fresh.load_state_dict(mod.state_dict())
    x = torch.randn(3, 128, generator=gen)
    assert torch.equal(fresh(x), mod(x))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: QuantLinear.from_float(torch.nn.Linear(64, 4), 3, 4, 0.1), ValueError, "w_bits must be one of"),
    (lambda: QuantLinear.from_float(torch.nn.Linear(64, 4), 4, 16, 0.1), ValueError, "a_bits must be one of"),
    (lambda: QuantLinear.from_float(torch.nn.Linear(63, 4), 4, 4, 0.1), ValueError, "in_features must be even"),
    (lambda: QuantLinear.from_float(torch.nn.Linear(64, 4), 4, 4, 0.0), ValueError, "act_scale must be finite"),
    (lambda: QuantLinear.from_float(torch.nn.Conv1d(4, 4, 1), 4, 4, 0.1), TypeError, "must be a torch.nn.Linear"),
    (lambda: QuantLinear.from_float(torch.nn.Linear(64, 4), 4, 4, 0.1, backend="tpu"), ValueError, "backend must be"),
    (lambda: QuantLinear.from_float(torch.nn.Linear(64, 4), 4, 4, 0.1)(torch.randn(2, 62)), ValueError, "last dim must be in_features=64"),
    (lambda: QuantLinear.from_float(torch.nn.Linear(64, 4), 4, 4, 0.1)(torch.ones(2, 64, dtype=torch.long)), TypeError, "x must have dtype"),
    (lambda: QuantLinear.from_float(torch.nn.Linear(0, 4), 4, 4, 0.1), ValueError, "in_features must be >= 1, got 0"),
    (lambda: QuantLinear("64", 4), TypeError, "in_features must be an int, got str"),
    (lambda: QuantLinear(64, -2), ValueError, "out_features must be >= 0, got -2"),
    (lambda: QuantLinear(64, 4.0), TypeError, "out_features must be an int, got float"),
    (lambda: QuantLinear(131072, 4, w_bits=8, a_bits=8), ValueError, "K = 131072 is too long .* at most 131071"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_from_float_does_not_touch_the_linear(gen):
    lin = torch.nn.Linear(64, 8)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    QuantLinear.from_float(lin, 4, 4, act_scale=0.1)
    assert torch.equal(lin.weight, w) and torch.equal(lin.bias, b)


def test_load_state_dict_with_bad_scale_is_rejected():
    mod = QuantLinear.from_float(torch.nn.Linear(64, 4), 4, 4, act_scale=0.1)
    sd = mod.state_dict()
    sd["w_scale"] = torch.tensor([1.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="w_scale must be finite and > 0"):
        QuantLinear(64, 4, w_bits=4, a_bits=4).load_state_dict(sd)
    sd = mod.state_dict()
    sd["act_scale"] = torch.tensor(float("nan"))
    with pytest.raises(ValueError, match="act_scale must be finite and > 0"):
        QuantLinear(64, 4, w_bits=4, a_bits=4).load_state_dict(sd)


def test_failed_load_leaves_the_module_as_it_was():
    """The incoming scales are checked before any is copied in: a rejected state_dict changes nothing."""
    mod = QuantLinear.from_float(torch.nn.Linear(64, 4, bias=True), 4, 4, act_scale=0.1)
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    bad = {**mod.state_dict(), "weight": torch.ones_like(mod.weight), "w_scale": torch.zeros(4),
           "act_scale": torch.tensor(-1.0), "bias": torch.ones(4)}
    with pytest.raises(ValueError, match="w_scale must be finite and > 0"):
        mod.load_state_dict(bad)
    after = mod.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.double(),
                                  lambda m: m.to(torch.float16), lambda m: m.to("cpu", torch.bfloat16)])
def test_a_dtype_cast_keeps_the_scales_in_fp32(cast, gen):
    """model.half() after quantizing: the scale and bias buffers stay float32 with their values (cast to fp16 a
    scale of 1e-6 would lose bits and one of 1e-8 become 0) and the module still runs, as it did before the cast."""
    mod = QuantLinear.from_float(torch.nn.Linear(64, 8, bias=True), 4, 4, act_scale=1e-8)
    x = torch.randn(3, 64, generator=gen).half() * 1e-7
    want = mod(x)
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    cast(mod)
    for name in ("w_scale", "act_scale", "bias"):
        assert getattr(mod, name).dtype == torch.float32 and torch.equal(getattr(mod, name), before[name]), name
    assert torch.equal(mod(x), want)
