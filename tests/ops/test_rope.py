"""pqk.ops.rope / pqk::rope (csrc/cpu/float_ops.cpp) against Hugging Face's apply_rotary_pos_emb (Llama's; Qwen2/3
and Mistral have the same) bit for bit, on every CPU table; and its place in a quantized model
(models/float_ops.py): the modeling module's function takes the op where it is exact and the model's outputs stay
the same bits."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import reference
from prefixquant_kernels.models import float_ops
from prefixquant_kernels.ops import rope

from ..conftest import needs_kernels

CPU_TABLES = [b for b in pqk.available_backends() if b.startswith("cpu:")]


def _hf():
    import transformers.models.llama.modeling_llama as ml
    f = ml.apply_rotary_pos_emb
    return getattr(f, "pqk_original", f)   # the model's own, even where a swap has installed the op


def _same(a, b):
    """Equal values, NaN where the other has NaN (a NaN's payload and sign are the conversion's, not the formula's)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def _inputs(B, H, T, D, cb, dtype, seed, transposed=True):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, T, H, D, generator=g) * 4).to(dtype)
    k = (torch.randn(B, T, H, D, generator=g) * 4).to(dtype)
    q.view(-1)[:: max(1, q.numel() // 7)] = 3e4 if dtype == torch.float16 else 1e30   # products that overflow
    q, k = (q.transpose(1, 2), k.transpose(1, 2)) if transposed else (q.permute(0, 2, 1, 3).contiguous(),
                                                                       k.permute(0, 2, 1, 3).contiguous())
    ang = torch.rand(cb, T, D, generator=g) * 50
    return q, k, ang.cos().to(dtype), ang.sin().to(dtype)


@needs_kernels
@pytest.mark.parametrize("backend", ["auto", *CPU_TABLES])
@pytest.mark.parametrize("B,H,T,D,cb", [(1, 9, 67, 64, 1), (2, 3, 7, 10, 2), (2, 2, 5, 130, 1), (1, 1, 1, 2, 1),
                                        (3, 4, 33, 128, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [True, False])
def test_matches_the_model_bit_for_bit(backend, B, H, T, D, cb, dtype, transposed):
    """q / k as the attention makes them (a transposed view of the projection) or contiguous; cos / sin per batch
    row or shared; D / 2 below, at and past a vector of 8 (the scalar tail). Products that overflow included.
    Planted: the AVX2 row's first product not rounded before the sum, 37 failures in this file; the scalar tail's
    sign of the rotated half flipped, 54; cos / sin read at batch row 0 for every row, 49."""
    q, k, cos, sin = _inputs(B, H, T, D, cb, dtype, B * 1000 + T + D)
    keep = [t.clone() for t in (q, k, cos, sin)]
    want_q, want_k = _hf()(q, k, cos, sin)
    got_q, got_k = rope(q, cos, sin, backend=backend), rope(k, cos, sin, backend=backend)
    assert got_q.dtype == dtype and got_q.shape == (B, H, T, D)
    assert _same(got_q, want_q) and _same(got_k, want_k)
    assert _same(reference.rope(q, cos, sin), want_q)
    assert all(torch.equal(a, b) for a, b in zip((q, k, cos, sin), keep))


@needs_kernels
def test_cpu_output_is_contiguous():
    q, _, cos, sin = _inputs(1, 4, 9, 16, 1, torch.bfloat16, 0)
    assert not q.is_contiguous() and rope(q, cos, sin).is_contiguous()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: rope(torch.randn(1, 2, 3, 5), torch.randn(1, 3, 5), torch.randn(1, 3, 5)), ValueError, "even"),
    (lambda: rope(torch.randn(2, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)), ValueError, "x must be 4-D"),
    (lambda: rope(torch.randn(1, 2, 3, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)), ValueError, "cos must be"),
    (lambda: rope(torch.randn(2, 2, 3, 8), torch.randn(3, 3, 8), torch.randn(3, 3, 8)), ValueError, "cos must be"),
    (lambda: rope(torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8), torch.randn(3, 8)), ValueError, "sin must be 3-D"),
    (lambda: rope(torch.randn(2, 2, 3, 8), torch.randn(2, 3, 8), torch.randn(1, 3, 8)), ValueError, "one shape"),
    (lambda: rope(torch.randn(1, 2, 3, 8).int(), torch.randn(1, 3, 8), torch.randn(1, 3, 8)), TypeError, "x"),
    (lambda: rope(torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8), None), TypeError, "sin"),
    (lambda: rope(torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8), backend="cuda"), ValueError,
     "cuda"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_other_dtypes_of_cos_take_the_models_formula():
    """cos / sin of another dtype than x: the model's formula promotes (fp32 out of bf16 x), and so does the op."""
    q, _, cos, sin = _inputs(1, 2, 5, 8, 1, torch.bfloat16, 3)
    got = rope(q, cos.float(), sin.float())
    want, _ = _hf()(q, q, cos.float(), sin.float())
    assert got.dtype == torch.float32 and torch.equal(got, want)


@needs_kernels
def test_the_op_checks_its_own_arguments():
    op = torch.ops.pqk.rope
    x, c = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match="cos and sin must have x's dtype"):
        op(x, c.bfloat16(), c.bfloat16())
    with pytest.raises(RuntimeError, match="D even"):
        op(torch.randn(1, 2, 3, 7), torch.randn(1, 3, 7), torch.randn(1, 3, 7))
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        op(x, torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        op(x.double(), c.double(), c.double())
    q, _, cos, sin = _inputs(2, 3, 5, 16, 2, torch.bfloat16, 1)
    torch.library.opcheck(torch.ops.pqk.rope.default, (q, cos, sin))


@needs_kernels
def test_the_model_function_takes_the_op_where_it_is_exact(monkeypatch):
    """After use_cpp_rope the modeling module's apply_rotary_pos_emb calls the op on CPU inputs of one dtype with
    nothing to differentiate, and the original otherwise (a backward needed, cos of another dtype, unsqueeze_dim 2):
    the same values either way. Installed once per module."""
    import transformers.models.llama.modeling_llama as ml

    original = _hf()
    monkeypatch.setattr(ml, "apply_rotary_pos_emb", original)

    class Holder(torch.nn.Module):
        pass
    Holder.__module__ = ml.__name__
    assert float_ops.use_cpp_rope(Holder()) and not float_ops.use_cpp_rope(Holder())   # idempotent
    ours = ml.apply_rotary_pos_emb
    assert ours.pqk_original is original
    calls = []
    real = torch.ops.pqk.rope
    monkeypatch.setattr(torch.ops.pqk, "rope", lambda *a: calls.append(1) or real(*a))
    q, k, cos, sin = _inputs(2, 3, 6, 32, 2, torch.bfloat16, 5)
    with torch.no_grad():
        got = ours(q, k, cos, sin)
    assert calls == [1, 1] and all(_same(a, b) for a, b in zip(got, original(q, k, cos, sin)))
    qg = q.float().requires_grad_()
    got = ours(qg, k.float(), cos.float(), sin.float())
    assert calls == [1, 1] and got[0].grad_fn is not None                 # autograd: the model's own ops
    got = ours(q, k, cos.float(), sin.float())
    assert calls == [1, 1] and got[0].dtype == torch.float32
    q2, k2 = q.transpose(1, 2), k.transpose(1, 2)                        # [B, T, H, D] with unsqueeze_dim=2
    got = ours(q2, k2, cos, sin, unsqueeze_dim=2)
    assert calls == [1, 1] and all(_same(a, b) for a, b in zip(got, original(q2, k2, cos, sin, unsqueeze_dim=2)))


@needs_kernels
def test_quantized_model_runs_the_op_with_the_same_outputs(monkeypatch):
    """A quantized Llama's prefill with the op installed (swap) gives the logits of the model's own rotary
    embedding, bit for bit."""
    import transformers.models.llama.modeling_llama as ml

    from ..models.test_fused_decode import _quantized
    model = _quantized("llama", "sdpa", 4, True)
    assert hasattr(ml.apply_rotary_pos_emb, "pqk_original")
    ids = torch.randint(3, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
        monkeypatch.setattr(ml, "apply_rotary_pos_emb", ml.apply_rotary_pos_emb.pqk_original)
        theirs = model(ids).logits
    assert torch.equal(ours, theirs)
