"""The format's definition (prefixquant_kernels/format.py) against hand-worked values, and every backend's
pack/unpack against it."""
import math

import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import format as fmt

from .conftest import BACKENDS, poison_heap, rand_int


def test_nibble_order_worked_example():
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    # byte 0: low nibble = 1, high nibble = -2 (0xE) -> 0xE1; byte 1: low 7, high -8 (0x8) -> 0x87
    assert fmt.pack_int4(q).tolist() == [[0xE1, 0x87]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2,), (1, 2), (3, 130), (5, 7, 64), (0, 8), (257, 34)])
def test_pack_unpack_roundtrip(backend, shape, gen):
    q = rand_int(shape, 4, gen)
    poison_heap(q.numel())
    p = pqk.pack_int4(q, backend=backend)
    assert p.dtype == torch.uint8 and p.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(p, fmt.pack_int4(q))
    poison_heap(q.numel())
    assert torch.equal(pqk.unpack_int4(p, backend=backend), q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_every_byte(backend):
    p = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    q = pqk.unpack_int4(p, backend=backend)
    want = [[((b & 15) ^ 8) - 8, ((b >> 4) ^ 8) - 8] for b in range(256)]
    assert q.reshape(256, 2).tolist() == want


def test_quantize_rounds_half_to_even_and_saturates():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 7.5, -8.5, 100.0, -100.0,
                      math.inf, -math.inf, math.nan])
    assert fmt.quantize(x, 1.0, 4).tolist() == [0, 2, 2, 0, -2, -2, 3, 7, -8, 7, -8, 7, -8, 0]
    assert fmt.quantize(x, 1.0, 8).tolist() == [0, 2, 2, 0, -2, -2, 3, 8, -8, 100, -100, 127, -128, 0]


def test_per_token_scale_ignores_non_finite_and_zero_rows():
    x = torch.tensor([[1.0, -14.0, math.nan], [math.inf, 3.5, 0.0], [0.0, 0.0, 0.0]])
    assert fmt.per_token_scale(x, 4).tolist() == [2.0, 0.5, 1.0]
