"""Fused decode attention over [16-bit prefix | 4/8-bit static body]: the Triton kernel (interpreted) against
the reference (dequantize + concat + fp32 attention), and against a plain float attention on the same values."""
import math

import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels.ops.kv import kv_decode_attention

from .conftest import KV_BACKENDS, needs_triton, rand_kv


def _case(B, Hq, Hkv, P, T, D, dtype, gen, bits=4, shared_prefix=False):
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    k = rand_kv((B, Hkv, T, D), dtype, gen)
    v = rand_kv((B, Hkv, T, D), dtype, gen)
    qmax = 7 if bits == 4 else 127
    ks = (k.float().abs().amax(dim=(0, 2, 3)) / qmax).clamp_min(1e-3)
    vs = (v.float().abs().amax(dim=(0, 2, 3)) / qmax).clamp_min(1e-3)
    kp, vp = pqk.kv_quantize(k, ks, bits, backend="reference"), pqk.kv_quantize(v, vs, bits, backend="reference")
    pb = 1 if shared_prefix else B
    pk = (torch.randn(pb, Hkv, P, D, generator=gen) * 20).to(dtype)  # outlier-sized prefix keys
    pv = torch.randn(pb, Hkv, P, D, generator=gen).to(dtype)
    return q, pk, pv, kp, vp, ks, vs


def _float_attention(q, pk, pv, kp, vp, ks, vs, bits):
    """Independent check: dequantize with format.unpack_int4, SDPA in float64."""
    from prefixquant_kernels import format as fmt
    deq = lambda p, s: (fmt.unpack_int4(p) if bits == 4 else p).double() * s.double().view(1, -1, 1, 1)
    B, Hq, D = q.shape
    k = torch.cat([pk.double().expand(B, -1, -1, -1), deq(kp, ks)], 2)
    v = torch.cat([pv.double().expand(B, -1, -1, -1), deq(vp, vs)], 2)
    g = Hq // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.double().unsqueeze(2), k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
    return out.squeeze(2)


# P in {0, 1, 3, 4}; T not a multiple of the 16-position block; D in {64, 128}; GQA groups of 1, 2, 3
CASES = [(0, 37, 64, 4, 2), (1, 5, 128, 6, 2), (3, 70, 64, 2, 2), (4, 17, 128, 4, 1)]


@pytest.mark.parametrize("backend", KV_BACKENDS)
@pytest.mark.parametrize("P,T,D,Hq,Hkv", CASES)
def test_decode_attention_matches_float_attention(backend, P, T, D, Hq, Hkv, gen):
    args = _case(2, Hq, Hkv, P, T, D, torch.float32, gen, shared_prefix=P % 2 == 1)
    out = kv_decode_attention(*args, backend=backend)
    want = _float_attention(*args, bits=4)
    assert out.shape == (2, Hq, D) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("split_len", [16, 4096])
def test_triton_equals_reference_in_low_precision(dtype, bits, split_len, gen, monkeypatch):
    import prefixquant_kernels.triton.decode_attention as da
    real = da.decode_attention
    monkeypatch.setattr(da, "decode_attention", lambda *a, **kw: real(*a, split_len=split_len, **kw))
    args = _case(2, 4, 2, 3, 29, 64, dtype, gen, bits=bits)
    out = kv_decode_attention(*args, bits=bits, backend="triton")
    ref = kv_decode_attention(*args, bits=bits, backend="reference")
    # both compute in fp32 and round once to dtype; summation orders differ, so allow 2 ulp of the output
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


@needs_triton
def test_custom_scale_and_shared_prefix_not_copied(gen):
    q, pk, pv, kp, vp, ks, vs = _case(2, 4, 2, 2, 19, 64, torch.float32, gen, shared_prefix=True)
    out = kv_decode_attention(q, pk.expand(2, -1, -1, -1), pv.expand(2, -1, -1, -1), kp, vp, ks, vs, sm_scale=0.3,
                              backend="triton")
    ref = kv_decode_attention(q, pk, pv, kp, vp, ks, vs, sm_scale=0.3, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: {**a, "q": a["q"][:, :3]}, "must be a multiple of the KV head count"),
    (lambda a: {**a, "k_packed": a["k_packed"][:1], "v_packed": a["v_packed"][:1]}, "k_packed must be"),
    (lambda a: {**a, "v_packed": a["v_packed"][:, :, :3]}, "v_packed must have k_packed's shape"),
    (lambda a: {**a, "k_scale": a["k_scale"][:1]}, r"scale must have shape \(2,\)"),
    (lambda a: {**a, "v_scale": -a["v_scale"]}, "finite and > 0"),
    (lambda a: {**a, "prefix_v": None}, "given together"),
    (lambda a: {**a, "prefix_k": a["prefix_k"][:, :, :, :32], "prefix_v": a["prefix_v"][:, :, :, :32]}, "prefix_k must be"),
    (lambda a: {**a, "bits": 2}, "bits must be one of"),
    (lambda a: {**a, "k_packed": a["k_packed"].view(torch.int8), "v_packed": a["v_packed"].view(torch.int8)}, "must have dtype"),
])
def test_bad_input(mutate, match, gen):
    q, pk, pv, kp, vp, ks, vs = _case(2, 4, 2, 2, 9, 64, torch.float32, gen)
    a = dict(q=q, prefix_k=pk, prefix_v=pv, k_packed=kp, v_packed=vp, k_scale=ks, v_scale=vs)
    with pytest.raises((ValueError, TypeError), match=match):
        kv_decode_attention(**mutate(a), backend="reference")


