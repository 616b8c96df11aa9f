"""What an engine folder holds, as a report (`dscompile inspect` prints it).

For a one-device OUT: its graphs (IO, op counts, the passes applied and the regions they left
alone), the bytes of every file, what weights.bin holds beyond one copy of each weight, the
weight memory each backend keeps, and cache bytes per token against multi-head attention. For a
sharded OUT: its plan, sized per rank (`sharding_plan`). Everything comes from the manifest (and,
with `trt_compat` / `ort_cuda_compat`, from the ONNX graphs); no engine is opened. The weight memory
per backend is device memory for the GPU ones: one copy on ONNX Runtime's CUDA provider (one
session) and for the TensorRT engine (one engine, the decode graph, with two profiles).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dscompile.errors import EngineError, OptionError


def inspect(out: str | Path, trt_compat: bool = False, plan: bool = False, ort_cuda_compat: bool = False
            ) -> dict[str, Any]:
    """The report of engine folder `out` (a graph-only export too); a sharded OUT's is `sharding_plan`'s.

    trt_compat: also check every ONNX node against TensorRT's ONNX parser ("trt_compat").
    ort_cuda_compat: also check every ONNX node against ONNX Runtime's CUDA kernels: the nodes it
    would place on CPU, and why ("ort_cuda_compat"; judged on the graphs a CUDA engine opens).
    plan: the caller wants a sharded OUT's plan; an OptionError for a one-device OUT.
    """
    from dscompile.runtime.manifest import read_manifest
    from dscompile.runtime.weights import resident_estimate

    out = Path(out)
    manifest = read_manifest(out, graphs_only_ok=True)
    if manifest.get("sharding") is not None:
        if ort_cuda_compat:
            raise OptionError(f"{out}: --ort-cuda-compat checks ONNX Runtime graphs; a sharded export runs on the "
                              "torch backend (its plan: --plan)")
        return sharding_plan(manifest)
    if plan:
        raise OptionError(f"{out}: --plan describes a sharded export (dscompile export ... --tp N --ep M); this "
                          "one runs on one device")
    cfg = manifest["model"]
    report: dict[str, Any] = {
        "model": {k: cfg.get(k) for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                         "kv_lora_rank", "n_routed_experts", "num_experts_per_tok", "topk_method")},
        "dtype": manifest["dtype"], "target": manifest["target"], "runtime": manifest.get("runtime", "onnxruntime"),
        "opset": manifest["opset"], "limits": manifest["limits"], "cache": manifest["cache"],
        "weights": manifest["weights"], "frontend": manifest.get("frontend"),
        "graphs_only": bool(manifest.get("graphs_only")),
        "graphs": {name: {k: g.get(k) for k in ("file", "inputs", "outputs", "op_counts", "passes", "moe_lowering",
                                                "in_place")}
                   for name, g in manifest["graphs"].items()},
        "files": manifest.get("files", {}),
        "resident_estimate": resident_estimate(out, manifest),
    }
    if manifest.get("quantization"):
        report["quantization"] = manifest["quantization"]
    if manifest.get("native_ops"):  # exported with --native-kernels: can this machine build their library?
        from dscompile.runtime.native import unavailable

        why = unavailable()
        report["native_ops"] = {**manifest["native_ops"], "available": why is None, "unavailable": why}
    if trt_compat:
        from dscompile.lowering.tensorrt.compat import check_out_dir

        report["trt_compat"] = check_out_dir(out)
    if ort_cuda_compat:
        from dscompile.lowering.ort_cuda_compat import check_out_dir as check_cuda
        from dscompile.runtime.ort_sessions import session_graphs

        report["ort_cuda_compat"] = check_cuda(out, set(session_graphs(manifest, "CUDAExecutionProvider").values()))
    return report


def sharding_plan(manifest: dict) -> dict:
    """A sharded manifest's plan, sized: weights per rank at the engine's dtype, bf16 and FP8 (one byte per
    parameter), cache per rank, and the all-reduces' volume per decode step and per prefill token."""
    sh = manifest["sharding"]
    missing = [k for k in ("parameters", "hidden_size", "activation_bytes", "groups", "all_reduces_per_step",
                           "weight_bytes", "cache_bytes_per_token_per_rank", "plan") if k not in sh]
    if missing:
        raise EngineError(f"manifest.json: sharding lacks {', '.join(missing)}; re-export with this dscompile")
    counts, D, act = sh["parameters"], sh["hidden_size"], sh["activation_bytes"]
    groups = {name: len(ranks[0]) for name, ranks in sh["groups"].items()}
    traffic = {}
    for phase, reduces in sh["all_reduces_per_step"].items():
        per_token = {g: n * D * act for g, n in reduces.items()}  # bytes each all-reduce carries per token
        # A ring all-reduce of M bytes over N ranks sends 2(N-1)/N * M from each rank.
        sent = sum(m * 2 * (groups[g] - 1) / groups[g] for g, m in per_token.items())
        traffic[phase] = {"all_reduces": reduces, "bytes_per_token": sum(per_token.values()),
                          "ring_bytes_sent_per_rank_per_token": int(sent)}
    return {
        "plan": {k: sh[k] for k in ("tp", "ep", "world_size", "plan", "groups")},
        "model": {k: manifest["model"].get(k) for k in ("model_type", "num_hidden_layers", "hidden_size",
                                                        "num_attention_heads", "n_routed_experts")},
        "dtype": manifest["dtype"],
        "graphs_only": bool(manifest.get("graphs_only")),
        "parameters": counts,
        "weight_bytes_per_rank": {manifest["dtype"]: sh["weight_bytes"]["per_rank"], "bfloat16": 2 * counts["per_rank"],
                                  "fp8": counts["per_rank"]},
        "cache_bytes_per_token_per_rank": sh["cache_bytes_per_token_per_rank"],
        "activation_bytes": act,
        "traffic": traffic,
        "ranks": sh["ranks"],
        "programs": {phase: g.get("program") for phase, g in manifest["graphs"].items()},
    }
