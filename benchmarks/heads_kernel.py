"""MLA's absorbed W_UK / W_UV in int8 through dscompile's native kernel, against the float32 batched MatMul.

Quantized engines keep the absorbed per-head products W_UK [H, nope, C] and W_UV [H, C, v] in
float32 unless exported with `--native-kernels` (MatMulNBits takes one 2-D weight, not a batch of
heads): an int4 decode step of the bench model then reads 34 MB of float32 for them, 11% of its
bytes. This measures the kernel that option runs, `ai.dscompile.HeadsMatMulQ8`
(runtime/native/heads_q8.cc: x [B, H, S, K] float32 against int8 [H, N, K] with one float32 scale
per 32 values), alone, against ONNX Runtime's float32 MatMul on the same weights.

    python benchmarks/heads_kernel.py [--threads 2] [--rounds 7] [--json]

The library is built as engines build it (runtime/native: g++, ONNX Runtime's C/C++ API headers
from $DSCOMPILE_ORT_INCLUDE or /usr/include/onnxruntime, an AVX-512 CPU); where it cannot be, the
script says why in one line.

Shapes are the bench config's (16 heads, nope 128, kv_lora_rank 512, v 128), one token (decode)
and 128 (prefill), 16 copies of each matrix per graph so the weights come from memory, not cache.
The two graphs run in blocks of runs, turn about (running them call by call would time each
session beside the other's spinning threads), and the median of the rounds is reported with the
error against numpy's float32 product.
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
from onnx import numpy_helper as nh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dscompile.model.quant import Scheme, quantize  # noqa: E402
from dscompile.runtime.native import DOMAIN, NativeKernelsUnavailable, library  # noqa: E402

HEADS, NOPE, C, V = 16, 128, 512, 128
COPIES = 16
CASES = [("W_UK", NOPE, C, 1), ("W_UV", C, V, 1), ("W_UK", NOPE, C, 128), ("W_UV", C, V, 128)]


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[H, N, K] float32 -> int8 [H, N, K] and float32 scales [H, N, K/32], as the export stores them."""
    import torch

    q, d = quantize(torch.from_numpy(w), Scheme(8, 32, search=False))
    return q.reshape(w.shape).numpy(), d.numpy()


def graphs(K: int, N: int, S: int, rng) -> tuple[bytes, bytes, np.ndarray, np.ndarray]:
    """(float32 graph, int8 custom-op graph, input, numpy reference of the first copy)."""
    ws = [rng.standard_normal((HEADS, K, N)).astype(np.float32) * 0.05 for _ in range(COPIES)]
    x = rng.standard_normal((1, HEADS, S, K)).astype(np.float32)

    def model(nodes, inits) -> bytes:
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, HEADS, S, K])],
                         [h.make_tensor_value_info(f"y{i}", TP.FLOAT, None) for i in range(COPIES)], inits)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1)])
        m.ir_version = 10
        return m.SerializeToString()

    f32 = model([h.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(COPIES)],
                [nh.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    nodes, inits = [], []
    for i, w in enumerate(ws):
        q, s = quantize_rows(np.ascontiguousarray(w.transpose(0, 2, 1)))
        inits += [nh.from_array(q, f"q{i}"), nh.from_array(s, f"s{i}")]
        nodes.append(h.make_node("HeadsMatMulQ8", ["x", f"q{i}", f"s{i}"], [f"y{i}"], domain=DOMAIN))
    return f32, model(nodes, inits), x, np.einsum("bhsk,hkn->bhsn", x, ws[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=20, help="runs per block")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    try:
        lib = library()
    except NativeKernelsUnavailable as err:
        sys.exit(f"error: {err}")
    for name, K, N, S in CASES:
        f32, q8, x, ref = graphs(K, N, S, rng)
        sessions = {}
        for kind, model in (("float32", f32), ("int8", q8)):
            so = ort.SessionOptions()
            so.intra_op_num_threads = a.threads
            if kind == "int8":
                so.register_custom_ops_library(str(lib))
            sessions[kind] = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        err = {k: float(np.abs(s.run(["y0"], {"x": x})[0] - ref).max() / np.abs(ref).max())
               for k, s in sessions.items()}
        rounds: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(a.rounds):
            for kind, s in sessions.items():
                s.run(None, {"x": x})
                ts = []
                for _ in range(a.runs):
                    t = time.perf_counter()
                    s.run(None, {"x": x})
                    ts.append(time.perf_counter() - t)
                rounds[kind].append(1e3 * statistics.median(ts) / COPIES)
                time.sleep(0.05)
        ms = {k: statistics.median(v) for k, v in rounds.items()}
        rows.append({"matrix": name, "K": K, "N": N, "tokens": S, "float32_ms": ms["float32"], "int8_ms": ms["int8"],
                     "ratio": ms["int8"] / ms["float32"], "int8_rel_max_err": err["int8"],
                     "float32_mb": HEADS * K * N * 4 / 1e6, "int8_mb": HEADS * K * N * (1 + 4 / 32) / 1e6})
        del sessions
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"per matrix (16 heads), median of {a.rounds} rounds, {a.threads} threads; error: max |int8 - numpy| / max |numpy|")
    for r in rows:
        print(f"{r['matrix']} [{r['K']} -> {r['N']}] x {r['tokens']:3d} tokens: float32 {r['float32_ms']:.3f} ms "
              f"({r['float32_mb']:.1f} MB), int8 {r['int8_ms']:.3f} ms ({r['int8_mb']:.1f} MB), "
              f"ratio {r['ratio']:.2f}, int8 error {r['int8_rel_max_err']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
