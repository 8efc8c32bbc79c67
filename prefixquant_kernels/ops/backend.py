"""Which implementation runs an op: the one place that maps ``backend=`` to code, for every public op.

Each op states the kinds of implementation it has (``OPS``); at each call it may add, per kind, why that kind cannot
run these arguments (``unsupported=``, e.g. int8 operands have no CUDA kernel). ``resolve`` turns ``backend=`` into a
``Backend(kind, cpu_isa)``; ``auto`` is one preference order (``_auto``). Kinds:

  "reference"  plain PyTorch (prefixquant_kernels/reference.py, kv_format.py): the definition of the results
  "cpu"        the C++ kernels (prefixquant_kernels._C); cpu_isa picks the code path (library.py)
  "cuda"       the CUDA kernels (libpqk_cuda.so through ctypes: ops/cuda_library.py, ops/cuda_ops.py)
  "triton"     the Triton kernels (prefixquant_kernels/triton): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1

backend= strings: GEMM, quantize and transform ops accept ``BACKENDS``: "auto", "reference", "cpu" (best
instruction set), "cpu:scalar", "cpu:avx2", "cpu:avxvnni", "cpu:avx512vnni", "cpu:amx" (forced code paths; avxvnni
and avx512vnni put the W4 tile on vpdpbusd, amx the prefill GEMM on AMX tiles), "cuda". The KV ops accept
``KV_BACKENDS``: "auto", "reference", "triton", "cpu".
An explicit backend means that kernel runs or the call raises (ValueError: wrong device or an unknown string;
NotImplementedError: no kernel for these arguments; RuntimeError: not installed / not supported on this machine).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import _extension
from . import cuda_library
from .checks import fail

CPU_ISAS = {"cpu": -1, "cpu:scalar": 0, "cpu:avx2": 1, "cpu:avxvnni": 2, "cpu:avx512vnni": 3, "cpu:amx": 4}
BACKENDS = ("auto", "reference", *CPU_ISAS, "cuda")
KV_BACKENDS = ("auto", "reference", "triton", "cpu")


@dataclass(frozen=True)
class Backend:
    kind: str          # "reference" | "cpu" | "cuda" | "triton"
    cpu_isa: int = -1  # for kind == "cpu"


@dataclass(frozen=True)
class Op:
    """What one public op has: the backend= strings it accepts, the kinds it implements, and for kinds it lacks
    although its strings name them, why (a NotImplementedError for an explicit request, skipped by "auto")."""
    backends: tuple[str, ...]
    kinds: frozenset[str]
    lacks: Mapping[str, str] | None = None


_GEMM = frozenset({"reference", "cpu", "cuda"})
_KV = frozenset({"reference", "cpu", "triton"})
_FORMAT = "{} (a format conversion without a CUDA kernel)"

OPS: dict[str, Op] = {
    **{name: Op(BACKENDS, _GEMM) for name in (
        "int4_matmul", "quant_linear", "int4_matmul_requant", "int4_matmul_silu_mul_requant",
        "quant_linear_silu_mul_requant", "quantize_static",
        "quantize_per_token", "rmsnorm_quantize", "hadamard_transform")},
    "rms_norm": Op(BACKENDS, frozenset({"reference", "cpu"}), {"cuda": "rms_norm (no CUDA kernel: on a GPU the "
                                                                  "module's own formula is already few launches)"}),
    "rope": Op(BACKENDS, frozenset({"reference", "cpu"}), {"cuda": "rope (no CUDA kernel: on a GPU the model's own "
                                                          "formula is a few launches)"}),
    "pack_int4": Op(BACKENDS, frozenset({"reference", "cpu"}), {"cuda": _FORMAT.format("pack_int4")}),
    "unpack_int4": Op(BACKENDS, frozenset({"reference", "cpu"}), {"cuda": _FORMAT.format("unpack_int4")}),
    "kv_quantize": Op(KV_BACKENDS, _KV),
    "kv_quantize_groupwise": Op(KV_BACKENDS, frozenset({"reference", "triton"})),
    "kv_dequant_concat": Op(KV_BACKENDS, _KV),
    "kv_decode_attention": Op(KV_BACKENDS, _KV),
    "kv_write_paged": Op(KV_BACKENDS, frozenset({"reference", "cpu"})),    # vLLM's CPU cache layout
    "kv_decode_paged": Op(KV_BACKENDS, frozenset({"reference", "cpu"})),
}
# Any other name (benchmarks and tests asking what "auto" runs on a device): the kinds of the linear layers.
_DEFAULT = Op(BACKENDS, _GEMM)

_KERNELS = {"cpu": "C++ kernels", "cuda": "CUDA kernels", "triton": "Triton kernels"}
# The message for an explicit backend whose kind cannot run these arguments ({why}: the op's reason).
_NO_KERNEL = {
    "cuda": "backend='cuda' has no CUDA kernel for {why}; use backend='auto' (runs the reference there) or "
            "backend='reference'",
    "cpu": "backend='cpu' covers {why} only",
}


def eager_cpu_call(x: torch.Tensor) -> bool:
    """True where a public op may call its C++ CPU kernel directly instead of through its torch.ops.pqk custom op:
    an eager call on a plain CPU tensor that nothing traces, intercepts or differentiates. The custom op's dispatch
    (~12 us a call through its Python kernel and autograd registrations) is what gives torch.compile a node, dispatch
    and function modes (fake tensors, tests/cuda/test_fused_path's replay) the op, functorch its wrapper and autograd
    the op's backward formula; where none of them is present, it buys nothing."""
    return (x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_runs(device: torch.device) -> bool:
    return triton_available() and (device.type == "cuda" or (device.type == "cpu" and triton_interpreted()))


def resolve(backend: str, device: torch.device, op: str, unsupported: Mapping[str, str] | None = None) -> Backend:
    """backend= -> the implementation of `op` for tensors on `device`. unsupported: {kind: why} for kinds of `op`
    that cannot run these arguments (e.g. {"cuda": "int8 operands"}): "auto" skips them, explicit ones raise."""
    spec = OPS.get(op, _DEFAULT)
    if backend not in spec.backends:
        fail(op, f"backend must be one of {spec.backends}, got {backend!r}")
    cannot = {**(spec.lacks or {}), **(unsupported or {})}
    if backend == "auto":
        return _auto(op, spec, device, cannot)
    kind = "cpu" if backend in CPU_ISAS else backend
    if kind not in spec.kinds and kind not in cannot:
        have = [name for name, s in OPS.items() if kind in s.kinds and s.backends == spec.backends]
        fail(op, f"backend={backend!r} has {_KERNELS[kind]} for {', '.join(have[:-1])} and {have[-1]} only; use "
                 + " or ".join(repr(k) for k in sorted(spec.kinds)))
    if kind == "reference":
        return Backend("reference")
    if kind == "triton":
        if not triton_available():
            fail(op, "backend='triton' needs the triton package", RuntimeError)
        if not _triton_runs(device):
            fail(op, f"backend='triton' runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1; "
                     f"got tensors on {device}", RuntimeError)
        return Backend("triton")
    if kind == "cuda":
        if device.type != "cuda":
            why = cuda_library.unavailable_reason()
            fail(op, f"backend='cuda' runs on CUDA tensors, got tensors on {device}"
                     + (f" (and CUDA is not available here: {why})" if why else ""))
        if "cuda" in cannot:
            fail(op, _NO_KERNEL["cuda"].format(why=cannot["cuda"]), NotImplementedError)
        cuda_library.require(op)
        return Backend("cuda")
    # kind == "cpu"
    if device.type != "cpu":
        fail(op, f"backend={backend!r} runs on CPU tensors, got tensors on {device}")
    _extension.require_cpu_extension(f"pqk.{op}")
    isa = CPU_ISAS[backend]
    if isa > 0 and not _extension._C.cpu_isa_supported(isa):
        fail(op, f"backend={backend!r} is not supported by this CPU (best: {_extension._C.best_cpu_isa()})",
             RuntimeError)
    if "cpu" in cannot:
        fail(op, _NO_KERNEL["cpu"].format(why=cannot["cpu"]), NotImplementedError)
    return Backend("cpu", isa)


def _auto(op: str, spec: Op, device: torch.device, cannot: Mapping[str, str]) -> Backend:
    """backend="auto": the first of these that the op has, that can run its arguments and that runs here:

    1. "triton" on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the KV ops; the tests run the Triton
       kernels in the interpreter this way), when triton is installed;
    2. "cpu" (best instruction set) on CPU tensors when the C++ extension is built;
    3. "cuda" on CUDA tensors when libpqk_cuda.so loads and its kernels can run on this GPU (driver new enough for
       its CUDA runtime, a kernel image for the arch: cuda_library.probe); when not, a one-time RuntimeWarning says
       why and the next kind runs;
    4. "reference" (on any device).
    """
    def has(kind: str) -> bool:
        return kind in spec.kinds and kind not in cannot

    if has("triton") and _triton_runs(device):
        return Backend("triton")
    if has("cpu") and device.type == "cpu" and _extension.cpu_available():
        return Backend("cpu")
    if has("cuda") and device.type == "cuda":
        if cuda_library.cuda_available():
            return Backend("cuda")
        _note_reference_on_cuda(op)
    return Backend("reference")


_NOTED = False


def _note_reference_on_cuda(op: str) -> None:
    """backend='auto' on CUDA tensors without the CUDA library: say once why the (slower) reference runs."""
    global _NOTED
    if _NOTED or torch.compiler.is_compiling():
        return
    _NOTED = True
    warnings.warn(f"pqk.{op}: backend='auto' on CUDA tensors runs the PyTorch reference because the CUDA kernels "
                  f"are not available: {cuda_library.unavailable_reason()}", RuntimeWarning, stacklevel=5)


def available_backends(device: str = "cpu") -> list[str]:
    """The explicit backends that run on tensors of `device` ("cpu" or "cuda") on this machine (tests, benchmarks)."""
    out = ["reference"]
    if device == "cuda":
        return out + (["cuda"] if cuda_library.cuda_available() else [])
    if _extension.cpu_available():
        out.append("cpu:scalar")
        out += [name for name, isa in CPU_ISAS.items() if isa > 0 and _extension._C.cpu_isa_supported(isa)]
    return out
