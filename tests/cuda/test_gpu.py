"""libpqk_cuda.so called through ctypes. The argument checks run before any CUDA call, so they are tested here
without a GPU; the kernels run only where torch sees a CUDA device (skipped otherwise)."""
from __future__ import annotations

import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import format as fmt
from prefixquant_kernels import hadamard, reference, selftest
from prefixquant_kernels.ops import cuda_library, cuda_ops

from ..conftest import rand_int
from .test_binding import rmsnorm_reference

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def lib(cuda_lib_path):
    return selftest.load_library(cuda_lib_path)


@pytest.mark.parametrize("m,n,k,epi,want", [
    (4, 8, 48, 0, -2),     # K % 32 != 0: the caller must pad K with zeros (int4_matmul raises)
    (0, 8, 64, 0, -1),     # empty
    (4, 6, 64, 4, -4),     # silu-mul requant needs N % 4 == 0
    (4, 8, 64, 9, -5),     # unknown epilogue
])
def test_bad_arguments_return_status(lib, m, n, k, epi, want):
    st = lib.pqk_int4_gemm(64, 64, 64, 64, 0, 64, None, 1.0, m, n, k, epi, -1, 1, None, None)
    assert st == want
    assert lib.pqk_cuda_error_string(st).decode()


@needs_gpu
@pytest.mark.parametrize("m", [1, 3, 17, 118, 300])
@pytest.mark.parametrize("config", [-1, 0, 1, 2, 3])   # 3: the decode GEMV (M <= 4)
def test_gemm_bit_exact_fp32(lib, m, config):
    if config == 3 and m > 4:
        pytest.skip("the GEMV takes M <= 4")
    g = torch.Generator().manual_seed(m)
    n, k = 72, 160
    a = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, generator=g)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    a_s, w_s, b = torch.rand(m, generator=g) + 0.01, torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g)
    out = torch.empty(m, n, device="cuda")
    selftest.gemm(lib, a.cuda(), w.cuda(), a_s.cuda(), w_s.cuda(), b.cuda(), out, epilogue=2, config=config)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), reference.int4_matmul(a, w, a_s, w_s, b, torch.float32))


@needs_gpu
@pytest.mark.parametrize("m", [1, 5, 16, 17, 130, 300])
@pytest.mark.parametrize("config", [-1, 0, 1, 2, 3, 10, 11, 12])  # auto; own decode/mid/prefill; GEMV; CUTLASS
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_token,bias", [(True, True), (False, False)])
def test_gemm_16bit_out_every_tile_bit_exact(lib, m, config, out_dtype, per_token, bias):
    # N = 264 (a multiple of 8, not of any tile), K = 416 (K % 128 == 32: a partial last CUTLASS stage).
    major, minor = torch.cuda.get_device_capability()
    if config >= 10 and not 80 <= 10 * major + minor < 90:
        pytest.skip("the CUTLASS tiles run on sm_80..89 only")
    if config == 3 and m > 4:
        pytest.skip("the GEMV takes M <= 4")
    g = torch.Generator().manual_seed(1000 * m + config)
    n, k = 264, 416
    a = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, generator=g)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    a_s = torch.rand(m if per_token else 1, generator=g) * 0.1 + 0.01
    w_s, b = torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g) if bias else None
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device="cuda")  # poisoned: a missed store shows
    selftest.gemm(lib, a.cuda(), w.cuda(), a_s.cuda(), w_s.cuda(), None if b is None else b.cuda(), out,
                  epilogue=0 if out_dtype == torch.float16 else 1, config=config)
    torch.cuda.synchronize()
    want = reference.int4_matmul(a, w, a_s if per_token else a_s[0], w_s, b, out_dtype)
    assert torch.equal(out.cpu(), want)


