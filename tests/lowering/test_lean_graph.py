"""The lowered graphs are lean in small nodes: lowering/fuse_rope.py, lowering/static_reshapes.py,
latent_attention's constant reshapes (lowering/ops.py) and absorb_mla's transposed query parts.

Structure on the shared tiny exports (counts per layer, no run-time reshape targets built by
Concat, no slices of a concatenated query), and numerics of each rewrite against the graph without
it on random non-zero inputs: apply_rope exported by torch.onnx (both layouts, the queries' 4-D and
the key's 3-D form) before and after fuse_rope, and a view over dynamic dims before and after
static_reshapes. The engines' agreement with eager (which these rewrites must keep) is checked by
tests/lowering/test_lower.py and tests/runtime/.

Shapes: B batch, S new tokens, H heads, R rope dim.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import onnxruntime as ort
import onnxscript.optimizer
import pytest
import torch

from dscompile.lowering import fuse_rope, static_reshapes
from dscompile.model.args import ModelArgs
from dscompile.model.transformer import apply_rope

# float32: the fused op and the composite round differently (measured max 2.4e-7 on these sizes)
ROPE_ATOL = 1e-5


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_decode_and_prefill_are_lean(variant, exported, exported_ckpt):
    a = ModelArgs.from_json(exported_ckpt(variant) / "config.json")
    L = a.num_hidden_layers
    for phase in ("decode", "prefill"):
        model = onnx.load(str(exported(variant) / f"{phase}.onnx"), load_external_data=False)
        ops = _ops(model)
        ropes = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
        assert len(ropes) == 2 * L, f"{phase}: {len(ropes)} RotaryEmbedding for {L} layers (q and k each)"
        assert all({a.name: a.i for a in n.attribute}.get("interleaved", 0) == 0 for n in ropes)
        # the composite's pieces are gone: no Sub anywhere, no strided Slice of the rope dims
        assert "Sub" not in ops, f"{phase}: a rotation was left as Mul/Sub/Add"
        producers = {o: n for n in model.graph.node for o in n.output}
        built = [n.name for n in model.graph.node if n.op_type == "Reshape"
                 and producers.get(n.input[1]) is not None and producers[n.input[1]].op_type == "Concat"]
        assert not built, f"{phase}: Reshape targets built at run time by Concat: {built}"
        if phase == "decode":
            # the query's nope/rope parts are not sliced back out of their concatenation
            slices = [n.name for n in model.graph.node if n.op_type == "Slice" and n.name != "logits_from.slice"]
            assert not slices, f"decode: Slice nodes {slices} (logits_from's aside)"
        # a target computed at run time is only ever a whole Shape(y) (the MoE output takes its input's shape)
        computed = [n.name for n in model.graph.node if n.op_type == "Reshape" and n.input[1] in producers
                    and producers[n.input[1]].op_type != "Shape"]
        assert not computed, f"{phase}: Reshape targets computed at run time: {computed}"


class _Rope(torch.nn.Module):
    def __init__(self, interleave: bool):
        super().__init__()
        self.interleave = interleave

    def forward(self, q, k, cos, sin):  # q [B, S, H, R], k [B, S, R], cos/sin [B, S, R/2]
        return (apply_rope(q, cos[:, :, None, :], sin[:, :, None, :], self.interleave),
                apply_rope(k, cos, sin, self.interleave))


def _export(module: torch.nn.Module, args: tuple, dynamic: dict) -> ir.Model:
    program = torch.onnx.export(module, args, dynamo=True, opset_version=23, optimize=False,
                                dynamic_shapes=dynamic, verbose=False)
    model = program.model
    onnxscript.optimizer.optimize_ir(model)
    return model


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _rope_inputs(B=2, S=3, H=4, R=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(B, S, R // 2, generator=g) * 6
    return (torch.randn(B, S, H, R, generator=g), torch.randn(B, S, R, generator=g), angles.cos(), angles.sin())


@pytest.mark.parametrize("interleave", [True, False])
def test_fuse_rope_matches_the_composite(interleave):
    args = _rope_inputs()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dyn = {"q": {0: batch, 1: seq}, "k": {0: batch, 1: seq}, "cos": {0: batch, 1: seq}, "sin": {0: batch, 1: seq}}
    before = _export(_Rope(interleave), args, dyn)
    after = ir.from_proto(ir.to_proto(before))
    assert fuse_rope.run(after) == 2
    ops = [n.op_type for n in after.graph]
    assert ops.count("RotaryEmbedding") == 2 and ops.count("Gather") == (2 if interleave else 0)
    names = [v.name for v in before.graph.inputs]
    for seed, (B, S) in enumerate([(2, 3), (1, 1), (3, 5)]):
        feeds = {n: t.numpy() for n, t in zip(names, _rope_inputs(B, S, seed=seed + 1))}
        for got, want, eager in zip(_run(after, feeds), _run(before, feeds), _Rope(interleave)(
                *(torch.from_numpy(feeds[n]) for n in names))):
            err = np.abs(got - want)
            assert err.max() <= ROPE_ATOL, f"B={B} S={S}: max {err.max():.3g} mean {err.mean():.3g}"
            assert np.abs(got - eager.numpy()).max() <= ROPE_ATOL
            assert np.abs(want).max() > 0.1  # non-zero inputs, non-trivial outputs


class _NotRope(torch.nn.Module):
    def forward(self, k, cos, sin):  # sin and cos swapped in the second half: not a rotation
        k1, k2 = k[..., 0::2], k[..., 1::2]
        return torch.cat([k1 * cos - k2 * sin, k2 * sin + k1 * cos], dim=-1)


def test_fuse_rope_leaves_other_formulas():
    _, k, cos, sin = _rope_inputs()
    model = _export(_NotRope(), (k, cos, sin), None)
    assert fuse_rope.run(model) == 0
    assert "RotaryEmbedding" not in [n.op_type for n in model.graph]


class _View(torch.nn.Module):
    def forward(self, x, ids):  # x [B, S, H*D], ids [B, S]: the view's B and S come from ids' shape
        return x.view(ids.shape[0], ids.shape[1], 4, -1).transpose(1, 2) * 2.0


def test_static_reshapes_matches_the_computed_target():
    x, ids = torch.randn(2, 3, 24), torch.zeros(2, 3, dtype=torch.int64)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    before = _export(_View(), (x, ids), {"x": {0: batch, 1: seq}, "ids": {0: batch, 1: seq}})
    assert any(n.op_type == "Shape" for n in before.graph)
    after = ir.from_proto(ir.to_proto(before))
    assert static_reshapes.run(after) == 1
    ir_passes.RemoveUnusedNodesPass()(after)
    assert "Shape" not in [n.op_type for n in after.graph]
    rng = np.random.default_rng(0)
    for B, S in [(2, 3), (1, 1), (4, 7)]:
        feeds = {"x": rng.standard_normal((B, S, 24)).astype(np.float32), "ids": np.zeros((B, S), np.int64)}
        (got,), (want,) = _run(after, feeds), _run(before, feeds)
        assert got.shape == want.shape == (B, 4, S, 6)
        assert np.array_equal(got, want)


def test_static_reshapes_leaves_two_unknown_dims():
    class Flat(torch.nn.Module):
        def forward(self, x, ids):  # [B, S, D] -> [B*S... as (S, B, D)]: neither dim on its own axis
            return x.reshape(ids.shape[1], ids.shape[0], -1) + 1.0

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    model = _export(Flat(), (torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.int64)),
                    {"x": {0: batch, 1: seq}, "ids": {0: batch, 1: seq}})
    assert static_reshapes.run(model) == 0
