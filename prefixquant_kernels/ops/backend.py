"""Which implementation runs an op: the one place that maps ``backend=`` to code.

backend:
  "auto"        the fastest available for the tensors' device: "cpu" for CPU tensors when the C++
                extension is built, else "reference"
  "reference"   plain PyTorch (prefixquant_kernels/reference.py): the definition of the results
  "cpu"         the C++ kernels, best instruction set of this CPU (AVX2 or portable)
  "cpu:scalar"  the C++ kernels forced to the portable code path
  "cpu:avx2"    the C++ kernels forced to the AVX2 code path
  "cpu:avxvnni", "cpu:avx512vnni"
                the AVX2 kernels with the W4 tile on vpdpbusd (VEX / EVEX encoding), on CPUs that have it
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _extension
from .checks import fail

CPU_ISAS = {"cpu": -1, "cpu:scalar": 0, "cpu:avx2": 1, "cpu:avxvnni": 2, "cpu:avx512vnni": 3}
BACKENDS = ("auto", "reference", *CPU_ISAS)


@dataclass(frozen=True)
class Backend:
    kind: str          # "reference" | "cpu"
    cpu_isa: int = -1  # for kind == "cpu"


def resolve(backend: str, device: torch.device, op: str) -> Backend:
    if backend not in BACKENDS:
        fail(op, f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return Backend("reference")
    if backend == "auto":
        if device.type == "cpu" and _extension.cpu_available():
            return Backend("cpu")
        return Backend("reference")
    # an explicit CPU backend
    if device.type != "cpu":
        fail(op, f"backend={backend!r} runs on CPU tensors, got tensors on {device}")
    _extension.require_cpu_extension(f"pqk.{op}")
    isa = CPU_ISAS[backend]
    if isa > 0 and not _extension._C.cpu_isa_supported(isa):
        fail(op, f"backend={backend!r} is not supported by this CPU (best: {_extension._C.best_cpu_isa()})",
             RuntimeError)
    return Backend("cpu", isa)


def available_backends() -> list[str]:
    """The backends that can run on this machine (for tests and benchmarks)."""
    out = ["reference"]
    if _extension.cpu_available():
        out.append("cpu:scalar")
        out += [name for name, isa in CPU_ISAS.items() if isa > 0 and _extension._C.cpu_isa_supported(isa)]
    return out
