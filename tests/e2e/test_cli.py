"""The `dscompile` command: exit codes, JSON, the PASSED/FAILED line, the round trip.

Most commands run the command's own entry point in this process (`run_here`, tests/conftest.py:
typer's CliRunner), since a subprocess costs seconds of interpreter, torch and ONNX start-up each.
The real `python -m dscompile` process runs where the process itself is the point: the export with
--verify --json and `run --json` (nothing but the JSON object on the process's stdout, the exit code
of the process) and `demo` (the main job, as a user runs it). Bad input through the real process:
tests/e2e/test_cli_errors.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dscompile.lowering.tensorrt.compat import load_table
from dscompile.verify.eager import EagerEngine
from dscompile.model.checkpoint import load_checkpoint
from dscompile.passes import absorb_mla
from dscompile.runtime.weights import fingerprint
from helpers import run_here

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)


def dsc(*args: str, env: dict | None = None, check: int | None = 0,
        process: bool = False) -> subprocess.CompletedProcess:
    """`dscompile *args` in this process (run_here), or as the real process with `process=True`."""
    if process:
        out = subprocess.run([sys.executable, "-m", "dscompile", *map(str, args)], capture_output=True, text=True,
                             env={**os.environ, **(env or {})}, timeout=600)
    else:
        out = run_here(*args, env=env)
    if check is not None:
        assert out.returncode == check, f"exit {out.returncode}, expected {check}\n{out.stdout}\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt, out = root / "ckpt", root / "out"
    dsc("make-checkpoint", ckpt, "--variant", "v2", "--layers", "2", "--experts", "8", "--json")
    result = dsc("export", ckpt, "-o", out, "--verify", "--json", process=True)
    return ckpt, out, json.loads(result.stdout)


def test_export_writes_the_engine_folder_and_reports_json(exported):
    ckpt, out, manifest = exported
    assert {"prefill.onnx", "decode.onnx", "weights.bin", "manifest.json"} <= {p.name for p in out.iterdir()}
    assert manifest["format_version"] == 1 and manifest["dtype"] == "float32"
    decode = {p["name"]: p for p in manifest["graphs"]["decode"]["passes"]["passes"]}
    assert decode["absorb_mla"]["count"] == 2 and decode["fuse_moe"]["count"] == 1
    assert decode["absorb_mla"]["max_error"] is not None and decode["absorb_mla"]["max_error"] < 1e-4


def test_export_refuses_existing_out_and_bad_options(exported, tmp_path):
    ckpt, out, _ = exported
    err = dsc("export", ckpt, "-o", out, check=2).stderr.strip()
    assert err.startswith("error:") and "exists and is not empty" in err and len(err.splitlines()) == 1
    err = dsc("export", ckpt, "-o", tmp_path / "o", "--dtype", "float8", check=2).stderr.strip()
    assert err == "error: --dtype 'float8' is not one of float32, float16, bfloat16"
    err = dsc("export", ckpt, "-o", tmp_path / "o2", "--absorb", "sometimes", check=2).stderr.strip()
    assert "--absorb 'sometimes'" in err
    assert not (tmp_path / "o2").exists()


def test_list_passes_prints_the_pipeline():
    out = dsc("export", "--list-passes").stdout.splitlines()
    assert out[0] == "cleanup:" and out[1].startswith("1. squeeze_cache_append")
    assert out[2] == "rewrite:" and out[3].startswith("2. absorb_mla") and out[4].startswith("3. fuse_moe")
    assert out[5] == "sharding:" and out[6].startswith("4. shard")
    assert out[3].split() == ["2.", "absorb_mla", *absorb_mla.__doc__.splitlines()[0].split()[1:]]  # named once


def test_run_generates_and_streams_json(exported):
    """`run` continues a left-padded batch with the eager model's greedy tokens (the checkpoint's
    generation_config.json does not sample), in JSON and in text."""
    ckpt, out, _ = exported
    want = EagerEngine(load_checkpoint(ckpt, torch.float32)).generate([[1, 2, 3], [4, 5]], 5)
    result = json.loads(dsc("run", out, "--input-ids", "1,2,3;4,5", "--max-new-tokens", "5", "--ignore-eos",
                            "--json", process=True).stdout)
    assert result["tokens"] == want
    text = dsc("run", out, "--input-ids", "1,2,3", "--max-new-tokens", "5", "--ignore-eos").stdout.splitlines()
    assert text[0].startswith(f"prompt [1, 2, 3] -> {want[0]}")
    assert text[-1].startswith("PASSED | Runtime:") and "Command: dscompile run" in text[-1]


def test_run_refuses_bad_input_ids(exported):
    _, out, manifest = exported
    vocab = manifest["model"]["vocab_size"]
    err = dsc("run", out, "--input-ids", f"1,{vocab}", check=2).stderr.strip()
    assert err == f"error: input id {vocab} is outside the vocabulary [0, {vocab})"
    err = dsc("run", out, "--input-ids", "1,x", check=2).stderr.strip()
    assert "--input-ids '1,x' is not a comma-separated list of integers" in err


def test_compare_passes_within_tolerance(exported, tmp_path):
    """The exported engine is within tolerance at every step; with --plot, every block's hidden state
    in the engine's own graph is too (no diverging layer) and the plot is written."""
    ckpt, out, _ = exported
    result = dsc("compare", ckpt, out, "--decode-steps", "3")
    assert result.stdout.splitlines()[-1].startswith("PASSED | ")
    plot = tmp_path / "layers.png"
    report = json.loads(dsc("compare", ckpt, out, "--decode-steps", "2", "--plot", plot, "--json").stdout)
    assert report["passed"] and len(report["steps"]) == 3
    assert report["steps"][0]["graph"] == "prefill" and report["steps"][1]["graph"] == "decode"
    assert all(s["logits"]["max_abs"] < 1e-4 for s in report["steps"])
    layers = report["layers"]
    assert layers["first_diverging_layer"] is None and len(layers["per_layer"]) == 2
    assert all(e["max_abs"] < 1e-4 for e in layers["per_layer"]) and plot.stat().st_size > 0


