"""Quantized engines for ONNX Runtime's CUDA provider (`export --device cuda --dtype float16|bfloat16
--weights int4|int8`, lowering/quantize.py), checked without a GPU:

- options: float32 activations with `--device cuda --weights` are refused in one line (no float32
  CUDA QMoE kernel), as are block sizes the CUDA QMoE cannot group; half precision is accepted;
- every node of the graphs a CUDA engine opens has a CUDA kernel in the table
  (lowering/ort_cuda_compat.py): float16 int4 (a real export) and bfloat16 int8 (graph-only) by
  default, the other two kinds with DSCOMPILE_CUDA_QUANT_ALL=1 (~20-40 s of export each);
- structure: MatMulNBits/QMoE scales in the activation dtype, QMoE with raw weights
  (weights_prepacked=0), interleaved gate/up (swiglu_fusion=1), block_size, expert_weight_bits,
  accuracy_level 0; the manifest records provider, levels and scale dtype;
- numerics: ONNX Runtime's CPU provider has MatMulNBits and QMoE kernels for float16 activations
  (not bfloat16), so the float16 int4 export's own graphs and weights run on CPU against eager with
  the same fake-quantized weights (quantized from float16, computed in float32) within float16's
  tolerance. The int8 one (opt-in) is judged by the activation-quantization RMS bound: the CPU's
  8-bit QMoE quantizes activations at every level, which the CUDA kernel does not;
- the engine refuses such an export on CPU in one line (OrtEngine.load / check_device).
On a GPU, benchmarks/gpu_check.py's ort-cuda part runs the int4/int8 float16/bfloat16 engines
against eager on the CUDA provider.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from dscompile.capture import Limits
from dscompile.errors import EngineError, OptionError
from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.options import ExportOptions
from dscompile.lowering.ort_cuda_compat import check_out_dir
from dscompile.model.checkpoint import load_checkpoint
from dscompile.runtime.manifest import read_manifest
from dscompile.runtime.ort_engine import OrtEngine
from dscompile.runtime.ort_sessions import session_graphs
from dscompile.verify.compare import eager_for, lowering_rms_bound, run_compare, scheme_of
from dscompile.tolerance import quantized_activations_rms
from helpers import run_here

ALL = os.environ.get("DSCOMPILE_CUDA_QUANT_ALL") == "1"
LIMITS = Limits(max_batch=2, max_prompt_tokens=16, max_context=32)
ONNX_TYPES = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}
# v2-lite: every quantized input dimension (hidden 64, kv_lora_rank 32, experts' 32) is a multiple of
# the CUDA block size 32 (v2/v3's q_lora_rank 48 is not)
VARIANT = "v2-lite"


@pytest.mark.parametrize("options, message", [
    (dict(weights="int4", device="cuda"), "--weights int4 with --device cuda and --dtype float32: ONNX Runtime's "
                                          "CUDA provider has no float32 QMoE kernel"),
    (dict(weights="int8", device="cuda", dtype="float32"), "no float32 QMoE kernel"),
    (dict(weights="int4", device="cuda", dtype="float16", block_size=16), "--block-size 16 with --device cuda"),
    (dict(weights="int4", dtype="bfloat16"), "quantized engines for CPU compute in float32"),
])
def test_options_refuse_what_the_cuda_kernels_lack(options, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        ExportOptions(**options).scheme  # noqa: B018 - the check


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_options_accept_half_precision_for_cuda(dtype, weights):
    scheme = ExportOptions(weights=weights, device="cuda", dtype=dtype).scheme
    assert scheme is not None and scheme.name == weights and scheme.block_size == 32


def test_cli_refuses_float32_quantized_for_cuda_in_one_line(make_ckpt, tmp_path):
    result = run_here("export", make_ckpt(VARIANT), "-o", tmp_path / "out", "--device", "cuda", "--weights", "int4")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    assert len(lines) == 1 and "no float32 QMoE kernel" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def cuda_export(make_ckpt, tmp_path_factory):
    """cuda_export(dtype, weights, graphs_only=False) -> OUT exported for the CUDA provider, once per kind."""
    built: dict[tuple, Path] = {}

    def export(dtype: str, weights: str, graphs_only: bool = False) -> Path:
        key = (dtype, weights, graphs_only)
        if key not in built:
            out = tmp_path_factory.mktemp("cuda_quant") / f"{dtype}-{weights}{'-graphs' if graphs_only else ''}"
            export_checkpoint(make_ckpt(VARIANT, vocab=256), out, ExportOptions.within(
                LIMITS, dtype=dtype, weights=weights, device="cuda", graphs_only=graphs_only))
            built[key] = out
        return built[key]

    return export


KINDS = [("float16", "int4", False), ("bfloat16", "int8", True)]
OPT_IN = [("float16", "int8", False), ("bfloat16", "int4", True)]


def _kinds():
    return [pytest.param(*k, id=f"{k[0]}-{k[1]}") for k in KINDS] + [
        pytest.param(*k, id=f"{k[0]}-{k[1]}", marks=pytest.mark.skipif(
            not ALL, reason="set DSCOMPILE_CUDA_QUANT_ALL=1 (one more export, ~20-40 s)")) for k in OPT_IN]


@pytest.mark.parametrize("dtype, weights, graphs_only", _kinds())
def test_every_node_has_a_cuda_kernel(cuda_export, dtype, weights, graphs_only):
    out = cuda_export(dtype, weights, graphs_only)
    manifest = read_manifest(out, graphs_only_ok=True)
    report = check_out_dir(out, set(session_graphs(manifest, "CUDAExecutionProvider").values()))
    assert report["compatible"] and report["unsupported"] == 0, report
    for name in ("prefill.onnx", "decode.onnx"):  # both, though a quantized engine opens decode only
        result = report["files"][name]
        assert result["unsupported"] == 0 and result["host_compute"] == 0, result
        assert {p["op_type"] for p in result["placements"]} <= {"Squeeze", "Concat", "Gather", "Unsqueeze", "Slice"}


@pytest.mark.parametrize("dtype, weights, graphs_only", _kinds())
def test_kernels_are_set_as_the_cuda_provider_expects(cuda_export, dtype, weights, graphs_only):
    out = cuda_export(dtype, weights, graphs_only)
    manifest = read_manifest(out, graphs_only_ok=True)
    bits = int(weights[3:])
    model = onnx.load(str(out / manifest["graphs"]["decode"]["file"]), load_external_data=False)
    types = {t.name: t.data_type for t in model.graph.initializer}
    nodes = {op: [n for n in model.graph.node if n.op_type == op] for op in ("MatMulNBits", "QMoE", "MoE")}
    # exports for CUDA keep the contract's inputs only (logits_from is for CPU exports: lowering/logits.py)
    assert "logits_from" not in manifest["graphs"]["decode"] and "logits_from" not in types
    cfg = manifest["model"]
    assert len(nodes["QMoE"]) == cfg["num_hidden_layers"] - cfg["first_k_dense_replace"] and not nodes["MoE"]
    assert len(nodes["MatMulNBits"]) >= 3 * cfg["num_hidden_layers"] + 1
    for node in nodes["MatMulNBits"]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        head = attrs["N"] == cfg["vocab_size"]  # lm_head keeps 8 bits (model/quant.py)
        assert attrs["bits"] == (8 if head else bits) and attrs["block_size"] == 32 and attrs["accuracy_level"] == 0
        assert types[node.input[1]] == onnx.TensorProto.UINT8 and types[node.input[2]] == ONNX_TYPES[dtype]
    for node in nodes["QMoE"]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["weights_prepacked"] == 0 and attrs["swiglu_fusion"] == 1 and attrs["activation_type"] == b"swiglu"
        assert attrs["expert_weight_bits"] == bits and attrs["block_size"] == 32 and attrs["accuracy_level"] == 0
        assert len(node.input) == 15 and node.input[14] and not any(node.input[8:11])  # mixing weights, no fc3
        assert types[node.input[3]] == types[node.input[6]] == ONNX_TYPES[dtype]
        fc1 = next(t for t in model.graph.initializer if t.name == node.input[2])
        # raw [E, 2I, D·bits/8] bytes, gate and up rows interleaved (the layout the CPU kernel reads too)
        assert list(fc1.dims) == [cfg["n_routed_experts"], 2 * cfg["moe_intermediate_size"],
                                  cfg["hidden_size"] * bits // 8]
    q = manifest["quantization"]
    assert q["provider"] == "cuda" and manifest["device"] == "cuda" and q["scheme"] == weights
    assert q["accuracy_level"] == {"MatMulNBits": 0, "QMoE": 0}
    assert q["quantized_activations"] == {"MatMulNBits": False, "QMoE": False}
    assert q["scale"].startswith(f"{dtype} per block") and q["bits_per_weight"] == bits + 0.5  # 16-bit scales


def _on_cpu(out: Path, tmp: Path) -> Path:
    """A copy of OUT whose manifest says CPU: the CUDA export's own graphs and weights, opened on CPU."""
    copy = tmp / (out.name + "-on-cpu")
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(device="cpu", quantization=dict(manifest["quantization"], provider="cpu"))
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("weights", ["int4", pytest.param("int8", marks=pytest.mark.skipif(
    not ALL, reason="set DSCOMPILE_CUDA_QUANT_ALL=1 (one more export, ~40 s)"))])
