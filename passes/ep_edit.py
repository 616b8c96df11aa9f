"""Editing an ExportedProgram in place: find module regions, add weights, emit nodes, clean up.

Passes rewrite the ATen graph of a `torch.export.ExportedProgram`. What they share lives here:
- `regions(ep, cls)`: the nodes each call of a module class produced (from `nn_module_stack`);
- `param(ep, fqn)` / `param_node(ep, fqn)`: a weight and its placeholder, by qualified name;
- `add_param(ep, fqn, tensor)`: a new weight placeholder, registered in the graph signature;
- `emit(ep, target, *args)`: a new node whose `meta["val"]` is computed by running the op on
  the arguments' fake values, so later passes and the ONNX exporter see shapes and dtypes;
- `clone(ep)`: a copy to edit, so a pass never changes the program it was given;
- `rebuild(ep)`: dead code removed, unused weights dropped, a fresh ExportedProgram.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.fx import Node


@dataclass
class Region:
    """The nodes one call of a module produced, in graph order."""

    path: str  # qualified module name, e.g. "model.layers.1.self_attn"
    nodes: list[Node] = field(default_factory=list)

    def inputs(self) -> list[Node]:
        """Nodes outside the region that it reads, in first-use order."""
        inside, seen, out = set(self.nodes), set(), []
        for n in self.nodes:
            for a in n.all_input_nodes:
                if a not in inside and a not in seen:
                    seen.add(a)
                    out.append(a)
        return out

    def outputs(self) -> list[Node]:
        """Region nodes read outside the region."""
        inside = set(self.nodes)
        return [n for n in self.nodes if any(u not in inside for u in n.users)]


def regions(ep: ExportedProgram, cls: str) -> list[Region]:
    """One Region per module instance whose class name is `cls` (innermost match per node)."""
    found: dict[str, Region] = {}
    for n in ep.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if n.op != "call_function" or not stack:
            continue
        path = None
        for _key, (qualname, type_str) in stack.items():
            if str(type_str).rsplit(".", 1)[-1] == cls:
                path = qualname
        if path is not None:
            found.setdefault(path, Region(path)).nodes.append(n)
    return list(found.values())


def _fqn_by_placeholder(ep: ExportedProgram) -> dict[str, str]:
    sig = ep.graph_signature
    return {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}


def param_node(ep: ExportedProgram, fqn: str) -> Node | None:
    """The placeholder of the weight called `fqn` (state_dict name), or None."""
    names = {v: k for k, v in _fqn_by_placeholder(ep).items()}
    if fqn not in names:
        return None
    return next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == names[fqn])


def param_name(ep: ExportedProgram, node: Node) -> str | None:
    """The weight name behind a placeholder node, or None for a user input."""
    return _fqn_by_placeholder(ep).get(node.name)


def param(ep: ExportedProgram, fqn: str) -> torch.Tensor:
    if fqn in ep.state_dict:
        return ep.state_dict[fqn]
    return ep.constants[fqn]


def _fake_mode(ep: ExportedProgram):
    for n in ep.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    raise RuntimeError("the exported program carries no fake values")


def add_param(ep: ExportedProgram, fqn: str, tensor: torch.Tensor) -> Node:
    """Add a weight (a new graph input of kind PARAMETER) and return its placeholder."""
    if fqn in ep.state_dict:
        raise ValueError(f"weight {fqn} already exists")
    graph = ep.graph
    first_user = next(
        n for n in graph.nodes if n.op == "placeholder" and param_name(ep, n) is None
    )
    with graph.inserting_before(first_user):
        node = graph.placeholder("p_" + fqn.replace(".", "_"))
    node.meta["val"] = _fake_mode(ep).from_tensor(tensor, static_shapes=True)
    specs = list(ep.graph_signature.input_specs)
    at = next(i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT)
    specs.insert(at, InputSpec(InputKind.PARAMETER, TensorArgument(node.name), target=fqn, persistent=None))
    ep.graph_signature.input_specs[:] = specs
    ep.state_dict[fqn] = torch.nn.Parameter(tensor.detach(), requires_grad=False)
    return node


def _val(x: Any) -> Any:
    if isinstance(x, Node):
        return x.meta["val"]
    if isinstance(x, (list, tuple)):
        return type(x)(_val(v) for v in x)
    return x


def emit(ep: ExportedProgram, target, *args, like: Node | None = None, **kwargs) -> Node:
    """Insert `target(*args, **kwargs)` at the graph's current insertion point, with its fake value.

    `like` lends its nn_module_stack (and stack trace) so the new node stays in its module's region.
    """
    node = ep.graph.call_function(target, args, kwargs)
    with _fake_mode(ep):
        node.meta["val"] = target(*_val(args), **_val(kwargs))
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    return node


def clone(ep: ExportedProgram) -> ExportedProgram:
    """A copy whose graph can be edited without touching `ep` (weights are shared, not copied)."""
    gm = copy.deepcopy(ep.graph_module)  # node.meta is copied shallowly: fake values are shared
    return ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=copy.deepcopy(ep.graph_signature),
        state_dict=dict(ep.state_dict),
        range_constraints=ep.range_constraints,
        module_call_graph=copy.deepcopy(ep.module_call_graph),
        example_inputs=ep.example_inputs,
        constants=dict(ep.constants),
        verifiers=[ep.verifier],
    )


def rebuild(ep: ExportedProgram) -> ExportedProgram:
    """Drop dead nodes and weights nothing reads any more; return a consistent ExportedProgram."""
    graph = ep.graph
    # The default purity test keeps ops tagged nondeterministic (attention, for its dropout) even
    # when nothing reads them; export graphs are functional, so only asserts have side effects.
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or "assert" in str(n.target))
    unused = {
        n.name for n in graph.nodes if n.op == "placeholder" and not n.users and param_name(ep, n) is not None
    }
    specs = [s for s in ep.graph_signature.input_specs if not (isinstance(s.arg, TensorArgument) and s.arg.name in unused)]
    dropped = {s.target for s in ep.graph_signature.input_specs if s.arg.name in unused}
    for n in [n for n in graph.nodes if n.op == "placeholder" and n.name in unused]:
        graph.erase_node(n)
    ep.graph_signature.input_specs[:] = specs
    state_dict = {k: v for k, v in ep.state_dict.items() if k not in dropped}
    constants = {k: v for k, v in ep.constants.items() if k not in dropped}
    graph.lint()
    ep.graph_module.recompile()
    return ExportedProgram(
        root=ep.graph_module,
        graph=graph,
        graph_signature=ep.graph_signature,
        state_dict=state_dict,
        range_constraints=ep.range_constraints,
        module_call_graph=ep.module_call_graph,
        example_inputs=ep.example_inputs,
        constants=constants,
        verifiers=[ep.verifier],
    )


def strip_views(node: Node, view_ops: tuple = ()) -> Node:
    """Follow view-like single-input ops (view, reshape, transpose, expand, unsqueeze) back to their source."""
    ops = view_ops or (
        torch.ops.aten.view.default,
        torch.ops.aten.reshape.default,
        torch.ops.aten.transpose.int,
        torch.ops.aten.expand.default,
        torch.ops.aten.unsqueeze.default,
        torch.ops.aten.slice.Tensor,
        torch.ops.aten.permute.default,
    )
    while node.op == "call_function" and node.target in ops:
        node = node.args[0]
    return node
