"""Bad input through the real `dscompile` command: every case exits 2 with exactly one stderr line
`error: ...` naming the file, tensor or option at fault, no traceback, and leaves nothing behind
(no OUT, no `.OUT.tmp-*` beside it).

Most cases run the command's own entry point in this process (typer's CliRunner: its exit code,
stdout and stderr; an exception that escapes the command is rendered as a traceback into stderr,
so it fails the case). A subprocess would cost ~4 s of interpreter and torch start-up each. The
cases in `IN_A_PROCESS` run as the real `python -m dscompile` in a subprocess: those that change
the process (a file size limit), the --allow-nonfinite export whose warning goes through logging,
and one case per command, so the real entry point's one-line errors stay checked. Cases that must
reach the write stage (disk full, file size limit, --allow-nonfinite) run a whole export of the
smallest checkpoint (the `one_layer_ckpt` fixture, with `small_flags`).

Engine inputs the CLI cannot produce (a cache of the wrong shape or layer count) are covered at
the Python level in tests/runtime/test_ort_engine.py::test_bad_inputs and the OrtEngine cache checks.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import pytest
from safetensors.torch import load_file, save_file

from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.options import ExportOptions
from dscompile.model.synthetic import make_checkpoint

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]
# The whole-export cases export `one_layer_ckpt`: weights.bin ~180 KB, each .pt2 ~250 KB.
FSIZE_LIMIT = 120_000  # bytes per file: weights.bin, written first, does not fit
TMPFS_SIZE = "100k"  # weights.bin does not fit (our own write)


@dataclass
class Case:
    argv: list[str]
    expect: str  # a substring of the one stderr line
    out: Path | None = None  # the OUT that must not appear (nor its temp folder)
    code: int = 2
    limit_fsize: bool = False
    skip: str | None = None  # why this case cannot run here
    check_out: Callable[[Path], None] | None = field(default=None, repr=False)


# Cases run as the real `python -m dscompile` process (see the module docstring).
IN_A_PROCESS = ("file_size_limit", "allow_nonfinite", "missing_checkpoint", "run_missing_out", "compare_graphs_only",
                "inspect_external_data_absolute")


def _run_here(case: Case) -> subprocess.CompletedProcess:
    """The command's entry point in this process; an escaping exception lands in stderr as a traceback."""
    from typer.testing import CliRunner

    from dscompile.cli import app

    result = CliRunner().invoke(app, [str(a) for a in case.argv[3:]])
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(case.argv, result.exit_code, result.stdout, stderr)


def _run(case: Case) -> subprocess.CompletedProcess:
    def limit() -> None:  # CPython ignores SIGXFSZ, so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(case.argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
                          preexec_fn=limit if case.limit_fsize else None)


