"""dscompile's float32 decode kernels (runtime/native/f32.cc, moe.cc) against ONNX Runtime's, one token.

Three pairs, each a graph of `--layers` layers with their own random weights (so they stream from
memory as a decode step's do), run as engines run them (prepacking off: the weights are read where
they lie):
- MatMul (x [1, K] @ w [K, N], torch's linear folded) against MatMulF32, K=2048 -> N=10944;
- Gemm (transB=1) against LinearF32, the bench model's shared experts' 2048 -> 2816;
- com.microsoft.MoE (swiglu, interleaved fc1) against MoEF32, 16 experts, top 6, D=2048, I=1408.
Each round runs every graph once, alternating; the medians, the weights' bytes per second and the
largest difference from the pair's other kernel are printed.

    DSCOMPILE_ORT_INCLUDE=... python benchmarks/native_f32.py [--layers 8] [--rounds 9] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dscompile.runtime import native  # noqa: E402

MS = "com.microsoft"
D, N, I, E, TOP = 2048, 10944, 1408, 16, 6


def _session(nodes, inits, inputs, outputs, threads: int) -> ort.InferenceSession:
    graph = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info(o, TP.FLOAT, None) for o in outputs], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 23), h.make_opsetid(MS, 1),
                                               h.make_opsetid(native.DOMAIN, 1)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.disable_prepacking", "1")
    native.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _pair(kind: str, layers: int, threads: int, rng) -> tuple[list, dict, int]:
    """(the two sessions: ONNX Runtime's op, ours), the feeds, the weights' bytes read per run."""
    x = rng.standard_normal((1, D), dtype=np.float32)
    sessions = []
    weights = []
    for i in range(layers):
        if kind == "matmul":
            weights.append([rng.standard_normal((D, N), dtype=np.float32) * 0.02])
        elif kind == "linear":
            weights.append([rng.standard_normal((2 * I, D), dtype=np.float32) * 0.02])
        else:
            weights.append([rng.standard_normal((E, 2 * I, D), dtype=np.float32) * 0.02,
                            rng.standard_normal((E, D, I), dtype=np.float32) * 0.02])
    feeds = {"x": x}
    inputs = [h.make_tensor_value_info("x", TP.FLOAT, [1, D])]
    if kind == "moe":
        router = np.full((1, E), -1e30, dtype=np.float32)
        chosen = rng.choice(E, TOP, replace=False)
        router[0, chosen] = np.log(rng.random(TOP, dtype=np.float32) + 0.1)
        feeds["router"] = router
        inputs.append(h.make_tensor_value_info("router", TP.FLOAT, [1, E]))
    for ours in (False, True):
        nodes, inits, outs = [], [], []
        for i, ws in enumerate(weights):
            names = [f"w{i}_{j}" for j in range(len(ws))]
            inits += [numpy_helper.from_array(w, n) for w, n in zip(ws, names)]
            if kind == "matmul":
                node = h.make_node("MatMulF32", ["x", names[0]], [f"y{i}"], domain=native.DOMAIN) if ours else \
                    h.make_node("MatMul", ["x", names[0]], [f"y{i}"])
            elif kind == "linear":
                node = h.make_node("LinearF32", ["x", names[0]], [f"y{i}"], domain=native.DOMAIN) if ours else \
                    h.make_node("Gemm", ["x", names[0]], [f"y{i}"], transB=1)
            else:
                node = h.make_node("MoEF32", ["x", "router", *names], [f"y{i}"], domain=native.DOMAIN, k=TOP) if ours \
                    else h.make_node("MoE", ["x", "router", names[0], "", names[1]], [f"y{i}"], domain=MS, k=TOP,
                                     activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                                     activation_beta=0.0, normalize_routing_weights=0)
            nodes.append(node)
            outs.append(f"y{i}")
        sessions.append(_session(nodes, inits, inputs, outs, threads))
    read = sum(w.nbytes for ws in weights for w in ws)
    if kind == "moe":
        read = read * TOP // E
    return sessions, feeds, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    for kind, layers in (("matmul", a.layers), ("linear", 4 * a.layers), ("moe", max(1, a.layers // 4))):
        (theirs, ours), feeds, read = _pair(kind, layers, a.threads, rng)
        reference, got = theirs.run(None, feeds), ours.run(None, feeds)
        diff = max(float(np.abs(r - g).max()) for r, g in zip(reference, got))
        scale = max(float(np.abs(r).max()) for r in reference)
        times = {"onnxruntime": [], "dscompile": []}
        for _ in range(a.rounds):
            for name, session in (("onnxruntime", theirs), ("dscompile", ours)):
                start = time.perf_counter()
                session.run(None, feeds)
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        results[kind] = {"layers": layers, "bytes": read, "max_abs_diff": diff, "max_abs": scale,
                         **{f"{name}_ms": 1e3 * m for name, m in med.items()},
                         **{f"{name}_gbps": read / m / 1e9 for name, m in med.items()},
                         "ratio": med["dscompile"] / med["onnxruntime"]}
        del theirs, ours
    if a.json:
        print(json.dumps(results, indent=2))
        return
    for kind, r in results.items():
        print(f"{kind:7s} {r['layers']:3d} layers, {r['bytes'] / 1e6:7.1f} MB: onnxruntime {r['onnxruntime_ms']:7.2f} ms "
              f"({r['onnxruntime_gbps']:4.1f} GB/s), dscompile {r['dscompile_ms']:7.2f} ms ({r['dscompile_gbps']:4.1f} GB/s), "
              f"ratio {r['ratio']:.2f}; max |diff| {r['max_abs_diff']:.2e} of {r['max_abs']:.2e}")


if __name__ == "__main__":
    main()
