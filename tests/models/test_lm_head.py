"""quantize_lm_head (models/lm_head.py): the output projection as W8A8 (per-token activation scales), a transform
after quantization. Logits close to the float head's (int8 rounding, not more), the tied embedding keeps its float
matrix, the compiled decode step runs with it (compiled == eager), bad input raises."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels.calibration.pipeline import quantize_model
from prefixquant_kernels.nn import QuantLinear

from .tiny import BOS, StubTokenizer, text, tiny_model


def test_logits_close_to_the_float_head_and_embedding_untouched():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    emb = model.get_input_embeddings().weight.detach().clone()
    ids = torch.randint(3, 120, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        head = pqk.quantize_lm_head(model)
        got = model(ids).logits
    assert isinstance(head, QuantLinear) and model.get_output_embeddings() is head
    assert head.w_bits == 8 and head.a_bits == 8 and not head.is_static
    assert torch.equal(model.get_input_embeddings().weight, emb)
    err = (got - want).abs().max() / want.abs().max()
    assert 0 < err < 0.03, err            # int8 rounding: not zero, not more than a few % of the range
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_compiled_generate_with_an_int8_head():
    cfg = pqk.QuantConfig(w_bits=4, a_bits=8, kv_bits=4, calib_samples=2, calib_seq_len=64)
    model = quantize_model(tiny_model("qwen2"), StubTokenizer(), text(), cfg, progress=False)
    pqk.quantize_lm_head(model)
    ids = torch.randint(3, 120, (2, 7), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = BOS
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, pqk_compile=True, **kw), model.generate(ids, pqk_compile=False, **kw))
    assert hasattr(model, "_compiled_call")


def test_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="bits"):
        pqk.quantize_lm_head(model, bits=3)
    pqk.quantize_lm_head(model)
    with pytest.raises(ValueError, match="already quantized"):
        pqk.quantize_lm_head(model)
