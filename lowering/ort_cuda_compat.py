"""Static check of an ONNX model against ONNX Runtime's CUDA kernels: which nodes would run on CPU.

ONNX Runtime never refuses a graph its CUDA provider cannot fully run: every node without a CUDA
kernel for its op, opset and element types is quietly placed on the CPU provider, with copies
between host and device around it. A float graph that loses one op per layer to the CPU runs
at a fraction of the GPU's speed and still passes every numerical check. This module answers,
without a GPU, "which nodes of this export would ONNX Runtime place on CPU, and why":

- the table `lowering/data/ort_cuda_kernels.json` restates the CUDA section of ONNX Runtime's
  docs/OperatorKernels.md (generated from its kernel registrations; the file names the commit):
  per op and domain, the opset ranges registered and the element types of each type constraint;
- a node matches a registration the way ONNX Runtime's kernel lookup does: the registration's
  `since` equals the node's schema version (resolved from the opset the graph imports), or that
  version falls inside a bounded range; then every type constraint of the registration must
  accept the element types of the node's inputs and outputs that it names (types from ONNX shape
  inference, else the graph's value info);
- nodes that match go to CUDA, except small shape computations: ONNX Runtime's partitioner
  (GetCpuPreferredNodes) moves to CPU the nodes fed only by CPU tensors (the CUDA `Shape` and
  `Size` kernels write their output to host memory), small initializers (<= 100 elements) and
  graph inputs, unless an input is float16/bfloat16/float8 or the CUDA kernel reads it from host
  memory anyway (Reshape's shape, Slice's starts/ends, ...). Those are reported as "shape"
  placements: they are int64 index arithmetic, not compute, and ONNX Runtime chooses CPU for them
  on purpose.

What it cannot see: graph optimizations that run after partitioning (fusions, constant folding of
shape subgraphs) and kernels' run-time limits (a head size or a dtype combination refused at
session creation). Weights are never read (`load_external_data=False`).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx

from dscompile.errors import EngineError
from dscompile.lowering.tensorrt.compat import load_model  # the same ONNX file reading and its one-line errors

TABLE_PATH = Path(__file__).with_name("data") / "ort_cuda_kernels.json"
_DEFAULT_DOMAINS = ("", "ai.onnx")
_LOW_FLOATS = {"float16", "bfloat16", "float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz"}
_INDEX_TYPES = {"int64", "int32", "bool"}  # what a shape computation carries


@functools.lru_cache(maxsize=1)
def load_table() -> dict[str, Any]:
    """The CUDA kernel table (lowering/data/ort_cuda_kernels.json)."""
    with open(TABLE_PATH, encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=1)
def kernels() -> dict[str, dict[str, list[dict]]]:
    """domain -> op -> registrations: the table's, with its "corrections" (registrations of the pinned
    onnxruntime missing from the documentation's commit) replacing those ops' entries."""
    table = load_table()
    merged = {domain: dict(ops) for domain, ops in table["kernels"].items()}
    for domain, ops in table.get("corrections", {}).items():
        if not domain.startswith("_"):
            merged.setdefault(domain, {}).update(ops)
    return merged


@dataclass(frozen=True)
class Placement:
    """A node ONNX Runtime's CUDA provider would leave to the CPU provider."""

    graph: str
    node: str
    op_type: str
    domain: str
    kind: str  # "unsupported": no CUDA kernel for it; "shape": a small index computation placed on CPU on purpose
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


_ONNX_TO_TABLE = {  # TensorProto names (lowercased) -> the table's type names
    "float": "float", "float16": "float16", "bfloat16": "bfloat16", "double": "double", "int8": "int8",
    "int16": "int16", "int32": "int32", "int64": "int64", "uint8": "uint8", "uint16": "uint16",
    "uint32": "uint32", "uint64": "uint64", "bool": "bool", "string": "string", "int4": "int4", "uint4": "uint4",
    "float8e4m3fn": "float8e4m3fn", "float8e4m3fnuz": "float8e4m3fnuz", "float8e5m2": "float8e5m2",
    "float8e5m2fnuz": "float8e5m2fnuz", "float4e2m1": "float4e2m1",
}


def _table_type(elem_type: int) -> str:
    name = onnx.TensorProto.DataType.Name(elem_type).lower()
    return _ONNX_TO_TABLE.get(name, name)


