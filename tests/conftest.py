"""Shared test helpers: backends to sweep, random int-range tensors, heap poisoning."""
from __future__ import annotations

import os

# Triton kernels run on CPU tensors under the interpreter. triton.jit decides interpreted vs compiled when a
# kernel module is *imported*, so this must be set before any test (or collected module) imports one.
os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib

import pytest
import torch

import prefixquant_kernels as pqk

BACKENDS = pqk.available_backends()              # e.g. reference, cpu:scalar, cpu:avx2
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]


def poison_heap(nbytes: int) -> None:
    """Fill and free a few blocks of the output's size so that a kernel that forgets to write part of a
    freshly allocated output returns garbage (0x7F bytes: NaN for floats, 127 for ints) instead of zeros."""
    blocks = [torch.full((max(nbytes, 64),), 0x7F, dtype=torch.uint8) for _ in range(4)]
    del blocks


def rand_int(shape, bits: int, gen: torch.Generator) -> torch.Tensor:
    """int8 tensor uniform over the full range [-2^(b-1), 2^(b-1) - 1]."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    return torch.randint(lo, hi, shape, dtype=torch.int8, generator=gen)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A fresh generator per test, seeded from the test id, so failures reproduce."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


needs_kernels = pytest.mark.skipif(not KERNEL_BACKENDS, reason="C++ extension not built")
