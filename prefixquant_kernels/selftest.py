"""``python -m prefixquant_kernels selftest``: what the CUDA kernels can prove on this machine, as a table.

Always (no GPU needed, when g++ is present): the host harnesses, which execute the kernels' own index math and
epilogues (csrc/cuda/tests) against naive references. With nvcc: the build for sm_80/86/89/90 and its ptxas
register/spill numbers. With a CUDA GPU and a CUDA torch: the kernels themselves through libpqk_cuda.so (ctypes)
and every op through the torch binding (backend="cuda", ops/cuda_ops.py) against prefixquant_kernels.reference, op x
shape x max error x pass, and GEMM TOPS vs cuBLAS fp16 — measured there; no GPU number is ever printed without a GPU.

``--bench`` (a source checkout: it runs benchmarks/e2e.py) then times, interleaved per method: one Llama-3-8B layer
(prefill 2048, decode at 2048 of cache; fp16 vs dynamic W4A4 vs static W4A4KV4, decode compiled — CUDA graphs — for
fp16 and static alike) and the whole Llama-3-8B that fits the card (random weights, fp16 vs static), and writes
selftest.json, layer.{json,md,png} and model.{json,md,png} to --out. Without a GPU the same pipeline runs on the CPU
with a tiny model (a dry run of the command: its numbers are CPU numbers, labelled so).
"""
from __future__ import annotations

import contextlib
import ctypes
import subprocess

from . import cuda_build


def _row(cells, widths):
    print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)))


def _host(rows):
    for name in ("gemm_harness", "quantize_harness"):  # (the Hadamard harness is driven by tests/cuda)
        try:
            r = subprocess.run([cuda_build.build_harness(name), "1"], capture_output=True, text=True, timeout=120)
            rows.append((f"host:{name}", "all", "vs naive (see harness)", "pass" if r.returncode == 0 else "FAIL"))
        except (OSError, subprocess.CalledProcessError) as e:
            rows.append((f"host:{name}", "-", "-", f"skipped ({e.__class__.__name__})"))


def load_library(path: str) -> ctypes.CDLL:
    """dlopen libpqk_cuda.so with every launcher's signature declared (ops/cuda_library.py owns the signatures)."""
    from .ops import cuda_library

    return cuda_library.open_library(path)


def gemm(lib, a, w, a_scale, w_scale, bias, out, epilogue=0, config=-1, out_scale=1.0, split_k=1):
    """Calls pqk_int4_gemm on CUDA tensors (current stream); raises RuntimeError naming the op on a bad status.
    split_k > 1: a zeroed workspace is allocated here (decode tile only)."""
    import torch

    m, n = a.shape[0], w.shape[0]
    ws = (torch.zeros(lib.pqk_gemm_split_k_workspace(m, n), dtype=torch.int32, device=a.device) if split_k > 1
          else None)
    st = lib.pqk_int4_gemm(a.data_ptr(), w.data_ptr(), out.data_ptr(), a_scale.data_ptr(), int(a_scale.numel() > 1),
                           w_scale.data_ptr(), None if bias is None else bias.data_ptr(), out_scale, m, n,
                           a.shape[1] * 2, epilogue, config, split_k, None if ws is None else ws.data_ptr(),
                           torch.cuda.current_stream().cuda_stream)
    if st != 0:
        raise RuntimeError(f"pqk_int4_gemm: {lib.pqk_cuda_error_string(st).decode()} (status {st})")
    return out


