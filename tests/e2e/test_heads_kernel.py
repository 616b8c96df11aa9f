"""benchmarks/heads_kernel: the int8 per-head kernel against numpy, when ONNX Runtime's headers are at hand.

Opt-in: DSCOMPILE_ORT_INCLUDE names the folder of ONNX Runtime's C/C++ API headers (e.g. Debian 13's
libonnxruntime-dev, /usr/include/onnxruntime); the kernel also needs g++ and an AVX-512 CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = os.environ.get("DSCOMPILE_ORT_INCLUDE")


def _avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags and " avx512bw" in flags


NEEDS_KERNEL = [
    pytest.mark.skipif(not INCLUDE, reason="set DSCOMPILE_ORT_INCLUDE to ONNX Runtime's C/C++ API headers to build "
                                           "the custom kernel (the PyPI wheels ship none)"),
    pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to build the custom kernel"),
    pytest.mark.skipif(not _avx512(), reason="the custom kernel is written for AVX-512 (F, BW); this CPU lacks it"),
]


def needs_kernel(test):
    for mark in NEEDS_KERNEL:
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def heads_kernel():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import heads_kernel
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return heads_kernel


@needs_kernel
@pytest.mark.parametrize("K,N,B,S", [(128, 512, 1, 1), (512, 128, 1, 1), (128, 512, 2, 3), (96, 64, 1, 5)])
def test_kernel_equals_the_dequantized_product(heads_kernel, tmp_path, K, N, B, S):
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    lib = heads_kernel.build(Path(INCLUDE), tmp_path)
    rng = np.random.default_rng(K + N + S)
    H = 4
    w = rng.standard_normal((H, N, K)).astype(np.float32)
    q, s = heads_kernel.quantize_rows(w)
    x = rng.standard_normal((B, H, S, K)).astype(np.float32)
    graph = h.make_graph([h.make_node("HeadsMatMulQ8", ["x", "q", "s"], ["y"], domain="dsc.bench")], "g",
                         [h.make_tensor_value_info("x", TP.FLOAT, [B, H, S, K])],
                         [h.make_tensor_value_info("y", TP.FLOAT, None)], [nh.from_array(q, "q"), nh.from_array(s, "s")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("dsc.bench", 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(lib))
    y = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    dequantized = (q.reshape(H, N, K // 32, 32) * s[..., None]).reshape(H, N, K)
    ref = np.einsum("bhsk,hnk->bhsn", x.astype(np.float64), dequantized.astype(np.float64))
    assert y.shape == (B, H, S, N)
    assert np.abs(ref).max() > 1
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5
    # against the float32 weights: only the int8 rounding, which is far from nothing
    plain = np.einsum("bhsk,hnk->bhsn", x, w)
    assert 1e-4 < np.abs(y - plain).max() / np.abs(plain).max() < 2e-2


@needs_kernel
def test_a_shape_the_kernel_does_not_take_is_refused(heads_kernel, tmp_path):
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    lib = heads_kernel.build(Path(INCLUDE), tmp_path)
    q, s = heads_kernel.quantize_rows(np.ones((2, 64, 32), np.float32))  # K = 32
    x = np.ones((1, 2, 1, 48), np.float32)  # K of x (48) is not the weights' (32)
    graph = h.make_graph([h.make_node("HeadsMatMulQ8", ["x", "q", "s"], ["y"], domain="dsc.bench")], "g",
                         [h.make_tensor_value_info("x", TP.FLOAT, [1, 2, 1, 48])],
                         [h.make_tensor_value_info("y", TP.FLOAT, None)], [nh.from_array(q, "q"), nh.from_array(s, "s")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("dsc.bench", 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(lib))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="HeadsMatMulQ8: expected"):
        session.run(None, {"x": x})


def test_the_build_names_missing_headers(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "heads_kernel.py"), "--ort-include", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "has no onnxruntime_lite_custom_op.h" in done.stderr
    assert "Traceback" not in done.stderr
