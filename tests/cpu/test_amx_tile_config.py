"""The AMX prefill kernels load the tile configuration once per GEMM and thread, not on every micro-kernel call
(csrc/cpu/amx_kernels.cpp, t_configured; docs/PERF.md step 29). Between our GEMMs oneDNN's own AMX kernels (here
torch's bf16 F.linear) load their configuration on the same threads, and our flush releases the tiles: each GEMM
must configure again. Run in a fresh process, since a tile instruction with no
configuration loaded kills it (SIGILL): our GEMMs with different last row blocks (16 + 16, 16 + 4, 4 + 0 rows)
interleaved with oneDNN's AMX ops, every output equal to the reference's."""
import subprocess
import sys
import textwrap

import pytest

from ..conftest import KERNEL_BACKENDS

SCRIPT = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    import prefixquant_kernels as pqk
    from prefixquant_kernels import format as fmt

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    K, N = 640, 96
    w = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    wp, ws = fmt.pack_int4(w), torch.rand(N, generator=gen) + 0.5
    xb, wb = torch.randn(128, 256).bfloat16(), torch.randn(192, 256).bfloat16()
    for rnd in range(3):
        for M in (128, 84, 100, 64):  # last row block 16 + 16, 16 + 4, 4 + 0, 16 + 16 rows
            a = torch.randint(-8, 8, (M, K), generator=gen, dtype=torch.int8)
            ap = fmt.pack_int4(a)
            ours = pqk.int4_matmul(ap, wp, 0.5, ws, out_dtype=torch.float32, backend="cpu:amx")
            ref = pqk.int4_matmul(ap, wp, 0.5, ws, out_dtype=torch.float32, backend="reference")
            assert torch.equal(ours, ref), (rnd, M)
            F.linear(xb, wb)  # oneDNN's AMX bf16 brgemm on the same threads
    print("ok")
""")


@pytest.mark.skipif("cpu:amx" not in KERNEL_BACKENDS, reason="no AMX on this CPU")
def test_tiles_configured_again_after_other_amx_code():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (
        f"rc {r.returncode} (a negative rc is the signal: -4 SIGILL, a tile instruction with no configuration)\n"
        f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
