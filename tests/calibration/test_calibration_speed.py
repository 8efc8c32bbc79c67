"""Issue 14, "calibration in minutes": the calibration passes run the float model once per batch of samples
(not per sample, not per quantizer), the batched path records exactly what the per-sample one did, the per-layer
stage runs on one intra-op thread and gives the thread count back, and every stage shows a named progress bar."""
import math

import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels.calibration import pipeline
from prefixquant_kernels.calibration import prefix as pfx
from prefixquant_kernels.calibration import scales as sc

from ..models.tiny import BOS, StubTokenizer, plant_outliers, text, tiny_model


def _count_forwards(model):
    """Calls of the model's top-level forward (each a full float pass) -> (list of batch sizes, handle)."""
    calls = []
    h = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
        (args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)
    return calls, h


def _samples(n=7, t=40, seed=1):
    ids = StubTokenizer().encode(text(n * t + 10, seed=seed))
    return torch.tensor([[BOS] + ids[i * t:(i + 1) * t] for i in range(n)])


@pytest.mark.parametrize("batch", [1, 3, 4, 16])
def test_collect_runs_the_float_model_once_per_batch(batch):
    model = tiny_model("llama")
    calls, h = _count_forwards(model)
    ids = _samples(7)
    sc.collect(model, ids, 1, 8, hessian=True, kv=True, batch_size=batch)
    h.remove()
    assert len(calls) == math.ceil(7 / batch)
    assert sum(calls) == 7 and max(calls) <= batch


def test_record_down_proj_max_runs_once_per_batch():
    model = tiny_model("llama")
    calls, h = _count_forwards(model)
    ids = _samples(9)
    per_sample = pfx.record_down_proj_max(model, ids, batch_size=1)
    assert len(calls) == 9
    calls.clear()
    batched = pfx.record_down_proj_max(model, ids, batch_size=4)
    h.remove()
    assert calls == [4, 4, 1]
    for a, b in zip(per_sample, batched):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_batched_collect_records_what_the_per_sample_one_did(arch):
    model = tiny_model(arch)
    ids = _samples(6)
    one = sc.collect(model, ids, 2, 8, hessian=True, kv=True, seed=3, batch_size=1)
    many = sc.collect(model, ids, 2, 8, hessian=True, kv=True, seed=3, batch_size=4)
    # every point recorded once per sample: not again when the attention hook runs q/k/v itself for Q, K, V
    assert all(r.shape[0] == 6 * 8 for st in (one[0], many[0]) for r in st.rows.values())
    for a, b in zip(one, many):
        for p in a.rows:
            assert a.amax[p] == b.amax[p]
            torch.testing.assert_close(a.rows[p], b.rows[p], atol=0, rtol=0)        # the same rows picked
            torch.testing.assert_close(a.hessian[p], b.hessian[p], atol=0, rtol=0)
        for x, y in zip(a.q + a.k + a.v, b.q + b.k + b.v):
            torch.testing.assert_close(x, y, atol=0, rtol=0)
    ks1, vs1 = sc.search_kv_scales(one[0].q, one[0].k, one[0].v, 4)
    ks2, vs2 = sc._search_kv_scales_per_sample(one[0].q, one[0].k, one[0].v, 4)
    assert torch.equal(ks1, ks2) and torch.equal(vs1, vs2)


def _quant_state(model):
    """Every tensor the quantized model holds (QuantLinear integers and scales, the state's prefix K/V and KV
    scales), its activation scales and KV scales."""
    st = model.pqk_state
    return ({k: v.clone() for k, v in model.state_dict().items()}, dict(st.act_scales),
            {k: v.clone() for k, v in st.state_dict().items()})


@pytest.mark.parametrize("arch,kw", [
    ("llama", dict(w_bits=4, a_bits=8, kv_bits=4)),                        # prefix search, GPTQ, static KV4
    ("phi3", dict(w_bits=8, a_bits=4, kv_bits=8, weight_method="rtn")),
])
def test_quantize_model_batched_equals_per_sample(monkeypatch, arch, kw):
    """The whole pipeline: every QuantLinear tensor, activation scale and KV scale identical whether the
    calibration passes take 1 sample or 4 per forward; the float model runs once per batch in each pass."""
    cfg = pqk.QuantConfig(calib_samples=6, calib_seq_len=48, **kw)
    results = {}
    for batch in (1, 4):
        monkeypatch.setattr(sc, "CALIB_BATCH", batch)
        monkeypatch.setattr(sc.collect, "__defaults__", (*sc.collect.__defaults__[:-1], batch))
        model = tiny_model(arch)
        plant_outliers(model, tokens=(BOS,))
        calls, h = _count_forwards(model)
        pqk.quantize_model(model, StubTokenizer(), text(), cfg, progress=False)
        h.remove()
        passes = math.ceil(6 / batch)
        assert len(calls) == 2 * passes + 1, calls       # prefix search + calibration, + the prefix's K/V
        results[batch] = _quant_state(model)
    (l1, a1, s1), (l4, a4, s4) = results[1], results[4]
    assert a1 == a4
    assert s1.keys() == s4.keys() and all(torch.equal(s1[k], s4[k]) for k in s1)
    assert l1.keys() == l4.keys()
    assert [k for k in l1 if not torch.equal(l1[k], l4[k])] == []


def test_per_layer_stage_runs_on_one_thread_and_restores_the_count(monkeypatch):
    seen = []
    real = sc.search_act_scale
    monkeypatch.setattr(sc, "search_act_scale", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = tiny_model("llama")
        cfg = pqk.QuantConfig(calib_samples=2, calib_seq_len=32, w_bits=8, a_bits=8, kv_bits=8, weight_method="rtn")
        pqk.quantize_model(model, StubTokenizer(), text(), cfg, progress=False)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(sc, "search_act_scale", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("planted")))
        with pytest.raises(RuntimeError, match="planted"):
            pqk.quantize_model(tiny_model("llama"), StubTokenizer(), text(), cfg, progress=False)
        assert torch.get_num_threads() == 2          # given back on error too
    finally:
        torch.set_num_threads(before)


def test_stages_and_evaluation_show_named_progress(capsys):
    model = tiny_model("llama")
    cfg = pqk.QuantConfig(calib_samples=3, calib_seq_len=32, w_bits=8, a_bits=8, kv_bits=8, weight_method="rtn")
    pqk.quantize_model(model, StubTokenizer(), text(), cfg, progress=True)
    err = capsys.readouterr().err
    for stage in ("prefix search", "calibration", "quantize layer 2/2"):
        assert stage in err, (stage, err)
    assert "3/3" in err                                  # the sample bars count samples
    pqk.evaluate_perplexity(model, StubTokenizer(), text(400), seq_len=64, max_windows=3)
    err = capsys.readouterr().err
    assert "evaluation" in err and "3/3" in err
    pqk.evaluate_perplexity(model, StubTokenizer(), text(400), seq_len=64, max_windows=3, progress=False)
    assert "evaluation" not in capsys.readouterr().err
    assert pipeline._bar(False, 3, "x", "y").disable
