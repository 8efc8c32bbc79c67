"""int4_matmul_requant, int4_matmul_silu_mul_requant and quant_linear_silu_mul_requant (its float-input form: the
static quantize inside the op) (packed int4 out with the next layer's static scale): every
backend bit-exact with the reference, the reference against an independent float64 computation, the gate/up
interleave, bad input, opcheck and torch.compile. (The CUDA epilogues: tests/cuda.)"""
from __future__ import annotations

import math

import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import format as fmt
from prefixquant_kernels import reference

from ..conftest import BACKENDS, needs_kernels, poison_heap, rand_int

# (leading dims of A, N, K): odd M, K % 32 != 0, N a multiple of 4 (both ops), a 3-D activation
SHAPES = [((1,), 8, 32), ((3,), 36, 96), ((17,), 20, 62), ((2, 5), 12, 160), ((0,), 8, 64)]


def _problem(gen, lead, n, k, a_bits=4, w_bits=4, per_token=False, bias=True):
    m = math.prod(lead)
    a_q, w_q = rand_int((*lead, k), a_bits, gen), rand_int((n, k), w_bits, gen)
    a = fmt.pack_int4(a_q) if a_bits == 4 else a_q
    w = fmt.pack_int4(w_q) if w_bits == 4 else w_q
    a_s = torch.rand(lead, generator=gen) * 0.1 + 0.01 if per_token else torch.tensor(0.05)
    w_s = torch.rand(n, generator=gen) * 0.02 + 1e-3
    b = torch.randn(n, generator=gen) if bias else None
    return a, w, a_s, w_s, b, m


def _scale_for(values: torch.Tensor) -> float:
    """An out_scale that puts values across the whole int4 range, the largest ones clamped (max |v| / 9)."""
    amax = float(values.abs().max()) if values.numel() else 1.0
    return amax / 9 if amax > 0 else 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,n,k", SHAPES)
