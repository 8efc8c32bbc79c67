"""Block-wise fine-tuning (calibration/finetune.py) on tiny models: the block loss goes down, the learned values
export to exactly the integer codes and scales the fake quantization computed with (a planted export bug is caught),
the model's float modules come back, and bad configs are refused."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import format as fmt
from prefixquant_kernels.calibration import finetune as ft
from prefixquant_kernels.calibration.pipeline import _quant_linear
from prefixquant_kernels.nn import QuantLinear

from ..models.tiny import StubTokenizer, text, tiny_model

SMALL = dict(calib_samples=4, calib_seq_len=48, weight_method="rtn", w_bits=4, a_bits=4, kv_bits=4)


def _linear_with_bias(m):
    """The float linear the pipeline exports through: same shape, the fine-tuned module's (fixed) bias."""
    lin = torch.nn.Linear(m.weight.shape[1], m.weight.shape[0])
    lin.bias.data.copy_(m.bias)
    return lin


def _trained_linear(gen, learn_weight=True, steps=30):
    """A FakeQuantLinear trained a few steps to match a float linear (so its scales and weights moved)."""
    n, k = 24, 64
    w = torch.randn(n, k, generator=gen) * 0.1
    s0 = fmt.per_token_scale(w, 4)
    w0 = fmt.quantize(w, s0.unsqueeze(1), 4).float() * s0.unsqueeze(1)
    act = ft.ActScale(0.3)
    m = ft.FakeQuantLinear(w0, s0, torch.randn(n, generator=gen), act, 4, 4, learn_weight)
    opt = torch.optim.Adam([act.alpha, m.beta] + ([m.weight] if learn_weight else []), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(8, k, generator=gen)
        loss = (m(x) - x @ w.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


@pytest.mark.parametrize("learn_weight", [True, False])
def test_export_is_bit_exact(gen, learn_weight):
    """The QuantLinear built from export() holds the codes fq rounded to, and computes what the fake-quant
    forward computes (up to the float order of the sum), on fresh inputs over the full range."""
    m = _trained_linear(gen, learn_weight)
    w, ws, a = m.export()
    assert not torch.equal(ws, m.s0) and float(a) != 0.3          # training moved the scales
    q = _quant_linear(_linear_with_bias(m), w, ws, pqk.QuantConfig(w_bits=4, a_bits=4), a)
    assert isinstance(q, QuantLinear)
    assert torch.equal(fmt.unpack_int4(q.weight), fmt.quantize(w, ws.unsqueeze(1), 4))   # the codes fq used
    assert torch.equal(q.w_scale, ws) and torch.equal(q.act_scale, a.reshape(()))
    x = torch.randn(33, 64, generator=gen) * 3                      # many activations clipped at the range's ends
    with torch.no_grad():
        want = m(x)
    got = q(x)
    # same integer products; only fp32 summation order differs
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # the activation codes too: the kernel's quantize of x equals fq's
    assert torch.equal(fmt.quantize(x, a, 4).float() * a, ft.fake_quant(x, a, 4))


def test_planted_export_bug_is_caught(gen):
    """Exporting the starting scales instead of the learned ones (a plausible bug) changes the codes or the output."""
    m = _trained_linear(gen)
    w, ws, a = m.export()
    bad = _quant_linear(_linear_with_bias(m), w, m.s0, pqk.QuantConfig(w_bits=4, a_bits=4), a)
    x = torch.randn(16, 64, generator=gen)
    with torch.no_grad():
        want = m(x)
    assert not torch.allclose(bad(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_fake_quant_straight_through():
    x = torch.tensor([-9.0, -0.26, 0.24, 0.25, 5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = ft.fake_quant(x, s, 4)
    assert torch.equal(y.detach(), fmt.quantize(x.detach(), 0.5, 4).float() * 0.5)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))   # clipped entries (-18, 10): no gradient
    assert s.grad is not None and torch.isfinite(s.grad)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_quantize_model_finetune_lowers_block_loss(arch):
    model = tiny_model(arch)
    float_ref = tiny_model(arch)
    cfg = pqk.QuantConfig(**SMALL, finetune=True, finetune_epochs=30, finetune_weight_lr=1e-4)
    pqk.quantize_model(model, StubTokenizer(), text(), cfg, progress=False)
    losses = model.pqk_state.info["finetune_loss"]
    assert len(losses) == 2
    for d in losses:
        assert d["after"] < 0.8 * d["before"], losses
    # the swapped model holds the learned act scales, and the float modules it was built from are gone
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith(("q_proj", "o_proj")))
    assert set(model.pqk_state.act_scales) == {f"{i}.{p}" for i in range(2) for p in ("qkv", "o", "gate_up", "down")}
    ids = torch.tensor([StubTokenizer().encode(text(100, seed=4))])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    del float_ref


def test_finetuned_model_beats_training_free_on_block_outputs():
    """End to end: the fine-tuned model's logits are closer to the float model's than the training-free ones."""
    ref = tiny_model("llama")
    ids = torch.tensor([StubTokenizer().encode(text(120, seed=9))])

    def err(model):
        lead = model.pqk_state.prefix_ids.unsqueeze(0)
        with torch.no_grad():
            want = ref(torch.cat([lead, ids], 1)).logits[:, lead.shape[1]:]
            return float((model(ids).logits - want).pow(2).mean())
    plain = pqk.quantize_model(tiny_model("llama"), StubTokenizer(), text(), pqk.QuantConfig(**SMALL), progress=False)
    tuned = pqk.quantize_model(tiny_model("llama"), StubTokenizer(), text(),
                               pqk.QuantConfig(**SMALL, finetune=True, finetune_epochs=30, finetune_weight_lr=1e-4),
                               progress=False)
    assert err(tuned) < err(plain)


@pytest.mark.parametrize("kw, match", [
    (dict(finetune=True, act_quant="dynamic"), "needs act_quant='static'"),
    (dict(finetune=1), "finetune and finetune_weights must be True or False"),
    (dict(finetune_epochs=0), "finetune_epochs must be a positive int"),
    (dict(finetune_lr=2.0), "finetune_lr must be a number in"),
    (dict(finetune_weight_lr=-1e-5), "finetune_weight_lr must be a number in"),
])
def test_bad_finetune_config(kw, match):
    with pytest.raises(ValueError, match=match):
        pqk.QuantConfig(**kw)


@pytest.mark.parametrize("w_bits, given, used", [(4, None, 5e-4), (8, None, 5e-5), (4, 1e-4, 1e-4)])
def test_weight_learning_rate_by_weight_bits(monkeypatch, w_bits, given, used):
    """finetune_weight_lr None (the default) is 5e-4 for 4-bit weights and 5e-5 for 8-bit (docs/ACCURACY.md, the
    weights' learning rate); a given value is used as is. Read from the optimizer each block builds."""
    seen = []

    class Recording(torch.optim.Adam):
        def __init__(self, groups, *a, **k):
            seen.append([g["lr"] for g in groups])
            super().__init__(groups, *a, **k)

    monkeypatch.setattr(ft.torch.optim, "Adam", Recording)
    cfg = pqk.QuantConfig(**{**SMALL, "w_bits": w_bits}, finetune=True, finetune_epochs=1, finetune_weight_lr=given)
    assert cfg.resolved_finetune_weight_lr == used
    pqk.quantize_model(tiny_model("llama"), StubTokenizer(), text(), cfg, progress=False)
    assert seen and all(lrs == [cfg.finetune_lr, used] for lrs in seen), seen


def test_config_round_trip_and_name():
    cfg = pqk.QuantConfig(finetune=True, finetune_weights=False, finetune_epochs=3)
    assert pqk.QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.name.endswith("+ft-scales")
    old = pqk.QuantConfig().to_dict()
    for k in [k for k in old if k.startswith("finetune")]:
        del old[k]                                  # a checkpoint written before fine-tuning existed
    assert pqk.QuantConfig.from_dict(old).finetune is False


def test_a_block_training_cannot_improve_keeps_its_training_free_values(monkeypatch):
    """With a learning rate that only adds noise the block loss does not go down: the block must come back exactly
    as the training-free calibration made it (same replacements as finetune=False)."""
    plain = pqk.quantize_model(tiny_model("llama"), StubTokenizer(), text(), pqk.QuantConfig(**SMALL), progress=False)
    cfg = pqk.QuantConfig(**SMALL, finetune=True, finetune_epochs=1, finetune_lr=0.9, finetune_weight_lr=0.5)
    tuned = pqk.quantize_model(tiny_model("llama"), StubTokenizer(), text(), cfg, progress=False)
    losses = tuned.pqk_state.info["finetune_loss"]
    assert not any(d["kept"] for d in losses), losses       # lr 0.9 in log space wrecks every block
    for (n, a), b in zip(plain.named_buffers(), tuned.buffers()):
        assert torch.equal(a, b), n
