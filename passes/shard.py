"""shard: one program for N ranks, tensor-parallel attention and MLPs, expert-parallel MoE.

The pass of the SHARDING stage (passes/__init__.py), run with `options.tp_size` x `options.ep_size`
> 1 after absorb_mla and fuse_moe, on a program of the engine contract; it re-exports the result
with `options.dynamic_shapes`. The result is ONE ExportedProgram that every rank runs; the ranks
differ only in their weights (`Sharded(program, plan).rank_weights(r)`: each split weight of the
program records how a rank's slice is cut from the unsharded one) and in the process groups their
collectives resolve to (the group names in the graph are the placeholders TP_GROUP and WORLD_GROUP;
runtime/sharded.py binds them).

The plan (`Plan(tp_size, ep_size)`, world = tp_size * ep_size ranks; rank r is EP index
r // tp_size, TP index r % tp_size):
- attention: the heads are split over the tp ranks of an EP index. Everything per head is split
  (query projections and the absorbed W_UK/W_UV or folded weights, the up-projection kv_b_proj of
  the un-absorbed form); the latent projection and its norm are replicated, so every rank holds
  the whole latent cache. o_proj (or the folded output weight) is row-parallel: its partial sums
  are all-reduced over the tp group.
- dense MLPs and shared experts: split along their intermediate size over all world ranks;
- routed experts: split over the ep indices (rank r holds experts [e*E/ep, (e+1)*E/ep)), each
  expert's intermediate size over the tp ranks; the gate is replicated and routes to all E
  experts on every rank (`dsc::moe_shard`). An MoE layer's partial sums (routed + shared) are
  all-reduced over the world once. Tokens are not moved: every rank has every token after the
  attention's all-reduce, so "all-gather" is free and the combine is the all-reduce. For decode
  batches this moves one [B, D] tensor per layer; all-to-all dispatch would move K of them.
- embeddings, norms, the router and lm_head are replicated.

What it matches (structurally): every `scaled_dot_product_attention` / `dsc::latent_attention`
(heads on dim 1 of the query); the tensors that make the per-head inputs are followed back
through views, transposes, splits, slices, concatenations, element-wise ops and einsums to the
weights that produce the head dim (a linear's weight rows, an einsum operand's head letter); a
broadcast input (the shared RoPE key expanded over heads) is expanded to the local heads. Every
`dsc::moe` (weights from its arguments). Every SwiGLU MLP linear(silu(linear(x)) * linear(x)).
Shapes written in views and expands are divided where they carry the split dim. The count is the
regions split (attentions, MoE layers, MLPs). A linear(mul(silu(linear), linear)) that is not such an
MLP (a bias, two inputs) stays replicated and is reported (`Unmatched`). Anything the split reaches
that is not one of these forms stops the pass with a one-line ShardError naming the node (sizes
that do not divide name both numbers), which is a PassMatchError recording the region it was
splitting: leaving one region whole would not give a correct program, so it stops even when the
pipeline is not strict.

What it guarantees: summed/gathered over the ranks, the program computes what it was given (up
to float rounding of the all-reduce order).
"""

from __future__ import annotations

import operator
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule, Node

import dscompile.runtime.ops  # noqa: F401  (registers torch.ops.dsc.*)
from dscompile.lazy import derive
from dscompile.passes._match import PassMatchError, Unmatched, hint

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
TP_GROUP, WORLD_GROUP = "dscompile.tp", "dscompile.world"
EXPERT_START = "dscompile_shard_expert_start"  # per-rank constant: the first routed expert it holds
AXES = ("tp", "ep", "world")  # what a weight is split over (Plan.size, Plan.index)

ATTENTION = (aten.scaled_dot_product_attention.default,)
# Views whose shape argument is rewritten when it carries the split dim (not _match.VIEWS: every re-indexing op).
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default, aten.silu.default,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
    aten.pow.Tensor_Scalar, aten.rsqrt.default, aten.exp.default, aten.alias.default, aten.detach.default,
    aten.type_as.default, aten.where.self, aten.masked_fill.Scalar,
}


class ShardError(PassMatchError):
    """The plan cannot split this model or graph (sizes that do not divide, a form it does not know)."""


