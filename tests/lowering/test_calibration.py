"""Calibrated quantization (`export --weights int4 --calibration TEXT`): the importance-weighted scale
search, the activations it is weighted by, and a calibrated engine against eager with the same
weights (the lowering stays exact: requantizing a calibrated weight gives back its bytes). ~15 s."""

from __future__ import annotations

import json

import pytest
import torch

from dscompile.errors import OptionError
from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.options import ExportOptions
from dscompile.model.calibration import collect_importance
from dscompile.model.checkpoint import load_checkpoint
from dscompile.model.demo_tokenizer import CORPUS
from dscompile.model.quant import CALIBRATED_FACTORS, Scheme, dequantize, quantize, quantize_weighted
from dscompile.runtime.ort_engine import OrtEngine
from dscompile.verify.compare import eager_for, importance_of, run_compare, scheme_of


def weighted_error(w, fake, importance):
    return float(((w - fake) ** 2 * importance).sum())


@pytest.mark.parametrize("bits", [4, 8])
def test_weighted_search_lowers_the_weighted_error_and_requantizes_exactly(bits):
    gen = torch.Generator().manual_seed(0)
    scheme = Scheme(bits, 32)
    w = torch.randn(64, 256, generator=gen)
    importance = torch.rand(256, generator=gen) ** 4 * 100  # a few channels matter far more than the rest
    plain = dequantize(*quantize(w, scheme))
    q, d = quantize_weighted(w, scheme, importance)
    calibrated = dequantize(q, d)
    assert weighted_error(w, calibrated, importance) < 0.95 * weighted_error(w, plain, importance)
    # every block's scale is one of the searched factors of its largest value, which stays on the grid,
    # so the lowering's plain requantization of the fake-quantized weight gives back the same integers
    q2, d2 = quantize(calibrated, Scheme(bits, 32, search=False))
    assert torch.equal(q2, q) and torch.equal(d2, d)
    peak = w.reshape(64, 8, 32).abs().amax(-1)
    factors = (d.abs() * (1 << (bits - 1)) / peak)
    assert all(min(abs(f - c) for c in CALIBRATED_FACTORS) < 1e-5 for f in factors.flatten().tolist())


def test_uniform_importance_is_the_plain_least_squares_search():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    q, d = quantize_weighted(w, Scheme(4, 32), torch.ones(64))
    plain = dequantize(q, d)
    searched = dequantize(*quantize(w, Scheme(4, 32)))  # its factors are a subset of CALIBRATED_FACTORS
    assert ((w - plain) ** 2).sum() <= ((w - searched) ** 2).sum() + 1e-6


def test_experts_take_one_importance_vector_each():
    w = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(2))  # [E, rows, K]
    importance = torch.ones(3, 32)
    importance[1, :16] = 1e4  # expert 1 cares about its first block
    q, d = quantize_weighted(w, Scheme(4, 16), importance)
    alone = quantize_weighted(w[1], Scheme(4, 16), importance[1])
    assert torch.equal(q[1], alone[0]) and torch.equal(d[1], alone[1])


def test_importance_is_the_mean_squared_input_of_each_weight(make_ckpt):
    model = load_checkpoint(make_ckpt("v3", layers=2, experts=4))
    ids = list(range(3, 40))
    importance, stats = collect_importance(model, ids, window=16)
    assert stats["tokens"] == 37 and stats["windows"] == 3
    # o_proj of layer 0 by hand: its input on the first window
    seen = []
    hook = model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for start in (0, 16, 32):
            model(torch.tensor(ids[start:start + 16])[None])
    hook.remove()
    x = torch.cat(seen).double()
    assert torch.allclose(importance["layers.0.self_attn.o_proj.weight"].double(), x.pow(2).mean(0), rtol=1e-5)
    E, I, D = model.layers[1].mlp.experts.gate_proj.shape
    assert importance["layers.1.mlp.experts.gate_proj"].shape == (E, D)
    assert importance["layers.1.mlp.experts.down_proj"].shape == (E, I)
    assert "lm_head.weight" in importance and "layers.1.mlp.gate.weight" not in importance  # the router stays float


def test_calibrated_engine_matches_eager_with_the_same_weights(make_ckpt, tmp_path):
    ckpt = make_ckpt("v3", layers=1, experts=4, vocab=320)
    text = tmp_path / "calibration.txt"
    text.write_text(CORPUS)
    out = tmp_path / "int4"
    options = ExportOptions(weights="int4", block_size=16, accuracy_level=0, calibration=text, max_batch=2,
                            max_prompt_tokens=16, max_context=32)
    export_checkpoint(ckpt, out, options)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["quantization"]["calibration"]
    assert entry["tokens"] > 100 and len(entry["text_sha256"]) == 64 and entry["file"] in manifest["files"]
    importance = importance_of(out, manifest)
    engine = OrtEngine.load(out, provider="cpu")
    calibrated = eager_for(ckpt, engine.info.max_positions, scheme_of(manifest), importance=importance)
    assert run_compare(engine, calibrated, decode_steps=2)["passed"]  # float32 tolerance: the lowering is exact
    plain = eager_for(ckpt, engine.info.max_positions, scheme_of(manifest))
    assert not run_compare(engine, plain, decode_steps=2)["passed"]  # other scales: the calibration was used


def test_calibration_is_validated(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    for options, message in [(dict(calibration=text), "needs --weights"),
                             (dict(weights="int4", calibration=tmp_path / "missing.txt"), "not found"),
                             (dict(weights="int4", calibration=text, graphs_only=True), "--graphs-only")]:
        with pytest.raises(OptionError, match=message):
            ExportOptions(**options)
