"""`dsc::moe`: a whole DeepSeekMoE layer as one op (routing, dispatch, experts, combine, shared).

    out = Σ_k w[t,k] · expert_{idx[t,k]}(x[t]) + shared(x[t])
    expert_e(x) = w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x))

`route` is the gate: float32 router logits, routed as model/routing.py defines it (DeepSeek-V2
softmax "greedy" / "group_limited_greedy", DeepSeek-V3 sigmoid "noaux_tc");
`moe_experts_reference` really dispatches: tokens are grouped by expert and only the chosen
experts run, on their tokens. On CUDA the experts run as Triton grouped GEMMs
(`triton_kernels.py`) when Triton is importable.

Shapes: T tokens (all leading dims of x flattened), D hidden, E routed experts, K active experts
per token (top_k), I expert intermediate size, Is shared intermediate size (n_shared * I).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dscompile.model.routing import TOPK_METHODS, Routing, route as route_logits
from dscompile.runtime.ops.kernels import triton_kernels


def check_routing_args(num_experts: int, top_k: int, n_group: int, topk_group: int,
                       topk_method: str) -> None:
    """Raises ValueError naming the routing argument that cannot work with E experts."""
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"moe: topk_method={topk_method!r} is not one of {TOPK_METHODS}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"moe: top_k={top_k} must be in [1, E={num_experts}]")
    if n_group < 1 or num_experts % n_group != 0:
        raise ValueError(f"moe: n_group={n_group} must divide the number of experts "
                         f"E={num_experts}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"moe: topk_group={topk_group} must be in [1, n_group={n_group}]")
    if topk_method != "greedy" and top_k > topk_group * (num_experts // n_group):
        # Otherwise top-k would have to pick experts of groups that were just masked out.
        raise ValueError(f"moe: top_k={top_k} exceeds the {topk_group * (num_experts // n_group)}"
                         f" experts of topk_group={topk_group} groups")


def route(x2d: Tensor, gate_weight: Tensor, bias: Optional[Tensor], top_k: int, n_group: int,
          topk_group: int, topk_method: str, norm_topk_prob: bool,
          routed_scaling_factor: float) -> tuple[Tensor, Tensor]:
    """The op's gate in float32: returns (weights [T, K] float32, expert ids [T, K] int64)."""
    check_routing_args(gate_weight.shape[0], top_k, n_group, topk_group, topk_method)
    logits = x2d.float() @ gate_weight.float().t()                          # [T, E]
    routing = Routing(top_k, n_group, topk_group, topk_method, norm_topk_prob, routed_scaling_factor)
    return route_logits(logits, bias, routing)


def check_expert_weights(x2d: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> None:
    """Raises ValueError naming the expert weight whose shape does not match x and w1."""
    if w1.dim() != 3:
        raise ValueError(f"moe: w1 must be [E, I, D], got shape {tuple(w1.shape)}")
    E, I, D = w1.shape
    if x2d.shape[-1] != D:
        raise ValueError(f"moe: x has hidden size {x2d.shape[-1]} but w1 {tuple(w1.shape)} "
                         f"expects D={D}")
    for name, t, shape in (("w3", w3, (E, I, D)), ("w2", w2, (E, D, I))):
        if tuple(t.shape) != shape:
            raise ValueError(f"moe: {name} has shape {tuple(t.shape)}, expected {shape}")


def moe_experts_reference(x2d: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, weights: Tensor,
                          idx: Tensor) -> Tensor:
    """Routed experts with real dispatch: Σ_k weights[t,k]·expert_idx[t,k](x[t]), [T, D] float32.

    Each expert runs once, in x's dtype, on the tokens routed to it; experts without tokens cost
    nothing. The weighted combine accumulates in float32.
    """
    T, K = idx.shape
    E = w1.shape[0]
    flat = idx.reshape(-1)                                    # [T*K], entry j = (token j//K)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    token_of = order // K
    weight_of = weights.reshape(-1)[order].float()
    out = torch.zeros(T, x2d.shape[-1], dtype=torch.float32, device=x2d.device)
    start = 0
    # Host loop over experts is the point here: it is the dispatch, not a trace-time graph.
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        tokens = token_of[start:start + n]
        xe = x2d[tokens]                                      # [n, D]
        h = F.silu(xe @ w1[e].t()) * (xe @ w3[e].t())         # [n, I]
        ye = h @ w2[e].t()                                    # [n, D]
        # index_put_ with accumulate, not index_add_: the same sums, but index_add_'s scatter_add
        # stalls for ~25 ms behind an MKL matmul when another process holds a core.
        out.index_put_((tokens,), ye.float() * weight_of[start:start + n, None], accumulate=True)
        start += n
    return out


def _shared_mlp(x2d: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(x2d, w1)) * F.linear(x2d, w3), w2)


