"""Offline rotation (QuaRot-style), folded into the float weights before calibration. Which linears read or write
the residual stream, which norms feed them and where V's rows are come from the family's ArchSpec (models/arch.py):
Phi-3's fused qkv_proj / gate_up_proj are readers like q/k/v and gate/up, its V rows are qkv_proj's last H_kv * D.

1. Every RMSNorm's weight is folded into the linears that read it (q/k/v, gate/up, lm_head); the norm weight
   becomes 1, so ``RMSNorm(x Q) = RMSNorm(x) Q`` for any orthogonal Q.
2. The residual stream is rotated by one orthogonal ``Q [d, d]``: embeddings ``E Q``; readers (q/k/v, gate/up,
   lm_head) ``W Q``; writers (o_proj, down_proj) ``Q^T W``. A tied lm_head is untied first.
3. down_proj gets an online rotation ``R [I, I]``: ``down_proj(z) = (Q^T W R) (z R)^T``, as a RotatedLinear.
   When ``hadamard_factor(I)`` succeeds (I = m * 2^p, e.g. 1536 = 12 x 128, 14336 = 28 x 512) R is a randomized
   Walsh-Hadamard matrix ``diag(signs) @ hadamard_rotation(I).T`` (``down_rotation``): the RotatedLinear keeps only
   the signs [I] and applies ``z R = hadamard_transform(z * signs)`` with the fast transform (O(I log I + I m) per
   token; the CUDA kernel on CUDA tensors). Otherwise (e.g. Qwen2-0.5B's 4864 = 19 x 256) R is a dense random
   orthogonal matrix [I, I] (``random_orthogonal``), one [I, I] matmul per token.

4. (QuantConfig.kv_rotate, ``rotate_kv``) the KV cache's space, per head of head_dim D: V by a Hadamard ``H_v``
   folded offline (v_proj output side ``H_v^T`` per KV head, o_proj input side ``H_v`` per query head: every query
   head reads its KV head's rotated values, so GQA needs nothing more), and Q/K by ``H_qk`` online after RoPE
   (models/attention.py: RoPE forbids folding it), which ``rotate_kv`` returns.

Q and the KV rotations are randomized Hadamard matrices (``H diag(+-1) / sqrt(n)``) when n is a power of 2, else
random orthogonal matrices (QR of a Gaussian); being folded offline (Q, H_v) or [D, D] (H_qk), they cost nothing or
little online. The float model's outputs are unchanged up to rounding. ``undo`` restores the model exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from ..hadamard import hadamard_factor
from ..models.arch import decoder_layers, get_spec, set_module
from ..models.rotated_linear import RotatedLinear, fold_hadamard


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """float64 [n, n] orthogonal: randomized Hadamard for a power of 2, else QR of a Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
        return h * signs / n ** 0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def random_signs(n: int, seed: int) -> torch.Tensor:
    """float64 [n] of +-1, drawn as random_orthogonal draws its Hadamard signs."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1


def down_rotation(n: int, seed: int) -> torch.Tensor:
    """The down_proj's online rotation R for input width n, as RotatedLinear takes it: float64 signs [n] (the
    Hadamard form, ``R = diag(signs) @ hadamard_rotation(n).T``) when hadamard_factor(n) succeeds, else a dense
    random orthogonal [n, n] (module doc, step 3)."""
    try:
        hadamard_factor(n)
    except ValueError:
        return random_orthogonal(n, seed)
    return random_signs(n, seed)


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    w = norm.weight.detach().double()
    for lin in readers:
        lin.weight.data = (lin.weight.detach().double() * w).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0)


def _read(lin: nn.Linear, q: torch.Tensor) -> None:      # input side: W Q
    lin.weight.data = (lin.weight.detach().double() @ q).to(lin.weight.dtype)


def _write(lin: nn.Linear, q: torch.Tensor) -> None:     # output side: Q^T W (and the bias)
    lin.weight.data = (q.T @ lin.weight.detach().double()).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.detach().double() @ q).to(lin.bias.dtype)


# Seeds of the KV rotations, apart from the residual's (seed) and the down_proj's (seed + 1 + layer).
QK_SEED_OFFSET, V_SEED_OFFSET = 1 << 20, (1 << 20) + 1


def head_dim(model) -> int:
    return get_spec(model).head_dim(model.config)


def backup(model) -> dict:
    """What undo() needs: every tensor, and whether the head was tied."""
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
            "tie_cfg": getattr(model.config, "tie_word_embeddings", None)}


def undo(model, saved: dict) -> None:
    """Back to the float model as it was before rotate_model (after a failure)."""
    spec = get_spec(model)
    for layer in decoder_layers(model):
        down = layer.get_submodule(spec.down)
        if isinstance(down, RotatedLinear):
            set_module(layer, spec.down, down.linear)
    if saved["tied"]:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    if saved["tie_cfg"] is not None:
        model.config.tie_word_embeddings = saved["tie_cfg"]
    model.load_state_dict(saved["state"])


def _fold_down(lin: nn.Linear, r: torch.Tensor) -> None:   # input side W R, either form of down_rotation
    if r.dim() == 1:
        lin.weight.data = fold_hadamard(lin.weight.detach(), r).to(lin.weight.dtype)
    else:
        _read(lin, r)


def wrap_down_proj(model, rotations: list[torch.Tensor] | None = None) -> None:
    """Put a RotatedLinear around every down_proj: rotations[i] as down_rotation returns it (1-D: the Hadamard form's
    signs, 2-D: a dense rotation); identity dense rotations when none are given (the structure only)."""
    spec = get_spec(model)
    for i, layer in enumerate(decoder_layers(model)):
        lin = layer.get_submodule(spec.down)
        r = torch.eye(lin.in_features) if rotations is None else rotations[i]
        set_module(layer, spec.down, RotatedLinear(lin, signs=r) if r.dim() == 1 else RotatedLinear(lin, r))


@torch.no_grad()
def rotate_model(model, seed: int = 0) -> None:
    """Rotate a float model of a registered family in place (module doc)."""
    spec = get_spec(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is emb.weight:                    # untie: the head is rotated on its input side only
        head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    d = emb.weight.shape[1]
    q = random_orthogonal(d, seed)
    emb.weight.data = (emb.weight.detach().double() @ q).to(emb.weight.dtype)
    layers = decoder_layers(model)
    rots = []
    for i, layer in enumerate(layers):
        for point, norm in spec.point_norms.items():    # the readers of the residual stream, after their norm
            readers = [layer.get_submodule(n) for n in spec.points[point]]
            _fold_norm(layer.get_submodule(norm), readers)
            for lin in readers:
                _read(lin, q)
        for name in spec.residual_writers:
            _write(layer.get_submodule(name), q)
        down = layer.get_submodule(spec.down)
        r = down_rotation(down.in_features, seed + 1 + i)
        _fold_down(down, r)
        rots.append(r)
    _fold_norm(model.get_submodule(spec.final_norm), [head])
    _read(head, q)
    wrap_down_proj(model, rots)


@torch.no_grad()
def rotate_values(model, rotation: torch.Tensor) -> None:
    """Fold ``rotation`` float64 [D, D] into every layer's V (exact in float, step 4 of the module doc):
    ``v_h -> v_h H`` for every KV head h (v_proj weight rows and bias), ``o_proj`` input columns of every query head
    ``W_o[:, head] -> W_o[:, head] H`` (so ``o_proj`` sees ``(o_h H) H^T = o_h``). A fused qkv_proj: only its V rows
    (ArchSpec.qkv_rows) change."""
    d = rotation.shape[0]
    spec = get_spec(model)
    rows = spec.qkv_rows(model.config)[2]
    for layer in decoder_layers(model):
        v, o = layer.get_submodule(spec.v), layer.get_submodule(spec.o)
        wv = v.weight.detach().double().clone()
        w = wv[rows]                                                     # [H_kv * D, hidden]
        wv[rows] = (rotation.T @ w.reshape(-1, d, w.shape[1])).reshape(w.shape)   # per KV head: H^T W_h
        v.weight.data = wv.to(v.weight.dtype)
        if v.bias is not None:
            b = v.bias.detach().double().clone()
            b[rows] = (b[rows].reshape(-1, d) @ rotation).reshape(-1)
            v.bias.data = b.to(v.bias.dtype)
        wo = o.weight.detach().double()                                  # [hidden, H_q * D]
        o.weight.data = (wo.view(wo.shape[0], -1, d) @ rotation).reshape(wo.shape).to(o.weight.dtype)


@torch.no_grad()
def rotate_kv(model, seed: int = 0) -> torch.Tensor:
    """Fold the V rotation into the model (``rotate_values``) and return the Q/K rotation float64 [D, D] that the
    caller applies online after RoPE (to the recorded Q/K, the prefix keys, and through the model's state)."""
    d = head_dim(model)
    rotate_values(model, random_orthogonal(d, seed + V_SEED_OFFSET))
    return random_orthogonal(d, seed + QK_SEED_OFFSET)
