"""libpqk_cuda.so (csrc/cuda, plain C API in csrc/cuda/pqk_cuda.h) through ctypes: finding, building and loading it,
the launchers' signatures, whether the CUDA backend can run here and why not. The ops that call the launchers are in
ops/cuda_ops.py.

"Can run here" is asked of the library itself at first use (``pqk_cuda_probe``): dlopen succeeds on any Linux box,
but the CUDA runtime linked into it may need a newer driver than the one installed (a CUDA 13 build needs driver
>= 580; many machines run 535-575), and the GPU's arch may have no kernel image in it. Either way every launch
would fail, so the backend counts as unavailable: backend='auto' warns once with the reason and runs the next
backend (ops/backend.py), backend='cuda' raises it. A library built before pqk_cuda_probe existed cannot be asked:
it counts as available (the launches report the cudaError, as before).

Why ctypes and not a torch C++/CUDA extension: the library links the CUDA runtime statically and takes raw device
pointers plus a stream, so it works with any CUDA build of torch (no ABI coupling, no CUDA torch needed to build it:
``PQK_FORCE_CUDA=1 pip install .`` compiles it with nvcc alone). Loading is lazy and happens once, on the first
question (``unavailable_reason``, ``cuda_available``, ``require``).
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import warnings

import torch

from .. import cuda_build

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float

# name -> (restype, argtypes), in the order of csrc/cuda/pqk_cuda.h (tests/cuda/test_binding.py parses the header and
# checks that every declared function is here with the same parameter types).
SIGNATURES: dict[str, tuple] = {
    "pqk_cuda_error_string": (ctypes.c_char_p, [_I]),
    # a, w, out, a_scale, a_scale_per_token, w_scale, bias, out_scale, m, n, k, epilogue, config, split_k, split_ws,
    # stream
    "pqk_int4_gemm": (_I, [_P, _P, _P, _P, _I, _P, _P, _F, _I, _I, _I, _I, _I, _I, _P, _P]),
    # m, n, k, sms
    "pqk_gemm_split_k": (_I, [_I, _I, _I, _I]),
    # m, n
    "pqk_gemm_split_k_workspace": (ctypes.c_long, [_I, _I]),
    # x, x_dtype, x_scale, w, out, w_scale, bias, out_scale, m, n, k, epilogue, config, split_k, split_ws, stream
    "pqk_quant_gemm_static": (_I, [_P, _I, _P, _P, _P, _P, _P, _F, _I, _I, _I, _I, _I, _I, _P, _P]),
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
    # device, int* driver_version, int* runtime_version, int* sm
    "pqk_cuda_probe": (_I, [_I, _P, _P, _P]),
}
# Functions a library built from older sources may lack: declared when present, never a reason not to load it.
OPTIONAL = frozenset({"pqk_cuda_probe"})

CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_INVALID_DEVICE_FUNCTION = 98
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_NO_KERNEL_IMAGE = 209

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Sets restype/argtypes of every launcher (AttributeError naming the symbol if the library lacks one, unless it
    is in OPTIONAL)."""
    for name, (restype, argtypes) in SIGNATURES.items():
        if name in OPTIONAL and not hasattr(lib, name):
            continue
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


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def probe(lib, device: int) -> str | None:
    """Asks the library whether its kernels can run on CUDA device `device` (pqk_cuda_probe): None if they can, or
    if the library predates the probe (cannot check: counted as able, as before); else why not, in words."""
    fn = getattr(lib, "pqk_cuda_probe", None)
    if fn is None:
        return None
    drv, rt, sm = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    st = fn(device, ctypes.byref(drv), ctypes.byref(rt), ctypes.byref(sm))
    if st == 0:
        return None
    text = lib.pqk_cuda_error_string(st)
    text = text.decode() if isinstance(text, bytes) else str(text)
    name = cuda_build.LIB_NAME
    runtime = f"the CUDA {_version(rt.value)} runtime" if rt.value else "its CUDA runtime"
    if st == CUDA_ERROR_INSUFFICIENT_DRIVER:
        if drv.value == 0:
            why = f"no NVIDIA driver is installed, and {name} links {runtime} statically"
        else:
            why = (f"the NVIDIA driver supports CUDA {_version(drv.value)}, older than {runtime} that {name} links "
                   "statically (CUDA 13 needs driver >= 580); update the driver, or rebuild the library with a CUDA "
                   f"toolkit of version {drv.value // 1000}.x (PQK_FORCE_CUDA=1 pip install --no-build-isolation .)")
    elif st in (CUDA_ERROR_NO_KERNEL_IMAGE, CUDA_ERROR_INVALID_DEVICE_FUNCTION):
        arch = f"sm_{sm.value}" if sm.value else "its arch"
        why = (f"{name} has no kernel image for CUDA device {device} ({arch}); it is built for "
               f"{', '.join(f'sm_{a}' for a in cuda_build.ARCHS)} (cuda_build.ARCHS)")
    else:
        why = f"the CUDA runtime cannot use CUDA device {device}"
    return f"{name} cannot run here: {why} [{text} (cudaError {st})]"


def unavailable_reason() -> str | None:
    """None if the CUDA backend can run here, else why not (checked once: torch sees a GPU, then the library loads,
    then the library says its kernels run on the current CUDA device: ``probe``)."""
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
            else:
                _REASON = probe(_LIB, torch.cuda.current_device())
    return _REASON


@torch.compiler.assume_constant_result  # torch.compile bakes the answer in instead of tracing ctypes/dlopen
def cuda_available() -> bool:
    """torch.cuda.is_available() AND libpqk_cuda.so loadable AND (where it can tell) able to run on this GPU."""
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


def gemm_path(device: torch.device | None = None) -> str:
    """Which instruction the GEMM uses on this GPU ("imma.s4", "imma.s8-unpacked", "none")."""
    lib = require("int4_gemm_path")
    major, minor = torch.cuda.get_device_capability(device)
    return lib.pqk_int4_gemm_path(10 * major + minor).decode()
