"""The online Hadamard kernel (csrc/cuda/hadamard.cu) without a GPU: its block-level code (hadamard_math.cuh) run by
the host harness csrc/cuda/tests/hadamard_harness.cpp (block emulated, shuffles over 32 lanes) must equal
prefixquant_kernels.hadamard bit for bit in fp32 (same operations in the same order), and be within the dtype's
rounding of the public hadamard_transform; mutation tests plant bugs in the kernel header and expect failures.
The launcher's argument checks run through ctypes (they return before any CUDA call); the kernel itself runs only
where torch sees a CUDA device."""
from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess

import pytest
import torch

from prefixquant_kernels import cuda_build, hadamard as H

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def harness_run(exe, tmp_path, m, p, rows, had, x32, budget=None):
    """Runs the emulated kernel on x32 (fp32 [rows, m * 2^p]) with had (fp32 [m, m]); returns (y32, failed, out).
    budget: bytes of opt-in shared memory of the emulated device (None: the row fits, the one-chunk kernel)."""
    n = m << p
    inp, out = tmp_path / f"in_{m}_{p}.bin", tmp_path / f"out_{m}_{p}.bin"
    with open(inp, "wb") as f:
        f.write(torch.tensor([m, rows, n, 0], dtype=torch.int32).numpy().tobytes())
        if m > 1:
            f.write(had.contiguous().numpy().tobytes())
        f.write(x32.contiguous().numpy().tobytes())
    cmd = [exe, "run", str(inp), str(out)] + ([] if budget is None else [str(budget)])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    mt = re.search(r"(\d+) passed, (\d+) failed", r.stdout)
    assert mt, r.stdout + r.stderr
    failed = int(mt.group(2))
    assert (r.returncode == 0) == (failed == 0), r.stdout
    y = torch.frombuffer(bytearray(out.read_bytes()), dtype=torch.float32).reshape(rows, n)
    return y, failed, r.stdout


