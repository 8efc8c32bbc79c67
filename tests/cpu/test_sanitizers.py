"""The C++ kernels under AddressSanitizer + UndefinedBehaviorSanitizer: csrc/cpu/tests/sanitize_harness.cpp
is compiled with the kernel sources (no torch) and run; it checks results too, against naive loops."""
import concurrent.futures
import os
import platform
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU = os.path.join(ROOT, "csrc", "cpu")
KERNEL_SOURCES = ["gemm.cpp", "quantize.cpp", "kv_cache.cpp", "decode_layer.cpp", "attention.cpp", "float_ops.cpp",
                  "hadamard.cpp",
                  "isa.cpp", "scalar_kernels.cpp",
                  "avx2_kernels.cpp", "vnni_kernels.cpp", "amx_kernels.cpp"]


def build_harness(out_dir: str, sanitize: bool = True, cxx: str | None = None, extra=()) -> str:
    cxx = cxx or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = os.path.join(out_dir, "sanitize_harness")
    flags = ["-std=c++17", "-O1", "-g", "-ffp-contract=off", "-pthread", "-Wall", "-Wextra", "-Werror",
             "-Wno-unused-parameter", *extra]
    if sanitize:
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    srcs = [os.path.join(CPU, "tests", "sanitize_harness.cpp")] + [os.path.join(CPU, s) for s in KERNEL_SOURCES]

    def run(cmd: list) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"

    def compile_one(src: str) -> str:
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        run([cxx, *flags, "-c", src, "-o", obj])
        return obj
    # one compiler per source, as many at once as there are cores (one g++ call would compile them one by one),
    # the largest first
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        objs = list(pool.map(compile_one, sorted(srcs, key=os.path.getsize, reverse=True)))
    run([cxx, *flags, *objs, "-o", exe])
    return exe


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sanitizer runtime checked on Linux only")
def test_kernels_under_asan_ubsan(tmp_path):
    # PQK_VNNI_EMULATE: the VNNI tables run with an exact AVX2 emulation of vpdpbusd (vnni_kernels.cpp), so
    # their tile logic is checked here although this machine has no VNNI.
    exe = build_harness(str(tmp_path), extra=("-DPQK_VNNI_EMULATE",))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    for seed in ("1", "2"):
        r = subprocess.run([exe, seed], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert " 0 failed" in r.stdout and "ERROR" not in r.stderr
        if platform.machine() in ("x86_64", "AMD64") and "skip isa avx2" not in r.stdout:
            # every table ran: scalar, avx2, both VNNI copies (not AMX: its tiles have no emulation; the native test)
            assert all("skip isa amx" in ln for ln in r.stdout.splitlines() if "skip isa" in ln), r.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sanitizer runtime checked on Linux only")
def test_kernels_under_asan_ubsan_native(tmp_path):
    """Native build (no emulation): the AVX-512 code itself — the zmm W4 tile and the prefill GEMM (x86_gemm_zmm.h:
    gathers, masked loads and stores, the K-blocked A panel, the M split's two slice buffers and the side job that
    fills the next one) — under ASan/UBSan, where this CPU has AVX512-VNNI. Planted: the side job writing the slice
    it reads, 8 failures; its job one block too long, a heap-buffer-overflow."""
    from prefixquant_kernels import _extension
    if not (_extension.cpu_available() and _extension._C.cpu_isa_supported(3)):
        pytest.skip("needs a CPU with AVX512-VNNI")
    # GCC 12's avx512fintrin.h trips its own -Wmaybe-uninitialized (`__m512i __Y = __Y;` in _mm512_undefined_*)
    exe = build_harness(str(tmp_path), extra=("-Wno-uninitialized", "-Wno-maybe-uninitialized"))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    r = subprocess.run([exe, "3"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 failed" in r.stdout and "ERROR" not in r.stderr
    assert "skip isa avx512vnni" not in r.stdout
    if _extension._C.cpu_isa_supported(4):  # and the AMX table's tiles, where this CPU has them
        assert "skip isa amx" not in r.stdout


def test_extension_contains_vnni_tiles():
    """The extension's VNNI copies really use vpdpbusd in both encodings (the emulation above cannot show it)."""
    from prefixquant_kernels import _extension
    objdump = shutil.which("objdump")
    if objdump is None or not _extension.cpu_available() or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs objdump, the built extension and x86-64")
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", _extension._C.__file__], capture_output=True,
                          text=True, check=True).stdout
    dp = [ln for ln in text.splitlines() if "vpdpbusd" in ln]
    assert any("{vex}" in ln for ln in dp), "no VEX vpdpbusd (avxvnni tile)"
    assert any("{vex}" not in ln for ln in dp), "no EVEX vpdpbusd (avx512vnni tile)"
    # the AMX prefill micro-kernel (amx_kernels.cpp): its tile loads and the int8 tile product
    assert any("tdpbusd" in ln for ln in text.splitlines()), "no tdpbusd (amx prefill kernel)"
    assert any("tileloadd" in ln for ln in text.splitlines()), "no tileloadd (amx prefill kernel)"
    # the prefill attention's bf16 blocks (x86_attention_bf16.h)
    assert any("vdpbf16ps" in ln for ln in text.splitlines()), "no vdpbf16ps (bf16 attention blocks)"


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")),
                    reason="needs Debian's g++-aarch64-linux-gnu and qemu-user (.ci/run installs them)")
def test_portable_kernels_build_and_pass_on_aarch64(tmp_path):
    """The same sources cross-compiled for aarch64 (the AVX2 file compiles to a stub there) and run under
    qemu: the portable path is correct on a non-x86 CPU, not only on this one with AVX2 forced off."""
    exe = build_harness(str(tmp_path), sanitize=False, cxx="aarch64-linux-gnu-g++", extra=("-static",))
    r = subprocess.run(["qemu-aarch64", exe, "5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skip isa avx2" in r.stdout and " 0 failed" in r.stdout
