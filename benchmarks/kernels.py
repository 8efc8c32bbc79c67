"""Kernel microbenchmarks, each measured side by side with its torch baseline and against this machine's roofline.

    python benchmarks/kernels.py --device cpu --threads 2 --json bench_out/kernels.json

Sections:
  gemm       y = x W^T for every (M, K, N) of --shapes: the package's static W4A4 quant_linear on every backend
             the device has (reference, cpu:scalar, cpu:avx2, ...: pqk.available_backends(); CUDA: "auto"), the
             dynamic per-token one on the best backend, vs torch matmul in fp32 / bf16 (and fp16 on CUDA) and the
             torch int8 composition (quantize to int8 + torch._int_mm + scale). torch._int_mm has no fast kernel on
             CPUs without AVX-512 VNNI (minutes per 2048x4096x4096 call here, see docs/PERF.md), so it only runs
             where M*N*K <= --int-mm-max-macs (default 2^30 on CPU, unlimited on CUDA); --skip-int-mm drops it.
  quantize   standalone quantize_static vs quantize_per_token (the reduction static scales remove), and the
             fused path: quant_linear (quantize inside the GEMM) vs quantize + int4_matmul run separately.
  hadamard   prefixquant_kernels.hadamard.hadamard_transform vs the dense x @ H^T it replaces (only if that module
             exists).
  kv         kv_dequant_concat of a 4-bit PrefixQuant cache [1, H, T, D] + 16-bit prefix: reference vs the C++ CPU
             kernel (CPU) or Triton (CUDA).
  attention  decode attention (CUDA only): the Triton fused kernel vs dequant-concat + SDPA. On CPU Triton runs
             only in its interpreter, which says nothing about speed: skipped, with a record saying so.

Every timing: warm-up, then the median of --repeats runs with min/max and quartiles (calls that turn out to take
seconds are repeated only as often as --budget allows; each record says how often it ran). Rates: TOPS (2MNK /
time) for GEMMs, GB/s (bytes read + written / time) otherwise. Roofline: the machine's copy bandwidth and its best
torch float matmul rate, both measured at the start of this run; roofline_ms = max(ops / best matmul rate,
bytes / copy bandwidth) and pct_of_roofline = roofline_ms / median_ms. (The compute anchor is torch's best float
matmul, not the int8 peak of the hardware: an int4 kernel can exceed 100 % of it.)
Writes JSON ({"machine", "anchors", "rows"}) and a markdown table next to it.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import anchors, machine_info, machine_line, timeit_budget, write_outputs  # noqa: E402
import prefixquant_kernels as pqk  # noqa: E402  (common.py put the repository root on sys.path)
from prefixquant_kernels.ops.backend import CPU_ISAS  # noqa: E402

DEFAULT_SHAPES = "2048x4096x4096,16x4096x4096,1x4096x14336"
QUICK_SHAPES = "64x256x512,1x256x512"


class Bench:
    """Times a case, attaches rates and the roofline, collects the rows."""

    def __init__(self, args, anc: dict):
        self.args, self.anc, self.rows = args, anc, []
        self.dev = args.device

    def run(self, section: str, case: str, method: str, fn, *, ops: float = 0.0, nbytes: float = 0.0,
            **extra) -> dict:
        t = timeit_budget(fn, self.args.repeats, self.args.budget, device=self.dev)
        s = t["median_ms"] / 1e3
        peak = self.anc["best_matmul_GFLOPs"] * 1e9
        bw = self.anc["copy_GBps_read_plus_write"] * 1e9
        roof_s = max(ops / peak, nbytes / bw)
        row = {"section": section, "case": case, "method": method, **t, "ops": ops, "bytes": nbytes,
               "TOPS": ops / s / 1e12 if ops else None, "GBps": nbytes / s / 1e9 if nbytes else None,
               "roofline_ms": roof_s * 1e3, "bound": "compute" if ops / peak >= nbytes / bw else "memory",
               "pct_of_roofline": 100 * roof_s / s, **extra}
        self.rows.append(row)
        return row

    def skip(self, section: str, case: str, method: str, reason: str) -> None:
        self.rows.append({"section": section, "case": case, "method": method, "skipped": reason})


def _shapes(v: str) -> list[tuple[int, int, int]]:
    out = []
    for item in v.split(","):
        try:
            m, k, n = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shapes must be MxKxN[,MxKxN...], got {item!r}") from None
        if min(m, k, n) <= 0 or k % 2:
            raise argparse.ArgumentTypeError(f"M, K, N must be > 0 and K even (two int4 per byte), got {item!r}")
        out.append((m, k, n))
    return out


def _backends(device: str) -> list[str]:
    """The GEMM backends to time: every one this CPU runs; on CUDA "auto" (what it resolves to is recorded)."""
    if device == "cuda":
        return ["auto"]
    return pqk.available_backends()


def _resolved(backend: str, device: str) -> str:
    """backend -> "backend" or "auto -> kind" (on CUDA "auto" is the torch reference until a CUDA binding exists)."""
    if backend != "auto":
        return backend
    from prefixquant_kernels.ops.backend import resolve
    return f"auto -> {resolve('auto', torch.device(device), 'kernels.py').kind}"


def bench_gemm(b: Bench, shapes) -> None:
    dev, args = b.dev, b.args
    torch_dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if dev == "cuda" else [])
    best = "auto" if dev == "cuda" else pqk.available_backends()[-1]
    g = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        case = f"{m}x{k}x{n}"
        w = torch.randn(n, k, generator=g) * 0.02
        x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
        wq, ws = pqk.nn.quant_linear.quantize_weight(w, 4)
        wq, ws = wq.to(dev), ws.to(dev)
        flops = 2 * m * n * k
        io = x.numel() * 2 + m * n * 2       # bf16 activations in and out
        for be in _backends(dev):
            b.run("gemm", case, f"pqk static W4A4 quant_linear [{_resolved(be, dev)}]",
                  lambda: pqk.quant_linear(x, wq, ws, 0.05, 4, backend=be), ops=flops, nbytes=wq.numel() + io)
        b.run("gemm", case, f"pqk dynamic W4A4 quant_linear [{_resolved(best, dev)}]",
              lambda: pqk.quant_linear(x, wq, ws, None, 4, backend=best), ops=flops, nbytes=wq.numel() + io)
        for dt in torch_dtypes:
            xd, wd = x.to(dt), w.to(dev, dt)
            name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]
            b.run("gemm", case, f"torch {name} x @ W.T", lambda: xd @ wd.T, ops=flops,
                  nbytes=wd.numel() * wd.element_size() + (xd.numel() + m * n) * xd.element_size())
        cap = args.int_mm_max_macs if args.int_mm_max_macs is not None else (2**30 if dev == "cpu" else None)
        if args.skip_int_mm:
            b.skip("gemm", case, "torch int8 quantize + _int_mm + scale", "--skip-int-mm")
        elif cap is not None and m * n * k > cap:
            b.skip("gemm", case, "torch int8 quantize + _int_mm + scale",
                   f"M*N*K = {m * n * k} > --int-mm-max-macs {cap}: torch._int_mm has no fast kernel on this CPU")
        elif m < 17 and dev == "cuda":
            b.skip("gemm", case, "torch int8 quantize + _int_mm + scale", "torch._int_mm on CUDA needs M > 16")
        else:
            w8 = torch.randint(-8, 8, (k, n), dtype=torch.int8, generator=g).to(dev)
            ws8 = ws.float()

            def int_mm():
                q = torch.clamp(torch.round(x.float() / 0.05), -128, 127).to(torch.int8)
                return (torch._int_mm(q, w8).float() * (0.05 * ws8)).to(x.dtype)
            b.run("gemm", case, "torch int8 quantize + _int_mm + scale", int_mm, ops=flops, nbytes=w8.numel() + io)


def bench_quantize(b: Bench, shapes) -> None:
    dev = b.dev
    best = "auto" if dev == "cuda" else pqk.available_backends()[-1]
    g = torch.Generator().manual_seed(1)
    for m, k, n in shapes:
        case = f"{m}x{k} (-> N={n})"
        x = (torch.randn(m, k, generator=g) * 3).to(dev, torch.bfloat16)
        w = torch.randn(n, k, generator=g) * 0.02
        wq, ws = (t.to(dev) for t in pqk.nn.quant_linear.quantize_weight(w, 4))
        io = x.numel() * 2 + x.numel() // 2        # bf16 in, packed int4 out
        b.run("quantize", case, f"quantize_static [{best}]", lambda: pqk.quantize_static(x, 0.05, 4, backend=best),
              nbytes=io)
        b.run("quantize", case, f"quantize_per_token [{best}]", lambda: pqk.quantize_per_token(x, 4, backend=best),
              nbytes=io + 4 * m)
        flops = 2 * m * n * k
        b.run("quantize", case, f"fused: static quant_linear [{best}]",
              lambda: pqk.quant_linear(x, wq, ws, 0.05, 4, backend=best), ops=flops)
        b.run("quantize", case, f"separate: quantize_static + int4_matmul [{best}]",
              lambda: pqk.int4_matmul(pqk.quantize_static(x, 0.05, 4, backend=best), wq, 0.05, ws,
                                      out_dtype=torch.bfloat16, backend=best), ops=flops)

        def per_token_then_gemm():
            q, s = pqk.quantize_per_token(x, 4, backend=best)
            return pqk.int4_matmul(q, wq, s, ws, out_dtype=torch.bfloat16, backend=best)
        b.run("quantize", case, f"separate: quantize_per_token + int4_matmul [{best}]", per_token_then_gemm,
              ops=flops)


def bench_hadamard(b: Bench, ms=(1, 2048), ns=(4096, 14336)) -> None:
    try:
        from prefixquant_kernels.hadamard import hadamard_rotation, hadamard_transform
    except ImportError as e:
        b.skip("hadamard", "-", "hadamard_transform", f"prefixquant_kernels.hadamard not importable: {e}")
        return
    g = torch.Generator().manual_seed(2)
    for n in ns:
        h = hadamard_rotation(n, torch.float32).to(b.dev)
        for m in ms:
            x = torch.randn(m, n, generator=g).to(b.dev, torch.bfloat16)
            io = 2 * x.numel() * 2
            b.run("hadamard", f"{m}x{n}", "pqk hadamard_transform", lambda: hadamard_transform(x), nbytes=io)
            b.run("hadamard", f"{m}x{n}", "dense (x.float() @ H^T) fp32", lambda: (x.float() @ h.T).to(x.dtype),
                  ops=2 * m * n * n, nbytes=io + h.numel() * 4)


def bench_kv(b: Bench, heads: int = 8, tokens=(2048, 8192), d: int = 128, prefix: int = 4) -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.full((heads,), 0.1, device=b.dev)
    backends = ["reference", "cpu"] if b.dev == "cpu" else ["reference", "triton"]
    if b.dev == "cpu" and "cpu:scalar" not in pqk.available_backends():
        backends = ["reference"]
    for t in tokens:
        k = torch.randn(1, heads, t, d, generator=g).to(b.dev, torch.float16)
        pk = torch.randn(1, heads, prefix, d, generator=g).to(b.dev, torch.float16)
        packed = pqk.kv_quantize(k, s, 4, backend="reference")
        nbytes = packed.numel() + pk.numel() * 2 + (t + prefix) * heads * d * 2
        for be in backends:
            b.run("kv", f"dequant-concat [1, {heads}, {prefix}+{t}, {d}] 4-bit", f"kv_dequant_concat [{be}]",
                  lambda: pqk.kv_dequant_concat(pk, packed, s, 4, torch.float16, backend=be), nbytes=nbytes)


# decode attention cases: (query heads, KV heads, body tokens, head dim, prefix); SmolLM2's step at ~560 positions
ATTN_CASES = ((32, 8, 2048, 128, 4), (32, 8, 8192, 128, 4), (9, 3, 560, 64, 1))


def bench_attention(b: Bench, cases=ATTN_CASES):
    """Decode attention over [prefix | 4-bit body]: the fused kernel (C++ on CPU, Triton on CUDA) vs dequant-concat
    + SDPA (what an unfused cache does every step). fp32 on CPU (torch's fp16 SDPA is ~10x slower there). On CPU
    also the op itself on each kernel table (cpu:avx2, cpu:avx512vnni, ...), without the public op's checks."""
    if b.dev == "cpu" and "cpu:scalar" not in pqk.available_backends():
        b.skip("attention", "decode", "kv_decode_attention [cpu]", "the C++ extension is not built")
        return
    import torch.nn.functional as F
    fused = "cpu" if b.dev == "cpu" else "triton"
    dt = torch.float32 if b.dev == "cpu" else torch.float16
    g = torch.Generator().manual_seed(4)
    cpu_tables = [n for n in pqk.available_backends() if n.startswith("cpu:") and n != "cpu:scalar"]
    tables = cpu_tables if b.dev == "cpu" else []
    for hq, hkv, t, d, prefix in cases:
        s = torch.full((hkv,), 0.1, device=b.dev)
        q = torch.randn(1, hq, d, generator=g).to(b.dev, dt)
        k, v = (torch.randn(1, hkv, t, d, generator=g).to(b.dev, dt) for _ in range(2))
        pk, pv = (torch.randn(1, hkv, prefix, d, generator=g).to(b.dev, dt) for _ in range(2))
        kp, vp = pqk.kv_quantize(k, s, 4), pqk.kv_quantize(v, s, 4)
        nbytes = 2 * kp.numel() + 2 * pk.numel() * pk.element_size()
        case = f"q [1, {hq}, {d}], KV [1, {hkv}, {prefix}+{t}, {d}] 4-bit"
        b.run("attention", case, f"kv_decode_attention [{fused}]",
              lambda: pqk.kv_decode_attention(q, pk, pv, kp, vp, s, s, 4, backend=fused), nbytes=nbytes)
        for name in tables:  # the op itself, per table (no Python checks)
            b.run("attention", case, f"kv_decode_static [{name}]",
                  lambda isa=CPU_ISAS[name]: torch.ops.pqk.kv_decode_static(q, pk, pv, kp, vp, s, s, 4, d ** -0.5, isa),
                  nbytes=nbytes)

        def unfused():
            kk = pqk.kv_dequant_concat(pk, kp, s, 4, dt)
            vv = pqk.kv_dequant_concat(pv, vp, s, 4, dt)
            return F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, enable_gqa=True)
        b.run("attention", case, "dequant-concat + SDPA", unfused, nbytes=nbytes)