@needs_gpu
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("splits", [2, 7, 16])
@pytest.mark.parametrize("epilogue", [0, 2, 4])
def test_split_k_decode_bit_exact(lib, m, splits, epilogue):
    """Split-K (atomic int32 sums, the last block's epilogue) equals the reference bit for bit (silu-mul: the
    device expf's one-step caveat)."""
    g = torch.Generator().manual_seed(100 * m + splits)
    n, k = 264, 1056   # 17 K tiles: uneven shares
    a = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, generator=g)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    a_s, w_s = torch.rand(m, generator=g) * 0.1 + 0.01, torch.rand(n, generator=g) * 0.01 + 1e-3
    if epilogue == 4:
        out = torch.full((m, n // 4), 0xEE, dtype=torch.uint8, device="cuda")
        y = reference.int4_matmul(a, w, a_s, w_s, None, torch.float32)
        s = float(reference.silu_mul(y[:, 0::2], y[:, 1::2]).abs().max()) / 9
        selftest.gemm(lib, a.cuda(), w.cuda(), a_s.cuda(), w_s.cuda(), None, out, epilogue=4, config=0, out_scale=s,
                      split_k=splits)
        want = reference.int4_matmul_silu_mul_requant(a, w, a_s, w_s, None, s)
        d = (fmt.unpack_int4(out.cpu()).int() - fmt.unpack_int4(want).int()).abs()
        assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 1e-2
        return
    dt = torch.float16 if epilogue == 0 else torch.float32
    out = torch.full((m, n), float("nan"), dtype=dt, device="cuda")
    selftest.gemm(lib, a.cuda(), w.cuda(), a_s.cuda(), w_s.cuda(), None, out, epilogue=epilogue, config=0,
                  split_k=splits)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), reference.int4_matmul(a, w, a_s, w_s, None, dt))


# ---- the torch binding (prefixquant_kernels/ops/cuda_ops.py): backend="cuda" through torch.ops.pqk -----------------
# Every op against the reference (computed on the CPU from the same inputs) over random shapes with odd M/N and
# K % 32 != 0 (the binding pads K). Integer paths and the fp32 epilogue are bit-exact by construction.


needs_binding = pytest.mark.skipif(not cuda_library.cuda_available(),
                                   reason=f"needs the CUDA backend ({cuda_library.unavailable_reason()})")
GPU_SHAPES = [(1, 4096, 4096), (3, 130, 96), (17, 5, 160), (118, 77, 62), (300, 257, 1024)]  # (M, N, K)
FLOATS = [torch.float16, torch.bfloat16, torch.float32]


def test_auto_picks_cuda_for_cuda_tensors():
    if not cuda_library.cuda_available():
        pytest.skip(f"no CUDA backend here: {cuda_library.unavailable_reason()}")
    from prefixquant_kernels.ops.backend import resolve

    assert resolve("auto", torch.device("cuda"), "op").kind == "cuda"


@needs_binding
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(1, 2), (5, 124), (3, 7, 4096), (257, 1000)])
def test_quantizers_match_reference(gen, dtype, bits, shape):
    x = (torch.randn(shape, generator=gen) * 20).to(dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)  # the full value range
    x.view(-1)[:3] = special[:x.numel()]
    xd = x.cuda()
    q = pqk.quantize_static(xd, 0.37, bits, backend="cuda")
    assert torch.equal(q.cpu(), pqk.quantize_static(x, 0.37, bits, backend="reference"))
    q, s = pqk.quantize_per_token(xd, bits, backend="cuda")
    q_ref, s_ref = pqk.quantize_per_token(x, bits, backend="reference")
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@needs_binding
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 64), (5, 124), (3, 7, 4096)])
def test_public_rmsnorm_quantize_and_hadamard_ops(gen, dtype, shape):
    """pqk.rmsnorm_quantize / pqk.hadamard_transform with backend="cuda" and "auto" on CUDA tensors: the kernels."""
    x = (torch.randn(shape, generator=gen) * 4).to(dtype)
    wt = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype)
    q_ref, y_ref = pqk.rmsnorm_quantize(x, wt, 0.05, 4, 1e-5, return_normed=True, backend="reference")
    for be in ("cuda", "auto"):
        q, y = pqk.rmsnorm_quantize(x.cuda(), wt.cuda(), 0.05, 4, 1e-5, return_normed=True, backend=be)
        assert (fmt.unpack_int4(q.cpu()).int() - fmt.unpack_int4(q_ref).int()).abs().max() <= 1
        torch.testing.assert_close(y.cpu().float(), y_ref.float(), rtol=1e-2, atol=1e-3)
    n = 1536 if shape[-1] != 64 else 64
    h = torch.randn(*shape[:-1], n, generator=gen).to(dtype)
    got = pqk.hadamard_transform(h.cuda(), backend="cuda").cpu()
    torch.testing.assert_close(got.float(), pqk.hadamard_transform(h, backend="reference").float(), rtol=1e-2,
                               atol=1e-2)


