"""Lowering that scales, and the graph-only export that shows it.

- a graph-only export (`ExportOptions(graphs_only=True)`) builds the model from a config
  alone, writes the graphs and the manifest, and neither computes nor writes a weight;
- every lowering export picks (float32 and half precision, ONNX Runtime and TensorRT targets)
  gives graphs whose node count does not depend on the number of routed experts: a tiny config
  with 256 experts lowers to as many nodes per graph as the same config with 16;
- engines refuse a graph-only OUT in one line; `inspect` reads it.
"""

from __future__ import annotations

import json

import onnx
import onnx_ir as ir
import pytest
import torch

from dscompile.capture import Limits, capture
from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.options import ExportOptions
from dscompile.lowering.graph import lower
from dscompile.lowering.ops import choose_moe_experts
from dscompile.lowering.weights import save_models
from dscompile.model import checkpoint as ckpt_mod
from dscompile.model.checkpoint import load_checkpoint
from dscompile.model.synthetic import tiny_args
from dscompile.passes import PassOptions, run_pipeline
from dscompile.errors import CheckpointError, EngineError, OptionError
from dscompile.runtime.contract import PHASES
from dscompile.runtime.manifest import load_manifest, read_manifest

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

SMALL = Limits(max_batch=2, max_prompt_tokens=8, max_context=32)
GRAPH_FILES = {"prefill": "prefill.onnx", "decode": "decode.onnx", "decode_inplace": "decode_inplace.onnx"}


def _config(tmp_path, experts: int):
    """A folder holding only the config.json of a tiny V3: hidden 16, one layer (an MoE layer)."""
    args = tiny_args("v3", layers=1, experts=experts, hidden=16, heads=2, vocab=64)
    folder = tmp_path / f"config-{experts}"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(args.to_config()))
    return folder


def _nodes(out) -> dict[str, int]:
    return {name: len(onnx.load(str(out / f), load_external_data=False).graph.node)
            for name, f in GRAPH_FILES.items() if (out / f).is_file()}


@pytest.fixture(scope="module")
def graphs_only(tmp_path_factory):
    """graphs_only(experts, dtype, target, device) -> (OUT, manifest) of the tiny config, exported once."""
    tmp = tmp_path_factory.mktemp("graphs_only")
    done = {}

    def export(experts: int, dtype: str = "float32", target: str = "onnxruntime", device: str = "cpu"):
        key = (experts, dtype, target, device)
        if key not in done:
            out = tmp / f"out-{experts}-{dtype}-{target}-{device}"
            done[key] = out, export_checkpoint(_config(tmp, experts) / "config.json", out, ExportOptions.within(
                                                   SMALL, dtype=dtype, target=target, device=device, graphs_only=True))
        return done[key]

    return export


@pytest.fixture(scope="module")
def graphs_only_out(graphs_only):
    return graphs_only(16)


# moe_op (ONNX Runtime, float32) and gather/dense (half precision, or TensorRT) with the casts of a
# bfloat16 graph: every lowering choose_moe_experts picks.
@pytest.mark.parametrize("dtype,target", [("float32", "onnxruntime"), ("bfloat16", "tensorrt")])
def test_node_count_does_not_grow_with_routed_experts(graphs_only, dtype, target):
    counts, lowerings = {}, {}
    for experts in (16, 256):
        out, manifest = graphs_only(experts, dtype, target)
        assert manifest["model"]["n_routed_experts"] == experts
        counts[experts] = _nodes(out)
        lowerings[experts] = {g: manifest["graphs"][g]["moe_lowering"] for g in ("prefill", "decode")}
        # The experts are really there: the stacked weights of the MoE layer have `experts` rows.
        prefill = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
        assert any(t.dims and t.dims[0] == experts and len(t.dims) == 3 for t in prefill.graph.initializer)
    assert set(counts[16]) == ({"prefill", "decode"} | ({"decode_inplace"} if target == "onnxruntime" else set()))
    assert counts[256] == counts[16], f"{dtype} {target}: {counts} with lowerings {lowerings[16]}"
    assert lowerings[256] == lowerings[16]


