"""KV-cache tests: the Triton kernels run under the interpreter on CPU tensors (no GPU needed).

TRITON_INTERPRET must be set before triton.jit decorates the kernels, i.e. before
prefixquant_kernels.triton is first imported (the op layer imports it lazily)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from prefixquant_kernels.ops.backend import resolve  # noqa: E402

# "auto" for an op without a C++ kernel: Triton when the interpreter runs here, else the reference
KV_BACKENDS = ["reference"] + (["triton"] if resolve("auto", torch.device("cpu"), "kv_quantize_groupwise").kind ==
                               "triton" else [])
needs_triton = pytest.mark.skipif("triton" not in KV_BACKENDS, reason="triton (interpreter) not available")


def rand_kv(shape, dtype, gen: torch.Generator, spread: float = 4.0) -> torch.Tensor:
    """Gaussian K/V with a few far outliers per row, so clamping and both signs are exercised."""
    x = torch.randn(shape, generator=gen) * spread
    spikes = torch.rand(shape, generator=gen) < 0.02
    x = torch.where(spikes, x * 50, x)
    return x.to(dtype)


def assert_within_rounding(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to one rounding of out's dtype (the float parts of the KV kernels)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=torch.finfo(out.dtype).eps, atol=0)
