"""Which implementation runs an op: the one place that maps ``backend=`` to code.

backend:
  "auto"        the fastest available for the tensors' device: "cpu" for CPU tensors when the C++
                extension is built; "cuda" for CUDA tensors when libpqk_cuda.so loads and the op has a CUDA
                kernel for these arguments; else "reference" (on CUDA tensors without the library, with a
                one-time warning that says why)
  "reference"   plain PyTorch (prefixquant_kernels/reference.py): the definition of the results
  "cpu"         the C++ kernels, best instruction set of this CPU (AVX2 or portable)
  "cpu:scalar"  the C++ kernels forced to the portable code path
  "cpu:avx2"    the C++ kernels forced to the AVX2 code path
  "cpu:avxvnni", "cpu:avx512vnni"
                the AVX2 kernels with the W4 tile on vpdpbusd (VEX / EVEX encoding), on CPUs that have it
  "cuda"        the CUDA kernels (libpqk_cuda.so through ctypes, ops/cuda.py) on CUDA tensors; W4A4 GEMMs, the
                activation quantizers, rmsnorm_quantize and hadamard_transform only. Ops or arguments without a CUDA kernel (pack/unpack_int4, int8
                operands) raise NotImplementedError: explicit "cuda" means the CUDA kernel runs or nothing does.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .. import _extension
from . import cuda as _cuda
from .checks import fail

CPU_ISAS = {"cpu": -1, "cpu:scalar": 0, "cpu:avx2": 1, "cpu:avxvnni": 2, "cpu:avx512vnni": 3}
BACKENDS = ("auto", "reference", *CPU_ISAS, "cuda")


@dataclass(frozen=True)
class Backend:
    kind: str          # "reference" | "cpu" | "cuda"
    cpu_isa: int = -1  # for kind == "cpu"


def resolve(backend: str, device: torch.device, op: str, cuda_unsupported: str | None = None) -> Backend:
    """backend= -> the implementation for tensors on `device`. cuda_unsupported: None if the CUDA kernels handle
    this call, else why not (e.g. "int8 operands") — "auto" then runs the reference, "cuda" raises."""
    if backend not in BACKENDS:
        fail(op, f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return Backend("reference")
    if backend == "auto":
        if device.type == "cpu" and _extension.cpu_available():
            return Backend("cpu")
        if device.type == "cuda" and cuda_unsupported is None:
            if _cuda.cuda_available():
                return Backend("cuda")
            _note_reference_on_cuda(op)
        return Backend("reference")
    if backend == "cuda":
        if device.type != "cuda":
            why = _cuda.unavailable_reason()
            fail(op, f"backend='cuda' runs on CUDA tensors, got tensors on {device}"
                     + (f" (and CUDA is not available here: {why})" if why else ""))
        if cuda_unsupported is not None:
            fail(op, f"backend='cuda' has no CUDA kernel for {cuda_unsupported}; use backend='auto' (runs the "
                     "reference there) or backend='reference'", NotImplementedError)
        _cuda.require(op)
        return Backend("cuda")
    # an explicit CPU backend
    if device.type != "cpu":
        fail(op, f"backend={backend!r} runs on CPU tensors, got tensors on {device}")
    _extension.require_cpu_extension(f"pqk.{op}")
    isa = CPU_ISAS[backend]
    if isa > 0 and not _extension._C.cpu_isa_supported(isa):
        fail(op, f"backend={backend!r} is not supported by this CPU (best: {_extension._C.best_cpu_isa()})",
             RuntimeError)
    return Backend("cpu", isa)


_NOTED = False


def _note_reference_on_cuda(op: str) -> None:
    """backend='auto' on CUDA tensors without the CUDA library: say once why the (slower) reference runs."""
    global _NOTED
    if _NOTED or torch.compiler.is_compiling():
        return
    _NOTED = True
    warnings.warn(f"pqk.{op}: backend='auto' on CUDA tensors runs the PyTorch reference because the CUDA kernels "
                  f"are not available: {_cuda.unavailable_reason()}", RuntimeWarning, stacklevel=4)


def available_backends(device: str = "cpu") -> list[str]:
    """The explicit backends that run on tensors of `device` ("cpu" or "cuda") on this machine (tests, benchmarks)."""
    out = ["reference"]
    if device == "cuda":
        return out + (["cuda"] if _cuda.cuda_available() else [])
    if _extension.cpu_available():
        out.append("cpu:scalar")
        out += [name for name, isa in CPU_ISAS.items() if isa > 0 and _extension._C.cpu_isa_supported(isa)]
    return out
