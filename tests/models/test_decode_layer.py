"""pqk::decode_layer (models/decode_layer.py, csrc/cpu/decode_layer.cpp): one decoder layer of a CPU decode step in
one op. Against the layer's own eager forward over the same preallocated cache, layer by layer (Llama / Qwen2 /
Qwen3; Hadamard-form down_proj with m = 1 and m = 12; rotated and centered keys; W4A4 and W4A8; KV 4 and 8 bits;
left padding; float32, bf16 and fp16 models): the output to float rounding, the cache row written, the length
advanced; a half-type layer equals the fp32 call on its widened inputs, rounded once. The compiled step calls
it once per layer; bad inputs raise naming the argument and leave the cache as it was."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels.calibration.pipeline import quantize_model
from prefixquant_kernels.models import compiled_step, decode_layer, layer_region
from prefixquant_kernels.models.rotated_linear import RotatedLinear

from .test_compiled_step import _generate, _prompt
from .test_layer_region import _capturing
from .tiny import StubTokenizer, text, tiny_model

_MODELS: dict = {}


def _model(arch, a_bits=4, kv_bits=4, intermediate=128, dtype=torch.float32):
    key = (arch, a_bits, kv_bits, intermediate, dtype)
    if key not in _MODELS:
        cfg = pqk.QuantConfig(w_bits=4, a_bits=a_bits, kv_bits=kv_bits, kv_rotate=kv_bits == 4, k_center=kv_bits == 4,
                              calib_samples=2, calib_seq_len=64)
        float_model = tiny_model(arch, layers=2, intermediate=intermediate).to(dtype)
        _MODELS[key] = quantize_model(float_model, StubTokenizer(), text(), cfg, progress=False)
    return _MODELS[key]


def _layer_inputs(model, batch, seed):
    """Prefill a preallocated cache eagerly, then run one eager decode step capturing each layer's inputs and output
    and the cache tensors before it. Returns (captured per layer, cache after the step)."""
    state = model.pqk_state
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (batch, 7), generator=g)
    cache = state.make_cache(batch, max_cache_len=16)
    p = state.prefix_len
    mask = torch.ones(batch, p + 8, dtype=torch.long)
    if batch > 1:
        mask[1, p:p + 2] = 0                            # left padding after the prefix
    model(ids, attention_mask=mask[:, :p + 7], past_key_values=cache, use_cache=True)
    seen, handles = [], []
    for i, layer in enumerate(model.model.layers):
        def pre(mod, args, kwargs, i=i):
            t = layer_region.layer_tensors(cache, i)
            seen.append({"hidden": (args[0] if args else kwargs["hidden_states"]).clone(),
                         "mask": kwargs.get("attention_mask"), "emb": kwargs["position_embeddings"],
                         "tensors": [x.clone() if isinstance(x, torch.Tensor) else x for x in t]})

        def post(mod, args, kwargs, out, i=i):
            seen[i]["out"] = (out[0] if isinstance(out, tuple) else out).clone()
        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                    layer.register_forward_hook(post, with_kwargs=True)]
    try:
        model(ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return seen, cache


CASES = [("llama", 4, 4, 128, torch.float32), ("qwen2", 4, 4, 96, torch.float32), ("qwen3", 8, 4, 128, torch.float32),
         ("llama", 8, 8, 96, torch.float32), ("llama", 4, 4, 128, torch.bfloat16), ("qwen3", 8, 4, 128, torch.bfloat16),
         ("qwen2", 4, 8, 96, torch.float16)]


@pytest.mark.parametrize("arch,a_bits,kv_bits,intermediate,dtype", CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_op_equals_the_layers_eager_forward(arch, a_bits, kv_bits, intermediate, dtype, batch):
    model = _model(arch, a_bits, kv_bits, intermediate, dtype)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, RotatedLinear) and down.form == "hadamard"   # the online Hadamard is exercised
    seen, cache = _layer_inputs(model, batch, seed=batch)
    for i, (layer, s) in enumerate(zip(model.model.layers, seen)):
        decode_layer.register(layer)
        like = cache.layers[i]
        slot = decode_layer.slot_of(layer, like, s["hidden"])
        assert slot is not None, f"layer {i} of {arch} is not one the op computes"
        k, v, length, ks, vs, pk, pv, rot, off = s["tensors"]
        assert (rot is not None) == (kv_bits == 4) and (off is not None) == (kv_bits == 4)
        k0, n0 = k.clone(), int(length)
        t32 = _cloned(s)                                # the cache side as it was, for the fp32 call below
        hidden = s["hidden"].clone()
        out = decode_layer.forward(slot, hidden, s["mask"], *s["emb"], *s["tensors"])
        assert torch.equal(hidden, s["hidden"]), "the op changed its input"
        assert int(length) == n0 + 1
        # the output, measured against what the layer adds to the residual stream: mostly bit for bit (seen: every
        # case but one layer); the sums' order differs from torch's, so a static quantizer downstream may flip one
        # level of an element (seen: 3e-3 of the layer's output at most, 6e-4 on average)
        ref = s["out"].detach()
        assert out.dtype == ref.dtype == dtype
        err, scale = (out.float() - ref.float()).abs(), float((ref.float() - s["hidden"].float()).abs().max())
        # against the eager layer: fp32 mostly bit for bit (seen: every case but one layer); the sums' order differs
        # from torch's, so a static quantizer downstream may flip one level of an element (seen: 3e-3 of the layer's
        # output at most, 6e-4 on average). bf16 / fp16: the eager layer rounds after every op and the op once, so
        # they differ by the half type's rounding carried through the quantizers (seen: 0.07 at most, 0.012 on average)
        tol_max, tol_mean = (0.02, 2e-3) if dtype == torch.float32 else (0.1, 0.02)
        assert float(err.max()) <= tol_max * scale and float(err.mean()) <= tol_mean * scale, (i, float(err.max()))
        # the cache: only row n0 written, and it holds what the eager step wrote (fp32: a code off by one at most)
        assert torch.equal(k[:, :, :n0], k0[:, :, :n0]) and torch.equal(k[:, :, n0 + 1:], k0[:, :, n0 + 1:])
        for mine, theirs in ((k, like.k), (v, like.v)):
            a, b = mine[:, :, n0], theirs[:, :, n0]
            if kv_bits == 4:
                a, b = pqk.unpack_int4(a), pqk.unpack_int4(b)
            diff = (a.int() - b.int()).abs()
            same = float((diff == 0).float().mean())
            if dtype == torch.float32:
                assert int(diff.max()) <= 1 and same > 0.95
            else:   # a level flipped upstream moves many 8-bit codes (seen: up to 5 codes, 73 % of a row equal)
                assert float(diff.float().mean()) <= 1.0 and same > 0.6
        if dtype != torch.float32:
            # a half-type layer computes in fp32: the same call with x and cos / sin widened (exactly) gives this
            # output rounded once and the same cache row, bit for bit
            cos, sin = s["emb"]
            out32 = decode_layer.forward(slot, hidden.float(), s["mask"], cos.float(), sin.float(), *t32)
            assert torch.equal(out, out32.to(dtype))
            assert torch.equal(t32[0], k) and torch.equal(t32[1], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_step_calls_it_once_per_layer(monkeypatch, dtype):
    """dynamo's graph of a step holds one pqk::decode_layer node per layer and no layer region, for a float32 and a
    bf16 model; generate's tokens equal the eager ones."""
    graphs = _capturing(monkeypatch, decode_layer_op=True)
    model = _model("qwen2", 4, 4, 96, dtype)
    ids, mask = _prompt()
    eager = _generate(model, ids, mask, compiled=False, new=4)
    comp = _generate(model, ids, mask, compiled=True, new=4)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    ops = [t for t in targets if t.startswith("pqk.")]
    assert ops.count("pqk.decode_layer") == len(model.model.layers), ops   # dynamo names the overload packet
    assert not any("invoke_subgraph" in t for t in targets)
    assert torch.equal(comp.sequences, eager.sequences)
    tol = 0.03 if dtype == torch.float32 else 0.1   # bf16: the eager step rounds after every op (seen: 0.05)
    for a, b in zip(comp.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=tol * float(b.abs().max()))