class _Graph:
    """Types, producers, consumers and constants of one (inlined) model's main graph."""

    def __init__(self, model: onnx.ModelProto):
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # a schema shape inference rejects, or a proto too large: fall back on value info
            inferred = model
        self.graph = inferred.graph
        self.types: dict[str, str] = {}
        for vi in list(self.graph.input) + list(self.graph.output) + list(self.graph.value_info):
            if vi.type.tensor_type.elem_type:
                self.types.setdefault(vi.name, _table_type(vi.type.tensor_type.elem_type))
        self.initializer_sizes: dict[str, int] = {}
        for init in self.graph.initializer:
            self.types.setdefault(init.name, _table_type(init.data_type))
            self.initializer_sizes[init.name] = _numel(init.dims)
        for node in self.graph.node:  # ONNX Runtime turns Constant nodes into initializers when it loads
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                value = next((a for a in node.attribute if a.name.startswith("value")), None)
                if value is not None and value.type == onnx.AttributeProto.TENSOR:
                    self.types.setdefault(node.output[0], _table_type(value.t.data_type))
                    self.initializer_sizes[node.output[0]] = _numel(value.t.dims)
                elif value is not None:
                    self.initializer_sizes[node.output[0]] = len(value.ints) or len(value.floats) or 1
        self.graph_inputs = {i.name for i in self.graph.input} - set(self.initializer_sizes)
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.graph.node):
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


