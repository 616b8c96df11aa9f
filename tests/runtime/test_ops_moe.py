"""dsc::moe: real dispatch vs a dense all-experts MoE, fake impl under export, errors.

The routing is model/routing.py's (tests/model/test_routing.py checks it); here it only picks the
experts the dense reference combines.

Shapes: T tokens, D hidden, E experts, K active experts per token, I expert intermediate,
Is shared intermediate.
"""

from dataclasses import astuple, replace

import pytest
import torch
import torch.nn.functional as F

import dscompile.runtime.ops  # noqa: F401  (registers the dsc ops)
from dscompile.model.routing import Routing, route
from dscompile.runtime.ops.moe import moe_experts_reference, route as op_route
from helpers import assert_op_close as assert_close

V2_LITE = Routing(2, 1, 1, "greedy", False, 1.0)
V2 = Routing(3, 4, 2, "group_limited_greedy", False, 16.0)
V2_NORM = Routing(3, 4, 2, "group_limited_greedy", True, 16.0)
V3 = Routing(4, 4, 2, "noaux_tc", True, 2.5)
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


def call_moe(x, w, gate: Routing):
    return torch.ops.dsc.moe(x, w["gate_weight"], w["e_score_correction_bias"], w["w1"],
                             w["w2"], w["w3"], w["shared_w1"], w["shared_w2"], w["shared_w3"],
                             *astuple(gate))


def reference_route(x2d, w, gate: Routing):
    """(weights, ids) of model/routing.py from the float32 logits of x2d."""
    logits = x2d.float() @ w["gate_weight"].float().t()
    return route(logits, w["e_score_correction_bias"], gate)


def dense_moe(x, w, gate: Routing):
    """Every expert on every token, combined through a [T, E] weight matrix that is 0 off-route."""
    x2d = x.reshape(-1, x.shape[-1]).float()
    weights, idx = reference_route(x2d, w, gate)
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


def test_experts_without_tokens_are_never_computed():
    # NaN weights in every expert that receives no token: a dense evaluation would emit NaN.
    w = make_weights(shared=False)
    x = torch.randn(1, 24)
    _, idx = reference_route(x, w, V2_LITE)
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
    def __init__(self, w, gate: Routing):
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
    gate = replace(Routing(2, 4, 2, "group_limited_greedy", False, 1.0), **change)
    x = torch.randn(3, 24)
    with pytest.raises(ValueError, match=name):
        call_moe(x, w, gate)
    with pytest.raises(ValueError, match=name):
        op_route(x, w["gate_weight"], None, *astuple(gate))


def test_invalid_shapes_name_the_tensor():
    w = make_weights()
    with pytest.raises(ValueError, match="w2"):
        call_moe(torch.randn(3, 24), {**w, "w2": w["w2"][:, :5]}, V2)
    with pytest.raises(ValueError, match="shared_w"):
        call_moe(torch.randn(3, 24), {**w, "shared_w2": None}, V2)
