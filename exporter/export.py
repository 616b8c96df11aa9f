"""The export job: checkpoint -> OUT (two ONNX graphs, one weight file, the manifest, the programs).

    load_checkpoint(meta) -> capture -> run_pipeline per graph -> lower both
    -> OUT/prefill.onnx, OUT/decode.onnx, OUT/weights.bin (shared), OUT/prefill.pt2,
       OUT/decode.pt2 (optimized ExportedPrograms, for the torch engine), OUT/manifest.json,
       OUT/decode_inplace.onnx (decode writing the cache in place, run by ONNX Runtime on CPU;
       not in exports lowered for TensorRT), and the checkpoint's tokenizer files when it has them

Graph-only (`ExportOptions(graphs_only=True)`): the model is built from the config alone on the meta device (a
config.json, or the folder that holds it, is enough: no weights are read), and only the graphs and
the manifest are written. The graphs name their places in weights.bin as a full export would
(planned by lowering.weights.plan_places), but no weight is computed and neither weights.bin nor
the programs are written; the manifest says `"graphs_only": true` and engines refuse the folder.
It is how a full-size config's lowering is inspected and measured (benchmarks/capture_full.py).

Streaming. The model is loaded on the meta device: capture, passes and lowering see shapes only,
and each weight carries how to read it (model.checkpoint.CheckpointSource) or compute it from
others (passes.ep_edit.derive: the absorbed MLA matrices, folded layouts). Weights are read,
converted and written one tensor at a time into weights.bin, so peak memory follows the largest
weight (a layer's stacked experts), not the model. The programs are saved without weights: their
weights are in weights.bin too (deduplicated against the graphs'), placed by the manifest's
`graphs.<phase>.program_weights`. `verify` is the exception: checking the passes numerically
runs the model, so it loads a float32 copy in memory (verify/export_checks.py).

The options (exporter/options.py) are checked before anything is read; the manifest's entries are
built by exporter/manifest.py.

Atomic output (exporter/output.py `staged`): everything is written into a temp folder beside OUT that
replaces OUT at the end, so a failed or killed export never leaves a half-written OUT; with
`force` an existing OUT is swapped with the new one. Write failures (disk full, file size limit,
read-only folder) are one OutputError line; nothing is left behind.

Two exports of the same checkpoint with the same options are byte-identical (no timings or
paths in the files).

Shape legend: B batch, S new tokens, P past tokens, H heads, N/R/V nope/rope/value head dims,
C kv_lora_rank, L layers.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Callable

import onnx_ir.passes.common as ir_passes
import torch

from dscompile.capture import capture, contract_dims
from dscompile.capture.frontends.transformers import capture_transformers, load_transformers_model
from dscompile.dtypes import DTYPES
from dscompile.errors import CheckpointError, OptionError
from dscompile.exporter.manifest import (file_hashes, graph_entry, in_place_entry, manifest_head, parameter_bytes,
                                         pass_report, quantization_report, sharding_report)
from dscompile.exporter.calibration import calibrate, save_importance
from dscompile.exporter.options import ExportOptions
from dscompile.exporter.output import Stage, staged
from dscompile.lowering import fuse_attention, fuse_query_key
from dscompile.lowering.graph import check_model, lower
from dscompile.lowering.in_place import in_place_decode
from dscompile.lowering.logits import add_logits_from
from dscompile.lowering.native_f32 import native_float32
from dscompile.lowering.ops import choose_moe_experts
from dscompile.lowering.quantize import GraphQuantizer
from dscompile.lowering.weights import save_models
from dscompile.model.args import ModelArgs
from dscompile.model.checkpoint import apply_quantization, build_model, load_checkpoint
from dscompile.passes import SHARDING, PassOptions, run_pipeline
from dscompile.passes.shard import Sharded, check_plan
from dscompile.runtime.contract import PHASES
from dscompile.runtime.manifest import write_manifest
from dscompile.runtime.native import DOMAIN as NATIVE_DOMAIN
from dscompile.runtime.native import OPS as NATIVE_OPS
from dscompile.runtime.text import copy_tokenizer
from dscompile.runtime.weights import fingerprint
from dscompile.verify.export_checks import finished_engine, passes_in_float32

WEIGHTS_FILE = "weights.bin"
RANK_WEIGHTS_FILE = "weights-rank{rank}.bin"  # a sharded export's: rank r's slices and the replicated weights
IN_PLACE_FILE = "decode_inplace.onnx"  # the decode graph writing its cache in place (lowering.in_place.in_place_decode)
RUNTIME = "onnxruntime"  # what runs the graphs of every export (TensorRT builds its engines from them)
STAGES = ("load", "capture", "passes", "shard", "lower", "write")
Progress = Callable[[str, int, int], None]


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, options: ExportOptions = ExportOptions(), *,
                      progress: Progress | None = None) -> dict[str, Any]:
    """Compile a checkpoint into OUT with `options`; returns the manifest written there.

    `tp` x `ep` > 1 writes a sharded engine instead (passes/shard.py): one program per phase that
    every rank runs, one weights file per rank, for the torch backend on torch.distributed
    (runtime/sharded.py); no ONNX graphs.

    `frontend` is the PyTorch code that is captured: "dscompile" our reference model
    (model/transformer.py), "transformers" transformers' own DeepseekV2/V3ForCausalLM
    (capture/frontends/transformers.py). The passes and the lowering are the same.

    `weights` "int8" / "int4" stores every linear layer's weight and the routed experts as
    block-wise integers (`block_size` values per scale) run by ONNX Runtime's MatMulNBits
    and QMoE (lowering/quantize.py); activations stay float32. A quantized export has no torch
    programs (their weights would be a float copy): it runs on ONNX Runtime's CPU provider, or with
    `device="cuda"` and a float16/bfloat16 `dtype` on its CUDA provider (activations and scales in
    that dtype).
    `accuracy_level` overrides the kernels' measured setting (lowering/quantize.py ACCURACY_LEVELS);
    0 keeps activations in float32.

    `graphs_only` writes the graphs and the manifest, not the weights (module docstring);
    `checkpoint` may then be a config.json or a folder holding one.

    `target="tensorrt"` lowers with standard ONNX ops only (no com.microsoft contrib ops), so
    the graphs also feed TensorRT's ONNX parser; ONNX Runtime runs either. The TensorRT engines
    themselves are built from OUT by `dscompile.export` (lowering/tensorrt/build.py).
    """
    if options.plan.world > 1:
        check_plan(ModelArgs.from_json(config_file(checkpoint)), options.plan)
    out = Path(out_dir)
    if out.name in ("", ".", ".."):  # the temp folder is named after OUT and goes beside it
        out = Path(os.path.abspath(out))
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not options.force:
        raise OptionError(f"{out}: exists and is not empty (pass --force to replace it)")
    with staged(out) as stage:
        return _export(checkpoint, stage, options, progress or (lambda *_: None))


def _export(checkpoint, stage: Stage, options: ExportOptions, report: Progress) -> dict[str, Any]:
    """export_checkpoint's body: load, capture, passes, then the writer of a sharded or a single-device OUT."""
    torch_dtype = DTYPES[options.dtype]
    scheme, limits = options.scheme, options.limits
    quant_errors: dict[str, dict[str, float]] = {}
    calibration = None  # (importance, manifest entry) with options.calibration
    load_progress = lambda done, total: report("load", done, total)  # noqa: E731
    if options.graphs_only:
        model = build_model(ModelArgs.from_json(config_file(checkpoint)), torch_dtype, "meta")
        if scheme is not None:
            apply_quantization(model, scheme)
        args = model.args
        report("load", 1, 1)
    elif options.frontend == "transformers":
        model, args = load_transformers_model(checkpoint, torch_dtype, "meta", scan=True, progress=load_progress,
                                              allow_nonfinite=options.allow_nonfinite)
    else:
        if options.calibration is not None:
            calibration = calibrate(checkpoint, options.calibration, options.allow_nonfinite, report)
        model = load_checkpoint(checkpoint, dtype=torch_dtype, device="meta", scan=True, progress=load_progress,
                                allow_nonfinite=options.allow_nonfinite, quantize=scheme, quant_errors=quant_errors,
                                importance=calibration[0] if calibration else None)
        args = model.args
    # a corrupt tokenizer stops the export early
    tokenizer = copy_tokenizer(config_file(checkpoint), stage.folder, args.vocab_size)
    # Both graphs trace the same function with the same dynamic dims, so one capture serves
    # both; the passes then specialize each (they never edit the program they are given).
    traced = capture_transformers(model, args, limits) if options.frontend == "transformers" else capture(model, limits)
    report("capture", 1, 1)
    del model
    verified = None
    if options.verify:
        verified = passes_in_float32(checkpoint, limits, lambda program, phase, a: run_pipeline(
                                         program, _pass_options(phase, a, options), verify=True)[1],
                                     frontend=options.frontend, scheme=scheme, allow_nonfinite=options.allow_nonfinite)
    programs, reports = {}, {}
    for i, phase in enumerate(PHASES):
        programs[phase], reports[phase] = run_pipeline(traced, _pass_options(phase, args, options))
        if verified is not None:
            for result, checked in zip(reports[phase].results, verified[phase].results):
                result.max_error, result.details["verified_in"] = checked.max_error, "float32"
        report("passes", i + 1, len(PHASES))
    if options.plan.world > 1:
        return _write_sharded(stage, programs, reports, args, options, tokenizer, report)
    return _write(checkpoint, stage, programs, reports, args, options, tokenizer, quant_errors, report, calibration)


