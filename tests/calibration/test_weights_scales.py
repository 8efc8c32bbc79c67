"""Weight quantization (RTN clip search, GPTQ) and the static scale searches, on synthetic data; what scales.collect
records on every registered family (its Q/K/V against the model's own attention and cache, its points' inputs)."""
import pytest
import torch
from transformers import DynamicCache

from prefixquant_kernels import format as fmt
from prefixquant_kernels.calibration import scales as sc
from prefixquant_kernels.calibration import weights as wq
from prefixquant_kernels.models import get_spec

from ..models.tiny import BOS, CONFIGS, StubTokenizer, text, tiny_model


def _on_grid(w, s, bits):
    q = w / s.unsqueeze(1)
    return torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 2 ** (bits - 1)


def test_rtn_clip_search_never_worse_than_max_scaling(gen):
    w = torch.randn(64, 128, generator=gen) ** 3                          # heavy tails: clipping pays off
    s_max = fmt.per_token_scale(w, 4)
    w_rtn, s = wq.rtn(w, 4)
    err_max = (wq.fake_quant(w, s_max.unsqueeze(1), 4) - w).pow(2).sum(1)
    err = (w_rtn - w).pow(2).sum(1)
    assert (err <= err_max + 1e-6).all() and (s < s_max).any()
    assert _on_grid(w_rtn, s, 4)


def test_gptq_beats_rtn_on_the_layer_output(gen):
    k, n = 96, 48
    mix = torch.randn(k, k, generator=gen)                               # correlated inputs, as in a real model
    x = torch.randn(1024, k, generator=gen) @ mix
    w = torch.randn(n, k, generator=gen)
    w_rtn, s = wq.rtn(w, 4)
    w_gptq, s2 = wq.gptq(w, x.T @ x, 4, scale=s)
    assert torch.equal(s, s2) and _on_grid(w_gptq, s, 4)                 # same scales, integer values
    err = lambda wh: float((x @ (wh - w).T).pow(2).mean())               # noqa: E731
    assert err(w_gptq) < 0.7 * err(w_rtn), (err(w_gptq), err(w_rtn))


def test_gptq_dead_inputs_and_degenerate_hessian(gen):
    w = torch.randn(8, 16, generator=gen)
    h = torch.zeros(16, 16)
    out, s = wq.gptq(w, h, 8)                                            # no calibration signal: still quantizes
    assert out.shape == w.shape and torch.isfinite(out).all()


def test_activation_scale_clips_a_heavy_tail_but_not_a_uniform_input(gen):
    w = torch.randn(32, 64, generator=gen)
    x = torch.randn(512, 64, generator=gen)
    x[0, 0] = 20.0                                                       # one rare spike
    s = sc.search_act_scale(x, w, 4)
    assert s < 20.0 / 7 * 0.5                                            # clipped hard: the spike is one value
    u = torch.rand(512, 64, generator=gen) * 2 - 1
    assert sc.search_act_scale(u, w, 8) > 0.8 / 127                      # bounded input: (almost) no clipping
    assert sc.search_act_scale(x, w, 4, search=False) == 20.0 / 7


def test_static_scale_calibrated_without_the_outlier_token_matches_per_token(gen):
    """The PrefixQuant claim at one linear: with the outlier tokens moved out (prefix), one static scale is nearly as
    good as per-token scales on the other tokens (same order of error); calibrated with them, it is far worse."""
    w = torch.randn(64, 128, generator=gen)
    x = torch.randn(256, 128, generator=gen)
    x[0] *= 1000.0                                                       # the sink token
    y = x[1:] @ w.T

    def err(xq):
        return float((xq @ w.T - y).pow(2).mean())
    s_tok = fmt.per_token_scale(x[1:], 8).unsqueeze(1)
    dynamic = err(fmt.quantize(x[1:], s_tok, 8).float() * s_tok)
    with_prefix = err(sc.fake_quant_act(x[1:], sc.search_act_scale(x[1:], w, 8), 8))
    no_prefix = err(sc.fake_quant_act(x[1:], sc.search_act_scale(x, w, 8), 8))
    assert with_prefix <= 3 * dynamic                                    # the same order as per-token
    assert no_prefix > 10 * with_prefix


def test_kv_scales_per_head(gen):
    q = [torch.randn(4, 32, 16, generator=gen)]
    k = [torch.randn(2, 32, 16, generator=gen)]
    v = [torch.randn(2, 32, 16, generator=gen)]
    k[0][1] *= 10                                                        # head 1 is ten times larger
    ks, vs = sc.search_kv_scales(q, k, v, 4)
    assert ks.shape == vs.shape == (2,) and (ks > 0).all()
    assert ks[1] > 5 * ks[0]
    amax = v[0].abs().amax(dim=(1, 2)) / 7
    assert ((vs <= amax * 1.0001) & (vs >= amax * 0.549)).all()          # within the 1.0 .. 0.55 grid


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_collect_records_the_models_own_q_k_v_and_point_inputs(arch):
    """K and V as the model puts them in its cache, Q such that softmax(Q K^T / sqrt(D)) is the model's attention,
    each point's max |x| the max of what its linears read (for Phi-3: q/k/v split out of the fused qkv_proj)."""
    model = tiny_model(arch)
    model.set_attn_implementation("eager")
    skip = 2
    ids = torch.tensor([[BOS, 7] + StubTokenizer().encode(text(30, seed=4))])
    stats = sc.collect(model, ids, skip, rows_per_sample=8, hessian=False, kv=True)
    cache = DynamicCache(config=model.config)
    spec, inputs = get_spec(model), {}
    hooks = [layer.get_submodule(names[0]).register_forward_pre_hook(
        lambda m, a, key=(i, p): inputs.__setitem__(key, a[0][0, skip:]))
        for i, layer in enumerate(model.model.layers) for p, names in spec.points.items()]
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True, output_attentions=True)
    for h in hooks:
        h.remove()
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    for i, st in enumerate(stats):
        torch.testing.assert_close(st.k[0], cache.layers[i].keys[0, :, skip:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.v[0], cache.layers[i].values[0, :, skip:], atol=1e-5, rtol=1e-5)
        probs = out.attentions[i][0, :, skip:, skip:]      # the model's attention among the recorded positions
        for h in range(st.q[0].shape[0]):
            want = probs[h] / probs[h].sum(-1, keepdim=True)          # renormalized without the first skip keys
            torch.testing.assert_close(sc._causal_softmax(st.q[0][h], st.k[0][h // g]), want, atol=1e-5, rtol=1e-4)
        for p in spec.points:
            assert st.amax[p] == pytest.approx(float(inputs[(i, p)].abs().max()), rel=1e-6)
