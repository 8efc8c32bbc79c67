"""models/graph_passes.py: SharedInputLinears turns the quant_linear nodes of one input into one
quant_linear_multi node, leaves the others, and the graph computes the same outputs bit for bit."""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import prefixquant_kernels as pqk  # noqa: F401 (registers the ops)
from prefixquant_kernels.models.graph_passes import SharedInputLinears

from ..conftest import needs_kernels

QL, MULTI = torch.ops.pqk.quant_linear.default, torch.ops.pqk.quant_linear_multi.default


def _layer(h, wq, sq, wk, sk, wv, sv, wo, so, a, bk):
    x = h.reshape(-1, h.shape[-1])
    q = QL(x, wq, sq, a, 4, None)
    k = QL(h.view(-1, h.shape[-1]), wk, sk, a, 4, bk)          # another view of the same input
    v = QL(x, wv, sv, None, 4, None)                            # per token: grouped too, its own panel
    o = QL((q[:, :8] + k + v), wo, so, a, 4, None)              # another input: stays alone
    w8 = QL(x, (wq[:8].to(torch.int16) - 128).to(torch.int8).repeat(1, 2), sq[:8], a, 8, None)  # computed w
    return o, q, w8


def _args(gen):
    def w(n, k=32):
        return torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)

    def s(n):
        return torch.rand(n, generator=gen) * 0.05 + 0.01
    return (torch.randn(1, 1, 32, generator=gen), w(16), s(16), w(8), s(8), w(8), s(8), w(4, 8), s(4),
            torch.tensor(0.04), torch.randn(8, generator=gen))


def _count(gm, target):
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


@needs_kernels
def test_shared_input_linears_groups_and_keeps_the_outputs(gen):
    args = _args(gen)
    gm = make_fx(_layer)(*args)
    want = gm(*args)
    assert _count(gm, QL) == 5 and _count(gm, MULTI) == 0
    SharedInputLinears()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    # q, k, v read h (through views) with one a_bits: one multi node; o reads another tensor, w8 has a_bits 8 and
    # a computed weight: both stay single
    assert _count(gm, MULTI) == 1 and _count(gm, QL) == 2
    multi = next(n for n in gm.graph.nodes if n.target is MULTI)
    assert len(multi.args[1]) == 3
    got = gm(*args)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@needs_kernels
def test_shared_input_linears_is_stable_for_the_cache(gen):
    p = SharedInputLinears()
    assert p.uuid() == SharedInputLinears().uuid() and p.uuid()
