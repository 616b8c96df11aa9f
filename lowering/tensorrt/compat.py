"""Static check of an ONNX model against TensorRT's ONNX parser, without TensorRT.

TensorRT cannot be installed everywhere (its wheels come from NVIDIA's own index and need a CUDA
GPU), so this module answers "will `trt.OnnxParser` take this graph?" from data alone: the operator
support table in `lowering/tensorrt/data/trt_onnx_ops.json` (a compact restatement of onnx-tensorrt's
`docs/operators.md`; its header names the TensorRT version and the date it was read).

`check_model` walks every node of the main graph, of If/Loop/Scan subgraphs and of local functions
(a call to a function in `model.functions` is expanded into its body, as the parser does), and
reports per node: unsupported or unknown operators, foreign domains (`com.microsoft`, `dsc`, ...),
element types outside the op's supported list (types come from ONNX shape inference), and the
constraints of the table (constant inputs such as TopK's K, absent optional inputs/outputs, ranks,
attribute values, operators newer than a given TensorRT version). Weights are never read: models
are loaded with `load_external_data=False`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import onnx
from onnx import numpy_helper

from dscompile.errors import EngineError

TABLE_PATH = Path(__file__).with_name("data") / "trt_onnx_ops.json"
DEFAULT_DOMAINS = ("", "ai.onnx")

# ONNX element type -> the type names used in the support table.
_TRT_TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.DOUBLE: "DOUBLE",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8",
    onnx.TensorProto.INT4: "INT4",
}
_FLOAT4 = getattr(onnx.TensorProto, "FLOAT4E2M1", None)
if _FLOAT4 is not None:
    _TRT_TYPE_NAMES[_FLOAT4] = "FP4"


@dataclass(frozen=True)
class Finding:
    """One reason a node may not pass TensorRT's ONNX parser."""

    graph: str
    node: str
    op_type: str
    domain: str
    severity: str  # "error" (the parser or builder will refuse it) or "warning" (may work; check)
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def load_table() -> dict[str, Any]:
    """The operator support table (lowering/tensorrt/data/trt_onnx_ops.json)."""
    with open(TABLE_PATH, encoding="utf-8") as f:
        return json.load(f)


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".") if p.isdigit())


class _Scope:
    """What is known about tensor names while walking one graph (and the graphs around it)."""

    def __init__(self, parent: "_Scope | None" = None):
        self.parent = parent
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.constants: dict[str, onnx.TensorProto | None] = {}  # Constant outputs (value when readable)
        self.graph_inputs: set[str] = set()

    def resolve(self, name: str) -> str:
        return name

    def kind(self, name: str) -> str:
        """'const', 'graph_input', 'computed' or 'absent' (empty name = omitted optional input)."""
        if not name:
            return "absent"
        if name in self.initializers or name in self.constants:
            return "const"
        if name in self.graph_inputs:
            return "graph_input"
        return self.parent.kind(name) if self.parent is not None else "computed"

    def const_value(self, name: str):
        """The value of a constant tensor when it is stored in the file, else None."""
        tensor = self.initializers.get(name) or self.constants.get(name)
        if tensor is None:
            return self.parent.const_value(name) if self.parent is not None else None
        # External data is never loaded: a value stored outside the file is simply unknown.
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        try:
            return numpy_helper.to_array(tensor)
        except Exception:  # a tensor we cannot decode is treated as unknown, not as an error
            return None


class _AliasScope(_Scope):
    """A function body's scope: formal parameter names stand for the caller's tensors."""

    def __init__(self, caller: _Scope, mapping: dict[str, str]):
        super().__init__(caller)
        self.mapping = mapping

    def resolve(self, name: str) -> str:
        return self.mapping.get(name, name)

    def kind(self, name: str) -> str:
        if name in self.mapping:
            actual = self.mapping[name]
            return "absent" if not actual else self.parent.kind(actual)
        return super().kind(name)

    def const_value(self, name: str):
        if name in self.mapping:
            return self.parent.const_value(self.mapping[name])
        return super().const_value(name)