def _time(fns, iters: int = 20, reps: int = 10) -> float:
    """Median seconds per call on the GPU: ``reps`` calls captured in one CUDA graph (round-robin over ``fns``, one
    callable or a list of them over distinct buffers, so a weight bigger than nothing is not served from L2 on every
    call), the graph replayed ``iters`` times between CUDA events. The graph takes Python and the driver's launch
    cost out: what is left is the kernels and the gaps between them. A callable that cannot be captured is timed
    eagerly instead (one call between events; then the number is launch-bound at small sizes)."""
    import torch

    fns = fns if isinstance(fns, (list, tuple)) else [fns]
    for f in fns:   # warm-up: allocations, Triton compiles, the caching allocator's pools
        f()
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fns[0]()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                fns[i % len(fns)]()
        run, per = graph.replay, reps
    except Exception:  # noqa: BLE001 - not capturable: eager timing, said in the docstring
        torch.cuda.synchronize()
        run, per = fns[0], 1
    run()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / per)
    return sorted(times)[len(times) // 2]


def _copies(nbytes: int) -> int:
    """Buffer sets to rotate through so the bytes read per graph exceed 3x the GPU's L2."""
    import torch

    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
    return max(1, min(64, -(-3 * l2 // max(nbytes, 1))))


def _err(got, want) -> float:
    """max |got - want| as a float (0 for equal tensors; NaN positions must match)."""
    import torch

    got, want = got.cpu().double(), want.cpu().double()
    if not torch.equal(got.isnan(), want.isnan()):
        return float("inf")
    d = (got - want).abs().nan_to_num(0.0)
    return float(d.max()) if d.numel() else 0.0



@contextlib.contextmanager
def _gemv_on():
    """The decode GEMV on for every M it takes (cuda_ops.GEMV_MAX_M = GEMV_ROWS), as PQK_DECODE_GEMV_MAX_M=4 sets it."""
    from .ops import cuda_ops

    old = cuda_ops.GEMV_MAX_M
    cuda_ops.GEMV_MAX_M = cuda_ops.GEMV_ROWS
    try:
        yield
    finally:
        cuda_ops.GEMV_MAX_M = old


def _ops_rows(rows):
    """Every op through the torch binding (backend="cuda", ops/cuda_ops.py) vs prefixquant_kernels.reference on the CPU.
    Pass: bit-exact for the quantizers and GEMMs (integer math, same fp32 epilogue); a tolerance for RMSNorm (block
    reduction order) and Hadamard (fp rounding of the sums)."""
    import torch

    from . import format as fmt
    from . import hadamard, ops, reference
    from .ops import cuda_ops

    g = torch.Generator().manual_seed(0)

    def add(op, shape, err, tol=0.0):
        rows.append((op, shape, f"{err:.3g}", "pass" if err <= tol else "FAIL"))

    for m, n, k in [(1, 4096, 4096), (3, 130, 96), (17, 77, 62), (300, 1000, 4096)]:
        x = torch.randn(m, k, generator=g) * 3
        xh = x.half()
        a = fmt.pack_int4(torch.randint(-8, 8, (m, k), dtype=torch.int8, generator=g))
        w = fmt.pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g))
        a_s, w_s = torch.rand(m, generator=g) + 0.01, torch.rand(n, generator=g) * 0.01 + 1e-3
        b = torch.randn(n, generator=g)
        shape = f"{m}x{n}x{k}"
        for bits in (4, 8):
            add(f"quantize_static a{bits}", f"{m}x{k}", _err(ops.quantize_static(xh.cuda(), 0.05, bits, backend="cuda"),
                                                          ops.quantize_static(xh, 0.05, bits, backend="reference")))
            q, s = ops.quantize_per_token(xh.cuda(), bits, backend="cuda")
            q_ref, s_ref = ops.quantize_per_token(xh, bits, backend="reference")
            add(f"quantize_per_token a{bits}", f"{m}x{k}", max(_err(q, q_ref), _err(s, s_ref)))
        for dt in (torch.float16, torch.float32):
            got = ops.int4_matmul(a.cuda(), w.cuda(), a_s.cuda(), w_s.cuda(), b.cuda(), dt, backend="cuda")
            add(f"int4_matmul {str(dt)[6:]}", shape, _err(got, ops.int4_matmul(a, w, a_s, w_s, b, dt,
                                                                                backend="reference")))
        y = reference.int4_matmul(a, w, a_s, w_s, b, torch.float32)
        for op_name in ("int4_matmul_requant", "int4_matmul_silu_mul_requant") if n % 4 == 0 else ():
            v = reference.silu_mul(y[:, 0::2], y[:, 1::2]) if "silu" in op_name else y  # (n odd: no pairs)
            s = float(v.abs().max()) / 9
            got = getattr(ops, op_name)(a.cuda(), w.cuda(), a_s.cuda(), w_s.cuda(), s, b.cuda(), backend="cuda")
            want = getattr(ops, op_name)(a, w, a_s, w_s, s, b, backend="reference")
            # levels; silu-mul: device expf may move a boundary value by one step
            add(op_name, shape, _err(fmt.unpack_int4(got.cpu()), fmt.unpack_int4(want)),
                1 if "silu" in op_name else 0)
        for a_scale in (0.05, None):
            got = ops.quant_linear(xh.cuda(), w.cuda(), w_s.cuda(), a_scale, 4, b.cuda(), backend="cuda")
            want = ops.quant_linear(xh, w, w_s, a_scale, 4, b, backend="reference")
            add(f"quant_linear W4A4 {'static (auto)' if a_scale else 'per-token'}", shape, _err(got, want))
        for fused in (True, False):   # both static paths at every M (auto takes one by M)
            got = cuda_ops._quant_gemm_static("selftest", xh.cuda(), w.cuda(), torch.tensor(0.05).cuda(),
                                              w_s.cuda(), b.cuda(), 0, fused=fused)
            add(f"static linear {'fused A-load' if fused else 'quantize + GEMM'}", shape,
                _err(got, ops.quant_linear(xh, w, w_s, 0.05, 4, b, backend="reference")))
        if m <= cuda_ops.GEMV_ROWS:   # the decode GEMV (opt-in: PQK_DECODE_GEMV_MAX_M), packed and float A
            with _gemv_on():
                got = ops.int4_matmul(a.cuda(), w.cuda(), a_s.cuda(), w_s.cuda(), b.cuda(), torch.float16,
                                      backend="cuda")
                add("int4_matmul float16 (GEMV)", shape,
                    _err(got, ops.int4_matmul(a, w, a_s, w_s, b, torch.float16, backend="reference")))
                got = ops.quant_linear(xh.cuda(), w.cuda(), w_s.cuda(), 0.05, 4, b.cuda(), backend="cuda")
                add("quant_linear W4A4 static (GEMV, quantize in its A load)", shape,
                    _err(got, ops.quant_linear(xh, w, w_s, 0.05, 4, b, backend="reference")))
        for dt in (torch.bfloat16, torch.float32):  # the fused kernel's other x dtypes
            xd = x.to(dt)
            got = ops.quant_linear(xd.cuda(), w.cuda(), w_s.cuda(), 0.05, 4, b.cuda(), backend="cuda")
            add(f"quant_linear W4A4 static (fused) {str(dt)[6:]}", shape,
                _err(got, ops.quant_linear(xd, w, w_s, 0.05, 4, b, backend="reference")))
        if n % 4 == 0:
            hs = float(reference.silu_mul(y[:, 0::2], y[:, 1::2]).abs().max()) / 9
            got = ops.quant_linear_silu_mul_requant(xh.cuda(), w.cuda(), w_s.cuda(), 0.05, hs, b.cuda(), backend="cuda")
            want = ops.quant_linear_silu_mul_requant(xh, w, w_s, 0.05, hs, b, backend="reference")
            add("quant_linear_silu_mul_requant (fused)", shape, _err(fmt.unpack_int4(got.cpu()), fmt.unpack_int4(want)),
                1)
    for rows_, cols in [(7, 4096), (33, 1000)]:
        x = (torch.randn(rows_, cols, generator=g) * 4).half()
        wt = (torch.rand(cols, generator=g) + 0.5).half()
        q, y = ops.rmsnorm_quantize(x.cuda(), wt.cuda(), 0.05, 4, 1e-5, return_normed=True, backend="cuda")
        q_ref, _ = ops.rmsnorm_quantize(x, wt, 0.05, 4, 1e-5, return_normed=True, backend="reference")
        y_ref = reference.rmsnorm(x, wt, 1e-5)
        add("rmsnorm_quantize y (fp16)", f"{rows_}x{cols}", _err(y, y_ref.half()), 1e-2 * float(y_ref.abs().max()))
        add("rmsnorm_quantize q (levels)", f"{rows_}x{cols}", _err(fmt.unpack_int4(q.cpu()), fmt.unpack_int4(q_ref)), 1)
    for n in (1536, 11008, 14336):
        x = torch.randn(9, n, generator=g)
        add("hadamard fp32", f"9x{n}", _err(ops.hadamard_transform(x.cuda(), backend="cuda"),
                                            hadamard.hadamard_transform(x)),
            1e-4)


# _kv_rows' shapes: (B, H, T, D, dtype) of the quantizers, (B, H_q, H_kv, P, T, D, dtype) of the decode attention
# (Llama-3-8B's G = 8, D = 128 at 2K; odd T; batch 3 without a prefix). Names of torch dtypes: no torch import here.
KV_SHAPES = [(1, 8, 2048, 128, "float16"), (2, 3, 77, 64, "bfloat16")]
ATTENTION_SHAPES = [(1, 32, 4, 1, 2048, 128, "float16"), (1, 64, 8, 4, 2047, 128, "bfloat16"),
                    (3, 12, 4, 0, 300, 64, "float16")]


def _kv_rows(rows, device: str = "cuda"):
    """The Triton KV-cache kernels on the GPU (backend="triton", compiled, not interpreted) vs the reference on the
    CPU: static and group-wise quantize (bit-exact), dequant-concat (one rounding of the output dtype) and the fused
    decode attention at the Llama-3-8B head layout (G = 8, D = 128) over 2K positions, with a preallocated body
    (body_len) and with a left-pad mask. device="cpu" runs the same under TRITON_INTERPRET=1 (tests)."""
    import torch

    from .ops import kv as ops

    g = torch.Generator().manual_seed(1)

    def add(op, shape, err, tol=0.0):
        rows.append((op, shape, f"{err:.3g}", "pass" if err <= tol else "FAIL"))

    def rel(got, want) -> float:
        got, want = got.cpu().double(), want.cpu().double()
        if not torch.isfinite(got).all():
            return float("inf")
        return float((got - want).norm() / want.norm().clamp_min(1e-30))

    for b, h, t, d, dt in KV_SHAPES:
        dt = getattr(torch, dt)
        x = torch.randn(b, h, t, d, generator=g) * 3
        x = torch.where(torch.rand(x.shape, generator=g) < 0.02, x * 40, x).to(dt)
        shape = f"{b}x{h}x{t}x{d} {str(dt)[6:]}"
        for bits in (4, 8):
            s = (x.float().abs().amax(dim=(0, 2, 3)) / (7 if bits == 4 else 127) * 0.5).clamp_min(1e-3)
            q = ops.kv_quantize(x.to(device), s.to(device), bits, backend="triton")
            q_ref = ops.kv_quantize(x, s, bits, backend="reference")
            add(f"kv_quantize {bits}-bit (triton)", shape, _err(q, q_ref))
            pre = x[:, :, :3].contiguous()
            for out_dt in (torch.float16, torch.bfloat16):
                got = ops.kv_dequant_concat(pre.to(device), q, s.to(device), bits, out_dt, backend="triton")
                want = ops.kv_dequant_concat(pre, q_ref, s, bits, out_dt, backend="reference")
                # one rounding of out_dt: |got - want| <= eps * |want| (as tests/kv assert_within_rounding)
                ulp = ((got.cpu().double() - want.double()).abs() / want.double().abs().clamp_min(1e-30)).max()
                add(f"kv_dequant_concat {bits}-bit -> {str(out_dt)[6:]} (triton, rel.)", shape, float(ulp),
                    torch.finfo(out_dt).eps)
        for bits, axis, gs in [(2, "token", 32), (2, "channel", 16), (4, "token", 64)]:
            if (axis == "channel" and t % gs) or (axis == "token" and d % gs):
                continue
            got = ops.kv_quantize_groupwise(x.to(device), bits, gs, axis, backend="triton")
            want = ops.kv_quantize_groupwise(x, bits, gs, axis, backend="reference")
            add(f"kv_quantize_groupwise {bits}-bit {axis} G{gs} (triton)", shape,
                max(_err(a_, b_) for a_, b_ in zip(got, want)))
            deq = ops.kv_dequant_concat(None, got[0], got[1], bits, torch.float16, zero=got[2], group_size=gs,
                                        axis=axis, backend="triton")
            deq_ref = ops.kv_dequant_concat(None, *want[:2], bits, torch.float16, zero=want[2], group_size=gs,
                                            axis=axis, backend="reference")
            add(f"kv_dequant_concat groupwise {bits}-bit {axis} (triton)", shape, _err(deq, deq_ref))
    for b, hq, hkv, p, t, d, dt in ATTENTION_SHAPES:
        dt = getattr(torch, dt)
        shape = f"B{b} Hq{hq}/Hkv{hkv} P{p} T{t} D{d} {str(dt)[6:]}"
        qx = torch.randn(b, hq, d, generator=g).to(dt)
        k = (torch.randn(b, hkv, t, d, generator=g) * 2).to(dt)
        v = torch.randn(b, hkv, t, d, generator=g).to(dt)
        pk, pv = (torch.randn(b, hkv, p, d, generator=g) * 20).to(dt), torch.randn(b, hkv, p, d, generator=g).to(dt)
        for bits in (4, 8):
            qmax = 7 if bits == 4 else 127
            ks, vs = (k.float().abs().amax(dim=(0, 2, 3)) / qmax), (v.float().abs().amax(dim=(0, 2, 3)) / qmax)
            kp, vp = ops.kv_quantize(k, ks, bits, backend="reference"), ops.kv_quantize(v, vs, bits, backend="reference")
            want = ops.kv_decode_attention(qx, pk, pv, kp, vp, ks, vs, bits, backend="reference")
            dev = [z.to(device) for z in (qx, pk, pv, kp, vp, ks, vs)]
            add(f"kv_decode_attention {bits}-bit (triton, rel. L2)", shape,
                rel(ops.kv_decode_attention(*dev, bits, backend="triton"), want), 1e-2)
            # a preallocated body (capacity T + 37, body_len T) and a mask hiding the first position of row 0
            cap = [torch.cat([z, torch.zeros_like(z[:, :, :37])], 2) for z in (dev[3], dev[4])]
            mask = torch.ones(b, p + t + 37, dtype=torch.bool)   # (the capacity's columns; past body_len: unread)
            mask[0, 0] = False
            want_m = ops.kv_decode_attention(qx, pk, pv, kp, vp, ks, vs, bits, mask=mask[:, :p + t], backend="reference")
            got_m = ops.kv_decode_attention(dev[0], dev[1], dev[2], cap[0], cap[1], dev[5], dev[6], bits,
                                            backend="triton", mask=mask.to(device),
                                            body_len=torch.tensor([t], device=device))
            add(f"kv_decode_attention {bits}-bit body_len+mask (triton)", shape, rel(got_m, want_m), 1e-2)


def _dram_peak() -> float | None:
    """Bytes/s of the GPU's memory: 2 (double data rate) x clock x bus width, where torch reports them."""
    import torch

    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def _has_cutlass() -> bool:
    """The CUTLASS GEMM is built for sm_80/86/89 (cuda_build.FILE_ARCHS) and runs on every 8.x device."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return 80 <= 10 * major + minor < 90


def _tops_rows(rows, lib):
    """GEMM throughput on this GPU, measured here (CUDA graphs, _time): the binding's int4_matmul (auto: the CUTLASS
    tile on sm_80..89), each implementation forced through the raw launcher (pqk's own tile and CUTLASS's for this
    M), cuBLAS fp16 (torch.matmul) and cuBLASLt int8 (torch._int_mm, M > 16) on the same shape; then the static
    linear from fp16 x both ways (the fused A-load kernel and quantize + int4_matmul: ops/cuda_ops.py picks by M).
    Decode shapes (M <= 16) rotate through enough weight copies that W comes from DRAM, not L2."""
    import torch

    from . import ops
    from .ops import cuda_ops

    name = torch.cuda.get_device_name()
    has_cutlass = _has_cutlass()
    for m, n, k in [(1, 1024, 4096), (1, 4096, 4096), (16, 4096, 4096), (1, 14336, 4096), (1, 28672, 4096),
                    (64, 4096, 4096), (256, 4096, 4096), (2048, 4096, 4096), (4096, 11008, 4096)]:
        copies = _copies(n * k // 2) if m <= 16 else 1
        a = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, device="cuda")
        ws = [torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda") for _ in range(copies)]
        a_s, w_s = torch.tensor([0.05], device="cuda"), torch.rand(n, device="cuda") + 0.01
        out = torch.empty(m, n, dtype=torch.float16, device="cuda")
        x16 = torch.randn(m, k, dtype=torch.float16, device="cuda")
        y16s = [torch.randn(n, k, dtype=torch.float16, device="cuda") for _ in range(_copies(2 * n * k) if m <= 16
                                                                                      else 1)]
        tile = 0 if m <= 16 else 1 if m <= 256 else 2
        tops = lambda s: 2 * m * n * k / s / 1e12  # noqa: E731
        t_cublas = _time([lambda y=y: x16 @ y.T for y in y16s])
        del y16s
        t_int8 = None
        if m > 16:   # torch._int_mm (cuBLASLt int8, the int8 peer): needs M > 16 and K, N multiples of 8
            a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
            w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda").T   # column-major B: cuBLASLt's TN
            t_int8 = _time(lambda: torch._int_mm(a8, w8))
        s0 = a_s[0]
        t_auto = _time([lambda w=w: ops.int4_matmul(a, w, s0, w_s, None, torch.float16, backend="cuda") for w in ws])
        t_own = _time([lambda w=w: gemm(lib, a, w, a_s, w_s, None, out, epilogue=0, config=tile) for w in ws])
        cells = [f"auto {tops(t_auto):.1f}", f"pqk {tops(t_own):.1f}"]
        if has_cutlass:
            t_cut = _time([lambda w=w: gemm(lib, a, w, a_s, w_s, None, out, epilogue=0, config=10 + tile) for w in ws])
            cells.append(f"CUTLASS {tops(t_cut):.1f}")
        rows.append((f"TOPS (measured, {name}, graphs)", f"{m}x{n}x{k}",
                     " / ".join(cells) + f" / cuBLAS fp16 {tops(t_cublas):.1f} ({t_cublas / t_auto:.2f}x)"
                     + (f" / _int_mm int8 {tops(t_int8):.1f} ({t_int8 / t_auto:.2f}x)" if t_int8 else ""), "-"))
        moved = n * k // 2 + m * k // 2 + 2 * m * n + 4 * n
        peak = _dram_peak()
        if m <= cuda_ops.GEMV_ROWS:  # the decode GEMV (opt-in), raw launcher, and the static linear through it
            t_gemv = _time([lambda w=w: gemm(lib, a, w, a_s, w_s, None, out, epilogue=0, config=cuda_ops.GEMV)
                            for w in ws])
            with _gemv_on():
                t_gemv_lin = _time([lambda w=w: ops.quant_linear(x16, w, w_s, s0, 4, None, backend="cuda")
                                    for w in ws])
            rows.append((f"decode GEMV (measured, {name}, graphs)", f"{m}x{n}x{k}",
                         f"{t_gemv * 1e6:.1f} us = {moved / t_gemv / 1e9:.0f} GB/s"
                         + (f" ({100 * moved / t_gemv / peak:.0f} % of peak)" if peak else "")
                         + f" vs tile {t_auto * 1e6:.1f} us ({t_auto / t_gemv:.2f}x) vs cuBLAS fp16 "
                         f"{t_cublas * 1e6:.1f} us ({t_cublas / t_gemv:.2f}x); static linear through it "
                         f"{t_gemv_lin * 1e6:.1f} us", "-"))
        if m <= 16:  # decode is a read of W: achieved DRAM bandwidth of auto (split-K where N is narrow)
            rows.append((f"decode DRAM GB/s (measured, {name}, graphs)", f"{m}x{n}x{k}",
                         f"{moved / t_auto / 1e9:.0f}" + (f" = {100 * moved / t_auto / peak:.0f} % of {peak / 1e9:.0f}"
                                                          if peak else "") +
                         f" (split_k {lib.pqk_gemm_split_k(m, n, k, cuda_ops.sm_count(a.device))}); cuBLAS fp16 reads "
                         f"{2 * n * k / t_cublas / 1e9:.0f}", "-"))
        # the static linear from fp16 x: the fused A-load kernel vs quantize + int4_matmul, each forced
        t_fused = _time([lambda w=w: cuda_ops._quant_gemm_static("selftest", x16, w, s0, w_s, None, 0, fused=True)
                         for w in ws])
        t_two = _time([lambda w=w: cuda_ops._quant_gemm_static("selftest", x16, w, s0, w_s, None, 0, fused=False)
                       for w in ws])
        pick = "fused" if m <= cuda_ops.FUSED_A_MAX_M else "quantize + GEMM"
        rows.append((f"static linear us (measured, {name}, graphs)", f"{m}x{n}x{k}",
                     f"fused {t_fused * 1e6:.1f} / quantize + int4_matmul {t_two * 1e6:.1f} ({t_two / t_fused:.2f}x); "
                     f"auto: {pick} / cuBLAS fp16 {t_cublas * 1e6:.1f}", "-"))


def _gpu(rows, lib_path):
    """On a CUDA GPU: the raw launcher bit-exact (ctypes, the nvcc build of this tree), then every op through the
    torch binding (the library the package loads: installed next to the package, else this build) and the TOPS."""
    import torch

    from . import reference
    from .ops import cuda_library as pqk_cuda
    from .ops import cuda_ops as pqk_cuda_ops

    lib = load_library(lib_path)
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, n, k in [(1, 4096, 4096), (3, 130, 96), (118, 4096, 4096)]:
        a = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, device="cuda", generator=g)
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=g)
        a_s = torch.rand(m, device="cuda", generator=g) * 0.1 + 0.01
        w_s = torch.rand(n, device="cuda", generator=g) * 0.01 + 0.001
        out = torch.empty(m, n, dtype=torch.float32, device="cuda")
        gemm(lib, a, w, a_s, w_s, None, out, epilogue=2)
        ref = reference.int4_matmul(a.cpu(), w.cpu(), a_s.cpu(), w_s.cpu(), None, torch.float32)
        err = (out.cpu() - ref).abs().max().item()
        rows.append(("pqk_int4_gemm (ctypes) fp32", f"{m}x{n}x{k}", f"{err:.3g}", "pass" if err == 0 else "FAIL"))
        for config in ([-1, 0, 1, 2] + ([pqk_cuda_ops.GEMV] if m <= pqk_cuda_ops.GEMV_ROWS else [])
                       + ([10, 11, 12] if _has_cutlass() and n % 8 == 0 else [])):
            out16 = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
            gemm(lib, a, w, a_s, w_s, None, out16, epilogue=0, config=config)
            err = _err(out16, ref.half())
            rows.append((f"pqk_int4_gemm (ctypes) fp16 config {config}", f"{m}x{n}x{k}", f"{err:.3g}",
                         "pass" if err == 0 else "FAIL"))
        for splits in ((3, 16) if m <= 16 and k >= 16 * 64 else ()):  # split-K on the decode tile: the same bits
            out16 = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
            gemm(lib, a, w, a_s, w_s, None, out16, epilogue=0, config=0, split_k=splits)
            err = _err(out16, ref.half())
            rows.append((f"pqk_int4_gemm (ctypes) fp16 split_k {splits}", f"{m}x{n}x{k}", f"{err:.3g}",
                         "pass" if err == 0 else "FAIL"))
    if not pqk_cuda.cuda_available():
        rows.append(("torch binding (backend='cuda')", "-", "-", f"FAIL ({pqk_cuda.unavailable_reason()})"))
        return
    rows.append(("torch binding (backend='cuda')", pqk_cuda.loaded_library_path(), f"GEMM path {pqk_cuda.gemm_path()}",
                 "-"))
    _ops_rows(rows)
    _kv_rows(rows)
    _tops_rows(rows, lib)


E2E_GPU = {  # (name, e2e.py arguments) of --bench on a GPU
    "layer": ["--device", "cuda", "--model", "llama-3-8b", "--layers", "1", "--prefill", "2048", "--decode-ctx",
              "2048", "--decode-steps", "50", "--repeats", "5", "--methods", "fp,dynamic,static"],
    "model": ["--device", "cuda", "--model", "llama-3-8b", "--prefill", "512", "--decode-ctx", "2048",
              "--decode-steps", "50", "--repeats", "3", "--methods", "fp,static"],
}
E2E_CPU = {  # the dry run without a GPU: the same pipeline on a tiny model
    name: ["--device", "cpu", "--model", "tiny-llama", "--prefill", "32", "--decode-ctx", "32", "--decode-steps", "4",
           "--repeats", "1", "--calib-tokens", "16", "--methods", argv[argv.index("--methods") + 1]]
    for name, argv in E2E_GPU.items()
}


def _bench(out_dir: str, has_gpu: bool) -> list[tuple]:
    """Runs benchmarks/e2e.py for each E2E_GPU (or E2E_CPU) entry -> rows naming what was written."""
    import os
    import sys

    e2e = os.path.join(cuda_build.ROOT, "benchmarks", "e2e.py")
    if not os.path.exists(e2e):
        return [("bench", "-", "-", "FAIL (benchmarks/e2e.py not found: --bench needs the source checkout)")]
    rows = []
    for name, args in (E2E_GPU if has_gpu else E2E_CPU).items():
        path = os.path.join(out_dir, f"{name}.json")
        r = subprocess.run([sys.executable, e2e, *args, "--json", path], capture_output=True, text=True)
        what = "measured on the GPU" if has_gpu else "dry run on the CPU (tiny model)"
        rows.append((f"bench {name} ({what})", path, "see .md next to it",
                     "pass" if r.returncode == 0 else f"FAIL ({(r.stderr or r.stdout).strip()[-300:]})"))
    return rows


def main(argv=None) -> int:
    """argv: ["--build"] also compiles this source tree with nvcc (minutes: ~5 on 2 cores, cached) and checks
    that build's spills, even when a library is installed; by default an installed libpqk_cuda.so is what runs."""
    from .cli import Parser

    ap = Parser(prog="prefixquant-kernels selftest", description=__doc__.split("\n", 1)[1].strip())
    ap.add_argument("--build", action="store_true", help="also compile this source tree with nvcc (minutes: ~5 on 2 "
                    "cores, cached) and check that build's spills, even when a library is installed")
    ap.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    ap.add_argument("--bench", action="store_true", help="then time one Llama-3-8B layer and the whole model that fits "
                    "(benchmarks/e2e.py, interleaved, decode as CUDA graphs); without a GPU a tiny CPU dry run")
    ap.add_argument("--out", default="selftest_out", help="--bench: directory of the JSON / Markdown / PNG files")
    args = ap.parse_args(list(argv or []))
    rows: list[tuple] = []
    _host(rows)
    from .ops import cuda_library as pqk_cuda

    try:
        lib_path = pqk_cuda.find_library(build=False)
        rows.append(("libpqk_cuda.so", lib_path, "-", "-"))
    except RuntimeError:
        lib_path = None
    if cuda_build.nvcc_path() and (lib_path is None or args.build):
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
    if args.bench:
        import json
        import os

        os.makedirs(args.out, exist_ok=True)
        rows += _bench(args.out, has_gpu and lib_path is not None)
        with open(os.path.join(args.out, "selftest.json"), "w") as f:
            json.dump([dict(zip(("op", "shape", "max error", "pass"), map(str, r))) for r in rows], f, indent=1)
    widths = [max(len(str(r[i])) for r in rows + [("op", "shape", "max error", "pass")]) for i in range(4)]
    _row(("op", "shape", "max error", "pass"), widths)
    for r in rows:
        _row(r, widths)
    return 0 if not any(str(r[3]).startswith("FAIL") for r in rows) else 1
