"""Editing an ExportedProgram in place: find module regions, add weights, emit nodes, clean up.

Passes rewrite the ATen graph of a `torch.export.ExportedProgram`. What they share lives here:
- `param(program, fqn)` / `param_node(program, fqn)`: a weight and its placeholder, by qualified name;
- `add_param(program, fqn, tensor)`: a new weight placeholder, registered in the graph signature;
- `emit(program, target, *args)`: a new node whose `meta["val"]` is computed by running the op on
  the arguments' fake values, so later passes and the ONNX exporter see shapes and dtypes;
- `clone(program)`: a copy to edit, so a pass never changes the program it was given;
- `rebuild(program)`: dead code removed, unused weights dropped, a fresh ExportedProgram;
- `rewrite_matches(program, match_all, rewrite)`: a pass's whole run over those: match, and where
  anything matched, clone, match again on the copy, rewrite each region and rebuild.

Weights that are not in memory: an export captures the model on the meta device, so a pass that
computes a new weight from others does it through `dscompile.lazy.derive` (the lazy-weight
protocol, dscompile/lazy.py); `add_param` keeps a new weight's `dsc_source`.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.fx import Node


def _index(program: ExportedProgram) -> tuple[dict[str, str], dict[str, Node]]:
    """(placeholder name -> weight name, weight name -> placeholder), cached on the graph module.

    Looking these up through the graph signature rebuilds its dicts on every call, which makes a
    pass over a 61-layer graph quadratic; the cache is keyed on the signature's identity and size.
    """
    sig = program.graph_signature
    key = (id(sig), len(sig.input_specs), id(program.graph))
    cached = program.graph_module.meta.get("dsc_index")
    if cached is None or cached[0] != key:
        by_name = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
        nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
        cached = (key, by_name, {fqn: nodes[name] for name, fqn in by_name.items() if name in nodes})
        program.graph_module.meta["dsc_index"] = cached
    return cached[1], cached[2]


def param_node(program: ExportedProgram, fqn: str) -> Node | None:
    """The placeholder of the weight called `fqn` (state_dict name), or None."""
    return _index(program)[1].get(fqn)


def param_name(program: ExportedProgram, node: Node) -> str | None:
    """The weight name behind a placeholder node, or None for a user input."""
    return _index(program)[0].get(node.name)


def param(program: ExportedProgram, fqn: str) -> torch.Tensor:
    if fqn in program.state_dict:
        return program.state_dict[fqn]
    return program.constants[fqn]


def _fake_mode(program: ExportedProgram):
    for n in program.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    raise RuntimeError("the exported program carries no fake values")


def add_param(program: ExportedProgram, fqn: str, tensor: torch.Tensor) -> Node:
    """Add a weight (a new graph input of kind PARAMETER) and return its placeholder."""
    if fqn in program.state_dict:
        raise ValueError(f"weight {fqn} already exists")
    graph = program.graph
    user_names = {s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    first_user = next(n for n in graph.nodes if n.op == "placeholder" and n.name in user_names)
    with graph.inserting_before(first_user):
        node = graph.placeholder("p_" + fqn.replace(".", "_"))
    node.meta["val"] = _fake_mode(program).from_tensor(tensor, static_shapes=True)
    specs = list(program.graph_signature.input_specs)
    at = next(i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT)
    specs.insert(at, InputSpec(InputKind.PARAMETER, TensorArgument(node.name), target=fqn, persistent=None))
    program.graph_signature.input_specs[:] = specs
    weight = torch.nn.Parameter(tensor.detach(), requires_grad=False)
    if hasattr(tensor, "dsc_source"):
        weight.dsc_source = tensor.dsc_source
    program.state_dict[fqn] = weight
    program.graph_module.meta.pop("dsc_index", None)
    return node


def _val(x: Any) -> Any:
    if isinstance(x, Node):
        return x.meta["val"]
    if isinstance(x, (list, tuple)):
        return type(x)(_val(v) for v in x)
    return x


def _signature(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", str(tuple(x.shape)), str(x.dtype), str(tuple(x.stride())), str(x.device))
    if isinstance(x, (list, tuple)):
        return tuple(_signature(v) for v in x)
    if isinstance(x, dict):
        return tuple((k, _signature(v)) for k, v in sorted(x.items()))
    return repr(x)


def emit(program: ExportedProgram, target, *args, like: Node | None = None, **kwargs) -> Node:
    """Insert `target(*args, **kwargs)` at the graph's current insertion point, with its fake value.

    `like` lends its nn_module_stack (and stack trace) so the new node stays in its module's region.
    """
    node = program.graph.call_function(target, args, kwargs)
    vals, kwvals = _val(args), _val(kwargs)
    # Every layer emits the same ops on the same symbolic shapes; fake dispatch with symbols is
    # slow (~0.1 s an einsum), so an output value is computed once per signature and shared.
    memo = program.graph_module.meta.setdefault("dsc_emit_vals", {})
    key = (str(target), _signature(vals), _signature(kwvals))
    if key not in memo:
        with _fake_mode(program):
            memo[key] = target(*vals, **kwvals)
    node.meta["val"] = memo[key]
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    return node


def clone(program: ExportedProgram) -> ExportedProgram:
    """A copy whose graph can be edited without touching `program` (weights are shared, not copied)."""
    # Our caches hold fake tensors and nodes of this graph: keep them out of the deep copy
    # (node.meta itself is copied shallowly, so fake values are shared, as they may be).
    src = program.graph_module
    saved = {k: src.meta.pop(k) for k in list(src.meta) if k.startswith("dsc_")}
    try:
        with warnings.catch_warnings():  # torch's own tree specs warn about themselves when copied
            warnings.simplefilter("ignore", FutureWarning)
            gm = copy.deepcopy(src)
            signature, call_graph = copy.deepcopy(program.graph_signature), copy.deepcopy(program.module_call_graph)
    finally:
        src.meta.update(saved)
    if "dsc_emit_vals" in saved:  # same fake mode, same symbols: still valid for the copy
        gm.meta["dsc_emit_vals"] = saved["dsc_emit_vals"]
    return ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=signature,
        state_dict=dict(program.state_dict),
        range_constraints=program.range_constraints,
        module_call_graph=call_graph,
        example_inputs=program.example_inputs,
        constants=dict(program.constants),
        verifiers=[program.verifier],
    )


def rewrite_matches(program: ExportedProgram, match_all: Callable, rewrite: Callable):
    """(new program, count, unmatched): `match_all(program) -> (regions, unmatched)` finds the regions,
    `rewrite(program, region)` rewrites one of them in the copy. The caller's program is never changed,
    and is returned as it is when nothing matched."""
    found, unmatched = match_all(program)
    if not found:
        return program, 0, unmatched
    program = clone(program)
    found, _ = match_all(program)  # the same regions, as nodes of the copy
    for region in found:
        rewrite(program, region)
    return rebuild(program), len(found), unmatched


def rebuild(program: ExportedProgram) -> ExportedProgram:
    """Drop dead nodes and weights nothing reads any more; return a consistent ExportedProgram."""
    graph = program.graph
    # The default purity test keeps ops tagged nondeterministic (attention, for its dropout) even
    # when nothing reads them; export graphs are functional, so only asserts have side effects.
    # A tensor-metadata assert on a value nothing else reads any more checks a value that is
    # never computed: it goes too (else it would keep a replaced computation alive).
    while True:
        graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or "assert" in str(n.target))
        stale = [n for n in graph.nodes if n.target == torch.ops.aten._assert_tensor_metadata.default
                 and isinstance(n.args[0], Node) and n.args[0].op == "call_function" and len(n.args[0].users) == 1]
        if not stale:
            break
        for n in stale:
            graph.erase_node(n)
    unused = {
        n.name for n in graph.nodes if n.op == "placeholder" and not n.users and param_name(program, n) is not None
    }
    specs = [s for s in program.graph_signature.input_specs if not (isinstance(s.arg, TensorArgument) and s.arg.name in unused)]
    dropped = {s.target for s in program.graph_signature.input_specs if s.arg.name in unused}
    for n in [n for n in graph.nodes if n.op == "placeholder" and n.name in unused]:
        graph.erase_node(n)
    program.graph_signature.input_specs[:] = specs
    state_dict = {k: v for k, v in program.state_dict.items() if k not in dropped}
    constants = {k: v for k, v in program.constants.items() if k not in dropped}
    graph.lint()
    program.graph_module.recompile()
    return ExportedProgram(
        root=program.graph_module,
        graph=graph,
        graph_signature=program.graph_signature,
        state_dict=state_dict,
        range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs,
        constants=constants,
        verifiers=[program.verifier],
    )
