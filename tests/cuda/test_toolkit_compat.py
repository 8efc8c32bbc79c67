"""The CUDA sources build with a CUDA 12.1 toolkit (what 3090 / A100 owners on drivers from 525 have), not only
with the nvcc 13.0 on our machines: no runtime API, enum value or device intrinsic csrc/cuda uses may be one that
CUDA 13.0's headers declare and CUDA 12.1's lack.

No CUDA 12 nvcc exists here (PyPI's nvidia-cuda-nvcc-cu12 wheels hold ptxas and libnvvm, no front end), so this is a
declaration check: every `cuda*` / `__*` / `atomic*` identifier of csrc/cuda (comments stripped) that appears in the
13.0 toolkit's version of a runtime header must appear in the 12.1 version of the same headers (the
nvidia-cuda-runtime-cu12==12.1.105 wheel, fetched once with pip download). Identifiers in neither are our own or
compiler builtins. What it cannot see: a changed signature of an identifier both declare; CUTLASS's headers (their
CUDA-version guards go back to 11.x; not compiled here with 12.x).
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import zipfile

import pytest

from prefixquant_kernels import cuda_build

WHEEL = "nvidia-cuda-runtime-cu12==12.1.105"
IDENT = re.compile(r"\b(cuda[A-Z]\w*|atomic[A-Z]\w*|__[a-z][a-z0-9_]*[a-z0-9])\b")


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def used_identifiers() -> set[str]:
    out: set[str] = set()
    for path in sorted(glob.glob(os.path.join(cuda_build.CUDA_DIR, "*.cu*")) +
                       glob.glob(os.path.join(cuda_build.CUDA_DIR, "*.h"))):
        with open(path) as f:
            out |= set(IDENT.findall(_strip_comments(f.read())))
    return out


@pytest.fixture(scope="module")
def headers_121() -> dict[str, str]:
    """{header file name: text} of the CUDA 12.1 runtime headers."""
    d = os.path.join(cuda_build.cache_dir(), "cuda-runtime-12.1.105")
    if not glob.glob(os.path.join(d, "*.whl")):
        os.makedirs(d, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
                            "-d", d, WHEEL], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"{WHEEL} could not be downloaded: {r.stderr.strip()[-200:]}")
    out = {}
    with zipfile.ZipFile(glob.glob(os.path.join(d, "*.whl"))[0]) as z:
        for name in z.namelist():
            if "/include/" in name and name.endswith((".h", ".hpp")):
                out[os.path.basename(name)] = z.read(name).decode(errors="replace")
    return out


@pytest.fixture(scope="module")
def headers_130(headers_121) -> dict[str, str]:
    """The same header files from the local toolkit (CUDA 13.0)."""
    nvcc = cuda_build.nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc not found")
    # nvcc may be a wrapper script: its dry run names the include directories it passes
    r = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                       text=True)
    dirs = re.findall(r'-I"?([^"\s]+)', r.stdout + r.stderr)
    out = {}
    for name in headers_121:
        for d in dirs:
            p = os.path.join(d, name)
            if os.path.exists(p):
                with open(p, errors="replace") as f:
                    out[name] = f.read()
                break
    if not out:
        pytest.skip(f"no CUDA headers next to {nvcc}")
    return out


def newer_only(idents: set[str], new: dict[str, str], old: dict[str, str]) -> list[str]:
    """The identifiers declared in the new headers and absent from the old ones."""
    new_words, old_words = (set(re.findall(r"\w+", "\n".join(h.values()))) for h in (new, old))
    return sorted(i for i in idents if i in new_words and i not in old_words)


def test_no_identifier_newer_than_cuda_12_1(headers_121, headers_130):
    used = used_identifiers()
    # the scan sees the runtime calls and intrinsics the kernels rely on
    assert {"cudaDriverGetVersion", "cudaDeviceGetAttribute", "__ldcg", "__shfl_xor_sync", "atomicAdd"} <= used
    assert newer_only(used, headers_130, headers_121) == []


def test_the_check_sees_a_cuda_13_only_api(headers_121, headers_130):
    """Planted: an identifier only CUDA 13's headers declare is reported (the check above can fail)."""
    ids13 = set(re.findall(r"\bcuda[A-Z]\w+", "\n".join(headers_130.values())))
    only13 = newer_only(ids13, headers_130, headers_121)
    assert only13, "expected CUDA 13.0 to declare runtime APIs that 12.1 lacks"
    assert newer_only(used_identifiers() | {only13[0]}, headers_130, headers_121) == [only13[0]]
