"""The export job: checkpoint -> OUT (two ONNX graphs, one weight file, the manifest, the programs).

    load_checkpoint -> capture(prefill), capture(decode) -> run_pipeline per graph -> lower both
    -> OUT/prefill.onnx, OUT/decode.onnx, OUT/weights.bin (shared), OUT/prefill.pt2,
       OUT/decode.pt2 (optimized ExportedPrograms, for the torch engine), OUT/manifest.json

Everything is written into a temporary folder beside OUT and renamed into place at the end, so a
failed export never leaves a half-written OUT, and with `force` an existing OUT is replaced only
once the new one is complete. Two exports of the same checkpoint with the same options are
byte-identical (no timings or paths in the files).

Shape legend: B batch, S new tokens, P past tokens, H heads, N/R/V nope/rope/value head dims,
C kv_lora_rank, L layers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import onnx_ir as ir
import torch

from exporter.capture import PHASES, Limits, capture
from exporter.lower import check_model, lower, save_models
from exporter.onnx_ops import choose_moe_experts
from model.checkpoint import load_checkpoint
from passes import PassOptions, run_pipeline
from runtime.errors import OptionError
from runtime.manifest import MANIFEST_FORMAT, write_manifest

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHTS_FILE = "weights.bin"
TARGET = "onnxruntime"
Progress = Callable[[str, int, int], None]
STAGES = ("load", "capture", "passes", "lower", "write")


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
    debug: bool = False,
) -> dict[str, Any]:
    """Compile a checkpoint into OUT for ONNX Runtime; returns the manifest written there.

    `debug` builds also output the hidden state after every block (`hidden.{i}`), which is how
    `compare` finds the first layer where an engine diverges.
    """
    if dtype not in DTYPES:
        raise OptionError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if opset < 23:
        raise OptionError(f"--opset {opset} is too old: the lowering needs opset >= 23 (RMSNormalization, Attention)")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OptionError(f"{out}: exists and is not empty (pass --force to replace it)")
    report = progress or (lambda stage, done, total: None)
    torch_dtype = DTYPES[dtype]

    model = load_checkpoint(checkpoint, dtype=torch_dtype, progress=lambda d, t: report("load", d, t))
    args = model.args
    programs, reports, lowered, lowerings = {}, {}, {}, {}
    # Both graphs trace the same function with the same dynamic dims, so one capture serves
    # both; the passes then specialize each (they never edit the program they are given).
    traced = capture(model, "prefill", limits, debug=debug)
    report("capture", 1, 1)
    del model  # the program holds the weights from here on
    verified = _verify_in_float32(checkpoint, limits, absorb, fuse_moe, debug) if verify and dtype != "float32" else None
    for i, phase in enumerate(PHASES):
        options = PassOptions(phase, args, absorb=absorb, fuse_moe=fuse_moe)
        programs[phase], reports[phase] = run_pipeline(traced, options, verify=verify and verified is None)
        if verified is not None:
            for result, checked in zip(reports[phase].results, verified[phase].results):
                result.max_error, result.details["verified_in"] = checked.max_error, "float32"
        report("passes", i + 1, len(PHASES))
    for i, phase in enumerate(PHASES):
        lowerings[phase] = choose_moe_experts(phase, torch_dtype)
        lowered[phase] = lower(programs[phase], phase, args.num_hidden_layers, opset=opset,
                               moe_experts=lowerings[phase], debug=debug)
        report("lower", i + 1, len(PHASES))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        stored = save_models(lowered, tmp, WEIGHTS_FILE, progress=lambda d, t: report("write", d, t + 3))
        graphs = {}
        for phase in PHASES:
            check_model(tmp / stored[phase]["file"])
            torch.export.save(programs[phase], tmp / f"{phase}.pt2")
            graphs[phase] = {
                "file": stored[phase]["file"],
                "program": f"{phase}.pt2",
                "inputs": [_io(v) for v in lowered[phase].graph.inputs],
                "outputs": [_io(v) for v in lowered[phase].graph.outputs],
                "passes": _passes(reports[phase]),
                "moe_lowering": lowerings[phase] if args.num_moe_layers else None,
                "op_counts": _op_counts(lowered[phase]),
            }
        report("write", len(stored) + 1, len(stored) + 3)
        manifest = {
            "format_version": MANIFEST_FORMAT,
            "tool": {"name": "dscompile", "version": _version()},
            "target": TARGET,
            "dtype": dtype,
            "opset": opset,
            "model": args.to_config(),
            "limits": {"max_batch": limits.max_batch, "max_new_tokens": limits.max_new_tokens,
                       "max_context": limits.max_context},
            "cache": cache_layout(args, torch_dtype),
            "weights": {**stored["weights"],
                        "parameter_bytes": _parameter_bytes(programs["prefill"]),
                        "note": "bytes of the shared external data file; tensors below 1 KiB stay inside the .onnx"},
            "graphs": graphs,
            "files": _files(tmp),
        }
        write_manifest(tmp, manifest)
        report("write", len(stored) + 3, len(stored) + 3)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _verify_in_float32(checkpoint, limits: Limits, absorb: str, fuse_moe: bool, debug: bool) -> dict[str, Any]:
    """Pass verification of a float32 copy of the model.

    The passes rewrite algebra that does not depend on the dtype, but checking them in fp16/bf16
    on random inputs is not meaningful: rounding flips near-tied MoE routing decisions (a
    different expert, a large difference) even when the rewrite is exact.
    """
    model = load_checkpoint(checkpoint, dtype=torch.float32)
    traced = capture(model, "prefill", limits, debug=debug)
    return {phase: run_pipeline(traced, PassOptions(phase, model.args, absorb=absorb, fuse_moe=fuse_moe),
                                verify=True)[1] for phase in PHASES}


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


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old OUT goes only after the new one is there."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
