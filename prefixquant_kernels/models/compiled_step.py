"""The compiled decode step: how ``model.generate()`` of a pqk-quantized model runs its one-token steps as one
``torch.compile(fullgraph=True)`` graph, through transformers' own machinery rather than beside it.

transformers compiles the decode step when the cache ``is_compileable`` (``GenerationMixin.
_valid_auto_compile_criteria``; on a CPU only with ``compile_config._compile_all_devices``) and runs the prefill
eagerly. So the patched generate (models/patch.py) asks ``plan`` whether this call can take that path and, if so,
builds the preallocated cache (``PrefixQuantCache(max_cache_len=...)``, modes/static.py: every tensor of a step
at a fixed address and shape, the filled length a device tensor) and passes ``compile_config`` below. In the
traced step the pqk:: custom ops (QuantLinear's GEMM, kv_quantize, kv_decode_attention) are single nodes (their
fakes are in ops/library.py) and inductor fuses the glue (RMSNorm, RoPE, residuals, the Q/K rotation's matmul
operands, the mask). On CUDA inductor replays the same step as a CUDA graph (``triton.cudagraphs``).

Each decoder layer of the step is one ``torch.compiler.nested_compile_region`` (models/layer_region.py): dynamo
traces one layer and reuses its graph for the others, so the cold compile walks one layer's nodes, not all of them.

The capacity is rounded up to ``CAPACITY_STEP`` tokens, so generate calls of similar lengths share one graph
(``dynamic=False``: one graph per batch size and capacity). ``timed_compiled_call`` logs the one-time compile.

The model's weights, scales and norms are graph inputs (dynamo inlines nn.Modules; torch 2.13 has no switch to
make them graph attributes: ``inline_inbuilt_nn_modules`` is deprecated and does nothing). Dynamo would guard each
of them (and every module's flags and hook dicts) before every step; ``step_guard_filter`` keeps the guards on the
step's inputs and cache and replaces those on the model by one number, ``model._pqk_graph_key`` (``refresh_graph_key``).
"""
from __future__ import annotations

import logging
import time

import torch

from . import graph_passes

logger = logging.getLogger("prefixquant_kernels")

CAPACITY_STEP = 256   # tokens: the preallocated body is a multiple of this (fewer distinct shapes, fewer compiles)


def plan(model, state, ids: torch.Tensor, kwargs: dict) -> int | None:
    """The body capacity (tokens after the prefix) of a compiled generate call with ids [B, P + T] (prefix
    included), or None when this call runs eagerly: a KV mode without a preallocated form, an attention the pqk
    attention cannot wrap (flash / flex) or a sliding window, beam search or assisted decoding, compile disabled
    in the generation config, or no known length budget."""
    from . import attention
    cfg = kwargs.get("generation_config") or model.generation_config
    if not state.can_preallocate or not attention.has_twin(model):
        return None
    if getattr(model.config, "sliding_window", None) is not None and getattr(model.config, "use_sliding_window",
                                                                             True):
        return None
    if kwargs.get("num_beams", cfg.num_beams or 1) != 1 or kwargs.get("assistant_model") is not None:
        return None
    if kwargs.get("disable_compile", cfg.disable_compile):
        return None
    new = kwargs.get("max_new_tokens", cfg.max_new_tokens)
    if new is None:
        max_len = kwargs.get("max_length", cfg.max_length)
        if max_len is None:
            return None
        new = max_len - ids.shape[1]
    return capacity(ids.shape[1] - state.prefix_len + max(int(new), 1))


def capacity(tokens: int) -> int:
    """The preallocated body for ``tokens`` tokens after the prefix: rounded up to a multiple of CAPACITY_STEP."""
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


# Inductor options of the CPU step. Its Python wrapper checks the size and stride of every graph input and of every
# custom op's output before use (~900 ``assert_size_stride`` calls per SmolLM2 step): dynamo's guards already
# check the inputs, and the pqk ops' outputs have their fakes' shapes (tests/ops/test_library.py), so the wrapper's
# asserts are dropped. Measured on SmolLM2, AVX2, the wrapper's self time per step (torch.profiler, separate
# processes, 2 rounds each): 7.9-8.3 -> 5.7-7.3 ms (docs/PERF.md, "Compiled decode step", change 7).
# The post-grad pass (models/graph_passes.py) turns the quant_linear nodes of one input into one
# quant_linear_multi node (change 9 there).
CPU_INDUCTOR_OPTIONS = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False,
                        "post_grad_custom_post_pass": graph_passes.SharedInputLinears()}


def compile_config(device: torch.device):
    """transformers' CompileConfig for the step: fullgraph, static shapes, step_guard_filter; CUDA graphs on CUDA
    (``triton.cudagraphs``: what mode "reduce-overhead" sets), elsewhere inductor's default mode with
    CPU_INDUCTOR_OPTIONS. Options only, never a mode: torch.compile refuses a mode and options together, and the
    guard filter is an option. ``_compile_all_devices`` so a CPU model compiles too."""
    from transformers import CompileConfig
    if torch.device(device).type == "cuda":
        cfg = CompileConfig(fullgraph=True, dynamic=False, backend="inductor", mode=None,
                            options={"triton.cudagraphs": True, "guard_filter_fn": step_guard_filter})
    else:
        cfg = CompileConfig(fullgraph=True, dynamic=False, backend="inductor", mode=None,
                            options=dict(CPU_INDUCTOR_OPTIONS, guard_filter_fn=step_guard_filter))
    cfg._compile_all_devices = True
    return cfg


