"""The tests' fixtures: tiny checkpoints, their captures and exports, built once per session (tests share
them through here, never by importing each other; plain helper functions are in helpers.py), and the
scheduling of the test files over pytest-xdist workers."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import VARIANTS

# Triton runs compiled or interpreted, one or the other per process, fixed when it is first imported
# (runtime/ops/triton_kernels.py). Decided here, before any test module imports it: interpreted on CPU
# tensors where there is no GPU, compiled where there is one, unless the run sets TRITON_INTERPRET.
if "TRITON_INTERPRET" in os.environ:
    os.environ["DSCOMPILE_TRITON_MODE_FROM_USER"] = "interpret" if os.environ["TRITON_INTERPRET"] == "1" else "compile"
elif not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
assert "triton" not in sys.modules, "Triton was imported before tests/conftest.py chose its mode"



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
def captured_models(make_ckpt):
    """{variant: the eager model} of the three-layer, eight-expert tiny checkpoints that `captured` captures."""
    from dscompile.model.checkpoint import load_checkpoint

    return {v: load_checkpoint(make_ckpt(v, layers=3, experts=8)) for v in VARIANTS}


@pytest.fixture(scope="session")
def captured(captured_models):
    """{(variant, phase): ExportedProgram} of `captured_models`, captured once per session (one program serves
    both phases). Passes return new programs; a test that edits one in place copies it first."""
    from dscompile.capture import capture

    programs = {v: capture(m) for v, m in captured_models.items()}
    return {(v, phase): programs[v] for v in VARIANTS for phase in ("prefill", "decode")}


@pytest.fixture(scope="session")
def export_limits():
    """The engine limits of `exported`'s engines (room for the chat conversations of
    tests/e2e/test_text_path.py, which runs the v3 one)."""
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
    is tests/e2e/test_reliability.py's check, across processes."""
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


@pytest.fixture(scope="session")
def dscompile_argv():
    """dscompile_argv(*args) -> the argv of the `dscompile` command in a subprocess of this interpreter."""

    def argv(*args) -> list[str]:
        return [sys.executable, "-m", "dscompile", *map(str, args)]

    return argv


# Scheduling under `-n 2` (pyproject: `--dist loadfile`). A work unit runs whole on one worker, so its
# module and session fixtures are built once: each test file is a unit, and the files that use one of
# the session's shared exports (or captures) form one unit (fixtures are per worker, so two workers
# would each build the same exports). xdist's controller splits the work before any test is
# collected, so it reads which file shares what from the files' source (the fixtures their functions
# take); every worker then checks that reading against the fixtures its tests really request, and
# stops the run where a test uses a shared export its file's source does not show, so a renamed or
# new file cannot escape it. Files marked `long`
# (they export engines: minutes each) go out first, so that the run does not end on one.
SHARED_EXPORTS = ("exported", "small_export", "captured")
TESTS = Path(__file__).resolve().parent


def shared_in_source(path: Path) -> set[str]:
    """The shared exports a test file's functions take as arguments, read from its source; a fixture
    the file defines under the same name shadows this module's."""
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    taken = {a.arg for f in functions for a in f.args.args}
    return (taken & set(SHARED_EXPORTS)) - {f.name for f in functions}


def shared_by_fixtures(item) -> set[str]:
    """The shared exports `item` requests (directly or through other fixtures), as pytest resolved them."""
    return {name for name in SHARED_EXPORTS
            if (defs := item._fixtureinfo.name2fixturedefs.get(name)) and defs[-1].func.__module__ == __name__}


def work_units(shared: dict[str, set[str]]) -> dict[str, str]:
    """{test file: its work unit}: the file itself, or `shares-NAME` for the files that share exports
    (transitively: a file that uses two shared exports joins their files into one unit)."""
    unit = {name: name for name in SHARED_EXPORTS}

    def find(name: str) -> str:
        while unit[name] != name:
            name = unit[name]
        return name

    for names in shared.values():
        first, *rest = sorted(names) or [None]
        for other in rest:
            unit[find(other)] = find(first)
    return {f: f"shares-{find(min(names))}" if names else f for f, names in shared.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with the files that share an export as one unit (work_units, from the source)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    root = config.rootpath
    units = work_units({p.relative_to(root).as_posix(): shared_in_source(p) for p in sorted(TESTS.rglob("test_*.py"))})

    class SharedExportsScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return units.get(path, path)

    return SharedExportsScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Check the scheduler's reading of the sources; long files first."""
    in_source = {path: shared_in_source(path) for path in {item.path for item in items}}
    for item in items:
        if missed := shared_by_fixtures(item) - in_source[item.path]:
            raise pytest.UsageError(
                f"{item.nodeid} uses the shared exports {sorted(missed)}, which the scheduler does not read from "
                "its file: take the fixture as an argument of a function of that file (tests/conftest.py, Scheduling)")
    units = work_units(in_source)
    long_units = {units[item.path] for item in items if item.get_closest_marker("long")}
    items.sort(key=lambda item: units[item.path] not in long_units)  # stable: files and tests keep their order
