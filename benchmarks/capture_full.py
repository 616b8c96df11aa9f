"""Capture a full-size published config on the meta device (no weights) and run the pass pipeline.

Measures wall time and peak RSS of capture + passes for each graph. Target (issue): DeepSeek-V3
671B captures in < 120 s and < 4 GiB on a 2-core machine.

    python benchmarks/capture_full.py --config ../shared/configs/deepseek-v3.json [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from exporter.capture import Limits, capture
from model.args import ModelArgs
from model.checkpoint import build_model
from passes import PassOptions, run_pipeline


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "configs" / "deepseek-v3.json"
    parser.add_argument("--config", type=Path, default=default, help="a published config.json")
    parser.add_argument("--phases", default="decode,prefill")
    parser.add_argument("--json", type=Path, help="write the results here")
    opts = parser.parse_args()
    torch.set_num_threads(2)
    args = ModelArgs.from_json(opts.config)
    start = time.perf_counter()
    model = build_model(args, torch.bfloat16, "meta")
    params = sum(p.numel() for p in model.parameters())
    results = {"config": str(opts.config), "params": params, "layers": args.num_hidden_layers,
               "experts": args.n_routed_experts, "build_s": time.perf_counter() - start, "graphs": {}}
    # Both graphs trace the same function with the same dynamic dims: one capture serves both,
    # and each phase's passes work on their own copy.
    t0 = time.perf_counter()
    traced = capture(model, "prefill", Limits(max_batch=64, max_new_tokens=4096, max_context=16384))
    results["capture_s"] = round(time.perf_counter() - t0, 2)
    print(f"capture  {results['capture_s']:6.1f} s  peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    for phase in opts.phases.split(","):
        t1 = time.perf_counter()
        ep, report = run_pipeline(traced, PassOptions(phase, args))
        t2 = time.perf_counter()
        results["graphs"][phase] = {
            "passes_s": round(t2 - t1, 2),
            "nodes": len(ep.graph.nodes),
            "passes": {r.name: r.count for r in report.results},
            "peak_rss_gib": round(peak_rss_gib(), 3),
        }
        print(f"{phase:8s} passes {t2 - t1:6.1f} s  nodes {len(ep.graph.nodes):6d}  "
              f"passes {results['graphs'][phase]['passes']}  peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    results["total_s"] = round(time.perf_counter() - start, 2)
    results["peak_rss_gib"] = round(peak_rss_gib(), 3)
    print(f"{args.model_type} {params / 1e9:.1f}B params: total {results['total_s']:.1f} s, "
          f"peak RSS {results['peak_rss_gib']:.2f} GiB (target < 120 s and < 4 GiB)")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