def _mount_tmpfs(path: Path, options: str) -> str | None:
    """Mount a tmpfs (root only); the reason it cannot be done, or None."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return "mounting a small filesystem needs root"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs failed: {r.stderr.strip()[:200]}"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> Path:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))
    return path


def _set_value(path: Path, name: str, value: float) -> Path:
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name].view(-1)[3] = value
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _patch_bytes(path: Path, fn) -> Path:
    f = path / "model.safetensors"
    f.write_bytes(fn(f.read_bytes()))
    return path


def _crafted_out(src: Path, dst: Path, graph: str, location: str) -> Path:
    """A copy of an OUT whose first external tensor in `graph` points at `location`."""
    _copy(src, dst)
    model = onnx.load(str(dst / graph), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, str(dst / graph))
    return dst


def _build_cases(tmp: Path, ckpt: Path, small_ckpt: Path, engine: Path, limits, small_limits, small: list[str],
                 command) -> dict[str, Case]:
    """The cases: `ckpt` is the v3 checkpoint that `engine` was exported from within `limits`;
    `small_ckpt` the one-layer one; `small_limits` the cheapest export's limits and `small` its
    options; `command(*args)` the argv of the `dscompile` command."""
    c: dict[str, Case] = {}
    out = lambda name: tmp / f"out-{name}"  # noqa: E731 - one OUT per case, beside the others

    def export_case(name: str, src: Path, expect: str, *extra, **kw) -> None:
        c[name] = Case(command("export", src, "-o", out(name), *small, *extra), expect, out=out(name), **kw)

    # ---- the checkpoint folder and config.json
    export_case("missing_checkpoint", tmp / "nowhere", "nowhere: checkpoint folder not found")
    p = _copy(ckpt, tmp / "no-config")
    (p / "config.json").unlink()
    export_case("missing_config", p, "no-config: config.json not found")
    p = _copy(ckpt, tmp / "empty-config")
    (p / "config.json").write_text("")
    export_case("empty_config", p, "empty-config/config.json: not valid JSON")
    p = _copy(ckpt, tmp / "garbled-config")
    (p / "config.json").write_text('{"model_type": "deepseek_v3", "hidden_size": 6')
    export_case("garbled_config", p, "garbled-config/config.json: not valid JSON")
    export_case("unsupported_model_type", _edit_config(_copy(ckpt, tmp / "llama"), model_type="llama"),
                "model_type 'llama' is not supported")
    # Fields that contradict the tensors: the first tensor whose shape disagrees is named.
    export_case("kv_lora_rank_contradicts_tensors", _edit_config(_copy(ckpt, tmp / "rank"), kv_lora_rank=16),
                "tensor model.layers.0.self_attn.kv_a_layernorm.weight has shape [32], the config implies [16]")
    export_case("moe_width_contradicts_tensors", _edit_config(_copy(ckpt, tmp / "moe"), moe_intermediate_size=16),
                "model.safetensors: tensor model.layers.1.mlp.experts.0.down_proj.weight has shape [64, 32], "
                "the config implies [64, 16]")

    # ---- the weights
    sharded = make_checkpoint(tmp / "sharded", "v2-lite", shards=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    export_case("missing_shard", sharded, "shard model-00002-of-00003.safetensors named in the index is missing")
    export_case("truncated_safetensors", _patch_bytes(_copy(ckpt, tmp / "truncated"), lambda d: d[: len(d) // 2]),
                "truncated/model.safetensors: not a readable safetensors file")
    export_case("header_length_too_large",
                _patch_bytes(_copy(ckpt, tmp / "hlen"), lambda d: struct.pack("<Q", 10**12) + d[8:]),
                "hlen/model.safetensors: not a readable safetensors file")
    export_case("header_not_utf8", _patch_bytes(_copy(ckpt, tmp / "hutf"), lambda d: d[:20] + b"\xff" * 20 + d[40:]),
                "hutf/model.safetensors: not a readable safetensors file")
    nan = _set_value(_copy(ckpt, tmp / "nan"), "model.layers.1.self_attn.kv_b_proj.weight", float("nan"))
    export_case("nan_weight", nan, "tensor model.layers.1.self_attn.kv_b_proj.weight has 1 non-finite value(s)")
    export_case("inf_weight", _set_value(_copy(ckpt, tmp / "inf"), "model.embed_tokens.weight", float("-inf")),
                "tensor model.embed_tokens.weight has 1 non-finite value(s) (NaN/Inf); pass --allow-nonfinite")
    p = _copy(ckpt, tmp / "pickled")
    (p / "model.safetensors").unlink()
    (p / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    export_case("pickle_only", p, "pickled: only pickle weights found (pytorch_model.bin)")

    # ---- OUT
    keep = tmp / "out-not-empty"
    keep.mkdir()
    (keep / "keep.txt").write_text("mine")
    c["out_not_empty"] = Case(command("export", ckpt, "-o", keep, *small), "exists and is not empty (pass --force",
                              check_out=lambda o: [f.name for f in o.iterdir()] == ["keep.txt"])
    (tmp / "a-file").write_text("x")
    c["out_parent_is_a_file"] = Case(command("export", ckpt, "-o", tmp / "a-file" / "out", *small),
                                     "a-file/out: cannot create the output folder beside it (")
    ro = tmp / "read-only"
    if os.geteuid() != 0:
        ro.mkdir()
        ro.chmod(0o555)
        skip = None if not os.access(ro, os.W_OK) else "chmod 555 does not make a folder read-only here"
    else:  # root ignores permission bits: a read-only filesystem is what stops it
        skip = _mount_tmpfs(ro, "ro,size=64k")
    c["out_read_only"] = Case(command("export", ckpt, "-o", ro / "out", *small),
                              "cannot create the output folder beside it (", out=ro / "out", skip=skip)
    export_case("file_size_limit", small_ckpt, "cannot write the export (File too large: weights.bin)",
                limit_fsize=True)
    small_fs = tmp / "small-fs"
    c["disk_full"] = Case(command("export", small_ckpt, "-o", small_fs / "out", *small),
                          "cannot write the export (No space left on device", out=small_fs / "out",
                          skip=_mount_tmpfs(small_fs, f"size={TMPFS_SIZE}"))

    # Not an error: the NaN checkpoint exports with --allow-nonfinite (test_allow_nonfinite_...).
    nan1 = _set_value(_copy(small_ckpt, tmp / "nan1"), "model.layers.0.self_attn.kv_b_proj.weight", float("nan"))
    c["allow_nonfinite"] = Case(command("export", nan1, "-o", out("allow"), *small, "--allow-nonfinite", "--json"),
                                "", code=0)

    # ---- options
    export_case("dtype_float8", ckpt, "--dtype 'float8' is not one of", "--dtype", "float8")
    c["max_prompt_tokens_1"] = Case(command("export", ckpt, "-o", out("mnt1"), "--max-prompt-tokens", "1"),
                                 "need max_prompt_tokens >= 2", out=out("mnt1"))
    export_case("absorb_maybe", ckpt, "--absorb 'maybe' is not one of auto, fold, reassociate, none", "--absorb", "maybe")
    export_case("weights_int3", ckpt, "--weights 'int3' is not one of int8, int4", "--weights", "int3")
    export_case("block_size_24", ckpt, "--block-size 24 is not one of 16, 32, 64, 128", "--weights", "int4",
                "--block-size", "24")
    export_case("weights_with_tensorrt", ckpt, "--weights int8 with --target tensorrt", "--weights", "int8",
                "--target", "tensorrt")
    export_case("weights_with_float16", ckpt, "--weights int4 with --dtype float16", "--weights", "int4",
                "--dtype", "float16")
    # the tiny v3's q_lora_rank is 48: block 32 does not divide q_b_proj's input dimension
    export_case("block_size_not_dividing", ckpt, "--block-size 32 does not divide the input dimension 48 of weight "
                "model.layers.0.self_attn.q_b_proj.weight", "--weights", "int4", "--block-size", "32")

    # ---- engines (`engine`: vocab 512, max context limits.max_context)
    V, ctx = 512, limits.max_context
    run = lambda *a: command("run", engine, *a)  # noqa: E731
    c["run_missing_out"] = Case(command("run", tmp / "no-engine", "--input-ids", "1"),
                                "no-engine: engine folder not found")
    c["run_id_above_vocab"] = Case(run("--input-ids", f"1,2,{V}"), f"input id {V} is outside the vocabulary [0, {V})")
    c["run_prompt_too_long"] = Case(run("--input-ids", ",".join(["1"] * (ctx + 1)), "--max-new-tokens", "1"),
                                    f"prompt of {ctx + 1} tokens + 1 new tokens exceeds the engine's maximum of {ctx}")
    c["run_prompt_plus_new_too_long"] = Case(run("--input-ids", "1,2", "--max-new-tokens", str(ctx)),
                                             f"exceeds the engine's maximum of {ctx}")
    c["run_provider_unknown"] = Case(run("--input-ids", "1", "--provider", "tpu"), "provider 'tpu' is not one of")
    # Security: external data must stay inside OUT (runtime/manifest.py), also through the CLI.
    up = _crafted_out(engine, tmp / "eng-up", "prefill.onnx", "../secret")
    c["run_external_data_escapes"] = Case(command("run", up, "--input-ids", "1"),
                                          "has external data at '../secret', which is not a relative path inside")
    absolute = _crafted_out(engine, tmp / "eng-abs", "decode.onnx", str(tmp / "eng-up" / "weights.bin"))
    c["inspect_external_data_absolute"] = Case(command("inspect", absolute),
                                               f"has external data at '{tmp / 'eng-up' / 'weights.bin'}', which is not")
    escaped = _copy(engine, tmp / "eng-graph")
    m = json.loads((escaped / "manifest.json").read_text())
    m["graphs"]["decode"]["file"] = "../eng-up/decode.onnx"
    (escaped / "manifest.json").write_text(json.dumps(m))
    c["inspect_graph_file_escapes"] = Case(command("inspect", escaped),
                                           "graph file '../eng-up/decode.onnx' is not a path inside")

    # ---- a graph-only export (no weights.bin): engines refuse it; --verify cannot check it
    graphs = tmp / "graphs-only"  # of the one-layer checkpoint, within the cheapest export's limits
    export_checkpoint(small_ckpt, graphs, ExportOptions.within(small_limits, graphs_only=True))
    refused = f"{graphs}: a graph-only export (no weights.bin); export without --graphs-only to run it"
    c["run_graphs_only"] = Case(command("run", graphs, "--input-ids", "1,2"), refused)
    c["run_graphs_only_torch"] = Case(command("run", graphs, "--input-ids", "1,2", "--backend", "torch"), refused)
    c["compare_graphs_only"] = Case(command("compare", small_ckpt, graphs), refused)
    export_case("graphs_only_verify", ckpt, "--graphs-only and --verify", "--graphs-only", "--verify")
    return c


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, exported, exported_ckpt, export_limits, one_layer_ckpt, small_limits, small_flags,
             dscompile_argv):
    """{case name: (Case, CompletedProcess or None when skipped)}, all run in one go."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    cases = _build_cases(tmp, exported_ckpt("v3"), one_layer_ckpt, exported("v3"), export_limits, small_limits,
                         small_flags, dscompile_argv)
    slow = ("allow_nonfinite", "file_size_limit", "disk_full")  # whole exports: start them first
    order = [k for k in slow if k in cases] + [k for k in cases if k not in slow]
    runnable = {k: cases[k] for k in order if cases[k].skip is None}
    processes = {k: c for k, c in runnable.items() if k in IN_A_PROCESS}
    try:
        with ThreadPoolExecutor(2) as pool:  # the subprocesses run while the other cases run here
            started = {k: pool.submit(_run, c) for k, c in processes.items()}
            done = {k: _run_here(c) for k, c in runnable.items() if k not in processes}
            done.update({k: f.result() for k, f in started.items()})
        yield {k: (v, done.get(k)) for k, v in cases.items()}
    finally:
        for mount in (tmp / "read-only", tmp / "small-fs"):
            if os.path.ismount(mount):
                subprocess.run(["umount", "-l", str(mount)], check=False)


