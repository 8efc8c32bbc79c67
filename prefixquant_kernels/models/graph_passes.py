"""Inductor graph passes of the compiled step (compiled_step.CPU_INDUCTOR_OPTIONS installs them).

SharedInputLinears: the pqk::quant_linear nodes that read one input (a layer's q / k / v projections, its gate /
up projections) become one pqk::quant_linear_multi node. On the CPU that op quantizes the input once per distinct
static scale and runs all the GEMVs of a decode step in one parallel region: SmolLM2's k and v projections (192 x
576, 55 KB of int4 each) are too small to split over two threads alone, and every op call from inductor's Python
wrapper costs microseconds (docs/PERF.md, "Compiled decode step", change 9). The outputs are bit for bit those of
the separate ops (tests/ops/test_quant_linear_multi.py).
"""
from __future__ import annotations

import operator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

# views that keep the data of their input as it is (the same elements, the same order)
_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def _base(node):
    """The node a chain of views starts from."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    return node


def _is_input(arg) -> bool:
    """A graph input (or None): defined before any node that uses it, so a fused node can read it anywhere."""
    return arg is None or (isinstance(arg, torch.fx.Node) and arg.op in ("placeholder", "get_attr"))


class SharedInputLinears(CustomGraphPass):
    """quant_linear(x, w_i, ...) for i in a group -> quant_linear_multi(x, [w_i], ...)[i]. A group: the nodes whose
    x is one tensor (the same node after views, the same shape and dtype) with one a_bits, cpu_isa and weight dtype,
    and whose weights, scales and biases are graph inputs."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        groups: dict[tuple, list[torch.fx.Node]] = {}
        for node in graph.nodes:
            if node.op != "call_function" or node.target is not torch.ops.pqk.quant_linear.default:
                continue
            x, w, w_scale, a_scale, a_bits, bias = node.args[:6]
            cpu_isa = node.args[6] if len(node.args) > 6 else node.kwargs.get("cpu_isa", -1)
            xv, wv = x.meta.get("val"), w.meta.get("val")
            if xv is None or wv is None or not all(_is_input(a) for a in (w, w_scale, a_scale, bias)):
                continue
            key = (_base(x), tuple(xv.shape), xv.dtype, a_bits, cpu_isa, wv.dtype)
            groups.setdefault(key, []).append(node)
        for (_, _, _, a_bits, cpu_isa, _), nodes in groups.items():
            if len(nodes) > 1:
                _fuse(graph, nodes, a_bits, cpu_isa)

    def uuid(self):
        return get_hash_for_files((__file__,))


def _fuse(graph: torch.fx.Graph, nodes: list, a_bits: int, cpu_isa: int) -> None:
    first = nodes[0]
    cols = list(zip(*(n.args[1:4] + (n.args[5],) for n in nodes)))   # w, w_scale, a_scale, bias: one list each
    with graph.inserting_before(first):
        multi = graph.call_function(torch.ops.pqk.quant_linear_multi.default,
                                    (first.args[0], list(cols[0]), list(cols[1]), list(cols[2]), a_bits,
                                     list(cols[3])), {"cpu_isa": cpu_isa})
    multi.meta["val"] = [n.meta["val"] for n in nodes]
    for i, n in enumerate(nodes):
        with graph.inserting_before(first):
            out = graph.call_function(operator.getitem, (multi, i))
        out.meta["val"] = n.meta["val"]
        n.replace_all_uses_with(out)
    for n in nodes:
        graph.erase_node(n)
