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


def test_gpu_ops_table_runs_off_the_gpu(monkeypatch):
    """The GPU part's op table (selftest._ops_rows) executed here: `.cuda()` is the identity, backend="cuda" resolves
    on CPU tensors, and every pqk:: op goes to its CUDA implementation over the emulated library (test_fused_path's
    dispatch mode), so a GPU owner's first run does not die in the table's own Python (it once did: silu-mul pairs of
    an odd N). Every row must pass: the emulator computes with the reference."""
    from prefixquant_kernels.ops import backend as backend_mod

    from .test_binding import EmulatedLib, _binding_on_cpu
    from .test_fused_path import CudaShaped

    resolve = backend_mod.resolve
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    for mod in ("linear", "quantize", "transform"):
        monkeypatch.setattr(f"prefixquant_kernels.ops.{mod}.resolve",
                            lambda b, d, op, u=None: resolve("cpu" if b == "cuda" else b, d, op, u))
    rows = []
    emu = EmulatedLib()
    with _binding_on_cpu(emu), CudaShaped():
        selftest._ops_rows(rows)
    assert rows and all(r[3] == "pass" for r in rows), [r for r in rows if r[3] != "pass"]
    launched = {c[0] for c in emu.calls}
    assert {"pqk_quant_gemm_static", "pqk_int4_gemm", "pqk_quantize_static", "pqk_hadamard"} <= launched, launched


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU dry run")
def test_selftest_bench_dry_run_without_gpu(cuda_lib, capsys, monkeypatch, tmp_path):
    """--bench without a GPU runs the same e2e pipeline on the CPU with a tiny model (labelled a dry run) and writes
    every promised file; still no GPU number."""
    import json

    monkeypatch.setenv("PQK_CUDA_LIB", cuda_lib.lib)
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the benchmark runs as a user runs it
    assert selftest.main(["--bench", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dry run on the CPU (tiny model)" in out and "TOPS" not in out
    for name in ("selftest.json", "layer.json", "layer.md", "model.json", "model.md"):
        assert (tmp_path / name).exists(), name
    layer = json.loads((tmp_path / "layer.json").read_text())
    assert {r["method"] for r in layer} == {"fp", "dynamic", "static"}
    assert {r["method"] for r in json.loads((tmp_path / "model.json").read_text())} == {"fp", "static"}


def test_kv_rows_run_under_the_interpreter(monkeypatch):
    """selftest's Triton KV table (_kv_rows), here on CPU tensors under TRITON_INTERPRET=1 at small shapes: every row
    passes, and a planted wrong scale in the Triton quantizer turns its rows into FAIL (the table can fail)."""
    monkeypatch.setattr(selftest, "KV_SHAPES", [(1, 2, 32, 64, "float16"), (2, 3, 9, 32, "bfloat16")])
    monkeypatch.setattr(selftest, "ATTENTION_SHAPES", [(1, 8, 2, 1, 40, 64, "float16"), (2, 4, 2, 0, 17, 32,
                                                                                        "bfloat16")])
    rows = []
    selftest._kv_rows(rows, "cpu")
    assert len(rows) >= 20 and all(r[3] == "pass" for r in rows), [r for r in rows if r[3] != "pass"]
    from prefixquant_kernels.ops import kv as kv_ops
    real = kv_ops.kv_quantize

    def planted(x, scale, bits=4, *, backend="auto"):
        return real(x, scale * 1.5 if backend == "triton" else scale, bits, backend=backend)
    monkeypatch.setattr(kv_ops, "kv_quantize", planted)
    rows = []
    selftest._kv_rows(rows, "cpu")
    assert any(r[3] == "FAIL" and r[0].startswith("kv_quantize ") for r in rows)
