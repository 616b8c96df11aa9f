"""Capture, rewrite and lower a full-size published config on the meta device: the graphs, no weights.

Runs the graph-only export (`ExportOptions(graphs_only=True)`, the command line's limits: capture, passes and
lowering; prefill.onnx, decode.onnx, decode_inplace.onnx and manifest.json are written, weights.bin
is neither computed nor written) of DeepSeek-V3 671B (the repository's copy of its config), then of
the same config with 16 routed experts, and prints for each the wall time per stage, the peak RSS
and the node count of every graph. The counts must be equal: no lowering grows with the number of
routed experts. Target (issue): DeepSeek-V3 in < 10 min and < 8 GB peak on a 2-core machine.

    python benchmarks/capture_full.py [--config model/configs/deepseek-v3.json] [--experts 256 16]
        [--dtype float32] [--target onnxruntime] [--out DIR] [--json results.json]

Peak RSS is the process's peak so far (Linux ru_maxrss), so the config's own expert count runs
first and the line after it is that export's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from dscompile.dtypes import DTYPES  # noqa: E402
from dscompile.exporter.export import STAGES, export_checkpoint  # noqa: E402
from dscompile.exporter.options import TARGETS, ExportOptions  # noqa: E402
from dscompile.model.args import PUBLISHED_CONFIGS  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def node_counts(out: Path, manifest: dict) -> dict[str, int]:
    """Nodes of every graph file in OUT, read from the files (without their external data)."""
    files = {name: g["file"] for name, g in manifest["graphs"].items()}
    if manifest["graphs"]["decode"].get("in_place"):
        files["decode_inplace"] = manifest["graphs"]["decode"]["in_place"]["file"]
    return {name: len(onnx.load(str(out / f), load_external_data=False).graph.node) for name, f in files.items()}


def stage_seconds(ends: dict[str, float], start: float) -> dict[str, float]:
    """Seconds each export stage took, from the times its progress callback last reported each."""
    stages, last = {}, start
    for stage in STAGES:
        if stage in ends:
            stages[stage] = round(ends[stage] - last, 1)
            last = ends[stage]
    return stages


def lower_graphs(config: dict, experts: int, folder: Path, dtype: str, target: str) -> dict:
    """One graph-only export of `config` with `experts` routed experts; its times, peak and node counts."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config, "n_routed_experts": experts}, indent=2))
    ends: dict[str, float] = {}
    start = time.perf_counter()
    manifest = export_checkpoint(folder / "config.json", folder / "out",
                                 ExportOptions(dtype=dtype, target=target, graphs_only=True, force=True),
                                 progress=lambda stage, done, total: ends.__setitem__(stage, time.perf_counter()))
    wall = time.perf_counter() - start
    return {"experts": experts, "wall_s": round(wall, 1), "stages_s": stage_seconds(ends, start), "peak_rss_gib": round(peak_rss_gib(), 2),
            "nodes": node_counts(folder / "out", manifest), "planned_weight_bytes": manifest["weights"]["bytes"],
            "written": sorted(manifest["files"]), "moe_lowering": {g: manifest["graphs"][g]["moe_lowering"]
                                                                   for g in ("prefill", "decode")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=PUBLISHED_CONFIGS / "deepseek-v3.json",
                        help="a published config.json (default: DeepSeek-V3's)")
    parser.add_argument("--experts", type=int, nargs="+",
                        help="routed expert counts to lower, the config otherwise unchanged "
                             "(default: its own, then 16)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--target", default="onnxruntime", choices=list(TARGETS))
    parser.add_argument("--out", type=Path, help="keep the exports here, one folder per expert count "
                                                 "(default: a temporary folder, removed at the end)")
    parser.add_argument("--json", type=Path, help="write the results here")
    opts = parser.parse_args()
    torch.set_num_threads(2)
    config = json.loads(opts.config.read_text())
    counts = opts.experts or [config["n_routed_experts"], 16]
    root = opts.out or Path(tempfile.mkdtemp(prefix="capture_full_"))
    results = {"config": str(opts.config), "layers": config["num_hidden_layers"], "dtype": opts.dtype,
               "target": opts.target, "runs": []}
    try:
        for experts in counts:
            run = lower_graphs(config, experts, root / f"experts-{experts}", opts.dtype, opts.target)
            results["runs"].append(run)
            stages = ", ".join(f"{k} {v}" for k, v in run["stages_s"].items())
            nodes = ", ".join(f"{g} {n}" for g, n in run["nodes"].items())
            moe = "/".join(run["moe_lowering"].values())
            print(f"{experts:4d} experts: {run['wall_s']:7.1f} s ({stages})  peak RSS {run['peak_rss_gib']:.2f} GiB  "
                  f"nodes {nodes}  (moe {moe}; weights.bin not written, "
                  f"{run['planned_weight_bytes'] / 1e12:.2f} TB planned)", flush=True)
    finally:
        if opts.out is None:
            shutil.rmtree(root, ignore_errors=True)
    same = all(r["nodes"] == results["runs"][0]["nodes"] for r in results["runs"])
    results["same_nodes"] = same
    first = results["runs"][0]
    print(f"{config['model_type']} {config['num_hidden_layers']} layers {opts.dtype}: "
          f"{first['wall_s']:.1f} s and {first['peak_rss_gib']:.2f} GiB peak for {first['experts']} experts "
          f"(target < 600 s and < 8 GB); node counts {'equal' if same else 'DIFFER'} for "
          f"{', '.join(str(r['experts']) for r in results['runs'])} experts")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
