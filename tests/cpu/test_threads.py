"""The C++ kernels run on torch's thread pool. A build without -fopenmp compiles at::parallel_for's
`#pragma omp parallel` away and every kernel silently runs on one thread (it did, until setup.py added the flag:
2 threads then gave the same GEMM time as 1)."""
import pytest
import torch

from prefixquant_kernels import _extension

pytestmark = pytest.mark.skipif(not _extension.cpu_available(), reason="C++ extension not built")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parallel_for_uses_torch_threads(threads):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert _extension._C.parallel_threads_used(64) == threads
        assert _extension._C.parallel_threads_used(1) == 1   # one item: one chunk
    finally:
        torch.set_num_threads(before)
