"""What continuous batching buys and costs: the ragged decode step against batch-1 decode, and the
scheduler's own time per step.

    python benchmarks/batching.py [--engine NAME=OUT ...] [--batch 1,4,8,16] [--context 128] [--rounds 5]

For each engine (by default the bench config's float32 and int4 engines, exported by the current
sources once under ~/.cache/dscompile or $DSCOMPILE_HOME, as `dscompile bench` does; `--engine`
names others instead), 2 threads:
- engine speed, run in turns (one call of each per round, so the machine's drift falls on all
  alike; medians over the rounds): the engine's batch-1 decode step as `Engine.generate` runs it
  (its own cache form, at context C) and `Engine.step_ragged` over B slots whose lengths are
  spread over [C/2, C] (random cache values); tokens/s of each and the ragged step's over batch 1's;
- the scheduler's overhead: B requests of 16-token prompts decoding 24 tokens each in a
  `Scheduler` (max_num_seqs B), greedy or sampled (temperature, top-p); each engine call is timed, and the time between two consecutive
  ragged steps (choosing tokens, events, bookkeeping) is the scheduler's per-step overhead,
  printed beside the bare step's time.
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

from dscompile.runtime.batching import Request, Scheduler  # noqa: E402
from dscompile.runtime.contract import KVCache  # noqa: E402
from dscompile.runtime.sampling import SamplingParams  # noqa: E402
from dscompile.runtime.session import open_engine  # noqa: E402

THREADS = 2
ENGINES = {"float32": {}, "int4": {"weights": "int4"}}  # export options of the default engines


def default_engines() -> dict[str, Path]:
    from dscompile.bench.cache import bench_checkpoint, cached_export

    home = Path(os.environ.get("DSCOMPILE_HOME") or Path.home() / ".cache" / "dscompile")
    checkpoint = bench_checkpoint(home)
    return {name: cached_export(checkpoint, home, options) for name, options in ENGINES.items()}


def random_rows(engine, batch: int, length: int, g: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(batch, length, width, generator=g).to(engine.info.cache_dtype)
            for _ in range(engine.info.num_layers) for width in engine.info.cache_widths]


def engine_speed(engine, batches: list[int], context: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    vocab = engine.info.vocab_size
    rows = random_rows(engine, 1, context, g)
    cache = engine.own_cache(KVCache([(rows[i], rows[i + 1]) for i in range(0, len(rows), 2)]))
    token = torch.tensor([[1]])
    position = torch.tensor([[context]])
    mask = torch.ones(1, context + 1, dtype=torch.int64)

    def single():
        engine.step(token, position, mask, cache)  # the returned cache is dropped: the next call writes the same row

    slots = engine.new_slots(max(batches), -(-(context + 1) // 128) * 128)
    for buffer, t in zip(slots.tensors, random_rows(engine, max(batches), slots.capacity, g)):
        buffer.copy_(t)
    calls = [single]
    for b in batches:
        lengths = torch.linspace(context // 2, context, b).round().to(torch.int64)
        tokens = torch.randint(0, vocab, (b,), generator=g)
        calls.append(lambda tokens=tokens, lengths=lengths: engine.step_ragged(tokens, lengths, slots))
    for call in calls:  # warm-up
        call()
    times = [[] for _ in calls]
    for _ in range(rounds):
        for i, call in enumerate(calls):
            time.sleep(0.05)
            start = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - start)
    medians = [statistics.median(t) for t in times]
    result = {"batch1_decode_ms": round(1e3 * medians[0], 2), "batch1_tokens_per_s": round(1 / medians[0], 2),
              "ragged": {}}
    for b, m in zip(batches, medians[1:]):
        result["ragged"][b] = {"step_ms": round(1e3 * m, 2), "tokens_per_s": round(b / m, 2),
                               "vs_batch1": round((b / m) / (1 / medians[0]), 2)}
    return result


class Timed:
    """The engine with every prefill and ragged step timed (start, end, kind)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _timed(self, kind, fn, *args, **kw):
        start = time.perf_counter()
        out = fn(*args, **kw)
        self.calls.append((start, time.perf_counter(), kind))
        return out

    def prefill_slot(self, *args, **kw):
        return self._timed("prefill", self.engine.prefill_slot, *args, **kw)

    def step_ragged(self, *args, **kw):
        return self._timed("decode", self.engine.step_ragged, *args, **kw)


def scheduler_overhead(engine, batch: int, sampled: bool, tokens: int = 24) -> dict:
    timed = Timed(engine)
    scheduler = Scheduler(timed, max_num_seqs=batch, prefix_cache_bytes=0)
    scheduler.start()
    g = torch.Generator().manual_seed(1)
    handles = [scheduler.submit(Request(torch.randint(0, engine.info.vocab_size, (16,), generator=g).tolist(),
                                        tokens, SamplingParams(temperature=0.8, top_p=0.95, seed=i) if sampled
                                        else SamplingParams()))
               for i in range(batch)]
    for h in handles:
        list(h.events(timeout=600))
    scheduler.close()
    calls = timed.calls[2:]  # after the warm-up's prefill and step
    gaps, steps = [], []
    for (s0, e0, k0), (s1, e1, k1) in zip(calls, calls[1:]):
        if k0 == k1 == "decode":
            gaps.append(s1 - e0)
            steps.append(e1 - s1)
    return {"steps": len(gaps), "step_ms": round(1e3 * statistics.median(steps), 2),
            "overhead_ms": round(1e3 * statistics.median(gaps), 3),
            "overhead_vs_step": round(statistics.median(gaps) / statistics.median(steps), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", action="append", default=[], help="NAME=OUT (repeatable)")
    parser.add_argument("--batch", default="1,4,8,16")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    if args.engine:
        engines = {}
        for item in args.engine:
            name, _, folder = item.partition("=")
            if not name or not folder:
                raise SystemExit(f"--engine {item!r}: expected NAME=OUT")
            engines[name] = Path(folder)
    else:
        engines = default_engines()
    report = {}
    for name, folder in engines.items():
        engine = open_engine(folder, threads=THREADS)
        report[name] = {"engine_speed": engine_speed(engine, batches, args.context, args.rounds),
                        "scheduler": {f"{how} B={b}": scheduler_overhead(engine, b, how == "sampled")
                                      for b in (1, max(batches) // 2) for how in ("greedy", "sampled")}}
        del engine
        if not args.json:
            r = report[name]
            print(f"{name}: batch-1 decode {r['engine_speed']['batch1_decode_ms']} ms "
                  f"({r['engine_speed']['batch1_tokens_per_s']} tokens/s), context {args.context}")
            for b, x in r["engine_speed"]["ragged"].items():
                print(f"  ragged B={b:<3} {x['step_ms']:>8} ms/step {x['tokens_per_s']:>8} tokens/s "
                      f"{x['vs_batch1']:>6}x batch-1")
            for b, x in r["scheduler"].items():
                print(f"  scheduler {b:<12} step {x['step_ms']} ms, overhead {x['overhead_ms']} ms per step "
                      f"({100 * x['overhead_vs_step']:.2f}%) over {x['steps']} steps")
    if args.json:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
