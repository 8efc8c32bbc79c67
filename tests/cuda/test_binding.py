"""The CUDA torch binding (prefixquant_kernels/ops/cuda_library.py, cuda_ops.py) without a GPU.

1. The real libpqk_cuda.so (cuda_build, nvcc, no GPU): every function of pqk_cuda.h is declared with the header's
   parameter types; bad arguments return the negative status before any CUDA call; a launch that reaches CUDA here
   returns a cudaError, which the binding turns into a RuntimeError naming the op.
2. The binding's plumbing end to end on CPU tensors: the launchers are replaced by an emulator that reads the raw
   pointers it is given (ctypes), runs prefixquant_kernels.reference on them and writes the output buffer, while
   enforcing the launchers' own preconditions (K % 32, 16-byte alignment). Wrong pointer order, a wrong dtype or
   epilogue code, a wrong per-token flag or a missing K pad therefore fail here (bit-exact comparisons).
3. The pure argument checks, the backend= resolution, the "cuda" dispatch registrations.
"""
from __future__ import annotations

import contextlib
import ctypes
import math

import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import cuda_build, hadamard, reference
from prefixquant_kernels import format as fmt
from prefixquant_kernels.ops import backend as backend_mod
from prefixquant_kernels.ops import checks, cuda_library
from prefixquant_kernels.ops import cuda_ops as cuda

from ..conftest import rand_int
from .header import header_signatures

# ---- 1. the real library through ctypes --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_lib(cuda_lib):
    return cuda_library.open_library(cuda_lib.lib)   # dlopen works without a driver: the CUDA runtime is static


def _ctype(c: str):
    if c.endswith("*") or c == "pqk_stream_t":
        return ctypes.c_void_p
    return {"int": ctypes.c_int, "float": ctypes.c_float, "long": ctypes.c_long}[c]


def test_signatures_match_the_header():
    declared = header_signatures(f"{cuda_build.CUDA_DIR}/pqk_cuda.h")
    assert set(declared) == set(cuda_library.SIGNATURES), \
        "a launcher of pqk_cuda.h is not bound (or bound but not declared)"
    for name, params in declared.items():
        assert cuda_library.SIGNATURES[name][1] == [_ctype(p) for p in params], name


def test_every_symbol_loads(real_lib):
    for name, (restype, argtypes) in cuda_library.SIGNATURES.items():
        fn = getattr(real_lib, name)
        assert fn.restype is restype and fn.argtypes == argtypes
    assert real_lib.pqk_int4_gemm_path(86).startswith(b"imma.s4") and real_lib.pqk_int4_gemm_path(90) == b"imma.s8-unpacked"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_probe_without_a_gpu_says_why(real_lib):
    """pqk_cuda_probe (the availability check's question, tests/cuda/test_fallback.py): no driver / no device here."""
    drv, rt, sm = ctypes.c_int(-1), ctypes.c_int(-1), ctypes.c_int(-1)
    st = real_lib.pqk_cuda_probe(0, ctypes.byref(drv), ctypes.byref(rt), ctypes.byref(sm))
    assert st > 0 and rt.value >= 12000 and drv.value >= 0 and sm.value == 0
    assert real_lib.pqk_cuda_probe(0, None, None, None) == st          # every output pointer may be null
    assert cuda_library.probe(real_lib, 0).startswith("libpqk_cuda.so cannot run here: ")


P = 4096  # a fake, 16-byte-aligned "device pointer": never dereferenced, every call below returns before a launch


