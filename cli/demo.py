"""`dscompile demo`: the main job on an embedded default (make a checkpoint, export, run, compare)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from dscompile.cli import Bars, _emit, _status_line, app, cache_home, guard
from dscompile.errors import OptionError

DEMO_VARIANT, DEMO_SEED = "v3", 0
DEMO_PROMPTS = ("The compiler folds the up-projections", "Hello")  # two lengths: the second is left-padded


@app.command()
def demo(
    cache_dir: Optional[Path] = typer.Option(None, help="Where the demo checkpoint and engine go (default ~/.cache/dscompile)."),
    new_tokens: int = typer.Option(8, help="Tokens to generate."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON report."),
) -> None:
    """Run the main job on an embedded default: make a tiny DeepSeek-V3 checkpoint, export, run, compare.

    The checkpoint (with a small tokenizer and chat template) is generated deterministically
    (seed 0) in a cache folder; the engine is exported next to it with every pass verified,
    continues two text prompts of different lengths (left padding), greedy, and is compared
    with the PyTorch eager model.
    """
    start = time.perf_counter()
    with guard():
        from dscompile.exporter.export import export_checkpoint
        from dscompile.exporter.options import ExportOptions
        from dscompile.model.checkpoint import load_checkpoint
        from dscompile.model.synthetic import make_checkpoint
        from dscompile.runtime.session import TextEngine
        from dscompile.verify.compare import run_compare
        from dscompile.verify.eager import EagerEngine

        if new_tokens < 1:
            raise OptionError(f"--new-tokens must be >= 1, got {new_tokens}")
        root = cache_dir or cache_home()
        ckpt = root / f"demo-{DEMO_VARIANT}-seed{DEMO_SEED}"
        engine_dir = root / f"demo-{DEMO_VARIANT}-seed{DEMO_SEED}-onnx"
        with Bars(not as_json) as bars:
            if not (ckpt / "config.json").is_file() or not (ckpt / "tokenizer.json").is_file():
                make_checkpoint(ckpt, DEMO_VARIANT, seed=DEMO_SEED)
            manifest = export_checkpoint(ckpt, engine_dir, ExportOptions(verify=True, force=True), progress=bars)
            llm = TextEngine.open(engine_dir)
            engine = llm.engine
            eager = EagerEngine(load_checkpoint(ckpt), engine.info.max_positions)
            texts = list(DEMO_PROMPTS)
            prompts = [llm.tokenizer.encode(t) for t in texts]
            result = llm.complete(texts, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
            tokens = [c.ids for c in result.completions]
            eager_tokens = eager.generate(prompts, new_tokens)
            report = run_compare(engine, eager, dtype=manifest["dtype"], decode_steps=new_tokens, progress=bars)
        a = eager.model.args
        passes = {f"{phase}.{p['name']}": p["count"] for phase, g in manifest["graphs"].items()
                  for p in g["passes"]["passes"]}
        worst = max(s["logits"]["max_abs"] for s in report["steps"])
        ok = report["passed"] and tokens == eager_tokens
        payload = {"checkpoint": str(ckpt), "engine": str(engine_dir), "model_type": a.model_type,
                   "passes": passes, "prompts": texts, "prompt_ids": prompts, "texts": [c.text for c in result.completions],
                   "engine_tokens": tokens, "eager_tokens": eager_tokens,
                   "compare": report, "cache": manifest["cache"], "passed": ok}
        lines = [
            f"checkpoint  {ckpt}  ({a.model_type}, {a.num_hidden_layers} layers, {a.n_routed_experts} experts, {a.topk_method})",
            f"engine      {engine_dir}  (ONNX Runtime, {manifest['dtype']})",
            "passes      " + ", ".join(f"{k} x{v}" for k, v in passes.items()),
            f"cache       {manifest['cache']['bytes_per_token']} bytes/token vs {manifest['cache']['mha_equivalent_bytes_per_token']} for MHA",
        ]
        lines += [f"run         {t!r} -> {c.text!r}" for t, c in zip(texts, result.completions)]
        lines.append("            (greedy, from random weights: the continuations are noise)")
        lines.append(f"eager       {'same tokens' if tokens == eager_tokens else 'DIFFERENT tokens: ' + str(eager_tokens)}")
        lines.append(f"compare     prefill + {new_tokens} decode steps, max |Δ logits| {worst:.2g}")
        lines.append(_status_line(ok, start))
        _emit(payload, as_json, lines)
        if not ok:
            raise typer.Exit(1)
