"""Compile DeepSeek-V2/V3 checkpoints into verified inference engines, and run them.

The command line is a thin layer over the Python API (dscompile/api.py). Each command's
docstring is its help. Errors a user can cause (DscompileError) print one line on stderr and exit
2, without a traceback. Every command takes `--json` to print one JSON object on stdout for
scripts; long steps show progress bars on stderr otherwise.

    make_checkpoint.py  make-checkpoint
    demo.py      demo
    export.py    export
    run.py       run (text, token ids, chat)
    compare.py   compare
    inspect.py   inspect
    eval.py      eval (perplexity, KL divergence on a text)
    bench.py     bench
    serve.py     serve (OpenAI-compatible HTTP server; the serve extra)
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import time
from typing import Any, Iterator

import typer

from dscompile.errors import DscompileError, first_line
from dscompile.runtime.home import cache_home  # noqa: F401 - the commands' cache folder

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0],
                  pretty_exceptions_enable=False)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Turn user errors into one line and exit code 2; Ctrl-C into exit 130."""
    try:
        yield
    except DscompileError as err:
        _fail(first_line(err))
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


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def main() -> None:  # pragma: no cover - console entry point
    app()


# The commands register themselves on `app` when their modules are imported, in this order.
from dscompile.cli import make_checkpoint  # noqa: E402,F401,I001
from dscompile.cli import demo  # noqa: E402,F401
from dscompile.cli import export  # noqa: E402,F401
from dscompile.cli import run  # noqa: E402,F401
from dscompile.cli import compare  # noqa: E402,F401
from dscompile.cli import inspect  # noqa: E402,F401
from dscompile.cli import bench  # noqa: E402,F401
from dscompile.cli import eval  # noqa: E402,F401,A004
from dscompile.cli import serve  # noqa: E402,F401
