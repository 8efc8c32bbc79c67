"""A large CPU GEMM output is asked for 2 MB huge pages before the kernel writes it (csrc/cpu/torch_ops.cpp,
empty_output; docs/PERF.md step 28): the memory mapping holding it carries the kernel's "hg" flag (MADV_HUGEPAGE)
in /proc/self/smaps, for each of the three GEMM ops, and the values are the reference's."""
import os
import sys

import pytest
import torch

import prefixquant_kernels as pqk  # noqa: F401 (registers the ops)
from prefixquant_kernels.ops import linear, quantize

from ..conftest import needs_kernels

HUGE = 1 << 21
THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode() -> str:
    try:
        with open(THP) as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "none"


needs_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() not in ("madvise", "always"),
                               reason="Linux with transparent huge pages (madvise or always) only")


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds addr."""
    inside = False
    with open(f"/proc/{os.getpid()}/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def _advised(t: torch.Tensor) -> bool:
    first_huge = (t.data_ptr() + HUGE - 1) // HUGE * HUGE  # the first 2 MB boundary inside the buffer
    assert first_huge + 2 * HUGE <= t.data_ptr() + t.nbytes, "the test's output is too small to hold huge pages"
    return "hg" in _vm_flags(first_huge)


@needs_kernels
@needs_thp
@pytest.mark.parametrize("op", ["int4_matmul", "quant_linear", "quant_linear_multi"])
def test_large_output_asks_for_huge_pages(op, gen):
    m, k, n = 300, 64, 9000  # float32 out: 10.8 MB, five whole huge pages at least
    x = torch.randn(m, k, generator=gen) * 2
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    w_scale = (torch.rand(n, generator=gen) + 0.01) * 0.05
    a_scale = torch.tensor(0.04)
    want = linear.quant_linear(x, w, w_scale, a_scale, 4, backend="reference")
    if op == "int4_matmul":
        a = quantize.quantize_static(x, a_scale, 4)
        got = [torch.ops.pqk.int4_matmul(a, w, a_scale.reshape(1), w_scale, None, torch.float32, -1)]
    elif op == "quant_linear":
        got = [torch.ops.pqk.quant_linear(x, w, w_scale, a_scale, 4, None, -1)]
    else:
        got = torch.ops.pqk.quant_linear_multi(x, [w, w[:7]], [w_scale, w_scale[:7]], [a_scale, a_scale], 4,
                                               [None, None], -1)
    assert torch.equal(got[0], want)
    assert _advised(got[0])
