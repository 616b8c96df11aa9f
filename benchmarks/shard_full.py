"""Capture, rewrite and shard a full-size published config on the meta device, for several plans.

Each plan is a graph-only sharded export (`dscompile export CONFIG --graphs-only --tp T --ep E`:
capture, absorb_mla, fuse_moe and shard on the meta device; prefill.pt2, decode.pt2 and the
manifest are written, no weights are read or written), run in its own process so that its peak
RSS is its own. For each plan it prints the wall time per stage, the peak RSS, and the plan's
sizes from the manifest (`dscompile inspect OUT --plan`): parameters and bytes per rank at bf16
and FP8, cache bytes per token per rank, and the all-reduce volume per token of a decode step and
per prompt token; `--markdown` prints them as the README's table.

    python benchmarks/shard_full.py [--config model/configs/deepseek-v3.json] [--plans 8x1 8x2]
        [--dtype bfloat16] [--json results.json] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from capture_full import stage_seconds  # noqa: E402  (this folder is on sys.path when run as a script)

from dscompile.cli.inspect import plan_lines  # noqa: E402  (prints what `inspect --plan` prints)
from dscompile.dtypes import DTYPES  # noqa: E402
from dscompile.exporter.export import export_checkpoint  # noqa: E402
from dscompile.exporter.options import ExportOptions  # noqa: E402
from dscompile.inspect import sharding_plan  # noqa: E402
from dscompile.model.args import PUBLISHED_CONFIGS  # noqa: E402


def one_plan(config: Path, tp: int, ep: int, dtype: str) -> dict:
    """The graph-only sharded export of `config` for tp x ep ranks: times, peak RSS and the plan's sizes."""
    ends: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="shard_full_") as root:
        start = time.perf_counter()
        manifest = export_checkpoint(config, Path(root) / "out", ExportOptions(dtype=dtype, graphs_only=True, tp=tp, ep=ep),
                                     progress=lambda stage, d, t: ends.__setitem__(stage, time.perf_counter()))
        wall = time.perf_counter() - start
    info = sharding_plan(manifest)
    return {"tp": tp, "ep": ep, "wall_s": round(wall, 1), "stages_s": stage_seconds(ends, start),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "plan": info, "lines": plan_lines(info)}


def markdown(runs: list[dict]) -> str:
    head = ("| plan | ranks | params per rank | bf16 per rank | FP8 per rank | cache per token per rank | "
            "all-reduce per decode token | per prompt token |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for r in runs:
        p = r["plan"]
        t = p["traffic"]
        rows.append(f"| tp {r['tp']} x ep {r['ep']} | {r['tp'] * r['ep']} | {p['parameters']['per_rank'] / 1e9:.1f} B | "
                    f"{p['weight_bytes_per_rank']['bfloat16'] / 1e9:.0f} GB | {p['weight_bytes_per_rank']['fp8'] / 1e9:.0f} GB | "
                    f"{p['cache_bytes_per_token_per_rank'] / 1e3:.1f} kB | {t['decode']['bytes_per_token'] / 1e3:.0f} kB "
                    f"({sum(t['decode']['all_reduces'].values())} all-reduces) | {t['prefill']['bytes_per_token'] / 1e3:.0f} kB |")
    return "\n".join([head, *rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=PUBLISHED_CONFIGS / "deepseek-v3.json")
    parser.add_argument("--plans", nargs="+", default=["8x1", "8x2"], help="TPxEP, e.g. 8x1 (8 ranks) 8x2 (16 ranks)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="print the README's table")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one plan in this process
    opts = parser.parse_args()
    torch.set_num_threads(2)
    if opts.one:
        tp, ep = map(int, opts.one.split("x"))
        print(json.dumps(one_plan(opts.config, tp, ep, opts.dtype)))
        return 0
    runs = []
    for plan in opts.plans:
        proc = subprocess.run([sys.executable, __file__, "--config", str(opts.config), "--dtype", opts.dtype,
                               "--one", plan], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(run)
        stages = ", ".join(f"{k} {v}" for k, v in run["stages_s"].items())
        print(f"tp {run['tp']} x ep {run['ep']}: {run['wall_s']} s ({stages}), peak RSS {run['peak_rss_gib']} GiB")
        print("\n".join("  " + line for line in run["lines"]), flush=True)
    if opts.markdown:
        print(markdown(runs))
    if opts.json:
        opts.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
