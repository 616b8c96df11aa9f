"""The real `dscompile` command in a subprocess: exit codes, JSON, the PASSED/FAILED line, the round trip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dscompile.runtime.weights import fingerprint


def dsc(*args: str, env: dict | None = None, check: int | None = 0) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "dscompile", *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=600)
    if check is not None:
        assert out.returncode == check, f"exit {out.returncode}, expected {check}\n{out.stdout}\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt, out = root / "ckpt", root / "out"
    dsc("make-checkpoint", ckpt, "--variant", "v2", "--layers", "2", "--experts", "8", "--json")
    result = dsc("export", ckpt, "-o", out, "--verify", "--json")
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
    assert out[0].startswith("1. absorb_mla") and out[1].startswith("2. fuse_moe")


def test_run_generates_and_streams_json(exported):
    _, out, _ = exported
    result = json.loads(dsc("run", out, "--input-ids", "1,2,3;4,5", "--max-new-tokens", "5", "--json").stdout)
    assert [len(t) for t in result["tokens"]] == [5, 5]
    text = dsc("run", out, "--input-ids", "1,2,3", "--max-new-tokens", "3").stdout.splitlines()
    assert text[-1].startswith("PASSED | Runtime:") and "Command: dscompile run" in text[-1]


def test_run_refuses_bad_input_ids(exported):
    _, out, manifest = exported
    vocab = manifest["model"]["vocab_size"]
    err = dsc("run", out, "--input-ids", f"1,{vocab}", check=2).stderr.strip()
    assert err == f"error: input id {vocab} is outside the vocabulary [0, {vocab})"
    err = dsc("run", out, "--input-ids", "1,x", check=2).stderr.strip()
    assert "--input-ids '1,x' is not a comma-separated list of integers" in err


def test_compare_passes_within_tolerance(exported):
    ckpt, out, _ = exported
    result = dsc("compare", ckpt, out, "--decode-steps", "3")
    assert result.stdout.splitlines()[-1].startswith("PASSED | ")
    report = json.loads(dsc("compare", ckpt, out, "--decode-steps", "2", "--json").stdout)
    assert report["passed"] and len(report["steps"]) == 3
    assert report["steps"][0]["graph"] == "prefill" and report["steps"][1]["graph"] == "decode"
    assert all(s["logits"]["max_abs"] < 1e-4 for s in report["steps"])


def test_compare_fails_on_a_modified_engine_and_says_where(exported, tmp_path):
    ckpt, out, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    os.chmod(bad / "weights.bin", 0o644)  # exported read-only
    data = bytearray((bad / "weights.bin").read_bytes())
    data[4096 : 4096 + 8192] = bytes(8192)  # zero part of one weight
    (bad / "weights.bin").write_bytes(bytes(data))
    manifest = json.loads((bad / "manifest.json").read_text())  # a deliberate edit, not a foreign file
    manifest["weights"]["fingerprint"] = fingerprint(bad / "weights.bin")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    result = dsc("compare", ckpt, bad, "--decode-steps", "1", check=1)
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("FAILED | ")
    assert any("first diverging layer" in line for line in lines)


def test_compare_refuses_a_checkpoint_of_another_model(exported, tmp_path):
    _, out, _ = exported
    other = tmp_path / "other"
    dsc("make-checkpoint", other, "--variant", "v3", "--layers", "3")
    err = dsc("compare", other, out, check=2).stderr.strip()
    assert err.startswith("error:") and "not the checkpoint this engine was exported from" in err


def test_inspect_reports_graphs_cache_and_passes(exported):
    _, out, manifest = exported
    info = json.loads(dsc("inspect", out, "--json").stdout)
    assert info["cache"]["bytes_per_token"] == manifest["cache"]["bytes_per_token"]
    assert set(info["graphs"]) == {"prefill", "decode"}
    assert any(p["name"] == "fuse_moe" and p["count"] == 1 for p in info["graphs"]["decode"]["passes"]["passes"])
    text = dsc("inspect", out).stdout
    assert "bytes/token" in text and "pass    absorb_mla" in text
    compat = json.loads(dsc("inspect", out, "--trt-compat", "--json").stdout)["trt_compat"]
    assert compat  # the static TensorRT check ran over both graphs


def test_torch_backend_runs_the_optimized_programs(exported):
    ckpt, out, _ = exported
    result = dsc("compare", ckpt, out, "--decode-steps", "2", "--backend", "torch")
    assert result.stdout.splitlines()[-1].startswith("PASSED | ")


def test_missing_engine_folder_is_one_line(tmp_path):
    err = dsc("run", tmp_path / "nothing", "--input-ids", "1", check=2).stderr.strip()
    assert err == f"error: {tmp_path / 'nothing'}: engine folder not found"


def test_demo_runs_the_main_job(tmp_path):
    result = dsc("demo", "--json", "--new-tokens", "4", env={"DSCOMPILE_HOME": str(tmp_path)})
    report = json.loads(result.stdout)
    assert report["passed"] and report["engine_tokens"] == report["eager_tokens"]
    assert Path(report["engine"]).is_dir()


def test_graphs_only_export_of_a_config_is_inspected_not_run(tmp_path):
    from dscompile.model.synthetic import tiny_args

    config = tmp_path / "config.json"  # a config alone: no weights anywhere
    config.write_text(json.dumps(tiny_args("v3", layers=2, experts=8).to_config()))
    out = tmp_path / "out"
    small = ["--max-batch", "2", "--max-new-tokens", "16", "--max-context", "32"]
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
