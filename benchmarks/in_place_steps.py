"""A quantized engine's steps in place against the same OUT through the contract's decode graph.

    python benchmarks/in_place_steps.py OUT [--contexts 128,1024] [--rounds 10] [--steps 10] [--threads 2]

OUT is a quantized CPU export (`dscompile export CKPT -o OUT --weights int4`), whose one session runs
every step through the in-place graph made for any number of new tokens (runtime/ort_engine.py,
"Quantized engines"). The baseline is OUT as an export without that graph runs it: a copy of OUT
(hard links, beside it, `OUT-contract`) whose manifest has no `graphs.decode.in_place`, so its one
session is the contract's decode graph, whose Concat copies the whole cache every step.

Both engines are loaded in this process and run in turns: per context, `--rounds` blocks of
`--steps` decode steps each (batch 1, from a cache of random values in the engine's own form, the
first two steps of a block untimed while the other engine's threads settle), then `--rounds`
prefills of 128 tokens (last token's logits only). Medians, and new / contract ratios, measured
side by side in one run; the load average is printed with them (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from dscompile.runtime.contract import KVCache  # noqa: E402
from dscompile.runtime.ort_engine import OrtEngine  # noqa: E402

PREFILL = 128


def contract_copy(out: Path) -> Path:
    """OUT without its in-place graph in the manifest (hard links to its files, made once)."""
    dst = out.with_name(out.name + "-contract")
    if not dst.exists():
        dst.mkdir()
        for f in out.iterdir():
            if f.name != "manifest.json":
                os.link(f, dst / f.name)
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["graphs"]["decode"].pop("in_place", None)
        (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--contexts", default="128,1024")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    engines = {"contract": OrtEngine.load(contract_copy(a.out), provider="cpu", threads=a.threads),
               "in place": OrtEngine.load(a.out, provider="cpu", threads=a.threads)}
    info, g = engines["in place"].info, torch.Generator().manual_seed(0)
    results = {}
    for C in (int(c) for c in a.contexts.split(",")):
        base = KVCache([tuple(torch.randn(1, C, w, generator=g) * 0.5 for w in info.cache_widths)
                        for _ in range(info.num_layers)])
        caches = {k: e.own_cache(base) for k, e in engines.items()}
        times = {k: [] for k in engines}
        for r in range(a.rounds + 1):  # round 0 warms up
            for k, e in engines.items():
                for s in range(a.steps):
                    P = caches[k].length
                    ids = torch.randint(0, info.vocab_size, (1, 1), generator=g)
                    t = time.perf_counter()
                    _, caches[k] = e.step(ids, torch.tensor([[P]]), torch.ones(1, P + 1, dtype=torch.int64), caches[k])
                    if r > 0 and s >= 2:
                        times[k].append(time.perf_counter() - t)
        results[f"decode step, context {C}"] = times
    ids = torch.randint(0, info.vocab_size, (1, PREFILL), generator=g)
    times = {k: [] for k in engines}
    for r in range(a.rounds + 1):
        for k, e in engines.items():
            t = time.perf_counter()
            e.step(ids, torch.arange(PREFILL)[None], torch.ones(1, PREFILL, dtype=torch.int64), None, last_only=True)
            if r > 0:
                times[k].append(time.perf_counter() - t)
    results[f"prefill {PREFILL} tokens"] = times
    for case, t in results.items():
        old, new = (statistics.median(t[k]) * 1e3 for k in ("contract", "in place"))
        print(f"{case}: contract graph {old:.2f} ms, in place {new:.2f} ms, in place / contract {new / old:.3f}")
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