@needs_binding
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("per_token", [False, True])
def test_int4_matmul_matches_reference(gen, m, n, k, out_dtype, per_token):
    a, w = fmt.pack_int4(rand_int((m, k), 4, gen)), fmt.pack_int4(rand_int((n, k), 4, gen))
    a_s = torch.rand(m, generator=gen) + 0.01 if per_token else 0.05
    w_s, b = torch.rand(n, generator=gen) * 0.01 + 1e-3, torch.randn(n, generator=gen)
    dev = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    got = pqk.int4_matmul(a.cuda(), w.cuda(), dev(a_s), w_s.cuda(), b.cuda(), out_dtype, backend="cuda")
    assert torch.equal(got.cpu(), pqk.int4_matmul(a, w, a_s, w_s, b, out_dtype, backend="reference"))


@needs_binding
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (3, 132, 96), (17, 8, 160), (118, 76, 62), (300, 264, 1024)])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_requant_ops_match_reference(gen, m, n, k, silu, per_token):
    a, w = fmt.pack_int4(rand_int((m, k), 4, gen)), fmt.pack_int4(rand_int((n, k), 4, gen))
    a_s = torch.rand(m, generator=gen) * 0.1 + 0.01 if per_token else torch.tensor(0.05)
    w_s, b = torch.rand(n, generator=gen) * 0.01 + 1e-3, torch.randn(n, generator=gen) * 0.1
    y = reference.int4_matmul(a, w, a_s, w_s, b, torch.float32)
    v = reference.silu_mul(y[:, 0::2], y[:, 1::2]) if silu else y
    s = float(v.abs().max()) / 9  # the whole int4 range, the largest values clamped
    op = pqk.int4_matmul_silu_mul_requant if silu else pqk.int4_matmul_requant
    got = op(a.cuda(), w.cuda(), a_s.cuda(), w_s.cuda(), s, b.cuda(), backend="cuda").cpu()
    want = op(a, w, a_s, w_s, s, b, backend="reference")
    if not silu:
        assert torch.equal(got, want)
    else:  # device expf vs torch.exp: a value on a rounding boundary may move one step
        d = (fmt.unpack_int4(got).int() - fmt.unpack_int4(want).int()).abs()
        assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 1e-3


@needs_binding
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("static", [True, False])
def test_quant_linear_matches_reference(gen, m, n, k, dtype, static):
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    w = fmt.pack_int4(rand_int((n, k), 4, gen))
    w_s, b = torch.rand(n, generator=gen) * 0.01 + 1e-3, torch.randn(n, generator=gen)
    a_s = 0.21 if static else None
    got = pqk.quant_linear(x.cuda(), w.cuda(), w_s.cuda(), a_s, 4, b.cuda(), backend="cuda")
    assert torch.equal(got.cpu(), pqk.quant_linear(x, w, w_s, a_s, 4, b, backend="reference"))


@needs_binding
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (3, 132, 96), (118, 76, 62), (300, 264, 1024)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_fused_silu_mul_linear_matches_reference(gen, m, n, k, dtype):
    """quant_linear_silu_mul_requant: x quantized in the GEMM's A load (pqk_quant_gemm_static epilogue 4)."""
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    w = fmt.pack_int4(rand_int((n, k), 4, gen))
    w_s, b = torch.rand(n, generator=gen) * 0.01 + 1e-3, torch.randn(n, generator=gen) * 0.1
    want = pqk.quant_linear_silu_mul_requant(x, w, w_s, 0.21, 0.05, b, backend="reference")
    got = pqk.quant_linear_silu_mul_requant(x.cuda(), w.cuda(), w_s.cuda(), 0.21, 0.05, b.cuda(), backend="cuda")
    d = (fmt.unpack_int4(got.cpu()).int() - fmt.unpack_int4(want).int()).abs()  # device expf: one step at a boundary
    assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 1e-3


