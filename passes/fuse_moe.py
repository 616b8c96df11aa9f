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

What it matches (by operators, shapes and dataflow; names only label messages), anchored on
each projection by a weight [E, D] (the router) from which a top-k is reached:
- scoring: the logits go to one softmax over the experts, or to one sigmoid;
- selection: the scores, or (sigmoid only) the scores plus a per-expert bias [E];
- group limit (optional): the selection scores unflattened into G contiguous groups, a group
  ranked by its best score (softmax) or the sum of its best two (sigmoid), a top-k of groups
  scattered into a keep mask that masks the other experts with -inf (or with a value every kept
  score is above: softmax scores, unbiased sigmoid scores);
- top-k: the K largest selection scores over the experts;
- weights: the chosen experts' unbiased scores (gathered, or the top-k values when selection is
  the scores), optionally divided by their sum (plus an epsilon), optionally times a constant;
- experts: SwiGLU experts w2·(silu(w1·x) * w3·x) with stacked [E, ...] weights, either on every
  token combined by a [L, E] matrix scattered from the weights at the chosen ids (the reference
  model), or on each token's K chosen experts' gathered weights, weighted and summed over K
  (transformers' batched_mm experts; gate and up may be one stacked [E, 2I, D] weight);
- output: plus (optionally) a shared SwiGLU MLP of the same input, in the input's shape.
k, the groups, the method, normalization and scaling come from the graph; the config only says
how many layers to expect. A region that fails a step is left as it is and reported (`Unmatched`).

What it guarantees: `dsc.moe` with those attributes computes what the region computed, up to
float rounding and ties among equal scores. It reads the region's weight placeholders (a
stacked gate/up weight is split into two derived weights; nothing else is copied).

Shape legend: B batch, S new tokens, L tokens flattened (B*S), D hidden, E routed experts,
K active experts per token, I expert intermediate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.export import ExportedProgram
from torch.fx import Node

import dscompile.runtime.ops  # noqa: F401  (registers torch.ops.dsc.*)
from dscompile.lazy import derive
from dscompile.passes._edit import add_param, emit, param, param_node, rewrite_matches
from dscompile.passes._match import (SOFTMAX, VIEWS, Miss, Unmatched, call, forward, getitem, hint, linear, need,
                                    scalar, shape, source, split_part, users, weight)
from dscompile.runtime.ops.moe import check_expert_weights, check_routing_args

aten = torch.ops.aten
MOE_OP = torch.ops.dsc.moe.default
# Ops a 0/1 mask passes through unchanged in meaning.
_MASK_CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout)


@dataclass
class _Match:
    """One MoE layer read from the graph: the activation, the node it replaces, weights, routing."""

    label: str
    x: Node  # the layer input [..., D]
    out: Node  # the layer output (x's shape), replaced by the fused op
    gate: Node  # router weight [E, D]
    bias: Node | None  # selection bias [E]
    experts: dict[str, str]  # "w1"/"w3"/"w2" or "w13" (gate and up stacked) -> weight name
    shared: list[str] | None  # shared expert weights (gate, down, up) or None
    routing: dict = field(default_factory=dict)  # dsc.moe's routing attributes


def expected(options) -> int:
    """Regions a run should rewrite: the config's MoE layers (none when fusion is off)."""
    return options.args.num_moe_layers if options.fuse_moe else 0


def run(program: ExportedProgram, options) -> tuple[ExportedProgram, int, list[Unmatched]]:
    """Fuse every MoE layer that matches into one `dsc.moe` node; the rest stay, with their reason."""
    if not options.fuse_moe:
        return program, 0, []
    return rewrite_matches(program, _match_all, _rewrite)


def _match_all(program: ExportedProgram) -> tuple[list[_Match], list[Unmatched]]:
    found, unmatched = [], []
    for gate in _routers(program):
        try:
            found.append(match(program, gate))
        except Miss as miss:
            unmatched.append(Unmatched(hint(gate), miss.step, miss.found))
    return found, unmatched


def _routers(program: ExportedProgram) -> list[Node]:
    """Candidate routers: projections by a weight from which a top-k is reached within a few ops."""
    out = []
    for n in program.graph.nodes:
        if not call(n, aten.linear.default, aten.mm.default, aten.matmul.default):
            continue
        try:
            linear(program, n)
        except Miss:
            continue
        frontier, seen = [n], set()
        for _ in range(6):
            frontier = [u for f in frontier for u in f.users if u not in seen]
            seen.update(frontier)
            if any(call(u, aten.topk.default) for u in frontier):
                out.append(n)
                break
    return out


