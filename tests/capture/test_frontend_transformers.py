"""The "transformers" frontend: transformers' own DeepSeek model captured under the engine contract.

Each variant's tiny checkpoint is loaded on the meta device and captured once per module (no weight
is read). The captured program then runs with its weights read from the checkpoint, and it is
compared with transformers' unpatched eager model (from_pretrained, same inputs, a DynamicCache)
and with our reference model (model/transformer.py). The rope key's layout in the cache differs
between the two models, so each model runs its decode steps on its own cache.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.fx.node import map_aggregate
from torch.utils._pytree import tree_structure

from helpers import VARIANTS, assert_close
from dscompile.errors import CheckpointError, ConfigError
from dscompile.capture import Limits, example_inputs
from dscompile.capture.frontends import transformers_patches
from dscompile.capture.frontends.transformers import capture_transformers, load_transformers_model
from dscompile.model.checkpoint import CheckpointSource, load_checkpoint
from dscompile.runtime.contract import io_names, position_ids
from dscompile.passes import PassOptions, random_inputs, squeeze_cache_append
from dscompile.lazy import Derived, materialize
from dscompile.passes._edit import clone

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

transformers = pytest.importorskip("transformers", reason="the frontend captures transformers' model")

LIMITS = Limits(max_batch=4, max_prompt_tokens=16, max_context=32)


def _runnable(ep) -> torch.nn.Module:
    """The module of a meta-captured program, with its weights read and its meta device arguments on the CPU."""
    ep = clone(ep)
    for name, value in list(ep.state_dict.items()):
        real = materialize(value)
        is_param = isinstance(value, torch.nn.Parameter)
        ep.state_dict[name] = torch.nn.Parameter(real, requires_grad=False) if is_param else real
    for name, value in list(ep.constants.items()):
        ep.constants[name] = materialize(value)
    module = ep.module(check_guards=False)  # guards in a submodule cost ~0.5 s a call; input ranges still checked
    meta, cpu = torch.device("meta"), torch.device("cpu")
    on_cpu = lambda a: cpu if isinstance(a, torch.device) and a == meta else a  # noqa: E731
    for node in module.graph.nodes:  # arange(device=meta), to(device=meta) ...
        node.args, node.kwargs = map_aggregate(node.args, on_cpu), map_aggregate(node.kwargs, on_cpu)
    module.recompile()
    return module


@pytest.fixture(scope="module", params=VARIANTS)
def captured(request, make_ckpt):
    """The variant's meta capture (`ep`), the weights read while loading and capturing it (`loads`), its
    module with the weights read (`run`) and transformers' eager model as from_pretrained loads it (`hf`)."""
    path = make_ckpt(request.param, layers=2, experts=8)
    loads = []
    real_load = CheckpointSource.load
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CheckpointSource, "load", lambda self: loads.append(self.name) or real_load(self))
        model, args = load_transformers_model(path)
        ep = capture_transformers(model, args, LIMITS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return SimpleNamespace(variant=request.param, path=path, model=model, args=args, ep=ep, loads=loads,
                           run=_runnable(ep), hf=hf)


def _inputs(args, past_len: int, new: int, seed: int = 0):
    """Batch 2, row 0 left-padded by 2 tokens; random past contents."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab_size, (2, new), generator=gen)
    mask = torch.ones(2, past_len + new, dtype=torch.int64)
    mask[0, :2] = 0
    pos = position_ids(mask, new)
    past = [(torch.randn(2, past_len, args.kv_lora_rank, generator=gen),
             torch.randn(2, past_len, args.qk_rope_head_dim, generator=gen)) for _ in range(args.num_hidden_layers)]
    return ids, pos, mask, past


def _hf_cache(hf, past):
    """transformers' DynamicCache holding `past`, filled through its public `update`."""
    cache = transformers.DynamicCache(config=hf.config)
    for i, (latent, k_rope) in enumerate(past):
        cache.update(latent[:, None].clone(), k_rope[:, None].clone(), i)
    return cache


def test_meta_capture_reads_no_weight_and_keeps_sources(captured):
    ep = captured.ep
    assert captured.loads == [], f"{captured.variant}: weights read while capturing: {captured.loads[:3]}"
    for name, value in ep.state_dict.items():
        assert value.is_meta and hasattr(value, "dsc_source"), f"{name} has no source"
    fused = [n for n in ep.state_dict if n.endswith("experts.gate_up_proj")]
    assert fused and all(isinstance(ep.state_dict[n].dsc_source, Derived) for n in fused)
    for name, value in ep.constants.items():  # transformers' RoPE frequencies, computed on the CPU
        assert name.endswith("inv_freq") and not value.is_meta, name


def test_attention_and_experts_are_the_export_implementations(captured):
    targets = [n.target for n in captured.ep.graph.nodes if n.op == "call_function"]
    layers = captured.args.num_hidden_layers
    assert targets.count(torch.ops.aten.scaled_dot_product_attention.default) == layers
    assert targets.count(torch.ops.aten.bmm.default) == 2 * captured.args.num_moe_layers  # batched_mm experts
    assert not any("complex" in str(t) or "polar" in str(t) for t in targets)
    with transformers_patches.real_valued_rope(captured.model) as rewritten:  # V3's RoPE is real already
        assert rewritten == (captured.args.model_type == "deepseek_v2")


def test_matches_transformers_with_past_left_padding_and_decode(captured):
    args, hf = captured.args, captured.hf
    ids, pos, mask, past = _inputs(args, past_len=4, new=3)
    with torch.no_grad():
        logits, present = captured.run(ids, pos, mask, past)
        cache = _hf_cache(hf, past)
        ref = hf(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True)
        assert_close(logits, ref.logits, what=f"{captured.variant} P=4 S=3")
        for (latent, k_rope), layer in zip(present, cache.layers):
            assert latent.shape == (2, 7, args.kv_lora_rank) and k_rope.shape == (2, 7, args.qk_rope_head_dim)
            assert_close(latent, layer.keys[:, 0], what="present latent")
            assert_close(k_rope, layer.values[:, 0], what="present k_rope")
        nxt = torch.randint(0, args.vocab_size, (2, 1), generator=torch.Generator().manual_seed(5))
        pos, mask = pos[:, -1:] + 1, torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], dim=1)
        logits, present = captured.run(nxt, pos, mask, present)
        ref = hf(input_ids=nxt, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True)
        assert_close(logits, ref.logits, what=f"{captured.variant} decode S=1")
    assert [tuple(t.shape[:2]) for layer in present for t in layer] == [(2, 8)] * 2 * args.num_hidden_layers


