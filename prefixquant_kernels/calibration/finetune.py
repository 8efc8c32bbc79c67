"""Block-wise fine-tuning: PrefixQuant's second stage (the Block-AP recipe of EfficientQAT, by the same authors), run
after the training-free calibration has chosen every weight code, weight scale and static scale.

Each decoder block in turn learns, with the quantizers the kernels run (fake quantization, straight-through round):

* per quantizer point p (qkv, o, gate_up, down): its static activation scale, ``a_p = a_p0 * exp(alpha_p)``;
* per linear: its per-output-channel weight scale, ``s = s0 * exp(beta)`` [N];
* with ``finetune_weights``: the float weights W the codes are rounded from (starting at the training-free
  ``q * s0``, so step 0 is exactly the training-free block);

by Adam (cosine-annealed learning rates) on the block loss (a block whose loss the training did not lower keeps its
training-free values)

    MSE( block_fq(X_q), block_fp(X_fp) )      both with the 16-bit prefix K/V in front, as at inference

where X_fp are the float model's hidden states entering the block and X_q those of the already fine-tuned quantized
blocks (so each block also learns to absorb the error of the ones before it). In block_fq every linear computes
``F.linear(fq(x, a_p), fq(W, s))`` with ``fq(x, s) = clamp(round(x / s), qmin, qmax) * s`` (exactly the codes of
``format.quantize``, which the kernels and QuantLinear use), and a static-mode KV cache quantizes K (after RoPE, in
the Q/K-rotated space when kv_rotate) and V per head with their calibrated scales (held fixed). After a block is
trained, X_q and X_fp advance through it; the learned values are exported through ``QuantLinear.from_float`` with the
learned ``w_scale`` and act scale, so the integer codes are those the fake quantization rounded to (tested bit for
bit: tests/calibration/test_finetune.py).

The KV modes with dynamic scales (dynamic, KIVI, LogQuant) have nothing static to learn in the cache: their K/V stay
float during fine-tuning.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import format as fmt
from ..cache.factory import rotate_heads
from ..models.arch import ArchSpec, decoder_layers, resolve, set_module


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round half to even forward, identity backward (straight-through)."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(x / scale), qmin, qmax) * scale`` in fp32 with a straight-through round: the codes are
    ``format.quantize(x, scale, bits)``'s (same fp32 division, same rounding, same clamp); the gradient reaches x
    inside the range and the scale everywhere (LSQ's)."""
    return _round_ste(x.float() / scale).clamp(fmt.qmin(bits), fmt.qmax(bits)) * scale


class ActScale(nn.Module):
    """One quantizer point's static activation scale, learned in log space: ``a0 * exp(alpha)``."""

    def __init__(self, a0: float):
        super().__init__()
        self.register_buffer("a0", torch.tensor(float(a0), dtype=torch.float32))
        self.alpha = nn.Parameter(torch.zeros((), dtype=torch.float32))

    def scale(self) -> torch.Tensor:
        return self.a0 * torch.exp(self.alpha)


