"""Ahead-of-time compile of every Triton kernel in prefixquant_kernels/triton for the GPUs the package targets
(sm_80, sm_86, sm_89, sm_90), at the constexprs the launch wrappers use, without a GPU: ``triton.compile`` of an
``ASTSource`` runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas) for a ``GPUTarget``. The registers
and spills come from ptxas' ``-v`` log (``TRITON_DUMP_PTXAS_LOG=1``; ``CompiledKernel.n_regs`` / ``n_spills`` are only
filled in when the module is loaded on a device).

The kernels' tests (tests/kv) run them under TRITON_INTERPRET=1, where ``triton.jit`` returns an interpreted
function that cannot be compiled, so the compiles run in a child process with TRITON_INTERPRET=0 and a fresh
TRITON_CACHE_DIR (a cache hit would skip ptxas and its log). Run this file directly to print the table:
``python tests/kv/test_triton_aot.py``.

What is compiled (a representative set, not the full cross product, to stay near a minute on 2 cores):
* decode attention split kernel: G (query heads per KV head) 8 and 1 x head dim 128 and 64 x bits 4 and 8 on every
  arch for the heaviest (G=8, D=128, both bits, fp16 queries), the rest on sm_80 and sm_90, plus bf16/fp32 queries
  and G=3, 4 once;
* its merge kernel: D 64 and 128 on every arch;
* kv_quantize_static (bits 4, 8), kv_quantize_groupwise (bits 2 and 4 x token/channel groups of 32),
  kv_dequant_concat (static bits 4/8, group-wise bits 2/4 token/channel, with and without LogQuant positions):
  D 128 on sm_80 and sm_90, D 64 on sm_86/89 for a subset.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHS = (80, 86, 89, 90)

_FLOAT = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _split(G, D, bits, q="fp16", static_shape=False):
    """static_shape: the preallocated cache's launch (length read on the device, padding mask)."""
    from prefixquant_kernels.triton import decode_attention as da
    return dict(kernel="decode_split", module="decode_attention", fn="_decode_attention_split_kernel",
                config=f"G={G} D={D} bits={bits} q={q}" + (" len+mask" if static_shape else ""),
                constexprs=da.split_constexprs(G, D, bits, has_len=static_shape, has_mask=static_shape),
                types={"Q_ptr": _FLOAT[q], "PK_ptr": _FLOAT[q], "PV_ptr": _FLOAT[q],
                       "BK_ptr": "*u8" if bits == 4 else "*i8", "BV_ptr": "*u8" if bits == 4 else "*i8",
                       "Len_ptr": "*i64", "Mask_ptr": "*u8"})


def _merge(D, out="fp16"):
    from prefixquant_kernels.triton import decode_attention as da
    return dict(kernel="decode_merge", module="decode_attention", fn="_decode_attention_merge_kernel",
                config=f"D={D} out={out}", constexprs=da.merge_constexprs(D), types={"Out_ptr": _FLOAT[out]})


def _quant_static(D, bits):
    return dict(kernel="kv_quantize_static", module="kv_cache", fn="_kv_quantize_static_kernel",
                config=f"D={D} bits={bits}", constexprs=dict(BITS=bits, BLOCK_T=16, BLOCK_D=D),
                types={"X_ptr": "*fp16", "Out_ptr": "*u8" if bits == 4 else "*i8"})


def _quant_group(D, bits, axis, gs=32):
    ch = axis == "channel"
    return dict(kernel="kv_quantize_groupwise", module="kv_cache", fn="_kv_quantize_groupwise_kernel",
                config=f"D={D} bits={bits} {axis} G={gs}",
                constexprs=dict(BITS=bits, G=gs, AXIS_CHANNEL=ch, BLOCK_T=gs if ch else 16, BLOCK_D=D),
                types={"X_ptr": "*fp16", "Out_ptr": "*u8", "Scale_ptr": "*fp16", "Zero_ptr": "*fp16"})


def _dequant(D, bits, groupwise, axis="token", pos=False, gs=32):
    ch = groupwise and axis == "channel"
    return dict(kernel="kv_dequant_concat", module="kv_cache", fn="_kv_dequant_concat_kernel",
                config=f"D={D} bits={bits} " + (f"group {axis} G={gs}" if groupwise else "static")
                + (" pos" if pos else ""),
                constexprs=dict(BITS=bits, GROUPWISE=groupwise, G=gs if groupwise else 1, AXIS_CHANNEL=ch,
                                HAS_POS=pos, BLOCK_T=16, BLOCK_D=D),
                types={"Prefix_ptr": "*fp16", "Body_ptr": "*i8" if bits == 8 else "*u8",
                       "Scale_ptr": "*fp16" if groupwise else "*fp32", "Zero_ptr": "*fp16" if groupwise else "*fp32",
                       "Tail_ptr": "*fp16", "BodyPos_ptr": "*i32", "TailPos_ptr": "*i32", "Out_ptr": "*fp16"})