def test_matches_our_reference_model(captured):
    """Prefill from an empty cache (left-padded rows), then decode steps, each model on its own cache."""
    args = captured.args
    ours = load_checkpoint(captured.path)
    lengths, S = [6, 3], 6
    ids = torch.randint(0, args.vocab_size, (2, S), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, S, dtype=torch.int64)
    for row, n in enumerate(lengths):
        mask[row, S - n:] = 1
    pos = position_ids(mask)
    empty = [(torch.zeros(2, 0, args.kv_lora_rank), torch.zeros(2, 0, args.qk_rope_head_dim))
             for _ in range(args.num_hidden_layers)]
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        got, cache = captured.run(ids, pos, mask, empty)
        want, our_cache = ours(ids, pos, mask)
        real = mask.bool()
        assert_close(got[real], want[real], what=f"{captured.variant} prefill vs ours")
        for step in range(3):
            nxt = torch.randint(0, args.vocab_size, (2, 1), generator=gen)
            pos, mask = pos[:, -1:] + 1, torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], dim=1)
            got, cache = captured.run(nxt, pos, mask, cache)
            want, our_cache = ours(nxt, pos, mask, our_cache)
            assert_close(got, want, what=f"{captured.variant} decode step {step} vs ours")
    assert cache[0][0].shape == our_cache[0][0].shape and cache[0][1].shape == our_cache[0][1].shape


