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
import time
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
        """The prefill as a generation runs it: the last token's logits only (as llama.cpp's)."""
        ids, pos, mask = random_step_inputs(self.args.vocab_size, batch, tokens, 0, 1)
        return lambda: self.engine.step(ids, pos, mask, None, last_only=True)

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


def _llama_item(item: str) -> tuple[str, str, str, str | None]:
    """'NAME=LLAMA_BENCH:GGUF[@SYSTEM]' -> (name, binary, gguf, system or None)."""
    name, _, rest = item.partition("=")
    binary, _, gguf = rest.partition(":")
    path, at, system = gguf.rpartition("@")
    if at and system and "/" not in system:
        return name, binary, path, system
    return name, binary, gguf, None


def llama_cpp_against(items: list[str]) -> dict[str, str]:
    """{name: the system of ours named after '@'} for the --llama-cpp items that name one."""
    return {name: system for name, _, _, system in map(_llama_item, items) if system}


def parse_llama_cpp(items: list[str]) -> dict[str, tuple[Path, Path]]:
    """['q4_0=/path/llama-bench:/path/model-q4_0.gguf', ...] -> {name: (binary, gguf)}; an item may end in
    '@SYSTEM' (llama_cpp_against)."""
    found: dict[str, tuple[Path, Path]] = {}
    for item in items:
        name, binary, gguf, _ = _llama_item(item)
        if not name or not binary or not gguf or name in SYSTEMS or name in found:
            raise OptionError(f"--llama-cpp {item!r}: expected NAME=LLAMA_BENCH:GGUF[@SYSTEM] with a new name")
        for path, what in ((Path(binary), "llama-bench binary"), (Path(gguf), "GGUF file")):
            if not path.is_file():
                raise OptionError(f"--llama-cpp {item!r}: {path}: {what} not found")
        found[name] = (Path(binary), Path(gguf))
    return found


def against_for_llama(name: str, gguf: Path, bits: dict[str, float], parameters: int, explicit: str | None) -> str | None:
    """The system a llama.cpp GGUF is run alternately against: `explicit` where given, else the one of
    `bits` (system -> bits per weight) nearest in log2 to the GGUF's average bits per parameter
    (q4_0 ~4.7 -> an int4 engine, q8_0 ~8.5 -> int8, f32 -> ours in float32)."""
    if explicit is not None:
        return explicit
    if not bits:
        return None
    import math

    mine = 8 * gguf.stat().st_size / parameters
    return min(bits, key=lambda s: abs(math.log2(bits[s]) - math.log2(mine)))


class LlamaBenchError(Exception):
    """llama-bench did not run, or printed no results (the reason in one line)."""