class _Checker:
    def __init__(self, model: onnx.ModelProto, trt_version: str | None):
        self.table = load_table()
        self.ops: dict[str, dict] = self.table["ops"]
        self.trt_version = trt_version
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.findings: list[Finding] = []
        self._seen: set[tuple] = set()
        self._prefix = ""  # call-site prefix of the function body being walked
        self.types: dict[str, int] = {}
        self.ranks: dict[str, int] = {}
        self._collect_types(model)

    # -- type and rank information -------------------------------------------------------------
    def _collect_types(self, model: onnx.ModelProto) -> None:
        try:
            # Shape inference reads dims and types only, so external weights need not be loaded.
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # too large for a proto in memory, or a schema shape inference rejects
            inferred = model
        for graph in _all_graphs(inferred.graph):
            for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
                tt = vi.type.tensor_type
                if tt.elem_type:
                    self.types.setdefault(vi.name, tt.elem_type)
                if tt.HasField("shape"):
                    self.ranks.setdefault(vi.name, len(tt.shape.dim))
            for init in graph.initializer:
                self.types.setdefault(init.name, init.data_type)
                self.ranks.setdefault(init.name, len(init.dims))
            for node in graph.node:
                if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                    for attr in node.attribute:
                        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                            self.types.setdefault(node.output[0], attr.t.data_type)
                            self.ranks.setdefault(node.output[0], len(attr.t.dims))

    # -- walking -------------------------------------------------------------------------------
    def add(self, graph: str, node: onnx.NodeProto, node_name: str, severity: str, reason: str):
        # A function called from many places (one per layer) is reported once per body node and
        # reason: the key drops the call-site part of the graph and node names.
        local = node_name[len(self._prefix):] if self._prefix and node_name.startswith(self._prefix) else node_name
        key = (graph.split("@")[-1], local, node.op_type, node.domain, severity, reason)
        if key in self._seen:
            return
        self._seen.add(key)
        self.findings.append(Finding(graph, node_name, node.op_type, node.domain or "ai.onnx", severity, reason))

    def walk_graph(self, graph: onnx.GraphProto, graph_name: str, parent: _Scope | None, prefix: str = "",
                   rename: dict[str, str] | None = None, stack: tuple = ()) -> None:
        scope = _Scope(parent)
        scope.initializers.update({i.name: i for i in graph.initializer})
        scope.graph_inputs.update(i.name for i in graph.input if i.name not in scope.initializers)
        self._walk_nodes(graph.node, graph_name, scope, prefix, rename or {}, stack)

    def _walk_nodes(self, nodes: Iterable[onnx.NodeProto], graph_name: str, scope: _Scope, prefix: str,
                    rename: dict[str, str], stack: tuple) -> None:
        outer_prefix, self._prefix = self._prefix, prefix
        try:
            self._walk_nodes_in(nodes, graph_name, scope, prefix, rename, stack)
        finally:
            self._prefix = outer_prefix

    def _walk_nodes_in(self, nodes, graph_name, scope, prefix, rename, stack) -> None:
        for index, node in enumerate(nodes):
            name = prefix + (node.name or f"{node.op_type}#{index}")
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                value = next((a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR), None)
                for out in node.output:
                    scope.constants[out] = value
            function = self.functions.get((node.domain, node.op_type))
            if function is not None:
                self._expand_function(node, function, graph_name, scope, name, rename, stack)
                continue
            self.check_node(node, name, graph_name, scope, rename)
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub in subgraphs:
                    sub_name = f"{graph_name}/{name}.{attr.name}"
                    self.walk_graph(sub, sub_name, scope, "", rename, stack)

    def _expand_function(self, node, function, graph_name, scope, name, rename, stack) -> None:
        fid = (function.domain, function.name)
        if fid in stack:  # recursive functions cannot be inlined; the parser would loop too
            self.add(graph_name, node, name, "error", f"function {function.domain}::{function.name} calls itself")
            return
        mapping = dict(rename)
        # Inside the body, formal inputs stand for the caller's actual tensors: map names so that
        # constness (TopK's K, ...) and types are judged from the call site.
        for formal, actual in zip(function.input, node.input):
            mapping[formal] = rename.get(actual, actual)
        for formal in list(function.input)[len(node.input):]:
            mapping[formal] = ""
        inner_graph = f"{graph_name}@function {function.domain}::{function.name}"
        self._walk_nodes(function.node, inner_graph, _AliasScope(scope, mapping), name + "/", mapping, stack + (fid,))

    # -- the checks ----------------------------------------------------------------------------
    def check_node(self, node: onnx.NodeProto, name: str, graph: str, scope: _Scope, rename: dict[str, str]):
        domain = node.domain
        if domain not in DEFAULT_DOMAINS:
            if domain in self.table["domains"]:
                self.add(graph, node, name, "warning",
                         f"domain '{domain}': {self.table['domains'][domain]} (plugin '{node.op_type}')")
                return
            why = self.table["foreign_domains"].get(
                domain, "TensorRT imports only standard ONNX operators, plus plugins registered under their op name")
            self.add(graph, node, name, "error", f"domain '{domain}' is not supported by TensorRT: {why}")
            return
        entry = self.ops.get(node.op_type)
        if entry is None:
            self.add(graph, node, name, "error",
                     f"{node.op_type} is not a TensorRT {self.table['tensorrt_version']} ONNX operator "
                     "(unknown ops fall back to a plugin lookup by name, and no such plugin exists)")
            return
        if not entry["supported"]:
            self.add(graph, node, name, "error",
                     f"{node.op_type} is not supported by TensorRT {self.table['tensorrt_version']}")
            return
        min_trt = entry.get("min_trt")
        if min_trt:
            if self.trt_version is None:
                self.add(graph, node, name, "warning",
                         f"{node.op_type} needs TensorRT >= {min_trt} (added to the ONNX parser in {min_trt})")
            elif _version_tuple(self.trt_version) < _version_tuple(min_trt):
                self.add(graph, node, name, "error",
                         f"{node.op_type} needs TensorRT >= {min_trt}, target is {self.trt_version}")
        if entry.get("warn"):
            self.add(graph, node, name, "warning", f"{node.op_type}: {entry['note']}")
        self._check_type(node, name, graph, entry, rename)
        for constraint in entry.get("constraints", []):
            self._check_constraint(node, name, graph, scope, rename, constraint)

    def _type_of(self, tensor: str, rename: dict[str, str]) -> str | None:
        t = self.types.get(rename.get(tensor, tensor)) or self.types.get(tensor)
        return _TRT_TYPE_NAMES.get(t, onnx.TensorProto.DataType.Name(t)) if t else None

    def _check_type(self, node, name, graph, entry, rename) -> None:
        types = entry.get("types")
        if not types:
            return
        where, _, idx = entry.get("type_of", "input:0").partition(":")
        names = node.input if where == "input" else node.output
        i = int(idx)
        if i >= len(names) or not names[i]:
            return
        trt_type = self._type_of(names[i], rename)
        if trt_type is None or trt_type in types:
            return
        if trt_type == "DOUBLE":
            self.add(graph, node, name, "warning",
                     f"{node.op_type} on DOUBLE: TensorRT casts it to FP32, clamping to +-FLT_MAX")
        else:
            self.add(graph, node, name, "error",
                     f"{node.op_type} does not support {trt_type} ({where} {i} '{names[i]}'); "
                     f"supported: {', '.join(types)}")

    def _check_constraint(self, node, name, graph, scope, rename, c: dict) -> None:
        kind = c["kind"]
        inputs = list(node.input)
        if kind in ("const_input", "max_const_value", "input_rank", "input_type"):
            i = c["input"]
            tensor = inputs[i] if i < len(inputs) else ""
            if not tensor:
                return
            origin = scope.kind(tensor)
            tensor = scope.resolve(tensor)  # inside a function body: the caller's tensor name
            if kind == "const_input":
                if origin == "graph_input":
                    self.add(graph, node, name, c["graph_input"], f"{c['reason']}; it is the graph input '{tensor}'")
                elif origin == "computed":
                    self.add(graph, node, name, c["computed"],
                             f"{c['reason']}; it is computed by another node ('{tensor}')")
            elif kind == "max_const_value" and origin == "const":
                value = scope.const_value(tensor)
                if value is not None and value.size and int(value.max()) > c["max"]:
                    self.add(graph, node, name, "error", f"{c['reason']} (got {int(value.max())})")
            elif kind == "input_rank":
                r = self.ranks.get(rename.get(tensor, tensor))
                if r is not None and r != c["rank"]:
                    self.add(graph, node, name, "error", f"{c['reason']} (got {r}D '{tensor}')")
            elif kind == "input_type":
                t = self._type_of(tensor, rename)
                if t is not None and t not in c["types"]:
                    self.add(graph, node, name, "error", f"{c['reason']} (got {t})")
        elif kind == "absent_input":
            i = c["input"]
            if i < len(inputs) and inputs[i]:
                self.add(graph, node, name, "error", c["reason"])
        elif kind == "absent_output":
            i = c["output"]
            if i < len(node.output) and node.output[i]:
                self.add(graph, node, name, "error", c["reason"])
        elif kind == "absent_attr":
            if any(a.name == c["attr"] for a in node.attribute):
                self.add(graph, node, name, "error", c["reason"])
        elif kind == "attr_equals":
            value = c["default"]
            for a in node.attribute:
                if a.name == c["attr"]:
                    value = onnx.helper.get_attribute_value(a)
                    value = value.decode() if isinstance(value, bytes) else value
            if value != c["value"]:
                self.add(graph, node, name, "error", f"{c['reason']} (got {value!r})")
        elif kind == "einsum_equation":
            eq = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "equation"), b"")
            eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
            lhs = eq.split("->")[0]
            operands = lhs.split(",")
            problems = []
            if "..." in eq:
                problems.append("an ellipsis")
            if len(operands) > c["max_inputs"]:
                problems.append(f"{len(operands)} operands")
            if any(len(set(t.replace("...", ""))) != len(t.replace("...", "")) for t in operands):
                problems.append("a diagonal (repeated label)")
            if problems:
                self.add(graph, node, name, "warning", f"Einsum '{eq}' has {' and '.join(problems)}: {c['reason']}")


