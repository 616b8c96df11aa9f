"""Times one DeepSeekMoE layer on the CPU: the eager reference (dense over all experts) vs `dsc::moe`.

The reference `model.transformer.MoE` runs every routed expert on every token and combines them
with weights that are 0 outside the K chosen experts (what fuse_moe's identity removes);
`torch.ops.dsc.moe` routes the same way and runs only the chosen experts on their tokens. The
layer has V2-Lite's dimensions with fewer routed experts (so it fits a small machine): hidden 2048,
expert intermediate 1408, 16 routed experts of which 6 are active, 2 shared experts, greedy
softmax routing. Both run in the same loop, alternately, so they see the same machine; the table
shows the median milliseconds after warm-up and their ratio (and the ratio of the best runs, less
sensitive to other load on the machine), and the outputs are checked to agree.

    python benchmarks/moe_dispatch.py [--tokens 1 128] [--reps 10] [--threads 2] [--json OUT.json]

Shapes: T tokens, D hidden, E routed experts, K active experts per token, I expert intermediate.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import dscompile.runtime.ops  # noqa: E402,F401  (registers torch.ops.dsc.*)
from dscompile.model.args import ModelArgs  # noqa: E402
from dscompile.model.transformer import MoE  # noqa: E402
from dscompile.runtime.ops.moe import route  # noqa: E402

# DeepSeek-V2-Lite's MoE (config.json of deepseek-ai/DeepSeek-V2-Lite), with 16 routed experts
# instead of 64: the dense reference's cost grows with E, and 64 experts in fp32 (2.2 GB) are
# more than a small CI machine should hold twice.
BENCH_ARGS = ModelArgs(
    model_type="deepseek_v2", hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=16,
    num_experts_per_tok=6, n_shared_experts=2, topk_method="greedy", n_group=1, topk_group=1,
    norm_topk_prob=False, routed_scaling_factor=1.0, scoring_func="softmax",
)
FP32_TOL = 1e-4  # max |Δ| <= FP32_TOL · max(1, max|ref|)


def build_layer(args: ModelArgs, seed: int) -> MoE:
    """The reference layer with seeded weights of std 1/sqrt(fan_in), so activations stay O(1)."""
    layer = MoE(args)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():  # every weight here is [..., out, in]: fan_in is the last dim
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return layer.eval()


def fused_call(layer: MoE, args: ModelArgs):
    """x -> torch.ops.dsc.moe on the layer's own weights, with the config's routing attributes."""
    shared = layer.shared_experts
    bias = getattr(layer.gate, "e_score_correction_bias", None)

    def call(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.dsc.moe(
            x, layer.gate.weight, bias, layer.experts.gate_proj, layer.experts.down_proj, layer.experts.up_proj,
            shared.gate_proj.weight, shared.down_proj.weight, shared.up_proj.weight, args.num_experts_per_tok,
            args.n_group, args.topk_group, args.topk_method, args.norm_topk_prob, args.routed_scaling_factor,
        )

    return call


def time_pair(ref_fn, op_fn, reps: int, warmup: int) -> tuple[list[float], list[float]]:
    """ms of each run of each, measured alternately in one loop (same load, same caches)."""
    for _ in range(warmup):
        ref_fn()
        op_fn()
    ref_ms, op_ms = [], []
    for _ in range(reps):
        for fn, out in ((ref_fn, ref_ms), (op_fn, op_ms)):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return ref_ms, op_ms


def bench(tokens: int, layer: MoE, args: ModelArgs, reps: int, warmup: int, seed: int) -> dict:
    x = torch.randn(1, tokens, args.hidden_size, generator=torch.Generator().manual_seed(seed + tokens))  # [1, T, D]
    op = fused_call(layer, args)
    with torch.no_grad():
        ref_out, op_out = layer(x), op(x)
        err = (op_out - ref_out).abs()
        bound = FP32_TOL * max(1.0, float(ref_out.abs().max()))
        _w, idx = route(x.view(-1, args.hidden_size), layer.gate.weight, None, args.num_experts_per_tok,
                        args.n_group, args.topk_group, args.topk_method, args.norm_topk_prob,
                        args.routed_scaling_factor)
        ref_ms, op_ms = time_pair(lambda: layer(x), lambda: op(x), reps, warmup)
    ref_med, op_med = statistics.median(ref_ms), statistics.median(op_ms)
    return {
        "tokens": tokens,
        "experts_run": int(idx.unique().numel()),  # of E: what real dispatch computes and reads
        "reference_ms": ref_med,
        "dsc_moe_ms": op_med,
        "speedup": ref_med / op_med,
        # The best runs are what the code costs when nothing else competes for the cores.
        "reference_min_ms": min(ref_ms),
        "dsc_moe_min_ms": min(op_ms),
        "speedup_min": min(ref_ms) / min(op_ms),
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "tolerance": bound,
        "agree": bool(float(err.max()) <= bound),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128], help="token counts T to time")
    parser.add_argument("--reps", type=int, default=10, help="timed repeats per token count (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    opts = parser.parse_args()

    start = time.perf_counter()
    torch.set_num_threads(opts.threads)
    args = BENCH_ARGS
    layer = build_layer(args, opts.seed)
    rows = [bench(t, layer, args, opts.reps, opts.warmup, opts.seed) for t in opts.tokens]

    load = os.getloadavg()[0]  # other processes on the machine make the medians noisy: say so
    E, K = args.n_routed_experts, args.num_experts_per_tok
    print(f"MoE layer: D={args.hidden_size} I={args.moe_intermediate_size} E={E} K={K} "
          f"shared={args.n_shared_experts} {args.topk_method}, fp32, {opts.threads} threads, "
          f"median (and min) of {opts.reps}, load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'tokens':>6} {'experts run':>11} {'reference ms':>13} {'dsc.moe ms':>11} {'speed-up':>9} "
          f"{'(min)':>7} {'max |Δ|':>9} {'mean |Δ|':>9}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['experts_run']:>8}/{E:<2} {r['reference_ms']:>13.2f} {r['dsc_moe_ms']:>11.2f} "
              f"{r['speedup']:>8.2f}x {r['speedup_min']:>6.2f}x {r['max_abs_error']:>9.2e} {r['mean_abs_error']:>9.2e}")
    if opts.json:
        report = {"config": {"hidden_size": args.hidden_size, "moe_intermediate_size": args.moe_intermediate_size,
                             "n_routed_experts": E, "num_experts_per_tok": K,
                             "n_shared_experts": args.n_shared_experts, "topk_method": args.topk_method,
                             "dtype": "float32", "threads": opts.threads, "reps": opts.reps, "load_average": load},
                  "results": rows}
        opts.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = all(r["agree"] for r in rows)
    status = "PASSED" if ok else "FAILED (outputs disagree beyond the fp32 tolerance)"
    print(f"{status} | Runtime: {time.perf_counter() - start:.2f}s | Command: {' '.join(sys.argv)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
