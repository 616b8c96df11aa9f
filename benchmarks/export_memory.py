"""Peak memory of `dscompile export` on a multi-shard checkpoint of about 2 GB.

Generates a random checkpoint with bench-like widths (hidden 2048, 16 heads, MLA ranks of the
published models, 16 routed experts) in 8 safetensors shards, exports it with the real command in
a child process, and reports the child's peak RSS (getrusage RUSAGE_CHILDREN) next to the largest
shard and the whole model. Target (issue 7): peak RSS < 2 x largest shard + graph, i.e. memory
that does not grow with the model.

    /work/venv/bin/python benchmarks/export_memory.py            # ~2.2 GB checkpoint, ~10 GB of disk
    /work/venv/bin/python benchmarks/export_memory.py --layers 3 # smaller, quicker

Also prints the peak RSS of loading the model into memory, for scale: export streams the weights
(meta capture, one tensor at a time into weights.bin), so its peak stays flat as layers are added.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dscompile.model.synthetic import random_state, tiny_args, write_checkpoint  # noqa: E402


def bench_args(layers: int, experts: int, vocab: int):
    """DeepSeek-V2-Lite-like widths at hidden 2048 (MLA ranks as published), few experts."""
    base = tiny_args("v3", layers=layers, experts=experts, hidden=2048, heads=16, vocab=vocab, yarn=True)
    return replace(base, q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                   v_head_dim=128, intermediate_size=4096, moe_intermediate_size=512, first_k_dense_replace=1)


def child_peak(cmd: list[str]) -> tuple[int, float, subprocess.CompletedProcess]:
    """(peak RSS in bytes, seconds, result) of one child; RUSAGE_CHILDREN is a max over waited children."""
    t0 = time.perf_counter()
    # A fresh interpreter per measurement: ru_maxrss of RUSAGE_CHILDREN only ever grows in one process.
    probe = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
             "print(json.dumps({'rc': r.returncode, 'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
             "'stderr': r.stderr[-3000:]}))")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - t0
    info = json.loads(out.stdout.strip().splitlines()[-1])
    return info["peak_kib"] * 1024, seconds, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--work-dir", type=Path, default=None, help="Where the checkpoint and OUT go (default: a temp dir).")
    ap.add_argument("--keep", action="store_true", help="Keep the checkpoint and OUT.")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()

    work = opts.work_dir or Path(tempfile.mkdtemp(prefix="dsc_export_memory_"))
    ckpt, out = work / "ckpt", work / "out"
    try:
        args = bench_args(opts.layers, opts.experts, opts.vocab)
        if not (ckpt / "config.json").is_file():
            t0 = time.perf_counter()
            write_checkpoint(ckpt, args, random_state(args, seed=0), shards=opts.shards)
            print(f"generated {ckpt} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        shards = sorted(ckpt.glob("*.safetensors"))
        largest, total = max(p.stat().st_size for p in shards), sum(p.stat().st_size for p in shards)

        load_cmd = [sys.executable, "-c", "import sys; from dscompile.model.checkpoint import load_checkpoint; "
                                          "load_checkpoint(sys.argv[1])", str(ckpt)]
        load_peak, load_s, _ = child_peak(load_cmd)
        shutil.rmtree(out, ignore_errors=True)
        export_cmd = [sys.executable, "-m", "dscompile", "export", str(ckpt), "-o", str(out), "--max-batch", "2",
                      "--max-prompt-tokens", "64", "--max-context", "128", "--json"]
        export_peak, export_s, info = child_peak(export_cmd)
        if info["rc"] != 0:
            raise SystemExit(f"export failed (exit {info['rc']}): {info['stderr']}")
        files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
        graph = files["prefill.onnx"] + files["decode.onnx"]
        result = {
            "config": {"layers": opts.layers, "experts": opts.experts, "hidden": 2048, "vocab": opts.vocab,
                       "shards": len(shards)},
            "checkpoint_bytes": total, "largest_shard_bytes": largest,
            "load_peak_rss_bytes": load_peak, "load_seconds": round(load_s, 1),
            "export_peak_rss_bytes": export_peak, "export_seconds": round(export_s, 1),
            "out_files_bytes": files,
            "target_bytes": 2 * largest + graph,
            "export_peak_over_model": round(export_peak / total, 2),
            "export_peak_over_largest_shard": round(export_peak / largest, 2),
        }
        gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
        lines = [
            f"checkpoint   {gb(total)} in {len(shards)} shards, largest {gb(largest)} "
            f"({opts.layers} layers, hidden 2048, {opts.experts} experts)",
            f"load in RAM  peak RSS {gb(load_peak)} = {load_peak / total:.2f}x the model ({load_s:.0f}s)",
            f"export       peak RSS {gb(export_peak)} = {export_peak / total:.2f}x the model, "
            f"{export_peak / largest:.1f}x the largest shard ({export_s:.0f}s)",
            f"target       < 2 x largest shard + graph = {gb(result['target_bytes'])}: "
            f"{'met' if export_peak < result['target_bytes'] else 'NOT met'}",
            "OUT          " + ", ".join(f"{k} {gb(v)}" for k, v in files.items()),
        ]
        print(json.dumps(result, indent=2) if opts.json else "\n".join(lines))
    finally:
        if not opts.keep and opts.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
