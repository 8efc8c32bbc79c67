"""Compile-and-inspect tests, no GPU needed: every .cu builds for sm_80/86/89/90 (the CUTLASS GEMM for 80/86/89)
with warnings as errors and links with the static cudart; both GEMMs' SASS use IMMA with S4 operands on 80/86/89
(S8 on 90), the CUTLASS one loads fragments with LDSM (ldmatrix); no kernel spills or touches local memory; the
compute_90 PTX of every non-CUTLASS kernel is embedded for newer GPUs."""
from __future__ import annotations

import os
import re

import pytest

from prefixquant_kernels import cuda_build

INT4_ARCHS = (80, 86, 89)
GEMM_KERNELS = 3 * (5 + 3 * 2)
CUTLASS_GEMM = "DefaultGemmWithVisitor"  # in the mangled name of every CUTLASS kernel of int4_gemm_cutlass.cu


def test_library_links_static_cudart(cuda_lib):
    # -Werror all-warnings and ptxas -Werror are in NVCC_FLAGS: reaching here means the build was warning-free.
    with open(cuda_lib.lib, "rb") as f:
        blob = f.read()
    assert b"pqk_int4_gemm" in blob and b"pqk_rmsnorm_quantize" in blob
    assert b"libcudart.so" not in blob, "cudart must be linked statically"


def test_every_kernel_for_every_arch(cuda_lib):
    usage = cuda_build.ptxas_usage(cuda_lib.ptxas_log)
    for arch in cuda_build.ARCHS:
        names = [n for sm, n in usage if sm == arch]
        # 3 tile configs x (5 epilogues on packed A + 3 float x dtypes x {x's own dequant, silu-mul requant})
        assert sum("int4_gemm_kernel" in n for n in names) == GEMM_KERNELS, names
        # CUTLASS: 3 tiles x {fp16, bf16} out, only where INT4 MMA exists
        assert sum(CUTLASS_GEMM in n for n in names) == (6 if arch in INT4_ARCHS else 0), names
        assert any("row_quantize_kernel" in n for n in names) and any("quantize_static_kernel" in n for n in names)


def test_no_spills_no_stack(cuda_lib):
    usage = cuda_build.ptxas_usage(cuda_lib.ptxas_log)
    assert usage
    bad = {k: v for k, v in usage.items() if v.get("spill_stores", 1) or v.get("spill_loads", 1) or v.get("stack", 1)}
    assert not bad, bad


@pytest.mark.parametrize("arch", cuda_build.ARCHS)
def test_sass(cuda_lib, arch):
    funcs = cuda_build.sass_by_function(cuda_build.sass(cuda_lib.lib, arch))
    gemms = {n: s for n, s in funcs.items() if "int4_gemm_kernel" in n}
    assert len(gemms) == GEMM_KERNELS
    want = "IMMA.16864.S4.S4" if arch in INT4_ARCHS else "IMMA.16832.S8.S8"
    for name, text in gemms.items():
        assert want in text, f"sm_{arch} {name}: no {want}"
        assert "HMMA" not in text  # the integer tensor-core path, not an fp16 one
    for name, text in gemms.items():  # split-K (atomic adds of the int32 sums) only in the decode tile's kernels
        decode = "TileConfigILi16ELi32E" in name
        assert bool(re.search(r"\b(RED|ATOM)G?\b", text)) == decode, f"sm_{arch} {name}: split-K atomics"
    cutlass = {n: s for n, s in funcs.items() if CUTLASS_GEMM in n}
    assert len(cutlass) == (6 if arch in INT4_ARCHS else 0)
    for name, text in cutlass.items():
        assert "IMMA.16864.S4.S4" in text and "LDSM" in text and "HMMA" not in text, f"sm_{arch} {name}"
    # the decode GEMV: {1, 4} rows x (5 epilogues on packed A + 3 float x dtypes x 2 epilogues) = 22 kernels, each
    # streaming W with 128-bit evict-first loads into integer dot products (IDP.4A, u8 x s8), no tensor cores
    gemvs = {n: s for n, s in funcs.items() if "int4_gemv_kernel" in n}
    assert len(gemvs) == 22, sorted(gemvs)
    for name, text in gemvs.items():
        assert "IDP.4A.U8.S8" in text and re.search(r"LDG\.E\.EF\.128", text), f"sm_{arch} {name}"
        assert not re.search(r"\b[IH]MMA\b", text), f"sm_{arch} {name}: tensor cores in the GEMV"
    for name, text in funcs.items():
        assert not re.search(r"\b(LDL|STL)\b", text), f"sm_{arch} {name}: local memory access"


def test_ptx_of_the_highest_arch_is_embedded(cuda_lib):
    """A GPU newer than sm_90 gets no cubin: the driver JIT-compiles the compute_90 PTX, which must hold every kernel
    of the sm_90 build (and no CUTLASS kernel: INT4 MMA exists on 8.x only, and it is dispatched there only)."""
    top = max(cuda_build.ARCHS)
    ptx = cuda_build.ptx_entries(cuda_lib.lib)
    assert set(ptx) == {top}, f"PTX only for compute_{top}, got {sorted(ptx)}"
    cubin = {n for sm, n in cuda_build.ptxas_usage(cuda_lib.ptxas_log) if sm == top}
    assert cubin and ptx[top] == cubin
    assert not any(CUTLASS_GEMM in n for n in ptx[top])


@pytest.mark.skipif(os.environ.get("PQK_FORCE_CUDA") != "1", reason="the package was not installed with PQK_FORCE_CUDA=1")
def test_force_cuda_install_put_the_library_next_to_the_package(cuda_lib):
    # setup.py's PQK_FORCE_CUDA path (what .ci/run does): the same build, copied next to the package modules.
    installed = os.path.join(os.path.dirname(cuda_build.__file__), cuda_build.LIB_NAME)
    assert os.path.exists(installed)
    with open(installed, "rb") as f, open(cuda_lib.lib, "rb") as g:
        assert f.read() == g.read()
