"""The weights of lowered graphs: lazy initializers, weight folds, and the shared weights file.

Initializers backed by meta torch tensors become `_MetaWeight`s, computed when read; layout
changes and casts over large weights fold into such initializers (`fold_weights`), computed by
torch on demand.

`save_models` writes several graphs with ONE shared external data file, one tensor at a time (a
lazy weight is computed, written and dropped): initializers with the same content are stored once
(prefill and decode read the same weights), offsets are 4096-aligned (ONNX Runtime can
memory-map them). The ExportedPrograms' own weights can go into the same file (`extra`), so the
`.pt2` programs are saved without weights; a program weight that a graph stores in another layout
(folded transposed or interleaved by `fold_weights`) is not written again but placed as a strided
view of the graph's bytes (`stored_views`), so the file holds one copy of each weight. With
`write_data=False` only the graphs are written, referencing places planned in a data file that is
never computed (a graph-only export).

Shape legend: E experts, I expert intermediate, D hidden.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype, to_torch_dtype

from dscompile.lazy import Derived, derive, has_values, materialize


ALIGNMENT = 4096  # page size: ONNX Runtime memory-maps external data at page-aligned offsets


INLINE_BELOW = 1024  # bytes; smaller tensors stay inside the .onnx (shape constants, norms of tiny configs)


# Elements: the optimizer folds constants below this size (they stay inside the .onnx), fold_weights
# every node over a weight that goes to the weights file, so each such fold is known to the writer
# (which stores a layout once and lets the programs view it).
FOLD_LIMIT = INLINE_BELOW // 4


def small_only(node: ir.Node) -> bool | None:
    """The optimizer's folding rule: never a node reading a large constant (fold_weights does those),
    nor one reading a weight that has no values (a graph-only export's model is built from its
    config alone): the optimizer would compute it, fold_weights defers it like a large one."""
    for value in node.inputs:
        const = value.const_value if value is not None else None
        if const is None:
            continue
        if const.size >= FOLD_LIMIT or (isinstance(const, _MetaWeight) and not has_values(const.weight)):
            return False
    return None


@contextlib.contextmanager
def values_hidden(model: ir.Model) -> Iterator[None]:
    """The weights without values (a graph-only export's model is built from its config alone) are,
    while inside, initializers without a value: the optimizer reads every small initializer it has
    (to fold, to infer shapes, to merge equal ones), and these have nothing to read. It keeps them
    as they are; fold_weights folds their layout changes afterwards, as for large weights."""
    hidden = [(v, v.const_value) for v in model.graph.initializers.values()
              if isinstance(v.const_value, _MetaWeight) and not has_values(v.const_value.weight)]
    dedup = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = dedup.level
    for value, _ in hidden:
        value.const_value = None
    if hidden:
        dedup.setLevel(logging.ERROR)  # it warns once per initializer without a value
    try:
        yield
    finally:
        for value, tensor in hidden:
            value.const_value = tensor
        dedup.setLevel(level)


# Ops over weights that fold_weights computes (with torch): layout changes and casts.
_FOLDABLE = ("Transpose", "Reshape", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity")


def fold_weights(model: ir.Model) -> int:
    """Replace each foldable node over a large constant by a lazily computed initializer.

    A node qualifies when all its inputs are constants, one of them of FOLD_LIMIT elements or more, and
    its op is a layout change or a cast (`_FOLDABLE`). Its output becomes an initializer backed by a
    torch tensor from `dscompile.lazy.derive`: real when the inputs are real, meta (computed when
    written) when they are not. Chains fold in graph order. Returns the number of nodes folded.
    """
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.domain or node.op_type not in _FOLDABLE or len(node.outputs) != 1:
            continue
        if any(v is None or v.const_value is None for v in node.inputs) or small_only(node) is not False:
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        inputs = [_torch_value(v) for v in node.inputs]
        folded = derive(_TorchFold(node), *inputs)
        name = _unique_name(graph, f"{_weight_name(node.inputs)}.{node.op_type.lower()}")
        tensor = _MetaWeight(folded, name) if folded.is_meta else TorchTensor(folded, name=name)
        value = ir.Value(name=name, shape=ir.Shape(list(folded.shape)), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        graph.register_initializer(value)
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        count += 1
    return count


class _TorchFold:
    """One ONNX layout/cast node as a pure torch function (for derive: runs on meta or real tensors)."""

    def __init__(self, node: ir.Node):
        self.op = node.op_type
        self.attrs = {k: (a.as_ints() if a.type == ir.AttributeType.INTS else a.as_int())
                      for k, a in node.attributes.items() if a.type in (ir.AttributeType.INTS, ir.AttributeType.INT)}

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        x, op, attrs = xs[0], self.op, self.attrs
        if op == "Transpose":
            return x.permute(attrs.get("perm", list(range(x.dim()))[::-1])).contiguous()
        if op == "Reshape":
            shape = [int(d) for d in xs[1].tolist()]
            if not attrs.get("allowzero", 0):
                shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
            return x.reshape(shape).contiguous()
        if op == "Unsqueeze":
            axes = [int(a) for a in xs[1].reshape(-1).tolist()]
            rank = x.dim() + len(axes)
            for a in sorted(a % rank for a in axes):
                x = x.unsqueeze(a)
            return x
        if op == "Squeeze":
            axes = [int(a) for a in xs[1].reshape(-1).tolist()] if len(xs) > 1 else [i for i, d in enumerate(x.shape) if d == 1]
            return x.squeeze(tuple(a % x.dim() for a in axes))
        if op == "Concat":
            return torch.cat(xs, dim=attrs["axis"])
        if op == "Cast":
            return x.to(to_torch_dtype(ir.DataType(attrs["to"])))
        return x  # Identity

    def input_view(self, i: int, out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """Input `i` as a view of the output's values, or None when it is not one.

        `out` stands for the output (any tensor with its shape: a meta tensor with strides over the
        stored bytes gives the input's strides over them). A layout change only moves values, so
        each data input is a view of its output; a Cast makes new values, and the shape and axes
        inputs of Reshape/Unsqueeze/Squeeze are not data.
        """
        op, x = self.op, inputs[i]
        if op == "Cast" or (i > 0 and op != "Concat"):
            return None
        try:
            if op == "Transpose":
                perm = self.attrs.get("perm", list(range(x.dim()))[::-1])
                return out.permute([perm.index(d) for d in range(len(perm))])
            if op == "Concat":
                axis = self.attrs["axis"] % out.dim()
                start = sum(int(t.shape[axis]) for t in inputs[:i])
                return out.narrow(axis, start, int(x.shape[axis]))
            return out.view(x.shape)  # Reshape, Unsqueeze, Squeeze, Identity: the same values in order
        except RuntimeError:  # a reshape of a strided view that is no view
            return None


def stored_views(weight: torch.Tensor):
    """(tensor, view) for each tensor that `weight` was folded from by layout changes alone.

    `view` is a meta tensor over `weight`'s contiguous bytes (storage offset and strides in
    elements) holding that tensor's values: a program weight found here needs no bytes of its
    own in the weights file. Follows chains of folds (Unsqueeze, Concat, Reshape: the interleaved
    experts) down to the weights they started from.
    """
    todo = [(weight, torch.empty(weight.shape, dtype=weight.dtype, device="meta"))]
    while todo:
        tensor, view = todo.pop()
        source = getattr(tensor, "dsc_source", None)
        if not isinstance(source, Derived) or not isinstance(source.fn, _TorchFold):
            continue
        for i, x in enumerate(source.inputs):
            inner = source.fn.input_view(i, view, source.inputs)
            if inner is not None and inner.dtype == x.dtype and tuple(inner.shape) == tuple(x.shape):
                yield x, inner
                todo.append((x, inner))


def _torch_value(value: ir.Value) -> torch.Tensor:
    """The torch tensor behind a constant: the program's weight itself (meta or real), or a copy of a small one."""
    tensor = value.const_value
    if isinstance(tensor, _MetaWeight):
        return tensor.weight
    if isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, torch.Tensor):
        return tensor.raw
    return torch.from_numpy(tensor.numpy().copy())


