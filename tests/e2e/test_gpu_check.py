"""benchmarks/gpu_check.py's dry run: on a machine without a GPU every GPU part is skipped with its reason."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: run benchmarks/gpu_check.py itself")
def test_dry_run_skips_every_gpu_part_with_its_reason(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(report) == ["environment", "triton-aot", "triton-kernels", "torch-engine", "ort-cuda", "tensorrt"]
    assert report["environment"]["status"] == "passed"
    assert report["environment"]["packages"]["torch"] == torch.__version__
    for name, part in report.items():
        if name != "environment":
            assert part["status"] == "skipped" and "no CUDA GPU" in part["reason"], (name, part)
    assert "PASSED" in (tmp_path / "gpu_check.log").read_text()


def test_unknown_part_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path),
                           "--only", "nope"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown part 'nope'" in done.stderr


def test_the_exports_the_gpu_parts_run_are_made_here(tmp_path):
    # The GPU parts' tiny checkpoints and exports are built on any machine: a slip there would
    # otherwise surface only on the GPU machine, where its time is scarce.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    ckpt = gpu_check._checkpoint(tmp_path, "v3")
    assert (ckpt / "config.json").is_file() and gpu_check._checkpoint(tmp_path, "v3") == ckpt
    outs = gpu_check._exports(tmp_path, [("v3", "float32", None)])
    out = outs[("v3", "float32", None)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" and (out / "weights.bin").stat().st_size > 0
