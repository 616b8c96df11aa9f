"""One copy of the weights, measured on a real export of ~0.75 GB:

- weights.bin holds each checkpoint weight once: <= 1.02x the parameter bytes; the programs'
  weights that the graphs store in another layout are strided views of those bytes, and they
  equal the checkpoint's weights value for value;
- the ONNX Runtime engine, loaded in a fresh process and run (prefill + decode, so every weight is
  read), grows its resident memory by <= 1.10x weights.bin + 300 MB; the bound fails if each
  session keeps its own copy (2x), so the model is large enough for allocator noise not to decide it;
- the torch engine's programs share one tensor per weight, viewing the one map of the file;
- a truncated or foreign weights.bin is refused in one line before any session opens.

A write into the file under a running engine stops its next step: checked on the session's
smallest export (`small_export`), since it does not depend on the size.

Shapes: B batch, S new tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from dscompile.capture import Limits
from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.options import ExportOptions
from dscompile.verify.eager import EagerEngine
from dscompile.model.checkpoint import load_checkpoint
from dscompile.model.synthetic import random_state, tiny_args, write_checkpoint
from dscompile.errors import EngineError
from dscompile.runtime.ort_engine import OrtEngine
from dscompile.runtime.torch_engine import TorchEngine
from dscompile.runtime.weights import fingerprint
from helpers import assert_close

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

LIMITS = Limits(max_batch=2, max_prompt_tokens=64, max_context=128)
FILE_RATIO = 1.02  # weights.bin / parameter bytes
RESIDENT_RATIO, RESIDENT_SLACK = 1.10, 300 * 2**20  # resident growth <= RATIO * weights.bin + SLACK


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A v2 checkpoint of ~0.75 GB in float32, mostly the dense MLPs' linear weights (two dense layers):
    kernels that prepack such weights (a copy per session) would take the resident memory past
    its bound, and so would sessions that each read the file instead of mapping it."""
    root = tmp_path_factory.mktemp("big")
    args = replace(tiny_args("v2", layers=3, experts=16, hidden=1024, heads=4, vocab=4096, yarn=False),
                   first_k_dense_replace=2, intermediate_size=24576, moe_intermediate_size=512)
    ckpt = write_checkpoint(root / "ckpt", args, random_state(args, 0))
    manifest = export_checkpoint(ckpt, root / "out", ExportOptions.within(LIMITS))
    return ckpt, root / "out", manifest


def test_weights_file_holds_one_copy(big):
    _, out, manifest = big
    weights, params = manifest["weights"], manifest["weights"]["parameter_bytes"]
    assert params >= 400 * 2**20, f"the test model has {params} parameter bytes, too few to measure"
    size = (out / "weights.bin").stat().st_size
    assert size == weights["bytes"]
    assert size <= FILE_RATIO * params, (
        f"weights.bin {size} bytes = {size / params:.3f}x the parameter bytes; beyond one copy: "
        f"{json.dumps(weights['layouts'])}")
    assert weights["viewed_tensors"] > 0  # the programs read the graphs' transposed / interleaved bytes
    layouts = weights["layouts"]
    assert layouts["second_layout_bytes"] == sum(e["bytes"] for e in layouts["second_layouts"])


def test_program_weights_are_views_equal_to_the_checkpoint(big):
    """The torch engine's weights are views of weights.bin equal to the checkpoint's, and its
    prefill and decode logits are eager's."""
    ckpt, out, manifest = big
    engine = TorchEngine.load(out, device="cpu")
    model = load_checkpoint(ckpt, dtype=torch.float32)
    reference = dict(model.named_parameters())
    viewed = 0
    for graph, module in engine.modules.items():
        places = manifest["graphs"][graph]["program_weights"]
        for name, weight in module.named_parameters():
            if name in reference:
                assert torch.equal(weight, reference[name]), f"{graph}: {name} differs from the checkpoint"
            viewed += "stride" in places.get(name, {})
    assert viewed > 0
    ids, pos = torch.tensor([[5, 17, 42, 7]]), torch.arange(4)[None]
    got, cache = engine.step(ids, pos, torch.ones(1, 4, dtype=torch.int64), None)
    got2, _ = engine.step(ids[:, :1], pos[:, -1:] + 1, torch.ones(1, 5, dtype=torch.int64), cache)
    with torch.no_grad():
        want, past = model(ids, pos, torch.ones(1, 4, dtype=torch.int64))
        want2, _ = model(ids[:, :1], pos[:, -1:] + 1, torch.ones(1, 5, dtype=torch.int64), past)
    assert_close(got, want, what="torch engine prefill logits")
    assert_close(got2, want2, what="torch engine decode logits")