def markdown(result: dict) -> str:
    a = result["anchors"]
    lines = [machine_line(result["machine"]),
             f"Anchors (this run): copy {a['copy_GBps_read_plus_write']:.1f} GB/s (read+write), read "
             f"{a['read_GBps']:.1f} GB/s, best torch matmul {a['best_matmul_GFLOPs']:.0f} GFLOP/s ("
             + ", ".join(f"{k.split('_')[0]} {v:.0f}" for k, v in a.items() if k.endswith("GFLOPs")
                         and not k.startswith("best")) + ").",
             "", "| section | case | method | median ms | min–max ms | runs | TOPS | GB/s | bound | % of roofline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['section']} | {r['case']} | {r['method']} | skipped: {r['skipped']} | | | | | | |")
            continue
        tops = "" if r["TOPS"] is None else f"{r['TOPS']:.4f}"
        gbs = "" if r["GBps"] is None else f"{r['GBps']:.2f}"
        lines.append(f"| {r['section']} | {r['case']} | {r['method']} | {r['median_ms']:.3f} | "
                     f"{r['min_ms']:.3f}–{r['max_ms']:.3f} | {r['repeats']} | {tops} | {gbs} | {r['bound']} | "
                     f"{r['pct_of_roofline']:.1f} |")
    return "\n".join(lines)


