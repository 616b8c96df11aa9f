"""The bound kernels that quantize activations are judged by (tolerance.quantized_activations_rms): an int4
engine at the CPU's accuracy_level 4 is within it against eager with the same weights, and the same
engine with one weight's scales off by 10% (a wrong lowering) is not. ~15 s."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest

import dscompile
from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.options import ExportOptions
from dscompile.runtime.weights import fingerprint
from dscompile.tolerance import quantized_activations_rms


@pytest.fixture(scope="module")
def int4(make_ckpt, tmp_path_factory):
    ckpt = make_ckpt("v3", layers=2, experts=4)
    out = tmp_path_factory.mktemp("qa") / "int4"
    export_checkpoint(ckpt, out, ExportOptions(weights="int4", block_size=16, max_batch=2, max_prompt_tokens=16,
                                               max_context=32))
    return ckpt, out


def scale_weight(out, copy, name: str, factor: float) -> None:
    """`copy` = OUT with the scales of the quantized weight `name` multiplied by `factor` in its weights.bin."""
    shutil.copytree(out, copy)
    os.chmod(copy / "weights.bin", 0o644)
    model = onnx.load(str(copy / "decode.onnx"), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.name == f"{name}.scales")
    place = {e.key: int(e.value) for e in init.external_data if e.key in ("offset", "length")}
    with open(copy / "weights.bin", "r+b") as f:
        f.seek(place["offset"])
        scales = np.frombuffer(f.read(place["length"]), dtype=np.float32) * factor
        f.seek(place["offset"])
        f.write(scales.astype(np.float32).tobytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["weights"]["fingerprint"] = fingerprint(copy / "weights.bin")  # an export that wrote these bytes
    (copy / "manifest.json").write_text(json.dumps(manifest))


def test_bound_follows_block_size_and_kernel_count():
    assert quantized_activations_rms(16, 17) == pytest.approx(2 * 17 ** 0.5 * 4 / (127 * 12 ** 0.5))
    assert quantized_activations_rms(128, 10) > quantized_activations_rms(32, 10) > quantized_activations_rms(32, 1)


def test_quantized_activations_within_bound_and_a_wrong_scale_is_caught(int4, tmp_path):
    ckpt, out = int4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["quantized_activations"]["MatMulNBits"]  # the CPU's accuracy_level 4
    good = dscompile.compare(ckpt, out, decode_steps=2)
    assert good["passed"], [(s["logits"]["rel_rms"], s["cache_rel_rms"], s["rel_rms_bound"]) for s in good["steps"]]
    bound = good["steps"][0]["rel_rms_bound"]
    worst = max(max(s["logits"]["rel_rms"], s["cache_rel_rms"]) for s in good["steps"])
    assert 0 < worst < bound / 2, (worst, bound)  # the kernels err, well within what they can
    scale_weight(out, tmp_path / "bad", "model.layers.0.self_attn.o_proj.weight", 1.1)
    bad = dscompile.compare(ckpt, tmp_path / "bad", decode_steps=2)
    assert not bad["passed"], [(s["logits"]["rel_rms"], s["rel_rms_bound"]) for s in bad["steps"]]
