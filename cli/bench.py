"""`bench`: prefill and decode latency, load time and memory, side by side."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from dscompile.errors import OptionError
from dscompile.cli import Bars, _emit, _status_line, app, cache_home, guard


@app.command()
def bench(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint folder (default: the bench config, generated once)."),
    config: Optional[str] = typer.Option(None, help="'bench': V2-Lite dimensions, 4 layers, 16 experts (the default)."),
    contexts: str = typer.Option("128,1024,4096", help="Decode contexts (past tokens), comma-separated."),
    batch: str = typer.Option("1,4", "--batch", help="Decode batch sizes, comma-separated."),
    repeats: int = typer.Option(5, help="Timed runs per measurement (the median is reported)."),
    warmup: int = typer.Option(2, help="Untimed runs before each measurement."),
    prefill_tokens: int = typer.Option(128, help="Prompt length of the prefill measurement (batch 1)."),
    systems: str = typer.Option(",".join(("eager", "hf", "hf-onnx", "ours", "ours-absorb-none", "ours-no-fuse-moe")),
                                help="Systems to measure, comma-separated (hf, hf-onnx: where transformers is "
                                "installed, the `transformers` extra)."),
    threads: int = typer.Option(2, help="Threads for torch and ONNX Runtime (intra-op)."),
    engine: list[str] = typer.Option([], "--engine", help="NAME=FOLDER: also measure an engine folder exported elsewhere "
                                     "(each is also run alternately against ours, for the time ratio)."),
    llama_cpp: list[str] = typer.Option([], "--llama-cpp", help="NAME=LLAMA_BENCH:GGUF[@SYSTEM]: also measure "
                                        "llama.cpp's llama-bench on a GGUF of the bench model, in turns with SYSTEM "
                                        "(default: our engine nearest in bits per weight)."),
    profile: bool = typer.Option(False, "--profile", help="Also profile each of our engines per op type "
                                 "(ONNX Runtime's profiler): time and weight bytes per op type against the floor."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of decode latency vs context per system."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Measure prefill and decode latency of eager, transformers, and our engines against the bandwidth floor.

    Everything is measured in one run with the same threads; the table gives each median next to
    its floor (bytes the step must read / the read bandwidth measured just before each run) and the
    issue's targets, whose ratios come from ours and transformers run alternately.
    """
    start = time.perf_counter()
    with guard():
        from dscompile.bench.run import (BenchOptions, llama_cpp_against, parse_engines, parse_ints, parse_llama_cpp,
                                         parse_systems, plot as write_plot, run_bench, table_lines)

        if config is not None and config != "bench":
            raise OptionError(f"--config {config!r}: the only built-in config is 'bench'")
        if config is not None and checkpoint is not None:
            raise OptionError("give CHECKPOINT or --config bench, not both")
        if checkpoint is not None and not (checkpoint / "config.json").is_file():
            raise OptionError(f"{checkpoint}: no config.json (not a checkpoint folder)")
        options = BenchOptions(contexts=parse_ints(contexts, "--contexts"), batches=parse_ints(batch, "--batch"),
                               repeats=repeats, warmup=warmup, prefill_tokens=prefill_tokens,
                               systems=parse_systems(systems), threads=threads, extra_engines=parse_engines(engine),
                               llama_cpp=parse_llama_cpp(llama_cpp),
                               llama_against=llama_cpp_against(llama_cpp), profile=profile)
        options.check()
        with Bars(not as_json) as bars:
            result = run_bench(checkpoint, cache_home(), options, progress=bars)
        if plot is not None:
            write_plot(result, plot)
            result["plot"] = str(plot)
        lines = table_lines(result)
        if plot is not None:
            lines.append(f"plot    {plot}")
        lines.append(_status_line(True, start))
        result["command"] = "dscompile " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        _emit(result, as_json, lines)
