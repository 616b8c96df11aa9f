"""dsc::moe: routing and real dispatch vs a dense all-experts MoE, fake impl under export, errors.

Shapes: T tokens, D hidden, E experts, K active experts per token, I expert intermediate,
Is shared intermediate.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import dscompile.runtime.ops  # noqa: F401  (registers the dsc ops)
from dscompile.runtime.ops.moe import moe_experts_reference, route
from conftest import assert_op_close as assert_close




@dataclass(frozen=True)
class Gate:
    top_k: int
    n_group: int
    topk_group: int
    topk_method: str
    norm_topk_prob: bool
    routed_scaling_factor: float

    def args(self):
        return (self.top_k, self.n_group, self.topk_group, self.topk_method, self.norm_topk_prob,
                self.routed_scaling_factor)


V2_LITE = Gate(2, 1, 1, "greedy", False, 1.0)
V2 = Gate(3, 4, 2, "group_limited_greedy", False, 16.0)
V2_NORM = Gate(3, 4, 2, "group_limited_greedy", True, 16.0)
V3 = Gate(4, 4, 2, "noaux_tc", True, 2.5)
GATES = [pytest.param(g, id=f"{g.topk_method}-norm{int(g.norm_topk_prob)}")
         for g in (V2_LITE, V2, V2_NORM, V3)]


def make_weights(D=24, I=20, E=8, Is=40, shared=True, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype)

    return dict(
        gate_weight=rnd(E, D) * 4,          # sharper scores: routing decisions far from ties
        e_score_correction_bias=(torch.randn(E, generator=g) * 0.1) if bias else None,
        w1=rnd(E, I, D), w2=rnd(E, D, I), w3=rnd(E, I, D),
        shared_w1=rnd(Is, D) if shared else None, shared_w2=rnd(D, Is) if shared else None,
        shared_w3=rnd(Is, D) if shared else None,
    )


def call_moe(x, w, gate: Gate):
    return torch.ops.dsc.moe(x, w["gate_weight"], w["e_score_correction_bias"], w["w1"],
                             w["w2"], w["w3"], w["shared_w1"], w["shared_w2"], w["shared_w3"],
                             *gate.args())


def dense_route(x2d, gate_weight, bias, gate: Gate):
    """The published gates, written independently of runtime.ops.moe.route (sort, not topk)."""
    E = gate_weight.shape[0]
    logits = x2d.float() @ gate_weight.float().t()
    per_group = E // gate.n_group
    if gate.topk_method == "noaux_tc":
        scores = logits.sigmoid()
        choice = scores + (0 if bias is None else bias.float())
        top2 = choice.view(-1, gate.n_group, per_group).sort(-1, descending=True).values[..., :2]
        group_scores = top2.sum(-1)
    else:
        scores = logits.softmax(-1)
        choice = scores
        group_scores = scores.view(-1, gate.n_group, per_group).max(-1).values
    if gate.topk_method != "greedy":
        best_groups = group_scores.sort(-1, descending=True).indices[:, :gate.topk_group]
        in_best = (torch.arange(E)[None, :, None] // per_group == best_groups[:, None, :]).any(-1)
        choice = torch.where(in_best, choice, torch.tensor(float("-inf")))
    idx = choice.sort(-1, descending=True).indices[:, :gate.top_k]
    w = scores.gather(1, idx)
    if gate.topk_method == "noaux_tc":
        if gate.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * gate.routed_scaling_factor
    elif gate.norm_topk_prob and gate.top_k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    else:
        w = w * gate.routed_scaling_factor
    return w, idx


def dense_moe(x, w, gate: Gate):
    """Every expert on every token, combined through a [T, E] weight matrix that is 0 off-route."""
    x2d = x.reshape(-1, x.shape[-1]).float()
    weights, idx = dense_route(x2d, w["gate_weight"], w["e_score_correction_bias"], gate)
    E = w["w1"].shape[0]
    combine = torch.zeros(x2d.shape[0], E).scatter(1, idx, weights)            # [T, E]
    g = torch.einsum("td,eid->tei", x2d, w["w1"].float())
    u = torch.einsum("td,eid->tei", x2d, w["w3"].float())
    y = torch.einsum("tei,edi->ted", F.silu(g) * u, w["w2"].float())
    out = torch.einsum("te,ted->td", combine, y)
    if w["shared_w1"] is not None:
        sw1, sw2, sw3 = (w[k].float() for k in ("shared_w1", "shared_w2", "shared_w3"))
        out = out + (F.silu(x2d @ sw1.t()) * (x2d @ sw3.t())) @ sw2.t()
    return out.reshape(x.shape)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("lead", [(1,), (13,), (2, 3)], ids=["one-token", "T13", "B2xS3"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "no-shared"])
def test_reference_matches_dense(gate, lead, shared):
    w = make_weights(shared=shared, bias=gate.topk_method == "noaux_tc")
    x = torch.randn(*lead, 24, generator=torch.Generator().manual_seed(1))
    out = call_moe(x, w, gate)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out, dense_moe(x, w, gate), torch.float32, f"moe {gate} lead={lead}")


@pytest.mark.parametrize("gate", GATES)
def test_route_matches_dense_route(gate):
    w = make_weights(E=16)
    x2d = torch.randn(29, 24, generator=torch.Generator().manual_seed(2))
    bias = w["e_score_correction_bias"]
    weights, idx = route(x2d, w["gate_weight"], bias, *gate.args())
    ref_w, ref_idx = dense_route(x2d, w["gate_weight"], bias, gate)
    assert weights.dtype == torch.float32 and idx.dtype == torch.int64
    order, ref_order = idx.argsort(-1), ref_idx.argsort(-1)       # top-k order is not semantics
    assert torch.equal(idx.gather(1, order), ref_idx.gather(1, ref_order))
    assert_close(weights.gather(1, order), ref_w.gather(1, ref_order), torch.float32, "weights")


def test_v2_scales_when_it_does_not_normalize():
    # DeepSeek-V2: norm_topk_prob with top_k == 1 takes the scaling branch instead.
    w = make_weights()
    x2d = torch.randn(5, 24)
    scores = (x2d @ w["gate_weight"].t()).softmax(-1)
    weights, idx = route(x2d, w["gate_weight"], None, 1, 1, 1, "greedy", True, 3.0)
    assert_close(weights, scores.max(-1, keepdim=True).values * 3.0, torch.float32, "top-1")


def test_noaux_tc_masks_with_minus_inf():
    # Biased choices of the kept group are negative; a mask of 0 would pick the dropped group.
    E, D = 4, 8
    gate_weight = torch.zeros(E, D)
    bias = torch.tensor([-5.0, -5.0, -10.0, -10.0])
    x2d = torch.randn(3, D)
    _, idx = route(x2d, gate_weight, bias, 2, 2, 1, "noaux_tc", True, 1.0)
    assert set(idx.flatten().tolist()) == {0, 1}


def test_group_limited_greedy_stays_in_best_groups():
    w = make_weights(E=16)
    x2d = torch.randn(50, 24)
    _, idx = route(x2d, w["gate_weight"], None, 4, 8, 2, "group_limited_greedy", False, 1.0)
    scores = (x2d @ w["gate_weight"].t()).softmax(-1)
    best = scores.view(50, 8, 2).amax(-1).topk(2, -1).indices                 # [T, 2]
    assert (idx[:, :, None] // 2 == best[:, None, :]).any(-1).all()


def test_experts_without_tokens_are_never_computed():
    # NaN weights in every expert that receives no token: a dense evaluation would emit NaN.
    w = make_weights(shared=False)
    x = torch.randn(1, 24)
    _, idx = route(x, w["gate_weight"], None, *V2_LITE.args())
    unused = sorted(set(range(8)) - set(idx.flatten().tolist()))
    assert unused, "the case needs idle experts"
    for name in ("w1", "w2", "w3"):
        w[name] = w[name].clone()
        w[name][unused] = float("nan")
    assert torch.isfinite(call_moe(x, w, V2_LITE)).all()


def test_experts_reference_matches_dense_on_given_routing():
    g = torch.Generator().manual_seed(3)
    w = make_weights(shared=False)
    x2d = torch.randn(11, 24, generator=g)
    idx = torch.randint(0, 3, (11, 2), generator=g)    # crowd 3 experts; 5 receive nothing
    idx[:, 1] = (idx[:, 0] + 1) % 3
    weights = torch.rand(11, 2, generator=g)
    out = moe_experts_reference(x2d, w["w1"], w["w2"], w["w3"], weights, idx)
    y = torch.einsum("tei,edi->ted", F.silu(torch.einsum("td,eid->tei", x2d, w["w1"]))
                     * torch.einsum("td,eid->tei", x2d, w["w3"]), w["w2"])
    ref = (y[torch.arange(11)[:, None], idx] * weights[..., None]).sum(1)
    assert out.dtype == torch.float32
    assert_close(out, ref, torch.float32, "moe_experts_reference")


@pytest.mark.parametrize("gate", [V2, V3], ids=["v2", "v3"])
def test_reference_bf16(gate):
    w = make_weights(dtype=torch.bfloat16, bias=gate.topk_method == "noaux_tc")
    x = torch.randn(2, 7, 24).to(torch.bfloat16)
    out = call_moe(x, w, gate)
    assert out.dtype == torch.bfloat16
    assert_close(out, dense_moe(x, w, gate), torch.bfloat16, f"moe bf16 {gate.topk_method}")


class _MoE(torch.nn.Module):
    def __init__(self, w, gate: Gate):
        super().__init__()
        self.w, self.gate = w, gate

    def forward(self, x):
        return call_moe(x, self.w, self.gate)


@pytest.mark.parametrize("shared,bias", [(True, True), (False, False)])
def test_fake_impl_exports_with_dynamic_tokens(shared, bias):
    w = make_weights(shared=shared, bias=bias)
    gate = V3 if bias else V2
    x = torch.randn(2, 5, 24)
    dims = {0: torch.export.Dim("B", max=64), 1: torch.export.Dim("S", max=4096)}
    ep = torch.export.export(_MoE(w, gate), (x,), dynamic_shapes=({**dims},))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("dsc.moe.default") == 1, targets
    other = torch.randn(3, 4, 24)
    assert_close(ep.module()(other), _MoE(w, gate)(other), torch.float32, "exported program")


@pytest.mark.parametrize("change,name", [
    (dict(topk_method="topk_softmax"), "topk_method"),
    (dict(n_group=3), "n_group"),
    (dict(top_k=9), "top_k"),
    (dict(topk_group=5), "topk_group"),
    (dict(top_k=5, topk_group=2), "top_k"),          # 2 groups of 2 experts cannot give 5
])
def test_invalid_routing_args_name_the_argument(change, name):
    w = make_weights(bias=False)
    fields = dict(top_k=2, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                  norm_topk_prob=False, routed_scaling_factor=1.0)
    gate = Gate(**{**fields, **change})
    x = torch.randn(3, 24)
    with pytest.raises(ValueError, match=name):
        call_moe(x, w, gate)
    with pytest.raises(ValueError, match=name):
        route(x, w["gate_weight"], None, *gate.args())


def test_invalid_shapes_name_the_tensor():
    w = make_weights()
    with pytest.raises(ValueError, match="w2"):
        call_moe(torch.randn(3, 24), {**w, "w2": w["w2"][:, :5]}, V2)
    with pytest.raises(ValueError, match="shared_w"):
        call_moe(torch.randn(3, 24), {**w, "shared_w2": None}, V2)
