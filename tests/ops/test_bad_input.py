"""Every public op rejects bad arguments before any kernel runs, with an error that names the argument;
and nothing the caller passed is modified."""
import math

import pytest
import torch

import prefixquant_kernels as pqk

from ..conftest import BACKENDS

W4 = torch.zeros(4, 32, dtype=torch.uint8)  # N=4, K=64
WS = torch.ones(4)
A4 = torch.zeros(3, 32, dtype=torch.uint8)
X = torch.randn(3, 64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,exc,match", [
    (lambda b: pqk.pack_int4(torch.zeros(3, dtype=torch.int8), backend=b), ValueError, "q's last dim must be even"),
    (lambda b: pqk.pack_int4(torch.full((2,), 8, dtype=torch.int8), backend=b), ValueError, r"q must hold int4 values"),
    (lambda b: pqk.pack_int4(torch.zeros(2), backend=b), TypeError, "q must have dtype"),
    (lambda b: pqk.unpack_int4(torch.zeros(2, dtype=torch.int8), backend=b), TypeError, "packed must have dtype"),
    (lambda b: pqk.quantize_static(X, 0.0, backend=b), ValueError, "scale must be finite and > 0"),
    (lambda b: pqk.quantize_static(X, -1.0, backend=b), ValueError, "scale must be finite and > 0"),
    (lambda b: pqk.quantize_static(X, math.nan, backend=b), ValueError, "scale must be finite and > 0"),
    (lambda b: pqk.quantize_static(X, torch.tensor(math.inf), backend=b), ValueError, "scale must be finite"),
    (lambda b: pqk.quantize_static(X, torch.ones(3), backend=b), ValueError, "scale must be a scalar"),
    (lambda b: pqk.quantize_static(X, "0.1", backend=b), TypeError, "scale must be a number"),
    (lambda b: pqk.quantize_static(X, 0.1, bits=3, backend=b), ValueError, "bits must be one of"),
    (lambda b: pqk.quantize_static(torch.randn(2, 5), 0.1, backend=b), ValueError, "x's last dim must be even"),
    (lambda b: pqk.quantize_static(torch.randn(2, 0), 0.1, backend=b), ValueError, "last dim .K. must be > 0"),
    (lambda b: pqk.quantize_static(torch.ones(2, 4, dtype=torch.int32), 0.1, backend=b), TypeError, "x must have dtype"),
    (lambda b: pqk.quantize_per_token(X, bits=2, backend=b), ValueError, "bits must be one of"),
    (lambda b: pqk.quantize_per_token(torch.randn(4, 3), backend=b), ValueError, "x's last dim must be even"),
    (lambda b: pqk.int4_matmul(A4, W4, 1.0, torch.ones(5), backend=b), ValueError, r"w_scale must have shape \(4,\)"),
    (lambda b: pqk.int4_matmul(A4, W4, 1.0, torch.zeros(4), backend=b), ValueError, "w_scale must be finite and > 0"),
    (lambda b: pqk.int4_matmul(A4, W4, torch.ones(2), WS, backend=b), ValueError, r"a_scale must be a scalar or have one scale per row \(3\)"),
    (lambda b: pqk.int4_matmul(A4, W4, torch.tensor([1.0, math.nan, 1.0]), WS, backend=b), ValueError, "a_scale must be finite"),
    (lambda b: pqk.int4_matmul(A4, torch.zeros(4, 16, dtype=torch.uint8), 1.0, WS, backend=b), ValueError, "w's in_features K must be 64"),
    (lambda b: pqk.int4_matmul(A4, W4.float(), 1.0, WS, backend=b), TypeError, "w must have dtype"),
    (lambda b: pqk.int4_matmul(A4, W4[None], 1.0, WS, backend=b), ValueError, "w must be 2-D"),
    (lambda b: pqk.int4_matmul(A4.float(), W4, 1.0, WS, backend=b), TypeError, "a_packed must have dtype"),
    (lambda b: pqk.int4_matmul(A4, W4, 1.0, WS, bias=torch.ones(3), backend=b), ValueError, r"bias must have shape \(4,\)"),
    (lambda b: pqk.int4_matmul(A4, W4, 1.0, WS, out_dtype=torch.int32, backend=b), TypeError, "out_dtype must be one of"),
    (lambda b: pqk.quant_linear(X, W4, WS, 0.1, a_bits=5, backend=b), ValueError, "a_bits must be one of"),
    (lambda b: pqk.quant_linear(torch.randn(3, 62), W4, WS, 0.1, backend=b), ValueError, "w's in_features K must be 62"),
    (lambda b: pqk.quant_linear(X, W4, WS, -0.1, backend=b), ValueError, "a_scale must be finite and > 0"),
    (lambda b: pqk.quant_linear(X, W4, WS, 0.1, backend="gpu"), ValueError, "backend must be one of"),
    # numbers that are positive and finite in Python but 0 or inf as the float32 the kernels take (a fuzzer's find)
    (lambda b: pqk.quantize_static(X, 1e-50, backend=b), ValueError, r"scale must be finite and > 0 \(in float32\), got 1e-50"),
    (lambda b: pqk.quantize_static(X, 1e39, backend=b), ValueError, r"scale must be finite and > 0 \(in float32\)"),
    (lambda b: pqk.quantize_static(X, 10**400, backend=b), ValueError, r"scale must be finite and > 0 .*got 10{19}\.\.\.$"),
    (lambda b: pqk.quant_linear(X, W4, WS, 1e39, backend=b), ValueError, "a_scale must be finite and > 0"),
    (lambda b: pqk.int4_matmul(A4, W4, 1e-50, WS, backend=b), ValueError, "a_scale must be finite and > 0"),
    (lambda b: pqk.int4_matmul_requant(A4, W4, 1.0, WS, 1e-50, backend=b), ValueError, "out_scale must be finite and > 0"),
    (lambda b: pqk.int4_matmul_requant(A4, W4, 1.0, WS, torch.tensor(1e39, dtype=torch.float64), backend=b),
     ValueError, "out_scale must be finite and > 0"),
    (lambda b: pqk.rmsnorm_quantize(X, torch.ones(64), 1e-50, backend=b), ValueError, "scale must be finite and > 0"),
    (lambda b: pqk.rmsnorm_quantize(X, torch.ones(64), 0.1, eps=10**400, backend=b), ValueError, "eps must be a finite float"),
    # K past what an int32 sum holds exactly (every backend would wrap)
    (lambda b: pqk.int4_matmul(torch.zeros(1, 131072, dtype=torch.int8), torch.zeros(1, 131072, dtype=torch.int8), 1.0,
                               torch.ones(1), backend=b), ValueError, r"K = 131072 is too long .* W8A8 .* at most 131071"),
    (lambda b: pqk.quant_linear(torch.zeros(1, 2**21), torch.zeros(1, 2**20, dtype=torch.uint8), torch.ones(1), 0.1,
                                a_bits=8, backend=b), ValueError, r"K = 2097152 is too long .* W4A8 .* at most 2097151"),
])
def test_bad_input_raises_clear_error(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call(backend)


def test_messages_name_the_op():
    with pytest.raises(ValueError, match=r"^pqk\.int4_matmul: w_scale"):
        pqk.int4_matmul(A4, W4, 1.0, torch.ones(5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_m_works(backend):
    y = pqk.int4_matmul(torch.zeros(0, 32, dtype=torch.uint8), W4, 1.0, WS, backend=backend)
    assert y.shape == (0, 4)
    y = pqk.quant_linear(torch.zeros(0, 64), W4, WS, None, backend=backend)
    assert y.shape == (0, 4)
    q, s = pqk.quantize_per_token(torch.zeros(0, 64), backend=backend)
    assert q.shape == (0, 32) and s.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend):
    x = torch.randn(5, 64).bfloat16()
    ws = torch.rand(4) + 0.1
    b = torch.randn(4)
    w = torch.randint(0, 256, (4, 32), dtype=torch.uint8)
    saved = [t.clone() for t in (x, ws, b, w)]
    pqk.quant_linear(x, w, ws, None, 4, b, backend=backend)
    pqk.quant_linear(x, w, ws, 0.2, 8, b, backend=backend)
    pqk.quantize_per_token(x, backend=backend)
    for t, s in zip((x, ws, b, w), saved):
        assert torch.equal(t, s)


def test_direct_torch_ops_call_with_bad_shape_is_an_error_not_a_crash():
    pytest.importorskip("prefixquant_kernels._C")
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.pqk.int4_matmul(A4, torch.zeros(4, 8, dtype=torch.uint8), torch.tensor(1.0), WS, None, torch.float16)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        torch.ops.pqk.quantize_static(X, torch.tensor(0.0), 4)


@pytest.mark.parametrize("call,match", [
    (lambda: pqk.int4_matmul(A4, W4.to("meta"), 1.0, WS), "w must be on cpu"),
    (lambda: pqk.int4_matmul(A4, W4, 1.0, WS.to("meta")), "w_scale must be on cpu"),
    (lambda: pqk.int4_matmul(A4, W4, torch.ones(3, device="meta"), WS), "a_scale must be on cpu"),
    (lambda: pqk.quant_linear(X, W4, WS, 0.1, bias=torch.ones(4, device="meta")), "bias must be on cpu"),
    (lambda: pqk.quantize_static(X, torch.tensor(0.1, device="meta")), "scale must be on cpu"),
    (lambda: pqk.nn.QuantLinear.from_float(torch.nn.Linear(64, 4), 4, 4, 0.1)(X.to("meta")), "x must be on cpu"),
])
def test_wrong_device_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cpu_backend_rejects_other_devices():
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        pqk.quantize_static(X.to("meta"), 0.1, backend="cpu")


@pytest.mark.parametrize("backend", ["cpu:avx2", "cpu:avxvnni", "cpu:avx512vnni", "cpu:amx"])
def test_unsupported_isa_is_a_clear_error(backend):
    """Forcing an instruction set this CPU lacks raises (naming it) instead of executing illegal instructions."""
    if backend in pqk.available_backends() or not pqk._extension.cpu_available():
        pytest.skip(f"{backend} runs here (or no extension)")
    with pytest.raises(RuntimeError, match=f"backend='{backend}' is not supported by this CPU"):
        pqk.quantize_static(X, 0.1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_longest_exact_k_runs_exactly(backend):
    """K = 131071, the longest W8A8 sum an int32 holds: every product +16384, the sum 2^31 - 16384, exact."""
    a = torch.full((1, 131071), -128, dtype=torch.int8)
    y = pqk.int4_matmul(a, a.clone(), 1.0, torch.ones(1), out_dtype=torch.float32, backend=backend)
    assert y.item() == float(131071 * 16384)


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalars_are_numbers(backend):
    np = pytest.importorskip("numpy")
    want = pqk.quantize_static(X, 0.5, backend=backend)
    assert torch.equal(pqk.quantize_static(X, np.float32(0.5), backend=backend), want)
    assert torch.equal(pqk.quantize_static(X, np.float64(0.5), backend=backend), want)


def test_pack_int4_reads_no_values_off_the_cpu():
    """The range check reads values on CPU tensors only (checks.py: no device read, no sync): a meta tensor packs."""
    out = pqk.pack_int4(torch.zeros(2, 4, dtype=torch.int8, device="meta"), backend="reference")
    assert out.shape == (2, 2) and out.device.type == "meta" and out.dtype == torch.uint8
