"""``python -m prefixquant_kernels selftest``: what the CUDA kernels can prove on this machine, as a table.

Always (no GPU needed, when g++ is present): the host harnesses, which execute the kernels' own index math and
epilogues (csrc/cuda/tests) against naive references. With nvcc: the build for sm_80/86/89/90 and its ptxas
register/spill numbers. With a CUDA GPU and a CUDA torch: the kernels themselves through libpqk_cuda.so (ctypes)
against prefixquant_kernels.reference, op x shape x max error x pass, and GEMM TOPS vs cuBLAS fp16 — measured there;
no GPU number is ever printed without a GPU.
"""
from __future__ import annotations

import ctypes
import subprocess
import time

from . import cuda_build


def _row(cells, widths):
    print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)))


def _host(rows):
    for name in ("gemm_harness", "quantize_harness"):
        try:
            r = subprocess.run([cuda_build.build_harness(name), "1"], capture_output=True, text=True, timeout=120)
            rows.append((f"host:{name}", "all", "vs naive (see harness)", "pass" if r.returncode == 0 else "FAIL"))
        except (OSError, subprocess.CalledProcessError) as e:
            rows.append((f"host:{name}", "-", "-", f"skipped ({e.__class__.__name__})"))


def load_library(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.pqk_int4_gemm.restype = ctypes.c_int
    lib.pqk_int4_gemm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                                          ctypes.c_float] + [ctypes.c_int] * 5 + [ctypes.c_void_p]
    lib.pqk_cuda_error_string.restype = ctypes.c_char_p
    return lib


def gemm(lib, a, w, a_scale, w_scale, bias, out, epilogue=0, config=-1, out_scale=1.0):
    """Calls pqk_int4_gemm on CUDA tensors (current stream); raises RuntimeError naming the op on a bad status."""
    import torch

    st = lib.pqk_int4_gemm(a.data_ptr(), w.data_ptr(), out.data_ptr(), a_scale.data_ptr(), int(a_scale.numel() > 1),
                           w_scale.data_ptr(), None if bias is None else bias.data_ptr(), out_scale, a.shape[0],
                           w.shape[0], a.shape[1] * 2, epilogue, config, torch.cuda.current_stream().cuda_stream)
    if st != 0:
        raise RuntimeError(f"pqk_int4_gemm: {lib.pqk_cuda_error_string(st).decode()} (status {st})")
    return out


def _gpu(rows, lib_path):
    import torch

    from . import reference

    lib = load_library(lib_path)
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, n, k in [(1, 4096, 4096), (3, 130, 96), (118, 4096, 4096), (2048, 4096, 4096)]:
        a = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, device="cuda", generator=g)
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=g)
        a_s = torch.rand(m, device="cuda", generator=g) * 0.1 + 0.01
        w_s = torch.rand(n, device="cuda", generator=g) * 0.01 + 0.001
        out = torch.empty(m, n, dtype=torch.float32, device="cuda")
        gemm(lib, a, w, a_s, w_s, None, out, epilogue=2)
        ref = reference.int4_matmul(a.cpu(), w.cpu(), a_s.cpu(), w_s.cpu(), None, torch.float32)
        err = (out.cpu() - ref).abs().max().item()
        rows.append(("int4_gemm fp32", f"{m}x{n}x{k}", f"{err:.3g}", "pass" if err == 0 else "FAIL"))
        if m >= 118:
            out16 = torch.empty(m, n, dtype=torch.float16, device="cuda")
            x16 = torch.randn(m, k, dtype=torch.float16, device="cuda")
            y16 = torch.randn(n, k, dtype=torch.float16, device="cuda")
            t = {}
            for name, fn in [("pqk", lambda: gemm(lib, a, w, a_s, w_s, None, out16)), ("cublas", lambda: x16 @ y16.T)]:
                fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
                t[name] = (time.perf_counter() - t0) / 20
            tops = lambda s: 2 * m * n * k / s / 1e12  # noqa: E731
            rows.append((f"TOPS (measured, {torch.cuda.get_device_name()})", f"{m}x{n}x{k}",
                         f"pqk {tops(t['pqk']):.1f} / cuBLAS fp16 {tops(t['cublas']):.1f}", "-"))


def main(argv=None) -> int:
    rows: list[tuple] = []
    _host(rows)
    lib_path = None
    if cuda_build.nvcc_path():
        b = cuda_build.build_library()
        lib_path = b.lib
        usage = cuda_build.ptxas_usage(b.ptxas_log)
        spills = sum(v.get("spill_stores", 0) + v.get("spill_loads", 0) for v in usage.values())
        rows.append(("nvcc build sm_" + "/".join(map(str, b.archs)), f"{len(usage)} kernels",
                     f"{spills} spill bytes", "pass" if spills == 0 else "FAIL"))
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu and lib_path:
        _gpu(rows, lib_path)
    else:
        rows.append(("GPU kernels", "-", "-", "skipped (no CUDA GPU here)" if lib_path else "skipped (no nvcc)"))
    widths = [max(len(str(r[i])) for r in rows + [("op", "shape", "max error", "pass")]) for i in range(4)]
    _row(("op", "shape", "max error", "pass"), widths)
    for r in rows:
        _row(r, widths)
    return 0 if not any(r[3] == "FAIL" for r in rows) else 1