class _Checker:
    def __init__(self, model: onnx.ModelProto, name: str):
        self.table = load_table()
        self.kernels = kernels()
        self.params: dict[str, dict[str, dict]] = self.table["params"]
        self.memory = self.table["memory"]
        self.name = name
        self.opsets = {(imp.domain or "ai.onnx"): imp.version for imp in model.opset_import}

    def schema(self, node: onnx.NodeProto):
        domain = node.domain or ""
        version = self.opsets.get(domain or "ai.onnx", 1)
        try:
            return onnx.defs.get_schema(node.op_type, version, domain)
        except onnx.defs.SchemaError:
            return None

    def since_version(self, node: onnx.NodeProto) -> int | None:
        schema = self.schema(node)
        if schema is not None:
            return schema.since_version
        return 1 if (node.domain or "") not in _DEFAULT_DOMAINS else None

    def formal_types(self, node: onnx.NodeProto) -> tuple[list[str], list[str]] | None:
        """The type-constraint name (or formal parameter name) of each input and output of `node`."""
        domain = node.domain or "ai.onnx"
        known = self.params.get(domain, {}).get(node.op_type)
        if known is not None:
            return known["inputs"], known["outputs"]
        schema = self.schema(node)
        if schema is None:
            return None

        def expand(formals, count):
            names = []
            for i in range(count):
                f = formals[min(i, len(formals) - 1)] if formals else None
                if f is None or (i >= len(formals) and f.option != onnx.defs.OpSchema.FormalParameterOption.Variadic):
                    names.append("")
                else:
                    names.append(f"{f.type_str}|{f.name}")
            return names

        return expand(list(schema.inputs), len(node.input)), expand(list(schema.outputs), len(node.output))

    def kernel_for(self, node: onnx.NodeProto, g: _Graph) -> tuple[dict | None, str]:
        """(the matching CUDA registration, "") or (None, why there is none)."""
        domain = node.domain or "ai.onnx"
        regs = self.kernels.get(domain, {}).get(node.op_type)
        if regs is None:
            where = f"{domain}::" if domain != "ai.onnx" else ""
            return None, f"no CUDA kernel for {where}{node.op_type}"
        since = self.since_version(node)
        if since is None:
            return None, f"{node.op_type}: no ONNX schema at opset {self.opsets.get(domain)} to match kernels against"
        matching = [r for r in regs if r["since"] == since
                    or (r["since"] < since and r["until"] is not None and r["until"] >= since)]
        if not matching:
            ranges = ", ".join(f"{r['since']}+" if r["until"] is None else
                               (f"{r['since']}" if r["since"] == r["until"] else f"{r['since']}-{r['until']}")
                               for r in regs)
            return None, (f"{node.op_type}-{since} (opset {self.opsets.get(domain)}) has no CUDA kernel: "
                          f"registered for versions {ranges}")
        formal = self.formal_types(node)
        problems = []
        for reg in matching:
            problems = self._type_problems(node, g, reg, formal)
            if not problems:
                return reg, ""
        more = f" (and {len(problems) - 1} more input/output of that type)" if len(problems) > 1 else ""
        return None, f"{node.op_type}-{since}: the CUDA kernel takes no {problems[0]}{more}"

    @staticmethod
    def _type_problems(node, g: _Graph, reg: dict, formal) -> list[str]:
        if formal is None:
            return []  # no parameter list to map constraints onto: the op/version match is all we know
        problems = []
        for side, names, params in (("input", node.input, formal[0]), ("output", node.output, formal[1])):
            for i, (tensor, param) in enumerate(zip(names, params)):
                if not tensor or not param:
                    continue
                letter, _, pname = param.partition("|")
                allowed = reg["types"].get(letter) or reg["types"].get(pname)
                actual = g.types.get(tensor)
                if allowed is None or actual is None or "seq" == actual:
                    continue
                if actual not in allowed:
                    problems.append(f"{actual} for {letter or pname} ({side} {i} '{tensor}'; it takes "
                                    f"{', '.join(allowed)})")
        return problems

    def check(self, model: onnx.ModelProto) -> tuple[list[Placement], int]:
        g = _Graph(model)
        nodes = list(g.graph.node)
        findings: list[Placement] = []
        kernels: dict[int, dict] = {}
        unsupported: set[int] = set()
        for index, node in enumerate(nodes):
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                continue  # becomes an initializer when ONNX Runtime loads the graph
            reg, why = self.kernel_for(node, g)
            if reg is None:
                unsupported.add(index)
                findings.append(Placement(self.name, node.name or f"{node.op_type}#{index}", node.op_type,
                                          node.domain or "ai.onnx", "unsupported", why))
            else:
                kernels[index] = reg
            for attr in node.attribute:  # subgraphs: kernel lookup only (our graphs have none)
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    sub_model = onnx.helper.make_model(sub, opset_imports=model.opset_import)
                    sub_findings, _ = _Checker(sub_model, f"{self.name}/{node.name}.{attr.name}").check(sub_model)
                    findings += sub_findings
        for index in self._cpu_preferred(nodes, g, kernels, unsupported):
            node = nodes[index]
            types = {g.types.get(t) for t in list(node.input) + list(node.output) if t}
            shape_only = types <= _INDEX_TYPES | {None}
            why = ("small shape computation fed by host tensors (Shape/Size outputs, small constants): ONNX Runtime "
                   "prefers CPU for it" if shape_only else
                   "fed only by host tensors, so ONNX Runtime places it on CPU; it computes on "
                   + ", ".join(sorted(t for t in types if t)))
            findings.append(Placement(self.name, node.name or f"{node.op_type}#{index}", node.op_type,
                                      node.domain or "ai.onnx", "shape" if shape_only else "host_compute", why))
        return findings, sum(1 for n in nodes if not (n.op_type == "Constant" and n.domain in _DEFAULT_DOMAINS))

    def _cpu_preferred(self, nodes, g: _Graph, kernels: dict[int, dict], unsupported: set[int]) -> list[int]:
        """The CUDA-capable nodes ONNX Runtime's partitioner still puts on CPU (GetCpuPreferredNodes)."""
        cpu_out, cpu_in = self.memory["cpu_outputs"], self.memory["cpu_inputs"]
        small = self.memory["small_initializer_elements"]
        host: set[str] = set()
        candidates: set[int] = set()
        for index in kernels:
            node = nodes[index]
            for o in cpu_out.get(node.op_type, []) if node.domain in _DEFAULT_DOMAINS else []:
                if o < len(node.output) and node.output[o]:
                    host.add(node.output[o])
                    candidates.update(g.consumers.get(node.output[o], []))
        for index in unsupported:  # a CPU node's outputs are host tensors too
            host.update(o for o in nodes[index].output if o)
            for o in nodes[index].output:
                candidates.update(g.consumers.get(o, []))
        placed: list[int] = []
        visited: set[int] = set()
        while candidates:
            index = min(candidates)  # graph order is topological order for exported graphs
            candidates.discard(index)
            if index in visited or index not in kernels:
                visited.add(index)
                continue
            visited.add(index)
            node = nodes[index]
            reads_on_host = cpu_in.get(node.op_type, []) if node.domain in _DEFAULT_DOMAINS else []
            on_cpu = True
            for i, name in enumerate(node.input):
                if not name:
                    continue
                if g.types.get(name) in _LOW_FLOATS:
                    on_cpu = False
                    break
                if g.initializer_sizes.get(name, small + 1) <= small or name in g.graph_inputs:
                    continue
                if name not in host or i in reads_on_host:
                    on_cpu = False
                    break
            if on_cpu:
                placed.append(index)
                for o in node.output:
                    if o:
                        host.add(o)
                        candidates.update(c for c in g.consumers.get(o, []) if c not in visited)
        return sorted(placed)


