"""Checkpoint writes are atomic and refuse to clobber; float tensors are stored in 16 bits; broken checkpoints are
named errors. (save_quantized / export_hf / load_quantized, calibration/checkpoint.py.)"""
import json
import os

import pytest
import safetensors.torch as st
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels.calibration import checkpoint as ck
from prefixquant_kernels.calibration import hf_quantizer as hq

from ..models.tiny import BOS, StubTokenizer, text, tiny_model
from .test_hf_quantizer import rounded

CHEAP = dict(calib_samples=2, calib_seq_len=32, prefix_tokens=[BOS], act_clip_search=False, weight_method="rtn")
IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])
WRITERS = {"save_quantized": pqk.save_quantized, "export_hf": pqk.export_hf}


@pytest.fixture(scope="module")
def model():
    return pqk.quantize_model(tiny_model("llama", layers=1), StubTokenizer(), text(),
                              pqk.QuantConfig(w_bits=4, a_bits=8, kv_bits=4, **CHEAP), progress=False)


@pytest.fixture(scope="module")
def other_model():
    return pqk.quantize_model(tiny_model("llama", layers=1, seed=1), StubTokenizer(), text(),
                              pqk.QuantConfig(w_bits=8, a_bits=8, kv_bits=8, **CHEAP), progress=False)


