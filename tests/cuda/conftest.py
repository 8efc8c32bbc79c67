"""Fixtures of the CUDA tests: one cached nvcc build of libpqk_cuda.so for sm_80/86/89/90 per session
(prefixquant_kernels.cuda_build; ~70 s the first time on 2 cores, cached by source hash afterwards)."""
from __future__ import annotations

import os

import pytest

from prefixquant_kernels import cuda_build


@pytest.fixture(scope="session")
def cuda_lib():
    if cuda_build.nvcc_path() is None:
        pytest.skip("nvcc not found: the CUDA build tests need the CUDA toolkit (no GPU needed)")
    return cuda_build.build_library(cuda_build.ARCHS)


@pytest.fixture(scope="session")
def cuda_lib_path(request) -> str:
    """The library the GPU tests run: $PQK_CUDA_LIB where set (a GPU session carries a build made elsewhere, with
    the same nvcc), else this tree's build (cuda_lib)."""
    return os.environ.get("PQK_CUDA_LIB") or request.getfixturevalue("cuda_lib").lib
