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

What it matches (by operators, shapes and dataflow; names are only labels in messages): every
scaled_dot_product_attention whose
- values are one piece of each head of a projection without bias (the up-projection W_UKV) of a
  tensor of C values per token (the latent), which is the RMS-normalized first C values of a
  projection of the layer input, after the cached tokens;
- keys are [the other piece of each head of that same projection, a RoPE key of R values shared
  by every head], no-RoPE piece first;
- query is [N no-RoPE, R RoPE] values per head, with an explicit additive mask and no dropout.
The fold form also needs the query's no-RoPE part to be the first N of each head of a projection
without bias, and the attention output to be merged as [S, H*V] into a projection without bias.
Sizes (H, N, R, V, C) and the scale are read from the graph. An attention that fails a step is
left as it is and reported (`Unmatched`: region, step, what was found).

What it guarantees: the rewritten graph computes the same function up to float rounding (the
identities above), reads the same cache, and keeps the original weights' values (new weights are
derived from them, see dscompile/lazy.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node
from torch.export import ExportedProgram

import dscompile.runtime.ops  # noqa: F401  (registers torch.ops.dsc.*)
from dscompile.errors import DscompileError
from dscompile.lazy import derive
from dscompile.passes._edit import add_param, emit, param, rewrite_matches
from dscompile.passes._match import (VIEWS, Linear, Miss, Unmatched, call, dtype, hint, last_dim_parts, linear, need,
                                    rms_norm, shape, source, split_part)

aten = torch.ops.aten
FORMS = ("auto", "fold", "reassociate", "none")

# Roofline constants of the cost model: what matters is their ratio (FLOPs per byte at balance).
PEAK_FLOPS = 350e9
PEAK_BYTES_PER_S = 25e9
REFERENCE_CONTEXT = 1024  # context length the decode cost is evaluated at
REFERENCE_PREFILL = 128  # prompt length the prefill cost is evaluated at


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


def expected(options) -> int:
    """Regions a run should rewrite: every layer's attention, unless the chosen form is "none"."""
    return 0 if choose(options.args, options.phase, options.absorb) == "none" else options.args.num_hidden_layers


@dataclass
class _Match:
    """One MLA attention, read from the graph: the nodes the rewrite reads and replaces, and the
    sizes it found (H heads, N nope / R rope / V value dims per head, C latent rank)."""

    label: str
    prefix: str  # where the new weights are named: the up-projection's module path
    sdpa: Node
    q: Node  # the attention's query [B, H, S, N+R]
    latent: Node  # [B, T, C] or [B, 1, T, C]
    k_rope: Node  # [B, T, R] or [B, 1, T, R]
    mask: Node
    scale: float
    kv_b: str  # weight names
    H: int
    N: int
    R: int
    V: int
    C: int
    q_proj: Linear | None = None  # fold only
    o_proj: Linear | None = None  # fold only
    details: dict = field(default_factory=dict)


def run(program: ExportedProgram, options) -> tuple[ExportedProgram, int, list[Unmatched]]:
    """Rewrite every attention that matches; the rest are left as they are, each with its reason."""
    form = choose(options.args, options.phase, options.absorb)
    if form == "none":
        return program, 0, []
    return rewrite_matches(program, lambda p: _match_all(p, form), lambda p, m: _rewrite(p, m, form))


def _match_all(program: ExportedProgram, form: str) -> tuple[list[_Match], list[Unmatched]]:
    found, unmatched = [], []
    for sdpa in [n for n in program.graph.nodes if call(n, aten.scaled_dot_product_attention.default)]:
        try:
            found.append(match(program, sdpa, form))
        except Miss as miss:
            unmatched.append(Unmatched(hint(sdpa), miss.step, miss.found))
    return found, unmatched


