"""The `dscompile` command line. Each command's docstring is its help.

Errors a user can cause (DscompileError) print one line on stderr and exit 2, without a
traceback. Every command takes `--json` to print one JSON object on stdout for scripts; long
steps show progress bars on stderr otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from runtime.errors import DscompileError, OptionError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0],
                  pretty_exceptions_enable=False)

DEMO_VARIANT, DEMO_SEED = "v3", 0
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Turn user errors into one line and exit code 2; Ctrl-C into exit 130."""
    try:
        yield
    except DscompileError as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


class Bars:
    """Progress bars on stderr (disabled for --json or when stderr is not a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._progress = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "Bars":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                      TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self._progress is None:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)


def _emit(payload: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        for line in lines:
            typer.echo(line)


def _status_line(ok: bool, start: float) -> str:
    cmd = "dscompile " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return f"{'PASSED' if ok else 'FAILED'} | Runtime: {time.perf_counter() - start:.2f}s | Command: {cmd}"


def cache_home() -> Path:
    return Path(os.environ.get("DSCOMPILE_HOME", Path.home() / ".cache" / "dscompile"))


def _parse_ids(text: str) -> list[list[int]]:
    """'1,2,3' -> one prompt; '1,2,3;4,5' -> two prompts."""
    try:
        return [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";") if row.strip()]
    except ValueError:
        raise OptionError(f"--input-ids {text!r} is not a comma-separated list of integers (';' between prompts)") from None


@app.command("make-checkpoint")
def make_checkpoint_cmd(
    out_dir: Path = typer.Argument(..., help="Folder to write (config.json + safetensors)."),
    variant: str = typer.Option("v3", help="Model family: v2, v2-lite or v3."),
    layers: int = typer.Option(2, help="Decoder layers (the first one is dense when there are 2 or more)."),
    experts: int = typer.Option(8, help="Routed experts per MoE layer."),
    hidden: int = typer.Option(64, help="Hidden size."),
    heads: int = typer.Option(4, help="Attention heads."),
    vocab: int = typer.Option(256, help="Vocabulary size."),
    seed: int = typer.Option(0, help="Random seed (same seed, same bytes)."),
    layout: str = typer.Option("published", help="Expert tensors: 'published' (one per expert) or 'stacked' (transformers 5)."),
    shards: int = typer.Option(1, help="Number of safetensors shards (with an index when > 1)."),
    fp8: bool = typer.Option(False, "--fp8", help="Store linear weights as DeepSeek-V3's block-scaled FP8."),
    yarn: bool = typer.Option(True, "--yarn/--no-yarn", help="YaRN rope scaling, as the published models."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Write a random checkpoint in the Hugging Face layout (for tests, demos and benchmarks)."""
    with guard():
        from model.synthetic import make_checkpoint

        if out_dir.exists() and any(out_dir.iterdir()) and not force:
            raise OptionError(f"{out_dir} exists and is not empty (use --force to replace it)")
        path = make_checkpoint(out_dir, variant, layers=layers, experts=experts, hidden=hidden, heads=heads,
                               vocab=vocab, seed=seed, layout=layout, shards=shards, fp8=fp8, yarn=yarn)
        files = sorted(p.name for p in path.iterdir())
        size = sum(p.stat().st_size for p in path.iterdir())
        _emit({"path": str(path), "variant": variant, "files": files, "bytes": size}, as_json,
              [f"wrote {variant} checkpoint to {path} ({len(files)} files, {size / 1e6:.1f} MB)"])


@app.command()
def demo(
    cache_dir: Optional[Path] = typer.Option(None, help="Where the demo checkpoint is generated (default ~/.cache/dscompile)."),
    new_tokens: int = typer.Option(8, help="Tokens to generate."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON report."),
) -> None:
    """Run the main job on an embedded default: a tiny deterministic DeepSeek-V3-style checkpoint."""
    start = time.perf_counter()
    with guard():
        from exporter.eager import EagerEngine
        from model.checkpoint import load_checkpoint
        from model.synthetic import make_checkpoint

        root = cache_dir or cache_home()
        ckpt = root / f"demo-{DEMO_VARIANT}-seed{DEMO_SEED}"
        if not (ckpt / "config.json").is_file():
            make_checkpoint(ckpt, DEMO_VARIANT, seed=DEMO_SEED)
        model = load_checkpoint(ckpt)
        prompts = [[1, 2, 3, 4], [5, 6]]
        eager_tokens = EagerEngine(model).generate(prompts, new_tokens)
        a = model.args
        report = {
            "checkpoint": str(ckpt),
            "model": {"model_type": a.model_type, "layers": a.num_hidden_layers, "experts": a.n_routed_experts,
                      "topk_method": a.topk_method, "params": sum(p.numel() for p in model.parameters())},
            "prompts": prompts,
            "eager_tokens": eager_tokens,
            "cache_values_per_token_per_layer": a.cache_dim,
        }
        ok = all(len(t) == new_tokens for t in eager_tokens)
        lines = [
            f"checkpoint  {ckpt}",
            f"model       {a.model_type}, {a.num_hidden_layers} layers, {a.n_routed_experts} experts "
            f"({a.topk_method}), {report['model']['params'] / 1e6:.2f}M params",
            f"cache       {a.cache_dim} values per token and layer (kv_lora_rank {a.kv_lora_rank} + rope {a.qk_rope_head_dim})",
        ] + [f"eager       prompt {p} -> {t}" for p, t in zip(prompts, eager_tokens)]
        lines.append(_status_line(ok, start))
        _emit({**report, "passed": ok}, as_json, lines)
        if not ok:
            raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