class FakeQuantLinear(nn.Module):
    """A linear during fine-tuning: x float [..., K] -> float [..., N] as ``F.linear(fq(x, a), fq(W, s)) + bias``.

    weight: float [N, K], the starting W (the training-free ``q * s0``); w_scale: float32 [N] (s0); act: the point's
    shared ActScale; bias: float [N] or None (fixed)."""

    def __init__(self, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: ActScale,
                 w_bits: int, a_bits: int, learn_weight: bool):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=learn_weight)
        self.register_buffer("s0", w_scale.detach().float().reshape(-1).clone())
        self.beta = nn.Parameter(torch.zeros_like(self.s0))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.act = act
        self.w_bits, self.a_bits = w_bits, a_bits

    def w_scale(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quant(self.weight, self.w_scale().unsqueeze(1), self.w_bits)
        return F.linear(fake_quant(x, self.act.scale(), self.a_bits), w, self.bias).to(x.dtype)

    def export(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W float32 [N, K], w_scale float32 [N], act scale float32 0-dim): what QuantLinear.from_float takes to
        hold exactly the codes and scales this module computes with."""
        with torch.no_grad():
            return self.weight.detach().float().clone(), self.w_scale().detach(), self.act.scale().detach()


class PrefixKV:
    """Stands in for the KV cache in one block's forward (the attention only calls ``update``): returns the layer's
    16-bit prefix K/V [1, H, P, D] followed by the new K/V [B, H, T, D], the new ones through the static per-head
    KV quantizer when scales are given (K in the Q/K-rotated space when ``rotation`` is given, rotated back after)."""

    def __init__(self, pk, pv, k_scale=None, v_scale=None, bits: int = 4, rotation: torch.Tensor | None = None,
                 k_offset: torch.Tensor | None = None):
        self.pk, self.pv = pk, pv
        self.k_scale = None if k_scale is None else k_scale.float().reshape(1, -1, 1, 1)
        self.v_scale = None if v_scale is None else v_scale.float().reshape(1, -1, 1, 1)
        self.bits, self.rotation = bits, rotation
        # QuantConfig.k_center: the cache quantizes K H - mu; added back after (softmax does not see it)
        self.k_offset = None if k_offset is None else k_offset.float()[None, :, None]

    def update(self, k, v, layer_idx=None, cache_kwargs=None):
        if self.k_scale is not None:
            kr = k if self.rotation is None else rotate_heads(k, self.rotation)
            if self.k_offset is None:
                kq = fake_quant(kr, self.k_scale, self.bits)
            else:
                kq = fake_quant(kr - self.k_offset.to(kr.dtype), self.k_scale, self.bits) + self.k_offset
            k = (kq if self.rotation is None else rotate_heads(kq, self.rotation.T)).to(k.dtype)
            v = fake_quant(v, self.v_scale, self.bits).to(v.dtype)
        if self.pk is None:
            return k, v
        b = k.shape[0]
        return (torch.cat([self.pk.to(k.dtype).expand(b, -1, -1, -1), k], 2),
                torch.cat([self.pv.to(v.dtype).expand(b, -1, -1, -1), v], 2))


def _mask(t: int, p: int, dtype) -> torch.Tensor:
    """Additive mask [1, 1, t, p + t]: every query sees the p prefix positions and the causal part of its own."""
    allowed = torch.ones(t, p + t, dtype=torch.bool).tril(p)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _block(layer, x, mask, pos_emb, pos_ids, kv: PrefixKV):
    return layer(x, attention_mask=mask, position_ids=pos_ids, past_key_values=kv, use_cache=True,
                 position_embeddings=pos_emb)


def _learned(acts: dict, fq: dict) -> list[torch.Tensor]:
    """Every value the fine-tuning may change in one block: act log-scales, weight log-scales, weights."""
    return [a.alpha for a in acts.values()] + [t for m in fq.values() for t in (m.beta, m.weight)]


def finetune_blocks(model, spec: ArchSpec, cfg, samples: torch.Tensor, prefix_kv, kv_scales, w_init: dict,
                    act_scales: dict, *, qk_rotation=None, k_offsets=None, progress=None) -> tuple[dict, dict, list]:
    """Fine-tune every decoder block of the (float, possibly rotated) model in order; the model is left as it was.

    samples: int64 [S, T] token ids (the calibration samples, without the prefix). prefix_kv: (per-layer K, per-layer
    V) [1, H, P, D] float, K *not* rotated; or None (no prefix: the samples start with their own BOS). kv_scales:
    (per-layer k_scale, per-layer v_scale) float32 [H] of the static KV mode, or None; k_offsets: per layer float32
    [H, D] (QuantConfig.k_center) or None. w_init: linear name (resolved)
    -> (W float [N, K], w_scale float32 [N]) from the training-free step. act_scales: "layer.point" -> float.
    Returns (name -> (W, w_scale, act scale) to export, "layer.point" -> learned act scale, per layer the mean block
    MSE over the samples: "before" (the training-free block), "first_epoch" / "last_epoch" (during training),
    "after" (the exported block), "kept" (False: training did not lower the loss, the block keeps its training-free
    values)).
    """
    layers = decoder_layers(model)
    base = model.get_decoder()
    dtype = next(model.parameters()).dtype
    p_len = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
    s, t = samples.shape
    pos_ids = torch.arange(p_len, p_len + t).unsqueeze(0)
    mask = _mask(t, p_len, dtype)
    out: dict = {}
    learned_act: dict = {}
    losses: list = []
    with torch.no_grad():
        x_fp = base.embed_tokens(samples).to(dtype)
    x_q = x_fp.clone()
    pos_emb = base.rotary_emb(x_fp, position_ids=pos_ids)
    gen = torch.Generator().manual_seed(cfg.seed)
    for i, layer in enumerate(layers):
        pk = None if prefix_kv is None else prefix_kv[0][i].half().to(dtype)   # stored in 16 bits, as at inference
        pv = None if prefix_kv is None else prefix_kv[1][i].half().to(dtype)
        with torch.no_grad():
            y_fp = torch.cat([_block(layer, x_fp[j:j + 1], mask, pos_emb, pos_ids, PrefixKV(pk, pv)) for j in range(s)])
        # swap in the fake-quant linears of this block
        acts, fq, originals = {}, {}, {}
        for p, names in spec.points.items():
            acts[p] = ActScale(act_scales[f"{i}.{p}"])
            for n in names:
                full = resolve(model, spec.layer_prefix(i) + n)
                lin = model.get_submodule(full)
                w, ws = w_init[full]
                fq[full] = FakeQuantLinear(w, ws, lin.bias, acts[p], cfg.w_bits, cfg.a_bits, cfg.finetune_weights)
                originals[full] = lin
        kv = PrefixKV(pk, pv) if kv_scales is None else PrefixKV(pk, pv, kv_scales[0][i], kv_scales[1][i],
                                                                  cfg.kv_bits, qk_rotation,
                                                                  None if k_offsets is None else k_offsets[i])
        try:
            for full, m in fq.items():
                set_module(model, full, m)
            scale_params = [a.alpha for a in acts.values()] + [m.beta for m in fq.values()]
            groups = [{"params": scale_params, "lr": cfg.finetune_lr}]
            if cfg.finetune_weights:
                groups.append({"params": [m.weight for m in fq.values()], "lr": cfg.resolved_finetune_weight_lr})
            opt = torch.optim.Adam(groups)
            steps = cfg.finetune_epochs * s
            base_lrs = [g["lr"] for g in opt.param_groups]
            with torch.no_grad():   # the training-free block's loss (step 0)
                before = sum(F.mse_loss(_block(layer, x_q[j:j + 1], mask, pos_emb, pos_ids, kv).float(),
                                        y_fp[j:j + 1].float()).item() for j in range(s)) / s
            start = [p.detach().clone() for p in _learned(acts, fq)]
            first = last = 0.0
            step = 0
            with torch.enable_grad():
                for epoch in range(cfg.finetune_epochs):
                    total = 0.0
                    for j in torch.randperm(s, generator=gen).tolist():
                        for g, lr in zip(opt.param_groups, base_lrs):   # cosine annealing to 0 over all steps
                            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                        loss = F.mse_loss(_block(layer, x_q[j:j + 1], mask, pos_emb, pos_ids, kv).float(),
                                          y_fp[j:j + 1].float())
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        total += loss.item()
                        step += 1
                    if epoch == 0:
                        first = total / s
                    last = total / s
            with torch.no_grad():
                final = sum(F.mse_loss(_block(layer, x_q[j:j + 1], mask, pos_emb, pos_ids, kv).float(),
                                       y_fp[j:j + 1].float()).item() for j in range(s)) / s
                kept = final < before
                if not kept:   # training did not lower this block's loss: the block keeps its training-free values
                    for p, v in zip(_learned(acts, fq), start):
                        p.copy_(v)
                    final = before
                x_q = torch.cat([_block(layer, x_q[j:j + 1], mask, pos_emb, pos_ids, kv) for j in range(s)])
        finally:
            for full, lin in originals.items():
                set_module(model, full, lin)
        for full, m in fq.items():
            out[full] = m.export()
        for p, a in acts.items():
            learned_act[f"{i}.{p}"] = float(a.scale().detach())
        losses.append({"before": before, "first_epoch": first, "last_epoch": last, "after": final, "kept": kept})
        x_fp = y_fp
        if progress is not None:
            progress.set_postfix(loss=f"{before:.3g}->{final:.3g}")
            progress.update(1)
    return out, learned_act, losses
