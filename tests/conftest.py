"""Shared test helpers: named tolerances, error reports, and tiny checkpoints and their exports built once per
session (fixtures: tests share them through here, never by importing each other)."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from dscompile.tolerance import OP_TOLERANCE, TOLERANCE, bound


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


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(variant, **options) -> path of a tiny checkpoint, generated once per set of options."""
    from dscompile.model.synthetic import make_checkpoint

    cache: dict[tuple, Path] = {}

    def make(variant: str = "v3", **kw) -> Path:
        key = (variant, tuple(sorted(kw.items())))
        if key not in cache:
            name = "-".join([variant] + [f"{k}{v}" for k, v in sorted(kw.items())])
            cache[key] = make_checkpoint(tmp_path_factory.mktemp("ckpt") / name, variant, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def export_limits():
    """The engine limits of `exported`'s engines (room for the chat conversations of
    tests/test_text_path.py, which runs the v3 one)."""
    from dscompile.capture import Limits

    return Limits(max_batch=8, max_prompt_tokens=128, max_context=256)


@pytest.fixture(scope="session")
def exported_ckpt(make_ckpt):
    """exported_ckpt(variant) -> the tiny checkpoint of `variant` that `exported` exports (two layers,
    eight experts)."""
    return lambda variant: make_ckpt(variant, layers=2, experts=8)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, exported_ckpt, export_limits):
    """exported(variant, dtype="float32") -> OUT of `exported_ckpt(variant)` within `export_limits`,
    exported once per session (~15-30 s each). That an export is deterministic (byte-identical OUT)
    is tests/test_reliability.py's check, across processes."""
    from dscompile.exporter.export import export_checkpoint
    from dscompile.exporter.options import ExportOptions

    cache: dict[tuple, Path] = {}

    def export(variant: str, dtype: str = "float32") -> Path:
        key = (variant, dtype)
        if key not in cache:
            out = tmp_path_factory.mktemp("out") / f"{variant}-{dtype}"
            export_checkpoint(exported_ckpt(variant), out, ExportOptions.within(export_limits, dtype=dtype))
            cache[key] = out
        return cache[key]

    return export


@pytest.fixture(scope="session")
def small_limits():
    """The cheapest export's limits (the CLI's `small_flags`)."""
    from dscompile.capture import Limits

    return Limits(max_batch=2, max_prompt_tokens=16, max_context=32)


@pytest.fixture(scope="session")
def small_export(tmp_path_factory, one_layer_ckpt, small_limits):
    """OUT of `one_layer_ckpt` within `small_limits`, exported once per session: the cheapest engine,
    for tests whose point does not depend on the model's size. Copy it before changing it."""
    from dscompile.exporter.export import export_checkpoint
    from dscompile.exporter.options import ExportOptions

    out = tmp_path_factory.mktemp("small") / "out"
    export_checkpoint(one_layer_ckpt, out, ExportOptions.within(small_limits))
    return out


@pytest.fixture(scope="session")
def small_flags(small_limits):
    """`dscompile export` options for `small_limits`: a CLI export and an API export with them agree."""
    return ["--max-batch", str(small_limits.max_batch), "--max-prompt-tokens", str(small_limits.max_prompt_tokens),
            "--max-context", str(small_limits.max_context)]


@pytest.fixture(scope="session")
def one_layer_ckpt(make_ckpt):
    """The smallest checkpoint: v3 with one layer, four experts, hidden 32, vocab 64. Exported with
    `small_limits`: weights.bin ~180 KB, each .pt2 ~250 KB."""
    return make_ckpt("v3", layers=1, experts=4, hidden=32, vocab=64)


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


@pytest.fixture(scope="session")
def dscompile_argv():
    """dscompile_argv(*args) -> the argv of the `dscompile` command in a subprocess of this interpreter."""

    def argv(*args) -> list[str]:
        return [sys.executable, "-m", "dscompile", *map(str, args)]

    return argv


# Scheduling under `-n 2` (pyproject: `--dist loadgroup`). A work unit runs whole on one worker, so its
# module and session fixtures are built once: each test file is a unit, and the files that use one of
# the session's shared exports form one unit with the others that use it (fixtures are per worker, so
# two workers would each build the same exports). Which files share is read from the fixtures each
# test requests, not from a list of names, so a renamed or new file cannot escape it. Files marked
# `long` (they export engines: minutes each) go out first, so that the run does not end on one.
SHARED_EXPORTS = ("exported", "small_export")


def _shared_exports(item) -> set[str]:
    """The session's shared exports that `item` requests (directly or through other fixtures)."""
    used = set()
    for name in SHARED_EXPORTS:
        defs = item._fixtureinfo.name2fixturedefs.get(name, ())
        if defs and defs[-1].func.__module__ == __name__:  # this module's fixture, not a file's own of that name
            used.add(name)
    return used


def work_units(items) -> dict:
    """item -> the name of its work unit: its file's path, or the shared exports its file's tests use
    (files that share any export are one unit, transitively)."""
    files: dict = {}
    for item in items:
        files.setdefault(item.path, set()).update(_shared_exports(item))
    unit = {name: name for name in SHARED_EXPORTS}

    def find(name: str) -> str:
        while unit[name] != name:
            name = unit[name]
        return name

    for names in files.values():  # a file using two shared exports joins their units
        first, *rest = sorted(names) or [None]
        for other in rest:
            unit[find(other)] = find(first)
    rel = {path: path.relative_to(Path(__file__).parent).as_posix() for path in files}
    return {item: (f"shares-{find(min(files[item.path]))}" if files[item.path] else rel[item.path])
            for item in items}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Long files first, each test in its work unit; Triton through its CPU interpreter without a GPU."""
    units = work_units(items)
    long_units = {units[item] for item in items if item.get_closest_marker("long")}
    items.sort(key=lambda item: units[item] not in long_units)  # stable: files and tests keep their order
    for item in items:
        item.add_marker(pytest.mark.xdist_group(units[item]))
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
