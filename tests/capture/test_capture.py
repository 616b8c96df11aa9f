"""Capture (torch.export of prefill/decode) and the pass pipeline over it (each pass alone: tests/passes/)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import assert_close, call_targets, program_outputs
from dscompile.capture import Limits, capture
from dscompile.model.args import PUBLISHED_CONFIGS, ModelArgs
from dscompile.model.checkpoint import build_model
from dscompile.passes import PassOptions, run_pipeline
from dscompile.runtime.contract import io_names

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

aten = torch.ops.aten


# ---- capture ----


@pytest.mark.parametrize("B,S,P", [(1, 1, 0), (3, 5, 7), (2, 1, 9)])
def test_captured_graph_matches_eager_for_any_batch_new_and_past(captured_models, captured, B, S, P):
    model, ep = captured_models["v3"], captured[("v3", "prefill")]
    gen = torch.Generator().manual_seed(B * 100 + S)
    a = model.args
    ids = torch.randint(0, a.vocab_size, (B, S), generator=gen)
    pos = (torch.arange(S) + P).expand(B, S).contiguous()
    mask = torch.ones(B, P + S, dtype=torch.int64)
    past = [(torch.randn(B, P, a.kv_lora_rank, generator=gen), torch.randn(B, P, a.qk_rope_head_dim, generator=gen))
            for _ in range(a.num_hidden_layers)]
    logits, present = program_outputs(ep, (ids, pos, mask, past))
    with torch.no_grad():
        ref, ref_cache = model(ids, pos, mask, past)
    assert_close(logits, ref, what=f"prefill graph B={B} S={S} P={P}")
    assert present[0][0].shape == (B, P + S, a.kv_lora_rank) and present[0][1].shape == (B, P + S, a.qk_rope_head_dim)


def test_contract_names_cover_every_layer():
    inputs, outputs = io_names(2)
    assert inputs == ["input_ids", "position_ids", "attention_mask", "past.0.kv_latent", "past.0.k_rope",
                      "past.1.kv_latent", "past.1.k_rope"]
    assert outputs[0] == "logits" and outputs[-1] == "present.1.k_rope"


def test_capture_on_meta_device_with_published_shapes():
    """Real V3 widths (256 experts, 128 heads) with 4 layers, no weights: capture must not need storage."""
    path = PUBLISHED_CONFIGS / "deepseek-v3.json"
    args = dataclasses.replace(ModelArgs.from_json(path), num_hidden_layers=4)
    ep = capture(build_model(args, torch.bfloat16, "meta"), Limits(max_batch=8, max_prompt_tokens=16, max_context=4096))
    assert sum(t == aten.topk.default for t in call_targets(ep)) >= args.num_moe_layers
    assert all(t.device.type == "meta" for t in ep.state_dict.values())


def test_limits_are_validated():
    with pytest.raises(ValueError):
        Limits(max_batch=0)
    with pytest.raises(ValueError):
        Limits(max_prompt_tokens=64, max_context=32)


# ---- the pipeline over the capture ----


def test_pipeline_report_verifies_each_pass(captured_models, captured):
    ep, a = captured[("v2-lite", "decode")], captured_models["v2-lite"].args
    new, report = run_pipeline(ep, PassOptions("decode", a), verify=True)
    by_name = {r.name: r for r in report.results}
    assert by_name["squeeze_cache_append"].count == 0  # our capture appends on the contract's past already
    assert by_name["absorb_mla"].count == a.num_hidden_layers
    assert by_name["absorb_mla"].max_error is not None and by_name["absorb_mla"].max_error < 1e-4
    assert by_name["absorb_mla"].details["form"] == "reassociate"


def test_same_checkpoint_and_options_give_the_same_graph(captured_models):
    """Node names, targets and order are a function of the model and options alone."""
    def signature(phase):
        ep, _ = run_pipeline(capture(captured_models["v2-lite"]), PassOptions(phase, captured_models["v2-lite"].args))
        return [(n.name, str(n.target)) for n in ep.graph.nodes], sorted(ep.state_dict)

    first = signature("decode")
    assert first == signature("decode")
    assert any("dsc.latent_attention" in t for _, t in first[0])
