"""The absorb_mla pass: structure, count, numerics before vs after, the cost model, and regions it must not rewrite.

The captured programs are the session's (conftest.py `captured`), shared with tests/capture/test_capture.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers import VARIANTS, assert_close, call_targets, program_outputs
from dscompile.model.args import PUBLISHED_CONFIGS, ModelArgs
from dscompile.passes import PassOptions, absorb_mla, random_inputs
from dscompile.passes.absorb_mla import cost_model

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

aten = torch.ops.aten


@pytest.mark.parametrize("form", ["reassociate", "fold"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_absorb_structure_count_and_numerics(captured_models, captured, variant, form):
    model, ep = captured_models[variant], captured[(variant, "decode")]
    a = model.args
    inputs = random_inputs(ep, a.vocab_size, seed=1)
    before = program_outputs(ep, inputs)
    new, count, unmatched = absorb_mla.run(ep, PassOptions("decode", a, absorb=form))
    after = program_outputs(new, inputs)

    assert count == a.num_hidden_layers and unmatched == []
    targets = call_targets(new)
    assert aten.scaled_dot_product_attention.default not in targets
    assert targets.count(torch.ops.dsc.latent_attention.default) == a.num_hidden_layers
    # Nothing multiplies the cached latent by kv_b_proj any more: the weight is gone from the program.
    assert not [k for k in new.state_dict if "kv_b_proj" in k]
    H, N, V, C = a.num_attention_heads, a.qk_nope_head_dim, a.v_head_dim, a.kv_lora_rank
    sd = new.state_dict
    if form == "reassociate":
        assert sd["model.layers.0.self_attn.absorb.w_uk"].shape == (H, N, C)
        assert sd["model.layers.0.self_attn.absorb.w_uv"].shape == (H, V, C)
    else:
        q_in = a.q_lora_rank or a.hidden_size
        assert sd["model.layers.0.self_attn.absorb.w_qk"].shape == (H, q_in, C)
        assert sd["model.layers.0.self_attn.absorb.w_ov"].shape == (a.hidden_size, H, C)
        assert not [k for k in sd if "o_proj" in k]
    # The latent cache is read only by the latent attention op (and returned as present).
    for n in new.graph.nodes:
        if n.target == torch.ops.dsc.latent_attention.default:
            latent = n.args[2]
            assert {u.target for u in latent.users} <= {torch.ops.dsc.latent_attention.default, "output"}
    assert_close(after[0], before[0], what=f"{variant} {form} logits")
    # Layer 0's cache is bit-identical (computed before any attention); later layers inherit rounding.
    assert torch.equal(after[1][0][0], before[1][0][0]) and torch.equal(after[1][0][1], before[1][0][1])
    for i, ((la, ra), (lb, rb)) in enumerate(zip(after[1], before[1])):
        assert_close(la, lb, what=f"{variant} {form} present.{i}.kv_latent")
        assert_close(ra, rb, what=f"{variant} {form} present.{i}.k_rope")


def test_prefill_absorption_keeps_numerics(captured_models, captured):
    ep, a = captured[("v2", "prefill")], captured_models["v2"].args
    inputs = random_inputs(ep, a.vocab_size, seed=2)
    before = program_outputs(ep, inputs)
    new, count, _ = absorb_mla.run(ep, PassOptions("prefill", a, absorb="reassociate"))
    assert count == a.num_hidden_layers
    assert_close(program_outputs(new, inputs)[0], before[0], what="v2 prefill reassociate")


def test_none_and_graphs_without_mla_are_left_alone(captured_models, captured):
    ep, a = captured[("v3", "decode")], captured_models["v3"].args
    same, count, _ = absorb_mla.run(ep, PassOptions("decode", a, absorb="none"))
    assert count == 0 and same is ep

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(self.proj(x), x, x)

    plain = torch.export.export(Plain(), (torch.randn(1, 2, 3, 8),))
    nodes = len(plain.graph.nodes)
    out, count, unmatched = absorb_mla.run(plain, PassOptions("decode", a, absorb="reassociate"))
    assert count == 0 and len(out.graph.nodes) == nodes
    # Looked at and left alone, with the step that failed.
    assert [(u.step, u.found) for u in unmatched] == [
        ("attention", "no explicit mask (is_causal or none): the latent attention takes the additive mask")]


def test_region_of_another_shape_is_refused_with_a_reason(captured_models):
    a = captured_models["v3"].args

    class MLA(nn.Module):  # named like ours, but attends without the latent up-projection
        def __init__(self):
            super().__init__()
            self.kv_b_proj = nn.Linear(8, 8, bias=False)

        def forward(self, x):
            mask = torch.zeros(x.shape[-2], x.shape[-2])
            return torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=mask, scale=0.5)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = MLA()

        def forward(self, x):
            return self.self_attn(x)

    ep = torch.export.export(Wrap(), (torch.randn(1, 2, 3, 8),))
    out, count, unmatched = absorb_mla.run(ep, PassOptions("decode", a, absorb="reassociate"))
    assert count == 0 and out is ep  # names are labels, not evidence
    assert [str(u) for u in unmatched] == ["self_attn: values: x is not a piece of a per-head projection"]


def test_cost_model_picks_latent_attention_for_decode_on_published_configs():
    for name in ("deepseek-v2.json", "deepseek-v2-lite.json", "deepseek-v3.json"):
        args = ModelArgs.from_json(PUBLISHED_CONFIGS / name)
        decode = absorb_mla.describe(PassOptions("decode", args))
        assert decode["form"] == "reassociate", f"{name}: {json.dumps(decode['cost_model'])}"
        costs = cost_model(args, "decode")
        # Reassociation reads the same weights (kv_b_proj split in two); folding pre-multiplies bigger ones.
        assert costs["reassociate"]["bytes"] == costs["none"]["bytes"] < costs["fold"]["bytes"]
        # Expanding the latent of every past token per step is what absorption removes:
        assert costs["none"]["flops"] > 10 * costs["reassociate"]["flops"]
        assert absorb_mla.describe(PassOptions("prefill", args))["form"] == "none"


def test_unknown_absorb_option_is_a_user_error(captured_models, captured):
    from dscompile.errors import DscompileError

    with pytest.raises(DscompileError, match="--absorb 'sometimes'"):
        absorb_mla.run(captured[("v3", "decode")], PassOptions("decode", captured_models["v3"].args, absorb="sometimes"))