@pytest.mark.parametrize("call,want", [
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 4, 8, 48, 0, -1, 1, None, None), -2),   # K % 32
    (lambda L: L.pqk_int4_gemm(P + 8, P, P, P, 0, P, None, 1.0, 4, 8, 64, 0, -1, 1, None, None), -3),  # misaligned A
    (lambda L: L.pqk_int4_gemm(P, P, None, P, 0, P, None, 1.0, 4, 8, 64, 0, -1, 1, None, None), -5),  # null out
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 4, 8, 64, 2, 4, 1, None, None), -5),     # config out of range
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 5, 8, 64, 2, 3, 1, None, None), -7),     # GEMV: M > 4
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 1, 8, 512, 0, 3, 2, P, None), -7),       # GEMV: no split-K
    (lambda L: L.pqk_quant_gemm_static(P, 0, P, P, P, P, None, 1.0, 5, 8, 64, 0, 3, 1, None, None), -7),   # GEMV: M > 4
    (lambda L: L.pqk_quant_gemm_static(P, 0, P, P, P, P, None, 1.0, 4, 8, 64, 0, 4, 1, None, None), -5),   # config 4
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 4, 8, 64, 2, 13, 1, None, None), -5),    # past the CUTLASS codes
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 4, 8, 64, 3, 10, 1, None, None), -7),    # CUTLASS: no requant
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 4, 12, 64, 0, 11, 1, None, None), -7),   # CUTLASS: N % 8
    (lambda L: L.pqk_int4_gemm(P, P, P + 8, P, 0, P, None, 1.0, 4, 8, 64, 1, 12, 1, None, None), -7),  # CUTLASS: out align
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P + 4, None, 1.0, 4, 8, 64, 1, 12, 1, None, None), -7),  # CUTLASS: w_scale
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, P + 4, 1.0, 4, 8, 64, 1, 12, 1, None, None), -7),    # CUTLASS: bias align
    (lambda L: L.pqk_quant_gemm_static(P, 0, P, P, P, P, None, 1.0, 4, 8, 48, 0, -1, 1, None, None), -2),   # K % 32
    (lambda L: L.pqk_quant_gemm_static(P + 2, 0, P, P, P, P, None, 1.0, 4, 8, 64, 0, -1, 1, None, None), -3),  # x align
    (lambda L: L.pqk_quant_gemm_static(P, 0, P, P, P, P, None, 1.0, 4, 8, 64, 1, -1, 1, None, None), -5),   # out != x dtype
    (lambda L: L.pqk_quant_gemm_static(P, 3, P, P, P, P, None, 1.0, 4, 8, 64, 3, -1, 1, None, None), -5),   # x_dtype code
    (lambda L: L.pqk_quant_gemm_static(P, 1, P, P, P, P, None, 1.0, 4, 8, 64, 1, 11, 1, None, None), -7),   # CUTLASS tile
    (lambda L: L.pqk_quant_gemm_static(P, 1, P, P, P, P, None, 1.0, 4, 10, 64, 4, -1, 1, None, None), -4),  # silu: N % 4
    (lambda L: L.pqk_quant_gemm_static(P, 1, P, P, P, P, None, 0.0, 4, 8, 64, 4, -1, 1, None, None), -5),   # out_scale 0
    (lambda L: L.pqk_quant_gemm_static(P, 2, None, P, P, P, None, 1.0, 4, 8, 64, 2, -1, 1, None, None), -5),  # no x_scale
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 1, 8, 512, 0, -1, 0, None, None), -5),   # split_k 0
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 1, 8, 512, 0, -1, 2, None, None), -5),   # no workspace
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 1, 8, 512, 0, -1, 2, P + 2, None), -5),  # ws align
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 1, 8, 128, 0, -1, 3, P, None), -5),      # > K tiles
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 1, 8, 512, 0, 1, 2, P, None), -7),       # mid tile
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 1, 8, 512, 0, 10, 2, P, None), -7),      # CUTLASS
    (lambda L: L.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 17, 8, 512, 0, -1, 2, P, None), -7),     # auto, M > 16
    (lambda L: L.pqk_quant_gemm_static(P, 0, P, P, P, P, None, 1.0, 1, 8, 512, 0, -1, 2, None, None), -5),
    (lambda L: L.pqk_quantize_static(P, 0, P, P, 4, 0, 64, None), -1),                       # rows 0
    (lambda L: L.pqk_quantize_static(P, 0, P, P, 4, 3, 63, None), -1),                       # odd cols for int4
    (lambda L: L.pqk_quantize_static(P, 0, P, P, 3, 3, 64, None), -5),                       # bits 3
    (lambda L: L.pqk_quantize_static(P, 7, P, P, 4, 3, 64, None), -5),                       # dtype code
    (lambda L: L.pqk_quantize_per_token(P, 1, P, None, 8, 3, 64, None), -5),                 # null scales_out
    (lambda L: L.pqk_rmsnorm_quantize(P, 0, P, -1.0, P, 4, P, None, 3, 64, None), -5),       # eps < 0
    (lambda L: L.pqk_hadamard(P, P, 0, P, 19, 3, 4864, None), -6),                           # 4864 = 19 * 256
])
def test_bad_arguments_return_status_before_cuda(real_lib, call, want):
    st = call(real_lib)
    assert st == want
    assert real_lib.pqk_cuda_error_string(st).decode() not in ("", "unknown pqk status")


def test_split_k_policy_and_workspace(real_lib):
    """pqk_gemm_split_k / _workspace (pure functions) agree with the emulator's independent statement of the policy
    over a grid of shapes and SM counts (the host harness checks the kernel's split-K sums)."""
    emu = EmulatedLib()
    for m in (1, 4, 16, 17):
        for n in (32, 1024, 4096, 14336):
            for k in (64, 512, 4096, 14336):
                for sms in (28, 108, 132):
                    assert real_lib.pqk_gemm_split_k(m, n, k, sms) == emu.pqk_gemm_split_k(m, n, k, sms), (m, n, k, sms)
            assert real_lib.pqk_gemm_split_k_workspace(m, n) == emu.pqk_gemm_split_k_workspace(m, n)
    assert real_lib.pqk_gemm_split_k(1, 1024, 4096, 108) == 7   # Llama-3-8B k/v on an A100: 32 blocks -> 224


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU dispatch")
@pytest.mark.parametrize("config", [10, 11, 12])
def test_cutlass_config_without_an_sm80_device_is_refused(real_lib, config):
    # A forced CUTLASS tile on a shape it takes still needs an sm_80..89 device: without one, a status, not a launch.
    assert real_lib.pqk_int4_gemm(P, P, P, P, 0, P, None, 1.0, 4, 8, 64, 0, config, 1, None, None) == -7


