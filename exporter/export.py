"""The export job: checkpoint -> OUT (two ONNX graphs, one weight file, the manifest, the programs).

    load_checkpoint(meta) -> capture -> run_pipeline per graph -> lower both
    -> OUT/prefill.onnx, OUT/decode.onnx, OUT/weights.bin (shared), OUT/prefill.pt2,
       OUT/decode.pt2 (optimized ExportedPrograms, for the torch engine), OUT/manifest.json,
       OUT/decode_inplace.onnx (decode writing the cache in place, run by ONNX Runtime on CPU;
       not in exports lowered for TensorRT), and the checkpoint's tokenizer files when it has them

Graph-only (`graphs_only=True`): the model is built from the config alone on the meta device (a
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
runs the model, so it loads a float32 copy in memory.

Atomic output (exporter/output.py): everything is written into a temp folder beside OUT that
replaces OUT at the end, so a failed or killed export never leaves a half-written OUT; with
`force` an existing OUT is swapped with the new one. Write failures (disk full, file size limit,
read-only folder) are one OutputError line; nothing is left behind.

Two exports of the same checkpoint with the same options are byte-identical (no timings or
paths in the files).

Shape legend: B batch, S new tokens, P past tokens, H heads, N/R/V nope/rope/value head dims,
C kv_lora_rank, L layers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
import torch

from dscompile.capture import PHASES, Limits, capture, contract_dims
from dscompile.lowering import LoweringError
from dscompile.lowering.graph import check_model, lower
from dscompile.lowering.in_place import in_place_decode
from dscompile.lowering.weights import save_models
from dscompile.lowering.ops import choose_moe_experts
from dscompile.lowering.quantize import GraphQuantizer, quantizes_activations
from dscompile.exporter.output import OutputError, make_temp_folder, reason, remove, replace, sync_folder
from dscompile.capture.frontends import FRONTENDS
from dscompile.capture.frontends.transformers import capture_transformers, load_transformers_model, transformers_version
from dscompile.model.args import ModelArgs
from dscompile.model.checkpoint import apply_quantization, build_model, load_checkpoint
from dscompile.model.quant import BLOCK_SIZES, Scheme
from dscompile.passes import PassOptions, run_pipeline
from dscompile.passes.shard import Plan, check_plan, shard
from dscompile.passes.absorb_mla import FORMS as ABSORB_FORMS
from dscompile.runtime.engine import DTYPES
from dscompile.errors import CheckpointError, OptionError, TextError
from dscompile.runtime.manifest import MANIFEST_FORMAT, WRITE_INDEX, write_manifest
from dscompile.runtime.text import TOKENIZER_FILES, Tokenizer
from dscompile.runtime.weights import fingerprint




WEIGHTS_FILE = "weights.bin"
RANK_WEIGHTS_FILE = "weights-rank{rank}.bin"  # a sharded export's: rank r's slices and the replicated weights


IN_PLACE_FILE = "decode_inplace.onnx"  # the decode graph writing its cache in place (lowering.in_place.in_place_decode)


RUNTIME = "onnxruntime"  # what runs the graphs of every export (TensorRT builds its engines from them)


TARGETS = ("onnxruntime", "tensorrt")  # what the lowering is restricted for


Progress = Callable[[str, int, int], None]


WEIGHT_FORMATS = {"int8": 8, "int4": 4}  # --weights: block-wise weight-only quantization (model/quant.py)


STAGES = ("load", "capture", "passes", "shard", "lower", "write")


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    absorb: str = "auto",
    fuse_moe: bool = True,
    verify: bool = False,
    opset: int = 23,
    limits: Limits = Limits(),
    force: bool = False,
    progress: Progress | None = None,
    allow_nonfinite: bool = False,
    target: str = "onnxruntime",
    graphs_only: bool = False,
    weights: str | None = None,
    block_size: int = 32,
    accuracy_level: int | None = None,
    frontend: str = "dscompile",
    tp: int = 1,
    ep: int = 1,
) -> dict[str, Any]:
    """Compile a checkpoint into OUT for ONNX Runtime; returns the manifest written there.

    `tp` x `ep` > 1 writes a sharded engine instead (passes/shard.py): one program per phase that
    every rank runs, one weights file per rank, for the torch backend on torch.distributed
    (runtime/sharded.py); no ONNX graphs.

    `frontend` is the PyTorch code that is captured: "dscompile" our reference model
    (model/transformer.py), "transformers" transformers' own DeepseekV2/V3ForCausalLM
    (capture/frontends/transformers.py). The passes and the lowering are the same.

    `weights` "int8" / "int4" stores every linear layer's weight and the routed experts as
    block-wise integers (`block_size` values per float32 scale) run by ONNX Runtime's MatMulNBits
    and QMoE (lowering/quantize.py); activations stay float32. A quantized export has no torch
    programs (their weights would be a float copy): it runs on ONNX Runtime's CPU provider.
    `accuracy_level` overrides the kernels' measured setting (lowering/quantize.py ACCURACY_LEVELS);
    0 keeps activations in float32.

    `graphs_only` writes the graphs and the manifest, not the weights (module docstring);
    `checkpoint` may then be a config.json or a folder holding one.

    `target="tensorrt"` lowers with standard ONNX ops only (no com.microsoft contrib ops), so
    the graphs also feed TensorRT's ONNX parser; ONNX Runtime runs either.

    `allow_nonfinite` exports a
    checkpoint with NaN/Inf weights (with a warning) instead of refusing it.
    """
    if dtype not in DTYPES:
        raise OptionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if absorb not in ABSORB_FORMS:  # checked here too, so a typo fails before the model is loaded
        raise OptionError(f"--absorb {absorb!r} is not one of {', '.join(ABSORB_FORMS)}")
    if target not in TARGETS:
        raise OptionError(f"--target {target!r} is not one of {', '.join(TARGETS)}")
    if opset < 23:
        raise OptionError(f"--opset {opset} is too old: the lowering needs opset >= 23 (RMSNormalization, Attention)")
    scheme = quant_scheme(weights, block_size, dtype, target)
    check_frontend(frontend, graphs_only=graphs_only, scheme=scheme)
    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        raise OptionError(f"accuracy level {accuracy_level} is not one of 0-4")
    if graphs_only and verify:
        raise OptionError("--graphs-only and --verify: verifying the passes runs the model on its weights, "
                          "which a graph-only export does not read")
    plan = Plan(tp, ep)
    if plan.world > 1:
        check_sharding(plan, graphs_only=graphs_only, scheme=scheme, target=target, frontend=frontend)
        check_plan(ModelArgs.from_json(config_file(checkpoint)), plan)
    out = Path(out_dir)
    if out.name in ("", ".", ".."):  # the temp folder is named after OUT and goes beside it
        out = Path(os.path.abspath(out))
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OptionError(f"{out}: exists and is not empty (pass --force to replace it)")
    tmp = make_temp_folder(out)
    try:
        return _export(checkpoint, out, tmp, dtype=dtype, absorb=absorb, fuse_moe=fuse_moe, verify=verify,
                       opset=opset, limits=limits, progress=progress, allow_nonfinite=allow_nonfinite,
                       target=target, graphs_only=graphs_only, scheme=scheme, accuracy_level=accuracy_level,
                       frontend=frontend, plan=plan)
    finally:
        remove(tmp)  # after a success it is gone already (or holds the replaced OUT)


def _export(checkpoint, out: Path, tmp: Path, *, dtype: str, absorb: str, fuse_moe: bool, verify: bool,
            opset: int, limits: Limits, progress: Progress | None,
            allow_nonfinite: bool, target: str, graphs_only: bool, scheme: Scheme | None,
            accuracy_level: int | None = None, frontend: str = "dscompile", plan: Plan = Plan()) -> dict[str, Any]:
    """export_checkpoint's body: everything is written into `tmp`, which replaces `out` at the end."""
    report = progress or (lambda stage, done, total: None)
    torch_dtype = DTYPES[dtype]
    quant_errors: dict[str, dict[str, float]] = {}

    if graphs_only:
        model = build_model(ModelArgs.from_json(config_file(checkpoint)), torch_dtype, "meta")
        if scheme is not None:
            apply_quantization(model, scheme)
        args = model.args
        report("load", 1, 1)
    elif frontend == "transformers":
        model, args = load_transformers_model(checkpoint, torch_dtype, "meta", scan=True,
                                              progress=lambda d, t: report("load", d, t),
                                              allow_nonfinite=allow_nonfinite)
    else:
        model = load_checkpoint(checkpoint, dtype=torch_dtype, device="meta", scan=True,
                                progress=lambda d, t: report("load", d, t), allow_nonfinite=allow_nonfinite,
                                quantize=scheme, quant_errors=quant_errors)
        args = model.args
    tokenizer = copy_tokenizer(checkpoint, tmp, args.vocab_size)  # a corrupt file stops the export early
    programs, reports, lowered, lowerings = {}, {}, {}, {}
    # Both graphs trace the same function with the same dynamic dims, so one capture serves
    # both; the passes then specialize each (they never edit the program they are given).
    traced = capture_transformers(model, args, limits) if frontend == "transformers" else capture(model, limits)
    report("capture", 1, 1)
    del model
    verified = _verify_in_float32(checkpoint, limits, absorb, fuse_moe, allow_nonfinite,
                                  scheme, frontend) if verify else None
    quantizer = GraphQuantizer(scheme, accuracy_level=accuracy_level) if scheme is not None else None
    quantized: dict[str, dict[str, int]] = {}
    for i, phase in enumerate(PHASES):
        options = PassOptions(phase, args, absorb=absorb, fuse_moe=fuse_moe)
        programs[phase], reports[phase] = run_pipeline(traced, options)
        if verified is not None:
            for result, checked in zip(reports[phase].results, verified[phase].results):
                result.max_error, result.details["verified_in"] = checked.max_error, "float32"
        report("passes", i + 1, len(PHASES))
    if plan.world > 1:
        return _write_sharded(checkpoint, out, tmp, programs, reports, args, plan, dtype=dtype, limits=limits,
                              frontend=frontend, tokenizer=tokenizer, report=report, graphs_only=graphs_only)
    for i, phase in enumerate(PHASES):
        lowerings[phase] = choose_moe_experts(phase, torch_dtype, target)
        lowered[phase] = lower(programs[phase], phase, args.num_hidden_layers, opset=opset,
                               moe_experts=lowerings[phase])
        if quantizer is not None:
            quantized[phase] = quantizer(lowered[phase])
            ir_passes.RemoveUnusedNodesPass()(lowered[phase])
        report("lower", i + 1, len(PHASES))

    writing = f"{WEIGHTS_FILE} or a graph"  # what an OSError without a file name was writing
    try:
        # A quantized export has no programs: their float weights would double the file.
        has_programs = not graphs_only and scheme is None
        extra = {phase: program_weights(programs[phase]) for phase in PHASES} if has_programs else None
        stored = save_models(lowered, tmp, WEIGHTS_FILE, progress=lambda d, t: report("write", d, t + 3),
                             extra=extra, write_data=not graphs_only)
        graphs = {}
        for phase in PHASES:
            check_model(tmp / stored[phase]["file"], with_data=not graphs_only)
            graphs[phase] = {
                "file": stored[phase]["file"],
                "inputs": [_io(v) for v in lowered[phase].graph.inputs],
                "outputs": [_io(v) for v in lowered[phase].graph.outputs],
                "passes": _passes(reports[phase]),
                "moe_lowering": lowerings[phase] if args.num_moe_layers else None,
                "op_counts": _op_counts(lowered[phase]),
            }
            if scheme is not None:
                graphs[phase]["quantized_ops"] = quantized[phase]
            if has_programs:
                writing = f"{phase}.pt2"
                _save_program(programs[phase], tmp / writing)
                graphs[phase].update(program=f"{phase}.pt2", program_weights=stored["extra"][phase])
        # TensorRT builds from the contract graphs (its parser takes 4D TensorScatter only); a quantized
        # engine runs every step in one session of the contract's decode graph (runtime/ort_engine.py).
        if target == "onnxruntime" and scheme is None:
            writing = IN_PLACE_FILE
            in_place = in_place_decode(tmp / graphs["decode"]["file"], tmp / IN_PLACE_FILE)
            check_model(tmp / IN_PLACE_FILE, with_data=not graphs_only)
            graphs["decode"]["in_place"] = {
                "file": IN_PLACE_FILE,
                "opset": in_place.opset_imports[""],
                "inputs": [_io(v) for v in in_place.graph.inputs],
                "outputs": [_io(v) for v in in_place.graph.outputs],
                "op_counts": _op_counts(in_place),
                "use": f"one new token; past.{{i}}.* are buffers of capacity T >= P+1, bound as present.{{i}}.* "
                       f"too; {WRITE_INDEX} [B] = P; attention_mask [B, T] with 0 for the free rows",
            }
        report("write", len(stored) + 1, len(stored) + 3)
        manifest = {
            **_manifest_head(RUNTIME, target, frontend, dtype, args, limits),
            "opset": opset,
            "weights": {**stored["weights"],
                        "parameter_bytes": _parameter_bytes(programs["prefill"]),
                        "note": "bytes of the shared external data file; tensors below 1 KiB stay inside the .onnx; "
                                "second_layouts and computed list what it holds beyond one copy of each weight"},
            "graphs": graphs,
            "tokenizer": tokenizer,
            "files": _files(tmp),
        }
        if scheme is not None:
            manifest["quantization"] = quantization_report(scheme, lowered, quant_errors, graphs_only)
        if not graphs_only:
            manifest["weights"]["fingerprint"] = fingerprint(tmp / WEIGHTS_FILE)
        else:
            manifest["graphs_only"] = True
            manifest["weights"]["note"] = (f"graph-only export: {WEIGHTS_FILE} was not written; bytes is its "
                                           "planned size, one place per weight the graphs reference (equal "
                                           "contents not merged)")
        writing = "manifest.json"
        write_manifest(tmp, manifest)
        if verify and scheme is not None:  # the quantized lowering, run, against eager with the same weights
            manifest["quantization"]["verified"] = _verify_quantized(checkpoint, tmp, manifest, scheme, allow_nonfinite)
            write_manifest(tmp, manifest)
        if not graphs_only:  # engines map the file: read-only makes writing into it under one deliberate
            os.chmod(tmp / WEIGHTS_FILE, 0o444)
        report("write", len(stored) + 3, len(stored) + 3)
        writing = "the finished folder"
        sync_folder(tmp)
        replace(tmp, out)
    except OSError as err:  # disk full, file size limit, folder removed under us
        raise OutputError(f"{out}: cannot write the export ({reason(err, writing)}); OUT was left as it was") from None
    return manifest


