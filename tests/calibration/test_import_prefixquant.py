"""pqk.import_prefixquant / load_prefixquant: a checkpoint in PrefixQuant's own layout -> our kernels.

The fixture ``write_prefixquant_checkpoint`` writes the files the way their code does, as read at
github.com/ChenMnZ/PrefixQuant commit 97cc15b:
* main.py L317-326: ``model.half()``, ``model.save_pretrained`` (config.json + model.safetensors),
  ``torch.save(prefixed_key_values, 'prefixed_key_values.pth')`` (``output.past_key_values`` of the prefix tokens,
  L248-249: a float forward after the rotation, before any quantizer: per layer (K, V)),
  ``prefixequant_config.json`` = ``get_quant_config(args)`` + ``prefixed_tokens`` (utils/quant_utils.py L811-831).
* quantizer parameter names and shapes: utils/quant_utils.py L126-275 (``weight_quantizer`` on every linear,
  ``output_quantizer`` on input_layernorm / post_attention_layernorm (the q/k/v and gate/up inputs) and on v_proj,
  ``input_quantizer`` on o_proj / down_proj, ``k_quantizer`` on ``self_attn.apply_rotary_pos_emb_qk_rotation_wrapper``
  (utils/rotation_utils.py L349-360)); quantize/quantizer.py L87-150: symmetric scales ``2 max / (2^b - 1)``,
  shapes [N, 1] (weights, per output channel), [1, 1] (activations), [H_kv, 1] (K/V, group head_dim).
* quantize/block_ap.py L311-313: weights fake-quantized in place (``quant_inplace``) before saving.
* the online Hadamards: utils/rotation_utils.py L192-207 (``apply_exact_had_to_linear`` on down_proj's input side)
  + int_linear_fake.py L44-49 (the online transform of the down_proj input), QKRotationWrapper L334-345 (Q and K
  after RoPE, then K's quantizer).

The reference ``ref_logits`` is an independent fp32 Llama forward with their fake quantization (quantizer.py
``static_fake_quant``) at the same points with the same scales; the imported model must match it within rounding.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import prefixquant_kernels as pqk
from prefixquant_kernels.calibration import import_prefixquant as ipq

from ..models.tiny import BOS, OUTLIER, tiny_model

PREFIX = [OUTLIER, BOS]


# ---- an independent reference: their fake-quant Llama forward, fp32 --------------------------------------------

def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fq(x, s, bits):
    """Their static fake quant: clamp(round(x / s)) * s, s clamped to [1e-4, 1e4]."""
    s = s.clamp(1e-4, 1e4)
    return torch.round(x / s).clamp(-(1 << (bits - 1)), (1 << (bits - 1)) - 1) * s


def rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    f = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@torch.no_grad()
def ref_forward(sd, config, qc, ids, prefix_kv=None, quant=True, record=None):
    """sd: their state dict (fp16 tensors); ids int64 [1, T] after the prefix -> (logits fp32 [1, T, V], per
    layer (K, V)). record: dict filled with the quantizer inputs (prefix positions excluded) when given."""
    g = {k: v.float() for k, v in sd.items()}
    n_h, n_kv = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // n_h
    theta = config.rope_parameters["rope_theta"]
    eps = config.rms_norm_eps
    p = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
    t = ids.shape[1]
    pos = torch.arange(p, p + t)
    hd = (sylvester(d) / math.sqrt(d)).float() if qc["qk_online_had"] else None
    inter = config.intermediate_size
    md = (sylvester(inter) / math.sqrt(inter)).float() if qc["down_online_had"] else None
    wb, ab, kb = qc["wbits"], qc["input_bits"], qc["k_bits"]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def lin(x, name):
        w = g[name + ".weight"]
        if quant:
            w = fq(w, g[name + ".weight_quantizer.scale"], wb)
        y = x @ w.T
        return y + g[name + ".bias"] if name + ".bias" in g else y

    def act(x, key):
        if record is not None:
            record.setdefault(key, []).append(x)
        return fq(x, g[key], ab) if quant else x

    h = g["model.embed_tokens.weight"][ids]
    kvs = []
    for i in range(config.num_hidden_layers):
        pre = f"model.layers.{i}."
        x = act(rms(h, g[pre + "input_layernorm.weight"]), pre + "input_layernorm.output_quantizer.scale")
        q = lin(x, pre + "self_attn.q_proj").view(1, t, n_h, d).transpose(1, 2)
        k = lin(x, pre + "self_attn.k_proj").view(1, t, n_kv, d).transpose(1, 2)
        v = lin(x, pre + "self_attn.v_proj").view(1, t, n_kv, d).transpose(1, 2)
        q, k = rope(q, pos, theta), rope(k, pos, theta)
        if hd is not None:
            q, k = q @ hd, k @ hd
        if record is not None:
            record.setdefault(pre + "k", []).append(k)
            record.setdefault(pre + "v", []).append(v)
        if quant and kb < 16:
            k = fq(k, g[pre + ipq._K_QUANT].view(1, -1, 1, 1), kb)
            v = fq(v, g[pre + ipq._V_QUANT].view(1, -1, 1, 1), kb)
        kvs.append((k, v))
        if prefix_kv is not None:
            k = torch.cat([prefix_kv[i][0].float(), k], 2)
            v = torch.cat([prefix_kv[i][1].float(), v], 2)
        k, v = k.repeat_interleave(n_h // n_kv, 1), v.repeat_interleave(n_h // n_kv, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        visible = torch.arange(p + t)[None, :] <= pos[:, None]          # prefix always, then causal
        o = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v
        o = act(o.transpose(1, 2).reshape(1, t, n_h * d), pre + "self_attn.o_proj.input_quantizer.scale")
        h = h + lin(o, pre + "self_attn.o_proj")
        x = act(rms(h, g[pre + "post_attention_layernorm.weight"]),
                pre + "post_attention_layernorm.output_quantizer.scale")
        a = F.silu(lin(x, pre + "mlp.gate_proj")) * lin(x, pre + "mlp.up_proj")
        if md is not None:
            a = a @ md.T
        h = h + lin(act(a, pre + "mlp.down_proj.input_quantizer.scale"), pre + "mlp.down_proj")
    h = rms(h, g["model.norm.weight"])
    return h @ g["lm_head.weight"].T, kvs


# ---- the fixture: a checkpoint as their main.py writes it ---------------------------------------------------------

DEFAULT_QC = dict(wbits=4, w_group_size=-1, w_asym=False, input_bits=8, input_group_size=-1, input_asym=False,
                  input_mode="static", k_bits=4, v_bits=4, kv_group_size=16, kv_asym=False, k_pre_rope=False,
                  kv_mode="static", down_online_had=True, qk_online_had=True, real_quant=False,
                  set_prefixed_tokens=True, activation_clipping=False)


def write_prefixquant_checkpoint(path, model=None, seed=0, **qc_over):
    """Write ``model`` (default: a tiny random Llama) quantized PrefixQuant-style to ``path``; -> (sd, qc, config,
    prefix_kv) as written (sd: their state dict, fp16)."""
    model = tiny_model("llama", seed=seed) if model is None else model
    config = model.config
    qc = {**DEFAULT_QC, **qc_over}
    prefix = PREFIX if qc["set_prefixed_tokens"] else None
    qc["prefixed_tokens"] = prefix
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    for k in [k for k in sd if k.endswith("norm.weight")]:            # non-trivial norms (no pre_rotate fusion)
        sd[k] = 1 + 0.2 * torch.rand(sd[k].shape, generator=gen, dtype=torch.float64)
    inter = config.intermediate_size
    if qc["down_online_had"]:                                          # apply_exact_had_to_linear(down, output=False)
        md = sylvester(inter) / math.sqrt(inter)
        for i in range(config.num_hidden_layers):
            key = f"model.layers.{i}.mlp.down_proj.weight"
            sd[key] = sd[key] @ md.T
    sd = {k: v.half() for k, v in sd.items()}                          # model.half()
    # calibration statistics of the float (rotated) model, prefix excluded
    n_kv, d = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    prefix_kv = None
    if prefix:
        _, kvs = ref_forward(sd, config, qc, torch.tensor([prefix]), quant=False)
        prefix_kv = tuple((k.half(), v.half()) for k, v in kvs)
    rec = {}
    calib = torch.randint(3, config.vocab_size, (1, 48), generator=gen)
    ref_forward(sd, config, qc, calib, prefix_kv=prefix_kv, quant=False, record=rec)
    qmax_w, qmax_a, qmax_kv = 2 ** qc["wbits"] - 1, 2 ** qc["input_bits"] - 1, 2 ** qc["k_bits"] - 1
    for i in range(config.num_hidden_layers):
        pre = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            w = sd[pre + name + ".weight"].float()
            clip = 0.75 + 0.25 * torch.rand(w.shape[0], 1, generator=gen)          # their MSE-init shrink
            s = (2 * w.abs().amax(1, keepdim=True) / qmax_w * clip).half()
            sd[pre + name + ".weight_quantizer.scale"] = s
            sd[pre + name + ".weight"] = fq(w, s.float(), qc["wbits"]).half()      # quant_inplace
        for key in ipq._ACT_POINTS:
            amax = torch.cat(rec[pre + key]).abs().max()
            sd[pre + key] = (2 * amax / qmax_a * 0.9).reshape(1, 1).half()
        if qc["k_bits"] < 16:
            for key, name in ((ipq._K_QUANT, "k"), (ipq._V_QUANT, "v")):
                amax = torch.cat(rec[pre + name]).abs().amax((0, 2, 3))             # per KV head
                sd[pre + key] = (2 * amax / qmax_kv * 0.95).reshape(n_kv, 1).half()
    config.save_pretrained(path)
    cfg_file = path / "config.json"
    cfg_json = json.loads(cfg_file.read_text())
    cfg_json["prefixed_tokens"] = prefix                                # main.py L241: model.config.prefixed_tokens
    cfg_file.write_text(json.dumps(cfg_json))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    if prefix:
        torch.save(prefix_kv, path / "prefixed_key_values.pth")
    (path / "prefixequant_config.json").write_text(json.dumps(qc))
    return sd, qc, config, prefix_kv


# ---- tests -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qc", [
    dict(),                                                                      # W4A8KV4, both Hadamards
    dict(wbits=8, input_bits=4, k_bits=8, v_bits=8, down_online_had=False),      # W8A4KV8, Q/K Hadamard only
    dict(input_bits=4, k_bits=16, v_bits=16, qk_online_had=False, set_prefixed_tokens=False),   # W4A4, KV16
    dict(kv_group_size=-1),                                                      # one K/V scale for all heads
])
def test_import_matches_their_fake_quant_reference(tmp_path, gen, qc):
    if qc.get("kv_group_size") == -1:     # per-tensor K/V: write the per-head fixture, then collapse its scales
        sd, qcw, config, pkv = write_prefixquant_checkpoint(tmp_path, **qc)
        for i in range(config.num_hidden_layers):
            for key in (ipq._K_QUANT, ipq._V_QUANT):
                sd[f"model.layers.{i}.{key}"] = sd[f"model.layers.{i}.{key}"].max().reshape(1, 1)
        save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    else:
        sd, qcw, config, pkv = write_prefixquant_checkpoint(tmp_path, **qc)
    model = pqk.load_prefixquant(str(tmp_path))
    ids = torch.randint(3, config.vocab_size, (1, 37), generator=gen)
    ref, _ = ref_forward(sd, config, qcw, ids, prefix_kv=pkv)
    fp, _ = ref_forward(sd, config, qcw, ids, prefix_kv=pkv, quant=False)
    with torch.no_grad():
        out = model(ids).logits
    per_pos = (out - ref).abs().amax(-1)[0]                       # [T]: the worst logit error at each position
    quant_effect = (fp - ref).abs().max().item()
    # within rounding: the same integers, the same scales, fp32 sums in another order. Most positions agree to fp32
    # precision; now and then such a difference moves one value across a rounding boundary of a static scale (one
    # step of one element, ~1e-3 here), which later positions see through the K/V cache. The quantization itself
    # moves the logits ~50x more.
    assert per_pos.median() <= 1e-5, per_pos
    assert per_pos.max() <= 3e-3 * ref.abs().max(), (per_pos, quant_effect)
    assert quant_effect > 10 * per_pos.max(), (per_pos, quant_effect)
    # the imported state: what their files say
    st = model.pqk_state
    assert st.prefix_ids.tolist() == (PREFIX if qcw["set_prefixed_tokens"] else [])
    assert st.cfg.w_bits == qcw["wbits"] and st.cfg.a_bits == qcw["input_bits"] and st.cfg.kv_bits == qcw["k_bits"]
    key = "model.layers.1.self_attn.k_proj.weight"      # their integers and scales, exactly
    theirs = fq(sd[key].float(), sd[key.replace("weight", "weight_quantizer.scale")].float(), qcw["wbits"])
    assert torch.equal(model.model.layers[1].self_attn.k_proj.dequantized_weight(), theirs)
    # generate runs through the prefix and the quantized cache
    g = model.generate(torch.tensor([[BOS, 5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert g.shape == (1, 7) and g[0, :4].tolist() == [BOS, 5, 6, 7]


def test_import_then_export_round_trip(tmp_path):
    write_prefixquant_checkpoint(tmp_path / "theirs")
    model = pqk.load_prefixquant(str(tmp_path / "theirs"))
    pqk.export_hf(model, str(tmp_path / "ours"), float_dtype="float32")
    loaded = pqk.load_quantized(str(tmp_path / "ours"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_import_into_a_given_float_model_keeps_its_dtype_and_unties(tmp_path):
    base = tiny_model("llama", seed=3)
    sd, *_ = write_prefixquant_checkpoint(tmp_path, model=tiny_model("llama", seed=3))
    model = pqk.import_prefixquant(base, str(tmp_path))
    assert model is base
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"].float())
    assert torch.equal(model.model.norm.weight, sd["model.norm.weight"].float())


def test_down_rotation_with_their_had_k():
    from prefixquant_kernels.hadamard import hadamard_matrix
    h12 = hadamard_matrix(12, torch.float64)
    r = ipq._down_rotation(96, h12)
    m = torch.kron(h12, sylvester(8)) / math.sqrt(96)     # their matmul_hadU_cuda: (H_K (x) H_8) x / sqrt(96)
    assert torch.allclose(r.double(), m.T, atol=1e-6)
    with pytest.raises(ValueError, match=r"intermediate_size=96 \(not a power of 2\).*had_k=get_hadK"):
        ipq._down_rotation(96, None)
    with pytest.raises(ValueError, match="not a \\+-1 Hadamard matrix"):
        ipq._down_rotation(96, h12 + torch.eye(12, dtype=torch.float64))


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    """One valid checkpoint; each bad-input test edits its own copy."""
    path = tmp_path_factory.mktemp("prefixquant_ckpt")
    write_prefixquant_checkpoint(path)
    return path


def _edit_config(path, **kw):
    f = path / "prefixequant_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **kw}))


def _edit_tensors(path, drop=(), **add):
    from safetensors.torch import load_file
    sd = load_file(str(path / "model.safetensors"))
    for k in drop:
        sd.pop(k)
    sd.update(add)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


class _NotATensor:
    pass


@pytest.mark.parametrize("edit,exc,match", [
    (lambda p: (p / "prefixequant_config.json").unlink(), FileNotFoundError, "has no prefixequant_config.json"),
    (lambda p: _edit_config(p, wbits=3), ValueError, r"wbits=3 is not supported"),
    (lambda p: _edit_config(p, w_group_size=32), ValueError, r"w_group_size=32: grouped weight scales.*-1"),
    (lambda p: _edit_config(p, w_asym=True), ValueError, "w_asym=true.*--w_sym"),
    (lambda p: _edit_config(p, input_mode="dynamic"), ValueError, "input_mode='dynamic'.*--input_mode static"),
    (lambda p: _edit_config(p, input_bits=16), ValueError, "input_bits=16 is not supported"),
    (lambda p: _edit_config(p, k_bits=4, v_bits=8), ValueError, "k_bits=4, v_bits=8"),
    (lambda p: _edit_config(p, k_pre_rope=True), ValueError, "k_pre_rope=true.*after RoPE"),
    (lambda p: _edit_config(p, real_quant=True), ValueError, "real_quant=true"),
    (lambda p: _edit_tensors(p, **{"model.layers.0.mlp.down_proj.input_quantizer.zero_point": torch.ones(1, 1)}),
     ValueError, r"'model\.layers\.0\.mlp\.down_proj\.input_quantizer\.zero_point'.*asymmetric"),
    (lambda p: _edit_tensors(p, **{"model.layers.1.self_attn.o_proj.input_quantizer.bound_factor": torch.ones(1)}),
     ValueError, "clipping factor of a dynamic quantizer"),
    (lambda p: _edit_tensors(p, **{"model.layers.0.mlp.up_proj.smooth_scale": torch.ones(128)}),
     ValueError, r"'model\.layers\.0\.mlp\.up_proj\.smooth_scale', which this importer does not know how to map"),
    (lambda p: _edit_tensors(p, drop=["model.layers.1." + ipq._K_QUANT]), ValueError,
     r"no 'model\.layers\.1\.self_attn\.apply_rotary_pos_emb_qk_rotation_wrapper\.k_quantizer\.scale'"),
    (lambda p: _edit_tensors(p, **{"model.layers.0.mlp.gate_proj.weight_quantizer.scale": torch.ones(512, 1)}),
     ValueError, r"gate_proj\.weight_quantizer\.scale has shape \(512, 1\), expected 128"),
    (lambda p: torch.save([(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))] * 2, p / "prefixed_key_values.pth"),
     ValueError, r"layer 0 K has shape \(1, 2, 3, 16\), expected \[1, 2, 2, 16\]"),
    (lambda p: torch.save({"cache": _NotATensor()}, p / "prefixed_key_values.pth"),
     ValueError, "cannot be loaded with weights_only=True.*re-save the plain tensors"),
])
def test_bad_checkpoints_are_refused_and_leave_the_model_untouched(tmp_path, good_ckpt, edit, exc, match):
    shutil.copytree(good_ckpt, tmp_path, dirs_exist_ok=True)
    edit(tmp_path)
    model = tiny_model("llama", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        pqk.import_prefixquant(model, str(tmp_path))
    assert getattr(model, "pqk_state", None) is None
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_checkpoint_of_another_config_is_refused(good_ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"model_type='llama', the model has 'qwen2'.*load_prefixquant"):
        pqk.import_prefixquant(tiny_model("qwen2"), str(good_ckpt))
    with pytest.raises(ValueError, match=r"num_hidden_layers=2, the model has 3"):
        pqk.import_prefixquant(tiny_model("llama", layers=3), str(good_ckpt))
    with pytest.raises(FileNotFoundError, match="must be an existing directory"):
        pqk.import_prefixquant(tiny_model("llama"), str(tmp_path / "nope"))
