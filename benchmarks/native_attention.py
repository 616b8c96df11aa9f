"""LatentAttention (runtime/native/attention.cc) against the MatMul/Softmax composite it replaces, one decode step.

One graph per side holds `--layers` attentions of the bench model's shape (16 heads, kv_lora_rank 512,
rope 64, one new token), each over its own cache of `--context` tokens: ONNX Runtime's side is the
composite as lowering/ops.py's `latent_attention` writes it (queries reshaped and scaled, the cache
unsqueezed and transposed into two MatMuls, Softmax, the values' MatMul), ours the one native node that
lowering/fuse_attention.py puts in its place. Each round runs both sessions, in turn; the medians over
the rounds, ours over theirs, and the largest difference between the two outputs (relative to the
composite's largest value) are printed.

    DSCOMPILE_ORT_INCLUDE=... python benchmarks/native_attention.py [--contexts 129,1025,4097] [--layers 4]
        [--rounds 15] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dscompile.runtime import native  # noqa: E402
from native_f32 import _session  # noqa: E402  (benchmarks/native_f32.py)

H, C, R, SCALE = 16, 512, 64, 0.07


def _composite(layer: int) -> list:
    """lowering/ops.py's latent_attention (static heads) over layer `layer`'s cache."""
    rows = [("Reshape", ["q", "to_rows_c"], "q4"), ("Mul", ["@q4", "scale"], "qs"),
            ("Reshape", ["qr", "to_rows_r"], "qr4"), ("Mul", ["@qr4", "scale"], "qrs"),
            ("Unsqueeze", ["@kv", "axis1"], "kv4"), ("Unsqueeze", ["@kr", "axis1"], "kr4"),
            ("Transpose", ["@kv4"], "kvt"), ("Transpose", ["@kr4"], "krt"),
            ("MatMul", ["@qs", "@kvt"], "s1"), ("MatMul", ["@qrs", "@krt"], "s2"), ("Add", ["@s1", "@s2"], "s"),
            ("Reshape", ["@s", "to_heads"], "s4"), ("Add", ["@s4", "mask"], "sm"), ("Softmax", ["@sm"], "p"),
            ("Reshape", ["@p", "to_rows"], "p1"), ("MatMul", ["@p1", "@kv4"], "o"), ("Reshape", ["@o", "to_heads"], "y")]
    attributes = {"Transpose": {"perm": [0, 1, 3, 2]}, "Softmax": {"axis": -1}}
    return [h.make_node(op, [f"{i[1:]}{layer}" if i.startswith("@") else i for i in inputs], [f"{out}{layer}"],
                        **attributes.get(op, {})) for op, inputs, out in rows]


def _sessions(layers: int, threads: int) -> dict:
    targets = {"to_rows_c": [0, 1, -1, C], "to_rows_r": [0, 1, -1, R], "to_heads": [0, H, -1, 0],
               "to_rows": [0, 1, -1, 0], "axis1": [1]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in targets.items()]
    inits.append(numpy_helper.from_array(np.array(SCALE, np.float32), "scale"))
    names = ["q", "qr", "mask"] + [f"{c}{i}" for c in ("kv", "kr") for i in range(layers)]
    inputs = [h.make_tensor_value_info(name, TP.FLOAT, None) for name in names]
    outputs = [f"y{i}" for i in range(layers)]
    composite = [node for i in range(layers) for node in _composite(i)]
    ours = [h.make_node("LatentAttention", ["q", "qr", f"kv{i}", f"kr{i}", "mask"], [f"y{i}"], domain=native.DOMAIN,
                        scale=SCALE) for i in range(layers)]
    return {"onnxruntime": _session(composite, inits, inputs, outputs, threads),
            "LatentAttention": _session(ours, [], inputs, outputs, threads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="129,1025,4097")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    why = native.unavailable()
    if why:
        sys.exit(f"native_attention: the native kernels cannot be built here: {why}")
    rng = np.random.default_rng(0)
    sessions = _sessions(args.layers, args.threads)
    rows = []
    for T in (int(t) for t in args.contexts.split(",")):
        feed = {"q": rng.standard_normal((1, H, 1, C), dtype=np.float32),
                "qr": rng.standard_normal((1, H, 1, R), dtype=np.float32), "mask": np.zeros((1, 1, 1, T), np.float32)}
        for i in range(args.layers):
            feed[f"kv{i}"] = rng.standard_normal((1, T, C), dtype=np.float32)
            feed[f"kr{i}"] = rng.standard_normal((1, T, R), dtype=np.float32)
        theirs, ours = (sessions[k].run(None, feed) for k in ("onnxruntime", "LatentAttention"))
        error = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(theirs, ours))
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.rounds):
            for name, session in sessions.items():
                time.sleep(0.1)  # the other session's spinning threads settle
                t = time.perf_counter()
                session.run(None, feed)
                times[name].append(1e3 * (time.perf_counter() - t))
        ms = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"context": T, "onnxruntime_ms": ms["onnxruntime"], "native_ms": ms["LatentAttention"],
                     "ratio": ms["LatentAttention"] / ms["onnxruntime"], "max_rel_difference": error})
    if args.json:
        print(json.dumps({"layers": args.layers, "threads": args.threads, "rows": rows}, indent=2))
        return
    print(f"{args.layers} layers, {H} heads, C {C}, R {R}, one token, {args.threads} threads "
          f"(medians of {args.rounds})")
    for r in rows:
        print(f"  context {r['context']:5d}: composite {r['onnxruntime_ms']:.3f} ms, LatentAttention "
              f"{r['native_ms']:.3f} ms, ratio {r['ratio']:.2f}, max |difference| {r['max_rel_difference']:.1e}")


if __name__ == "__main__":
    main()