def check_sharding(plan: Plan, *, graphs_only: bool, scheme: Scheme | None, target: str, frontend: str) -> None:
    """An OptionError for options a sharded export does not combine with."""
    other = (f"--weights {scheme.name}" if scheme is not None
             else "--target tensorrt" if target == "tensorrt" else
             "--frontend transformers" if frontend == "transformers" else None)
    if other:
        raise OptionError(f"--tp {plan.tp} --ep {plan.ep} with {other}: sharded engines are float programs of our "
                          "model for the torch backend")


def _write_sharded(checkpoint, out: Path, tmp: Path, programs, reports, args, plan: Plan, *, dtype: str,
                   limits: Limits, frontend: str, tokenizer, report, graphs_only: bool = False) -> dict[str, Any]:
    """The sharded OUT: {phase}.pt2 (one program every rank runs) and weights-rank{r}.bin per rank (not
    with `graphs_only`: the programs and the plan's numbers only, for `inspect --plan`)."""
    sharded = {}
    for i, phase in enumerate(PHASES):
        sharded[phase] = shard(programs[phase], plan, contract_dims(args, limits))
        report("shard", i + 1, len(PHASES))
    writing = "a rank's weights file"
    try:
        ranks = []
        for r in range(plan.world if not graphs_only else 0):
            name = RANK_WEIGHTS_FILE.format(rank=r)
            writing = name
            stored = save_models({}, tmp, name, extra={phase: sharded[phase].rank_weights(r) for phase in PHASES},
                                 progress=lambda d, t, r=r: report("write", r * 2 + 1, plan.world * 2 + 1))
            os.chmod(tmp / name, 0o444)
            ranks.append({"rank": r, "weights": {**stored["weights"], "fingerprint": fingerprint(tmp / name)},
                          "program_weights": stored["extra"]})
        graphs = {}
        for phase in PHASES:
            writing = f"{phase}.pt2"
            _save_program(sharded[phase].program, tmp / writing)
            graphs[phase] = {"program": writing, "passes": _passes(reports[phase]),
                             "collectives": sharded[phase].collectives}
        manifest = {
            **_manifest_head("torch", "torch.distributed", frontend, dtype, args, limits),
            "weights": {"file": None, "parameter_bytes": _parameter_bytes(programs["prefill"]),
                        "note": "a sharded engine has one weights file per rank: sharding.ranks[r].weights"},
            "graphs": graphs,
            "sharding": {**plan.to_dict(), **sharding_report(sharded, plan, args, DTYPES[dtype]), "ranks": ranks},
            "tokenizer": tokenizer,
        }
        if graphs_only:
            manifest["graphs_only"] = True
            manifest["sharding"]["ranks"] = [{"rank": r, "weights": None} for r in range(plan.world)]
            manifest["weights"]["note"] = "graph-only sharded export: no rank's weights file was written"
        manifest["files"] = _files(tmp)
        writing = "manifest.json"
        write_manifest(tmp, manifest)
        report("write", plan.world * 2 + 1, plan.world * 2 + 1)
        writing = "the finished folder"
        sync_folder(tmp)
        replace(tmp, out)
    except OSError as err:
        raise OutputError(f"{out}: cannot write the export ({reason(err, writing)}); OUT was left as it was") from None
    return manifest


