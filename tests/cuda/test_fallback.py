"""backend='auto' degrades, never breaks, where libpqk_cuda.so loads but cannot run (issue 17): the library is asked
at first use (pqk_cuda_probe) whether its CUDA runtime runs on the installed driver and whether it has a kernel image
for the GPU. Without a GPU: torch.cuda.is_available, the lookup and the dlopen are patched, and an emulated library
answers the probe with what a real one returns on such machines."""
from __future__ import annotations

import contextlib
import ctypes
import re
import types
import warnings

import pytest
import torch

from prefixquant_kernels.ops import backend as backend_mod
from prefixquant_kernels.ops import cuda_library
from prefixquant_kernels.ops import cuda_ops as cuda

CUDA = torch.device("cuda")


class ProbedLib:
    """The parts of libpqk_cuda.so that the availability check calls; the probe answers (status, driver, runtime,
    sm) and records the device it was asked about."""

    def __init__(self, status: int, driver: int = 12020, runtime: int = 13000, sm: int = 86):
        self.answer = (status, driver, runtime, sm)
        self.asked = []

    def pqk_cuda_probe(self, device, p_driver, p_runtime, p_sm):
        self.asked.append(device)
        status, driver, runtime, sm = self.answer
        for p, v in ((p_driver, driver), (p_runtime, runtime), (p_sm, sm)):
            p._obj.value = v            # ctypes.byref(c_int) -> write through it like the C function does
        return status

    def pqk_cuda_error_string(self, st):
        return {35: b"CUDA driver version is insufficient for CUDA runtime version",
                209: b"no kernel image is available for execution on the device"}.get(st, b"some cudaError")


class OldLib:
    """A library built before pqk_cuda_probe existed."""

    def pqk_cuda_error_string(self, st):
        return b"?"


@pytest.fixture
def machine(monkeypatch):
    """A machine where torch sees a GPU and the library loads; returns a function that installs `lib` as what
    dlopen gives and resets the once-only check."""
    def install(lib):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        monkeypatch.setattr(cuda_library, "find_library", lambda build=True: "/fake/libpqk_cuda.so")
        monkeypatch.setattr(cuda_library, "open_library", lambda path: lib)
        monkeypatch.setattr(cuda_library, "_LIB", None)
        monkeypatch.setattr(cuda_library, "_LIB_PATH", None)
        monkeypatch.setattr(cuda_library, "_REASON", None)
        monkeypatch.setattr(cuda_library, "_CHECKED", False)
        monkeypatch.setattr(backend_mod, "_NOTED", False)
        monkeypatch.setattr(cuda, "_on_device", lambda t: contextlib.nullcontext())  # CPU tensors stand in
        monkeypatch.setattr(cuda, "_stream", lambda t: 0)
        return lib
    return install


CASES = {
    # a CUDA 13 build on a 535 driver (CUDA 12.2)
    "driver": (ProbedLib(35, driver=12020, runtime=13000), r"the NVIDIA driver supports CUDA 12\.2, older than the "
               r"CUDA 13\.0 runtime .*driver >= 580.*CUDA driver version is insufficient.*\(cudaError 35\)"),
    # no driver at all
    "no-driver": (ProbedLib(35, driver=0, runtime=13000), r"no NVIDIA driver is installed.*\(cudaError 35\)"),
    # a GPU the library was not built for (e.g. sm_120)
    "arch": (ProbedLib(209, driver=13000, runtime=13000, sm=120),
             r"no kernel image for CUDA device 1 \(sm_120\); it is built for sm_80, sm_86, sm_89, sm_90.*"
             r"no kernel image is available.*\(cudaError 209\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_auto_falls_back_with_one_warning_naming_the_reason(machine, case):
    lib, reason = CASES[case]
    machine(lib)
    with pytest.warns(RuntimeWarning) as rec:
        assert backend_mod.resolve("auto", CUDA, "quant_linear").kind == "reference"
    assert len(rec) == 1
    assert str(rec[0].message).startswith("pqk.quant_linear: backend='auto' on CUDA tensors runs the PyTorch "
                                          "reference because the CUDA kernels are not available: libpqk_cuda.so "
                                          "cannot run here: ")
    assert re.search(reason, str(rec[0].message)), str(rec[0].message)
    assert lib.asked == [1]                          # asked once, about the current device
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # one warning per process, not per call
        for op in ("int4_matmul", "quantize_static", "rmsnorm_quantize", "hadamard_transform", "quant_linear"):
            assert backend_mod.resolve("auto", CUDA, op).kind == "reference"
    assert lib.asked == [1]
    assert not cuda_library.cuda_available() and cuda_library.loaded_library_path() is None
    assert backend_mod.available_backends("cuda") == ["reference"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_explicit_cuda_raises_naming_the_reason(machine, case):
    lib, reason = CASES[case]
    machine(lib)
    with pytest.raises(RuntimeError, match=r"^pqk\.int4_matmul: backend='cuda' is not available here: "
                                           r"libpqk_cuda.so cannot run here: .*" + reason):
        backend_mod.resolve("cuda", CUDA, "int4_matmul")
    # the CUDA implementations registered for the dispatcher ask the same question before any launch
    with pytest.raises(RuntimeError, match=r"^pqk\.quantize_static: backend='cuda' is not available here: .*" + reason):
        cuda.quantize_static(torch.randn(3, 64), torch.tensor(0.1), 4)


def test_kv_ops_keep_triton_when_the_cuda_library_cannot_run(machine):
    """The KV ops never used the CUDA library: their 'auto' is unaffected (no warning about it)."""
    machine(ProbedLib(35))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kind = backend_mod.resolve("auto", CUDA, "kv_decode_attention").kind
    assert kind == ("triton" if backend_mod.triton_available() else "reference")


def test_a_library_that_can_run_is_used(machine):
    lib = machine(ProbedLib(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend_mod.resolve("auto", CUDA, "quant_linear").kind == "cuda"
        assert backend_mod.resolve("cuda", CUDA, "quant_linear").kind == "cuda"
    assert lib.asked == [1] and cuda_library.cuda_available()


def test_a_library_without_the_probe_keeps_todays_behaviour(machine):
    """Built from sources older than pqk_cuda_probe: cannot check, so the backend counts as available."""
    machine(OldLib())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend_mod.resolve("auto", CUDA, "quant_linear").kind == "cuda"
    assert cuda_library.unavailable_reason() is None


def test_declare_skips_only_the_optional_symbols():
    """open_library's declare(): a missing optional function is fine, a missing launcher is an AttributeError."""
    def fns(names):
        return types.SimpleNamespace(**{n: (lambda *a: 0) for n in names})
    required = [n for n in cuda_library.SIGNATURES if n not in cuda_library.OPTIONAL]
    lib = cuda_library.declare(fns(required))
    assert not hasattr(lib, "pqk_cuda_probe") and lib.pqk_int4_gemm.argtypes == cuda_library.SIGNATURES[
        "pqk_int4_gemm"][1]
    lib = cuda_library.declare(fns(cuda_library.SIGNATURES))
    assert lib.pqk_cuda_probe.restype is ctypes.c_int
    with pytest.raises(AttributeError, match="pqk_hadamard"):
        cuda_library.declare(fns([n for n in cuda_library.SIGNATURES if n != "pqk_hadamard"]))
