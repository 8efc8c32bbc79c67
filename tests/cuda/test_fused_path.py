"""What a swapped Llama / Qwen decoder layer with static W4A4 linears launches on CUDA, rotated (the default:
down_proj behind an online Hadamard) or not, with or without the fused MLP. With the fused A-load kernel on
(cuda_ops.FUSED_A_MAX_M >= M): no standalone quantize before any linear, each static linear one pqk_quant_gemm_static
launch (the int4 quantize inside the GEMM's A load). By default (FUSED_A_MAX_M = 0: on an H200 the fused kernel
measured 2.6-7.3x slower than quantize + GEMM, ops/cuda_ops.py): pqk_quantize_static + pqk_int4_gemm per linear.

No GPU needed: the model runs on CPU tensors under a TorchDispatchMode that sends every pqk:: op having a CUDA
implementation to it (ops/cuda_ops.py, the code a GPU runs) over test_binding's emulated library, which records each
launch and computes it with the reference. The recorded launches are the CUDA-shaped sequence; the logits must equal
the plain CPU run's, so the redirected ops really computed the layer.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prefixquant_kernels as pqk
from prefixquant_kernels.calibration import quantize_model
from prefixquant_kernels.ops import cuda_ops

from ..models.tiny import StubTokenizer, text, tiny_model
from .test_binding import EmulatedLib, _binding_on_cpu


class CudaShaped(TorchDispatchMode):
    """Runs each pqk:: op that has a CUDA implementation through it (the others, e.g. the KV cache's, as they are);
    records the pqk:: op names in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("pqk::"):
            self.ops.append(name)
            impl = cuda_ops.REGISTERED.get(name)
            if impl is not None:
                return impl(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _static_w4a4(arch: str, rotate: bool):
    cfg = pqk.QuantConfig(w_bits=4, a_bits=4, kv_bits=16, rotate=rotate, act_quant="static", calib_samples=2,
                          calib_seq_len=64)
    return quantize_model(tiny_model(arch), StubTokenizer(), text(), cfg, progress=False)


def _launches(model, ids):
    emu = EmulatedLib()
    mode = CudaShaped()
    with torch.no_grad(), _binding_on_cpu(emu), mode:
        logits = model(ids, use_cache=False).logits
    return logits, [c[0] for c in emu.calls], mode.ops


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("rotate,fuse", [(True, False), (False, False), (False, True)])
def test_no_standalone_quantize_before_a_static_linear(arch, rotate, fuse, monkeypatch):
    """With the fused A-load kernel on for these rows (FUSED_A_MAX_M >= M; off by default, ops/cuda_ops.py says
    why): every static linear is one fused launch."""
    model = _static_w4a4(arch, rotate)
    if fuse:
        assert pqk.fuse_mlps(model, strict=True) == model.config.num_hidden_layers
    ids = torch.tensor([StubTokenizer().encode(text(40, seed=1), add_special_tokens=True)])
    monkeypatch.setattr(cuda_ops, "FUSED_A_MAX_M", ids.shape[1])
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    got, launches, ops = _launches(model, ids)
    assert torch.equal(got, want)
    layers = model.config.num_hidden_layers
    counts = Counter(launches)
    # not one quantize launch, static or per token, anywhere in the model
    assert not {"pqk_quantize_static", "pqk_quantize_per_token", "pqk_rmsnorm_quantize"} & set(counts), counts
    assert "pqk::quantize_static" not in ops
    # every linear is one fused launch: q, k, v, o, gate, up, down (7) or q, k, v, o, gate|up+SiLU, down (6, the
    # fused MLP's down_proj reads the packed int4 its gate|up epilogue wrote: a plain int4 GEMM)
    if fuse:
        assert counts == Counter({"pqk_quant_gemm_static": 5 * layers, "pqk_int4_gemm": layers}), counts
    else:
        assert counts == Counter({"pqk_quant_gemm_static": 7 * layers, **({"pqk_hadamard": layers} if rotate else {})}), \
            counts


def test_the_recorder_sees_a_standalone_quantize():
    """The check above can fail: a layer that quantizes before its GEMM (the pre-fusion CUDA quant_linear, planted
    here) shows up as pqk_quantize_static launches."""
    model = _static_w4a4("llama", rotate=False)
    ids = torch.tensor([StubTokenizer().encode(text(20, seed=2), add_special_tokens=True)])

    def two_launches(x, w, w_scale, a_scale, a_bits, bias, cpu_isa=-1):
        q = cuda_ops.quantize_static(x, a_scale, 4)
        return cuda_ops.int4_matmul(q, w, a_scale, w_scale, bias, x.dtype)

    mp = pytest.MonkeyPatch()
    mp.setitem(cuda_ops.REGISTERED, "pqk::quant_linear", two_launches)
    try:
        _, launches, _ = _launches(model, ids)
    finally:
        mp.undo()
    assert Counter(launches)["pqk_quantize_static"] == 7 * model.config.num_hidden_layers


@pytest.mark.parametrize("fuse", [False, True])
def test_default_static_linear_is_quantize_then_gemm(fuse):
    """By default (and above FUSED_A_MAX_M rows) each static linear is pqk_quantize_static + pqk_int4_gemm (measured
    faster on an H200: the fused kernel fetches float A one K tile ahead only; ops/cuda_ops.py), same logits."""
    model = _static_w4a4("llama", rotate=False)
    if fuse:
        pqk.fuse_mlps(model, strict=True)
    ids = torch.tensor([StubTokenizer().encode(text(40, seed=3), add_special_tokens=True)])
    assert ids.shape[1] > cuda_ops.FUSED_A_MAX_M
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    got, launches, _ = _launches(model, ids)
    assert torch.equal(got, want)
    layers, counts = model.config.num_hidden_layers, Counter(launches)
    static = 5 if fuse else 7   # the fused MLP's down_proj reads packed int4: a plain GEMM already
    assert counts == Counter({"pqk_quantize_static": static * layers,
                              "pqk_int4_gemm": (static + (1 if fuse else 0)) * layers}), counts