def _check_shared(shared_w1: Optional[Tensor], shared_w2: Optional[Tensor],
                  shared_w3: Optional[Tensor]) -> bool:
    given = [w is not None for w in (shared_w1, shared_w2, shared_w3)]
    if any(given) and not all(given):
        raise ValueError("moe: shared_w1, shared_w2 and shared_w3 must all be given or all be "
                         f"None, got given={given}")
    return all(given)


def moe_reference(x: Tensor, gate_weight: Tensor, e_score_correction_bias: Optional[Tensor],
                  w1: Tensor, w2: Tensor, w3: Tensor, shared_w1: Optional[Tensor],
                  shared_w2: Optional[Tensor], shared_w3: Optional[Tensor], top_k: int,
                  n_group: int, topk_group: int, topk_method: str, norm_topk_prob: bool,
                  routed_scaling_factor: float, experts=moe_experts_reference) -> Tensor:
    """The op's definition; `experts` swaps in another implementation of the routed experts."""
    has_shared = _check_shared(shared_w1, shared_w2, shared_w3)
    x2d = x.reshape(-1, x.shape[-1])                          # [T, D]
    check_expert_weights(x2d, w1, w2, w3)
    weights, idx = route(x2d, gate_weight, e_score_correction_bias, top_k, n_group, topk_group,
                         topk_method, norm_topk_prob, routed_scaling_factor)
    out = experts(x2d, w1, w2, w3, weights, idx)             # [T, D] float32
    if has_shared:
        out = out + _shared_mlp(x2d, shared_w1, shared_w2, shared_w3).float()
    return out.to(x.dtype).reshape(x.shape)


@torch.library.custom_op("dsc::moe", mutates_args=())
def moe(x: Tensor, gate_weight: Tensor, e_score_correction_bias: Optional[Tensor], w1: Tensor,
        w2: Tensor, w3: Tensor, shared_w1: Optional[Tensor], shared_w2: Optional[Tensor],
        shared_w3: Optional[Tensor], top_k: int, n_group: int, topk_group: int,
        topk_method: str, norm_topk_prob: bool, routed_scaling_factor: float) -> Tensor:
    """DeepSeekMoE layer: gate, top-k dispatch, routed experts, weighted combine, shared experts."""
    return moe_reference(x, gate_weight, e_score_correction_bias, w1, w2, w3, shared_w1,
                         shared_w2, shared_w3, top_k, n_group, topk_group, topk_method,
                         norm_topk_prob, routed_scaling_factor)


@moe.register_fake
def _moe_fake(x, gate_weight, e_score_correction_bias, w1, w2, w3, shared_w1, shared_w2,
              shared_w3, top_k, n_group, topk_group, topk_method, norm_topk_prob,
              routed_scaling_factor):
    # Argument errors surface at export time too, not only when the engine first runs.
    check_routing_args(gate_weight.shape[0], top_k, n_group, topk_group, topk_method)
    _check_shared(shared_w1, shared_w2, shared_w3)
    return torch.empty_like(x)


@moe.register_kernel("cuda")
def _moe_cuda(x, gate_weight, e_score_correction_bias, w1, w2, w3, shared_w1, shared_w2,
              shared_w3, top_k, n_group, topk_group, topk_method, norm_topk_prob,
              routed_scaling_factor):
    kernels = triton_kernels("moe")  # None: the definition's torch dispatch (counted and warned: ops/kernels.py)
    experts = kernels.triton_moe_experts if kernels is not None else moe_experts_reference
    return moe_reference(x, gate_weight, e_score_correction_bias, w1, w2, w3, shared_w1,
                         shared_w2, shared_w3, top_k, n_group, topk_group, topk_method,
                         norm_topk_prob, routed_scaling_factor, experts=experts)