def _with_changed_weight(out: Path, dst: Path, prefix: str) -> Path:
    """A copy of OUT whose first external weight of prefill.onnx named `prefix...` has every value
    raised by 1 in weights.bin (where the initializer's external data says it is), with the
    manifest's fingerprint refreshed: a deliberate edit, not a foreign file."""
    shutil.copytree(out, dst)
    os.chmod(dst / "weights.bin", 0o644)  # exported read-only
    model = onnx.load(str(dst / "prefill.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer
                  if t.name.startswith(prefix) and t.data_location == onnx.TensorProto.EXTERNAL)
    place = {e.key: e.value for e in tensor.external_data}
    offset, length = int(place["offset"]), int(place["length"])
    data = bytearray((dst / "weights.bin").read_bytes())
    data[offset:offset + length] = (np.frombuffer(data, np.float32, length // 4, offset) + 1).tobytes()
    (dst / "weights.bin").write_bytes(bytes(data))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["weights"]["fingerprint"] = fingerprint(dst / "weights.bin")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


# Block 0's MLP ends the block: a hidden state taken before it would miss the change. Block 1's
# attention: a hidden state of the wrong block would show it one layer early or late.
@pytest.mark.parametrize("block, weight", [(0, "model.layers.0.mlp."), (1, "model.layers.1.self_attn.o_proj.")])
def test_compare_names_the_modified_block_of_the_engine_it_is_given(exported, tmp_path, block, weight):
    """A weight of one block changed in the engine's weights.bin: compare fails and reports exactly
    that block as the first diverging layer, in JSON and text, located in the engine's own graph
    and weights (the blocks before it still match eager)."""
    ckpt, out, _ = exported
    bad = _with_changed_weight(out, tmp_path / "bad", weight)
    report = json.loads(dsc("compare", ckpt, bad, "--decode-steps", "0", "--json", check=1).stdout)
    layers = report["layers"]
    assert not report["passed"] and layers["first_diverging_layer"] == block
    assert layers["located_in"].startswith("prefill.onnx of the engine folder with its weights.bin")
    assert all(e["max_abs"] < 1e-4 for e in layers["per_layer"][:block])
    lines = dsc("compare", ckpt, bad, "--decode-steps", "0", check=1).stdout.splitlines()
    assert lines[-1].startswith("FAILED | ")
    assert [line for line in lines if line.startswith("first diverging layer:")] == [
        f"first diverging layer: {block} (hidden state after block {block} is out of tolerance)"]
    assert f"  located in {layers['located_in']}" in lines


def test_compare_refuses_a_checkpoint_of_another_model(exported, tmp_path):
    _, out, _ = exported
    other = tmp_path / "other"
    dsc("make-checkpoint", other, "--variant", "v3", "--layers", "3")
    err = dsc("compare", other, out, check=2).stderr.strip()
    assert err.startswith("error:") and "not the checkpoint this engine was exported from" in err


def test_inspect_reports_graphs_cache_and_passes(exported):
    """inspect reports the manifest's cache and passes, and --trt-compat each graph's verdicts per node."""
    _, out, manifest = exported
    info = json.loads(dsc("inspect", out, "--json").stdout)
    assert info["cache"]["bytes_per_token"] == manifest["cache"]["bytes_per_token"]
    assert set(info["graphs"]) == {"prefill", "decode"}
    assert any(p["name"] == "fuse_moe" and p["count"] == 1 for p in info["graphs"]["decode"]["passes"]["passes"])
    text = dsc("inspect", out).stdout
    assert "bytes/token" in text and "pass    absorb_mla" in text
    compat = json.loads(dsc("inspect", out, "--trt-compat", "--json").stdout)["trt_compat"]
    _assert_trt_verdicts(compat, out)


def _assert_trt_verdicts(compat: dict, out: Path) -> None:
    """The static TensorRT check of an ONNX Runtime export, node by node, as the support table
    (lowering/tensorrt/data/trt_onnx_ops.json) says: every graph checked; the com.microsoft MoE
    is an error (no importer); RMSNormalization, TensorScatter and RotaryEmbedding are warnings (added in a
    TensorRT version, none targeted); the in-place graph's TensorScatter breaks every constraint
    the table gives it (4D inputs, axis -2); no other op of these graphs has a finding."""
    table = load_table()
    assert compat["table"]["tensorrt_version"] == table["tensorrt_version"]
    assert set(compat["files"]) == {"prefill.onnx", "decode.onnx", "decode_inplace.onnx"}
    for name, result in compat["files"].items():
        graph = onnx.load(str(out / name), load_external_data=False).graph
        ops = {n.name: (n.op_type, n.domain or "ai.onnx") for n in graph.node}
        by_node: dict[str, set] = {}
        for f in result["findings"]:
            assert ops[f["node"]] == (f["op_type"], f["domain"]), f
            by_node.setdefault(f["node"], set()).add((f["severity"], f["reason"]))
        for node, (op, domain) in ops.items():
            found = by_node.get(node, set())
            if domain == "com.microsoft":
                assert {s for s, _ in found} == {"error"} and all("'com.microsoft'" in r for _, r in found), found
            elif op in ("RMSNormalization", "TensorScatter"):
                since = table["ops"][op]["min_trt"]
                assert ("warning", f"{op} needs TensorRT >= {since} (added to the ONNX parser in {since})") in found
                errors = {r.split(" (got")[0] for s, r in found if s == "error"}
                broken = {c["reason"] for c in table["ops"][op].get("constraints", [])}
                assert errors == broken, (node, errors)
            elif op == "RotaryEmbedding":  # lowering/fuse_rope.py: no position_ids, so no constraint broken
                since = table["ops"][op]["min_trt"]
                assert found == {("warning", f"{op} needs TensorRT >= {since} (added to the ONNX parser in {since})")}
            else:
                assert table["ops"][op]["supported"] and not found, (node, op, found)
        moe = sum(domain == "com.microsoft" for _, domain in ops.values())
        errors = sum(s == "error" for found in by_node.values() for s, _ in found)
        assert moe == 1 and result["errors"] == errors and result["compatible"] is False
        assert result["warnings"] == sum(s == "warning" for found in by_node.values() for s, _ in found)
    assert compat["errors"] == sum(r["errors"] for r in compat["files"].values()) and not compat["compatible"]


def test_torch_backend_runs_the_optimized_programs(exported):
    ckpt, out, _ = exported
    result = dsc("compare", ckpt, out, "--decode-steps", "2", "--backend", "torch")
    assert result.stdout.splitlines()[-1].startswith("PASSED | ")


def test_missing_engine_folder_is_one_line(tmp_path):
    err = dsc("run", tmp_path / "nothing", "--input-ids", "1", check=2).stderr.strip()
    assert err == f"error: {tmp_path / 'nothing'}: engine folder not found"


def test_demo_runs_the_main_job(tmp_path):
    result = dsc("demo", "--json", "--new-tokens", "4", env={"DSCOMPILE_HOME": str(tmp_path)}, process=True)
    report = json.loads(result.stdout)
    assert report["passed"] and report["engine_tokens"] == report["eager_tokens"]
    assert Path(report["engine"]).is_dir()


def test_graphs_only_export_of_a_config_is_inspected_not_run(tmp_path):
    from dscompile.model.synthetic import tiny_args

    config = tmp_path / "config.json"  # a config alone: no weights anywhere
    config.write_text(json.dumps(tiny_args("v3", layers=1, experts=4, hidden=32, vocab=64).to_config()))
    out = tmp_path / "out"
    small = ["--max-batch", "2", "--max-prompt-tokens", "16", "--max-context", "32"]
    manifest = json.loads(dsc("export", config, "-o", out, "--graphs-only", *small, "--json").stdout)
    assert manifest["graphs_only"] is True
    assert sorted(p.name for p in out.iterdir()) == ["decode.onnx", "decode_inplace.onnx", "manifest.json",
                                                     "prefill.onnx"]
    info = json.loads(dsc("inspect", out, "--json").stdout)
    assert info["graphs_only"] is True and info["weights"]["bytes"] == manifest["weights"]["bytes"] > 0
    assert info["graphs"]["prefill"]["op_counts"] == manifest["graphs"]["prefill"]["op_counts"]
    assert "(planned, not written: a graph-only export)" in dsc("inspect", out).stdout
    err = dsc("run", out, "--input-ids", "1,2", check=2).stderr.strip()
    assert err == f"error: {out}: a graph-only export (no weights.bin); export without --graphs-only to run it"
