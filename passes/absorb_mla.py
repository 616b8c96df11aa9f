"""absorb_mla: attend over the latent cache instead of expanding it into per-head keys and values.

Identity (per head h, latent c of a past token, W_UK/W_UV the two halves of kv_b_proj):
    q_nope · (W_UK c) = (W_UKᵀ q_nope) · c          keys never need expanding
    W_O Σ_t p_t (W_UV c_t) = (W_O W_UV) Σ_t p_t c_t  values neither
so decode attention becomes multi-query attention with one shared head [c; k_rope]
(kv_lora_rank + rope dim values per token), `dsc::latent_attention`.

Two forms:
- reassociate: keep W_UK [H, N, C] and W_UV [H, V, C]; apply them to the query and to the
  attention output as batched matmuls.
- fold: pre-multiply W_UKᵀW_UQ [H, q_in, C] (query side) and W_O·W_UV [D, H, C] (output side).
A roofline cost model (FLOPs and bytes per step for the graph's phase) picks the cheaper of
none / reassociate / fold when `absorb == "auto"`. Both forms read and write the same cache.

The region is each `MLA` module call; the pass anchors on its scaled_dot_product_attention node
and the kv_b_proj matmul feeding it, and refuses (with the reason) a region of another shape.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

import dscompile.runtime.ops  # noqa: F401  (registers torch.ops.dsc.*)
from dscompile.passes.ep_edit import Region, add_param, clone, derive, emit, param, param_node, rebuild, regions, strip_views
from dscompile.errors import DscompileError

aten = torch.ops.aten
FORMS = ("auto", "fold", "reassociate", "none")

# Roofline constants of the cost model: what matters is their ratio (FLOPs per byte at balance).
PEAK_FLOPS = 350e9
PEAK_BYTES_PER_S = 25e9
REFERENCE_CONTEXT = 1024  # context length the decode cost is evaluated at
REFERENCE_PREFILL = 128  # prompt length the prefill cost is evaluated at


class AbsorbError(DscompileError):
    """An MLA region does not have the structure the pass rewrites."""


def cost_model(args, phase: str, batch: int = 1, dtype_bytes: int = 2) -> dict[str, dict[str, float]]:
    """FLOPs, weight+cache bytes and roofline time of one attention step per layer, for each form."""
    H, N, R, V, C, D = (args.num_attention_heads, args.qk_nope_head_dim, args.qk_rope_head_dim,
                        args.v_head_dim, args.kv_lora_rank, args.hidden_size)
    q_in = args.q_lora_rank or D
    S, T = (1, REFERENCE_CONTEXT) if phase == "decode" else (REFERENCE_PREFILL, REFERENCE_PREFILL)
    S, T = S * batch, T * batch  # tokens in the step / keys read, over the batch
    elt = dtype_bytes  # bytes per weight and cache value; the choice depends on ratios, not on this
    w_q = q_in * H * (N + R)
    cache_bytes = T * (C + R) * elt
    forms = {
        "none": {
            "weights": w_q + C * H * (N + V) + H * V * D,
            "flops": 2 * S * w_q + 2 * T * C * H * (N + V) + 2 * H * S * (T // batch) * (N + R + V) + 2 * S * H * V * D,
        },
        "reassociate": {
            "weights": w_q + H * N * C + H * V * C + H * V * D,
            "flops": 2 * S * (w_q + H * N * C + H * C * V + H * V * D) + 2 * H * S * (T // batch) * (2 * C + R),
        },
        "fold": {
            "weights": w_q + H * q_in * C + D * H * C,
            "flops": 2 * S * (w_q + H * q_in * C + D * H * C) + 2 * H * S * (T // batch) * (2 * C + R),
        },
    }
    for f in forms.values():
        f["bytes"] = f["weights"] * elt + cache_bytes
        f["seconds"] = max(f["flops"] / PEAK_FLOPS, f["bytes"] / PEAK_BYTES_PER_S)
    return forms


def choose(args, phase: str, absorb: str) -> str:
    if absorb not in FORMS:
        raise DscompileError(f"--absorb {absorb!r} is not one of {', '.join(FORMS)}")
    if absorb != "auto":
        return absorb
    costs = cost_model(args, phase)
    return min(costs, key=lambda form: costs[form]["seconds"])


def describe(options) -> dict:
    costs = cost_model(options.args, options.phase)
    return {"form": choose(options.args, options.phase, options.absorb), "cost_model": costs,
            "reference": {"context": REFERENCE_CONTEXT, "prompt": REFERENCE_PREFILL}}


def run(ep: ExportedProgram, options) -> tuple[ExportedProgram, int]:
    form = choose(options.args, options.phase, options.absorb)
    found = regions(ep, "MLA")
    if form == "none" or not found:
        return ep, 0
    ep = clone(ep)
    for region in regions(ep, "MLA"):
        _rewrite(ep, region, form, options.args)
    return rebuild(ep), len(found)


def _single(region: Region, pred, what: str):
    hits = [n for n in region.nodes if pred(n)]
    if len(hits) != 1:
        raise AbsorbError(f"{region.path}: expected one {what}, found {len(hits)}")
    return hits[0]


def _linear_of(ep, region: Region, weight: str):
    w = param_node(ep, f"{region.path}.{weight}.weight")
    if w is None:
        raise AbsorbError(f"{region.path}: weight {weight}.weight not found")
    return _single(region, lambda n: n.target == aten.linear.default and n.args[1] is w, f"{weight} matmul")


def _cat_parts(node, what: str, region: Region):
    src = strip_views(node)
    if src.target != aten.cat.default or len(src.args[0]) != 2:
        raise AbsorbError(f"{region.path}: the attention {what} is not a concatenation of nope and rope parts")
    return src.args[0]


def _rewrite(ep: ExportedProgram, region: Region, form: str, args) -> None:
    H, N, V, C = args.num_attention_heads, args.qk_nope_head_dim, args.v_head_dim, args.kv_lora_rank
    sdpa = _single(region, lambda n: n.target == aten.scaled_dot_product_attention.default, "attention")
    kv_b = _linear_of(ep, region, "kv_b_proj")
    q_nope, q_rope = _cat_parts(sdpa.args[0], "query", region)
    k_nope, k_rope_b = _cat_parts(sdpa.args[1], "key", region)
    if strip_views(k_nope).op != "call_function" or kv_b not in _ancestors(k_nope, stop=kv_b):
        raise AbsorbError(f"{region.path}: the attention keys are not expanded from the latent by kv_b_proj")
    if kv_b not in _ancestors(sdpa.args[2], stop=kv_b):
        raise AbsorbError(f"{region.path}: the attention values are not expanded from the latent by kv_b_proj")
    latent_all, k_rope_all = kv_b.args[0], strip_views(k_rope_b)
    mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
    scale = sdpa.kwargs.get("scale")
    if mask is None or scale is None:
        raise AbsorbError(f"{region.path}: attention without an explicit mask and scale")

    w_kv = param(ep, f"{region.path}.kv_b_proj.weight")
    graph = ep.graph
    if form == "reassociate":
        w_uk = derive(lambda w: w.detach().view(H, N + V, C)[:, :N].contiguous(), w_kv)  # [H, N, C]
        w_uv = derive(lambda w: w.detach().view(H, N + V, C)[:, N:].contiguous(), w_kv)  # [H, V, C]
        uk, uv = add_param(ep, f"{region.path}.absorb.w_uk", w_uk), add_param(ep, f"{region.path}.absorb.w_uv", w_uv)
        with graph.inserting_before(sdpa):
            q_lat = emit(ep, aten.einsum.default, "bshn,hnc->bhsc", [q_nope, uk], like=sdpa)
            q_r = emit(ep, aten.transpose.int, q_rope, 1, 2, like=sdpa)
            o_lat = emit(ep, torch.ops.dsc.latent_attention.default, q_lat, q_r, latent_all, k_rope_all, mask,
                         float(scale), like=sdpa)
            out = emit(ep, aten.einsum.default, "bhsc,hvc->bhsv", [o_lat, uv], like=sdpa)
        sdpa.replace_all_uses_with(out)
        return
    # fold: the query side starts from the input of the q projection; the output side replaces o_proj.
    q_lin = _linear_of(ep, region, "q_b_proj" if args.q_lora_rank is not None else "q_proj")
    o_lin = _linear_of(ep, region, "o_proj")
    q_name = "q_b_proj" if args.q_lora_rank is not None else "q_proj"
    w_q = param(ep, f"{region.path}.{q_name}.weight")
    R = args.qk_rope_head_dim

    def fold_q(w_kv, w_q):  # [H, q_in, C]: W_UK^T folded into the query's up-projection
        w_uk, w_uq = w_kv.detach().view(H, N + V, C)[:, :N], w_q.detach().view(H, N + R, -1)[:, :N]
        return torch.einsum("hnc,hnq->hqc", w_uk.float(), w_uq.float()).to(w_q.dtype).contiguous()

    def fold_o(w_kv, w_o):  # [D, H, C]: W_UV folded into the output projection
        w_uv = w_kv.detach().view(H, N + V, C)[:, N:]
        return torch.einsum("dhv,hvc->dhc", w_o.detach().float().view(w_o.shape[0], H, V), w_uv.float()).to(w_o.dtype).contiguous()

    w_qk = derive(fold_q, w_kv, w_q)
    w_ov = derive(fold_o, w_kv, param(ep, f"{region.path}.o_proj.weight"))
    qk, ov = add_param(ep, f"{region.path}.absorb.w_qk", w_qk), add_param(ep, f"{region.path}.absorb.w_ov", w_ov)
    with graph.inserting_before(sdpa):
        q_lat = emit(ep, aten.einsum.default, "bsq,hqc->bhsc", [q_lin.args[0], qk], like=sdpa)
        q_r = emit(ep, aten.transpose.int, q_rope, 1, 2, like=sdpa)
        o_lat = emit(ep, torch.ops.dsc.latent_attention.default, q_lat, q_r, latent_all, k_rope_all, mask,
                     float(scale), like=sdpa)
    with graph.inserting_before(o_lin):
        out = emit(ep, aten.einsum.default, "bhsc,dhc->bsd", [o_lat, ov], like=o_lin)
    o_lin.replace_all_uses_with(out)


def _ancestors(node, stop, limit: int = 64) -> set:
    """Nodes reachable backwards from `node` (bounded), to check what a tensor is computed from."""
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is not stop:
            todo.extend(n.all_input_nodes)
    return seen
