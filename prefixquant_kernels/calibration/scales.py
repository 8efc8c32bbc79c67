"""Static scales: per-tensor activation scales of every linear input and per-head K/V scales, by grid search.

Recorded in one float forward per batch of calibration samples (``collect``), the prefix positions excluded:
per decoder layer, the inputs of the four quantizers (ArchSpec.points: q/k/v share one input, gate/up another, o,
down; a fused qkv_proj / gate_up_proj is its point's one linear), their max |x| and (for GPTQ) ``H = sum x x^T``;
and Q, K (after q/k norm and RoPE, then the online Q/K rotation when kv_rotate is on: the cache quantizes ``K H``)
and V of every head (split out of a fused qkv_proj by ArchSpec.qkv_rows).

* activation: ``s = r * max|x| / qmax`` with r on a coarse grid (0.25 .. 1.0) then a fine one (+-0.05) around the
  best, minimizing the MSE of the layer outputs ``Q(x) W^T`` against ``x W^T`` (W: the quantized weights).
* K: per KV head, r in 1.0 .. 0.55 minimizing the error of the causal softmax(Q K^T / sqrt(d)) of its query heads;
  V: per KV head, the same grid on the V reconstruction MSE.
"""
from __future__ import annotations

import sys

import torch

from .. import format as fmt
from ..models.arch import POINT_NAMES, decoder_layers, get_linear, get_spec
from ..cache.factory import rotate_heads

POINTS = POINT_NAMES   # the quantizer points of every layer; their linears: ArchSpec.points (models/arch.py)
COARSE = torch.linspace(0.25, 1.0, 8).tolist()
KV_RATIOS = torch.linspace(1.0, 0.55, 10).tolist()


class LayerStats:
    """What collect() records for one decoder layer."""

    def __init__(self):
        self.rows = {p: [] for p in POINTS}      # sampled input rows, float32 [n, K] after finish()
        self.amax = {p: 0.0 for p in POINTS}     # max |x| over every recorded position
        self.hessian = {p: None for p in POINTS}
        self.q, self.k, self.v = [], [], []      # per sample [H, T, D]

    def finish(self):
        self.rows = {p: torch.cat(r, 0) for p, r in self.rows.items()}


def _rope_fn(attn):
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


CALIB_BATCH = 4   # calibration samples per float forward (collect, prefix.record_down_proj_max)


