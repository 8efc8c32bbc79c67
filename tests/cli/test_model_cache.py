"""model_demo's converted SmolLM2 copy, without SmolLM2: the GGUF load replaced by a tiny tied-embedding Llama and a
word-level tokenizer, so what is checked is the cache's logic (made once, read after, keyed by the GGUF file, an
unwritable place or PQK_CACHE_DIR=off fall back to the GGUF). The real model's copy against its GGUF:
tests/calibration/test_smollm2.py."""
from __future__ import annotations

import os

import pytest
import torch

from prefixquant_kernels import model_demo

from ..models.tiny import tiny_model
from .test_cli import _word_tokenizer


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """smollm2_dir() -> a directory holding a stand-in GGUF file; _load_gguf -> a tiny model (tied embedding) and a
    word-level tokenizer, counted in the returned list."""
    d = tmp_path / "wheel"
    d.mkdir()
    (d / model_demo.GGUF_FILE).write_bytes(b"GGUF v1")
    loads = []

    def load():
        loads.append(1)
        model = tiny_model("llama", seed=len(loads))
        model.config.tie_word_embeddings = True
        model.tie_weights()
        return model, _word_tokenizer()
    monkeypatch.setattr(model_demo, "smollm2_dir", lambda: str(d))
    monkeypatch.setattr(model_demo, "_load_gguf", load)
    monkeypatch.setenv("PQK_CACHE_DIR", str(tmp_path / "cache"))
    return d, loads


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_made_once_then_read(fake_gguf, tmp_path):
    d, loads = fake_gguf
    first, tok = model_demo.load_smollm2()
    assert len(loads) == 1
    path = model_demo.smollm2_hf_dir()
    assert os.path.dirname(path) == str(tmp_path / "cache") and first.config._name_or_path == path
    assert [f for f in os.listdir(tmp_path / "cache") if ".tmp" in f] == []     # the temporary copy renamed
    again, tok2 = model_demo.load_smollm2()
    assert len(loads) == 1 and _same(first, again)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert tok2("the cat sat").input_ids == tok("the cat sat").input_ids
    # another GGUF file (size / mtime): another copy, from a new load
    (d / model_demo.GGUF_FILE).write_bytes(b"GGUF v2, longer")
    assert model_demo.smollm2_cache_path() != path
    other, _ = model_demo.load_smollm2()
    assert len(loads) == 2 and not _same(first, other)


def test_an_unwritable_place_falls_back_to_the_gguf(fake_gguf, tmp_path, monkeypatch, capsys):
    _, loads = fake_gguf
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PQK_CACHE_DIR", str(blocker))
    model, _ = model_demo.load_smollm2()
    assert "SmolLM2 not cached" in capsys.readouterr().err
    assert len(loads) == 1          # the model loaded for the failed copy is the one returned, not loaded again
    assert model.config._name_or_path != model_demo.smollm2_cache_path()
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []


def test_cache_off(fake_gguf, tmp_path, monkeypatch):
    _, loads = fake_gguf
    monkeypatch.setenv("PQK_CACHE_DIR", "off")
    assert model_demo.smollm2_cache_path() is None and model_demo.smollm2_hf_dir() is None
    model_demo.load_smollm2()
    model_demo.load_smollm2()
    assert len(loads) == 2 and not (tmp_path / "cache").exists()
