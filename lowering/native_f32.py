"""A float32 engine's decode graph onto dscompile's native kernels (`export --native-kernels` without `--weights`).

A decode step multiplies a few token rows by every weight once: its time is the weights' bytes over the
read bandwidth, and ONNX Runtime's float32 MatMul, Gemm and MoE read them more slowly than the machine
allows (README, "Measured"). This pass rewrites the decode graph (the in-place graph is derived from it)
to runtime/native's float32 kernels, which read the SAME initializers (names and weights unchanged), so
weights.bin still holds one copy, shared with the prefill graph, which keeps ONNX Runtime's kernels
(its GEMMs of many tokens are compute-bound, where MLAS is strong):

- `MatMul(x, w)` over a 2-D float32 weight [K, N] (torch's linear, folded transposed) -> `MatMulF32`;
- `Gemm(x, w, transB=1)` over a 2-D float32 weight [N, K], no bias, alpha 1 -> `LinearF32`;
- `com.microsoft.MoE` as lowering/ops.py writes it (swiglu, gate/up interleaved, routing weights taken
  as given, no biases) -> `MoEF32` with the same inputs and `k`.
Anything else (the absorbed per-head weights' batched MatMuls, attention's products) is left as it is.
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from dscompile.lowering.ops import MSFT_DOMAIN
from dscompile.lowering._ir import replace_node
from dscompile.lowering.quantize import _weight
from dscompile.runtime.native import DOMAIN as NATIVE_DOMAIN

OPS = ("LinearF32", "MatMulF32", "MoEF32")
# com.microsoft.MoE attributes MoEF32 computes (any other value leaves the node to ONNX Runtime).
MOE_ATTRIBUTES = {"activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0,
                  "normalize_routing_weights": 0}


def _float_matrix(value: ir.Value | None) -> bool:
    w = _weight(value)
    return w is not None and w.dim() == 2 and w.dtype == torch.float32


def native_float32(model: ir.Model) -> dict[str, int]:
    """Rewrite `model`'s graph in place; returns the count of each op written."""
    graph = model.graph
    counts = dict.fromkeys(OPS, 0)
    for node in list(graph):
        attrs = {k: a.value for k, a in node.attributes.items()}
        if not node.domain and node.op_type == "MatMul" and _float_matrix(node.inputs[1]):
            op, inputs, out_attrs = "MatMulF32", list(node.inputs), {}
        elif (not node.domain and node.op_type == "Gemm" and len(node.inputs) == 2 and _float_matrix(node.inputs[1])
              and attrs.get("transB", 0) == 1 and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0):
            op, inputs, out_attrs = "LinearF32", list(node.inputs), {}
        elif node.domain == MSFT_DOMAIN and node.op_type == "MoE" and _moe_matches(node, attrs):
            op, inputs, out_attrs = "MoEF32", [node.inputs[0], node.inputs[1], node.inputs[2], node.inputs[4]], \
                {"k": attrs["k"]}
        else:
            continue
        new = ir.node(op, inputs, domain=NATIVE_DOMAIN, attributes=out_attrs,
                      name=f"{node.name}.f32" if node.name else None)
        replace_node(graph, node, new)
        counts[op] += 1
    if any(counts.values()):
        model.opset_imports.setdefault(NATIVE_DOMAIN, 1)
    return counts


def _moe_matches(node: ir.Node, attrs: dict) -> bool:
    """Whether MoEF32 computes what this com.microsoft.MoE does: its attributes, no biases, float32 stacks
    fc1 [E, 2I, D] and fc2 [E, D, I]."""
    inputs = list(node.inputs) + [None] * 5
    if any(attrs.get(k, v) != v for k, v in MOE_ATTRIBUTES.items()) or "k" not in attrs:
        return False
    if inputs[3] is not None or any(v is not None for v in inputs[5:]):
        return False
    w1, w2 = _weight(inputs[2]), _weight(inputs[4])
    return (w1 is not None and w2 is not None and w1.dim() == 3 and w2.dim() == 3 and
            w1.dtype == w2.dtype == torch.float32 and w1.shape[1] == 2 * w2.shape[2] and w1.shape[2] == w2.shape[1])
