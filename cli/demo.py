"""`dscompile demo`: the main job on the embedded default (the shipped trained model: export, run, compare).

The checkpoint is model/pretrained/: a 9M-parameter DeepSeek-V3-architecture model trained on
public-domain English (training/train.py), shipped in the package. Its export goes to a cache
folder; the continuations are real (if small-model) English, so a wrong engine shows in the text too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from dscompile.cli import Bars, _emit, _status_line, app, cache_home, guard
from dscompile.errors import OptionError

# Prompts in the style of the held-out book (Austen's Persuasion); two lengths: the second is left-padded.
DEMO_PROMPTS = ("Anne had been walking with Captain Wentworth, and", "Sir Walter")
SAMPLE_PROMPT, SAMPLE_TOKENS, SAMPLE_SEED = "It was a fine morning at Kellynch Hall, and", 48, 0


@app.command()
def demo(
    cache_dir: Optional[Path] = typer.Option(None, help="Where the demo checkpoint and engine go (default ~/.cache/dscompile)."),
    new_tokens: int = typer.Option(8, help="Tokens to generate."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON report."),
) -> None:
    """Run the main job on the embedded default: export the shipped trained DeepSeek-V3 model, run, compare.

    The checkpoint is the small trained model shipped in the package (with its tokenizer and chat
    template); the engine is exported to a cache folder with every pass verified, continues two
    text prompts of different lengths (left padding) greedily, is compared with the PyTorch eager
    model, and samples one longer continuation with the checkpoint's generation defaults (seed 0).
    """
    start = time.perf_counter()
    with guard():
        from dscompile.exporter.export import export_checkpoint
        from dscompile.exporter.options import ExportOptions
        from dscompile.model.checkpoint import PRETRAINED, load_checkpoint
        from dscompile.runtime.session import TextEngine
        from dscompile.verify.compare import run_compare
        from dscompile.verify.eager import EagerEngine

        if new_tokens < 1:
            raise OptionError(f"--new-tokens must be >= 1, got {new_tokens}")
        root = cache_dir or cache_home()
        ckpt = PRETRAINED
        engine_dir = root / "demo-pretrained-onnx"
        with Bars(not as_json) as bars:
            manifest = export_checkpoint(ckpt, engine_dir, ExportOptions(verify=True, force=True), progress=bars)
            llm = TextEngine.open(engine_dir)
            engine = llm.engine
            eager = EagerEngine(load_checkpoint(ckpt), engine.info.max_positions)
            texts = list(DEMO_PROMPTS)
            prompts = [llm.tokenizer.encode(t) for t in texts]
            # Greedy and unpenalized, as the eager reference generates.
            result = llm.complete(texts, max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0,
                                  ignore_eos=True)
            tokens = [c.ids for c in result.completions]
            eager_tokens = eager.generate(prompts, new_tokens)
            report = run_compare(engine, eager, dtype=manifest["dtype"], decode_steps=new_tokens, progress=bars)
            sample = llm.generate(SAMPLE_PROMPT, max_new_tokens=SAMPLE_TOKENS, seed=SAMPLE_SEED)
        a = eager.model.args
        passes = {f"{phase}.{p['name']}": p["count"] for phase, g in manifest["graphs"].items()
                  for p in g["passes"]["passes"]}
        worst = max(s["logits"]["max_abs"] for s in report["steps"])
        ok = report["passed"] and tokens == eager_tokens
        payload = {"checkpoint": str(ckpt), "engine": str(engine_dir), "model_type": a.model_type,
                   "passes": passes, "prompts": texts, "prompt_ids": prompts, "texts": [c.text for c in result.completions],
                   "engine_tokens": tokens, "eager_tokens": eager_tokens,
                   "sample": {"prompt": SAMPLE_PROMPT, "text": sample, "seed": SAMPLE_SEED},
                   "compare": report, "cache": manifest["cache"], "passed": ok}
        lines = [
            f"checkpoint  {ckpt}  (trained {a.model_type}, {a.num_hidden_layers} layers, {a.n_routed_experts} experts, "
            f"{a.topk_method})",
            f"engine      {engine_dir}  (ONNX Runtime, {manifest['dtype']})",
            "passes      " + ", ".join(f"{k} x{v}" for k, v in passes.items()),
            f"cache       {manifest['cache']['bytes_per_token']} bytes/token vs {manifest['cache']['mha_equivalent_bytes_per_token']} for MHA",
        ]
        lines += [f"run         {t!r} -> {c.text!r}" for t, c in zip(texts, result.completions)]
        lines.append(f"sample      {SAMPLE_PROMPT!r} -> {sample!r}")
        lines.append(f"            (seed {SAMPLE_SEED}, the checkpoint's sampling defaults: generation_config.json)")
        lines.append(f"eager       {'same tokens' if tokens == eager_tokens else 'DIFFERENT tokens: ' + str(eager_tokens)}")
        lines.append(f"compare     prefill + {new_tokens} decode steps, max |Δ logits| {worst:.2g}")
        lines.append(_status_line(ok, start))
        _emit(payload, as_json, lines)
        if not ok:
            raise typer.Exit(1)
