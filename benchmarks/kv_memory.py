"""KV-cache memory per registered mode (measured from the tensors each PrefixQuantCache holds) and the CPU time of the
reference dequant-concat. Speed of the Triton kernels is not measured on CPU: there they only run in the
interpreter, which says nothing about GPU speed.

Second table: one decode step's attention over a --attn-tokens KV4 cache (mode "static" layout, GQA 4:1):
dequant-concat of K and V + torch SDPA, with every dequant-concat backend that runs on this device (CPU: the C++
kernel and the reference); on CUDA also the fused Triton decode attention (reads the packed body, never builds
the 16-bit copy). The fused-vs-unfused comparison needs a GPU: on CPU only the unfused rows are timed.

    python benchmarks/kv_memory.py [--tokens 1024] [--heads 8] [--head-dim 128] [--batch 1] [--attn-tokens 2048]

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
        "static (PrefixQuant, 4-bit)": dict(mode="static", key_scales=[torch.full((h,), 0.1)],
                                            value_scales=[torch.full((h,), 0.1)]),
        "dynamic (4-bit per token)": dict(mode="dynamic", bits=4),
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


def attention_table(a) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    b, hkv, hq, d, t, p = a.batch, a.heads, 4 * a.heads, a.head_dim, a.attn_tokens, a.prefix
    g = torch.Generator().manual_seed(1)
    s = (torch.rand(hkv, generator=g) + 0.05).to(dev)
    body_k = pqk.kv_quantize(torch.randn(b, hkv, t, d, generator=g).half().to(dev), s, 4, backend="reference")
    body_v = pqk.kv_quantize(torch.randn(b, hkv, t, d, generator=g).half().to(dev), s, 4, backend="reference")
    pk = torch.randn(1, hkv, p, d, generator=g).half().to(dev)
    q = torch.randn(b, hq, d, generator=g).half().to(dev)

    def unfused(backend):
        def run():
            k = pqk.kv_dequant_concat(pk, body_k, s, 4, torch.float16, backend=backend)
            v = pqk.kv_dequant_concat(pk, body_v, s, 4, torch.float16, backend=backend)
            return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
        return run

    backends = ["cpu", "reference"] if dev == "cpu" else ["triton", "reference"]
    rows = {f"dequant-concat ({be}) + torch SDPA": unfused(be) for be in backends}
    # the two halves apart: on CPU torch's fp16 SDPA dominates (fp16 math has no fast CPU path)
    k16 = pqk.kv_dequant_concat(pk, body_k, s, 4, torch.float16, backend="reference")
    rows[f"  of which: dequant-concat K and V ({backends[0]})"] = lambda: (
        pqk.kv_dequant_concat(pk, body_k, s, 4, torch.float16, backend=backends[0]),
        pqk.kv_dequant_concat(pk, body_v, s, 4, torch.float16, backend=backends[0]))
    rows["  of which: torch SDPA (fp16 K/V given)"] = lambda: torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k16, k16, enable_gqa=True)
    if dev == "cuda":
        rows["fused kv_decode_attention (triton)"] = lambda: pqk.kv_decode_attention(
            q, pk, pk, body_k, body_v, s, s, 4, backend="triton")
    print(f"\ndecode attention over a {t}-token KV4 cache + {p} prefix, batch {b}, {hq} query / {hkv} KV heads, "
          f"D={d}, on {dev} ({a.repeats} runs after a warm-up)\n")
    print("| path | ms median | min | max |")
    print("|---|---|---|---|")
    for name, fn in rows.items():
        med, lo, hi = _time_range(fn, a.repeats, sync=dev == "cuda")
        print(f"| {name} | {med:.3f} | {lo:.3f} | {hi:.3f} |")
    if dev == "cpu":
        print("\nThe fused Triton path runs on CPU only in the interpreter (not timed): its speed against "
              "dequant-concat + SDPA needs a GPU run of this script.")


def _time_range(fn, repeats: int, sync: bool) -> tuple[float, float, float]:
    fn()
    ts = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), min(ts), max(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefix", type=int, default=4)
    ap.add_argument("--attn-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=20)
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
    attention_table(a)


if __name__ == "__main__":
    main()