@pytest.mark.parametrize("per_token,bias", [(False, True), (True, False)])
@pytest.mark.parametrize("bits", [(4, 4), (8, 4), (4, 8)])
def test_backends_bit_exact(gen, backend, lead, n, k, per_token, bias, bits):
    a, w, a_s, w_s, b, m = _problem(gen, lead, n, k, *bits, per_token=per_token, bias=bias)
    a2 = a.reshape(m, a.shape[-1])
    y = reference.int4_matmul(a2, w, a_s.reshape(-1), w_s, b, torch.float32)
    saved = [t.clone() for t in (a, w, a_s, w_s) + ((b,) if b is not None else ())]
    s = _scale_for(y)
    poison_heap(m * n)
    q = pqk.int4_matmul_requant(a, w, a_s, w_s, s, b, backend=backend)
    assert q.dtype == torch.uint8 and q.shape == (*lead, n // 2)
    assert torch.equal(q.reshape(m, n // 2), reference.int4_matmul_requant(a2, w, a_s.reshape(-1), w_s, b, s))
    h_s = _scale_for(reference.silu_mul(y[:, 0::2], y[:, 1::2]))
    h = pqk.int4_matmul_silu_mul_requant(a, w, a_s, w_s, h_s, b, backend=backend)
    assert h.dtype == torch.uint8 and h.shape == (*lead, n // 4)
    assert torch.equal(h.reshape(m, n // 4), reference.int4_matmul_silu_mul_requant(a2, w, a_s.reshape(-1), w_s, b, h_s))
    for t, t0 in zip((a, w, a_s, w_s) + ((b,) if b is not None else ()), saved):
        assert torch.equal(t, t0)  # nothing the caller gave is modified


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quant_linear_silu_mul_requant_is_quantize_then_silu_mul_requant(gen, backend, lead, n, k, dtype):
    """The float-input op equals quantize_static + int4_matmul_silu_mul_requant bit for bit (every backend), on x
    spanning the int4 range and past it, with NaN / +-Inf among the values; x is not modified."""
    _, w, _, w_s, b, m = _problem(gen, lead, n, k)
    x = (torch.randn((*lead, k), generator=gen) * 0.4).to(dtype)
    if x.numel() > 3:
        x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
    a_s = torch.tensor(0.05)
    a = reference.quantize_static(x.reshape(m, k), a_s, 4)
    y = reference.int4_matmul(a, w, a_s, w_s, b, torch.float32)
    h_s = _scale_for(reference.silu_mul(y[:, 0::2], y[:, 1::2]).nan_to_num(0, 0, 0))
    saved = x.clone()
    poison_heap(m * n)
    h = pqk.quant_linear_silu_mul_requant(x, w, w_s, a_s, h_s, b, backend=backend)
    assert h.dtype == torch.uint8 and h.shape == (*lead, n // 4)
    assert torch.equal(h.reshape(m, n // 4), reference.int4_matmul_silu_mul_requant(a, w, a_s, w_s, b, h_s))
    assert torch.equal(x.nan_to_num(0), saved.nan_to_num(0)) and torch.equal(x.isnan(), saved.isnan())


def test_quant_linear_silu_mul_requant_bad_input(gen):
    _, w, _, w_s, b, _ = _problem(gen, (3,), 8, 64)
    x = torch.randn(3, 64, generator=gen)
    op = pqk.quant_linear_silu_mul_requant
    for bad, exc, msg in [(None, TypeError, "a_scale"), (0.0, ValueError, "a_scale"),
                          (float("nan"), ValueError, "a_scale"), (torch.tensor([0.1, 0.2]), ValueError, "a_scale")]:
        with pytest.raises(exc, match=msg):
            op(x, w, w_s, bad, 0.1, b)
    with pytest.raises(ValueError, match="out_scale"):
        op(x, w, w_s, 0.05, 0.0, b)
    with pytest.raises(TypeError, match="x must"):
        op(x.to(torch.uint8), w, w_s, 0.05, 0.1)
    with pytest.raises(TypeError, match="w_gate_up"):
        op(x, w.to(torch.int8), w_s, 0.05, 0.1)
    with pytest.raises(ValueError, match="multiple of 4"):
        op(x, w[:6], w_s[:6], 0.05, 0.1)
    with pytest.raises(ValueError, match="in_features"):
        op(x, w[:, :-16], w_s, 0.05, 0.1)
    with pytest.raises(ValueError, match="w_scale"):
        op(x, w, w_s[:4], 0.05, 0.1)


def test_reference_against_float64(gen):
    """The reference (fp32) against float64 math written out independently: the quantized levels may differ only where
    fp32 rounding moves a value across a rounding boundary — by at most one step, rarely."""
    m, n, k = 64, 96, 256
    a_q, w_q = rand_int((m, k), 4, gen), rand_int((n, k), 4, gen)
    a_s, w_s, b = 0.03, torch.rand(n, generator=gen) * 0.02 + 1e-3, torch.randn(n, generator=gen) * 0.1
    y64 = (a_q.double() @ w_q.double().T) * (a_s * w_s.double()) + b.double()
    s = float(y64.abs().max()) / 9
    want = torch.round(y64 / s).clamp(-8, 7)
    got = fmt.unpack_int4(pqk.int4_matmul_requant(fmt.pack_int4(a_q), fmt.pack_int4(w_q), a_s, w_s, s, b)).double()
    assert (got - want).abs().max() <= 1 and (got != want).float().mean() < 0.01
    assert (want == 7).any() and (want == -8).any()  # the clamp was exercised
    g64, u64 = y64[:, 0::2], y64[:, 1::2]
    h64 = g64 * torch.sigmoid(g64) * u64
    hs = float(h64.abs().max()) / 9
    want_h = torch.round(h64 / hs).clamp(-8, 7)
    got_h = fmt.unpack_int4(pqk.int4_matmul_silu_mul_requant(fmt.pack_int4(a_q), fmt.pack_int4(w_q), a_s, w_s, hs,
                                                             b)).double()
    assert (got_h - want_h).abs().max() <= 1 and (got_h != want_h).float().mean() < 0.01


def test_silu_mul_on_interleaved_gate_up_is_the_gated_mlp(gen):
    """interleave_rows(gate, up) fed to the fused op = quantize(silu(gate(x)) * up(x)) from two separate GEMMs."""
    m, i, k = 7, 24, 128
    a = fmt.pack_int4(rand_int((m, k), 4, gen))
    wg, wu = fmt.pack_int4(rand_int((i, k), 4, gen)), fmt.pack_int4(rand_int((i, k), 4, gen))
    sg, su = torch.rand(i, generator=gen) * 0.02 + 1e-3, torch.rand(i, generator=gen) * 0.02 + 1e-3
    g = pqk.int4_matmul(a, wg, 0.04, sg, None, torch.float32)
    u = pqk.int4_matmul(a, wu, 0.04, su, None, torch.float32)
    h = reference.silu_mul(g, u)
    s = _scale_for(h)
    want = pqk.quantize_static(h, s, 4)
    got = pqk.int4_matmul_silu_mul_requant(a, fmt.interleave_rows(wg, wu), 0.04, fmt.interleave_rows(sg, su), s)
    assert torch.equal(got, want)
    assert torch.equal(fmt.interleave_rows(torch.tensor([1, 2]), torch.tensor([3, 4])), torch.tensor([1, 3, 2, 4]))
    with pytest.raises(ValueError, match="same shape"):
        fmt.interleave_rows(wg, wu[:-1])


@pytest.mark.parametrize("op", [pqk.int4_matmul_requant, pqk.int4_matmul_silu_mul_requant])
def test_bad_input(gen, op):
    a, w, a_s, w_s, b, _ = _problem(gen, (3,), 8, 64)
    for bad, exc, msg in [(0.0, ValueError, "out_scale"), (-1.0, ValueError, "out_scale"),
                          (float("nan"), ValueError, "out_scale"), (float("inf"), ValueError, "out_scale"),
                          (True, TypeError, "out_scale"), ("0.1", TypeError, "out_scale"),
                          (torch.tensor([0.1, 0.2]), TypeError, "out_scale")]:
        with pytest.raises(exc, match=msg):
            op(a, w, a_s, w_s, bad, b)
    with pytest.raises(ValueError, match="multiple of"):
        op(a, w[:6 if op is pqk.int4_matmul_silu_mul_requant else 7], a_s, w_s[:6 if op is
           pqk.int4_matmul_silu_mul_requant else 7], 0.1)
    with pytest.raises(ValueError, match="in_features"):
        op(a, w[:, :-16], a_s, w_s, 0.1)
    with pytest.raises(ValueError, match="w_scale"):
        op(a, w, a_s, w_s[:4], 0.1)
    with pytest.raises(TypeError, match="a_packed"):
        op(a.float(), w, a_s, w_s, 0.1)
    assert op(a, w, a_s, w_s, torch.tensor(0.1), b).dtype == torch.uint8  # a 1-element CPU tensor is read once


@needs_kernels
def test_opcheck_and_compile(gen):
    a, w, a_s, w_s, b, _ = _problem(gen, (5,), 16, 128)
    for name in ("int4_matmul_requant", "int4_matmul_silu_mul_requant"):
        torch.library.opcheck(getattr(torch.ops.pqk, name).default, (a, w, torch.tensor(0.05), w_s, b, 0.2))
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    x = torch.randn(5, 128, generator=gen)
    torch.library.opcheck(torch.ops.pqk.quant_linear_silu_mul_requant.default, (x, w, w_s, torch.tensor(0.05), b, 0.2))
    fn = lambda x: pqk.int4_matmul_silu_mul_requant(x, w, 0.05, w_s, 0.2, b)  # noqa: E731
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    assert torch.equal(compiled(a), fn(a))
    assert any("pqk.int4_matmul_silu_mul_requant" in t for t in seen), seen
