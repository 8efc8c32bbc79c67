"""The CUDA backend: libpqk_cuda.so (csrc/cuda, plain C API in pqk_cuda.h) loaded with ctypes, and Python CUDA
implementations of the pqk:: custom ops that validate the tensors, allocate outputs with torch and call the launchers.

Why ctypes and not a torch C++/CUDA extension: the library links the CUDA runtime statically and takes raw device
pointers plus a stream, so it works with any CUDA build of torch (no ABI coupling, no CUDA torch needed to build it:
``PQK_FORCE_CUDA=1 pip install .`` compiles it with nvcc alone). The ops stay capturable by CUDA graphs: every launch
goes to ``torch.cuda.current_stream()``, nothing synchronizes or copies host data, and every buffer (outputs,
temporaries, K padding) comes from torch's caching allocator. torch.compile sees each op as one opaque node traced
with its fake (ops/library.py); the Python functions below run only when the compiled graph executes.

Which op runs on which launcher (registered for the "cuda" dispatch key at the bottom of this module):

    pqk::quantize_static     pqk_quantize_static        x fp16/bf16/fp32, bits 4 or 8
    pqk::quantize_per_token  pqk_quantize_per_token     x fp16/bf16/fp32, bits 4 or 8
    pqk::int4_matmul         pqk_int4_gemm              W4A4 only: a and w packed uint8
    pqk::quant_linear        pqk_quantize_* + pqk_int4_gemm (two launches)   W4A4 only: w uint8, a_bits 4
    pqk::int4_matmul_requant / pqk::int4_matmul_silu_mul_requant
                             pqk_int4_gemm epilogue 3 / 4 (packed int4 out)     W4A4 only
    pqk::pack_int4 / unpack_int4, W4A8 / W8A8: no CUDA kernel. backend="auto" runs the reference (plain PyTorch,
        on the GPU) for them; backend="cuda" raises NotImplementedError (ops/backend.py decides, via cuda_unsupported).

    pqk::rmsnorm_quantize    pqk_rmsnorm_quantize       x fp16/bf16/fp32 (weight cast to x.dtype by ops/transform.py)
    pqk::hadamard_transform  pqk_hadamard               x fp16/bf16/fp32, n = m * 2^p (hadamard.hadamard_factor)

K not a multiple of 32 (the tensor-core GEMM consumes K in steps of 32): the binding PADS A and W with zero bytes to
the next multiple of 32 (a zero nibble adds 0 to the exact int32 sum, so the result is bit-identical). That costs a
copy of A and W per call; every LLM width is a multiple of 32, so a real model never takes this path. Operands whose
address is not 16-byte aligned (a view at an odd offset) are copied to a fresh, aligned allocation the same way.

Errors: every argument is checked in Python before a launch (ValueError/TypeError naming the op and the argument);
a non-zero launcher status becomes a RuntimeError naming the op, the launcher and pqk_cuda_error_string(status).
A launch error is reported when it is queued (cudaGetLastError); a fault inside a running kernel surfaces, as with
every CUDA op, at the next synchronizing call.
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import subprocess
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import cuda_build
from . import library  # noqa: F401  (the pqk:: schemas must exist before kernels are registered for them)

# ---- the library ------------------------------------------------------------------------------------------------

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float

# name -> (restype, argtypes), in the order of csrc/cuda/pqk_cuda.h (tests/cuda/test_binding.py parses the header and
# checks that every declared function is here with the same parameter types).
SIGNATURES: dict[str, tuple] = {
    "pqk_cuda_error_string": (ctypes.c_char_p, [_I]),
    # a, w, out, a_scale, a_scale_per_token, w_scale, bias, out_scale, m, n, k, epilogue, config, stream
    "pqk_int4_gemm": (_I, [_P, _P, _P, _P, _I, _P, _P, _F, _I, _I, _I, _I, _I, _P]),
    # x, x_dtype, out, scale, bits, rows, cols, stream
    "pqk_quantize_static": (_I, [_P, _I, _P, _P, _I, _I, _I, _P]),
    # x, x_dtype, out, scales_out, bits, rows, cols, stream
    "pqk_quantize_per_token": (_I, [_P, _I, _P, _P, _I, _I, _I, _P]),
    # x, x_dtype, weight, eps, scale, bits, q_out, normed_out, rows, cols, stream
    "pqk_rmsnorm_quantize": (_I, [_P, _I, _P, _F, _P, _I, _P, _P, _I, _I, _P]),
    # x, y, x_dtype, had_m, m, rows, cols, stream
    "pqk_hadamard": (_I, [_P, _P, _I, _P, _I, _I, _I, _P]),
    # sm (major * 10 + minor)
    "pqk_int4_gemm_path": (ctypes.c_char_p, [_I]),
}

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}   # x_dtype of pqk_cuda.h
GEMM_EPILOGUES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # epilogue codes for a float output
K_STEP = 32          # the GEMM's K granularity (pqk_int4_gemm returns PQK_ERR_K_ALIGN otherwise)
GEMM_ALIGN = 16      # bytes; A and W are read with 16-byte cp.async (PQK_ERR_PTR_ALIGN otherwise)
INT32_MAX = 2**31 - 1

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Sets restype/argtypes of every launcher (AttributeError naming the symbol if the library lacks one)."""
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def open_library(path: str) -> ctypes.CDLL:
    """dlopen + declare. Works without a GPU or driver (the CUDA runtime is linked statically and initializes lazily:
    the launchers' argument checks run, anything that reaches CUDA returns a cudaError status)."""
    return declare(ctypes.CDLL(path))