def _weight_name(values) -> str:
    """The name of the largest input (the weight a folded constant is made from)."""
    big = max((v for v in values if v is not None), key=lambda v: v.const_value.size)
    return big.name or "weight"


def _unique_name(graph: ir.Graph, name: str) -> str:
    if name not in graph.initializers:
        return name
    i = 1
    while f"{name}.{i}" in graph.initializers:
        i += 1
    return f"{name}.{i}"


class _MetaWeight(ir.LazyTensor):
    """An initializer whose values are a meta torch tensor's: computed (materialize) when read."""

    def __init__(self, weight: torch.Tensor, name: str | None):
        super().__init__(lambda: TorchTensor(materialize(weight), name=name), dtype=from_torch_dtype(weight.dtype),
                         shape=ir.Shape(list(weight.shape)), name=name)
        self.weight = weight


def defer_weights(model: ir.Model) -> int:
    """Make every initializer backed by a meta torch tensor a `_MetaWeight` (values read on demand)."""
    count = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, torch.Tensor) and tensor.raw.is_meta:
            value.const_value = _MetaWeight(tensor.raw, value.name)
            count += 1
    return count


def save_models(models: dict[str, ir.Model], out_dir: str | Path, weights_file: str = "weights.bin",
                progress: Callable[[int, int], None] | None = None,
                extra: dict[str, dict[str, torch.Tensor]] | None = None, *,
                write_data: bool = True) -> dict[str, dict]:
    """Write `{name}.onnx` per model and one shared `weights_file`; returns what was stored.

    Tensors are written one at a time: a lazy one is computed, written and dropped, so writing
    needs the memory of the largest tensor, not of the model. An initializer whose bytes were
    already written (by this graph or another) is referenced, not written again: prefill and
    decode share their weights whatever their initializer names.

    `extra` adds named groups of torch tensors (the programs' weights) to the same file. A program
    weight that a graph stores in another layout (a linear's weight the graphs read transposed,
    the gate and up experts they read interleaved: folds of `fold_weights`) is not written again:
    its place is a strided view of the graph's bytes, {"offset", "bytes"} of the stored tensor
    plus {"shape", "stride", "storage_offset"} in elements. Only the rest is written (deduplicated
    against everything else); places are returned as {group: {name: place}}.

    Returns {"weights": {"file", "bytes", "tensors", "shared_tensors", "shared_bytes",
    "viewed_tensors", "layouts"}, graph: {"file"}, "extra": ...}; "layouts" (see `_layouts`) says
    which stored bytes hold the same checkpoint weight twice and which a pass computed.

    `write_data=False` writes the graphs only: `plan_places` gives every weight its place in a
    `weights_file` that is neither computed nor written.
    """
    out_dir = Path(out_dir)
    if not write_data:
        result = plan_places(models, out_dir, weights_file, extra)
        for graph_name, model in models.items():
            ir.save(model, out_dir / f"{graph_name}.onnx")
            result[graph_name] = {"file": f"{graph_name}.onnx"}
        return result
    written: dict[tuple[str, int], int] = {}  # (sha256, length) -> offset
    extra = extra or {}
    todo = [v for m in models.values() for v in m.graph.initializers.values()]
    total_steps = len(todo) + sum(len(group) for group in extra.values())
    shared = shared_bytes = viewed = 0
    places: dict[str, dict[str, dict[str, Any]]] = {group: {} for group in extra}
    stored: dict[int, tuple[str, torch.Tensor, int, int]] = {}  # offset -> (name, weight, offset, bytes)
    path = out_dir / weights_file
    try:
        with open(path, "wb") as f:

            def put(data: bytes) -> int:
                nonlocal shared, shared_bytes
                key = (hashlib.sha256(data).hexdigest(), len(data))
                if key in written:
                    shared += 1
                    shared_bytes += len(data)
                    return written[key]
                offset = f.tell() + (-f.tell() % ALIGNMENT)
                f.write(b"\0" * (offset - f.tell()))
                f.write(data)
                written[key] = offset
                return offset

            # A weight object seen before (prefill, decode and the programs hold the same ones) is
            # not read again: {id: (offset, bytes, written for a graph)}.
            seen: dict[int, tuple[int, int, bool]] = {}
            views: dict[int, dict[str, Any]] = {}  # id of a tensor stored in another layout -> its place
            done = 0
            for value in todo:
                done += 1
                tensor = value.const_value
                if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < INLINE_BELOW:
                    continue
                weight = tensor.weight if isinstance(tensor, _MetaWeight) else None
                key = id(weight) if weight is not None else None
                if key in seen:  # what put() would find by content, without reading it
                    offset, nbytes, _ = seen[key]
                    shared += 1
                    shared_bytes += nbytes
                else:
                    data = tensor.tobytes()
                    offset, nbytes = put(data), len(data)
                    del data
                    if weight is not None:
                        seen[key] = (offset, nbytes, True)
                        stored.setdefault(offset, (value.name, weight, offset, nbytes))
                        for source, view in stored_views(weight):
                            views.setdefault(id(source), {"offset": offset, "bytes": nbytes, "shape": list(view.shape),
                                                          "stride": list(view.stride()),
                                                          "storage_offset": view.storage_offset()})
                value.const_value = ir.ExternalTensor(weights_file, offset, nbytes, tensor.dtype,
                                                      shape=tensor.shape, name=value.name, base_dir=out_dir)
                del tensor
                if progress is not None:
                    progress(done, total_steps)
            for group, tensors in extra.items():
                for name, weight in tensors.items():
                    done += 1
                    if id(weight) in seen:
                        offset, nbytes, for_graph = seen[id(weight)]
                        if for_graph:  # counted as put() counts a content match
                            seen[id(weight)] = (offset, nbytes, False)
                            shared += 1
                            shared_bytes += nbytes
                        places[group][name] = {"offset": offset, "bytes": nbytes}
                    elif id(weight) in views:
                        places[group][name] = views[id(weight)]
                        viewed += 1
                    else:
                        data = TorchTensor(materialize(weight)).tobytes()  # as the graphs' weights are written
                        seen[id(weight)] = (put(data), len(data), False)
                        stored.setdefault(seen[id(weight)][0], (f"{group}:{name}", weight, *seen[id(weight)][:2]))
                        del data
                        places[group][name] = {"offset": seen[id(weight)][0], "bytes": seen[id(weight)][1]}
                    if progress is not None:
                        progress(done, total_steps)
            total = f.tell()
    except OSError as err:  # buffered writes fail at a later write or at close, naming no file: name it
        if err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    result: dict[str, dict] = {"weights": {"file": weights_file, "bytes": total, "tensors": len(written),
                                           "shared_tensors": shared, "shared_bytes": shared_bytes,
                                           "viewed_tensors": viewed, "layouts": _layouts(stored.values())},
                               "extra": places}
    for graph_name, model in models.items():
        path = out_dir / f"{graph_name}.onnx"
        ir.save(model, path)
        result[graph_name] = {"file": path.name}
    return result