def test_float32_prefill_and_decode_use_the_moe_op(graphs_only_out):
    out, manifest = graphs_only_out
    assert {g: manifest["graphs"][g]["moe_lowering"] for g in ("prefill", "decode")} == {"prefill": "moe_op",
                                                                                      "decode": "moe_op"}
    for name in ("prefill", "decode"):
        ops = manifest["graphs"][name]["op_counts"]
        assert ops["com.microsoft.MoE"] == 1, ops


def test_writes_graphs_and_manifest_but_no_weights(graphs_only_out):
    out, manifest = graphs_only_out
    assert sorted(p.name for p in out.iterdir()) == ["decode.onnx", "decode_inplace.onnx", "manifest.json",
                                                     "prefill.onnx"]
    assert manifest["graphs_only"] is True and "not written" in manifest["weights"]["note"]
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert "program" not in manifest["graphs"]["prefill"] and "program_weights" not in manifest["graphs"]["decode"]
    # The graphs are complete: every large initializer names its place in the unwritten weights.bin.
    ends, spans = [], set()
    for f in GRAPH_FILES.values():
        model = onnx.load(str(out / f), load_external_data=False)
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external, f
        for t in external:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == "weights.bin" and int(info["offset"]) % 4096 == 0
            ends.append(int(info["offset"]) + int(info["length"]))
            spans.add((int(info["offset"]), int(info["length"])))
    assert max(ends) == manifest["weights"]["bytes"]
    # prefill and decode hold the same weight objects: they share places instead of getting two.
    assert manifest["weights"]["shared_tensors"] > 0
    # ... and the folds each graph makes of a weight (transposed, interleaved) are one weight too:
    # the plan is one copy of the parameters plus absorb_mla's computed weights, not one per graph
    # (tensors below 1 KiB stay inside the graphs; the file's page alignment is not counted).
    cfg = manifest["model"]
    absorbed = (cfg["num_hidden_layers"] * cfg["num_attention_heads"] * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"])
                * cfg["kv_lora_rank"] * 4)  # decode's W_UK and W_UV, computed from kv_b_proj (float32)
    absorbed += cfg["qk_rope_head_dim"] // 2 * 4  # RoPE's inv_freq: a buffer, not among the parameters
    planned = sum(length for _, length in spans)
    assert planned <= manifest["weights"]["parameter_bytes"] + absorbed, (planned, manifest["weights"])


def test_reads_nothing_but_the_config_of_a_checkpoint(tmp_path, make_ckpt, monkeypatch):
    ckpt = make_ckpt("v2", layers=1, experts=4, hidden=32, vocab=64)  # small: the point is what is read

    def refuse(*args, **kw):
        raise AssertionError("a graph-only export opened a safetensors file")

    monkeypatch.setattr(ckpt_mod, "safe_open", refuse)
    manifest = export_checkpoint(ckpt, tmp_path / "out", ExportOptions.within(SMALL, graphs_only=True))
    assert manifest["graphs_only"] and not (tmp_path / "out" / "weights.bin").exists()


def test_save_models_without_data_plans_places_and_computes_nothing(one_layer_ckpt, tmp_path, monkeypatch):
    """save_models(write_data=False) on graphs whose weights come from a checkpoint (the one-layer
    one: attention, shared and routed experts, all folded as in any layer): nothing is read."""
    model = load_checkpoint(one_layer_ckpt, device="meta")
    traced = capture(model, SMALL)
    lowered = {phase: lower(run_pipeline(traced, PassOptions(phase, model.args))[0], phase,
                            model.args.num_hidden_layers) for phase in PHASES}

    def refuse(t):
        raise AssertionError(f"a weight of shape {list(t.shape)} was computed")

    weights = {(phase, name): id(v.const_value.weight) for phase in PHASES
               for name, v in lowered[phase].graph.initializers.items() if hasattr(v.const_value, "weight")}
    monkeypatch.setattr("dscompile.lowering.weights.materialize", refuse)
    monkeypatch.setattr(ckpt_mod.CheckpointSource, "load", refuse)
    stored = save_models(lowered, tmp_path, "weights.bin", write_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode.onnx", "prefill.onnx"]
    places: dict[int, set] = {}  # weight object -> its places in the graphs
    for (phase, name), obj in weights.items():
        tensor = lowered[phase].graph.initializers[name].const_value
        assert isinstance(tensor, ir.ExternalTensor), f"{phase}: {name} was not given a place"
        places.setdefault(obj, set()).add((tensor.offset, tensor.length))
    # One place per weight object, and the weights both graphs read are placed once.
    assert all(len(p) == 1 for p in places.values())
    in_both = {obj for (phase, _), obj in weights.items() if phase == "prefill"} & \
              {obj for (phase, _), obj in weights.items() if phase == "decode"}
    assert in_both and stored["weights"]["shared_tensors"] >= len(in_both)
    spans = sorted({next(iter(p)) for p in places.values()})  # two graphs' folds of one weight share a place
    assert all(a[0] % 4096 == 0 and a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:])), "planned places overlap"
    assert stored["weights"]["bytes"] == spans[-1][0] + spans[-1][1]