def check_model(model_or_path: onnx.ModelProto | str | os.PathLike) -> dict[str, Any]:
    """Where ONNX Runtime's CUDA provider would run each node of a model: the nodes it leaves to CPU.

    Returns {"nodes", "on_cuda", "unsupported", "shape_on_cpu", "host_compute", "placements": [...]};
    "unsupported" counts nodes without a CUDA kernel (the reason names op, version or type).
    """
    model, name = load_model(model_or_path)
    if model.functions:  # the exporter's local functions: check their bodies as ONNX Runtime will run them
        model = onnx.inliner.inline_local_functions(model)
    findings, total = _Checker(model, name).check(model)
    counts = {kind: sum(f.kind == kind for f in findings) for kind in ("unsupported", "shape", "host_compute")}
    return {
        "nodes": total,
        "on_cuda": total - sum(counts.values()),
        "unsupported": counts["unsupported"],
        "shape_on_cpu": counts["shape"],
        "host_compute": counts["host_compute"],
        "placements": [f.to_dict() for f in findings],
    }


def check_out_dir(out_dir: str | os.PathLike, opened: set[str] | None = None) -> dict[str, Any]:
    """Check every `*.onnx` of OUT; the dict that `dscompile inspect OUT --ort-cuda-compat` prints.

    `opened`: the files an engine on the CUDA provider opens (runtime.ort_engine.session_graphs;
    default: all). "compatible" is False when a node of an opened file has no CUDA kernel; the other
    files (the in-place decode graph runs on CPU only) are checked and reported all the same.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise EngineError(f"{out}: no such engine folder")
    files = sorted(p.name for p in out.glob("*.onnx"))
    if not files:
        raise EngineError(f"{out}: no *.onnx file to check")
    table = load_table()
    report: dict[str, Any] = {
        "out_dir": str(out),
        "table": {k: table[k] for k in ("source", "repository", "file", "commit", "onnxruntime", "retrieved")},
        "files": {},
    }
    for name in files:
        result = check_model(out / name)
        result["opened_on_cuda"] = opened is None or name in opened
        report["files"][name] = result
    report["unsupported"] = sum(f["unsupported"] for f in report["files"].values() if f["opened_on_cuda"])
    report["compatible"] = report["unsupported"] == 0
    return report


def format_report(report: dict[str, Any]) -> list[str]:
    """Text lines: per file, the counts, then one line per distinct (kind, op, reason)."""
    lines = []
    for name, result in sorted(report["files"].items()):
        lines.append(f"  {name}: {result['on_cuda']} of {result['nodes']} nodes on CUDA, {result['unsupported']} "
                     f"without a CUDA kernel, {result['shape_on_cpu']} shape nodes on CPU"
                     + (f", {result['host_compute']} other nodes on CPU" if result["host_compute"] else "")
                     + ("" if result.get("opened_on_cuda", True) else " (not opened on CUDA: informational)"))
        seen: dict[tuple, int] = {}
        for p in result["placements"]:
            key = (p["kind"], p["op_type"] if p["domain"] == "ai.onnx" else f"{p['domain']}::{p['op_type']}",
                   p["reason"])
            seen[key] = seen.get(key, 0) + 1
        for (kind, op, reason), n in sorted(seen.items(), key=lambda kv: kv[0][0] != "unsupported"):
            lines.append(f"    {kind:11s} {op} x{n}: {reason}")
    return lines
