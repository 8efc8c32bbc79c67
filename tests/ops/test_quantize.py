"""quantize_static / quantize_per_token: every backend bit-exact with the reference."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import prefixquant_kernels as pqk
from prefixquant_kernels import format as fmt

from ..conftest import BACKENDS, KERNEL_BACKENDS, poison_heap

SHAPES = [(1, 2), (3, 66), (7, 130), (2, 5, 64), (0, 32), (33, 4096 + 2), (1, 1000)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _x(shape, dtype, gen, spread=4.0):
    # full range: |x / scale| reaches far past qmax, so clamping and both signs are exercised
    x = torch.randn(shape, generator=gen) * spread
    return x.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_static_matches_format(backend, shape, dtype, bits, gen):
    x = _x(shape, dtype, gen)
    scale = 0.37 if bits == 4 else 0.031
    poison_heap(x.numel())
    out = pqk.quantize_static(x, scale, bits, backend=backend)
    q = fmt.quantize(x, scale, bits)
    assert torch.equal(out, fmt.pack_int4(q) if bits == 4 else q)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_per_token_matches_format(backend, shape, dtype, bits, gen):
    x = _x(shape, dtype, gen)
    poison_heap(x.numel())
    out, s = pqk.quantize_per_token(x, bits, backend=backend)
    want_s = fmt.per_token_scale(x, bits).reshape(-1)
    assert s.dtype == torch.float32 and s.shape == (x.numel() // x.shape[-1],)
    assert torch.equal(s, want_s)
    q = fmt.quantize(x, want_s.reshape(*x.shape[:-1], 1), bits)
    assert torch.equal(out, fmt.pack_int4(q) if bits == 4 else q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_saturate(backend):
    x = torch.tensor([[math.nan, math.inf, -math.inf, 1.0, -100.0, 0.26, 0.25, 0.75]])
    q = pqk.unpack_int4(pqk.quantize_static(x, 0.5, 4, backend=backend))
    assert q.tolist() == [[0, 7, -8, 2, -8, 1, 0, 2]]
    q8, s = pqk.quantize_per_token(x, 8, backend=backend)
    assert torch.equal(s, torch.tensor([100.0]) / 127)
    assert q8[0, :3].tolist() == [0, 127, -128]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_threads_do_not_change_results(backend, gen):
    x = _x((64, 4096), torch.bfloat16, gen)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pqk.quantize_per_token(x, 4, backend=backend)
        torch.set_num_threads(2)
        two = pqk.quantize_per_token(x, 4, backend=backend)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 9), k2=st.integers(1, 150), bits=st.sampled_from([4, 8]),
       scale=st.floats(1e-3, 10.0), seed=st.integers(0, 2**31 - 1))
def test_quantize_static_property(m, k2, bits, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k2, generator=g) * 10
    want = pqk.quantize_static(x, scale, bits, backend="reference")
    for backend in KERNEL_BACKENDS:
        assert torch.equal(pqk.quantize_static(x, scale, bits, backend=backend), want)
