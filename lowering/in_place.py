"""The decode graph's in-place variant: the cache written into capacity buffers (`in_place_decode`)."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from dscompile.lowering import LoweringError
from dscompile.runtime.contract import PAST, WRITE_INDEX


IN_PLACE_OPSET = 24  # TensorScatter


def in_place_decode(decode_path: str | Path, out_path: str | Path) -> ir.Model:
    """Write the decode graph's in-place variant beside it: the cache lives in capacity buffers.

    The contract's decode graph returns `present = Concat(past, new)`, a fresh [B, P+1, ...] copy
    of the whole cache each step. The variant takes `past.{i}.*` as buffers of a capacity T >= P+1
    and one more input, `write_index` [B] (= P), and writes the new row with `TensorScatter` at
    that index: bound as both `past.{i}.*` and `present.{i}.*`, a buffer is updated in place.
    `attention_mask` is then [B, T]: the contract's [B, P+1] followed by zeros for the free rows.

    Only the Concat nodes change. The attention already spans the mask's length, and the one
    other use of the past length (the causal limit of the new token, P + 0) lets a single new
    token see every key, so the variant is only valid for one new token, which is what decode
    serves. The weights stay where `decode_path` references them (same folder).
    """
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
    for value in graph.inputs:
        if value.name == "attention_mask":
            value.shape = ir.Shape(["batch", "past"])
    model.opset_imports[""] = max(model.opset_imports.get("", IN_PLACE_OPSET), IN_PLACE_OPSET)
    ir.save(model, str(out_path))
    return model