CASE_NAMES = [
    "missing_checkpoint", "missing_config", "empty_config", "garbled_config",
    "unsupported_model_type", "kv_lora_rank_contradicts_tensors", "moe_width_contradicts_tensors", "missing_shard",
    "truncated_safetensors", "header_length_too_large", "header_not_utf8",
    "nan_weight", "inf_weight", "pickle_only", "out_not_empty", "out_parent_is_a_file",
    "out_read_only", "file_size_limit", "disk_full", "dtype_float8", "max_prompt_tokens_1", "absorb_maybe",
    "weights_int3", "block_size_24", "weights_with_tensorrt", "weights_with_float16", "block_size_not_dividing",
    "run_missing_out", "run_id_above_vocab",
    "run_prompt_too_long", "run_prompt_plus_new_too_long",
    "run_provider_unknown", "run_external_data_escapes", "inspect_external_data_absolute",
    "inspect_graph_file_escapes", "run_graphs_only", "run_graphs_only_torch", "compare_graphs_only",
    "graphs_only_verify",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_line(outcomes, name):
    case, result = outcomes[name]
    if case.skip:
        pytest.skip(case.skip)
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == case.code, f"exit {result.returncode}, stderr: {result.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one 'error:' line: {lines[:5]}"
    assert case.expect in lines[0], f"{case.expect!r} not in {lines[0]!r}"
    if case.out is not None:
        assert not case.out.exists(), f"{case.out} was created"
        if case.out.parent.is_dir():
            left = [p.name for p in case.out.parent.iterdir() if p.name.startswith(f".{case.out.name}.")]
            assert not left, f"temp folders left beside OUT: {left}"
    if case.check_out is not None:
        assert case.check_out(Path(case.argv[case.argv.index("-o") + 1]))


def test_cases_are_all_listed(outcomes):
    assert sorted(outcomes) == sorted(CASE_NAMES + ["allow_nonfinite"])


def test_allow_nonfinite_exports_with_a_warning(outcomes):
    """--allow-nonfinite: a checkpoint with a NaN weight exports; one warning line names the tensor."""
    case, result = outcomes["allow_nonfinite"]
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if "non-finite" in line]
    assert len(warnings) == 1 and "model.layers.0.self_attn.kv_b_proj.weight" in warnings[0], result.stderr
    out = Path(case.argv[case.argv.index("-o") + 1])
    assert json.loads(result.stdout)["files"].keys() <= {p.name for p in out.iterdir()}
