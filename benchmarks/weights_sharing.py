"""What sharing one copy of the weights costs and saves: ONNX Runtime with and without prepacking.

    python benchmarks/weights_sharing.py ENGINE [--engine NAME=FOLDER[:prepack] ...] [--rounds 5]

For each variant (by default ENGINE loaded as our engine does, without prepacking, and ENGINE with
prepacking; `--engine` adds others, e.g. an export of an older version):
- memory, each variant alone in a fresh process (bench/memory.py): load time, proportional
  resident memory (PSS, which counts pages mapped by both sessions once) after the load and after
  a first step, against the size of the variant's weights.bin;
- speed, all variants loaded in this process and run in turns (one call of each per round, 0.1 s
  apart, so the machine's drift falls on all alike): prefill of 128 tokens and a decode step at
  context 1024 (a cache of random values in the engine's own form), medians over the rounds.

Without ENGINE it uses the bench config's engine exported by the current sources (as `dscompile
bench` does, generated once under ~/.cache/dscompile or $DSCOMPILE_HOME).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from dscompile.bench.memory import measure_load  # noqa: E402
from dscompile.runtime.engine import KVCache  # noqa: E402
from dscompile.runtime.ort_engine import OrtEngine  # noqa: E402

PREFILL, CONTEXT, THREADS = 128, 1024, 2


def parse_variants(engine: Path, extra: list[str]) -> dict[str, tuple[Path, bool]]:
    variants = {"ours": (engine, False), "ours-prepack": (engine, True)}
    for item in extra:
        name, _, spec = item.partition("=")
        folder, _, flag = spec.partition(":")
        if not name or not folder or flag not in ("", "prepack"):
            raise SystemExit(f"--engine {item!r}: expected NAME=FOLDER or NAME=FOLDER:prepack")
        variants[name] = (Path(folder), flag == "prepack")
    return variants


def timings(variants: dict[str, tuple[Path, bool]], rounds: int) -> dict[str, dict[str, float]]:
    engines = {name: OrtEngine.load(folder, provider="cpu", threads=THREADS, prepack=prepack)
               for name, (folder, prepack) in variants.items()}
    g = torch.Generator().manual_seed(0)
    vocab = min(e.info.vocab_size for e in engines.values())
    ids = torch.randint(0, vocab, (1, PREFILL), generator=g)
    caches = {name: e.own_cache(KVCache([(torch.randn(1, CONTEXT, e.info.kv_lora_rank, generator=g),
                                          torch.randn(1, CONTEXT, e.info.qk_rope_head_dim, generator=g))
                                         for _ in range(e.info.num_layers)]))
              for name, e in engines.items()}

    def prefill(e) -> float:
        t = time.perf_counter()
        e.step(ids, torch.arange(PREFILL)[None], torch.ones(1, PREFILL, dtype=torch.int64), None)
        return time.perf_counter() - t

    def decode(e, cache) -> float:
        t = time.perf_counter()
        e.step(ids[:, :1], torch.tensor([[CONTEXT]]), torch.ones(1, CONTEXT + 1, dtype=torch.int64), cache)
        return time.perf_counter() - t

    runs = {name: {"prefill": [], "decode": []} for name in engines}
    for name, e in engines.items():  # warm-up
        prefill(e), decode(e, caches[name])
    for _ in range(rounds):
        for name, e in engines.items():
            time.sleep(0.1)
            runs[name]["prefill"].append(prefill(e))
            time.sleep(0.1)
            runs[name]["decode"].append(decode(e, caches[name]))
    return {name: {k: 1000 * statistics.median(v) for k, v in r.items()} for name, r in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine", nargs="?", type=Path)
    p.add_argument("--engine", dest="extra", action="append", default=[], metavar="NAME=FOLDER[:prepack]")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    engine = a.engine
    if engine is None:
        from dscompile.bench.cache import bench_checkpoint, cached_export
        from dscompile.bench.systems import OUR_ENGINES
        from dscompile.cli import cache_home

        engine = cached_export(bench_checkpoint(cache_home()), cache_home(), OUR_ENGINES["ours"])
    variants = parse_variants(engine, a.extra)
    result = {"memory": {}, "speed_ms": {}}
    for name, (folder, prepack) in variants.items():
        m = measure_load(("ours", str(folder), THREADS, prepack))
        size = json.loads((folder / "manifest.json").read_text())["weights"]["bytes"]
        result["memory"][name] = {"weights_bytes": size, "load_s": m["load_s"],
                                  "pss_growth_after_load": m["pss_after"] - m["pss_before"],
                                  "pss_growth_after_step": m["pss_after_step"] - m["pss_before"],
                                  "rss_growth_after_step": m["rss_after_step"] - m["rss_before"]}
    result["speed_ms"] = timings(variants, a.rounds)
    for name, m in result["memory"].items():
        s = result["speed_ms"][name]
        print(f"{name:14s} weights.bin {m['weights_bytes'] / 1e9:5.2f} GB  load {m['load_s']:5.1f} s  "
              f"resident (PSS) +{m['pss_growth_after_load'] / 1e9:4.2f} GB after load, "
              f"+{m['pss_growth_after_step'] / 1e9:4.2f} GB after a step "
              f"({m['pss_growth_after_step'] / m['weights_bytes']:.2f}x weights.bin)  "
              f"prefill {PREFILL} {s['prefill']:7.1f} ms  decode P={CONTEXT} {s['decode']:6.1f} ms")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
