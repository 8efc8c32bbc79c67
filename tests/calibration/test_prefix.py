"""Prefix discovery: the selection rule on synthetic activations with planted outliers, end to end on a tiny model
with planted massive activations, the prefix K/V, and bad inputs."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels.calibration.prefix import prefix_kv, select_prefix_tokens
from prefixquant_kernels.models import get_spec

from ..models.tiny import BOS, EOS, OUTLIER, StubTokenizer, plant_outliers, text, tiny_model


def _synthetic(gen, s=6, t=50, layers=3):
    ids = torch.randint(50, 100, (s, t), generator=gen)  # ordinary tokens never 42 or 43
    ids[:, 0] = BOS
    ids[:, 7] = 42                                    # token 42: an outlier wherever it appears
    ids[:3, 20] = 43                                  # token 43: an outlier in half the samples
    maxes = []
    for _ in range(layers):
        r = torch.rand(s, t, generator=gen) + 0.5     # ordinary tokens: max |x| in [0.5, 1.5]
        r[:, 0] = 2000.0                              # the attention sink
        r[ids == 42] = 500.0
        r[ids == 43] = 200.0
        maxes.append(r)
    return ids, maxes


def test_selection_rule_on_planted_outliers(gen):
    ids, maxes = _synthetic(gen)
    prefix, info = select_prefix_tokens(ids, maxes, eta=64.0, end_token=BOS)
    # per sample: token 42 (+ token 43 in half of them) -> mean 1.5 -> o = 2 (the sink at position 0 not counted)
    assert info["o"] == 2 and info["layer_mean_outliers"] == [1.5] * 3
    assert prefix == [42, 43, BOS]                    # most frequent first, BOS last; position 0 not counted
    assert info["outlier_token_counts"] == {42: 6, 43: 3}


def test_threshold_is_relative_to_the_sequence_median(gen):
    ids, maxes = _synthetic(gen)
    prefix, info = select_prefix_tokens(ids, maxes, eta=300.0, end_token=BOS)   # 200x is no longer an outlier
    assert prefix == [42, BOS] and info["o"] == 1
    prefix, info = select_prefix_tokens(ids, [m / 1000 for m in maxes], eta=64.0, end_token=EOS)  # scale-free
    assert prefix == [42, 43, EOS]
    prefix, _ = select_prefix_tokens(ids, maxes, eta=64.0, end_token=BOS, max_len=1)
    assert prefix == [42, BOS]


@pytest.mark.parametrize("arch", ["llama", "phi3"])   # phi3: its down_proj reads activation_fn(gate) * up chunks
def test_find_prefix_tokens_on_a_model_with_planted_massive_activations(arch):
    model = tiny_model(arch)
    tok = StubTokenizer()
    calib = text(4000).replace("cat", "c" + chr(OUTLIER - 3 + 120) + "t")   # some OUTLIER tokens in the text
    assert OUTLIER in tok.encode(calib)
    assert pqk.find_prefix_tokens(model, tok, calib, n_samples=4, seq_len=64) == [BOS]   # no outliers yet
    handles = plant_outliers(model)
    prefix, info = pqk.find_prefix_tokens(model, tok, calib, n_samples=4, seq_len=64, return_info=True)
    for h in handles:
        h.remove()
    # o counts occurrences (OUTLIER is frequent in each sample); the prefix holds the distinct outlier tokens
    assert prefix == [OUTLIER, BOS] and info["o"] >= 1 and info["seconds"] >= 0


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "phi3"])
def test_prefix_kv_matches_a_forward_of_the_prefix(arch):
    model = tiny_model(arch)
    ids = [OUTLIER, BOS]
    ks, vs = prefix_kv(model, ids)
    assert len(ks) == 2 and ks[0].shape == (1, 2, 2, get_spec(model).head_dim(model.config))
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([ids + [5, 6]]), past_key_values=cache)
    torch.testing.assert_close(cache.layers[1].keys[:, :, :2], ks[1])


def test_bad_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="calibration text is empty"):
        pqk.find_prefix_tokens(model, StubTokenizer(), ["", "  "])
    with pytest.raises(ValueError, match="fewer than one sample"):
        pqk.find_prefix_tokens(model, StubTokenizer(), "short text", seq_len=64)
    with pytest.raises(ValueError, match="tokenizer has no bos_token_id"):
        pqk.find_prefix_tokens(model, StubTokenizer(bos_token_id=None), text())
    with pytest.raises(ValueError, match="threshold must be a number > 1"):
        pqk.find_prefix_tokens(model, StubTokenizer(), text(), threshold=0)
    # Qwen tokenizers have no BOS: the prefix ends with EOS
    qwen = tiny_model("qwen2")
    assert pqk.find_prefix_tokens(qwen, StubTokenizer(bos_token_id=None), text(), n_samples=2, seq_len=64) == [EOS]
