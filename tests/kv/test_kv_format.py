"""The KV formats (kv_format.py): bit layout, agreement with format.py, error bounds of the group-wise format."""
import pytest
import torch

from prefixquant_kernels import format as fmt
from prefixquant_kernels import kv_format as kvf

from .conftest import rand_kv


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_bits_layout(bits, gen):
    # element per*i + j lands in bits bits*j .. bits*j + bits-1 of byte i
    per = 8 // bits
    q = torch.randint(0, 1 << bits, (3, 8 * per), dtype=torch.uint8, generator=gen)
    p = kvf.pack_bits(q, bits)
    assert p.shape == (3, 8)
    for k in range(q.shape[1]):
        field = (p[:, k // per] >> (bits * (k % per))) & ((1 << bits) - 1)
        assert torch.equal(field, q[:, k])
    assert torch.equal(kvf.unpack_bits(p, bits), q)


def test_pack_bits_4_is_pack_int4_order(gen):
    q = torch.randint(-8, 8, (5, 16), dtype=torch.int8, generator=gen)
    assert torch.equal(kvf.pack_bits(q.to(torch.uint8) & 0x0F, 4), fmt.pack_int4(q))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_static_is_format_quantize_per_head(bits, dtype, gen):
    x = rand_kv((2, 3, 7, 64), dtype, gen)
    scale = torch.rand(3, generator=gen) + 0.1
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
    out = kvf.quantize_static(x, scale, bits)
    for h in range(3):
        q = fmt.quantize(x[:, h], float(scale[h]), bits)
        assert torch.equal(out[:, h], fmt.pack_int4(q) if bits == 4 else q)
    deq = kvf.dequantize_static(out, scale, bits)
    q = fmt.unpack_int4(out) if bits == 4 else out
    assert torch.equal(deq, q.float() * scale.reshape(1, 3, 1, 1))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("axis,group", [("token", 32), ("token", 64), ("channel", 4), ("channel", 8)])
def test_groupwise_error_bound(bits, axis, group, gen):
    x = rand_kv((2, 2, 16, 64), torch.float16, gen)
    packed, scale, zero = kvf.quantize_groupwise(x, bits, group, axis)
    assert packed.shape == (2, 2, 16, 64 * bits // 8) and packed.dtype == torch.uint8
    want = (2, 2, 16, 64 // group) if axis == "token" else (2, 2, 16 // group, 64)
    assert scale.shape == zero.shape == want and scale.dtype == zero.dtype == torch.float16
    y = kvf.dequantize_groupwise(packed, scale, zero, bits, group, axis)
    # each value is within half a step of its reconstruction, plus the fp16 rounding of scale and zero
    red = -1 if axis == "token" else -2
    s = scale.float().unsqueeze(red)
    s = s.expand(*s.shape[:-2], *((s.shape[-2], group) if axis == "token" else (group, s.shape[-1])))
    s = s.reshape(x.shape)
    levels = (1 << bits) - 1
    err = (y - x.float()).abs()
    bound = 0.5 * s + (levels + 1) * s * 2 ** -10 + x.float().abs() * 2 ** -10
    assert bool((err <= bound).all())


def test_groupwise_constant_group_and_non_finite():
    x = torch.full((1, 1, 4, 32), 3.0)
    x[0, 0, 1] = float("nan")   # NaN -> 0
    x[0, 0, 2, 0] = float("inf")  # saturates to the fp16 max
    packed, scale, zero = kvf.quantize_groupwise(x, 2, 32, "token")
    y = kvf.dequantize_groupwise(packed, scale, zero, 2, 32, "token")
    assert torch.equal(y[0, 0, 0], x[0, 0, 0])          # a constant group: scale 0, q 0, exactly the zero
    assert torch.equal(y[0, 0, 1], torch.zeros(32))
    assert torch.isfinite(y).all() and abs(float(y[0, 0, 2, 0]) - kvf.FP16_MAX) <= float(scale[0, 0, 2, 0])


def test_channel_axis_is_token_axis_transposed(gen):
    x = rand_kv((1, 2, 8, 64), torch.float32, gen)
    pk, sk, zk = kvf.quantize_groupwise(x, 2, 8, "channel")
    pv, sv, zv = kvf.quantize_groupwise(x.transpose(2, 3), 2, 8, "token")
    assert torch.equal(sk, sv.squeeze(-1).unsqueeze(2))
    assert torch.equal(zk, zv.squeeze(-1).unsqueeze(2))
    assert torch.equal(kvf.unpack_bits(pk, 2), kvf.unpack_bits(pv, 2).transpose(2, 3))


def test_dequant_concat_places_rows(gen):
    prefix = torch.randn(1, 2, 3, 8, generator=gen)
    body = torch.randn(2, 2, 4, 8, generator=gen)
    tail = torch.randn(2, 2, 2, 8, generator=gen)
    tail_pos = torch.tensor([0, 4])
    body_pos = kvf.body_positions(4, tail_pos)
    assert body_pos.tolist() == [i for i in range(6) if i not in (0, 4)]
    out = kvf.dequant_concat(prefix, body, tail, body_pos, tail_pos, torch.float32)
    assert torch.equal(out[:, :, :3], prefix.expand(2, -1, -1, -1))
    assert torch.equal(out[:, :, 3 + tail_pos], tail)
    assert torch.equal(out[:, :, 3 + body_pos], body)
    plain = kvf.dequant_concat(None, body, tail, None, None, torch.float16)
    assert torch.equal(plain, torch.cat([body, tail], dim=2).half())
