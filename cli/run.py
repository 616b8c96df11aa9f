"""`run`: text in and text out (streamed), token ids, or a chat, with an engine folder."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from dscompile.errors import DscompileError, OptionError, first_line
from dscompile.cli import _emit, _status_line, app, guard


def _parse_ids(text: str) -> list[list[int]]:
    """'1,2,3' -> one prompt; '1,2,3;4,5' -> two prompts."""
    try:
        return [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";") if row.strip()]
    except ValueError:
        raise OptionError(f"--input-ids {text!r} is not a comma-separated list of integers (';' between prompts)") from None


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
    tf32: bool = typer.Option(False, "--tf32", help="Let ONNX Runtime's CUDA provider compute float32 GEMMs in TF32 "
                              "(10-bit mantissa inputs; default: IEEE float32)."),
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
        llm = TextEngine.open(out, backend=backend, provider=provider, threads=threads, tf32=tf32)
        for note in llm.engine.notes:  # where "auto" settled for less (e.g. CPU), and why
            typer.echo(f"note: {note}", err=True)
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
    def stream(row: int, piece: str) -> None:  # pieces as they come, on a terminal
        typer.echo(f"[{row}] {piece!r}", err=True)

    live = not as_json and sys.stderr.isatty()
    result = llm.complete(prompts, on_text=stream if live else None, **options)
    payload = {"prompts": prompts, "tokens": [c.ids for c in result.completions], "backend": backend,
               "device": str(llm.engine.device), **result.to_dict()}
    lines = []
    for c in result.completions:
        lines.append(f"prompt {c.prompt_ids} -> {c.ids}" + (f"  {c.text!r}" if c.text is not None else ""))
    lines.append(_stats(result, f"{backend} on {llm.engine.device}"))
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
        _emit({"backend": backend, "device": str(llm.engine.device), **result.to_dict()}, True, [])
        return
    if live:
        sys.stdout.write("\n")
    else:
        for i, c in enumerate(result.completions):
            typer.echo(f"--- prompt {i + 1}: {c.prompt!r} ({c.finish_reason})")
            typer.echo(c.text)
    typer.echo(_stats(result, f"{backend} on {llm.engine.device}"), err=True)
    typer.echo(_status_line(True, start), err=True)


def _chat(llm, turns: list[str], system: str | None, options: dict, as_json: bool, start: float) -> None:
    """--chat: the given turns, then stdin's lines, or an interactive loop on a terminal."""
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

    for text in turns:
        turn(text)
    if not interactive:
        if not sys.stdin.isatty():
            for line in read_utf8(sys.stdin.buffer.read(), "stdin").splitlines():
                if line.strip():
                    turn(line)
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
            if messages and messages[-1]["role"] == "user":  # the turn that failed is not part of the conversation
                messages.pop()
            typer.echo(f"error: {first_line(err)}", err=True)
