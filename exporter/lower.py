"""Lowering of optimized ExportedPrograms to ONNX, and the writing of both graphs into OUT.

`lower(ep, phase, num_layers, ...)` runs `torch.onnx.export` (dynamo) with the `dsc` op
translations of `exporter/onnx_ops.py` and the public IO names, then makes the model
reproducible and readable:
- dynamic dims get the contract's names (batch, seq, past; "past + seq" for the total length)
  instead of torch's generated ones (s26, s70);
- node metadata (`pkg.torch.onnx.stack_trace` records the caller's path and line) and doc
  strings are cleared, so two exports are byte-identical;
- the fc1 weights of `com.microsoft.MoE` nodes become one new interleaved initializer per layer.

`save_models` writes several graphs with ONE shared external data file: initializers with the
same content are stored once (prefill and decode read the same weights), offsets are
4096-aligned (ONNX Runtime can memory-map them). `check_model` runs the ONNX checker with
full_check (strict shape inference included) by path, so models above 2 GB work.

Shape legend: B batch, S new tokens, P past tokens, E experts, I expert intermediate, D hidden.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import torch
from torch.export import ExportedProgram

from exporter.capture import io_names
from exporter.onnx_ops import MSFT_DOMAIN, translation_table
from runtime.errors import DscompileError

ALIGNMENT = 4096  # page size: ONNX Runtime memory-maps external data at page-aligned offsets
INLINE_BELOW = 1024  # bytes; smaller tensors stay inside the .onnx (shape constants, norms of tiny configs)
_SYMBOL = re.compile(r"\bs\d+\b")


class LoweringError(DscompileError):
    """A graph could not be translated to ONNX or the result fails the ONNX checker."""


def lower(ep: ExportedProgram, phase: str, num_layers: int, *, opset: int = 23,
          moe_experts: str = "moe_op", debug: bool = False) -> ir.Model:
    """ONNX model (onnx_ir, weights in memory) of one captured + optimized graph.

    `debug` graphs (captured with per-layer hidden states) also output `hidden.{i}`.
    """
    inputs, outputs = io_names(num_layers, debug)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ep, (), None, dynamo=True, opset_version=opset, external_data=True,
                custom_translation_table=translation_table(moe_experts),
                input_names=inputs, output_names=outputs, verbose=False,
            )
    except Exception as err:  # torch.onnx wraps every failure in a multi-page report
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoweringError(f"{phase} graph: torch.onnx.export failed: {first}") from err
    model = program.model
    _check_io(model, inputs, outputs, phase)
    rename_dims(model)
    ir_passes.ClearMetadataAndDocStringPass()(model)
    model.doc_string = None
    model.metadata_props.clear()
    fold_moe_weights(model)
    ir_passes.RemoveUnusedNodesPass()(model)
    return model


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
    for value, axis, name in ((by_name["input_ids"], 0, "batch"), (by_name["input_ids"], 1, "seq"),
                              (by_name["past.0.kv_latent"], 1, "past")):
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


def fold_moe_weights(model: ir.Model) -> int:
    """Give each com.microsoft.MoE its gate/up-interleaved fc1 [E, 2I, D] as one initializer.

    The translation emits fc1 = Reshape(Concat(Unsqueeze(w1, 2), Unsqueeze(w3, 2), axis=2)); the
    onnxscript optimizer folds all, part or none of that depending on the weights' size. Whatever
    is left is evaluated here, so fc1 is always one constant, named after the layer's experts so
    that prefill and decode share it in the weight file.
    """
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.domain != MSFT_DOMAIN or node.op_type != "MoE":
            continue
        fc1, fc2 = node.inputs[2], node.inputs[4]
        prefix = fc2.name.rsplit(".", 1)[0] if fc2 is not None and fc2.name else f"moe{count}"
        name = f"{prefix}.gate_up_interleaved"
        array = _evaluate_constant(fc1, node)  # [E, 2I, D]
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape.numpy()), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        graph.register_initializer(value)
        node.replace_input_with(2, value)
        count += 1
    return count


def _evaluate_constant(value: ir.Value, node: ir.Node) -> np.ndarray:
    """The array behind `value`: a constant, or Unsqueeze/Concat/Reshape of constants."""
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is None or producer.op_type not in ("Unsqueeze", "Concat", "Reshape"):
        raise LoweringError(f"MoE node {node.name}: fc1 is not computed from expert weight initializers "
                            f"({producer.op_type if producer is not None else 'a graph input'} in the way)")
    inputs = [_evaluate_constant(v, node) for v in producer.inputs]
    if producer.op_type == "Unsqueeze":
        return np.expand_dims(inputs[0], tuple(int(a) for a in inputs[1]))
    if producer.op_type == "Concat":
        return np.concatenate(inputs, axis=producer.attributes["axis"].as_int())
    shape = [inputs[0].shape[i] if int(d) == 0 else int(d) for i, d in enumerate(inputs[1])]  # Reshape: 0 keeps a dim
    return inputs[0].reshape(shape)


# ---------------------------------------------------------------- writing


def save_models(models: dict[str, ir.Model], out_dir: str | Path, weights_file: str = "weights.bin",
                progress: Callable[[int, int], None] | None = None) -> dict[str, dict]:
    """Write `{name}.onnx` per model and one shared `weights_file`; returns what was stored.

    An initializer whose bytes were already written (by this graph or another) is referenced,
    not written again: prefill and decode share their weights whatever their initializer names
    (torch.onnx names folded constants `val_N`, per graph).
    Returns {"weights": {"file", "bytes", "tensors", "shared_tensors", "shared_bytes"}, graph: {"file"}}.
    """
    out_dir = Path(out_dir)
    written: dict[tuple[str, int], int] = {}  # (sha256, length) -> offset
    todo = [v for m in models.values() for v in m.graph.initializers.values()]
    shared = shared_bytes = 0
    with open(out_dir / weights_file, "wb") as f:
        for done, value in enumerate(todo, 1):
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < INLINE_BELOW:
                continue
            data = tensor.tobytes()
            key = (hashlib.sha256(data).hexdigest(), len(data))
            if key in written:
                shared += 1
                shared_bytes += len(data)
            else:
                written[key] = f.tell() + (-f.tell() % ALIGNMENT)
                f.write(b"\0" * (written[key] - f.tell()))
                f.write(data)
            value.const_value = ir.ExternalTensor(weights_file, written[key], len(data), tensor.dtype,
                                                  shape=tensor.shape, name=value.name, base_dir=out_dir)
            if progress is not None:
                progress(done, len(todo))
        total = f.tell()
    result: dict[str, dict] = {"weights": {"file": weights_file, "bytes": total, "tensors": len(written),
                                           "shared_tensors": shared, "shared_bytes": shared_bytes}}
    for graph_name, model in models.items():
        path = out_dir / f"{graph_name}.onnx"
        ir.save(model, path)
        result[graph_name] = {"file": path.name}
    return result


def check_model(path: str | Path) -> None:
    """ONNX checker with full_check (strict shape inference) by path: works above 2 GB."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoweringError(f"{path}: fails the ONNX checker: {first}") from err
