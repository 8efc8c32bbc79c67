"""window_nlls (evaluate_perplexity's windows one by one), paired_ratio (two models on the same windows, with a 95 %
interval) and model_demo's --compare over the JSON lines a table run writes."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import prefixquant_kernels as pqk
from prefixquant_kernels import model_demo
from prefixquant_kernels.cli import UsageError

from ..models.tiny import BOS, StubTokenizer, text, tiny_model

T_975 = {7: 2.3646, 9: 2.2622, 29: 2.0452}     # Student t, 97.5 % quantiles (tables)


def test_window_nlls_are_the_windows_of_evaluate_perplexity():
    model, tok = tiny_model("llama"), StubTokenizer()
    t = text(700, seed=4)
    ids = tok.encode(t)
    want = []
    with torch.no_grad():
        for w in range(len(ids) // 48):
            win = torch.tensor(ids[w * 48:(w + 1) * 48])
            logits = model(torch.cat([torch.tensor([BOS]), win]).unsqueeze(0)).logits[0]
            want.append(float(F.cross_entropy(logits[1:-1], win[1:])))
    got = pqk.window_nlls(model, tok, t, 48, progress=False)
    assert got == pytest.approx(want, rel=1e-5)
    assert len(set(round(x, 4) for x in got)) > 1        # the windows differ: the order is checked too
    assert pqk.evaluate_perplexity(model, tok, t, 48, progress=False) == pytest.approx(
        math.exp(sum(want) / len(want)), rel=1e-5)
    assert pqk.window_nlls(model, tok, t, 48, max_windows=3, progress=False) == pytest.approx(want[:3], rel=1e-5)


@pytest.mark.parametrize("n", [8, 10, 30])
def test_paired_ratio_is_the_mean_difference_with_a_t_interval(n):
    g = torch.Generator().manual_seed(n)
    hard = (torch.rand(n, generator=g) * 3 + 1).tolist()          # each window's own difficulty: 1..4 nats
    d = (torch.randn(n, generator=g) * 0.02 + 0.01).tolist()
    a = [h + x for h, x in zip(hard, d)]
    ratio, lo, hi = pqk.paired_ratio(a, hard)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    assert ratio == pytest.approx(math.exp(mean), rel=1e-9)
    half = math.log(hi / ratio)
    assert half == pytest.approx(T_975[n - 1] * sd / math.sqrt(n), rel=1e-2)
    assert math.log(ratio / lo) == pytest.approx(half, rel=1e-9)
    # paired: the windows' difficulty (100x the difference) does not widen the interval; swapped, it inverts
    assert pqk.paired_ratio([x + 50 for x in a], [x + 50 for x in hard]) == pytest.approx((ratio, lo, hi), rel=1e-6)
    r2, lo2, hi2 = pqk.paired_ratio(hard, a)
    assert (r2, lo2, hi2) == pytest.approx((1 / ratio, 1 / hi, 1 / lo), rel=1e-9)


@pytest.mark.parametrize("a, b, match", [
    ([1.0] * 8, [1.0] * 7, "the same windows"),
    ([1.0] * 5, [1.0] * 5, "at least 6"),
    ([1.0] * 7 + [float("nan")], [1.0] * 8, "nll_a must be a list of finite floats"),
    ([1.0] * 8, torch.ones(8), "nll_b must be a list"),
])
def test_paired_ratio_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        pqk.paired_ratio(a, b)


def _row(index, nlls, seq_len=512):
    return {"row": f"row {index}", "index": index, "ppl": math.exp(sum(nlls) / len(nlls)), "seq_len": seq_len,
            "windows": len(nlls), "window_nll": nlls}


def test_compare_rows_from_a_table_file(tmp_path, capsys):
    a, b = [2.0, 2.5, 3.0, 2.2, 2.8, 2.4, 2.6], [2.01, 2.48, 3.03, 2.21, 2.79, 2.45, 2.6]
    f = tmp_path / "rows.jsonl"
    with open(f, "w") as fh:
        fh.write(json.dumps(_row(4, [9.0] * 7)) + "\n")      # an earlier run of row 4: the last line counts
        fh.write(json.dumps({"row": "old format", "ppl": 3.0}) + "\n")
        for r in (_row(4, a), _row(5, b), _row(6, a[:6]), _row(7, a, 2048)):
            fh.write(json.dumps(r) + "\n")
    assert model_demo.compare_rows(str(f), 4, 5) == pytest.approx(pqk.paired_ratio(a, b))
    assert "row 4" in capsys.readouterr().out
    assert model_demo.main(["--compare", str(f), "5", "4"]) == 0
    assert "over 7 windows of 512 tokens" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no row 9"):
        model_demo.compare_rows(str(f), 4, 9)
    for other in (6, 7):
        with pytest.raises(ValueError, match="different windows"):
            model_demo.compare_rows(str(f), 4, other)
    with pytest.raises(UsageError, match="--compare: .*no row 3"):
        model_demo.main(["--compare", str(f), "3", "4"])
    with pytest.raises(UsageError, match="--compare"):
        model_demo.main(["--compare", str(tmp_path / "missing.jsonl"), "4", "5"])


def test_every_table_row_is_a_valid_config():
    """The accuracy tables' rows (run only by hand: minutes each) at least build their QuantConfig."""
    rows = [r[1] for r in model_demo.TABLE_ROWS + model_demo.KV_TABLE_ROWS if r[1] is not None]
    assert len(rows) == len(model_demo.TABLE_ROWS) + len(model_demo.KV_TABLE_ROWS) - 3   # three float rows
    for kw in rows:
        pqk.QuantConfig(**kw)                                  # raises on a field or value it does not take
