"""Per-op-type profile of our ONNX Runtime engine: where a step's time goes, against its bytes' floor.

`dscompile bench --profile` opens each of our engines once more with ONNX Runtime's profiler
(SessionOptions.enable_profiling), runs `warmup` untimed and `steps` profiled steps (prefill of
`prefill_tokens` tokens, or one decode token at a context), and sums the profiler's kernel times
per op type over the profiled steps (the mean per step is reported). Beside each op type: the
bytes of the constant tensors (weights) its nodes read in one step, and the time those bytes take
at the read bandwidth measured just before (floor_ms; floor% = floor / time). A routed-experts op
(MoE, QMoE) reads only the experts a token picks: K/E of its expert tensors at batch 1; an
embedding Gather reads one row per token. Activations and the cache are not counted: for the
attention MatMuls and the small ops the floor is the weights' only.

Measured on the bench model, int4 engine, decode at context 128, 2 threads, beside other jobs (load 9,
3 GB/s read; 2026-12-07): QMoE 32% of the step (3 nodes, 97 MB), MatMulNBits 31% (25 nodes, 145 MB),
the absorbed W_UK/W_UV in float32 12% (Einsum + MatMul, 34 MB), the ~250 small nodes (Concat, Split,
Mul, Reshape, Shape, ...) most of the rest.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import onnx

from dscompile.lowering.encodings import NATIVE_EXPERT_OPS

_EXPERT_OPS = ("MoE", "QMoE", "MoEF32") + NATIVE_EXPERT_OPS  # the last two: runtime/native's routed experts
_ELT = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
        onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1, onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4,
        onnx.TensorProto.BOOL: 1}


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def weight_bytes_per_op_type(model_path: Path, tokens: int, experts_read: float, experts: int) -> dict[str, float]:
    """Bytes of constant tensors each op type's nodes read in a step of `tokens` tokens (graph of `model_path`,
    weights not loaded): routed-expert tensors (MoE, QMoE, native MoEF32/Q4/Q8; first dim = `experts`) at
    `experts_read` / `experts`,
    embedding Gathers at one row per token."""
    model = onnx.load(os.fspath(model_path), load_external_data=False)
    sizes = {t.name: (list(t.dims), _ELT.get(t.data_type, 4)) for t in model.graph.initializer}
    for node in model.graph.node:  # Constant nodes hold small tensors: counted as their consumers' too
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.dims:
            t = node.attribute[0].t
            sizes[node.output[0]] = (list(t.dims), _ELT.get(t.data_type, 4))
    out: dict[str, float] = defaultdict(float)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name not in sizes:
                continue
            dims, elt = sizes[name]
            n = _numel(dims) * elt
            if node.op_type in _EXPERT_OPS and dims and int(dims[0]) == experts:
                n *= min(experts_read, experts) / experts
            elif node.op_type == "Gather" and i == 0 and len(dims) == 2:
                n = min(tokens, int(dims[0])) * int(dims[1]) * elt
            out[node.op_type] += n
    return dict(out)


def kernel_times(profile_file: Path, runs: int) -> tuple[dict[str, float], dict[str, int]]:
    """Milliseconds per op type summed over the last `runs` session runs of an ONNX Runtime profile, and the
    nodes of each op type in one run."""
    events = json.loads(Path(profile_file).read_text())
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[-runs:]
    if not windows:
        return {}, {}
    start = windows[0][0]
    times: dict[str, float] = defaultdict(float)
    nodes: dict[str, set] = defaultdict(set)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        op = e.get("args", {}).get("op_name", "?")
        times[op] += e["dur"] / 1e3
        nodes[op].add(e["name"])
    return dict(times), {op: len(v) for op, v in nodes.items()}


def profile_engine(folder: Path, threads: int, step: Callable[[Any], Callable[[], Any]], graph_file: Path,
                   tokens: int, experts_read: float, experts: int, bandwidth: Callable[[], float],
                   steps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Profile `steps` calls of `step(engine)` (a function making the timed call) on the engine at `folder`.

    Returns {"step_ms": wall ms per step (median), "ops": [{op, ms, nodes, share, bytes, floor_ms, floor}]}
    sorted by time, the ops' total beside the wall time (the rest: session overhead, between kernels)."""
    from dscompile.runtime.ort_engine import OrtEngine

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "ort")
        engine = OrtEngine.load(folder, provider="cpu", threads=threads, profile_prefix=prefix)
        fn = step(engine)
        for _ in range(warmup):
            fn()
        bw = bandwidth()
        walls = []
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            walls.append(1e3 * (time.perf_counter() - t))
        files = engine.end_profiling()
        del fn, engine
        times: dict[str, float] = defaultdict(float)
        nodes: dict[str, int] = defaultdict(int)
        for f in files:
            t, n = kernel_times(Path(f), steps)
            for op, ms in t.items():
                times[op] += ms
                nodes[op] = max(nodes[op], n[op])
    reads = weight_bytes_per_op_type(graph_file, tokens, experts_read, experts)
    step_ms = sorted(walls)[len(walls) // 2]
    ops = []
    for op, total in sorted(times.items(), key=lambda kv: -kv[1]):
        ms = total / steps
        b = reads.get(op, 0.0)
        floor_ms = 1e3 * b / bw
        ops.append({"op": op, "ms": ms, "nodes": nodes[op], "share": ms / step_ms, "bytes": b,
                    "floor_ms": floor_ms, "floor": floor_ms / ms if ms > 0 else None})
    kernels = sum(o["ms"] for o in ops)
    return {"step_ms": step_ms, "kernels_ms": kernels, "bandwidth": bw, "steps": steps, "ops": ops,
            "bytes": sum(reads.values()), "floor_ms": 1e3 * sum(reads.values()) / bw}


def profile_lines(name: str, what: str, p: dict[str, Any]) -> list[str]:
    """The profile as text: one line per op type."""
    lines = [f"profile {name} {what}: step {p['step_ms']:.1f} ms (kernels {p['kernels_ms']:.1f} ms), "
             f"weights {p['bytes'] / 1e6:.0f} MB -> floor {p['floor_ms']:.1f} ms at {p['bandwidth'] / 1e9:.1f} GB/s"]
    for o in p["ops"]:
        floor = f"{100 * o['floor']:5.0f}%" if o["floor"] is not None and o["bytes"] else "     -"
        lines.append(f"  {o['op']:22s} {o['ms']:7.2f} ms {100 * o['share']:5.1f}%  x{o['nodes']:<4d} "
                     f"{o['bytes'] / 1e6:8.1f} MB  floor {o['floor_ms']:6.2f} ms {floor}")
    return lines