def _manifest_head(runtime: str, target: str, frontend: str, dtype: str, args, limits: Limits) -> dict[str, Any]:
    """The fields every manifest starts with: format, tool, what runs it, model, limits, cache."""
    return {
        "format_version": MANIFEST_FORMAT,
        "tool": {"name": "dscompile", "version": _version()},
        "runtime": runtime,
        "target": target,
        "frontend": _frontend_info(frontend),
        "dtype": dtype,
        "model": args.to_config(),
        "limits": {"max_batch": limits.max_batch, "max_prompt_tokens": limits.max_prompt_tokens,
                   "max_context": limits.max_context},
        "cache": cache_layout(args, DTYPES[dtype]),
    }


def sharding_report(sharded: dict, plan: Plan, args, dtype: torch.dtype) -> dict[str, Any]:
    """What each rank holds and moves: weight bytes (replicated, split), cache bytes, all-reduces."""
    nbytes = {"replicated": 0, "split": 0, "per_rank": 0}
    counts = dict(nbytes)  # parameters (elements): bytes at any dtype
    seen: set[str] = set()
    for result in sharded.values():
        for name, full in result.full.items():
            if name in seen or not isinstance(full, torch.Tensor):
                continue
            seen.add(name)
            spec = result.specs.get(name)
            parts = math.prod(plan.size(axis) for _, axis in spec) if spec else 1
            for table, n in ((nbytes, full.numel() * full.element_size()), (counts, full.numel())):
                table["split" if spec else "replicated"] += n
                table["per_rank"] += n // parts
    return {
        "plan": "attention heads over tp (latent cache replicated, o_proj row-parallel, all-reduce over tp); "
                "dense MLPs and shared experts over all ranks; routed experts over ep, each expert's "
                "intermediate size over tp (all-reduce over all ranks); embeddings, norms, router, lm_head "
                "replicated",
        "groups": plan.groups(),
        "weight_bytes": nbytes,
        "parameters": counts,
        "activation_bytes": torch.empty((), dtype=dtype).element_size(),
        "hidden_size": args.hidden_size,
        "cache_bytes_per_token_per_rank": cache_layout(args, dtype)["bytes_per_token"],
        "all_reduces_per_step": {phase: result.collectives for phase, result in sharded.items()},
    }


