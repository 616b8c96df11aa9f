"""`dscompile bench`: latency of every way to run a checkpoint, side by side, against the bandwidth floor.

One run measures, with the same threads and the same inputs, each system of `options.systems`
(systems.py: our eager model, our ONNX Runtime engine and its ablations, engine folders and
llama.cpp binaries named on the command line, and where transformers is installed its model and
its own ONNX export, from hf_systems.py): prefill latency of `prefill_tokens`
tokens (batch 1) and the latency of one decode step at each context P and batch B (median of
`repeats` runs after `warmup` runs).

Floors (floors.py, measured in the same run): read bandwidth = bytes / time of a sum over a
tensor far larger than the last-level cache, read once before every timed run (timing.py: the
bandwidth of a shared machine drifts by 2x within minutes, so each run is held against the
bandwidth of its own moment); floor = bytes the step must read / bandwidth. A result's "floor
fraction" is the median over its runs of floor / run time (1.0 = running at the speed of memory);
its "floor_ms" is the floor at the median of its bandwidth readings. Prefill's floor is the larger
of its weight bytes over the bandwidth and its FLOPs over the fp32 GEMM rate, also read before
every prefill run.

Load (`load`): each system is also loaded alone in a fresh process (memory.py), for its load time
(ours: OrtEngine.load; eager: reading the checkpoint into our model; hf: transformers'
from_pretrained; hf-onnx: creating its ONNX Runtime session, not the export) and its resident
memory before and after the load and at its peak; for our engines beside the size of their
weights file. (Read in this process, one system's memory would count against the next.)

Ratios between two measurements are taken from the two run alternately, not from the table's
medians (rows minutes apart on a machine whose speed drifts): our engine against transformers
and its ONNX export (prefill, decode at batch 1 for each context, larger batches at the shortest
context; `alternating`), each `--engine` against ours, and each system's step at the
longest context against the shortest (`context_scaling`). The targets (report.py) are judged on
these and show the table's ratio beside them.

The bench config, its checkpoint and our engines exported from it are made once under the cache
folder (cache.py).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dscompile.errors import OptionError
from dscompile.bench.cache import Progress, bench_checkpoint, cached_export
from dscompile.bench.floors import NATIVE_ABSORBED_BYTES, decode_floor, prefill_floor, step_weight_params
from dscompile.bench.memory import LOADERS, LoadMeasureError, measure_load
from dscompile.bench.report import plot, table_lines, targets, to_json
from dscompile.bench.systems import (HF_SYSTEMS, OUR_ENGINES, SYSTEMS, EngineSystem, System, against_for_llama,
                                     llama_bench_rows,
                                     llama_cpp_against, parse_engines, parse_llama_cpp)
from dscompile.bench.timing import (BANDWIDTH_BYTES, GEMM_SIZE, MachineProbe, compare_alternately,
                                             context_scaling, time_ms)
from dscompile.model.args import ModelArgs

__all__ = ["SYSTEMS", "BenchOptions", "llama_cpp_against", "parse_engines", "parse_ints", "parse_llama_cpp", "parse_systems", "plot",
           "run_bench", "table_lines", "to_json"]

DEFAULT_CONTEXTS = (128, 1024, 4096)
DEFAULT_BATCHES = (1, 4)
PREFILL_TOKENS = 128
THREADS = 2


def parse_ints(text: str, option: str, minimum: int = 1) -> list[int]:
    """'128,1024' -> [128, 1024], or an OptionError naming the option."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise OptionError(f"{option} {text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < minimum:
        raise OptionError(f"{option} {text!r}: every value must be >= {minimum}")
    return sorted(set(values))


def parse_systems(text: str) -> list[str]:
    """'ours,eager' -> the built-in systems named, in SYSTEMS' order, or an OptionError."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in SYSTEMS]
    if not names or bad:
        raise OptionError(f"--systems {text!r}: each must be one of {', '.join(SYSTEMS)}")
    return [s for s in SYSTEMS if s in names]


@dataclass
class BenchOptions:
    """What one bench run measures, and how often."""

    contexts: list[int] = field(default_factory=lambda: list(DEFAULT_CONTEXTS))
    batches: list[int] = field(default_factory=lambda: list(DEFAULT_BATCHES))
    repeats: int = 5
    warmup: int = 2
    prefill_tokens: int = PREFILL_TOKENS
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    threads: int = THREADS
    bandwidth_bytes: int = BANDWIDTH_BYTES
    gemm_size: int = GEMM_SIZE
    extra_engines: dict[str, Path] = field(default_factory=dict)  # name -> an engine folder exported elsewhere
    llama_cpp: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (llama-bench, GGUF)
    llama_against: dict[str, str] = field(default_factory=dict)  # name -> our system run beside it (else nearest in bits)
    profile: bool = False  # per-op-type profile of each of our ONNX Runtime engines (profile.py)

    def check(self) -> None:
        """Raise an OptionError naming the first option out of range."""
        if self.repeats < 1:
            raise OptionError(f"--repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise OptionError(f"--warmup must be >= 0, got {self.warmup}")
        if self.prefill_tokens < 1:
            raise OptionError(f"--prefill-tokens must be >= 1, got {self.prefill_tokens}")
        if self.threads < 1:
            raise OptionError(f"--threads must be >= 1, got {self.threads}")
        if not self.contexts or min(self.contexts) < 1:
            raise OptionError("--contexts: every value must be >= 1")
        if not self.batches or min(self.batches) < 1:
            raise OptionError("--batch: every value must be >= 1")
        ours = [*(["ours"] if "ours" in self.systems else []), *self.extra_engines]
        for name, system in self.llama_against.items():
            if system not in ours:
                raise OptionError(f"--llama-cpp {name}=...@{system}: {system} is not one of our systems measured here "
                                  f"({', '.join(ours) or 'none'})")


def run_bench(checkpoint: Path | None, home: Path, options: BenchOptions, progress: Progress | None = None) -> dict:
    """Measure every system in `options.systems` on `checkpoint` (None: the bench config). Returns the report."""
    from dscompile.verify.eager import EagerEngine
    from dscompile.model.checkpoint import load_checkpoint
    from dscompile.runtime.ort_engine import OrtEngine

    options.check()
    report = progress or (lambda stage, done, total: None)
    torch.set_num_threads(options.threads)
    checkpoint = Path(checkpoint) if checkpoint is not None else bench_checkpoint(home, report)
    args = ModelArgs.from_json(checkpoint / "config.json")
    elt = 4  # float32: the dtype every system here runs in
    # the manifest's "quantization" of each --engine exported with --weights
    manifests = {name: json.loads((Path(folder) / "manifest.json").read_text())
                 for name, folder in options.extra_engines.items()}
    quantizations = {name: m["quantization"] for name, m in manifests.items() if m.get("quantization")}
    # engines exported with --native-kernels read the absorbed W_UK/W_UV in int8 (bench/floors.py)
    native = {name for name, m in manifests.items() if "HeadsMatMulQ8" in (m.get("native_ops") or {}).get("ops", [])}
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "model": args.to_config(), "dtype": "float32",
        "threads": options.threads, "repeats": options.repeats, "warmup": options.warmup,
        "prefill": {"tokens": options.prefill_tokens, "batch": 1},
        "contexts": options.contexts, "batches": options.batches,
        "systems": options.systems + list(options.extra_engines) + list(options.llama_cpp),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "results": [], "skipped": {}, "engines": {}, "context_scaling": {},
        "alternating": [], "load": {},
    }
    # the systems that wrap transformers, where it is installed (the `transformers` extra)
    wanted_hf = [n for n in HF_SYSTEMS if n in options.systems]
    hf, hf_missing = None, None
    if wanted_hf:
        from dscompile.bench import hf_systems as hf

        hf_missing = hf.missing()
        if hf_missing:
            hf = None
            result["skipped"].update(dict.fromkeys(wanted_hf, hf_missing))
    engines = {}
    todo = [s for s in options.systems if s in OUR_ENGINES]
    for i, name in enumerate(todo):  # exports first: they are slow and memory-hungry, not measured
        engines[name] = cached_export(checkpoint, home, OUR_ENGINES[name])
        result["engines"][name] = {"dir": str(engines[name]), "options": OUR_ENGINES[name]}
        report("export", i + 1, len(todo))

    probe = MachineProbe(options.bandwidth_bytes, options.gemm_size)
    bw0, gemm0 = probe.median(probe.bandwidth), probe.median(probe.gemm)
    total = len(result["systems"]) * (1 + len(options.contexts) * len(options.batches))
    done = 0

    def measure(system: System) -> None:
        """Time `system`'s prefill and each decode (batch, context), each run against its probe readings."""
        nonlocal done
        rows = []
        fn = system.prefill(1, options.prefill_tokens)
        if fn is not None:
            runs, readings = time_ms(fn, options.repeats, options.warmup, lambda: (probe.bandwidth(), probe.gemm()))
            rows.append(("prefill", 1, 0, runs, [b for b, _ in readings], [g for _, g in readings]))
        done += 1
        report("measure", done, total)
        for batch in options.batches:
            for context in options.contexts:
                fn = system.decode(batch, context)
                if fn is not None:
                    runs, readings = time_ms(fn, options.repeats, options.warmup, probe.bandwidth)
                    rows.append(("decode", batch, context, runs, readings, []))
                del fn
                done += 1
                report("measure", done, total)
        for phase, batch, context, runs, bandwidths, gemms in rows:
            result["results"].append({"system": system.name, "phase": phase, "batch": batch, "context": context,
                                      "ms": statistics.median(runs), "best_ms": min(runs),
                                      "runs_ms": [round(r, 3) for r in runs],
                                      "runs_bandwidth": [round(b) for b in bandwidths],
                                      "runs_gemm_flops": [round(g) for g in gemms]})
        scaling = context_scaling(system, min(options.contexts), max(options.contexts), options.repeats,
                                  options.warmup)
        if scaling is not None:
            result["context_scaling"][system.name] = scaling

    def load(name: str) -> System | None:
        """The system `name`, loaded in this process; None where it is skipped or has nothing to run."""
        if name == "eager":
            return EngineSystem(name, EagerEngine(load_checkpoint(checkpoint)), args)
        if name in OUR_ENGINES or name in options.extra_engines:
            folder = engines[name] if name in OUR_ENGINES else options.extra_engines[name]
            result["engines"].setdefault(name, {"dir": str(folder), "options": None})
            return EngineSystem(name, OrtEngine.load(folder, provider="cpu", threads=options.threads), args)
        if name == "hf":  # None: skipped, with the reason in result["skipped"]
            return hf.HFSystem(checkpoint, args) if hf is not None else None
        if name == "hf-onnx":  # the graph hf_onnx_export wrote, if any
            export = result.get("hf_onnx_export", {})
            if not export.get("file"):
                return None
            return hf.HFOnnxSystem(Path(export["file"]), args, export["with_cache"], options.threads,
                                   export["cache_dims"])
        raise AssertionError(name)

    def measure_load_of(name: str) -> None:
        """Load time and resident memory of `name` alone, in a fresh process (memory.py); for
        our engines beside the size of their weights file."""
        if name in OUR_ENGINES or name in options.extra_engines:
            folder = engines[name] if name in OUR_ENGINES else options.extra_engines[name]
            spec: tuple = ("ours", str(folder), options.threads)
        elif name == "hf-onnx":
            spec = ("hf-onnx", result["hf_onnx_export"]["file"], options.threads)
        else:
            spec = (name, str(checkpoint))
        entry: dict[str, Any] = {"loader": LOADERS[spec[0]][1]}
        try:
            entry.update(measure_load(spec))
            entry["rss_growth"] = entry["rss_after"] - entry["rss_before"]
            # What the process holds once it has run: weights an engine maps count when read (memory.py)
            entry["resident_growth"] = entry.get("pss_after_step", entry["pss_after"]) - entry["pss_before"]
        except LoadMeasureError as err:  # a finding of this run, not a reason to lose its other measurements
            entry["error"] = str(err)
        if spec[0] == "ours":
            weights = json.loads((Path(spec[1]) / "manifest.json").read_text())["weights"]
            # the file holds every graph's and program's tensors (the same bytes once), which can be more
            # than the parameters: both are shown
            entry["weights_bytes"], entry["parameter_bytes"] = weights["bytes"], weights.get("parameter_bytes")
            entry["growth_over_weights"] = (entry["resident_growth"] / weights["bytes"]
                                            if "resident_growth" in entry else None)
        result["load"][name] = entry

    for name in result["systems"]:
        if name == "hf-onnx" or name in options.llama_cpp:
            continue  # hf-onnx: measured right after "hf", whose loaded model it exports; llama.cpp: below
        system = load(name)
        if system is None:
            done += 1 + len(options.contexts) * len(options.batches)
            continue
        measure(system)
        if name == "hf":
            result["cache_hf_bytes_per_token"] = system.cache_bytes_per_token()
        system.close()
        del system
        gc.collect()
        measure_load_of(name)
        if name == "hf" and "hf-onnx" in options.systems:
            hf_export = result["hf_onnx_export"] = hf.hf_onnx_export(checkpoint, home)
            if hf_export["file"] is not None:
                hf_onnx = load("hf-onnx")
                measure(hf_onnx)
                hf_onnx.close()
                measure_load_of("hf-onnx")
                gaps = list(dict.fromkeys(hf_onnx.unmeasured))
                if not hf_export["with_cache"]:
                    gaps.insert(0, "decode: only the graph without a cache exported")
                if gaps:
                    result["skipped"]["hf-onnx"] = "; ".join(gaps)
            else:
                result["skipped"]["hf-onnx"] = (f"transformers' model did not export in any of "
                                                f"{len(hf_export['attempts'])} attempts (hf_onnx_export)")
            gc.collect()
    if "hf-onnx" in options.systems and "hf" not in options.systems and not hf_missing:
        result["skipped"]["hf-onnx"] = "measured only with the hf system (--systems must include hf)"

    # ours against each transformers system, run alternately (the targets' ratios); both loaded at once
    references = [n for n in HF_SYSTEMS if n in options.systems and "ours" in options.systems]
    configs = ([("prefill", 1, 0)] + [("decode", 1, p) for p in options.contexts]
               + [("decode", b, min(options.contexts)) for b in options.batches if b > 1])
    # ...and each engine given with --engine (e.g. quantized, or from another frontend) against ours
    extra = list(options.extra_engines) if "ours" in options.systems else []
    pairs = [(name, False) for name in references] + [(name, True) for name in extra]
    ours = None  # loaded once another system is
    for i, (name, ours_is_reference) in enumerate(pairs):
        other = load(name)  # None: skipped, or its model did not export (listed under "skipped")
        if other is not None:
            ours = ours or load("ours")
            first, second = (other, ours) if ours_is_reference else (ours, other)
            result["alternating"] += compare_alternately(first, second, configs, options.prefill_tokens,
                                                         options.repeats, options.warmup)
            other.close()
            del other, first, second
            gc.collect()
        report("compare", i + 1, len(pairs))
    if ours is not None:
        ours.close()
        del ours
        gc.collect()
    # llama.cpp's llama-bench, each round beside one run of the engine of ours nearest in bits per weight
    ours_bits = {n: 32.0 for n in ("ours",) if n in options.systems}
    ours_bits.update((n, float(q["bits_per_weight"])) for n, q in quantizations.items())
    every = step_weight_params(args, 1 << 20)  # every expert read
    parameters = sum(every.values()) - every["embeddings"] + args.vocab_size * args.hidden_size
    for i, (name, (binary, gguf)) in enumerate(options.llama_cpp.items()):
        against_name = against_for_llama(name, gguf, ours_bits, parameters, options.llama_against.get(name))
        against = load(against_name) if against_name else None
        rows, pairs, why = llama_bench_rows(name, binary, gguf, options, probe.bandwidth, against=against)
        if against is not None:
            against.close()
            del against
            gc.collect()
        result["results"] += rows
        result["alternating"] += pairs
        if why:
            result["skipped"][name] = why
        result["engines"][name] = {"llama_cpp": str(binary), "gguf": str(gguf), "bytes": gguf.stat().st_size,
                                   "against": against_name}
        report("llama.cpp", i + 1, len(options.llama_cpp))

    if options.profile:
        result["profile"] = profile_ours(checkpoint, args, engines, options, probe.bandwidth, report)

    bw1, gemm1 = probe.median(probe.bandwidth), probe.median(probe.gemm)
    paired = [b for r in result["results"] for b in r["runs_bandwidth"]]
    bandwidth = statistics.median(paired) if paired else max(bw0, bw1)
    paired_gemm = [g for r in result["results"] for g in r["runs_gemm_flops"]]
    gemm = statistics.median(paired_gemm) if paired_gemm else max(gemm0, gemm1)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["bandwidth"] = {"bytes_per_s": bandwidth, "start": bw0, "end": bw1, "tensor_bytes": options.bandwidth_bytes,
                           "paired_min": min(paired, default=None), "paired_max": max(paired, default=None)}
    result["gemm_flops"] = gemm
    result["gemm"] = {"flops": gemm, "start": gemm0, "end": gemm1, "size": options.gemm_size}
    from dscompile.exporter.manifest import cache_layout

    layout = cache_layout(args, torch.float32)
    result["cache"] = {"ours_bytes_per_token": layout["bytes_per_token"],
                       "mha_equivalent_bytes_per_token": layout["mha_equivalent_bytes_per_token"],
                       "transformers_bytes_per_token": result.pop("cache_hf_bytes_per_token", None)}
    hf_ms = {(r["phase"], r["batch"], r["context"]): r["ms"] for r in result["results"] if r["system"] == "hf"}
    hfo_ms = {(r["phase"], r["batch"], r["context"]): r["ms"] for r in result["results"] if r["system"] == "hf-onnx"}

    def floor(r: dict, bandwidth: float, flops: float) -> dict:
        bpw, head = quantized_bits.get(r["system"]), head_bits.get(r["system"])
        if r["phase"] == "decode":
            return decode_floor(args, r["batch"], r["context"], elt, bandwidth, bpw, head,
                                NATIVE_ABSORBED_BYTES if r["system"] in native else 4.0)
        return prefill_floor(args, r["batch"], options.prefill_tokens, elt, bandwidth, flops, bpw, head)

    quantized_bits = {}  # system -> bits per weight, for engines exported with --weights
    for name, (_, gguf) in options.llama_cpp.items():  # its average over every tensor, float parts included
        quantized_bits[name] = 8 * gguf.stat().st_size / parameters
    head_bits = {}  # system -> lm_head's bits per weight where the engine keeps it wider (model/quant.py)
    for name, quant in quantizations.items():
        quantized_bits[name] = float(quant["bits_per_weight"])
        head_bits[name] = float(quant["bits_per_weight"]) - quant["bits"] + quant.get("lm_head_bits", quant["bits"])
        result["engines"].setdefault(name, {"dir": str(options.extra_engines[name])})["quantization"] = quant["scheme"]

    for r in result["results"]:
        r["bandwidth"] = statistics.median(r["runs_bandwidth"])
        r["gemm_flops"] = statistics.median(r["runs_gemm_flops"]) if r["runs_gemm_flops"] else None
        at_median = floor(r, r["bandwidth"], r["gemm_flops"] or gemm)
        r["floor_bytes"], r["floor_ms"] = at_median["bytes"], at_median["ms"]
        # each run against the machine as read just before it, then the median over runs
        flops = r["runs_gemm_flops"] or [gemm] * len(r["runs_ms"])
        r["floor_fraction"] = statistics.median(floor(r, b, f)["ms"] / t for b, f, t in
                                                zip(r["runs_bandwidth"], flops, r["runs_ms"]))
        key = (r["phase"], r["batch"], r["context"])
        r["speedup_vs_hf"] = hf_ms[key] / r["ms"] if key in hf_ms else None
        r["speedup_vs_hf_onnx"] = hfo_ms[key] / r["ms"] if key in hfo_ms else None
    result["floors"] = {
        "decode": [{"batch": b, "context": p, **decode_floor(args, b, p, elt, bandwidth)}
                   for b in options.batches for p in options.contexts],
        "prefill": prefill_floor(args, 1, options.prefill_tokens, elt, bandwidth, gemm),
        "step_weight_params_batch1": step_weight_params(args, 1),
    }
    result["targets"] = targets(result)
    return result


def profile_ours(checkpoint: Path, args: ModelArgs, engines: dict[str, Path], options: BenchOptions,
                 bandwidth, report: Progress) -> dict[str, dict]:
    """ONNX Runtime's per-op-type profile (profile.py) of each of our engines: prefill and decode at the
    shortest and longest context, batch 1."""
    from dscompile.bench.floors import experts_read
    from dscompile.bench.profile import profile_engine
    from dscompile.runtime.contract import DECODE_IN_PLACE
    from dscompile.runtime.ort_sessions import session_graphs

    folders = {**{n: f for n, f in engines.items()}, **options.extra_engines}
    out: dict[str, dict] = {}
    cases = [("prefill", 0)] + [("decode", c) for c in sorted({min(options.contexts), max(options.contexts)})]
    for i, (name, folder) in enumerate(folders.items()):
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
        plan = session_graphs(manifest, "CPUExecutionProvider")  # the files the engine's steps run
        graph = Path(folder) / plan.get(DECODE_IN_PLACE, plan.get("decode"))
        out[name] = {}
        for phase, context in cases:
            tokens = options.prefill_tokens if phase == "prefill" else 1
            what = Path(folder) / plan["prefill"] if phase == "prefill" else graph

            def step(engine, phase=phase, context=context, tokens=tokens):
                system = EngineSystem(name, engine, args)
                return system.prefill(1, tokens) if phase == "prefill" else system.decode(1, context)

            key = "prefill" if phase == "prefill" else f"decode P={context}"
            out[name][key] = profile_engine(Path(folder), options.threads, step, what, tokens,
                                            experts_read(args, tokens), args.n_routed_experts, bandwidth,
                                            steps=options.repeats, warmup=max(1, options.warmup))
        report("profile", i + 1, len(folders))
    return out