def _snapshot(d):
    """{relative path: bytes} of everything under d."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = fh.read()
    return out


def _leftovers(parent):
    return [n for n in os.listdir(parent) if ".pqk-tmp-" in n]


# ---- 16-bit float tensors ----------------------------------------------------------------------------------------

def test_float_tensors_are_stored_in_16_bits_and_the_quantized_parts_exactly(model, tmp_path):
    pqk.save_quantized(model, str(tmp_path / "bf16"))
    pqk.save_quantized(model, str(tmp_path / "fp32"), float_dtype="float32")
    pqk.save_quantized(model, str(tmp_path / "fp16"), float_dtype=torch.float16)
    files = {k: st.load_file(str(tmp_path / k / "model.safetensors")) for k in ("bf16", "fp32", "fp16")}
    sd = model.state_dict()
    floats = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"}
    assert floats <= set(files["bf16"])
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        for k, v in files[name].items():
            if k in floats:
                assert v.dtype == dtype, k
                assert torch.equal(v, sd[k].to(dtype)), k             # its 16-bit rounding
            else:                                                      # packed weights, scales, rotation, prefix
                assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    sizes = {k: os.path.getsize(tmp_path / k / "model.safetensors") for k in files}
    emb = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert sizes["fp32"] - sizes["bf16"] >= 2 * emb and abs(sizes["fp16"] - sizes["bf16"]) < 64   # (header)
    # it computes in float32 (config.json's dtype), with the rounded float tensors: exactly the rounded model
    with torch.no_grad():
        loaded = pqk.load_quantized(str(tmp_path / "bf16"))
        assert loaded.model.embed_tokens.weight.dtype == torch.float32
        assert torch.equal(loaded(IDS).logits, rounded(model)(IDS).logits)
        assert torch.equal(pqk.load_quantized(str(tmp_path / "fp16"))(IDS).logits,
                           rounded(model, torch.float16)(IDS).logits)
        assert torch.equal(pqk.load_quantized(str(tmp_path / "fp32"))(IDS).logits, model(IDS).logits)


def test_auto_takes_the_configs_16_bit_dtype(model, tmp_path, monkeypatch):
    monkeypatch.setattr(model.config, "dtype", torch.float16)
    pqk.save_quantized(model, str(tmp_path))
    assert st.load_file(str(tmp_path / "model.safetensors"))["lm_head.weight"].dtype == torch.float16
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"


def test_a_bad_float_dtype_fails_before_anything_is_written(model, tmp_path):
    with pytest.raises(ValueError, match=r"float_dtype must be one of \('auto', 'bfloat16', 'float16', 'float32'\)"):
        pqk.save_quantized(model, str(tmp_path / "q"), float_dtype="int8")
    assert os.listdir(tmp_path) == []


# ---- where a checkpoint may go -----------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", WRITERS)
def test_an_existing_checkpoint_is_kept_unless_overwrite(model, other_model, tmp_path, writer):
    out = tmp_path / "q"
    WRITERS[writer](model, str(out))
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=f"pqk.{writer}: .*q is not empty .*pass overwrite=True"):
        WRITERS[writer](other_model, str(out))
    assert _snapshot(out) == before
    WRITERS[writer](other_model, str(out), overwrite=True)
    assert _snapshot(out) != before and _leftovers(tmp_path) == [] and os.listdir(tmp_path) == ["q"]
    assert pqk.load_quantized(str(out)).pqk_state.cfg == other_model.pqk_state.cfg
    mode = os.stat(out).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask                  # a normal directory, not mkdtemp's 0700


def test_a_directory_of_other_files_is_never_replaced(model, tmp_path):
    (tmp_path / "mine.txt").write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not empty"):
            pqk.save_quantized(model, str(tmp_path), overwrite=overwrite)
    assert os.listdir(tmp_path) == ["mine.txt"] and (tmp_path / "mine.txt").read_text() == "my notes"
    with pytest.raises(FileExistsError, match="holds no pqk checkpoint .*refusing to replace it"):
        pqk.save_quantized(model, str(tmp_path), overwrite=True)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_checkpoint_with_the_users_files_beside_it_is_never_replaced(model, other_model, tmp_path, writer):
    """overwrite=True replaces a checkpoint, not the notes a user put in its directory (a fuzzer's find: they
    were deleted with it), nor a directory whose pqk_config.json is not a pqk checkpoint's; the checkpoint lists its
    own files, and an older one without the list is judged by the names its writers use."""
    out = tmp_path / "q"
    WRITERS[writer](model, str(out))
    assert json.loads((out / "pqk_config.json").read_text())["files"] == sorted(os.listdir(out))
    (out / "NOTES.txt").write_text("mine")
    (out / "runs").mkdir()
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=r"holds a pqk checkpoint and more \(NOTES.txt, runs\)"):
        WRITERS[writer](other_model, str(out), overwrite=True)
    assert _snapshot(out) == before and (out / "runs").is_dir()
    # an older checkpoint (no list): its own files are replaced, a foreign one is not
    os.remove(out / "NOTES.txt")
    os.rmdir(out / "runs")
    meta = json.loads((out / "pqk_config.json").read_text())
    del meta["files"]
    (out / "pqk_config.json").write_text(json.dumps(meta))
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match=r"and more \(thesis.tex\)"):
        WRITERS[writer](other_model, str(out), overwrite=True)
    os.remove(out / "thesis.tex")
    WRITERS[writer](other_model, str(out), overwrite=True)
    assert pqk.load_quantized(str(out)).pqk_state.cfg == other_model.pqk_state.cfg
    # a pqk_config.json that is not a checkpoint's: nothing there is replaced
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "pqk_config.json").write_text("{}")
    (proj / "model.safetensors").write_text("not mine to delete")
    with pytest.raises(FileExistsError, match="holds a pqk checkpoint and more"):
        WRITERS[writer](model, str(proj), overwrite=True)
    assert (proj / "model.safetensors").read_text() == "not mine to delete"


def test_an_empty_path_and_a_non_bool_overwrite_are_refused(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="path is empty .it would mean the working directory."):
        pqk.save_quantized(model, "")
    with pytest.raises(TypeError, match="overwrite must be True or False, got 'no'"):
        pqk.save_quantized(model, str(tmp_path / "q"), overwrite="no")
    assert os.listdir(tmp_path) == []


def test_a_model_after_the_runtime_transforms_is_not_saved(tmp_path):
    """fuse_mlps / quantize_lm_head change a loaded model for speed; saved after them the checkpoint would not
    load (a fuzzer's find): refused, naming what to do, and nothing is written."""
    cfg = pqk.QuantConfig(w_bits=4, a_bits=4, kv_bits=4, rotate=False, **CHEAP)
    m = pqk.quantize_model(tiny_model("llama", layers=1), StubTokenizer(), text(), cfg, progress=False)
    pqk.quantize_lm_head(m)
    with pytest.raises(ValueError, match="lm_head was quantized by pqk.quantize_lm_head: save the model before"):
        pqk.save_quantized(m, str(tmp_path / "a"))
    m = pqk.quantize_model(tiny_model("llama", layers=1), StubTokenizer(), text(), cfg, progress=False)
    pqk.fuse_mlps(m)
    with pytest.raises(ValueError, match="MLPs were fused by pqk.fuse_mlps .*apply fuse_mlps after loading"):
        pqk.export_hf(m, str(tmp_path / "b"))
    assert os.listdir(tmp_path) == []


def test_bad_targets(model, tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="f.txt exists and is not a directory"):
        pqk.save_quantized(model, str(tmp_path / "f.txt"))
    with pytest.raises(NotADirectoryError, match="f.txt is not a directory"):
        pqk.save_quantized(model, str(tmp_path / "f.txt" / "sub" / "q"))
    (tmp_path / "empty").mkdir()
    pqk.save_quantized(model, str(tmp_path / "empty"))                # an empty directory is fine
    pqk.save_quantized(model, str(tmp_path / "a" / "b" / "q"))        # missing parents are created
    assert os.path.exists(tmp_path / "a" / "b" / "q" / "model.safetensors")
    assert ck.target_problem(str(tmp_path / "new")) is None
    assert ck.target_problem(str(tmp_path / "empty"))[0] is FileExistsError


# ---- a write that fails half way ---------------------------------------------------------------------------------

def _failing_save_file(exc):
    real = st.save_file

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:        # half a file on disk, then the failure
            f.truncate(os.path.getsize(filename) // 2)
        raise exc
    return save_file


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("exchange", [True, False])
def test_a_write_failing_half_way_leaves_the_target_as_it_was(model, other_model, tmp_path, monkeypatch, exc,
                                                              writer, exchange):
    out = tmp_path / "q"
    WRITERS[writer](model, str(out))
    before = _snapshot(out)
    if not exchange:                              # the rename-aside fallback of systems without renameat2
        monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    monkeypatch.setattr(st, "save_file", _failing_save_file(exc))
    with pytest.raises(type(exc)):
        WRITERS[writer](other_model, str(out), overwrite=True)
    assert _snapshot(out) == before and _leftovers(tmp_path) == []
    # a first write that fails leaves nothing at all
    with pytest.raises(type(exc)):
        WRITERS[writer](other_model, str(tmp_path / "new"))
    assert sorted(os.listdir(tmp_path)) == ["q"]
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(pqk.load_quantized(str(out))(IDS).logits, rounded(model)(IDS).logits)


def test_a_failing_final_rename_restores_the_old_checkpoint(model, other_model, tmp_path, monkeypatch):
    out = str(tmp_path / "q")
    pqk.save_quantized(model, out)
    before = _snapshot(out)
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    real = os.rename

    def rename(a, b):
        if b == out and ".pqk-tmp-" in a and not a.endswith(".old"):
            raise KeyboardInterrupt                 # between "old aside" and "new in"
        return real(a, b)
    monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        pqk.save_quantized(other_model, out, overwrite=True)
    monkeypatch.undo()
    assert _snapshot(out) == before and _leftovers(tmp_path) == []


def test_a_failing_tokenizer_save_leaves_nothing(model, tmp_path):
    class BadTokenizer:
        def save_pretrained(self, d):
            open(os.path.join(d, "tokenizer.json"), "w").write("{")
            raise RuntimeError("tokenizer write failed")
    with pytest.raises(RuntimeError, match="tokenizer write failed"):
        pqk.save_quantized(model, str(tmp_path / "q"), BadTokenizer())
    assert os.listdir(tmp_path) == []


# ---- reading broken checkpoints ----------------------------------------------------------------------------------

def test_broken_checkpoints_are_named_errors(model, tmp_path):
    good = tmp_path / "good"
    hq.export_hf(model, str(good))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pqk.load_quantized(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        pqk.load_quantized(str(tmp_path / "file"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no pqk_config.json: not a checkpoint"):
        pqk.load_quantized(str(tmp_path / "empty"))

    def broken(name, edit):
        d = tmp_path / name
        d.mkdir()
        for f, b in _snapshot(good).items():
            (d / f).write_bytes(b)
        edit(d)
        return str(d)
    with pytest.raises(FileNotFoundError, match="has pqk_config.json but no model.safetensors: an incomplete"):
        pqk.load_quantized(broken("noweights", lambda d: (d / "model.safetensors").unlink()))
    with pytest.raises(ValueError, match="model.safetensors is truncated or corrupt"):
        pqk.load_quantized(broken("trunc", lambda d: (d / "model.safetensors").write_bytes(
            (good / "model.safetensors").read_bytes()[:1000])))
    with pytest.raises(ValueError, match="pqk_config.json is not valid JSON .*corrupt or truncated checkpoint"):
        pqk.load_quantized(broken("badmeta", lambda d: (d / "pqk_config.json").write_text('{"format": ')))
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        pqk.load_quantized(broken("badcfg", lambda d: (d / "config.json").write_text("{,")))
