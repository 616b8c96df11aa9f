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

    cache: dict[tuple, Path] = {}

    def export(variant: str, dtype: str = "float32") -> Path:
        key = (variant, dtype)
        if key not in cache:
            out = tmp_path_factory.mktemp("out") / f"{variant}-{dtype}"
            export_checkpoint(exported_ckpt(variant), out, dtype=dtype, limits=export_limits)
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

    out = tmp_path_factory.mktemp("small") / "out"
    export_checkpoint(one_layer_ckpt, out, limits=small_limits)
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


# The longest test files (measured: minutes of exports each), run first: with `-n 2` each file runs
# whole on one worker (`--dist loadfile`), and a long file started last leaves the other worker idle.
LONGEST_FIRST = ("test_cli.py", "test_text_path.py", "test_quant.py", "test_streaming.py", "test_cli_errors.py",
                 "test_graphs_only.py", "test_capture_and_absorb.py", "test_fuse_moe.py", "test_structural_match.py",
                 "test_reliability.py", "test_fuzz_configs.py", "test_frontend_transformers.py",
                 "test_weights.py", "test_bench.py", "test_ort_engine.py", "test_lower.py", "test_model_parity.py")


# Files that share the session's exports run on one worker, as one work unit: fixtures are per
# worker, and with `-n 2` files spread over both workers would each build the same exports there.
SHARED_EXPORTS = {
    "exported": ("test_lower.py", "test_ort_engine.py", "test_cli_errors.py", "test_model_parity.py",
                 "test_text_path.py", "test_fp16_generation.py", "test_frontends_agree.py"),
    "small_export": ("test_reliability.py", "test_weights.py"),
}
WORK_UNIT = {name: unit for unit, names in SHARED_EXPORTS.items() for name in names}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (each file whole on one worker), with each SHARED_EXPORTS group of files one unit."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedExportsScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return WORK_UNIT.get(path.rsplit("/", 1)[-1], path)

    return SharedExportsScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Run the longest files first; make sure Triton runs through its CPU interpreter without a GPU."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
