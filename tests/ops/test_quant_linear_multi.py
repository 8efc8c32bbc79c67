"""pqk::quant_linear_multi (one x, n weights; what the compiled step's graph pass calls for q|k|v and gate|up):
each output equals pqk::quant_linear of its weight bit for bit, on every CPU code path, at decode (M = 1: the
fused path, one parallel region) and beyond (one GEMM per weight); equal and distinct static scales, per token,
biases, float dtypes; bad lists raise naming the argument."""
import pytest
import torch

import prefixquant_kernels as pqk  # noqa: F401 (registers the ops)
from prefixquant_kernels.ops.backend import resolve

from ..conftest import KERNEL_BACKENDS, needs_kernels, poison_heap

ISAS = sorted({resolve(b, torch.device("cpu"), "quant_linear").cpu_isa for b in KERNEL_BACKENDS})


def _weights(ns, k, w_bits, gen):
    if w_bits == 4:
        ws = [torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen) for n in ns]
    else:
        ws = [torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen) for n in ns]
    scales = [(torch.rand(n, generator=gen) + 0.01) * 0.05 for n in ns]
    return ws, scales


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 3, 70])
@pytest.mark.parametrize("ns,k", [((576, 192, 192), 576), ((7, 33), 130), ((1, 5, 64, 3), 66), ((48,), 2)])
@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (4, 8), (8, 8)])
@pytest.mark.parametrize("scales", ["shared", "distinct", "per_token", "mixed"])
def test_multi_equals_one_op_per_weight(isa, m, ns, k, w_bits, a_bits, scales, gen):
    x = torch.randn(m, k, generator=gen) * 3
    ws, w_scales = _weights(ns, k, w_bits, gen)
    shared = torch.tensor(0.0371)
    a_scale = {"shared": [shared] * len(ns),
               "distinct": [torch.tensor(0.02 + 0.01 * i) for i in range(len(ns))],
               "per_token": [None] * len(ns),
               "mixed": [None if i % 2 else shared.clone() for i in range(len(ns))]}[scales]
    bias = [torch.randn(n, generator=gen) if i % 2 == 0 else None for i, n in enumerate(ns)]
    want = [torch.ops.pqk.quant_linear(x, w, s, a, a_bits, b, isa) for w, s, a, b in zip(ws, w_scales, a_scale, bias)]
    poison_heap(m * max(ns) * 4)
    got = torch.ops.pqk.quant_linear_multi(x, ws, w_scales, a_scale, a_bits, bias, isa)
    assert len(got) == len(ns)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multi_half_inputs(dtype, gen):
    x = torch.randn(1, 64, generator=gen).to(dtype)
    ws, w_scales = _weights((10, 6), 64, 4, gen)
    a = [torch.tensor(0.05)] * 2
    got = torch.ops.pqk.quant_linear_multi(x, ws, w_scales, a, 4, [None, None])
    for g, w, s in zip(got, ws, w_scales):
        assert g.dtype == dtype
        assert torch.equal(g, torch.ops.pqk.quant_linear(x, w, s, a[0], 4, None))


@needs_kernels
def test_multi_bad_input_names_the_argument(gen):
    x = torch.randn(1, 64, generator=gen)
    ws, w_scales = _weights((8, 8), 64, 4, gen)
    a = [torch.tensor(0.05)] * 2
    with pytest.raises(RuntimeError, match="at least one weight"):
        torch.ops.pqk.quant_linear_multi(x, [], [], [], 4, [])
    with pytest.raises(RuntimeError, match="lists of one length"):
        torch.ops.pqk.quant_linear_multi(x, ws, w_scales[:1], a, 4, [None, None])
    with pytest.raises(RuntimeError, match="one dtype"):
        w8 = torch.zeros(8, 64, dtype=torch.int8)
        torch.ops.pqk.quant_linear_multi(x, [ws[0], w8], w_scales, a, 4, [None, None])
    with pytest.raises(RuntimeError, match="does not match A's K"):
        torch.ops.pqk.quant_linear_multi(x, [ws[0], ws[1][:, :16].contiguous()], w_scales, a, 4, [None, None])
    with pytest.raises(RuntimeError, match="w_scale must be"):
        torch.ops.pqk.quant_linear_multi(x, ws, [w_scales[0], w_scales[1][:3]], a, 4, [None, None])
    with pytest.raises(RuntimeError, match="a_bits"):
        torch.ops.pqk.quant_linear_multi(x, ws, w_scales, a, 5, [None, None])


def test_multi_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(3, 64)
        ws = [torch.empty(5, 32, dtype=torch.uint8), torch.empty(7, 32, dtype=torch.uint8)]
        out = torch.ops.pqk.quant_linear_multi(x, ws, [torch.empty(5), torch.empty(7)], [None, None], 4,
                                               [None, None])
    assert [tuple(o.shape) for o in out] == [(3, 5), (3, 7)] and all(o.dtype == torch.float32 for o in out)
