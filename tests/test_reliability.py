"""Atomic outputs, reproducibility across processes, and what an OUT or a checkpoint may not make us run.

- Atomic: an `export --force` is killed with SIGKILL while lowering and while its temp folder is
  half-written (held there by its progress callback, `_PAUSED_EXPORT` below); OUT is still the previous
  complete export, byte for byte. The next export removes the dead run's temp folder (and leaves
  a live one alone) and its output is byte-identical to the first: the same checkpoint gives the
  same files in another process (tests/test_lower.py checks two exports in one process).
- Security: no code path unpickles or evaluates checkpoint content; ONNX external data written
  is relative and inside OUT; .pt2 programs that torch.export.load would unpickle are refused.
  (Crafted external-data locations through `dscompile run` / `inspect`: tests/test_cli_errors.py.)

Shapes: B batch, S new tokens, P past.
"""

from __future__ import annotations

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

from dscompile.exporter.capture import Limits
from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.output import replace
from dscompile.errors import EngineError
from dscompile.runtime.manifest import check_program_file, read_manifest
from test_cli_errors import ONE_LAYER, ROOT, SMALL, _dscompile

LIMITS = Limits(max_batch=2, max_new_tokens=16, max_context=32)  # == SMALL, so CLI and API exports agree
PAUSE_TIMEOUT = 240  # s to reach a pause point (an export of the one-layer checkpoint takes ~15 s)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("v3", **ONE_LAYER)


@pytest.fixture(scope="module")
def first(tmp_path_factory, ckpt):
    """A complete export (in this process) and its bytes."""
    out = tmp_path_factory.mktemp("reliability") / "first"
    export_checkpoint(ckpt, out, limits=LIMITS)
    return out, _files(out)


# An export in a child process whose progress callback holds it at a known moment, to be killed
# there: "lower" after the first graph is lowered (the temp folder exists and is empty), "write"
# once the graphs, weights and programs are written but not the manifest.
_PAUSED_EXPORT = """
import sys, time
import dscompile
ckpt, out, stage = sys.argv[1:4]

def progress(name, done, total):
    if (stage, name, done) in (("lower", "lower", 1), ("write", "write", total - 2)):
        print(f"paused at {stage}", file=sys.stderr, flush=True)
        time.sleep(3600)

dscompile.export(ckpt, out, max_batch=2, max_prompt_tokens=16, max_context=32, force=True, progress=progress)
"""


def _start_paused(ckpt: Path, out: Path, stage: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _PAUSED_EXPORT, str(ckpt), str(out), stage], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


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
def killed(first, ckpt):
    """Two `export --force` runs over copies of the first OUT, killed at 'lower' and at 'write'.

    Returns {stage: (OUT, the temp folder as it was when killed, pid)}; they run side by side.
    """
    out, _ = first
    runs = {}
    for stage in ("lower", "write"):
        copy = out.parent / f"killed-{stage}"
        shutil.copytree(out, copy)
        runs[stage] = (copy, _start_paused(ckpt, copy, stage))
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


def test_next_export_cleans_up_and_is_byte_identical(first, killed, ckpt):
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
        r = subprocess.run(_dscompile("export", ckpt, "-o", out, *SMALL, "--force"), cwd=ROOT, env=env,
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


PROJECT = [p for d in ("model", "exporter", "passes", "runtime") for p in (ROOT / d).rglob("*.py")]
FORBIDDEN = {
    r"\bpickle\.loads?\(": "unpickling",
    r"(?<![\w.])eval\(": "eval",
    r"(?<![\w.])exec\(": "exec",
    r"trust_remote_code\s*=\s*True": "remote code",
    r"importlib\.import_module\(": "importing a module by name",
    r"\b__import__\(": "importing a module by name",
    r"\bmarshal\.loads?\(": "unmarshalling",
}


def test_no_code_path_unpickles_or_evaluates():
    """torch.load only with weights_only=True; no pickle, eval, exec, remote code or dynamic imports."""
    found = []
    for path in PROJECT:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                found.append(f"{path.relative_to(ROOT)}:{i}: torch.load without weights_only=True")
            found += [f"{path.relative_to(ROOT)}:{i}: {why}" for pat, why in FORBIDDEN.items() if re.search(pat, code)]
    # torch.export.load unpickles too: the one call must sit behind check_program_file.
    loads = [(p, p.read_text()) for p in PROJECT if "torch.export.load(" in p.read_text()]
    for path, text in loads:
        if "check_program_file(" not in text:
            found.append(f"{path.relative_to(ROOT)}: torch.export.load without check_program_file")
    assert not found, "\n".join(found)


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