def find_library(build: bool = True) -> str:
    """The one lookup of libpqk_cuda.so, first match wins:

    1. ``$PQK_CUDA_LIB`` (an explicit path; an error if it does not exist);
    2. ``prefixquant_kernels/libpqk_cuda.so``, where ``PQK_FORCE_CUDA=1 pip install`` puts it (setup.py);
    3. with ``build=True`` and nvcc present: ``cuda_build.build_library()`` (cached by source hash under
       ``$PQK_CUDA_CACHE``; the first build takes about a minute and is announced with a warning).
    Raises RuntimeError saying what was tried.
    """
    env = os.environ.get("PQK_CUDA_LIB")
    if env:
        if not os.path.exists(env):
            raise RuntimeError(f"PQK_CUDA_LIB={env!r} does not exist")
        return env
    installed = os.path.join(PACKAGE_DIR, cuda_build.LIB_NAME)
    if os.path.exists(installed):
        return installed
    if build and cuda_build.nvcc_path() is not None:
        warnings.warn(f"prefixquant_kernels: {cuda_build.LIB_NAME} is not installed; building it with nvcc "
                      f"(cached under {cuda_build.cache_dir()}; about a minute the first time)", stacklevel=2)
        return cuda_build.build_library(cuda_build.ARCHS).lib
    raise RuntimeError(f"{cuda_build.LIB_NAME} not found (PQK_CUDA_LIB unset, not at {installed}, "
                       f"{'no nvcc to build it' if build else 'build=False'}). Install with "
                       "PQK_FORCE_CUDA=1 pip install --no-build-isolation . (needs nvcc) or use backend='reference'.")


_LIB: ctypes.CDLL | None = None
_LIB_PATH: str | None = None
_REASON: str | None = None      # why the CUDA backend cannot run, once known
_CHECKED = False


def unavailable_reason() -> str | None:
    """None if the CUDA backend can run here, else why not (checked once: torch sees a GPU, then the library)."""
    global _LIB, _LIB_PATH, _REASON, _CHECKED
    if not _CHECKED:
        _CHECKED = True
        if not torch.cuda.is_available():
            _REASON = (f"torch {torch.__version__} sees no CUDA device" + (" (a CPU-only build of torch)"
                       if torch.version.cuda is None else ""))
        else:
            try:
                _LIB_PATH = find_library()
                _LIB = open_library(_LIB_PATH)
            # not found / nvcc failed / dlopen failed / a symbol missing
            except (RuntimeError, OSError, AttributeError, subprocess.CalledProcessError) as e:
                _REASON = f"{cuda_build.LIB_NAME} could not be loaded: {e}"
    return _REASON


