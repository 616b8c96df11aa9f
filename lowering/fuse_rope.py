"""Each rotary embedding of the lowered graph as one ONNX `RotaryEmbedding` (opset 23).

model/transformer.py's `apply_rope` rotates x [B, S, H, R] (queries) or [B, S, R] (the shared
key) by cos/sin [B, S, R/2] (Unsqueezed to [B, S, 1, R/2] for the queries) and exports as

    x1, x2 = Slice(x, 0::2), Slice(x, 1::2)        (interleaved pairs; halves: Slice or Split)
    out = Concat(x1*cos - x2*sin, x2*cos + x1*sin, axis=-1)

nine small nodes per rotation, two rotations per layer. onnxscript's own fusion
(`onnx_fusions.fuse`) does not fire on it: it expects the Hugging Face form (x*cos +
rotate_half(x)*sin with Neg, cos/sin of full width computed in the graph from Concat(freqs,
freqs), heads on axis 1), none of which this graph has.

The identity: with cos/sin of R/2 values per token, rotate-half RoPE (`RotaryEmbedding`,
interleaved=0) of x is exactly Concat(x1*cos - x2*sin, x2*cos + x1*sin) for the halves x1, x2.
For interleaved pairs the result is laid out [rotated firsts, rotated seconds], which is the
rotate-half RoPE of x with its last dim de-interleaved (Gather of [0, 2, 4, ..., 1, 3, 5, ...]):
so the rewrite is Gather + RotaryEmbedding, and the cache keeps its layout. The op takes 3-D
input [B, S, H*R] with `num_heads` (its 4-D form wants heads on axis 1), so the queries are
Reshaped [B, S, H, R] -> [B, S, H*R] -> back (no copies).

Matched only when every piece is proven: the slices are exactly the halves or the pairs of the
last axis, cos/sin are rank 3 [B, S, R/2] with the same leading dims as x (or that Unsqueezed
on axis 2 for 4-D x), and the Sub/Add/Mul operands are the ones written above. ONNX Runtime
1.31's CPU kernel matches the formula to 2e-7; the CUDA provider and TensorRT >= 10.15 run it
(lowering/data/ort_cuda_kernels.json, lowering/tensorrt/data/trt_onnx_ops.json).
Bench model (V2-Lite shape, 4 layers), int4 decode graph: 18 nodes per layer become 6.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from dscompile.lowering._ir import hand_over, int64_initializer, producer, standard_nodes

log = logging.getLogger(__name__)

_BIG = 2 ** 62  # a Slice end at or past this means "to the end"


def run(model: ir.Model) -> int:
    """Rewrite every matched rotation; returns how many."""
    graph = model.graph
    count = 0
    for node in standard_nodes(graph, "Concat", 2):
        match = _match(node)
        if match is None:
            continue
        _rewrite(graph, node, *match)
        count += 1
    log.info("fuse_rope: %d rotations as RotaryEmbedding", count)
    return count


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


def deinterleaving(R: int) -> list[int]:
    """The Gather indices that put a last axis of R interleaved pairs in rotate-half order: [0, 2, ..., 1, 3, ...]."""
    return list(range(0, R, 2)) + list(range(1, R, 2))


def _last_axis(axis: int, rank: int) -> bool:
    return axis in (-1, rank - 1)


def _halves(x1: ir.Value, x2: ir.Value) -> tuple[ir.Value, bool] | None:
    """(x, interleaved) when x1, x2 are the two halves or the even/odd pairs of x's last axis."""
    split = producer(x1, "Split")
    if split is not None and x2.producer() is split and len(split.outputs) == 2 and split.outputs[0] is x1:
        x = split.inputs[0]
        rank, R = len(x.shape) if x.shape else 0, x.shape[-1] if x.shape else None
        sizes = _ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        if sizes is None and split.attributes.get_int("num_outputs", 0) == 2 and isinstance(R, int) and R % 2 == 0:
            sizes = [R // 2, R // 2]  # chunk(2) exports as Split(num_outputs=2)
        if isinstance(R, int) and _last_axis(split.attributes.get_int("axis", 0), rank) and sizes == [R // 2, R // 2]:
            return x, False
        return None
    s1, s2 = producer(x1, "Slice"), producer(x2, "Slice")
    if s1 is None or s2 is None or s1.inputs[0] is not s2.inputs[0] or len(s1.inputs) < 4 or len(s2.inputs) < 4:
        return None
    x = s1.inputs[0]
    if x.shape is None or not isinstance(x.shape[-1], int):
        return None
    rank, R = len(x.shape), x.shape[-1]
    a, b = [[_ints(s.inputs[i]) if i < len(s.inputs) else [1] for i in range(1, 5)] for s in (s1, s2)]
    if any(v is None or len(v) != 1 for v in a + b) or not all(_last_axis(s[2][0], rank) for s in (a, b)):
        return None
    (start1, end1, _, step1), (start2, end2, _, step2) = ([v[0] for v in s] for s in (a, b))
    if step1 == step2 == 2 and (start1, start2) == (0, 1) and min(end1, end2) >= R:
        return x, True
    if step1 == step2 == 1 and (start1, end1, start2) == (0, R // 2, R // 2) and end2 >= R:
        return x, False
    return None


def _operands(node: ir.Node | None) -> tuple[ir.Value, ir.Value] | None:
    return (node.inputs[0], node.inputs[1]) if node is not None and len(node.inputs) == 2 else None


def _product(value: ir.Value, x: ir.Value) -> ir.Value | None:
    """The other factor when value = Mul(x, f) or Mul(f, x)."""
    pair = _operands(producer(value, "Mul"))
    if pair is None:
        return None
    return pair[1] if pair[0] is x else pair[0] if pair[1] is x else None


def _match(concat: ir.Node) -> tuple[ir.Value, bool, ir.Value, ir.Value] | None:
    """(x, interleaved, cos [B, S, R/2], sin [B, S, R/2]) of a rotation ending in `concat`."""
    out = concat.outputs[0]
    if out.shape is None or not _last_axis(concat.attributes.get_int("axis", 0), len(out.shape)):
        return None
    sub, add = _operands(producer(concat.inputs[0], "Sub")), _operands(producer(concat.inputs[1], "Add"))
    if sub is None or add is None:
        return None
    m1, m2 = producer(sub[0], "Mul"), producer(sub[1], "Mul")
    if m1 is None or m2 is None:
        return None
    for x1, cos in (m1.inputs, m1.inputs[::-1]):
        for x2, sin in (m2.inputs, m2.inputs[::-1]):
            found = _halves(x1, x2)
            if found is None:
                continue
            if not _second_half(add, x1, x2, cos, sin):
                continue
            x, interleaved = found
            cos3, sin3 = _cos_sin(cos, x), _cos_sin(sin, x)
            if cos3 is not None and sin3 is not None:
                return x, interleaved, cos3, sin3
    return None


def _second_half(add: tuple[ir.Value, ir.Value], x1: ir.Value, x2: ir.Value, cos: ir.Value, sin: ir.Value) -> bool:
    """add = x2*cos + x1*sin, in either order of the sum and of each product."""
    a, b = add
    return (_product(a, x2) is cos and _product(b, x1) is sin) or (_product(a, x1) is sin and _product(b, x2) is cos)


def _cos_sin(value: ir.Value, x: ir.Value) -> ir.Value | None:
    """value as the [B, S, R/2] table it broadcasts from, when it fits x [B, S, (H,) R]."""
    rank = len(x.shape)
    if rank == 4:
        unsqueeze = producer(value, "Unsqueeze")
        if unsqueeze is None or _ints(unsqueeze.inputs[1]) not in ([2], [-2]):
            return None
        value = unsqueeze.inputs[0]
    elif rank != 3:
        return None
    shape = value.shape
    if shape is None or len(shape) != 3 or shape[-1] != x.shape[-1] // 2 \
            or not all(_same_dim(a, b) for a, b in zip(shape[:2], x.shape[:2])):
        return None
    return value


def _same_dim(a, b) -> bool:
    """Two leading dims that a Mul broadcast together are equal: equal ints, or both symbolic (torch.export
    gives position_ids' batch its own symbol; a broadcast of two symbols was proven equal at capture, since
    it specializes the sizes 0 and 1 to ints)."""
    return a == b or (not isinstance(a, int) and not isinstance(b, int))


def _const(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    """An int64 initializer holding `values`, shared by the rotations that need the same one."""
    return int64_initializer(graph, f"{name}.{'_'.join(map(str, values[:2]))}.{len(values)}", values)


def _rewrite(graph: ir.Graph, concat: ir.Node, x: ir.Value, interleaved: bool, cos: ir.Value, sin: ir.Value) -> None:
    out = concat.outputs[0]
    shape, R = x.shape, x.shape[-1]
    heads = shape[2] if len(shape) == 4 else 1
    if not isinstance(heads, int):
        return
    new: list[ir.Node] = []

    def add(op_type: str, inputs: list, attributes: dict | None = None, dims=None) -> ir.Value:
        node = ir.node(op_type, inputs, attributes, name=f"{concat.name}.rope.{len(new)}.{op_type}")
        node.outputs[0].type, node.outputs[0].shape = out.type, ir.Shape(dims)
        new.append(node)
        return node.outputs[0]

    if interleaved:
        pairs = _const(graph, "rope.deinterleave", deinterleaving(R))
        x = add("Gather", [x, pairs], {"axis": len(shape) - 1}, list(shape))
    y = x
    if len(shape) == 4:
        y = add("Reshape", [x, _const(graph, "rope.flat_heads", [0, 0, heads * R])], None, [shape[0], shape[1], heads * R])
    y = add("RotaryEmbedding", [y, cos, sin], {"interleaved": 0, "num_heads": heads}, list(y.shape))
    if len(shape) == 4:
        y = add("Reshape", [y, _const(graph, "rope.heads", [0, 0, heads, R])], None, list(shape))
    graph.insert_before(concat, new)
    hand_over(out, y)
    graph.remove(concat, safe=True)
