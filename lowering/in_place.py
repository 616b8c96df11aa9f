"""The decode graph's in-place variant: the cache written into capacity buffers (`in_place_decode`).

The contract's decode graph returns `present = Concat(past, new)`, a fresh [B, P+S, ...] copy of the
whole cache each step. The variant takes `past.{i}.*` as buffers of a capacity T >= P+S and one more
input, `write_index` [B] (= P), and writes the new rows with `TensorScatter` (opset 24: S rows at
write_index[b] of batch row b): bound as both `past.{i}.*` and `present.{i}.*`, a buffer is updated
in place. `attention_mask` is then [B, T]: the contract's [B, P+S] followed by zeros for the free rows.

One other node reads the past length (others may read the batch size, which the buffers share):
the causal limit of new token j, `j + P` with P taken as `Shape(past.*)[1]` (model/transformer.py
causal_mask, exported as Add(Range(0, S), Squeeze(Shape(past))) -> Unsqueeze -> LessOrEqual(key
positions, that) -> Unsqueeze(axis 0) -> And(.., padding mask)). In
the variant that shape is the capacity T, so the limit is T + j: every key passes, and only the
padding mask hides the free rows. For ONE new token that is exact (it may see every cached row),
which is what a float decode serves (`any_new_tokens=False`: only the Concats change). For S > 1
the new tokens would see each other's future, so `any_new_tokens=True` also rewrites the limit to
`write_index[b] + j` ([B, S], per row) and drops the axis-0 Unsqueeze, keeping the mask [B, S, T]:
the variant then runs any step (prefill, decode, a ragged step of rows at different lengths). It
refuses (LoweringError) a graph where that chain is not found as described, or where anything else
reads a cache input's sequence length. Against the contract's decode graph in ONNX Runtime it gave
identical logits and cache rows (measured on tiny float32 and int4 exports, S 1/3/7 after P 0/5;
tests/lowering/test_in_place_any_tokens.py checks them within the float32 bound). The weights stay
where `decode_path` references them (same folder).
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from dscompile.lowering import LoweringError
from dscompile.lowering._ir import int64_initializer, only_use
from dscompile.runtime.contract import PAST, WRITE_INDEX


IN_PLACE_OPSET = 24  # TensorScatter


def in_place_decode(decode_path: str | Path, out_path: str | Path, any_new_tokens: bool = False) -> ir.Model:
    """Write the decode graph's in-place variant beside it (module docstring): the cache lives in
    capacity buffers; valid for one new token, or for any number with `any_new_tokens`."""
    model = ir.load(str(decode_path))
    graph = model.graph
    write_index = ir.Value(name=WRITE_INDEX, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch"]))
    graph.inputs.append(write_index)
    rewritten = 0
    for value in list(graph.inputs):
        if not value.name.startswith(f"{PAST}."):
            continue
        concats = [node for node, _ in value.uses() if node.op_type == "Concat"]
        if len(concats) != 1 or concats[0].inputs[0] is not value or len(concats[0].inputs) != 2 \
                or concats[0].attributes.get_int("axis") not in (1, -2):
            raise LoweringError(f"{decode_path}: {value.name} is not appended to by one Concat on the sequence "
                                "axis; the in-place decode graph cannot be made")
        concat = concats[0]
        write = ir.node("TensorScatter", [value, concat.inputs[1], write_index], attributes={"axis": 1},
                        name=f"{concat.name}.in_place")
        graph.insert_before(concat, write)
        out = concat.outputs[0]
        name = out.name
        out.replace_all_uses_with(write.outputs[0], replace_graph_outputs=True)
        graph.remove(concat, safe=True)
        write.outputs[0].name = name
        write.outputs[0].type, write.outputs[0].shape = value.type, value.shape
        rewritten += 1
    if rewritten == 0:
        raise LoweringError(f"{decode_path}: no cache inputs to write in place")
    if any_new_tokens:
        _causal_limit_from_write_index(graph, write_index, decode_path)
    for value in graph.inputs:
        if value.name == "attention_mask":
            value.shape = ir.Shape(["batch", "past"])
    model.opset_imports[""] = max(model.opset_imports.get("", IN_PLACE_OPSET), IN_PLACE_OPSET)
    ir.save(model, str(out_path))
    return model


def _axes(node: ir.Node) -> list[int] | None:
    """An Unsqueeze's constant axes, or None."""
    if node.op_type != "Unsqueeze" or node.domain or len(node.inputs) != 2 or node.inputs[1] is None:
        return None
    held = node.inputs[1].const_value
    return None if held is None else [int(a) for a in held.numpy().reshape(-1)]


