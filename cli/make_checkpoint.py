"""`dscompile make-checkpoint`: a random checkpoint in the Hugging Face layout."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dscompile.cli import Bars, _emit, app, guard
from dscompile.errors import OptionError


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
