"""kv_decode_attention over a preallocated cache (cache/modes/static.py's PreallocatedStaticLayer): the body is the
whole buffer, ``body_len`` (an int64 tensor) says how many rows are filled and ``mask`` (bool [B, >= P + T]) which
positions each sequence attends to. Every backend (the C++ kernel per ISA, Triton under the interpreter) against
the reference on the filled rows with the mask applied; the unfilled rows hold garbage that must not be read; a
row that masks everything gives zeros; bad body_len / mask raise errors naming them."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import kv_format as kvf
from prefixquant_kernels.ops.backend import CPU_ISAS, available_backends

from .conftest import KV_BACKENDS, rand_kv

BACKENDS = ["cpu"] + [b for b in KV_BACKENDS if b != "reference"]
ISAS = [CPU_ISAS[b] for b in available_backends() if b.startswith("cpu:")]


def _case(gen, B, Hkv, G, cap, n, D, P, bits):
    k, v = (rand_kv((B, Hkv, cap, D), torch.float32, gen) for _ in range(2))
    ks, vs = (torch.rand(Hkv, generator=gen) * 0.5 + 0.05 for _ in range(2))
    kp, vp = kvf.quantize_static(k, ks, bits), kvf.quantize_static(v, vs, bits)
    # the rows past n: garbage of the right dtype (what a reused buffer holds)
    kp[:, :, n:] = kp[:, :, n:].flip(0).roll(3, -1)
    vp[:, :, n:] = vp[:, :, n:].flip(1) if Hkv > 1 else vp[:, :, n:] // 3
    pk, pv = (rand_kv((1, Hkv, P, D), torch.float16, gen) for _ in range(2))
    q = torch.randn(B, Hkv * G, D, generator=gen) * 3
    mask = torch.rand(B, P + cap + 5, generator=gen) > 0.3
    mask[:, :P] = True
    return q, pk, pv, kp, vp, ks, vs, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("B,Hkv,G,cap,n,D,P", [(1, 3, 3, 64, 40, 64, 1), (3, 2, 2, 33, 7, 34, 2),
                                               (2, 1, 5, 16, 16, 6, 0), (2, 2, 1, 20, 0, 64, 3),
                                               (3, 3, 3, 600, 513, 64, 1)])
def test_matches_reference_on_the_filled_rows(backend, bits, B, Hkv, G, cap, n, D, P, gen):
    q, pk, pv, kp, vp, ks, vs, mask = _case(gen, B, Hkv, G, cap, n, D, P, bits)
    sm = D ** -0.5
    length = torch.tensor([n])
    want = kvf.decode_attention(q, pk, pv, kp[:, :, :n], vp[:, :, :n], ks, vs, bits, sm, mask[:, :P + n])
    out = pqk.kv_decode_attention(q, pk, pv, kp, vp, ks, vs, bits, sm, backend=backend, body_len=length, mask=mask)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)
    # without the mask: every filled row
    want = kvf.decode_attention(q, pk, pv, kp[:, :, :n], vp[:, :, :n], ks, vs, bits, sm)
    out = pqk.kv_decode_attention(q, pk, pv, kp, vp, ks, vs, bits, sm, backend=backend, body_len=length)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_isa(isa, gen):
    q, pk, pv, kp, vp, ks, vs, mask = _case(gen, 2, 3, 3, 70, 45, 64, 1, 4)
    want = kvf.decode_attention(q, pk, pv, kp[:, :, :45], vp[:, :, :45], ks, vs, 4, 0.125, mask[:, :46])
    out = torch.full_like(want, float("nan"))
    out.copy_(torch.ops.pqk.kv_decode_static(q, pk, pv, kp, vp, ks, vs, 4, 0.125, isa, torch.tensor([45]), mask))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_unfilled_rows_and_masked_positions_are_not_read(backend, gen):
    """The same filled rows with different garbage after them, and different values at masked positions, give
    the same result; a row whose mask is all False gives zeros (a check that reads the garbage fails here)."""
    q, pk, pv, kp, vp, ks, vs, mask = _case(gen, 2, 2, 2, 48, 20, 64, 1, 4)
    mask[1] = False
    mask[0, 1 + 20] = True   # the row a longer body_len adds (the last check) is attended to
    length = torch.tensor([20])
    a = pqk.kv_decode_attention(q, pk, pv, kp, vp, ks, vs, 4, backend=backend, body_len=length, mask=mask)
    kp2, vp2 = kp.clone(), vp.clone()
    kp2[:, :, 20:] = 0x77
    vp2[:, :, 20:] = 0x77
    blocked = (~mask[0, 1:21]).nonzero().flatten()
    kp2[0, :, blocked], vp2[0, :, blocked] = 0x11, 0x22
    b = pqk.kv_decode_attention(q, pk, pv, kp2, vp2, ks, vs, 4, backend=backend, body_len=length, mask=mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(a[1], torch.zeros_like(a[1]))
    c = pqk.kv_decode_attention(q, pk, pv, kp2, vp2, ks, vs, 4, backend=backend, body_len=torch.tensor([21]),
                                mask=mask)
    assert not torch.allclose(a[0], c[0]), "one more filled row must change the result"


def test_bad_body_len_and_mask(gen):
    q, pk, pv, kp, vp, ks, vs, mask = _case(gen, 2, 2, 2, 16, 4, 64, 1, 4)
    op = pqk.kv_decode_attention
    with pytest.raises(TypeError, match="body_len"):
        op(q, pk, pv, kp, vp, ks, vs, 4, body_len=torch.tensor([4.0]))
    with pytest.raises(ValueError, match="body_len"):
        op(q, pk, pv, kp, vp, ks, vs, 4, body_len=torch.tensor([4, 5]))
    with pytest.raises(TypeError, match="mask"):
        op(q, pk, pv, kp, vp, ks, vs, 4, mask=mask.int())
    with pytest.raises(ValueError, match="mask"):
        op(q, pk, pv, kp, vp, ks, vs, 4, mask=mask[:1])
    with pytest.raises(ValueError, match="mask"):
        op(q, pk, pv, kp, vp, ks, vs, 4, mask=mask[:, :10])
    with pytest.raises(ValueError, match=r"body_len must be in \[0, T = 16\]"):   # past the capacity
        op(q, pk, pv, kp, vp, ks, vs, 4, body_len=torch.tensor([17]), backend="cpu")
    with pytest.raises(RuntimeError, match="body_len"):   # the C++ kernel's own check, for callers of the raw op
        torch.ops.pqk.kv_decode_static(q, pk, pv, kp, vp, ks, vs, 4, 0.125, -1, torch.tensor([17]), None)


@pytest.mark.parametrize("bits", [4, 8])
def test_compiled_update_writes_the_ops_bytes(bits, gen):
    """Compiled, PreallocatedStaticLayer quantizes with kv_format's torch expression (inductor fuses it into the
    cache write): the buffers must hold the bytes the eager op writes, ties (x = (n + 1/2) * scale), clamped
    outliers and non-finite values included."""
    from prefixquant_kernels.cache.modes.static import PreallocatedStaticLayer
    B, H, D, cap = 2, 3, 64, 16
    ks, vs = (torch.rand(H, generator=gen) * 0.5 + 0.05 for _ in range(2))
    layers = [PreallocatedStaticLayer(ks, vs, bits=bits, backend="cpu", max_cache_len=cap) for _ in range(2)]

    def new_kv(t):
        out = []
        for s in (ks, vs):
            x = rand_kv((B, H, t, D), torch.float32, gen)
            ties = (torch.randint(-9, 9, x.shape, generator=gen) + 0.5) * s.view(1, -1, 1, 1)
            x = torch.where(torch.rand(x.shape, generator=gen) < 0.3, ties, x)
            x[0, 0, 0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
            out.append(x)
        return out

    k0, v0 = new_kv(5)
    for layer in layers:                              # the prefill: eager in both
        layer.update(k0.clone(), v0.clone())
    step = torch.compile(lambda k, v: layers[1].update(k, v), fullgraph=True)
    for _ in range(3):
        k, v = new_kv(1)
        layers[0].update(k.clone(), v.clone())        # the op
        step(k.clone(), v.clone())                    # compiled: kv_format.quantize_static, fused
    assert int(layers[0].length) == int(layers[1].length) == 8
    assert torch.equal(layers[0].k, layers[1].k) and torch.equal(layers[0].v, layers[1].v)
    assert (layers[1].k[:, :, 5:8] != 0).any()
