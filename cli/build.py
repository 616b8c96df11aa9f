"""`make-checkpoint`, `export` and `demo`: checkpoints in, engine folders out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from dscompile.errors import OptionError
from dscompile.cli import DTYPES, Bars, _emit, _mb, _status_line, app, cache_home, guard


DEMO_VARIANT, DEMO_SEED = "v3", 0


DEMO_PROMPTS = ("The compiler folds the up-projections", "Hello")  # two lengths: the second is left-padded


@app.command("make-checkpoint")
def make_checkpoint_cmd(
    out_dir: Path = typer.Argument(..., help="Folder to write (config.json + safetensors)."),
    variant: str = typer.Option("v3", help="Model family: v2, v2-lite or v3."),
    layers: int = typer.Option(2, help="Decoder layers (the first one is dense when there are 2 or more)."),
    experts: int = typer.Option(8, help="Routed experts per MoE layer."),
    hidden: int = typer.Option(64, help="Hidden size."),
    heads: int = typer.Option(4, help="Attention heads."),
    vocab: int = typer.Option(512, help="Vocabulary size (>= 300 also writes the demo tokenizer and chat template)."),
    tokenizer: Optional[bool] = typer.Option(None, "--tokenizer/--no-tokenizer",
                                             help="Write the demo tokenizer (default: when --vocab >= 300)."),
    seed: int = typer.Option(0, help="Random seed (same seed, same bytes)."),
    layout: str = typer.Option("published", help="Expert tensors: 'published' (one per expert) or 'stacked' (transformers 5)."),
    shards: int = typer.Option(1, help="Number of safetensors shards (with an index when > 1)."),
    fp8: bool = typer.Option(False, "--fp8", help="Store linear weights as DeepSeek-V3's block-scaled FP8."),
    yarn: bool = typer.Option(True, "--yarn/--no-yarn", help="YaRN rope scaling, as the published models."),
    config: Optional[str] = typer.Option(None, help="Full size instead: a config.json, or v2, v2-lite or v3 (the "
                                         "published configs), written streamed in bfloat16 (the variant/size "
                                         "options are ignored)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Write a random checkpoint in the Hugging Face layout (for tests, demos and benchmarks)."""
    with guard():
        from dscompile.model.synthetic import make_checkpoint, write_streamed_checkpoint

        if out_dir.exists() and any(out_dir.iterdir()) and not force:
            raise OptionError(f"{out_dir} exists and is not empty (use --force to replace it)")
        if config is not None:
            from dscompile.model.args import PUBLISHED_CONFIGS, ModelArgs

            named = PUBLISHED_CONFIGS / f"deepseek-{config}.json"
            source = named if named.is_file() else Path(config)
            if not source.is_file():
                raise OptionError(f"--config {config!r}: not a file, nor one of v2, v2-lite, v3")
            args = ModelArgs.from_json(source)
            with Bars(not as_json) as bars:
                path = write_streamed_checkpoint(out_dir, args, seed=seed,
                                                 progress=lambda d, t: bars("write", d, t))
            files = sorted(p.name for p in path.iterdir())
            size = sum(p.stat().st_size for p in path.iterdir())
            _emit({"path": str(path), "config": str(source), "files": files, "bytes": size}, as_json,
                  [f"wrote a random {source.name} checkpoint to {path} ({len(files)} files, {size / 1e9:.2f} GB)"])
            return
        path = make_checkpoint(out_dir, variant, layers=layers, experts=experts, hidden=hidden, heads=heads,
                               vocab=vocab, seed=seed, layout=layout, shards=shards, fp8=fp8, yarn=yarn,
                               tokenizer=tokenizer)
        files = sorted(p.name for p in path.iterdir())
        size = sum(p.stat().st_size for p in path.iterdir())
        _emit({"path": str(path), "variant": variant, "files": files, "bytes": size}, as_json,
              [f"wrote {variant} checkpoint to {path} ({len(files)} files, {size / 1e6:.1f} MB)"])


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
        from dscompile.verify.compare import run_compare
        from dscompile.verify.eager import EagerEngine
        from dscompile.exporter.export import export_checkpoint
        from dscompile.model.checkpoint import load_checkpoint
        from dscompile.model.synthetic import make_checkpoint
        from dscompile.runtime.session import TextEngine

        if new_tokens < 1:
            raise OptionError(f"--new-tokens must be >= 1, got {new_tokens}")
        root = cache_dir or cache_home()
        ckpt = root / f"demo-{DEMO_VARIANT}-seed{DEMO_SEED}"
        engine_dir = root / f"demo-{DEMO_VARIANT}-seed{DEMO_SEED}-onnx"
        with Bars(not as_json) as bars:
            if not (ckpt / "config.json").is_file() or not (ckpt / "tokenizer.json").is_file():
                make_checkpoint(ckpt, DEMO_VARIANT, seed=DEMO_SEED)
            manifest = export_checkpoint(ckpt, engine_dir, verify=True, force=True, progress=bars)
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