def _pass_options(phase: str, args, options: ExportOptions) -> PassOptions:
    return PassOptions(phase, args, absorb=options.absorb, fuse_moe=options.fuse_moe, tp_size=options.plan.tp_size,
                       ep_size=options.plan.ep_size, dynamic_shapes=contract_dims(args, options.limits))


def _write(checkpoint, stage: Stage, programs, reports, args, options: ExportOptions, tokenizer,
           quant_errors: dict[str, dict[str, float]], report: Progress, calibration=None) -> dict[str, Any]:
    """The single-device OUT: both graphs lowered (quantized with `weights`), weights.bin, the
    programs, the in-place decode graph (ONNX Runtime on CPU; any number of new tokens where quantized), the calibration's
    importance (exporter/calibration.py) and the manifest."""
    scheme, graphs_only, dtype = options.scheme, options.graphs_only, options.dtype
    quantizer = GraphQuantizer(scheme, provider=options.device, accuracy_level=options.accuracy_level,
                               dtype=DTYPES[dtype], native=options.native_kernels) if scheme is not None else None
    lowered, lowerings, quantized = {}, {}, {}
    for i, phase in enumerate(PHASES):
        lowerings[phase] = choose_moe_experts(phase, DTYPES[dtype], options.target, options.device)
        lowered[phase] = lower(programs[phase], phase, args.num_hidden_layers, opset=options.opset,
                               moe_experts=lowerings[phase])
        if quantizer is not None:
            quantized[phase] = quantizer(lowered[phase])
            ir_passes.RemoveUnusedNodesPass()(lowered[phase])
        elif options.native_kernels and phase == "decode":  # float32: decode reads weights once (native_f32)
            quantized[phase] = native_float32(lowered[phase])
        if options.native_kernels and phase == "decode":  # the attention over the cache: one native op a layer
            quantized[phase][fuse_attention.OP] = fuse_attention.run(lowered[phase])
            quantized[phase].update(fuse_query_key.run(lowered[phase]))  # and its inputs: two native ops a layer
        # logits_from: an input ONNX Runtime may leave unfed (an initializer of its name). On CPU only for
        # now: how ONNX Runtime's TensorRT provider profiles such an input is not checked without a GPU.
        if options.target == "onnxruntime" and options.device == "cpu":
            add_logits_from(lowered[phase])
        report("lower", i + 1, len(PHASES))

    with stage.writing(f"{WEIGHTS_FILE} or a graph") as tmp:
        # A quantized export has no programs: their float weights would double the file.
        has_programs = not graphs_only and scheme is None
        extra = {phase: program_weights(programs[phase]) for phase in PHASES} if has_programs else None
        stored = save_models(lowered, tmp, WEIGHTS_FILE, progress=lambda d, t: report("write", d, t + 3),
                             extra=extra, write_data=not graphs_only)
        graphs = {}
        for phase in PHASES:
            check_model(tmp / stored[phase]["file"], with_data=not graphs_only)
            graphs[phase] = graph_entry(stored[phase]["file"], lowered[phase], reports[phase],
                                        lowerings[phase] if args.num_moe_layers else None)
            if scheme is not None:
                graphs[phase]["quantized_ops"] = quantized[phase]
            elif phase in quantized:
                graphs[phase]["native_ops"] = quantized[phase]
            if has_programs:
                stage.what = f"{phase}.pt2"
                _save_program(programs[phase], tmp / stage.what)
                graphs[phase].update(program=stage.what, program_weights=stored["extra"][phase])
        # TensorRT builds from the contract graphs (its parser takes 4D TensorScatter only). The in-place
        # graph serves ONNX Runtime's CPU provider only: an export for CUDA has none. A quantized engine
        # runs every step in one session (runtime/ort_engine.py), so its in-place graph takes any S.
        if options.target == "onnxruntime" and options.device == "cpu":
            stage.what = IN_PLACE_FILE
            in_place = in_place_decode(tmp / graphs["decode"]["file"], tmp / IN_PLACE_FILE,
                                       any_new_tokens=scheme is not None)
            check_model(tmp / IN_PLACE_FILE, with_data=not graphs_only)
            graphs["decode"]["in_place"] = in_place_entry(IN_PLACE_FILE, in_place, any_new_tokens=scheme is not None)
        if calibration is not None:
            stage.what = calibration[1]["file"]
            save_importance(calibration[0], tmp)
        report("write", len(stored) + 1, len(stored) + 3)
        manifest = {
            **manifest_head(RUNTIME, options.target, options.frontend, dtype, args, options.limits),
            "device": options.device,
            "opset": options.opset,
            "weights": {**stored["weights"],
                        "parameter_bytes": parameter_bytes(programs["prefill"]),
                        "note": "bytes of the shared external data file; tensors below 1 KiB stay inside the .onnx; "
                                "second_layouts and computed list what it holds beyond one copy of each weight"},
            "graphs": graphs,
            "tokenizer": tokenizer,
            "files": file_hashes(tmp),
        }
        if scheme is not None:
            manifest["quantization"] = quantization_report(scheme, lowered, quant_errors, graphs_only, options.device)
            if calibration is not None:
                manifest["quantization"]["calibration"] = calibration[1]
        if options.native_kernels:  # every session opening these graphs registers runtime/native's library first
            manifest["native_ops"] = {"domain": NATIVE_DOMAIN, "ops": sorted(
                {op for counts in quantized.values() for op, n in counts.items() if n and op in NATIVE_OPS})}
        if not graphs_only:
            manifest["weights"]["fingerprint"] = fingerprint(tmp / WEIGHTS_FILE)
        else:
            manifest["graphs_only"] = True
            manifest["weights"]["note"] = (f"graph-only export: {WEIGHTS_FILE} was not written; bytes is its "
                                           "planned size, one place per weight the graphs reference (equal "
                                           "contents not merged)")
        stage.what = "manifest.json"
        write_manifest(tmp, manifest)
        if options.verify and scheme is not None and options.device == "cuda":
            manifest["quantization"]["verified"] = {
                "passed": None, "skipped": "the engine runs on ONNX Runtime's CUDA provider only: check it on a GPU "
                                           "with `dscompile compare --provider cuda` (benchmarks/gpu_check.py)"}
            write_manifest(tmp, manifest)
        elif options.verify and scheme is not None:  # the quantized lowering, run, against eager with the same weights
            manifest["quantization"]["verified"] = finished_engine(checkpoint, tmp, manifest, scheme,
                                                                   options.allow_nonfinite)
            write_manifest(tmp, manifest)
        elif options.verify and options.native_kernels:  # float32 on dscompile's kernels, run, against eager
            manifest["native_ops"]["verified"] = finished_engine(checkpoint, tmp, manifest, None,
                                                                 options.allow_nonfinite)
            write_manifest(tmp, manifest)
        if not graphs_only:  # engines map the file: read-only makes writing into it under one deliberate
            os.chmod(tmp / WEIGHTS_FILE, 0o444)
        report("write", len(stored) + 3, len(stored) + 3)
    return manifest


