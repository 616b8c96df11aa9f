"""dscompile's MatMulQ4 (runtime/native/matmul.cc) against ONNX Runtime's MatMulNBits, both int4.

One graph per kernel holds `--layers` linear layers D=2048 -> 10944 (the bench model's dense MLP up
projection) on the same input, each with its own random weights, so the weights (252-280 MB) stream
from memory as a decode step's do. MatMulNBits: blocks of 32, float32 scales, accuracy_level 4 (the
CPU choice, lowering/quantize.py); MatMulQ4: blocks of 32, float16 scales, panels of 16 rows. Each
round runs every graph once for one token and for `--tokens` tokens; the medians over the rounds and
the weights' bytes per second are printed, beside one torch sum's read bandwidth per round.

    DSCOMPILE_ORT_INCLUDE=... python benchmarks/native_q4.py [--layers 20] [--rounds 5] [--threads 2] [--json]
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
import torch
from onnx import TensorProto as TP
from onnx import helper as h

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dscompile.runtime import native  # noqa: E402

MS = "com.microsoft"
K, N = 2048, 10944


def _graph(kind: str, layers: int, threads: int, rng) -> tuple[ort.InferenceSession, int]:
    nodes, inits, outs = [], [], []
    blocks, panels = K // 32, (N + 15) // 16
    for i in range(layers):
        if kind == "MatMulNBits":
            packed = rng.integers(0, 256, (N, blocks, 16), dtype=np.uint8)
            scales = (rng.random(N * blocks, dtype=np.float32) * 0.01)
            inits += [h.make_tensor(f"w{i}", TP.UINT8, packed.shape, packed.tobytes(), raw=True),
                      h.make_tensor(f"s{i}", TP.FLOAT, scales.shape, scales.tobytes(), raw=True)]
            nodes.append(h.make_node("MatMulNBits", ["x", f"w{i}", f"s{i}"], [f"y{i}"], domain=MS, K=K, N=N, bits=4,
                                     block_size=32, accuracy_level=4))
        else:
            packed = rng.integers(0, 256, (panels, blocks, 256), dtype=np.uint8)
            scales = (rng.random((panels, blocks, 16), dtype=np.float32) * 0.01).astype(np.float16)
            inits += [h.make_tensor(f"w{i}", TP.UINT8, packed.shape, packed.tobytes(), raw=True),
                      h.make_tensor(f"s{i}", TP.FLOAT16, scales.shape, scales.tobytes(), raw=True)]
            nodes.append(h.make_node("MatMulQ4", ["x", f"w{i}", f"s{i}"], [f"y{i}"], domain=native.DOMAIN, K=K, N=N))
        outs.append(h.make_tensor_value_info(f"y{i}", TP.FLOAT, None))
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [None, K])], outs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 23), h.make_opsetid(MS, 1),
                                               h.make_opsetid(native.DOMAIN, 1)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    native.register(options)
    return (ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]),
            sum(len(t.raw_data) for t in inits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    why = native.unavailable()
    if why:
        sys.exit(f"native_q4: the native kernels cannot be built here: {why}")
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    sessions = {kind: _graph(kind, args.layers, args.threads, rng) for kind in ("MatMulNBits", "MatMulQ4")}
    probe = torch.ones(1 << 28)
    times: dict[str, list[float]] = {f"{kind} M={m}": [] for kind in sessions for m in (1, args.tokens)}
    bandwidth = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        probe.sum()
        bandwidth.append(probe.numel() * 4 / (time.perf_counter() - t))
        for m in (1, args.tokens):
            x = np.random.default_rng(m).standard_normal((m, K)).astype(np.float32)
            for kind, (session, _) in sessions.items():
                session.run(None, {"x": x})  # warm: ONNX Runtime's and the kernel's buffers
                time.sleep(0.05)
                t = time.perf_counter()
                session.run(None, {"x": x})
                times[f"{kind} M={m}"].append(1e3 * (time.perf_counter() - t))
    rows = []
    for key, ms in times.items():
        kind = key.split()[0]
        median = statistics.median(ms)
        rows.append({"kernel": key, "ms": median, "weight_bytes": sessions[kind][1],
                     "GB/s": sessions[kind][1] / median / 1e6})
    if args.json:
        print(json.dumps({"rows": rows, "read_bandwidth_GB/s": statistics.median(bandwidth) / 1e9}, indent=1))
        return
    print(f"torch sum read bandwidth: {statistics.median(bandwidth) / 1e9:.1f} GB/s (median of {args.rounds})")
    for r in rows:
        print(f"{r['kernel']:22s} {r['ms']:8.2f} ms  {r['weight_bytes'] / 1e6:5.0f} MB of weights  {r['GB/s']:5.1f} GB/s")


if __name__ == "__main__":
    main()
