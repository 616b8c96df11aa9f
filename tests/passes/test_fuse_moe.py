"""fuse_moe: structure, exact count, numerics before vs after, and the cases where it must not fire.

Tiny checkpoints of the three routing methods (V3 noaux_tc, V2 group_limited_greedy, V2-Lite
greedy) are captured once per module in both phases; each test rewrites a deep copy.

Shape legend: B batch, S new tokens, P past tokens, D hidden, E routed experts, K active experts.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import dscompile.passes as passes
from helpers import assert_close
from dscompile.tolerance import bound as tolerance_bound
from dscompile.capture import capture, example_inputs
from dscompile.model.checkpoint import build_model, load_checkpoint
from dscompile.model.routing import Routing, route
from dscompile.model.synthetic import random_state, tiny_args
from dscompile.passes import PassOptions, fuse_moe
from dscompile.passes._edit import param_name
from dscompile.passes._match import hint
from dscompile.passes import PassMatchError

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

aten = torch.ops.aten
MOE = torch.ops.dsc.moe.default

# variant -> make_checkpoint options: v3 has two MoE layers (exact count > 1); v2 needs 8 experts
# for routing groups to exist (group_limited_greedy), v2-lite routes greedily.
VARIANTS = {"v3": dict(layers=3, experts=8), "v2": dict(layers=2, experts=8), "v2-lite": dict(layers=2, experts=8)}
CASES = [pytest.param(v, ph, id=f"{v}-{ph}") for v in VARIANTS for ph in ("prefill", "decode")]


@pytest.fixture(scope="module")
def captured(make_ckpt):
    """captured(variant, phase) -> (args, model, ExportedProgram), each captured once per module."""
    cache: dict[tuple[str, str], tuple] = {}
    models: dict[str, torch.nn.Module] = {}

    def get(variant: str, phase: str):
        if variant not in models:
            models[variant] = load_checkpoint(make_ckpt(variant, **VARIANTS[variant]))
        if (variant, phase) not in cache:
            model = models[variant]
            cache[variant, phase] = (model.args, model, capture(model))
        return cache[variant, phase]

    return get


def _outputs(program, inputs) -> list[torch.Tensor]:
    """Output leaves of an ExportedProgram (or of the module it made) on `inputs`."""
    module = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    with torch.no_grad():
        out = module(*inputs)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _assert_same_outputs(before, after, inputs, what: str) -> None:
    ref, got = _outputs(before, inputs), _outputs(after, inputs)
    assert len(ref) == len(got)
    for i, (r, g) in enumerate(zip(ref, got)):
        assert_close(g, r, what=f"{what} output {i}")


def _moe_layers(args) -> list[int]:
    return [i for i in range(args.num_hidden_layers) if args.is_moe_layer(i)]


@pytest.mark.parametrize("variant,phase", CASES)
def test_structure_and_count(captured, variant, phase):
    args, _model, ep = captured(variant, phase)
    before_weights = set(ep.state_dict) | set(ep.constants)
    out, count, _ = fuse_moe.run(copy.deepcopy(ep), PassOptions(phase, args))

    assert count == args.num_moe_layers > 0
    targets = [n.target for n in out.graph.nodes if n.op == "call_function"]
    # The routing and the dense experts are gone; attention has no softmax/sigmoid of its own (sdpa).
    for gone in (aten.topk.default, aten.sigmoid.default, aten._softmax.default, aten.softmax.int, aten.einsum.default):
        assert gone not in targets, f"{gone} left after fuse_moe"
    fused = [n for n in out.graph.nodes if n.target == MOE]
    assert sorted(param_name(out, n.args[1]) for n in fused) == sorted(
        f"model.layers.{i}.mlp.gate.weight" for i in _moe_layers(args)
    ), "expected exactly one dsc.moe per MoE layer"
    # Each fused op stays in its layer's module scope (what --explain and compare label it by).
    assert [hint(n) for n in fused] == [f"model.layers.{i}.mlp" for i in _moe_layers(args)]

    for n in fused:
        path = param_name(out, n.args[1]).removesuffix(".gate.weight")
        names = [param_name(out, a) if a is not None else None for a in n.args[1:9]]
        shared = [f"{path}.shared_experts.{p}.weight" for p in ("gate_proj", "down_proj", "up_proj")]
        bias = f"{path}.gate.e_score_correction_bias" if args.topk_method == "noaux_tc" else None
        assert names == [f"{path}.gate.weight", bias, f"{path}.experts.gate_proj", f"{path}.experts.down_proj",
                         f"{path}.experts.up_proj", *shared]
        assert tuple(n.args[9:]) == (args.num_experts_per_tok, args.n_group, args.topk_group, args.topk_method,
                                     args.norm_topk_prob, args.routed_scaling_factor)
    # The op reads the existing placeholders: no weight was added, and every weight of an MoE
    # layer (router, routed and shared experts) is read by dsc.moe alone.
    assert set(out.state_dict) | set(out.constants) <= before_weights
    prefixes = tuple(f"model.layers.{i}.mlp." for i in _moe_layers(args))
    moe_weights = [n for n in out.graph.nodes if n.op == "placeholder" and (param_name(out, n) or "").startswith(prefixes)]
    per_layer = 4 + (args.topk_method == "noaux_tc") + 3 * bool(args.n_shared_experts)  # gate, bias, 3 routed, 3 shared
    assert len(moe_weights) == len(fused) * per_layer
    for n in moe_weights:
        readers = [u for u in n.users if u.target != aten._assert_tensor_metadata.default]  # asserts check dtypes
        assert all(u.target == MOE for u in readers), f"{param_name(out, n)} still read by {readers}"


@pytest.mark.parametrize("variant,phase", CASES)
def test_numerics_before_vs_after(captured, variant, phase):
    args, _model, ep = captured(variant, phase)
    out, count, _ = fuse_moe.run(copy.deepcopy(ep), PassOptions(phase, args))
    assert count == args.num_moe_layers
    before, after = ep.module(), out.module()
    for seed in (0, 1):
        inputs = passes.random_inputs(ep, args.vocab_size, seed)
        _assert_same_outputs(before, after, inputs, f"{variant} {phase} seed {seed}")


@pytest.mark.parametrize("variant,phase", CASES)
def test_pipeline_verifies(captured, variant, phase):
    args, _model, ep = captured(variant, phase)
    inputs = passes.random_inputs(ep, args.vocab_size, seed=3)
    ref = _outputs(ep, inputs)
    out, report = passes.run_pipeline(copy.deepcopy(ep), PassOptions(phase, args), verify=True, seed=3)
    result = {r.name: r for r in report.results}["fuse_moe"]
    assert result.count == args.num_moe_layers
    bound = tolerance_bound(torch.float32, max(float(t.abs().max()) for t in ref))
    assert result.max_error is not None and result.max_error <= bound, f"max |Δ| {result.max_error} > {bound}"
    for i, (r, g) in enumerate(zip(ref, _outputs(out, inputs))):
        assert_close(g, r, what=f"{variant} {phase} pipeline output {i}")


def test_dense_model_does_not_fire():
    args = replace(tiny_args("v3", layers=1), n_routed_experts=None)
    model = build_model(args)
    model.load_state_dict(random_state(args))
    ep = capture(model)
    nodes = len(ep.graph.nodes)
    out, count, _ = fuse_moe.run(ep, PassOptions("decode", args))
    assert count == 0 and not any(n.target == MOE for n in out.graph.nodes)
    assert len(out.graph.nodes) == nodes
    assert not any(n.target == MOE for n in out.graph.nodes)


def test_option_off_does_not_fire(captured):
    args, _model, ep = captured("v3", "decode")
    ep = copy.deepcopy(ep)
    nodes = len(ep.graph.nodes)
    out, count, _ = fuse_moe.run(ep, PassOptions("decode", args, fuse_moe=False))
    assert count == 0 and len(out.graph.nodes) == nodes
    assert aten.topk.default in {n.target for n in out.graph.nodes}


def test_second_run_finds_nothing_left(captured):
    args, _model, ep = captured("v3", "decode")
    out, count, _ = fuse_moe.run(copy.deepcopy(ep), PassOptions("decode", args))
    out2, count2, _ = fuse_moe.run(out, PassOptions("decode", args))
    assert (count, count2) == (args.num_moe_layers, 0)


def test_fewer_regions_than_the_config_has_stop_the_pipeline(captured):
    """The config says layer 1 is dense too (one MoE layer fewer than the graph has): the pass still
    fuses what the graph has; with two MoE layers announced for a graph of one, a strict pipeline stops."""
    args, _model, ep = captured("v2-lite", "decode")
    assert args.num_moe_layers == 1
    told = replace(args, first_k_dense_replace=0)  # every layer MoE: 2 announced
    with pytest.raises(PassMatchError, match="pass fuse_moe rewrote 1 of the 2 regions the config implies in the "
                                             "decode graph; the graph has no other region of that form"):
        passes.run_pipeline(copy.deepcopy(ep), PassOptions("decode", told))
    _, report = passes.run_pipeline(copy.deepcopy(ep), PassOptions("decode", told, strict=False))
    assert {r.name: (r.count, r.expected) for r in report.results}["fuse_moe"] == (1, 2)


def test_v3_groups_with_experts_that_get_no_tokens(captured):
    """Real dispatch skips experts without tokens; the dense reference multiplies them by 0."""
    args, model, ep = captured("v3", "prefill")
    assert (args.n_routed_experts, args.n_group, args.topk_group) == (8, 4, 2)
    model, ep = copy.deepcopy(model), copy.deepcopy(ep)  # the fixture's copies stay as loaded
    for i in _moe_layers(args):
        # Group 0 (experts 0 and 1) is never among the best 2 of 4 groups.
        for bias in (model.layers[i].mlp.gate.e_score_correction_bias,
                     ep.state_dict[f"model.layers.{i}.mlp.gate.e_score_correction_bias"]):
            bias[:2] = -10.0
    gate = model.layers[_moe_layers(args)[0]].mlp.gate
    x = torch.randn(64, args.hidden_size, generator=torch.Generator().manual_seed(0))
    _w, idx = route(x @ gate.weight.t(), gate.e_score_correction_bias, Routing.of(args))
    counts = torch.bincount(idx.flatten(), minlength=args.n_routed_experts)
    assert (counts[:2] == 0).all() and (counts[2:] > 0).all(), counts

    out, count, _ = fuse_moe.run(copy.deepcopy(ep), PassOptions("prefill", args))
    assert count == args.num_moe_layers
    _assert_same_outputs(ep, out, passes.random_inputs(ep, args.vocab_size), "v3 empty experts, prefill")
    # One token: K = 2 of 8 experts run, 6 get nothing; the fused graph still matches eager.
    ids, pos, mask, cache = example_inputs(model, batch=1, new=1, past=5, seed=1)
    with torch.no_grad():
        ref = model(ids, pos, mask, cache)[0]
        got = out.module()(ids, pos, mask, cache)[0]
    assert_close(got, ref, what="v3 empty experts, one token vs eager")
