"""The pqk:: custom ops: schema/fake consistency (torch.library.opcheck) and graph capture."""
import pytest
import torch

import prefixquant_kernels as pqk
from prefixquant_kernels import format as fmt

from ..conftest import needs_kernels


def _samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 128, generator=g).bfloat16()
    q = torch.randint(-8, 8, (5, 128), dtype=torch.int8, generator=g)
    w = fmt.pack_int4(torch.randint(-8, 8, (7, 128), dtype=torch.int8, generator=g))
    ws = torch.rand(7, generator=g) + 0.1
    s = torch.tensor(0.2)
    return {
        "pack_int4": (q,),
        "unpack_int4": (fmt.pack_int4(q),),
        "quantize_static": (x, s, 4),
        "quantize_per_token": (x, 8),
        "int4_matmul": (fmt.pack_int4(q), w, torch.rand(5) + 0.1, ws, torch.randn(7), torch.float16),
        "quant_linear": (x, w, ws, s, 4, None),
        "materialize": (torch.rand(3, 1, 1, 9, generator=g) > 0.5,),
    }


@needs_kernels
@pytest.mark.parametrize("name", list(_samples()))
def test_opcheck(name):
    args = _samples()[name]
    torch.library.opcheck(getattr(torch.ops.pqk, name).default, args)


@needs_kernels
def test_quant_linear_module_compiles_as_one_op():
    lin = torch.nn.Linear(128, 7, bias=True)
    mod = pqk.nn.QuantLinear.from_float(lin, 4, 4, act_scale=0.05)
    x = torch.randn(3, 128)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    compiled = torch.compile(mod, backend=backend, fullgraph=True)
    assert torch.equal(compiled(x), mod(x))
    assert any("pqk.quant_linear" in t for t in seen), seen


def test_materialize_is_a_contiguous_copy():
    """pqk::materialize (the compiled decode step's mask, made once): the same values in new, contiguous storage,
    for a strided input too; the input is not touched."""
    g = torch.Generator().manual_seed(1)
    base = torch.rand(4, 1, 6, 33, generator=g) > 0.5
    for x in (base, base[:, :, -1:, 1:], base.transpose(0, 3)):
        before = x.clone()
        y = torch.ops.pqk.materialize(x)
        assert torch.equal(y, x) and y.dtype == x.dtype and y.is_contiguous()
        assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        assert torch.equal(x, before)
