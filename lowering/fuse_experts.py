"""Each DeepSeekMoE layer's native experts as one `ExpertsQ4`/`ExpertsQ8` node (runtime/native/moe.cc).

After lowering/quantize.py has put a layer's routed experts on `MoEQ4`/`MoEQ8` and its shared experts
on `MatMulQ4`/`MatMulQ8`, the layer's experts are, as lowering/ops.py writes them:

    router = ScatterElements(Expand(NOT_CHOSEN, [T, E]), idx, Log(weights), axis=1)  # QMoE's dense input
    routed = Mul(MoEQb(x2d, router, fc1, fc1_scales, fc2, fc2_scales), ReduceSum(weights, -1, keepdims=1))
    g, u = MatMulQb(x2d, gate), MatMulQb(x2d, up)
    out = Add(routed, MatMulQb(Mul(Mul(g, Sigmoid(g)), u), down))

MoEQb's softmax over the chosen log weights, times their sum, is the weights themselves, so the layer is
one `ExpertsQb(x2d, weights, idx, fc1, fc1_scales, fc2, fc2_scales, gate, ..., down_scales)`: TopK's
choice taken as given and the shared MLP in the same op (one more task of the decode step's parallel
loop). Fifteen nodes per layer become one; the weights are the same initializers. A layer without shared
experts, or whose shared MLP does not match (other bits, ONNX Runtime's kernels), keeps the router-only
part of the rewrite (shared_I = 0) where that matches, and everything where it does not.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from dscompile.lowering._ir import attribute, constant_array, constant_ints as _ints, only_use, producer, replace_node
from dscompile.lowering.encodings import EXPERT_BITS
from dscompile.lowering.ops import NOT_CHOSEN
from dscompile.runtime.native import DOMAIN as NATIVE_DOMAIN

log = logging.getLogger(__name__)

OPS = tuple(f"ExpertsQ{bits}" for bits in EXPERT_BITS)
# The key of a graph's quantized-op counts (manifest "quantized_ops") that counts the shared MLPs the
# ExpertsQ4/Q8 nodes hold: three quantized products each (verify/compare.py's bound counts them).
SHARED_MLPS = "shared_mlps_in_experts_q"


def _producer(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    """The node of `op_type` (in `domain`) that makes `value`, where it does and `value` has no other use."""
    node = producer(value, op_type, domain)
    return node if node is not None and len(value.uses()) == 1 and not value.is_graph_output() else None


def _only_use(value: ir.Value, op_type: str) -> ir.Node | None:
    """The one node of `op_type` (default domain) that uses `value`, where it has exactly one use."""
    return None if value.is_graph_output() else only_use(value, op_type)


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a two-input node that takes `value`."""
    a, b = node.inputs
    return b if a is value else a if b is value else None


def _routing(moe: ir.Node) -> tuple[ir.Value, ir.Value, ir.Node] | None:
    """(weights, idx, the Mul by Σweights whose output is the routed experts' sum) of a MoEQb node as
    lowering/ops.py writes its router, or None."""
    scatter = _producer(moe.inputs[1], "ScatterElements")
    if scatter is None or attribute(scatter, "axis") != 1 or attribute(scatter, "reduction", "none") != "none":
        return None
    # everything but the chosen experts filled with NOT_CHOSEN, which MoEQb's softmax turns into 0
    fill = _producer(scatter.inputs[0], "Expand")
    value = None if fill is None else constant_array(fill.inputs[0])
    if value is None or value.size != 1 or float(value.reshape(-1)[0]) > NOT_CHOSEN:
        return None
    log_node = _producer(scatter.inputs[2], "Log")
    if log_node is None:
        return None
    weights, idx = log_node.inputs[0], scatter.inputs[1]
    mul = _only_use(moe.outputs[0], "Mul")
    if mul is None:
        return None
    total = _producer(_other(mul, moe.outputs[0]), "ReduceSum")
    if (total is None or total.inputs[0] is not weights or _ints(total.inputs[1]) not in ([-1], [1])
            or attribute(total, "keepdims", 1) != 1):
        return None
    return weights, idx, mul


def _shared(routed: ir.Node, x2d: ir.Value, op: str) -> tuple[ir.Node, list[ir.Value], int] | None:
    """(the Add of the shared MLP, its gate/up/down panels and scales, its width) after `routed`, where the
    shared MLP is three `op` (MatMulQb) nodes over x2d as lowering/ops.py's _shared writes it, or None."""
    add = _only_use(routed.outputs[0], "Add")
    if add is None:
        return None
    down = _producer(_other(add, routed.outputs[0]), op, NATIVE_DOMAIN)
    product = None if down is None else _producer(down.inputs[0], "Mul")
    if product is None:
        return None
    for silu_out, u in ((product.inputs[0], product.inputs[1]), (product.inputs[1], product.inputs[0])):
        silu = _producer(silu_out, "Mul")
        up = _producer(u, op, NATIVE_DOMAIN)
        if silu is None or up is None:
            continue
        g = silu.inputs[0] if _producer(silu.inputs[1], "Sigmoid") is not None else silu.inputs[1]
        sigmoid = _producer(_other(silu, g), "Sigmoid")
        gate = None if g is None else g.producer()
        if (sigmoid is None or sigmoid.inputs[0] is not g or gate is None or gate.op_type != op
                or gate.domain != NATIVE_DOMAIN or len(g.uses()) != 2 or up.inputs[0] is not x2d
                or gate.inputs[0] is not x2d):
            continue
        width = attribute(gate, "N")
        if width != attribute(up, "N") or width != attribute(down, "K"):
            continue
        return add, [*gate.inputs[1:], *up.inputs[1:], *down.inputs[1:]], int(width)
    return None


def run(model: ir.Model) -> dict[str, int]:
    """Rewrite every matched MoEQ4/MoEQ8 layer; returns the count of each ExpertsQ op written, and how many
    took the shared MLP in (SHARED_MLPS)."""
    graph = model.graph
    counts = dict.fromkeys(OPS, 0) | {SHARED_MLPS: 0}
    for moe in [n for n in graph if n.domain == NATIVE_DOMAIN and n.op_type in ("MoEQ4", "MoEQ8")]:
        routing = _routing(moe)
        if routing is None:
            continue
        weights, idx, routed = routing
        bits = int(moe.op_type[-1])
        x2d = moe.inputs[0]
        shared = _shared(routed, x2d, f"MatMulQ{bits}")
        last, extra, width = shared if shared is not None else (routed, [], 0)
        op = f"ExpertsQ{bits}"
        new = ir.node(op, [x2d, weights, idx, *moe.inputs[2:6], *extra], domain=NATIVE_DOMAIN,
                      attributes={"I": attribute(moe, "I"), "shared_I": width},
                      name=moe.name.replace(f".q{bits}", f".experts_q{bits}") if moe.name else None)
        replace_node(graph, last, new)
        counts[op] += 1
        counts[SHARED_MLPS] += bool(extra)
    if any(counts[op] for op in OPS):
        ir_passes.RemoveUnusedNodesPass()(model)
    log.info("fuse_experts: %s", counts)
    return counts
