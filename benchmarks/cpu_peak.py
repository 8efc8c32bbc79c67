"""The CPU prefill GEMM as a fraction of the machine's measured int8 peak, next to torch, interleaved in one run:

    python benchmarks/cpu_peak.py --threads 2 --json bench_out/cpu_peak.json [--repeats 5] [--quick]

Peak: `_C.int8_peak_tops(isa, s)` (csrc/cpu/peak.cpp), a throughput loop of the instruction each ISA's GEMM is built
on — tdpbusd tiles (amx), vpdpbusd zmm (avx512vnni), vpdpbusd ymm (avxvnni), vpmaddubsw ymm (avx2) — on every
thread, measured once per round between the GEMMs. Per shape (M x K -> N, default the Llama-3-8B prefill shapes at M = 2048) and round, in
alternating order: our static QuantLinear W4A4 / W4A8 / W8A8 (bf16 x in, the quantize fused), our GEMM with A
already quantized (`int4_matmul`, W4 with int8 A / packed int4 A, as a fused producer's requant epilogue hands it:
like for like with `_int_mm`'s int8 A, plus our dequant epilogue to bf16), raw
`torch._int_mm` (int8 x int8 -> int32, same M, K, N, no quantize or scale), oneDNN's static W8A8
`torch.ops.quantized.linear` (x already u8, W prepacked; its AMX kernel where the CPU has AMX, the strongest int8
path there), torch bf16 and fp32 `F.linear(x, W)` (what nn.Linear runs; 2-4 % faster than `x @ W.T` on the AMX
Xeon, docs/PERF.md step 28; fp32 with x already fp32); with AMX also our W4A4 forced onto the vpdpbusd kernel; plus
decode 1 x 4096 -> 14336 W4A4 vs bf16. Reported: wall-clock median [min-max], and the same per CPU second
(process CPU time / threads): on a shared machine a descheduled run shows in the wall time, not in the CPU time;
ratios against `_int_mm`, bf16 and the best torch path of the shape (the fastest of the torch rows). On a CPU without
VNNI `_int_mm` is left out by default (`--int-mm`): oneDNN has no fast int8 kernel there.

Across processes (`--processes P`): oneDNN's `_int_mm` runs at a speed drawn once per process (on the Zen 4 of
docs/PERF.md step 20, 82-83 ms in some processes and 91-92 ms in others on the same shape, ours steady), so one
run's "x _int_mm" is partly that draw. With P > 1 the script runs itself P times in a row as fresh processes (never
two at once), and reports per shape and method the median of the per-process medians, and the per-process ratio
against `_int_mm` as median [min-max] with how many processes reached 1.0, and our fastest process against
`_int_mm`'s fastest (its fast draw, the strongest anchor):

    python benchmarks/cpu_peak.py --threads 2 --repeats 5 --processes 7 --json bench_out/cpu_peak.json

With AMX on a VM that runs at two speeds (docs/PERF.md steps 26-29), the report also puts every round of every
process with the fast or the slow side by the peak measured right before it, and gives our per-round ratios per
side (`by_side`): the slow side slows AMX bf16 more than our GEMM, so a ratio pooled over both says little.

Note: with AMX (Sapphire Rapids and later) the peak is the tdpbusd loop's and our GEMM runs on the tiles;
`_int_mm` stays on oneDNN's vpdpbusd gemm there while quantized.linear and bf16 `@` use oneDNN's AMX brgemm.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, round_order, write_outputs  # noqa: E402
from prefixquant_kernels import _extension  # noqa: E402
from prefixquant_kernels.format import pack_int4  # noqa: E402
from prefixquant_kernels.nn import QuantLinear  # noqa: E402
from prefixquant_kernels.ops import int4_matmul  # noqa: E402

ISAS = {"amx": 4, "avx512vnni": 3, "avxvnni": 2, "avx2": 1}
INT_MM = "torch._int_mm (raw)"  # the row of oneDNN's raw int8 GEMM, the anchor of every "x _int_mm"
# oneDNN's static int8 linear (u8 x s8, W prepacked, per-tensor scales, u8 out): on a CPU with AMX its brgemm kernel
# runs on the tiles, which `_int_mm` (oneDNN's older gemm API) does not (docs/PERF.md step 26)
QLINEAR = "torch quantized.linear (oneDNN W8A8)"
GEMM_A8, GEMM_A4 = "pqk W4A8 GEMM (int8 A given)", "pqk W4A4 GEMM (int4 A given)"
SHAPES = [(2048, 4096, 4096), (2048, 4096, 14336), (2048, 14336, 4096), (2048, 4096, 1024)]


def measure_peaks(seconds: float) -> dict:
    C = _extension._C
    out = {}
    for name, i in ISAS.items():
        if C.cpu_isa_supported(i):
            C.int8_peak_tops(i, min(seconds, 0.2))  # warm-up: a first call once read half the peak (one thread)
            c0, t0 = time.process_time(), time.perf_counter()
            tops = C.int8_peak_tops(i, seconds)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            # per CPU second: the ops were done in `cpu / threads` seconds of each thread's own time
            out[name] = {"wall_TOPS": tops, "cpu_TOPS": tops * wall / max(cpu / torch.get_num_threads(), 1e-9)}
    return out


def onednn_qlinear(x: torch.Tensor, w: torch.Tensor):
    """torch's static W8A8 linear on oneDNN, x already quantized (as `_int_mm`'s is): None where torch lacks it."""
    if "onednn" not in torch.backends.quantized.supported_engines:
        return None
    torch.backends.quantized.engine = "onednn"
    with warnings.catch_warnings():  # torch deprecates its quantized tensors (still the way to reach this kernel)
        warnings.simplefilter("ignore", UserWarning)
        qx = torch.quantize_per_tensor(x.float(), 0.05, 128, torch.quint8)
        packed = torch.ops.quantized.linear_prepack(torch.quantize_per_tensor(w.float(), 0.01, 0, torch.qint8), None)
    return lambda: torch.ops.quantized.linear(qx, packed, 1.0, 128)


def bench_shape(m: int, k: int, n: int, rounds: int, peak_isa: str, peak_s: float, gen, int_mm: bool = True) -> dict:
    lin = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(m, k, generator=gen).bfloat16()
    wb, wf = lin.weight.detach().bfloat16(), lin.weight.detach()
    qa = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    qw = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen)
    mods = {f"pqk W{w}A{a}": QuantLinear.from_float(lin, w, a, act_scale=0.05) for w, a in ((4, 4), (4, 8), (8, 8))}
    if peak_isa == "amx":  # the vpdpbusd prefill beside the AMX one
        mods["pqk W4A4 [avx512vnni]"] = QuantLinear.from_float(lin, 4, 4, act_scale=0.05, backend="cpu:avx512vnni")
    fns = {name: (lambda mod=mod: mod(x)) for name, mod in mods.items()}
    # the GEMM alone: A already quantized (int8 for W4A8, packed int4 for W4A4), W4 and its scales from the modules
    qa4 = pack_int4(torch.randint(-8, 8, (m, k), dtype=torch.int8, generator=gen))
    for name, a in ((GEMM_A8, qa), (GEMM_A4, qa4)):
        mod = mods["pqk W4A8" if a is qa else "pqk W4A4"]
        fns[name] = (lambda a=a, mod=mod: int4_matmul(a, mod.weight, mod.act_scale, mod.w_scale,
                                                      out_dtype=torch.bfloat16))
    if int_mm:
        fns[INT_MM] = lambda: torch._int_mm(qa, qw)
        qlinear = onednn_qlinear(x, lin.weight.detach())
        if qlinear is not None:
            fns[QLINEAR] = qlinear
    xf = x.float()
    fns["torch bf16"] = lambda: F.linear(x, wb)
    fns["torch fp32"] = lambda: F.linear(xf, wf)
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    peaks = []
    th = torch.get_num_threads()
    with torch.no_grad():
        for f in fns.values():
            f()
        items = list(fns.items())
        for r in range(rounds):
            peaks.append(measure_peaks(peak_s)[peak_isa] if peak_isa else None)
            for name, f in round_order(items, r):
                c0, t0 = time.process_time(), time.perf_counter()
                f()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append((time.process_time() - c0) / th)
    ops = 2 * m * n * k
    peak_w = statistics.median(p["wall_TOPS"] for p in peaks) if peak_isa else None
    peak_c = statistics.median(p["cpu_TOPS"] for p in peaks) if peak_isa else None
    rows = {}
    for name in fns:
        w_ms = sorted(t * 1e3 for t in wall[name])
        c_ms = statistics.median(t * 1e3 for t in cpu[name])
        rows[name] = {"median_ms": statistics.median(w_ms), "min_ms": w_ms[0], "max_ms": w_ms[-1],
                      "cpu_median_ms": c_ms, "TOPS": ops / statistics.median(w_ms) / 1e9,
                      "cpu_TOPS": ops / c_ms / 1e9, "round_ms": [t * 1e3 for t in wall[name]]}
    ref, bf = rows.get(INT_MM), rows["torch bf16"]
    # the strongest torch path on this machine (bf16 on AVX512-BF16 / AMX, fp32 on AVX2, _int_mm where VNNI exists)
    best = min((name for name in rows if name.startswith("torch")), key=lambda name: rows[name]["median_ms"])
    for row in rows.values():
        if ref is not None:
            row["x_int_mm"] = ref["median_ms"] / row["median_ms"]
            row["x_int_mm_cpu"] = ref["cpu_median_ms"] / row["cpu_median_ms"]
        row["x_bf16"] = bf["median_ms"] / row["median_ms"]
        row["x_bf16_cpu"] = bf["cpu_median_ms"] / row["cpu_median_ms"]
        row["x_best_torch"] = rows[best]["median_ms"] / row["median_ms"]
        row["x_best_torch_cpu"] = rows[best]["cpu_median_ms"] / row["cpu_median_ms"]
        if peak_isa:
            row["pct_peak"] = 100 * row["TOPS"] / peak_w
            row["pct_peak_cpu"] = 100 * row["cpu_TOPS"] / peak_c
    return {"shape": f"{m}x{k}->{n}", "peak_isa": peak_isa, "peak_wall_TOPS": peak_w, "peak_cpu_TOPS": peak_c,
            "best_torch": best, "rows": rows,
            "round_peak_TOPS": [p["wall_TOPS"] for p in peaks] if peak_isa else None}


def bench_decode(rounds: int, gen) -> dict:
    k, n = 4096, 14336
    lin = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(1, k, generator=gen).bfloat16()
    wb = lin.weight.detach().bfloat16()
    mod = QuantLinear.from_float(lin, 4, 4, act_scale=0.05)
    fns = {"pqk W4A4": lambda: mod(x), "torch bf16": lambda: F.linear(x, wb)}
    ts = {name: [] for name in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        items = list(fns.items())
        for r in range(rounds):
            for name, f in round_order(items, r):
                t0 = time.perf_counter()
                f()
                ts[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) * 1e3 for name, v in ts.items()}
    return {"shape": f"1x{k}->{n}", "pqk_ms": med["pqk W4A4"], "bf16_ms": med["torch bf16"],
            "x_bf16": med["torch bf16"] / med["pqk W4A4"]}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']} ({m['torch_cpu_capability']}), pqk ISA "
             f"{m['pqk_isa']}; load average {result['load_before']} before, {result['load_after']} after; "
             f"ONEDNN_MAX_CPU_ISA={result['onednn_max_cpu_isa']}. Measured, CPU.",
             "", "Peaks (int ops, one run each, all threads): " + ", ".join(
                 f"{k} {v['wall_TOPS']:.3f} TOPS wall / {v['cpu_TOPS']:.3f} per CPU-second"
                 for k, v in result["peaks"].items()), "",
             "| shape | method | median ms [min-max] | TOPS | % peak | × _int_mm | × bf16 | × best torch | CPU ms | "
             "CPU TOPS | CPU % peak | CPU × _int_mm | CPU × bf16 | CPU × best torch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(r, key):
        return f"{r[key]:.2f}" if key in r else "—"
    for s in result["shapes"]:
        for name, r in s["rows"].items():
            pk = f"{r['pct_peak']:.0f}%" if "pct_peak" in r else "—"
            pkc = f"{r['pct_peak_cpu']:.0f}%" if "pct_peak_cpu" in r else "—"
            lines.append(f"| {s['shape']} | {name} | {r['median_ms']:.1f} [{r['min_ms']:.1f}-{r['max_ms']:.1f}] | "
                         f"{r['TOPS']:.3f} | {pk} | {ratio(r, 'x_int_mm')} | {r['x_bf16']:.2f} | "
                         f"{r['x_best_torch']:.2f} | {r['cpu_median_ms']:.1f} | {r['cpu_TOPS']:.3f} | {pkc} | "
                         f"{ratio(r, 'x_int_mm_cpu')} | {r['x_bf16_cpu']:.2f} | {r['x_best_torch_cpu']:.2f} |")
    lines += ["", "Best torch path per shape: " + ", ".join(f"{s['shape']} {s['best_torch']}" for s in result["shapes"])]
    if not result["int_mm"]:
        lines += ["", "`torch._int_mm` not timed (`--int-mm auto` on a CPU without VNNI: oneDNN has no fast int8 "
                  "kernel there; 2048x4096->1024 took 11.8 s on the AVX2 EPYC, 0.0015 TOPS)."]
    d = result["decode"]
    lines += ["", f"Decode {d['shape']}: pqk W4A4 {d['pqk_ms']:.3f} ms, torch bf16 {d['bf16_ms']:.3f} ms "
              f"= {d['x_bf16']:.2f}× bf16."]
    return "\n".join(lines)


def across_processes(runs: list[dict]) -> dict:
    """Per shape and method, over the processes' results: the median of their medians (ms) with the lowest and
    highest, and each process's own ratio against `_int_mm` (its ms over ours): median, lowest, highest, and how
    many processes reached 1.0; and fastest against fastest (`_int_mm`'s lowest per-process median over ours):
    oneDNN draws its kernel's speed per process, and its fast draw is the strongest anchor."""
    out = {}
    for i, s in enumerate(runs[0]["shapes"]):
        rows = {}
        fastest = (min(run["shapes"][i]["rows"][INT_MM]["median_ms"] for run in runs) if INT_MM in s["rows"]
                   else None)
        for name in s["rows"]:
            ms = [run["shapes"][i]["rows"][name]["median_ms"] for run in runs]
            row = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}
            ratios = [run["shapes"][i]["rows"][name]["x_int_mm"] for run in runs
                      if "x_int_mm" in run["shapes"][i]["rows"][name]]
            if ratios:
                row.update(x_int_mm=statistics.median(ratios), x_int_mm_min=min(ratios), x_int_mm_max=max(ratios),
                           x_int_mm_at_least_1=sum(r >= 1.0 for r in ratios))
            if fastest is not None:
                row["x_fastest_int_mm"] = fastest / row["min_ms"]
            row["x_bf16"] = statistics.median(run["shapes"][i]["rows"][name]["x_bf16"] for run in runs)
            rows[name] = row
        out[s["shape"]] = rows
    return out


