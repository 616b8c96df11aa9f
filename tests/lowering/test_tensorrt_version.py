"""The TensorRT version the graphs need (lowering/tensorrt/build.py), decided without TensorRT: every graph
normalizes with RMSNormalization, which TensorRT's ONNX parser reads from 10.15; an older installed
TensorRT is refused in one line before any parsing, and the `tensorrt` extra asks for 10.15."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from dscompile.lowering.tensorrt.build import MIN_TENSORRT, check_tensorrt_version, required_tensorrt
from dscompile.lowering.tensorrt.compat import load_table
from dscompile.runtime.trt_engine import TensorRTUnavailable

ROOT = Path(__file__).resolve().parents[2]


def _graph(tmp_path, op: str) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    inputs = ["x", "s"] if op == "RMSNormalization" else ["x"]
    graph = helper.make_graph([helper.make_node(op, inputs, ["y"])], "g", [x], [y],
                              initializer=[numpy_helper.from_array(np.ones(8, np.float32), "s")])
    path = tmp_path / f"{op}.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), str(path))
    return path


def test_the_floor_is_the_parser_version_of_rmsnormalization():
    assert MIN_TENSORRT == load_table()["ops"]["RMSNormalization"]["min_trt"] == "10.15"
    assert load_table()["ops"]["TensorScatter"]["min_trt"] == MIN_TENSORRT


@pytest.mark.parametrize("version", ["10.15", "10.15.1.29", "10.16.0", "11.4.0.1"])
def test_recent_enough_versions_pass(version):
    assert check_tensorrt_version(version) is None


@pytest.mark.parametrize("version", ["10.8.0.43", "10.14.1", "10.9", "8.6.1", "10"])
def test_older_versions_are_refused_in_one_line(version):
    with pytest.raises(TensorRTUnavailable) as err:
        check_tensorrt_version(version)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"TensorRT {version} is too old: ")
    assert "RMSNormalization" in message and 'pip install "tensorrt>=10.15"' in message


def test_an_unreadable_version_is_refused():
    with pytest.raises(TensorRTUnavailable, match="'unknown', which is not a version number: .* >= 10.15"):
        check_tensorrt_version("unknown")


def test_the_graphs_set_the_requirement(tmp_path):
    """The largest min_trt of the ops the graphs hold, never below the floor; the op is named."""
    assert required_tensorrt([_graph(tmp_path, "Relu")]) == ("10.15", "RMSNormalization")
    assert required_tensorrt([_graph(tmp_path, "Relu"), _graph(tmp_path, "RMSNormalization")]) == \
        ("10.15", "RMSNormalization")
    newest = max(((op, e["min_trt"]) for op, e in load_table()["ops"].items() if e.get("min_trt")),
                 key=lambda kv: tuple(int(p) for p in kv[1].split(".")))
    assert tuple(int(p) for p in newest[1].split(".")) <= (10, 15)  # nothing in the table asks for more yet


def test_the_extra_asks_for_the_floor():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tensorrt"]
    assert extra == [f"tensorrt>={MIN_TENSORRT},<12"]
