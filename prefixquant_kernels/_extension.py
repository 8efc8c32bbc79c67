"""Loads the compiled C++ extension (prefixquant_kernels._C) if it was built.

Importing it registers the CPU implementations of the torch.ops.pqk.* ops (csrc/cpu/torch_ops.cpp);
the op schemas must exist first, so prefixquant_kernels.ops.library imports this module after defining them.
"""
from __future__ import annotations

_C = None
IMPORT_ERROR: str | None = None

try:  # pragma: no cover - depends on the build
    from . import _C  # type: ignore[attr-defined,no-redef]
except ImportError as e:  # not built (no compiler, PQK_NO_EXTENSION=1) or built against another torch
    IMPORT_ERROR = str(e)


def cpu_available() -> bool:
    return _C is not None


def require_cpu_extension(op: str) -> None:
    if _C is None:
        raise RuntimeError(
            f"{op}: backend='cpu' needs the C++ extension prefixquant_kernels._C, which is not available "
            f"({IMPORT_ERROR}). Reinstall with a C++ compiler: pip install --no-build-isolation -e . "
            "or use backend='reference'."
        )
