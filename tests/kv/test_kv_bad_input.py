"""The KV ops reject bad arguments before any kernel runs, naming the op and the argument."""
import pytest
import torch

import prefixquant_kernels as pqk

from .conftest import KV_BACKENDS

X = torch.randn(2, 2, 5, 64)
S = torch.ones(2)
P4 = torch.zeros(2, 2, 5, 32, dtype=torch.uint8)
G2 = pqk.kv_quantize_groupwise(torch.randn(2, 2, 8, 64), 2, 32, "token", backend="reference")
PRE = torch.zeros(1, 2, 3, 64, dtype=torch.float16)


def _dc(**kw):
    args = dict(prefix=PRE, packed=P4, scale=S, bits=4)
    args.update(kw)
    return lambda b: pqk.kv_dequant_concat(**args, backend=b)


@pytest.mark.parametrize("backend", KV_BACKENDS)
@pytest.mark.parametrize("call,exc,match", [
    (lambda b: pqk.kv_quantize(X, S, bits=3, backend=b), ValueError, r"^pqk\.kv_quantize: bits must be one of \(2, 4, 8\)"),
    (lambda b: pqk.kv_quantize(X, S, bits=2, backend=b), ValueError, "use kv_quantize_groupwise"),
    (lambda b: pqk.kv_quantize(X, torch.ones(3), backend=b), ValueError, r"scale must have shape \(2,\)"),
    (lambda b: pqk.kv_quantize(X, torch.ones(1, 2), backend=b), ValueError, r"scale must have shape \(2,\)"),
    (lambda b: pqk.kv_quantize(X, torch.tensor([1.0, 0.0]), backend=b), ValueError, "scale must be finite and > 0"),
    (lambda b: pqk.kv_quantize(X, torch.tensor([1.0, float("nan")]), backend=b), ValueError, "scale must be finite"),
    (lambda b: pqk.kv_quantize(X, torch.ones(2, dtype=torch.int32), backend=b), TypeError, "scale must have dtype"),
    (lambda b: pqk.kv_quantize(X[0], S, backend=b), ValueError, "x must be 4-D"),
    (lambda b: pqk.kv_quantize(X.int(), S, backend=b), TypeError, "x must have dtype"),
    (lambda b: pqk.kv_quantize(torch.randn(1, 2, 3, 5), S, backend=b), ValueError, "x's last dim must be even"),
    (lambda b: pqk.kv_quantize(X, S, backend="gpu"), ValueError, "backend must be one of"),
    (lambda b: pqk.kv_quantize_groupwise(X, 8, backend=b), ValueError, "use kv_quantize"),
    (lambda b: pqk.kv_quantize_groupwise(X, 2, 24, backend=b), ValueError, "group_size must be a power of 2"),
    (lambda b: pqk.kv_quantize_groupwise(X, 2, 32, "head", backend=b), ValueError, "axis must be one of"),
    (lambda b: pqk.kv_quantize_groupwise(X, 2, 128, "token", backend=b), ValueError, "head dim D .axis='token'. must be a multiple of 128"),
    (lambda b: pqk.kv_quantize_groupwise(X, 2, 4, "channel", backend=b), ValueError, "token count T .axis='channel'. must be a multiple of 4"),
    (lambda b: pqk.kv_quantize_groupwise(torch.randn(1, 1, 4, 6), 2, 2, backend=b), ValueError, "head dim D must be a multiple of 4"),
    (_dc(bits=5), ValueError, r"^pqk\.kv_dequant_concat: bits must be one of"),
    (_dc(scale=torch.ones(3)), ValueError, r"scale must have shape \(2,\)"),
    (_dc(packed=P4.to(torch.int8)), TypeError, "packed must be uint8 for bits=4"),
    (_dc(packed=P4.float()), TypeError, "packed must have dtype"),
    (_dc(prefix=torch.zeros(1, 3, 3, 64)), ValueError, r"prefix must have shape \(1 or 2, 2, P, 64\)"),
    (_dc(prefix=torch.zeros(1, 2, 3, 32)), ValueError, r"prefix must have shape"),
    (_dc(prefix=torch.zeros(3, 2, 1, 64)), ValueError, r"prefix must have shape \(1 or 2,"),   # P > 0, batch 3 != 2
    (_dc(prefix=torch.zeros(1, 2, 3, 64, dtype=torch.int8)), TypeError, "prefix must have dtype"),
    (_dc(tail=torch.zeros(2, 2, 3, 48)), ValueError, r"tail must have shape \(2, 2, Nt, 64\)"),
    (_dc(tail=torch.zeros(1, 2, 3, 64)), ValueError, r"tail must have shape"),
    (_dc(out_dtype=torch.int32), TypeError, "out_dtype must be one of"),
    (_dc(group_size=32), ValueError, "group_size and axis are for group-wise"),
    (_dc(packed=G2[0], scale=G2[1], zero=G2[2], bits=2, group_size=16, axis="token"), ValueError, r"scale must have shape \(2, 2, 8, 4\)"),
    (_dc(packed=G2[0], scale=G2[1], zero=G2[2][..., :1], bits=2, group_size=32, axis="token"), ValueError, "zero must have shape"),
    (_dc(packed=G2[0], scale=G2[1].float(), zero=G2[2], bits=2, group_size=32, axis="token"), TypeError, "scale must have dtype"),
    (_dc(packed=G2[0], scale=G2[1], zero=G2[2], bits=8, group_size=32, axis="token"), ValueError, "use kv_quantize"),
    (_dc(tail=torch.zeros(2, 2, 2, 64), body_pos=torch.arange(5)), ValueError, "body_pos and tail_pos must be given together"),
    (_dc(tail=torch.zeros(2, 2, 2, 64), body_pos=torch.arange(5), tail_pos=torch.tensor([5, 5])), ValueError, "permutation"),
    (_dc(tail=torch.zeros(2, 2, 2, 64), body_pos=torch.arange(4), tail_pos=torch.tensor([5, 6])), ValueError, r"body_pos must have shape \(5,\)"),
    (_dc(tail=torch.zeros(2, 2, 2, 64), body_pos=torch.arange(5.0), tail_pos=torch.tensor([5, 6])), TypeError, "body_pos must have dtype"),
])
def test_bad_input_raises_clear_error(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call(backend)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pqk.kv_quantize(X, S, backend="triton")
    assert pqk.ops.backend.resolve("auto", X.device, "kv_quantize_groupwise").kind == "reference"