SECTIONS = ("gemm", "quantize", "hadamard", "kv", "attention")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=30.0, help="seconds of timed runs per case at most (after one)")
    p.add_argument("--shapes", type=_shapes, default=None, help=f"GEMM MxKxN list (default {DEFAULT_SHAPES})")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--skip-int-mm", action="store_true", help="do not time torch._int_mm")
    p.add_argument("--int-mm-max-macs", type=int, default=None,
                   help="time torch._int_mm only where M*N*K <= this (default 2^30 on CPU: no fast CPU kernel)")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke test of the script)")
    p.add_argument("--json", default="bench_out/kernels.json")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
    if args.threads <= 0 or args.repeats <= 0:
        p.error(f"--threads and --repeats must be > 0, got {args.threads} and {args.repeats}")
    bad = [s for s in args.sections.split(",") if s not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; choose from {','.join(SECTIONS)}")
    args.sections = args.sections.split(",")
    if args.shapes is None:
        args.shapes = _shapes(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    return args


def main(argv=None) -> dict:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": machine_info(args.device), "measured": True}
    result["anchors"] = anchors(args.repeats, args.device, size=256 if args.quick else 1024,
                                copy_mib=16 if args.quick else 256)
    b = Bench(args, result["anchors"])
    quick = dict(ms=(1, 16), ns=(256,)) if args.quick else {}
    kv_quick = dict(tokens=(64,), heads=2, d=64) if args.quick else {}
    att_quick = dict(cases=((4, 2, 64, 64, 4),)) if args.quick else {}
    jobs = {"gemm": lambda: bench_gemm(b, args.shapes), "quantize": lambda: bench_quantize(b, args.shapes),
            "hadamard": lambda: bench_hadamard(b, **quick), "kv": lambda: bench_kv(b, **kv_quick),
            "attention": lambda: bench_attention(b, **att_quick)}
    for sec in tqdm(args.sections, desc="kernels", unit="section"):
        with torch.no_grad():
            jobs[sec]()
    result["rows"] = b.rows
    md = markdown(result)
    write_outputs(args.json, result, md)
    print(md)
    return result


if __name__ == "__main__":
    main()
