"""model/dispatch.py: the training forward that runs each routed expert on its own tokens only.

It must compute what the reference `MoE` (dense over all experts, masked combine) computes: same
outputs and same gradients within float32 tolerance, on random non-zero weights and inputs, for
the three routing methods (V3 with a non-zero correction bias, V2 group-limited, V2-Lite greedy);
and its per-expert token counts must be those of the gate's choice.

Shapes: B batch, S tokens, D hidden, E routed experts, K experts per token.
"""

from __future__ import annotations

import pytest
import torch

from helpers import VARIANTS, assert_op_close
from dscompile.model.dispatch import dispatch_experts, moe_dispatch
from dscompile.model.synthetic import random_state, tiny_args
from dscompile.model.transformer import MoE, Transformer


def tiny_model(variant: str) -> Transformer:
    args = tiny_args(variant, layers=2, experts=8, hidden=64)
    model = Transformer(args)
    model.load_state_dict(random_state(args, seed=3), strict=False)
    return model


def moe_layer(model: Transformer) -> MoE:
    return next(m for m in model.modules() if isinstance(m, MoE))


@pytest.mark.parametrize("variant", VARIANTS)
def test_dispatch_equals_dense_experts(variant):
    moe = moe_layer(tiny_model(variant))
    x = torch.randn(3, 11, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(1))  # [B, S, D]
    ref = moe(x)
    out, counts = moe_dispatch(moe, x)
    assert_op_close(out, ref, torch.float32, f"{variant} dispatch vs dense")
    _, ids = moe.gate(x.reshape(-1, x.shape[-1]))
    assert counts.tolist() == torch.bincount(ids.reshape(-1), minlength=counts.numel()).tolist()
    assert counts.sum() == ids.numel() and (counts > 0).sum() >= 2  # the tokens really spread over experts


@pytest.mark.parametrize("variant", VARIANTS)
def test_dispatch_gradients_equal_dense(variant):
    model = tiny_model(variant)
    moe = moe_layer(model)
    x = torch.randn(2, 9, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(2), requires_grad=True)
    target = torch.randn(2, 9, x.shape[-1], generator=torch.Generator().manual_seed(4))
    (moe(x) * target).sum().backward()
    ref = {n: p.grad.clone() for n, p in moe.named_parameters()}
    ref_x = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    (moe_dispatch(moe, x)[0] * target).sum().backward()
    assert_op_close(x.grad, ref_x, torch.float32, f"{variant} d/dx")
    for name, p in moe.named_parameters():
        assert ref[name].abs().max() > 0, f"{name}: the reference gradient is zero, the check would be empty"
        assert_op_close(p.grad, ref[name], torch.float32, f"{variant} d/d{name}")


def test_dispatch_experts_swaps_every_moe_layer_and_restores():
    model = tiny_model("v3")
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(5)))
    ids = torch.randint(0, model.args.vocab_size, (2, 13), generator=torch.Generator().manual_seed(6))
    ref, _ = model(ids)
    with dispatch_experts(model) as loads:
        out, _ = model(ids)
    assert_op_close(out, ref, torch.float32, "model logits, dispatched vs dense")
    moe_names = [n for n, m in model.named_modules() if isinstance(m, MoE)]
    assert sorted(loads) == sorted(moe_names)
    assert all(int(c.sum()) == ids.numel() * model.args.num_experts_per_tok for c in loads.values())
    assert all("forward" not in m.__dict__ for m in model.modules())  # the class forward is back
