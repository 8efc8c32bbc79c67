"""A/B of the CPU instruction-set kernels on one GEMM, in one process (so both see the same machine state):

    python benchmarks/cpu_isa_ab.py --threads 2 [--shape 2048x4096x4096] [--repeats 3]

int4_matmul (packed int4 A and W, fp32 out) on every cpu:* backend pqk.available_backends() lists except scalar,
in alternating order; prints the best-of-repeats time and TOPS per backend per round (docs/PERF.md step 12)."""
from __future__ import annotations

import argparse
import time

import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import format as fmt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", default="2048x4096x4096", help="MxNxK")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m, n, k = (int(v) for v in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    a = fmt.pack_int4(torch.randint(-8, 8, (m, k), dtype=torch.int8, generator=g))
    w = fmt.pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g))
    ws = torch.rand(n, generator=g) + 0.1
    backends = [b for b in pqk.available_backends() if b.startswith("cpu:") and b != "cpu:scalar"]
    print(f"{m}x{n}x{k}, {args.threads} threads, best of {args.repeats}")
    for r in range(args.rounds):
        for be in backends if r % 2 == 0 else backends[::-1]:
            pqk.int4_matmul(a, w, 0.05, ws, None, torch.float32, backend=be)  # warm-up
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                pqk.int4_matmul(a, w, 0.05, ws, None, torch.float32, backend=be)
                best = min(best, time.perf_counter() - t)
            print(f"round {r} {be:16s} {best * 1e3:8.1f} ms  {2 * m * n * k / best / 1e12:.3f} TOPS")


if __name__ == "__main__":
    main()