def _all_graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graphs(g)


def load_model(model_or_path: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto, str]:
    """An ONNX model (its graph only: external data is not read) and its name, or a one-line EngineError."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, model_or_path.graph.name or "main"
    path = Path(model_or_path)
    if not path.is_file():
        raise EngineError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError; the user only needs the file name
        raise EngineError(f"{path}: not a valid ONNX file ({type(e).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise EngineError(f"{path}: not a valid ONNX file (no graph)")
    return model, path.name


def check_model(model_or_path: onnx.ModelProto | str | os.PathLike, *, trt_version: str | None = None) -> list[Finding]:
    """Every reason TensorRT's ONNX parser may refuse this model, per node (empty list: none known).

    `trt_version` (e.g. "10.13") turns "needs TensorRT >= X" warnings into errors when it is older.
    """
    model, name = load_model(model_or_path)
    checker = _Checker(model, trt_version)
    lo, hi = checker.table["opset_range"]
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS and not lo <= imp.version <= hi:
            checker.findings.append(Finding(name, "", "", "ai.onnx", "warning",
                                            f"opset {imp.version} is outside TensorRT "
                                            f"{checker.table['tensorrt_version']}'s range {lo}..{hi}"))
    checker.walk_graph(model.graph, name, None)
    return checker.findings


def findings_to_dict(findings: list[Finding]) -> dict[str, Any]:
    """JSON-able summary: counts and every finding."""
    errors = sum(f.severity == "error" for f in findings)
    return {
        "compatible": errors == 0,
        "errors": errors,
        "warnings": sum(f.severity == "warning" for f in findings),
        "findings": [f.to_dict() for f in findings],
    }


def format_findings(findings: list[Finding]) -> str:
    """A plain-text table, errors first."""
    if not findings:
        return "no TensorRT compatibility findings"
    rows = [("severity", "graph", "node", "op", "reason")]
    order = sorted(findings, key=lambda f: f.severity != "error")
    for f in order:
        op = f.op_type if f.domain in ("ai.onnx", "") else f"{f.domain}::{f.op_type}"
        rows.append((f.severity, f.graph, f.node, op, f.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def check_out_dir(out_dir: str | os.PathLike, *, trt_version: str | None = None) -> dict[str, Any]:
    """Check every `*.onnx` in OUT; the dict `dscompile inspect OUT --trt-compat` prints."""
    out = Path(out_dir)
    if not out.is_dir():
        raise EngineError(f"{out}: no such engine folder")
    files = sorted(out.glob("*.onnx"))
    if not files:
        raise EngineError(f"{out}: no *.onnx file to check")
    table = load_table()
    report: dict[str, Any] = {
        "out_dir": str(out),
        "table": {k: table[k] for k in ("source", "tensorrt_version", "retrieved")},
        "files": {},
    }
    for path in files:
        report["files"][path.name] = findings_to_dict(check_model(path, trt_version=trt_version))
    report["errors"] = sum(f["errors"] for f in report["files"].values())
    report["warnings"] = sum(f["warnings"] for f in report["files"].values())
    report["compatible"] = report["errors"] == 0
    return report
