"""The launchers declared in csrc/cuda/pqk_cuda.h, parsed from the header (tests/cuda/test_binding.py checks them
against prefixquant_kernels.ops.cuda_library.SIGNATURES)."""
from __future__ import annotations

import re


def header_signatures(header: str) -> dict[str, list[str]]:
    """{function name: [parameter C types]} of the functions declared in pqk_cuda.h."""
    with open(header) as f:
        text = re.sub(r"//[^\n]*", "", f.read())
    out = {}
    for m in re.finditer(r"(?:int|long|const char\s*\*)\s+(pqk_\w+)\s*\(([^)]*)\)\s*;", text):
        params = [" ".join(p.split()) for p in m.group(2).split(",")]
        out[m.group(1)] = [re.sub(r"\s*\b\w+$", "", p) for p in params]
    return out
