"""Where a compiled decode step's time goes: torch.profiler over N steps of a static-quantized model (the compiled
step generate() runs), self CPU time per step grouped by what runs it.

    python benchmarks/profile_decode.py --model smollm2 --ctx 512 --steps 20 --json out.json

The model is built as benchmarks/e2e.py builds its static method (quick calibration, W4A4KV4 or --a-bits 8, +
prefix, lm_head W8A8 unless --lm-head float). Groups (by profiler event name): the pqk custom ops one by one,
inductor's fused C++ kernels and Python wrapper (the compiled graph's own self time), dynamo's guards, and the
rest. The step's wall time is timed apart, without the profiler (its median and spread over --steps steps).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402
from common import machine_info, machine_line, summarize, write_outputs  # noqa: E402

GROUPS = (   # (label, predicate on the event name), first match wins
    ("pqk::quant_linear", lambda n: n.startswith("pqk::quant_linear")),
    ("pqk::decode_layer (a whole layer)", lambda n: n.startswith("pqk::decode_layer")),
    ("pqk::kv_decode (attention)", lambda n: n.startswith("pqk::kv_decode")),
    ("pqk::kv_quantize / cache write", lambda n: n.startswith("pqk::kv_quantize") or "index_copy" in n
     or "index_put" in n),
    ("other pqk:: ops", lambda n: n.startswith("pqk::")),
    ("dynamo guards", lambda n: "Cache Lookup" in n or "guard" in n.lower()),
    ("compiled graph (inductor wrapper + fused kernels)", lambda n: "CompiledFxGraph" in n
     or "Compiled Function" in n or "CompiledFunction" in n),
    ("aten:: ops outside the graph's kernels", lambda n: n.startswith("aten::")),
)


def group_of(name: str) -> str:
    for label, pred in GROUPS:
        if pred(name):
            return label
    return "other (Python, dispatcher)"


COMPILE_PHASES = (   # (label, dynamo_timed names whose seconds add up to it); nested phases are listed apart
    ("whole compile (dynamo's compile_inner)", ("_compile.compile_inner",)),
    ("  the backend (AOT autograd + inductor)", ("OutputGraph.call_user_compiler",)),
    ("    inductor: lowering to its IR", ("GraphLowering.run",)),
    ("    inductor: kernel + wrapper codegen", ("Scheduler.codegen", "PythonWrapperCodegen.generate")),
    ("    inductor: C++ kernels compiled (g++, summed over workers)", ("compile_file",)),
    ("    inductor: wrapper module loaded (waits on the kernels)", ("PyCodeCache.load_by_key_path",)),
)


def compile_phases(before: dict) -> dict:
    """Seconds per COMPILE_PHASES label spent since ``before`` (a copy of dynamo's compilation_time_metrics), plus
    "dynamo tracing" = the whole compile minus the backend (bytecode -> FX graph, guards)."""
    from torch._dynamo.utils import compilation_time_metrics as now
    spent = {k: sum(v) - sum(before.get(k, [])) for k, v in now.items()}
    out = {label: sum(spent.get(n, 0.0) for n in names) for label, names in COMPILE_PHASES}
    out["  dynamo tracing (bytecode -> FX graph, guards)"] = (out[COMPILE_PHASES[0][0]]
                                                           - out[COMPILE_PHASES[1][0]])
    return out


def build(args, float_dtype: torch.dtype = torch.float32):
    """The static-quantized model (float parts in float_dtype, as e2e.py's --q-dtype) and its cache ingredients."""
    torch.set_num_threads(args.threads)
    model, bos = e2e.build_float_model(args.model, args.layers, torch.float32, "cpu", args.seed)
    e2e.set_compute_dtype(model, float_dtype)
    extra = e2e.quantize_for_benchmark(model, "static", prefix_ids=[int(bos)], calib_tokens=64, seed=args.seed,
                                       a_bits=args.a_bits)
    if args.lm_head == "int8":
        from prefixquant_kernels.models.lm_head import quantize_lm_head
        quantize_lm_head(model)
    return model, extra


@torch.no_grad()
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=sorted(e2e.CONFIGS) + list(e2e.REAL_MODELS))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--ctx", type=int, default=512, help="tokens in the cache when the steps run")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--a-bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--lm-head", choices=("float", "int8"), default="int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--keep-model-guards", action="store_true",
                   help="A/B: dynamo keeps its guards on the model (compiled_step.step_guard_filter off)")
    p.add_argument("--no-graph-pass", action="store_true",
                   help="A/B: no quant_linear_multi grouping (models/graph_passes.py off)")
    p.add_argument("--no-decode-layer-op", action="store_true",
                   help="A/B: each layer traced, not one pqk::decode_layer call (models/decode_layer.py off)")
    p.add_argument("--no-layer-regions", action="store_true",
                   help="A/B: trace all layers into the step's graph (models/layer_region.py off)")
    p.add_argument("--fresh-compile-cache", action="store_true",
                   help="compile with an empty inductor cache (a temporary TORCHINDUCTOR_CACHE_DIR): a first "
                        "compile on a new machine, not one that reuses kernels an earlier run left")
    args = p.parse_args(argv)
    from prefixquant_kernels.models import compiled_step
    saved = (compiled_step.step_guard_filter, compiled_step.CPU_INDUCTOR_OPTIONS, compiled_step.LAYER_REGIONS,
             compiled_step.DECODE_LAYER_OP)
    compiled_step.LAYER_REGIONS = not args.no_layer_regions
    compiled_step.DECODE_LAYER_OP = not args.no_decode_layer_op
    if args.keep_model_guards:
        compiled_step.step_guard_filter = lambda entries: [True] * len(entries)
    if args.no_graph_pass:
        compiled_step.CPU_INDUCTOR_OPTIONS = {k: v for k, v in compiled_step.CPU_INDUCTOR_OPTIONS.items()
                                              if k != "post_grad_custom_post_pass"}
    saved_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    tmp = tempfile.TemporaryDirectory(prefix="pqk_inductor_") if args.fresh_compile_cache else None
    if tmp is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp.name    # read by inductor at each cache lookup
    try:
        return _run(args, compiled_step)
    finally:
        (compiled_step.step_guard_filter, compiled_step.CPU_INDUCTOR_OPTIONS, compiled_step.LAYER_REGIONS,
         compiled_step.DECODE_LAYER_OP) = saved
        if tmp is not None:
            if saved_dir is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved_dir
            tmp.cleanup()