def local_experts(experts, expert_start: int):
    """`experts` restricted to the ones held here: ids [expert_start, expert_start + E_local).

    Only the (token, choice) pairs routed to a local expert are dispatched, as one choice each; a
    chosen expert held elsewhere contributes nothing here. `experts` is any implementation with
    `moe_experts_reference`'s contract (the reference, the Triton kernels). `expert_start` is an
    int or a 0-d tensor; with the Triton kernels it stays on the device (no host sync per layer).
    """

    def run(x2d: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
        if getattr(experts, "takes_remote_ids", False):  # the Triton kernels: no host sync (no nonzero)
            local_idx = idx - expert_start
            here = (local_idx >= 0) & (local_idx < w1.shape[0])
            return experts(x2d, w1, w2, w3, torch.where(here, weights, 0), torch.where(here, local_idx, w1.shape[0]),
                           remote=True)
        local = (idx >= expert_start) & (idx < expert_start + w1.shape[0])
        tokens, k = local.nonzero(as_tuple=True)
        out = torch.zeros(x2d.shape[0], x2d.shape[-1], dtype=torch.float32, device=x2d.device)
        if tokens.numel():
            part = experts(x2d[tokens], w1, w2, w3, weights[tokens, k][:, None], idx[tokens, k][:, None] - expert_start)
            out.index_put_((tokens,), part, accumulate=True)
        return out

    return run


@torch.library.custom_op("dsc::moe_shard", mutates_args=())
def moe_shard(x: Tensor, gate_weight: Tensor, e_score_correction_bias: Optional[Tensor], w1: Tensor,
              w2: Tensor, w3: Tensor, shared_w1: Optional[Tensor], shared_w2: Optional[Tensor],
              shared_w3: Optional[Tensor], top_k: int, n_group: int, topk_group: int,
              topk_method: str, norm_topk_prob: bool, routed_scaling_factor: float,
              expert_start: Tensor) -> Tensor:
    """One rank's part of a sharded `dsc::moe` layer: summed over the ranks, it is `dsc::moe`.

    The gate is whole (every rank routes every token to all E = gate_weight.shape[0] experts); the
    routed experts held here are [expert_start, expert_start + w1.shape[0]), each possibly only a
    slice of its intermediate size, and the shared experts a slice of theirs. Every piece is a
    partial sum of the layer's output (an MLP split along its intermediate size is the sum of its
    slices' outputs), so one all-reduce gives the layer's output. `expert_start` is a 0-d integer
    tensor (a per-rank constant: every rank runs the same program).
    """
    E = gate_weight.shape[0]
    expert_start = int(expert_start)
    if not 0 <= expert_start <= E - w1.shape[0]:
        raise ValueError(f"moe_shard: experts [{expert_start}, {expert_start + w1.shape[0]}) are not "
                         f"within the gate's {E}")
    return moe_reference(x, gate_weight, e_score_correction_bias, w1, w2, w3, shared_w1, shared_w2,
                         shared_w3, top_k, n_group, topk_group, topk_method, norm_topk_prob,
                         routed_scaling_factor, experts=local_experts(moe_experts_reference, expert_start))


@moe_shard.register_fake
def _moe_shard_fake(x, gate_weight, e_score_correction_bias, w1, w2, w3, shared_w1, shared_w2,
                    shared_w3, top_k, n_group, topk_group, topk_method, norm_topk_prob,
                    routed_scaling_factor, expert_start):
    return _moe_fake(x, gate_weight, e_score_correction_bias, w1, w2, w3, shared_w1, shared_w2, shared_w3, top_k,
                     n_group, topk_group, topk_method, norm_topk_prob, routed_scaling_factor)


@moe_shard.register_kernel("cuda")
def _moe_shard_cuda(x, gate_weight, e_score_correction_bias, w1, w2, w3, shared_w1, shared_w2,
                    shared_w3, top_k, n_group, topk_group, topk_method, norm_topk_prob,
                    routed_scaling_factor, expert_start):
    kernels = triton_kernels("moe_shard")
    experts = kernels.triton_moe_experts if kernels is not None else moe_experts_reference
    return moe_reference(x, gate_weight, e_score_correction_bias, w1, w2, w3, shared_w1, shared_w2,
                         shared_w3, top_k, n_group, topk_group, topk_method, norm_topk_prob,
                         routed_scaling_factor, experts=local_experts(experts, expert_start))
