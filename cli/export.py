"""`dscompile export`: a checkpoint compiled into an engine folder (OUT)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import typer

from dscompile.cli import Bars, _emit, _mb, _status_line, app, guard
from dscompile.errors import OptionError
from dscompile.exporter.options import ExportOptions

# The flags' defaults are ExportOptions' (the API's and every other export's), read without building one.
_DEFAULT = {f.name: f.default for f in dataclasses.fields(ExportOptions)}


@app.command()
def export(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint folder (config.json + *.safetensors); "
                                                "with --graphs-only a config.json or its folder is enough."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Engine folder to write."),
    dtype: str = typer.Option(_DEFAULT["dtype"], help="float32, float16 or bfloat16 (or fp32, fp16, bf16)."),
    weights: Optional[str] = typer.Option(_DEFAULT["weights"], help="Weight storage: int8 or int4 (block-wise, weight-only; "
                                          "default: the export dtype)."),
    block_size: int = typer.Option(_DEFAULT["block_size"], help="Values per quantization scale with --weights: 16, 32, 64 or 128."),
    lm_head_bits: int = typer.Option(_DEFAULT["lm_head_bits"], help="Bits of lm_head with --weights: 8 (default: its "
                                     "error goes straight into the logits), 6 (with --native-kernels; as llama.cpp's "
                                     "Q6_K output layer) or 4."),
    calibration: Optional[Path] = typer.Option(_DEFAULT["calibration"], help="With --weights: choose each block's "
                                               "scale by the input activations the model sees on this text "
                                               "(importance-weighted error, as llama.cpp's imatrix)."),
    native_kernels: bool = typer.Option(_DEFAULT["native_kernels"], "--native-kernels/--no-native-kernels",
                                        help="float32 on CPU: dscompile's own ONNX Runtime kernels; with --weights, "
                                        "for int4/int8 linear layers and experts (VNNI, float16 scales) and MLA's "
                                        "absorbed per-head weights in int8; without, for the decode step's float32 "
                                        "linear layers and experts (the prefill keeps ONNX Runtime's). Built with "
                                        "g++ on first use; needs ONNX Runtime's C/C++ headers and an AVX-512 VNNI CPU."),
    absorb: str = typer.Option(_DEFAULT["absorb"], help="MLA absorption: auto (cost model), fold, reassociate or none."),
    fuse_moe: bool = typer.Option(_DEFAULT["fuse_moe"], "--fuse-moe/--no-fuse-moe", help="Fuse MoE routing + dispatch into dsc.moe."),
    verify: bool = typer.Option(_DEFAULT["verify"], "--verify", help="Check each pass numerically on random inputs."),
    opset: int = typer.Option(_DEFAULT["opset"], help="ONNX opset (>= 23)."),
    target: str = typer.Option(_DEFAULT["target"], help="onnxruntime, or tensorrt (also builds TensorRT engines)."),
    device: str = typer.Option(_DEFAULT["device"], help="Where the ONNX Runtime engine runs: cpu, or cuda (lowerings "
                               "the CUDA provider has: com.microsoft.MoE in float16/bfloat16 too; with --weights, "
                               "--dtype float16 or bfloat16)."),
    precision: str = typer.Option(_DEFAULT["precision"], help="TensorRT engine precision: fp32, fp16 or bf16."),
    tf32: bool = typer.Option(_DEFAULT["tf32"], "--tf32", help="Let fp32 TensorRT engines compute GEMMs in TF32 "
                              "(default: IEEE float32; compare then judges with the TF32 tolerance)."),
    max_batch: int = typer.Option(_DEFAULT["max_batch"], help="Largest batch the engines accept."),
    max_prompt_tokens: int = typer.Option(_DEFAULT["max_prompt_tokens"], help="Largest prompt: the most tokens one step takes."),
    max_context: int = typer.Option(_DEFAULT["max_context"], help="Largest past + new tokens."),
    force: bool = typer.Option(_DEFAULT["force"], "--force", help="Replace OUT if it exists."),
    allow_nonfinite: bool = typer.Option(_DEFAULT["allow_nonfinite"], "--allow-nonfinite",
                                         help="Export a checkpoint with NaN/Inf weights (warns) instead of refusing it."),
    graphs_only: bool = typer.Option(_DEFAULT["graphs_only"], "--graphs-only",
                                     help="Write the graphs and the manifest only, from the config alone: no weights "
                                          "are read or written (OUT can be inspected, not run)."),
    frontend: str = typer.Option(_DEFAULT["frontend"], help="The PyTorch code to capture: dscompile (our reference model) or "
                                                    "transformers (transformers' DeepseekV2/V3ForCausalLM; "
                                                    'pip install "dscompile[transformers]").'),
    tp: int = typer.Option(_DEFAULT["tp"], "--tp", help="Tensor-parallel ranks: attention heads and MLPs split over them."),
    ep: int = typer.Option(_DEFAULT["ep"], "--ep", help="Expert-parallel ranks: routed experts split over them (world = tp x ep; "
                                           "a sharded engine runs on --backend torch)."),
    explain: bool = typer.Option(False, "--explain", help="Print every region each pass looked at and did not "
                                                          "rewrite, with the step that failed."),
    list_passes: bool = typer.Option(False, "--list-passes", help="Print the passes, stage by stage, and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Compile a checkpoint into OUT: ONNX graphs (prefill, decode), weights, manifest."""
    start = time.perf_counter()
    with guard():
        if list_passes:
            from dscompile.passes import describe_pipeline

            rows = describe_pipeline()
            lines, width = [], max(len(n) for _, n, _ in rows)
            for i, (stage, n, d) in enumerate(rows, 1):
                if i == 1 or rows[i - 2][0] != stage:  # each stage under its own heading
                    lines.append(f"{stage}:")
                lines.append(f"{i}. {n:{width}s}  {d}")
            _emit({"passes": [{"stage": s, "name": n, "doc": d} for s, n, d in rows]}, as_json, lines)
            return
        if checkpoint is None or out is None:
            raise OptionError("export needs CHECKPOINT and -o OUT")
        options = ExportOptions(dtype=dtype, weights=weights, block_size=block_size, lm_head_bits=lm_head_bits,
                                calibration=calibration, native_kernels=native_kernels,
                                absorb=absorb, fuse_moe=fuse_moe, verify=verify, opset=opset, target=target,
                                device=device, precision=precision, tf32=tf32,
                                max_batch=max_batch, max_prompt_tokens=max_prompt_tokens, max_context=max_context,
                                frontend=frontend, graphs_only=graphs_only, tp=tp, ep=ep, force=force, allow_nonfinite=allow_nonfinite)
        from dscompile.api import export as export_api
        from dscompile.passes import PassMatchError

        try:
            with Bars(not as_json) as bars:
                manifest = export_api(checkpoint, out, options, progress=bars)
        except PassMatchError as err:
            if explain:
                for u in err.unmatched:
                    typer.echo(f"not rewritten: {u}", err=True)
            raise
        lines = []
        for phase, g in manifest["graphs"].items():
            for p in g["passes"]["passes"]:
                err = "" if p.get("max_error") is None else f", verified max |Δ| {p['max_error']:.2g}"
                form = f" ({p['details']['form']})" if p.get("details", {}).get("form") else ""
                lines.append(f"{phase:8s} {p['name']:12s} {p['count']:4d} of {p['expected']} regions rewritten"
                             f"{form}{err}")
                if explain:
                    lines += [f"{phase:8s} {p['name']:12s} not rewritten: {u['region']}: {u['step']}: {u['found']}"
                              for u in p["unmatched"]]
        for name, f in sorted(manifest["files"].items()):
            lines.append(f"file     {name:24s} {_mb(f['bytes'])}")
        if graphs_only and not manifest.get("sharding"):
            lines.append(f"weights  {manifest['weights']['file']} not written (graph-only; "
                         f"{_mb(manifest['weights']['bytes'])} planned)")
        for phase, g in manifest["graphs"].items():
            if "op_counts" in g:
                lines.append(f"graph    {phase:8s} {sum(g['op_counts'].values())} nodes")
        if manifest.get("sharding"):
            sh = manifest["sharding"]
            lines.append(f"shards   {sh['world_size']} ranks (tp {sh['tp']} x ep {sh['ep']}), "
                         f"{_mb(sh['weight_bytes']['per_rank'])} of weights per rank; run with --backend torch")
        c = manifest["cache"]
        lines.append(f"cache    {c['bytes_per_token']} bytes per token ({c['mha_equivalent_bytes_per_token']} "
                     f"for the MHA equivalent, {c['compression']}x smaller)")
        lines.append(_status_line(True, start))
        _emit(manifest, as_json, lines)
