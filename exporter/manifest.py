"""The manifest's writer: the entries of OUT/manifest.json, built from what the export made.

The schema (what each field means, the format version, how engines read and check it) is
runtime/manifest.py's; this module fills it. Nothing here depends on time or on paths: two exports
of the same checkpoint with the same options write the same bytes (pass timings are dropped).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from dscompile.capture import Limits
from dscompile.capture.frontends.transformers import transformers_version
from dscompile.dtypes import DTYPES, TABLE
from dscompile.lowering.encodings import NATIVE_EXPERT_OPS, NATIVE_PANEL_OPS
from dscompile.lowering.quantize import quantizes_activations
from dscompile.model.quant import Scheme
from dscompile.passes.shard import Plan
from dscompile.runtime.contract import LOGITS_FROM, WRITE_INDEX
from dscompile.runtime.manifest import MANIFEST_FORMAT


def manifest_head(runtime: str, target: str, frontend: str, dtype: str, args, limits: Limits) -> dict[str, Any]:
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


def graph_entry(file: str, model: ir.Model, report, moe_lowering: str | None) -> dict[str, Any]:
    """A lowered graph's `graphs.<phase>`: file, IO, passes, MoE lowering, op counts."""
    entry = {
        "file": file,
        "inputs": _inputs(model),
        "outputs": [_io(v) for v in model.graph.outputs],
        "passes": pass_report(report),
        "moe_lowering": moe_lowering,
        "op_counts": _op_counts(model),
    }
    if any(v.name == LOGITS_FROM for v in model.graph.inputs):
        entry[LOGITS_FROM] = "optional int64 [1], default 0: logits for new tokens [logits_from, S) only"
    return entry


def _inputs(model: ir.Model) -> list[dict[str, Any]]:
    """The contract's inputs: an input with a default (an initializer of its name, lowering/logits.py) is optional."""
    return [_io(v) for v in model.graph.inputs if not v.is_initializer()]


def in_place_entry(file: str, model: ir.Model, any_new_tokens: bool = False) -> dict[str, Any]:
    """`graphs.decode.in_place`: the decode graph writing its cache into capacity buffers; `new_tokens`
    says whether it takes one new token per step or any number (lowering/in_place.py)."""
    S = "S" if any_new_tokens else "1"
    return {
        "file": file,
        "opset": model.opset_imports[""],
        "inputs": _inputs(model),
        "outputs": [_io(v) for v in model.graph.outputs],
        "op_counts": _op_counts(model),
        "new_tokens": "any" if any_new_tokens else 1,
        "use": f"{'any number of new tokens S' if any_new_tokens else 'one new token'}; past.{{i}}.* are buffers of "
               f"capacity T >= P+{S}, bound as present.{{i}}.* too; {WRITE_INDEX} [B] = P; attention_mask [B, T] "
               "with 0 for the free rows",
    }


def pass_report(report) -> dict[str, Any]:
    """PassReport.to_dict() without the timings: the manifest stays byte-reproducible."""
    d = report.to_dict()
    for p in d["passes"]:
        p.pop("seconds", None)
    return d


def parameter_bytes(program) -> int:
    return sum(t.numel() * t.element_size() for t in program.state_dict.values())


def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """`files`: every file of the folder by name, with its bytes and sha256."""
    files = {}
    for path in sorted(folder.iterdir()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": h.hexdigest()}
    return files


def quantization_report(scheme: Scheme, models: dict[str, ir.Model], errors: dict[str, dict[str, float]],
                        graphs_only: bool, provider: str = "cpu") -> dict[str, Any]:
    """The manifest's "quantization": scheme, kernels and their attributes, per-weight error, float weights kept."""
    kept: dict[str, int] = {}
    levels: dict[str, int] = {}
    scale_types: set[str] = set()
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    for model in models.values():
        for node in model.graph:
            if node.op_type in ("MatMulNBits", "QMoE") + NATIVE_PANEL_OPS:
                # the native panel kernels (runtime/native) quantize activations to int8 per block, as level 4
                levels[node.op_type] = 4 if node.op_type in NATIVE_PANEL_OPS else node.attributes["accuracy_level"].value
                # the first scales: after x and the weights (MatMulNBits, MatMulQb), the router or the routing
                # (QMoE, MoEQb; ExpertsQb's weights and indices) and fc1
                first = (4 if node.op_type.startswith("ExpertsQ")
                         else 3 if node.op_type in ("QMoE",) + NATIVE_EXPERT_OPS else 2)
                scale_type = node.inputs[first].dtype
                scale_types.add({ir.DataType.FLOAT: "float32"}.get(scale_type, scale_type.name.lower()))
        for value in model.graph.initializers.values():
            t = value.const_value
            if t is not None and t.dtype in floats and t.nbytes >= 1 << 16 and not value.name.endswith(".scales"):
                kept[value.name] = t.nbytes
    report = scheme.to_dict()
    if scale_types:
        report["scale"] = report["scale"].replace("float32", "/".join(sorted(scale_types)), 1)
    if scale_types and scale_types <= {"float16", "bfloat16"}:  # 16-bit scales
        report["bits_per_weight"] = scheme.bits + 16 / scheme.block_size
    return {**report, "provider": provider, "accuracy_level": levels,
            "quantized_activations": {op: quantizes_activations(op, scheme.bits, level, provider)
                                      for op, level in levels.items()},
            "accuracy_level_note": "CPU: 4: the kernels quantize activations to int8 per block (faster, adds error); "
                                   "0: activations stay float32. CUDA: the kernels compute in the activation "
                                   "dtype at every level (0 recorded)",
            "weights_error": None if graphs_only else dict(sorted(errors.items())),
            "weights_error_note": "per quantized weight: max |w - dequantized| and that over max |w|",
            "float_weights": dict(sorted(kept.items())), "float_weight_bytes": sum(kept.values()),
            "float_weights_note": "float weights of 64 KiB or more the graphs keep: embeddings, routers, and "
                                  "weights a pass computed (absorbed per-head MLA matrices)"}


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


def _io(value: ir.Value) -> dict[str, Any]:
    shape = [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape is not None else None
    return {"name": value.name, "dtype": _dtype_name(value.dtype), "shape": shape}


def _dtype_name(dtype: ir.DataType | None) -> str | None:
    if dtype is None:
        return None
    floats = {d.onnx: d.name for d in TABLE}  # ir.DataType's own names: FLOAT, not float32
    return floats.get(int(dtype), dtype.name.lower())


def _op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        key = node.op_type if not node.domain else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _frontend_info(frontend: str) -> dict[str, str]:
    """What code was captured: our model, or transformers' (with its version)."""
    if frontend == "transformers":
        return {"name": frontend, "code": "transformers' DeepseekV2/V3ForCausalLM", "version": transformers_version()}
    return {"name": frontend, "code": "dscompile's reference model (model/transformer.py)", "version": _version()}


def _version() -> str:
    try:
        return importlib.metadata.version("dscompile")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