def _uses(n: Node, *targets) -> list[Node]:
    return [u for u in users(n) if call(u, *targets)]


def _mask_source(n: Node) -> Node:
    """Back through views and dtype casts of a 0/1 mask."""
    while call(n, *VIEWS, *_MASK_CASTS):
        n = n.args[0]
    return n


def match(program: ExportedProgram, gate_node: Node) -> _Match:
    """Read one router's layer as DeepSeekMoE, or raise Miss naming the first step that does not hold."""
    router = linear(program, gate_node)
    need(router.bias is None, "router", f"{router.weight_name} has a bias")
    x = source(router.x)
    E = int(shape(router.weight)[0])
    # Scoring: softmax over the experts or a sigmoid of each logit.
    after = forward(router.node)
    scored = [u for u in users(after) if call(u, *SOFTMAX, aten.sigmoid.default)]
    need(len(scored) == 1 and len(users(after)) == 1, "scoring",
         "the router logits go to " + ", ".join(sorted({_name(u) for u in after.users})) + ", not one softmax or sigmoid")
    scores = scored[0]
    scoring = "sigmoid" if call(scores, aten.sigmoid.default) else "softmax"
    if scoring == "softmax":
        need(scores.args[1] in (-1, len(shape(scores)) - 1), "scoring", "softmax is not over the experts")
    # Selection: the scores, plus a per-expert bias (sigmoid scoring only).
    choice, bias = scores, None
    adds = [u for u in _uses(scores, aten.add.Tensor) if isinstance(u.args[1], Node)]
    if adds:
        need(scoring == "sigmoid" and len(adds) == 1, "selection",
             f"{scoring} scores with a bias added to them for selection")
        other = adds[0].args[1] if adds[0].args[0] is scores else adds[0].args[0]
        need(weight(program, other) is not None and shape(other) == (E,), "selection",
             f"the scores get {other.name} added, not a per-expert bias")
        choice, bias = adds[0], source(other)
    routing = dict(topk_method=None, n_group=1, topk_group=1)
    # Group limit: experts outside the best groups are masked before the top-k.
    fills = _uses(choice, aten.masked_fill.Scalar, aten.masked_fill.Tensor)
    ranked = choice
    if fills:
        need(len(fills) == 1, "group limit", f"the selection scores are masked {len(fills)} times")
        ranked = fills[0]
        G, topk_group, kind = _group_limit(ranked, choice, E)
        fill = ranked.args[2]
        fill = float(fill) if not isinstance(fill, Node) else None
        need(fill is not None, "group limit", "the masked experts get a computed value")
        if fill != -math.inf:
            # Equivalent to -inf only where every kept score is above the fill value.
            need(scoring == "softmax" and fill <= 0.0 or scoring == "sigmoid" and bias is None and fill <= 0.0,
                 "group limit", f"masked experts get {fill}, which a biased score can rank below")
        want = "max" if scoring == "softmax" else "top2-sum"
        need(kind == want, "group limit", f"{scoring} groups are ranked by their {kind}, where dsc.moe ranks by their {want}")
        routing.update(n_group=G, topk_group=topk_group)
    # The top-k over the experts.
    topks = _uses(ranked, aten.topk.default)
    need(len(topks) == 1, "top-k", f"{len(topks)} top-k of the selection scores")
    topk = topks[0]
    need((topk.args[2] if len(topk.args) > 2 else -1) in (-1, len(shape(ranked)) - 1), "top-k", "top-k is not over the experts")
    need(topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True), "top-k",
         "the top-k picks the smallest scores")
    K = int(topk.args[1])
    ids = [u for u in users(topk) if getitem(u) and getitem(u)[1] == 1]
    values = [u for u in users(topk) if getitem(u) and getitem(u)[1] == 0]
    need(len(ids) == 1, "top-k", "the chosen experts' ids are not used once")
    ids = ids[0]
    # Weights: the chosen experts' (unbiased) scores.
    gathers = [u for u in _uses(scores, aten.gather.default) if source(u.args[2], casts=False) is ids]
    if gathers:
        weights = gathers[0]
    else:
        need(values and choice is scores, "weights", "the routing weights are not the chosen experts' scores")
        weights = values[0]
    norm, factor, weights = _post(weights)
    if scoring == "softmax":
        need(not (norm and factor != 1.0), "weights", "softmax weights both normalized and scaled")
        need(not norm or K > 1, "weights", "one expert's weight normalized by itself")
        routing["topk_method"] = "group_limited_greedy" if fills else "greedy"
    else:
        routing["topk_method"] = "noaux_tc"
    routing.update(top_k=K, norm_topk_prob=norm, routed_scaling_factor=factor)
    experts, routed = _experts(program, x, ids, weights, E)
    out, shared = _combine(program, x, routed)
    try:
        check_routing_args(E, K, routing["n_group"], routing["topk_group"], routing["topk_method"])
    except ValueError as err:
        raise Miss("routing", str(err)) from None
    try:
        check_expert_weights(*_expert_shapes(program, x, experts))
    except ValueError as err:
        raise Miss("experts", str(err)) from None
    return _Match(hint(gate_node), x, out, router.weight, bias, experts, shared, routing)