def _heads(program: ExportedProgram, t: Node, step: str) -> tuple[Linear, int, int]:
    """`t` as a projection's output with its last dim split into [heads, width] (other dims only
    moved): (the projection, heads, width per head)."""
    n = t
    while call(n, *VIEWS) and not call(n, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                                      aten.unflatten.int):
        need(not call(n, aten.expand.default) or shape(n) == shape(n.args[0]), step, f"{n.name} broadcasts")
        last = len(shape(n)) - 1
        moved = (call(n, aten.transpose.int) and last in [d % (last + 1) for d in n.args[1:3]]) or \
                (call(n, aten.permute.default) and n.args[1][-1] % (last + 1) != last)
        need(not moved, step, f"{n.name} moves the per-head dim")
        n = n.args[0]
    need(call(n, aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int), step,
         f"{t.name} is not a projection reshaped into heads")
    proj = linear(program, n.args[0])
    out = shape(proj.node)
    heads, width = shape(n)[-2], shape(n)[-1]
    lead = lambda dims: [d for d in dims if not (isinstance(d, int) and d == 1)]  # noqa: E731
    need(lead(out[:-1]) == lead(shape(n)[:-2]) and out[-1] == heads * width, step,
         f"{n.name} reshapes {list(out)} to {list(shape(n))}, not its last dim into heads")
    return proj, int(heads), int(width)


def _piece(program: ExportedProgram, n: Node, step: str) -> tuple[Linear, int, int, int, int, Node]:
    """`n` as a piece [start, start+width) of each head of a projection:
    (projection, heads, head width, start, width, the tensor split)."""
    part = split_part(source(n, casts=False))
    need(part is not None, step, f"{source(n).name} is not a piece of a per-head projection")
    t, start, width = part
    proj, heads, head_width = _heads(program, t, step)
    return proj, heads, head_width, start, width, t


def _tokens(n: Node) -> list:
    """The dims before the last, without the shared-head dim of size 1: [B, T]."""
    return [d for d in shape(n)[:-1] if not (isinstance(d, int) and d == 1)]


def _squeezable(n: Node, width: int) -> bool:
    """[B, T, width], or [B, 1, T, width] (one shared head)."""
    s = shape(n)
    return (len(s) == 3 or (len(s) == 4 and s[1] == 1)) and s[-1] == width


def match(program: ExportedProgram, sdpa: Node, form: str) -> _Match:
    """Read one attention as MLA, or raise Miss naming the first step that does not hold."""
    q, k, v = sdpa.args[:3]
    opts = dict(zip(("attn_mask", "dropout_p", "is_causal"), sdpa.args[3:6]), **sdpa.kwargs)
    mask = opts.get("attn_mask")
    need(not opts.get("dropout_p"), "attention", "dropout is on")
    need(not opts.get("is_causal") and isinstance(mask, Node), "attention",
         "no explicit mask (is_causal or none): the latent attention takes the additive mask")
    need(dtype(mask).is_floating_point or dtype(mask) == torch.bool, "attention",
         f"the mask is {dtype(mask)}, neither additive nor boolean")
    need(not opts.get("enable_gqa"), "attention", "grouped-query attention")

    # Values: one piece of each head of the up-projection of the latent.
    kv, H, width, v_start, V, kv_split = _piece(program, v, "values")
    need(kv.bias is None, "values", f"the up-projection {kv.weight_name} has a bias")
    # Keys: [no-RoPE piece of the same projection, a RoPE key shared by every head].
    parts = last_dim_parts(k)
    need(len(parts) == 2, "keys", f"the key is assembled from {len(parts)} pieces, not [no-RoPE, RoPE]")
    kv_k, H_k, width_k, k_start, N, k_split = _piece(program, parts[0][0], "keys")
    need(kv_k.node is kv.node and width_k == width, "keys",
         f"the no-RoPE key comes from {kv_k.weight_name}, the values from {kv.weight_name}")
    need((k_start, v_start, N + V) == (0, N, width), "keys",
         f"the up-projection's heads [{width}] split as key [{k_start}:{k_start + N}] and value "
         f"[{v_start}:{v_start + V}], not key then value")
    R = parts[1][1]
    k_rope = source(parts[1][0], casts=False)
    need(_squeezable(k_rope, R), "keys", f"the RoPE key {list(shape(k_rope))} is not one head shared by all")
    latent = source(kv.x, casts=False)
    C = int(shape(kv.weight)[1])
    need(_squeezable(latent, C), "latent", f"the up-projection reads {list(shape(latent))}, not [B, T, {C}]")
    need(_tokens(latent) == _tokens(k_rope), "latent", "the latent and the RoPE key cover different tokens")
    latent_proj = _latent_projection(program, latent, C)
    # Queries: [no-RoPE N, RoPE R] per head.
    q_parts = last_dim_parts(q)
    need([w for _p, w in q_parts] == [N, R], "queries",
         f"the query is assembled as {[w for _p, w in q_parts]}, not [no-RoPE {N}, RoPE {R}]")
    scale = opts.get("scale")
    scale = float(scale) if scale is not None else (N + R) ** -0.5
    m = _Match(hint(sdpa), kv.weight_name.rsplit(".", 2)[0], sdpa, q, latent, k_rope, mask, scale,
               kv.weight_name, H, N, R, V, C,
               details={"latent_projection": latent_proj})
    if form == "fold":
        qp, Hq, q_width, q_start, q_n, _t = _piece(program, q_parts[0][0], "queries")
        need(qp.bias is None and (Hq, q_width, q_start, q_n) == (H, N + R, 0, N), "queries",
             f"the no-RoPE query is [{q_start}:{q_start + q_n}] of {Hq} heads of {q_width} from "
             f"{qp.weight_name}{' (with a bias)' if qp.bias is not None else ''}")
        m.q_proj, m.o_proj = qp, _output_projection(program, sdpa, H, V)
    return m


