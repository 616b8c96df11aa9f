"""model/routing.py, the one definition of DeepSeekMoE routing, against its checks.

- Hand-computed 4-expert cases guard the definition itself (bias for selection only, groups by
  their best score or the sum of their best two, -inf masking, normalization and scaling).
- transformers' DeepseekV2/V3 routers are the external oracle: same logits, same experts and weights.
- The ONNX translation of the `dsc::moe` gate (lowering/ops.py `route`) runs on ONNX
  Runtime's CPU provider and must select and weight as the definition does.

Random logits are continuous draws, so no two scores tie and the chosen experts are unique. Ids
compare as a set per token: top-k order is no part of the routing (transformers does not sort).

Shapes: T tokens, D hidden, E routed experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import Tensor

from helpers import assert_op_close as assert_close
from dscompile.lowering import ops as onnx_ops
from dscompile.model.routing import Routing, route
from dscompile.runtime.ops import moe as moe_ops

E, T = 16, 64


def by_expert(weights: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(weights, ids) of each token in increasing expert id."""
    order = ids.argsort(-1)
    return weights.gather(1, order), ids.gather(1, order)


def assert_same_routing(weights: Tensor, ids: Tensor, ref_weights: Tensor, ref_ids: Tensor, what: str) -> None:
    """The same experts for every token (as sets), with the same weights."""
    weights, ids = by_expert(torch.as_tensor(weights), torch.as_tensor(ids).long())
    ref_weights, ref_ids = by_expert(ref_weights, ref_ids)
    assert torch.equal(ids, ref_ids), f"{what}: other experts chosen for tokens " \
        f"{(ids != ref_ids).any(-1).nonzero().flatten().tolist()}"
    assert_close(weights, ref_weights, torch.float32, f"{what} weights")


# ---- hand-computed cases ------------------------------------------------------------------------

# V3: sigmoid scores p, biased choices p + bias = [-0.1, -0.9, -0.2, -0.3]. Group {2, 3} wins on
# its best two (-0.5 against -1.0) though group {0, 1} has the best single choice and, unbiased,
# the best two (1.2 against 1.1). Every kept choice is negative: a mask of 0 would pick experts 0 and 1.
# Weights are the unbiased scores 0.6 and 0.5, normalized (/1.1), then scaled (x2.5).
V3_P, V3_BIAS = [0.9, 0.3, 0.6, 0.5], [-1.0, -1.2, -0.8, -0.8]
# V2: softmax scores p. Group {0, 1} wins on its best score (0.4 against 0.3), not on its sum.
V2_P = [0.4, 0.05, 0.3, 0.25]
HAND = [
    pytest.param(Routing(2, 2, 1, "noaux_tc", True, 2.5), V3_P, V3_BIAS, [2, 3], [2.5 * 6 / 11, 2.5 * 5 / 11],
                 id="v3-noaux_tc"),
    pytest.param(Routing(2, 2, 1, "group_limited_greedy", False, 16.0), V2_P, None, [0, 1], [6.4, 0.8],
                 id="v2-groups-scaled"),
    pytest.param(Routing(2, 2, 1, "group_limited_greedy", True, 16.0), V2_P, None, [0, 1], [8 / 9, 1 / 9],
                 id="v2-groups-normalized-not-scaled"),
    pytest.param(Routing(1, 2, 1, "group_limited_greedy", True, 16.0), V2_P, None, [0], [6.4],
                 id="v2-top1-scaled-not-normalized"),
    pytest.param(Routing(2, 1, 1, "greedy", False, 16.0), V2_P, None, [0, 2], [6.4, 4.8], id="v2-greedy"),
]


@pytest.mark.parametrize("routing,p,bias,ids,weights", HAND)
def test_hand_computed_case(routing: Routing, p, bias, ids, weights):
    p = torch.tensor([p])
    logits = p.logit() if routing.topk_method == "noaux_tc" else p.log()   # sigmoid / softmax give p back
    got_w, got_ids = route(logits, None if bias is None else torch.tensor(bias), routing)
    assert got_ids.tolist() == [ids]                                        # best first
    assert_close(got_w, torch.tensor([weights]), torch.float32, "weights")


# ---- transformers' routers ----------------------------------------------------------------------

def _transformers_router(routing: Routing, hidden: int, seed: int):
    """transformers' router for `routing`, its weight (and V3 bias) random."""
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    settings = dict(hidden_size=hidden, n_routed_experts=E, num_experts_per_tok=routing.top_k,
                    n_group=routing.n_group, topk_group=routing.topk_group,
                    norm_topk_prob=routing.norm_topk_prob, routed_scaling_factor=routing.routed_scaling_factor)
    g = torch.Generator().manual_seed(seed)
    if routing.topk_method == "noaux_tc":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
        router = DeepseekV3TopkRouter(transformers.DeepseekV3Config(**settings))
        router.e_score_correction_bias.copy_(0.1 * torch.randn(E, generator=g))
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
        router = DeepseekV2TopkRouter(transformers.DeepseekV2Config(topk_method=routing.topk_method, **settings))
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, hidden, generator=g) * 2 / math.sqrt(hidden))
    return router.eval()


