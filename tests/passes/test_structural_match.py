"""Structural matching: absorb_mla and fuse_moe decide from the graph's operators, shapes and
dataflow, never from module names or the config.

- Negative cases: the reference model with layers changed so that each computes something the
  fused op does not (another scoring function, no softmax, a top-k of the smallest scores, a k
  that differs between choosing and dispatching, weights normalized by their max, an
  up-projection split values-first, an up-projection with a bias).
  Each such region is left alone with its reason recorded; a strict pipeline stops naming the
  first; the program still lowers to ONNX and matches eager. (All changes live in one model, so it
  is captured and lowered once.)
- The config does not decide: given a config that disagrees with the graph (another k, no
  normalization, another routing method), the pass fuses what the graph computes.
- Names do not decide: the same model with every module renamed is rewritten the same way.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_close
from dscompile.capture import Limits, capture, example_inputs
from dscompile.lowering.graph import lower
from dscompile.model.checkpoint import build_model
from dscompile.model.routing import route
from dscompile.model.synthetic import random_state, tiny_args
from dscompile.passes import PassMatchError, PassOptions, run_pipeline
from dscompile.runtime.contract import io_names

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

LIMITS = Limits(max_batch=4, max_prompt_tokens=16, max_context=32)
MOE = torch.ops.dsc.moe.default
LATENT = torch.ops.dsc.latent_attention.default


def _model(variant: str, layers: int = 3) -> nn.Module:
    args = tiny_args(variant, layers=layers, experts=8, vocab=128)
    model = build_model(args)
    model.load_state_dict(random_state(args), strict=False)
    return model.eval()


def _tanh_gate(self, x):
    logits = F.linear(x.float(), self.weight.float())
    scores = logits.tanh()
    ids = scores.topk(self.routing.top_k, dim=-1).indices
    return scores.gather(1, ids), ids


def _smallest_gate(self, x):
    scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)
    ids = scores.topk(self.routing.top_k, dim=-1, largest=False).indices
    return scores.gather(1, ids) * self.routing.routed_scaling_factor, ids


def _max_normalized_gate(self, x):
    scores = F.linear(x.float(), self.weight.float()).sigmoid()
    ids = (scores + self.e_score_correction_bias).topk(self.routing.top_k, dim=-1).indices
    w = scores.gather(1, ids)
    return w / w.amax(-1, keepdim=True) * self.routing.routed_scaling_factor, ids


def _softmax_removed(self, x):
    """Routing on the raw logits: no scoring function normalizes them."""
    logits = F.linear(x.float(), self.weight.float())
    ids = logits.topk(self.routing.top_k, dim=-1).indices
    return logits.gather(1, ids), ids


def _dispatch_fewer_than_chosen(self, x):
    """Experts chosen with k = 3 (weights normalized over the three), dispatched to the first 2."""
    logits = F.linear(x.float(), self.weight.float())
    weights, ids = route(logits, self.e_score_correction_bias, dataclasses.replace(self.routing, top_k=3))
    return weights[:, :2], ids[:, :2]


def _values_first(self, x, cos, sin, mask, past):
    """MLA with the up-projection's heads laid out [value, key] instead of [key, value]."""
    from dscompile.model.transformer import apply_rope

    B, S, _ = x.shape
    H, N, R, V = self.n_heads, self.nope_dim, self.rope_dim, self.v_dim
    q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(B, S, H, N + R)
    q_nope, q_rope = q.split([N, R], dim=-1)
    q_rope = apply_rope(q_rope, cos[:, :, None, :], sin[:, :, None, :], self.interleave)
    latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, R], dim=-1)
    latent = self.kv_a_layernorm(latent)
    k_rope = apply_rope(k_rope, cos, sin, self.interleave)
    latent_all, k_rope_all = torch.cat([past[0], latent], dim=1), torch.cat([past[1], k_rope], dim=1)
    T = latent_all.shape[1]
    v, k_nope = self.kv_b_proj(latent_all).view(B, T, H, N + V).split([V, N], dim=-1)
    q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
    k = torch.cat([k_nope, k_rope_all[:, :, None, :].expand(B, T, H, R)], dim=-1).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, scale=self.softmax_scale)
    return self.o_proj(o.transpose(1, 2).reshape(B, S, H * V)), (latent_all, k_rope_all)


