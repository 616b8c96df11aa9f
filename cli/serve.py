"""`serve`: an OpenAI-compatible HTTP server over one engine folder (needs the `serve` extra)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from dscompile.errors import OptionError
from dscompile.cli import app, guard

EXTRA = ("fastapi", "uvicorn", "prometheus_client")


@app.command()
def serve(
    out: Path = typer.Argument(..., help="Engine folder written by `dscompile export`."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="DSCOMPILE_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' (/health and /metrics stay open)."),
    served_model_name: Optional[str] = typer.Option(None, help="The model name clients send (default: OUT's "
                                                    "folder name)."),
    max_num_seqs: int = typer.Option(8, help="Requests decoded together in one batch."),
    max_queue: int = typer.Option(64, help="Requests that may wait; beyond it the server answers 503."),
    prefill_chunk: int = typer.Option(128, help="Prompt tokens prefilled per engine iteration."),
    max_model_len: Optional[int] = typer.Option(None, help="Prompt + completion tokens per request (default and "
                                                "cap: the engine's context)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads (default: the backend's)."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime, torch or tensorrt."),
    provider: str = typer.Option("auto", help="auto, cpu or cuda (onnxruntime: also tensorrt)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (url, model, limits) once listening."),
) -> None:
    """Serve an engine over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models, /health,
    /metrics, /tokenize, /detokenize; requests batched continuously on one engine thread."""
    with guard():
        missing = [m for m in EXTRA if not _importable(m)]
        if missing:
            raise OptionError(f"dscompile serve needs {', '.join(missing)}: pip install \"dscompile[serve]\"")
        from dscompile.serve.server import ServeOptions, run

        options = ServeOptions(host=host, port=port, api_key=api_key, served_model_name=served_model_name,
                               max_num_seqs=max_num_seqs, max_queue=max_queue, prefill_chunk=prefill_chunk,
                               max_model_len=max_model_len, backend=backend, provider=provider, threads=threads)

        def listening(served) -> None:
            for note in served.text.engine.notes:  # where "auto" settled for less (e.g. CPU), and why
                typer.echo(f"note: {note}", err=True)
            info = {"url": f"http://{host}:{port}", "model": served.name, "max_model_len": served.max_model_len,
                    "max_num_seqs": max_num_seqs, "api_key": api_key is not None, "pid": os.getpid()}
            if as_json:
                typer.echo(json.dumps(info, sort_keys=True))
            else:
                typer.echo(f"serving {served.name!r} on {info['url']}/v1 (max_model_len {served.max_model_len}, "
                           f"{max_num_seqs} sequences; /health turns 200 once warmed up)", err=True)
            sys.stdout.flush()

        run(out, options, on_listening=listening)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
