"""lm_head at 6 bits (MatMulQ6, `--lm-head-bits 6`) against 8 (MatMulQ8, the default), one token.

One graph per kernel holds `--copies` lm_heads (hidden 2048 -> vocab 32000, the bench model's), each
from its own random float weights quantized by the export's own code (model/quant.py, blocks of 32,
then lowering/encodings.py's panels: 6.5 and 8.5 bits per weight), so a run streams its weights from
memory as a decode step's lm_head does. Each round runs both graphs once, in turn; the medians over the
rounds, the weights' bytes per second, the 6-bit time over the 8-bit one, and each kernel's largest
error against the float weights' product (relative to that product's largest value) are printed.

    DSCOMPILE_ORT_INCLUDE=... python benchmarks/native_lm_head.py [--copies 4] [--rounds 15] [--threads 2] [--json]
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
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dscompile.lowering.encodings import PANEL_BLOCK, panels  # noqa: E402
from dscompile.model.quant import Scheme, quantize  # noqa: E402
from dscompile.runtime import native  # noqa: E402
from native_f32 import _session as native_session  # noqa: E402  (benchmarks/native_f32.py)

D, V = 2048, 32000


def _lm_heads(bits: int, weights: list[torch.Tensor], threads: int) -> tuple[ort.InferenceSession, int]:
    """One session running MatMulQ{bits} over each weight (its panels, as the export stores them); the bytes."""
    nodes, inits = [], []
    for i, w in enumerate(weights):
        q, d = quantize(w, Scheme(bits, PANEL_BLOCK, head_bits=None))
        packed, scales = panels(q.reshape(V, D // PANEL_BLOCK, PANEL_BLOCK), d.reshape(V, D // PANEL_BLOCK), bits)
        inits += [numpy_helper.from_array(packed.numpy(), f"w{i}"), numpy_helper.from_array(scales.numpy(), f"s{i}")]
        nodes.append(h.make_node(f"MatMulQ{bits}", ["x", f"w{i}", f"s{i}"], [f"y{i}"], domain=native.DOMAIN, K=D, N=V))
    session = native_session(nodes, inits, [h.make_tensor_value_info("x", TP.FLOAT, [1, D])],
                             [f"y{i}" for i in range(len(weights))], threads)
    return session, sum(len(t.raw_data) for t in inits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    why = native.unavailable()
    if why:
        sys.exit(f"native_lm_head: the native kernels cannot be built here: {why}")
    torch.manual_seed(0)
    weights = [torch.randn(V, D) * 0.02 for _ in range(args.copies)]
    x = np.random.default_rng(1).standard_normal((1, D)).astype(np.float32)
    sessions = {bits: _lm_heads(bits, weights, args.threads) for bits in (6, 8)}
    exact = [x.astype(np.float64) @ w.double().numpy().T for w in weights]
    errors = {}
    for bits, (session, _) in sessions.items():
        ys = session.run(None, {"x": x})  # also warms ONNX Runtime's and the kernel's buffers
        errors[bits] = max(float(np.abs(y - e).max() / np.abs(e).max()) for y, e in zip(ys, exact))
    times: dict[int, list[float]] = {bits: [] for bits in sessions}
    for _ in range(args.rounds):
        for bits, (session, _) in sessions.items():
            time.sleep(0.02)
            t = time.perf_counter()
            session.run(None, {"x": x})
            times[bits].append(1e3 * (time.perf_counter() - t))
    rows = [{"kernel": f"MatMulQ{bits}", "ms": statistics.median(ms), "weight_bytes": sessions[bits][1],
             "GB/s": sessions[bits][1] / statistics.median(ms) / 1e6, "max_rel_error": errors[bits]}
            for bits, ms in times.items()]
    ratio = statistics.median(a / b for a, b in zip(times[6], times[8]))
    if args.json:
        print(json.dumps({"rows": rows, "time_ratio_6_to_8": ratio, "copies": args.copies, "rounds": args.rounds},
                         indent=1))
        return
    for r in rows:
        print(f"{r['kernel']}  {r['ms']:7.2f} ms  {r['weight_bytes'] / 1e6:6.1f} MB  {r['GB/s']:5.1f} GB/s  "
              f"max error {r['max_rel_error']:.2e} of the largest logit")
    print(f"6 bits / 8 bits: {ratio:.3f} of the time (median over {args.rounds} rounds), "
          f"{sessions[6][1] / sessions[8][1]:.3f} of the bytes")


if __name__ == "__main__":
    main()
