"""The CPU prefill attention over [prefix | prompt]: pqk::prefix_causal_attention (csrc/cpu/attention.cpp) against
torch's SDPA as models/prefix_attention.py runs it without the C++ loop (causal, placeholder queries, GQA), both
timed interleaved in one process, per shape and dtype; median, spread and the ratio. For bf16 also the C++ loop with
its fp32 blocks on widened inputs (PQK_ATTN_BF16_DOT=0) beside its vdpbf16ps blocks (on a CPU with AVX512-BF16; the
two rows are the same code path elsewhere).

    python benchmarks/prefill_attention.py --threads 2 --repeats 15 --json bench_out/prefill_attention.json

A shape is B x H_q x H_kv x T x P x D; the defaults are SmolLM2-135M at 512 tokens and a Llama-3-8B layer at 2048.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fmt_spread, machine_info, machine_line, timeit_interleaved, write_outputs  # noqa: E402

from prefixquant_kernels.models import prefix_attention  # noqa: E402

DEFAULT_SHAPES = ["1x9x3x512x1x64", "1x32x8x2048x1x128"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP32_BLOCKS = "pqk C++, fp32 blocks"


def _dot(on: bool, fn):
    """fn with attention.cpp's bf16 blocks switched on or off (read per call)."""
    def run():
        os.environ["PQK_ATTN_BF16_DOT"] = "1" if on else "0"
        return fn()
    return run


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in text.split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 6 or min(dims) < 0 or min(dims[:4] + dims[5:]) < 1 or dims[1] % dims[2]:
        raise SystemExit(f"--shapes: {text!r} must be BxHqxHkvxTxPxD (positive, P >= 0, Hq a multiple of Hkv)")
    return dims


@torch.no_grad()
def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxHqxHkvxTxPxD")
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default="bench_out/prefill_attention.json")
    args = ap.parse_args(argv)
    shapes = [parse_shape(s) for s in args.shapes]
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows, lines = [], []
    for (b, hq, hkv, t, p, d) in shapes:
        for name in args.dtypes:
            dt = DTYPES[name]
            q = torch.randn(b, hq, t, d, generator=g).to(dt)
            k, v = (torch.randn(b, hkv, p + t, d, generator=g).to(dt) for _ in range(2))
            scale = d ** -0.5
            ours_fn = lambda: torch.ops.pqk.prefix_causal_attention(q, k, v, p, scale)  # noqa: E731
            fns = {"pqk C++": _dot(True, ours_fn),
                   "torch SDPA": lambda: prefix_attention.sdpa_prefix_causal(q, k, v, p, scale)}
            if dt == torch.bfloat16:
                fns[FP32_BLOCKS] = _dot(False, ours_fn)
            err = float((fns["pqk C++"]().float() - fns["torch SDPA"]().float()).abs().max())
            res = timeit_interleaved(fns, args.repeats)
            ratio = res["torch SDPA"]["median_ms"] / res["pqk C++"]["median_ms"]
            rows.append({"shape": [b, hq, hkv, t, p, d], "dtype": name, "max_abs_diff": err, "x_sdpa": ratio,
                         **{k2: r for k2, r in res.items()}})
            ours, sdpa, f32b = res["pqk C++"], res["torch SDPA"], res.get(FP32_BLOCKS)
            f32 = f"{f32b['median_ms']:.2f} [{fmt_spread(f32b)}]" if f32b else "-"
            lines.append(f"| {b}x{hq}x{hkv}x{t}x{p}x{d} | {name} | {ours['median_ms']:.2f} [{fmt_spread(ours)}] | "
                         f"{f32} | {sdpa['median_ms']:.2f} [{fmt_spread(sdpa)}] | {ratio:.2f} | {err:.2g} |")
    md = "\n".join([f"{machine_line(machine_info('cpu'))}; {args.repeats} interleaved rounds", "",
                    "| B x Hq x Hkv x T x P x D | dtype | pqk C++ ms | pqk C++, fp32 blocks ms | torch SDPA ms | x SDPA | "
                    "max abs diff |", "|---|---|---|---|---|---|---|", *lines])
    print(md)
    write_outputs(args.json, rows, md)
    return rows


if __name__ == "__main__":
    main()
