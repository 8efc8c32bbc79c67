"""KV-cache memory per mode (measured from the tensors each PrefixQuantCache holds) and the CPU time of the
reference dequant-concat. Speed of the Triton kernels is not measured here: on CPU they only run in the
interpreter, which says nothing about GPU speed.

    python benchmarks/kv_cache.py [--tokens 1024] [--heads 8] [--head-dim 128] [--batch 1]

Prints a markdown table: bytes per token per layer (K and V, all KV heads; prefix excluded, it is a fixed
cost), the ratio to fp16, and the median / spread of 5 timed dequant-concats after a warm-up.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers

import prefixquant_kernels as pqk


def _modes(h: int, n_tokens: int):
    return {
        "fp16": {},
        "prefixquant (4-bit static)": dict(mode="prefixquant", key_scales=[torch.full((h,), 0.1)],
                                            value_scales=[torch.full((h,), 0.1)]),
        "kivi (2-bit, G=32, R=128)": dict(mode="kivi", group_size=32, residual_length=128),
        "logquant (2-bit, G=32, W=128)": dict(mode="logquant", group_size=32, window=128),
    }


def _time(fn, repeats: int = 5) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), max(ts) - min(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefix", type=int, default=4)
    a = ap.parse_args()
    torch.manual_seed(0)
    shape = (a.batch, a.heads, a.tokens, a.head_dim)
    k, v = torch.randn(shape).half(), torch.randn(shape).half()
    pk = torch.randn(1, a.heads, a.prefix, a.head_dim).half()
    pv = torch.randn_like(pk)
    print(f"context {a.tokens} tokens + {a.prefix} prefix, batch {a.batch}, {a.heads} KV heads x D={a.head_dim}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} threads\n")
    print("| mode | bytes/token/layer | vs fp16 | held (KiB, 1 layer) | dequant-concat ref ms (median, spread) |")
    print("|---|---|---|---|---|")
    base = None
    for name, kw in _modes(a.heads, a.tokens).items():
        kw = dict(kw)
        mode = kw.pop("mode", "fp16")
        cache = pqk.PrefixQuantCache(1, mode, prefix_keys=[pk], prefix_values=[pv], backend="reference", **kw)
        # fill as a decode would: the prompt, then 16 single tokens (so windows have slid)
        n0 = a.tokens - 16
        cache.update(k[:, :, :n0], v[:, :, :n0], 0)
        for t in range(n0, a.tokens):
            cache.update(k[:, :, t:t + 1], v[:, :, t:t + 1], 0)
        bpt = cache.bytes_per_token_per_layer()
        base = base or bpt
        layer = cache.layers[0]
        med, spread = _time(lambda: layer.keys_values(torch.float16))
        print(f"| {name} | {bpt:.1f} | {bpt / base:.3f} | {cache.memory_bytes()['total'] / 1024:.1f} | "
              f"{med:.2f} ({spread:.2f}) |")


if __name__ == "__main__":
    main()