def _write_sharded(stage: Stage, programs, reports, args, options: ExportOptions, tokenizer,
                   report: Progress) -> dict[str, Any]:
    """The sharded OUT: {phase}.pt2 (one program every rank runs) and weights-rank{r}.bin per rank (not
    with `graphs_only`: the programs and the plan's numbers only, for `inspect --plan`)."""
    plan, graphs_only = options.plan, options.graphs_only
    sharded = {}
    for i, phase in enumerate(PHASES):
        program, sharding = run_pipeline(programs[phase], _pass_options(phase, args, options), passes=SHARDING)
        reports[phase].results += sharding.results  # the manifest lists the sharding pass with the others
        sharded[phase] = Sharded(program, plan)
        report("shard", i + 1, len(PHASES))
    with stage.writing("a rank's weights file") as tmp:
        ranks = []
        for r in range(plan.world if not graphs_only else 0):
            name = stage.what = RANK_WEIGHTS_FILE.format(rank=r)
            stored = save_models({}, tmp, name, extra={phase: sharded[phase].rank_weights(r) for phase in PHASES},
                                 progress=lambda d, t, r=r: report("write", r * 2 + 1, plan.world * 2 + 1))
            os.chmod(tmp / name, 0o444)
            ranks.append({"rank": r, "weights": {**stored["weights"], "fingerprint": fingerprint(tmp / name)},
                          "program_weights": stored["extra"]})
        graphs = {}
        for phase in PHASES:
            stage.what = f"{phase}.pt2"
            _save_program(sharded[phase].program, tmp / stage.what)
            graphs[phase] = {"program": stage.what, "passes": pass_report(reports[phase]),
                             "collectives": sharded[phase].collectives}
        manifest = {
            **manifest_head("torch", "torch.distributed", options.frontend, options.dtype, args, options.limits),
            "weights": {"file": None, "parameter_bytes": parameter_bytes(programs["prefill"]),
                        "note": "a sharded engine has one weights file per rank: sharding.ranks[r].weights"},
            "graphs": graphs,
            "sharding": {**plan.to_dict(), **sharding_report(sharded, plan, args, DTYPES[options.dtype]),
                         "ranks": ranks},
            "tokenizer": tokenizer,
        }
        if graphs_only:
            manifest["graphs_only"] = True
            manifest["sharding"]["ranks"] = [{"rank": r, "weights": None} for r in range(plan.world)]
            manifest["weights"]["note"] = "graph-only sharded export: no rank's weights file was written"
        manifest["files"] = file_hashes(tmp)
        stage.what = "manifest.json"
        write_manifest(tmp, manifest)
        report("write", plan.world * 2 + 1, plan.world * 2 + 1)
    return manifest


