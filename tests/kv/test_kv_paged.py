"""The static body in a paged cache (vLLM's layout: uint8 [blocks, H, block_size, 2c], a token-head's K codes then
its V codes): kv_write_paged and kv_decode_paged, both backends, held to the strided ops that define the format.
The write must put exactly kv_quantize's row (of transform_keys' K - offset) at each slot and touch nothing else;
the decode must equal kv_decode_attention over each sequence's body gathered by hand, for every instruction set,
through block boundaries, shuffled block tables, per-sequence lengths (one with no body), bits 4 and 8."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import _extension
from prefixquant_kernels.cache.factory import transform_keys
from prefixquant_kernels.ops.backend import CPU_ISAS, available_backends

from .conftest import rand_kv

BACKENDS = ["reference"] + (["cpu"] if _extension.cpu_available() else [])
ISAS = [CPU_ISAS[b] for b in available_backends() if b.startswith("cpu:")]
needs_cpu = pytest.mark.skipif(not _extension.cpu_available(), reason="C++ extension not built")


def _row_bytes(d: int, bits: int) -> int:
    return d // 2 if bits == 4 else d


def _poisoned_cache(gen, blocks, h, bs, d, bits):
    return torch.randint(0, 256, (blocks, h, bs, 2 * _row_bytes(d, bits)), dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [False, True])
def test_write_puts_kv_quantize_rows_at_their_slots_and_nothing_else(backend, bits, dtype, offset, gen):
    T, H, D, bs, blocks = 11, 3, 34, 5, 9
    qkv = rand_kv((T + 2, 3 * H, D), dtype, gen)            # key / value: strided views of one projection output
    key, value = qkv[:, H:2 * H], qkv[:, 2 * H:]
    if offset:                                              # and V with strides of its own
        value = value.contiguous()
    ks, vs = (torch.rand(H, generator=gen) * 0.5 + 0.05 for _ in range(2))
    mu = torch.randn(H, D, generator=gen) if offset else None
    slots = torch.randperm(blocks * bs, generator=gen)[:T]
    slots[[2, 7]] = -1                                     # padding: skipped
    cache = _poisoned_cache(gen, blocks, H, bs, D, bits)
    before = cache.clone()
    pqk.kv_write_paged(key, value, cache, slots, ks, vs, bits, key_offset=mu, backend=backend)
    k = transform_keys(key[:T].transpose(0, 1)[None], None, mu)                   # [1, H, T, D], K - mu
    kc = pqk.kv_quantize(k, ks, bits, backend="reference")[0].view(torch.uint8)    # [H, T, c]
    vc = pqk.kv_quantize(value[:T].transpose(0, 1)[None], vs, bits, backend="reference")[0].view(torch.uint8)
    want = before.clone()
    c = _row_bytes(D, bits)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want[s // bs, :, s % bs, :c], want[s // bs, :, s % bs, c:] = kc[:, t], vc[:, t]
    assert torch.equal(cache, want)
    assert int((cache != before).sum()) > 0


def _paged_case(gen, B, Hkv, G, P, bodies, D, bits, bs, q_dtype=torch.float32):
    """A cache holding B sequences' bodies (lengths ``bodies``) in shuffled blocks after a P-position prefix, and
    the strided bodies it was made from: (q, pk, pv, cache, table, seq_lens, ks, vs, [(kp, vp) per sequence])."""
    width = max(-(-(P + n) // bs) for n in bodies) + 1
    blocks = B * width + 3
    order = torch.randperm(blocks, generator=gen)
    table = order[:B * width].view(B, width).to(torch.int32)
    ks, vs = (torch.rand(Hkv, generator=gen) * 0.5 + 0.05 for _ in range(2))
    cache = _poisoned_cache(gen, blocks, Hkv, bs, D, bits)
    c = _row_bytes(D, bits)
    per_seq = []
    for b, n in enumerate(bodies):
        kp, vp = (pqk.kv_quantize(rand_kv((1, Hkv, n, D), torch.float32, gen), s, bits, backend="reference")
                  for s in (ks, vs))
        for j in range(n):
            p = P + j
            blk, off = int(table[b, p // bs]), p % bs
            cache[blk, :, off, :c] = kp[0, :, j].view(torch.uint8)
            cache[blk, :, off, c:] = vp[0, :, j].view(torch.uint8)
        per_seq.append((kp, vp))
    pk, pv = (rand_kv((1, Hkv, P, D), torch.bfloat16, gen) for _ in range(2))
    q = (torch.randn(B, Hkv * G, D, generator=gen) * 3).to(q_dtype)
    lens = torch.tensor([P + n for n in bodies], dtype=torch.int32)
    return q, pk, pv, cache, table, lens, ks, vs, per_seq


def _want(q, pk, pv, ks, vs, per_seq, bits, sm):
    """Each sequence on its own through kv_decode_attention (the strided op that defines the result)."""
    out = []
    for b, (kp, vp) in enumerate(per_seq):
        if pk.shape[2] + kp.shape[2] == 0:
            out.append(torch.zeros_like(q[b:b + 1]))
            continue
        out.append(pqk.kv_decode_attention(q[b:b + 1], pk, pv, kp, vp, ks, vs, bits, sm, backend="reference"))
    return torch.cat(out)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("B,Hkv,G,P,bodies,D,bs", [(3, 3, 3, 2, (1, 40, 200), 64, 16), (2, 2, 1, 0, (0, 9), 32, 4),
                                                   (1, 1, 5, 3, (130,), 48, 32), (2, 2, 2, 1, (17, 3), 6, 8)])
def test_decode_equals_each_sequence_on_its_own(bits, B, Hkv, G, P, bodies, D, bs, gen):
    q, pk, pv, cache, table, lens, ks, vs, per_seq = _paged_case(gen, B, Hkv, G, P, bodies, D, bits, bs)
    sm = D ** -0.5
    want = _want(q, pk, pv, ks, vs, per_seq, bits, sm)
    pre = (pk, pv) if P else (None, None)
    ref = pqk.kv_decode_paged(q, *pre, cache, table, lens, ks, vs, bits, sm, backend="reference")
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    for isa in ISAS:
        got = torch.full_like(want, float("nan"))
        got.copy_(torch.ops.pqk.kv_decode_paged_static(q, *pre, cache, table, lens, ks, vs, bits, sm, isa))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@needs_cpu
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_decode_16bit_queries_int64_tables(q_dtype, gen):
    q, pk, pv, cache, table, lens, ks, vs, per_seq = _paged_case(gen, 2, 2, 2, 2, (50, 7), 64, 4, 16, q_dtype)
    want = _want(q, pk, pv, ks, vs, per_seq, 4, 0.125)
    got = pqk.kv_decode_paged(q, pk, pv, cache, table.long(), lens.long(), ks, vs, 4, 0.125, backend="cpu")
    assert got.dtype == q_dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * float(want.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument_and_leaves_the_cache(backend, gen):
    H, D, bs, blocks = 2, 16, 4, 3
    key = torch.randn(5, H, D)
    ks = torch.ones(H)
    cache = _poisoned_cache(gen, blocks, H, bs, D, 4)
    before = cache.clone()
    for slots, match in ((torch.tensor([0, 1, 12]), "slot_mapping holds slot 12"),
                         (torch.tensor([0, 1], dtype=torch.int32), "slot_mapping"),
                         (torch.arange(6), "6 slots for 5 tokens")):
        with pytest.raises((ValueError, TypeError), match=match):
            pqk.kv_write_paged(key, key, cache, slots, ks, ks, 4, backend=backend)
    with pytest.raises(ValueError, match=r"cache must be \[blocks, 2, block_size > 0, 16\]"):
        pqk.kv_write_paged(key, key, cache[..., :8], torch.arange(2), ks, ks, 4, backend=backend)
    with pytest.raises(ValueError, match="key_offset must be"):
        pqk.kv_write_paged(key, key, cache, torch.arange(2), ks, ks, 4, key_offset=torch.zeros(H, D + 1),
                           backend=backend)
    with pytest.raises(ValueError, match="scale"):
        pqk.kv_write_paged(key, key, cache, torch.arange(2), -ks, ks, 4, backend=backend)
    assert torch.equal(cache, before)
    q = torch.randn(2, 4, D)
    table = torch.tensor([[0, 1], [2, 7]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 7"):
        pqk.kv_decode_paged(q, None, None, cache, table, torch.tensor([3, 6]), ks, ks, 4, backend=backend)
    # a sequence without a body reads no block: its table row is not checked (vLLM pads rows with anything)
    empty = pqk.kv_decode_paged(q, None, None, cache, torch.tensor([[-5, 99], [0, 1]], dtype=torch.int32),
                                torch.tensor([0, 3]), ks, ks, 4, backend=backend)
    assert torch.equal(empty[0], torch.zeros_like(q[0]))
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 9"):
        pqk.kv_decode_paged(q, None, None, cache, table, torch.tensor([9, 2]), ks, ks, 4, backend=backend)
    with pytest.raises(ValueError, match="head count"):
        pqk.kv_decode_paged(q[:, :3], None, None, cache, table, torch.tensor([3, 2]), ks, ks, 4, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        pqk.kv_decode_paged(q, None, None, cache, table, torch.tensor([3, 2]), ks, ks, 4, backend="triton")


@needs_cpu
def test_the_kernels_check_what_they_read_and_write(gen):
    """The C++ ops (which the vLLM plugin calls directly) refuse a slot or block outside the cache: no stray write
    or read, the cache unchanged."""
    H, D, bs, blocks = 2, 16, 4, 3
    key, ks = torch.randn(3, H, D), torch.ones(H)
    cache = _poisoned_cache(gen, blocks, H, bs, D, 4)
    before = cache.clone()
    with pytest.raises(RuntimeError, match=r"slot_mapping\[2\] = 12"):
        torch.ops.pqk.kv_write_paged_static(key, key, cache, torch.tensor([0, 1, 12]), ks, ks, 4)
    assert torch.equal(cache, before)
    q, table = torch.randn(1, 2, D), torch.tensor([[1, -1]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"block_table\[0, 1\] = -1"):
        torch.ops.pqk.kv_decode_paged_static(q, None, None, cache, table, torch.tensor([5]), ks, ks, 4, 0.25)
    with pytest.raises(RuntimeError, match=r"seq_lens\[0\] = 9"):
        torch.ops.pqk.kv_decode_paged_static(q, None, None, cache, table, torch.tensor([9]), ks, ks, 4, 0.25)


@needs_cpu
def test_opcheck(gen):
    q, pk, pv, cache, table, lens, ks, vs, _ = _paged_case(gen, 2, 2, 2, 1, (5, 9), 16, 4, 4)
    torch.library.opcheck(torch.ops.pqk.kv_decode_paged_static.default,
                          (q, pk, pv, cache, table, lens, ks, vs, 4, 0.25))
    torch.library.opcheck(torch.ops.pqk.kv_decode_paged.default,
                          (q, pk, pv, cache, table, lens, ks, vs, 4, 0.25, "cpu"))
    key = torch.randn(4, 2, 16)
    torch.library.opcheck(torch.ops.pqk.kv_write_paged_static.default,
                          (key, key, cache, torch.tensor([0, 5, -1, 9]), ks, vs, 4, None))
    torch.library.opcheck(torch.ops.pqk.kv_write_paged.default,
                          (key, key, cache, torch.tensor([0, 5, -1, 9]), ks, vs, 4, None, "cpu"))
