"""Lowering one optimized ExportedProgram to an ONNX graph.

`lower(ep, phase, num_layers, ...)` runs `torch.onnx.export` (dynamo) with the `dsc` op
translations of `lowering/ops.py` and the contract's IO names, then optimizes and tidies the
graph so that it is reproducible and readable:
- weights stay where they are: an ExportedProgram captured on the meta device (what export does)
  lowers to initializers that are `ir.LazyTensor`s reading each weight when it is written, and
  the constant subgraphs over large weights (Transpose of a linear's weight, the interleaving of
  gate and up experts) fold into lazy initializers too (`lowering/weights.py`, `fold_weights`).
  The onnxscript optimizer only folds small constants (it would compute and hold every large
  folded weight in memory at once); a program with weights in memory lowers through the same
  steps to the same graph and values (tests/lowering/test_streaming.py);
- dynamic dims get the contract's names (batch, seq, past; "past + seq" for the total length)
  instead of torch's generated ones (s26, s70);
- node metadata (`pkg.torch.onnx.stack_trace` records the caller's path and line) and doc
  strings are cleared, so two exports are byte-identical;
- the fc1 weights of `com.microsoft.MoE` nodes are named after their layer's experts.

`check_model` runs the ONNX checker with full_check (strict shape inference included) by path, so
models above 2 GB work.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import onnxscript.optimizer
import onnxscript.rewriter.onnx_fusions
import torch
from torch.export import ExportedProgram

from dscompile.errors import DscompileError, first_line
from dscompile.lowering import LoweringError, fuse_rope, static_reshapes
from dscompile.lowering.ops import MSFT_DOMAIN, translation_table
from dscompile.lowering.weights import FOLD_LIMIT, defer_weights, fold_weights, small_only, values_hidden
from dscompile.runtime.contract import INPUT_IDS, PAST, cache_name, io_names


_SYMBOL = re.compile(r"\bs\d+\b")


def lower(ep: ExportedProgram, phase: str, num_layers: int, *, opset: int = 23,
          moe_experts: str = "moe_op") -> ir.Model:
    """ONNX model (onnx_ir, weights in memory) of one captured + optimized graph."""
    inputs, outputs = io_names(num_layers)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ep, (), None, dynamo=True, opset_version=opset, external_data=True, optimize=False,
                custom_translation_table=translation_table(moe_experts),
                input_names=inputs, output_names=outputs, verbose=False,
            )
            model = program.model
            defer_weights(model)
            with values_hidden(model):
                # What ONNXProgram.optimize does, with large constants left to fold_weights.
                onnxscript.optimizer.optimize_ir(model, should_fold=small_only, input_size_limit=FOLD_LIMIT - 1)
                onnxscript.rewriter.onnx_fusions.fuse(model)
                fuse_rope.run(model)
                static_reshapes.run(model)
    except Exception as err:  # torch.onnx wraps every failure in a multi-page report
        cause = _our_error(err)
        if cause is not None:  # a weight read while folding (a checkpoint changed under us): say that
            raise cause from None
        first = first_line(err)
        raise LoweringError(f"{phase} graph: torch.onnx.export failed: {first}") from err
    _check_io(model, inputs, outputs, phase)
    rename_dims(model)
    ir_passes.ClearMetadataAndDocStringPass()(model)
    model.doc_string = None
    model.metadata_props.clear()
    fold_weights(model)
    name_moe_weights(model)
    ir_passes.RemoveUnusedNodesPass()(model)
    return model


def _our_error(err: BaseException) -> DscompileError | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DscompileError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _check_io(model: ir.Model, inputs: list[str], outputs: list[str], phase: str) -> None:
    got_in = [v.name for v in model.graph.inputs]
    got_out = [v.name for v in model.graph.outputs]
    if got_in != inputs or got_out != outputs:
        raise LoweringError(f"{phase} graph: ONNX IO names {got_in} -> {got_out} differ from the contract "
                            f"{inputs} -> {outputs}")


def rename_dims(model: ir.Model) -> dict[str, str]:
    """Name torch's generated symbols after the contract's dims, everywhere they appear."""
    graph = model.graph
    by_name = {v.name: v for v in graph.inputs}
    names: dict[str, str] = {}
    for value, axis, name in ((by_name[INPUT_IDS], 0, "batch"), (by_name[INPUT_IDS], 1, "seq"),
                              (by_name[cache_name(PAST, 0, "kv_latent")], 1, "past")):
        dim = value.shape[axis]
        if isinstance(dim, ir.SymbolicDim) and dim.value and _SYMBOL.fullmatch(dim.value):
            names[dim.value] = name

    def rename(dim):
        if isinstance(dim, ir.SymbolicDim) and dim.value:
            return ir.SymbolicDim(_SYMBOL.sub(lambda m: names.get(m.group(0), m.group(0)), dim.value))
        return dim

    values = list(graph.inputs) + list(graph.outputs)
    for node in graph.all_nodes():
        values.extend(node.outputs)
    for value in values:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) for d in value.shape):
            value.shape = ir.Shape([rename(d) for d in value.shape])
    return names


def name_moe_weights(model: ir.Model) -> int:
    """Name each com.microsoft.MoE's gate/up-interleaved fc1 [E, 2I, D] after its layer's experts.

    The translation emits fc1 = Reshape(Concat(Unsqueeze(w1, 2), Unsqueeze(w3, 2), axis=2));
    fold_weights has made that one constant. The name makes the weight file readable; prefill and
    decode share the bytes either way.
    """
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.domain != MSFT_DOMAIN or node.op_type != "MoE":
            continue
        fc1, fc2 = node.inputs[2], node.inputs[4]
        if fc1.const_value is None or not fc1.is_initializer():
            raise LoweringError(f"MoE node {node.name}: fc1 is not computed from expert weight initializers "
                                f"({fc1.producer().op_type if fc1.producer() is not None else 'a graph input'} in the way)")
        prefix = fc2.name.rsplit(".", 1)[0] if fc2 is not None and fc2.name else f"moe{count}"
        name = f"{prefix}.gate_up_interleaved"
        if fc1.name != name and name not in graph.initializers and len(fc1.uses()) == 1:
            fc1.name = name  # onnx_ir renames the initializer entry with it
        count += 1
    return count


def check_model(path: str | Path, *, with_data: bool = True) -> None:
    """ONNX checker with full_check (strict shape inference) by path: works above 2 GB.

    Without `with_data` (a graph-only export: the external data file was never written, and the
    checker looks for it) the graph is checked in memory with each external initializer turned
    into a graph input of the same type and shape: the same nodes and shapes are checked.
    """
    try:
        if with_data:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            model = onnx.load(str(path), load_external_data=False)
            graph = model.graph
            for tensor in [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]:
                graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
                graph.initializer.remove(tensor)
            onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = first_line(err)
        raise LoweringError(f"{path}: fails the ONNX checker: {first}") from err
