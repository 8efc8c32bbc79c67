"""`python -m prefixquant_kernels selftest` on this (GPU-less) machine: the host harnesses pass, the nvcc build
has no spills, and the GPU part says it was skipped instead of printing any number."""
from __future__ import annotations

import pytest
import torch

from prefixquant_kernels import selftest


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU report")
def test_selftest_without_gpu(cuda_lib, capsys, monkeypatch):
    monkeypatch.setenv("PQK_CUDA_LIB", cuda_lib.lib)  # the session's build (no second nvcc run)
    assert selftest.main([]) == 0
    out = capsys.readouterr().out
    for name in ("host:gemm_harness", "host:quantize_harness"):
        assert any(line.startswith(name) and line.rstrip().endswith("pass") for line in out.splitlines()), out
    assert "skipped (no CUDA GPU here)" in out
    assert "TOPS" not in out  # never a GPU speed without a GPU
