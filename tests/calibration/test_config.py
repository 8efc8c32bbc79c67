"""QuantConfig validation and its JSON round trip."""
import pytest

import prefixquant_kernels as pqk


@pytest.mark.parametrize("kw,match", [
    (dict(w_bits=3), r"w_bits must be one of \(4, 8\)"),
    (dict(a_bits=16), r"a_bits must be one of \(4, 8\)"),
    (dict(kv_bits=3), "kv_bits must be one of"),
    (dict(kv_bits=2), r"kv_bits=2 is not supported by kv_mode='static'"),
    (dict(kv_bits=8, kv_mode="kivi"), r"kv_bits=8 is not supported by kv_mode='kivi'"),
    (dict(act_quant="per_tensor"), "act_quant must be one of"),
    (dict(weight_method="awq"), "weight_method must be one of"),
    (dict(eta=0.5), "eta must be a number > 1"),
    (dict(calib_samples=0), "calib_samples must be a positive int"),
    (dict(prefix=False, prefix_tokens=[1]), "prefix_tokens given but prefix=False"),
    (dict(prefix_tokens=[]), "prefix_tokens must be a non-empty list"),
    (dict(prefix_tokens=[-1]), "prefix_tokens must be a non-empty list"),
    (dict(kv_window=0), "kv_window must be a positive int"),
    (dict(kv_rotate=1), r"kv_rotate must be True, False or None \(auto\), got 1"),
    (dict(k_center=1), r"k_center must be True, False or None \(auto\), got 1"),
    (dict(k_center=True, kv_bits=16), "k_center=True centers the keys of the static KV cache.*got kv_mode 'fp16'"),
    (dict(k_center=True, act_quant="dynamic"), "k_center=True .*got kv_mode 'dynamic'"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=r"^pqk\.QuantConfig: .*" + match):
        pqk.QuantConfig(**kw)


@pytest.mark.parametrize("kw,exc,match", [   # a fuzzer's finds: each was taken, then failed deep in quantize_model
    (dict(w_bits=4.0), TypeError, "w_bits must be an int, got 4.0"),
    (dict(w_bits=True), TypeError, "w_bits must be an int, got True"),
    (dict(kv_bits=4.0), TypeError, "kv_bits must be an int, got 4.0"),
    (dict(rotate="False"), TypeError, "rotate must be True or False, got 'False'"),
    (dict(prefix=None), TypeError, "prefix must be True or False, got None"),
    (dict(act_clip_search=1), TypeError, "act_clip_search must be True or False, got 1"),
    (dict(seed="abc"), ValueError, r"seed must be an int in \[0, 2\^63\), got 'abc'"),
    (dict(seed=2**70), ValueError, r"seed must be an int in \[0, 2\^63\)"),
    (dict(gptq_damp="0.1"), ValueError, r"gptq_damp must be a number in \(0, 1\), got '0.1'"),
    (dict(gptq_damp=None), ValueError, r"gptq_damp must be a number in \(0, 1\)"),
    (dict(prefix_tokens=5), TypeError, "prefix_tokens must be a list of token ids, got int"),
    (dict(prefix_tokens={1: 2}), TypeError, "prefix_tokens must be a list of token ids, got dict"),
    (dict(version=True), TypeError, "version must be an int, got True"),
])
def test_bad_config_types(kw, exc, match):
    with pytest.raises(exc, match=r"^pqk\.QuantConfig: " + match):
        pqk.QuantConfig(**kw)


def test_resolved_modes_and_round_trip():
    cfg = pqk.QuantConfig(w_bits=4, a_bits=8, kv_bits=4, act_quant="dynamic", prefix=False)
    assert cfg.resolved_kv_mode == "dynamic" and cfg.resolved_weight_method == "gptq"
    assert pqk.QuantConfig(kv_bits=16).resolved_kv_mode == "fp16"
    assert pqk.QuantConfig(w_bits=8).resolved_weight_method == "rtn"
    assert pqk.QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        pqk.QuantConfig.from_dict({**cfg.to_dict(), "group_size": 128})
    with pytest.raises(ValueError, match="version 99 is not supported"):
        pqk.QuantConfig.from_dict({**cfg.to_dict(), "version": 99})


def test_kv_rotate_auto_and_checkpoints_written_before_it():
    assert pqk.QuantConfig(kv_bits=4).resolved_kv_rotate                                     # static KV4
    assert pqk.QuantConfig(kv_bits=4, act_quant="dynamic").resolved_kv_rotate               # dynamic KV4
    assert not pqk.QuantConfig(kv_bits=4, rotate=False).resolved_kv_rotate
    assert not pqk.QuantConfig(kv_bits=8).resolved_kv_rotate
    assert not pqk.QuantConfig(kv_bits=2, kv_mode="kivi").resolved_kv_rotate                # per-channel keys
    assert pqk.QuantConfig(kv_bits=8, rotate=False, kv_rotate=True).resolved_kv_rotate
    assert "+kvrot" in pqk.QuantConfig(kv_bits=4).name
    old = pqk.QuantConfig(kv_bits=4).to_dict()
    del old["kv_rotate"]                                  # a checkpoint from before the option: no KV rotation
    assert pqk.QuantConfig.from_dict(old).resolved_kv_rotate is False


def test_logquant_window_reaches_the_cache():
    from prefixquant_kernels.models.state import PrefixQuantState
    cfg = pqk.QuantConfig(w_bits=8, a_bits=8, kv_bits=2, kv_mode="logquant", kv_window=42)
    cache = PrefixQuantState(cfg, 2, 2, 16, 0, None).make_cache(1)
    assert [layer.window for layer in cache.layers] == [42, 42]


def test_old_import_paths_and_the_registry_tables():
    from prefixquant_kernels import config
    from prefixquant_kernels.calibration.config import (ACT_QUANT, CONFIG_VERSION, KV_BITS, KV_MODES, LINEAR_BITS,
                                                        WEIGHT_METHODS, QuantConfig)
    assert QuantConfig is config.QuantConfig is pqk.QuantConfig
    assert (ACT_QUANT, LINEAR_BITS, CONFIG_VERSION, WEIGHT_METHODS) == (
        config.ACT_QUANT, config.LINEAR_BITS, config.CONFIG_VERSION, config.WEIGHT_METHODS)
    assert KV_MODES == ("auto", "static", "dynamic", "kivi", "logquant", "fp16") and KV_BITS == (2, 4, 8, 16)
    with pytest.raises(ValueError, match=r"kv_mode must be one of \('auto', 'static', .*got 'prefixquant'"):
        pqk.QuantConfig(kv_mode="prefixquant")      # the cache's alias is not a config value: one name per mode


def test_the_config_alone_needs_no_transformers():
    """calibration/__init__.py's promise: QuantConfig imports and validates (KV modes from the registry) without
    transformers; models/ reads it from prefixquant_kernels/config.py, not from calibration/."""
    import subprocess
    import sys
    code = """
import builtins, sys
real = builtins.__import__
def no_transformers(name, *args, **kwargs):
    if name.split(".")[0] == "transformers":
        raise ImportError("blocked")
    return real(name, *args, **kwargs)
builtins.__import__ = no_transformers
from prefixquant_kernels.calibration.config import QuantConfig
assert QuantConfig(kv_mode="kivi", kv_bits=2).resolved_kv_mode == "kivi"
try:
    QuantConfig(kv_mode="kivi", kv_bits=8)
except ValueError as e:
    assert "not supported by kv_mode='kivi' (supported: (2, 4))" in str(e), e
else:
    raise AssertionError("kv_bits=8 accepted for kivi")
assert "transformers" not in sys.modules and "prefixquant_kernels.calibration.pipeline" not in sys.modules
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import ast
    import pathlib
    src = (pathlib.Path(pqk.__file__).parent / "models" / "state.py").read_text()
    mods = {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    assert not any(m and m.startswith("calibration") for m in mods), mods      # no upward import


def test_k_center_auto_name_and_checkpoints_written_before_it():
    assert pqk.QuantConfig(kv_bits=4).resolved_k_center                                     # static KV4
    assert not pqk.QuantConfig(kv_bits=8).resolved_k_center
    assert not pqk.QuantConfig(kv_bits=4, act_quant="dynamic").resolved_k_center            # dynamic KV
    assert not pqk.QuantConfig(kv_bits=4, k_center=False).resolved_k_center
    assert pqk.QuantConfig(kv_bits=8, k_center=True).resolved_k_center
    cfg = pqk.QuantConfig(kv_bits=4)
    assert "+kcenter" in cfg.name and "+kcenter" not in pqk.QuantConfig(kv_bits=4, k_center=False).name
    assert pqk.QuantConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["k_center"]                                   # a checkpoint from before the option: no key offsets
    assert pqk.QuantConfig.from_dict(old).k_center is False