def _run(args, compiled_step) -> dict:
    model, extra = build(args)
    step_fn = model.get_compiled_call(compiled_step.compile_config(torch.device("cpu")))
    cap = compiled_step.capacity(args.ctx + 2 * args.steps + 4)
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, vocab, (1, args.ctx), generator=gen)
    cache = e2e.make_cache("static", model, extra, max_cache_len=cap)
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = ids[:, -1:]
    from torch._dynamo.utils import compilation_time_metrics
    before = {k: list(v) for k, v in compilation_time_metrics.items()}
    t0 = time.perf_counter()
    step_fn(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)   # compiles
    compile_s = time.perf_counter() - t0
    phases = compile_phases(before)
    for _ in range(2):
        step_fn(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
    walls = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step_fn(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
        walls.append(time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step_fn(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
    per = collections.defaultdict(float)
    calls = collections.Counter()
    for ev in prof.key_averages():
        g = group_of(ev.key)
        per[g] += ev.self_cpu_time_total / args.steps / 1e3          # ms per step
        calls[g] += ev.count / args.steps
    wall = summarize(walls)
    rows = sorted(per.items(), key=lambda kv: -kv[1])
    lines = [f"{machine_line(machine_info('cpu'))}; {args.model}, static W4A{args.a_bits}KV4 + prefix, "
             f"lm_head {args.lm_head}, ctx {args.ctx}, {args.steps} steps"
             + (", model guards kept" if args.keep_model_guards else "")
             + (", no graph pass" if args.no_graph_pass else "")
             + (", no layer regions" if args.no_layer_regions else "")
             + (", no decode_layer op" if args.no_decode_layer_op else ""),
             f"compile {compile_s:.1f} s ({'empty' if args.fresh_compile_cache else 'existing'} inductor cache); "
             f"step wall (no profiler) median {wall['median_ms']:.2f} ms "
             f"[{wall['min_ms']:.2f}, {wall['max_ms']:.2f}]", "",
             "| where | ms / step (self, profiled) | calls / step |", "|---|---|---|"]
    lines += [f"| {g} | {ms:.2f} | {calls[g]:.0f} |" for g, ms in rows]
    lines.append(f"| **total profiled** | **{sum(per.values()):.2f}** | |")
    lines += ["", "the compile (dynamo's own timers; nested rows are parts of the row above):",
              "| phase | s |", "|---|---|"]
    lines += [f"| {label.replace('  ', '&nbsp;&nbsp;')} | {sec:.1f} |" for label, sec in phases.items()]
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    lines += ["", "top events:", "| event | ms / step | calls / step |", "|---|---|---|"]
    lines += [f"| `{e.key[:70]}` | {e.self_cpu_time_total / args.steps / 1e3:.3f} | {e.count / args.steps:.0f} |"
              for e in top]
    md = "\n".join(lines)
    print(md)
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    rec = {"args": vars(args), "compile_seconds": compile_s, "compile_phases_s": phases,
           "inductor_cache_dir": cache_dir(), "step_wall": wall, "groups_ms": dict(per),
           "group_calls": dict(calls)}
    if args.json:
        write_outputs(args.json, [rec], md)
    return rec


if __name__ == "__main__":
    main()
