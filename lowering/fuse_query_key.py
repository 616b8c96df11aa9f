"""MLA's attention inputs in a decode graph as two native nodes a layer (runtime/native/rope.cc).

Between its projections and the attention, a layer of the lowered graph (after lowering/fuse_rope.py) computes

    query: view = Reshape(q, [0, 0, H, N + R]);  nope, rope = Split(view, [N, R], axis=3)
           q_nope = Transpose(nope, [0, 2, 1, 3])
           q_rope = Transpose(Reshape(RotaryEmbedding(Reshape(Gather(rope, D, axis=3), [0, 0, H*R]), cos, sin,
                                                      num_heads=H), [0, 0, H, R]), [0, 2, 1, 3])
    key:   latent, rope = Split(kv, [C, R], axis=2)
           kv_latent = RMSNormalization(latent, scale);  k_rope = RotaryEmbedding(Gather(rope, D, axis=2), cos, sin)

with D the de-interleaving permutation [0, 2, ..., R-2, 1, 3, ..., R-1] where the checkpoint's rotary pairs
are interleaved (no Gather where they are halves). Each query match becomes
`QueryRope(q, cos, sin; heads, nope, interleaved) -> (q_nope, q_rope)`, eight nodes in one, and each key match
`LatentKey(kv, scale, cos, sin; epsilon, interleaved) -> (kv_latent, k_rope)`, four in one: the same values
(rope.cc says how they are computed). Only the decode graphs of `--native-kernels` exports are rewritten
(float32 activations, the step whose small nodes cost what its few rows of work do not). Matched only
where every piece is as written above and every intermediate value has no other use; anything else is
left as it is.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from dscompile.lowering._ir import attribute, constant_ints as _ints, hand_over, only_use, producer
from dscompile.lowering.fuse_rope import deinterleaving
from dscompile.runtime.native import DOMAIN as NATIVE_DOMAIN

log = logging.getLogger(__name__)

OPS = ("QueryRope", "LatentKey")
_HEADS_FIRST = [0, 2, 1, 3]


def _single(value: ir.Value) -> bool:
    """Whether `value` has exactly one use and is not a graph output."""
    return len(list(value.uses())) == 1 and not value.is_graph_output()


def _split(value: ir.Value, sizes: int, axis: int) -> ir.Node | None:
    """The Split of two outputs along `axis` (of a rank `axis + 1` input) that makes `value`, with sizes given."""
    node = producer(value, "Split")
    if node is None or len(node.outputs) != 2 or len(node.inputs) != 2:
        return None
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    if rank != axis + 1 or attribute(node, "axis", 0) not in (axis, -1):
        return None
    got = _ints(node.inputs[1])
    return node if got is not None and len(got) == sizes else None


def _deinterleaved(value: ir.Value, axis: int) -> tuple[ir.Value, ir.Node | None] | None:
    """(x, the Gather) where `value` = Gather(x, D, axis) with D the de-interleaving permutation of x's last axis
    (and `value` has no other use); (value, None) where no Gather makes it; None for any other Gather."""
    gather = producer(value, "Gather")
    if gather is None:
        return value, None
    R = gather.inputs[0].shape[-1] if gather.inputs[0].shape is not None else None
    if not isinstance(R, int) or attribute(gather, "axis", 0) not in (axis, -1) \
            or _ints(gather.inputs[1]) != deinterleaving(R) or not _single(value):
        return None
    return gather.inputs[0], gather


def _plain(rotary: ir.Node) -> bool:
    """Whether `rotary` rotates all of its input's last axis by given cos/sin (interleaved=0, no position ids)."""
    return len(rotary.inputs) == 3 and not attribute(rotary, "interleaved", 0) \
        and not attribute(rotary, "rotary_embedding_dim", 0)