@app.command()
def export(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint folder (config.json + *.safetensors); "
                                                "with --graphs-only a config.json or its folder is enough."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Engine folder to write."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    weights: Optional[str] = typer.Option(None, help="Weight storage: int8 or int4 (block-wise, weight-only; "
                                          "default: the export dtype)."),
    block_size: int = typer.Option(32, help="Values per quantization scale with --weights: 16, 32, 64 or 128."),
    absorb: str = typer.Option("auto", help="MLA absorption: auto (cost model), fold, reassociate or none."),
    fuse_moe: bool = typer.Option(True, "--fuse-moe/--no-fuse-moe", help="Fuse MoE routing + dispatch into dsc.moe."),
    verify: bool = typer.Option(False, "--verify", help="Check each pass numerically on random inputs."),
    opset: int = typer.Option(23, help="ONNX opset (>= 23)."),
    target: str = typer.Option("onnxruntime", help="onnxruntime, or tensorrt (also builds TensorRT engines)."),
    precision: str = typer.Option("fp16", help="TensorRT engine precision: fp32, fp16 or bf16."),
    max_batch: int = typer.Option(64, help="Largest batch the engines accept."),
    max_prompt_tokens: int = typer.Option(4096, help="Largest prompt: the most tokens one step takes."),
    max_context: int = typer.Option(16384, help="Largest past + new tokens."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite",
                                         help="Export a checkpoint with NaN/Inf weights (warns) instead of refusing it."),
    graphs_only: bool = typer.Option(False, "--graphs-only",
                                     help="Write the graphs and the manifest only, from the config alone: no weights "
                                          "are read or written (OUT can be inspected, not run)."),
    frontend: str = typer.Option("dscompile", help="The PyTorch code to capture: dscompile (our reference model) or "
                                                    "transformers (transformers' DeepseekV2/V3ForCausalLM; "
                                                    'pip install "dscompile[transformers]").'),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel ranks: attention heads and MLPs split over them."),
    ep: int = typer.Option(1, "--ep", help="Expert-parallel ranks: routed experts split over them (world = tp x ep; "
                                           "a sharded engine runs on --backend torch)."),
    explain: bool = typer.Option(False, "--explain", help="Print every region each pass looked at and did not "
                                                          "rewrite, with the step that failed."),
    list_passes: bool = typer.Option(False, "--list-passes", help="Print the pass pipeline and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Compile a checkpoint into OUT: ONNX graphs (prefill, decode), weights, manifest."""
    start = time.perf_counter()
    with guard():
        if list_passes:
            from dscompile.passes import describe_pipeline

            rows = describe_pipeline()
            _emit({"passes": [{"name": n, "doc": d} for n, d in rows]}, as_json,
                  [f"{i}. {n:12s} {d}" for i, (n, d) in enumerate(rows, 1)])
            return
        if checkpoint is None or out is None:
            raise OptionError("export needs CHECKPOINT and -o OUT")
        if dtype not in DTYPES:
            raise OptionError(f"--dtype {dtype!r} is not one of float32, float16, bfloat16")
        from dscompile.api import export as export_api

        from dscompile.passes import PassMatchError

        try:
            with Bars(not as_json) as bars:
                manifest = export_api(checkpoint, out, dtype=DTYPES[dtype], weights=weights, block_size=block_size,
                                      absorb=absorb, fuse_moe=fuse_moe, verify=verify, opset=opset, target=target,
                                      precision=precision, max_batch=max_batch, max_prompt_tokens=max_prompt_tokens,
                                      max_context=max_context, force=force, allow_nonfinite=allow_nonfinite,
                                      graphs_only=graphs_only, frontend=frontend, tp=tp, ep=ep, progress=bars)
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
