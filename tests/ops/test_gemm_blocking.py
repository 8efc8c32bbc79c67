"""The CPU prefill GEMM (csrc/cpu/gemm.cpp gemm_prefill + x86_gemm_zmm.h / x86_gemm_ymm.h, M >= 64, and from M = 8 on
zmm / AMX for a small W): W unpacked once per panel, K blocked, A panel blocked by K. Bit-exact with the reference
across every block boundary: the block sizes are shrunk with PQK_PREFILL_KC / PQK_PREFILL_ROWS / PQK_PREFILL_SUBROWS
/ PQK_PREFILL_CHUNK (read on every call) so small shapes cross many K blocks, M-blocks, L2 slices, chunks and micro
panels, with tails that are not multiples of 8 (k per packed dword), 4 (k per vpdpbusd lane), 48 (W columns per micro
panel) or 8 (A rows per micro-kernel). The AVX2 table has its own prefill pieces for W4 (x86_gemm_ymm.h: 16 columns,
6 rows, int16 partial sums), which "cpu:avx2" runs on every x86-64 CPU; W8 there, and the portable scalar table, run
the tile path (still a bit-exactness check)."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import format as fmt, reference

from ..conftest import KERNEL_BACKENDS, rand_int

CPU_BACKENDS = [b for b in KERNEL_BACKENDS if b.startswith("cpu:")]
# (M, N, K): M >= 64 (the prefill path); N, K off every tile / block size
SHAPES = [(64, 48, 8), (64, 1, 2), (67, 101, 1030), (130, 200, 522), (72, 49, 4098), (65, 97, 1542)]
# (PQK_PREFILL_KC, PQK_PREFILL_ROWS, PQK_PREFILL_SUBROWS, PQK_PREFILL_CHUNK, PQK_PREFILL_SPLIT): defaults, then
# blocks small enough that every shape crosses several; then L2 sub-blocks (slices of rows run over a chunk of micro
# panels unpacked at once) with the threads splitting N, with one and with many K blocks; then the threads splitting
# M (W unpacked once for all, each thread's rows slice by slice; a bf16 x with a static scale builds the next slice
# inside the micro-kernel), and M asked for with many K blocks (it falls back to the N split).
BLOCKS = [(None, None, None, None, None), ("8", "9", None, None, None), ("24", None, None, None, None),
          ("64", "16", None, None, None), ("520", "64", None, None, None), (None, None, "16", "96", "n"),
          ("24", "64", "8", "48", "n"), ("64", None, "24", "144", "n"), (None, None, "16", None, "m"),
          (None, None, "40", None, "m"), ("24", None, "16", None, "m")]
BITS = [(4, 4), (8, 4), (4, 8), (8, 8)]  # (a_bits, w_bits)
ENV = ("PQK_PREFILL_KC", "PQK_PREFILL_ROWS", "PQK_PREFILL_SUBROWS", "PQK_PREFILL_CHUNK", "PQK_PREFILL_SPLIT")


def _set_env(monkeypatch, values):
    for name, v in zip(ENV, values):
        if v is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, v)


@pytest.fixture(params=BLOCKS, ids=lambda b: f"kc{b[0]}-rows{b[1]}-sub{b[2]}-chunk{b[3]}-split{b[4]}")
def blocks(request, monkeypatch):
    _set_env(monkeypatch, request.param)
    return request.param


def _exact(a, w):
    return (a.long().unsqueeze(1) * w.long().unsqueeze(0)).sum(-1)


def _check_integer_part(backend, M, N, K, a_bits, w_bits, gen):
    """Random full-range A [M, K] and W [N, K] through int4_matmul with unit scales: the int32 sums, exactly."""
    a, w = rand_int((M, K), a_bits, gen), rand_int((N, K), w_bits, gen)
    ap = fmt.pack_int4(a) if a_bits == 4 else a
    wp = fmt.pack_int4(w) if w_bits == 4 else w
    y = pqk.int4_matmul(ap, wp, 1.0, torch.ones(N), out_dtype=torch.float32, backend=backend)
    # |acc| < 2^24 for these random operands (their sums spread ~sqrt(K) x 5e3): float32 holds them exactly
    assert torch.equal(y.double(), _exact(a, w).double())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("a_bits,w_bits", BITS)
def test_prefill_long_k_default_blocks(backend, a_bits, w_bits, gen, monkeypatch):
    """K long enough that few rows fit L2 beside a micro panel: with the default blocks a table with
    PrefillKernels::min_slice_rows (AMX: 256) cuts K into blocks (3 here with a 2 MB L2) and runs each slice K block
    by K block over its chunk of several panels per thread, int32 partial sums between; N ends in a partial panel. The
    integer part exact."""
    _set_env(monkeypatch, BLOCKS[0])
    _check_integer_part(backend, 300, 200, 8194, a_bits, w_bits, gen)


@pytest.mark.skipif("cpu:amx" not in CPU_BACKENDS, reason="no AMX on this CPU")
@pytest.mark.parametrize("a_bits,w_bits", BITS)
def test_amx_long_k_one_block_forced(a_bits, w_bits, gen, monkeypatch):
    """The same long K with one K block forced (PQK_PREFILL_KC): too few rows fit L2 beside a panel, so the AMX table
    streams slices of min_slice_rows rows past one micro panel at a time (docs/PERF.md step 26's scheme, kept for
    tuning). The integer part exact."""
    _set_env(monkeypatch, ("8256", None, None, None, None))
    _check_integer_part("cpu:amx", 300, 200, 8194, a_bits, w_bits, gen)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("a_bits,w_bits", BITS)
def test_prefill_integer_part_exact(blocks, backend, M, N, K, a_bits, w_bits, gen):
    if w_bits == 4 or a_bits == 4:
        K += K % 2
    _check_integer_part(backend, M, N, K, a_bits, w_bits, gen)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("a_bits,w_bits", BITS)
@pytest.mark.parametrize("pattern", ["mixed", "largest_product"])
def test_prefill_extremes(blocks, backend, a_bits, w_bits, pattern):
    """Every operand at the end of its range (the a + 128 / -128 colsum correction at its largest), one K long
    enough that the biased sum sum (a + 128) w leaves int16 range many times over. "largest_product": a = max
    (a + 128 = 255 for A8) and w = min everywhere, so every vpmaddubsw pair is -4080 and the AVX2 kernel's int16
    partial sums (x86_gemm_ymm.h, kPf2Flush of them) sit at their bound: one step more would overflow."""
    M, N, K = 66, 50, 2050
    lo_a, lo_w = -(1 << (a_bits - 1)), -(1 << (w_bits - 1))
    a = torch.full((M, K), lo_a, dtype=torch.int8)
    w = torch.full((N, K), lo_w, dtype=torch.int8)
    if pattern == "largest_product":
        a.fill_(-lo_a - 1)
    else:
        a[1::2] = -lo_a - 1
        a[:, ::3] = lo_a
        w[::3] = -lo_w - 1
    ap = fmt.pack_int4(a) if a_bits == 4 else a
    wp = fmt.pack_int4(w) if w_bits == 4 else w
    y = pqk.int4_matmul(ap, wp, 1.0, torch.ones(N), out_dtype=torch.float32, backend=backend)
    assert torch.equal(y.double(), _exact(a, w).double())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("a_bits,w_bits", [(4, 4), (8, 4), (8, 8)])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_prefill_quant_linear_bits(blocks, backend, dtype, a_bits, w_bits, static, bias, gen):
    """The fused path: float x quantized into the K-blocked panel, the vectorized epilogue (bf16 rounding, fp16
    through the scalar store), bias or not, static or per-token scales: the reference's bits exactly."""
    M, N, K = 71, 103, 1034
    x = (torch.randn(M, K, generator=gen) * 3).to(dtype)
    x[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0]).to(dtype)
    wq = rand_int((N, K), w_bits, gen)
    w = fmt.pack_int4(wq) if w_bits == 4 else wq
    w_scale = torch.rand(N, generator=gen) + 0.01
    b = torch.randn(N, generator=gen) * 100 if bias else None
    a_scale = torch.tensor(0.05) if static else None
    want = reference.quant_linear(x, w, w_scale, a_scale, a_bits, b)
    got = pqk.quant_linear(x, w, w_scale, a_scale, a_bits, b, backend=backend)
    assert got.dtype == want.dtype
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("M", [8, 9, 31, 32, 33, 63])
@pytest.mark.parametrize("a_bits,w_bits", [(4, 4), (8, 4), (8, 8)])
def test_small_batches_through_the_prefill_tables(backend, M, a_bits, w_bits, gen):
    """8 <= M < 64 (a decode step of several sequences): the zmm / AMX tables take these M for a small W
    (PrefillKernels::small_m; from M = 32 for any W), the others the tiles. Either way the reference's bits: float
    x, static scale, bias, bf16 out, K and N off every block size."""
    N, K = 101, 1030
    x = (torch.randn(M, K, generator=gen) * 3).to(torch.bfloat16)
    wq = rand_int((N, K), w_bits, gen)
    w = fmt.pack_int4(wq) if w_bits == 4 else wq
    w_scale, b = torch.rand(N, generator=gen) + 0.01, torch.randn(N, generator=gen) * 100
    want = reference.quant_linear(x, w, w_scale, torch.tensor(0.05), a_bits, b)
    got = pqk.quant_linear(x, w, w_scale, torch.tensor(0.05), a_bits, b, backend=backend)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    _check_integer_part(backend, M, N, K, a_bits, w_bits, gen)


