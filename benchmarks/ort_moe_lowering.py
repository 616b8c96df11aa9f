"""Which ONNX lowering of `dsc.moe`'s routed experts is fastest in ONNX Runtime, per token count.

Exports one `dsc::moe` layer (hidden 2048, expert intermediate 1408, 16 routed experts of which 6
are active, 2 shared; DeepSeek-V2-Lite-like greedy softmax routing) with each lowering of
`lowering/ops.py` ("moe_op": com.microsoft.MoE, "gather": gather the chosen experts'
weights, "dense": all experts + masked combine), runs it on the CPU provider for 1 token (decode)
and 128 tokens (prefill), and prints the median time and the error against the op's reference.
All sessions are built first and timed in turn, one run of each per round, so the machine's
drift between runs falls on every lowering alike. `choose_moe_experts` in onnx_ops.py encodes
the outcome.

    python benchmarks/ort_moe_lowering.py [--tokens 1 128] [--threads N] [--repeat 20] [--dtype float32]

A lowering whose intermediates would not fit (gather at 128 tokens copies T·K expert weight
matrices) is reported as skipped with its size.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from torch import nn
from torch.export import Dim

import dscompile.runtime.ops  # noqa: F401  (registers torch.ops.dsc.*)
from dscompile.lowering.graph import name_moe_weights
from dscompile.lowering.weights import fold_weights
from dscompile.lowering.ops import MOE_EXPERTS, translation_table
from dscompile.runtime.ops.moe import moe_reference

D, I, E, K, SHARED = 2048, 1408, 16, 6, 2
GATHER_LIMIT_BYTES = 2 << 30


class MoELayer(nn.Module):
    def __init__(self, dtype: torch.dtype, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape):
            return nn.Parameter((torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype), requires_grad=False)

        self.gate, self.w1, self.w2, self.w3 = rnd(E, D), rnd(E, I, D), rnd(E, D, I), rnd(E, I, D)
        self.s1, self.s2, self.s3 = rnd(SHARED * I, D), rnd(D, SHARED * I), rnd(SHARED * I, D)

    def forward(self, x):
        return torch.ops.dsc.moe(x, self.gate, None, self.w1, self.w2, self.w3, self.s1, self.s2, self.s3,
                                 K, 1, 1, "greedy", False, 1.0)


def build(layer: MoELayer, experts: str, threads: int) -> ort.InferenceSession:
    x = torch.randn(1, 4, D, dtype=layer.w1.dtype)
    ep = torch.export.export(layer, (x,), dynamic_shapes={"x": {1: Dim("tokens", min=1, max=4096)}})
    program = torch.onnx.export(ep, (), None, dynamo=True, opset_version=23,
                                custom_translation_table=translation_table(experts), verbose=False)
    model = program.model
    fold_weights(model)
    name_moe_weights(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--experts", nargs="+", default=list(MOE_EXPERTS), choices=MOE_EXPERTS)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    layer = MoELayer(dtype)
    bytes_all = 3 * E * I * D * layer.w1.element_size()
    print(f"MoE layer D={D} I={I} E={E} K={K} shared={SHARED} {a.dtype}: routed expert weights "
          f"{bytes_all / 1e6:.1f} MB, {bytes_all * K / E / 1e6:.1f} MB active per token; "
          f"threads={a.threads or 'default'}")
    sessions = {}
    for experts in a.experts:
        start = time.perf_counter()
        sessions[experts] = build(layer, experts, a.threads)
        print(f"  built {experts} in {time.perf_counter() - start:.1f}s", flush=True)
    rows = []
    for tokens in a.tokens:
        x = torch.randn(1, tokens, D, generator=torch.Generator().manual_seed(tokens)).to(dtype)
        with torch.no_grad():
            ref = moe_reference(x, layer.gate, None, layer.w1, layer.w2, layer.w3, layer.s1, layer.s2,
                                layer.s3, K, 1, 1, "greedy", False, 1.0).float().numpy()
        timed, errors = {}, {}
        for experts, session in sessions.items():
            gathered = tokens * K * 3 * I * D * layer.w1.element_size()
            if experts == "gather" and gathered > GATHER_LIMIT_BYTES:
                rows.append((experts, tokens, None, None, f"skipped: gathers {gathered / 1e9:.1f} GB of weights"))
                continue
            for _ in range(3):
                out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            errors[experts] = float(np.abs(out.astype(np.float32) - ref).max()) / max(1.0, float(np.abs(ref).max()))
            timed[experts] = []
        # One run of each lowering in turn: load from the rest of the machine falls on all of them alike.
        for _ in range(a.repeat):
            for experts, times in timed.items():
                session = sessions[experts]
                feed = {session.get_inputs()[0].name: x.numpy()}
                t0 = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - t0)
        for experts, times in timed.items():
            rows.append((experts, tokens, statistics.median(times) * 1e3, errors[experts], ""))
    print(f"\n{'lowering':<8} {'tokens':>6} {'median ms':>10} {'rel err':>9}  note")
    for experts, tokens, ms, err, note in rows:
        ms_s = f"{ms:10.2f}" if ms is not None else f"{'-':>10}"
        err_s = f"{err:9.1e}" if err is not None else f"{'-':>9}"
        print(f"{experts:<8} {tokens:>6} {ms_s} {err_s}  {note}")
    for tokens in a.tokens:
        timed_rows = [(ms, e) for e, t, ms, _, _ in rows if t == tokens and ms is not None]
        if timed_rows:
            best = min(timed_rows)
            print(f"fastest at {tokens} token(s): {best[1]} ({best[0]:.2f} ms)")


if __name__ == "__main__":
    main()