def check_frontend(frontend: str, *, graphs_only: bool, scheme: Scheme | None) -> None:
    """An OptionError for a frontend that is unknown, or not available with the other options."""
    if frontend not in FRONTENDS:
        raise OptionError(f"--frontend {frontend!r} is not one of {', '.join(FRONTENDS)}")
    if frontend != "transformers":
        return
    if graphs_only:
        raise OptionError("--frontend transformers with --graphs-only: transformers' model is built from the "
                          "checkpoint's weights; graph-only exports capture our model from the config")
    if scheme is not None:
        raise OptionError(f"--frontend transformers with --weights {scheme.name}: quantized engines are built "
                          "from our model (--frontend dscompile) only")
    if importlib.util.find_spec("transformers") is None:  # optional: only this frontend needs it
        raise OptionError('--frontend transformers needs transformers: pip install "dscompile[transformers]"')


def quant_scheme(weights: str | None, block_size: int, dtype: str, target: str) -> Scheme | None:
    """The quantization scheme of `--weights` / `--block-size`, or None; an OptionError for bad combinations."""
    if weights is None or weights == dtype:
        return None
    if weights not in WEIGHT_FORMATS:
        raise OptionError(f"--weights {weights!r} is not one of {', '.join(WEIGHT_FORMATS)} (or the export dtype)")
    if block_size not in BLOCK_SIZES:
        raise OptionError(f"--block-size {block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    if target != "onnxruntime":
        raise OptionError(f"--weights {weights} with --target {target}: quantized engines are lowered for "
                          "ONNX Runtime only (MatMulNBits, QMoE)")
    if dtype != "float32":
        raise OptionError(f"--weights {weights} with --dtype {dtype}: quantized engines compute in float32 "
                          "(ONNX Runtime's CPU MatMulNBits/QMoE kernels); drop --dtype")
    return Scheme(WEIGHT_FORMATS[weights], block_size)


def quantization_report(scheme: Scheme, models: dict[str, ir.Model], errors: dict[str, dict[str, float]],
                        graphs_only: bool) -> dict[str, Any]:
    """The manifest's "quantization": scheme, kernels and their attributes, per-weight error, float weights kept."""
    kept: dict[str, int] = {}
    levels: dict[str, int] = {}
    for model in models.values():
        for node in model.graph:
            if node.op_type in ("MatMulNBits", "QMoE"):
                levels[node.op_type] = node.attributes["accuracy_level"].value
        for value in model.graph.initializers.values():
            t = value.const_value
            if t is not None and t.dtype == ir.DataType.FLOAT and t.nbytes >= 1 << 16 and \
                    not value.name.endswith(".scales"):
                kept[value.name] = t.nbytes
    return {**scheme.to_dict(), "provider": "cpu", "accuracy_level": levels,
            "quantized_activations": {op: quantizes_activations(op, scheme.bits, level) for op, level in levels.items()},
            "accuracy_level_note": "4: the kernels quantize activations to int8 per block (faster, adds error); "
                                   "0: activations stay float32",
            "weights_error": None if graphs_only else dict(sorted(errors.items())),
            "weights_error_note": "per quantized weight: max |w - dequantized| and that over max |w|",
            "float_weights": dict(sorted(kept.items())), "float_weight_bytes": sum(kept.values()),
            "float_weights_note": "float32 weights of 64 KiB or more the graphs keep: embeddings, routers, and "
                                  "weights a pass computed (absorbed per-head MLA matrices)"}


def config_file(source: str | Path) -> Path:
    """The config.json a graph-only export builds its model from: `source` itself or the one in that folder."""
    path = Path(source)
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise CheckpointError(f"{path}: {'config.json not found' if path.is_dir() else 'not found'}")
    return config


def copy_tokenizer(checkpoint: str | Path, folder: Path, vocab_size: int) -> dict[str, Any] | None:
    """Copy the checkpoint's tokenizer files (those present) into `folder`, after checking they load.

    Returns the manifest's `tokenizer` entry (files, bos and eos ids, whether a chat template
    came), or None when the checkpoint has no tokenizer.json: its engine runs token ids only.
    """
    source = config_file(checkpoint).parent
    tokenizer = Tokenizer.load(source)
    if tokenizer is None:
        return None
    if tokenizer.vocab_size > vocab_size:
        raise TextError(f"{source / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, more than the model's "
                        f"vocabulary of {vocab_size}")
    files = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in files:
        shutil.copyfile(source / name, folder / name)
    eos = set(tokenizer.eos_token_ids)
    config_eos = json.loads(config_file(checkpoint).read_text()).get("eos_token_id")
    eos.update(i for i in (config_eos if isinstance(config_eos, list) else [config_eos])
               if isinstance(i, int) and 0 <= i < vocab_size)
    return {"files": files, "bos_token_id": tokenizer.bos_token_id, "eos_token_ids": sorted(eos),
            "chat_template": tokenizer.chat_template is not None, "vocab_size": tokenizer.vocab_size}


def program_weights(program) -> dict[str, torch.Tensor]:
    """A program's weights and tensor constants by name: what its `.pt2` is saved without."""
    return {**program.state_dict, **{k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)}}


