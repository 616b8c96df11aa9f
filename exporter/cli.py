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

from dscompile.runtime.errors import DscompileError, OptionError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0],
                  pretty_exceptions_enable=False)

DEMO_VARIANT, DEMO_SEED = "v3", 0
DEMO_PROMPTS = ("The compiler folds the up-projections", "Hello")  # two lengths: the second is left-padded
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
        from dscompile.exporter.compare import run_compare
        from dscompile.exporter.eager import EagerEngine
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


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


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
    max_prompt_tokens: int = typer.Option(4096, "--max-prompt-tokens", "--max-new-tokens",
                                          help="Largest prompt: tokens in one step (--max-new-tokens: former name)."),
    max_context: int = typer.Option(16384, help="Largest past + new tokens."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite",
                                         help="Export a checkpoint with NaN/Inf weights (warns) instead of refusing it."),
    graphs_only: bool = typer.Option(False, "--graphs-only",
                                     help="Write the graphs and the manifest only, from the config alone: no weights "
                                          "are read or written (OUT can be inspected, not run)."),
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

        with Bars(not as_json) as bars:
            manifest = export_api(checkpoint, out, dtype=DTYPES[dtype], weights=weights, block_size=block_size,
                                  absorb=absorb, fuse_moe=fuse_moe, verify=verify, opset=opset, target=target,
                                  precision=precision, max_batch=max_batch, max_prompt_tokens=max_prompt_tokens,
                                  max_context=max_context, force=force, allow_nonfinite=allow_nonfinite,
                                  graphs_only=graphs_only, progress=bars)
        lines = []
        for phase, g in manifest["graphs"].items():
            for p in g["passes"]["passes"]:
                err = "" if p.get("max_error") is None else f", verified max |Δ| {p['max_error']:.2g}"
                form = f" ({p['details']['form']})" if p.get("details", {}).get("form") else ""
                lines.append(f"{phase:8s} {p['name']:12s} {p['count']:4d} rewrites{form}{err}")
        for name, f in sorted(manifest["files"].items()):
            lines.append(f"file     {name:24s} {_mb(f['bytes'])}")
        if graphs_only:
            lines.append(f"weights  {manifest['weights']['file']} not written (graph-only; "
                         f"{_mb(manifest['weights']['bytes'])} planned)")
        for phase, g in manifest["graphs"].items():
            lines.append(f"graph    {phase:8s} {sum(g['op_counts'].values())} nodes")
        c = manifest["cache"]
        lines.append(f"cache    {c['bytes_per_token']} bytes per token ({c['mha_equivalent_bytes_per_token']} "
                     f"for the MHA equivalent, {c['compression']}x smaller)")
        lines.append(_status_line(True, start))
        _emit(manifest, as_json, lines)


