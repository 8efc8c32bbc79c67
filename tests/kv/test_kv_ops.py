"""kv_quantize / kv_quantize_groupwise / kv_dequant_concat: every backend against the reference.

Integer outputs (packed bodies) must be bit-exact; float outputs within one rounding of the output dtype.
Odd token counts (not a multiple of any block), P in {0, 1, 3, 4}, D in {64, 128}, shared prefixes."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import kv_format as kvf

from .conftest import KV_BACKENDS, assert_within_rounding, rand_kv

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _noncontig(x: torch.Tensor) -> torch.Tensor:
    """The same values as a strided view (tokens and heads swapped in memory)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("backend", KV_BACKENDS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_kv_quantize_static_bit_exact(backend, d, dtype, bits, gen):
    x = rand_kv((2, 3, 13, d), dtype, gen)
    x[1, 2, 5, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
    scale = torch.rand(3, generator=gen) * 0.5 + 0.05
    out = pqk.kv_quantize(_noncontig(x), scale, bits, backend=backend)
    assert torch.equal(out, kvf.quantize_static(x, scale, bits))


@pytest.mark.parametrize("backend", KV_BACKENDS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("axis,group,t", [("token", 32, 13), ("token", 16, 5), ("channel", 4, 12),
                                          ("channel", 8, 24)])
def test_kv_quantize_groupwise_bit_exact(backend, d, dtype, bits, axis, group, t, gen):
    x = rand_kv((2, 2, t, d), dtype, gen)
    got = pqk.kv_quantize_groupwise(_noncontig(x), bits, group, axis, backend=backend)
    want = kvf.quantize_groupwise(x, bits, group, axis)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("backend", KV_BACKENDS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("p", [0, 1, 3, 4])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_kv_dequant_concat_static(backend, d, p, out_dtype, gen):
    b, h, t = 2, 2, 11
    x = rand_kv((b, h, t, d), torch.float16, gen)
    scale = torch.rand(h, generator=gen) + 0.1
    packed = pqk.kv_quantize(x, scale, 4, backend="reference")
    prefix = rand_kv((1, h, p, d), out_dtype, gen) if p else None   # batch 1: shared, expanded
    out = pqk.kv_dequant_concat(prefix, packed, scale, 4, out_dtype, backend=backend)
    ref = kvf.dequant_concat(prefix, kvf.dequantize_static(packed, scale, 4), None, None, None, out_dtype)
    assert out.shape == (b, h, p + t, d)
    assert_within_rounding(out, ref)
    if p:
        assert torch.equal(out[:, :, :p], prefix.expand(b, -1, -1, -1))


@pytest.mark.parametrize("backend", KV_BACKENDS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("p", [0, 1, 3, 4])
def test_kv_dequant_concat_int8_and_batched_prefix(backend, d, p, gen):
    b, h, t = 2, 3, 7
    x = rand_kv((b, h, t, d), torch.bfloat16, gen)
    scale = torch.rand(h, generator=gen) + 0.1
    packed = pqk.kv_quantize(x, scale, 8, backend="reference")
    prefix = rand_kv((b, h, p, d), torch.float16, gen)  # a per-sequence prefix (batch B)
    tail = rand_kv((b, h, 3, d), torch.float16, gen)
    out = pqk.kv_dequant_concat(prefix, packed, scale, 8, torch.float32, tail=tail, backend=backend)
    ref = kvf.dequant_concat(prefix, kvf.dequantize_static(packed, scale, 8), tail, None, None, torch.float32)
    assert_within_rounding(out, ref)


@pytest.mark.parametrize("backend", KV_BACKENDS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("p", [0, 1, 3, 4])
@pytest.mark.parametrize("axis,group", [("token", 32), ("channel", 4)])
@pytest.mark.parametrize("positions", [False, True])
def test_kv_dequant_concat_groupwise(backend, d, p, axis, group, positions, gen):
    b, h, nq, nt = 2, 2, 12, 5
    x = rand_kv((b, h, nq, d), torch.float16, gen)
    packed, scale, zero = kvf.quantize_groupwise(x, 2, group, axis)
    prefix = rand_kv((1, h, p, d), torch.float16, gen)
    tail = rand_kv((b, h, nt, d), torch.float16, gen)
    if positions:  # LogQuant: the 16-bit tokens sit at scattered positions among the quantized ones
        perm = torch.randperm(nq + nt, generator=gen)
        tail_pos = perm[:nt].sort().values
        body_pos = kvf.body_positions(nq, tail_pos)
    else:
        tail_pos = body_pos = None
    out = pqk.kv_dequant_concat(prefix, packed, scale, 2, torch.float16, zero=zero, group_size=group, axis=axis,
                                tail=tail, body_pos=body_pos, tail_pos=tail_pos, backend=backend)
    body = kvf.dequantize_groupwise(packed, scale, zero, 2, group, axis)
    ref = kvf.dequant_concat(prefix, body, tail, body_pos, tail_pos, torch.float16)
    assert out.shape == (b, h, p + nq + nt, d)
    assert_within_rounding(out, ref)


@pytest.mark.parametrize("backend", KV_BACKENDS)
def test_empty_body_and_tail_only(backend, gen):
    packed = torch.zeros(2, 2, 0, 32, dtype=torch.uint8)
    prefix = rand_kv((1, 2, 3, 64), torch.float16, gen)
    tail = rand_kv((2, 2, 4, 64), torch.float16, gen)
    out = pqk.kv_dequant_concat(prefix, packed, torch.ones(2), 4, tail=tail, backend=backend)
    assert torch.equal(out, torch.cat([prefix.expand(2, -1, -1, -1), tail], dim=2))
    assert pqk.kv_quantize(torch.zeros(2, 2, 0, 64), torch.ones(2), backend=backend).shape == (2, 2, 0, 32)


@pytest.mark.parametrize("backend", KV_BACKENDS)
def test_inputs_are_not_modified(backend, gen):
    x = rand_kv((1, 2, 5, 64), torch.float16, gen)
    scale = torch.rand(2, generator=gen) + 0.1
    prefix = rand_kv((1, 2, 2, 64), torch.float16, gen)
    saved = [t.clone() for t in (x, scale, prefix)]
    packed = pqk.kv_quantize(x, scale, backend=backend)
    pk = packed.clone()
    pqk.kv_dequant_concat(prefix, packed, scale, backend=backend)
    g = pqk.kv_quantize_groupwise(x, 2, 32, "token", backend=backend)
    gc = [t.clone() for t in g]
    pqk.kv_dequant_concat(None, g[0], g[1], 2, zero=g[2], group_size=32, axis="token", backend=backend)
    for a, b in zip([x, scale, prefix, packed, *g], [*saved, pk, *gc]):
        assert torch.equal(a, b)