def _verify_in_float32(checkpoint, limits: Limits, absorb: str, fuse_moe: bool,
                       allow_nonfinite: bool, scheme: Scheme | None = None,
                       frontend: str = "dscompile") -> dict[str, Any]:
    """Pass verification of a float32 copy of the model, loaded in memory.

    The export itself runs on meta weights (nothing to run). The passes rewrite algebra that does
    not depend on the dtype, and checking them in fp16/bf16 on random inputs is not meaningful:
    rounding flips near-tied MoE routing decisions (a different expert, a large difference) even
    when the rewrite is exact.
    """
    if frontend == "transformers":
        model, args = load_transformers_model(checkpoint, torch.float32, "cpu", allow_nonfinite=allow_nonfinite)
        traced = capture_transformers(model, args, limits)
    else:
        model = load_checkpoint(checkpoint, dtype=torch.float32, allow_nonfinite=allow_nonfinite, quantize=scheme)
        traced, args = capture(model, limits), model.args
    return {phase: run_pipeline(traced, PassOptions(phase, args, absorb=absorb, fuse_moe=fuse_moe),
                                verify=True)[1] for phase in PHASES}


def _verify_quantized(checkpoint, folder: Path, manifest: dict[str, Any], scheme: Scheme,
                      allow_nonfinite: bool) -> dict[str, Any]:
    """The finished engine (ONNX Runtime, CPU) against the eager model with the same fake-quantized
    weights: a prefill and two decode steps of a left-padded batch, within the tolerance `compare`
    uses for it (exporter.compare.lowering_table). A LoweringError if it is outside."""
    from dscompile.verify.compare import lowering_table, run_compare  # noqa: PLC0415 - compare imports this module
    from dscompile.verify.eager import EagerEngine  # noqa: PLC0415
    from dscompile.runtime.ort_engine import OrtEngine  # noqa: PLC0415

    engine = OrtEngine.load(folder, provider="cpu")
    eager = EagerEngine(load_checkpoint(checkpoint, torch.float32, allow_nonfinite=allow_nonfinite, quantize=scheme))
    report = run_compare(engine, eager, dtype=manifest["dtype"], decode_steps=2, table=lowering_table(manifest))
    worst = max(report["steps"], key=lambda s: s["logits"]["max_abs"] / max(s["atol"], 1e-30))
    result = {"passed": report["passed"], "steps": len(report["steps"]), "worst_step": worst["step"],
              "max_abs": worst["logits"]["max_abs"], "atol": worst["atol"],
              "against": f"eager with the same {scheme.name} weights (fake-quantized)"}
    del engine
    if not report["passed"]:
        raise LoweringError(f"the {scheme.name} engine differs from eager with the same quantized weights: max |Δ| "
                            f"{worst['logits']['max_abs']:.3g} > {worst['atol']:.3g} at step {worst['step']}")
    return result


