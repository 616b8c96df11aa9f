"""Reshapes whose target is computed at run time get a constant target where the shapes allow one.

torch.onnx writes a `view(B, S, H, D)` over dynamic B and S as
Reshape(x, Concat(Shape(a)[0:1], Shape(b)[1:2], [H], [D])): Shape, Slice-like Shape and Concat
nodes run every step to rebuild a target the graph's symbolic shapes already give. Where the
Reshape's output shape is known (each dim an int or a symbol), the target becomes a constant:
an int stays itself, a symbolic dim equal to the input's dim on the same axis becomes 0 (copy
it, allowzero=0), and at most one other symbolic dim becomes -1 (the rest of the elements).

What it guarantees: the constant target gives the output shape that torch.export inferred for the
Reshape (equal symbols on the same axis are equal sizes; the one -1 takes the remaining size),
so values and shapes are those of the computed target. A Reshape with two unmatched symbolic dims,
an unknown rank, or a static 0 in its output is left as it is. The nodes that built the target
are removed when nothing else reads them (graph.py runs RemoveUnusedNodesPass after).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from dscompile.lowering._ir import int64_initializer, standard_nodes

log = logging.getLogger(__name__)


def run(model: ir.Model) -> int:
    """Give every Reshape whose target can be a constant that constant; returns how many."""
    graph = model.graph
    count = 0
    for node in standard_nodes(graph, "Reshape", 2):
        target = node.inputs[1]
        if target is None or target.const_value is not None:
            continue
        values = _target(node.inputs[0], node.outputs[0])
        if values is None:
            continue
        const = _const(graph, values)
        node.replace_input_with(1, const)
        node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
        count += 1
    log.info("static_reshapes: %d Reshape targets made constant", count)
    return count


def _target(x: ir.Value, out: ir.Value) -> list[int] | None:
    if x.shape is None or out.shape is None:
        return None
    values, free = [], 0
    for axis, dim in enumerate(out.shape):
        if isinstance(dim, int):
            if dim == 0:  # 0 would mean "copy" once allowzero is 0
                return None
            values.append(dim)
        elif dim.value and axis < len(x.shape) and not isinstance(x.shape[axis], int) and x.shape[axis].value == dim.value:
            values.append(0)
        else:
            free += 1
            values.append(-1)
    return values if free <= 1 else None


def _const(graph: ir.Graph, values: list[int]) -> ir.Value:
    return int64_initializer(graph, "reshape.target." + "_".join(str(v).replace("-", "m") for v in values), values)
