"""RotatedLinear: ``y = linear(x @ R)`` with an orthogonal ``R`` applied online (QuaRot's online Hadamard on the
down_proj input, which spreads the channel outliers of ``act(gate) * up`` before it is quantized). The linear's
weight holds ``W R`` (folded offline), so the float function is unchanged.

Two forms of R (``form``), both computed in fp32 and returned in x's dtype:

* ``"hadamard"``: ``R = diag(signs) @ hadamard_rotation(K).T`` (a randomized Walsh-Hadamard matrix), held as the
  buffer ``signs`` float32 [K] (+-1) and applied with the fast transform in O(K log K + K m):
  ``x @ R = hadamard_transform(x * signs)`` (``pqk.ops.hadamard_transform``: the CUDA kernel on CUDA tensors).
  Needs ``hadamard.hadamard_factor(K)`` to succeed (K = m * 2^p, m = 1 or in hadamard.SUPPORTED_M).
* ``"dense"``: the buffer ``rotation`` float32 [K, K], any orthogonal matrix, one [K, K] matmul per token. The
  fallback for the K hadamard_factor rejects (e.g. Qwen2-0.5B's 4864 = 19 * 256), and the form of a checkpoint's
  rotation that is not a randomized Hadamard of this package's convention.

The checkpoint records the form (checkpoint.py's ``rotations``), so loading rebuilds the same buffers.
"""
from __future__ import annotations

import torch
from torch import nn

from ..hadamard import hadamard_factor, hadamard_rotation, hadamard_transform as _hadamard_transform_ref
from ..ops.transform import hadamard_transform

FORMS = ("hadamard", "dense")


def fold_hadamard(weight: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``W R`` for ``R = diag(signs) @ hadamard_rotation(K).T``: W [N, K] -> [N, K] in float64 (each row w becomes
    ``w R = hadamard_transform(w * signs)``, the transform along K in float64; exact up to fp64 rounding)."""
    return _hadamard_transform_ref(weight.double() * signs.double())


def rotate(x: torch.Tensor, *, signs: torch.Tensor | None = None, rotation: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> x @ R, computed in fp32, in x's dtype: R = diag(signs) @ hadamard_rotation(K).T (Hadamard
    form, the fast transform) or the dense [K, K] ``rotation``. Shared by RotatedLinear and the vLLM plugin."""
    if signs is not None:
        return hadamard_transform(x.float() * signs.float()).to(x.dtype)
    return (x.float() @ rotation.float()).to(x.dtype)


class RotatedLinear(nn.Module):
    """linear: the nn.Linear or QuantLinear it feeds. Exactly one of
    rotation: float32 [K, K] orthogonal (dense form, buffer ``rotation``), or
    signs: [K] of +-1 (Hadamard form, buffer ``signs`` float32; ``R = diag(signs) @ hadamard_rotation(K).T``).
    Both buffers are saved in the state dict; ``form`` says which one the module holds."""

    def __init__(self, linear: nn.Module, rotation: torch.Tensor | None = None, *, signs: torch.Tensor | None = None):
        super().__init__()
        if (rotation is None) == (signs is None):
            raise ValueError("pqk.RotatedLinear: give exactly one of rotation ([K, K], dense) or signs ([K], Hadamard)")
        self.linear = linear
        if signs is not None:
            if signs.dim() != 1:
                raise ValueError(f"pqk.RotatedLinear: signs must be 1-D [K], got shape {tuple(signs.shape)}")
            try:
                hadamard_factor(signs.shape[0])
            except ValueError as e:
                raise ValueError(f"pqk.RotatedLinear: signs: {e}") from None
            self.form = "hadamard"
            self.register_buffer("signs", signs.float().contiguous())
        else:
            if rotation.dim() != 2 or rotation.shape[0] != rotation.shape[1]:
                raise ValueError(f"pqk.RotatedLinear: rotation must be square [K, K], got {tuple(rotation.shape)}")
            self.form = "dense"
            self.register_buffer("rotation", rotation.float().contiguous())

    @classmethod
    def empty(cls, linear: nn.Module, form: str, n: int, device=None) -> RotatedLinear:
        """A wrapper of the given form whose buffer a state dict will overwrite (identity signs / rotation)."""
        if form == "hadamard":
            return cls(linear, signs=torch.ones(n, device=device))
        if form == "dense":
            return cls(linear, torch.eye(n, device=device))
        raise ValueError(f"pqk.RotatedLinear: form must be one of {FORMS}, got {form!r}")

    @property
    def in_features(self) -> int:
        return (self.signs if self.form == "hadamard" else self.rotation).shape[0]

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def dense_rotation(self) -> torch.Tensor:
        """R as a float64 [K, K] matrix (for tests and folding; dense, so only for moderate K)."""
        if self.form == "dense":
            return self.rotation.double()
        return self.signs.double().cpu()[:, None] * hadamard_rotation(self.in_features).T

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x @ R, computed in fp32, in x's dtype."""
        if self.form == "hadamard":
            return rotate(x, signs=self.signs)
        return rotate(x, rotation=self.rotation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.rotate(x))

    def extra_repr(self) -> str:
        return f"form={self.form!r}, in_features={self.in_features}"