def cache_layout(args, dtype: torch.dtype) -> dict[str, Any]:
    """The latent cache per layer and token, and what a multi-head-attention cache would hold."""
    elt = torch.empty((), dtype=dtype).element_size()
    L, H = args.num_hidden_layers, args.num_attention_heads
    C, R, N, V = args.kv_lora_rank, args.qk_rope_head_dim, args.qk_nope_head_dim, args.v_head_dim
    per_token = L * (C + R) * elt
    mha = L * H * ((N + R) + V) * elt
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "num_layers": L,
        "per_layer": {"kv_latent": C, "k_rope": R},
        "inputs": "past.{i}.kv_latent [B, P, kv_lora_rank], past.{i}.k_rope [B, P, qk_rope_head_dim]",
        "bytes_per_token": per_token,
        "mha_equivalent_bytes_per_token": mha,
        "mha_equivalent_counts": "per layer, H keys of qk_nope_head_dim + qk_rope_head_dim values and "
                                 "H values of v_head_dim values (num_key_value_heads = H), times the "
                                 "dtype's bytes, over all layers",
        "compression": round(mha / per_token, 2),
    }


def _io(value: ir.Value) -> dict[str, Any]:
    shape = [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape is not None else None
    return {"name": value.name, "dtype": _dtype_name(value.dtype), "shape": shape}


def _dtype_name(dtype: ir.DataType | None) -> str | None:
    if dtype is None:
        return None
    return {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
            ir.DataType.INT64: "int64", ir.DataType.INT32: "int32", ir.DataType.BOOL: "bool"}.get(dtype, dtype.name.lower())


def _frontend_info(frontend: str) -> dict[str, str]:
    """What code was captured: our model, or transformers' (with its version)."""
    if frontend == "transformers":
        return {"name": frontend, "code": "transformers' DeepseekV2/V3ForCausalLM", "version": transformers_version()}
    return {"name": frontend, "code": "dscompile's reference model (model/transformer.py)", "version": _version()}


def _passes(report) -> dict[str, Any]:
    """PassReport.to_dict() without the timings: the manifest stays byte-reproducible."""
    d = report.to_dict()
    for p in d["passes"]:
        p.pop("seconds", None)
    return d


def _op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        key = node.op_type if not node.domain else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _parameter_bytes(ep) -> int:
    return sum(t.numel() * t.element_size() for t in ep.state_dict.values())


def _files(folder: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(folder.iterdir()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": h.hexdigest()}
    return files


def _version() -> str:
    try:
        return importlib.metadata.version("dscompile")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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