# ---- guards ------------------------------------------------------------------------------------------------------
# Before every step dynamo checks the guards of the graph. For SmolLM2 they are ~7000, most on the model: each
# weight, scale and norm (dtype, shape, strides, aliasing, five attribute lookups), each module's hook dicts, flags
# and config values: 1.84 of a 10.8 ms step (AVX2, profiled; docs/PERF.md, "Compiled decode step", change 8). The
# model does not change between the steps of a generate call, so the step keeps dynamo's guards on its inputs (ids,
# mask, positions, the cache's tensors and flags, globals) and drops those on the model (sources under ``self``),
# all but one: the value of ``model._pqk_graph_key``, which the traced forward reads (``check_graph_key``).
# Without that guard (a model compiled without the patched get_compiled_call) the filter keeps every guard.
# ``refresh_graph_key`` renews that number, once per generate call (get_compiled_call), whenever the model's
# signature changed: its modules (name, type, training flag, hook counts, int / float / str / bool attributes), their
# tensors (dtype, shape, strides, device, requires_grad) and its config's plain values. A changed model therefore
# compiles a new graph, as it would with dynamo's own guards; a model changed between the steps of one generate call
# (nothing in transformers does) would not be noticed.

def model_signature(model) -> tuple:
    """What the compiled step assumes of ``model`` beyond its inputs (see the comment above); a tuple to compare."""
    plain = (int, float, str, bool, type(None))
    sig = [tuple((k, v) for k, v in vars(model.config).items() if isinstance(v, plain))]
    for name, m in model.named_modules():
        attrs = tuple((k, v) for k, v in vars(m).items() if isinstance(v, plain) and k != "_pqk_graph_key")
        sig.append((name, type(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks), attrs))
        for group in (m._parameters, m._buffers):
            for k, t in group.items():
                sig.append((k, None) if t is None else
                           (k, t.dtype, tuple(t.shape), t.stride(), t.device, t.requires_grad))
    return tuple(sig)


_NEXT_KEY = iter(range(1, 1 << 62))


def refresh_graph_key(model) -> int:
    """Give ``model`` a new ``_pqk_graph_key`` if its signature changed since the last call (the first call always
    does): graphs compiled for the model as it was no longer match. Returns the key."""
    sig = model_signature(model)
    old = getattr(model, "_pqk_graph_signature", None)
    if old != sig:
        if old is not None:
            logger.warning("pqk: the model changed since its decode step was compiled (a module, a tensor's dtype, "
                           "shape, strides or device, a hook or a setting): the step compiles again")
        object.__setattr__(model, "_pqk_graph_signature", sig)
        object.__setattr__(model, "_pqk_graph_key", next(_NEXT_KEY))
    return model._pqk_graph_key


def check_graph_key(model) -> None:
    """Read in the traced forward: comparing ``model._pqk_graph_key`` makes dynamo guard its value (the one guard
    on the model that step_guard_filter keeps)."""
    key = getattr(model, "_pqk_graph_key", None)
    if key is not None and key < 0:
        raise RuntimeError(f"pqk: invalid _pqk_graph_key {key}")


def step_guard_filter(entries) -> list[bool]:
    """torch.compile's ``guard_filter_fn``: keep a guard unless its source is the model (``self...``), but keep the
    guard on ``self._pqk_graph_key``; keep them all where that guard is missing."""
    if not any(e.name == KEY_SOURCE for e in entries):
        return [True] * len(entries)
    return [not e.name.startswith("self.") or e.name == KEY_SOURCE for e in entries]


KEY_SOURCE = "self._pqk_graph_key"   # the key's name in dynamo's guard entries (the step's frame calls the model self)


LAYER_REGIONS = True   # trace one decoder layer and reuse its graph for all (models/layer_region.py); False: A/B

DECODE_LAYER_OP = True   # on the CPU, a supported layer is one pqk::decode_layer call (models/decode_layer.py)

RECOMPILE_LIMIT = 64   # dynamo's per-code-object limit (8 by default) is shared by every model of a process


def timed_compiled_call(orig):
    """Wrap ``get_compiled_call``: the compiled callable it returns logs how long its first call (the compile)
    took, once per compiled callable. The step's code object (the model's forward) is shared by every model of
    the process, and each model, batch size and capacity is one more graph of it: the recompile limit is raised
    to RECOMPILE_LIMIT, and past it the step runs eagerly (one warning) instead of failing the generate call
    (fullgraph makes dynamo raise, before the step ran: nothing was half-done)."""
    def get_compiled_call(self, compile_config):
        import torch._dynamo
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        from . import attention
        if getattr(self, "pqk_state", None) is not None and attention.has_twin(self):
            attention.use_rotated_attention(self)   # the step's forward switches to the twin anyway (patch.py)
        if LAYER_REGIONS:
            from . import layer_region
            layer_region.install(self)
        refresh_graph_key(self)
        fn = orig(self, compile_config)
        held = getattr(self, "_pqk_timed_call", None)
        if held is not None and held[0] is fn:
            return held[1]

        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                logger.warning("pqk: torch.compile's recompile limit (%d graphs of the model's forward in this "
                               "process) is reached: this decode step runs eagerly",
                               torch._dynamo.config.recompile_limit)
                return self.__call__(*args, **kwargs)

        def call(*args, **kwargs):
            if call.first:
                call.first = False
                t0 = time.perf_counter()
                out = run(*args, **kwargs)
                secs = time.perf_counter() - t0
                logger.warning("pqk: compiled the decode step in %.1f s (once per batch size and cache capacity; "
                               "generate(..., pqk_compile=False) runs it eagerly)", secs)
                if getattr(self, "pqk_state", None) is not None:
                    self.pqk_state.info["compile_seconds"] = round(secs, 2)
                return out
            return run(*args, **kwargs)
        call.first = True
        object.__setattr__(self, "_pqk_timed_call", (fn, call))
        return call
    get_compiled_call._pqk_patched = True
    return get_compiled_call