def _angles(rotary: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    cos, sin = rotary.inputs[1], rotary.inputs[2]
    ok = all(v is not None and v.shape is not None and len(v.shape) == 3 for v in (cos, sin))
    return (cos, sin) if ok else None


def _perm(node: ir.Node) -> list[int] | None:
    perm = attribute(node, "perm")
    return None if perm is None else [int(p) for p in perm]


def _query(rotary: ir.Node) -> tuple[list[ir.Value], dict, list[ir.Value], list[ir.Node]] | None:
    """QueryRope's (inputs, attributes, the values it makes, the nodes it replaces) for a query's rotation."""
    H = int(attribute(rotary, "num_heads", 0))
    flat = producer(rotary.inputs[0], "Reshape")
    angles = _angles(rotary)
    if not _plain(rotary) or flat is None or angles is None or not _single(rotary.inputs[0]):
        return None
    found = _deinterleaved(flat.inputs[0], 3)
    if found is None:
        return None
    rope, gather = found
    split = _split(rope, 2, 3)
    if split is None or split.outputs[1] is not rope:
        return None
    N, R = _ints(split.inputs[1])
    view = producer(split.inputs[0], "Reshape")
    q = view.inputs[0] if view is not None else None
    if q is None or q.shape is None or len(q.shape) != 3 or _ints(view.inputs[1]) != [0, 0, H, N + R] \
            or _ints(flat.inputs[1]) != [0, 0, H * R] or attribute(view, "allowzero", 0) \
            or attribute(flat, "allowzero", 0) or not _single(split.inputs[0]):
        return None
    back = only_use(rotary.outputs[0], "Reshape", 0)
    if back is None or _ints(back.inputs[1]) != [0, 0, H, R] or attribute(back, "allowzero", 0):
        return None
    t_rope = only_use(back.outputs[0], "Transpose")
    nope = split.outputs[0]
    t_nope = only_use(nope, "Transpose")
    if t_rope is None or t_nope is None or not _single(rope) or not _single(rotary.outputs[0]) \
            or not _single(back.outputs[0]) or any(_perm(t) != _HEADS_FIRST for t in (t_rope, t_nope)):
        return None
    nodes = [view, split, flat, rotary, back, t_rope, t_nope] + ([gather] if gather is not None else [])
    attrs = {"heads": H, "nope": N, "interleaved": int(gather is not None)}
    return [q, *angles], attrs, [t_nope.outputs[0], t_rope.outputs[0]], nodes


def _key(rotary: ir.Node) -> tuple[list[ir.Value], dict, list[ir.Value], list[ir.Node]] | None:
    """LatentKey's (inputs, attributes, the values it makes, the nodes it replaces) for the shared key's rotation."""
    angles = _angles(rotary)
    found = _deinterleaved(rotary.inputs[0], 2) if _plain(rotary) else None
    if angles is None or found is None or attribute(rotary, "num_heads", 0) not in (0, 1):
        return None
    rope, gather = found
    split = _split(rope, 2, 2)
    if split is None or split.outputs[1] is not rope or not _single(rope):
        return None
    C, R = _ints(split.inputs[1])
    latent = split.outputs[0]
    norm = only_use(latent, "RMSNormalization", 0)
    if norm is None or len(norm.inputs) != 2 or attribute(norm, "axis", -1) not in (-1, 2) \
            or attribute(norm, "stash_type", 1) != 1 or not _single(latent):
        return None
    scale = norm.inputs[1]
    if scale is None or scale.shape is None or list(scale.shape) != [C] or rope.shape is None or rope.shape[-1] != R:
        return None
    nodes = [split, norm, rotary] + ([gather] if gather is not None else [])
    attrs = {"epsilon": float(attribute(norm, "epsilon", 1e-5)), "interleaved": int(gather is not None)}
    return [split.inputs[0], scale, *angles], attrs, [norm.outputs[0], rotary.outputs[0]], nodes


def _replace(graph: ir.Graph, op: str, inputs: list[ir.Value], attrs: dict, outputs: list[ir.Value],
             nodes: list[ir.Node]) -> None:
    """One `op` node making `outputs` (their uses, names, shapes and types) from `inputs`; `nodes` go."""
    new = ir.node(op, inputs, domain=NATIVE_DOMAIN, attributes=attrs, num_outputs=len(outputs),
                  name=f"{nodes[0].name}.{op}" if nodes[0].name else None)
    graph.insert_before(nodes[0], new)
    for old, got in zip(outputs, new.outputs):
        got.shape, got.type = old.shape, old.type
        hand_over(old, got)


def run(model: ir.Model) -> dict[str, int]:
    """Rewrite every matched query and key of `model` (a decode graph); returns the count of each op."""
    graph = model.graph
    counts = dict.fromkeys(OPS, 0)
    for rotary in [n for n in graph if n.op_type == "RotaryEmbedding" and n.domain == ""]:
        if attribute(rotary, "num_heads", 0) > 1:
            match, op = _query(rotary), "QueryRope"
        else:
            match, op = _key(rotary), "LatentKey"
        if match is None:
            continue
        _replace(graph, op, *match)
        counts[op] += 1
    if any(counts.values()):
        ir_passes.RemoveUnusedNodesPass()(model)
        graph.sort()
        model.opset_imports.setdefault(NATIVE_DOMAIN, 1)
    log.info("fuse_query_key: %d queries as QueryRope, %d keys as LatentKey", counts["QueryRope"], counts["LatentKey"])
    return counts