def random_rows(rows, n, dtype, seed):
    """Random rows over a wide range of magnitudes (per-row scale 1e-3 .. 1e3), rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * torch.exp(torch.empty(rows, 1).uniform_(-7, 7, generator=g))
    return x.to(dtype)


def kernel_order_reference(x32, m, p, had):
    return H._apply(x32, m, p, had, float(torch.tensor(1 / math.sqrt(m << p), dtype=torch.float32)), True)


# (m, p): the sizes of the brief (64, 128, 576, 1536, 11008, 13824, 14336) and every m with p that exercise no
# butterfly (0), shuffles only (1, 3, 5), shuffles + register passes of 1, 2 and 3 bits (6, 7, 8, 11).
SIZES = [(1, 6), (1, 7), (36, 4), (12, 7), (172, 6), (108, 7), (28, 9), (1, 0), (1, 1), (1, 5), (1, 8), (1, 11)]
SIZES += [(m, p) for m in H.SUPPORTED_M for p in (0, 1, 3, 5)] + [(m, 6) for m in (20, 40, 52, 156)]


@pytest.fixture(scope="module")
def exe():
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    return cuda_build.build_harness("hadamard_harness")


@needs_gxx
@pytest.mark.parametrize("m,p", SIZES, ids=[f"{m}x2^{p}" for m, p in SIZES])
def test_harness_bit_exact_fp32(exe, tmp_path, m, p):
    rows = 3
    had = H.hadamard_matrix(m)
    x = random_rows(rows, m << p, torch.float32, seed=m * 100 + p)
    y, failed, out = harness_run(exe, tmp_path, m, p, rows, had, x)
    assert failed == 0, out                                   # the harness' own float64 check
    ref = kernel_order_reference(x, m, p, had)
    assert torch.equal(y, ref), (y - ref).abs().max()         # bit-exact with hadamard.py's kernel order
    if H.hadamard_factor(m << p) == (m, p):                   # the public op (matmul order): fp32 rounding only
        torch.testing.assert_close(y, H.hadamard_transform(x), rtol=1e-5, atol=1e-6 * x.abs().max().item())


@needs_gxx
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,p", [(36, 4), (12, 7), (172, 6), (28, 9)])
def test_harness_16bit_and_inverse(exe, tmp_path, dtype, m, p):
    rows, n = 5, m << p
    x = random_rows(rows, n, dtype, seed=n).float()
    x = x * (4.0 / x.abs().amax(dim=1, keepdim=True))   # stay inside fp16's range after the rotation
    x = x.to(dtype).float()
    y, failed, out = harness_run(exe, tmp_path, m, p, rows, H.hadamard_matrix(m), x)
    assert failed == 0, out
    y16 = y.to(dtype)                                    # the kernel's store_float: round to nearest even
    assert torch.equal(y16, H._transform(x.to(dtype), None, False, sequential=True))
    # vs the public op: within the same-dtype error of the public op itself (FlashAttention-style: <= 2x + ulp)
    exact = H.hadamard_transform(x.double())
    err_kernel = (y16.double() - exact).abs().max()
    err_torch = (H.hadamard_transform(x.to(dtype)).double() - exact).abs().max()
    assert err_kernel <= 2 * err_torch + 1e-12, (err_kernel, err_torch)
    # the inverse: the caller passes H_m^T
    back, failed, out = harness_run(exe, tmp_path, m, p, rows, H.hadamard_matrix(m).T, y)
    assert failed == 0, out
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5 * x.abs().max().item())


SM86_SMEM = 101376   # opt-in shared memory per block on sm_86 / sm_89 (99 KB)


def _chunk_budget(m, p, rows_per_chunk):
    """Shared memory for exactly rows_per_chunk subrows of 2^p fp32 next to H_m's sign bits."""
    return 4 * rows_per_chunk * (1 << p) + 4 * m * ((m + 31) // 32)


@needs_gxx
@pytest.mark.parametrize("budget", [None, SM86_SMEM], ids=["one-chunk (sm_80/90)", "chunked (sm_86/89)"])
def test_harness_28672(exe, tmp_path, budget):
    # 28 * 1024 = Llama-3-70B's intermediate size: the whole row fits sm_80/sm_90 shared memory; on sm_86/89 the
    # launcher takes the chunked kernel (24 + 4 subrows); both bit-identical to the kernel-order reference
    x = random_rows(2, 28672, torch.float32, seed=5)
    y, failed, out = harness_run(exe, tmp_path, 28, 10, 2, H.hadamard_matrix(28), x, budget)
    assert ("path chunked chunk_rows 24" in out) == (budget is not None), out
    assert failed == 0 and torch.equal(y, kernel_order_reference(x, 28, 10, H.hadamard_matrix(28))), out


# (m, p, subrows per chunk): forced into chunks by a small budget, including 1-subrow chunks, chunks that split a
# 32-column word of H_m's sign bits (m = 172: 6 words), a last chunk shorter than the others, and m > 32
CHUNKED = [(12, 7, 5), (12, 4, 1), (172, 6, 7), (172, 6, 33), (28, 9, 3), (36, 4, 35), (20, 10, 8)]


@needs_gxx
@pytest.mark.parametrize("m,p,rows_per_chunk", CHUNKED, ids=[f"{m}x2^{p}/{c}" for m, p, c in CHUNKED])
def test_harness_chunked_bit_exact(exe, tmp_path, m, p, rows_per_chunk):
    x = random_rows(3, m << p, torch.float32, seed=m + p)
    had = H.hadamard_matrix(m)
    y, failed, out = harness_run(exe, tmp_path, m, p, 3, had, x, _chunk_budget(m, p, rows_per_chunk))
    assert f"path chunked chunk_rows {rows_per_chunk}" in out, out
    assert failed == 0 and torch.equal(y, kernel_order_reference(x, m, p, had)), out


@needs_gxx
def test_harness_no_kernel_for_too_long_rows(exe, tmp_path):
    """44032 = 172 * 256 at 99 KB: too long for one block's shared memory and for the chunked kernel's registers
    (21.5 items per thread > 14): status -6, nothing computed."""
    x = torch.zeros(1, 172 << 8)
    inp = tmp_path / "in.bin"
    inp.write_bytes(torch.tensor([172, 1, 172 << 8, 0], dtype=torch.int32).numpy().tobytes()
                    + H.hadamard_matrix(172).numpy().tobytes() + x.numpy().tobytes())
    r = subprocess.run([exe, "run", str(inp), str(tmp_path / "o.bin"), str(SM86_SMEM)], capture_output=True, text=True)
    assert r.returncode == 3 and "status -6" in r.stderr


# launcher checks: (m, rows, cols) -> status (pqk_cuda.h: -1 shape, -6 Hadamard size)
CHECKS = [
    ((19, 4, 4864), -6),     # Qwen2-0.5B: 4864 = 19 * 256, no H_19
    ((1, 4, 4864), -6),      # m = 1 but 4864 is not a power of two
    ((12, 4, 36), -6),       # 36 / 12 = 3: not a power of two
    ((12, 4, 100), -6),      # not a multiple of m
    ((44, 4, 44 * 8), -6),   # 44 exists (Paley) but is not in the kernel's list
    ((0, 4, 64), -6),
    ((12, 0, 1536), -1),
    ((12, 4, 0), -1),
    ((172, 4, 11008), 0),
    ((1, 1, 1), 0),
    ((28, 7, 28672), 0),
]


@needs_gxx
def test_harness_status(exe):
    args = [str(v) for (a, _) in CHECKS for v in a]
    out = subprocess.run([exe, "check", *args], capture_output=True, text=True, check=True).stdout.splitlines()
    got = [int(line.split()[1]) for line in out]
    assert got == [want for _, want in CHECKS]
    smem = {a: int(line.split()[3]) for (a, _), line in zip(CHECKS, out)}
    assert smem[(172, 4, 11008)] == 4 * 11008 + 4 * 172 * 6      # row fp32 + sign bits (6 words per row of H_172)
    chunks = {a: int(line.split()[5]) for (a, _), line in zip(CHECKS, out)}
    assert chunks[(28, 7, 28672)] == 24 and chunks[(172, 4, 11008)] == 0   # 28672 chunked on sm_86/89; 11008 fits


# (exact text in hadamard_math.cuh, replacement): bugs a reviewer could plausibly miss
MUTATIONS = [
    ("return 1 << j;", "return 1 << (j / 2);"),                                      # wrong shuffle lane
    ("return upper ? other - mine : mine + other;", "return upper ? mine - other : mine + other;"),  # sign
    ("return ((g >> lo) << (lo + nb)) | (g & ((1 << lo) - 1));",
     "return ((g >> lo) << lo) | (g & ((1 << lo) - 1));"),                           # register pass groups overlap
    ("bits[r] = hbits[(a0 + r) * s.words + q];", "bits[r] = hbits[(a0 + r) * s.words];"),  # m > 32: word 0 only
    ("had_m[a * m + 32 * q + k]", "had_m[(32 * q + k) * m + a]"),                   # H_m transposed
    ("for (int k = k0; k < k1; ++k) {", "for (int k = k0 + 1; k < k1; ++k) {"),     # m-stage skips a column
    ("rows[(32 * q + k - a_lo) * P + b]", "rows[(32 * q + k) * P + b]"),             # chunk offset ignored
    ("return avail / per_row < s.m ? (int)(avail / per_row) : s.m;",
     "return avail / per_row < s.m ? (int)(avail / per_row) + 1 : s.m;"),            # a chunk over the budget
    ("const int k0 = a_lo - 32 * q > 0 ? a_lo - 32 * q : 0,", "const int k0 = 0,"),  # chunk re-adds earlier a'
    ("if ((P & (P - 1)) != 0) return PQK_ERR_HADAMARD_SIZE;", ""),                  # accepts 12 * 3
]


@needs_gxx
@pytest.mark.parametrize("old,new", MUTATIONS, ids=[str(i) for i in range(len(MUTATIONS))])
def test_planted_bug_is_caught(tmp_path, old, new):
    for d in ("common", "cuda"):
        shutil.copytree(os.path.join(cuda_build.ROOT, "csrc", d), tmp_path / "csrc" / d)
    path = tmp_path / "csrc" / "cuda" / "hadamard_math.cuh"
    text = path.read_text()
    assert text.count(old) == 1, f"mutation target not found once: {old!r}"
    path.write_text(text.replace(old, new))
    bad = cuda_build.build_harness("hadamard_harness", root=str(tmp_path), out_dir=str(tmp_path / "bin"), werror=False)
    caught = []
    for m, p, budget in [(12, 7, None), (172, 6, None), (1, 11, None), (12, 7, _chunk_budget(12, 7, 5)),
                         (172, 6, _chunk_budget(172, 6, 33))]:
        had = H.hadamard_matrix(m)
        x = random_rows(2, m << p, torch.float32, seed=p)
        try:
            y, failed, _ = harness_run(bad, tmp_path, m, p, 2, had, x, budget)
            caught.append(failed > 0 or not torch.equal(y, kernel_order_reference(x, m, p, had)))
        except AssertionError:   # the harness refused to run (e.g. a chunk over the budget): caught too
            caught.append(True)
    out = subprocess.run([bad, "check", "12", "4", "36"], capture_output=True, text=True).stdout
    caught.append("status -6" not in out)
    assert any(caught), "planted bug not detected"


def test_kernel_built_for_every_arch(cuda_lib):
    # fp16, bf16, fp32 instantiations on sm_80/86/89/90, no spills or stack. The sm_86 SASS has the warp butterflies
    # as SHFL.BFLY and no local memory (the register passes' v[8] stays in registers); test_build.py::test_sass
    # checks LDL/STL for every kernel on every arch (one cuobjdump per arch is ~3 s, so only one here).
    # The chunked kernel (rows longer than shared memory) holds 14 x 4 accumulators per thread: at the 128-register
    # cap of 512-thread blocks, so a spill would show here first.
    usage = cuda_build.ptxas_usage(cuda_lib.ptxas_log)
    for arch in cuda_build.ARCHS:
        for kernel in ("hadamard_kernel", "hadamard_chunked_kernel"):
            had = {n: v for (sm, n), v in usage.items() if sm == arch and kernel in n}
            assert len(had) == 3, had
            assert all(v["spill_stores"] == v["spill_loads"] == v["stack"] == 0 for v in had.values()), had
    funcs = cuda_build.sass_by_function(cuda_build.sass(cuda_lib.lib, 86))
    kernels = {n: t for n, t in funcs.items() if "hadamard_kernel" in n or "hadamard_chunked_kernel" in n}
    assert len(kernels) == 6
    for name, text in kernels.items():
        assert "SHFL.BFLY" in text and not re.search(r"\b(LDL|STL)\b", text), name


# ---- the launcher through ctypes ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lib(cuda_lib_path):
    lib = ctypes.CDLL(cuda_lib_path)
    lib.pqk_hadamard.restype = ctypes.c_int
    lib.pqk_hadamard.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                 ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.pqk_cuda_error_string.restype = ctypes.c_char_p
    lib.pqk_cuda_error_string.argtypes = [ctypes.c_int]
    return lib


@pytest.mark.parametrize("x,y,dt,had,m,rows,cols,want", [
    (64, 64, 0, 64, 19, 4, 4864, -6),     # 4864 = 19 * 256: no supported m
    (64, 64, 0, 64, 12, 4, 36, -6),       # 12 * 3
    (64, 64, 0, 64, 12, 0, 1536, -1),     # no rows
    (64, 64, 0, None, 12, 4, 1536, -5),   # had_m missing for m > 1
    (None, 64, 0, 64, 12, 4, 1536, -5),   # x missing
    (64, 64, 7, 64, 12, 4, 1536, -5),     # unknown dtype code
])
def test_launcher_bad_arguments(lib, x, y, dt, had, m, rows, cols, want):
    st = lib.pqk_hadamard(x, y, dt, had, m, rows, cols, None)
    assert st == want
    assert lib.pqk_cuda_error_string(st).decode()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_launcher_without_gpu_returns_cuda_error(lib):
    # valid arguments, no device: the CUDA error of cudaGetDevice comes back (> 0), nothing crashes
    st = lib.pqk_hadamard(64, 64, 0, 64, 12, 4, 1536, None)
    assert st > 0 and lib.pqk_cuda_error_string(st).decode()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
# 1000 rows > 4 blocks x SMs on any GPU: the grid-stride loop runs
@pytest.mark.parametrize("n,rows", [(64, 1), (576, 3), (1536, 7), (11008, 5), (13824, 2), (14336, 33), (4096, 1000),
                                    (28672, 9)])   # 28672: the chunked kernel on sm_86/89, the one-chunk one elsewhere
def test_gpu_matches_reference(lib, dtype, n, rows):
    m, p = H.hadamard_factor(n)
    x = random_rows(rows, n, torch.float32, seed=n)
    x = (x * (4.0 / x.abs().amax(dim=1, keepdim=True))).to(dtype)
    had = H.hadamard_matrix(m).cuda()
    xd = x.cuda()
    y = torch.empty_like(xd)
    st = lib.pqk_hadamard(xd.data_ptr(), y.data_ptr(), DTYPE_CODE[dtype], had.data_ptr(), m, rows, n,
                          torch.cuda.current_stream().cuda_stream)
    assert st == 0, lib.pqk_cuda_error_string(st).decode()
    torch.cuda.synchronize()
    # bit-exact with the kernel-order reference (the .cu files are built with -fmad=false: no FMA contraction)
    assert torch.equal(y.cpu(), H._transform(x, None, False, sequential=True))
    # in place (x aliases y)
    st = lib.pqk_hadamard(xd.data_ptr(), xd.data_ptr(), DTYPE_CODE[dtype], had.data_ptr(), m, rows, n,
                          torch.cuda.current_stream().cuda_stream)
    assert st == 0
    torch.cuda.synchronize()
    assert torch.equal(xd, y)
