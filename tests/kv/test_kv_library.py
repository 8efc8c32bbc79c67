"""The KV ops as torch.library custom ops: schema / fake / implementation consistency (torch.library.opcheck) for
every backend that runs here (reference, the C++ CPU kernel, Triton under the interpreter), and graph capture:
torch.compile(fullgraph=True) over the public ops sees one pqk node per call, no graph break."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import kv_format as kvf
from prefixquant_kernels import _extension

from .conftest import KV_BACKENDS, rand_kv

B, H, D, P, T, G = 2, 3, 64, 3, 9, 4


def _samples(gen):
    """Arguments of each torch.ops.pqk KV op, as the public ops pass them (validated, scales float32)."""
    x = rand_kv((B, H, 2 * T - 2, D), torch.float16, gen)        # 16 tokens: a multiple of G for per-channel groups
    s = torch.rand(H, generator=gen) + 0.1
    pre = rand_kv((1, H, P, D), torch.float16, gen)
    body4 = kvf.quantize_static(x[:, :, :T], s, 4)
    pk, sk, zk = kvf.quantize_groupwise(x, 2, G, "channel")
    tail = rand_kv((B, H, 5, D), torch.bfloat16, gen)
    perm = torch.randperm(16 + 5, generator=gen).int()
    q = rand_kv((B, 2 * H, D), torch.float16, gen)
    return {
        "kv_quantize": [(x, s, 4), (x.float().transpose(2, 3).contiguous().transpose(2, 3), s, 8)],
        "kv_quantize_groupwise": [(x, 2, G, "token"), (x, 2, G, "channel")],
        "kv_dequant_concat": [(pre, body4, s, None, 4, 1, None, None, None, None, torch.float16),
                              (None, pk, sk, zk, 2, G, "channel", tail, perm[:16], perm[16:], torch.bfloat16)],
        "kv_decode_attention": [(q, pre, pre.clone(), body4, body4.clone(), s, s, 4, D ** -0.5)],
    }


N_SAMPLES = {"kv_quantize": 2, "kv_quantize_groupwise": 2, "kv_dequant_concat": 2, "kv_decode_attention": 1}


def _cases():
    out = []
    for name, n in N_SAMPLES.items():
        for i in range(n):
            for be in KV_BACKENDS:
                out.append((name, i, be))
        if name == "kv_dequant_concat" and _extension.cpu_available():
            out.append((name, 0, "cpu"))                        # the C++ kernel: static body, no tail
    return out


@pytest.mark.parametrize("name,i,backend", _cases())
def test_opcheck(name, i, backend, gen):
    samples = _samples(gen)[name]
    assert len(samples) == N_SAMPLES[name]
    args = (*samples[i], backend)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(getattr(torch.ops.pqk, name).default, args)
    for a, b in zip(args, before):                              # inputs unmutated
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b)


def test_public_ops_call_the_custom_ops(gen):
    """The public op's result is the custom op's (the wrapper only validates and resolves the backend)."""
    x = rand_kv((B, H, T, D), torch.float16, gen)
    s = torch.rand(H, generator=gen) + 0.1
    assert torch.equal(pqk.kv_quantize(x, s, 4, backend="reference"),
                       torch.ops.pqk.kv_quantize(x, s, 4, "reference"))


@pytest.mark.parametrize("backend", KV_BACKENDS)
def test_compile_fullgraph_sees_one_node_per_op(backend, gen):
    """A decode step of a PrefixQuant cache: quantize the new token, dequant-concat the history, fused attention."""
    x = rand_kv((B, H, T, D), torch.float16, gen)
    new = rand_kv((B, H, 1, D), torch.float16, gen)
    pre = rand_kv((1, H, P, D), torch.float16, gen)
    s = torch.rand(H, generator=gen) + 0.1
    q = rand_kv((B, 2 * H, D), torch.float16, gen)
    body = pqk.kv_quantize(x, s, 4, backend="reference")

    def step(new, body, pre, s, q):
        nb = pqk.kv_quantize(new, s, 4, backend=backend)
        body = torch.cat([body, nb], 2)
        kv = pqk.kv_dequant_concat(pre, body, s, 4, torch.float16, backend=backend)
        g = pqk.kv_quantize_groupwise(kv[:, :, :8], 2, G, "channel", backend=backend)
        att = pqk.kv_decode_attention(q, pre, pre, body, body, s, s, 4, backend=backend)
        return kv, g, att

    seen = []

    def capture(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    got = torch.compile(step, backend=capture, fullgraph=True)(new, body, pre, s, q)
    want = step(new, body, pre, s, q)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert torch.equal(a, b)
    for op in ("kv_quantize", "kv_dequant_concat", "kv_quantize_groupwise", "kv_decode_attention"):
        assert sum(t in (f"pqk.{op}", f"pqk.{op}.default") for t in seen) == 1, seen
