"""int4_matmul and quant_linear: every backend bit-exact with the reference (integer accumulation and the
fp32 epilogue), over odd shapes, the full integer range, static and per-token scales."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import prefixquant_kernels as pqk
from prefixquant_kernels import format as fmt

from ..conftest import BACKENDS, KERNEL_BACKENDS, poison_heap, rand_int

# (M, N, K): M = 1 (decode), odd M, M across several M-blocks; N and K not multiples of any tile
# M = 1 with K / 2 % 64 = 63 and 31 after whole 64-byte lines: the decode tile's tail of two chunks and of one
SHAPES = [(1, 1, 2), (1, 67, 64), (1, 13, 4222), (1, 7, 190), (3, 5, 66), (5, 33, 130), (17, 3, 4098), (130, 19, 190),
          (0, 8, 64), (301, 9, 512)]
BITS = [(4, 4), (8, 4), (4, 8), (8, 8)]  # (a_bits, w_bits)


def _operands(M, N, K, a_bits, w_bits, gen):
    a = rand_int((M, K), a_bits, gen)
    w = rand_int((N, K), w_bits, gen)
    return a, w, (fmt.pack_int4(a) if a_bits == 4 else a), (fmt.pack_int4(w) if w_bits == 4 else w)


def _exact(a, w):
    """int64 products summed exactly, independently of reference.py's float64 trick."""
    return (a.long().unsqueeze(1) * w.long().unsqueeze(0)).sum(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("a_bits,w_bits", BITS)
def test_int4_matmul_integer_part_exact(backend, M, N, K, a_bits, w_bits, gen):
    a, w, ap, wp = _operands(M, N, K, a_bits, w_bits, gen)
    poison_heap(M * N * 4)
    y = pqk.int4_matmul(ap, wp, 1.0, torch.ones(N), out_dtype=torch.float32, backend=backend)
    # |acc| <= K * 2^14 < 2^24 here, so float32 holds the integer exactly
    assert torch.equal(y, _exact(a, w).float())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("a_bits,w_bits", BITS)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_token", [False, True])
def test_int4_matmul_epilogue_bit_exact(backend, M, N, K, a_bits, w_bits, out_dtype, per_token, gen):
    a, w, ap, wp = _operands(M, N, K, a_bits, w_bits, gen)
    a_scale = (torch.rand(M, generator=gen) + 0.01) * 0.1 if per_token else 0.0173
    w_scale = (torch.rand(N, generator=gen) + 0.01) * 0.05
    bias = torch.randn(N, generator=gen).to(out_dtype)
    want = pqk.int4_matmul(ap, wp, a_scale, w_scale, bias, out_dtype, backend="reference")
    poison_heap(M * N * 4)
    got = pqk.int4_matmul(ap, wp, a_scale, w_scale, bias, out_dtype, backend=backend)
    assert got.dtype == out_dtype and got.shape == (M, N)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int4_matmul_leading_dims_and_scale_semantics(backend, gen):
    a, w, ap, wp = _operands(6, 4, 64, 4, 4, gen)
    a_scale = torch.rand(6, generator=gen) + 0.5
    w_scale = torch.rand(4, generator=gen) + 0.5
    bias = torch.randn(4, generator=gen)
    y = pqk.int4_matmul(ap.reshape(2, 3, 32), wp, a_scale.reshape(2, 3), w_scale, bias, torch.float32, backend=backend)
    want = _exact(a, w).double() * (a_scale.double()[:, None] * w_scale.double()[None, :]) + bias.double()
    assert y.shape == (2, 3, 4)
    torch.testing.assert_close(y.reshape(6, 4).double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("a_bits,w_bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [True, False])
def test_quant_linear_bit_exact(backend, M, N, K, a_bits, w_bits, dtype, static, gen):
    x = (torch.randn(M, K, generator=gen) * 3).to(dtype)
    x[:, :1] *= 50  # an outlier channel: static scales clip it, per-token scales stretch around it
    _, _, _, wp = _operands(1, N, K, 4, w_bits, gen)
    w_scale = torch.rand(N, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(N, generator=gen)
    a_scale = 0.21 if static else None
    want = pqk.quant_linear(x, wp, w_scale, a_scale, a_bits, bias, backend="reference")
    poison_heap(M * N * 4)
    got = pqk.quant_linear(x, wp, w_scale, a_scale, a_bits, bias, backend=backend)
    assert got.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("static", [True, False])
def test_quant_linear_equals_quantize_then_matmul(backend, static, gen):
    x = torch.randn(9, 3, 128, generator=gen).bfloat16()
    _, _, _, wp = _operands(1, 11, 128, 4, 4, gen)
    w_scale = torch.rand(11, generator=gen) + 0.1
    if static:
        a, s = pqk.quantize_static(x, 0.3, 4, backend=backend), 0.3
    else:
        a, s = pqk.quantize_per_token(x, 4, backend=backend)
    two_step = pqk.int4_matmul(a, wp, s, w_scale, out_dtype=torch.bfloat16, backend=backend)
    fused = pqk.quant_linear(x, wp, w_scale, 0.3 if static else None, 4, backend=backend)
    assert torch.equal(fused, two_step)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_noncontiguous_inputs_work(backend, gen):
    a, w, ap, wp = _operands(8, 6, 128, 4, 4, gen)
    x = torch.randn(128, 8, generator=gen).t()  # non-contiguous view
    ws = torch.rand(12, generator=gen)[::2] + 0.1  # strided scales
    got = pqk.quant_linear(x, wp, ws, 0.2, 4, backend=backend)
    want = pqk.quant_linear(x.contiguous(), wp, ws.contiguous(), 0.2, 4, backend="reference")
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_threads_do_not_change_results(backend, gen):
    x = torch.randn(70, 1024, generator=gen)
    _, _, _, wp = _operands(1, 300, 1024, 4, 4, gen)
    ws = torch.rand(300, generator=gen) + 0.1
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pqk.quant_linear(x, wp, ws, None, 4, backend=backend)
        torch.set_num_threads(2)
        two = pqk.quant_linear(x, wp, ws, None, 4, backend=backend)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, two)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 20), n=st.integers(1, 20), k2=st.integers(1, 100),
       a_bits=st.sampled_from([4, 8]), w_bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**31 - 1))
def test_int4_matmul_property(m, n, k2, a_bits, w_bits, seed):
    g = torch.Generator().manual_seed(seed)
    a, w, ap, wp = _operands(m, n, 2 * k2, a_bits, w_bits, g)
    for backend in KERNEL_BACKENDS:
        y = pqk.int4_matmul(ap, wp, 1.0, torch.ones(n), out_dtype=torch.float32, backend=backend)
        assert torch.equal(y, _exact(a, w).float())