def test_torch_programs_share_one_tensor_per_weight(big):
    _, out, _ = big
    engine = TorchEngine.load(out, device="cpu")
    prefill = dict(engine.modules["prefill"].named_parameters())
    decode = dict(engine.modules["decode"].named_parameters())
    file_storage = engine.weights.bytes().untyped_storage().data_ptr()
    for name in ("model.lm_head.weight", "model.layers.2.mlp.experts.down_proj", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.2.mlp.experts.gate_proj"):
        assert prefill[name].data_ptr() == decode[name].data_ptr(), f"{name}: prefill and decode hold two copies"
        assert prefill[name].untyped_storage().data_ptr() == file_storage, f"{name} is not a view of the weight map"


_MEASURE = """
import json, sys, torch
from dscompile.runtime.ort_engine import OrtEngine

def memory():
    fields = {}
    for line in open("/proc/self/smaps_rollup").readlines()[1:] + open("/proc/self/status").readlines():
        key, _, value = line.partition(":")
        if key in ("Pss", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

before = memory()
engine = OrtEngine.load(sys.argv[1], provider="cpu", threads=2)
loaded = memory()
ids = torch.randint(0, engine.info.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
engine.generate(ids.tolist(), max_new_tokens=4)
after = memory()
print(json.dumps({"before": before, "loaded": loaded, "after": after}))
"""


def test_ort_engine_resident_memory_is_one_copy(big):
    """PSS, not VmRSS: each session maps weights.bin itself and VmRSS counts a page once per map."""
    _, out, manifest = big
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(out)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    m = json.loads(result.stdout.splitlines()[-1])
    size = manifest["weights"]["bytes"]
    growth = m["after"]["Pss"] - m["before"]["Pss"]
    limit = RESIDENT_RATIO * size + RESIDENT_SLACK
    assert growth <= limit, (f"resident growth {growth / 2**20:.0f} MiB > {limit / 2**20:.0f} MiB "
                             f"(weights.bin {size / 2**20:.0f} MiB)")
    assert growth >= 0.5 * size, f"growth {growth / 2**20:.0f} MiB: the run did not read the weights"


def test_truncated_or_foreign_weights_refused_before_any_session(big, tmp_path, monkeypatch):
    _, out, _ = big
    import onnxruntime

    def no_session(*a, **k):
        raise AssertionError("a session was created before the weights file was checked")

    short = tmp_path / "short"
    shutil.copytree(out, short)
    os.chmod(short / "weights.bin", 0o644)
    with open(short / "weights.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 4096)
    foreign = tmp_path / "foreign"
    shutil.copytree(out, foreign)
    os.chmod(foreign / "weights.bin", 0o644)
    with open(foreign / "weights.bin", "r+b") as f:  # same size, other contents
        f.write(os.urandom(1 << 20))
    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    with pytest.raises(EngineError, match="bytes where the manifest says"):
        OrtEngine.load(short, provider="cpu")
    with pytest.raises(EngineError, match="do not match the manifest's fingerprint"):
        OrtEngine.load(foreign, provider="cpu")
    with pytest.raises(EngineError, match="do not match the manifest's fingerprint"):
        TorchEngine.load(foreign, device="cpu")


def test_a_write_into_the_file_stops_the_running_engine(small_export, one_layer_ckpt, tmp_path):
    """Both engines generate eager's greedy tokens from the mapped file, twice; after a write into
    the file, their next step stops."""
    ckpt, out = one_layer_ckpt, small_export
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert not os.access(copy / "weights.bin", os.W_OK) or os.geteuid() == 0  # exported read-only
    assert (os.stat(out / "weights.bin").st_mode & 0o222) == 0
    ids = [[1, 2, 3]]
    want = EagerEngine(load_checkpoint(ckpt, dtype=torch.float32)).generate(ids, max_new_tokens=2)
    for engine in (OrtEngine.load(copy, provider="cpu"), TorchEngine.load(copy, device="cpu")):
        assert engine.generate(ids, max_new_tokens=2) == want
        assert engine.generate(ids, max_new_tokens=2) == want
    engines = (OrtEngine.load(copy, provider="cpu"), TorchEngine.load(copy, device="cpu"))
    os.chmod(copy / "weights.bin", 0o644)
    with open(copy / "weights.bin", "r+b") as f:
        f.seek(8192)
        f.write(b"\0" * 4096)
    for engine in engines:
        with pytest.raises(EngineError, match="changed on disk after the engine loaded it"):
            engine.generate(ids, max_new_tokens=2)


def test_fingerprint_differs_for_other_contents(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(1 << 20))
    b.write_bytes(bytes(1 << 20 - 1) + b"\1")
    assert fingerprint(a) == fingerprint(a) and fingerprint(a) != fingerprint(b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the device copy of the programs' weights")
def test_torch_engine_on_cuda_holds_one_device_copy(big):
    """On CUDA the programs share one device copy per weight, and generate eager's greedy tokens."""
    ckpt, out, _ = big
    engine = TorchEngine.load(out, device="cuda")
    prefill = dict(engine.modules["prefill"].named_parameters())
    decode = dict(engine.modules["decode"].named_parameters())
    for name in ("model.lm_head.weight", "model.layers.2.mlp.experts.gate_proj"):
        assert prefill[name].is_cuda and prefill[name].data_ptr() == decode[name].data_ptr(), name
    ids = [[1, 2, 3, 4]]
    want = EagerEngine(load_checkpoint(ckpt, dtype=torch.float32)).generate(ids, max_new_tokens=4)
    assert engine.generate(ids, max_new_tokens=4) == want
