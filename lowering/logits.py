"""`logits_from`: an optional graph input that limits the logits to the last new tokens.

A generation step reads the logits of its last new token only, yet the contract's graphs return
[B, S, V]: a prefill of S tokens runs the final norm and the lm_head S times. On the bench model
(vocabulary 32000, hidden 2048) that is 17 GFLOP of a 128-token prefill's ~100; feeding `logits_from`
cut the int4 engine's prefill by 7% (1953 against 2096 ms, alternated, on 2 busy cores). llama.cpp
computes the last token's logits only unless asked for more.

`add_logits_from` gives a lowered graph one more input, `logits_from` (int64 [1]), stored with a
default value of 0 as an initializer of the same name: ONNX Runtime then treats it as an input a
caller may feed or leave out (an "overridable initializer"; `session.get_inputs()` does not list
it, so the contract's inputs are unchanged, and a caller that does not feed it gets every new
token's logits). Fed with S - 1, the graph slices the final hidden states to the last token before
the final norm: logits [B, 1, V]. The norm is per token, so the rows it returns are the rows the
full graph returns.

Exports for ONNX Runtime on CPU get it (exporter/export.py): how ONNX Runtime's TensorRT provider
would profile such an input is unchecked without a GPU, so exports for CUDA keep the contract's
inputs only for now.

What it matches: the graph output `logits`, produced (through Casts) by a MatMul, Gemm,
com.microsoft.MatMulNBits or ai.dscompile.MatMulQ4/Q8 whose first input is the output of one RMSNormalization used by that
node alone. A graph of another form is left as it is (returns False), and its engine slices the
logits after the step instead.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dscompile.lowering._ir import int64_initializer
from dscompile.lowering.encodings import NATIVE_LINEAR_OPS
from dscompile.runtime.native import DOMAIN as NATIVE_DOMAIN
from dscompile.runtime.contract import LOGITS, LOGITS_FROM

_HEADS = {("", "MatMul"), ("", "Gemm"), ("com.microsoft", "MatMulNBits"),
          *((NATIVE_DOMAIN, op) for op in NATIVE_LINEAR_OPS)}


def add_logits_from(model: ir.Model) -> bool:
    """Add the optional `logits_from` input to `model` (in place); False where the graph's form is not
    the one matched (module docstring) and nothing changed."""
    graph = model.graph
    if any(v.name == LOGITS_FROM for v in graph.inputs):
        return True
    out = next((v for v in graph.outputs if v.name == LOGITS), None)
    node = out.producer() if out is not None else None
    while node is not None and node.op_type == "Cast" and not node.domain:
        node = node.inputs[0].producer()
    if node is None or (node.domain, node.op_type) not in _HEADS:
        return False
    normed = node.inputs[0]
    norm = normed.producer()
    if norm is None or norm.op_type != "RMSNormalization" or len(normed.uses()) != 1:
        return False
    hidden = norm.inputs[0]
    start = ir.Value(name=LOGITS_FROM, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]),
                     const_value=ir.tensor(np.array([0], dtype=np.int64), name=LOGITS_FROM))
    graph.inputs.append(start)
    graph.register_initializer(start)
    end = int64_initializer(graph, f"{LOGITS_FROM}.end", [np.iinfo(np.int64).max])
    axis = int64_initializer(graph, f"{LOGITS_FROM}.axis", [1])
    cut = ir.node("Slice", [hidden, start, end, axis], name=f"{LOGITS_FROM}.slice")
    graph.insert_before(norm, cut)
    sliced = cut.outputs[0]
    sliced.name, sliced.type = f"{hidden.name}.{LOGITS_FROM}", hidden.type
    if hidden.shape is not None and len(hidden.shape) == 3:
        sliced.shape = ir.Shape([hidden.shape[0], "logits_tokens", hidden.shape[2]])
    norm.replace_input_with(0, sliced)
    value = normed
    while True:  # the values from the norm to the output now hold the sliced tokens
        if value.shape is not None and len(value.shape) == 3:
            value.shape = ir.Shape([value.shape[0], "logits_tokens", value.shape[2]])
        if value is out:
            return True
        value = next(n for n, _ in value.uses()).outputs[0]