@needs_binding
def test_w8_and_a8_have_no_cuda_kernel():
    x, w8 = torch.randn(3, 64, device="cuda"), torch.zeros(4, 64, dtype=torch.int8, device="cuda")
    with pytest.raises(NotImplementedError, match=r"backend='cuda' has no CUDA kernel for W8A4"):
        pqk.quant_linear(x, w8, torch.ones(4, device="cuda"), 0.1, 4, backend="cuda")
    y = pqk.quant_linear(x, w8, torch.ones(4, device="cuda"), 0.1, 4, backend="auto")   # the reference, on the GPU
    assert torch.equal(y.cpu(), pqk.quant_linear(x.cpu(), w8.cpu(), torch.ones(4), 0.1, 4, backend="reference"))


@needs_binding
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows,cols", [(1, 64), (7, 4096), (33, 1000)])
def test_rmsnorm_quantize_matches_reference(gen, dtype, bits, rows, cols):
    """Not bit-exact (the kernel's block reduction sums in another order): y within 2 ulp-ish, q off by at most one
    level on values that sit at a rounding boundary."""
    x = (torch.randn(rows, cols, generator=gen) * 4).to(dtype)
    wt = (torch.rand(cols, generator=gen) + 0.5).to(dtype)
    s = torch.tensor(0.05)
    q, y = cuda_ops.rmsnorm_quantize(x.cuda(), wt.cuda(), s.cuda(), bits, eps=1e-5, return_normed=True)
    y_ref = rmsnorm_reference(x, wt, 1e-5)
    tol = 2 * torch.finfo(dtype).eps   # the fp32 value may round to the neighbouring 16-bit value
    torch.testing.assert_close(y.cpu(), y_ref.to(dtype), atol=tol, rtol=tol)
    q_ref = reference.quantize_static(y_ref, s, bits)
    unpack = fmt.unpack_int4 if bits == 4 else (lambda t: t)
    diff = (unpack(q.cpu()).int() - unpack(q_ref).int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


@needs_binding
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [64, 576, 1536, 11008, 14336])
@pytest.mark.parametrize("inverse", [False, True])
def test_hadamard_matches_reference(gen, dtype, n, inverse):
    x = torch.randn(5, n, generator=gen).to(dtype)
    got = cuda_ops.hadamard_transform(x.cuda(), inverse=inverse)
    want = hadamard.hadamard_transform(x, inverse=inverse)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # fp32 sum order; 2 ulp of 16-bit
    torch.testing.assert_close(got.cpu(), want, atol=tol, rtol=tol)


def _quant_linear_module(static: bool):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 1000, bias=True).cuda().half()
    return pqk.nn.QuantLinear.from_float(lin, 4, 4, act_scale=0.05 if static else None, backend="cuda")


@needs_binding
@pytest.mark.parametrize("static", [True, False])
def test_torch_compile_fullgraph(static):
    mod = _quant_linear_module(static)
    x = torch.randn(7, 4096, device="cuda", dtype=torch.float16)
    compiled = torch.compile(mod, fullgraph=True)
    assert torch.equal(compiled(x), mod(x))


@needs_binding
@pytest.mark.parametrize("static", [True, False])
def test_cuda_graph_capture_and_replay(static):
    _capture_and_replay(_quant_linear_module(static), torch.randn(5, 4096, device="cuda", dtype=torch.float16))