def by_side(runs: list[dict]) -> dict | None:
    """The rounds of all processes, put with the VM's fast or slow side by the peak measured right before each
    (the AMX Xeon of docs/PERF.md steps 26-29 runs at two speeds, for minutes at a time, and its slow side slows AMX
    bf16 more than our GEMM): the cut is the geometric mean of the 5th and 95th percentile peaks over all rounds
    of all shapes, where those differ by 1.5x or more (else None: one side). Per shape, side and pqk method: the
    rounds, and the per-round ratios of `_int_mm` and bf16 (their ms over ours in the same round), median [min-max]."""
    peaks = sorted(p for run in runs for s in run["shapes"] for p in (s.get("round_peak_TOPS") or []))
    if not peaks:
        return None
    lo, hi = peaks[len(peaks) // 20], peaks[len(peaks) - 1 - len(peaks) // 20]
    if hi < 1.5 * lo:
        return None
    cut = (lo * hi) ** 0.5
    out = {"cut_TOPS": cut, "shapes": {}}
    for i, s0 in enumerate(runs[0]["shapes"]):
        sides = {"fast": {}, "slow": {}}
        for side, keep in (("fast", lambda p: p >= cut), ("slow", lambda p: p < cut)):
            picked = [(run["shapes"][i]["rows"], r) for run in runs
                      for r, p in enumerate(run["shapes"][i]["round_peak_TOPS"]) if keep(p)]
            if not picked:
                continue
            for name in s0["rows"]:
                if not name.startswith("pqk") or "[" in name:
                    continue
                row = {"rounds": len(picked)}
                for anchor, key in ((INT_MM, "x_int_mm"), ("torch bf16", "x_bf16")):
                    if anchor in s0["rows"]:
                        x = [rows[anchor]["round_ms"][r] / rows[name]["round_ms"][r] for rows, r in picked]
                        row.update({key: statistics.median(x), key + "_min": min(x), key + "_max": max(x)})
                sides[side][name] = row
        out["shapes"][s0["shape"]] = sides
    return out


def markdown_by_side(side: dict | None) -> list[str]:
    if side is None:
        return ["", "By the VM's side: one side only (the rounds' peaks within 1.5x of each other)."]
    lines = ["", f"By the VM's side (rounds whose peak, measured right before them, is above or below "
             f"{side['cut_TOPS']:.2f} TOPS; per-round ratios, median [min-max]):", "",
             "| shape | side | method | rounds | × _int_mm | × bf16 |", "|---|---|---|---|---|---|"]
    for shape, sides in side["shapes"].items():
        for name_side, rows in sides.items():
            for name, r in rows.items():
                cells = [f"{r[k]:.2f} [{r[k + '_min']:.2f}-{r[k + '_max']:.2f}]" if k in r else "—"
                         for k in ("x_int_mm", "x_bf16")]
                lines.append(f"| {shape} | {name_side} | {name} | {r['rounds']} | {cells[0]} | {cells[1]} |")
    return lines


def markdown_across(result: dict) -> str:
    n = len(result["per_process"])
    lines = [f"Across {n} processes, run one after another (each: {result['repeats']} interleaved rounds per shape); "
             f"ms: median of the per-process medians [lowest-highest]; × `_int_mm`: each process's own ratio, "
             f"median [lowest-highest], processes >= 1.0 of {n}; × fastest `_int_mm`: the fastest process against "
             f"`_int_mm`'s fastest (lowest ms over lowest ms).", "",
             "| shape | method | ms | × _int_mm | >= 1.0 | × fastest _int_mm | × bf16 |",
             "|---|---|---|---|---|---|---|"]
    for shape, rows in result["across"].items():
        for name, r in rows.items():
            ratio = (f"{r['x_int_mm']:.3f} [{r['x_int_mm_min']:.3f}-{r['x_int_mm_max']:.3f}]"
                     if "x_int_mm" in r else "—")
            hits = f"{r['x_int_mm_at_least_1']}/{n}" if "x_int_mm" in r else "—"
            fast = f"{r['x_fastest_int_mm']:.3f}" if "x_fastest_int_mm" in r else "—"
            lines.append(f"| {shape} | {name} | {r['median_ms']:.1f} [{r['min_ms']:.1f}-{r['max_ms']:.1f}] | {ratio} | "
                         f"{hits} | {fast} | {r['x_bf16']:.2f} |")
    d = [run["decode"]["x_bf16"] for run in result["per_process"]]
    lines += ["", f"Decode {result['per_process'][0]['decode']['shape']}: pqk W4A4 × bf16 median {statistics.median(d):.2f} "
              f"[{min(d):.2f}-{max(d):.2f}] over the processes."]
    lines += markdown_by_side(result.get("by_side"))
    return "\n".join(lines)


def run_processes(args, argv: list[str]) -> int:
    """--processes P: this script P times as fresh processes, one after another; the aggregate of their JSON."""
    runs = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.processes):
            path = os.path.join(d, f"p{i}.json")
            child = [sys.executable, os.path.abspath(__file__), *argv, "--processes", "1", "--json", path]
            subprocess.run(child, check=True, stdout=subprocess.DEVNULL)
            with open(path) as f:
                runs.append(json.load(f))
            print(f"process {i + 1}/{args.processes} done", flush=True)
    result = {"machine": runs[0]["machine"], "repeats": args.repeats, "across": across_processes(runs),
              "by_side": by_side(runs), "per_process": runs}
    md = markdown_across(result) + "\n\nThe first process:\n\n" + markdown(runs[0])
    print(md)
    write_outputs(args.json, result, md)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="rounds per shape")
    p.add_argument("--peak-seconds", type=float, default=0.3)
    p.add_argument("--shapes", default=None, help="comma-separated MxKxN (default: the four prefill shapes)")
    p.add_argument("--json", default="bench_out/cpu_peak.json")
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test of the script)")
    p.add_argument("--int-mm", choices=("auto", "on", "off"), default="auto",
                   help="time raw torch._int_mm (auto: where the CPU has VNNI; without it oneDNN's int8 GEMM takes "
                        "seconds to minutes per call)")
    p.add_argument("--processes", type=int, default=1,
                   help="run the whole measurement in this many fresh processes, one after another, and report "
                        "the spread across them (oneDNN's speed is drawn per process)")
    args = p.parse_args(argv)
    if args.processes < 1:
        p.error(f"--processes must be >= 1, got {args.processes}")
    if args.processes > 1:   # the children's own --processes 1 / --json come last, so argparse takes them
        return run_processes(args, list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    if not _extension.cpu_available():
        print("the C++ extension is not built")
        return 1
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.quick:
        shapes = [(128, 512, 256), (96, 1030, 200)]
    peaks = measure_peaks(args.peak_seconds)
    peak_isa = next(iter(peaks), None)  # the best ISA this CPU has (ISAS is ordered fastest first)
    gen = torch.Generator().manual_seed(0)
    int_mm = args.int_mm == "on" or (args.int_mm == "auto" and peak_isa in ("amx", "avx512vnni", "avxvnni"))
    result = {"machine": machine_info(), "load_before": [round(v, 2) for v in os.getloadavg()],
              "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "peaks": peaks, "int_mm": int_mm,
              "shapes": []}
    for (m, k, n) in shapes:
        result["shapes"].append(bench_shape(m, k, n, args.repeats, peak_isa, args.peak_seconds, gen, int_mm))
        print(result["shapes"][-1]["shape"], "done", flush=True)
    result["decode"] = bench_decode(args.repeats * 8, gen)
    result["load_after"] = [round(v, 2) for v in os.getloadavg()]
    md = markdown(result)
    print(md)
    write_outputs(args.json, result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