def test_float16_engine_matches_eager_on_cpu(cuda_export, make_ckpt, tmp_path, weights):
    out = cuda_export("float16", weights)
    engine = OrtEngine.load(_on_cpu(out, tmp_path), provider="cpu")
    manifest = read_manifest(out)
    ckpt = make_ckpt(VARIANT, vocab=256)
    eager = eager_for(ckpt, engine.info.max_positions, scheme_of(manifest), quantized_from=torch.float16)
    bound = None
    if weights == "int8":  # the CPU's 8-bit QMoE quantizes activations (not the CUDA kernel): its RMS bound
        ops = manifest["graphs"]["decode"]["quantized_ops"]
        bound = quantized_activations_rms(32, ops["MatMulNBits"] + 2 * ops["QMoE"])
    assert lowering_rms_bound(manifest) is None  # on CUDA the steps are held to float16's own tolerance
    report = run_compare(engine, eager, dtype="float16", decode_steps=3, rms_bound=bound)
    worst = max(s["logits"]["max_abs"] / s["atol"] for s in report["steps"])
    assert report["passed"], f"max |Δ| / atol = {worst:.3g}"
    if weights == "int4":  # the lowering adds nothing beyond float16's rounding (~1e-3 relative measured)
        assert max(s["logits"]["rel_rms"] for s in report["steps"]) < 5e-3, report["steps"]
        # ...and the check can fail: unquantized eager is far from it (int8 would be within ~3%)
        plain = run_compare(engine, eager_for(ckpt, engine.info.max_positions), dtype="float16", decode_steps=1)
        assert max(s["logits"]["rel_rms"] for s in plain["steps"]) > 3e-2