@needs_binding
@pytest.mark.parametrize("m", [3, 100, 600])  # the decode / mid / prefill tiles (CUTLASS on sm_80..89)
def test_cuda_graph_fused_mlp(m):
    """The fused MLP's two launches (the silu-mul requant GEMM quantizing x in its A load, the down GEMM) in one
    graph."""
    from torch import nn

    from prefixquant_kernels.nn import QuantGatedMLP, QuantLinear

    torch.manual_seed(0)
    lin = lambda i, o, s: QuantLinear.from_float(nn.Linear(i, o, bias=False), 4, 4, act_scale=s)  # noqa: E731
    mlp = QuantGatedMLP.from_quant_linears(lin(512, 1024, 0.05), lin(512, 1024, 0.05), lin(1024, 512, 0.02)).cuda()
    _capture_and_replay(mlp, torch.randn(m, 512, device="cuda", dtype=torch.float16))


@needs_binding
def test_cuda_graph_split_k_decode():
    """A decode linear narrow enough to split K (its zeroed workspace allocated inside the capture) replays exactly."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 256, bias=False).cuda().half()
    mod = pqk.nn.QuantLinear.from_float(lin, 4, 4, act_scale=0.05, backend="cuda")
    _capture_and_replay(mod, torch.randn(1, 4096, device="cuda", dtype=torch.float16))


def _capture_and_replay(mod, x):
    """Capture mod(x) in a CUDA graph, replay on fresh inputs, compare with eager calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):   # warm-up off the default stream, as torch.cuda.graph requires
        mod(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = mod(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, mod(x))


@needs_binding
def test_fused_mlp_on_cuda(gen):
    """QuantGatedMLP on CUDA (2 launches) vs the same module on the CPU: h levels may differ by one step where device
    expf and torch.exp round differently, so the outputs agree to a small tolerance."""
    from torch import nn

    from prefixquant_kernels.nn import QuantGatedMLP, QuantLinear

    torch.manual_seed(0)
    lin = lambda i, o, s: QuantLinear.from_float(nn.Linear(i, o, bias=False), 4, 4, act_scale=s)  # noqa: E731
    mlp = QuantGatedMLP.from_quant_linears(lin(256, 512, 0.05), lin(256, 512, 0.05), lin(512, 256, 0.02))
    x = torch.randn(37, 256, generator=gen).half()
    want = mlp(x.float()).half()
    got = mlp.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=0.02 * float(want.abs().max()))


@needs_gpu
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("epilogue", [0, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(130 * 4, 4096), (36, 8224)])   # a grid-stride loop past 128 chunks per thread
def test_decode_gemv_every_epilogue_bit_exact(lib, m, epilogue, n, k):
    """The decode GEMV (config 3) equals the reference bit for bit for every epilogue (silu-mul: the device expf may
    move a boundary value by one level, as for the tiles), poisoned output first."""
    g = torch.Generator().manual_seed(10 * m + epilogue)
    a = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, generator=g)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    a_s, w_s = torch.rand(m, generator=g) * 0.05 + 0.01, torch.rand(n, generator=g) * 0.01 + 1e-3
    b = torch.randn(n, generator=g)
    y = reference.int4_matmul(a, w, a_s, w_s, b, torch.float32)
    if epilogue in (0, 2):
        dt = torch.float16 if epilogue == 0 else torch.float32
        out = torch.full((m, n), float("nan"), dtype=dt, device="cuda")
        selftest.gemm(lib, a.cuda(), w.cuda(), a_s.cuda(), w_s.cuda(), b.cuda(), out, epilogue=epilogue, config=3)
        assert torch.equal(out.cpu(), reference.int4_matmul(a, w, a_s, w_s, b, dt))
        return
    silu = epilogue == 4
    s_out = float((reference.silu_mul(y[:, 0::2], y[:, 1::2]) if silu else y).abs().max()) / 9
    out = torch.full((m, n // (4 if silu else 2)), 0xEE, dtype=torch.uint8, device="cuda")
    selftest.gemm(lib, a.cuda(), w.cuda(), a_s.cuda(), w_s.cuda(), b.cuda(), out, epilogue=epilogue, config=3,
                  out_scale=s_out)
    fn = reference.int4_matmul_silu_mul_requant if silu else reference.int4_matmul_requant
    got, want = fmt.unpack_int4(out.cpu()), fmt.unpack_int4(fn(a, w, a_s, w_s, b, s_out))
    assert (got.int() - want.int()).abs().max() <= (1 if silu else 0)
