"""A/B of one compiled decode step built with different inductor options, in one process: each variant is its own
graph of the same static-quantized model (as benchmarks/profile_decode.py builds it), and the variants' steps run
in alternating blocks over the same cache, so a drifting host moves them all alike.

    python benchmarks/step_options_ab.py --model smollm2 --variants 'base={}' 'serial={"cpp.min_chunk_size": 16384}'
    python benchmarks/step_options_ab.py --model smollm2 --float-dtype bf16 --variants 'op={}' \
        'traced={"pqk.decode_layer_op": false}'

A variant is NAME=JSON: inductor options laid over the step's own (compiled_step.CPU_INDUCTOR_OPTIONS); '{}' is the
step as generate() compiles it. One key is the package's, not inductor's: "pqk.decode_layer_op": false traces each
layer instead of calling pqk::decode_layer (compiled_step.DECODE_LAYER_OP, set while that variant compiles and runs:
dynamo guards on it). --float-dtype runs the decoder's float parts in bf16 / fp16 (e2e.py's --q-dtype). Before
timing, every variant's logits are compared with the first's (an option that changes the result says so). Each
block resets the cache's filled length, so every timed step attends to --ctx tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
import profile_decode  # noqa: E402
from common import machine_info, machine_line, summarize, write_outputs  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, sep, opts = text.partition("=")
    try:
        parsed = json.loads(opts) if sep else None
    except json.JSONDecodeError as e:
        raise SystemExit(f"--variants: {text!r}: the options after '=' are not JSON ({e})")
    if not name or not isinstance(parsed, dict):
        raise SystemExit(f"--variants: {text!r} must be NAME=JSON object, e.g. base={{}}")
    return name, parsed


@torch.no_grad()
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=sorted(e2e.CONFIGS) + list(e2e.REAL_MODELS))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--ctx", type=int, default=512, help="tokens in the cache when a timed step runs")
    p.add_argument("--a-bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--lm-head", choices=("float", "int8"), default="int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=10, help="blocks per variant, variants in turn")
    p.add_argument("--steps", type=int, default=30, help="timed steps per block (after 2 untimed ones)")
    p.add_argument("--float-dtype", choices=tuple(e2e.DTYPES), default="fp32",
                   help="the decoder's float parts (norms, RoPE, attention math): e2e.py's --q-dtype")
    p.add_argument("--variants", nargs="+", default=["base={}"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants]
    if len({n for n, _ in variants}) != len(variants):
        raise SystemExit("--variants: the names must differ")
    from prefixquant_kernels.models import compiled_step

    model, extra = profile_decode.build(args, e2e.DTYPES[args.float_dtype])
    steps, layer_op = {}, {}
    for name, opts in variants:
        cfg = compiled_step.compile_config(torch.device("cpu"))
        inductor = {k: v for k, v in opts.items() if k != "pqk.decode_layer_op"}
        layer_op[name] = bool(opts.get("pqk.decode_layer_op", True))
        cfg.options = dict(cfg.options, **inductor)
        steps[name] = model.get_compiled_call(cfg)
    cap = compiled_step.capacity(args.ctx + args.steps + 8)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, args.ctx),
                        generator=torch.Generator().manual_seed(args.seed + 1))
    cache = e2e.make_cache("static", model, extra, max_cache_len=cap)
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = ids[:, -1:]
    filled = [layer.length.clone() for layer in cache.layers]

    def reset():
        for layer, n in zip(cache.layers, filled):
            layer.length.copy_(n)

    def use(name):
        compiled_step.DECODE_LAYER_OP = layer_op[name]

    compile_s, logits = {}, {}
    saved = compiled_step.DECODE_LAYER_OP   # restored however the run ends
    try:
        for name, fn in steps.items():   # the first call of each compiles
            use(name)
            reset()
            t0 = time.perf_counter()
            logits[name] = fn(tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            compile_s[name] = time.perf_counter() - t0
        first = next(iter(logits.values()))
        diff = {name: float((lg - first).abs().max()) for name, lg in logits.items()}
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, fn in steps.items():
                use(name)
                reset()
                for _ in range(2):
                    fn(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    fn(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    times[name].append(time.perf_counter() - t0)
    finally:
        compiled_step.DECODE_LAYER_OP = saved
    stats = {name: summarize(ts) for name, ts in times.items()}
    base = stats[variants[0][0]]["median_ms"]
    lines = [f"{machine_line(machine_info('cpu'))}; {args.model}, static W4A{args.a_bits}KV4 + prefix, lm_head "
             f"{args.lm_head}, float parts {args.float_dtype}, ctx {args.ctx}; {args.rounds} blocks x {args.steps} "
             f"steps per variant, in turn", "",
             "| variant | inductor options | step median ms | q1-q3 ms | min ms | x first | max abs logit diff | "
             "compile s |", "|---|---|---|---|---|---|---|---|"]
    for name, opts in variants:
        s = stats[name]
        lines.append(f"| {name} | `{json.dumps(opts)}` | {s['median_ms']:.2f} | {s['q1_ms']:.2f}-{s['q3_ms']:.2f} | "
                     f"{s['min_ms']:.2f} | {base / s['median_ms']:.3f} | {diff[name]:.3g} | {compile_s[name]:.1f} |")
    md = "\n".join(lines)
    print(md)
    rec = {"args": vars(args), "variants": {n: {"options": o, "step": stats[n], "logit_diff": diff[n],
                                                "compile_seconds": compile_s[n]} for n, o in variants}}
    if args.json:
        write_outputs(args.json, [rec], md)
    return rec


if __name__ == "__main__":
    main()
