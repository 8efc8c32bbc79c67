"""The kernels' own index math and epilogues executed on the host (csrc/cuda/tests/*_harness.cpp, g++, no GPU),
compared with naive references — and mutation tests proving those comparisons fail when the kernel code is wrong:
each copies csrc/ to a temp dir, plants one bug in a kernel header, rebuilds the harness and expects failures."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from prefixquant_kernels import cuda_build

HARNESSES = ["gemm_harness", "quantize_harness"]

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def run(exe: str, seed: int) -> tuple[int, int, str]:
    r = subprocess.run([exe, str(seed)], capture_output=True, text=True, timeout=120)
    m = re.search(r"(\d+) passed, (\d+) failed", r.stdout)
    assert m, r.stdout + r.stderr
    passed, failed = int(m.group(1)), int(m.group(2))
    assert (r.returncode == 0) == (failed == 0), r.stdout
    return passed, failed, r.stdout


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", HARNESSES)
def test_harness_bit_exact(name, seed):
    passed, failed, out = run(cuda_build.build_harness(name), seed)
    assert failed == 0 and passed > 30, out


# (header, exact text, replacement, harness): each is a bug a reviewer could plausibly miss.
MUTATIONS = [
    ("gemm_math.cuh", "((reg & 1) << 3)", "((reg >> 1) << 3)", "gemm_harness"),           # A fragment rows
    ("gemm_math.cuh", "return (lane & 3) << 2;", "return (lane & 3) << 1;", "gemm_harness"),  # fragment word
    ("gemm_math.cuh", "((c ^ ((r >> 2) & 1)) << 4)", "(c << 4)", "gemm_harness"),         # swizzle -> conflicts
    ("gemm_math.cuh", "return row_global < rows && k_byte + c * kChunkBytes < k_bytes;",
     "return row_global < rows;", "gemm_harness"),                                        # K tail not zero-filled
    ("gemm_math.cuh", "a8[s][1] = lo1; a8[s][2] = hi0;", "a8[s][1] = hi0; a8[s][2] = lo1;", "gemm_harness"),  # sm_90
    ("gemm_math.cuh", "return ((lane & 3) << 1) + (e & 1);", "return ((lane & 3) << 1) + ((e >> 1) & 1);",
     "gemm_harness"),                                                                     # C fragment cols
    ("gemm_math.cuh", "if (p.bias != nullptr) y = y + p.bias[col];", "", "gemm_harness"),  # bias dropped
    ("gemm_math.cuh", "y[i] = acc[i] * (a_scale[i] * w_scale[i]) + bias[i];",
     "y[i] = acc[i] * a_scale[i] * w_scale[i] + bias[i];", "gemm_harness"),               # CUTLASS EVT: fp32 order
    ("gemm_math.cuh", "kt * kBK + c * kChunkElems", "kt * kBK + c * kChunkBytes", "gemm_harness"),  # float-A x offset
    ("gemm_math.cuh", "quantize_value(v[2 * b], scale, -8, 7), quantize_value(v[2 * b + 1], scale, -8, 7)",
     "quantize_value(v[2 * b + 1], scale, -8, 7), quantize_value(v[2 * b], scale, -8, 7)", "gemm_harness"),  # nibbles
    ("gemm_math.cuh", "return z * q + (z < r ? z : r);", "return z * q;", "gemm_harness"),  # split-K drops K tiles
    ("gemm_math.cuh", "if (col + 1 < prob_n) add(ws + (long)row * prob_n + col + 1, acc[i][j][2 * h + 1]);", "",
     "gemm_harness"),                                                                     # split-K: odd column lost
    ("quantize_math.cuh", "return 16 >> step;", "return 8 >> step;", "quantize_harness"),   # butterfly too short
    ("quantize_math.cuh", "return (a <= FLT_MAX && a > acc) ? a : acc;", "return a > acc ? a : acc;",
     "quantize_harness"),                                                                 # Inf poisons the scale
    ("quantize_math.cuh", "sqrtf(sumsq / (float)cols + eps)", "sqrtf(sumsq / (float)(cols - 1) + eps)",
     "quantize_harness"),                                                                 # RMS over cols - 1
]


@pytest.mark.parametrize("header,old,new,name", MUTATIONS, ids=[f"{m[0]}:{i}" for i, m in enumerate(MUTATIONS)])
def test_planted_bug_is_caught(tmp_path, header, old, new, name):
    for d in ("common", "cuda"):
        shutil.copytree(os.path.join(cuda_build.ROOT, "csrc", d), tmp_path / "csrc" / d)
    path = tmp_path / "csrc" / "cuda" / header
    text = path.read_text()
    assert text.count(old) == 1, f"mutation target not found once in {header}: {old!r}"
    path.write_text(text.replace(old, new))
    exe = cuda_build.build_harness(name, root=str(tmp_path), out_dir=str(tmp_path / "bin"), werror=False)
    _, failed, out = run(exe, 1)
    assert failed > 0, f"planted bug not detected:\n{out}"