def _other_axes(node: ir.Node) -> bool:
    """A Shape of axes other than the sequence axis 1 (the batch size, the width): the buffers share them."""
    if node.op_type != "Shape" or node.domain:
        return False
    start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end")
    return end is not None and (0 <= end <= 1 or start >= 2)


def _causal_limit_from_write_index(graph: ir.Graph, write_index: ir.Value, where) -> None:
    """Rewrite the causal limit `Range(0, S) + Shape(past)[1]` to `Range(0, S) + write_index[:, None]`
    ([B, S]) and keep the causal mask [B, S, T] (module docstring); LoweringError where the chain differs."""
    shapes = [node for value in graph.inputs if value.name.startswith(f"{PAST}.")
              for node, _ in value.uses() if node.op_type != "TensorScatter" and not _other_axes(node)]
    if not shapes:
        raise LoweringError(f"{where}: no node reads the past length (Shape of a {PAST}.* input); the causal limit "
                            "of the new tokens was not found, so the in-place graph cannot take several")
    for shape in shapes:
        what = f"{where}: {shape.name} ({shape.op_type} of {shape.inputs[0].name})"
        if shape.op_type != "Shape" or shape.domain or shape.attributes.get_int("start") != 1 \
                or shape.attributes.get_int("end") != 2:
            raise LoweringError(f"{what} reads a cache input other than as its length (Shape, start 1, end 2): "
                                "the in-place graph cannot take several new tokens")
        squeeze = only_use(shape.outputs[0], "Squeeze")
        add = squeeze and only_use(squeeze.outputs[0], "Add")
        steps = add and add.inputs[1 - add.inputs.index(squeeze.outputs[0])]
        start = steps and steps.producer() and steps.producer().op_type == "Range" and steps.producer().inputs[0]
        if not start or start.const_value is None or start.const_value.numpy().reshape(-1).tolist() != [0]:
            raise LoweringError(f"{what}: its length is not added to Range(0, S) alone (the causal limit of the "
                                "new tokens): the in-place graph cannot take several new tokens")
        column = only_use(add.outputs[0], "Unsqueeze")
        if column is None or _axes(column) not in ([1], [-1]):
            raise LoweringError(f"{what}: the causal limit is not unsqueezed to a column [S, 1]")
        compare = only_use(column.outputs[0], "LessOrEqual", index=1)
        if compare is None:
            raise LoweringError(f"{what}: the causal limit is not compared by one LessOrEqual(keys, limit)")
        lift = only_use(compare.outputs[0], "Unsqueeze")
        if lift is None or _axes(lift) != [0] or not lift.outputs[0].uses() \
                or any(n.op_type != "And" for n, _ in lift.outputs[0].uses()):
            raise LoweringError(f"{what}: the causal comparison is not unsqueezed on axis 0 into And with the "
                                "padding mask")
        # limit[b, j] = j + write_index[b]: [S] + [B, 1] -> [B, S]; then [B, S, 1]; keys [1, T] -> [B, S, T]
        row = ir.node("Unsqueeze", [write_index, int64_initializer(graph, f"{WRITE_INDEX}.axes", [1])],
                      name=f"{add.name}.{WRITE_INDEX}")
        graph.insert_before(add, row)
        row.outputs[0].name = f"{WRITE_INDEX}.column"
        add.replace_input_with(add.inputs.index(squeeze.outputs[0]), row.outputs[0])
        column.replace_input_with(1, int64_initializer(graph, f"{WRITE_INDEX}.last_axis", [-1]))
        lift.outputs[0].replace_all_uses_with(compare.outputs[0])
        for node in (lift, squeeze, shape):
            graph.remove(node, safe=True)
        add.outputs[0].shape = ir.Shape(["batch", "seq"])
        column.outputs[0].shape = ir.Shape(["batch", "seq", 1])
        compare.outputs[0].shape = ir.Shape(["batch", "seq", "past"])