def test_cache_appends_move_onto_the_contract_s_past(captured):
    """squeeze_cache_append finds transformers' two appends per layer and rewrites them without changing a value."""
    args = captured.args
    program, count, unmatched = squeeze_cache_append.run(captured.ep, PassOptions("decode", args))
    assert (count, unmatched) == (2 * args.num_hidden_layers, [])
    for spec in program.graph_signature.output_specs[1:]:  # present.* is the concatenation on past.* itself
        node = next(n for n in program.graph.nodes if n.name == spec.arg.name)
        assert node.target == torch.ops.aten.cat.default and node.args[0][0].op == "placeholder", spec.arg.name
    inputs = _inputs(args, past_len=4, new=1, seed=7)
    with torch.no_grad():
        before, after = captured.run(*inputs), _runnable(program)(*inputs)
    assert_close(after[0], before[0], what=f"{captured.variant} logits after squeeze_cache_append")
    for (la, ra), (lb, rb) in zip(after[1], before[1]):
        assert torch.equal(la, lb) and torch.equal(ra, rb)


def test_io_flattens_like_our_capture(captured):
    """Same pytree of inputs and outputs and same dynamic ranges as capture(): what passes and lowering take."""
    ep, args = captured.ep, captured.args
    ours = load_checkpoint(captured.path, device="meta")
    sample = example_inputs(ours, LIMITS.example_batch, LIMITS.example_new, LIMITS.example_past)
    with torch.no_grad():
        assert ep.call_spec.out_spec == tree_structure(ours(*sample))
    assert ep.call_spec.in_spec == tree_structure((sample, {}))
    inputs, outputs = io_names(args.num_hidden_layers)
    assert (len(ep.graph_signature.user_inputs), len(ep.graph_signature.user_outputs)) == (len(inputs), len(outputs))
    # batch, seq, past and total = past + seq, as capture() declares them
    want = {f"VR[1, {LIMITS.max_batch}]", f"VR[1, {LIMITS.max_prompt_tokens}]", f"VR[0, {LIMITS.max_context - 1}]",
            "VR[1, int_oo]"}
    assert set(map(str, ep.range_constraints.values())) == want
    with torch.no_grad():
        logits, present = captured.run(*random_inputs(ep, args.vocab_size))
    assert logits.dtype == torch.float32 and len(present) == args.num_hidden_layers


def test_patched_model_gives_transformers_logits_and_patches_undo(make_ckpt):
    """The patches change how transformers computes, not what: same logits; everything restored on exit."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2

    model, args = load_transformers_model(make_ckpt("v2", layers=2, experts=8), device="cpu")
    assert not any(p.is_meta for p in model.parameters())
    ids, pos, mask, past = _inputs(args, past_len=4, new=3, seed=3)
    rotary, apply = model.model.rotary_emb, v2.apply_rotary_emb
    implementations = (model.config._attn_implementation, model.config._experts_implementation)

    def run():
        cache = transformers_patches.prefilled_cache(model.config, [(c[:, None], r[:, None]) for c, r in past])
        return model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache).logits

    with torch.no_grad():
        want = run()
        with transformers_patches.export_patches(model):
            assert v2.apply_rotary_emb is not apply and "forward" in vars(rotary)
            assert model.config._experts_implementation == transformers_patches.EXPORT_EXPERTS
            got = run()
        assert_close(got, want, what="patched v2 vs transformers' code")
        assert_close(want, _unpatched(make_ckpt("v2", layers=2, experts=8), ids, pos, mask, past), what="loader")
    with pytest.raises(RuntimeError, match="inside"):
        with transformers_patches.export_patches(model):
            raise RuntimeError("inside")
    assert v2.apply_rotary_emb is apply and "forward" not in vars(rotary)
    assert (model.config._attn_implementation, model.config._experts_implementation) == implementations


def _unpatched(path, ids, pos, mask, past):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=_hf_cache(hf, past)).logits


def test_bad_checkpoints_raise_our_errors(tmp_path):
    with pytest.raises(CheckpointError):
        load_transformers_model(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(ConfigError):
        load_transformers_model(tmp_path)