@contextlib.contextmanager
def _binding_on_cpu(lib):
    """Lets the CUDA implementations run on CPU tensors with `lib` as the library (device guard and stream stubbed)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(cuda_library, "_LIB", lib)
    mp.setattr(cuda_library, "_REASON", None)
    mp.setattr(cuda_library, "_CHECKED", True)
    mp.setattr(cuda, "_on_device", lambda t: contextlib.nullcontext())
    mp.setattr(cuda, "_stream", lambda t: 0)
    mp.setattr(cuda, "sm_count", lambda device: 108)   # an A100's, for the split-K policy
    try:
        yield
    finally:
        mp.undo()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_launch_without_gpu_is_a_runtime_error_naming_the_op(real_lib):
    """Valid arguments reach the CUDA runtime, which finds no device: a cudaError status -> RuntimeError, no crash."""
    with _binding_on_cpu(real_lib):
        with pytest.raises(RuntimeError, match=r"^pqk\.quantize_static: pqk_quantize_static failed: .+ \(status \d+\)"):
            cuda.quantize_static(torch.randn(3, 64), torch.tensor(0.1), 4)
        with pytest.raises(RuntimeError, match=r"^pqk\.int4_matmul: pqk_int4_gemm failed: .+ \(status \d+\)"):
            cuda.int4_matmul(torch.zeros(3, 32, dtype=torch.uint8), torch.zeros(5, 32, dtype=torch.uint8),
                             torch.tensor(1.0), torch.ones(5), None, torch.float16)


# ---- 2. the plumbing, with an emulated library -------------------------------------------------------------------

_ITEM = {torch.uint8: 1, torch.int8: 1, torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.int32: 4}
_CODE_DTYPE = {v: k for k, v in cuda.DTYPE_CODES.items()}


def view(ptr: int, shape, dtype) -> torch.Tensor:
    """The memory at a raw (host) address as a tensor — what a kernel sees behind its pointer."""
    n = math.prod(shape) * _ITEM[dtype]
    return torch.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).view(*shape)


class EmulatedLib:
    """pqk_cuda.h implemented with prefixquant_kernels.reference on host memory; same preconditions and statuses."""

    def __init__(self):
        self.calls = []
        self.splits = []   # split_k of each GEMM launch
        self.configs = []  # config of each GEMM launch

    def pqk_cuda_error_string(self, st):
        return b"emulated error"

    # The split-K policy and workspace size, written out independently of gemm_math.cuh (tile 16 x 32, 64 of K per
    # tile, >= 4 tiles per split, <= 16 splits, two blocks per SM).
    def pqk_gemm_split_k(self, m, n, k, sms):
        blocks, k_tiles = -(-n // 32), -(-k // 64)
        if m > 16 or blocks >= 2 * sms:
            return 1
        return max(1, min(-(-2 * sms // blocks), k_tiles // 4, 16))

    def pqk_gemm_split_k_workspace(self, m, n):
        return m * n + -(-m // 16) * -(-n // 32)

    def _split_ok(self, split_k, ws, m, n, k):
        """The launchers' split-K preconditions; a split launch's workspace must be all zero."""
        if split_k < 1 or split_k > -(-k // 64) or (split_k > 1 and (not ws or m > 16)):
            return False
        return split_k == 1 or not view(ws, (self.pqk_gemm_split_k_workspace(m, n),), torch.int32).any()

    def _gemm_status(self, m, n, k, split_k, split_ws, a, w, config):
        """The statuses both GEMM launchers share (shape, split-K, K % 32, 16-byte operands, the GEMV's M <= 4 and
        no split), or None; records split_k and config."""
        self.splits.append(split_k)
        self.configs.append(config)
        if m <= 0 or n <= 0 or k <= 0:
            return -1
        if not self._split_ok(split_k, split_ws, m, n, k):
            return -5
        if config == 3 and (m > 4 or split_k > 1):
            return -7
        if k % 32:
            return -2
        if a % 16 or w % 16:
            return -3
        return None

    def pqk_int4_gemm(self, a, w, out, a_scale, per_token, w_scale, bias, out_scale, m, n, k, epi, config, split_k,
                      split_ws, stream):
        self.calls.append(("pqk_int4_gemm", m, n, k, epi, per_token))
        if (st := self._gemm_status(m, n, k, split_k, split_ws, a, w, config)) is not None:
            return st
        if epi not in (0, 1, 2, 3, 4) or not out or not a_scale or not w_scale:
            return -5
        if (epi == 3 and n % 2) or (epi == 4 and n % 4):
            return -4
        args = (view(a, (m, k // 2), torch.uint8), view(w, (n, k // 2), torch.uint8),
                view(a_scale, (m if per_token else 1,), torch.float32), view(w_scale, (n,), torch.float32),
                view(bias, (n,), torch.float32) if bias else None)
        if epi >= 3:
            self.calls[-1] += (out_scale,)
            fn = reference.int4_matmul_requant if epi == 3 else reference.int4_matmul_silu_mul_requant
            view(out, (m, n // (2 if epi == 3 else 4)), torch.uint8).copy_(fn(*args, out_scale))
            return 0
        dt = {0: torch.float16, 1: torch.bfloat16, 2: torch.float32}[epi]
        view(out, (m, n), dt).copy_(reference.int4_matmul(*args, dt))
        return 0

    def pqk_quant_gemm_static(self, x, code, x_scale, w, out, w_scale, bias, out_scale, m, n, k, epi, config, split_k,
                              split_ws, stream):
        self.calls.append(("pqk_quant_gemm_static", m, n, k, code, epi))
        if (st := self._gemm_status(m, n, k, split_k, split_ws, x, w, config)) is not None:
            return st
        if code not in _CODE_DTYPE or epi not in (code, 4) or not out or not x_scale or not w_scale:
            return -5
        if epi == 4 and n % 4:
            return -4
        xv = view(x, (m, k), _CODE_DTYPE[code])
        args = (view(w, (n, k // 2), torch.uint8), view(w_scale, (n,), torch.float32))
        s = view(x_scale, (1,), torch.float32).reshape(())
        b = view(bias, (n,), torch.float32) if bias else None
        if epi == 4:
            self.calls[-1] += (out_scale,)
            view(out, (m, n // 4), torch.uint8).copy_(
                reference.quant_linear_silu_mul_requant(xv, args[0], args[1], s, b, out_scale))
        else:
            view(out, (m, n), xv.dtype).copy_(reference.quant_linear(xv, args[0], args[1], s, 4, b))
        return 0

    def _rows(self, x, code, bits, rows, cols):
        if rows <= 0 or cols <= 0 or (bits == 4 and cols % 2):
            return None
        return view(x, (rows, cols), _CODE_DTYPE[code])

    def _store(self, out, q, bits, rows, cols):
        view(out, (rows, cols // 2 if bits == 4 else cols), q.dtype).copy_(q)

    def pqk_quantize_static(self, x, code, out, scale, bits, rows, cols, stream):
        self.calls.append(("pqk_quantize_static", rows, cols, bits))
        xv = self._rows(x, code, bits, rows, cols)
        if xv is None:
            return -1
        self._store(out, reference.quantize_static(xv, view(scale, (1,), torch.float32).reshape(()), bits), bits, rows,
                    cols)
        return 0

    def pqk_quantize_per_token(self, x, code, out, scales_out, bits, rows, cols, stream):
        self.calls.append(("pqk_quantize_per_token", rows, cols, bits))
        xv = self._rows(x, code, bits, rows, cols)
        if xv is None:
            return -1
        q, s = reference.quantize_per_token(xv, bits)
        self._store(out, q, bits, rows, cols)
        view(scales_out, (rows,), torch.float32).copy_(s)
        return 0

    def pqk_rmsnorm_quantize(self, x, code, weight, eps, scale, bits, q_out, normed_out, rows, cols, stream):
        self.calls.append(("pqk_rmsnorm_quantize", rows, cols, bits))
        xv = self._rows(x, code, bits, rows, cols)
        if xv is None:
            return -1
        y = rmsnorm_reference(xv, view(weight, (cols,), xv.dtype), eps)
        self._store(q_out, reference.quantize_static(y, view(scale, (1,), torch.float32).reshape(()), bits), bits,
                    rows, cols)
        if normed_out:
            view(normed_out, (rows, cols), xv.dtype).copy_(y.to(xv.dtype))
        return 0

    def pqk_hadamard(self, x, y, code, had, m, rows, cols, stream):
        self.calls.append(("pqk_hadamard", m, rows, cols))
        xv = self._rows(x, code, 8, rows, cols)
        p = int(math.log2(cols // m))
        h = view(had, (m, m), torch.float32).clone() if m > 1 else torch.ones(1, 1)
        out = hadamard._apply(xv.float(), m, p, h, 1 / math.sqrt(cols), False)
        view(y, (rows, cols), xv.dtype).copy_(out)
        return 0


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight in fp32: pqk_rmsnorm_quantize quantizes this fp32 value and stores it
    rounded to x.dtype as the normed output."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


@pytest.fixture
def emu():
    lib = EmulatedLib()
    with _binding_on_cpu(lib):
        yield lib


SHAPES = [(1, 64, 32), (3, 130, 96), (17, 5, 160), (7, 33, 62), (2, 9, 2)]  # (M, N, K): odd M/N, K % 32 != 0


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_token", [False, True])
def test_int4_matmul_plumbing(emu, gen, m, n, k, out_dtype, per_token):
    a = fmt.pack_int4(rand_int((m, k), 4, gen))
    w = fmt.pack_int4(rand_int((n, k), 4, gen))
    a_s = torch.rand(m if per_token else 1, generator=gen) + 0.01
    w_s = torch.rand(n, generator=gen) * 0.01 + 1e-3
    b = torch.randn(n, generator=gen)
    saved = [t.clone() for t in (a, w, a_s, w_s, b)]
    got = cuda.int4_matmul(a, w, a_s if per_token else a_s.reshape(()), w_s, b, out_dtype)
    want = reference.int4_matmul(a, w, a_s, w_s, b, out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    assert torch.equal(got, want)
    assert emu.calls[-1] == ("pqk_int4_gemm", m, n, cuda.padded_k(k), cuda.GEMM_EPILOGUES[out_dtype],
                             int(per_token and m > 1))
    for t, s in zip((a, w, a_s, w_s, b), saved):
        assert torch.equal(t, s)  # the K padding copies; the caller's tensors are untouched


@pytest.mark.parametrize("m,n,k,splits", [(1, 64, 1024, 4), (16, 40, 4096, 16), (1, 8192, 4096, 1), (17, 64, 1024, 1)])
@pytest.mark.parametrize("static_x", [False, True])
def test_decode_gemm_splits_k_with_a_zeroed_workspace(emu, gen, m, n, k, splits, static_x):
    """A decode GEMM too narrow to fill the (emulated 108-SM) GPU splits K; the emulator refuses a workspace that is
    not all zero. The result is the reference's either way."""
    w = fmt.pack_int4(rand_int((n, k), 4, gen))
    w_s, b = torch.rand(n, generator=gen) * 0.01 + 1e-3, torch.randn(n, generator=gen)
    if static_x:
        x = torch.randn(m, k, generator=gen).half()
        got, want = cuda.quant_linear(x, w, w_s, torch.tensor(0.1), 4, b), reference.quant_linear(x, w, w_s,
                                                                                                 torch.tensor(0.1), 4, b)
    else:
        a = fmt.pack_int4(rand_int((m, k), 4, gen))
        got = cuda.int4_matmul(a, w, torch.tensor(0.1), w_s, b, torch.float16)
        want = reference.int4_matmul(a, w, torch.tensor(0.1), w_s, b, torch.float16)
    assert torch.equal(got, want) and emu.splits == [splits]


