"""vLLM quantization method ``"prefixquant_kernels"``: the linears of a checkpoint ``pqk.export_hf`` wrote, run on
this package's GEMMs inside vLLM.

config.json's ``quantization_config`` (``{"quant_method": "prefixquant_kernels", **pqk_config.json}``) selects
``PrefixQuantVllmConfig``; its ``modules`` entry says, per Hugging Face linear name, the bits and whether the
activation scale is static. vLLM builds fused layers (``qkv_proj`` = q|k|v, ``gate_up_proj`` = gate|up) and splits
them across tensor-parallel ranks; ``PrefixQuantLinearMethod.create_weights`` registers parameters whose loaders do
both, in the checkpoint's own layout:

    weight     uint8 [N_rank, K_rank / 2] (W4: two int4 per byte along K) or int8 [N_rank, K_rank] (W8)
               output_dim 0 and input_dim 1: a column split takes rows, a row split takes bytes of K (K_rank even)
    w_scale    float32 [N_rank]   per output channel, split with the rows
    act_scale  float32 [S]        the static per-tensor activation scale of each of the layer's S logical linears
                                  (q, k, v: S = 3); a row split keeps it whole: the same scale on every rank
    signs      float32 [K]        down_proj's online Hadamard (``RotatedLinear``, Hadamard form), or
    rotation   float32 [K, K]     its dense form; not split: every rank rotates the whole input (below)

Names: the checkpoint's ``<down_proj>.linear.<tensor>`` (the linear inside its RotatedLinear) is read as
``<down_proj>.<tensor>``, and ``pqk_state.*`` (the prefix and KV scales, not module parameters) is left to the
prefix connector (serving/vllm_prefix.py): ``get_checkpoint_weight_mapper``.

apply() is ``pqk.quant_linear`` (quantize fused into the GEMM) on the layer's weights. The S act scales of a fused
layer are one GEMM when equal (the usual case: q, k, v read the same normed input, and calibration gives them one
scale) and S GEMMs on the row blocks otherwise, so the result is the unfused model's either way.

Rotation under tensor parallelism: down_proj is row-parallel (each rank holds K / tp of its input channels), but the
Hadamard mixes all K channels before the quantizer. Each rank therefore all-gathers its input, rotates the whole
[T, K], keeps its own K / tp columns of ``x R`` and quantizes those: the checkpoint's weight already holds
``W R``, so rank r's input columns of the folded weight are exactly those columns of ``x R``.

Every scale is poisoned (NaN) before loading, so a checkpoint without one fails in process_weights_after_loading
with the tensor's name, instead of running on a default.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase, UnquantizedLinearMethod,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import (BasevLLMParameter, ChannelQuantScaleParameter, ModelWeightParameter,
                                           PerTensorScaleParameter)

from ..calibration.checkpoint import FORMAT, FORMAT_VERSION
from ..calibration.hf_quantizer import QUANT_METHOD
from ..hadamard import hadamard_factor
from ..models.rotated_linear import FORMS, rotate
from ..ops.linear import quant_linear_backend, quant_linear_prevalidated

# vLLM's fused layers and the checkpoint linears they hold (the model class's packed_modules_mapping says the same;
# this is the fallback when a model does not set one)
FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _fail(msg: str, exc: type[Exception] = ValueError):
    raise exc(f"pqk vLLM plugin: {msg}")


@register_quantization_config(QUANT_METHOD)
class PrefixQuantVllmConfig(QuantizationConfig):
    """The checkpoint's pqk_config.json (module doc). meta: its content (config.json's quantization_config)."""

    def __init__(self, meta: dict[str, Any]):
        super().__init__()
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            _fail(f"quantization_config is format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                  f"this plugin reads {FORMAT!r} version {FORMAT_VERSION} (re-export with pqk.export_hf)")
        for key in ("modules", "state", "quant_config"):
            if not isinstance(meta.get(key), dict):
                _fail(f"quantization_config has no {key!r} table: not written by pqk.export_hf")
        self.meta = meta
        self.modules: dict[str, dict] = {}
        for name, m in meta["modules"].items():
            w_bits, a_bits = m.get("w_bits"), m.get("a_bits")
            if w_bits not in (4, 8) or a_bits not in (4, 8):
                _fail(f"{name}: w_bits / a_bits must be 4 or 8, the checkpoint says {w_bits} / {a_bits}")
            self.modules[name.removesuffix(".linear")] = m     # a rotated down_proj: "<down>.linear"
        self.rotations: dict[str, str] = dict(meta.get("rotations", {}))
        for name, form in self.rotations.items():
            if form not in FORMS:
                _fail(f"{name}: rotation form {form!r} is not one of {FORMS}")
        rotated = {n.removesuffix(".linear") for n in meta["modules"] if n.endswith(".linear")}
        for name in rotated - set(self.rotations):
            self.rotations[name] = "dense"          # checkpoints before the Hadamard form: dense rotations

    # ---- QuantizationConfig -----------------------------------------------------------------------------------
    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80       # the CUDA GEMMs are built for sm_80 and newer (CPU: no capability)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []       # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PrefixQuantVllmConfig":
        return cls(config)

    @staticmethod
    def get_checkpoint_weight_mapper():
        from vllm.model_executor.models.utils import WeightsMapper
        return WeightsMapper(orig_to_new_substr={".down_proj.linear.": ".down_proj."},
                             orig_to_new_prefix={"pqk_state.": None})

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None                                    # embeddings, lm_head: float
        parent, _, leaf = prefix.rpartition(".")
        parts = (self.packed_modules_mapping or FUSED).get(leaf, [leaf])
        names = [f"{parent}.{p}" if parent else p for p in parts]
        found = [self.modules.get(n) for n in names]
        if not any(found):
            return UnquantizedLinearMethod()
        if not all(found):
            _fail(f"{prefix} fuses {names}, but the checkpoint quantizes only "
                  f"{[n for n, m in zip(names, found) if m]}")
        kinds = {(m["w_bits"], m["a_bits"], bool(m["static"])) for m in found}
        if len(kinds) != 1:
            _fail(f"{prefix} fuses {names} with different bits / scale kinds {sorted(kinds)}: one GEMM cannot run them")
        w_bits, a_bits, static = kinds.pop()
        rotations = {self.rotations.get(n) for n in names}
        if len(rotations) != 1:
            _fail(f"{prefix} fuses {names} with different online rotations")
        return PrefixQuantLinearMethod(prefix, names, w_bits, a_bits, static, rotations.pop())


@register_weight_loader_v2_supported_method     # its parameters carry their own loaders (vLLM's v2 loading)
class PrefixQuantLinearMethod(LinearMethodBase):
    """One vLLM linear layer (fused or not) on pqk.quant_linear. names: the checkpoint linears it holds, in order;
    rotation: None, "hadamard" or "dense" (the online rotation in front of it)."""

    def __init__(self, prefix: str, names: list[str], w_bits: int, a_bits: int, static: bool, rotation: str | None):
        self.prefix, self.names = prefix, names
        self.w_bits, self.a_bits, self.static, self.rotation = w_bits, a_bits, static, rotation

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        loader = extra_weight_attrs["weight_loader"]
        k, n = input_size_per_partition, sum(output_partition_sizes)
        if self.w_bits == 4 and k % 2:
            _fail(f"{self.prefix}: a W4 layer's input split must be even (two int4 per byte), got {k} per rank")
        wshape, wdtype = ((n, k // 2), torch.uint8) if self.w_bits == 4 else ((n, k), torch.int8)
        layer.register_parameter("weight", ModelWeightParameter(
            data=torch.zeros(wshape, dtype=wdtype), input_dim=1, output_dim=0, weight_loader=loader))
        layer.register_parameter("w_scale", ChannelQuantScaleParameter(
            data=torch.full((n,), math.nan, dtype=torch.float32), output_dim=0, weight_loader=loader))
        if self.static:
            layer.register_parameter("act_scale", PerTensorScaleParameter(
                data=torch.full((len(output_partition_sizes),), math.nan, dtype=torch.float32),
                weight_loader=loader))
        if self.rotation == "hadamard":
            layer.register_parameter("signs", BasevLLMParameter(
                data=torch.full((input_size,), math.nan, dtype=torch.float32), weight_loader=loader))
        elif self.rotation == "dense":
            layer.register_parameter("rotation", BasevLLMParameter(
                data=torch.full((input_size, input_size), math.nan, dtype=torch.float32), weight_loader=loader))
        layer.pqk_partition_sizes = list(output_partition_sizes)
        layer.pqk_input_size = input_size

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Check every scale the checkpoint had to provide; turn parameters into plain tensors for the GEMM."""
        def check(t: torch.Tensor, what: str, positive: bool) -> None:
            bad = ~torch.isfinite(t) | ((t <= 0) if positive else torch.zeros_like(t, dtype=torch.bool))
            if bool(bad.any()):
                missing = bool(torch.isnan(t).all())
                _fail(f"{self.prefix}.{what}: " + ("missing from the checkpoint" if missing else
                                                   f"{int(bad.sum())} of {t.numel()} values are not finite"
                                                   + (" and > 0" if positive else "")))
        check(layer.w_scale.data, "w_scale", True)
        layer.w_scale = torch.nn.Parameter(layer.w_scale.data.contiguous(), requires_grad=False)
        layer.weight = torch.nn.Parameter(layer.weight.data.contiguous(), requires_grad=False)
        # the GEMM's kernel, chosen once (apply() runs tokens x layers x steps times)
        layer.pqk_backend = quant_linear_backend("auto", layer.weight.device, layer.weight, self.a_bits)
        if self.static:
            s = layer.act_scale.data
            for i, name in enumerate(self.names):
                check(s[i:i + 1], f"act_scale ({name}.act_scale)", True)
            # one GEMM when every logical linear has the same scale (exactly: the scales are compared bit for bit)
            layer.pqk_act_scales = [s[0].clone()] if bool((s == s[0]).all()) else [x.clone() for x in s]
        if self.rotation == "hadamard":
            check(layer.signs.data, "signs", False)
            if not bool((layer.signs.data.abs() == 1).all()):
                _fail(f"{self.prefix}.signs: a Hadamard rotation's signs must all be +1 or -1")
            try:
                hadamard_factor(layer.signs.shape[0])
            except ValueError as e:
                _fail(f"{self.prefix}.signs: {e}")
        elif self.rotation == "dense":
            check(layer.rotation.data, "rotation", False)

    def _rotated_input(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [T, K_rank] -> this rank's K_rank columns of x_full @ R (module doc: rotation under TP)."""
        from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                                      tensor_model_parallel_all_gather)
        tp = get_tensor_model_parallel_world_size()
        full = tensor_model_parallel_all_gather(x, dim=-1) if tp > 1 else x
        if self.rotation == "hadamard":
            y = rotate(full, signs=layer.signs)
        else:
            y = rotate(full, rotation=layer.rotation)
        if tp == 1:
            return y
        k = x.shape[-1]
        r = get_tensor_model_parallel_rank()
        return y[..., r * k:(r + 1) * k]

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.rotation is not None:
            x = self._rotated_input(layer, x)
        b = None if bias is None else bias.float()
        scales = layer.pqk_act_scales if self.static else [None]
        if len(scales) == 1:
            return quant_linear_prevalidated(x, layer.weight, layer.w_scale, scales[0], self.a_bits, b,
                                             layer.pqk_backend)
        outs, row = [], 0        # fused linears with different static scales: one GEMM per logical linear
        for s, size in zip(scales, layer.pqk_partition_sizes):
            sl = slice(row, row + size)
            outs.append(quant_linear_prevalidated(x, layer.weight[sl], layer.w_scale[sl], s, self.a_bits,
                                                  None if b is None else b[sl], layer.pqk_backend))
            row += size
        return torch.cat(outs, dim=-1)
