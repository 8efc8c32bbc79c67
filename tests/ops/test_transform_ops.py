"""rmsnorm_quantize and hadamard_transform as public ops / pqk:: custom ops: results against independent
definitions (a hand-written RMSNorm + format.quantize; the dense Hadamard matrix), every backend of the CPU, odd
shapes, bad input, opcheck and torch.compile. (Their CUDA kernels: tests/cuda.)"""
import math

import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import _extension
from prefixquant_kernels import format as fmt
from prefixquant_kernels import hadamard

BACKENDS = ["auto", "reference", *[b for b in pqk.available_backends() if b.startswith("cpu")]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 130), (7, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_rmsnorm_quantize_matches_its_definition(backend, shape, dtype, bits):
    g = torch.Generator().manual_seed(shape[-1] + bits)
    x = (torch.randn(shape, generator=g) * 5).to(dtype)
    x.view(-1)[3] = 300.0                              # an outlier: saturates after the norm
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    keep = x.clone()
    q, y = pqk.rmsnorm_quantize(x, w, 0.03, bits, 1e-5, return_normed=True, backend=backend)
    xf = x.float()
    y_ref = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    q_ref = fmt.quantize(y_ref, 0.03, bits)
    got = fmt.unpack_int4(q) if bits == 4 else q
    assert q.shape == (*shape[:-1], shape[-1] // 2 if bits == 4 else shape[-1]) and y.dtype == dtype
    # rsqrt vs 1/sqrt may differ in the last bit of y: at most one level, and only where y sits on a rounding edge
    assert (got.int() - q_ref.int()).abs().max() <= 1 and (got != q_ref).float().mean() < 0.01
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)
    assert torch.equal(x, keep)
    assert torch.equal(pqk.rmsnorm_quantize(x, w, 0.03, bits, 1e-5, backend=backend), q)   # without the normed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [64, 1536, 20 * 8, 172 * 4])
def test_hadamard_transform_is_the_dense_rotation(backend, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 2, n, generator=g)
    got = pqk.hadamard_transform(x, backend=backend)
    want = (x.double() @ hadamard.hadamard_rotation(n).T).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pqk.hadamard_transform(got, inverse=True, backend=backend), x, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not _extension.cpu_available(), reason="needs the C++ extension")
@pytest.mark.parametrize("n", [1, 2, 64, 1536, 12 * 2, 20 * 8, 28 * 512, 172 * 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inverse", [False, True])
def test_hadamard_cpu_kernel_is_the_sequential_form_bit_for_bit(n, dtype, inverse):
    """The C++ CPU kernel (csrc/cpu/hadamard.cpp) equals hadamard.py's sequential form exactly (the CUDA kernel's
    order), in the input's dtype and shape, for odd leading shapes (0 rows too) and full-range values; the input
    is left as it was."""
    g = torch.Generator().manual_seed(n * 7 + int(inverse))
    for shape in [(5, 3, n), (1, n), (n,), (0, n), (2, 0, n)]:
        x = (torch.randn(*shape, generator=g) * torch.logspace(-3, 3, n)).to(dtype)
        keep = x.clone()
        got = pqk.hadamard_transform(x, inverse=inverse, backend="cpu")
        want = hadamard._transform(x, None, inverse, sequential=True)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, want), (shape, (got.float() - want.float()).abs().max())
        assert torch.equal(x, keep)


@pytest.mark.skipif(not _extension.cpu_available(), reason="needs the C++ extension")
def test_eager_cpu_calls_skip_the_dispatch_only_where_nothing_needs_the_op(monkeypatch):
    """hadamard_transform calls its C++ kernel directly in a plain eager CPU call (ops/backend.eager_cpu_call), and
    goes through pqk::hadamard_transform wherever something must see the op: a dispatch mode (fake tensors,
    tests/cuda/test_fused_path's replay), a function mode, a gradient, functorch's vmap. Same bits both ways."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from prefixquant_kernels.ops import transform

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    direct = []      # the module's name is what the direct route calls; the registered kernel keeps the original
    kernel = transform._hadamard_cpu
    monkeypatch.setattr(transform, "_hadamard_cpu", lambda x, inverse: direct.append(1) or kernel(x, inverse))
    x = torch.randn(3, 96) * 3
    plain = pqk.hadamard_transform(x)
    assert len(direct) == 1
    with Seen() as mode:
        seen = pqk.hadamard_transform(x)
    assert "pqk.hadamard_transform.default" in mode.ops and torch.equal(seen, plain)
    with torch.device("cpu"):
        assert torch.equal(pqk.hadamard_transform(x), plain)
    assert torch.equal(torch.vmap(pqk.hadamard_transform)(x), plain)
    xg = x.clone().requires_grad_()
    pqk.hadamard_transform(xg).sum().backward()
    torch.testing.assert_close(xg.grad, pqk.hadamard_transform(torch.ones(3, 96), inverse=True))
    assert len(direct) == 2     # + the inverse transform just above, a plain call again


@pytest.mark.parametrize("call,exc,match", [
    (lambda: pqk.rmsnorm_quantize(torch.randn(2, 64), torch.ones(32), 0.1), ValueError, "weight must have shape"),
    (lambda: pqk.rmsnorm_quantize(torch.randn(2, 64), torch.ones(64), 0.1, eps=-1.0), ValueError, "eps"),
    (lambda: pqk.rmsnorm_quantize(torch.randn(2, 64), torch.ones(64), 0.1, eps=float("nan")), ValueError, "eps"),
    (lambda: pqk.rmsnorm_quantize(torch.randn(2, 64), torch.ones(64), 0.1, eps=True), ValueError, "eps"),
    (lambda: pqk.rmsnorm_quantize(torch.randn(2, 64), torch.ones(64), 0.0), ValueError, "scale"),
    (lambda: pqk.rmsnorm_quantize(torch.randn(2, 64), torch.ones(64), 0.1, bits=3), ValueError, "bits"),
    (lambda: pqk.rmsnorm_quantize(torch.randn(2, 63), torch.ones(63), 0.1), ValueError, "x"),
    (lambda: pqk.rmsnorm_quantize(torch.randn(2, 64).int(), torch.ones(64), 0.1), TypeError, "x"),
    (lambda: pqk.rmsnorm_quantize(torch.randn(2, 64), torch.ones(64).int(), 0.1), TypeError, "weight"),
    (lambda: pqk.rmsnorm_quantize(torch.randn(2, 64), torch.ones(64), 0.1, backend="gpu"), ValueError, "backend"),
    (lambda: pqk.hadamard_transform(torch.randn(2, 4864)), ValueError, r"x\.shape\[-1\].*4864"),
    (lambda: pqk.hadamard_transform(torch.randn(2, 64).long()), TypeError, "x"),
    (lambda: pqk.hadamard_transform(torch.randn(2, 64), inverse=1), TypeError, "inverse"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_opcheck():
    x, w = torch.randn(3, 64), torch.rand(64) + 0.5
    for normed in (False, True):
        torch.library.opcheck(torch.ops.pqk.rmsnorm_quantize.default, (x, w, torch.tensor(0.1), 4, 1e-6, normed))
    torch.library.opcheck(torch.ops.pqk.hadamard_transform.default, (torch.randn(2, 1536), False))


def test_torch_compile_fullgraph():
    w = torch.rand(64) + 0.5

    def f(x):
        return pqk.rmsnorm_quantize(x, w, 0.1), pqk.hadamard_transform(x)
    x = torch.randn(4, 64)
    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    want = f(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
