"""The `layer-demo` command: PrefixQuant's idea on one Llama-3-8B-shaped layer, with random weights (the `demo`
command, model_demo.py, runs it when SmolLM2 is not installed).

A down_proj (14336 -> 4096) receives activations in which the first token is a massive outlier (as the
[BOS] token is in real models: ~2000x the median). We compare
  - fp:                   the float layer (torch, bf16 and fp32);
  - dynamic per-token:    W4A8 with a per-token scale (QuaRot-style baseline: a reduction pass per token);
  - static, no prefix:    W4A8 with one per-tensor scale calibrated on all tokens — the outlier token
                          stretches the scale and every normal token loses its precision;
  - static + prefix:      the outlier token is kept in 16-bit (in the KV-cache prefix), the static scale is
                          calibrated on the remaining tokens — as accurate as per-token, with no reduction.
and print the error (SQNR vs fp32, higher is better) and the measured speed on this machine.
"""
from __future__ import annotations

import platform
import statistics
import sys
import time

import torch

from . import format as fmt
from .nn import QuantLinear


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), (max(ts) - min(ts))


def _sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref, y = ref.double(), y.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum().clamp_min(1e-30)))


def make_activations(tokens: int, k: int, outlier_ratio: float, gen: torch.Generator) -> torch.Tensor:
    """SiLU(gate)*up-like activations [tokens, k]; token 0 is an outlier token (|x| ~ outlier_ratio x
    the median token's max) on a few channels, the way [BOS] looks at a down_proj input."""
    x = torch.randn(tokens, k, generator=gen) * torch.rand(k, generator=gen).add(0.5)
    x[0, : k // 512 + 1] = outlier_ratio * x[1:].abs().amax(1).median()
    return x


def run(tokens: int = 128, in_features: int = 14336, out_features: int = 4096, repeats: int = 5,
        threads: int | None = None, seed: int = 0) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=gen) / in_features**0.5)
    x = make_activations(tokens, in_features, 2000.0, gen)
    xb = x.bfloat16()
    ref = lin(x).detach()
    normal = slice(1, None)  # everything but the outlier (prefix) token

    a_bits, qmax = 8, fmt.qmax(8)
    scale_all = float(x.abs().max()) / qmax             # static, calibrated with the outlier token
    scale_prefix = float(x[normal].abs().max()) / qmax  # static, the outlier token lives in the prefix
    mods = {
        "dynamic per-token W4A8": QuantLinear.from_float(lin, 4, a_bits, act_scale=None),
        "static W4A8, no prefix": QuantLinear.from_float(lin, 4, a_bits, act_scale=scale_all),
        "static W4A8 + prefix": QuantLinear.from_float(lin, 4, a_bits, act_scale=scale_prefix),
    }
    rows = []
    wb = lin.weight.detach().bfloat16()
    wf = lin.weight.detach()
    with torch.no_grad():
        t, spread = _median_ms(lambda: xb @ wb.T, repeats)
        rows.append({"method": "fp bf16 (torch)", "sqnr_db": _sqnr_db(ref[normal], (xb @ wb.T)[normal]), "ms": t,
                     "spread_ms": spread})
        t, spread = _median_ms(lambda: x @ wf.T, repeats)
        rows.append({"method": "fp fp32 (torch)", "sqnr_db": float("inf"), "ms": t, "spread_ms": spread})
        for name, mod in mods.items():
            y = mod(xb)
            t, spread = _median_ms(lambda: mod(xb), repeats)
            rows.append({"method": name, "sqnr_db": _sqnr_db(ref[normal], y[normal]), "ms": t, "spread_ms": spread})
    return rows


def main(argv: list[str] | None = None) -> int:
    from .cli import Parser, positive_int

    p = Parser(prog="prefixquant-kernels layer-demo", description=__doc__)
    p.add_argument("--tokens", type=positive_int, default=128, help="tokens through the layer (token 0 the outlier)")
    p.add_argument("--in-features", type=positive_int, default=14336, help="the layer's input width (K)")
    p.add_argument("--out-features", type=positive_int, default=4096, help="the layer's output width (N)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per method (the median is printed)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    args = p.parse_args(argv)
    from . import _extension

    print(f"prefixquant_kernels demo: one Llama-3-8B down_proj ({args.in_features} -> {args.out_features}), "
          f"{args.tokens} tokens, token 0 an outlier (2000x)")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads() if not args.threads else args.threads}, C++ kernels: "
          f"{_extension._C.best_cpu_isa() if _extension.cpu_available() else 'not built (reference path)'}")
    rows = run(args.tokens, args.in_features, args.out_features, args.repeats, args.threads)
    base = next(r["ms"] for r in rows if r["method"] == "fp bf16 (torch)")
    print(f"\n{'method':28s} {'SQNR vs fp32 (dB, normal tokens)':>32s} {'median ms':>10s} {'spread':>8s} {'vs bf16':>8s}")
    for r in rows:
        print(f"{r['method']:28s} {r['sqnr_db']:32.1f} {r['ms']:10.2f} {r['spread_ms']:8.2f} {base / r['ms']:7.2f}x")
    print("\nMeasured on this machine (CPU). Static + prefix keeps per-token accuracy without a per-token pass.")
    return 0


if __name__ == "__main__":
    from .__main__ import run

    raise SystemExit(run("layer-demo", main, sys.argv[1:]))