def _with_kv_bias(model, layer):
    proj = model.layers[layer].self_attn.kv_b_proj
    with torch.no_grad():
        new = nn.Linear(proj.in_features, proj.out_features, bias=True)
        new.weight.copy_(proj.weight)
        new.bias.copy_(0.1 * torch.randn(proj.out_features, generator=torch.Generator().manual_seed(5)))
    model.layers[layer].self_attn.kv_b_proj = new


# One v3 model of 9 layers (layer 0 dense, 1-8 MoE) with a different change in each of 7 layers.
NEGATIVE = {
    # name: (changed layer, change, pass, step, what the reason says)
    "up-projection-values-first": (0, ("self_attn", _values_first), "absorb_mla", "keys", "not key then value"),
    "up-projection-with-bias": (1, _with_kv_bias, "absorb_mla", "values", "has a bias"),
    "gate-scoring-tanh": (2, ("mlp.gate", _tanh_gate), "fuse_moe", "scoring", "tanh"),
    "gate-without-softmax": (3, ("mlp.gate", _softmax_removed), "fuse_moe", "scoring", "topk"),
    "topk-of-smallest": (4, ("mlp.gate", _smallest_gate), "fuse_moe", "top-k", "smallest"),
    "k-differs-from-dispatch": (5, ("mlp.gate", _dispatch_fewer_than_chosen), "fuse_moe", "experts",
                                "neither build a combine matrix nor scale"),
    "weights-over-their-max": (6, ("mlp.gate", _max_normalized_gate), "fuse_moe", "weights", "other than their sum"),
}
LAYERS = 9


def _change(model, layer, change):
    if callable(change):
        change(model, layer)
        return
    path, forward = change
    module = model.layers[layer].get_submodule(path)
    module.forward = types.MethodType(forward, module)


def _inputs(model, batch=2, new=3, past=4, seed=0):
    ids, pos, mask, cache = example_inputs(model, batch, new, past, seed)
    mask[0, :2] = 0  # row 0 left-padded
    return ids, pos, mask, cache


def _ort_logits(onnx_model, inputs, num_layers):
    session = ort.InferenceSession(ir.to_proto(onnx_model).SerializeToString(), providers=["CPUExecutionProvider"])
    names, _ = io_names(num_layers)
    ids, pos, mask, cache = inputs
    flat = [ids, pos, mask] + [t for layer in cache for t in layer]
    return torch.from_numpy(session.run(["logits"], {n: np.ascontiguousarray(t.numpy()) for n, t in zip(names, flat)})[0])


@pytest.fixture(scope="module")
def changed():
    """The changed model, its capture, the strict pipeline's error and the lenient pipeline's program and report."""
    model = _model("v3", LAYERS)
    for layer, change, *_ in NEGATIVE.values():
        _change(model, layer, change)
    ep = capture(model, LIMITS)
    options = PassOptions("decode", model.args, absorb="reassociate")
    with pytest.raises(PassMatchError) as strict:
        run_pipeline(ep, options)
    program, report = run_pipeline(ep, dataclasses.replace(options, strict=False))
    return model, program, {r.name: r for r in report.results}, str(strict.value)


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_a_region_that_computes_something_else_is_left_alone_with_its_reason(changed, name):
    layer, _change_, pass_name, step, says = NEGATIVE[name]
    _model_, _program, results, _strict = changed
    mine = [u for u in results[pass_name].unmatched if u["region"].startswith(f"model.layers.{layer}.")]
    assert len(mine) == 1 and mine[0]["step"] == step and says in mine[0]["found"], results[pass_name].unmatched


def test_the_regions_left_alone_stop_a_strict_pipeline_and_still_lower_and_match_eager(changed):
    model, program, results, strict = changed
    # A strict pipeline stops at the first pass that falls short, naming its first region.
    assert strict.startswith("pass absorb_mla rewrote 7 of the 9 regions the config implies in the decode graph; "
                             "model.layers.0.self_attn: keys:"), strict
    # Every region not changed is rewritten, the changed ones keep their own ops.
    by_pass = {name: sum(n[2] == name for n in NEGATIVE.values()) for name in results}
    for name, result in results.items():
        assert (result.count, len(result.unmatched)) == (result.expected - by_pass[name], by_pass[name]), name
    assert sum(n.target == LATENT for n in program.graph.nodes) == LAYERS - by_pass["absorb_mla"]
    assert sum(n.target == MOE for n in program.graph.nodes) == LAYERS - 1 - by_pass["fuse_moe"]
    inputs = _inputs(model)
    with torch.no_grad():
        want = model(*inputs)[0]
        got = program.module()(*inputs)[0]
    assert_close(got, want, what="rewritten program vs eager")
    onnx_logits = _ort_logits(lower(program, "decode", LAYERS), inputs, LAYERS)
    assert_close(onnx_logits, want, what="ONNX Runtime vs eager")


