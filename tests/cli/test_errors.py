"""The command line's error convention (prefixquant_kernels/__main__.py, cli.py): every mistake a user can make prints
one line naming the problem and the flag and exits 2; a failure while running exits 1 (two lines: the error and the
--debug hint); Ctrl-C exits 130 and leaves --out as it was; --debug shows the traceback. Every --help exits 0.
Paths and numbers are checked before a model is loaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
import safetensors.torch as st  # noqa: E402

import prefixquant_kernels as pqk  # noqa: E402
from prefixquant_kernels import cli  # noqa: E402
from prefixquant_kernels.__main__ import COMMANDS, main  # noqa: E402

from ..models.tiny import BOS, StubTokenizer, text, tiny_model  # noqa: E402
from .test_cli import ROOT, float_dir  # noqa: E402,F401  (float_dir: the module fixture)

FAST = ["--calib-samples", "2", "--calib-seq-len", "32", "--weight-method", "rtn", "--threads", "2"]


def _err(capsys, argv, code=2):
    """Run the CLI in-process -> its stderr (asserting the exit code, no traceback, one line for code 2)."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if not argv or argv[0] != "quantize" or code == 2:      # (quantize's progress bars go to stderr too)
        assert err.startswith("prefixquant-kernels"), err
    err = "\n".join(line for line in err.splitlines() if line.startswith("prefixquant-kernels"))
    if code == 2:
        assert err.count("\n") == 0, err
    return err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a command gets as far as loading a model."""
    def fail(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(cli, "load_float_model", fail)


@pytest.fixture(scope="module")
def checkpoint(float_dir, tmp_path_factory):   # noqa: F811
    out = str(tmp_path_factory.mktemp("ck") / "q")
    assert main(["quantize", "--model", float_dir, "--out", out, "--w-bits", "8", "--kv-bits", "8", *FAST]) == 0
    return out


def _copy(src, dst):
    os.makedirs(dst)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


def _snapshot(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


# ---- help ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c != "bench"])
def test_every_help_exits_0_and_documents_every_flag(cmd, capsys, monkeypatch):
    from prefixquant_kernels import selftest
    monkeypatch.setattr(selftest, "_host", lambda rows: pytest.fail("selftest --help ran the selftest"))
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: prefixquant-kernels {cmd}") and "--debug" in out
    if cmd == "quantize":
        for flag in ("--model", "--gguf", "--out", "--overwrite", "--float-dtype", "--kv-mode", "--threads"):
            assert flag in out
        assert "--w-bits {4,8}" in out and "--kv-bits {2,4,8,16}" in out and "kivi: 2, 4" in out
        assert "(default: 4)" in out and "(default: auto)" in out
    if cmd == "demo":          # the whole description, not its first line
        assert "keeps their keys/values in 16 bits" in out and "o = how many such outlier tokens" in out


def test_top_level_help_and_unknown_commands(capsys):
    for argv in (["--help"], ["-h"], []):
        assert main(argv) == 0
        assert "Commands" in capsys.readouterr().out
    assert _err(capsys, ["quantise"]) == ("prefixquant-kernels: unknown command 'quantise'; commands: demo, "
                                          "layer-demo, info, quantize, eval, bench, serve, selftest "
                                          "(see prefixquant-kernels --help)")
    assert "unknown option '--frobnicate'" in _err(capsys, ["--frobnicate"])


def test_in_a_real_process(tmp_path):
    """The exit codes and the single stderr line as a shell sees them."""
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "prefixquant_kernels", *argv], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
    r = run("--help")
    assert r.returncode == 0 and "Commands" in r.stdout
    r = run("eval", "--checkpoint", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("prefixquant-kernels eval: error: --checkpoint ") and "does not exist" in r.stderr
    r = run("--debug", "eval", "--checkpoint", str(tmp_path / "missing"))
    assert r.returncode == 1 and "Traceback" in r.stderr and "UsageError" in r.stderr


# ---- bad numbers and flags ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, msg", [
    (["eval", "--checkpoint", "x", "--seq-len", "0"], "argument --seq-len: must be a positive integer, got '0'"),
    (["eval", "--checkpoint", "x", "--windows", "0"], "argument --windows: must be a positive integer, got '0'"),
    (["eval", "--checkpoint", "x", "--seq-len", "1"], "argument --seq-len: must be >= 2, got 1"),
    (["eval", "--checkpoint", "x", "--windows", "two"], "argument --windows: must be a positive integer, got 'two'"),
    (["eval"], "one of the arguments --checkpoint --model is required"),
    (["eval", "--checkpoint", "x", "--gguf", "f.gguf"], "--gguf: only with --model"),
    (["quantize", "--model", "m", "--out", "o", "--w-bits", "3"], "argument --w-bits: invalid choice: 3 (choose from 4, 8)"),
    (["quantize", "--model", "m", "--out", "o", "--kv-bits", "2"],
     "--kv-bits=2 is not supported by --kv-mode='static' (supported: (4, 8))"),
    (["quantize", "--model", "m", "--out", "o", "--calib-samples", "-1"], "argument --calib-samples: must be a positive"),
    (["quantize", "--model", "m", "--out", "o", "--threads", "0"], "argument --threads: must be a positive integer"),
    (["quantize", "--model", "m"], "the following arguments are required: --out"),
    (["quantize", "--model", "m", "--out", "o", "--float-dtype", "fp8"], "argument --float-dtype: invalid choice"),
    (["quantize", "--model", "m", "--out", "o", "--finetune", "--act-quant", "dynamic"],
     "finetune=True learns static activation scales: it needs --act-quant='static'"),
    (["quantize", "--model", "m", "--out", "o", "--finetune-epochs", "0"],
     "argument --finetune-epochs: must be a positive integer"),
    (["layer-demo", "--tokens", "0"], "argument --tokens: must be a positive integer"),
    (["selftest", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_numbers_and_flags(argv, msg, capsys, no_model_load):
    err = _err(capsys, argv)
    assert err.startswith(f"prefixquant-kernels {argv[0]}: error: ") and msg in err, err


# ---- bad paths and unsupported models: before the model loads ----------------------------------------------------

def test_bad_model_paths(tmp_path, capsys, no_model_load):
    q = ["quantize", "--out", str(tmp_path / "q"), "--model"]
    assert "--model nowhere: neither 'smollm2' nor a local model directory" in _err(capsys, [*q, "nowhere"])
    (tmp_path / "empty").mkdir()
    err = _err(capsys, [*q, str(tmp_path / "empty")])
    assert "no config.json, not a Hugging Face model directory" in err and "sentencepiece" not in err
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "model_type 'gpt2' is not supported (supported: llama, mistral, phi3, qwen2, qwen3)" in _err(
        capsys, [*q, str(tmp_path / "gpt2")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{oops")
    assert "config.json is not valid JSON" in _err(capsys, [*q, str(tmp_path / "bad")])
    (tmp_path / "notok").mkdir()
    (tmp_path / "notok" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "--model " + str(tmp_path / "notok") + ": no tokenizer files" in _err(capsys, [*q, str(tmp_path / "notok")])
    assert "--gguf m.gguf: no such file in" in _err(capsys, [*q, str(tmp_path / "empty"), "--gguf", "m.gguf"])


def test_out_must_be_absent_or_empty_unless_overwrite(tmp_path, capsys, no_model_load, float_dir):  # noqa: F811
    q = ["quantize", "--model", float_dir, "--out"]
    (tmp_path / "notadir.txt").write_text("x")
    assert ("--out " + str(tmp_path / "notadir.txt" / "sub") + ": " + str(tmp_path / "notadir.txt")
            + " is not a directory") in _err(capsys, [*q, str(tmp_path / "notadir.txt" / "sub")])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        err = _err(capsys, [*q, str(mine), *extra])
        assert f"--out {mine}: {mine} is not empty" in err and "choose another directory" in err
    assert _snapshot(mine) == {"notes.txt": b"mine"}


def test_an_existing_checkpoint_needs_overwrite(tmp_path, capsys, checkpoint, float_dir):  # noqa: F811
    out = _copy(checkpoint, str(tmp_path / "q"))
    before = _snapshot(out)
    argv = ["quantize", "--model", float_dir, "--out", out, "--w-bits", "4", *FAST]
    assert "is not empty (" in _err(capsys, argv) and "pass --overwrite to replace the checkpoint" in _err(capsys, argv)
    assert _snapshot(out) == before
    assert main([*argv, "--overwrite"]) == 0 and "wrote" in capsys.readouterr().out
    assert _snapshot(out) != before and pqk.load_quantized(out).pqk_state.cfg.w_bits == 4
    assert os.listdir(tmp_path) == ["q"]                                  # no temporary directory left


# ---- bad or corrupt checkpoints ----------------------------------------------------------------------------------

def test_bad_checkpoints(tmp_path, capsys, checkpoint):
    def ev(path, *extra):
        return _err(capsys, ["eval", "--checkpoint", str(path), "--seq-len", "64", "--windows", "1", *extra])
    assert f"--checkpoint {tmp_path / 'missing'}: " in ev(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in ev(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert "has no pqk_config.json: not a checkpoint written by pqk.save_quantized" in ev(tmp_path / "empty")
    d = _copy(checkpoint, str(tmp_path / "trunc"))
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(d, "model.safetensors")) // 2)
    assert "model.safetensors is truncated or corrupt" in ev(d)
    d = _copy(checkpoint, str(tmp_path / "json"))
    with open(os.path.join(d, "pqk_config.json"), "w") as f:
        f.write('{"format": "prefixquant-kernels", ')
    assert "pqk_config.json is not valid JSON" in ev(d)
    d = _copy(checkpoint, str(tmp_path / "noweights"))
    os.remove(os.path.join(d, "model.safetensors"))
    assert "no model.safetensors: an incomplete checkpoint" in ev(d)
    assert "--seq-len 100000: the bundled evaluation text has" in _err(
        capsys, ["eval", "--checkpoint", checkpoint, "--seq-len", "100000"])


def test_a_save_quantized_checkpoint_without_tokenizer(tmp_path, capsys, float_dir):  # noqa: F811
    model = pqk.quantize_model(tiny_model("llama"), StubTokenizer(), text(), pqk.QuantConfig(
        w_bits=8, a_bits=8, kv_bits=8, calib_samples=2, calib_seq_len=32, prefix_tokens=[BOS],
        act_clip_search=False, weight_method="rtn"), progress=False)
    pqk.save_quantized(model, str(tmp_path / "q"))
    err = _err(capsys, ["eval", "--checkpoint", str(tmp_path / "q")])
    assert "no tokenizer saved with it" in err and "pass --tokenizer DIR" in err
    assert main(["eval", "--checkpoint", str(tmp_path / "q"), "--tokenizer", float_dir, "--seq-len", "64",
                 "--windows", "1"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")


# ---- failures while running, Ctrl-C, --debug ---------------------------------------------------------------------

def test_ctrl_c_during_quantize_leaves_out_as_it_was(tmp_path, capsys, monkeypatch, checkpoint, float_dir):  # noqa: F811
    out = _copy(checkpoint, str(tmp_path / "q"))
    before = _snapshot(out)
    argv = ["quantize", "--model", float_dir, "--out", out, "--overwrite", *FAST]
    real = st.save_file

    def interrupted(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)        # the weights are on disk (in the temporary directory)...
        raise KeyboardInterrupt                           # ...when Ctrl-C comes
    monkeypatch.setattr(st, "save_file", interrupted)
    err = _err(capsys, argv, 130)
    assert err == f"prefixquant-kernels quantize: error: interrupted; nothing was written (--out {out} is as it was)"
    assert _snapshot(out) == before and os.listdir(tmp_path) == ["q"]
    # while calibrating
    from prefixquant_kernels.calibration import pipeline

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "quantize_model", ctrl_c)
    assert "interrupted" in _err(capsys, [*argv[:4], str(tmp_path / "new"), *FAST], 130)
    assert os.listdir(tmp_path) == ["q"]


def test_a_failing_write_is_exit_1_and_changes_nothing(tmp_path, capsys, monkeypatch, checkpoint, float_dir):  # noqa: F811
    out = _copy(checkpoint, str(tmp_path / "q"))
    before = _snapshot(out)

    def disk_full(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(st, "save_file", disk_full)
    err = _err(capsys, ["quantize", "--model", float_dir, "--out", out, "--overwrite", *FAST], 1)
    assert err == (f"prefixquant-kernels quantize: error: writing --out {out} failed ([Errno 28] No space left on "
                   f"device); {out} is as it was")
    assert _snapshot(out) == before and os.listdir(tmp_path) == ["q"]


def test_an_unexpected_failure_is_two_lines_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch,
                                                                          float_dir):  # noqa: F811
    from prefixquant_kernels.calibration import pipeline

    def boom(*a, **k):
        raise RuntimeError("kernel exploded\nsecond line")
    monkeypatch.setattr(pipeline, "quantize_model", boom)
    argv = ["quantize", "--model", float_dir, "--out", str(tmp_path / "q"), *FAST]
    err = _err(capsys, argv, 1)
    assert err.splitlines() == ["prefixquant-kernels quantize: failed: RuntimeError: kernel exploded second line",
                                "prefixquant-kernels quantize: (rerun with --debug for the traceback)"]
    with pytest.raises(RuntimeError, match="kernel exploded"):
        main([*argv, "--debug"])
    assert not os.path.exists(tmp_path / "q")
