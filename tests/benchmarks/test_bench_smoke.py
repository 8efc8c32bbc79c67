"""Smoke tests of the benchmarks/ scripts (e2e.py, kernels.py, profile_decode.py, ...) on toy shapes: the scripts
run, write the files they promise with the promised schema, and reject bad flags with a clear argparse error. No
timing is asserted."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

import prefixquant_kernels as pqk

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name: str):
    """Import benchmarks/<name>.py under a private module name (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"pqk_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def e2e():
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    return _load("e2e")


@pytest.fixture(scope="module")
def kernels():
    return _load("kernels")


@pytest.fixture
def no_interpreter(monkeypatch):
    # conftest turns the Triton interpreter on for the test run; the benchmarks run as a user runs them
    # (KV ops on CPU: the reference and C++ paths), which the KV ops decide per call from this variable.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


E2E_TINY = ["--device", "cpu", "--layers", "1", "--prefill", "16", "--decode-ctx", "16", "--repeats", "1",
            "--decode-steps", "2", "--threads", "1", "--calib-tokens", "16"]


@pytest.mark.parametrize("model,compiled,block", [("tiny-llama", "on", 10), ("tiny-qwen2", "off", 1)])
def test_e2e_writes_every_method_and_phase(e2e, tmp_path, no_interpreter, model, compiled, block):
    out = tmp_path / "sub" / "out.json"
    e2e.main(E2E_TINY + ["--model", model, "--compile", compiled, "--decode-block", str(block), "--json", str(out)])
    records = json.loads(out.read_text())
    assert isinstance(records, list)
    assert {(r["method"], r["phase"]) for r in records} == {(m, p) for m in e2e.METHODS for p in e2e.PHASES}
    assert len(records) == 8
    for r in records:
        assert isinstance(r["median_ms"], float) and r["median_ms"] > 0
        assert len(r["calls_ms"]) == (1 if r["phase"] == "prefill" else 2)   # --repeats 1, --decode-steps 2
        assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] > 0
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        comp = compiled == "on" and r["method"].startswith("static")
        assert r["compiled_decode"] is comp
        if comp:   # the compiled step is timed whole (no lm_head hooks in a traced step); its compile apart
            assert r["lm_head_median_ms"] is None and r["compile_seconds"] > 0
        else:
            assert 0 <= r["lm_head_median_ms"] <= r["median_ms"] and r["compile_seconds"] is None
        assert r["a_bits"] == {"fp": None, "static-a8": 8}.get(r["method"], 4)
        for key in ("cpu", "threads", "torch", "triton", "transformers"):
            assert key in r["machine"]
        assert r["machine"]["threads"] == 1 and r["measured"] is True
        # the decode steps ran on a cache of --decode-ctx tokens (+ the static prefix, + 2 warm-up steps, one
        # untimed step per block of back-to-back steps, the 2 timed ones)
        blocks = -(-2 // block)   # 2 timed steps
        want = (16 + r["prefix_len"]) if r["phase"] == "prefill" else (16 + r["prefix_len"] + 2 + blocks + 2)
        assert r["cache_tokens"] == want, r
        # 7 linears per layer swapped in the quantized methods, none in fp
        assert r["quant_linears"] == (0 if r["method"] == "fp" else 7)
        assert r["linear_backend"] == (None if r["method"] == "fp" else
                                       ("cpu" if "cpu:scalar" in pqk.available_backends() else "reference"))
    by = {(r["method"], r["phase"]): r for r in records}
    # 4-bit weights and KV hold less than the bf16 ones (tensor bytes, not timings)
    for m in ("dynamic", "static", "static-a8"):
        assert by[(m, "decode")]["weights_bytes"] < 0.5 * by[("fp", "decode")]["weights_bytes"]
        if not by[(m, "decode")]["compiled_decode"]:   # a preallocated cache counts its whole capacity
            assert by[(m, "decode")]["kv_bytes"] < 0.5 * by[("fp", "decode")]["kv_bytes"]
    assert by[("static", "decode")]["prefix_len"] == 1 and by[("dynamic", "decode")]["prefix_len"] == 0
    md = (tmp_path / "sub" / "out.md").read_text()
    assert "| static | decode |" in md and "fp / static" in md and "dynamic / static" in md
    assert "fp / static-a8" in md
    png = tmp_path / "sub" / "out.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_e2e_methods_subset(e2e, tmp_path, no_interpreter):
    out = tmp_path / "o.json"
    e2e.main(E2E_TINY + ["--model", "tiny-llama", "--methods", "static,fp", "--json", str(out)])
    records = json.loads(out.read_text())
    assert [(r["method"], r["phase"]) for r in records] == [("fp", "prefill"), ("fp", "decode"),
                                                            ("static", "prefill"), ("static", "decode")]


def test_e2e_per_round_ratio_pairs_the_calls_of_one_round(e2e):
    a = {"method": "fp", "phase": "prefill", "median_ms": 20.0, "decoder_median_ms": None, "peak_mem_bytes": 4,
         "calls_ms": [10.0, 30.0, 20.0]}
    b = {**a, "method": "static", "median_ms": 10.0, "peak_mem_bytes": 1, "calls_ms": [5.0, 10.0, 20.0]}
    assert e2e.per_round(a, b) == (2.0, 1.0, 3.0)   # rounds 2x, 3x, 1x; the ratio of the medians says 2x too
    b["calls_ms"] = [20.0, 5.0, 10.0]               # same median, other rounds: 0.5x, 6x, 2x
    assert e2e.per_round(a, b) == (2.0, 0.5, 6.0)
    row, = e2e.speedups([a, b])
    assert row["ratio"] == "fp / static" and row["round_speedup"] == (2.0, 0.5, 6.0)
    assert e2e.per_round({**a, "calls_ms": None}, b) is None   # records written before calls_ms


@pytest.mark.parametrize("native", [True, False])
def test_e2e_q_dtype_follows_the_cpus_bf16(e2e, monkeypatch, native):
    # the quantized methods' float parts: bf16 where the CPU computes in bf16 natively, fp32 elsewhere; a given
    # --q-dtype wins
    import torch
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    assert e2e.parse_args(["--device", "cpu"]).q_dtype == ("bf16" if native else "fp32")
    assert e2e.parse_args(["--device", "cpu", "--q-dtype", "fp16"]).q_dtype == "fp16"
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")   # a torch without the probe: fp32
    assert e2e.parse_args(["--device", "cpu"]).q_dtype == "fp32"


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt-5"], "invalid choice: 'gpt-5'"),
    (["--layers", "0"], "expected a positive integer, got 0"),
    (["--prefill", "x"], "expected a positive integer, got 'x'"),
    (["--methods", "fp,quarot"], "methods must be a comma-separated subset of fp,dynamic,static,static-a8"),
    (["--fp-dtype", "int8"], "invalid choice: 'int8'"),
    (["--json", "out.csv"], "--json must name a .json file"),
    (["--device", "cuda"], "this torch has no CUDA device"),
])
def test_e2e_bad_flags(e2e, capsys, argv, message):
    if argv[:2] == ["--device", "cuda"]:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as exc:
        e2e.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_kernels_quick(kernels, tmp_path, no_interpreter):
    out = tmp_path / "k.json"
    res = kernels.main(["--quick", "--repeats", "1", "--threads", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(res["rows"]))
    for key in ("copy_GBps_read_plus_write", "best_matmul_GFLOPs", "fp32_matmul_256_GFLOPs"):
        assert data["anchors"][key] > 0
    sections = {r["section"] for r in data["rows"]}
    assert sections == set(kernels.SECTIONS)
    timed = [r for r in data["rows"] if "skipped" not in r]
    for r in timed:
        assert r["median_ms"] > 0 and r["pct_of_roofline"] > 0 and r["bound"] in ("compute", "memory")
        assert (r["TOPS"] or 0) > 0 or (r["GBps"] or 0) > 0
    methods = {r["method"] for r in timed if r["section"] == "gemm"}
    for be in pqk.available_backends():   # every backend of the device is in the GEMM section
        assert f"pqk static W4A4 quant_linear [{be}]" in methods
    assert {"torch fp32 x @ W.T", "torch bf16 x @ W.T", "torch int8 quantize + _int_mm + scale"} <= methods
    # decode attention on CPU: the C++ kernel, the op on each kernel table, and the unfused dequant-concat + SDPA
    att = {r["method"] for r in timed if r["section"] == "attention"}
    tables = {f"kv_decode_static [{n}]" for n in pqk.available_backends() if n.startswith("cpu:") and n != "cpu:scalar"}
    assert tables and att == {"kv_decode_attention [cpu]", "dequant-concat + SDPA"} | tables
    assert (tmp_path / "k.md").read_text().startswith("Machine:")


def test_kernels_int_mm_cap(kernels, tmp_path, no_interpreter):
    kernels.main(["--sections", "gemm", "--shapes", "8x64x32", "--repeats", "1", "--int-mm-max-macs", "100",
                  "--json", str(tmp_path / "k.json")])
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    skipped = [r for r in rows if r["method"].startswith("torch int8")]
    assert len(skipped) == 1 and "--int-mm-max-macs 100" in skipped[0]["skipped"]


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "64x255x32"], "K even"),
    (["--shapes", "64x256"], "shapes must be MxKxN"),
    (["--sections", "gemm,fft"], "unknown ['fft']"),
    (["--repeats", "0"], "--threads and --repeats must be > 0"),
])
def test_kernels_bad_flags(kernels, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        kernels.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_linear_cpu_still_runs(tmp_path):
    """linear_cpu.py after its timing / machine code moved to common.py (quick shapes)."""
    lin = _load("linear_cpu")
    assert lin.main(["--quick", "--repeats", "1", "--threads", "1", "--json", str(tmp_path / "l.json")]) == 0
    data = json.loads((tmp_path / "l.json").read_text())
    assert data["anchors"]["bf16_matmul_1024_GFLOPs"] > 0 and data["rows"]
    # torch's float anchors as nn.Linear runs them (F.linear), at prefill and at decode
    for case in ("prefill", "decode"):
        methods = {r["method"] for r in data["rows"] if r["case"].startswith(case)}
        assert {"torch bf16 F.linear", "torch fp32 F.linear"} <= methods, (case, methods)


@pytest.mark.parametrize("int_mm", ["on", "off"])
def test_cpu_peak_quick(tmp_path, int_mm):
    """cpu_peak.py on toy shapes: every method timed, the best torch path is the fastest torch row, and `_int_mm` is
    there only when asked for (--int-mm off: no column, the note in the table)."""
    peak = _load("cpu_peak")
    out = tmp_path / "p.json"
    assert peak.main(["--quick", "--repeats", "1", "--threads", "1", "--peak-seconds", "0.01", "--int-mm", int_mm,
                      "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["int_mm"] == (int_mm == "on")
    for s in data["shapes"]:
        rows = s["rows"]
        assert ("torch._int_mm (raw)" in rows) == (int_mm == "on")
        torch_rows = {n: r for n, r in rows.items() if n.startswith("torch")}
        assert s["best_torch"] == min(torch_rows, key=lambda n: torch_rows[n]["median_ms"])
        for r in rows.values():
            assert r["median_ms"] > 0
            assert r["x_best_torch"] == pytest.approx(torch_rows[s["best_torch"]]["median_ms"] / r["median_ms"])
            assert ("x_int_mm" in r) == (int_mm == "on")
    md = out.with_suffix(".md").read_text()
    assert ("not timed" in md) == (int_mm == "off")


def test_cpu_peak_across_processes(tmp_path):
    """--processes 2: two fresh child processes; per shape and method the median of their medians lies within their
    lowest and highest, the per-process ratio against `_int_mm` is each child's own, counted against 1.0, and the
    fastest process is set against `_int_mm`'s fastest."""
    peak = _load("cpu_peak")
    out = tmp_path / "p.json"
    assert peak.main(["--quick", "--repeats", "1", "--threads", "1", "--peak-seconds", "0.01", "--int-mm", "on",
                      "--processes", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    runs = data["per_process"]
    assert len(runs) == 2
    for i, (shape, rows) in enumerate(data["across"].items()):
        assert shape == runs[0]["shapes"][i]["shape"] == runs[1]["shapes"][i]["shape"]
        assert set(rows) == set(runs[0]["shapes"][i]["rows"])
        for name, r in rows.items():
            own = sorted(run["shapes"][i]["rows"][name]["median_ms"] for run in runs)
            assert (r["min_ms"], r["max_ms"]) == (own[0], own[1])
            assert r["median_ms"] == pytest.approx((own[0] + own[1]) / 2)
            ratios = [run["shapes"][i]["rows"][name]["x_int_mm"] for run in runs]
            assert r["x_int_mm_at_least_1"] == sum(x >= 1.0 for x in ratios)
            assert r["x_int_mm_min"] == min(ratios) and r["x_int_mm_max"] == max(ratios)
            fastest = min(run["shapes"][i]["rows"]["torch._int_mm (raw)"]["median_ms"] for run in runs)
            assert r["x_fastest_int_mm"] == pytest.approx(fastest / own[0])
    assert "Across 2 processes" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        peak.main(["--quick", "--processes", "0"])


def test_cpu_peak_by_side():
    """The rounds of all processes put with the VM's fast or slow side by the peak measured before each: fast rounds
    (peak 10) and slow ones (peak 4) get their own per-round ratios, ours against `_int_mm` and bf16 in the same
    round; peaks within 1.5x of each other are one side (None)."""
    peak = _load("cpu_peak")

    def run(peaks, ours, bf16, int_mm):
        rows = {"pqk W4A4": {"round_ms": ours}, "pqk W4A4 [avx512vnni]": {"round_ms": ours},
                "torch bf16": {"round_ms": bf16}, "torch._int_mm (raw)": {"round_ms": int_mm}}
        return {"shapes": [{"shape": "s", "rows": rows, "round_peak_TOPS": peaks}]}

    # process 1: rounds fast, slow, fast; process 2: slow, slow, fast (ours 1 ms fast / 2 ms slow)
    runs = [run([10.0, 4.0, 10.5], [1.0, 2.0, 1.0], [1.5, 5.0, 1.4], [1.2, 2.6, 1.3]),
            run([4.2, 3.9, 9.8], [2.0, 2.0, 1.0], [4.0, 4.4, 1.6], [2.4, 2.2, 1.1])]
    side = peak.by_side(runs)
    assert side["cut_TOPS"] == pytest.approx((3.9 * 10.5) ** 0.5)
    fast, slow = side["shapes"]["s"]["fast"]["pqk W4A4"], side["shapes"]["s"]["slow"]["pqk W4A4"]
    assert fast["rounds"] == 3 and slow["rounds"] == 3
    assert fast["x_bf16"] == pytest.approx(1.5) and (fast["x_bf16_min"], fast["x_bf16_max"]) == (1.4, 1.6)
    assert slow["x_bf16"] == pytest.approx(2.2) and (slow["x_bf16_min"], slow["x_bf16_max"]) == (2.0, 2.5)
    assert fast["x_int_mm"] == pytest.approx(1.2) and slow["x_int_mm"] == pytest.approx(1.2)
    assert "pqk W4A4 [avx512vnni]" not in side["shapes"]["s"]["fast"]
    assert "| s | fast | pqk W4A4 | 3 | 1.20 [1.10-1.30] | 1.50 [1.40-1.60] |" in peak.markdown_by_side(side)
    assert peak.by_side([run([10.0, 9.0, 8.0], [1.0] * 3, [1.0] * 3, [1.0] * 3)]) is None


def test_profile_decode_counts_the_ops_of_one_step(tmp_path, no_interpreter):
    """profile_decode.py on tiny-llama (2 layers): per step one pqk::decode_layer call per layer + the W8A8 lm_head;
    with --no-decode-layer-op --no-graph-pass the 7 GEMVs of a layer in 7 calls + the lm_head and one decode attention
    per layer, grouped apart; the JSON and markdown are written."""
    pytest.importorskip("transformers")
    if "cpu:scalar" not in pqk.available_backends():
        pytest.skip("C++ extension not built")
    prof = _load("profile_decode")
    out = tmp_path / "prof.json"
    rec = prof.main(["--model", "tiny-llama", "--ctx", "16", "--steps", "2", "--threads", "1",
                     "--json", str(out)])
    assert rec["group_calls"]["pqk::quant_linear"] == pytest.approx(1)
    assert rec["group_calls"]["pqk::decode_layer (a whole layer)"] == pytest.approx(2)
    assert rec["groups_ms"]["pqk::quant_linear"] > 0 and rec["step_wall"]["repeats"] == 2
    assert json.loads(out.read_text())[0]["args"]["model"] == "tiny-llama"
    assert "pqk::quant_linear" in (tmp_path / "prof.md").read_text()
    # the compile's phases: inside the compile's wall time, the backend inside the whole
    ph = rec["compile_phases_s"]
    whole = ph["whole compile (dynamo's compile_inner)"]
    assert 0 < ph["  the backend (AOT autograd + inductor)"] <= whole <= rec["compile_seconds"] * 1.01
    assert ph["  dynamo tracing (bytecode -> FX graph, guards)"] > 0
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    ab = prof.main(["--model", "tiny-llama", "--ctx", "16", "--steps", "2", "--threads", "1",
                    "--keep-model-guards", "--no-graph-pass", "--no-decode-layer-op", "--fresh-compile-cache"])
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before          # the temporary cache dir is undone
    # the compile ran in an empty, temporary inductor cache, removed after
    assert "pqk_inductor_" in ab["inductor_cache_dir"] and not os.path.exists(ab["inductor_cache_dir"])
    assert "pqk_inductor_" not in rec["inductor_cache_dir"]
    assert ab["group_calls"]["pqk::quant_linear"] == pytest.approx(2 * 7 + 1)
    assert ab["group_calls"]["pqk::kv_decode (attention)"] == pytest.approx(2)
    assert "pqk::decode_layer (a whole layer)" not in ab["group_calls"]


def test_step_options_ab_runs_each_variant_in_turn(tmp_path, no_interpreter, monkeypatch):
    """step_options_ab.py on tiny-llama: two variants (the step as generate() compiles it, and one with an option
    that does not change the math) each time rounds x steps steps, their logits equal, the files written; a
    variant that is not NAME=JSON is refused."""
    pytest.importorskip("transformers")
    if "cpu:scalar" not in pqk.available_backends():
        pytest.skip("C++ extension not built")
    ab = _load("step_options_ab")
    from prefixquant_kernels.models import compiled_step, decode_layer
    traced_op = []                      # one entry per pqk::decode_layer call a step makes
    real_forward = decode_layer.forward
    monkeypatch.setattr(decode_layer, "forward", lambda *a, **k: traced_op.append(1) or real_forward(*a, **k))
    out = tmp_path / "ab.json"
    rec = ab.main(["--model", "tiny-llama", "--ctx", "16", "--rounds", "2", "--steps", "3", "--threads", "1",
                   "--variants", "base={}", 'serial={"cpp.min_chunk_size": 100000}',
                   'traced={"pqk.decode_layer_op": false}', "--json", str(out)])
    assert list(rec["variants"]) == ["base", "serial", "traced"]
    # dynamo replays the append with every call of a step that traced it: per layer, the first (compiling) call and
    # 2 blocks of 2 + 3 steps, in base and serial, none in traced
    layers = ab.e2e.CONFIGS["tiny-llama"]["num_hidden_layers"]
    assert len(traced_op) == 2 * layers * (1 + 2 * (2 + 3)), "base and serial call the layer op, traced does not"
    for v in rec["variants"].values():
        assert v["step"]["repeats"] == 2 * 3 and v["step"]["median_ms"] > 0
        assert v["logit_diff"] == 0.0
    assert rec["variants"]["serial"]["options"] == {"cpp.min_chunk_size": 100000}
    assert json.loads(out.read_text())[0]["args"]["rounds"] == 2
    assert "cpp.min_chunk_size" in (out.parent / (out.stem + ".md")).read_text()
    with pytest.raises(SystemExit, match="NAME=JSON"):
        ab.main(["--model", "tiny-llama", "--variants", "base"])
    assert compiled_step.DECODE_LAYER_OP, "the traced variant's setting outlived the run"


def test_e2e_fit_layers_fits_a_24gb_card(e2e):
    """The CUDA default layer count (an estimate): Llama-3-8B's 32 layers with fp16 + three int4 copies do not fit a
    24 GB card, so fewer are kept; an 80 GB card keeps all; a bigger context or more methods never keep more."""
    gib = 2 ** 30
    on_3090 = e2e.fit_layers("llama-3-8b", e2e.METHODS, 0.9 * 24 * gib, 2100)
    assert 8 <= on_3090 < 32
    assert e2e.fit_layers("llama-3-8b", e2e.METHODS, 0.9 * 80 * gib, 2100) == 32
    assert e2e.fit_layers("llama-3-8b", e2e.METHODS, 0.9 * 24 * gib, 8192) <= on_3090
    assert e2e.fit_layers("llama-3-8b", ("fp",), 0.9 * 24 * gib, 2100) >= on_3090
    assert e2e.fit_layers("llama-3-8b", e2e.METHODS, 1 * gib, 2100) == 1


def test_e2e_quantized_copy_shares_every_float_tensor(e2e):
    """copy_sharing_tensors + the quantized swap: no second float model in memory (every float tensor of the copy is
    one of the base's), and the base is untouched (its linears and its output)."""
    import torch
    from torch import nn

    base, bos = e2e.build_float_model("tiny-llama", None, torch.float32, "cpu")
    ids = torch.tensor([[bos, 5, 9, 17, 3]])
    with torch.no_grad():
        before = base(ids).logits
    model = e2e.copy_sharing_tensors(base)
    e2e.quantize_for_benchmark(model, "static", prefix_ids=[bos], calib_tokens=16)
    base_ptrs = {t.data_ptr() for t in (*base.parameters(), *base.buffers())}
    floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point() and t.dim() > 1
              and t.numel() > 4096]
    assert floats and all(t.data_ptr() in base_ptrs for t in floats)   # embeddings, lm_head: the base's
    assert any(isinstance(m, pqk.nn.QuantLinear) for m in model.modules())
    assert not any(isinstance(m, pqk.nn.QuantLinear) for m in base.modules())
    assert sum(isinstance(m, nn.Linear) for m in base.modules()) == 7 * base.config.num_hidden_layers + 1
    with torch.no_grad():
        assert torch.equal(base(ids).logits, before)


def test_e2e_fp_compiled_over_a_static_cache(e2e, tmp_path, no_interpreter):
    """--compile-fp on (the CUDA default): the fp baseline's decode runs the same compiled step as the static
    methods, over transformers' StaticCache; its records say so and its steps produce tokens."""
    out = tmp_path / "e2e.json"
    e2e.main(E2E_TINY + ["--model", "tiny-llama", "--methods", "fp,static", "--compile-fp", "on", "--json", str(out)])
    records = json.loads(out.read_text())
    fp = [r for r in records if r["method"] == "fp" and r["phase"] == "decode"]
    assert fp and fp[0]["compiled_decode"] is True and fp[0]["compile_seconds"] is not None
    assert "of fp compiled" in (tmp_path / "e2e.md").read_text()


_FAKE_ENGINE = r'''
import json, os, sys
argv = sys.argv[1:]
model, quant = argv[argv.index("--model") + 1], "--connector" in argv
name = "kv16" if os.environ.get("PQK_VLLM_FLOAT_KV") == "1" else ("pqk" if quant else "fp")
speed = {"fp": 100.0, "pqk": 150.0, "kv16": 120.0}[name]     # tokens per second, slowed by the round below
print("vLLM's log goes to stderr", file=sys.stderr)
print("READY", flush=True)
calls = 0
for line in sys.stdin:
    job = json.loads(line)
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(f"{name} {len(job['prompts'])}\n")
    calls += 1
    drift = 1.0 + 0.5 * (calls % 2)          # the machine's speed moving between this engine's calls
    toks = len(job["prompts"]) * job["max_tokens"]
    print("noise", flush=True)
    print("RESULT " + json.dumps({"wall_s": toks / speed * drift, "tokens": toks}), flush=True)
'''


def test_serving_engines_interleave_the_systems_per_round(tmp_path, monkeypatch):
    """benchmarks/serving.py --engines against fake engines (the real ones need the vLLM environment): every engine
    built once, then per round and level each system in turn, the order reversed every other round, prompts in
    batches of N; the table's per-round ratio pairs a system's run with fp's of the same round."""
    serving = _load("serving")
    fake = tmp_path / "fake_engine"      # a Python script
    fake.write_text(_FAKE_ENGINE)
    py = tmp_path / "vllm_python"
    py.write_text(f"#!/bin/sh\nshift 2\nshift\nexec {sys.executable} {fake} \"$@\"\n")   # drops -W ignore:: SCRIPT
    py.chmod(0o755)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.txt"))
    out = tmp_path / "s.json"
    assert serving.main(["--checkpoint", "q", "--float-model", str(tmp_path), "--vllm-python", str(py),
                         "--engines", "--float-kv-too", "--rounds", "2", "--concurrency", "1", "3",
                         "--requests", "4", "--max-tokens", "5", "--pause", "0", "--work", str(tmp_path / "w"),
                         "--json", str(out)]) == 0
    calls = (tmp_path / "calls.txt").read_text().split("\n")[:-1]
    one = ["fp", "pqk", "kv16"]
    want = []
    for r in range(2):
        for n, batches in ((1, [1, 1, 1, 1]), (3, [3, 1])):
            for name in (one if r % 2 == 0 else one[::-1]):
                want += [f"{name} {b}" for b in batches]
    assert calls == want
    data = json.loads(out.read_text())
    res = data["results"]
    assert set(res) == {"fp (vLLM)", "pqk quantized (vLLM + plugin)", "pqk quantized, 16-bit KV (vLLM + plugin)"}
    for name, speed in (("fp (vLLM)", 100.0), ("pqk quantized (vLLM + plugin)", 150.0)):
        for n in ("1", "3"):
            assert len(res[name][n]) == 2
            for x in res[name][n]:
                assert x["output_tokens_per_s"] < speed and x["requests_per_s"] > 0
    md = out.with_suffix(".md").read_text()
    assert "interleaved per round and level" in md
    # each engine alternates its calls' speed: at N = 1 (4 calls per level) every level is the same, so the per-round
    # ratio is exactly the speeds' ratio
    row = next(line for line in md.splitlines() if line.startswith("| pqk quantized (vLLM + plugin) | 1 |"))
    assert row.endswith("| 1.50 | 1.50 [1.50–1.50] |"), row


def test_round_order_varies_what_follows_what():
    """common.round_order: every round holds every item once, odd rounds are the round before reversed, the same
    orders on every call, and over 10 rounds no item has the same predecessor in every even round (a rotation or
    a reversal alone keeps the cyclic order, so one GEMM kept following torch's fp32 linear)."""
    common = _load("common")
    for n in (3, 4, 9, 11):
        items = list(range(n))
        orders = [common.round_order(items, r) for r in range(10)]
        assert orders == [common.round_order(items, r) for r in range(10)]
        for r, order in enumerate(orders):
            assert sorted(order) == items, (n, r, order)
            if r % 2:
                assert order == orders[r - 1][::-1], (n, r)
        for x in items:
            preds = {o[o.index(x) - 1] if o.index(x) else None for o in orders[::2]}
            assert len(preds) > 1, (n, x, orders)


def test_prefill_attention_times_both_paths(tmp_path):
    """prefill_attention.py: one row per shape and dtype, our op against the SDPA path, equal to float rounding, the
    files written; a malformed shape is refused."""
    if "cpu:scalar" not in pqk.available_backends():
        pytest.skip("C++ extension not built")
    pa = _load("prefill_attention")
    out = tmp_path / "pa.json"
    rows = pa.main(["--shapes", "1x4x2x37x1x16", "2x2x2x9x0x32", "--repeats", "2", "--threads", "1",
                    "--json", str(out)])
    assert [(r["shape"], r["dtype"]) for r in rows] == [([1, 4, 2, 37, 1, 16], "fp32"), ([1, 4, 2, 37, 1, 16], "bf16"),
                                                        ([2, 2, 2, 9, 0, 32], "fp32"), ([2, 2, 2, 9, 0, 32], "bf16")]
    for r in rows:
        assert r["max_abs_diff"] < (1e-5 if r["dtype"] == "fp32" else 3e-2)
        assert r["pqk C++"]["repeats"] == 2 and r["x_sdpa"] > 0
    assert "x SDPA" in (out.parent / (out.stem + ".md")).read_text()
    with pytest.raises(SystemExit, match="BxHqxHkvxTxPxD"):
        pa.main(["--shapes", "1x3x2x8x1x16"])