def plan():
    """[(arch, spec)]: the representative set described in the module docstring."""
    jobs = []
    for cc in ARCHS:
        jobs += [(cc, _split(8, 128, 4)), (cc, _split(8, 128, 8)), (cc, _merge(128)),
                 (cc, _split(3, 64, 4, "fp32", static_shape=True))]   # SmolLM2's heads, the compiled step's launch
    for cc in (80, 90):
        jobs += [(cc, _split(8, 64, 4)), (cc, _split(1, 128, 4)), (cc, _split(1, 64, 8)), (cc, _merge(64, "bf16")),
                 (cc, _quant_static(128, 4)), (cc, _quant_static(128, 8)),
                 (cc, _quant_group(128, 2, "token")), (cc, _quant_group(128, 4, "channel")),
                 (cc, _dequant(128, 4, False)), (cc, _dequant(128, 8, False)),
                 (cc, _dequant(128, 2, True, "token", pos=True)), (cc, _dequant(128, 4, True, "channel"))]
    jobs += [(86, _split(4, 128, 4, "bf16")), (89, _split(3, 128, 4, "fp32")), (89, _split(8, 64, 8, "bf16")),
             (86, _quant_group(64, 4, "token")), (89, _quant_group(64, 2, "channel")),
             (86, _dequant(64, 2, True, "channel")), (89, _dequant(64, 4, True, "token", pos=True)),
             (86, _quant_static(64, 4)), (89, _dequant(64, 8, False))]
    return jobs


# ---- the child process: compile and read ptxas' log --------------------------------------------------------------

_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _signature(fn, spec):
    """Every non-constexpr argument: i32 unless typed in spec (pointers) or named like a float scale."""
    sig = {}
    for name in fn.arg_names:
        if name in spec["constexprs"]:
            sig[name] = "constexpr"
        elif name in spec["types"]:
            sig[name] = spec["types"][name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "sm_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(job):
    """(arch, spec) -> result row; runs in a process with TRITON_INTERPRET=0 and TRITON_DUMP_PTXAS_LOG=1."""
    import contextlib
    import importlib
    import io
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc, spec = job
    fn = getattr(importlib.import_module(f"prefixquant_kernels.triton.{spec['module']}"), spec["fn"])
    buf = io.StringIO()
    t0 = time.time()
    row = dict(kernel=spec["kernel"], config=spec["config"], arch=cc)
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn=fn, signature=_signature(fn, spec), constexprs=spec["constexprs"]),
                               target=GPUTarget("cuda", cc, 32))
    except Exception as e:  # reported, the test fails on it
        row.update(error=f"{type(e).__name__}: {str(e)[-2000:]}")
        return row
    log = buf.getvalue()
    used, spill = _USED.findall(log), _SPILL.findall(log)
    row.update(n_regs=int(used[-1]) if used else None,
               n_spills=(int(spill[-1][0]) + int(spill[-1][1])) if spill else None,
               num_warps=k.metadata.num_warps, shared=k.metadata.shared, seconds=round(time.time() - t0, 1),
               cubin=len(k.asm.get("cubin", b"")))
    return row


def _child(workers: int) -> None:
    from concurrent.futures import ProcessPoolExecutor

    jobs = plan()
    with ProcessPoolExecutor(workers) as ex:
        rows = list(ex.map(compile_one, jobs))
    print("AOT-JSON " + json.dumps(rows))


def run_compiles(workers: int = 2, timeout: int = 600) -> list[dict]:
    import tempfile
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DUMP_PTXAS_LOG": "1",
           "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        code = (f"import sys; sys.path.insert(0, {ROOT!r}); import tests.kv.test_triton_aot as t; "
                f"t._child({workers})")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("AOT-JSON ")]
    assert r.returncode == 0 and lines, f"AOT compile child failed (rc {r.returncode}):\n{r.stderr[-4000:]}"
    return json.loads(lines[-1][len("AOT-JSON "):])


def table(rows: list[dict]) -> str:
    out = [f"{'kernel':22} {'config':34} {'arch':>5} {'regs':>5} {'spill B':>8} {'warps':>5} {'smem':>6} {'s':>5}"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['kernel']:22} {r['config']:34} sm_{r['arch']:<3} ERROR {r['error'][:200]}")
        else:
            out.append(f"{r['kernel']:22} {r['config']:34} sm_{r['arch']:<3} {r['n_regs']!s:>5} {r['n_spills']!s:>8} "
                       f"{r['num_warps']:>5} {r['shared']:>6} {r['seconds']:>5}")
    return "\n".join(out)


# ---- the test ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aot_rows():
    pytest.importorskip("triton")
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        get_ptxas(80).path
    except Exception as e:  # no ptxas shipped with this triton
        pytest.skip(f"triton has no ptxas here: {e}")
    return run_compiles()


def test_every_kernel_compiles_for_every_arch_without_spills(aot_rows):
    print("\n" + table(aot_rows))
    assert {r["arch"] for r in aot_rows} == set(ARCHS)
    assert {r["kernel"] for r in aot_rows} == {"decode_split", "decode_merge", "kv_quantize_static",
                                               "kv_quantize_groupwise", "kv_dequant_concat"}
    failed = [r for r in aot_rows if "error" in r]
    assert not failed, "\n".join(f"{r['kernel']} {r['config']} sm_{r['arch']}: {r['error']}" for r in failed)
    unknown = [r for r in aot_rows if r["n_regs"] is None or r["n_spills"] is None]
    assert not unknown, f"ptxas' log was not read for {unknown}"
    spilled = [r for r in aot_rows if r["n_spills"]]
    assert not spilled, "spills:\n" + table(spilled)
    # the register file allows <= 255 per thread; 255 means ptxas ran out (a spill is the next step)
    assert max(r["n_regs"] for r in aot_rows) < 255, table(aot_rows)


if __name__ == "__main__":
    print(table(run_compiles(int(sys.argv[1]) if len(sys.argv) > 1 else 2)))