# transformers' V2 router never normalizes (it ignores norm_topk_prob; DeepSeek-V2's own gate
# normalizes instead of scaling when norm_topk_prob and K > 1, as the hand cases check), so
# the V2 cases here are the published V2 settings, norm_topk_prob false.
ORACLE = [
    pytest.param(Routing(3, 1, 1, "greedy", False, 2.0), id="v2-greedy"),
    pytest.param(Routing(3, 4, 2, "group_limited_greedy", False, 16.0), id="v2-group_limited_greedy"),
    pytest.param(Routing(4, 4, 2, "noaux_tc", True, 2.5), id="v3-noaux_tc"),
    pytest.param(Routing(4, 4, 2, "noaux_tc", False, 2.5), id="v3-noaux_tc-not-normalized"),
]


@pytest.mark.parametrize("routing", ORACLE)
def test_matches_transformers(routing: Routing):
    router = _transformers_router(routing, hidden=32, seed=0)
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, ref_w, ref_ids = router(x)
    weights, ids = route(logits, getattr(router, "e_score_correction_bias", None), routing)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (T, routing.top_k)
    assert_same_routing(weights, ids, ref_w, ref_ids, f"{routing} vs transformers")


# ---- the ONNX translation on ONNX Runtime -------------------------------------------------------

@torch.library.custom_op("dsc_test::route", mutates_args=())
def _route_op(x2d: Tensor, gate_weight: Tensor, bias: Optional[Tensor], top_k: int, n_group: int,
              topk_group: int, topk_method: str, norm_topk_prob: bool,
              routed_scaling_factor: float) -> tuple[Tensor, Tensor]:
    """The `dsc::moe` gate alone, to export it alone."""
    return moe_ops.route(x2d, gate_weight, bias, top_k, n_group, topk_group, topk_method, norm_topk_prob,
                         routed_scaling_factor)


@_route_op.register_fake
def _route_fake(x2d, gate_weight, bias, top_k, *_routing):
    return x2d.new_empty(x2d.shape[0], top_k), x2d.new_empty(x2d.shape[0], top_k, dtype=torch.int64)


def _route_translation(x2d, gate_weight, bias, top_k: int, n_group: int, topk_group: int, topk_method: str,
                       norm_topk_prob: bool, routed_scaling_factor: float):
    """The routing of the `dsc.moe` translation, on this op's inputs."""
    return onnx_ops.route(x2d, x2d.dtype, gate_weight, bias, int(gate_weight.shape[0]), top_k, n_group,
                          topk_group, topk_method, bool(norm_topk_prob), routed_scaling_factor)


class _Gate(torch.nn.Module):
    """Logits in, routing out: with an identity gate weight, the graph's Gemm returns x exactly."""

    def __init__(self, routing: Routing, bias: Optional[Tensor]):
        super().__init__()
        self.routing = routing
        self.register_buffer("gate_weight", torch.eye(E))
        self.register_buffer("bias", bias)

    def forward(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ops.dsc_test.route(logits, self.gate_weight, self.bias, *dataclasses.astuple(self.routing))


LOWERED = [
    pytest.param(Routing(3, 1, 1, "greedy", False, 2.0), id="v2-greedy"),
    pytest.param(Routing(3, 1, 1, "greedy", True, 2.0), id="v2-greedy-normalized"),
    pytest.param(Routing(3, 4, 2, "group_limited_greedy", False, 16.0), id="v2-group_limited_greedy"),
    pytest.param(Routing(3, 4, 2, "group_limited_greedy", True, 16.0), id="v2-group_limited_greedy-normalized"),
    pytest.param(Routing(1, 4, 2, "group_limited_greedy", True, 3.0), id="v2-top1-normalized"),
    pytest.param(Routing(4, 4, 2, "noaux_tc", True, 2.5), id="v3-noaux_tc"),
    pytest.param(Routing(4, 4, 2, "noaux_tc", False, 2.5), id="v3-noaux_tc-not-normalized"),
    pytest.param(Routing(4, 4, 4, "noaux_tc", True, 2.5), id="v3-noaux_tc-every-group"),
]


@pytest.mark.parametrize("routing", LOWERED)
def test_onnx_translation_matches_on_onnx_runtime(routing: Routing):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(T, E, generator=g) * 2
    bias = 0.1 * torch.randn(E, generator=g) if routing.topk_method == "noaux_tc" else None
    program = torch.onnx.export(_Gate(routing, bias).eval(), (logits,), dynamo=True, opset_version=23,
                                custom_translation_table={torch.ops.dsc_test.route.default: _route_translation},
                                verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(ir.to_proto(program.model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    weights, ids = session.run(None, {session.get_inputs()[0].name: logits.numpy()})
    ref_w, ref_ids = route(logits, bias, routing)
    assert_same_routing(weights, ids, ref_w, ref_ids, f"{routing} lowered to ONNX")