def test_engine_refuses_a_cuda_quantized_export_on_cpu(cuda_export):
    out = cuda_export("float16", "int4")
    with pytest.raises(EngineError, match="run it with --provider cuda"):
        OrtEngine.load(out, provider="cpu")
    manifest = read_manifest(out)
    with pytest.raises(EngineError, match="an int4 float16 engine exported for CUDA .* runs on ONNX Runtime's CUDA "
                                          "provider only"):
        OrtEngine.check_device(out, manifest, "CPUExecutionProvider")
    OrtEngine.check_device(out, manifest, "CUDAExecutionProvider")  # where it belongs: no error
    cpu_export = dict(manifest, device="cpu", dtype="float32", quantization=dict(manifest["quantization"],
                                                                                 provider="cpu"))
    OrtEngine.check_device(out, cpu_export, "CPUExecutionProvider")


def test_eager_reference_loads_the_export_dtype(make_ckpt):
    """eager_for(quantized_from=float16): the weights fake-quantized from float16, computed in float32."""
    ckpt = make_ckpt(VARIANT, vocab=256)
    scheme = ExportOptions(weights="int4", device="cuda", dtype="float16").scheme
    eager = eager_for(ckpt, scheme=scheme, quantized_from=torch.float16)
    reference = load_checkpoint(ckpt, torch.float16, quantize=scheme)
    name = "layers.0.self_attn.o_proj.weight"
    got = dict(eager.model.named_parameters())[name]
    assert got.dtype == torch.float32 and torch.equal(got, dict(reference.named_parameters())[name].float())
