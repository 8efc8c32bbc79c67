"""prefixquant_kernels.hadamard: constructed Hadamard matrices, the size factorization and the transform, against
dense matrices built independently (torch.kron of the matrices / the popcount definition of Sylvester)."""
from __future__ import annotations

import math

import pytest
import torch

from prefixquant_kernels import hadamard as H

ALL_M = [1, 2, 4, 8, 16, 32, *H.SUPPORTED_M]


def popcount_sylvester(P: int) -> torch.Tensor:
    b = torch.arange(P)
    bits = b[:, None] & b[None, :]
    par = torch.zeros_like(bits)
    for k in range(max(P.bit_length(), 1)):
        par ^= (bits >> k) & 1
    return (1 - 2 * par).double()


@pytest.mark.parametrize("m", ALL_M)
def test_matrix_is_hadamard(m):
    h = H.hadamard_matrix(m, torch.float64)
    assert h.shape == (m, m) and h.dtype == torch.float64
    assert torch.equal(h.abs(), torch.ones(m, m, dtype=torch.float64))
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))
    assert H.hadamard_matrix(m).dtype == torch.float32


@pytest.mark.parametrize("m", [0, -4, 6, 19, 44, 2.0, True, "12"])
def test_matrix_rejects(m):
    with pytest.raises(ValueError, match="hadamard_matrix: "):
        H.hadamard_matrix(m)


@pytest.mark.parametrize("n,want", [
    (1, (1, 0)), (2, (1, 1)), (64, (1, 6)), (4096, (1, 12)), (12, (12, 0)), (40, (20, 1)), (576, (36, 4)),
    (1536, (12, 7)), (11008, (172, 6)), (13824, (108, 7)), (14336, (28, 9)), (28672, (28, 10)), (18944 * 2, None),
    (156 * 8, (156, 3)), (140 * 32, (140, 5)), (60, (60, 0)), (52 * 2, (52, 1)),
])
def test_factor(n, want):
    if want is None:
        with pytest.raises(ValueError):
            H.hadamard_factor(n)
        return
    m, p = H.hadamard_factor(n)
    assert (m, p) == want and m * 2 ** p == n


def test_factor_qwen2_0_5b_error_says_what_to_do():
    with pytest.raises(ValueError) as e:
        H.hadamard_factor(4864)
    msg = str(e.value)
    assert "4864" in msg and "19 * 2^8" in msg and "random_orthogonal" in msg and "172" in msg


@pytest.mark.parametrize("n", [0, -8, 3, 6, 4864, 2.0])
def test_factor_rejects(n):
    with pytest.raises(ValueError):
        H.hadamard_factor(n)


def cases():
    # every m at a few p (p = 0 has no butterflies, p >= 6 has register passes in the kernel), odd leading shapes
    for m in [1, *H.SUPPORTED_M]:
        for p in (0, 1, 3, 6) if m <= 60 else (0, 1, 4):  # the dense check is O(n^2) memory
            yield m, p
    yield 1, 10


@pytest.mark.parametrize("m,p", list(cases()))
def test_transform_equals_dense(m, p):
    n = m << p
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 5, n, generator=g, dtype=torch.float64) * torch.exp(torch.randn(3, 5, 1, generator=g) * 3)
    m, p = H.hadamard_factor(n)  # m = 40 -> (20, p + 1): the largest power-of-two factor wins
    dense = torch.kron(H.hadamard_matrix(m, torch.float64), popcount_sylvester(1 << p)) / math.sqrt(n)
    y = H.hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    torch.testing.assert_close(y, x @ dense.T, rtol=1e-12, atol=1e-12 * x.abs().max().item())
    torch.testing.assert_close(H.hadamard_rotation(n), dense, rtol=0, atol=1e-15)
    torch.testing.assert_close(H.hadamard_transform(y, inverse=True), x, rtol=1e-12, atol=1e-12 * x.abs().max().item())
    torch.testing.assert_close(H.hadamard_transform(x, scale=2.0), 2.0 * math.sqrt(n) * y, rtol=1e-12, atol=1e-9)
    # the kernel-order path (sequential m-stage) is the same map
    torch.testing.assert_close(H._transform(x, None, False, sequential=True), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [64, 28 * 4, 36 * 16, 52 * 8])  # Sylvester and Paley II matrices are symmetric
def test_involution_for_symmetric_matrices(n):
    x = torch.randn(7, n, dtype=torch.float64)
    torch.testing.assert_close(H.hadamard_transform(H.hadamard_transform(x)), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 2e-6), (torch.float16, 2 ** -10), (torch.bfloat16, 2 ** -7)])
@pytest.mark.parametrize("n", [576, 1536, 11008])
def test_low_precision_inputs(dtype, rel, n):
    # fp32 inside: the error is the output rounding (<= 1/2 ulp of the dtype) plus fp32 sums
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(5, n, generator=g) * 4).to(dtype)
    y = H.hadamard_transform(x)
    assert y.dtype == dtype and y.shape == x.shape
    ref = H.hadamard_transform(x.double())
    assert ((y.double() - ref).abs() <= rel * ref.abs() + 1e-6 * ref.abs().max()).all()
    # orthogonal: the norm survives
    torch.testing.assert_close(y.double().norm(dim=-1), x.double().norm(dim=-1), rtol=4 * rel, atol=0)


def test_input_not_mutated_and_errors_name_the_argument():
    x = torch.randn(2, 4864)
    before = x.clone()
    with pytest.raises(ValueError, match=r"pqk.hadamard_transform: x.shape\[-1\]: .*4864"):
        H.hadamard_transform(x)
    assert torch.equal(x, before)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        H.hadamard_transform([1.0, 2.0])
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        H.hadamard_transform(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-empty last dim"):
        H.hadamard_transform(torch.ones(3, 0))
    with pytest.raises(ValueError, match="scale must be a finite float"):
        H.hadamard_transform(torch.ones(4), scale=float("nan"))
    y = torch.randn(3, 64)
    yb = y.clone()
    H.hadamard_transform(y)
    assert torch.equal(y, yb)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("n", [64, 96])
def test_hadamard_transform_backward(gen, inverse, n):
    """pqk.hadamard_transform is differentiable (block-wise fine-tuning backpropagates through the online rotation of
    down_proj): y = x M, so dL/dx = dL/dy M^T, M read off the op applied to the identity."""
    import prefixquant_kernels as pqk
    x = torch.randn(3, 5, n, generator=gen, requires_grad=True)
    g = torch.randn(3, 5, n, generator=gen)
    m = pqk.hadamard_transform(torch.eye(n), inverse=inverse)
    (pqk.hadamard_transform(x, inverse=inverse) * g).sum().backward()
    assert torch.allclose(x.grad, g @ m.T, atol=1e-5)
