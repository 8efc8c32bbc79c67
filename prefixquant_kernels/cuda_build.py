"""Builds and inspects the CUDA kernels (csrc/cuda) without a GPU; used by tests/cuda, setup.py and selftest.

- ``build_library(archs)``: nvcc compiles every .cu for the given SM archs (``FILE_ARCHS`` narrows a file's set) with
  warnings as errors (host: -Wall -Wextra -Werror; nvcc: -Werror all-warnings; ptxas: -warn-spills
  -warn-lmem-usage, also errors) and links ``libpqk_cuda.so`` with the static cudart. Cached under ``$PQK_CUDA_CACHE`` (default:
  <tmp>/pqk_cuda_build) keyed by a hash of the sources, flags and nvcc version, so tests pay the ~1 min once.
- ``ptxas_usage(log)``: registers / spills / stack per (arch, kernel) from the ``ptxas -v`` log.
- ``sass(lib, arch)``: ``cuobjdump -sass`` of one arch.
- ``build_harness(name)``: the g++ host harness csrc/cuda/tests/<name>.cpp (no CUDA needed).
- ``cutlass_include()``: the CUTLASS 2.x/CuTe headers int4_gemm_cutlass.cu needs (``$PQK_CUTLASS_DIR``, an installed
  ``nvidia-cutlass`` wheel, or that wheel fetched once with ``pip download --no-deps`` into the cache: its declared
  dependencies — cuda-python, scipy, networkx, ... — are not needed for the headers and are never installed).

Importable without torch (setup.py loads it by path).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
COMMON_DIR = os.path.join(ROOT, "csrc", "common")
ARCHS = (80, 86, 89, 90)  # 80/86/89: int4 IMMA; 90: INT8 IMMA on unpacked nibbles (int4_gemm.cu)
# Files built for fewer archs: CUTLASS's sm_80 int4 GEMM has no INT4 MMA to emit on sm_90 (int4_gemm.cu dispatches
# to it only on 8.x devices).
FILE_ARCHS = {"int4_gemm_cutlass.cu": (80, 86, 89)}
LIB_NAME = "libpqk_cuda.so"
CUTLASS_WHEEL = "nvidia-cutlass==4.2.0"

# -fmad=false: the fp32 epilogue y = acc * (a_s * w_s) + bias must not become an FMA (bit-exact with the reference).
NVCC_FLAGS = ["-std=c++17", "-O3", "-fmad=false", "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror", "-Werror",
              "all-warnings", "-Xptxas", "-v,-warn-spills,-warn-lmem-usage,-Werror"]


def nvcc_path() -> str | None:
    p = shutil.which("nvcc")
    if p is None and os.environ.get("CUDA_HOME"):
        cand = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
        p = cand if os.path.exists(cand) else None
    return p


def _tool(name: str) -> str | None:
    """cuobjdump/nvdisasm: next to nvcc, on PATH, or from the nvidia-cuda-cuobjdump wheel."""
    nv = nvcc_path()
    cands = [os.path.join(os.path.dirname(nv), name)] if nv else []
    cands.append(shutil.which(name) or "")
    try:
        import nvidia  # namespace package of the NVIDIA wheels

        for d in nvidia.__path__:
            cands += glob.glob(os.path.join(d, "*", "bin", name))
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.exists(c)), None)


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))


def file_archs(src: str, archs) -> tuple:
    """The archs `src` is compiled for out of `archs`."""
    keep = FILE_ARCHS.get(os.path.basename(src))
    return tuple(a for a in archs if keep is None or a in keep)


def _cutlass_ok(include: str) -> bool:
    return os.path.exists(os.path.join(include, "cutlass", "cutlass.h")) and os.path.isdir(os.path.join(include, "cute"))


def cutlass_include() -> str:
    """Directory holding cutlass/ and cute/ (see the module doc for where it comes from); raises FileNotFoundError
    with what to do when none is found and the wheel cannot be downloaded."""
    env = os.environ.get("PQK_CUTLASS_DIR")
    if env:
        for cand in (os.path.join(env, "include"), env):
            if _cutlass_ok(cand):
                return cand
        raise FileNotFoundError(f"PQK_CUTLASS_DIR={env} holds no cutlass/cutlass.h and cute/ (nor in include/)")
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")  # locates the installed wheel without importing it
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            cand = os.path.join(d, "source", "include")
            if _cutlass_ok(cand):
                return cand
    d = os.path.join(cache_dir(), "cutlass-" + CUTLASS_WHEEL.split("==")[1])
    inc = os.path.join(d, "include")
    if _cutlass_ok(inc):
        return inc
    os.makedirs(d, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                        "-d", d, CUTLASS_WHEEL], capture_output=True, text=True)
    wheels = glob.glob(os.path.join(d, "nvidia_cutlass-*.whl"))
    if r.returncode != 0 or not wheels:
        raise FileNotFoundError(f"CUTLASS headers not found and `pip download {CUTLASS_WHEEL}` failed "
                                f"({r.stderr.strip()[-300:]}); install it with `pip install --no-deps "
                                f"{CUTLASS_WHEEL}` or point PQK_CUTLASS_DIR at a CUTLASS checkout")
    prefix = "cutlass_library/source/include/"
    tmp = inc + f".tmp{os.getpid()}"
    with zipfile.ZipFile(wheels[0]) as z:
        for name in z.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                target = os.path.join(tmp, name[len(prefix):])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with z.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    try:
        os.replace(tmp, inc)  # atomic: a concurrent build never sees half the headers
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return inc


def _headers() -> list[str]:
    return sorted(glob.glob(os.path.join(CUDA_DIR, "*.cuh")) + glob.glob(os.path.join(CUDA_DIR, "*.h"))
                  + glob.glob(os.path.join(COMMON_DIR, "*.h")))


def _digest(paths: list[str], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(p.encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def cache_dir() -> str:
    return os.environ.get("PQK_CUDA_CACHE", os.path.join(tempfile.gettempdir(), "pqk_cuda_build"))


@dataclass
class Build:
    lib: str          # path of libpqk_cuda.so
    ptxas_log: str    # nvcc/ptxas -v output (stderr)
    archs: tuple


def build_library(archs=ARCHS, out_dir: str | None = None) -> Build:
    """Compile every .cu (each for file_archs of `archs`) and link them; raises subprocess.CalledProcessError (with
    nvcc's output) on failure."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (PATH or CUDA_HOME)")
    archs = tuple(sorted(archs))
    cutlass = cutlass_include()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    plan = [(src, file_archs(src, archs)) for src in sources()]
    key = _digest(sources() + _headers(), " ".join(NVCC_FLAGS) + repr(plan) + version + cutlass)
    d = out_dir or os.path.join(cache_dir(), key)
    lib, log = os.path.join(d, LIB_NAME), os.path.join(d, "ptxas.log")
    if out_dir is None and os.path.exists(lib) and os.path.exists(log):
        with open(log) as f:
            return Build(lib, f.read(), archs)
    os.makedirs(d, exist_ok=True)
    objs, logs = [], []
    for src, src_archs in plan:
        if not src_archs:
            continue
        obj = os.path.join(d, f"{os.path.basename(src)}.{os.getpid()}.o")  # nvcc needs the .o suffix
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in src_archs]
        if max(archs) in src_archs:  # + PTX of the highest arch: a newer GPU JIT-compiles it (ptx_archs below)
            gencode.append(f"-gencode=arch=compute_{max(archs)},code=compute_{max(archs)}")
        # -isystem: CUTLASS's own headers are not held to this project's warning flags.
        cmd = [nvcc, *NVCC_FLAGS, *gencode, "-isystem", cutlass, "--threads", "2", "-c", src, "-o", obj]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
        objs.append(obj)
        logs.append(r.stderr)
    tmp = lib + f".tmp{os.getpid()}"
    cmd = [nvcc, "-shared", "-cudart", "static", *objs, "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    for obj in objs:
        os.remove(obj)
    if r.returncode != 0:
        raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
    os.replace(tmp, lib)  # atomic: a concurrent test never sees half a library
    with open(log, "w") as f:
        f.write("".join(logs))
    return Build(lib, "".join(logs), archs)


_FUNC = re.compile(r"ptxas info\s+: Compiling entry function '(\S+)' for 'sm_(\d+)'")
_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_usage(log: str) -> dict[tuple[int, str], dict[str, int]]:
    """{(sm, mangled kernel name): {registers, stack, spill_stores, spill_loads}} from a ptxas -v log."""
    out: dict[tuple[int, str], dict[str, int]] = {}
    cur = None
    for line in log.splitlines():
        m = _FUNC.search(line)
        if m:
            cur = (int(m.group(2)), m.group(1))
            out[cur] = {}
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            out[cur]["registers"] = int(m.group(1))
    return out


def demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if not filt:
        return names
    r = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    return r.stdout.splitlines() if r.returncode == 0 else names


def sass(lib: str, arch: int) -> str:
    """``cuobjdump -sass`` of the library's sm_``arch`` cubins; kept per file version (a dump takes 10-20 s on
    2 cores, and more than one test reads the same arch)."""
    st = os.stat(lib)
    return _sass(os.path.realpath(lib), arch, (st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _sass(lib: str, arch: int, stamp: tuple) -> str:
    tool = _tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA toolkit or pip nvidia-cuda-cuobjdump)")
    r = subprocess.run([tool, "-sass", "-arch", f"sm_{arch}", lib], capture_output=True, text=True, check=True)
    return r.stdout


def ptx_entries(lib: str) -> dict[int, set[str]]:
    """{XX: mangled kernel names} of the PTX for compute_XX embedded in the library (``cuobjdump -ptx``): the driver
    JIT-compiles it for a GPU no cubin was built for."""
    tool = _tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA toolkit or pip nvidia-cuda-cuobjdump)")
    r = subprocess.run([tool, "-ptx", lib], capture_output=True, text=True, check=True)
    out: dict[int, set[str]] = {}
    for part in re.split(r"\n(?=\.version )", r.stdout):
        m = re.search(r"^\.target sm_(\d+)", part, re.M)
        if m:
            out.setdefault(int(m.group(1)), set()).update(re.findall(r"\.entry (\S+?)\(", part))
    return out


def sass_by_function(text: str) -> dict[str, str]:
    """Split cuobjdump -sass output into {mangled function name: its SASS}."""
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def build_harness(name: str, root: str | None = None, out_dir: str | None = None, werror: bool = True) -> str:
    """g++ build of csrc/cuda/tests/<name>.cpp (below `root`, default this tree), -Werror unless told (a planted
    bug may leave a parameter unused); cached by content."""
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise FileNotFoundError("no C++ compiler")
    root = root or ROOT
    src = os.path.join(root, "csrc", "cuda", "tests", f"{name}.cpp")
    flags = ["-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra"] + (["-Werror"] if werror else [])
    hdrs = sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cuh")) + glob.glob(os.path.join(root, "csrc", "cuda",
                  "*.h")) + glob.glob(os.path.join(root, "csrc", "cuda",
                  "tests", "*.h")) + glob.glob(os.path.join(root, "csrc", "common", "*.h")))
    d = out_dir or os.path.join(cache_dir(), "harness-" + _digest([src, *hdrs], " ".join(flags) + cxx))
    exe = os.path.join(d, name)
    if not os.path.exists(exe):
        os.makedirs(d, exist_ok=True)
        tmp = exe + f".tmp{os.getpid()}"
        subprocess.run([cxx, *flags, src, "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, exe)
    return exe
