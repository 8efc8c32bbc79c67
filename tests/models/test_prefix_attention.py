"""Prefill over [prefix | prompt] without a materialized mask (models/prefix_attention.py): SDPA's causal kernel
with placeholder queries, or on an AVX-512 CPU the C++ flash loop pqk::prefix_causal_attention
(csrc/cpu/attention.cpp), whose every ISA table is tested here. Equals SDPA with the bottom-right causal mask; the
patched model uses it for unpadded prefills into a prefix-only cache."""
import pytest
import torch

import prefixquant_kernels as pqk

from prefixquant_kernels.models import attention, prefix_attention

from .test_fused_decode import _assert_same, _quantized
from .tiny import StubTokenizer, text


def _masked_reference(q, k, v, p, scaling):
    t, g = q.shape[2], q.shape[1] // k.shape[1]
    mask = torch.ones(t, p + t, dtype=torch.bool).tril(p)   # query i: the prefix and prompt keys 0..i
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(g, 1),
                                                           v.float().repeat_interleave(g, 1), attn_mask=mask,
                                                           scale=scaling)
    return out.transpose(1, 2)


SHAPES = [(1, 2, 4, 37, 1, 64), (2, 3, 1, 16, 3, 32), (1, 1, 2, 5, 0, 16), (1, 2, 2, 129, 4, 8),
          (1, 3, 3, 200, 1, 80), (2, 1, 2, 70, 2, 128)]


def _inputs(B, Hkv, G, T, P, D, dtype):
    g = torch.Generator().manual_seed(T + P)
    q = torch.randn(B, Hkv * G, T, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, P + T, D, generator=g) * 3).to(dtype)   # spread scores: the merge must be exact
    v = torch.randn(B, Hkv, P + T, D, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("B,Hkv,G,T,P,D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cpp", [False, True])
def test_matches_masked_sdpa(B, Hkv, G, T, P, D, dtype, cpp, monkeypatch):
    """The function as the model calls it, with the C++ loop (where this CPU takes it) and with SDPA."""
    if cpp and not prefix_attention._cpu_kernel(torch.ones(1), torch.ones(1), torch.ones(1)):
        pytest.skip("the C++ prefill attention runs on the AVX2 and AVX-512 tables only")
    if not cpp:
        monkeypatch.setattr(prefix_attention, "_cpu_kernel", lambda *a: False)
    q, k, v = _inputs(B, Hkv, G, T, P, D, dtype)
    out = prefix_attention.prefix_causal_attention(q, k, v, P, D ** -0.5)
    want = _masked_reference(q, k, v, P, D ** -0.5)
    assert out.dtype == dtype and out.shape == (B, T, Hkv * G, D)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


def _cpu_isas():
    from prefixquant_kernels.ops.backend import CPU_ISAS
    have = pqk.available_backends()
    return [(name, CPU_ISAS[name]) for name in CPU_ISAS if name in have and name != "cpu"]


@pytest.mark.parametrize("B,Hkv,G,T,P,D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_cpp_loop_on_every_isa(B, Hkv, G, T, P, D, dtype):
    """pqk::prefix_causal_attention on each kernel table this CPU runs (the zmm blocks, the portable ones): the
    masked reference to float rounding, the output poisoned first (every element written), inputs untouched."""
    isas = _cpu_isas()
    if not isas:
        pytest.skip("C++ extension not built")
    q, k, v = _inputs(B, Hkv, G, T, P, D, dtype)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    want = _masked_reference(q, k, v, P, D ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, isa in isas:
        out = torch.ops.pqk.prefix_causal_attention(q, k, v, P, D ** -0.5, isa)
        assert out.dtype == dtype and out.shape == (B, T, Hkv * G, D), name
        torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol, msg=name)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


def test_the_cpp_loop_rejects_bad_inputs():
    if not _cpu_isas():
        pytest.skip("C++ extension not built")
    q, k, v = _inputs(1, 2, 2, 9, 1, 16, torch.float32)
    op = torch.ops.pqk.prefix_causal_attention
    with pytest.raises(RuntimeError, match="key / value must be"):
        op(q, k[:, :, 1:], v[:, :, 1:], 1, 0.25)                    # prefix_len + T keys, not T
    with pytest.raises(RuntimeError, match="key / value must be"):
        op(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1), 1, 0.25)  # 4 query heads over 3
    with pytest.raises(RuntimeError, match="share one dtype"):
        op(q, k.bfloat16(), v, 1, 0.25)
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        op(q.double(), k.double(), v.double(), 1, 0.25)
    with pytest.raises(RuntimeError, match="4-D CPU tensors"):
        op(q[0], k, v, 1, 0.25)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        op(q, k, v, 1, float("nan"))


def test_rejects_mismatched_lengths():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8)
    with pytest.raises(ValueError, match="key/value must be"):
        prefix_attention.prefix_causal_attention(q, k, k, 1, 0.3)


