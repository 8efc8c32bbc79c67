"""transformers quantizer hook: ``AutoModelForCausalLM.from_pretrained(path)`` returns the quantized model.

    pqk.export_hf(model, path, tokenizer)                   # = pqk.save_quantized + a quantization_config
    model = AutoModelForCausalLM.from_pretrained(path)      # after ``import prefixquant_kernels``

How it works. ``export_hf`` calls ``save_quantized`` (config.json, pqk_config.json, model.safetensors, tokenizer)
and then adds ``"quantization_config": {"quant_method": "prefixquant_kernels", **pqk_config.json}`` to config.json.
transformers reads that key in ``from_pretrained`` and asks its quantizer registry for ``"prefixquant_kernels"``:
``PrefixQuantHfQuantizer`` (registered below) builds the same skeleton ``load_quantized`` builds, on the meta
device, before any tensor is read (empty QuantLinears, the RotatedLinear wrappers, ``model.pqk_state``);
transformers then loads model.safetensors into it, key for key, as for any float model, and the quantizer checks
every scale afterwards. The returned model is the one ``pqk.load_quantized(path)`` returns: patched ``forward`` /
``generate`` with the 16-bit prefix and the quantized KV cache.

Registration (``register()``) needs transformers' ``register_quantizer`` / ``register_quantization_config``
(transformers >= 4.47; pinned and tested with 5.23). ``prefixquant_kernels/__init__.py`` calls
``install_import_hook()``: importing ``transformers.quantizers.auto`` costs seconds, which a user of the kernels alone
should not pay, so the registration runs when transformers imports that module itself (an import hook), or at once
when it is already imported. An older transformers without the API gets a warning; the package still imports.

This module imports nothing of the package's transformers-dependent code at its top: the hook may run while
transformers is half-way through importing ``modeling_utils`` (models/attention.py registers an attention
function at import, which needs the finished module), so those imports happen inside the methods.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import warnings

QUANT_METHOD = "prefixquant_kernels"
_TARGET = "transformers.quantizers.auto"
_CONFIG = "config.json"


def _fail(op: str, msg: str, exc: type[Exception] = ValueError):
    raise exc(f"pqk.{op}: {msg}")


# ---- writing: a checkpoint transformers can load ---------------------------------------------------------------

def export_hf(model, path, tokenizer=None, *, overwrite: bool = False, float_dtype="auto") -> None:
    """Write ``model`` (quantized by pqk.quantize_model or imported) to the directory ``path`` so that both
    ``pqk.load_quantized(path)`` and ``AutoModelForCausalLM.from_pretrained(path)`` rebuild it: ``save_quantized``
    plus a ``quantization_config`` in config.json holding pqk_config.json's content (module doc). Atomic, with
    save_quantized's ``overwrite`` and ``float_dtype``: config.json gets its quantization_config before the
    directory is renamed into place, so no reader ever sees a checkpoint without it."""
    from .checkpoint import write_checkpoint

    def add_quantization_config(d: str, meta: dict) -> None:
        cfg_file = os.path.join(d, _CONFIG)
        with open(cfg_file) as f:
            config = json.load(f)
        config["quantization_config"] = {"quant_method": QUANT_METHOD, **meta}
        with open(cfg_file, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=str)

    write_checkpoint(model, path, tokenizer, overwrite=overwrite, float_dtype=float_dtype, op="export_hf",
                     finish=add_quantization_config)


# ---- reading: the skeleton a checkpoint's tensors are loaded into ----------------------------------------------

def _validate_loaded(model) -> None:
    """After transformers filled the skeleton: the scales every QuantLinear trusts in forward (load_state_dict
    runs this check through a hook; transformers' loader does not call load_state_dict)."""
    from ..nn import QuantLinear
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            try:
                mod._validate_buffers()
            except (ValueError, TypeError) as e:
                _fail("from_pretrained", f"{name}: {e}")
        if mod is not model and any(t.is_meta for t in mod.buffers(recurse=False)):
            _fail("from_pretrained", f"{name} has buffers that were not in the checkpoint (truncated file?)")


# ---- the transformers classes and their registration -----------------------------------------------------------

_registered = False


def _classes():
    """Built on first use: they subclass transformers' QuantizationConfigMixin / HfQuantizer."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class PrefixQuantConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a checkpoint written by pqk.export_hf: pqk_config.json's content
        (format, model_type, quant_config, state layout, modules) plus ``quant_method``."""

        def __init__(self, quant_method: str = QUANT_METHOD, **meta):
            self.quant_method = quant_method
            self.meta = dict(meta)

        def to_dict(self) -> dict:
            return {"quant_method": self.quant_method, **self.meta}

        def to_diff_dict(self) -> dict:
            return self.to_dict()

    class PrefixQuantHfQuantizer(HfQuantizer):
        """Loads pre-quantized pqk checkpoints (it cannot quantize a float model: that needs calibration text,
        use pqk.quantize_model)."""

        requires_calibration = True

        def validate_environment(self, device_map=None, **kwargs):
            if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
                _fail("from_pretrained", f"prefixquant_kernels models load on one device; got device_map with "
                                         f"{sorted(map(str, set(device_map.values())))} (use device_map=None or "
                                         "'cpu', then model.to(device))")

        def _process_model_before_weight_loading(self, model, **kwargs):
            from .checkpoint import build_skeleton
            build_skeleton(model, self.quantization_config.meta, "from_pretrained")
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            _validate_loaded(model)
            return model

        def is_serializable(self):
            return True

        @property
        def is_trainable(self):
            return False

    return PrefixQuantConfig, PrefixQuantHfQuantizer


def register() -> bool:
    """Register the config and quantizer with transformers (idempotent). -> whether they are registered; an older
    transformers without the registration API gets a warning instead of an error."""
    global _registered
    if _registered:
        return True
    try:
        from transformers.quantizers import auto
        config_cls, quantizer_cls = _classes()
        if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
            auto.register_quantization_config(QUANT_METHOD)(config_cls)
        if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
            auto.register_quantizer(QUANT_METHOD)(quantizer_cls)
    except (ImportError, AttributeError) as e:
        warnings.warn(f"prefixquant_kernels: this transformers has no quantizer registration API ({e}); "
                      "AutoModelForCausalLM.from_pretrained will not load pqk checkpoints, use "
                      "pqk.load_quantized(path) (or upgrade transformers)", stacklevel=2)
        return False
    _registered = True
    return True


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` with the other finders and wraps its loader so that ``register()``
    runs right after the module executed (the module must exist before anything can be registered in it)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)               # once; and so find_spec below does not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:                    # never break transformers' own import because of this hook
                register()
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"prefixquant_kernels: registering the transformers quantizer failed ({e!r}); "
                              "use pqk.load_quantized(path)", stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


def install_import_hook() -> None:
    """Register now if transformers' quantizer registry is already imported, else when it is (module doc)."""
    if _TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