def _near_half_integers(qmin, qmax, scale, dtype):
    """x with x / scale on and a few ulp either side of every half-integer (and integer) from qmin - 1.5 to qmax + 1.5:
    where fl(x * (1 / scale)) and fl(x / scale) round to different integers if anywhere."""
    v = torch.arange(2 * qmin - 3, 2 * qmax + 4, dtype=torch.float64) / 2
    x0 = (v * scale).to(dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    steps = torch.arange(-3, 4, dtype=bits)
    x = (x0.view(bits).unsqueeze(1) + steps).view(dtype).flatten()   # the neighbours, by bit pattern
    return torch.cat([x, -x])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("a_bits", [4, 8])
@pytest.mark.parametrize("scale", [0.1, 0.0371, 1 / 3, 0.7, 1.7e-3, 2.5e-39, 1.0e38])
def test_prefill_quantize_near_half_integers(backend, dtype, a_bits, scale):
    """The fused static quantize of the prefill panel (x86_gemm_zmm.h pf_quant16, the portable quantize_row + pack
    elsewhere): x / scale on and within 3 ulp of every half-integer of the range (ties to even, the clamp edges),
    for ordinary scales and extreme ones (2.5e-39 is subnormal, its reciprocal overflows; 1e38's is subnormal),
    must quantize exactly as the reference does. W is the identity, so every output is one quantized value times a
    power of two: a value off by one shows in any output dtype. Planted bug (x * (1 / scale) for the division, a
    version tried in step 19 without its redo near half-integers): 11 failures."""
    qmax = (1 << (a_bits - 1)) - 1
    if dtype != torch.float32 and not (1e-4 < scale < 1e3):
        pytest.skip("the scale's range times its half-integers is not representable in a 16-bit float")
    vals = _near_half_integers(-qmax - 1, qmax, scale, dtype)
    vals = vals[torch.isfinite(vals)]
    K = 70                                   # 4 whole zmm of 16 and a masked tail of 6
    rows = max(64, -(-vals.numel() // K))    # M >= 64: the prefill path
    x = torch.zeros(rows * K, dtype=dtype)
    x[: vals.numel()] = vals
    x = x.view(rows, K)
    w = fmt.pack_int4(torch.eye(K, dtype=torch.int8))
    a_scale = torch.tensor(scale, dtype=torch.float32)
    e = float(torch.clamp(-torch.round(torch.log2(a_scale)), -126, 126))
    w_scale = torch.full((K,), 2.0 ** e)     # a_scale * w_scale near 1
    want = reference.quant_linear(x, w, w_scale, a_scale, a_bits, None)
    got = pqk.quant_linear(x, w, w_scale, a_scale, a_bits, None, backend=backend)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(bits), want.view(bits))


# Scales for the panel quantize (x86_gemm_zmm.h pf_quant16): all-ones significands (the hardest reciprocals, for a
# version that multiplies), powers of two far out and one float either side, ordinary ones, and two at the ends of
# the range (a subnormal scale, whose reciprocal overflows, and 1e38, whose reciprocal is subnormal).
_EDGE = [2.0 ** -100, 2.0 ** 100]
EDGE_SCALES = (_EDGE + [float(torch.tensor(s).nextafter(torch.tensor(t))) for s, t in ((2.0 ** -100, 0.0),
               (2.0 ** 100, float("inf")), (2.0 ** -100, 1.0), (2.0 ** 100, 0.0))]
               + [float(torch.tensor(0x00FFFFFF, dtype=torch.int32).view(torch.float32)) * 2.0 ** e for e in (-10, 100, 120)]
               + [(2 - 2 ** -23) * 2.0 ** e for e in (-7, -1, 0, 3)] + [0.05, 0.1, 1 / 3, 0.0371, 1.7e-3, 6.1e-5, 2.5e-39, 1.0e38])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale", EDGE_SCALES, ids=lambda s: f"{s:.9g}")
@pytest.mark.parametrize("path", ["panel", "side"])
def test_prefill_quantize_every_16bit_value(backend, dtype, scale, path, gen, monkeypatch):
    """Every bf16 / fp16 bit pattern (NaN, infinities and subnormals included; 65536 fp32 patterns drawn at random
    for fp32) quantized by the prefill panel with scales from the ordinary to the extreme: bit-exact with the
    reference's division. W is the identity and a_scale * w_scale a power of two near 1, so one quantized value
    off by one shows in the output. "side": the M split with 8-row slices, so a bf16 x is quantized by the
    micro-kernel's side job (and the rest of it by PrefillKernels::side) for all but the first slice of each thread.
    Planted bugs: pf_quant16 without its NaN -> 0 fails; pf_quant32_bf16's bytes without their + 128, 72 failures
    (with test_prefill_m_split)."""
    if path == "side":
        _set_env(monkeypatch, (None, None, "16", None, "m"))
    if dtype == torch.float32:
        x = torch.randint(-2 ** 31, 2 ** 31, (65536,), dtype=torch.int64, generator=gen).to(torch.int32).view(torch.float32)
    else:
        x = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    K = 256
    x = x.view(-1, K)                         # 256 rows: the prefill path
    w = fmt.pack_int4(torch.eye(K, dtype=torch.int8))
    a_scale = torch.tensor(scale, dtype=torch.float32)
    e = float(torch.clamp(-torch.round(torch.log2(a_scale)), -126, 126))
    w_scale = torch.full((K,), 2.0 ** e)
    for a_bits in (4, 8):
        want = reference.quant_linear(x, w, w_scale, a_scale, a_bits, None)
        got = pqk.quant_linear(x, w, w_scale, a_scale, a_bits, None, backend=backend)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(got.view(bits), want.view(bits)), a_bits


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,static,K", [(torch.bfloat16, True, 64), (torch.bfloat16, True, 256),
                                            (torch.bfloat16, True, 1056), (torch.bfloat16, True, 80),
                                            (torch.bfloat16, False, 256), (torch.float16, True, 256),
                                            (torch.float32, True, 96)])
