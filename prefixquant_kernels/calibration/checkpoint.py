"""save_quantized / load_quantized: a quantized model as a directory of

    config.json          the transformers model config
    pqk_config.json      format + version, the QuantConfig, the prefix state's layout, every QuantLinear's shape,
                         the form of every RotatedLinear's rotation ("rotations": {name: "hadamard" | "dense"};
                         a checkpoint without the key holds dense rotations)
    model.safetensors    every tensor: packed int4 / int8 weights, fp32 scales, biases, norms, embeddings,
                         the 16-bit prefix K/V, the per-head KV scales and the Q/K rotation of kv_rotate,
                         the down_proj rotations (signs [I] of the Hadamard form, or a dense [I, I])
                         (tied tensors stored once)
    tokenizer files      when a tokenizer is given to save_quantized

load_quantized rebuilds the model from config.json (no float weights needed), puts empty QuantLinears and the
prefix state in place, then loads every tensor strictly: a checkpoint of another shape or config is an error.
Module names are the model's own (the family's ArchSpec, models/arch.py, says which linears are quantized), so a
checkpoint written before the layout moved into ArchSpec names the same modules and loads unchanged.
"""
from __future__ import annotations

import json
import os

import torch

from ..models.arch import float_linears, get_spec
from ..models.patch import swap
from ..models.state import PrefixQuantState
from ..nn import QuantLinear
from .config import QuantConfig

FORMAT = "prefixquant-kernels"
FORMAT_VERSION = 1
_META = "pqk_config.json"
_WEIGHTS = "model.safetensors"


def _fail(op: str, msg: str, exc: type[Exception] = ValueError):
    raise exc(f"pqk.{op}: {msg}")


def save_quantized(model, path: str, tokenizer=None) -> None:
    """Write a model quantized by quantize_model to the directory ``path`` (created if needed)."""
    from safetensors.torch import save_model

    state = getattr(model, "pqk_state", None)
    if state is None:
        _fail("save_quantized", "the model is not quantized (no pqk_state): run pqk.quantize_model first")
    from ..models.rotated_linear import RotatedLinear

    modules = {name: {"in_features": m.in_features, "out_features": m.out_features, "w_bits": m.w_bits,
                      "a_bits": m.a_bits, "bias": m.bias is not None, "static": m.is_static}
               for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_type": model.config.model_type,
            "quant_config": state.cfg.to_dict(), "state": state.layout(), "modules": modules,
            "rotations": {name: m.form for name, m in model.named_modules() if isinstance(m, RotatedLinear)}}
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    with open(os.path.join(path, _META), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    save_model(model, os.path.join(path, _WEIGHTS), metadata={"format": FORMAT})
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(path)


def _read_meta(path: str) -> dict:
    f = os.path.join(path, _META)
    if not os.path.exists(f):
        _fail("load_quantized", f"{path!r} has no {_META}: not a checkpoint written by pqk.save_quantized",
              FileNotFoundError)
    with open(f) as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        _fail("load_quantized", f"{f} is format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                                f"this package reads {FORMAT!r} version {FORMAT_VERSION}")
    return meta


def load_quantized(path: str, *, device: str | torch.device = "cpu"):
    """Rebuild the quantized model saved at ``path`` (module doc) -> the model, in eval mode."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = _read_meta(path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type != meta["model_type"]:
        _fail("load_quantized", f"config.json is model_type {config.model_type!r} but {_META} says "
                                f"{meta['model_type']!r}: files from different checkpoints")
    model = AutoModelForCausalLM.from_config(config).eval()
    build_skeleton(model, meta, "load_quantized")
    try:
        load_model(model, os.path.join(path, _WEIGHTS), strict=True, device=str(device))
    except RuntimeError as e:
        _fail("load_quantized", f"tensors in {_WEIGHTS} do not match the model its config builds: {e}")
    return model.to(device).eval()


def build_skeleton(model, meta: dict, op: str) -> None:
    """Put empty QuantLinears (and RotatedLinear wrappers) and an empty ``pqk_state`` into a float ``model`` built
    from the checkpoint's config (usually on the meta device), as described by ``meta`` (pqk_config.json's
    content). Nothing is changed before every check passed. Used by load_quantized and by the
    transformers quantizer (hf_quantizer.py), which fills the same skeleton through from_pretrained."""
    from ..models.rotated_linear import FORMS, RotatedLinear

    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        _fail(op, f"quantization_config is format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                  f"this package reads {FORMAT!r} version {FORMAT_VERSION} (re-export with pqk.export_hf)")
    for key in ("model_type", "quant_config", "state", "modules"):
        if key not in meta:
            _fail(op, f"quantization_config has no {key!r}: not written by pqk.export_hf")
    if model.config.model_type != meta["model_type"]:
        _fail(op, f"config.json is model_type {model.config.model_type!r} but its quantization_config says "
                  f"{meta['model_type']!r}: files from different checkpoints")
    get_spec(model)
    cfg = QuantConfig.from_dict(meta["quant_config"])
    linears = float_linears(model)               # names before the down_proj wrappers: "...mlp.down_proj"
    expected = {n.removesuffix(".linear") for n in meta["modules"]}
    if set(linears) != expected:
        _fail(op, f"the checkpoint's quantized modules do not match a {model.config.model_type} with "
                  f"{model.config.num_hidden_layers} layers (checkpoint from another config?)")
    forms = meta.get("rotations", {})      # absent: written before the Hadamard form existed, all dense
    rotated = {n.removesuffix(".linear") for n in meta["modules"] if n.endswith(".linear")}
    if not isinstance(forms, dict) or set(forms) - rotated or set(forms.values()) - set(FORMS):
        _fail(op, f"pqk_config's 'rotations' must map rotated modules ({sorted(rotated)[:2]}...) to one of {FORMS}, "
                  f"got {forms!r}")
    replacements = {}
    for name, m in meta["modules"].items():
        lin = linears[name.removesuffix(".linear")]
        if (lin.in_features, lin.out_features, lin.bias is not None) != (m["in_features"], m["out_features"],
                                                                          m["bias"]):
            _fail(op, f"{name}: checkpoint has [{m['out_features']}, {m['in_features']}] bias={m['bias']}, the "
                      f"config builds [{lin.out_features}, {lin.in_features}] bias={lin.bias is not None}")
        q = QuantLinear(m["in_features"], m["out_features"], w_bits=m["w_bits"], a_bits=m["a_bits"],
                        bias=m["bias"], static=m["static"])
        if name.endswith(".linear"):    # a rotated linear (down): its signs / rotation load with the other tensors
            base = name.removesuffix(".linear")
            try:
                replacements[base] = RotatedLinear.empty(q, forms.get(base, "dense"), lin.in_features,
                                                         lin.weight.device)
            except ValueError as e:
                _fail(op, f"{base}: {e}")
        else:
            replacements[name] = q
    lay = meta["state"]
    state = PrefixQuantState(cfg, lay["num_layers"], lay["num_kv_heads"], lay["head_dim"], lay["prefix_len"],
                             lay["bos_id"], lay.get("info"))
    swap(model, replacements, state)