def test_a_step_called_without_a_mask_makes_it_once(monkeypatch):
    """The compiled step called as benchmarks/e2e.py calls it (no attention_mask: transformers builds the mask inside
    the graph): one pqk::materialize of the mask (attention._step_mask), which every layer's op reads, where the
    layers otherwise each read their own recomputed copy; the logits equal the eager step's."""
    graphs = _capturing(monkeypatch, decode_layer_op=True)
    model = _model("llama")
    ids = torch.randint(3, 120, (1, 7), generator=torch.Generator().manual_seed(5))
    caches = [model.pqk_state.make_cache(1, max_cache_len=32) for _ in range(2)]
    step = model.get_compiled_call(compiled_step.compile_config(torch.device("cpu")))
    with torch.no_grad():
        for c in caches:
            model(ids, past_key_values=c, use_cache=True)
        tok = ids[:, -1:]
        comp = step(tok, past_key_values=caches[0], use_cache=True, logits_to_keep=1).logits
        eager = model(tok, past_key_values=caches[1], use_cache=True, logits_to_keep=1).logits
    assert len(graphs) == 1
    nodes = list(graphs[0].graph.nodes)
    made = [n for n in nodes if str(n.target) == "pqk.materialize"]
    layers = [n for n in nodes if str(n.target) == "pqk.decode_layer"]
    assert len(made) == 1 and len(layers) == len(model.model.layers), [str(n.target) for n in nodes]
    for n in layers:   # the op's mask: a view of the one materialized mask
        src = n.args[3]
        while src not in made and src.op == "call_function" and src.args:
            src = src.args[0]
        assert src is made[0], (n, n.args[3])
    torch.testing.assert_close(comp, eager, rtol=0, atol=0.03 * float(eager.abs().max()))


