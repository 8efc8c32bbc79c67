"""libpqk_cuda.so called through ctypes. The argument checks run before any CUDA call, so they are tested here
without a GPU; the kernels run only where torch sees a CUDA device (skipped otherwise)."""
from __future__ import annotations

import pytest
import torch

from prefixquant_kernels import reference, selftest

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def lib(cuda_lib):
    return selftest.load_library(cuda_lib.lib)


@pytest.mark.parametrize("m,n,k,epi,want", [
    (4, 8, 48, 0, -2),     # K % 32 != 0: the caller must pad K with zeros (int4_matmul raises)
    (0, 8, 64, 0, -1),     # empty
    (4, 6, 64, 4, -4),     # silu-mul requant needs N % 4 == 0
    (4, 8, 64, 9, -5),     # unknown epilogue
])
def test_bad_arguments_return_status(lib, m, n, k, epi, want):
    st = lib.pqk_int4_gemm(64, 64, 64, 64, 0, 64, None, 1.0, m, n, k, epi, -1, None)
    assert st == want
    assert lib.pqk_cuda_error_string(st).decode()


@needs_gpu
@pytest.mark.parametrize("m", [1, 3, 17, 118, 300])
@pytest.mark.parametrize("config", [-1, 0, 1, 2])
def test_gemm_bit_exact_fp32(lib, m, config):
    g = torch.Generator().manual_seed(m)
    n, k = 72, 160
    a = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, generator=g)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    a_s, w_s, b = torch.rand(m, generator=g) + 0.01, torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g)
    out = torch.empty(m, n, device="cuda")
    selftest.gemm(lib, a.cuda(), w.cuda(), a_s.cuda(), w_s.cuda(), b.cuda(), out, epilogue=2, config=config)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), reference.int4_matmul(a, w, a_s, w_s, b, torch.float32))
