"""ONNX Runtime's quantized kernels on this machine: MatMulNBits and QMoE against their float32 ops.

What lowering/quantize.py's ACCURACY_LEVELS is chosen from. Each kernel runs in its own session
on weights quantized by model/quant.py; the sessions run alternately (one round = every kernel
once) and the median of the rounds is reported, with each kernel's error against the float32
product with the dequantized weights (relative max error: how much accuracy_level costs).

    python benchmarks/quant_kernels.py [--threads 2] [--rounds 15] [--json]

Shapes are the bench config's (V2-Lite widths): one linear layer D=2048 -> 10944 (the dense MLP's
up projection) for 1 and 128 tokens; the routed experts E=16, K=6, D=2048, I=1408.
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

from dscompile.model.quant import Scheme, dequantize, pack, quantize  # noqa: E402

MS = "com.microsoft"
LEVELS = (0, 1, 2, 3, 4)  # accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations


def _model(nodes, inputs, inits):
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, TP.FLOAT, s) for n, s in inputs],
                         [h.make_tensor_value_info("y", TP.FLOAT, None)],
                         [h.make_tensor(n, dt, a.shape, np.ascontiguousarray(a).tobytes(), raw=True) for n, dt, a in inits])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 23), h.make_opsetid(MS, 1)], ir_version=10)


def linear(w: torch.Tensor, bits: int | None, level: int, block: int = 32):
    """(model, float weight it computes with): y = x @ wᵀ."""
    N, K = w.shape
    if bits is None:
        return _model([h.make_node("MatMul", ["x", "W"], ["y"])], [("x", [None, K])],
                      [("W", TP.FLOAT, w.T.contiguous().numpy())]), w
    q, d = quantize(w, Scheme(bits, block))
    node = h.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain=MS, K=K, N=N, bits=bits, block_size=block,
                       accuracy_level=level)
    return _model([node], [("x", [None, K])], [("B", TP.UINT8, pack(q, bits).numpy()), ("S", TP.FLOAT, d.numpy())]), \
        dequantize(q, d)


def experts(w1, w3, w2, k: int, bits: int | None, level: int, block: int = 32):
    """(model, dequantized fc1, fc2): routed experts, swiglu, mixing weights from input rw (QMoE) or softmax(p) (MoE)."""
    E, I, D = w1.shape
    fc1 = torch.stack([w1, w3], 2).reshape(E, 2 * I, D)
    attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=0, activation_alpha=1.0,
                 activation_beta=0.0)
    if bits is None:
        node = h.make_node("MoE", ["x", "p", "B1", "", "B2"], ["y"], domain=MS, **attrs)
        return _model([node], [("x", [None, D]), ("p", [None, E])],
                      [("B1", TP.FLOAT, fc1.numpy()), ("B2", TP.FLOAT, w2.numpy())]), fc1, w2
    scheme = Scheme(bits, block)
    q1, d1 = quantize(fc1, scheme)
    q2, d2 = quantize(w2, scheme)
    node = h.make_node("QMoE", ["x", "p", "B1", "S1", "", "B2", "S2"] + [""] * 7 + ["rw"], ["y"], domain=MS,
                       expert_weight_bits=bits, block_size=block, accuracy_level=level, **attrs)
    inits = [("B1", TP.UINT8, pack(q1, bits).reshape(E, 2 * I, -1).numpy()), ("S1", TP.FLOAT, d1.numpy()),
             ("B2", TP.UINT8, pack(q2, bits).reshape(E, D, -1).numpy()), ("S2", TP.FLOAT, d2.numpy())]
    return _model([node], [("x", [None, D]), ("p", [None, E]), ("rw", [None, E])], inits), dequantize(q1, d1), dequantize(q2, d2)


def moe_reference(x, p, fc1, fc2, k):
    w = torch.softmax(p, -1)
    top = p.topk(k, -1).indices
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        mix = w[t, top[t]] / w[t, top[t]].sum()
        for j, e in enumerate(top[t].tolist()):
            hcat = fc1[e] @ x[t]
            g, u = hcat[0::2], hcat[1::2]
            out[t] += mix[j] * (fc2[e] @ (torch.nn.functional.silu(g) * u))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.log_severity_level = 3
    results = {}

    D, N = 2048, 10944
    w = torch.randn(N, D) * 0.02
    variants = {"fp32": (None, 0)} | {f"int{b} level {lv}": (b, lv) for b in (8, 4) for lv in LEVELS}
    sessions = {}
    for name, (bits, level) in variants.items():
        model, wd = linear(w, bits, level)
        sessions[name] = (ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]), wd)
    for tokens in (1, 128):
        x = torch.randn(tokens, D)
        times = {n: [] for n in sessions}
        errors = {}
        for r in range(args.rounds if tokens == 1 else max(3, args.rounds // 3)):
            for name, (sess, wd) in sessions.items():
                t = time.perf_counter()
                y = sess.run(None, {"x": x.numpy()})[0]
                times[name].append(time.perf_counter() - t)
                if r == 0:
                    ref = x @ wd.T
                    errors[name] = float((torch.from_numpy(y) - ref).abs().max() / ref.abs().max())
        base = statistics.median(times["fp32"])
        results[f"linear {D}x{N}, {tokens} token(s)"] = {
            n: {"ms": 1000 * statistics.median(v), "vs_fp32": base / statistics.median(v), "rel_max_error": errors[n]}
            for n, v in times.items()}

    E, I, K = 16, 1408, 6
    w1, w3, w2 = (torch.randn(E, I, D) * 0.02, torch.randn(E, I, D) * 0.02, torch.randn(E, D, I) * 0.02)
    sessions = {}
    for name, (bits, level) in variants.items():
        model, f1, f2 = experts(w1, w3, w2, K, bits, level)
        sessions[name] = (ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]), f1, f2)
    for tokens in (1, 128):
        x, p = torch.randn(tokens, D), torch.randn(tokens, E)
        mix = torch.softmax(p, -1)
        times = {n: [] for n in sessions}
        errors = {}
        for r in range(args.rounds if tokens == 1 else max(3, args.rounds // 3)):
            for name, (sess, f1, f2) in sessions.items():
                # MoE mixes with softmax over all experts: the graphs pass log w on the chosen ones only
                chosen = torch.full_like(p, -1e30).scatter(1, p.topk(K, -1).indices, p.gather(1, p.topk(K, -1).indices))
                feeds = {"x": x.numpy(), "p": chosen.numpy()} if name == "fp32" else \
                    {"x": x.numpy(), "p": p.numpy(), "rw": (mix / mix.topk(K, -1).values.sum(-1, keepdim=True)).numpy()}
                t = time.perf_counter()
                y = sess.run(None, feeds)[0]
                times[name].append(time.perf_counter() - t)
                if r == 0 and tokens == 1:
                    ref = moe_reference(x, p, f1, f2, K)
                    errors[name] = float((torch.from_numpy(y) - ref).abs().max() / ref.abs().max())
        base = statistics.median(times["fp32"])
        results[f"experts E={E} K={K} D={D} I={I}, {tokens} token(s)"] = {
            n: {"ms": 1000 * statistics.median(v), "vs_fp32": base / statistics.median(v),
                **({"rel_max_error": errors[n]} if n in errors else {})} for n, v in times.items()}

    if args.json:
        print(json.dumps(results, indent=1))
        return
    for case, rows in results.items():
        print(case)
        for name, r in rows.items():
            err = f"  rel max error {r['rel_max_error']:.2g}" if "rel_max_error" in r else ""
            print(f"  {name:16s} {r['ms']:8.2f} ms  {r['vs_fp32']:5.2f}x fp32{err}")


if __name__ == "__main__":
    main()
