"""Import a checkpoint written by PrefixQuant's own code (github ChenMnZ/PrefixQuant, ``main.py --save_quant_dir``):
its fake-quant weights and quantizer scales become this package's QuantLinears and ``pqk_state``, so the model runs
on the int kernels.

    model = pqk.load_prefixquant(ckpt_dir)                 # the model built from the checkpoint's config.json
    model = pqk.import_prefixquant(model, ckpt_dir)        # or into a float model of the same architecture
    pqk.export_hf(model, out_dir)                          # then: our packed format (int4/int8 + scales)

The format (their files, tensor names and shapes, their fake quantization and online rotations, what is supported)
is described in docs/PREFIXQUANT_FORMAT.md. The per-layer names come from the model family's ArchSpec
(models/arch.py): the layer prefix, the linears of each quantizer point (their static input scale is the output
quantizer of the norm in front of the point, or the input quantizer of the point's first linear), V's linear.
Only families with separate q/k/v and gate/up linears (the Llama layout PrefixQuant's code quantizes) are read.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

CONFIG_FILE = "prefixequant_config.json"     # sic: the name their main.py writes
PREFIX_FILE = "prefixed_key_values.pth"
SCALE_MIN, SCALE_MAX = 1e-4, 1e4             # their clamp_ste(scale, 1e-4, 1e4) at every use



def _k_quant_key(spec) -> str:
    """Their K-cache quantizer (after RoPE and the Q/K Hadamard), in a decoder layer."""
    return f"{spec.attn}.apply_rotary_pos_emb_qk_rotation_wrapper.k_quantizer.scale"


def _v_quant_key(spec) -> str:
    """Their V-cache quantizer: the output quantizer of v's linear, in a decoder layer."""
    return f"{spec.v}.output_quantizer.scale"


def _act_keys(spec) -> dict[str, str]:
    """Their static input scale of each quantizer point (in a decoder layer) -> the point: the output quantizer of
    the norm in front of the point (q/k/v, gate/up), else the input quantizer of its linear (o, down)."""
    norms = spec.point_norms
    return {(f"{norms[p]}.output_quantizer.scale" if p in norms else f"{names[0]}.input_quantizer.scale"): p
            for p, names in spec.points.items()}


def _llama_spec():
    from ..models.arch import REGISTRY
    return REGISTRY["llama"]


# the keys for the Llama layout (Llama / Mistral / Qwen2 / Qwen3 alike)
_K_QUANT = _k_quant_key(_llama_spec())
_V_QUANT = _v_quant_key(_llama_spec())
_ACT_POINTS = _act_keys(_llama_spec())
# hints for tensors we do not model
_UNSUPPORTED_HINTS = {
    "zero_point": "an asymmetric quantizer's zero point (re-quantize with --w_sym / --input_sym / --kv_sym)",
    "bound_factor": "a learnable clipping factor of a dynamic quantizer (--activation_clipping with "
                    "--input_mode dynamic; re-quantize with --input_mode static)",
    "qweight": "their --real_quant packed weight-only format (re-save without --real_quant)",
}


def _fail(msg: str, exc: type[Exception] = ValueError, op: str = "import_prefixquant"):
    raise exc(f"pqk.{op}: {msg}")


# ---- reading their files ---------------------------------------------------------------------------------------

