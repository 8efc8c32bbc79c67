"""`python -m prefixquant_kernels quantize | eval | bench` on a tiny random Llama saved with a real (word-level)
tokenizer: quantize writes a checkpoint that eval and transformers both load. (Errors: test_errors.py.)"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import prefixquant_kernels as pqk  # noqa: E402
from prefixquant_kernels import data  # noqa: E402
from prefixquant_kernels.__main__ import main  # noqa: E402

from ..models.tiny import VOCAB, tiny_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: the bundled text's most frequent words get ids 3..VOCAB-1, the rest <unk> (0)."""
    words = {}
    for w in " ".join(data.calibration_texts()[:50]).split():
        words[w] = words.get(w, 0) + 1
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w, _ in sorted(words.items(), key=lambda kv: -kv[1])[: VOCAB - 3]:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("float"))
    model = tiny_model("llama")
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(d)
    _word_tokenizer().save_pretrained(d)
    return d


def test_quantize_then_eval_then_from_pretrained(float_dir, tmp_path, capsys):
    out = str(tmp_path / "q")
    assert main(["quantize", "--model", float_dir, "--out", out, "--w-bits", "4", "--a-bits", "8", "--kv-bits", "4",
                 "--calib-samples", "4", "--calib-seq-len", "64", "--threads", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", out, "--seq-len", "64", "--windows", "2"]) == 0
    printed = float(capsys.readouterr().out.split()[1])
    # the same number through the Python API: the CLI evaluates what it saved, with the saved tokenizer
    model = pqk.load_quantized(out)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    ref = pqk.evaluate_perplexity(model, tok, data.evaluation_text(), 64, max_windows=2)
    assert printed == pytest.approx(ref, rel=1e-4)
    # and the float model scores differently (the checkpoint is really quantized)
    assert main(["eval", "--model", float_dir, "--seq-len", "64", "--windows", "2"]) == 0
    fp = float(capsys.readouterr().out.split()[1])
    assert fp != pytest.approx(printed, rel=1e-6)
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_quantize_finetune(float_dir, tmp_path, capsys):
    """--finetune runs the block-wise fine-tuning (its per-block losses land in the checkpoint's info) and the
    checkpoint loads; --finetune-scales-only keeps the config's finetune_weights off."""
    out = str(tmp_path / "ft")
    assert main(["quantize", "--model", float_dir, "--out", out, "--w-bits", "4", "--a-bits", "4", "--kv-bits", "4",
                 "--calib-samples", "2", "--calib-seq-len", "32", "--threads", "2", "--finetune",
                 "--finetune-epochs", "2", "--finetune-scales-only"]) == 0
    model = pqk.load_quantized(out)
    cfg = model.pqk_state.cfg
    assert cfg.finetune and not cfg.finetune_weights and cfg.finetune_epochs == 2
    losses = model.pqk_state.info["finetune_loss"]
    assert len(losses) == model.config.num_hidden_layers and all(d["after"] >= 0 for d in losses)


def test_bench_help_runs_the_benchmark_script():
    if not os.path.exists(os.path.join(ROOT, "benchmarks", "e2e.py")):
        pytest.skip("no source checkout")
    r = subprocess.run([sys.executable, "-m", "prefixquant_kernels", "bench", "--help"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "--decode-ctx" in r.stdout, r.stdout + r.stderr