def _latent_projection(program: ExportedProgram, latent: Node, C: int) -> str:
    """The latent is the RMS-normalized first C values of a projection (after the cached tokens):
    returns that projection's weight name."""
    s = source(latent, casts=False)
    if call(s, aten.cat.default):  # past tokens first, then this step's
        dim = s.args[1] if len(s.args) > 1 else 0
        need(dim % len(shape(s)) == len(shape(s)) - 2, "latent", f"{s.name} concatenates across the latent")
        s = s.args[0][-1]
    norm = rms_norm(program, s)
    part = split_part(source(norm.x, casts=False))
    need(part is not None and part[1] == 0 and part[2] == C, "latent", "the normalized latent is not the first "
         f"{C} values of a projection")
    return linear(program, part[0]).weight_name


def _output_projection(program: ExportedProgram, sdpa: Node, H: int, V: int) -> Linear:
    """The projection of the attention output [B, H, S, V] after merging heads as [S, H*V]."""
    n, moved = sdpa, False
    while len(n.users) == 1:
        (u,) = n.users
        if call(u, aten.transpose.int) and sorted(d % 4 for d in u.args[1:3]) == [1, 2] and not moved:
            moved = True
        elif call(u, aten.view.default, aten.reshape.default) and shape(u) == shape(n):
            pass  # a view to the same shape
        elif not (call(u, aten.contiguous.default, aten.clone.default) or
                  (call(u, aten.view.default, aten.reshape.default, aten._unsafe_view.default) and moved and
                   len(shape(u)) == 3 and shape(u)[-1] == H * V)):
            break
        n = u
    (user,) = n.users if len(n.users) == 1 else (None,)
    need(moved and len(shape(n)) == 3 and user is not None, "output",
         "the attention output is not merged as [B, S, H*V] into one projection")
    proj = linear(program, user)
    need(proj.node is user and proj.x is n and proj.bias is None, "output",
         f"the merged heads feed {user.name}, not a projection without bias")
    return proj


