"""`eval`: perplexity of an engine on a text, and its KL divergence to a reference model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from dscompile.cli import Bars, _emit, _status_line, app, guard


@app.command("eval")
def eval_command(
    out: Path = typer.Argument(..., help="Engine folder written by `dscompile export`."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to score (held-out text, not training text)."),
    reference: Optional[Path] = typer.Option(None, help="A checkpoint (its float32 PyTorch eager model) or another "
                                             "engine folder: adds KL(reference || engine) per token, top-1 "
                                             "agreement and the perplexity ratio."),
    context: Optional[int] = typer.Option(None, help="Tokens per window (default: the engine's limit)."),
    stride: Optional[int] = typer.Option(None, help="Tokens a window advances (default: context / 2); each token is "
                                         "scored once, with at least context - stride tokens before it."),
    max_tokens: Optional[int] = typer.Option(None, help="Evaluate only the text's first N tokens."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime, torch or tensorrt."),
    provider: str = typer.Option("auto", help="auto, cpu or cuda (onnxruntime: also tensorrt)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads (default: the backend's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Perplexity of an engine on a text, in strided windows; with --reference, KL divergence per token
    (mean, median, p99, max), top-1 agreement and the perplexity ratio, as llama-perplexity
    --kl-divergence reports them."""
    start = time.perf_counter()
    with guard():
        from dscompile.api import eval as eval_api

        with Bars(not as_json) as bars:
            report = eval_api(out, text, reference=reference, context=context, stride=stride, max_tokens=max_tokens,
                              backend=backend, provider=provider, threads=threads, progress=bars)
        lines = [f"note: {note}" for note in report["notes"]]
        lines.append(f"{report['scored_tokens']} of {report['tokens']} tokens scored in {report['windows']} windows of "
                     f"{report['context']} (stride {report['stride']}, steps of {report['step_tokens']})")
        lines.append(f"perplexity {report['perplexity']:.4f} (mean NLL {report['nll_mean']:.4f} nats/token)")
        ref = report.get("reference")
        if ref:
            kl = ref["kl"]
            lines.append(f"reference: {ref['name']}: perplexity {ref['perplexity']:.4f}, ratio "
                         f"{ref['perplexity_ratio']:.4f}")
            lines.append(f"KL(reference || engine) per token: mean {kl['mean']:.4g}, median {kl['median']:.4g}, "
                         f"p99 {kl['p99']:.4g}, max {kl['max']:.4g}; top-1 agreement {ref['top1_agreement']:.4f}")
        lines.append(_status_line(True, start))
        _emit(report, as_json, lines)