@pytest.fixture
def spy(monkeypatch):
    n = []
    real = attention.prefix_causal_attention
    monkeypatch.setattr(attention, "prefix_causal_attention", lambda *a: n.append(1) or real(*a))
    return n


def _prefill(model, fused, prompt, mask=None):
    cache = model.pqk_state.make_cache(prompt.shape[0])
    cache.fused_decode = fused
    attn = []
    o_proj = model.model.layers[0].self_attn.o_proj
    hook = o_proj.register_forward_pre_hook(lambda mod, args: attn.append(args[0].clone()))
    try:
        with torch.no_grad():
            logits = model(prompt, past_key_values=cache, attention_mask=mask).logits
    finally:
        hook.remove()
    return logits, attn[0]


@pytest.mark.parametrize("arch,attn,kv_bits", [("llama", "sdpa", 4), ("qwen3", "eager", 8), ("qwen2", "sdpa", 4),
                                                ("mistral", "sdpa", 4), ("phi3", "sdpa", 4), ("phi3", "eager", 8)])
def test_model_prefill_uses_it_and_matches(arch, attn, kv_bits, spy):
    model = _quantized(arch, attn, kv_bits, True)
    assert model.pqk_state.make_cache(1).layers[0].prefix_len > 0
    prompt = torch.tensor([StubTokenizer().encode(text(45, seed=4))])
    want = _prefill(model, False, prompt)
    assert not spy
    got = _prefill(model, True, prompt)
    assert len(spy) == len(model.model.layers)
    _assert_same(got, want)


def test_padded_prefill_keeps_the_mask(spy):
    model = _quantized("llama", "sdpa", 4, False)
    prompt = torch.tensor([StubTokenizer().encode(text(40, seed=s))[:24] for s in (7, 8)])
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    want = _prefill(model, False, prompt, mask)
    got = _prefill(model, True, prompt, mask)
    assert not spy
    _assert_same(got, want)


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512_bf16" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("D", [8, 16, 64, 80, 128])
def test_bf16_inputs_take_the_bf16_blocks(D, monkeypatch):
    """bf16 inputs on the avx512vnni / amx tables: the vdpbf16ps blocks (x86_attention_bf16.h) where the CPU has
    AVX512-BF16 and D % 16 == 0, else the fp32 blocks on widened inputs (PQK_ATTN_BF16_DOT=0 forces those). Both
    equal the masked reference to bf16 rounding; they differ from each other exactly where the bf16 blocks ran."""
    isas = [(n, i) for n, i in _cpu_isas() if n in ("cpu:avx512vnni", "cpu:amx")]
    if not isas:
        pytest.skip("the zmm attention blocks need an AVX-512 table")
    q, k, v = _inputs(1, 3, 3, 150, 2, D, torch.bfloat16)
    want = _masked_reference(q, k, v, 2, D ** -0.5)
    for name, isa in isas:
        monkeypatch.setenv("PQK_ATTN_BF16_DOT", "1")
        dot = torch.ops.pqk.prefix_causal_attention(q, k, v, 2, D ** -0.5, isa)
        monkeypatch.setenv("PQK_ATTN_BF16_DOT", "0")
        f32 = torch.ops.pqk.prefix_causal_attention(q, k, v, 2, D ** -0.5, isa)
        for out in (dot, f32):
            torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2, msg=name)
        assert torch.equal(dot, f32) != (_cpu_has_avx512_bf16() and D % 16 == 0), name


@pytest.mark.parametrize("isa", ["scalar", "avx2", "auto"])
def test_the_table_decides_who_runs(isa):
    """The C++ loop takes a call where the kernel table has the attention blocks, as the table itself says
    (`cpu_attention_blocks`): not on the scalar table (its portable blocks lose to SDPA), on AVX2 where the CPU has
    FMA (x86_attention_ymm.h), on the AVX-512 tables. Each ISA in a fresh process (PQK_CPU_ISA is read once).
    Planted: `_cpu_kernel` deciding by the table's name with "scalar" among the names: the scalar case fails."""
    import os
    import subprocess
    import sys
    from prefixquant_kernels import _extension
    if not _extension.cpu_available():
        pytest.skip("no C++ extension")
    if isa == "avx2" and not _extension._C.cpu_isa_supported(1):
        pytest.skip("no AVX2 on this CPU")
    code = ("import torch; from prefixquant_kernels.models import prefix_attention as pa; "
            "from prefixquant_kernels import _extension as e; "
            "x = torch.ones(1, 1, 4, 16); print(pa._cpu_kernel(x, x, x), e._C.best_cpu_isa())")
    env = dict(os.environ)
    env.pop("PQK_CPU_ISA", None)
    if isa != "auto":
        env["PQK_CPU_ISA"] = isa
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    takes, table = r.stdout.split()
    with open("/proc/cpuinfo") as f:
        fma = " fma " in f.read()
    expect = {"scalar": False, "avx2": fma}.get(table, True)
    assert table == (isa if isa != "auto" else _extension._C.best_cpu_isa())
    assert takes == str(expect)
