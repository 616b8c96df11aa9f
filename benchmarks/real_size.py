"""A real-size DeepSeek-V2-Lite (15.7B parameters) exported int4/int8 and run on this machine.

    python benchmarks/real_size.py [--weights int4,int8] [--dir ~/.cache/dscompile/real] [--json]

1. A random checkpoint with the published DeepSeek-V2-Lite config (model/configs), written
   streamed in bfloat16 (~31 GB; kept in --dir and reused by later runs).
2. Per scheme: `dscompile export --weights SCHEME` in a child process: wall time and peak memory
   (the child's maximum resident set).
3. The engine: resident memory after a first step (PSS, in a fresh process: bench/memory.py)
   against its weights.bin; prefill of 128 tokens; decode ms/token at context 128 and 1024
   (median of --repeats steps) with the fraction of the bandwidth floor (bytes a step reads:
   quantized weights + scales + float32 parts + latent cache, over the read bandwidth measured
   just before each step: bench/floors.py decode_floor).
Each engine is removed after it is measured unless --keep (disk: checkpoint 31 GB, int8 ~18 GB);
--reuse measures an engine already there instead of exporting it.
Not part of CI (disk and time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _export(checkpoint: Path, out: Path, scheme: str) -> dict:
    """Run the export in a child; its wall time and peak RSS (ru_maxrss of that child alone)."""
    code = ("import resource, sys, json; from dscompile.exporter.export import export_checkpoint; "
            "from dscompile.exporter.options import ExportOptions; "
            f"export_checkpoint({str(checkpoint)!r}, {str(out)!r}, ExportOptions(weights={scheme!r}, force=True)); "
            "print(json.dumps({'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"export {scheme} failed:\n{done.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


def _run_engine(out: Path, threads: int, repeats: int) -> dict:
    import torch

    from dscompile.bench.floors import decode_floor
    from dscompile.bench.timing import MachineProbe
    from dscompile.model.args import ModelArgs
    from dscompile.runtime.ort_engine import OrtEngine

    manifest = json.loads((out / "manifest.json").read_text())
    args = ModelArgs.from_config(manifest["model"])
    bpw = float(manifest["quantization"]["bits_per_weight"])
    engine = OrtEngine.load(out, provider="cpu", threads=threads)
    probe = MachineProbe(1 << 30, 1024)
    gen = torch.Generator().manual_seed(0)
    result: dict = {}

    def prompt(n: int):
        ids = torch.randint(0, args.vocab_size, (1, n), generator=gen)
        return ids, torch.arange(n).unsqueeze(0), torch.ones(1, n, dtype=torch.int64)

    ids, pos, mask = prompt(128)
    engine.step(ids, pos, mask, None)  # warm: pages of weights.bin, kernels
    times = []
    for _ in range(3):
        t = time.perf_counter()
        engine.step(ids, pos, mask, None)
        times.append(time.perf_counter() - t)
    result["prefill_128_ms"] = 1000 * statistics.median(times)
    for context in (128, 1024):
        ids, pos, mask = prompt(context)
        _, cache = engine.step(ids, pos, mask, None)
        runs, fractions = [], []
        for i in range(repeats + 2):
            bandwidth = probe.bandwidth()
            nxt = torch.randint(0, args.vocab_size, (1, 1), generator=gen)
            m = torch.ones(1, context + 1, dtype=torch.int64)
            t = time.perf_counter()
            engine.step(nxt, torch.tensor([[context]]), m, cache)  # the same past each time: context stays fixed
            ms = 1000 * (time.perf_counter() - t)
            if i >= 2:
                runs.append(ms)
                fractions.append(decode_floor(args, 1, context, 4, bandwidth, bpw)["ms"] / ms)
        floor = decode_floor(args, 1, context, 4, probe.bandwidth(), bpw)
        result[f"decode_{context}"] = {"ms": statistics.median(runs), "floor_fraction": statistics.median(fractions),
                                       "floor_bytes": floor["bytes"]}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="int4,int8")
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "dscompile" / "real")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="Keep the engines after measuring them.")
    ap.add_argument("--reuse", action="store_true",
                    help="Measure an engine already in --dir (kept by --keep, or exported by hand) instead of exporting.")
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    from dscompile.bench.memory import measure_load
    from dscompile.model.args import PUBLISHED_CONFIGS, ModelArgs
    from dscompile.model.synthetic import write_streamed_checkpoint

    checkpoint = opts.dir / "checkpoint-v2-lite-bf16-seed0"
    report: dict = {"config": "deepseek-v2-lite.json", "threads": opts.threads, "schemes": {}}
    if not (checkpoint / "model.safetensors.index.json").is_file():
        t = time.perf_counter()
        write_streamed_checkpoint(checkpoint, ModelArgs.from_json(PUBLISHED_CONFIGS / "deepseek-v2-lite.json"),
                                  progress=lambda d, n: print(f"checkpoint {d / 1e9:.1f}/{n / 1e9:.1f} GB",
                                                              file=sys.stderr, flush=True))
        report["checkpoint_write_s"] = time.perf_counter() - t
    report["checkpoint_bytes"] = sum(p.stat().st_size for p in checkpoint.iterdir())
    for scheme in [s.strip() for s in opts.weights.split(",") if s.strip()]:
        out = opts.dir / f"engine-v2-lite-{scheme}"
        if opts.reuse and (out / "manifest.json").is_file():
            entry = {"export": "reused (--reuse): exported before, not measured here"}
        else:
            print(f"exporting {scheme} ...", file=sys.stderr, flush=True)
            entry = {"export": _export(checkpoint, out, scheme)}
        manifest = json.loads((out / "manifest.json").read_text())
        entry["weights_bin_bytes"] = manifest["weights"]["bytes"]
        entry["bits_per_weight"] = manifest["quantization"]["bits_per_weight"]
        print(f"measuring {scheme} ...", file=sys.stderr, flush=True)
        load = measure_load(("ours", str(out), opts.threads))
        entry["resident"] = {k: load.get(k) for k in ("load_s", "pss_before", "pss_after", "pss_after_step",
                                                       "rss_after_step", "rss_anon_after", "rss_file_after")}
        growth = (load.get("pss_after_step") or 0) - (load.get("pss_before") or 0)
        entry["resident"]["growth_over_weights_bin"] = growth / manifest["weights"]["bytes"]
        entry["run"] = _run_engine(out, opts.threads, opts.repeats)
        report["schemes"][scheme] = entry
        print(json.dumps(entry), file=sys.stderr, flush=True)
        if not opts.keep:
            shutil.rmtree(out, ignore_errors=True)
    if opts.json:
        print(json.dumps(report, indent=1))
        return
    for scheme, e in report["schemes"].items():
        r = e["run"]
        export = (f"export {e['export']['wall_s']:.0f} s, peak {e['export']['peak_rss_bytes'] / 1e9:.2f} GB"
                  if isinstance(e["export"], dict) else "export reused")
        print(f"{scheme}: weights.bin {e['weights_bin_bytes'] / 1e9:.2f} GB ({e['bits_per_weight']} bits/weight); "
              f"{export}; "
              f"resident after a step {e['resident']['growth_over_weights_bin']:.2f}x weights.bin; "
              f"prefill 128: {r['prefill_128_ms']:.0f} ms; decode ms/token at 128: {r['decode_128']['ms']:.1f} "
              f"({r['decode_128']['floor_fraction']:.0%} of floor), at 1024: {r['decode_1024']['ms']:.1f} "
              f"({r['decode_1024']['floor_fraction']:.0%})")


if __name__ == "__main__":
    main()
