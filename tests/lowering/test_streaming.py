"""Streaming export: weights are read lazily, one tensor at a time, and give the same engine.

- every weight of a meta-loaded model materializes to exactly what the in-memory loader gives
  (both expert layouts, shards, FP8, bfloat16);
- lowering a meta-captured program gives the same graphs and initializer values as lowering the
  in-memory one, and reads no large weight while doing it;
- a whole export never holds more than a few loaded weights at a time (counted with weakrefs on
  what the checkpoint reader returns), far less than the model;
- the torch engine fills its weightless programs from weights.bin and refuses a manifest whose
  places do not fit the file.
"""

from __future__ import annotations

import json
import shutil
import weakref

import numpy as np
import pytest
import torch

from dscompile.capture import Limits, capture
from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.options import ExportOptions
from dscompile.lowering.graph import lower
from dscompile.lowering.weights import FOLD_LIMIT
from dscompile.lowering.ops import choose_moe_experts
from dscompile.model import checkpoint as ckpt_mod
from dscompile.model.checkpoint import load_checkpoint
from dscompile.passes import PassOptions, run_pipeline
from dscompile.lazy import materialize
from dscompile.errors import EngineError
from dscompile.runtime.contract import PHASES

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

SMALL = Limits(max_batch=2, max_prompt_tokens=8, max_context=32)


def _weights(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("variant,kw", [("v3", {}), ("v2", {"layout": "stacked"}),
                                        ("v3", {"fp8": True, "shards": 3}), ("v2-lite", {"shards": 2})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_weights_materialize_to_the_loaded_ones(make_ckpt, variant, kw, dtype):
    path = make_ckpt(variant, layers=2, experts=8, **kw)
    real, lazy = _weights(load_checkpoint(path, dtype=dtype)), _weights(load_checkpoint(path, dtype=dtype, device="meta"))
    assert real.keys() == lazy.keys()
    for name, tensor in real.items():
        assert lazy[name].is_meta
        value = materialize(lazy[name])
        assert value.dtype == tensor.dtype and torch.equal(value, tensor), name


def test_meta_scan_refuses_nonfinite_weights(make_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    from dscompile.errors import CheckpointError

    bad = tmp_path / "nan"
    shutil.copytree(make_ckpt("v3", layers=2, experts=8), bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    load_checkpoint(bad, device="meta")  # no scan: shapes only, nothing read
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.o_proj.weight has 1 non-finite"):
        load_checkpoint(bad, device="meta", scan=True)


def _lowered(program, args, phase):
    """The ONNX graph of `phase` from a captured program (one capture serves both phases, as in export)."""
    optimized, _ = run_pipeline(program, PassOptions(phase, args))
    return lower(optimized, phase, args.num_hidden_layers,
                 moe_experts=choose_moe_experts(phase, torch.float32, "onnxruntime"))


def test_lowering_meta_program_matches_and_reads_no_large_weight(make_ckpt, monkeypatch):
    path = make_ckpt("v3", layers=2, experts=8)
    real = load_checkpoint(path)
    lazy = load_checkpoint(path, device="meta")
    sizes: list[int] = []
    load = ckpt_mod.CheckpointSource.load
    monkeypatch.setattr(ckpt_mod.CheckpointSource, "load", lambda self: sizes.append(int(np.prod(self.shape))) or load(self))
    lazy_program = capture(lazy, SMALL)
    assert max(sizes, default=0) <= max(FOLD_LIMIT, 1024), f"capture read a weight of {max(sizes)} elements"
    real_program = capture(real, SMALL)
    for phase in PHASES:
        sizes.clear()
        lazy_model = _lowered(lazy_program, lazy.args, phase)
        # The optimizer folds below FOLD_LIMIT elements and compares initializers of up to 1024 by value
        # (onnx_ir's initializer deduplication); nothing larger may be read before the weights are written.
        assert max(sizes, default=0) <= max(FOLD_LIMIT, 1024), f"{phase}: lowering read a weight of {max(sizes)} elements"
        real_model = _lowered(real_program, real.args, phase)
        got = {n: v.const_value.numpy() for n, v in lazy_model.graph.initializers.items()}
        want = {n: v.const_value.numpy() for n, v in real_model.graph.initializers.items()}
        assert got.keys() == want.keys()
        for name in want:
            assert np.array_equal(got[name], want[name]), f"{phase}: initializer {name} differs"
        assert [(n.op_type, n.domain) for n in lazy_model.graph] == [(n.op_type, n.domain) for n in real_model.graph]


@pytest.fixture(scope="module")
def counted_export(make_ckpt, tmp_path_factory):
    """(checkpoint, OUT, alive) of one export of a four-layer v3 within SMALL, with the weights the
    checkpoint reader returned counted while they lived (alive: bytes, peak, largest)."""
    path = make_ckpt("v3", layers=4, experts=8)
    out = tmp_path_factory.mktemp("streaming") / "out"
    alive = {"bytes": 0, "peak": 0, "largest": 0, "total": 0}

    def release(nbytes):
        alive["bytes"] -= nbytes

    load = ckpt_mod.CheckpointSource.load

    def counted(self):
        tensor = load(self)
        nbytes = tensor.numel() * tensor.element_size()
        alive["bytes"] += nbytes
        alive["peak"] = max(alive["peak"], alive["bytes"])
        alive["largest"] = max(alive["largest"], nbytes)
        weakref.finalize(tensor, release, nbytes)
        return tensor

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ckpt_mod.CheckpointSource, "load", counted)
        export_checkpoint(path, out, ExportOptions.within(SMALL))
    return path, out, alive


def test_export_holds_a_few_weights_at_a_time(counted_export):
    path, _, alive = counted_export
    model_bytes = sum(t.numel() * t.element_size() for t in _weights(load_checkpoint(path, device="meta")).values())
    assert alive["largest"] > 0
    # The interleaved MoE fc1 needs the gate and up experts at once; nothing needs more than 3 weights.
    assert alive["peak"] <= 3 * alive["largest"], alive
    assert alive["peak"] < model_bytes / 4, (alive, model_bytes)


def test_torch_engine_reads_program_weights_from_the_weight_file(counted_export, tmp_path):
    from dscompile.runtime.torch_engine import TorchEngine

    out = tmp_path / "out"
    shutil.copytree(counted_export[1], out)  # a copy: its manifest is edited below
    manifest = json.loads((out / "manifest.json").read_text())
    places = manifest["graphs"]["decode"]["program_weights"]
    assert places and all(p["offset"] % 4096 == 0 for p in places.values())
    engine = TorchEngine.load(out, device="cpu")
    ids = torch.tensor([[1, 2, 3]])
    logits, cache = engine.step(ids, torch.arange(3)[None], torch.ones(1, 3, dtype=torch.int64), None)
    assert torch.isfinite(logits).all() and logits.abs().max() > 0

    name = next(iter(places))
    places[name]["offset"] = (out / "weights.bin").stat().st_size  # points past the end of the file
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=f"program weight {name} of decode"):
        TorchEngine.load(out, device="cpu")
