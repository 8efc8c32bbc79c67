"""evaluate_perplexity_decode: prefill then teacher-forced decode, scored on the decoded tokens only."""
import math

import pytest
import torch
import torch.nn.functional as F

import prefixquant_kernels as pqk

from ..models.tiny import BOS, VOCAB, StubTokenizer, text, tiny_model


def _tiny_llama_head_dim_32():
    """A 2-layer Llama whose head_dim is 32 (KIVI / LogQuant group the head dim by 32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_float_model_equals_one_pass_on_the_same_tokens():
    """On the float model stepping through the cache changes nothing: the NLL of the decoded tokens equals the one
    forward's NLL of the same positions."""
    model, tok = tiny_model("llama"), StubTokenizer()
    t = text(900, seed=5)
    ids = tok.encode(t)
    seq, dec = 48, 13
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            win = torch.tensor(ids[w * seq:(w + 1) * seq])
            logits = model(torch.cat([torch.tensor([BOS]), win]).unsqueeze(0)).logits[0]
            # logits[i] predicts win[i] (the BOS shifts by one); the decoded tokens are win[seq - dec:]
            nll += float(F.cross_entropy(logits[seq - dec:seq], win[seq - dec:], reduction="sum"))
            n += dec
    got = pqk.evaluate_perplexity_decode(model, tok, t, seq, dec, max_windows=3, progress=False)
    assert got == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_quantized_kivi_and_logquant_run():
    cfg = dict(calib_samples=4, calib_seq_len=48, w_bits=8, a_bits=8, kv_bits=2, weight_method="rtn")
    tok = StubTokenizer()
    for mode, kw in (("kivi", {}), ("logquant", {"kv_window": 4})):
        model = pqk.quantize_model(_tiny_llama_head_dim_32(), tok, text(), pqk.QuantConfig(kv_mode=mode, **kw, **cfg),
                                   progress=False)
        ppl = pqk.evaluate_perplexity_decode(model, tok, text(900, seed=6), 64, 16, max_windows=2, progress=False)
        assert math.isfinite(ppl) and ppl > 1


@pytest.mark.parametrize("kw, match", [(dict(decode=0), "decode must be an int in"),
                                       (dict(decode=64), "decode must be an int in"),
                                       (dict(seq_len=1), "seq_len must be an int >= 2")])
def test_bad_arguments(kw, match):
    args = {"seq_len": 64, "decode": 8, **kw}
    with pytest.raises(ValueError, match=match):
        pqk.evaluate_perplexity_decode(tiny_model("llama"), StubTokenizer(), text(), args["seq_len"], args["decode"])