def test_layers_it_does_not_compute_keep_their_forward():
    model = _model("llama")
    layer = model.model.layers[0]
    seen, cache = _layer_inputs(model, 1, seed=0)
    like, x = cache.layers[0], seen[0]["hidden"]
    decode_layer.register(layer)
    assert decode_layer.slot_of(layer, like, x) is not None
    assert decode_layer.slot_of(layer, like, x.bfloat16()) is not None       # fp32, bf16 and fp16 hidden states
    assert decode_layer.slot_of(layer, like, x.double()) is None
    h = layer.post_attention_layernorm.register_forward_hook(lambda *a: None)
    try:
        assert decode_layer.slot_of(layer, like, x) is None                  # a hook must run: the modules do
    finally:
        h.remove()
    q = layer.self_attn.q_proj
    q.backend = "reference"
    try:
        decode_layer.register(layer)                                         # the next generate call's refresh
        assert decode_layer.slot_of(layer, like, x) is None
    finally:
        q.backend = "auto"
        decode_layer.register(layer)
    assert decode_layer.slot_of(layer, like, x) is not None


def _cloned(s):
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in s["tensors"]]


def test_a_slot_follows_its_layer():
    """Registering again refreshes the same slot with the layer's current tensors (a replaced weight is used); a
    collected layer releases its slot (the registry keeps no weights alive), and a released slot raises."""
    model = _model("llama")
    seen, cache = _layer_inputs(model, 1, seed=0)
    s, like, layer = seen[0], cache.layers[0], model.model.layers[0]
    decode_layer.register(layer)
    slot = decode_layer.slot_of(layer, like, s["hidden"])

    def call(index=slot):
        return decode_layer.forward(index, s["hidden"], s["mask"], *s["emb"], *_cloned(s))

    before = call()
    o = layer.self_attn.o_proj
    old = o.w_scale
    o.w_scale = old * 2                           # a new tensor, not an in-place change
    try:
        assert torch.equal(call(), before), "the slot holds the tensors of its registration"
        decode_layer.register(layer)
        assert decode_layer.slot_of(layer, like, s["hidden"]) == slot
        assert not torch.equal(call(), before)
    finally:
        o.w_scale = old
        decode_layer.register(layer)
    assert torch.equal(call(), before)
    held = layer.__dict__.pop("_pqk_decode_slot")
    del held                                      # what the layer's collection does
    with pytest.raises(RuntimeError, match="not a registered slot"):
        call()
    decode_layer.register(layer)                  # a new slot for the layer
    fresh = decode_layer.slot_of(layer, like, s["hidden"])
    assert fresh != slot and torch.equal(call(fresh), before)