def _rewrite(program: ExportedProgram, m: _Match, form: str) -> None:
    H, N, R, V, C = m.H, m.N, m.R, m.V, m.C
    w_kv = param(program, m.kv_b)
    graph, sdpa = program.graph, m.sdpa
    with graph.inserting_before(sdpa):
        built = m.q.args[0] if call(m.q, aten.transpose.int) and sorted(m.q.args[1:3]) == [1, 2] else None
        if call(m.q, aten.cat.default) and [shape(p)[-1] for p in m.q.args[0]] == [N, R]:
            q_nope, q_rope = m.q.args[0]  # the query is built [B, H, S, *] from its two parts
        elif built is not None and call(built, aten.cat.default) and built.args[1:] in ((-1,), (3,)) \
                and [shape(p)[-1] for p in built.args[0]] == [N, R]:
            # built [B, S, H, *] from its two parts, then transposed: transpose the parts instead
            # (the concatenated copy and the two slices of it are not computed)
            q_nope, q_rope = (emit(program, aten.transpose.int, p, 1, 2, like=sdpa) for p in built.args[0])
        else:
            q_nope = emit(program, aten.slice.Tensor, m.q, 3, 0, N, like=sdpa)  # [B, H, S, N]
            q_rope = emit(program, aten.slice.Tensor, m.q, 3, N, N + R, like=sdpa)  # [B, H, S, R]
        mask = m.mask
        if dtype(mask) == torch.bool:  # True = attend: 0 there, the most negative float elsewhere
            mask = emit(program, aten.where.Scalar, mask, 0.0, torch.finfo(torch.float32).min, like=sdpa)
        latent = m.latent if len(shape(m.latent)) == 3 else emit(program, aten.squeeze.dim, m.latent, 1, like=sdpa)
        k_rope = m.k_rope if len(shape(m.k_rope)) == 3 else emit(program, aten.squeeze.dim, m.k_rope, 1, like=sdpa)
    if form == "reassociate":
        w_uk = derive(lambda w: w.detach().view(H, N + V, C)[:, :N].contiguous(), w_kv)  # [H, N, C]
        w_uv = derive(lambda w: w.detach().view(H, N + V, C)[:, N:].contiguous(), w_kv)  # [H, V, C]
        uk, uv = add_param(program, f"{m.prefix}.absorb.w_uk", w_uk), add_param(program, f"{m.prefix}.absorb.w_uv", w_uv)
        with graph.inserting_before(sdpa):
            q_lat = emit(program, aten.einsum.default, "bhsn,hnc->bhsc", [q_nope, uk], like=sdpa)
            o_lat = emit(program, torch.ops.dsc.latent_attention.default, q_lat, q_rope, latent, k_rope, mask,
                         m.scale, like=sdpa)
            out = emit(program, aten.einsum.default, "bhsc,hvc->bhsv", [o_lat, uv], like=sdpa)
        sdpa.replace_all_uses_with(out)
        return
    # fold: the query side starts from the input of the q projection; the output side replaces o_proj.
    w_q, w_o = param(program, m.q_proj.weight_name), param(program, m.o_proj.weight_name)

    def fold_q(w_kv, w_q):  # [H, q_in, C]: W_UK^T folded into the query's up-projection
        w_uk, w_uq = w_kv.detach().view(H, N + V, C)[:, :N], w_q.detach().view(H, N + R, -1)[:, :N]
        return torch.einsum("hnc,hnq->hqc", w_uk.float(), w_uq.float()).to(w_q.dtype).contiguous()

    def fold_o(w_kv, w_o):  # [D, H, C]: W_UV folded into the output projection
        w_uv = w_kv.detach().view(H, N + V, C)[:, N:]
        return torch.einsum("dhv,hvc->dhc", w_o.detach().float().view(w_o.shape[0], H, V), w_uv.float()).to(w_o.dtype).contiguous()

    qk = add_param(program, f"{m.prefix}.absorb.w_qk", derive(fold_q, w_kv, w_q))
    ov = add_param(program, f"{m.prefix}.absorb.w_ov", derive(fold_o, w_kv, w_o))
    with graph.inserting_before(sdpa):
        q_lat = emit(program, aten.einsum.default, "bsq,hqc->bhsc", [m.q_proj.x, qk], like=sdpa)
        o_lat = emit(program, torch.ops.dsc.latent_attention.default, q_lat, q_rope, latent, k_rope, mask,
                     m.scale, like=sdpa)
    o_lin = m.o_proj.node
    with graph.inserting_before(o_lin):
        out = emit(program, aten.einsum.default, "bhsc,dhc->bsd", [o_lat, ov], like=o_lin)
    o_lin.replace_all_uses_with(out)
