"""The C++ CPU kernels of the static cache (PrefixQuant's layout): kv_dequant_concat (static bodies) and
kv_quantize, bit-exact with the reference for every instruction set, prefix batch 1 or B, P in {0, 1, 3, 4},
D in {64, 128} and odd sizes, all input dtypes, strided inputs, NaN/Inf and saturating values."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import _extension
from prefixquant_kernels.ops.backend import CPU_ISAS, available_backends

from .conftest import rand_kv

pytestmark = pytest.mark.skipif(not _extension.cpu_available(), reason="C++ extension not built")
ISAS = [CPU_ISAS[b] for b in available_backends() if b.startswith("cpu:")]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("P", [0, 1, 3, 4])
@pytest.mark.parametrize("D", [64, 128, 6, 34])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_kernel_bit_exact(isa, P, D, bits, out_dtype, gen):
    B, H, T = 2, 3, 37
    x = rand_kv((B, H, T, D), torch.float32, gen)
    scale = torch.rand(H, generator=gen) * 0.5 + 0.05
    packed = pqk.kv_quantize(x, scale, bits, backend="reference")
    prefix = rand_kv((1 if P % 2 else B, H, P, D), torch.bfloat16, gen)
    want = pqk.kv_dequant_concat(prefix, packed, scale, bits, out_dtype, backend="reference")
    got = torch.ops.pqk.kv_dequant_static(prefix, packed, scale, bits, out_dtype, isa)
    assert torch.equal(got, want)


def test_auto_uses_the_kernel_and_falls_back_where_it_does_not_apply(gen, monkeypatch):
    x = rand_kv((1, 2, 9, 64), torch.float32, gen)
    s = torch.rand(2, generator=gen) + 0.1
    packed = pqk.kv_quantize(x, s, 4, backend="reference")
    calls = []
    real = torch.ops.pqk.kv_dequant_static
    monkeypatch.setattr(torch.ops.pqk, "kv_dequant_static", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = pqk.kv_dequant_concat(None, packed, s, 4, torch.float16)
    assert calls and torch.equal(out, pqk.kv_dequant_concat(None, packed, s, 4, torch.float16, backend="reference"))
    tail = torch.randn(1, 2, 3, 64).half()
    with pytest.raises(NotImplementedError, match="static bodies without a tail"):
        pqk.kv_dequant_concat(None, packed, s, 4, torch.float16, tail=tail, backend="cpu")
    with pytest.raises(ValueError, match="C\\+\\+ kernels for kv_quantize, kv_dequant_concat, kv_decode_attention, "
                                         "kv_write_paged and kv_decode_paged"):
        pqk.kv_quantize_groupwise(x, 2, 32, "token", backend="cpu")


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (2, 2, 5, 32), dtype=torch.uint8, generator=g)
    torch.library.opcheck(torch.ops.pqk.kv_dequant_static.default,
                          (torch.randn(1, 2, 3, 64).half(), packed, torch.rand(2) + 0.1, 4, torch.float16))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("D,bits", [(128, 4), (64, 4), (6, 4), (34, 4), (128, 8), (34, 8), (3, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_quantize_bit_exact(isa, D, bits, dtype, gen):
    x = rand_kv((2, 3, 19, D), torch.float32, gen)
    x[0, 1, 2, 0], x[1, 2, 3, -1], x[0, 0, 0, 1 % D] = float("nan"), float("inf"), -float("inf")
    x = x.to(dtype)
    scale = torch.rand(3, generator=gen) * 0.5 + 0.05
    want = pqk.kv_quantize(x, scale, bits, backend="reference")
    got = torch.ops.pqk.kv_quantize_static(x, scale, bits, isa)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_cpu_quantize_public_op_strided_input_not_mutated(gen):
    base = rand_kv((1, 5, 4, 64), torch.bfloat16, gen)
    x = base.transpose(1, 2)                      # [1, 4, 5, 64], not contiguous (as HF's key states are)
    keep = x.clone()
    s = torch.rand(4, generator=gen) + 0.1
    got = pqk.kv_quantize(x, s, 4, backend="cpu")
    assert torch.equal(got, pqk.kv_quantize(x, s, 4, backend="reference")) and torch.equal(x, keep)


def test_cpu_quantize_opcheck(gen):
    torch.library.opcheck(torch.ops.pqk.kv_quantize_static.default,
                          (torch.randn(1, 2, 3, 64).half(), torch.rand(2) + 0.1, 4))
