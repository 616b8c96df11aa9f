"""DeepSeekMoE routing, defined once: router logits -> each token's K experts and their weights.

The eager model (model/transformer.py, `Gate`) and the `dsc::moe` op's reference
(runtime/ops/moe.py) call `route`; the op's ONNX translation (lowering/ops.py) is tested
against it (tests/model/test_routing.py), and so is this definition against transformers' DeepseekV2/V3.

Scores and selection, by topk_method:
- "greedy" (DeepSeek-V2): softmax scores; the K best experts.
- "group_limited_greedy" (DeepSeek-V2): softmax scores; the experts form n_group contiguous
  groups, a group ranks by its best score, the K best experts of the topk_group best groups.
- "noaux_tc" (DeepSeek-V3): sigmoid scores; selection ranks scores + e_score_correction_bias,
  a group by the sum of its two best biased scores (its one score if it has one expert), the K
  best of the topk_group best groups; the weights are the *unbiased* scores of the chosen experts.
Experts outside the kept groups are masked with -inf, never 0: biased scores can be negative.

Weights: DeepSeek-V2 divides the K scores by their sum when norm_topk_prob and K > 1 and
otherwise multiplies them by routed_scaling_factor (one or the other, never both); DeepSeek-V3
divides by the sum when norm_topk_prob and always multiplies. The sum gets 1e-20 added.

Shapes: T tokens, E routed experts, G groups (n_group), K experts per token (top_k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dscompile.model.args import ModelArgs

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class Routing:
    """A gate's settings, named and ordered as the routing attributes of `dsc::moe`."""

    top_k: int
    n_group: int
    topk_group: int
    topk_method: str
    norm_topk_prob: bool
    routed_scaling_factor: float

    @classmethod
    def of(cls, args: ModelArgs) -> Routing:
        """The routing of a model's MoE layers."""
        return cls(args.num_experts_per_tok, args.n_group, args.topk_group, args.topk_method,
                   args.norm_topk_prob, args.routed_scaling_factor)


def _group_scores(choice: Tensor, routing: Routing) -> Tensor:
    """[T, G]: a group's best choice (V2), or the sum of its best two (V3)."""
    grouped = choice.unflatten(-1, (routing.n_group, -1))                 # [T, G, E/G]
    if routing.topk_method == "noaux_tc":
        return grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
    return grouped.amax(dim=-1)


def _keep_best_groups(choice: Tensor, group_scores: Tensor, topk_group: int) -> Tensor:
    """choice with -inf on the experts outside the `topk_group` best groups."""
    best = group_scores.topk(topk_group, dim=-1).indices                  # [T, topk_group]
    keep = group_scores.new_zeros(group_scores.shape, dtype=torch.bool).scatter(1, best, True)
    keep = keep.unsqueeze(-1).expand(-1, -1, choice.shape[-1] // group_scores.shape[-1])
    return choice.masked_fill(~keep.reshape(choice.shape), float("-inf"))


def _normalized(weights: Tensor) -> Tensor:
    """The K weights divided by their sum."""
    return weights / (weights.sum(-1, keepdim=True) + 1e-20)


def route(logits: Tensor, bias: Optional[Tensor], routing: Routing) -> tuple[Tensor, Tensor]:
    """(weights [T, K], expert ids [T, K] int64, best first) from float32 router logits [T, E].

    `bias` is noaux_tc's e_score_correction_bias [E] (None: zero); the other methods ignore it.
    """
    if routing.topk_method == "noaux_tc":
        scores = logits.sigmoid()
        choice = scores if bias is None else scores + bias
    elif routing.topk_method in TOPK_METHODS:
        scores = logits.softmax(dim=-1)
        choice = scores
    else:
        raise ValueError(f"topk_method {routing.topk_method!r} is not one of {TOPK_METHODS}")
    if routing.topk_method != "greedy":
        choice = _keep_best_groups(choice, _group_scores(choice, routing), routing.topk_group)
    ids = choice.topk(routing.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if routing.topk_method == "noaux_tc":
        if routing.norm_topk_prob:
            weights = _normalized(weights)
        return weights * routing.routed_scaling_factor, ids
    if routing.norm_topk_prob and routing.top_k > 1:
        return _normalized(weights), ids
    return weights * routing.routed_scaling_factor, ids