@pytest.mark.parametrize("m,n,k", [(1, 64, 32), (3, 132, 96), (17, 8, 160), (7, 36, 62)])
@pytest.mark.parametrize("silu", [False, True])
def test_requant_plumbing(emu, gen, m, n, k, silu):
    a = fmt.pack_int4(rand_int((m, k), 4, gen))
    w = fmt.pack_int4(rand_int((n, k), 4, gen))
    a_s, w_s, b = torch.tensor(0.05), torch.rand(n, generator=gen) * 0.01 + 1e-3, torch.randn(n, generator=gen)
    fn, ref = ((cuda.int4_matmul_silu_mul_requant, reference.int4_matmul_silu_mul_requant) if silu else
               (cuda.int4_matmul_requant, reference.int4_matmul_requant))
    got = fn(a, w, a_s, w_s, b, 0.37)
    assert got.shape == (m, n // (4 if silu else 2)) and torch.equal(got, ref(a, w, a_s, w_s, b, 0.37))
    assert emu.calls[-1] == ("pqk_int4_gemm", m, n, cuda.padded_k(k), 4 if silu else 3, 0, 0.37)
    with pytest.raises(ValueError, match="multiple of"):
        fn(a, w[:n - 2], a_s, w_s[:n - 2], None, 0.37) if silu else fn(a, w[:n - 1], a_s, w_s[:n - 1], None, 0.37)
    with pytest.raises(ValueError, match="out_scale"):
        fn(a, w, a_s, w_s, None, 0.0)


def test_misaligned_operands_are_copied_not_rejected(emu, gen):
    m, n, k = 5, 7, 64
    raw = torch.zeros(m * k // 2 + 1, dtype=torch.uint8)
    a = raw[1:].view(m, k // 2)                     # contiguous, at an odd address
    a.copy_(fmt.pack_int4(rand_int((m, k), 4, gen)))
    assert not cuda.is_aligned(a, 16)
    w = fmt.pack_int4(rand_int((n, k), 4, gen))
    w_s = torch.rand(n, generator=gen) + 0.1
    got = cuda.int4_matmul(a, w, torch.tensor(0.5), w_s, None, torch.float32)
    assert torch.equal(got, reference.int4_matmul(a, w, torch.tensor(0.5), w_s, None, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(1, 2), (5, 123 + 1), (3, 4, 66)])
def test_quantizers_plumbing(emu, gen, dtype, bits, shape):
    x = (torch.randn(shape, generator=gen) * 10).to(dtype)
    s = torch.tensor(0.37)
    assert torch.equal(cuda.quantize_static(x, s, bits),
                       reference.quantize_static(x.reshape(-1, shape[-1]), s, bits).reshape(*shape[:-1], -1))
    q, sc = cuda.quantize_per_token(x, bits)
    q_ref, sc_ref = reference.quantize_per_token(x.reshape(-1, shape[-1]), bits)
    assert torch.equal(q, q_ref.reshape(*shape[:-1], -1)) and torch.equal(sc, sc_ref.reshape(shape[:-1]))


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("fused_max", [0, 16])   # the default (never fused) and the fused kernel up to 16 rows
def test_quant_linear_plumbing(emu, gen, m, n, k, dtype, static, fused_max, monkeypatch):
    monkeypatch.setattr(cuda, "FUSED_A_MAX_M", fused_max)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    w = fmt.pack_int4(rand_int((n, k), 4, gen))
    w_s, b = torch.rand(n, generator=gen) * 0.01 + 1e-3, torch.randn(n, generator=gen)
    a_s = torch.tensor(0.21) if static else None
    saved = x.clone()
    got = cuda.quant_linear(x, w, w_s, a_s, 4, b)
    assert torch.equal(got, reference.quant_linear(x, w, w_s, a_s, 4, b)) and torch.equal(x, saved)
    # static, M <= FUSED_A_MAX_M: ONE launch, the quantize inside the GEMM's A load; larger M: quantize, then the
    # GEMM (cuda_ops' module doc); per token: the max-reduction first, then the GEMM
    fused = static and m <= cuda.FUSED_A_MAX_M
    assert [c[0] for c in emu.calls] == (["pqk_quant_gemm_static"] if fused else
                                         ["pqk_quantize_static" if static else "pqk_quantize_per_token",
                                          "pqk_int4_gemm"])
    if fused:
        assert emu.calls[0] == ("pqk_quant_gemm_static", m, n, cuda.padded_k(k), cuda.DTYPE_CODES[dtype],
                                cuda.GEMM_EPILOGUES[dtype])
    elif static:
        assert emu.calls[1] == ("pqk_int4_gemm", m, n, cuda.padded_k(k), cuda.GEMM_EPILOGUES[dtype], 0)


@pytest.mark.parametrize("m,n,k", [(1, 64, 32), (3, 132, 96), (17, 8, 160), (7, 36, 62)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fused_max", [0, 16])
def test_quant_linear_silu_mul_requant_plumbing(emu, gen, m, n, k, dtype, fused_max, monkeypatch):
    monkeypatch.setattr(cuda, "FUSED_A_MAX_M", fused_max)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    x[0, 0] = float("inf")  # clamps to 7
    w = fmt.pack_int4(rand_int((n, k), 4, gen))
    a_s, w_s, b = torch.tensor(0.3), torch.rand(n, generator=gen) * 0.01 + 1e-3, torch.randn(n, generator=gen)
    got = cuda.quant_linear_silu_mul_requant(x, w, w_s, a_s, b, 0.37)
    want = reference.int4_matmul_silu_mul_requant(reference.quantize_static(x, a_s, 4), w, a_s, w_s, b, 0.37)
    assert got.shape == (m, n // 4) and torch.equal(got, want)
    if m <= cuda.FUSED_A_MAX_M:
        assert emu.calls == [("pqk_quant_gemm_static", m, n, cuda.padded_k(k), cuda.DTYPE_CODES[dtype], 4, 0.37)]
    else:   # prefill-sized: quantize, then the GEMM with the silu-mul requant epilogue
        assert [c[:2] for c in emu.calls] == [("pqk_quantize_static", m), ("pqk_int4_gemm", m)]
        assert emu.calls[1][4] == 4
    with pytest.raises(ValueError, match="multiple of 4"):
        cuda.quant_linear_silu_mul_requant(x, w[:n - 2], w_s[:n - 2], a_s, None, 0.37)
    with pytest.raises(ValueError, match="a_scale must be finite"):
        cuda.quant_linear_silu_mul_requant(x, w, w_s, torch.tensor(float("nan")), None, 0.37)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
def test_rmsnorm_quantize_plumbing(emu, gen, dtype, bits):
    x = torch.randn(3, 5, 96, generator=gen).to(dtype)
    wt = (torch.rand(96, generator=gen) + 0.5).to(dtype)
    s = torch.tensor(0.05)
    q, y = cuda.rmsnorm_quantize(x, wt, s, bits, eps=1e-5, return_normed=True)
    y_ref = rmsnorm_reference(x, wt, 1e-5)
    assert torch.equal(y, y_ref.to(dtype)) and torch.equal(q, reference.quantize_static(y_ref, s, bits))
    assert torch.equal(cuda.rmsnorm_quantize(x, wt, s, bits, eps=1e-5), q)


@pytest.mark.parametrize("n", [64, 1536, 576, 20 * 8])
@pytest.mark.parametrize("inverse", [False, True])
def test_hadamard_plumbing(emu, gen, n, inverse):
    """The binding passes H_m (H_m^T for the inverse): the result equals the package's transform."""
    x = torch.randn(2, 3, n, generator=gen)
    got = cuda.hadamard_transform(x, inverse=inverse)
    assert torch.allclose(got, hadamard.hadamard_transform(x, inverse=inverse), atol=1e-5, rtol=1e-5)


def test_empty_inputs_launch_nothing(emu):
    assert cuda.quantize_static(torch.zeros(0, 8), torch.tensor(1.0), 4).shape == (0, 4)
    q, s = cuda.quantize_per_token(torch.zeros(0, 8), 8)
    assert q.shape == (0, 8) and s.shape == (0,)
    y = cuda.quant_linear(torch.zeros(0, 64), torch.zeros(3, 32, dtype=torch.uint8), torch.ones(3), None, 4, None)
    assert y.shape == (0, 3)
    assert emu.calls == []


def test_bad_status_names_op_and_launcher(emu, gen):
    emu.pqk_quantize_per_token = lambda *a: -5
    with pytest.raises(RuntimeError, match=r"^pqk\.quant_linear: pqk_quantize_per_token failed: emulated error "
                                           r"\(status -5\)"):
        cuda.quant_linear(torch.randn(2, 64), torch.zeros(3, 32, dtype=torch.uint8), torch.ones(3), None, 4, None)


# ---- 3. pure checks, backend resolution, registration ------------------------------------------------------------

A = torch.zeros(3, 32, dtype=torch.uint8, device="meta")
W = torch.zeros(5, 32, dtype=torch.uint8, device="meta")
WS = torch.ones(5, device="meta")
S1 = torch.ones((), device="meta")


@pytest.mark.parametrize("args,exc,match", [
    ((A.to(torch.int8), W, S1, WS, None, torch.float16), NotImplementedError, "W4A4 only .* got a int8"),
    ((A, W.float(), S1, WS, None, torch.float16), TypeError, "w must have dtype"),
    ((A, torch.zeros(5, 32, dtype=torch.uint8), S1, WS, None, torch.float16), ValueError,
     "w must be on meta like the input, got cpu"),
    ((A, W[:, :16], S1, WS, None, torch.float16), ValueError, r"w's in_features K must be 64"),
    ((A[0], W, S1, WS, None, torch.float16), ValueError, "a must be 2-D"),
    ((A, W, torch.ones(2, device="meta"), WS, None, torch.float16), ValueError,
     r"a_scale must be a scalar or have one scale per row \(3\)"),
    ((A, W, S1, WS[:4], None, torch.float16), ValueError, r"w_scale must have shape \(5,\)"),
    ((A, W, S1, WS, torch.ones(4, device="meta"), torch.float16), ValueError, r"bias must have shape \(5,\)"),
    ((A, W, S1, WS, None, torch.int32), TypeError, "out_dtype must be one of"),
    ((torch.empty(2**31, 32, dtype=torch.uint8, device="meta"), W, S1, WS, None, torch.float16), ValueError,
     r"M = 2147483648 is outside"),
])
def test_check_gemm_rejects(args, exc, match):
    with pytest.raises(exc, match=r"^pqk\.int4_matmul: .*" + match):
        cuda.check_gemm("int4_matmul", *args)


def test_check_gemm_plans_padding_and_flags():
    g = cuda.check_gemm("int4_matmul", A[:, :31], W[:, :31], torch.ones(3, device="meta"), WS, None, torch.bfloat16)
    assert (g.m, g.n, g.k, g.k_launch, g.per_token, g.epilogue) == (3, 5, 62, 64, True, 1)
    assert cuda.check_gemm("x", A, W, S1, WS, None, torch.float32).k_launch == 64


def test_pad_packed_k_keeps_the_product(gen):
    """Zero bytes appended to both operands leave every dot product unchanged (what lets the binding pad)."""
    for k in (2, 30, 62, 94):
        a, w = fmt.pack_int4(rand_int((4, k), 4, gen)), fmt.pack_int4(rand_int((6, k), 4, gen))
        ap, wp = cuda.pad_packed_k(a, k), cuda.pad_packed_k(w, k)
        assert ap.shape[1] * 2 == cuda.padded_k(k) and ap.shape[1] * 2 % 32 == 0
        assert torch.equal(reference.int_matmul_exact(fmt.unpack_int4(ap), fmt.unpack_int4(wp)),
                           reference.int_matmul_exact(fmt.unpack_int4(a), fmt.unpack_int4(w)))
    a = torch.zeros(2, 16, dtype=torch.uint8)
    assert cuda.pad_packed_k(a, 32) is a


@pytest.mark.parametrize("call,exc,match", [
    (lambda: cuda.check_rows("op", torch.zeros(3, 5, device="meta"), 4), ValueError, "last dim must be even"),
    (lambda: cuda.check_rows("op", torch.zeros(3, 0, device="meta"), 8), ValueError, r"last dim \(K\) must be > 0"),
    (lambda: cuda.check_rows("op", torch.zeros(3, 4, dtype=torch.float64, device="meta"), 8), TypeError,
     "x must have dtype"),
    (lambda: cuda.check_rows("op", torch.zeros(3, 4, device="meta"), 3), ValueError, r"bits must be one of \(4, 8\)"),
    (lambda: cuda.check_rows("op", torch.zeros(2**31, 2, device="meta"), 8), ValueError, "rows = 2147483648"),
    (lambda: checks.static_scale(torch.ones(2, device="meta"), "scale", "op", torch.device("meta")),
     ValueError, "scale must be a scalar"),
    (lambda: checks.static_scale(torch.ones(1), "scale", "op", torch.device("meta")), ValueError,
     "scale must be on meta"),
    (lambda: checks.tensor([1.0], "x", "op", (torch.float32,)), TypeError, "x must be a torch.Tensor"),
])
def test_row_checks_reject(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cuda_ops_reject_before_launch(emu):
    """The registered implementations validate on their own (torch.ops.pqk.* can be called directly)."""
    with pytest.raises(NotImplementedError, match=r"^pqk\.quant_linear: the CUDA kernels are W4A4 only"):
        cuda.quant_linear(torch.randn(2, 64), torch.zeros(3, 64, dtype=torch.int8), torch.ones(3), None, 4, None)
    with pytest.raises(NotImplementedError, match="W4A4 only"):
        cuda.quant_linear(torch.randn(2, 64), torch.zeros(3, 32, dtype=torch.uint8), torch.ones(3), None, 8, None)
    with pytest.raises(ValueError, match=r"w's in_features K must be 64"):
        cuda.quant_linear(torch.randn(2, 64), torch.zeros(3, 16, dtype=torch.uint8), torch.ones(3), None, 4, None)
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        cuda.rmsnorm_quantize(torch.randn(2, 64), torch.ones(32), torch.tensor(0.1))
    with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
        cuda.rmsnorm_quantize(torch.randn(2, 64), torch.ones(64), torch.tensor(0.1), eps=-1.0)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]: .*4864"):
        cuda.hadamard_transform(torch.randn(2, 4864))
    assert emu.calls == []


@pytest.mark.parametrize("name", sorted(cuda.REGISTERED))
def test_registered_for_the_cuda_dispatch_key(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
@pytest.mark.parametrize("call", [
    lambda: pqk.quantize_static(torch.randn(2, 64), 0.1, backend="cuda"),
    lambda: pqk.quantize_per_token(torch.randn(2, 64), backend="cuda"),
    lambda: pqk.int4_matmul(torch.zeros(2, 32, dtype=torch.uint8), torch.zeros(3, 32, dtype=torch.uint8), 1.0,
                            torch.ones(3), backend="cuda"),
    lambda: pqk.quant_linear(torch.randn(2, 64), torch.zeros(3, 32, dtype=torch.uint8), torch.ones(3), 0.1,
                             backend="cuda"),
    lambda: pqk.nn.QuantLinear(64, 3, backend="cuda")(torch.randn(2, 64)),
    lambda: pqk.pack_int4(torch.zeros(2, 4, dtype=torch.int8), backend="cuda"),
    lambda: pqk.rmsnorm_quantize(torch.randn(2, 64), torch.ones(64), 0.1, backend="cuda"),
    lambda: pqk.hadamard_transform(torch.randn(2, 64), backend="cuda"),
])
def test_backend_cuda_without_cuda_is_a_clear_error(call):
    with pytest.raises(ValueError, match=r"backend='cuda' runs on CUDA tensors, got tensors on cpu \(and CUDA is not "
                                         r"available here: .*sees no CUDA device"):
        call()


def test_resolve():
    """backend= -> implementation for CUDA devices, without a GPU (cuda_available patched)."""
    dev = torch.device("cuda")
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(cuda_library, "_CHECKED", True)
        mp.setattr(cuda_library, "_REASON", None)
        mp.setattr(cuda_library, "_LIB", EmulatedLib())
        assert backend_mod.resolve("auto", dev, "op").kind == "cuda"
        assert backend_mod.resolve("cuda", dev, "op").kind == "cuda"
        assert backend_mod.resolve("auto", dev, "op", {"cuda": "int8 operands"}).kind == "reference"
        with pytest.raises(NotImplementedError, match=r"^pqk\.op: backend='cuda' has no CUDA kernel for int8 operands"):
            backend_mod.resolve("cuda", dev, "op", {"cuda": "int8 operands"})
        with pytest.raises(ValueError, match="backend='cpu' runs on CPU tensors"):
            backend_mod.resolve("cpu", dev, "op")
        assert backend_mod.resolve("auto", torch.device("cpu"), "op").kind in ("cpu", "reference")
        mp.setattr(cuda_library, "_REASON", "libpqk_cuda.so could not be loaded: test")
        mp.setattr(backend_mod, "_NOTED", False)
        with pytest.warns(RuntimeWarning, match="runs the PyTorch reference because .* could not be loaded: test"):
            assert backend_mod.resolve("auto", dev, "op").kind == "reference"
        with pytest.raises(RuntimeError, match=r"^pqk\.op: backend='cuda' is not available here: .*test"):
            backend_mod.resolve("cuda", dev, "op")
    finally:
        mp.undo()


def test_available_backends_by_device():
    assert "cuda" not in pqk.available_backends()           # CPU-tensor backends (the CPU tests sweep these)
    assert pqk.available_backends("cuda") == (["reference", "cuda"] if cuda_library.cuda_available() else ["reference"])


def test_cuda_available_is_constant_under_compile():
    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x + 1 if cuda_library.cuda_available() else x - 1

    assert torch.equal(f(torch.ones(2)), torch.ones(2) + (1 if cuda_library.cuda_available() else -1))


def test_find_library_order(tmp_path, monkeypatch):
    monkeypatch.setenv("PQK_CUDA_LIB", str(tmp_path / "nope.so"))
    with pytest.raises(RuntimeError, match="PQK_CUDA_LIB=.*does not exist"):
        cuda_library.find_library()
    lib = tmp_path / "libpqk_cuda.so"
    lib.write_bytes(b"")
    monkeypatch.setenv("PQK_CUDA_LIB", str(lib))
    assert cuda_library.find_library() == str(lib)
    monkeypatch.delenv("PQK_CUDA_LIB")
    monkeypatch.setattr(cuda_library, "PACKAGE_DIR", str(tmp_path))
    assert cuda_library.find_library() == str(lib)          # next to the package (setup.py's PQK_FORCE_CUDA path)
    monkeypatch.setattr(cuda_library, "PACKAGE_DIR", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="not found .*build=False"):
        cuda_library.find_library(build=False)


def test_custom_op_kernels_of_rmsnorm_and_hadamard(emu, gen):
    """The functions registered for pqk::rmsnorm_quantize / pqk::hadamard_transform on CUDA keep the schema (q and
    an empty normed tensor when it is not asked for) and reach the launchers."""
    x = torch.randn(5, 96, generator=gen).half()
    wt = (torch.rand(96, generator=gen) + 0.5).half()
    s = torch.tensor(0.07)
    q, y = cuda.REGISTERED["pqk::rmsnorm_quantize"](x, wt, s, 4, 1e-5, False)
    assert y.numel() == 0 and torch.equal(q, reference.rmsnorm_quantize(x, wt, s, 4, 1e-5)[0])
    q2, y2 = cuda.REGISTERED["pqk::rmsnorm_quantize"](x, wt, s, 4, 1e-5, True)
    assert torch.equal(q2, q) and torch.equal(y2, reference.rmsnorm_quantize(x, wt, s, 4, 1e-5)[1])
    xh = torch.randn(3, 1536, generator=gen)
    got = cuda.REGISTERED["pqk::hadamard_transform"](xh, True)
    assert torch.allclose(got, hadamard.hadamard_transform(xh, inverse=True), atol=1e-5, rtol=1e-5)
    assert [c[0] for c in emu.calls][-1] == "pqk_hadamard" and "pqk_rmsnorm_quantize" in [c[0] for c in emu.calls]


@pytest.mark.parametrize("m", [1, 3, 4, 5])
@pytest.mark.parametrize("static", [True, False])
def test_decode_gemv_opt_in(emu, gen, m, static, monkeypatch):
    """PQK_DECODE_GEMV_MAX_M (GEMV_MAX_M here): GEMMs and static linears of at most that many rows launch config 3
    (the decode GEMV; no split-K, the float-A one quantizing in its A load), larger ones the auto config (-1); off
    by default. Results equal the reference either way."""
    assert cuda.GEMV_MAX_M == 0   # the default (the GEMV was not timed on a GPU yet)
    monkeypatch.setattr(cuda, "GEMV_MAX_M", 4)
    n, k = 132, 4096
    x = (torch.randn(m, k, generator=gen) * 3).half()
    w = fmt.pack_int4(rand_int((n, k), 4, gen))
    w_s, b = torch.rand(n, generator=gen) * 0.01 + 1e-3, torch.randn(n, generator=gen)
    a_s = torch.tensor(0.21) if static else None
    got = cuda.quant_linear(x, w, w_s, a_s, 4, b)
    assert torch.equal(got, reference.quant_linear(x, w, w_s, a_s, 4, b))
    gemv = m <= 4
    assert emu.configs[-1] == (3 if gemv else -1) and (emu.splits[-1] == 1 or not gemv)
    # static: one launch at M <= 4 (the GEMV quantizes its own A chunk); quantize + GEMM above
    if static:
        assert [c[0] for c in emu.calls] == (["pqk_quant_gemm_static"] if gemv else
                                             ["pqk_quantize_static", "pqk_int4_gemm"])
    a = fmt.pack_int4(rand_int((m, k), 4, gen))
    a_scale = torch.rand(m, generator=gen) + 0.01
    got = cuda.int4_matmul(a, w, a_scale, w_s, None, torch.float32)
    assert torch.equal(got, reference.int4_matmul(a, w, a_scale, w_s, None, torch.float32))
    assert emu.configs[-1] == (3 if gemv else -1)
