"""MLA's attention in a decode graph as one native `LatentAttention` node (runtime/native/attention.cc).

lowering/ops.py's `latent_attention` writes, for a static number of heads H,

    q  = Mul(Reshape(q_latent, [0, 1, -1, C]), scale)       qr = Mul(Reshape(q_rope, [0, 1, -1, R]), scale)
    kv = Unsqueeze(kv_latent, [1])                           kr = Unsqueeze(k_rope, [1])
    scores = Reshape(Add(MatMul(q, Transpose(kv, [0, 1, 3, 2])), MatMul(qr, Transpose(kr, [0, 1, 3, 2]))),
                     [0, H, -1, 0])
    p = Softmax(Add(scores, mask), axis=-1)
    y = Reshape(MatMul(Reshape(p, [0, 1, -1, 0]), kv), [0, H, -1, 0])

seventeen nodes a layer, whose MatMuls pack the whole cache for each product every step. Each match becomes
`LatentAttention(q_latent, q_rope, kv_latent, k_rope, mask, scale)`, which reads each cached token once
per use. Only the decode graphs of `--native-kernels` exports (float32 activations) are rewritten: a
prefill's thousands of query rows are GEMM work, where ONNX Runtime's MatMuls are the faster. Matched only
where every piece is as written above; anything else is left as it is.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from dscompile.lowering._ir import attribute, constant_array, only_use, producer, replace_node
from dscompile.runtime.native import DOMAIN as NATIVE_DOMAIN

log = logging.getLogger(__name__)

OP = "LatentAttention"


def _reshaped(value: ir.Value | None, target: list[int]) -> ir.Value | None:
    """x where `value` = Reshape(x, target), else None."""
    node = producer(value, "Reshape")
    shape = None if node is None else constant_array(node.inputs[1])
    if shape is None or shape.reshape(-1).tolist() != target or attribute(node, "allowzero", 0):
        return None
    return node.inputs[0]


def _query(value: ir.Value | None) -> tuple[ir.Value, float] | None:
    """(q, scale) where `value` = Mul(Reshape(q, [0, 1, -1, last]), scale) (a scalar constant)."""
    mul = producer(value, "Mul")
    if mul is None:
        return None
    for x, s in (mul.inputs, mul.inputs[::-1]):
        scale = constant_array(s)
        q = None if scale is None or scale.size != 1 else x.producer()
        if q is None or q.op_type != "Reshape" or q.domain != "" or q.inputs[0].shape is None:
            continue
        source = q.inputs[0]
        last = source.shape[-1]
        if isinstance(last, int) and _reshaped(x, [0, 1, -1, last]) is source:
            return source, float(scale.reshape(-1)[0])
    return None


def _key(value: ir.Value | None) -> tuple[ir.Value, ir.Value] | None:
    """(cache, Unsqueeze(cache, [1])) where `value` = Transpose(Unsqueeze(cache, [1]), [0, 1, 3, 2])."""
    transpose = producer(value, "Transpose")
    if transpose is None or list(attribute(transpose, "perm", [])) != [0, 1, 3, 2]:
        return None
    unsqueeze = producer(transpose.inputs[0], "Unsqueeze")
    axes = None if unsqueeze is None else constant_array(unsqueeze.inputs[1])
    if axes is None or axes.reshape(-1).tolist() != [1]:
        return None
    return unsqueeze.inputs[0], transpose.inputs[0]


def _match(softmax: ir.Node) -> tuple[list[ir.Value], float, ir.Node] | None:
    """([q_latent, q_rope, kv_latent, k_rope, mask], scale, the attention's last node) around `softmax`."""
    if attribute(softmax, "axis", -1) not in (-1, 3):
        return None
    add = producer(softmax.inputs[0], "Add")
    if add is None:
        return None
    for scores, mask in (add.inputs, add.inputs[::-1]):
        reshape = producer(scores, "Reshape")
        heads = None if reshape is None else constant_array(reshape.inputs[1])
        target = None if heads is None else heads.reshape(-1).tolist()
        if target is None or len(target) != 4 or target[0] != 0 or target[2:] != [-1, 0]:
            continue
        H = int(target[1])
        total = producer(reshape.inputs[0], "Add")
        if total is None or mask.shape is None or len(mask.shape) != 4:
            continue
        parts = []
        for product in total.inputs:
            matmul = producer(product, "MatMul")
            query = None if matmul is None else _query(matmul.inputs[0])
            key = None if matmul is None else _key(matmul.inputs[1])
            if query is None or key is None:
                break
            parts.append((query, key))
        if len(parts) != 2:
            continue
        (q_a, s_a), (ka, ka4) = parts[0]
        (q_b, s_b), (kb, kb4) = parts[1]
        if s_a != s_b:
            continue
        # the values: y = Reshape(MatMul(Reshape(p, [0, 1, -1, 0]), kv), [0, H, -1, 0]), kv the latent part
        flat = only_use(softmax.outputs[0], "Reshape", index=0)
        if flat is None or _reshaped(flat.outputs[0], [0, 1, -1, 0]) is not softmax.outputs[0]:
            continue
        values = only_use(flat.outputs[0], "MatMul", index=0)
        if values is None:
            continue
        latent = [(q, k) for (q, k, k4) in ((q_a, ka, ka4), (q_b, kb, kb4)) if values.inputs[1] is k4]
        rope = [(q, k) for (q, k, k4) in ((q_a, ka, ka4), (q_b, kb, kb4)) if values.inputs[1] is not k4]
        if len(latent) != 1 or len(rope) != 1:
            continue
        out = only_use(values.outputs[0], "Reshape", index=0)
        if out is None or _reshaped(out.outputs[0], [0, H, -1, 0]) is not values.outputs[0]:
            continue
        (q_latent, kv_latent), (q_rope, k_rope) = latent[0], rope[0]
        if any(v.dtype != ir.DataType.FLOAT for v in (q_latent, q_rope, kv_latent, k_rope, mask)):
            continue
        if q_latent.shape is None or len(q_latent.shape) != 4 or q_latent.shape[1] != H:
            continue
        return [q_latent, q_rope, kv_latent, k_rope, mask], s_a, out
    return None


def run(model: ir.Model) -> int:
    """Rewrite every matched attention of `model` (a decode graph); returns how many."""
    graph = model.graph
    count = 0
    for softmax in [n for n in graph if n.op_type == "Softmax" and n.domain == ""]:
        match = _match(softmax)
        if match is None:
            continue
        inputs, scale, last = match
        node = ir.node(OP, inputs, domain=NATIVE_DOMAIN, attributes={"scale": scale},
                       name=f"{last.name}.latent_attention" if last.name else None)
        replace_node(graph, last, node)
        count += 1
    if count:
        ir_passes.RemoveUnusedNodesPass()(model)
        model.opset_imports.setdefault(NATIVE_DOMAIN, 1)
    log.info("fuse_attention: %d attentions as %s", count, OP)
    return count
