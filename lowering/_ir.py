"""Small onnx-ir helpers the lowering's graph rewrites share."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def int64_initializer(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    """An int64 [len(values)] initializer of `values` called `name`; the graph's own where it already
    holds one of that name with these values, else a new one (renamed if the name is taken)."""
    values = [int(v) for v in values]
    existing = graph.initializers.get(name)
    if existing is not None:
        held = existing.const_value
        if held is not None and held.numpy().reshape(-1).tolist() == values:
            return existing
        name = f"{name}_{len(graph.initializers)}"
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(values)]),
                     const_value=ir.tensor(np.array(values, dtype=np.int64), name=name))
    graph.register_initializer(value)
    return value


def hand_over(old: ir.Value, new: ir.Value) -> None:
    """`new` takes `old`'s uses (as a graph output too) and its name."""
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name = name


def replace_node(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put `new` in `old`'s place: its one output takes the old output's uses, shape, type and name."""
    graph.insert_before(old, new)
    out, got = old.outputs[0], new.outputs[0]
    got.shape, got.type = out.shape, out.type
    hand_over(out, got)
    graph.remove(old, safe=True)


def producer(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    """The node of `op_type` (in `domain`, the default one unless given) that makes `value`, or None."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == domain else None


def only_use(value: ir.Value, op_type: str, index: int | None = None) -> ir.Node | None:
    """The one node that reads `value`, where it is a default-domain `op_type` (reading it as input `index`)."""
    uses = list(value.uses())
    if (len(uses) != 1 or uses[0][0].op_type != op_type or uses[0][0].domain
            or (index is not None and uses[0][1] != index)):
        return None
    return uses[0][0]


def attribute(node: ir.Node, name: str, default=None):
    """The value of `node`'s attribute `name`, or `default` where it has none."""
    held = node.attributes.get(name)
    return default if held is None else held.value


def standard_nodes(graph: ir.Graph, op_type: str, inputs: int) -> list[ir.Node]:
    """The graph's nodes of ONNX op `op_type` (default domain) with `inputs` inputs, listed up front so a
    rewrite may insert and remove nodes while it walks them."""
    return [n for n in graph if n.op_type == op_type and n.domain == "" and len(n.inputs) == inputs]


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output (value, value_float(s), value_int(s)), else
    None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain != "":
        return None
    for name, dtype in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                        ("value_int", np.int64), ("value_ints", np.int64)):
        if name in node.attributes:
            held = node.attributes[name].value
            return held.numpy() if dtype is None else np.array(held, dtype=dtype)
    return None


def constant_ints(value: ir.Value | None) -> list[int] | None:
    """constant_array's values as a flat list of Python ints, or None."""
    held = constant_array(value)
    return None if held is None else [int(v) for v in held.reshape(-1)]