@dataclass(frozen=True)
class Plan:
    """tp_size tensor-parallel ranks x ep_size expert-parallel ranks."""

    tp_size: int = 1
    ep_size: int = 1

    @property
    def world(self) -> int:
        return self.tp_size * self.ep_size

    def index(self, rank: int, axis: str) -> int:
        return {"tp": rank % self.tp_size, "ep": rank // self.tp_size, "world": rank}[axis]

    def size(self, axis: str) -> int:
        return {"tp": self.tp_size, "ep": self.ep_size, "world": self.world}[axis]

    def groups(self) -> dict[str, list[list[int]]]:
        """The process groups the program's collectives use: ranks of each tp group, and the world."""
        return {TP_GROUP: [[e * self.tp_size + t for t in range(self.tp_size)] for e in range(self.ep_size)],
                WORLD_GROUP: [list(range(self.world))]}

    def to_dict(self) -> dict[str, int]:
        return {"tp": self.tp_size, "ep": self.ep_size, "world_size": self.world}


def check_plan(args, plan: Plan) -> None:
    """One-line ShardError when the plan's sizes do not divide the model's (checked before capture)."""
    if plan.tp_size < 1 or plan.ep_size < 1:
        raise ShardError(f"--tp {plan.tp_size} and --ep {plan.ep_size} must be >= 1")
    H = args.num_attention_heads
    if H % plan.tp_size:
        raise ShardError(f"--tp {plan.tp_size} does not divide the {H} attention heads")
    if args.num_moe_layers:
        E = args.n_routed_experts
        if E % plan.ep_size:
            raise ShardError(f"--ep {plan.ep_size} does not divide the {E} routed experts")
        if args.moe_intermediate_size % plan.tp_size:
            raise ShardError(f"--tp {plan.tp_size} does not divide the experts' intermediate size "
                             f"{args.moe_intermediate_size}")
        shared = args.n_shared_experts * args.moe_intermediate_size
        if shared and shared % plan.world:
            raise ShardError(f"the world size {plan.world} (tp x ep) does not divide the shared experts' "
                             f"intermediate size {shared}")
    elif plan.ep_size > 1:
        raise ShardError(f"--ep {plan.ep_size}: the model has no routed experts to split")
    if args.num_hidden_layers > args.num_moe_layers and args.intermediate_size % plan.world:
        raise ShardError(f"the world size {plan.world} (tp x ep) does not divide the dense MLPs' intermediate "
                         f"size {args.intermediate_size}")


class _Slice:
    """The `dsc_rank` of a split weight of a sharded program: rank r's value is its slice of `full`.
    `spec` [(dim, axis), ...]: rank r holds slice index(r, axis) of size(axis) equal parts."""

    def __init__(self, full: torch.Tensor, spec: tuple[tuple[int, str], ...], plan: Plan):
        self.full, self.spec, self.plan = full, spec, plan

    def at(self, rank: int) -> torch.Tensor:
        return derive(lambda t: _slice(t, self.spec, self.plan, rank), self.full)  # lazy on meta weights


class _ExpertStart:
    """The `dsc_rank` of EXPERT_START: the first routed expert rank r holds (`dsc::moe_shard`)."""

    def __init__(self, plan: Plan, experts_per_rank: int):
        self.plan, self.experts_per_rank = plan, experts_per_rank

    def at(self, rank: int) -> torch.Tensor:
        return torch.tensor(self.plan.index(rank, "ep") * self.experts_per_rank)


@dataclass
class Sharded:
    """A program `run` sharded, read for the export that writes it: each rank's weights, the
    unsharded weights and how they are split, the all-reduces per step."""

    program: ExportedProgram
    plan: Plan

    def _weights(self) -> dict[str, torch.Tensor]:
        constants = {k: v for k, v in self.program.constants.items() if isinstance(v, torch.Tensor)}
        return {**self.program.state_dict, **constants}

    @cached_property
    def specs(self) -> dict[str, list[tuple[int, str]]]:
        """Weight name -> how it is split, for the split weights."""
        return {name: list(t.dsc_rank.spec) for name, t in self._weights().items()
                if isinstance(getattr(t, "dsc_rank", None), _Slice)}

    @cached_property
    def full(self) -> dict[str, torch.Tensor]:
        """The unsharded weights, by the program's names (the per-rank constant aside)."""
        out = {}
        for name, t in self._weights().items():
            source = getattr(t, "dsc_rank", None)
            if not isinstance(source, _ExpertStart):
                out[name] = source.full if isinstance(source, _Slice) else t
        return out

    @cached_property
    def collectives(self) -> dict[str, int]:
        """Process group -> all-reduces per step."""
        return dict(Counter(n.args[2] for n in self.program.graph.nodes
                            if n.op == "call_function" and n.target == c10d.all_reduce.default))

    def rank_weights(self, rank: int) -> dict[str, torch.Tensor]:
        """Rank `rank`'s weights and constants, by the program's names: slices of the unsharded
        ones, computed when read (meta weights stay deferred)."""
        return {name: t.dsc_rank.at(rank) if hasattr(t, "dsc_rank") else t for name, t in self._weights().items()}


def _slice(t: torch.Tensor, spec: tuple[tuple[int, str], ...], plan: Plan, rank: int) -> torch.Tensor:
    for dim, axis in spec:
        n = plan.size(axis)
        size = t.shape[dim] // n
        t = t.narrow(dim, plan.index(rank, axis) * size, size)
    return t.contiguous()


def _plan(options) -> Plan:
    return Plan(options.tp_size, options.ep_size)


def expected(options) -> int:
    """Regions a run should split when the plan has more than one rank: every attention (tp_size > 1),
    every fused MoE layer and every dense MLP."""
    plan, args = _plan(options), options.args
    if plan.world == 1:
        return 0
    attention = args.num_hidden_layers if plan.tp_size > 1 else 0
    return attention + (args.num_moe_layers if options.fuse_moe else 0) + args.num_hidden_layers - args.num_moe_layers


def describe(options) -> dict:
    plan = _plan(options)
    return {"plan": plan.to_dict()} if plan.world > 1 else {}


def run(program: ExportedProgram, options) -> tuple[ExportedProgram, int, list[Unmatched]]:
    """The program every rank runs under the plan (module docstring), re-exported with its local
    shapes; the caller's program is never changed. A single rank leaves it as it is."""
    plan = _plan(options)
    if plan.world == 1:
        return program, 0, []
    gm = program.module()  # a copy of the graph; the weights are the program's own tensors
    state = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    for name in _constant_names(gm):
        state.setdefault(name, getattr(gm, name))
    editor = _Editor(gm, plan)
    editor.run()
    for name, spec in editor.specs.items():
        full = state[name]
        local = torch.empty(_local_shape(full.shape, spec, plan), dtype=full.dtype, device=full.device)
        if isinstance(full, torch.nn.Parameter):
            local = torch.nn.Parameter(local, requires_grad=False)
        local.dsc_rank = _Slice(full, tuple(spec), plan)
        _set_attr(gm, name, local)
    gm.recompile()
    example = _sample_inputs(program)
    with torch.no_grad():
        sharded = torch.export.export(gm, example, dynamic_shapes=options.dynamic_shapes, strict=False)
    return sharded, editor.count, editor.unmatched


def _constant_names(gm: GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "get_attr" and isinstance(getattr(gm, n.target, None), torch.Tensor)]


def _set_attr(gm: GraphModule, name: str, value: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(path)
    if leaf in owner._parameters:
        del owner._parameters[leaf]
    if leaf in owner._buffers:
        del owner._buffers[leaf]
    if isinstance(value, torch.nn.Parameter):
        owner.register_parameter(leaf, value)
    else:
        owner.register_buffer(leaf, value)


def _local_shape(shape, spec, plan: Plan) -> list[int]:
    out = list(shape)
    for dim, axis in spec:
        out[dim] //= plan.size(axis)
    return out


def _sample_inputs(ep: ExportedProgram) -> tuple:
    """The program's sample inputs (on its capture device: the graph asserts it)."""
    if ep.example_inputs is None:
        raise ShardError("shard: the program carries no sample inputs to re-export it with")
    return ep.example_inputs[0]


def _shape(node: Node) -> tuple:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _int(x) -> int | None:
    return int(x) if isinstance(x, int) or (isinstance(x, torch.SymInt) and x.node.is_constant()) else None


def _where(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    region = next(reversed(stack.values()))[0] if stack else ""
    return f"{node.name}" + (f" ({region})" if region else "")


class _Editor:
    """Finds what to split (backward from the anchors) and rewrites the graph (forward)."""

    def __init__(self, gm: GraphModule, plan: Plan):
        self.gm, self.plan = gm, plan
        self.graph = gm.graph
        self.specs: dict[str, list[tuple[int, str]]] = {}  # weight name -> [(dim, axis), ...] it is split on
        self.count = 0  # regions split
        self.unmatched: list[Unmatched] = []
        self.heads: dict[Node, int] = {}  # node -> dim split over tp (backward demands)
        self.expands: set[Node] = set()  # broadcasts over heads: expanded to the local heads instead
        self.state: dict[Node, tuple[int, str] | None] = {}  # node -> (dim, axis) it is split on
        self.partial: dict[Node, str] = {}  # node -> group its partial sums are reduced over

    # -- weights -------------------------------------------------------------------------------
    def _weight(self, node: Node, spec: list[tuple[int, str]], why: str) -> None:
        if node.op != "get_attr":
            raise ShardError(f"shard: {why} at {_where(node)} is computed in the graph, not a weight; cannot split it")
        shape = _shape(node)
        for dim, axis in spec:
            n = self.plan.size(axis)
            if shape[dim] % n:
                raise ShardError(f"shard: {why} {node.target} has {shape[dim]} rows on dim {dim}, which {axis} = {n} "
                                 "does not divide")
        old = self.specs.get(node.target)
        if old is not None and old != spec:
            raise ShardError(f"shard: weight {node.target} would be split two ways ({old} and {spec})")
        self.specs[node.target] = spec

    # -- backward: which tensors carry the heads -------------------------------------------------
    def demand(self, node: Node, dim: int) -> None:
        if not isinstance(node, Node):
            return
        dim = dim % max(len(_shape(node)), 1) if node.op != "get_attr" or _shape(node) else dim
        if node in self.heads:
            if self.heads[node] != dim:
                raise ShardError(f"shard: {_where(node)} carries heads on dims {self.heads[node]} and {dim}")
            return
        self.heads[node] = dim
        if node.op == "get_attr":
            self._weight(node, [(dim, "tp")], "a per-head weight")
            return
        if node.op != "call_function":
            raise ShardError(f"shard: the heads reach {_where(node)} ({node.op}), which is not computed from weights")
        t, a = node.target, node.args
        out = _shape(node)
        if t in RESHAPES:
            self.demand(a[0], _view_dim(_shape(a[0]), out, dim, node))
        elif t == aten.transpose.int:
            d0, d1 = a[1] % len(out), a[2] % len(out)
            self.demand(a[0], d1 if dim == d0 else d0 if dim == d1 else dim)
        elif t == aten.permute.default:
            self.demand(a[0], list(a[1])[dim] % len(out))
        elif t == aten.unsqueeze.default:
            u = a[1] % len(out)
            if u == dim:
                raise ShardError(f"shard: heads on a new dim of size 1 at {_where(node)}")
            self.demand(a[0], dim - (u < dim))
        elif t == operator.getitem:
            src = a[0]
            if src.target not in (aten.split_with_sizes.default, aten.split.Tensor):
                raise ShardError(f"shard: heads reach an item of {src.target} at {_where(node)}")
            if src.args[2] % len(out) == dim if len(src.args) > 2 else dim == 0:
                raise ShardError(f"shard: {_where(src)} splits the head dim")
            self.demand(src.args[0], dim)
        elif t == aten.slice.Tensor:
            if a[1] % len(out) == dim:
                raise ShardError(f"shard: {_where(node)} slices the head dim")
            self.demand(a[0], dim)
        elif t == aten.cat.default:
            if (a[1] if len(a) > 1 else 0) % len(out) == dim:
                raise ShardError(f"shard: {_where(node)} concatenates along the head dim")
            for x in a[0]:
                self.demand(x, dim)
        elif t == aten.expand.default:
            src = _shape(a[0])
            lead = len(out) - len(src)
            if dim < lead or src[dim - lead] == 1:
                self.expands.add(node)  # broadcast over heads: the local expand makes the local heads
            else:
                self.demand(a[0], dim - lead)
        elif t in ELEMENTWISE:
            for x in a:
                if isinstance(x, Node) and isinstance(x.meta.get("val"), torch.Tensor):
                    s = _shape(x)
                    lead = len(out) - len(s)
                    if dim >= lead and s[dim - lead] == out[dim]:
                        self.demand(x, dim - lead)
        elif t == aten.linear.default:
            if dim != len(out) - 1:
                raise ShardError(f"shard: heads on dim {dim} of the projection {_where(node)}")
            self._weight(a[1], [(0, "tp")], "a column-parallel projection's weight")
            if len(a) > 2 and a[2] is not None:
                self._weight(a[2], [(0, "tp")], "a column-parallel projection's bias")
        elif t == aten.einsum.default:
            inputs, output = a[0].replace(" ", "").split("->")
            letter = output[dim]
            for spec, x in zip(inputs.split(","), a[1]):
                if letter in spec:
                    self.demand(x, spec.index(letter))
        else:
            raise ShardError(f"shard: the heads reach {t} at {_where(node)}, which the pass cannot split")

    # -- the whole edit --------------------------------------------------------------------------
    def run(self) -> None:
        nodes = list(self.graph.nodes)
        for node in nodes if self.plan.tp_size > 1 else ():
            if node.op == "call_function" and node.target in ATTENTION + (torch.ops.dsc.latent_attention.default,):
                with self._region(node, "attention heads"):
                    if _shape(node.args[0])[1] % self.plan.tp_size:
                        raise ShardError(f"shard: --tp {self.plan.tp_size} does not divide the "
                                         f"{_shape(node.args[0])[1]} heads of {_where(node)}")
                    if node.target in ATTENTION:
                        for x in node.args[:3]:
                            self.demand(x, 1)
                    else:
                        self.demand(node.args[0], 1)
                        self.demand(node.args[1], 1)
                self.count += 1
        moe = [n for n in nodes if n.op == "call_function" and n.target == torch.ops.dsc.moe.default]
        for node in moe:
            with self._region(node, "experts"):
                self._moe(node)
            self.count += 1
        for node in nodes:
            if node.op == "call_function" and node.target == aten.linear.default:
                with self._region(node, "MLP"):
                    self._mlp(node)
        self._forward()
        self.graph.eliminate_dead_code()
        self.graph.lint()

    @contextmanager
    def _region(self, node: Node, step: str) -> Iterator[None]:
        """Record the region being split in a ShardError raised while splitting it (what --explain prints)."""
        try:
            yield
        except ShardError as err:
            if not err.unmatched:
                err.unmatched.append(Unmatched(hint(node), step, str(err).removeprefix("shard: ")))
            raise

    def _moe(self, node: Node) -> None:
        x, gate, bias, w1, w2, w3, s1, s2, s3, *attrs = node.args
        self._weight(w1, [(0, "ep"), (1, "tp")], "a routed expert weight")
        self._weight(w3, [(0, "ep"), (1, "tp")], "a routed expert weight")
        self._weight(w2, [(0, "ep"), (2, "tp")], "a routed expert weight")
        if s1 is not None:
            self._weight(s1, [(0, "world")], "a shared expert weight")
            self._weight(s3, [(0, "world")], "a shared expert weight")
            self._weight(s2, [(1, "world")], "a shared expert weight")
        if not hasattr(self.gm, EXPERT_START):
            device = operator.attrgetter(w1.target)(self.gm).device
            start = torch.zeros((), dtype=torch.int64, device=device)
            start.dsc_rank = _ExpertStart(self.plan, _shape(w1)[0] // self.plan.ep_size)
            self.gm.register_buffer(EXPERT_START, start)
        with self.graph.inserting_before(node):
            start = self.graph.get_attr(EXPERT_START)
            start.meta["val"] = torch.empty((), dtype=torch.int64, device="meta")
        node.target = torch.ops.dsc.moe_shard.default
        node.args = (x, gate, bias, w1, w2, w3, s1, s2, s3, *attrs, start)
        self.partial[node] = WORLD_GROUP

    def _mlp(self, down: Node) -> None:
        """A SwiGLU MLP linear(silu(linear(x, g)) * linear(x, u), d): split over the world."""
        mul = down.args[0]
        if not (isinstance(mul, Node) and mul.target == aten.mul.Tensor and len(mul.args) == 2):
            return
        a, b = mul.args
        if isinstance(b, Node) and b.target == aten.silu.default:
            a, b = b, a
        if not (isinstance(a, Node) and a.target == aten.silu.default and isinstance(b, Node)
                and b.target == aten.linear.default):
            return
        gate = a.args[0]
        if not (isinstance(gate, Node) and gate.target == aten.linear.default):
            return
        if any(n in self.heads for n in (gate, b, mul, down)):
            return  # part of an attention, split with its heads
        if gate.args[0] is not b.args[0]:
            self.unmatched.append(Unmatched(hint(down), "MLP", f"{gate.name} and {b.name} read different inputs: "
                                                             "replicated"))
            return
        if any(len(n.args) > 2 and n.args[2] is not None for n in (gate, b, down)):
            self.unmatched.append(Unmatched(hint(down), "MLP", "a projection has a bias: replicated"))
            return
        self.count += 1
        self._weight(gate.args[1], [(0, "world")], "an MLP's gate weight")
        self._weight(b.args[1], [(0, "world")], "an MLP's up weight")
        self._weight(down.args[1], [(1, "world")], "an MLP's down weight")

    # -- forward: local shapes and the all-reduces -------------------------------------------------
    def _forward(self) -> None:
        for node in list(self.graph.nodes):
            with self._region(node, "forward"):
                self._forward_node(node)

    def _forward_node(self, node: Node) -> None:
        """The node's split state after the split inputs reach it (its local shape, an all-reduce)."""
        if node.op == "get_attr":
            spec = self.specs.get(node.target)
            self.state[node] = spec[0] if spec and len(spec) == 1 else None
            return
        if node.op != "call_function":
            if node.op == "output":
                for x in torch.utils._pytree.tree_leaves(node.args):
                    if isinstance(x, Node) and self.state.get(x):
                        raise ShardError(f"shard: the output {_where(x)} is still split; the pass cannot "
                                         "gather it")
            return
        split = [(x, self.state.get(x)) for x in _inputs(node) if self.state.get(x)]
        if node in self.expands:
            self._resize(node, node.args[1], self.heads[node], "tp")
            self.state[node] = (self.heads[node], "tp")
            return
        if node.target == torch.ops.dsc.moe_shard.default or not split:
            self.state[node] = None
        else:
            self.state[node] = self._rule(node, split)
        if node in self.partial:
            self._all_reduce(node, self.partial[node])

    def _rule(self, node: Node, split: list[tuple[Node, tuple[int, str]]]) -> tuple[int, str] | None:
        t, a = node.target, node.args
        out = _shape(node)
        x, (dim, axis) = split[0]
        if t == aten.linear.default:
            xs, ws = self.state.get(a[0]), self.state.get(a[1])
            if xs is None and ws is not None and ws[0] == 0:  # column-parallel: the weight's rows are split
                return (len(out) - 1, ws[1])
            if xs is not None and xs[0] == len(_shape(a[0])) - 1:  # row-parallel: partial sums
                if ws is None:
                    self._weight(a[1], [(1, xs[1])], "a row-parallel projection's weight")
                elif ws != (1, xs[1]):
                    raise ShardError(f"shard: {_where(node)} multiplies a split input by a weight split otherwise")
                if len(a) > 2 and a[2] is not None:
                    raise ShardError(f"shard: the row-parallel projection {_where(node)} has a bias")
                self.partial[node] = _group(xs[1])
                return None
            if xs is not None and ws is None:
                return xs
            raise ShardError(f"shard: {_where(node)} multiplies a split input by a weight split otherwise")
        if t in RESHAPES:
            d = _view_dim_forward(_shape(a[0]), out, dim, node)
            self._resize(node, a[1], d, axis)
            return (d, axis)
        if t == aten.transpose.int:
            d0, d1 = a[1] % len(out), a[2] % len(out)
            return (d1 if dim == d0 else d0 if dim == d1 else dim, axis)
        if t == aten.permute.default:
            return ([p % len(out) for p in a[1]].index(dim), axis)
        if t == aten.unsqueeze.default:
            u = a[1] % len(out)
            return (dim + (u <= dim), axis)
        if t == aten.cat.default:
            if any(self.state.get(y) != (dim, axis) for y in a[0]):
                raise ShardError(f"shard: {_where(node)} concatenates split and unsplit tensors")
            if (a[1] if len(a) > 1 else 0) % len(out) == dim:
                raise ShardError(f"shard: {_where(node)} concatenates along the split dim")
            return (dim, axis)
        if t in (aten.split_with_sizes.default, aten.split.Tensor, aten.slice.Tensor):
            along = (a[2] if len(a) > 2 else 0) if t != aten.slice.Tensor else (a[1] if len(a) > 1 else 0)
            if along % len(_shape(x)) == dim:
                raise ShardError(f"shard: {_where(node)} cuts along the split dim")
            return (dim, axis)
        if t == operator.getitem:
            return (dim, axis)
        if t == aten._assert_tensor_metadata.default:
            return None
        if t in ELEMENTWISE:
            lead = len(out) - len(_shape(x))
            return (dim + lead, axis)
        if t == aten.expand.default:
            lead = len(out) - len(_shape(x))
            return (dim + lead, axis)
        if t in ATTENTION or t == torch.ops.dsc.latent_attention.default:
            return (1, axis)
        if t == aten.einsum.default:
            inputs, output = a[0].replace(" ", "").split("->")
            specs = inputs.split(",")
            letters = {spec[self.state[y][0]] for spec, y in zip(specs, a[1]) if self.state.get(y)}
            if len(letters) != 1:
                raise ShardError(f"shard: {_where(node)} mixes inputs split on different dims")
            letter = letters.pop()
            for spec, y in zip(specs, a[1]):  # a weight indexed by the split letter is split with it
                if letter in spec and not self.state.get(y):
                    self._weight(y, [(spec.index(letter), axis)], "an einsum weight over the split dim")
                    self.state[y] = (spec.index(letter), axis)
            if letter in output:
                return (output.index(letter), axis)
            self.partial[node] = _group(axis)
            return None
        if t == aten.sym_size.int:
            if a[1] % len(_shape(x)) == dim:
                raise ShardError(f"shard: {_where(node)} reads the size of the split dim")
            return None
        raise ShardError(f"shard: a split tensor reaches {t} at {_where(node)}, which the pass cannot split")

    def _resize(self, node: Node, sizes, dim: int, axis: str) -> None:
        sizes = list(sizes)
        n = self.plan.size(axis)
        size = _int(sizes[dim]) if not isinstance(sizes[dim], Node) else None
        if size is None:
            raise ShardError(f"shard: {_where(node)} gives the split dim a computed size")
        if size != -1:
            sizes[dim] = size // n
        node.args = (node.args[0], sizes, *node.args[2:])

    def _all_reduce(self, node: Node, group: str) -> None:
        users = list(node.users)
        with self.graph.inserting_after(node):
            reduced = self.graph.call_function(c10d.all_reduce.default, (node, "sum", group))
        with self.graph.inserting_after(reduced):
            waited = self.graph.call_function(c10d.wait_tensor.default, (reduced,))
        for user in users:
            user.replace_input_with(node, waited)
        self.state[reduced] = self.state[waited] = None


def _group(axis: str) -> str:
    """The group a sum of partial results over `axis` is all-reduced over (ep partials sum over all ranks)."""
    return TP_GROUP if axis == "tp" else WORLD_GROUP


def _inputs(node: Node) -> list[Node]:
    return [x for x in torch.utils._pytree.tree_leaves((node.args, node.kwargs)) if isinstance(x, Node)]


def _sym(size) -> Any:
    import sympy

    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _prod(sizes) -> Any:
    import sympy

    return sympy.Mul(*[_sym(s) for s in sizes]) if sizes else sympy.Integer(1)


def _view_dim(src: tuple, out: tuple, dim: int, node: Node) -> int:
    """The input dim of a view whose leading part is output dim `dim` (the heads, backward)."""
    before, n = _prod(out[:dim]), _int(out[dim])
    acc = _prod(())
    for d, size in enumerate(src):
        if acc == before and n is not None and _int(size) is not None and (_int(size) % n == 0 or n % _int(size) == 0):
            return d
        acc = acc * _sym(size)
    raise ShardError(f"shard: the view {_where(node)} moves the head dim across others ({src} -> {out})")


def _view_dim_forward(src: tuple, out: tuple, dim: int, node: Node) -> int:
    """The output dim of a view that starts where input dim `dim` starts (forward)."""
    before = _prod(src[:dim])
    acc = _prod(())
    for d, size in enumerate(out):
        if acc == before and _int(size) is not None:
            return d
        acc = acc * _sym(size)
    raise ShardError(f"shard: the view {_where(node)} moves the split dim across others ({src} -> {out})")
