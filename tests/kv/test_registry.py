"""The KV mode registry (prefixquant_kernels/cache/registry.py): every mode once under one name, the
"prefixquant" alias, the errors naming the known modes and a mode's widths, PrefixQuantCache(bits=...), and a
new mode registered the way a new file in cache/modes/ would be, reaching PrefixQuantCache, QuantConfig and
the model state without touching them."""
import re

import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import kv_format as kvf
from prefixquant_kernels.cache import kv_mode, kv_mode_aliases, kv_modes, register_kv_mode, unregister_kv_mode
from prefixquant_kernels.cache.modes.kivi import KiviLayer
from prefixquant_kernels.cache.modes.static import StaticQuantLayer
from prefixquant_kernels.models.state import PrefixQuantState

from .conftest import rand_kv

H, D = 2, 64
BUILT_IN = {"static": (4, 8), "dynamic": (4, 8), "kivi": (2, 4), "logquant": (2, 4), "fp16": (16,)}


def test_every_mode_is_registered_once_under_one_name():
    assert kv_modes() == tuple(BUILT_IN)
    assert kv_mode_aliases() == {"prefixquant": "static"}
    classes = [kv_mode(m).layer for m in kv_modes()]
    assert len(set(classes)) == len(classes)                   # one class per mode
    for name, bits in BUILT_IN.items():
        spec = kv_mode(name)
        assert spec.name == name and spec.bits == bits and spec.default_bits == bits[0]
        assert spec.layer.kv_mode == name and spec.layer.supported_bits == bits
    assert set(pqk.cache.MODES) == set(BUILT_IN)
    assert pqk.QuantConfig.__module__ == "prefixquant_kernels.config"
    from prefixquant_kernels.calibration.config import KV_BITS, KV_MODES, QuantConfig
    assert QuantConfig is pqk.QuantConfig
    assert KV_MODES == ("auto", *BUILT_IN) and KV_BITS == (2, 4, 8, 16)


def test_prefixquant_is_an_alias_of_static(gen):
    assert kv_mode("prefixquant") is kv_mode("static")
    assert "prefixquant" not in kv_modes()
    ks, vs = torch.rand(H, generator=gen) + 0.2, torch.rand(H, generator=gen) + 0.2
    a = pqk.PrefixQuantCache(1, "prefixquant", key_scales=[ks], value_scales=[vs], backend="reference")
    b = pqk.PrefixQuantCache(1, "static", key_scales=[ks], value_scales=[vs], backend="reference")
    assert a.mode == b.mode == "static" and type(a.layers[0]) is type(b.layers[0]) is StaticQuantLayer
    k, v = rand_kv((1, H, 5, D), torch.float16, gen), rand_kv((1, H, 5, D), torch.float16, gen)
    for x, y in zip(a.update(k, v, 0), b.update(k, v, 0)):
        assert torch.equal(x, y)


def test_an_unknown_mode_names_the_known_ones():
    with pytest.raises(ValueError, match=r"^pqk\.kv_mode: mode must be one of \('static', 'dynamic', 'kivi', "
                                         r"'logquant', 'fp16'\) \(aliases: 'prefixquant' = 'static'\), got 'int3'"):
        kv_mode("int3")
    with pytest.raises(ValueError, match=r"^pqk\.PrefixQuantCache: mode must be one of .*'fp16'.*got 'int3'"):
        pqk.PrefixQuantCache(1, "int3")
    with pytest.raises(ValueError, match=r"^pqk\.QuantConfig: kv_mode must be one of \('auto', 'static', "):
        pqk.QuantConfig(kv_mode="int3")


@pytest.mark.parametrize("mode,kw,bits", [
    ("kivi", {}, 8), ("logquant", {}, 3), ("fp16", {}, 4), ("dynamic", {}, 2), ("kivi", {}, True),
    ("static", dict(key_scales=[torch.ones(H)], value_scales=[torch.ones(H)]), 2),
])
def test_bits_a_mode_does_not_support(mode, kw, bits):
    msg = f"pqk.PrefixQuantCache: bits={bits!r} is not supported by mode='{mode}' (supported: {BUILT_IN[mode]})"
    with pytest.raises(ValueError, match="^" + re.escape(msg)):
        pqk.PrefixQuantCache(1, mode, bits=bits, **kw)


