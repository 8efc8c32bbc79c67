"""The model layout, owned by one ``ArchSpec`` per model family (``REGISTRY``, keyed by ``config.model_type``).

Every module that walks a model (the swap, calibration, rotation, prefix discovery, checkpoints, the importer, the
benchmarks) asks the spec where things are instead of spelling ``model.layers.{i}.self_attn.q_proj`` itself:

* ``layers``: the path of the decoder layers' ModuleList (``decoder_layers``); every other path is relative to one
  decoder layer.
* the linears: ``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``. A fused family names one linear several
  times: Phi-3's ``self_attn.qkv_proj`` holds the [q | k | v] output rows, ``mlp.gate_up_proj`` the [gate | up]
  rows (``qkv_rows`` / ``gate_up_rows`` say which rows are which).
* the quantizer points (``points``): the four activation quantizers of a layer, each with the linears that read
  its one input (so they share one static scale): "qkv" (after ``input_norm``), "o", "gate_up" (after
  ``post_attention_norm``), "down". The names are the same in every family (checkpoints key act scales by them).
* ``head_dim(config)``: the one head_dim fallback; ``qkv_bias`` / ``qk_norm`` / ``bos_fallback_eos``: what is
  special about the family (read by the KV-scale calibration and the prefix's end token).

Adding a family with Llama's module names is one registry entry (``REGISTRY["mistral"] = ArchSpec("mistral")``);
a family with other names gives the paths. The helpers ``get_spec``, ``decoder_layers``, ``float_linears``,
``resolve``, ``get_linear`` / ``set_linear`` (through a RotatedLinear wrapper) are what callers loop over.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .rotated_linear import RotatedLinear

POINT_NAMES = ("qkv", "o", "gate_up", "down")   # the activation quantizers of every decoder layer, in order


def _fail(msg: str, exc: type[Exception] = ValueError):
    raise exc(f"pqk.quantize_model: {msg}")


def _unique(names) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class ArchSpec:
    """One supported model family: where its linears, norms and quantizer points are, and what is special about it.
    Paths of linears and norms are relative to a decoder layer; ``layers``, ``final_norm``, ``rotary_emb`` to the
    *ForCausalLM."""
    model_type: str
    qkv_bias: bool = False          # Qwen2: q/k/v carry a bias
    qk_norm: bool = False           # Qwen3: RMSNorm on q and k per head (``q_norm`` / ``k_norm``), before RoPE
    bos_fallback_eos: bool = False  # Qwen tokenizers have no BOS: the prefix ends with EOS instead
    layers: str = "model.layers"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    act_fn: str = "mlp.act_fn"                        # the MLP's activation module (Phi-3: mlp.activation_fn)
    q_norm: str = "self_attn.q_norm"                  # read only when qk_norm
    k_norm: str = "self_attn.k_norm"
    input_norm: str = "input_layernorm"               # its output is the q/k/v input
    post_attention_norm: str = "post_attention_layernorm"   # its output is the gate/up input
    final_norm: str = "model.norm"
    rotary_emb: str = "model.rotary_emb"

    def __post_init__(self):
        for what, names in (("q/k/v", (self.q, self.k, self.v)), ("gate/up", (self.gate, self.up))):
            if len(set(names)) not in (1, len(names)):
                raise ValueError(f"pqk.ArchSpec({self.model_type!r}): {what} must be all separate linears or one "
                                 f"fused linear, got {names}")

    # ---- the layout ------------------------------------------------------------------------------------------
    @property
    def fused_qkv(self) -> bool:
        return self.q == self.k == self.v

    @property
    def fused_gate_up(self) -> bool:
        return self.gate == self.up

    @property
    def points(self) -> dict[str, tuple[str, ...]]:
        """quantizer point -> the linears (paths in a layer) that read its input, in POINT_NAMES order."""
        return {"qkv": _unique((self.q, self.k, self.v)), "o": (self.o,), "gate_up": _unique((self.gate, self.up)),
                "down": (self.down,)}

    @property
    def point_norms(self) -> dict[str, str]:
        """quantizer point -> the RMSNorm whose output it is: the points that read the residual stream."""
        return {"qkv": self.input_norm, "gate_up": self.post_attention_norm}

    @property
    def residual_writers(self) -> tuple[str, ...]:
        """The linears whose output is added to the residual stream."""
        return (self.o, self.down)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear a decoder layer quantizes (paths in a layer), in points order."""
        return tuple(n for names in self.points.values() for n in names)

    @property
    def attn(self) -> str:
        """The attention module's path in a layer (the parent of o; it calls the KV cache and attention)."""
        return self.o.rpartition(".")[0]

    @property
    def mlp(self) -> str:
        """The MLP module's path in a layer (the parent of down)."""
        return self.down.rpartition(".")[0]

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}."

    def linear_names(self, num_layers: int) -> list[str]:
        """Full names (in the *ForCausalLM) of every linear to quantize, layer by layer."""
        return [self.layer_prefix(i) + n for i in range(num_layers) for n in self.linears]

    def head_dim(self, config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def qkv_rows(self, config) -> tuple[slice, slice, slice]:
        """The output rows of q, k, v in their linears (all rows when separate; [q | k | v] when fused)."""
        if not self.fused_qkv:
            return slice(None), slice(None), slice(None)
        d = self.head_dim(config)
        nq, nkv = config.num_attention_heads * d, config.num_key_value_heads * d
        return slice(0, nq), slice(nq, nq + nkv), slice(nq + nkv, nq + 2 * nkv)

    def gate_up_rows(self, config) -> tuple[slice, slice]:
        """The output rows of gate and up in their linears ([gate | up], chunked after the GEMM, when fused)."""
        if not self.fused_gate_up:
            return slice(None), slice(None)
        i = config.intermediate_size
        return slice(0, i), slice(i, 2 * i)

    # ---- reading a layer -------------------------------------------------------------------------------------
    def qkv(self, layer: nn.Module, h: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections [..., H * D] of the attention input h, before any q/k norm and RoPE."""
        outs = {}
        rows = self.qkv_rows(config)
        res = []
        for name, r in zip((self.q, self.k, self.v), rows):
            if name not in outs:
                outs[name] = layer.get_submodule(name)(h)
            res.append(outs[name][..., r])
        return tuple(res)


REGISTRY: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama"),
    "mistral": ArchSpec("mistral"),
    "qwen2": ArchSpec("qwen2", qkv_bias=True, bos_fallback_eos=True),
    "qwen3": ArchSpec("qwen3", qk_norm=True, bos_fallback_eos=True),
    "phi3": ArchSpec("phi3", q="self_attn.qkv_proj", k="self_attn.qkv_proj", v="self_attn.qkv_proj",
                     gate="mlp.gate_up_proj", up="mlp.gate_up_proj", act_fn="mlp.activation_fn"),
}


def get_spec(model_or_type) -> ArchSpec:
    """The ArchSpec of a model (or a model_type string); ValueError for an unsupported architecture."""
    mt = model_or_type if isinstance(model_or_type, str) else getattr(getattr(model_or_type, "config", None),
                                                                      "model_type", None)
    if mt not in REGISTRY:
        _fail(f"unsupported architecture model_type={mt!r}; supported: {sorted(REGISTRY)}")
    return REGISTRY[mt]


def decoder_layers(model) -> nn.ModuleList:
    spec = get_spec(model)
    try:
        layers = model.get_submodule(spec.layers)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList):
        _fail(f"{type(model).__name__} has no {spec.layers}: expected a *ForCausalLM of {sorted(REGISTRY)}")
    return layers


def set_decoder_layers(model, layers: nn.ModuleList) -> None:
    """Put ``layers`` in place of the model's decoder layers (e.g. a slice, to truncate a model)."""
    parent, _, attr = get_spec(model).layers.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, layers)


def float_linears(model) -> dict[str, nn.Linear]:
    """name -> nn.Linear for every linear to quantize; ValueError if one is missing or already quantized."""
    spec = get_spec(model)
    n = len(decoder_layers(model))
    out = {}
    for name in spec.linear_names(n):
        name = resolve(model, name)
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            _fail(f"{name} is a {type(mod).__name__}, not an nn.Linear (is the model already quantized?)")
        out[name] = mod
    return out


def resolve(model, name: str) -> str:
    """The name of the linear behind ``name``: ``name + ".linear"`` when it is wrapped by a RotatedLinear."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        _fail(f"{model.config.model_type}: expected a module {name!r}, not found")
    return f"{name}.linear" if isinstance(mod, RotatedLinear) else name


def unwrap(mod: nn.Module) -> nn.Module:
    return mod.linear if isinstance(mod, RotatedLinear) else mod


def get_linear(root: nn.Module, path: str) -> nn.Module:
    """The linear at ``path`` in ``root``, through a RotatedLinear wrapper (its input is then the rotated one)."""
    return unwrap(root.get_submodule(path))


def set_module(root: nn.Module, path: str, mod: nn.Module) -> None:
    """Put ``mod`` at ``path`` in ``root``."""
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, mod)