@pytest.mark.parametrize("sub", ["16", "24", None])
@pytest.mark.parametrize("a_bits", [4, 8])
def test_prefill_m_split(backend, dtype, static, K, sub, a_bits, gen, monkeypatch):
    """The M split (gemm.cpp gemm_prefill_msplit) against the reference, NaN / infinities / huge values in rows of
    every slice: a bf16 x with a static scale and K % 32 == 0 builds each next slice inside the micro-kernel (K = 64
    with 17 micro panels: the kernels finish it; K = 256 / 1056: PrefillKernels::side finishes what they leave);
    K = 80, per-token scales, fp16 and fp32 build every slice before its kernels. M = 203 leaves the threads ranges
    and slices that are not multiples of 8 rows. K = 64 / 256 build the slices tiled on the zmm table
    (PrefillKernels::m_split_tiled), K = 1056 / 80 / 96 row-major. Planted bugs: the side job writing the slice it
    reads (not the next one), and the next slice's job one row short: 33 failures each (with the "side" case of the
    every-16-bit test); the tiled kernel's 64-k pieces 512 bytes apart (not 1 KB), 89 failures in this file; the
    side job writing a tiled slice row-major, 33."""
    _set_env(monkeypatch, (None, None, sub, None, "m"))
    M, N = 203, 800 if K == 64 else 101
    x = (torch.randn(M, K, generator=gen) * 3).to(dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, -0.0]).to(dtype)
    rows = torch.randint(0, M, (40,), generator=gen)
    cols = torch.randint(0, K, (40,), generator=gen)
    x[rows, cols] = special[torch.arange(40) % special.numel()]
    wq = rand_int((N, K), 4, gen)
    w, w_scale = fmt.pack_int4(wq), torch.rand(N, generator=gen) + 0.01
    b = torch.randn(N, generator=gen)
    a_scale = torch.tensor(0.05) if static else None
    want = reference.quant_linear(x, w, w_scale, a_scale, a_bits, b)
    got = pqk.quant_linear(x, w, w_scale, a_scale, a_bits, b, backend=backend)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(bits), want.view(bits))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("a_bits,w_bits", BITS)