def _call(s, slot, **change):
    k, v, length, ks, vs, pk, pv, rot, off = s["tensors"]
    args = dict(hidden=s["hidden"], k=k, v=v, length=length)
    args.update(change)
    return decode_layer.forward(slot, args["hidden"], s["mask"], *s["emb"], args["k"], args["v"], args["length"], ks,
                                vs, pk, pv, rot, off)


def test_bad_inputs_raise_and_leave_the_cache_as_it_was():
    model = _model("llama")
    layer = model.model.layers[0]
    seen, cache = _layer_inputs(model, 1, seed=0)
    s, like = seen[0], cache.layers[0]
    decode_layer.register(layer)
    slot = decode_layer.slot_of(layer, like, s["hidden"])
    k, v, length = s["tensors"][:3]
    k0, v0, n0 = k.clone(), v.clone(), int(length)
    full = torch.tensor([k.shape[2]], dtype=torch.long)
    with pytest.raises(RuntimeError, match="no row is left"):
        _call(s, slot, length=full)
    assert int(full) == k.shape[2]
    with pytest.raises(RuntimeError, match="x must be a contiguous float32, bfloat16 or float16"):
        _call(s, slot, hidden=s["hidden"].double())
    with pytest.raises(RuntimeError, match="x must be a contiguous float32, bfloat16 or float16"):
        _call(s, slot, hidden=s["hidden"][..., :-1].contiguous())
    cos, sin = s["emb"]
    with pytest.raises(RuntimeError, match="cos and sin must be contiguous CPU tensors of one dtype"):
        decode_layer.forward(slot, s["hidden"], s["mask"], cos.bfloat16(), sin.bfloat16(), *_cloned(s))
    with pytest.raises(RuntimeError, match="k_cache and v_cache"):
        _call(s, slot, v=v[..., :-1].contiguous())
    with pytest.raises(RuntimeError, match="k_cache and v_cache"):
        _call(s, slot, k=k.to(torch.int8))
    with pytest.raises(RuntimeError, match="not a registered slot"):
        _call(s, 10 ** 6)
    assert torch.equal(k, k0) and torch.equal(v, v0) and int(length) == n0
    from prefixquant_kernels import _extension
    args = list(decode_layer._module_args(layer))
    args[3] = [list(lin) for lin in args[3]]
    args[3][0][0] = args[3][0][0][:, :-1].contiguous()
    with pytest.raises(RuntimeError, match="q's weight"):     # registration checks the module side
        _extension._C.decode_layer_register(-1, *args)


def test_compiled_step_equals_eager_when_positions_come_from_the_cache():
    """A step called without position_ids (the positions, RoPE and mask read from the cache's length, as a direct
    model call does): compiled with inductor, each layer's output and cache row equal the eager step's. (With the
    op advancing the length itself, inductor recomputed layer 1's RoPE from layer 0's advanced length.)"""
    model = _model("llama")
    state = model.pqk_state
    ids = torch.randint(3, 120, (1, 9), generator=torch.Generator().manual_seed(5))
    cache = state.make_cache(1, max_cache_len=compiled_step.capacity(12))
    model(ids, past_key_values=cache, use_cache=True)
    before = [(l.k.clone(), l.v.clone(), l.length.clone()) for l in cache.layers]

    def restore():
        for l, (k, v, n) in zip(cache.layers, before):
            l.k.copy_(k), l.v.copy_(v), l.length.copy_(n)

    tok = ids[:, -1:]
    with torch.no_grad():
        eager = model(tok, past_key_values=cache, use_cache=True).logits
        rows = [l.k.clone() for l in cache.layers]
        restore()
        step = model.get_compiled_call(compiled_step.compile_config(torch.device("cpu")))
        comp = step(tok, past_key_values=cache, use_cache=True).logits
    assert [int(l.length) for l in cache.layers] == [int(n) + 1 for _, _, n in before]
    assert all(torch.equal(l.k, k) for l, k in zip(cache.layers, rows))
    torch.testing.assert_close(comp, eager, rtol=0, atol=1e-4 * float(eager.abs().max()))
