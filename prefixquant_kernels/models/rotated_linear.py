"""RotatedLinear: ``y = linear(x @ R)`` with an orthogonal ``R`` applied online (QuaRot's online Hadamard on the
down_proj input, which spreads the channel outliers of ``act(gate) * up`` before it is quantized). The linear's
weight holds ``W R`` (folded offline), so the float function is unchanged."""
from __future__ import annotations

import torch
from torch import nn


class RotatedLinear(nn.Module):
    """rotation: float32 [K, K] orthogonal (buffer, saved); linear: the nn.Linear or QuantLinear it feeds."""

    def __init__(self, linear: nn.Module, rotation: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("rotation", rotation.float().contiguous())

    @property
    def in_features(self) -> int:
        return self.rotation.shape[0]

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x.float() @ self.rotation).to(x.dtype))