def _origins(weight: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
    """(the checkpoint weights a stored tensor holds, whether a pass computed it from them).

    Layout folds (`_TorchFold`) keep values; any other derivation (absorb_mla's products and
    slices) computes new ones.
    """
    leaves, computed, todo = [], False, [weight]
    while todo:
        t = todo.pop()
        source = getattr(t, "dsc_source", None)
        if not isinstance(source, Derived):
            leaves.append(t)
            continue
        # Layout folds keep values, and so does storing a weight quantized; anything else computes new ones.
        computed |= not isinstance(source.fn, _TorchFold) and not _stores_weight(source)
        todo.extend(x for x in source.inputs if x.numel() >= FOLD_LIMIT)  # not the shape arguments
    return leaves, computed


def _stores_weight(source: Derived) -> bool:
    """Whether a derivation stores its input in another encoding (lowering/quantize.py's bits and
    scales: methods of an object with `stores_weight`) rather than computing new values."""
    return getattr(getattr(source.fn, "__self__", None), "stores_weight", False)


def _layouts(stored) -> dict[str, Any]:
    """What the weights file holds beyond one copy of each checkpoint weight.

    "second_layouts": tensors holding a checkpoint weight that another stored tensor holds too,
    in another layout (a graph reading it differently); "computed": tensors a pass computed from
    checkpoint weights (absorb_mla's), which may stand beside the weights they came from. Each
    with its bytes; the rest of the file is one copy of each weight.
    """
    holders: dict[int, str] = {}
    second, computed = [], []
    for name, weight, offset, nbytes in sorted(stored, key=lambda s: s[2]):
        source = getattr(weight, "dsc_source", None)
        if isinstance(source, Derived) and _stores_weight(source):
            continue  # a quantized weight's bits or scales: its one stored encoding
        leaves, is_computed = _origins(weight)
        if is_computed:
            computed.append({"name": name, "offset": offset, "bytes": nbytes})
            continue
        again = [holders[id(t)] for t in leaves if id(t) in holders]
        if again:
            second.append({"name": name, "offset": offset, "bytes": nbytes, "also_in": sorted(set(again))})
        for t in leaves:
            holders.setdefault(id(t), name)
    return {"second_layouts": second, "second_layout_bytes": sum(e["bytes"] for e in second),
            "computed": computed, "computed_bytes": sum(e["bytes"] for e in computed)}


def plan_places(models: dict[str, ir.Model], out_dir: Path, weights_file: str,
                extra: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, dict]:
    """Point the models' initializers at planned places of `weights_file`, reading no weight.

    Each distinct weight gets its own aligned place; the same weight in several graphs gets one:
    the same object (prefill and decode hold the same weights), or the same fold of the same
    weights (each graph folds its own transposed or interleaved copy: `_fold_key`). Values are
    never compared (that would read them), so the plan can be larger than what save_models
    writes, which also merges equal contents found otherwise. A lazy weight is external whatever
    its size: keeping it inline would compute it.
    Returns what save_models returns, without the graph files.
    """
    places: dict[Any, int] = {}  # _fold_key(weight) -> offset
    end = shared = shared_bytes = 0

    def place(obj, nbytes: int) -> int:
        nonlocal end, shared, shared_bytes
        key = _fold_key(obj)
        if key in places:
            shared += 1
            shared_bytes += nbytes
            return places[key]
        offset = places[key] = end + (-end % ALIGNMENT)
        end = offset + nbytes
        return offset

    for model in models.values():
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor):
                continue
            lazy = isinstance(tensor, _MetaWeight)
            if not lazy and tensor.nbytes < INLINE_BELOW:
                continue
            offset = place(tensor.weight if lazy else tensor, tensor.nbytes)
            value.const_value = ir.ExternalTensor(weights_file, offset, tensor.nbytes, tensor.dtype,
                                                  shape=tensor.shape, name=value.name, base_dir=out_dir)
    groups = {group: {name: {"offset": place(w, w.numel() * w.element_size()), "bytes": w.numel() * w.element_size()}
                      for name, w in tensors.items()} for group, tensors in (extra or {}).items()}
    return {"weights": {"file": weights_file, "bytes": end, "tensors": len(places), "shared_tensors": shared,
                        "shared_bytes": shared_bytes}, "extra": groups}


def _fold_key(t) -> Any:
    """What a weight is without reading it: its object, or for a `fold_weights` fold the fold
    (op, attributes, arguments) of what it was folded from, so two graphs' folds of one weight
    are one weight. Small real arguments (shapes, axes) count by value."""
    source = getattr(t, "dsc_source", None)
    if isinstance(source, Derived) and isinstance(source.fn, _TorchFold):
        args = tuple(tuple(x.reshape(-1).tolist()) if not x.is_meta and x.numel() < FOLD_LIMIT else _fold_key(x)
                     for x in source.inputs)
        return ("fold", source.fn.op, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                  for k, v in source.fn.attrs.items())), args)
    return id(t)