def test_options_a_mode_does_not_take():
    with pytest.raises(ValueError, match=r"^pqk\.PrefixQuantCache: mode 'kivi' takes no option 'colour' "
                                         r"\(its options: \('group_size', 'residual_length'\)\)"):
        pqk.PrefixQuantCache(1, "kivi", colour=3)
    # the named knobs go to the modes that take them and, as always, are ignored by the others
    assert pqk.PrefixQuantCache(1, "fp16", group_size=3, window=0).layers[0].bits == 16


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_static_8_bit(backend, gen):
    ks, vs = torch.rand(H, generator=gen) + 0.2, torch.rand(H, generator=gen) + 0.2
    cache = pqk.PrefixQuantCache(1, "prefixquant", key_scales=[ks], value_scales=[vs], bits=8, backend=backend)
    assert cache.bits == 8 and cache.layers[0].bits == 8
    assert pqk.PrefixQuantCache(1, "static", key_scales=[ks], value_scales=[vs]).bits == 4   # the default
    k, v = rand_kv((2, H, 6, D), torch.float16, gen), rand_kv((2, H, 6, D), torch.float16, gen)
    k_out, v_out = cache.update(k, v, 0)
    for got, x, s in ((k_out, k, ks), (v_out, v, vs)):
        want = kvf.dequantize_static(kvf.quantize_static(x, s, 8), s, 8).half()
        torch.testing.assert_close(got, want, rtol=torch.finfo(torch.float16).eps, atol=0)
    assert cache.memory_bytes()["body"] == 2 * 2 * H * 6 * D                  # one byte per value


def test_registering_twice_is_refused():
    with pytest.raises(ValueError, match="already names a KV mode"):
        register_kv_mode("kivi", bits=(2,))
    with pytest.raises(ValueError, match="already names a KV mode"):
        register_kv_mode("prefixquant", bits=(4,))
    with pytest.raises(ValueError, match="KiviLayer is already registered as 'kivi': register a subclass"):
        register_kv_mode("kivi2", bits=(2,))(KiviLayer)
    assert "kivi2" not in kv_modes()


# ---- a new mode reusing existing formats: what one new file in cache/modes/ would hold --------------------------

@pytest.fixture
def new_modes():
    """Two toy modes: "static8" (the static format, 8-bit only) and "kivi-block" (KIVI with G = R = block, an
    option of its own); unregistered afterwards."""

    @register_kv_mode("static8", bits=(8,), options=("key_scales", "value_scales"))
    class Static8Layer(StaticQuantLayer):
        pass

    @register_kv_mode("kivi-block", bits=(2, 4))
    class KiviBlockLayer(KiviLayer):
        def __init__(self, block: int = 8, prefix_keys=None, prefix_values=None, bits=None, backend="auto"):
            super().__init__(block, block, prefix_keys, prefix_values, bits, backend)

    yield Static8Layer, KiviBlockLayer
    unregister_kv_mode("static8")
    unregister_kv_mode("kivi-block")


def test_a_new_mode_reaches_the_cache_the_config_and_the_state(new_modes, gen):
    static8, kivi_block = new_modes
    assert kv_modes()[-2:] == ("static8", "kivi-block") and kv_mode("kivi-block").options == ("block",)
    k, v = rand_kv((2, H, 13, D), torch.float16, gen), rand_kv((2, H, 13, D), torch.float16, gen)
    ks, vs = torch.rand(H, generator=gen) + 0.2, torch.rand(H, generator=gen) + 0.2
    # the cache: the same numbers as the modes it reuses
    pairs = [(pqk.PrefixQuantCache(1, "static8", key_scales=[ks], value_scales=[vs], backend="reference"),
              pqk.PrefixQuantCache(1, "static", key_scales=[ks], value_scales=[vs], bits=8, backend="reference")),
             (pqk.PrefixQuantCache(1, "kivi-block", block=4, bits=4, backend="reference"),
              pqk.PrefixQuantCache(1, "kivi", group_size=4, residual_length=4, bits=4, backend="reference"))]
    for new, old in pairs:
        assert type(new.layers[0]) in new_modes and new.bits == old.bits
        for x, y in zip(new.update(k, v, 0), old.update(k, v, 0)):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match=r"bits=4 is not supported by mode='static8' \(supported: \(8,\)\)"):
        pqk.PrefixQuantCache(1, "static8", key_scales=[ks], value_scales=[vs], bits=4)
    with pytest.raises(ValueError, match=r"block are for mode='kivi-block', not 'kivi'"):
        pqk.PrefixQuantCache(1, "kivi", block=4)
    # the config and the model state: by name
    cfg = pqk.QuantConfig(w_bits=8, a_bits=8, kv_bits=8, kv_mode="static8")
    with pytest.raises(ValueError, match=r"kv_bits=4 is not supported by kv_mode='static8' \(supported: \(8,\)\)"):
        pqk.QuantConfig(kv_bits=4, kv_mode="static8")
    state = PrefixQuantState(cfg, 2, H, D, 0, None)
    assert "key_scales_1" in dict(state.named_buffers())                   # the mode takes static scales
    cache = state.make_cache()
    assert [type(layer) for layer in cache.layers] == [static8, static8] and cache.bits == 8
    cfg = pqk.QuantConfig(w_bits=8, a_bits=8, kv_bits=2, kv_mode="kivi-block")
    assert type(PrefixQuantState(cfg, 1, H, D, 0, None).make_cache().layers[0]) is kivi_block


def test_an_unregistered_mode_is_gone():
    assert "static8" not in kv_modes()
    with pytest.raises(ValueError, match="kv_mode must be one of"):
        pqk.QuantConfig(kv_bits=8, kv_mode="static8")