def read_prefixquant_config(ckpt_dir: str) -> dict:
    """prefixequant_config.json -> dict, checked: every option this importer cannot map is a ValueError that says
    which option and what to do."""
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    if not os.path.exists(path):
        _fail(f"{ckpt_dir!r} has no {CONFIG_FILE}: not a checkpoint written by PrefixQuant's main.py "
              "--save_quant_dir (for pqk's own checkpoints use pqk.load_quantized)", FileNotFoundError)
    with open(path) as f:
        qc = json.load(f)
    need = ("wbits", "input_bits", "k_bits", "v_bits")
    missing = [k for k in need if k not in qc]
    if missing:
        _fail(f"{CONFIG_FILE} has no {missing}: not PrefixQuant's format")

    def opt(key, default):
        return qc.get(key, default)

    if opt("real_quant", False):
        _fail(f"{CONFIG_FILE}: real_quant=true is their packed weight-only format, not the fake-quant one this "
              "imports; re-save the model without --real_quant")
    if qc["wbits"] not in (4, 8):
        _fail(f"{CONFIG_FILE}: wbits={qc['wbits']!r} is not supported (the kernels run 4- and 8-bit weights); "
              "quantize the float model with pqk.quantize_model instead")
    if opt("w_group_size", -1) not in (-1, None):
        _fail(f"{CONFIG_FILE}: w_group_size={qc['w_group_size']!r}: grouped weight scales are not supported (one "
              "scale per output channel); re-quantize with --w_group_size -1")
    if opt("w_asym", False):
        _fail(f"{CONFIG_FILE}: w_asym=true (asymmetric weights) is not supported; re-quantize with --w_sym")
    if qc["input_bits"] not in (4, 8):
        _fail(f"{CONFIG_FILE}: input_bits={qc['input_bits']!r} is not supported (the kernels quantize activations "
              "to 4 or 8 bits); re-quantize with --input_bits 4 or 8")
    if opt("input_mode", "dynamic") != "static":
        _fail(f"{CONFIG_FILE}: input_mode={opt('input_mode', 'dynamic')!r}: only static activation scales are "
              "imported (their per-token scale convention differs from pqk's); re-quantize with --input_mode "
              "static, or use pqk.quantize_model(..., QuantConfig(act_quant='dynamic'))")
    if opt("input_group_size", -1) not in (-1, None):
        _fail(f"{CONFIG_FILE}: input_group_size={qc['input_group_size']!r}: only per-tensor activation scales "
              "(-1) are supported")
    if opt("input_asym", False):
        _fail(f"{CONFIG_FILE}: input_asym=true (asymmetric activations) is not supported; re-quantize with "
              "--input_sym")
    if qc["k_bits"] != qc["v_bits"] or qc["k_bits"] not in (4, 8, 16):
        _fail(f"{CONFIG_FILE}: k_bits={qc['k_bits']!r}, v_bits={qc['v_bits']!r}: supported are equal K/V bits "
              "of 4, 8 or 16")
    if qc["k_bits"] < 16:
        if opt("kv_mode", "dynamic") != "static":
            _fail(f"{CONFIG_FILE}: kv_mode={opt('kv_mode', 'dynamic')!r}: only static per-head KV scales are "
                  "imported; re-quantize with --kv_mode static")
        if opt("kv_asym", False):
            _fail(f"{CONFIG_FILE}: kv_asym=true is not supported; re-quantize with --kv_sym")
        if opt("k_pre_rope", False):
            _fail(f"{CONFIG_FILE}: k_pre_rope=true: the pqk cache quantizes K after RoPE; re-quantize without "
                  "--k_pre_rope")
    prefix = opt("prefixed_tokens", None)
    if opt("set_prefixed_tokens", False) or prefix:
        if not isinstance(prefix, list) or not prefix or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prefix):
            _fail(f"{CONFIG_FILE}: set_prefixed_tokens is on but prefixed_tokens is {prefix!r}, expected a "
                  "non-empty list of token ids")
    return qc


