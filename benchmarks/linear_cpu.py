"""CPU benchmark of the quantized linear layer against torch, measured side by side in one run.

    python benchmarks/linear_cpu.py --threads 2 --json bench_out/linear_cpu.json

Cases (the CPU-speed issue's targets):
  prefill  x bf16 [2048, 4096], 4096 -> 4096: static W4A4 QuantLinear vs torch bf16 and fp32 `F.linear(x, W)`
           (nn.Linear's own call; the fp32 one on an fp32 x), and
           the best torch int8 composition (quantize to int8 + torch._int_mm + scale);
  decode   x bf16 [1, 4096], 4096 -> 14336, 4-bit weights: vs torch bf16 / fp32, and % of the copy roofline
           (weight bytes / measured copy bandwidth);
  static vs dynamic per-token QuantLinear (W4A4 and W4A8) at M in {1, 16, 2048}, and where the time goes:
           the standalone quantize pass (per-token needs a max-reduction first) vs the fused GEMM.
Each timing: warm-up, then the median of --repeats runs, with min/max. Machine anchors (copy bandwidth, best
torch matmul) are measured in the same run. Writes JSON + a markdown table (stdout and next to the JSON).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import anchors, machine_info, timeit, timeit_interleaved, write_outputs  # noqa: E402
import prefixquant_kernels as pqk  # noqa: E402  (common.py put the repository root on sys.path)
from prefixquant_kernels.nn import QuantLinear  # noqa: E402


def int8_composition(x: torch.Tensor, w_int8_t: torch.Tensor, w_scale: torch.Tensor, a_scale: float):
    """The best torch-only static W8A8-style path: quantize x to int8, torch._int_mm, scale."""
    q = torch.clamp(torch.round(x.float() / a_scale), -128, 127).to(torch.int8)
    return (torch._int_mm(q, w_int8_t).float() * (a_scale * w_scale)).to(x.dtype)


def bench_prefill(repeats: int, m: int, k: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(m, k, generator=g).bfloat16()
    wb, wf = lin.weight.detach().bfloat16(), lin.weight.detach()
    xf = x.float()  # the fp32 anchor's input, fp32 already (a fp32 model's)
    static = QuantLinear.from_float(lin, 4, 4, act_scale=0.05)
    w_int8_t = torch.randint(-8, 8, (k, n), dtype=torch.int8, generator=g)
    w_scale = torch.rand(n, generator=g) + 0.1
    flops = 2 * m * n * k
    rows = []
    with torch.no_grad():
        for name, fn, reps in [
            ("pqk static W4A4 QuantLinear", lambda: static(x), repeats),
            ("torch bf16 F.linear", lambda: F.linear(x, wb), max(2, repeats // 3)),
            ("torch fp32 F.linear", lambda: F.linear(xf, wf), repeats),
            # torch._int_mm takes minutes at this size on CPUs without AVX-512 VNNI: one timed run
            ("torch int8 quantize + _int_mm + scale", lambda: int8_composition(x, w_int8_t, w_scale, 0.05), 1),
        ]:
            t = timeit(fn, reps, warmup=0 if reps == 1 else 1)
            rows.append({"case": f"prefill {m}x{k}->{n}", "method": name, **t,
                         "TOPS": flops / (t["median_ms"] / 1e3) / 1e12})
    return rows


def bench_decode(repeats: int, k: int, n: int, read_gbs: float) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(1, k, generator=g).bfloat16()
    wb, wf = lin.weight.detach().bfloat16(), lin.weight.detach()
    xf = x.float()  # the fp32 anchor's input, fp32 already (a fp32 model's)
    static = QuantLinear.from_float(lin, 4, 4, act_scale=0.05)
    w_bytes = static.weight.numel()
    roofline_ms = w_bytes / (read_gbs * 1e9) * 1e3  # the packed weights streamed once at the measured read rate
    rows = []
    with torch.no_grad():
        times = timeit_interleaved({"pqk static W4A4 QuantLinear": lambda: static(x),
                                    "torch bf16 F.linear": lambda: F.linear(x, wb),
                                    "torch fp32 F.linear": lambda: F.linear(xf, wf)}, repeats * 4)
        for name, t in times.items():
            row = {"case": f"decode 1x{k}->{n}", "method": name, **t}
            if name.startswith("pqk"):
                row["GBps_weights"] = w_bytes / (t["median_ms"] / 1e3) / 1e9
                row["pct_of_read_roofline"] = 100 * roofline_ms / t["median_ms"]
            rows.append(row)
    return rows


LLAMA3_8B_LINEARS = {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096),
                     "gate": (4096, 14336), "up": (4096, 14336), "down": (14336, 4096)}


def bench_decode_layer(repeats: int, read_gbs: float, quick: bool) -> list[dict]:
    """One decode step's seven linears of a Llama-3-8B layer, called in turn: 109 MB of 4-bit weights, more than
    the L3, so every call streams from DRAM as in a real decode step (a single matrix timed in a loop can stay
    partly cached: 29 MB against a 32 MB L3)."""
    shapes = {k: (a // 8, b // 8) for k, (a, b) in LLAMA3_8B_LINEARS.items()} if quick else LLAMA3_8B_LINEARS
    g = torch.Generator().manual_seed(3)
    mods = {name: QuantLinear.from_float(torch.nn.Linear(k, n, bias=False), 4, 4, act_scale=0.05)
            for name, (k, n) in shapes.items()}
    xs = {name: torch.randn(1, k, generator=g).bfloat16() for name, (k, _) in shapes.items()}
    w_bytes = sum(m.weight.numel() for m in mods.values())

    def step():
        for name, mod in mods.items():
            mod(xs[name])
    with torch.no_grad():
        t = timeit(step, repeats * 4)
    return [{"case": "decode layer (7 linears, Llama-3-8B)", "method": "pqk static W4A4 QuantLinear x7", **t,
             "GBps_weights": w_bytes / (t["median_ms"] / 1e3) / 1e9,
             "pct_of_read_roofline": 100 * (w_bytes / (read_gbs * 1e9) * 1e3) / t["median_ms"]}]


def bench_static_vs_dynamic(repeats: int, k: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(k, n, bias=False)
    rows = []
    for m in (1, 16, 2048):
        x = torch.randn(m, k, generator=g).bfloat16()
        reps = repeats if m == 2048 else repeats * 4
        for a_bits in (4, 8):
            st = QuantLinear.from_float(lin, 4, a_bits, act_scale=0.05)
            dy = QuantLinear.from_float(lin, 4, a_bits, act_scale=None)
            # one packed weight for both: two 8 MB copies would compete for the L3 and make the comparison
            # one of cache placement (measured: a 1-3 % swing either way at M = 1), not of the activation path
            dy.weight, dy.w_scale = st.weight, st.w_scale
            s_t = torch.tensor(0.05)
            with torch.no_grad():
                t = timeit_interleaved({"s": lambda: st(x), "d": lambda: dy(x),
                                        "qs": lambda: pqk.quantize_static(x, s_t, a_bits),
                                        "qd": lambda: pqk.quantize_per_token(x, a_bits)}, reps)
                t_s, t_d, q_s, q_d = t["s"], t["d"], t["qs"], t["qd"]
            rows.append({"case": f"static vs dynamic M={m} {k}->{n}", "method": f"W4A{a_bits}",
                         "static_ms": t_s["median_ms"], "dynamic_ms": t_d["median_ms"],
                         "dynamic_over_static": t_d["median_ms"] / t_s["median_ms"],
                         "standalone_quantize_static_ms": q_s["median_ms"],
                         "standalone_quantize_per_token_ms": q_d["median_ms"]})
    return rows


def markdown(result: dict) -> str:
    a = result["anchors"]
    lines = [f"Machine: {result['machine']['cpu']}, {result['machine']['threads']} threads, torch "
             f"{result['machine']['torch']} ({result['machine']['torch_cpu_capability']}), pqk ISA "
             f"{result['machine']['pqk_isa']}. Measured, CPU.",
             f"Anchors: copy {a['copy_GBps_read_plus_write']:.1f} GB/s (read+write), "
             f"read {a['read_GBps']:.1f} GB/s, fp32 matmul {a['fp32_matmul_1024_GFLOPs']:.0f} GFLOP/s, bf16 matmul {a['bf16_matmul_1024_GFLOPs']:.0f} GFLOP/s "
             "(1024^3).", "", "| case | method | median ms | min–max ms | TOPS / GB/s | speedup of pqk |",
             "|---|---|---|---|---|---|"]
    for case in ("prefill", "decode"):
        rows = [r for r in result["rows"] if r["case"].startswith(case)]
        pqk_ms = next(r["median_ms"] for r in rows if r["method"].startswith("pqk"))
        for r in rows:
            rate = f"{r['TOPS']:.3f} TOPS" if "TOPS" in r else (
                f"{r['GBps_weights']:.1f} GB/s ({r['pct_of_read_roofline']:.0f}% of read roofline)"
                if "GBps_weights" in r else "")
            sp = "—" if r["method"].startswith("pqk") else f"{r['median_ms'] / pqk_ms:.2f}×"
            lines.append(f"| {r['case']} | {r['method']} | {r['median_ms']:.2f} | {r['min_ms']:.2f}–{r['max_ms']:.2f} "
                         f"| {rate} | {sp} |")
    lines += ["", "| case | bits | static ms | dynamic ms | dynamic / static | quantize pass: static ms | "
              "quantize pass: per-token ms |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["case"].startswith("static vs dynamic"):
            lines.append(f"| {r['case']} | {r['method']} | {r['static_ms']:.3f} | {r['dynamic_ms']:.3f} | "
                         f"{r['dynamic_over_static']:.3f} | {r['standalone_quantize_static_ms']:.3f} | "
                         f"{r['standalone_quantize_per_token_ms']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="bench_out/linear_cpu.json")
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test of the script)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    m, k, n, n_dec = (64, 512, 512, 1024) if args.quick else (2048, 4096, 4096, 14336)
    result = {"machine": machine_info(), "anchors": anchors(args.repeats), "rows": []}
    result["rows"] += bench_prefill(args.repeats, m, k, n)
    result["rows"] += bench_decode(args.repeats, k, n_dec, result["anchors"]["read_GBps"])
    result["rows"] += bench_decode_layer(args.repeats, result["anchors"]["read_GBps"], args.quick)
    result["rows"] += bench_static_vs_dynamic(args.repeats, k, n)
    md = markdown(result)
    print(md)
    write_outputs(args.json, result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
