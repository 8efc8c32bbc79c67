"""pqk.ops.rms_norm / pqk::rms_norm (csrc/cpu/float_ops.cpp) against Hugging Face's RMSNorm op for op
(reference.rms_norm: the module's own formula), on every CPU table; and its place in a quantized model
(models/float_ops.py): every norm of the family runs it, the model's outputs stay the module's."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import _extension, reference
from prefixquant_kernels.models import float_ops
from prefixquant_kernels.ops import rms_norm

from ..conftest import needs_kernels

CPU_TABLES = [b for b in pqk.available_backends() if b.startswith("cpu:")]
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _hf_norm(n, dtype, eps):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    m = LlamaRMSNorm(n, eps)
    with torch.no_grad():
        m.weight.copy_(torch.randn(n))
    return m.to(dtype)


@needs_kernels
@pytest.mark.parametrize("backend", ["auto", *CPU_TABLES])
@pytest.mark.parametrize("shape", [(513, 576), (3, 5, 37), (2, 1), (4, 4099)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_the_module(backend, shape, dtype):
    """Equal to the module's formula bit for bit except where the variance's last bit differs (the op sums in
    double): then by an ulp of a 16-bit type in a few elements, or a few ulp of fp32 (the variance's ulp goes
    through rsqrt and two products). The inputs are left untouched."""
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    x.view(-1)[min(5, x.numel() - 1)] = 200.0         # an outlier row: the rest of it shrinks towards 0
    w = torch.randn(shape[-1], generator=g).to(dtype)
    keep_x, keep_w = x.clone(), w.clone()
    got = rms_norm(x, w, 1e-5, backend=backend)
    want = reference.rms_norm(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    diff = (got.float() - want.float()).abs()
    ulps = 4 if dtype == torch.float32 else 2
    assert bool((diff <= ulps * ULP[dtype] * want.float().abs() + 1e-30).all())
    assert (got != want).float().mean() < (0.3 if dtype == torch.float32 else 1e-3)
    assert torch.equal(x, keep_x) and torch.equal(w, keep_w)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_and_inf_stay_in_their_rows(dtype):
    x = torch.randn(4, 100).to(dtype)
    x[1, 7], x[2, 3] = float("nan"), float("inf")
    w = torch.rand(100).to(dtype) + 0.5
    for backend in CPU_TABLES:
        got, want = rms_norm(x, w, 1e-6, backend=backend), reference.rms_norm(x, w, 1e-6)
        assert torch.equal(got.isnan(), want.isnan()) and bool(got[1].isnan().all()), backend
        torch.testing.assert_close(got[[0, 3]].float(), want[[0, 3]].float(), rtol=4 * ULP[dtype], atol=0)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: rms_norm(torch.randn(2, 64), torch.ones(32)), ValueError, "weight must have shape"),
    (lambda: rms_norm(torch.randn(2, 64), torch.ones(64), eps=-1.0), ValueError, "eps"),
    (lambda: rms_norm(torch.randn(2, 64), torch.ones(64), eps=float("inf")), ValueError, "eps"),
    (lambda: rms_norm(torch.randn(2, 64).int(), torch.ones(64)), TypeError, "x"),
    (lambda: rms_norm(torch.randn(2, 0), torch.ones(0)), ValueError, "x"),
    (lambda: rms_norm(torch.randn(2, 64), torch.ones(64), backend="gpu"), ValueError, "backend"),
    (lambda: rms_norm(torch.randn(2, 64), torch.ones(64), backend="cuda"), ValueError, "cuda"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@needs_kernels
def test_the_op_checks_its_own_arguments():
    op = torch.ops.pqk.rms_norm
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        op(torch.randn(2, 8), torch.ones(8).bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match=r"weight must be \[8\]"):
        op(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="eps must be finite"):
        op(torch.randn(2, 8), torch.ones(8), float("nan"))
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        op(torch.randn(2, 8).double(), torch.ones(8).double(), 1e-6)
    torch.library.opcheck(op.default, (torch.randn(3, 40).bfloat16(), torch.rand(40).bfloat16(), 1e-6))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_module_runs_the_op_where_it_can(dtype, monkeypatch):
    """An installed norm calls the op on CPU input of its weight's dtype with nothing to differentiate, and its own
    forward otherwise (a weight of another dtype, a backward needed): the same values either way."""
    m = _hf_norm(96, dtype, 1e-6)
    calls = []
    real = torch.ops.pqk.rms_norm
    monkeypatch.setattr(torch.ops.pqk, "rms_norm", lambda *a: calls.append(1) or real(*a))
    holder = torch.nn.Sequential(m)
    assert float_ops.use_cpp_norms(holder) == 1 and float_ops.use_cpp_norms(holder) == 0   # idempotent
    x = torch.randn(5, 96).to(dtype)
    with torch.no_grad():
        got = m(x)
    assert calls == [1]
    want = type(m).forward(m, x)
    torch.testing.assert_close(got.float(), want.float(), rtol=4 * ULP[dtype], atol=0)
    xg = x.clone().requires_grad_()
    y = m(xg)                                          # autograd needs the module's own ops
    assert calls == [1] and y.grad_fn is not None
    y.float().sum().backward()
    assert xg.grad is not None


@needs_kernels
def test_quantized_model_norms_run_the_op():
    from ..models.test_fused_decode import _quantized
    model = _quantized("qwen3", "sdpa", 4, True)
    norms = [m for m in model.modules() if type(m).__name__ in float_ops.NORMS]
    assert norms and all("forward" in vars(m) for m in norms)   # layers' norms, q / k norms, the final norm
    assert _extension.cpu_available()