def config_file(source: str | Path) -> Path:
    """The config.json a graph-only export builds its model from: `source` itself or the one in that folder."""
    path = Path(source)
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise CheckpointError(f"{path}: {'config.json not found' if path.is_dir() else 'not found'}")
    return config


def program_weights(program) -> dict[str, torch.Tensor]:
    """A program's weights and tensor constants by name: what its `.pt2` is saved without."""
    return {**program.state_dict, **{k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)}}


def _save_program(program, path: Path) -> None:
    """torch.export.save through a file object that never raises into torch's zip writer.

    Given a path, torch's C++ writer meets a full disk by throwing from its destructor, which
    aborts the whole process (SIGABRT, a C++ backtrace, the temp folder left behind). So torch
    writes into `_DeferredErrorFile`, which keeps the first OSError and reports every write as
    done; the error is raised here, in Python, once torch has finished.
    """
    with open(path, "wb") as raw:
        f = _DeferredErrorFile(raw)
        torch.export.save(program, f)
        if f.error is not None:
            raise f.error
    if f.error is not None:  # pragma: no cover - raised above; keeps the close error from hiding it
        raise f.error


class _DeferredErrorFile(io.RawIOBase):
    """A binary file for torch's writer: the first OSError is kept in `.error`, later writes are dropped."""

    def __init__(self, raw):
        super().__init__()
        self.raw, self.error = raw, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.raw.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.raw.write(data)
            except OSError as err:
                self.error = err
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.raw.flush()
            except OSError as err:
                self.error = err
