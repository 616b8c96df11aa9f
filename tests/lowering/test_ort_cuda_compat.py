"""The static check of ONNX graphs against ONNX Runtime's CUDA kernels (lowering/ort_cuda_compat.py).

- the table names its source and holds what our graphs need (RMSNormalization 23, MoE, MatMulNBits);
- on small graphs: a node without a CUDA kernel (op, version rule, element type) is reported with
  the reason; a shape computation fed by `Shape` is placed on CPU ("shape"), its Reshape on CUDA;
- on exports: float32 and float16 (the session's shared exports) have every node of the decode
  graph (the one a CUDA engine opens) on CUDA except int64 shape nodes; `inspect --ort-cuda-compat`
  prints it and exits 0, and 1 for a graph with a node the CUDA provider lacks.
- bfloat16, int8 and int4 exports cost a graph-only export each (~20 s of CPU): they run with
  DSCOMPILE_CUDA_COMPAT_EXPORTS=1 (marked slow): bfloat16 all on CUDA; int8/int4 (float32
  activations) have QMoE, whose CUDA kernel takes float16/bfloat16 only, on CPU.
- DSCOMPILE_CUDA_COMPAT_LIBRARY=1 checks that every op of the table is named in the installed
  libonnxruntime_providers_cuda.so (reads its 284 MB).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dscompile.errors import EngineError
from dscompile.lowering.ort_cuda_compat import check_model, check_out_dir, kernels, load_table
from dscompile.runtime.manifest import read_manifest
from dscompile.runtime.ort_sessions import session_graphs
from helpers import run_here

F32, F16, BF16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT64
EXPORTS = os.environ.get("DSCOMPILE_CUDA_COMPAT_EXPORTS") == "1"
LIBRARY = os.environ.get("DSCOMPILE_CUDA_COMPAT_LIBRARY") == "1"


def _model(nodes, inputs, outputs, initializers=(), opset=23, ms=False):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def _vi(name, shape, dtype=F32):
    return helper.make_tensor_value_info(name, dtype, shape)


def _by_kind(result, kind):
    return sorted(p["op_type"] for p in result["placements"] if p["kind"] == kind)


def test_table_names_its_source_and_holds_our_ops():
    table = load_table()
    assert table["repository"] == "microsoft/onnxruntime" and table["file"] == "docs/OperatorKernels.md"
    assert re.fullmatch(r"[0-9a-f]{40}", table["commit"]) and table["onnxruntime"].startswith("1.31.1")
    k = kernels()
    assert len(k["ai.onnx"]) > 140 and len(k["com.microsoft"]) > 60
    rms = k["ai.onnx"]["RMSNormalization"]
    assert rms[0]["since"] == 23 and "bfloat16" in rms[0]["types"]["T"]
    assert set(k["com.microsoft"]["MoE"][0]["types"]["T"]) == {"float", "float16", "bfloat16"}
    assert k["com.microsoft"]["QMoE"][0]["types"]["T"] == ["bfloat16", "float16"]
    # the 1.31.1 corrections replace the documentation's Cos 7+ with 7-21 and 22+ (bfloat16)
    assert [r["since"] for r in k["ai.onnx"]["Cos"]] == [7, 22] and table["kernels"]["ai.onnx"]["Cos"][0]["since"] == 7


def test_a_float_graph_runs_on_cuda():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("RMSNormalization", ["y", "s"], ["z"], name="norm"),
             helper.make_node("Softmax", ["z"], ["p"], axis=-1, name="softmax")]
    init = [numpy_helper.from_array(np.ones((8, 8), np.float32), "w"),
            numpy_helper.from_array(np.ones(8, np.float32), "s")]
    result = check_model(_model(nodes, [_vi("x", ["B", 8])], [_vi("p", ["B", 8])], init))
    assert result["placements"] == [] and result["on_cuda"] == result["nodes"] == 3


def test_missing_op_version_and_type_are_named():
    """Celu has no CUDA kernel; Reshape-24 (opset 24) has none (registered 23+: an open range does not
    cover a newer version); Cos on bfloat16 has one from opset 22 only; Erf takes no int64."""
    cases = {
        "Celu": (_model([helper.make_node("Celu", ["x"], ["y"], name="n")], [_vi("x", [4])], [_vi("y", [4])]),
                 "no CUDA kernel for Celu"),
        "Reshape": (_model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="n")], [_vi("x", [4])],
                           [_vi("y", [2, 2])], [numpy_helper.from_array(np.array([2, 2], np.int64), "shape")],
                           opset=24),
                    "Reshape-24 (opset 24) has no CUDA kernel: registered for versions 23+"),
        "Cos": (_model([helper.make_node("Cos", ["x"], ["y"], name="n")], [_vi("x", [4], BF16)],
                       [_vi("y", [4], BF16)], opset=21),
                "Cos-7: the CUDA kernel takes no bfloat16 for T (input 0 'x'; it takes double, float, float16)"),
        "Erf": (_model([helper.make_node("Erf", ["x"], ["y"], name="n")], [_vi("x", [4], I64)], [_vi("y", [4], I64)]),
                "Erf-13: the CUDA kernel takes no int64 for T"),
    }
    for op, (model, reason) in cases.items():
        result = check_model(model)
        assert result["unsupported"] == 1 and _by_kind(result, "unsupported") == [op], result
        assert result["placements"][0]["reason"].startswith(reason), result["placements"][0]["reason"]
    bf16_cos = _model([helper.make_node("Cos", ["x"], ["y"], name="n")], [_vi("x", [4], BF16)], [_vi("y", [4], BF16)])
    assert check_model(bf16_cos)["placements"] == []  # opset 23: Cos-22, which takes bfloat16


def test_quantized_experts_in_float32_are_placed_on_cpu():
    """QMoE's CUDA kernel takes float16/bfloat16 activations; a float32 one is named, MatMulNBits is not."""
    u8 = TensorProto.UINT8
    qmoe = helper.make_node("QMoE", ["x", "r", "w1", "s1", "", "w2", "s2"], ["y"], domain="com.microsoft",
                            name="q", k=1)
    nbits = helper.make_node("MatMulNBits", ["x", "b", "sc"], ["z"], domain="com.microsoft", name="m",
                             K=16, N=8, bits=4, block_size=16)
    inputs = [_vi("x", [2, 16]), _vi("r", [2, 4]), _vi("w1", [4, 16, 8], u8), _vi("s1", [4, 16]),
              _vi("w2", [4, 16, 4], u8), _vi("s2", [4, 16]), _vi("b", [8, 1, 8], u8), _vi("sc", [8, 1])]
    result = check_model(_model([qmoe, nbits], inputs, [_vi("y", [2, 16]), _vi("z", [2, 8])], ms=True))
    assert _by_kind(result, "unsupported") == ["QMoE"], result
    assert "takes no float for T (input 0 'x'; it takes bfloat16, float16)" in result["placements"][0]["reason"]