def batches(n: int, batch_size: int):
    """Slices of range(n) of at most batch_size: the forwards a calibration pass makes."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"pqk: batch_size must be a positive int, got {batch_size!r}")
    return [slice(b, min(b + batch_size, n)) for b in range(0, n, batch_size)]


def forward_no_logits(model, ids: torch.Tensor):
    """The float forward of a calibration pass: hidden states only matter (hooks read them), so the LM head is
    evaluated on the last position alone (``logits_to_keep=1``; its [T, vocab] logits are ~20 % of a small model's
    forward)."""
    return model(ids, use_cache=False, logits_to_keep=1)


def collect(model, inputs: torch.Tensor, skip: int, rows_per_sample: int, hessian: bool,
            kv: bool, seed: int = 0, progress=None, qk_rotation: torch.Tensor | None = None,
            batch_size: int = CALIB_BATCH) -> list[LayerStats]:
    """One float forward per batch of ``batch_size`` samples of ``inputs`` int64 [S, T] (inference mode, the LM head
    on the last position only); positions < skip (the prefix) are not recorded. The hooks record every sample of a
    batch separately, in sample order, exactly as one forward per sample would (the same rows picked, the Hessian
    summed in the same order). qk_rotation: float [D, D] applied to the recorded Q and K after RoPE (None: not
    rotated). progress: a tqdm bar advanced by one per sample."""
    with torch.inference_mode():
        return _collect(model, inputs, skip, rows_per_sample, hessian, kv, seed, progress, qk_rotation, batch_size)


def _collect(model, inputs, skip, rows_per_sample, hessian, kv, seed, progress, qk_rotation, batch_size):
    spec = get_spec(model)
    layers = decoder_layers(model)
    stats = [LayerStats() for _ in layers]
    gen = torch.Generator().manual_seed(seed)
    pick = {"in_attn_hook": False}

    def point_hook(i, p):
        def hook(mod, args):
            if pick["in_attn_hook"]:    # attn_hook's own q/k/v projections: the model's call records this input
                return
            st = stats[i]
            for b, idx in enumerate(pick["idx"]):       # per sample, in sample order
                x = args[0][b, skip:].detach().float()
                st.amax[p] = max(st.amax[p], float(x.abs().amax()))
                st.rows[p].append(x[idx])
                if hessian:
                    h = x.T @ x
                    st.hessian[p] = h if st.hessian[p] is None else st.hessian[p] + h
        return hook

    head_dim = spec.head_dim(model.config)

    def attn_hook(i, layer):
        def hook(attn, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).detach()
            cos, sin = kwargs["position_embeddings"]
            shape = (*h.shape[:-1], -1, head_dim)
            pick["in_attn_hook"] = True
            try:
                q, k, v = (x.reshape(shape) for x in spec.qkv(layer, h, model.config))
            finally:
                pick["in_attn_hook"] = False
            if spec.qk_norm:
                q, k = layer.get_submodule(spec.q_norm)(q), layer.get_submodule(spec.k_norm)(k)
            q, k = _rope_fn(attn)(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            if qk_rotation is not None:
                q, k = rotate_heads(q, qk_rotation), rotate_heads(k, qk_rotation)
            v = v.transpose(1, 2)
            st = stats[i]
            for b in range(q.shape[0]):
                st.q.append(q[b, :, skip:].float())
                st.k.append(k[b, :, skip:].float())
                st.v.append(v[b, :, skip:].float())
        return hook

    hooks = []
    try:
        for i, layer in enumerate(layers):
            for p, names in spec.points.items():
                lin = get_linear(layer, names[0])   # down_proj: the input after the online rotation
                hooks.append(lin.register_forward_pre_hook(point_hook(i, p)))
            if kv:
                attn = layer.get_submodule(spec.attn)
                hooks.append(attn.register_forward_pre_hook(attn_hook(i, layer), with_kwargs=True))
        n_rec = inputs.shape[1] - skip
        for sl in batches(inputs.shape[0], batch_size):
            pick["idx"] = [torch.randperm(n_rec, generator=gen)[:rows_per_sample] for _ in range(sl.stop - sl.start)]
            forward_no_logits(model, inputs[sl])
            if progress is not None:
                progress.update(sl.stop - sl.start)
    finally:
        for h in hooks:
            h.remove()
    for st in stats:
        st.finish()
    return stats


def fake_quant_act(x: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    return fmt.quantize(x, scale, bits).float() * scale


def search_act_scale(x: torch.Tensor, weight: torch.Tensor, bits: int, amax: float | None = None,
                     search: bool = True) -> float:
    """Static per-tensor scale of a linear input. x float [n, K] (calibration rows), weight float [N, K]."""
    amax = float(x.abs().amax()) if amax is None else amax
    if amax <= 0 or not torch.isfinite(torch.tensor(amax)):
        return 1.0
    base = amax / fmt.qmax(bits)
    if not search:
        return base
    w = weight.float()
    y = x @ w.T

    seen: dict[float, float] = {}

    def err(r):     # memoized: the fine grid re-scores the coarse winner
        if r not in seen:
            seen[r] = float((fake_quant_act(x, base * r, bits) @ w.T - y).pow(2).mean())
        return seen[r]

    best = min(COARSE, key=err)
    fine = [r for r in torch.linspace(best - 0.05, best + 0.05, 6).tolist() if 0 < r <= 1.0]
    best = min(fine + [best], key=err)
    return base * best


def _causal_softmax(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    t = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = torch.ones(t, k.shape[-2], dtype=torch.bool).triu(k.shape[-2] - t + 1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


def search_kv_scales(q: list[torch.Tensor], k: list[torch.Tensor], v: list[torch.Tensor], bits: int,
                     max_queries: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-KV-head static scales. q: per sample [H_q, T, D]; k, v: per sample [H_kv, T, D] -> (fp32 [H_kv] x 2).
    Samples of one length are scored together (one batched softmax per ratio, not one per sample and ratio); the
    error is still summed per sample, in sample order."""
    if len({tuple(t.shape) for t in k}) > 1 or len({tuple(t.shape) for t in q}) > 1:
        return _search_kv_scales_per_sample(q, k, v, bits, max_queries)
    h_kv, g = k[0].shape[0], q[0].shape[0] // k[0].shape[0]
    qmax = fmt.qmax(bits)
    k_scale, v_scale = torch.empty(h_kv), torch.empty(h_kv)
    q_all, k_all, v_all = torch.stack(q), torch.stack(k), torch.stack(v)     # [S, H, T, D]
    for h in range(h_kv):
        ks = k_all[:, h]                                                     # [S, T, D]
        qs = q_all[:, h * g:(h + 1) * g, -max_queries:]                      # [S, g, Tq, D]
        ref = _causal_softmax(qs, ks.unsqueeze(1))
        base = float(ks.abs().amax()) / qmax or 1.0

        def k_err(r):
            d = (_causal_softmax(qs, fake_quant_act(ks, base * r, bits).unsqueeze(1)) - ref).pow(2)
            return sum(float(e) for e in d.flatten(1).sum(1))

        k_scale[h] = base * min(KV_RATIOS, key=k_err)
        vs = v_all[:, h]
        vbase = float(vs.abs().amax()) / qmax or 1.0

        def v_err(r):
            return sum(float(e) for e in (fake_quant_act(vs, vbase * r, bits) - vs).pow(2).flatten(1).sum(1))

        v_scale[h] = vbase * min(KV_RATIOS, key=v_err)
    return k_scale, v_scale


def _search_kv_scales_per_sample(q, k, v, bits, max_queries=128):
    """search_kv_scales one sample at a time (samples of different lengths; the reference of the batched path)."""
    h_kv, g = k[0].shape[0], q[0].shape[0] // k[0].shape[0]
    qmax = fmt.qmax(bits)
    k_scale, v_scale = torch.empty(h_kv), torch.empty(h_kv)
    for h in range(h_kv):
        ks = [kk[h] for kk in k]
        qs = [qq[h * g:(h + 1) * g, -max_queries:] for qq in q]
        ref = [_causal_softmax(qq, kk) for qq, kk in zip(qs, ks)]
        base = max(float(kk.abs().amax()) for kk in ks) / qmax or 1.0

        def k_err(r):
            return sum(float((_causal_softmax(qq, fake_quant_act(kk, base * r, bits)) - p).pow(2).sum())
                       for qq, kk, p in zip(qs, ks, ref))

        k_scale[h] = base * min(KV_RATIOS, key=k_err)
        vs = [vv[h] for vv in v]
        vbase = max(float(vv.abs().amax()) for vv in vs) / qmax or 1.0

        def v_err(r):
            return sum(float((fake_quant_act(vv, vbase * r, bits) - vv).pow(2).sum()) for vv in vs)

        v_scale[h] = vbase * min(KV_RATIOS, key=v_err)
    return k_scale, v_scale
