"""The C++ decode attention over a static PrefixQuant cache (csrc/cpu/kv_cache.cpp: K/V read packed, never
materialized in float) against the reference (kv_format.decode_attention: dequantize, concatenate, fp32 softmax),
for every instruction set, GQA group sizes (G = 6: the packed V pass's heads in groups of 4 + 2), prefix batch 1
or B, P in {0, 1, 3}, odd D and T, D % 16 == 0 but not % 32 or % 64, SmolLM2's step (G = 3, D = 64, 562
positions: five chunks of 120 rows, the last 82, a partial 8-row block; 514 positions: five of 104, the last 98; 130:
two of 72 and 58), bits 4 and 8."""
import math

import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import _extension
from prefixquant_kernels.ops.backend import CPU_ISAS, available_backends

from .conftest import rand_kv

pytestmark = pytest.mark.skipif(not _extension.cpu_available(), reason="C++ extension not built")
ISAS = [CPU_ISAS[b] for b in available_backends() if b.startswith("cpu:")]


def _case(gen, B, Hkv, G, T, D, P, bits, q_dtype, prefix_batch=1, prefix_dtype=torch.bfloat16):
    k, v = (rand_kv((B, Hkv, T, D), torch.float32, gen) for _ in range(2))
    ks, vs = (torch.rand(Hkv, generator=gen) * 0.5 + 0.05 for _ in range(2))
    kp, vp = pqk.kv_quantize(k, ks, bits, backend="reference"), pqk.kv_quantize(v, vs, bits, backend="reference")
    pk, pv = (rand_kv((prefix_batch, Hkv, P, D), prefix_dtype, gen) for _ in range(2))
    q = (torch.randn(B, Hkv * G, D, generator=gen) * 3).to(q_dtype)
    return q, pk, pv, kp, vp, ks, vs


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("B,Hkv,G,T,D,P,pb", [(1, 8, 4, 300, 128, 1, 1), (2, 3, 1, 37, 64, 3, 2),
                                              (2, 2, 3, 1, 34, 0, 1), (1, 1, 5, 129, 6, 1, 1),
                                              (3, 2, 2, 17, 40, 3, 1), (1, 2, 6, 200, 48, 1, 1),
                                              (1, 3, 3, 561, 64, 1, 1), (2, 2, 5, 45, 96, 2, 2),
                                              (1, 3, 3, 513, 64, 1, 1), (2, 2, 2, 130, 32, 0, 1)])
def test_matches_reference(isa, bits, B, Hkv, G, T, D, P, pb, gen):
    q, pk, pv, kp, vp, ks, vs = _case(gen, B, Hkv, G, T, D, P, bits, torch.float32, pb)
    sm = D ** -0.5
    want = pqk.kv_decode_attention(q, pk, pv, kp, vp, ks, vs, bits, sm, backend="reference")
    out = torch.full_like(want, float("nan"))
    out.copy_(torch.ops.pqk.kv_decode_static(q, pk if P else None, pv if P else None, kp, vp, ks, vs, bits, sm, isa))
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), (out - want).abs().max()


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16])
def test_16bit_queries_and_prefix(q_dtype, gen):
    q, pk, pv, kp, vp, ks, vs = _case(gen, 2, 2, 2, 50, 64, 2, 4, q_dtype, prefix_dtype=torch.float16)
    want = pqk.kv_decode_attention(q, pk, pv, kp, vp, ks, vs, 4, backend="reference")
    got = pqk.kv_decode_attention(q, pk, pv, kp, vp, ks, vs, 4, backend="cpu")
    assert got.dtype == q_dtype
    tol = 1e-2 if q_dtype == torch.bfloat16 else 2e-3
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))