def llama_bench_call(binary: Path, gguf: Path, threads: int, prefill_tokens: int, contexts: list[int], repeats: int,
                     run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> tuple[dict, list[str]]:
    """llama-bench's own timing of prefill (`prefill_tokens` from an empty cache) and decode (32 tokens after a
    prefilled depth = each context), `repeats` samples each, in two processes (a prefill and a decode call: one
    call over both would also time prefill at every depth). Returns ({(phase, context): [ms per sample]}, the
    commands); ms is per token for decode, per prompt for prefill."""
    out: dict[tuple[str, int], list[float]] = {}
    cmds = []
    tests = [("prefill", ["-p", str(prefill_tokens), "-n", "0"])]
    if contexts:
        tests.append(("decode", ["-p", "0", "-n", "32", "-d", ",".join(str(c) for c in contexts)]))
    for phase, extra in tests:
        cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-o", "json", "-r", str(repeats), *extra]
        cmds.append(" ".join(cmd))
        done = run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise LlamaBenchError(f"llama-bench exited with {done.returncode}: {last}")
        try:
            for entry in json.loads(done.stdout):
                tokens = int(entry["n_gen"] if phase == "decode" else entry["n_prompt"])
                context = int(entry.get("n_depth", 0)) if phase == "decode" else 0
                samples = [ns / 1e6 for ns in entry["samples_ns"]]
                out[(phase, context)] = [ms / tokens for ms in samples] if phase == "decode" else samples
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise LlamaBenchError(f"llama-bench printed no results JSON ({type(err).__name__}: {err})") from None
        missing = [c for c in contexts if ("decode", c) not in out] if phase == "decode" else []
        if ("prefill", 0) not in out or missing:
            raise LlamaBenchError(f"llama-bench printed no result for {phase} {missing or ''}".rstrip())
    return out, cmds


OURS_DECODE_STEPS = 8  # decode steps of ours averaged per round beside llama-bench (llama_bench_rows)


def llama_bench_rows(name: str, binary: Path, gguf: Path, options: BenchOptions, bandwidth: Callable[[], float],
                     run: Callable[..., subprocess.CompletedProcess] = subprocess.run, against: System | None = None,
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """llama.cpp's own `llama-bench` on a GGUF of the same model, batch 1, `threads` threads: prefill of
    `prefill_tokens` from empty and decode at each context, in `repeats` rounds of one sample each.

    llama-bench is a process that loads the model itself, so its steps cannot be interleaved with ours one by
    one; a round is one llama-bench sample of every test, then (with `against`, one of our systems) ours
    of each: one untimed step, then the mean of OURS_DECODE_STEPS decode steps (llama-bench's decode sample
    is the mean of its 32 tokens after its own warm-up) or one prefill, so the two see the same machine
    within seconds. (Timed as one cold step right after llama-bench's process exits, ours read up to
    1.8x slower than in its own warm loop: float32, context 128, on the 2-core machine.) Returns (rows of llama.cpp's
    measurements, rows of our time / llama.cpp's per round (as compare_alternately's), None), or
    ([], [], why it could not run). The read bandwidth is taken before each round (its floor fraction)."""
    tests = [("prefill", 0)] + [("decode", c) for c in options.contexts]
    ours = {}
    if against is not None:
        for phase, context in tests:
            fn = against.prefill(1, options.prefill_tokens) if phase == "prefill" else against.decode(1, context)
            if fn is not None:
                ours[(phase, context)] = fn
        for _ in range(options.warmup):
            for fn in ours.values():
                fn()
    samples: dict[tuple[str, int], list[float]] = {t: [] for t in tests}
    mine: dict[tuple[str, int], list[float]] = {t: [] for t in ours}
    bws, cmds = [], []
    for _ in range(options.repeats):
        bws.append(bandwidth())
        try:
            got, cmds = llama_bench_call(binary, gguf, options.threads, options.prefill_tokens, options.contexts, 1,
                                         run)
        except LlamaBenchError as err:
            return [], [], str(err)
        for t in tests:
            samples[t] += got[t]
        for t, fn in ours.items():
            fn()  # untimed: caches and pages warm again after llama-bench's process, as its own warm-up run
            steps = OURS_DECODE_STEPS if t[0] == "decode" else 1
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            mine[t].append(1e3 * (time.perf_counter() - start) / steps)
    rows, alternating = [], []
    for (phase, context), per in samples.items():
        rows.append({"system": name, "phase": phase, "batch": 1, "context": context, "ms": statistics.median(per),
                     "best_ms": min(per), "runs_ms": [round(r, 3) for r in per],
                     "runs_bandwidth": [round(b) for b in bws][: len(per)], "runs_gemm_flops": [],
                     "llama_cpp": {"cmd": cmds, "gguf_bytes": gguf.stat().st_size}})
        if (phase, context) in mine:
            pairs = list(zip(mine[(phase, context)], per))
            alternating.append({"system": against.name, "reference": name, "phase": phase, "batch": 1,
                                "context": context, "time_ratio": statistics.median(a / b for a, b in pairs),
                                "runs_ms": [[round(a, 3), round(b, 3)] for a, b in pairs]})
    return rows, alternating, None