def read_state_dict(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of their ``save_pretrained`` output: model.safetensors, its shards (index json), or
    pytorch_model.bin (shards), the latter loaded with ``weights_only=True``."""
    from safetensors.torch import load_file

    def files(index_name, single):
        index = os.path.join(ckpt_dir, index_name)
        if os.path.exists(index):
            with open(index) as f:
                return sorted({os.path.join(ckpt_dir, v) for v in json.load(f)["weight_map"].values()})
        one = os.path.join(ckpt_dir, single)
        return [one] if os.path.exists(one) else []

    sd: dict[str, torch.Tensor] = {}
    st = files("model.safetensors.index.json", "model.safetensors")
    for f in st:
        sd.update(load_file(f))
    if not st:
        bins = files("pytorch_model.bin.index.json", "pytorch_model.bin")
        if not bins:
            _fail(f"{ckpt_dir!r} has no model.safetensors or pytorch_model.bin (their save_pretrained output)",
                  FileNotFoundError)
        for f in bins:
            part = torch.load(f, map_location="cpu", weights_only=True)
            if not isinstance(part, dict):
                _fail(f"{f} holds a {type(part).__name__}, expected a state dict")
            sd.update(part)
    return sd


def read_prefix_kv(ckpt_dir: str, n_layers: int, n_kv_heads: int, head_dim: int, prefix_len: int):
    """prefixed_key_values.pth -> (keys, values): per layer float16 [1, H_kv, P, D]; ValueError naming the layer
    and the shape for anything else."""
    path = os.path.join(ckpt_dir, PREFIX_FILE)
    if not os.path.exists(path):
        _fail(f"{CONFIG_FILE} sets prefixed tokens but {ckpt_dir!r} has no {PREFIX_FILE}", FileNotFoundError)
    try:
        kv = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle's errors vary by content; the message says what to do)
        first = (str(e).strip().splitlines() or [""])[0][:120]      # torch's own message runs for a page
        _fail(f"{PREFIX_FILE} cannot be loaded with weights_only=True ({type(e).__name__}: {first}). It "
              "probably holds a transformers Cache object (saved by a newer transformers): in an environment "
              "you trust, load it and re-save the plain tensors, torch.save([(l.keys, l.values) for l in "
              f"cache.layers], '{PREFIX_FILE}')")
    if not isinstance(kv, (tuple, list)) or len(kv) != n_layers:
        _fail(f"{PREFIX_FILE}: expected a sequence of {n_layers} per-layer (K, V) pairs, got "
              f"{type(kv).__name__}{'' if not hasattr(kv, '__len__') else f' of length {len(kv)}'}")
    want = (n_kv_heads, prefix_len, head_dim)
    keys, values = [], []
    for i, pair in enumerate(kv):
        if not isinstance(pair, (tuple, list)) or len(pair) < 2:
            _fail(f"{PREFIX_FILE}: layer {i}: expected a (K, V) pair, got {type(pair).__name__}")
        for name, t, out in (("K", pair[0], keys), ("V", pair[1], values)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[1:]) != want or t.shape[0] < 1:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                _fail(f"{PREFIX_FILE}: layer {i} {name} has shape {shape}, expected [1, {n_kv_heads}, "
                      f"{prefix_len}, {head_dim}] (H_kv, prefix length, head_dim of this model)")
            if not t.is_floating_point() or not torch.isfinite(t).all():
                _fail(f"{PREFIX_FILE}: layer {i} {name} must be finite floats, got {t.dtype}")
            out.append(t[:1].to(torch.float16))
    return keys, values


# ---- mapping ---------------------------------------------------------------------------------------------------

def _scale(sd: dict, key: str, numel: int, what: str) -> torch.Tensor:
    """Their scale tensor -> fp32 flat [numel], clamped as they clamp it at use; errors name the key."""
    if key not in sd:
        _fail(f"the checkpoint has no {key!r} ({what}); a checkpoint of another config? (check "
              f"{CONFIG_FILE} against the tensors)")
    s = sd[key]
    if s.numel() != numel:
        _fail(f"{key} has shape {tuple(s.shape)}, expected {numel} value(s) ({what}); grouped scales of another "
              "group size are not supported")
    s = s.detach().float().reshape(-1)
    if not torch.isfinite(s).all():
        _fail(f"{key} holds non-finite values")
    return s.clamp(SCALE_MIN, SCALE_MAX)


def _down_rotation(intermediate: int, had_k: torch.Tensor | None) -> torch.Tensor:
    """Their online down_proj Hadamard as RotatedLinear's rotation R (``x -> x R``): float32 [I, I], R = M^T with
    M = (H_K (x) H_{I/K}) / sqrt(I) (docs/PREFIXQUANT_FORMAT.md)."""
    from ..hadamard import hadamard_rotation

    if had_k is None:
        if intermediate & (intermediate - 1):
            _fail(f"down_online_had with intermediate_size={intermediate} (not a power of 2): PrefixQuant rotates "
                  "with its own H_K from utils/hadamard_utils.get_hadK, which this package does not ship; pass it: "
                  "import_prefixquant(..., had_k=get_hadK(intermediate_size)[0])")
        return hadamard_rotation(intermediate).T.float()   # Sylvester: symmetric, .T for the record
    h = torch.as_tensor(had_k).double()
    k = h.shape[0] if h.dim() == 2 else 0
    if h.dim() != 2 or h.shape[0] != h.shape[1] or intermediate % k or (intermediate // k) & (intermediate // k - 1):
        _fail(f"had_k must be a square [K, K] matrix with intermediate_size / K a power of 2, got shape "
              f"{tuple(h.shape)} for intermediate_size={intermediate}")
    if not torch.equal(h @ h.T, k * torch.eye(k, dtype=h.dtype)):
        _fail(f"had_k [{k}, {k}] is not a +-1 Hadamard matrix (H H^T != {k} I)")
    p = intermediate // k
    m = torch.kron(h, hadamard_rotation(p) * p ** 0.5) / intermediate ** 0.5 if p > 1 else h / k ** 0.5
    return m.T.float().contiguous()


def _check_model_matches(model, ckpt_dir: str) -> None:
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        theirs = json.load(f)
    ours = model.config
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size"):
        if key in theirs and theirs[key] != getattr(ours, key, None):
            _fail(f"the checkpoint's config.json has {key}={theirs[key]!r}, the model has "
                  f"{getattr(ours, key, None)!r}: import into a model built from that config "
                  "(pqk.load_prefixquant(ckpt_dir) does it)")


@torch.no_grad()
def import_prefixquant(model, ckpt_dir: str, *, had_k: torch.Tensor | None = None):
    """Turn the float ``model`` (a Llama / Mistral / Qwen2 / Qwen3 *ForCausalLM of the checkpoint's architecture)
    into the quantized model PrefixQuant saved in ``ckpt_dir`` (docs/PREFIXQUANT_FORMAT.md) and return it: every
    q/k/v/o/gate/up/down a QuantLinear with their integers and scales, the online down_proj Hadamard as a
    RotatedLinear, the prefix K/V, K/V scales and Q/K Hadamard in ``model.pqk_state``. The model's other tensors
    (embeddings, norms, lm_head) are replaced by the checkpoint's. had_k: their ``get_hadK(intermediate_size)[0]``
    when down_online_had is on and intermediate_size is not a power of 2.

    Everything is read and checked before the model changes; an error leaves it as it was."""
    from ..models import attention
    from ..models.arch import decoder_layers, float_linears, get_spec
    from ..models.patch import swap
    from ..models.rotated_linear import RotatedLinear
    from ..models.state import PrefixQuantState
    from ..nn import QuantLinear
    from .config import QuantConfig

    if not isinstance(ckpt_dir, (str, os.PathLike)) or not os.path.isdir(ckpt_dir):
        _fail(f"ckpt_dir must be an existing directory, got {ckpt_dir!r}", FileNotFoundError)
    spec = get_spec(model)
    if spec.fused_qkv or spec.fused_gate_up:
        _fail(f"model_type {spec.model_type!r} has fused linears ({spec.q}, {spec.gate}); PrefixQuant's code "
              "quantizes separate q/k/v and gate/up linears (the Llama layout), so no checkpoint of it can exist")
    if getattr(model, "pqk_state", None) is not None:
        _fail("the model is already quantized (it has a pqk_state): import into a float model")
    linears = float_linears(model)
    _check_model_matches(model, ckpt_dir)
    qc = read_prefixquant_config(ckpt_dir)
    sd = read_state_dict(ckpt_dir)

    c = model.config
    n_layers = len(decoder_layers(model))
    h_kv = c.num_key_value_heads
    head_dim = spec.head_dim(c)
    prefix_ids = list(qc.get("prefixed_tokens") or [])
    kv_bits = qc["k_bits"]
    rotate_down, rotate_qk = bool(qc.get("down_online_had")), bool(qc.get("qk_online_had"))
    if any(t >= c.vocab_size for t in prefix_ids):
        _fail(f"{CONFIG_FILE}: prefixed_tokens {prefix_ids} contain ids >= vocab_size {c.vocab_size}")
    if rotate_qk and head_dim & (head_dim - 1):
        _fail(f"qk_online_had with head_dim={head_dim}: PrefixQuant supports only a power-of-2 head_dim")
    if rotate_qk:
        attention.check_attention(model)
    kv_group = qc.get("kv_group_size", head_dim)
    if kv_bits < 16 and kv_group not in (-1, head_dim):
        _fail(f"{CONFIG_FILE}: kv_group_size={kv_group} is neither -1 nor head_dim={head_dim}: the cache keeps one "
              "scale per KV head")
    for key in sd:   # tensors we do not model, named before anything else is reported
        for part, hint in _UNSUPPORTED_HINTS.items():
            if part in key.rsplit(".", 1)[-1]:          # bound_factor also matches up/lowbound_factor
                _fail(f"the checkpoint has {key!r}: {hint} is not supported by this importer")

    cfg = QuantConfig(w_bits=qc["wbits"], a_bits=qc["input_bits"], kv_bits=kv_bits, act_quant="static",
                      prefix=bool(prefix_ids), prefix_tokens=prefix_ids or None, rotate=rotate_down,
                      kv_rotate=rotate_qk, kv_mode="static" if kv_bits < 16 else "auto", weight_method="rtn")
    used: set[str] = set()

    def take(key):
        used.add(key)
        return sd[key]

    # 1. the linears: their weights re-quantized on their per-channel scales, with their static input scales
    replacements: dict[str, nn.Module] = {}
    down_r = _down_rotation(c.intermediate_size, had_k) if rotate_down else None
    act_keys = _act_keys(spec)
    for i in range(n_layers):
        pre = spec.layer_prefix(i)
        for act_key, point in act_keys.items():
            names = spec.points[point]
            a_scale = float(_scale(sd, pre + act_key, 1, f"the static input scale of {'/'.join(names)}")[0])
            used.add(pre + act_key)
            for n in names:
                name = pre + n
                lin = linears[name]
                wkey, bkey = f"{name}.weight", f"{name}.bias"
                if wkey not in sd:
                    _fail(f"the checkpoint has no {wkey!r} (a checkpoint of another architecture?)")
                w = take(wkey)
                if tuple(w.shape) != (lin.out_features, lin.in_features):
                    _fail(f"{wkey} has shape {tuple(w.shape)}, the model's is [{lin.out_features}, "
                          f"{lin.in_features}] (a checkpoint of another config?)")
                if (bkey in sd) != (lin.bias is not None):
                    _fail(f"{name}: the checkpoint {'has' if bkey in sd else 'has no'} bias, the model "
                          f"{'has' if lin.bias is not None else 'has none'} (another architecture?)")
                ws = _scale(sd, f"{name}.weight_quantizer.scale", lin.out_features, "one weight scale per output "
                            "channel")
                used.add(f"{name}.weight_quantizer.scale")
                tmp = nn.Linear(lin.in_features, lin.out_features, bias=bkey in sd, device="meta")
                tmp.weight = nn.Parameter(w.detach().float(), requires_grad=False)
                if bkey in sd:
                    tmp.bias = nn.Parameter(take(bkey).detach().float(), requires_grad=False)
                q = QuantLinear.from_float(tmp, cfg.w_bits, cfg.a_bits, a_scale, w_scale=ws)
                replacements[name] = RotatedLinear(q, down_r) if (n == spec.down and down_r is not None) else q

    # 2. the cache state: prefix K/V (16-bit), per-head K/V scales, the Q/K Hadamard
    bos = prefix_ids[-1] if prefix_ids and prefix_ids[-1] in (c.bos_token_id, c.eos_token_id) else None
    state = PrefixQuantState(cfg, n_layers, h_kv, head_dim, len(prefix_ids), bos,
                             {"source": "PrefixQuant", "ckpt_dir": os.fspath(ckpt_dir), "prefix_ids": prefix_ids,
                              "prefixequant_config": qc})
    if prefix_ids:
        pk, pv = read_prefix_kv(ckpt_dir, n_layers, h_kv, head_dim, len(prefix_ids))
        state.prefix_ids.copy_(torch.tensor(prefix_ids))
        state.set_prefix(pk, pv)
    if kv_bits < 16:
        n_scales = h_kv if kv_group == head_dim else 1
        ks, vs = [], []
        for i in range(n_layers):
            for key, out, what in ((_k_quant_key(spec), ks, "K"), (_v_quant_key(spec), vs, "V")):
                full = spec.layer_prefix(i) + key
                s = _scale(sd, full, n_scales, f"the static {what} cache scale per KV head")
                used.add(full)
                out.append(s.expand(h_kv).clone())    # kv_group_size -1: one scale for every head
        state.set_kv_scales(ks, vs)
    if rotate_qk:
        from ..hadamard import hadamard_rotation
        state.set_qk_rotation(hadamard_rotation(head_dim).float())

    # 3. every other tensor must be one of the model's own (embeddings, norms, lm_head): anything left is an error
    own = {k: v for k, v in model.state_dict().items()}
    floats: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key in used or key.endswith("rotary_emb.inv_freq"):   # inv_freq: a derived buffer old versions saved
            continue
        if key not in own or key.rsplit(".", 1)[0] in linears:
            _fail(f"the checkpoint has {key!r}, which this importer does not know how to map (a learnable "
                  "parameter pqk does not model, or a checkpoint of another architecture)")
        if tuple(t.shape) != tuple(own[key].shape):
            _fail(f"{key} has shape {tuple(t.shape)}, the model's is {tuple(own[key].shape)} (another config?)")
        floats[key] = t
    head_key = "lm_head.weight"
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    needed = {k for k in own if not k.startswith("pqk_state.") and k.rsplit(".", 1)[0] not in linears
              and not k.endswith("rotary_emb.inv_freq")}
    if tied and head_key not in sd:
        needed.discard(head_key)
    missing = sorted(needed - set(floats))
    if missing:
        _fail(f"the checkpoint has no {missing[:4]}{' ...' if len(missing) > 4 else ''} (a checkpoint of another "
              "architecture, or a truncated file?)")

    # 4. only assignments from here on (the copies cannot fail: every shape was checked)
    untie = tied and head_key in floats and not torch.equal(floats[head_key], floats.get(
        "model.embed_tokens.weight", floats[head_key]))
    saved_tie = model.config.tie_word_embeddings if hasattr(model.config, "tie_word_embeddings") else None
    if untie:   # their rotation / norm fusion gave lm_head its own weight
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))
    for key, t in floats.items():
        params[key].data.copy_(t.to(params[key].dtype))
    try:
        swap(model, replacements, state.to(next(model.parameters()).device))
    except BaseException:
        if untie:     # cannot happen after the checks above; kept so a future check in swap cannot half-patch
            model.lm_head.weight = model.get_input_embeddings().weight
            model.config.tie_word_embeddings = saved_tie
        raise
    return model.eval()


def load_prefixquant(ckpt_dir: str, *, had_k: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
    """The model PrefixQuant saved in ``ckpt_dir``, built from its config.json (no float weights needed beyond
    the checkpoint's) and imported (``import_prefixquant``) -> the model on the CPU, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(ckpt_dir) or not os.path.exists(os.path.join(ckpt_dir, "config.json")):
        _fail(f"{ckpt_dir!r} has no config.json (their save_pretrained output)", FileNotFoundError,
              "load_prefixquant")
    read_prefixquant_config(ckpt_dir)        # fail on an unsupported config before building the model
    config = AutoConfig.from_pretrained(ckpt_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return import_prefixquant(model, ckpt_dir, had_k=had_k)