def test_refuses_verify_and_a_missing_config(tmp_path):
    with pytest.raises(OptionError, match="--graphs-only and --verify"):
        ExportOptions(graphs_only=True, verify=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: config.json not found"):
        export_checkpoint(tmp_path / "empty", tmp_path / "out", ExportOptions(graphs_only=True))
    with pytest.raises(CheckpointError, match="nowhere.json: not found"):
        export_checkpoint(tmp_path / "nowhere.json", tmp_path / "out", ExportOptions(graphs_only=True))
    assert not (tmp_path / "out").exists()


def test_engines_refuse_it_inspect_reads_it(graphs_only_out, monkeypatch):
    from dscompile.runtime import trt_engine
    from dscompile.runtime.ort_engine import OrtEngine
    from dscompile.runtime.torch_engine import TorchEngine

    out, _ = graphs_only_out
    monkeypatch.setattr(trt_engine, "require_tensorrt", lambda: None)  # the manifest is read before TensorRT is used
    message = f"{out}: a graph-only export (no weights.bin); export without --graphs-only to run it"
    for load in (OrtEngine.load, TorchEngine.load, trt_engine.TrtEngine.load, load_manifest, read_manifest):
        with pytest.raises(EngineError) as err:
            load(out)
        assert str(err.value) == message
    assert read_manifest(out, graphs_only_ok=True)["graphs_only"] is True


def test_cuda_half_precision_uses_the_moe_op(graphs_only):
    # The CUDA provider has com.microsoft.MoE for float16 and bfloat16 (its CPU kernel returns zeros
    # for float16, so CPU exports gather/dense instead): both graphs read the same fc1/fc2 weights.
    out, manifest = graphs_only(16, "bfloat16", "onnxruntime", "cuda")
    assert manifest["device"] == "cuda"
    for name in ("prefill", "decode"):
        assert manifest["graphs"][name]["moe_lowering"] == "moe_op"
        model = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        moe = [n for n in model.graph.node if n.domain == "com.microsoft" and n.op_type == "MoE"]
        assert len(moe) == 1
        types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        assert types.get(moe[0].input[0]) == onnx.TensorProto.BFLOAT16, "the MoE computes in bfloat16"
    assert [choose_moe_experts(g, torch.bfloat16, "onnxruntime", "cpu") for g in ("prefill", "decode")] == \
        ["dense", "gather"]
    # Every node of both graphs has a CUDA kernel (the kernel table), and there is no CPU-only in-place graph.
    from dscompile.lowering.ort_cuda_compat import check_out_dir

    report = check_out_dir(out)
    assert set(report["files"]) == {"prefill.onnx", "decode.onnx"} and report["compatible"], report["unsupported"]


def test_cuda_export_of_half_precision_is_refused_on_cpu(tmp_path):
    from dscompile.errors import EngineError
    from dscompile.runtime.ort_engine import OrtEngine

    manifest = {"device": "cuda", "dtype": "float16"}
    with pytest.raises(EngineError, match="--provider cuda"):
        OrtEngine.check_device(tmp_path, manifest, "CPUExecutionProvider")
    OrtEngine.check_device(tmp_path, manifest, "CUDAExecutionProvider")
    OrtEngine.check_device(tmp_path, {"device": "cuda", "dtype": "float32"}, "CPUExecutionProvider")  # same graphs as CPU's