def test_softmax_is_exact_enough_over_a_wide_score_range(gen):
    """Scores spread over ~80 nats: the vector exp must neither overflow nor lose the small terms' sum."""
    q, pk, pv, kp, vp, ks, vs = _case(gen, 1, 1, 2, 200, 64, 1, 8, torch.float32)
    sm = 40.0 / math.sqrt(64)
    want = pqk.kv_decode_attention(q, pk, pv, kp, vp, ks, vs, 8, sm, backend="reference")
    got = pqk.kv_decode_attention(q, pk, pv, kp, vp, ks, vs, 8, sm, backend="cpu")
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_nan_query_gives_nan_not_a_finite_guess(gen):
    q, pk, pv, kp, vp, ks, vs = _case(gen, 1, 2, 2, 20, 64, 1, 4, torch.float32)
    q[0, 1, 3] = float("nan")
    got = pqk.kv_decode_attention(q, pk, pv, kp, vp, ks, vs, 4, backend="cpu")
    assert torch.isnan(got[0, 1]).all() and torch.isfinite(got[0, 0]).all()


def test_auto_picks_the_kernel_outside_the_interpreter(gen, monkeypatch):
    q, pk, pv, kp, vp, ks, vs = _case(gen, 1, 2, 2, 20, 64, 1, 4, torch.float32)
    calls = []
    real = torch.ops.pqk.kv_decode_static
    monkeypatch.setattr(torch.ops.pqk, "kv_decode_static", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pqk.kv_decode_attention(q, pk, pv, kp, vp, ks, vs, 4)
    assert calls


def test_bad_arguments_raise_not_crash(gen):
    q, pk, pv, kp, vp, ks, vs = _case(gen, 1, 2, 2, 20, 64, 1, 4, torch.float32)
    with pytest.raises(RuntimeError, match="k_body/v_body"):
        torch.ops.pqk.kv_decode_static(q, pk, pv, kp, vp[:, :, :5], ks, vs, 4, 0.1)
    with pytest.raises(RuntimeError, match="k_scale/v_scale"):
        torch.ops.pqk.kv_decode_static(q, pk, pv, kp, vp, ks[:1], vs, 4, 0.1)
    with pytest.raises(RuntimeError, match="prefix_k and prefix_v"):
        torch.ops.pqk.kv_decode_static(q, pk, None, kp, vp, ks, vs, 4, 0.1)
    with pytest.raises(RuntimeError, match="empty"):
        torch.ops.pqk.kv_decode_static(q, None, None, kp[:, :, :0], vp[:, :, :0], ks, vs, 4, 0.1)
    with pytest.raises(ValueError, match="q's head count"):
        pqk.kv_decode_attention(q[:, :3], pk, pv, kp, vp, ks, vs, 4, backend="cpu")


def test_opcheck(gen):
    q, pk, pv, kp, vp, ks, vs = _case(gen, 1, 2, 2, 9, 64, 1, 4, torch.float32)
    torch.library.opcheck(torch.ops.pqk.kv_decode_static.default, (q, pk, pv, kp, vp, ks, vs, 4, 0.125))


def test_reads_the_cache_buffer_view_in_place(gen, monkeypatch):
    """The cache's packed K/V are [:, :, :T] views of a larger buffer: read as they are (no copy), same result."""
    q, pk, pv, kp, vp, ks, vs = _case(gen, 2, 3, 2, 21, 64, 1, 4, torch.float32)
    bufs = [torch.randint(0, 256, (2, 3, 40, 32), dtype=torch.uint8, generator=gen) for _ in range(2)]
    for buf, t in zip(bufs, (kp, vp)):
        buf[:, :, :21] = t
    kview, vview = (b[:, :, :21] for b in bufs)
    assert not kview.is_contiguous()
    copies = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: copies.append(self.shape) or real(self, *a, **k))
    got = pqk.kv_decode_attention(q, pk, pv, kview, vview, ks, vs, 4, backend="cpu")
    monkeypatch.undo()
    assert (2, 3, 21, 32) not in copies
    want = pqk.kv_decode_attention(q, pk, pv, kp, vp, ks, vs, 4, backend="reference")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