CONFIG_DISAGREES = {
    # The graph routes as the checkpoint's code does; the config handed to the passes says otherwise.
    "another-k": ("v3", dict(num_experts_per_tok=3), dict(top_k=2)),
    "no-normalization": ("v3", dict(norm_topk_prob=False), dict(norm_topk_prob=True)),
    "another-method": ("v2", dict(topk_method="noaux_tc", scoring_func="sigmoid"),
                       dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
}


@pytest.mark.parametrize("name", sorted(CONFIG_DISAGREES))
def test_the_graph_decides_not_the_config(name):
    variant, told, fused_with = CONFIG_DISAGREES[name]
    model = _model(variant, layers=2)
    ep = capture(model, LIMITS)
    program, report = run_pipeline(ep, PassOptions("decode", dataclasses.replace(model.args, **told)))
    (moe,) = [n for n in program.graph.nodes if n.target == MOE]
    attrs = dict(zip(("top_k", "n_group", "topk_group", "topk_method", "norm_topk_prob", "routed_scaling_factor"),
                     moe.args[9:]))
    assert {k: attrs[k] for k in fused_with} == fused_with
    inputs = _inputs(model)
    with torch.no_grad():
        assert_close(program.module()(*inputs)[0], model(*inputs)[0], what=f"{name}: fused vs eager")


def test_names_do_not_decide():
    """Every module class renamed: the passes find the same regions."""
    model = _model("v3", layers=2)
    renamed = {}
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith("dscompile"):
            renamed.setdefault(cls, type(f"Renamed{len(renamed)}", (cls,), {}))
            module.__class__ = renamed[cls]
    ep = capture(model, LIMITS)
    program, report = run_pipeline(ep, PassOptions("decode", model.args, absorb="reassociate"))
    counts = {r.name: (r.count, r.expected) for r in report.results}
    assert counts == {"squeeze_cache_append": (0, 0), "absorb_mla": (2, 2), "fuse_moe": (1, 1)}
    assert not any("MLA" in str(n.meta.get("nn_module_stack")) for n in ep.graph.nodes)


def test_export_that_falls_short_stops_in_one_line_and_explains(make_ckpt, tmp_path, monkeypatch):
    """A layer the pass cannot read: `export` stops with the region and the step, --explain lists every
    such region first, nothing is left in OUT; an unknown frontend or one the options exclude is one line."""
    from typer.testing import CliRunner

    from dscompile.cli import app
    from dscompile.passes import absorb_mla
    from dscompile.passes._match import Miss

    checkpoint = make_ckpt("v2-lite", layers=2, experts=8)
    read = absorb_mla.match

    def refuse_layer_1(ep, sdpa, form):
        if "layers.1." in str(sdpa.meta.get("nn_module_stack")):
            raise Miss("values", "made to fail by the test")
        return read(ep, sdpa, form)

    monkeypatch.setattr(absorb_mla, "match", refuse_layer_1)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", str(checkpoint), "-o", str(out), "--absorb", "reassociate",
                                      "--explain", "--max-batch", "2", "--max-prompt-tokens", "8", "--max-context", "16"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: pass absorb_mla rewrote 1 of the 2 regions the config implies in the "
                                "prefill graph; model.layers.1.self_attn: values: made to fail by the test"), lines
    assert "not rewritten: model.layers.1.self_attn: values: made to fail by the test" in lines
    assert "Traceback" not in result.stderr and not out.exists()
    for argv, says in ((["--frontend", "tvm"], "--frontend 'tvm' is not one of dscompile, transformers"),
                       (["--frontend", "transformers", "--weights", "int8"], "quantized engines are built from our model"),
                       (["--frontend", "transformers", "--graphs-only"], "graph-only exports capture our model")):
        result = CliRunner().invoke(app, ["export", str(checkpoint), "-o", str(out), *argv])
        assert result.exit_code == 2 and says in result.stderr.strip().splitlines()[-1], result.output
        assert not out.exists()
