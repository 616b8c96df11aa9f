"""fuse_moe: replace each DeepSeekMoE layer's dense reference graph with one `dsc::moe` op.

The reference (model/transformer.py, `MoE`) routes every token, runs *all* E routed experts on
it and combines them with a dense [L, E] weight matrix that is zero outside the chosen experts:
    out[t] = Σ_{e<E} combine[t,e] · expert_e(x[t]) + shared(x[t])
Identity: combine[t,e] is exactly 0 for every expert not among the K chosen ones (it is a
scatter of the K routing weights into zeros), so
    Σ_{e<E} combine[t,e] · expert_e(x[t]) = Σ_{k<K} w[t,k] · expert_{idx[t,k]}(x[t])
and the shared experts are added with weight 1 either way. `dsc::moe` computes the right-hand
side with real dispatch (only the chosen experts run, on their tokens): E/K times fewer expert
FLOPs, and for a few tokens only the chosen experts' weights are read.

The region is each `MoE` module call. Its structure is checked before rewriting (one activation
input, one output of the input's shape, a top-k, the scoring function the config names, the
expert weights by name); a region that fails a check is an error naming the region and why.
The op reuses the region's weight placeholders (no weight is copied) and takes its routing
attributes from the config.

Shape legend: B batch, S new tokens, L tokens flattened (B*S), D hidden, E routed experts,
K active experts per token, I expert intermediate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import ExportedProgram
from torch.fx import Node

import dscompile.runtime.ops  # noqa: F401  (registers torch.ops.dsc.*)
from dscompile.passes.ep_edit import Region, clone, emit, param_name, param_node, rebuild, regions
from dscompile.errors import DscompileError
from dscompile.runtime.ops.moe import check_expert_weights, check_routing_args

aten = torch.ops.aten
MOE_OP = torch.ops.dsc.moe.default
SOFTMAX_OPS = (aten._softmax.default, aten.softmax.int, aten._safe_softmax.default)


class FuseMoeError(DscompileError):
    """An MoE region does not have the structure the pass rewrites."""


@dataclass
class _Plan:
    """What one checked region becomes: x and the weight placeholders of the dsc.moe call."""

    region: Region
    out: Node  # the region's one output, [B, S, D]
    x: Node  # its one activation input, [B, S, D]
    weights: list[Node | None]  # gate, bias, w1, w2, w3, shared_w1, shared_w2, shared_w3


def run(ep: ExportedProgram, options) -> tuple[ExportedProgram, int]:
    """Fuse every MoE layer into one `dsc.moe` node; count == number of MoE layers rewritten."""
    if not options.fuse_moe:
        return ep, 0
    args = options.args
    found = regions(ep, "MoE")
    # A region already fused (its only node is dsc.moe: the pass ran before) is in the target
    # form; it is neither rewritten nor counted.
    todo = [r for r in found if not (len(r.nodes) == 1 and r.nodes[0].target == MOE_OP)]
    if len(found) != args.num_moe_layers:
        raise FuseMoeError(f"graph: the config has {args.num_moe_layers} MoE layers but the graph has "
                           f"{len(found)} MoE regions")
    # Every region is checked before any is edited.
    if not todo:
        return ep, 0
    # Edit a copy: the caller's program is never changed, whatever fails below.
    ep = clone(ep)
    paths = {r.path for r in todo}
    plans = [_check(ep, r, args) for r in regions(ep, "MoE") if r.path in paths]
    for plan in plans:
        _rewrite(ep, plan, args)
    return rebuild(ep), len(plans)


def _fail(region: Region, reason: str) -> FuseMoeError:
    return FuseMoeError(f"{region.path}: {reason}")


def _is_tensor(n: Node) -> bool:
    return isinstance(n.meta.get("val"), torch.Tensor)


def _weight(ep: ExportedProgram, region: Region, name: str, reads: set[Node]) -> Node:
    """The placeholder of `{region}.{name}`, which the region must read."""
    node = param_node(ep, f"{region.path}.{name}")
    if node is None:
        raise _fail(region, f"weight {name} not found")
    if node not in reads:
        raise _fail(region, f"weight {name} exists but the region does not read it")
    return node


def _check(ep: ExportedProgram, region: Region, args) -> _Plan:
    """The region's x, output and weights, or a FuseMoeError saying which expectation fails."""
    inputs = region.inputs()
    # Symbolic sizes (sym_size nodes) are inputs too but not tensors; weights are placeholders.
    acts = [n for n in inputs if _is_tensor(n) and param_name(ep, n) is None]
    if len(acts) != 1:
        raise _fail(region, f"expected one activation input, found {len(acts)} ({', '.join(n.name for n in acts)})")
    x = acts[0]
    # Symbolic sizes computed in the region (B*S) may be reused by later layers: not outputs.
    outs = [n for n in region.outputs() if _is_tensor(n)]
    if len(outs) != 1:
        raise _fail(region, f"expected one output, found {len(outs)} ({', '.join(n.name for n in outs)})")
    out = outs[0]
    x_val, out_val = x.meta["val"], out.meta["val"]
    if out_val.shape != x_val.shape or out_val.dtype != x_val.dtype:
        raise _fail(region, f"the output {out.name} does not have the shape and dtype of the input {x.name}")

    topks = [n for n in region.nodes if n.target == aten.topk.default]
    if not topks:
        raise _fail(region, "no top-k: the region does not route")
    if not any(n.args[1] == args.num_experts_per_tok for n in topks):
        raise _fail(region, f"no top-k with k = num_experts_per_tok ({args.num_experts_per_tok})")
    has_sigmoid = any(n.target == aten.sigmoid.default for n in region.nodes)
    has_softmax = any(n.target in SOFTMAX_OPS for n in region.nodes)
    if args.topk_method == "noaux_tc" and not (has_sigmoid and not has_softmax):
        raise _fail(region, "topk_method noaux_tc needs sigmoid scores but the graph "
                            + ("has softmax" if has_softmax else "has no sigmoid"))
    if args.topk_method != "noaux_tc" and not (has_softmax and not has_sigmoid):
        raise _fail(region, f"topk_method {args.topk_method} needs softmax scores but the graph "
                            + ("has sigmoid" if has_sigmoid else "has no softmax"))

    reads = set(inputs)
    gate = _weight(ep, region, "gate.weight", reads)
    bias = _weight(ep, region, "gate.e_score_correction_bias", reads) if args.topk_method == "noaux_tc" else None
    w1, w3, w2 = (_weight(ep, region, f"experts.{p}", reads) for p in ("gate_proj", "up_proj", "down_proj"))
    shared: list[Node | None] = [None, None, None]
    if args.n_shared_experts:
        shared = [_weight(ep, region, f"shared_experts.{p}.weight", reads) for p in ("gate_proj", "down_proj", "up_proj")]
    # The op's own argument checks, here so they fail before the graph is edited, with the region.
    try:
        check_expert_weights(x_val.reshape(-1, x_val.shape[-1]), w1.meta["val"], w2.meta["val"], w3.meta["val"])
        check_routing_args(gate.meta["val"].shape[0], args.num_experts_per_tok, args.n_group, args.topk_group,
                           args.topk_method)
    except ValueError as err:
        raise _fail(region, str(err)) from None
    return _Plan(region, out, x, [gate, bias, w1, w2, w3, *shared])


def _rewrite(ep: ExportedProgram, plan: _Plan, args) -> None:
    with ep.graph.inserting_after(plan.out):
        fused = emit(ep, MOE_OP, plan.x, *plan.weights,
                     int(args.num_experts_per_tok), int(args.n_group), int(args.topk_group), str(args.topk_method),
                     bool(args.norm_topk_prob), float(args.routed_scaling_factor), like=plan.out)
    plan.out.replace_all_uses_with(fused)
    # rebuild() keeps asserts; the region's tensor-metadata asserts check tensors (the dtype casts
    # of x, the gate weight and the expert sum) that are going away and would keep the dense
    # experts alive.
    for n in reversed(plan.region.nodes):
        if n.target == aten._assert_tensor_metadata.default and not n.users:
            ep.graph.erase_node(n)
