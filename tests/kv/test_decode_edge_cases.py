"""The decode ops at their edges: arguments only a fuzzer tried (an out-of-range or 0-d body_len, a NaN / inf / str
sm_scale, no KV heads, D = 0, prefixes of two dtypes or not tensors), and non-finite values, where the C++ kernel
and the reference must agree: a NaN query under an all-True mask, an inf V at a masked position, a chunk of the C++
kernel's positions whose scores are all -inf (its merge once spread NaN from it to the finite result), and a body
view whose size-1 dims carry odd strides."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import _extension

from .conftest import KV_BACKENDS

BACKENDS = KV_BACKENDS + (["cpu"] if _extension.cpu_available() else [])
needs_cpu = pytest.mark.skipif(not _extension.cpu_available(), reason="C++ extension not built")

S1 = torch.full((1,), 0.1)


def _body(T, D=16, H=1, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pqk.kv_quantize(torch.randn(B, H, T, D, generator=g), torch.full((H,), 0.1), 4, backend="reference")


def _decode(backend, q=None, pk=None, pv=None, kp=None, vp=None, ks=S1, vs=S1, **kw):
    kp = _body(5) if kp is None else kp
    vp = kp if vp is None else vp
    q = torch.randn(1, 1, 16) if q is None else q
    return pqk.kv_decode_attention(q, pk, pv, kp, vp, ks, vs, 4, backend=backend, **kw)


def _paged(backend, q=None, pk=None, pv=None, sm_scale=None):
    cache = torch.zeros(2, 1, 4, 16, dtype=torch.uint8)
    q = torch.randn(1, 1, 16) if q is None else q
    return pqk.kv_decode_paged(q, pk, pv, cache, torch.tensor([[0, 1]]), torch.tensor([3]), S1, S1, 4, sm_scale,
                               backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,exc,match", [
    (lambda b: _decode(b, body_len=torch.tensor([-1])), ValueError, r"body_len must be in \[0, T = 5\].*got -1"),
    (lambda b: _decode(b, body_len=torch.tensor([6])), ValueError, r"body_len must be in \[0, T = 5\].*got 6"),
    (lambda b: _decode(b, body_len=torch.tensor([0])), ValueError, r"cache is empty \(P \+ body_len == 0\)"),
    (lambda b: _decode(b, body_len=torch.tensor([1, 2])), ValueError, "body_len must hold one element"),
    (lambda b: _decode(b, sm_scale=float("nan")), ValueError, r"^pqk\.kv_decode_attention: sm_scale must be finite"),
    (lambda b: _decode(b, sm_scale=float("inf")), ValueError, "sm_scale must be finite"),
    (lambda b: _decode(b, sm_scale="0.5"), TypeError, "sm_scale must be a real number or None, got str"),
    (lambda b: _decode(b, sm_scale=torch.tensor(0.5)), TypeError, "sm_scale must be a real number or None"),
    (lambda b: _decode(b, sm_scale=True), TypeError, "sm_scale must be a real number"),
    (lambda b: _decode(b, q=torch.randn(1, 2, 16), kp=torch.zeros(1, 0, 3, 8, dtype=torch.uint8), ks=torch.ones(0),
                       vs=torch.ones(0)), ValueError, r"multiple of the KV head count 0 \(> 0\)"),
    (lambda b: _decode(b, q=torch.randn(1, 1, 0), kp=torch.zeros(1, 1, 3, 0, dtype=torch.uint8)), ValueError,
     r"q's head dim D must be > 0"),
    (lambda b: _decode(b, pk=torch.randn(1, 1, 2, 16), pv=torch.randn(1, 1, 2, 16).half()), TypeError,
     "prefix_v must have prefix_k's dtype torch.float32, got torch.float16"),
    (lambda b: _decode(b, pk=[[0.0]], pv=torch.randn(1, 1, 2, 16)), TypeError,
     "prefix_k must be a torch.Tensor or None, got list"),
    (lambda b: _paged(b, q=torch.randn(1, 1, 0)), ValueError, r"^pqk\.kv_decode_paged: q's head dim D must be > 0"),
    (lambda b: _paged(b, sm_scale=float("nan")), ValueError, r"^pqk\.kv_decode_paged: sm_scale must be finite"),
    (lambda b: _paged(b, pk=torch.randn(1, 1, 2, 16), pv=torch.randn(1, 1, 2, 16).bfloat16()), TypeError,
     "prefix_v must have prefix_k's dtype"),
    (lambda b: pqk.kv_write_paged(torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.zeros(1, 1, 4, 8, dtype=torch.uint8),
                                  torch.tensor([0, 1]), S1, S1, 4, key_offset=[[0.0] * 8], backend=b),
     TypeError, r"^pqk\.kv_write_paged: key_offset must be a torch.Tensor or None, got list"),
])
def test_bad_argument_raises_clear_error(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_body_len_as_a_0d_tensor(backend):
    kp = _body(7)
    q = torch.randn(1, 1, 16)
    want = _decode("reference", q=q, kp=kp[:, :, :4])
    for n in (torch.tensor(4), torch.tensor([4])):
        torch.testing.assert_close(_decode(backend, q=q, kp=kp, body_len=n), want, rtol=1e-5, atol=1e-6)


@needs_cpu
def test_nan_query_under_an_all_true_mask_stays_nan():
    q = torch.randn(1, 1, 16)
    q[0, 0, 0] = float("nan")
    mask = torch.ones(1, 5, dtype=torch.bool)
    for backend in ("reference", "cpu"):
        assert _decode(backend, q=q, mask=mask).isnan().all(), backend
        assert _decode(backend, q=q).isnan().all(), backend


@needs_cpu
def test_inf_value_at_a_masked_position_takes_no_part():
    q = torch.randn(1, 1, 16)
    pk, pv = torch.randn(1, 1, 1, 16), torch.full((1, 1, 1, 16), float("inf"))
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[0, 0] = False   # the prefix position, whose V is inf
    ref = _decode("reference", q=q, pk=pk, pv=pv, mask=mask)
    got = _decode("cpu", q=q, pk=pk, pv=pv, mask=mask)
    assert ref.isfinite().all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, _decode("reference", q=q), rtol=1e-5, atol=1e-6)   # as if it were not there


@needs_cpu
@pytest.mark.parametrize("P", [128, 250])
def test_a_chunk_of_minus_inf_scores_gets_no_weight(P):
    """128 / 250 prefix positions whose keys make every score -inf fill the C++ kernel's first chunk(s) (at most 128
    rows each, equal sizes): the body's one finite row must take all the weight, as in the reference."""
    q = torch.ones(1, 1, 16)
    pk, pv = torch.full((1, 1, P, 16), -float("inf")), torch.randn(1, 1, P, 16)
    kp = _body(1, seed=3)
    ref = _decode("reference", q=q, pk=pk, pv=pv, kp=kp)
    got = _decode("cpu", q=q, pk=pk, pv=pv, kp=kp)
    assert ref.isfinite().all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the paged kernel: the same positions, the body's one row (position P) in block 0 at offset P % 4
    cache = torch.zeros(1, 1, 4, 16, dtype=torch.uint8)
    pqk.kv_write_paged(torch.ones(1, 1, 16), torch.ones(1, 1, 16), cache, torch.tensor([P % 4]), S1, S1, 4,
                       backend="reference")
    table, lens = torch.zeros(1, (P + 4) // 4 + 1, dtype=torch.int64), torch.tensor([P + 1])
    table[0, P // 4] = 0
    ref = pqk.kv_decode_paged(q, pk, pv, cache, table, lens, S1, S1, 4, backend="reference")
    got = pqk.kv_decode_paged(q, pk, pv, cache, table, lens, S1, S1, 4, backend="cpu")
    assert ref.isfinite().all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # every attended score -inf: NaN in both, as softmax over all -inf gives
    assert _decode("cpu", q=q, pk=pk, pv=pv, kp=kp, body_len=torch.tensor([0])).isnan().all()
    assert _decode("reference", q=q, pk=pk, pv=pv, kp=kp, body_len=torch.tensor([0])).isnan().all()


@needs_cpu
def test_body_view_with_odd_strides_on_size_1_dims():
    """B = H_kv = 1: the [:, :, :T] view of a larger buffer has strides no contiguous tensor has on its size-1 dims,
    and K's differ from V's there; the C++ kernel reads it as the reference does."""
    kp = _body(5)
    buf = torch.zeros(1, 1, 10, 8, dtype=torch.uint8)
    buf[:, :, :5] = kp
    q = torch.randn(1, 1, 16)
    want = _decode("reference", q=q, kp=kp)
    torch.testing.assert_close(_decode("cpu", q=q, kp=buf[:, :, :5], vp=kp), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_decode("cpu", q=q, kp=kp, vp=buf[:, :, :5]), want, rtol=1e-5, atol=1e-6)
