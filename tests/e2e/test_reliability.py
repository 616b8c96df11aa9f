"""Atomic outputs, reproducibility across processes, and what an OUT or a checkpoint may not make us run.

- Atomic: an `export --force` is killed with SIGKILL while lowering and while its temp folder is
  half-written (held there by its progress callback, `_PAUSED_EXPORT` below); OUT is still the previous
  complete export, byte for byte. The next export removes the dead run's temp folder (and leaves
  a live one alone) and its output is byte-identical to the first: the same checkpoint gives the
  same files in another process (tests/lowering/test_lower.py checks two exports in one process).
- Security: no code path unpickles or evaluates checkpoint content (an `ast` scan of every product
  module, itself tested on sources that do); ONNX external data written is relative and inside
  OUT; .pt2 programs that torch.export.load would unpickle are refused.
  (Crafted external-data locations through `dscompile run` / `inspect`: tests/e2e/test_cli_errors.py.)

Shapes: B batch, S new tokens, P past.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import onnx
import pytest

from dscompile.exporter.output import replace
from dscompile.errors import EngineError
from dscompile.runtime.manifest import check_program_file, read_manifest

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]
PAUSE_TIMEOUT = 240  # s to reach a pause point (an export of the one-layer checkpoint takes ~15 s)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def ckpt(one_layer_ckpt):
    return one_layer_ckpt


@pytest.fixture(scope="module")
def first(small_export):
    """A complete export of `ckpt` (in this process, with the limits the CLI's `small_flags` give:
    the session's `small_export`) and its bytes."""
    return small_export, _files(small_export)


# An export in a child process whose progress callback holds it at a known moment, to be killed
# there: "lower" after the first graph is lowered (the temp folder exists and is empty), "write"
# once the graphs, weights and programs are written but not the manifest.
_PAUSED_EXPORT = """
import sys, time
import dscompile
ckpt, out, stage = sys.argv[1:4]
max_batch, max_prompt_tokens, max_context = map(int, sys.argv[4:7])

def progress(name, done, total):
    if (stage, name, done) in (("lower", "lower", 1), ("write", "write", total - 2)):
        print(f"paused at {stage}", file=sys.stderr, flush=True)
        time.sleep(3600)

dscompile.export(ckpt, out, max_batch=max_batch, max_prompt_tokens=max_prompt_tokens, max_context=max_context,
                 force=True, progress=progress)
"""


def _start_paused(ckpt: Path, out: Path, stage: str, limits) -> subprocess.Popen:
    sizes = (limits.max_batch, limits.max_prompt_tokens, limits.max_context)
    return subprocess.Popen([sys.executable, "-c", _PAUSED_EXPORT, str(ckpt), str(out), stage, *map(str, sizes)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_pause(proc: subprocess.Popen, stage: str) -> None:
    deadline = time.monotonic() + PAUSE_TIMEOUT
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if line.strip() == f"paused at {stage}":
            return
    proc.kill()
    pytest.fail(f"export never paused at {stage!r} (exit {proc.poll()}): {''.join(seen)[-2000:]}")


@pytest.fixture(scope="module")
def killed(first, ckpt, small_limits):
    """Two `export --force` runs over copies of the first OUT, killed at 'lower' and at 'write'.

    Returns {stage: (OUT, the temp folder as it was when killed, pid)}; they run side by side.
    """
    out, _ = first
    runs = {}
    for stage in ("lower", "write"):
        copy = out.parent / f"killed-{stage}"
        shutil.copytree(out, copy)
        runs[stage] = (copy, _start_paused(ckpt, copy, stage, small_limits))
    result = {}
    for stage, (copy, proc) in runs.items():
        _wait_for_pause(proc, stage)
        tmp = copy.parent / f".{copy.name}.tmp-{proc.pid}"
        contents = sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        result[stage] = (copy, contents, proc.pid)
    return result


@pytest.mark.parametrize("stage", ["lower", "write"])
def test_kill_leaves_the_old_out(first, killed, stage):
    _, before = first
    out, tmp_contents, _ = killed[stage]
    # The kill happened where we meant: while lowering the temp folder is empty; while writing it
    # holds graphs and weights but no manifest.
    if stage == "lower":
        assert tmp_contents == [], tmp_contents
    else:
        assert tmp_contents and "weights.bin" in tmp_contents and "manifest.json" not in tmp_contents, tmp_contents
    assert _files(out) == before, f"OUT changed after a kill at {stage!r}"
    read_manifest(out)  # and it is a valid engine folder


def test_next_export_cleans_up_and_is_byte_identical(first, killed, ckpt, small_flags, dscompile_argv):
    """After a kill: the next export removes dead runs' leftovers, keeps live ones, writes the same bytes."""
    _, before = first
    out, _, pid = killed["write"]
    stale = out.parent / f".{out.name}.tmp-{pid}"
    assert stale.is_dir(), "the killed export left no temp folder to clean up"
    old = out.parent / f".{out.name}.old-{pid}"
    old.mkdir()  # as a kill between the two renames of the fallback swap would leave it
    live = out.parent / f".{out.name}.tmp-{os.getpid()}"  # a concurrent export (this process is alive)
    live.mkdir()
    try:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        r = subprocess.run(dscompile_argv("export", ckpt, "-o", out, *small_flags, "--force"), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert not stale.exists() and not old.exists(), "leftovers of a dead export were not removed"
        assert live.is_dir(), "the temp folder of a running export was removed"
        after = _files(out)
        differ = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
        assert not differ, f"files differ between an export here and one in another process: {differ}"
        assert set(after) == {"prefill.onnx", "decode.onnx", "decode_inplace.onnx", "weights.bin", "manifest.json",
                              "prefill.pt2", "decode.pt2"}
    finally:
        shutil.rmtree(live, ignore_errors=True)


def test_replace_swaps_whole_folders(tmp_path, monkeypatch):
    """replace with the atomic exchange and with the two-rename fallback: old OUT gone, new in place."""
    import dscompile.exporter.output as output

    for exchange in (True, False):
        out, tmp = tmp_path / f"out-{exchange}", tmp_path / f".out-{exchange}.tmp-1"
        out.mkdir()
        (out / "manifest.json").write_text("old")
        (out / "only-old").write_text("x")
        tmp.mkdir()
        (tmp / "manifest.json").write_text("new")
        if not exchange:
            monkeypatch.setattr(output, "exchange", lambda a, b: False)
        replace(tmp, out)
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] and (out / "manifest.json").read_text() == "new"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".out-{exchange}")) == []


# ---------------------------------------------------------------- security


PRODUCT = sorted(p for d in ("dscompile", "model", "capture", "passes", "lowering", "exporter", "verify", "runtime", "cli", "bench") for p in (ROOT / d).rglob("*.py"))
UNPICKLERS = {"pickle", "_pickle", "cPickle", "marshal", "dill", "cloudpickle", "shelve"}
EVALUATORS = {"eval", "exec", "compile", "__import__"}  # builtins that run or import code given as data
IMPORT_BY_NAME = {"importlib.import_module", "importlib.__import__"}
TORCH_LOAD = {"torch.load", "torch.serialization.load"}
PROGRAM_LOAD = "torch.export.load"  # unpickles too: only behind check_program_file


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`a.b.c` of a Name/Attribute chain, its first name resolved through the module's imports."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return None if base is None else f"{base}.{node.attr}"
    return None


def scan(source: str, where: str) -> list[str]:
    """What in one module could unpickle or evaluate data: `where:line: why` per finding.

    Imports of unpickling modules; calls of eval/exec/compile/__import__ (also through `builtins`
    or `getattr(__builtins__, "eval")`) and of importlib.import_module; torch.load without the
    literal keyword weights_only=True; trust_remote_code=True and allow_pickle=True; and
    torch.export.load in a module that never calls check_program_file. Names are resolved through
    the module's imports, so `import pickle as p`, `from torch import load` and
    `from importlib import import_module as im` are seen for what they are.
    """
    tree = ast.parse(source, where)
    aliases: dict[str, str] = {}
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in UNPICKLERS:
                    found.append((node.lineno, f"imports {a.name}"))
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[0] in UNPICKLERS:
                found.append((node.lineno, f"imports from {node.module}"))
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    program_checked = False
    program_loads: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value in ("trust_remote_code", "allow_pickle") and \
                        isinstance(value, ast.Constant) and value.value is True:
                    found.append((node.lineno, f"{key.value}=True"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        keywords = {k.arg: k.value for k in node.keywords}
        if name in EVALUATORS or name in {f"builtins.{e}" for e in EVALUATORS}:
            found.append((node.lineno, f"calls {name}"))
        elif name == "getattr" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and \
                node.args[1].value in EVALUATORS:
            found.append((node.lineno, f"calls {node.args[1].value} through getattr"))
        elif name in IMPORT_BY_NAME:
            found.append((node.lineno, f"imports a module by name ({name})"))
        elif name in TORCH_LOAD:
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append((node.lineno, f"{name} without weights_only=True"))
        elif name == PROGRAM_LOAD:
            program_loads.append(node.lineno)
        elif name is not None and name.split(".")[-1] == "check_program_file":
            program_checked = True
        for key in ("trust_remote_code", "allow_pickle"):
            value = keywords.get(key)
            if isinstance(value, ast.Constant) and value.value is True:
                found.append((node.lineno, f"{key}=True"))
    if not program_checked:
        found += [(line, f"{PROGRAM_LOAD} in a module that never calls check_program_file") for line in program_loads]
    return [f"{where}:{line}: {why}" for line, why in sorted(found)]


def test_no_code_path_unpickles_or_evaluates():
    """No product module (every folder the package installs) has anything `scan` flags."""
    assert len(PRODUCT) > 40 and any(p.name == "torch_engine.py" for p in PRODUCT)  # the scan sees the product
    found = [f for path in PRODUCT for f in scan(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, why", [
    ("import pickle\npickle.loads(data)", "imports pickle"),
    ("from pickle import loads\nloads(data)", "imports from pickle"),
    ("import pickle as p\np.loads(data)", "imports pickle"),
    ("import marshal", "imports marshal"),
    ("from dill import load", "imports from dill"),
    ("import cloudpickle.cloudpickle", "imports cloudpickle.cloudpickle"),
    ("import shelve\nshelve.open(path)", "imports shelve"),
    ("eval(text)", "calls eval"),
    ("exec(code, {})", "calls exec"),
    ("compile(text, 'x', 'exec')", "calls compile"),
    ("__import__(name)", "calls __import__"),
    ("import builtins\nbuiltins.exec(code)", "calls builtins.exec"),
    ("getattr(__builtins__, 'eval')(text)", "calls eval through getattr"),
    ("import importlib\nimportlib.import_module(name)", "imports a module by name (importlib.import_module)"),
    ("from importlib import import_module\nimport_module(name)", "imports a module by name"),
    ("from importlib import import_module as im\nim(name)", "imports a module by name"),
    ("import torch\ntorch.load(f)", "torch.load without weights_only=True"),
    ("import torch\ntorch.load(f, weights_only=False)", "torch.load without weights_only=True"),
    ("import torch\ntorch.load(f, weights_only=flag)", "torch.load without weights_only=True"),
    ("import torch\ntorch.load(f, **options)", "torch.load without weights_only=True"),
    ("from torch import load\nload(f)", "torch.load without weights_only=True"),
    ("import torch as t\nt.serialization.load(f)", "torch.serialization.load without weights_only=True"),
    ("AutoModel.from_pretrained(name, trust_remote_code=True)", "trust_remote_code=True"),
    ("AutoModel.from_pretrained(name, **{'trust_remote_code': True})", "trust_remote_code=True"),
    ("import numpy as np\nnp.load(f, allow_pickle=True)", "allow_pickle=True"),
    ("import torch\ntorch.export.load(path)", "torch.export.load in a module that never calls check_program_file"),
    ("from torch.export import load\nload(path)", "torch.export.load in a module that never calls"),
])
def test_scan_flags_what_could_unpickle_or_evaluate(source, why):
    """Each way in (import forms, aliases, builtins reached indirectly, unsafe keywords) is flagged."""
    found = scan(source, "scratch.py")
    assert any(why in f for f in found), found


def test_scan_passes_what_is_safe():
    """Same-named safe calls are not flagged: the scan can pass, so a clean product run means something."""
    source = """
import re
import torch
from dscompile.runtime.manifest import check_program_file

pattern = re.compile("x")
model.eval()
fast = torch.compile(model)
state = torch.load(f, weights_only=True)
check_program_file(out, rel)
program = torch.export.load(path)
graph_module.recompile()
AutoModel.from_pretrained(name, trust_remote_code=False)
"""
    assert scan(source, "scratch.py") == []


def test_external_data_is_relative_and_inside_out(first):
    out, _ = first
    for graph in ("prefill.onnx", "decode.onnx"):
        model = onnx.load(str(out / graph), load_external_data=False)
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external, f"{graph}: no external tensors (the test would check nothing)"
        for t in external:
            location = {e.key: e.value for e in t.external_data}["location"]
            assert location == "weights.bin", f"{graph}: tensor {t.name} has external data at {location!r}"


def _rewrite_archive(src: Path, dst: Path, edit) -> None:
    """Copy a zip, passing each (name, bytes) through edit -> list of (name, bytes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            for name, data in edit(info.filename, zin.read(info.filename)):
                zout.writestr(name, data)


def test_programs_that_would_be_unpickled_are_refused(first, tmp_path):
    """check_program_file (TorchEngine calls it before torch.export.load) accepts ours, refuses the rest."""
    out, _ = first
    check_program_file(out, "prefill.pt2")
    check_program_file(out, "decode.pt2")

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    import pickle

    evil = pickle.dumps(Boom())

    def pickled_weight(name, data):
        if name.endswith("_weights_config.json"):
            cfg = json.loads(data)
            next(iter(cfg["config"].values()))["use_pickle"] = True
            data = json.dumps(cfg).encode()
        return [(name, data)]

    def pickled_inputs(name, data):
        return [(name, evil if name.endswith("sample_inputs/model.pt") else data)]

    def extra_library(name, data):
        return [(name, data)] + ([(name.split("/")[0] + "/data/aotinductor/model/model.so", b"\x7fELF")]
                                 if name.endswith("archive_format") else [])

    for what, edit, message in [("use_pickle", pickled_weight, "as a pickled or custom object"),
                                ("sample inputs", pickled_inputs, "does not load with weights_only=True"),
                                ("a shared library", extra_library, "is not one dscompile writes")]:
        bad = tmp_path / "out"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(out, bad)
        _rewrite_archive(out / "prefill.pt2", bad / "prefill.pt2", edit)
        with pytest.raises(EngineError, match=re.escape(message)) as err:
            check_program_file(bad, "prefill.pt2")
        assert "\n" not in str(err.value), what
    with pytest.raises(EngineError, match="is not a path inside"):
        check_program_file(out, "../first/prefill.pt2")
