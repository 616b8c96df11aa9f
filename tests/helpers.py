"""Plain helpers the tests share (fixtures are in conftest.py): the named tolerances as assertions,
running the `dscompile` command in this process, and reading a captured program."""

from __future__ import annotations

import subprocess
import sys
import traceback

import torch

from dscompile.tolerance import OP_TOLERANCE, TOLERANCE, bound

VARIANTS = ("v2", "v2-lite", "v3")  # the tiny checkpoints of the three routing methods (model/synthetic.py)


def assert_close(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = "",
                 table: dict = TOLERANCE) -> None:
    """Assert the named tolerance of `dtype`; the failure message reports max and mean error."""
    actual, ref = actual.detach().double().cpu(), ref.detach().double().cpu()
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite output"
    err = (actual - ref).abs()
    limit = bound(dtype, float(ref.abs().max()) if ref.numel() else 0.0, table)
    max_err = float(err.max()) if err.numel() else 0.0
    mean_err = float(err.mean()) if err.numel() else 0.0
    assert max_err <= limit, f"{what}: max |Δ| {max_err:.3g} > {limit:.3g} (mean |Δ| {mean_err:.3g})"


def assert_op_close(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """assert_close with the single-op table (an op against its reference implementation)."""
    assert_close(actual, ref, dtype, what, table=OP_TOLERANCE)


def run_here(*args, env: dict | None = None, input: bytes | str | None = None,
             text: bool = True) -> subprocess.CompletedProcess:
    """The `dscompile` command's own entry point run in this process (typer's CliRunner), as the
    CompletedProcess a `python -m dscompile ...` subprocess would give: exit code, stdout, stderr
    (str, or bytes with text=False). A subprocess costs seconds of interpreter, torch and ONNX
    start-up each; tests that are about the process itself run the real one. `env` is set in
    os.environ for the run; `input` is stdin (not a terminal); sys.argv is the command's, as in the
    process (the PASSED/FAILED line quotes it). An exception that escapes the command is rendered as
    a traceback into stderr, so a test's "no Traceback" check sees it."""
    from typer.testing import CliRunner

    from dscompile.cli import app

    argv = [str(a) for a in args]
    saved = sys.argv
    sys.argv = ["dscompile", *argv]
    try:
        result = CliRunner().invoke(app, argv, input=input, env=env)
    finally:
        sys.argv = saved
    stderr = result.stderr_bytes
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception)).encode()
    stdout = result.stdout_bytes
    if text:
        return subprocess.CompletedProcess(argv, result.exit_code, stdout.decode(), stderr.decode(errors="replace"))
    return subprocess.CompletedProcess(argv, result.exit_code, stdout, stderr)


def program_outputs(program, inputs: tuple):
    """(logits, present) of an ExportedProgram's module on `inputs`, without autograd."""
    with torch.no_grad():
        logits, present = program.module()(*inputs)
    return logits, present


def call_targets(program) -> list:
    """The targets of a program's call_function nodes, in graph order."""
    return [n.target for n in program.graph.nodes if n.op == "call_function"]
