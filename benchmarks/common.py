"""What every benchmark script here shares: timing (median and spread, interleaved in alternating order), the
machine description, the machine's anchors (copy bandwidth, best torch matmul rate) measured in the same run,
peak-memory probes, and writing JSON + markdown (+ a PNG) next to each other.

Timings synchronize CUDA before reading the clock when the device is CUDA, so a GPU time is the kernel's, not the
launch's. Nothing here hard-codes a number: every figure a script reports comes from these functions in that run.
"""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- timing -----------------------------------------------------------------------------------------------------

def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def summarize(ts_seconds: list[float]) -> dict:
    """Seconds -> {median_ms, min_ms, max_ms, q1_ms, q3_ms, repeats}; the quartiles are the median's for 1 run."""
    ms = sorted(t * 1e3 for t in ts_seconds)
    med = statistics.median(ms)
    q1, q3 = (statistics.quantiles(ms, n=4, method="inclusive")[::2] if len(ms) >= 2 else (med, med))
    return {"median_ms": med, "min_ms": ms[0], "max_ms": ms[-1], "q1_ms": q1, "q3_ms": q3, "repeats": len(ms)}


def timeit(fn, repeats: int, warmup: int = 1, device=None) -> dict:
    """warmup untimed calls, then the median and spread of ``repeats`` timed ones (see summarize)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return summarize(ts)


def timeit_budget(fn, repeats: int, budget_s: float, device=None) -> dict:
    """timeit for calls whose cost is unknown (a torch baseline may take a minute on a CPU without the right
    instructions): the first call is the warm-up and is timed; if it took longer than budget_s / repeats, only
    as many further runs as fit the budget (at least one) are timed. ``repeats`` in the result says how many."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    n = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
    return timeit(fn, n, warmup=0, device=device)


def round_order(items: list, r: int) -> list:
    """Round r's order of interleaved items: a shuffle (seeded by r // 2, the same on every run) in even rounds, the
    previous round's reversed in odd ones, so that drift on a shared machine hits all items alike and no item follows
    the same one round after round. A fixed order measurably favoured whichever ran second; reversal alone (or with
    a rotation, which keeps the cyclic order) put our W4A4 GEMM right after torch's fp32 linear every other round,
    and on the Zen 4 VM the first of our GEMMs after torch's 117 MB output was freed paid ~50 ms of the kernel's page
    work (docs/PERF.md step 32): a median over 5 rounds took that as its time."""
    order = random.Random(r // 2).sample(items, len(items))
    return order if r % 2 == 0 else order[::-1]


def timeit_interleaved(fns: dict, repeats: int, device=None) -> dict:
    """Time several functions in alternation (round_order: each round in another order); returns {name:
    summarize-style dict}."""
    for fn in fns.values():
        fn()
    _sync(device)
    ts = {name: [] for name in fns}
    items = list(fns.items())
    for r in range(repeats):
        for name, fn in round_order(items, r):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts[name].append(time.perf_counter() - t0)
    return {name: summarize(v) for name, v in ts.items()}


# ---- the machine ------------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """CPU/GPU name, threads, torch/triton/transformers versions, the package's CPU ISA."""
    from prefixquant_kernels import _extension

    info = {"device": str(device), "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "pqk_isa": _extension._C.best_cpu_isa() if _extension.cpu_available() else None,
            "python": platform.python_version(), "gpu": None, "cuda": torch.version.cuda}
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def machine_line(m: dict) -> str:
    where = f"GPU {m['gpu']} (sm_{m.get('gpu_capability', '?')})" if m.get("gpu") else "CPU"
    return (f"Machine: {m['cpu']}, {m['threads']} threads, {where}; torch {m['torch']} "
            f"({m['torch_cpu_capability']}), triton {m['triton']}, transformers {m['transformers']}, "
            f"pqk ISA {m['pqk_isa']}. Measured on {where} in this run.")


_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def anchors(repeats: int, device: str = "cpu", size: int = 1024, copy_mib: int = 256) -> dict:
    """The machine's roofline, measured now: copy bandwidth (read + write), a read-only stream, and torch's
    matmul rate for every float dtype at size^3 (the best of them is the compute anchor the scripts use).
    On CPU fp16 matmul has no fast kernel on most x86 (it is skipped unless the device is CUDA)."""
    src = torch.empty(copy_mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), repeats, device=device)
    out = {"copy_GBps_read_plus_write": 2 * src.numel() / (t["median_ms"] / 1e3) / 1e9}
    flt = src.view(torch.float32).fill_(1.0)
    t = timeit(lambda: flt.amax(), repeats, device=device)  # a vectorized read-only stream
    out["read_GBps"] = flt.numel() * 4 / (t["median_ms"] / 1e3) / 1e9
    del src, dst, flt
    m = n = k = size
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if torch.device(device).type == "cuda" else [])
    best = 0.0
    for dt in dtypes:
        a = torch.randn(m, k, device=device).to(dt)
        b = torch.randn(n, k, device=device).to(dt)
        t = timeit_budget(lambda: a @ b.T, repeats, budget_s=10.0, device=device)
        rate = 2 * m * n * k / (t["median_ms"] / 1e3) / 1e9
        out[f"{_SHORT[dt]}_matmul_{size}_GFLOPs"] = rate
        best = max(best, rate)
    out["best_matmul_GFLOPs"] = best
    return out


# ---- memory -----------------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """The process's peak resident set during a ``with`` block, minus the resident set at its start (Linux:
    the kernel's high-water mark VmHWM, reset at entry by writing 5 to /proc/self/clear_refs). ``delta_bytes``
    is None where that is not available."""

    def __enter__(self):
        self.ok = True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.ok = False
        self.start = _status_kib("VmRSS")
        self.delta_bytes = None
        return self

    def __exit__(self, *exc):
        hwm = _status_kib("VmHWM")
        if self.ok and hwm is not None and self.start is not None:
            self.delta_bytes = max(0, hwm - self.start) * 1024
        return False


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer a module holds (each tensor counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ---- output -----------------------------------------------------------------------------------------------------

def write_outputs(json_path: str, data, markdown: str) -> tuple[str, str]:
    """JSON at json_path, the markdown next to it (same stem, .md); returns both paths."""
    d = os.path.dirname(os.path.abspath(json_path))
    os.makedirs(d, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    md_path = os.path.splitext(json_path)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(markdown + "\n")
    return json_path, md_path


def fmt_spread(r: dict) -> str:
    return f"{r['min_ms']:.2f}–{r['max_ms']:.2f}"
