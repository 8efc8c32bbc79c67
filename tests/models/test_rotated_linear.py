"""RotatedLinear: the Hadamard form (signs [K] + the fast transform) against the dense form of the same R, the
function W x kept by folding W R, and the two forms' buffers."""
import pytest
import torch
from torch import nn

from prefixquant_kernels.hadamard import hadamard_rotation
from prefixquant_kernels.models.rotated_linear import RotatedLinear, fold_hadamard, rotate
from prefixquant_kernels.ops.transform import hadamard_transform


def _signs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


# 48 = 12 * 4 and 1536 = 12 * 128 (H_12 is Paley I, not symmetric: the transform's direction matters),
# 28 * 8 (Paley II, symmetric), 128 (pure Sylvester)
@pytest.mark.parametrize("n", [48, 1536, 224, 128])
@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 5), (3, 1, 7), (0,)])
def test_fast_form_equals_the_dense_form_of_the_same_rotation(n, lead):
    s = _signs(n, seed=n)
    fast = RotatedLinear(nn.Identity(), signs=s)
    r = fast.dense_rotation()
    # R as the module doc defines it, built independently of dense_rotation
    torch.testing.assert_close(r, torch.diag(s.double()) @ hadamard_rotation(n).T, rtol=0, atol=0)
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    dense = RotatedLinear(nn.Identity(), r)
    x = torch.randn(*lead, n) * 3
    got, want = fast(x), dense(x)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), x.double() @ r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_form_in_16_bit_computes_in_fp32(dtype):
    n = 48
    s = _signs(n, 1)
    x = torch.randn(4, 3, n).to(dtype)
    got = RotatedLinear(nn.Identity(), signs=s)(x)
    assert got.dtype == dtype
    want = (x.double() @ RotatedLinear(nn.Identity(), signs=s).dense_rotation()).to(dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0) if dtype == torch.float16 else \
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [48, 1536])
def test_rotate_on_cpu_is_the_public_op_bit_for_bit(dtype, n):
    """rotate() is hadamard_transform of x * signs in fp32, in x's dtype: the same bits as the op, which the CUDA
    kernel and the compiled paths run, for contiguous and strided inputs."""
    s = _signs(n, 2)
    x = (torch.randn(5, 2 * n) * 4).to(dtype)[:, ::2]                      # strided
    for inp in (x.contiguous(), x):
        want = hadamard_transform(inp.float() * s).to(dtype)
        got = rotate(inp, signs=s)
        assert got.dtype == dtype and torch.equal(got, want)
    assert not torch.equal(rotate(x.contiguous(), signs=s), rotate(x.contiguous(), signs=-s))


def test_rotate_keeps_its_gradient():
    """Block-wise fine-tuning backpropagates through rotate(): where x needs a gradient the op's autograd formula
    runs (d sum(T(x * s)) / dx = T^-1(1) * s, T orthogonal)."""
    s = _signs(48, 3)
    x = torch.randn(4, 48, requires_grad=True)
    rotate(x, signs=s).sum().backward()
    torch.testing.assert_close(x.grad, hadamard_transform(torch.ones(4, 48), inverse=True) * s)


@pytest.mark.parametrize("n", [48, 1536, 224])
def test_folding_keeps_the_linear_function(n):
    """linear(W R)(x R) == linear(W)(x): the convention of fold_hadamard and rotate agree (no dense matrix)."""
    torch.manual_seed(n)
    lin = nn.Linear(n, 9)
    s = _signs(n, 2)
    folded = nn.Linear(n, 9)
    with torch.no_grad():
        folded.weight.copy_(fold_hadamard(lin.weight, s).float())
        folded.bias.copy_(lin.bias)
    rot = RotatedLinear(folded, signs=s)
    x = torch.randn(2, 3, n)
    with torch.no_grad():
        torch.testing.assert_close(rot(x), lin(x), rtol=1e-4, atol=1e-4)
        # different signs: a different rotation, the function is lost (the signs are really applied)
        other = RotatedLinear(folded, signs=_signs(n, 3))
        assert (other(x) - lin(x)).abs().max() > 1e-2


def test_buffers_and_bad_arguments():
    s = _signs(48)
    fast = RotatedLinear(nn.Linear(48, 5), signs=s)
    assert fast.form == "hadamard" and fast.in_features == 48 and fast.out_features == 5
    assert tuple(fast.state_dict()["signs"].shape) == (48,) and "rotation" not in fast.state_dict()
    dense = RotatedLinear(nn.Linear(76, 5), torch.eye(76))
    assert dense.form == "dense" and dense.in_features == 76
    assert tuple(dense.state_dict()["rotation"].shape) == (76, 76) and "signs" not in dense.state_dict()
    with pytest.raises(ValueError, match=r"signs: hadamard_factor: no Hadamard transform for n=76 = 19 \* 2\^2"):
        RotatedLinear(nn.Linear(76, 5), signs=_signs(76))
    with pytest.raises(ValueError, match="exactly one of"):
        RotatedLinear(nn.Linear(48, 5))
    with pytest.raises(ValueError, match="exactly one of"):
        RotatedLinear(nn.Linear(48, 5), torch.eye(48), signs=s)
    with pytest.raises(ValueError, match="signs must be 1-D"):
        RotatedLinear(nn.Linear(48, 5), signs=torch.eye(48))
    with pytest.raises(ValueError, match="rotation must be square"):
        RotatedLinear(nn.Linear(48, 5), torch.ones(48))
    with pytest.raises(ValueError, match="form must be one of"):
        RotatedLinear.empty(nn.Linear(48, 5), "fast", 48)
    # an empty wrapper of each form takes its form's state dict
    for src in (fast, dense):
        e = RotatedLinear.empty(nn.Linear(src.in_features, 5), src.form, src.in_features)
        e.load_state_dict(src.state_dict())
        x = torch.randn(3, src.in_features)
        with torch.no_grad():
            assert torch.equal(e(x), src(x))
