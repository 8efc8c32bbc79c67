"""Which implementation every public op runs, pinned as a table: op x backend= x device (CPU, CUDA with the library
emulated as loadable or not) x environment (C++ extension built or not, TRITON_INTERPRET on/off) x argument variants
(int8 operands, a 16-bit tail, row positions, a group-wise body). `expected` below is the specification; the rows are
every combination of its inputs.

CPU tensors go through the public ops end to end: the implementations are replaced by recorders (the reference
functions, the torch.ops.pqk custom ops), so the pin covers everything between backend= and the call that runs.
CUDA tensors cannot be made here: those rows ask the resolver (ops/backend.py) directly, with the per-call reasons
the public ops give it (e.g. int8 operands have no CUDA kernel).
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import _extension, reference
from prefixquant_kernels import format as fmt
from prefixquant_kernels import hadamard as had
from prefixquant_kernels.ops import backend as backend_mod
from prefixquant_kernels.ops import cuda_library, transform

CPU_ISAS = {"cpu": -1, "cpu:scalar": 0, "cpu:avx2": 1, "cpu:avxvnni": 2, "cpu:avx512vnni": 3, "cpu:amx": 4}
GEMM_BACKENDS = ["auto", "reference", *CPU_ISAS, "cuda", "triton", "bogus"]
KV_BACKENDS = ["auto", "reference", "triton", "cpu", "cuda", "cpu:avx2"]

# op -> its argument variants; the variant names say what the CUDA / CPU kernels cannot run
GEMM_OPS = {
    "int4_matmul": ["w4a4", "int8"],
    "quant_linear": ["w4a4", "w4a8", "w8a4"],
    "int4_matmul_requant": ["w4a4", "int8"],
    "int4_matmul_silu_mul_requant": ["w4a4", "int8"],
    "quantize_static": ["-"],
    "quantize_per_token": ["-"],
    "pack_int4": ["-"],
    "unpack_int4": ["-"],
    "rmsnorm_quantize": ["-"],
    "hadamard_transform": ["-"],
}
KV_OPS = {
    "kv_quantize": ["-"],
    "kv_quantize_groupwise": ["-"],
    "kv_dequant_concat": ["static", "tail", "positions", "groupwise"],
    "kv_decode_attention": ["-"],
}
NO_CUDA_KERNEL = {("int4_matmul", "int8"), ("quant_linear", "w4a8"), ("quant_linear", "w8a4"),
                  ("int4_matmul_requant", "int8"), ("int4_matmul_silu_mul_requant", "int8"),
                  ("pack_int4", "-"), ("unpack_int4", "-")}
ISA_OPS = {"int4_matmul", "quant_linear", "int4_matmul_requant", "int4_matmul_silu_mul_requant", "quantize_static",
           "quantize_per_token"}


def _isa_supported(isa: int) -> bool:
    return _extension._C is not None and bool(_extension._C.cpu_isa_supported(isa))


def expected(op: str, variant: str, backend: str, device: str, ext: bool, interp: bool, lib: bool):
    """-> the kind that runs ("reference", "cpu", "cpu:<isa>", "cuda", "triton") or the exception class raised."""
    triton = backend_mod.triton_available()
    if op in KV_OPS:
        if backend not in ("auto", "reference", "triton", "cpu"):
            return ValueError
        cpu_kernel = op != "kv_quantize_groupwise" and variant in ("-", "static")
        triton_runs = triton and (device == "cuda" or interp)
        if backend == "reference":
            return "reference"
        if backend == "auto":
            if triton_runs:
                return "triton"
            return "cpu" if device == "cpu" and ext and cpu_kernel else "reference"
        if backend == "triton":
            return "triton" if triton_runs else RuntimeError
        # backend == "cpu"
        if op == "kv_quantize_groupwise" or device != "cpu":
            return ValueError
        if not ext:
            return RuntimeError
        # a tail, positions or a group-wise body: no C++ kernel for these arguments
        return "cpu" if cpu_kernel else NotImplementedError
    if backend not in CPU_ISAS and backend not in ("auto", "reference", "cuda"):
        return ValueError
    cuda_kernel = (op, variant) not in NO_CUDA_KERNEL
    if backend == "reference":
        return "reference"
    cpu = "cpu:-1" if op in ISA_OPS else "cpu"     # the ops without a cpu_isa argument run one CPU code path
    if backend == "auto":
        if device == "cpu":
            return cpu if ext else "reference"
        return "cuda" if cuda_kernel and lib else "reference"
    if backend == "cuda":
        if device != "cuda":
            return ValueError
        if not cuda_kernel:
            return NotImplementedError
        return "cuda" if lib else RuntimeError
    if device != "cpu":
        return ValueError
    if not ext:
        return RuntimeError
    isa = CPU_ISAS[backend]
    if isa > 0 and not _isa_supported(isa):
        return RuntimeError
    return f"cpu:{isa}" if op in ISA_OPS else "cpu"


# ---- running a row on CPU tensors ------------------------------------------------------------------------------

class Ran(Exception):
    def __init__(self, kind: str):
        self.kind = kind


def _raiser(kind_of):
    def fn(*args, **kwargs):
        raise Ran(kind_of(args))
    return fn


def _patch_implementations(mp: pytest.MonkeyPatch) -> None:
    for name in ("int4_matmul", "quant_linear", "int4_matmul_requant", "int4_matmul_silu_mul_requant",
                 "quantize_static", "quantize_per_token", "rmsnorm_quantize"):
        mp.setattr(reference, name, _raiser(lambda a: "reference"))
    for name in ("pack_int4", "unpack_int4"):
        mp.setattr(fmt, name, _raiser(lambda a: "reference"))
    mp.setattr(had, "hadamard_transform", _raiser(lambda a: "reference"))
    for name in ISA_OPS:
        mp.setattr(torch.ops.pqk, name, _raiser(lambda a: f"cpu:{a[-1]}"))
    for name in ("pack_int4", "unpack_int4", "rmsnorm_quantize", "hadamard_transform"):  # no cpu_isa argument
        mp.setattr(torch.ops.pqk, name, _raiser(lambda a: "cpu"))
    for name in KV_OPS:
        mp.setattr(torch.ops.pqk, name, _raiser(lambda a: a[-1]))
    mp.setattr(transform, "_hadamard_cpu", _raiser(lambda a: "cpu"))    # the op's CPU kernel, called directly


def _call_cpu(op: str, variant: str, backend: str):
    u8 = lambda *s: torch.zeros(*s, dtype=torch.uint8)  # noqa: E731
    i8 = lambda *s: torch.zeros(*s, dtype=torch.int8)  # noqa: E731
    x = torch.randn(3, 64)
    if op == "int4_matmul":
        a, w = (u8(3, 32), u8(4, 32)) if variant == "w4a4" else (i8(3, 64), i8(4, 64))
        return pqk.int4_matmul(a, w, 1.0, torch.ones(4), backend=backend)
    if op == "quant_linear":
        w = i8(4, 64) if variant == "w8a4" else u8(4, 32)
        return pqk.quant_linear(x, w, torch.ones(4), 0.1, a_bits=8 if variant == "w4a8" else 4, backend=backend)
    if op in ("int4_matmul_requant", "int4_matmul_silu_mul_requant"):
        a, w = (u8(3, 32), u8(4, 32)) if variant == "w4a4" else (i8(3, 64), i8(4, 64))
        return getattr(pqk, op)(a, w, 1.0, torch.ones(4), 0.5, backend=backend)
    if op == "quantize_static":
        return pqk.quantize_static(x, 0.1, backend=backend)
    if op == "quantize_per_token":
        return pqk.quantize_per_token(x, backend=backend)
    if op == "pack_int4":
        return pqk.pack_int4(i8(3, 8), backend=backend)
    if op == "unpack_int4":
        return pqk.unpack_int4(u8(3, 4), backend=backend)
    if op == "rmsnorm_quantize":
        return pqk.rmsnorm_quantize(x, torch.ones(64), 0.1, backend=backend)
    if op == "hadamard_transform":
        return pqk.hadamard_transform(x, backend=backend)
    kx = torch.randn(1, 2, 4, 64)
    s = torch.ones(2)
    if op == "kv_quantize":
        return pqk.kv_quantize(kx, s, 4, backend=backend)
    if op == "kv_quantize_groupwise":
        return pqk.kv_quantize_groupwise(kx, 2, 32, "token", backend=backend)
    if op == "kv_decode_attention":
        return pqk.kv_decode_attention(torch.randn(1, 2, 64), None, None, u8(1, 2, 4, 32), u8(1, 2, 4, 32), s, s, 4,
                                       backend=backend)
    packed = u8(1, 2, 4, 32)
    if variant == "static":
        return pqk.kv_dequant_concat(None, packed, s, 4, backend=backend)
    if variant == "tail":
        return pqk.kv_dequant_concat(None, packed, s, 4, tail=torch.randn(1, 2, 2, 64).half(), backend=backend)
    if variant == "positions":
        return pqk.kv_dequant_concat(None, packed, s, 4, body_pos=torch.arange(4), tail_pos=torch.arange(4, 4),
                                     backend=backend)
    sz = torch.ones(1, 2, 4, 2, dtype=torch.float16)
    return pqk.kv_dequant_concat(None, u8(1, 2, 4, 16), sz, 2, zero=sz, group_size=32, axis="token", backend=backend)


def _outcome(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fn()
    except Ran as r:
        return r.kind
    except (ValueError, TypeError, RuntimeError) as e:   # NotImplementedError is a RuntimeError
        return type(e)
    raise AssertionError("the op returned without reaching an implementation")


def _gemm_kind(b) -> str:
    return f"cpu:{b.cpu_isa}" if b.kind == "cpu" else b.kind


# ---- the CUDA rows: the resolver with the public ops' per-call reasons -----------------------------------------

def _call_cuda(op: str, variant: str, backend: str):
    dev = torch.device("cuda")
    if op in KV_OPS:
        unsupported = {} if variant in ("-", "static") else {"cpu": "static bodies without a tail or positions"}
        b = backend_mod.resolve(backend, dev, op, unsupported=unsupported)
        raise Ran(b.kind)
    unsupported = {"cuda": "these operands"} if (op, variant) in NO_CUDA_KERNEL else {}
    raise Ran(_gemm_kind(backend_mod.resolve(backend, dev, op, unsupported=unsupported)))


ROWS = [(op, v, b) for ops, bes in ((GEMM_OPS, GEMM_BACKENDS), (KV_OPS, KV_BACKENDS))
        for op, vs in ops.items() for v in vs for b in bes]


@pytest.mark.parametrize("ext", [True, False], ids=["ext", "no-ext"])
@pytest.mark.parametrize("interp", [False, True], ids=["native", "interp"])
def test_cpu_choices(ext, interp, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interp else "0")
    if not ext:
        monkeypatch.setattr(_extension, "_C", None)
    elif _extension._C is None:
        pytest.skip("the C++ extension is not built")
    _patch_implementations(monkeypatch)
    bad = []
    for op, v, b in ROWS:
        want = expected(op, v, b, "cpu", ext, interp, lib=False)
        got = _outcome(lambda: _call_cpu(op, v, b))
        if got != want:
            bad.append(f"{op}[{v}] backend={b!r}: got {got}, want {want}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("lib", [True, False], ids=["lib", "no-lib"])
@pytest.mark.parametrize("interp", [False, True], ids=["native", "interp"])
def test_cuda_choices(lib, interp, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interp else "0")
    monkeypatch.setattr(cuda_library, "_CHECKED", True)
    monkeypatch.setattr(cuda_library, "_REASON", None if lib else "libpqk_cuda.so could not be loaded: test")
    monkeypatch.setattr(cuda_library, "_LIB", object() if lib else None)
    bad = []
    for op, v, b in ROWS:
        want = expected(op, v, b, "cuda", True, interp, lib)
        got = _outcome(lambda: _call_cuda(op, v, b))
        if got != want:
            bad.append(f"{op}[{v}] backend={b!r}: got {got}, want {want}")
    assert not bad, "\n".join(bad)


def test_the_table_covers_every_combination():
    kinds = {expected(op, v, b, d, e, i, lib) for (op, v, b), d, e, i, lib in
             itertools.product(ROWS, ("cpu", "cuda"), (True, False), (True, False), (True, False))}
    assert {"reference", "cpu:-1", "cpu:0", "cpu:1", "cuda", "triton", "cpu", ValueError, RuntimeError,
            NotImplementedError} <= kinds
