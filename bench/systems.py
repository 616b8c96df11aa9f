"""What `dscompile bench` runs: our systems, the engines and llama.cpp binaries named on the command
line, and the systems that wrap transformers where it is installed.

- "eager":            our PyTorch reference (model/transformer.py) behind the Engine interface;
- "ours":             our ONNX Runtime engine, every pass on;
- "ours-absorb-none", "ours-no-fuse-moe": the same engine with one pass off (ablations);
- `--engine NAME=FOLDER`: an engine folder exported elsewhere (another version, quantized weights);
- `--llama-cpp NAME=BIN:GGUF`: llama.cpp's own llama-bench on a GGUF of the same model;
- "hf", "hf-onnx":    transformers' model and its own ONNX export (hf_systems.py).

transformers is an optional dependency (the `transformers` extra): hf_systems.py and its loaders
(hf_loaders.py) import it only inside their functions, and where it is missing the bench reports
both systems skipped with the reason (hf_systems.missing) and measures the others.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from dscompile.errors import OptionError
from dscompile.model.args import ModelArgs
from dscompile.runtime.contract import KVCache
from dscompile.runtime.contract import random_step_inputs
from dscompile.runtime.engine import Engine

if TYPE_CHECKING:
    from dscompile.bench.run import BenchOptions

SYSTEMS = ("eager", "hf", "hf-onnx", "ours", "ours-absorb-none", "ours-no-fuse-moe")
HF_SYSTEMS = ("hf", "hf-onnx")  # hf_systems.py, where transformers is installed
OUR_ENGINES = {  # system -> export options
    "ours": {"absorb": "auto", "fuse_moe": True},
    "ours-absorb-none": {"absorb": "none", "fuse_moe": True},
    "ours-no-fuse-moe": {"absorb": "auto", "fuse_moe": False},
}

class System:
    """Something that runs the model: a prefill and a decode step to time (None: a size it cannot run)."""

    name = ""

    def prefill(self, batch: int, tokens: int) -> Callable[[], Any] | None:
        raise NotImplementedError

    def decode(self, batch: int, context: int) -> Callable[[], Any] | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class EngineSystem(System):
    """An `Engine` (ours: eager or ONNX Runtime) over the IO contract.

    The decode step at P runs against a cache of P tokens filled with random values (cache
    contents do not change the work done); each timed step starts from the same P. Our ORT engine
    holds that cache as a generation loop does (`Engine.own_cache`: capacity buffers its decode
    graph writes in place), so a step is timed without the one copy of the cache a loop makes
    every CAPACITY_STEP tokens.
    """

    def __init__(self, name: str, engine: Engine, args: ModelArgs):
        self.name, self.engine, self.args = name, engine, args

    def prefill(self, batch: int, tokens: int) -> Callable[[], Any]:
        ids, pos, mask = random_step_inputs(self.args.vocab_size, batch, tokens, 0, 1)
        return lambda: self.engine.step(ids, pos, mask, None)

    def decode(self, batch: int, context: int) -> Callable[[], Any]:
        info = self.engine.info
        gen = torch.Generator().manual_seed(2)
        cache = KVCache([(torch.randn(batch, context, info.kv_lora_rank, generator=gen).to(info.cache_dtype),
                          torch.randn(batch, context, info.qk_rope_head_dim, generator=gen).to(info.cache_dtype))
                         for _ in range(info.num_layers)])
        cache = self.engine.own_cache(cache)  # as a generation loop holds it (ORT: in-place buffers)
        ids, pos, mask = random_step_inputs(self.args.vocab_size, batch, 1, context, 3)
        return lambda: self.engine.step(ids, pos, mask, cache)  # each call's new cache is dropped

    def close(self) -> None:
        self.engine = None


# ---------------------------------------------------------------- systems named on the command line


def parse_engines(items: list[str]) -> dict[str, Path]:
    """['before=/path/OUT', ...] -> {name: folder}: exported engine folders measured as extra systems."""
    engines: dict[str, Path] = {}
    for item in items:
        name, _, folder = item.partition("=")
        if not name or not folder or name in SYSTEMS or name in engines:
            raise OptionError(f"--engine {item!r}: expected NAME=FOLDER with a new name "
                              f"(not one of {', '.join(SYSTEMS)})")
        if not (Path(folder) / "manifest.json").is_file():
            raise OptionError(f"--engine {item!r}: {folder} has no manifest.json (not an engine folder)")
        engines[name] = Path(folder)
    return engines


def parse_llama_cpp(items: list[str]) -> dict[str, tuple[Path, Path]]:
    """['q4_0=/path/llama-bench:/path/model-q4_0.gguf', ...] -> {name: (binary, gguf)}."""
    found: dict[str, tuple[Path, Path]] = {}
    for item in items:
        name, _, rest = item.partition("=")
        binary, _, gguf = rest.partition(":")
        if not name or not binary or not gguf or name in SYSTEMS or name in found:
            raise OptionError(f"--llama-cpp {item!r}: expected NAME=LLAMA_BENCH:GGUF with a new name")
        for path, what in ((Path(binary), "llama-bench binary"), (Path(gguf), "GGUF file")):
            if not path.is_file():
                raise OptionError(f"--llama-cpp {item!r}: {path}: {what} not found")
        found[name] = (Path(binary), Path(gguf))
    return found


def llama_bench_rows(name: str, binary: Path, gguf: Path, options: BenchOptions, bandwidth: Callable[[], float],
                     run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                     ) -> tuple[list[dict[str, Any]], str | None]:
    """llama.cpp's own `llama-bench` on a GGUF of the same model: prefill of `prefill_tokens` from empty and
    decode (32 tokens after a prefilled depth = each context), batch 1, `threads` threads, `repeats` runs.

    Each call is one process that loads the model itself, so its steps cannot be interleaved with ours;
    the read bandwidth is taken just before each call (its floor fraction). Returns (rows, None) or
    ([], why it could not run)."""
    rows = []
    tests = [("prefill", 0, ["-p", str(options.prefill_tokens), "-n", "0"])]
    tests += [("decode", c, ["-p", "0", "-n", "32", "-d", str(c)]) for c in options.contexts]
    for phase, context, extra in tests:
        bw = bandwidth()
        cmd = [str(binary), "-m", str(gguf), "-t", str(options.threads), "-o", "json", "-r", str(options.repeats),
               *extra]
        done = run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return [], f"llama-bench exited with {done.returncode}: {last}"
        try:
            entry = json.loads(done.stdout)[0]
            tokens = int(entry["n_gen"] if phase == "decode" else entry["n_prompt"])
            samples = [ns / 1e6 for ns in entry["samples_ns"]]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            return [], f"llama-bench printed no results JSON ({type(err).__name__}: {err})"
        per = [ms / tokens for ms in samples] if phase == "decode" else samples  # decode: ms per token
        rows.append({"system": name, "phase": phase, "batch": 1, "context": context, "ms": statistics.median(per),
                     "best_ms": min(per), "runs_ms": [round(r, 3) for r in per],
                     "runs_bandwidth": [round(bw)] * len(per), "runs_gemm_flops": [], "llama_cpp": {
                         "cmd": " ".join(cmd), "gguf_bytes": gguf.stat().st_size}})
    return rows, None
