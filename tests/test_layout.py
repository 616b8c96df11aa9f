"""The layout holds: imports run one way between the stages, and long files say why they are one file.

The stages in the order data flows, and what each may import from the package besides itself and
the base (dscompile.errors, dscompile.tolerance, dscompile.lazy: they import nothing of the package,
every stage may import them):

    dscompile.model       checkpoints in                      nothing
    dscompile.runtime     engines from OUT alone               the op set's reference calls model/routing.py
    dscompile.capture     torch.export of the contract's step  model, the runtime's contract
    dscompile.passes      rewrites of the captured program     the op set (dscompile.runtime.ops)
    dscompile.lowering    ONNX and TensorRT                    model, capture, passes' op set, runtime
    dscompile.verify      engines against eager                model, capture, lowering, runtime
    dscompile.exporter    the export job, OUT                  every stage above
    dscompile (api)       the Python API                       everything
    dscompile.cli         the command line                     the API and what it reports from
    dscompile.bench       measurements                         every stage, not the CLI
    dscompile.serve       the HTTP server                      the runtime

The runtime comes second because it is the lowest layer after the model: an engine never imports
the compiler, while the compiler targets the runtime's op set and contract.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"model": "dscompile.model", "runtime": "dscompile.runtime", "capture": "dscompile.capture",
           "passes": "dscompile.passes", "lowering": "dscompile.lowering", "verify": "dscompile.verify",
           "exporter": "dscompile.exporter", "cli": "dscompile.cli", "bench": "dscompile.bench",
           "serve": "dscompile.serve",
           "dscompile": "dscompile"}
BASE = ("dscompile.errors", "dscompile.tolerance", "dscompile.lazy", "dscompile.dtypes")
STAGES = ("dscompile.model", "dscompile.capture", "dscompile.passes", "dscompile.lowering", "dscompile.verify",
          "dscompile.exporter")

# module prefix -> prefixes of what it may import (itself and the base always allowed)
ALLOWED = {
    "dscompile.model": (),
    "dscompile.runtime": ("dscompile.model.routing",),
    "dscompile.capture": ("dscompile.model", "dscompile.runtime.contract"),
    "dscompile.passes": ("dscompile.runtime.ops",),
    "dscompile.lowering": ("dscompile.model", "dscompile.capture", "dscompile.runtime"),
    "dscompile.verify": ("dscompile.model", "dscompile.capture", "dscompile.lowering", "dscompile.runtime"),
    "dscompile.exporter": (*STAGES, "dscompile.runtime"),
    "dscompile.cli": ("dscompile.api", "dscompile.inspect", *STAGES, "dscompile.runtime", "dscompile.bench",
                      "dscompile.serve"),
    "dscompile.bench": (*STAGES, "dscompile.runtime"),
    "dscompile.serve": ("dscompile.runtime",),
}

# Files over LONG lines, and why each is one file.
LONG = 500
LONG_FILES = {
    "passes/shard.py": "one pass, one file (as every pass): the plan, what it splits (found backward from the "
                       "attention, MLP and MoE anchors) and the forward rewrite share one table of op rules",
}


def modules() -> dict[str, Path]:
    """Every module of the package by its installed name."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(path: Path, name: str) -> set[str]:
    """The package modules `path` imports, at any depth (lazy imports in functions count)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)  # `from pkg import submodule`
    known = modules()
    return {m for m in out if m.startswith("dscompile") and m in known}


API = ("dscompile", "dscompile.api", "dscompile.inspect", "dscompile.__main__")


def layer_of(name: str) -> str | None:
    """The layer `name` belongs to; None for the base and the API. A module in no layer is an error."""
    if name in BASE or name in API:
        return None  # the base imports nothing; the API may import everything
    layers = [p for p in ALLOWED if name == p or name.startswith(p + ".")]
    assert layers, f"{name} is in no layer: add it to BASE, API or ALLOWED in tests/test_layout.py"
    return max(layers, key=len)


def test_imports_run_one_way():
    wrong = []
    for name, path in modules().items():
        imported = imports_of(path, name)
        if name in BASE:
            wrong += [f"{name} -> {m} (the base imports nothing of the package)" for m in imported if m not in BASE]
            continue
        layer = layer_of(name)
        if layer is None:
            continue
        allowed = (layer, *BASE, *ALLOWED[layer])
        wrong += [f"{name} -> {m}" for m in sorted(imported)
                  if not any(m == a or m.startswith(a + ".") for a in allowed)]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path, monkeypatch):
    """The checker itself: a model module importing runtime is reported (so the test above can fail)."""
    fake = tmp_path / "model"
    fake.mkdir()
    (fake / "bad.py").write_text("from dscompile.runtime.engine import Engine\n"
                                 "def f():\n    import dscompile.passes.fuse_moe\n")
    got = imports_of(fake / "bad.py", "dscompile.model.bad")
    assert got == {"dscompile.runtime.engine", "dscompile.passes.fuse_moe"}
    layer = layer_of("dscompile.model.bad")
    assert layer == "dscompile.model" and not any(m.startswith(("dscompile.model", *BASE)) for m in got)


def test_long_files_say_why_they_are_one_file():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules().values()}
    unexplained = sorted(f"{f} ({n} lines)" for f, n in lengths.items() if n > LONG and f not in LONG_FILES)
    assert not unexplained, f"files over {LONG} lines without a reason in LONG_FILES: {unexplained}"
    stale = sorted(f for f in LONG_FILES if lengths.get(f, 0) <= LONG)
    assert not stale, f"LONG_FILES lists files that are no longer long: {stale}"
