"""End-to-end latency benchmark (issue 6): the code of `dscompile bench`, as a script.

    python benchmarks/bench.py [CHECKPOINT] [--contexts 128,1024,4096] [--batch 1,4] [--repeats 5]
                               [--systems eager,hf,hf-onnx,ours,ours-absorb-none,ours-no-fuse-moe]
                               [--engine NAME=FOLDER ...]
                               [--json OUT.json] [--plot OUT.png]

Without CHECKPOINT it measures the bench config (V2-Lite dimensions, 4 layers, 16 experts),
generated once under ~/.cache/dscompile (or $DSCOMPILE_HOME). See bench/ (the harness) and
bench/hf_systems.py (the systems that wrap transformers).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from dscompile.bench.run import (SYSTEMS, BenchOptions, parse_engines, parse_ints, parse_systems, plot,  # noqa: E402
                                 run_bench, table_lines, to_json)
from dscompile.cli import cache_home  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", type=Path)
    p.add_argument("--contexts", default="128,1024,4096")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engine", action="append", default=[], metavar="NAME=FOLDER",
                   help="also measure an engine folder exported elsewhere (e.g. by an older version)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--plot", type=Path, help="write the PNG here")
    a = p.parse_args()
    options = BenchOptions(contexts=parse_ints(a.contexts, "--contexts"), batches=parse_ints(a.batch, "--batch"),
                           repeats=a.repeats, warmup=a.warmup, prefill_tokens=a.prefill_tokens,
                           systems=parse_systems(a.systems), threads=a.threads, extra_engines=parse_engines(a.engine))
    result = run_bench(a.checkpoint, cache_home(), options, progress=lambda stage, done, total: print(
        f"{stage} {done}/{total}", file=sys.stderr, flush=True))
    result["command"] = "python " + " ".join(sys.argv)
    if a.plot:
        plot(result, a.plot)
    if a.json:
        a.json.write_text(to_json(result) + "\n")
    print("\n".join(table_lines(result)))
    print(f"command: {result['command']}")


if __name__ == "__main__":
    main()
