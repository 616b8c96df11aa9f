"""`compare`: an engine against PyTorch eager, per step and output, and the first diverging layer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from dscompile.cli import Bars, _emit, _status_line, app, guard


def _verdict(step: dict) -> str:
    if "rel_rms_bound" in step:  # kernels that quantize activations: judged by relative RMS error
        worst = max(step["logits"]["rel_rms"], step["cache_rel_rms"])
        return f"{'ok' if step['passed'] else 'OVER'} (rel rms {worst:.3g}, bound {step['rel_rms_bound']:.3g})"
    return "ok" if step["passed"] else "OVER (atol %.3g)" % step["atol"]


@app.command()
def compare(
    checkpoint: Path = typer.Argument(..., help="The checkpoint the engine was exported from."),
    out: Path = typer.Argument(..., help="Engine folder."),
    atol: Optional[float] = typer.Option(None, help="Absolute tolerance (default: the dtype's, scaled by max|ref|)."),
    rtol: Optional[float] = typer.Option(None, help="Relative tolerance, against max|ref| (default 0)."),
    decode_steps: int = typer.Option(4, help="Decode steps after the prefill."),
    batch: int = typer.Option(2, help="Batch rows (rows after the first are left-padded)."),
    prompt_len: int = typer.Option(8, help="Prompt length."),
    seed: int = typer.Option(0, help="Input seed."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime, torch or tensorrt."),
    provider: str = typer.Option("auto", help="auto, cpu or cuda."),
    tf32: bool = typer.Option(False, "--tf32", help="Let ONNX Runtime's CUDA provider compute float32 GEMMs in TF32, "
                              "judged against the TF32 tolerance (dscompile/tolerance.py) instead of float32's."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of hidden-state error by layer."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check an engine against PyTorch eager: per step and output, and the first diverging layer.

    Exit 0 within tolerance, 1 outside it, 2 on bad input.
    """
    start = time.perf_counter()
    with guard():
        from dscompile.api import compare as compare_api

        with Bars(not as_json) as bars:
            report = compare_api(checkpoint, out, backend=backend, provider=provider, tf32=tf32,
                                 decode_steps=decode_steps, batch=batch, prompt_len=prompt_len, seed=seed, atol=atol,
                                 rtol=rtol, plot=plot, progress=bars)
        from dscompile.verify.compare import scheme_of
        from dscompile.runtime.manifest import load_manifest

        scheme = scheme_of(load_manifest(out))
        lines = [f"note: {note}" for note in report["notes"]]
        lines += [f"{'step':>4} {'graph':8s} {'max abs':>10} {'max rel':>10} {'mean abs':>10} {'cache max':>10}  result"]
        if scheme is not None:
            lines.insert(0, f"vs eager with the same {scheme.name} weights (the lowering's distance, judged)")
        for s in report["steps"]:
            lines.append(f"{s['step']:>4} {s['graph']:8s} {s['logits']['max_abs']:10.3g} {s['logits']['max_rel']:10.3g} "
                         f"{s['logits']['mean_abs']:10.3g} {s['cache']['max_abs']:10.3g}  "
                         f"{_verdict(s)}")
        layers = report.get("layers")
        if layers:
            first = layers.get("first_diverging_layer")
            if first is not None:
                lines.append(f"first diverging layer: {first} (hidden state after block {first} is out of tolerance)")
            elif not report["passed"]:
                lines.append("first diverging layer: none (every block's hidden state is within tolerance: the "
                             "difference comes after the last block, or in a decode step)")
            else:
                lines.append("first diverging layer: none (every block's hidden state is within tolerance)")
            lines.append(f"  located in {layers['located_in']}")
        if "scheme" in report:
            lines.append(f"vs fp32 eager ({scheme.name} block {scheme.block_size}: quantization's cost, not judged)")
            lines.append(f"{'step':>4} {'graph':8s} {'rel rms':>10} {'KL':>10} {'top-1':>10}")
            for s in report["scheme"]["steps"]:
                lines.append(f"{s['step']:>4} {s['graph']:8s} {s['logits_rel_rms']:10.3g} {s['kl']:10.3g} "
                             f"{s['top1_agreement']:10.3g}")
            m = report["scheme"]["mean"]
            lines.append(f"mean {'':8s} {m['logits_rel_rms']:10.3g} {m['kl']:10.3g} {m['top1_agreement']:10.3g}")
        lines.append(_status_line(report["passed"], start))
        _emit(report, as_json, lines)
        if not report["passed"]:
            raise typer.Exit(1)