def _expert_shapes(program: ExportedProgram, x: Node, experts: dict[str, str]) -> tuple[torch.Tensor, ...]:
    """Meta tensors of x [L, D] and the op's w1, w2, w3 (a stacked gate/up counts as two halves)."""
    meta = lambda shape_: torch.empty(shape_, device="meta")  # noqa: E731
    D = shape(x)[-1]
    if "w13" in experts:
        E, I2, D2 = param(program, experts["w13"]).shape
        w1 = w3 = meta((E, I2 // 2, D2))
    else:
        w1, w3 = meta(param(program, experts["w1"]).shape), meta(param(program, experts["w3"]).shape)
    return meta((1, D)), w1, meta(param(program, experts["w2"]).shape), w3


def _name(n: Node) -> str:
    return getattr(n.target, "__name__", str(n.target)).split(".")[0]


def _group_limit(masked: Node, choice: Node, E: int) -> tuple[int, int, str]:
    """(groups, groups kept, how a group ranks) of masked_fill(choice, ~keep[experts], fill)."""
    mask = masked.args[1]
    need(call(mask, aten.bitwise_not.default, aten.logical_not.default), "group limit",
         f"the selection scores are masked by {mask.name}, not by the complement of kept groups")
    keep = _mask_source(mask.args[0])
    need(call(keep, aten.expand.default) or call(keep, aten.scatter.value, aten.scatter.src), "group limit",
         "the mask is not one value per group spread over its experts")
    while not call(keep, aten.scatter.value, aten.scatter.src) and call(keep, aten.expand.default, aten.unsqueeze.default,
                                                                          *_MASK_CASTS):
        keep = keep.args[0]
    need(call(keep, aten.scatter.value, aten.scatter.src) and keep.args[1] in (1, -1), "group limit",
         "the kept groups are not marked by a scatter")
    G = int(shape(keep)[-1])
    need(E % G == 0, "group limit", f"{G} groups of {E} experts")
    best = getitem(keep.args[2])
    need(best is not None and best[1] == 1 and call(best[0], aten.topk.default), "group limit",
         "the kept groups are not a top-k of group scores")
    gtopk = best[0]
    topk_group = int(gtopk.args[1])
    group_scores = source(gtopk.args[0], casts=False)
    kind = None
    if call(group_scores, aten.amax.default):
        kind, grouped = "max", group_scores.args[0]
    elif getitem(group_scores) and call(getitem(group_scores)[0], aten.max.dim):
        kind, grouped = "max", getitem(group_scores)[0].args[0]
    elif call(group_scores, aten.sum.dim_IntList):
        inner = getitem(source(group_scores.args[0], casts=False))
        need(inner and call(inner[0], aten.topk.default) and inner[1] == 0, "group limit", "groups ranked by a sum of something else")
        kind, grouped = f"top{inner[0].args[1]}-sum", inner[0].args[0]
        if inner[0].args[1] == E // G == 1:
            kind = "top2-sum"  # one expert per group: its one score
    need(kind is not None, "group limit", f"groups ranked by {group_scores.name}, not their best score(s)")
    need(source(grouped, casts=False) is choice and shape(grouped)[-2:] == (G, E // G), "group limit",
         "group scores not computed from the selection scores in contiguous groups")
    return G, topk_group, kind


def _post(w: Node) -> tuple[bool, float, Node]:
    """(normalized, scale, final weights) after the chosen scores: an optional division by their
    sum (plus an epsilon) and an optional multiplication by a constant, in that order."""
    norm, factor = False, 1.0
    n = w
    while True:
        nxt = forward(n)
        divs = [u for u in users(nxt) if call(u, aten.div.Tensor) and u.args[0] is nxt]
        muls = [u for u in users(nxt) if call(u, aten.mul.Tensor) and scalar(u.args[1]) is not None]
        if len(users(nxt)) == 2 and divs and not norm:
            den = source(divs[0].args[1], casts=False)
            if call(den, aten.add.Tensor) and scalar(den.args[1]) is not None:
                den = source(den.args[0], casts=False)
            need(call(den, aten.sum.dim_IntList) and source(den.args[0], casts=False) is nxt, "weights",
                 "the chosen scores are divided by something other than their sum")
            norm, n = True, divs[0]
        elif len(users(nxt)) == 1 and muls and factor == 1.0:
            factor, n = float(muls[0].args[1]), muls[0]
        else:
            return norm, factor, nxt


def _experts(program: ExportedProgram, x: Node, ids: Node, weights: Node, E: int) -> tuple[dict[str, str], Node]:
    """The routed experts' weights and the node holding Σ_k w_k·expert_{id_k}(x), [L, D]."""
    scatters = [u for u in users(weights) if call(u, aten.scatter.src) and u.args[3] is weights]
    if scatters:
        return _dense_experts(program, x, ids, scatters[0], E)
    return _gathered_experts(program, x, ids, weights, E)


def _canon(eq: str) -> str:
    names: dict[str, str] = {}
    return "".join(names.setdefault(c, "abcdefgh"[len(names)]) if c.isalpha() else c for c in eq)


def _dense_experts(program, x, ids, scatter, E):
    """Every expert on every token, combined by a [L, E] matrix holding the K weights (0 elsewhere)."""
    need(source(scatter.args[2], casts=False) is ids and scatter.args[1] in (1, -1) and
         call(scatter.args[0], aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default), "experts",
         "the combine matrix is not the routing weights scattered into zeros at the chosen experts")
    combines = [u for u in users(forward(scatter)) if call(u, aten.einsum.default)]
    need(len(combines) == 1 and _canon(combines[0].args[0]) == "abc,ab->ac", "experts",
         "the combine matrix does not weight each expert's output [L, E, D] over E")
    y = source(combines[0].args[1][0])
    need(call(y, aten.einsum.default) and _canon(y.args[0]) == "abc,bdc->abd", "experts",
         "the combined outputs are not a per-expert down projection")
    h, w2 = y.args[1]
    need(weight(program, w2) is not None, "experts", "the down projection is not by a weight")
    w1, w3 = _gated(program, source(h), x, lambda n: call(n, aten.einsum.default) and _canon(n.args[0]) == "ab,cdb->acd",
                    lambda n: n.args[1][1], lambda n: n.args[1][0])
    return {"w1": w1, "w3": w3, "w2": weight(program, w2)}, combines[0]


def _gated(program, h, x, is_proj, weight_of, input_of) -> tuple[str, str]:
    """h = silu(proj_1(x)) * proj_3(x): the gate and up weight names."""
    need(call(h, aten.mul.Tensor), "experts", f"the expert activation is {_name(h)}, not silu(gate) * up")
    a, b = (source(t) for t in h.args)
    if call(b, aten.silu.default):
        a, b = b, a
    need(call(a, aten.silu.default), "experts", "the expert activation is not silu(gate) * up")
    g = source(a.args[0])
    need(is_proj(g) and is_proj(b), "experts", "silu(gate) * up of something other than two expert projections")
    need(source(input_of(g)) is x and source(input_of(b)) is x, "experts", "the experts do not read the layer input")
    w1, w3 = weight(program, weight_of(g)), weight(program, weight_of(b))
    need(w1 is not None and w3 is not None, "experts", "an expert projection is not by a weight")
    return w1, w3


def _gathered_experts(program, x, ids, weights, E):
    """Each token's K chosen experts' weights gathered and applied as batched matmuls:
    y[t,k] = W2[id]·(silu(W1[id] x_t) * W3[id] x_t), out[t] = Σ_k w[t,k]·y[t,k]."""
    # out = (y * w.reshape(-1).unsqueeze(-1)).view(L, K, D).sum(1)
    scaled = [u for u in _usersforward(weights) if call(u, aten.mul.Tensor)]
    need(len(scaled) == 1, "experts", "the routing weights neither build a combine matrix nor scale expert outputs")
    mul = scaled[0]
    y = mul.args[0] if source(mul.args[1], casts=False) is source(weights, casts=False) else mul.args[1]
    total = forward(mul)
    sums = [u for u in users(total) if call(u, aten.sum.dim_IntList)]
    need(len(sums) == 1 and shape(total)[-2] == shape(source(ids, casts=False))[-1], "experts",
         "the weighted expert outputs are not summed over the K chosen experts")
    down = _gathered_linear(program, y, ids)
    need(down is not None, "experts", "the expert outputs are not a down projection by the chosen experts' weights")
    w2, h = down
    h = source(h)
    need(call(h, aten.mul.Tensor), "experts", "the expert activation is not silu(gate) * up")
    a, b = h.args
    if call(source(b), aten.silu.default):
        a, b = b, a
    a = source(a)
    need(call(a, aten.silu.default), "experts", "the expert activation is not silu(gate) * up")
    gp, up = split_part(source(a.args[0], casts=False)), split_part(source(b, casts=False))
    if gp and up and gp[0] is up[0]:
        width = shape(gp[0])[-1]
        need((gp[1], gp[2], up[1], up[2]) == (0, width // 2, width // 2, width // 2), "experts",
             "the stacked gate/up projection is not split as [gate, up]")
        proj = _gathered_linear(program, gp[0], ids, x)
        need(proj is not None, "experts", "the gate/up projection is not by the chosen experts' weights")
        return {"w13": proj[0], "w2": w2}, sums[0]
    g, u = _gathered_linear(program, a.args[0], ids, x), _gathered_linear(program, b, ids, x)
    need(g is not None and u is not None, "experts", "gate and up are not projections by the chosen experts' weights")
    return {"w1": g[0], "w3": u[0], "w2": w2}, sums[0]


def _usersforward(n: Node) -> list[Node]:
    n = forward(n)
    return list(n.users)


def _gathered_linear(program, n: Node, ids: Node, x: Node | None = None) -> tuple[str, Node] | None:
    """`n` as bmm(W[ids], v) (or its transpose form): (W's name, v), checking v's source is x if given."""
    s = source(n)
    if not call(s, aten.bmm.default, aten.matmul.default):
        return None
    a, b = s.args
    for w_side, v_side in ((a, b), (b, a)):
        idx = source(w_side, casts=False)
        if call(idx, aten.index.Tensor) and len(idx.args[1]) == 1 and idx.args[1][0] is not None:
            name = weight(program, idx.args[0])
            if name is None or source(idx.args[1][0], casts=False) is not source(ids, casts=False):
                return None
            v = source(v_side, casts=False)
            if call(v, aten.repeat_interleave.self_int):
                v = source(v.args[0])
            if x is not None and source(v) is not x:
                return None
            return name, v
    return None


def _combine(program, x: Node, routed: Node) -> tuple[Node, list[str] | None]:
    """The layer output: routed (+ shared experts of x), back in x's shape."""
    n = forward(routed)
    shared = None
    adds = [u for u in users(n) if call(u, aten.add.Tensor)]
    if len(users(n)) == 1 and adds:
        add = adds[0]
        other = add.args[1] if add.args[0] is n else add.args[0]
        try:
            shared = _shared_mlp(program, x, other)
            n = forward(add)
        except Miss:  # not a shared MLP of the input (e.g. the block's residual): the layer ends before
            shared = None
    need(shape(n) == shape(x), "output", f"the layer output {list(shape(n))} does not have the input's shape {list(shape(x))}")
    return n, shared


def _shared_mlp(program: ExportedProgram, x: Node, n: Node) -> list[str]:
    """n = down(silu(gate(x)) * up(x)): (gate, down, up) weight names."""
    down = linear(program, n)
    need(down.bias is None, "shared experts", f"{down.weight_name} has a bias")
    w1, w3 = _gated(program, source(down.x), x, lambda m: _is_linear(program, m), lambda m: linear(program, m).weight,
                    lambda m: linear(program, m).x)
    return [w1, down.weight_name, w3]


def _is_linear(program, n) -> bool:
    try:
        return linear(program, n).bias is None
    except Miss:
        return False


def _rewrite(program: ExportedProgram, m: _Match) -> None:
    node = lambda name: param_node(program, name)  # noqa: E731
    if "w13" in m.experts:  # gate and up stacked [E, 2I, D]: the op takes them apart
        name = m.experts["w13"]
        w13 = param(program, name)
        half = w13.shape[1] // 2
        w1 = add_param(program, f"{name}.gate", derive(lambda w: w.detach()[:, :half].contiguous(), w13))
        w3 = add_param(program, f"{name}.up", derive(lambda w: w.detach()[:, half:].contiguous(), w13))
    else:
        w1, w3 = node(m.experts["w1"]), node(m.experts["w3"])
    w2 = node(m.experts["w2"])
    shared = [node(n) for n in m.shared] if m.shared else [None, None, None]
    r = m.routing
    with program.graph.inserting_after(m.out):
        fused = emit(program, MOE_OP, m.x, m.gate, m.bias, w1, w2, w3, *shared,
                     int(r["top_k"]), int(r["n_group"]), int(r["topk_group"]), str(r["topk_method"]),
                     bool(r["norm_topk_prob"]), float(r["routed_scaling_factor"]), like=m.out)
    m.out.replace_all_uses_with(fused)
