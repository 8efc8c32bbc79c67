"""The prefill panel's quantize divides by the scale with a reciprocal and Markstein's correction (x86_gemm_zmm.h
pf_quotient16): csrc/cpu/tests/recip_division_check.cpp compares it with the division bit for bit, exhaustively for
bf16 and fp16 activations (every significand against every fp32 scale significand) and on a sample for fp32.
tests/ops/test_gemm_blocking.py checks the same path end to end through the op (every 16-bit value, the range
edges, NaN, infinities)."""
import os
import shutil
import subprocess

import pytest

from .test_sanitizers import CPU

pytestmark = pytest.mark.skipif("avx512f" not in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo")
                                else True, reason="the checker runs the zmm code: needs AVX-512F")


def build_checker(out_dir: str) -> str:
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = os.path.join(out_dir, "recip_division_check")
    # -ffp-contract=off: the compiler must not fuse or split the checked arithmetic beyond what the intrinsics say
    subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Werror", "-Wno-unused-function",
                    "-Wno-uninitialized", "-Wno-maybe-uninitialized",  # GCC 12 on its own AVX-512 headers
                    os.path.join(CPU, "tests", "recip_division_check.cpp"), "-o", exe],
                   check=True, capture_output=True, text=True)
    return exe


def test_reciprocal_division_is_the_division(tmp_path):
    """Planted bug (the correction dropped, q = x * (1 / s)): millions of mismatches, exit 1."""
    exe = build_checker(str(tmp_path))
    r = subprocess.run([exe, "64"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for kind, pairs in (("bf16", 128 << 23), ("fp16", 1024 << 23), ("fp32", 64 << 23)):
        assert f"{kind} x: {pairs} pairs, 0 mismatches" in r.stdout, r.stdout