def test_shape_computations_go_to_cpu_and_the_reshape_stays():
    """x -> Shape -> Gather -> Concat -> Reshape(x, .): ONNX Runtime runs Gather and Concat (int64, fed by the
    host output of CUDA's Shape) on CPU and the Reshape on CUDA (it reads its shape from the host). A float16
    input keeps a node on CUDA whatever feeds it."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i0"], ["b"], axis=0, name="gather"),
             helper.make_node("Concat", ["b", "minus1"], ["shape2"], axis=0, name="concat"),
             helper.make_node("Reshape", ["x", "shape2"], ["y"], name="reshape"),
             helper.make_node("Cast", ["s"], ["sf"], to=F16, name="cast"),
             helper.make_node("Mul", ["sf", "h"], ["m"], name="mul_half")]
    init = [numpy_helper.from_array(np.array([0], np.int64), "i0"),
            numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
            numpy_helper.from_array(np.array([2.0], np.float16), "h")]
    result = check_model(_model(nodes, [_vi("x", ["B", 4, 8], F16)], [_vi("y", ["B", "N"], F16), _vi("m", [3], F16)],
                                init))
    assert _by_kind(result, "shape") == ["Concat", "Gather"], result
    assert _by_kind(result, "host_compute") == ["Cast"]  # int64 in, float16 out: computed on the host
    assert result["unsupported"] == 0 and result["on_cuda"] == 3  # Shape, Reshape and the float16 Mul


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(EngineError, match="no such ONNX file"):
        check_model(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(EngineError, match="not a valid ONNX file"):
        check_model(tmp_path / "bad.onnx")
    with pytest.raises(EngineError, match="no such engine folder"):
        check_out_dir(tmp_path / "missing")
    (tmp_path / "bad.onnx").unlink()
    with pytest.raises(EngineError, match="no \\*.onnx file"):
        check_out_dir(tmp_path)


def _assert_all_compute_on_cuda(out: Path) -> dict:
    """The decode graph (the one a CUDA engine opens): no node without a kernel, and what runs on CPU is
    int64 index arithmetic (Shape -> Gather/Squeeze/Concat -> Reshape's shape)."""
    manifest = read_manifest(out, graphs_only_ok=True)
    report = check_out_dir(out, set(session_graphs(manifest, "CUDAExecutionProvider").values()))
    assert report["compatible"] and report["unsupported"] == 0, report
    decode = report["files"]["decode.onnx"]
    assert decode["opened_on_cuda"] and decode["unsupported"] == 0 and decode["host_compute"] == 0, decode
    assert 0 < decode["shape_on_cpu"] < decode["nodes"] // 10  # a few shape nodes, nothing else
    assert {p["op_type"] for p in decode["placements"]} <= {"Squeeze", "Concat", "Gather", "Unsqueeze", "Slice"}
    assert not report["files"]["prefill.onnx"]["opened_on_cuda"] and report["files"]["prefill.onnx"]["unsupported"] == 0
    return report


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_float_exports_compute_on_cuda(exported, dtype):
    report = _assert_all_compute_on_cuda(exported("v3", dtype))
    # the CPU-only in-place graph (opset 24) is reported, not judged: the table's CUDA kernels stop at 23
    assert not report["files"]["decode_inplace.onnx"]["opened_on_cuda"]


def test_inspect_flag_prints_and_sets_the_exit_code(exported, tmp_path):
    out = exported("v3")
    result = run_here("inspect", out, "--ort-cuda-compat")
    assert result.returncode == 0, result.stderr
    assert "every node of the graphs a CUDA engine opens has a CUDA kernel" in result.stdout
    assert re.search(r"decode.onnx: \d+ of \d+ nodes on CUDA, 0 without a CUDA kernel", result.stdout)
    report = json.loads(run_here("inspect", out, "--ort-cuda-compat", "--json").stdout)["ort_cuda_compat"]
    assert report["compatible"] and report["table"]["commit"] == load_table()["commit"]
    # an OUT whose decode graph holds a node the CUDA provider lacks: exit 1, the node named
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    model = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    model.graph.node.append(helper.make_node("Celu", [model.graph.output[0].name], ["celu_out"], name="odd"))
    onnx.save(model, str(broken / "decode.onnx"))
    result = run_here("inspect", broken, "--ort-cuda-compat")
    assert result.returncode == 1 and "unsupported Celu x1: no CUDA kernel for Celu" in result.stdout, result.stdout


@pytest.fixture(scope="module")
def graph_only(tmp_path_factory):
    """graph_only(kind) -> OUT of a one-layer tiny V3 exported graph-only as `kind` (bfloat16, int8, int4)."""
    from dscompile.capture import Limits
    from dscompile.exporter.export import export_checkpoint
    from dscompile.exporter.options import ExportOptions
    from dscompile.model.synthetic import tiny_args

    tmp = tmp_path_factory.mktemp("cuda_compat")
    (tmp / "config.json").write_text(json.dumps(tiny_args("v3", layers=1, experts=4, hidden=32, vocab=64).to_config()))

    def export(kind: str) -> Path:
        out = tmp / kind
        if not out.exists():
            options = dict(dtype=kind) if kind == "bfloat16" else dict(weights=kind, block_size=16)
            export_checkpoint(tmp / "config.json", out, ExportOptions.within(
                Limits(max_batch=2, max_prompt_tokens=8, max_context=16), graphs_only=True, **options))
        return out

    return export


@pytest.mark.slow
@pytest.mark.skipif(not EXPORTS, reason="set DSCOMPILE_CUDA_COMPAT_EXPORTS=1 (a graph-only export each, ~20 s)")
def test_bfloat16_export_computes_on_cuda(graph_only):
    _assert_all_compute_on_cuda(graph_only("bfloat16"))


@pytest.mark.slow
@pytest.mark.skipif(not EXPORTS, reason="set DSCOMPILE_CUDA_COMPAT_EXPORTS=1 (a graph-only export each, ~20 s)")
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_exports_keep_qmoe_on_cpu(graph_only, kind):
    """Quantized engines compute in float32 (lowered for ONNX Runtime's CPU kernels): on CUDA their QMoE
    would run on CPU, one per MoE layer in each graph; MatMulNBits (float32) has a CUDA kernel."""
    report = check_out_dir(graph_only(kind))
    assert not report["compatible"]
    for name in ("prefill.onnx", "decode.onnx"):
        result = report["files"][name]
        assert _by_kind(result, "unsupported") == ["QMoE"] and result["host_compute"] == 0, result


@pytest.mark.slow
@pytest.mark.skipif(not LIBRARY, reason="set DSCOMPILE_CUDA_COMPAT_LIBRARY=1 (reads the 284 MB CUDA provider)")
def test_every_op_of_the_table_is_named_in_the_cuda_provider():
    import onnxruntime

    so = Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not so.is_file():
        pytest.skip("this onnxruntime has no CUDA provider library (the CPU wheel)")
    strings = set(re.findall(rb"[\x20-\x7e]{2,}", so.read_bytes()))
    names = {op for ops in load_table()["kernels"].values() for op in ops}
    exact = {n for n in names if n.encode() in strings}
    inside = {n for n in names - exact if any(n.encode() in s for s in strings)}
    assert names == exact | inside, sorted(names - exact - inside)