@app.command()
def run(
    out: Path = typer.Argument(..., help="Engine folder written by `dscompile export`."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt text; repeat it for a batch (left-padded). "
                                     "With --chat: user turns. Read from stdin when neither it nor --input-ids "
                                     "is given and stdin is not a terminal."),
    input_ids: Optional[str] = typer.Option(None, "--input-ids", help="Prompt token ids instead, e.g. 1,2,3 "
                                            "(';' separates prompts)."),
    chat: bool = typer.Option(False, "--chat", help="Apply the chat template. Interactive when stdin is a terminal "
                              "(/reset, /exit); else each stdin line is a user turn. The cache is kept between turns."),
    system: Optional[str] = typer.Option(None, help="System message for --chat."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate per prompt (or per chat turn)."),
    temperature: Optional[float] = typer.Option(None, help="0 for greedy decoding (default: generation_config.json's "
                                                "sampling when it sets do_sample, else greedy)."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass, (0, 1]."),
    top_k: Optional[int] = typer.Option(None, help="Sample from the k most likely tokens (0: all)."),
    repetition_penalty: Optional[float] = typer.Option(None, help="Penalty on tokens already seen (1: none)."),
    seed: int = typer.Option(0, help="Sampling seed (same seed, same text)."),
    stop: list[str] = typer.Option([], "--stop", help="Stop a prompt at this text (not printed); repeatable."),
    eos: Optional[int] = typer.Option(None, help="Also stop a prompt at this token id."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Do not stop at end-of-sequence tokens."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime, torch or tensorrt."),
    provider: str = typer.Option("auto", help="auto, cpu or cuda (onnxruntime: also tensorrt)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads (default: the backend's)."),
    as_json: bool = typer.Option(False, "--json", help="Print text, ids, finish reasons and timings as JSON."),
) -> None:
    """Generate with an exported engine: text in, text out (streamed), token ids, or a chat."""
    start = time.perf_counter()
    with guard():
        from dscompile.runtime.session import TextEngine
        from dscompile.runtime.text import check_utf8, read_utf8

        if input_ids is not None and (prompt or chat):
            raise OptionError("--input-ids takes no --prompt or --chat: give text or token ids")
        for i, text in enumerate(prompt):
            check_utf8(text, f"--prompt {i + 1}")
        if max_new_tokens < 1:
            raise OptionError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        stdin_text = None
        if input_ids is None and not prompt and not chat:
            if sys.stdin.isatty():
                raise OptionError("give --prompt TEXT, --input-ids IDS or --chat (or pipe the prompt into stdin)")
            stdin_text = read_utf8(sys.stdin.buffer.read(), "stdin")
            if not stdin_text.strip():
                raise OptionError("stdin is empty: no prompt to run")
        ids = _parse_ids(input_ids) if input_ids is not None else None
        if ids is not None and not ids:
            raise OptionError("--input-ids is empty")
        llm = TextEngine.open(out, backend=backend, provider=provider, threads=threads)
        if eos is not None:
            llm.eos_ids = tuple(sorted({*llm.eos_ids, eos}))
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       repetition_penalty=repetition_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos)
        llm.sampling(options)  # bad values fail before anything runs
        if chat:
            _chat(llm, prompt, system, options, as_json, start)
        elif ids is not None:
            _run_ids(llm, ids, options, backend, as_json, start)
        else:
            _run_text(llm, prompt or [stdin_text], options, backend, as_json, start)


def _stats(result, backend: str) -> str:
    t = result.timings.to_dict()
    rate = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return (f"{t['prefill_tokens']} prompt tokens in {t['prefill_seconds']:.2f}s ({rate(t['prefill_tokens_per_second'])} "
            f"tokens/s), {t['generated_tokens']} generated in {t['prefill_seconds'] + t['decode_seconds']:.2f}s "
            f"(decode {rate(t['decode_tokens_per_second'])} tokens/s, {backend})")


def _run_ids(llm, prompts: list[list[int]], options: dict, backend: str, as_json: bool, start: float) -> None:
    """Token ids in, token ids out (and their text when the engine has a tokenizer)."""
    stream = (lambda row, piece: None)
    if not as_json and sys.stderr.isatty():
        def stream(row: int, piece: str) -> None:
            typer.echo(f"[{row}] {piece!r}", err=True)
    result = llm.complete(prompts, on_text=stream, **options)
    payload = {"prompts": prompts, "tokens": [c.ids for c in result.completions], "backend": backend,
               **result.to_dict()}
    lines = []
    for c in result.completions:
        lines.append(f"prompt {c.prompt_ids} -> {c.ids}" + (f"  {c.text!r}" if c.text is not None else ""))
    lines.append(_stats(result, backend))
    lines.append(_status_line(True, start))
    _emit(payload, as_json, lines)


def _run_text(llm, prompts: list[str], options: dict, backend: str, as_json: bool, start: float) -> None:
    """Text in, text out: one prompt streams to stdout as it is decoded; a batch prints each in turn."""
    live = not as_json and len(prompts) == 1
    def show(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()
    result = llm.complete(prompts, on_text=show if live else None, **options)
    if as_json:
        _emit({"backend": backend, **result.to_dict()}, True, [])
        return
    if live:
        sys.stdout.write("\n")
    else:
        for i, c in enumerate(result.completions):
            typer.echo(f"--- prompt {i + 1}: {c.prompt!r} ({c.finish_reason})")
            typer.echo(c.text)
    typer.echo(_stats(result, backend), err=True)
    typer.echo(_status_line(True, start), err=True)


def _chat(llm, turns: list[str], system: str | None, options: dict, as_json: bool, start: float) -> None:
    """--chat: the given turns, then stdin's lines, or an interactive loop on a terminal."""
    from dscompile.runtime.errors import DscompileError
    from dscompile.runtime.text import read_utf8

    interactive = sys.stdin.isatty() and not as_json
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    record = []

    def turn(text: str) -> None:
        messages.append({"role": "user", "content": text})
        run = llm.chat_run(messages, options)
        for _, piece in run:
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        done = run.result.completions[0]
        messages.append({"role": "assistant", "content": done.text or ""})
        record.append({"user": text, "reply": done.text, "ids": done.ids, "finish_reason": done.finish_reason,
                       "cached_tokens": run.reused_tokens, "timings": run.result.timings.to_dict()})
        if not as_json:
            sys.stdout.write("\n")
            typer.echo(f"[{run.reused_tokens} cached, {_stats(run.result, 'chat')}]", err=True)

    def scripted(text: str) -> None:
        if not as_json:
            typer.echo(f">>> {text}", err=True)
        turn(text)

    for text in turns:
        scripted(text)
    if not interactive:
        if not sys.stdin.isatty():
            for line in read_utf8(sys.stdin.buffer.read(), "stdin").splitlines():
                if line.strip():
                    scripted(line)
        if not record:
            raise OptionError("--chat got no turn: give --prompt or pipe lines into stdin")
        if as_json:
            _emit({"turns": record}, True, [])
        else:
            typer.echo(_status_line(True, start), err=True)
        return
    typer.echo("chat: /reset starts over, /exit (or Ctrl-D) quits", err=True)
    while True:
        sys.stderr.write(">>> ")
        sys.stderr.flush()
        raw = sys.stdin.buffer.readline()
        if not raw or raw.strip() == b"/exit":
            break
        try:
            text = read_utf8(raw, "input").rstrip("\n")
            if text.strip() == "/reset":
                messages[:] = base
                llm.reset()
                typer.echo("(conversation reset)", err=True)
            elif text.strip():
                turn(text)
        except DscompileError as err:  # a bad turn does not end the session
            messages[:] = messages[:-1] if messages and messages[-1]["role"] == "user" else messages
            typer.echo(f"error: {str(err).splitlines()[0]}", err=True)


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
            report = compare_api(checkpoint, out, backend=backend, provider=provider, decode_steps=decode_steps,
                                 batch=batch, prompt_len=prompt_len, seed=seed, atol=atol, rtol=rtol, plot=plot,
                                 progress=bars)
        from dscompile.exporter.compare import scheme_of
        from dscompile.runtime.manifest import load_manifest

        scheme = scheme_of(load_manifest(out))
        lines = [f"{'step':>4} {'graph':8s} {'max abs':>10} {'max rel':>10} {'mean abs':>10} {'cache max':>10}  result"]
        if scheme is not None:
            lines.insert(0, f"vs eager with the same {scheme.name} weights (the lowering's distance, judged)")
        for s in report["steps"]:
            lines.append(f"{s['step']:>4} {s['graph']:8s} {s['logits']['max_abs']:10.3g} {s['logits']['max_rel']:10.3g} "
                         f"{s['logits']['mean_abs']:10.3g} {s['cache']['max_abs']:10.3g}  "
                         f"{'ok' if s['passed'] else 'OVER (atol %.3g)' % s['atol']}")
        layers = report.get("layers")
        if layers:
            first = layers.get("first_diverging_layer")
            if first is not None:
                lines.append(f"first diverging layer: {first} (hidden state after block {first} is out of tolerance)")
            elif not report["passed"]:
                lines.append("first diverging layer: none in a fresh debug build of this checkpoint: OUT is not what "
                             "it compiles to (modified files, other weights or other options)")
            else:
                lines.append("first diverging layer: none (every block's hidden state is within tolerance)")
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


@app.command()
def inspect(
    out: Path = typer.Argument(..., help="Engine folder."),
    trt_compat: bool = typer.Option(False, "--trt-compat", help="Check every ONNX node against TensorRT's parser."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show what an engine folder holds: graphs, IO, op counts, weights, cache, passes."""
    with guard():
        from dscompile.runtime.manifest import read_manifest
        from dscompile.runtime.weights import resident_estimate

        manifest = read_manifest(out, graphs_only_ok=True)
        c, cfg = manifest["cache"], manifest["model"]
        info = {
            "model": {k: cfg.get(k) for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                             "kv_lora_rank", "n_routed_experts", "num_experts_per_tok", "topk_method")},
            "dtype": manifest["dtype"], "target": manifest["target"], "opset": manifest["opset"],
            "limits": manifest["limits"], "cache": c, "weights": manifest["weights"],
            "graphs_only": bool(manifest.get("graphs_only")),
            "graphs": {name: {k: g.get(k) for k in ("file", "inputs", "outputs", "op_counts", "passes", "moe_lowering",
                                                    "in_place")}
                       for name, g in manifest["graphs"].items()},
        }
        lines = [f"model    {cfg['model_type']}, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
                 f"{cfg.get('n_routed_experts')} experts; dtype {manifest['dtype']}; opset {manifest['opset']}",
                 f"limits   {manifest['limits']}",
                 f"cache    {c['bytes_per_token']} bytes/token vs {c['mha_equivalent_bytes_per_token']} for MHA "
                 f"({c['compression']}x smaller)",
                 f"weights  {_mb(manifest['weights'].get('bytes', 0))} in {manifest['weights'].get('file')}"
                 + (" (planned, not written: a graph-only export)" if info["graphs_only"] else "")]
        weights = manifest["weights"]
        layouts = weights.get("layouts")
        if layouts is not None and weights.get("parameter_bytes"):
            lines.append(f"         {weights['bytes'] / weights['parameter_bytes']:.3f}x the parameter bytes; beyond one "
                         f"copy: second layouts {_mb(layouts['second_layout_bytes'])}, computed by passes "
                         f"{_mb(layouts['computed_bytes'])}")
        quant = manifest.get("quantization")
        if quant:
            info["quantization"] = quant
            errors = quant.get("weights_error") or {}
            worst = max(errors.items(), key=lambda kv: kv[1]["max_rel"], default=None)
            lines.append(f"quant    {quant['scheme']}, block {quant['block_size']} ({quant['bits_per_weight']:g} bits "
                         f"per weight with scales); kernels {quant['accuracy_level']} (accuracy_level); float32 "
                         f"weights kept {_mb(quant['float_weight_bytes'])}"
                         + (f"; worst weight error {worst[1]['max_rel']:.3f} of its max |w| ({worst[0]})" if worst else ""))
        info["files"] = manifest.get("files", {})
        for name, f in sorted(info["files"].items()):
            lines.append(f"file     {name:24s} {_mb(f['bytes'])}")
        info["resident_estimate"] = resident_estimate(out, manifest)
        for backend, r in info["resident_estimate"].items():
            lines.append(f"memory   {backend:16s} {_mb(r['bytes'])} of weights ({r['how']})")
        for name, g in info["graphs"].items():
            lines.append(f"graph    {name}: {g['file']}, {sum((g['op_counts'] or {}).values())} nodes")
            ins = ", ".join(f"{i['name']}{i['shape']}" for i in g["inputs"][:3])
            lines.append(f"  inputs  {ins}, + {len(g['inputs']) - 3} cache tensors")
            top = sorted((g["op_counts"] or {}).items(), key=lambda kv: -kv[1])[:8]
            lines.append("  ops     " + ", ".join(f"{k} {v}" for k, v in top))
            for p in g["passes"]["passes"]:
                lines.append(f"  pass    {p['name']}: {p['count']} rewrites")
            if g.get("in_place"):
                lines.append(f"  in place {g['in_place']['file']}: the cache written in capacity buffers "
                             f"(TensorScatter x{g['in_place']['op_counts'].get('TensorScatter', 0)}; ONNX Runtime CPU)")
        if trt_compat:
            from dscompile.exporter.trt_compat import check_out_dir

            info["trt_compat"] = compat = check_out_dir(out)
            table = compat["table"]
            lines.append(f"tensorrt checked against TensorRT {table['tensorrt_version']}'s ONNX parser ({table['source']})")
            for name, result in sorted(compat["files"].items()):
                verdict = "compatible" if result["compatible"] else "NOT compatible"
                lines.append(f"  {name}: {verdict}, {result['errors']} error(s), {result['warnings']} warning(s)")
                seen = set()
                for f in result["findings"]:
                    key = (f["severity"], f["op_type"], f["reason"])
                    if key not in seen:  # one line per distinct problem, not per node
                        seen.add(key)
                        lines.append(f"    {f['severity']:7s} {f['op_type']}: {f['reason']}")
        _emit(info, as_json, lines)


@app.command()
def bench(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint folder (default: the bench config, generated once)."),
    config: Optional[str] = typer.Option(None, help="'bench': V2-Lite dimensions, 4 layers, 16 experts (the default)."),
    contexts: str = typer.Option("128,1024,4096", help="Decode contexts (past tokens), comma-separated."),
    batch: str = typer.Option("1,4", "--batch", help="Decode batch sizes, comma-separated."),
    repeats: int = typer.Option(5, help="Timed runs per measurement (the median is reported)."),
    warmup: int = typer.Option(2, help="Untimed runs before each measurement."),
    prefill_tokens: int = typer.Option(128, help="Prompt length of the prefill measurement (batch 1)."),
    systems: str = typer.Option(",".join(("eager", "hf", "hf-onnx", "ours", "ours-absorb-none", "ours-no-fuse-moe")),
                                help="Systems to measure, comma-separated."),
    threads: int = typer.Option(2, help="Threads for torch and ONNX Runtime (intra-op)."),
    engine: list[str] = typer.Option([], "--engine", help="NAME=FOLDER: also measure an engine folder exported elsewhere "
                                     "(a quantized one is also run alternately against ours)."),
    llama_cpp: list[str] = typer.Option([], "--llama-cpp", help="NAME=LLAMA_BENCH:GGUF: also measure llama.cpp's "
                                        "llama-bench on a GGUF of the bench model."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of decode latency vs context per system."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Measure prefill and decode latency of eager, transformers, and our engines against the bandwidth floor.

    Everything is measured in one run with the same threads; the table gives each median next to
    its floor (bytes the step must read / the read bandwidth measured just before each run) and the
    issue's targets, whose ratios come from ours and transformers run alternately.
    """
    start = time.perf_counter()
    with guard():
        from dscompile.exporter.bench import (BenchOptions, parse_engines, parse_ints, parse_llama_cpp, parse_systems, plot as write_plot,
                                    run_bench, table_lines)

        if config is not None and config != "bench":
            raise OptionError(f"--config {config!r}: the only built-in config is 'bench'")
        if config is not None and checkpoint is not None:
            raise OptionError("give CHECKPOINT or --config bench, not both")
        if checkpoint is not None and not (checkpoint / "config.json").is_file():
            raise OptionError(f"{checkpoint}: no config.json (not a checkpoint folder)")
        options = BenchOptions(contexts=parse_ints(contexts, "--contexts"), batches=parse_ints(batch, "--batch"),
                               repeats=repeats, warmup=warmup, prefill_tokens=prefill_tokens,
                               systems=parse_systems(systems), threads=threads, extra_engines=parse_engines(engine),
                               llama_cpp=parse_llama_cpp(llama_cpp))
        options.check()
        with Bars(not as_json) as bars:
            result = run_bench(checkpoint, cache_home(), options, progress=bars)
        if plot is not None:
            write_plot(result, plot)
            result["plot"] = str(plot)
        lines = table_lines(result)
        if plot is not None:
            lines.append(f"plot    {plot}")
        lines.append(_status_line(True, start))
        result["command"] = "dscompile " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        _emit(result, as_json, lines)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