@torch.compiler.assume_constant_result  # torch.compile bakes the answer in instead of tracing ctypes/dlopen
def cuda_available() -> bool:
    """libpqk_cuda.so loadable AND torch.cuda.is_available()."""
    return unavailable_reason() is None


def loaded_library_path() -> str | None:
    """The path of the libpqk_cuda.so the backend uses (None when it is not available)."""
    return _LIB_PATH if unavailable_reason() is None else None


def require(op: str) -> ctypes.CDLL:
    """The loaded library, or RuntimeError("pqk.<op>: backend='cuda' is not available here: <why>")."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"pqk.{op}: backend='cuda' is not available here: {reason}")
    return _LIB


def _launch(op: str, launcher: str, *args) -> None:
    """Calls one launcher; a non-zero status (a negative PqkStatus or a cudaError_t) -> RuntimeError naming the op."""
    lib = require(op)
    st = getattr(lib, launcher)(*args)
    if st != 0:
        raise RuntimeError(f"pqk.{op}: {launcher} failed: {lib.pqk_cuda_error_string(st).decode()} (status {st})")


def _stream(t: torch.Tensor) -> int:
    """The cudaStream_t of torch's current stream on t's device (the capture stream inside torch.cuda.graph)."""
    return torch.cuda.current_stream(t.device).cuda_stream


def _on_device(t: torch.Tensor):
    """Makes t's GPU current: torch's cudaSetDevice makes that device's primary context current on this thread, and
    the library's own (static) CUDA runtime launches into the thread's current context."""
    return torch.cuda.device(t.device)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


# ---- checks: pure functions of dtypes / shapes / strides / addresses (unit-tested on CPU, no CUDA needed) ---------

def _fail(op: str, msg: str, exc: type[Exception] = ValueError):
    raise exc(f"pqk.{op}: {msg}")


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def check_operand(op: str, name: str, t, dtypes, device: torch.device, dim: int | None = None) -> torch.Tensor:
    """t is a tensor of one of `dtypes` on `device` (and `dim`-D if given). Returns t."""
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if t.dtype not in dtypes:
        _fail(op, f"{name} must have dtype in ({', '.join(map(_dt, dtypes))}), got {_dt(t.dtype)}", TypeError)
    if t.device != device:
        _fail(op, f"{name} must be on {device} like the input, got {t.device}")
    if dim is not None and t.dim() != dim:
        _fail(op, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def check_int32(op: str, **sizes: int) -> None:
    """The launchers take int sizes: each must be in [1, 2^31 - 1] (ctypes would silently wrap a larger one)."""
    for name, v in sizes.items():
        if not 0 < v <= INT32_MAX:
            _fail(op, f"{name} = {v} is outside the CUDA kernels' range [1, 2^31 - 1]")


def is_aligned(t: torch.Tensor, nbytes: int) -> bool:
    return t.data_ptr() % nbytes == 0


def contiguous_aligned(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """t as a contiguous tensor whose address is a multiple of `nbytes`: t itself when it already is, else a copy
    (a fresh allocation from torch's allocator is at least 64-byte aligned on CPU, 512 on CUDA)."""
    t = t.contiguous()
    return t if is_aligned(t, nbytes) else t.clone()


def padded_k(k: int) -> int:
    """K rounded up to the GEMM's step of 32."""
    return -(-k // K_STEP) * K_STEP


def pad_packed_k(t: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [R, K/2] packed int4 -> [R, padded_k(K)/2] with zero bytes appended (zero nibbles add 0 to every dot
    product, so the GEMM result is unchanged); t itself when K is already a multiple of 32."""
    kp = padded_k(k)
    return t if kp == k else F.pad(t, (0, (kp - k) // 2))


@dataclass(frozen=True)
class GemmArgs:
    m: int
    n: int
    k: int               # the real K (elements)
    k_launch: int        # K passed to the kernel: padded_k(k)
    per_token: bool      # a_scale has one entry per row of A
    epilogue: int        # pqk_int4_gemm epilogue code for out_dtype


def check_gemm(op: str, a, w, a_scale, w_scale, bias, out_dtype) -> GemmArgs:
    """Everything pqk_int4_gemm needs to know, validated: a uint8 [M, K/2], w uint8 [N, K/2] on a's device,
    a_scale float with 1 or M elements, w_scale float [N], bias float [N] or None, out_dtype fp16/bf16/fp32."""
    check_operand(op, "a", a, (torch.uint8, torch.int8), a.device if isinstance(a, torch.Tensor) else None, dim=2)
    dev = a.device
    check_operand(op, "w", w, (torch.uint8, torch.int8), dev, dim=2)
    if a.dtype != torch.uint8 or w.dtype != torch.uint8:
        _fail(op, f"the CUDA GEMM is W4A4 only (a and w packed int4, uint8), got a {_dt(a.dtype)} and "
                  f"w {_dt(w.dtype)}; use backend='reference' (backend='auto' does) for int8 operands",
              NotImplementedError)
    m, n, k = a.shape[0], w.shape[0], 2 * a.shape[1]
    if w.shape[1] != a.shape[1]:
        _fail(op, f"w must have K/2 = {a.shape[1]} bytes per row like a, got w of shape {tuple(w.shape)}")
    check_operand(op, "a_scale", a_scale, (torch.float32, torch.float16, torch.bfloat16), dev)
    if a_scale.numel() not in (1, m):
        _fail(op, f"a_scale must have 1 (per-tensor) or M = {m} (per-token) elements, got shape "
                  f"{tuple(a_scale.shape)}")
    check_operand(op, "w_scale", w_scale, (torch.float32, torch.float16, torch.bfloat16), dev)
    if tuple(w_scale.shape) != (n,):
        _fail(op, f"w_scale must have shape ({n},), got {tuple(w_scale.shape)}")
    if bias is not None:
        check_operand(op, "bias", bias, (torch.float32, torch.float16, torch.bfloat16), dev)
        if tuple(bias.shape) != (n,):
            _fail(op, f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if out_dtype not in GEMM_EPILOGUES:
        _fail(op, f"out_dtype must be one of float16, bfloat16, float32, got {out_dtype}", TypeError)
    if m and n:
        check_int32(op, M=m, N=n, K=padded_k(k))
    return GemmArgs(m, n, k, padded_k(k), m > 1 and a_scale.numel() == m, GEMM_EPILOGUES[out_dtype])


def check_rows(op: str, x, bits: int, name: str = "x") -> tuple[int, int]:
    """x fp16/bf16/fp32 [..., K] (K even for bits 4), bits 4 or 8 -> (rows, cols) for a row-wise launcher."""
    check_operand(op, name, x, tuple(DTYPE_CODES), x.device if isinstance(x, torch.Tensor) else None)
    if x.dim() < 1:
        _fail(op, f"{name} must have at least 1 dim, got shape {tuple(x.shape)}")
    if bits not in (4, 8):
        _fail(op, f"bits must be 4 or 8, got {bits!r}")
    cols = x.shape[-1]
    if cols == 0:
        _fail(op, f"{name}'s last dim (K) must be > 0, got shape {tuple(x.shape)}")
    if bits == 4 and cols % 2:
        _fail(op, f"{name}'s last dim must be even for 4-bit packing, got {cols} (shape {tuple(x.shape)})")
    rows = x.numel() // cols
    if rows:
        check_int32(op, rows=rows, cols=cols)
    return rows, cols


def check_static_scale(op: str, scale, name: str, device: torch.device) -> None:
    check_operand(op, name, scale, (torch.float32, torch.float16, torch.bfloat16), device)
    if scale.numel() != 1:
        _fail(op, f"{name} must have 1 element (static per-tensor scale), got shape {tuple(scale.shape)}")


def _quantized(x: torch.Tensor, bits: int) -> torch.Tensor:
    shape = [*x.shape[:-1], x.shape[-1] // 2 if bits == 4 else x.shape[-1]]
    return torch.empty(shape, dtype=torch.uint8 if bits == 4 else torch.int8, device=x.device)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    # the launchers read fp32 scales/bias; .to/.contiguous are no-ops (no copy) for the usual fp32 contiguous input
    return None if t is None else t.detach().reshape(-1).to(torch.float32).contiguous()


# ---- implementations of the pqk:: ops for CUDA tensors ---------------------------------------------------------

def quantize_static(x: torch.Tensor, scale: torch.Tensor, bits: int, cpu_isa: int = -1) -> torch.Tensor:
    """pqk::quantize_static on CUDA: one launch of pqk_quantize_static (elementwise, no reduction)."""
    return _quantize_static("quantize_static", x, scale, bits)


def quantize_per_token(x: torch.Tensor, bits: int, cpu_isa: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """pqk::quantize_per_token on CUDA: one block per row (max-reduction, then quantize)."""
    return _quantize_per_token("quantize_per_token", x, bits)


def _quantize_static(op: str, x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = check_rows(op, x, bits)
    check_static_scale(op, scale, "scale", x.device)
    out = _quantized(x, bits)
    if rows:
        x, s = x.contiguous(), _f32(scale)
        with _on_device(x):
            _launch(op, "pqk_quantize_static", x.data_ptr(), DTYPE_CODES[x.dtype], out.data_ptr(), s.data_ptr(),
                    bits, rows, cols, _stream(x))
    return out


def _quantize_per_token(op: str, x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = check_rows(op, x, bits)
    out = _quantized(x, bits)
    scales = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if rows:
        x = x.contiguous()
        with _on_device(x):
            _launch(op, "pqk_quantize_per_token", x.data_ptr(), DTYPE_CODES[x.dtype], out.data_ptr(),
                    scales.data_ptr(), bits, rows, cols, _stream(x))
    return out, scales


EPI_REQUANT, EPI_SILU_MUL_REQUANT = 3, 4  # pqk_int4_gemm epilogue codes with a packed int4 output


def _gemm(op: str, g: GemmArgs, a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
          bias: torch.Tensor | None, out_dtype: torch.dtype, epilogue: int | None = None,
          out_scale: float = 1.0) -> torch.Tensor:
    """Launches pqk_int4_gemm for checked arguments (g from check_gemm); pads K and realigns as documented above.
    epilogue None: g.epilogue (dequant to out_dtype); EPI_REQUANT / EPI_SILU_MUL_REQUANT: uint8 [M, N/2] / [M, N/4]."""
    cols = g.n if epilogue is None else g.n // (2 if epilogue == EPI_REQUANT else 4)
    out = torch.empty(g.m, cols, dtype=out_dtype if epilogue is None else torch.uint8, device=a.device)
    if g.m == 0 or g.n == 0:
        return out
    a = contiguous_aligned(pad_packed_k(a.contiguous(), g.k), GEMM_ALIGN)
    w = contiguous_aligned(pad_packed_k(w.contiguous(), g.k), GEMM_ALIGN)
    a_s, w_s, b = _f32(a_scale), _f32(w_scale), _f32(bias)
    with _on_device(a):
        _launch(op, "pqk_int4_gemm", a.data_ptr(), w.data_ptr(), out.data_ptr(), a_s.data_ptr(), int(g.per_token),
                w_s.data_ptr(), _ptr(b), out_scale, g.m, g.n, g.k_launch,
                g.epilogue if epilogue is None else epilogue, -1, _stream(a))
    return out


def int4_matmul(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, cpu_isa: int = -1) -> torch.Tensor:
    """pqk::int4_matmul on CUDA (W4A4): pqk_int4_gemm with the dequant epilogue writing out_dtype directly."""
    op = "int4_matmul"
    g = check_gemm(op, a, w, a_scale, w_scale, bias, out_dtype)
    return _gemm(op, g, a, w, a_scale, w_scale, bias, out_dtype)


def _requant(op: str, epilogue: int, a, w, a_scale, w_scale, bias, out_scale: float) -> torch.Tensor:
    g = check_gemm(op, a, w, a_scale, w_scale, bias, torch.float32)
    n_multiple = 2 if epilogue == EPI_REQUANT else 4
    if g.n % n_multiple:
        _fail(op, f"w's N = {g.n} must be a multiple of {n_multiple} for the packed int4 output")
    if not (isinstance(out_scale, float) and 0.0 < out_scale < math.inf):
        _fail(op, f"out_scale must be a finite float > 0, got {out_scale!r}")
    return _gemm(op, g, a, w, a_scale, w_scale, bias, torch.float32, epilogue, out_scale)


def int4_matmul_requant(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None, out_scale: float, cpu_isa: int = -1) -> torch.Tensor:
    """pqk::int4_matmul_requant on CUDA: one pqk_int4_gemm launch, epilogue 3 (requant with out_scale)."""
    return _requant("int4_matmul_requant", EPI_REQUANT, a, w, a_scale, w_scale, bias, out_scale)


def int4_matmul_silu_mul_requant(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                                 bias: torch.Tensor | None, out_scale: float, cpu_isa: int = -1) -> torch.Tensor:
    """pqk::int4_matmul_silu_mul_requant on CUDA: one launch, epilogue 4 (w rows interleaved gate/up)."""
    return _requant("int4_matmul_silu_mul_requant", EPI_SILU_MUL_REQUANT, a, w, a_scale, w_scale, bias, out_scale)


def quant_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, a_scale: torch.Tensor | None, a_bits: int,
                 bias: torch.Tensor | None, cpu_isa: int = -1) -> torch.Tensor:
    """pqk::quant_linear on CUDA (W4A4): quantize x to packed int4 (static scale: pqk_quantize_static; None:
    pqk_quantize_per_token), then pqk_int4_gemm with the x.dtype epilogue. Two launches: the single-launch fusion
    for static scales is pqk_rmsnorm_quantize feeding the GEMM (rmsnorm_quantize below)."""
    op = "quant_linear"
    rows, cols = check_rows(op, x, a_bits)
    check_operand(op, "w", w, (torch.uint8, torch.int8), x.device, dim=2)
    if a_bits != 4 or w.dtype != torch.uint8:
        _fail(op, f"the CUDA kernels are W4A4 only (w packed uint8, a_bits 4), got w {_dt(w.dtype)} and "
                  f"a_bits {a_bits}; use backend='reference' (backend='auto' does)", NotImplementedError)
    if x.dim() != 2:
        _fail(op, f"x must be 2-D [M, K] (the public op flattens), got shape {tuple(x.shape)}")
    if 2 * w.shape[1] != cols:
        _fail(op, f"w must have K/2 = {cols // 2} bytes per row for x's K = {cols}, got w of shape {tuple(w.shape)}")
    if a_scale is not None:
        check_static_scale(op, a_scale, "a_scale", x.device)
    if a_scale is None:
        q, s = _quantize_per_token(op, x, 4)      # s: fp32 [M], one scale per row
    else:
        q, s = _quantize_static(op, x, a_scale, 4), a_scale
    g = check_gemm(op, q, w, s, w_scale, bias, x.dtype)
    return _gemm(op, g, q, w, s, w_scale, bias, x.dtype)


# ---- rmsnorm_quantize, hadamard_transform: also callable directly on CUDA tensors ----------------------------------------------

def rmsnorm_quantize(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int = 4, eps: float = 1e-6,
                     return_normed: bool = False):
    """Fused RMSNorm + static quantize (pqk_rmsnorm_quantize): y = x / sqrt(mean(x^2) + eps) * weight in fp32,
    q = quantize(y, scale). x fp16/bf16 [..., K] (fp32 too), weight x.dtype [K], scale a 1-element CUDA tensor.
    Returns q (uint8 [..., K/2] for bits 4, int8 [..., K] for bits 8), and y in x.dtype if return_normed."""
    op = "rmsnorm_quantize"
    rows, cols = check_rows(op, x, bits)
    check_operand(op, "weight", weight, (x.dtype,), x.device)
    if tuple(weight.shape) != (cols,):
        _fail(op, f"weight must have shape ({cols},), got {tuple(weight.shape)}")
    check_static_scale(op, scale, "scale", x.device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        _fail(op, f"eps must be a finite float >= 0, got {eps!r}")
    q = _quantized(x, bits)
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if return_normed else None
    if rows:
        x, wt, s = x.contiguous(), weight.contiguous(), _f32(scale)
        with _on_device(x):
            _launch(op, "pqk_rmsnorm_quantize", x.data_ptr(), DTYPE_CODES[x.dtype], wt.data_ptr(), float(eps),
                    s.data_ptr(), bits, q.data_ptr(), _ptr(y), rows, cols, _stream(x))
    return (q, y) if return_normed else q


_HAD_CACHE: dict = {}


def _had_matrix(m: int, inverse: bool, device: torch.device) -> torch.Tensor | None:
    """H_m (or H_m^T) fp32 on the device, built once per (m, inverse, device): no host-to-device copy per call, so
    a CUDA graph can capture hadamard_transform after one eager call."""
    if m == 1:
        return None
    key = (m, inverse, device)
    if key not in _HAD_CACHE:
        from ..hadamard import hadamard_matrix

        h = hadamard_matrix(m, torch.float32)
        _HAD_CACHE[key] = (h.T if inverse else h).contiguous().to(device)
    return _HAD_CACHE[key]


def hadamard_transform(x: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """The online Walsh-Hadamard rotation (pqk_hadamard): same result definition as
    prefixquant_kernels.hadamard.hadamard_transform(x, inverse=inverse) with the default 1/sqrt(n) scale.
    x fp16/bf16/fp32 [..., n], n = m * 2^p (hadamard.hadamard_factor; other n raise ValueError). Returns x's shape and
    dtype. n too large for the GPU's shared memory -> RuntimeError from the launcher (PQK_ERR_HADAMARD_SIZE)."""
    op = "hadamard_transform"
    from ..hadamard import hadamard_factor

    check_operand(op, "x", x, tuple(DTYPE_CODES), x.device if isinstance(x, torch.Tensor) else None)
    if x.dim() < 1 or x.shape[-1] == 0:
        _fail(op, f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    try:
        m, _ = hadamard_factor(n)
    except ValueError as e:
        raise ValueError(f"pqk.{op}: x.shape[-1]: {e}") from None
    rows = x.numel() // n
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if rows:
        check_int32(op, rows=rows, n=n)
        x = x.contiguous()
        with _on_device(x):
            h = _had_matrix(m, inverse, x.device)
            _launch(op, "pqk_hadamard", x.data_ptr(), y.data_ptr(), DTYPE_CODES[x.dtype], _ptr(h), m, rows, n,
                    _stream(x))
    return y


def gemm_path(device: torch.device | None = None) -> str:
    """Which instruction the GEMM uses on this GPU ("imma.s4", "imma.s8-unpacked", "none")."""
    lib = require("int4_gemm_path")
    major, minor = torch.cuda.get_device_capability(device)
    return lib.pqk_int4_gemm_path(10 * major + minor).decode()


# ---- registration for the "cuda" dispatch key (needs no GPU: registering is pure Python bookkeeping) -------------

def _rmsnorm_quantize_op(x, weight, scale, bits, eps, return_normed):
    """pqk::rmsnorm_quantize's schema: always (q, normed), normed empty [0] when not requested."""
    out = rmsnorm_quantize(x, weight, scale, bits, eps, return_normed)
    return out if return_normed else (out, x.new_empty([0]))


def _hadamard_transform_op(x, inverse):
    return hadamard_transform(x, inverse=inverse)


REGISTERED = {
    "pqk::quantize_static": quantize_static,
    "pqk::quantize_per_token": quantize_per_token,
    "pqk::int4_matmul": int4_matmul,
    "pqk::quant_linear": quant_linear,
    "pqk::int4_matmul_requant": int4_matmul_requant,
    "pqk::int4_matmul_silu_mul_requant": int4_matmul_silu_mul_requant,
    "pqk::rmsnorm_quantize": _rmsnorm_quantize_op,
    "pqk::hadamard_transform": _hadamard_transform_op,
}
for _name, _fn in REGISTERED.items():
    torch.library.register_kernel(_name, "cuda", _fn)


def header_signatures(header: str) -> dict[str, list[str]]:
    """{function name: [parameter C types]} of the functions declared in pqk_cuda.h (for the signature test)."""
    text = re.sub(r"//[^\n]*", "", open(header).read())
    out = {}
    for m in re.finditer(r"(?:int|const char\s*\*)\s+(pqk_\w+)\s*\(([^)]*)\)\s*;", text):
        params = [" ".join(p.split()) for p in m.group(2).split(",")]
        out[m.group(1)] = [re.sub(r"\s*\b\w+$", "", p) for p in params]
    return out