@needs_triton
@pytest.mark.parametrize("Hq,Hkv,D,T,split_len", [
    (8, 1, 128, 45, 256),   # G = 8: the split kernel's smallest BLOCK_N (the register budget, no spills)
    (8, 2, 64, 600, 16),    # 38 splits > MERGE_BLOCK_S: the merge kernel's chunk loop and its rescaling
])
def test_triton_large_groups_and_many_splits(Hq, Hkv, D, T, split_len, gen, monkeypatch):
    import prefixquant_kernels.triton.decode_attention as da
    real = da.decode_attention
    monkeypatch.setattr(da, "decode_attention", lambda *a, **kw: real(*a, split_len=split_len, **kw))
    args = _case(1, Hq, Hkv, 3, T, D, torch.float32, gen)
    assert triton_splits(3 + T, split_len, da.split_constexprs(Hq // Hkv, D, 4)["BLOCK_N"]) > (
        da.MERGE_BLOCK_S if T > 100 else 0)
    out = kv_decode_attention(*args, backend="triton")
    torch.testing.assert_close(out, kv_decode_attention(*args, backend="reference"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), _float_attention(*args, bits=4), rtol=1e-4, atol=1e-4)


def triton_splits(n, split_len, block_n):
    return -(-n // (-(-split_len // block_n) * block_n))


class _Recorder:
    """Stands in for a @triton.jit kernel: records the constexprs of each launch (kernel[grid](..., **constexprs))."""

    def __init__(self):
        self.constexprs = set()

    def __getitem__(self, grid):
        return lambda *args, **kw: self.constexprs.add(tuple(sorted(kw.items())))


@needs_triton
def test_compiled_variants_do_not_depend_on_the_context_length(monkeypatch):
    """A generation that grows from 1 to 5000 positions (the split count crossing 1, 2, 4, ..., 32 at split_len 256,
    and the merge kernel's old BLOCK_S = next_pow2(n_splits) with it) launches one set of constexprs per kernel; the
    context-length ints are not specialized either (do_not_specialize), so Triton compiles each kernel once."""
    import prefixquant_kernels.triton.decode_attention as da
    split, merge = _Recorder(), _Recorder()
    monkeypatch.setattr(da, "_decode_attention_split_kernel", split)
    monkeypatch.setattr(da, "_decode_attention_merge_kernel", merge)
    q = torch.zeros(1, 8, 128)
    pk = torch.zeros(1, 1, 4, 128)
    s = torch.ones(1)
    for t in (1, 2, 17, 255, 256, 257, 600, 1100, 2100, 4100, 5000):
        body = torch.zeros(1, 1, t, 64, dtype=torch.uint8)
        da.decode_attention(q, pk, pk, body, body, s, s, 4, 0.1)
    assert len(split.constexprs) == 1 and len(merge.constexprs) == 1
    assert dict(next(iter(merge.constexprs)))["BLOCK_S"] == da.MERGE_BLOCK_S


@needs_triton
def test_auto_split_len_covers_the_sms():
    """At batch 1 the (batch x KV head) rows are few: the slices shorten until the grid has two programs per SM
    (not below MIN_SPLIT_LEN); with enough rows the slices stay MAX_SPLIT_LEN long; always a multiple of BLOCK_N."""
    from prefixquant_kernels.triton import decode_attention as da

    def programs(rows, n, sms, bn=16):
        length = da.auto_split_len(rows, n, sms, bn)
        assert length % bn == 0 and da.MIN_SPLIT_LEN <= length <= da.MAX_SPLIT_LEN
        return rows * -(-n // length)
    assert programs(8, 2048, 108) >= 2 * 108 > 8 * (2048 // 256)     # Llama-3-8B, batch 1, 2K, A100
    assert programs(8, 8192, 132) >= 2 * 132
    assert da.auto_split_len(64, 2048, 108, 16) == da.MAX_SPLIT_LEN    # batch 8: the rows fill the GPU already
    assert da.auto_split_len(8, 100, 108, 16) == da.MIN_SPLIT_LEN      # short context: the floor binds
    assert da.auto_split_len(1, 4096, 1, 8) == da.MAX_SPLIT_LEN        # the interpreter (no GPU): as before