@pytest.mark.parametrize("per_row,K", [(False, 64), (True, 64), (False, 256), (True, 1056), (True, 80)])
@pytest.mark.parametrize("sub", ["16", "24"])
def test_prefill_m_split_quantized_a(backend, a_bits, w_bits, per_row, K, sub, gen, monkeypatch):
    """A already quantized (int8, or packed int4 as a fused requant epilogue writes it) through the M split: with
    K % 32 == 0 the micro-kernel's side job builds every slice after each thread's first (K = 64 with 17 micro panels:
    the kernels finish it; K = 256 / 1056: PrefillKernels::side finishes what they leave), each slice's row scales
    taken per row or static; K = 80 builds each slice before its kernels. Full-range A and W, M = 203 (ranges and
    slices off multiples of 8 rows), the thread scratch left dirty by a call of another shape first. Planted bugs: the
    int4 lookup's two halves swapped (120.. first), the side job's int4 source advanced 32 bytes per block, and the
    slices' row scales left at the first slice's: each fails here."""
    _set_env(monkeypatch, (None, None, sub, None, "m"))
    M, N = 203, 800 if K == 64 else 101
    a, w = rand_int((M, K), a_bits, gen), rand_int((N, K), w_bits, gen)
    ap = fmt.pack_int4(a) if a_bits == 4 else a
    wp = fmt.pack_int4(w) if w_bits == 4 else w
    a_scale = torch.rand(M, generator=gen) + 0.01 if per_row else torch.tensor(0.037)
    w_scale, b = torch.rand(N, generator=gen) + 0.01, torch.randn(N, generator=gen)
    pqk.int4_matmul(ap[:100], wp, a_scale[:100] if per_row else a_scale, w_scale, b, backend=backend)
    for out_dtype in (torch.float32, torch.bfloat16):
        want = reference.int4_matmul(ap, wp, a_scale, w_scale, b, out_dtype)
        got = pqk.int4_matmul(ap, wp, a_scale, w_scale, b, out_dtype=out_dtype, backend=backend)
        bits = torch.int32 if out_dtype == torch.float32 else torch.int16
        assert torch.equal(got.view(bits), want.view(bits)), out_dtype
