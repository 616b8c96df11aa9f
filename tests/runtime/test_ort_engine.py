"""OrtEngine (runtime/ort_engine.py) against the eager model: prefill + 16 decode steps with left
padding, greedy generation, the in-place decode graph against the contract's decode graph (and
caches that a later step must not change), the errors a user can cause (broken OUT, bad inputs), and
GPU providers asked for where they cannot run (refused in one line, not run on CPU; "auto" on CPU)
with float32 kept IEEE unless TF32 is opted in.

Uses the session's shared exports (the `exported` fixture of tests/conftest.py, one per variant).

Shapes: B batch, S new tokens, P past, V vocab.
"""

from __future__ import annotations

import gc
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from dscompile.tolerance import bound as tolerance_bound

from dscompile.model.checkpoint import load_checkpoint
from dscompile.errors import EngineError, OptionError
from dscompile.runtime.contract import KVCache, next_step_inputs, position_ids, step_inputs
from dscompile.runtime.manifest import read_manifest
from dscompile.runtime.ort_engine import OrtCapacityCache, OrtEngine, OrtKVCache
from helpers import assert_close, run_here

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

VARIANTS = ("v3", "v2", "v2-lite")
DECODE_STEPS = 16


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, exported, exported_ckpt):
    variant = request.param
    return variant, OrtEngine.load(exported(variant), provider="cpu"), load_checkpoint(exported_ckpt(variant))


def test_steps_match_eager(pair):
    """B=2, row 0 left-padded by 3; logits compared on every non-padded position, every step."""
    variant, engine, model = pair
    B, S = 2, 7
    ids = torch.randint(0, engine.info.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, S, dtype=torch.int64)
    mask[0, :3] = 0
    ids[0, :3] = 0
    pos = position_ids(mask)
    cache_e = cache_r = None
    errors = []
    for step in range(DECODE_STEPS + 1):
        got, cache_e = engine.step(ids, pos, mask, cache_e)
        with torch.no_grad():
            want, cache_r = model(ids, pos, mask, cache_r)
        valid = mask[:, -ids.shape[1]:].bool()  # [B, S] positions that are real tokens
        err = (got - want).abs()[valid]
        bound = tolerance_bound(torch.float32, want[valid].abs().max().item())
        errors.append((err.max().item(), err.mean().item()))
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert err.max() <= bound, (f"{variant} step {step} (S={ids.shape[1]}): max|Δ|={err.max():.3e} "
                                    f"mean|Δ|={err.mean():.3e} > {bound:.3e}")
        ids = want[:, -1].argmax(-1, keepdim=True)
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.int64)], dim=1)
    assert isinstance(cache_e, OrtCapacityCache) and cache_e.length == S + DECODE_STEPS  # decoded in place
    # Padded positions hold whatever a query that sees nothing computes (never attended to): skip them.
    real = mask[:, :-1].bool()  # [B, P] of the final cache
    for i, ((k_e, r_e), (k_r, r_r)) in enumerate(zip(cache_e.layers, cache_r)):
        for name, a, b in (("kv_latent", k_e, k_r), ("k_rope", r_e, r_r)):
            err = (a - b).abs()[real]
            bound = tolerance_bound(torch.float32, b[real].abs().max().item())
            assert err.max() <= bound, f"{variant} present.{i}.{name}: max|Δ|={err.max():.3e} mean|Δ|={err.mean():.3e}"


def test_greedy_generate_matches_eager(pair):
    variant, engine, model = pair
    prompts = [[3, 14, 15, 92, 65], [35, 89]]
    got = engine.generate(prompts, 8)
    # Eager greedy with the same left padding.
    inputs = step_inputs(prompts)
    want, cache = [[] for _ in prompts], None
    with torch.no_grad():
        for _ in range(8):
            logits, cache = model(*inputs, cache)
            inputs = next_step_inputs(logits[:, -1].argmax(-1), inputs)
            for row in range(len(prompts)):
                want[row].append(int(inputs.input_ids[row]))
    assert got == want, f"{variant}: engine {got} != eager {want}"


def test_last_only_prefill_computes_the_last_token_only(pair):
    """`step(..., last_only=True)` feeds the graph's `logits_from` (lowering/logits.py): logits [B, 1, V]
    equal to the full step's last row, the same cache; the graph's lm_head saw one token."""
    variant, engine, _ = pair
    assert engine.manifest["graphs"]["prefill"]["logits_from"] and engine._logits_from["prefill"]
    B, S = 2, 9
    ids = torch.randint(0, engine.info.vocab_size, (B, S), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(B, S, dtype=torch.int64)
    pos = position_ids(mask)
    full, cache_full = engine.step(ids, pos, mask, None)
    last, cache_last = engine.step(ids, pos, mask, None, last_only=True)
    assert full.shape == (B, S, engine.info.vocab_size) and last.shape == (B, 1, engine.info.vocab_size)
    bound = tolerance_bound(torch.float32, full[:, -1].abs().max().item())
    assert (last[:, 0] - full[:, -1]).abs().max() <= bound, variant
    for (k, r), (k2, r2) in zip(cache_full.layers, cache_last.layers):
        assert torch.equal(k, k2) and torch.equal(r, r2)
    # not a slice taken after the step: the graph's logits output itself has one row per sequence
    session = engine.sessions["prefill"]
    feeds = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy(),
             "logits_from": np.array([S - 1])}
    feeds.update({i.name: np.zeros([B, 0, i.shape[-1]], np.float32) for i in session.get_inputs()
                  if i.name.startswith("past.")})
    assert session.run(["logits"], feeds)[0].shape == (B, 1, engine.info.vocab_size)


def test_step_accepts_a_torch_cache(pair):
    """A plain KVCache of torch tensors (e.g. from another engine) binds as well as an OrtKVCache."""
    _, engine, _ = pair
    ids, pos, mask = torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.int64)
    _, cache = engine.step(ids, pos, mask, None)
    plain = KVCache([(k.clone(), r.clone()) for k, r in cache.layers])
    a, _ = engine.step(ids[:, :1], pos[:, -1:] + 1, torch.ones(1, 4, dtype=torch.int64), cache)
    b, _ = engine.step(ids[:, :1], pos[:, -1:] + 1, torch.ones(1, 4, dtype=torch.int64), plain)
    c, _ = engine.step(ids[:, :1], pos[:, -1:] + 1, torch.ones(1, 4, dtype=torch.int64), engine.own_cache(plain))
    assert torch.equal(a, b) and torch.equal(a, c)


# ---------------------------------------------------------------- in-place decode


def _without_in_place(out, tmp_path) -> OrtEngine:
    """The same OUT with no in-place graph in its manifest (an export made before there was one)."""
    dst = tmp_path / "contract"
    shutil.copytree(out, dst)
    m = json.loads((dst / "manifest.json").read_text())
    del m["graphs"]["decode"]["in_place"]
    (dst / "manifest.json").write_text(json.dumps(m))
    return OrtEngine.load(dst, provider="cpu")


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_in_place_decode_matches_contract_decode(variant, tmp_path, exported):
    """B=2 (row 0 left-padded) through 10 decode steps with buffers growing by 4 rows: the in-place
    graph gives the contract decode graph's logits and cache, and writes the same buffers until they
    are full."""
    engine = OrtEngine.load(exported(variant), provider="cpu")
    engine.capacity_step = 4
    contract = _without_in_place(exported(variant), tmp_path)
    assert set(engine.sessions) == {"prefill", "decode_inplace"} and set(contract.sessions) == {"prefill", "decode"}
    B, S = 2, 5
    ids = torch.randint(0, engine.info.vocab_size, (B, S), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(B, S, dtype=torch.int64)
    mask[0, :2] = 0
    pos = position_ids(mask)
    cache_i = cache_c = None
    buffers = []
    for step in range(11):
        got, cache_i = engine.step(ids, pos, mask, cache_i)
        want, cache_c = contract.step(ids, pos, mask, cache_c)
        bound = tolerance_bound(torch.float32, want.abs().max().item())
        assert (got - want).abs().max() <= bound, f"{variant} step {step}: max|Δ|={(got - want).abs().max():.3e}"
        if step > 0:
            assert isinstance(cache_i, OrtCapacityCache) and isinstance(cache_c, OrtKVCache)
            if not buffers or buffers[-1][0] is not cache_i.buffers:
                buffers.append((cache_i.buffers, cache_i.buffers.tensors[0].data_ptr()))
        ids = want[:, -1].argmax(-1, keepdim=True)
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.int64)], dim=1)
    # P = 5..14: rows 5-7 in capacity 8, 8-11 in 12, 12-14 in 16; one buffer set each
    assert [b.capacity for b, _ in buffers] == [8, 12, 16]
    assert all(b.tensors[0].data_ptr() == ptr for b, ptr in buffers)
    assert cache_i.length == cache_c.length == S + 10
    real = mask[:, :-1].bool()
    for (k_i, r_i), (k_c, r_c) in zip(cache_i.layers, cache_c.layers):
        for a, b in ((k_i, k_c), (r_i, r_c)):
            assert a.shape == b.shape
            assert (a - b).abs()[real].max() <= tolerance_bound(torch.float32, b[real].abs().max().item())


def test_in_place_step_never_changes_a_held_cache(pair):
    """Two steps from one cache while the first result is held: the second writes into new buffers,
    and each gives eager's logits and cache row for its own token. Once both results are dropped, a
    step writes the original buffers again, with the same logits."""
    _, engine, model = pair
    ids, pos = torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 2]])
    _, prefilled = engine.step(ids, pos, torch.ones(1, 3, dtype=torch.int64), None)
    cache = engine.own_cache(prefilled)
    assert isinstance(cache, OrtCapacityCache) and cache.length == 3
    mask = torch.ones(1, 4, dtype=torch.int64)
    la, ca = engine.step(torch.tensor([[11]]), torch.tensor([[3]]), mask, cache)
    held = [r.clone() for r in ca.rows()]
    lb, cb = engine.step(torch.tensor([[12]]), torch.tensor([[3]]), mask, cache)
    assert cb.buffers is not ca.buffers and ca.buffers is cache.buffers
    assert all(torch.equal(h, r) for h, r in zip(held, ca.rows())), "a step changed a cache someone holds"
    with torch.no_grad():
        _, past = model(ids, pos, torch.ones(1, 3, dtype=torch.int64))
        want = {token: model(torch.tensor([[token]]), torch.tensor([[3]]), mask, past) for token in (11, 12)}
    for logits, rows, token in ((la, ca.rows(), 11), (lb, cb.rows(), 12)):
        assert_close(logits, want[token][0], what=f"logits after token {token}")
        assert_close(rows[0][:, 3], want[token][1][0][0][:, 3], what=f"layer 0 kv_latent row of token {token}")
    del ca, cb
    lc, cc = engine.step(torch.tensor([[11]]), torch.tensor([[3]]), mask, cache)
    assert cc.buffers is cache.buffers
    assert torch.equal(lc, la)


def test_in_place_binding_is_kept_with_its_buffers(pair):
    """Steps over the same buffers reuse one IOBinding (ort_cache.InPlaceBindings) and still give
    eager's logits; logits a step returned are never written by a later run of that binding; a step
    that finds the binding busy runs on one of its own; the binding goes when its buffers do."""
    _, engine, model = pair
    bindings = engine._in_place
    ids, pos = torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 2]])
    _, prefilled = engine.step(ids, pos, torch.ones(1, 3, dtype=torch.int64), None)
    cache = engine.own_cache(prefilled)
    la, ca = engine.step(torch.tensor([[11]]), torch.tensor([[3]]), torch.ones(1, 4, dtype=torch.int64), cache)
    kept = bindings._kept[cache.buffers][1]
    first = la.clone()
    mask = torch.ones(1, 5, dtype=torch.int64)
    lb, cb = engine.step(torch.tensor([[12]]), torch.tensor([[4]]), mask, ca)
    assert cb.buffers is cache.buffers and bindings._kept[cache.buffers][1] is kept, "the binding was not reused"
    assert torch.equal(la, first), "a later run wrote into logits returned before"
    with torch.no_grad():
        _, past = model(ids, pos, torch.ones(1, 3, dtype=torch.int64))
        _, past = model(torch.tensor([[11]]), torch.tensor([[3]]), torch.ones(1, 4, dtype=torch.int64), past)
        want, _ = model(torch.tensor([[12]]), torch.tensor([[4]]), mask, past)
    assert_close(lb, want, what="logits of a step through the kept binding")
    del cb
    with kept.lock:  # another thread's step in flight: this one binds on its own
        busy, _ = engine.step(torch.tensor([[12]]), torch.tensor([[4]]), mask, ca)
    assert torch.equal(busy, lb) and bindings._kept[cache.buffers][1] is kept
    count = len(bindings._kept)
    del prefilled, cache, ca, _
    gc.collect()
    assert len(bindings._kept) == count - 1, "the binding outlived its buffers"


# ---------------------------------------------------------------- errors


@pytest.fixture
def broken(tmp_path, exported):
    """A private copy of an OUT to damage."""
    dst = tmp_path / "out"
    shutil.copytree(exported("v3"), dst)
    return dst


def test_missing_out(tmp_path):
    with pytest.raises(EngineError, match="not found"):
        OrtEngine.load(tmp_path / "nothing")


def test_truncated_onnx(broken):
    data = (broken / "decode.onnx").read_bytes()
    (broken / "decode.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(EngineError, match="decode.onnx") as err:
        OrtEngine.load(broken)
    assert "\n" not in str(err.value)


def test_unknown_manifest_version(broken):
    path = broken / "manifest.json"
    m = json.loads(path.read_text())
    m["format_version"] = 99
    path.write_text(json.dumps(m))
    with pytest.raises(EngineError, match="format_version 99"):
        OrtEngine.load(broken)
    path.write_text("{not json")
    with pytest.raises(EngineError, match="manifest.json: not valid JSON"):
        read_manifest(broken)


def test_missing_in_place_graph(broken):
    (broken / "decode_inplace.onnx").unlink()
    with pytest.raises(EngineError, match="decode_inplace.onnx: graph file not found"):
        OrtEngine.load(broken)


def test_external_data_outside_out(broken):
    model = onnx.load(str(broken / "prefill.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = "../weights.bin"
    onnx.save(model, str(broken / "prefill.onnx"))
    with pytest.raises(EngineError, match="not a relative path inside"):
        OrtEngine.load(broken)


def test_bad_inputs(pair, export_limits):
    _, engine, _ = pair
    V = engine.info.vocab_size
    with pytest.raises(EngineError, match=f"input id {V} is outside the vocabulary"):
        engine.step(torch.tensor([[1, V]]), torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.int64), None)
    with pytest.raises(EngineError, match="outside the vocabulary"):
        engine.generate([[1, -1]], 2)
    too_long = [[1] * (export_limits.max_context + 1)]
    with pytest.raises(EngineError, match="exceed"):
        engine.generate(too_long, 1)
    with pytest.raises(EngineError, match="attention_mask"):
        engine.step(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), torch.ones(1, 3, dtype=torch.int64), None)


# -- GPU providers on a machine where they cannot run -----------------------------------------------


def test_provider_options_keep_float32_ieee_unless_tf32():
    """The CUDA provider defaults to use_tf32=1; the options every session is created with say "0"
    unless the caller opts in."""
    from dscompile.runtime.ort_engine import provider_chain

    chain = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_chain(chain) == [("TensorrtExecutionProvider", {}), ("CUDAExecutionProvider", {"use_tf32": "0"}),
                                     ("CPUExecutionProvider", {})]
    assert dict(provider_chain(chain, tf32=True))["CUDAExecutionProvider"] == {"use_tf32": "1"}
    assert provider_chain(["CPUExecutionProvider"], tf32=True) == [("CPUExecutionProvider", {})]


@pytest.fixture
def gpu_without_libraries(monkeypatch):
    """This machine as a GPU machine without ONNX Runtime's CUDA 13 libraries: the driver check says a GPU
    is present, so ONNX Runtime really tries its CUDA provider, whose library does not load here. Every
    InferenceSession's arguments are recorded."""
    import onnxruntime

    from dscompile.runtime import ort_engine

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (the CPU wheel): nothing would try to load it")
    if ort_engine.missing_for("cuda") in (None, "no CUDA GPU is present"):
        pytest.skip("the CUDA 13 libraries load here: ONNX Runtime's CUDA provider would not fail")
    monkeypatch.setattr(ort_engine, "cuda_gpu_present", lambda: True)
    calls, real = [], onnxruntime.InferenceSession

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    return calls


def test_cuda_asked_for_is_refused_not_run_on_cpu(exported, gpu_without_libraries, capfd):
    """ONNX Runtime gives a CUDA session whose provider does not load the CPU provider instead (a warning on
    fd 2); the engine refuses it in one line naming what is missing, prints nothing else, and asked IEEE
    float32 of the CUDA provider, with ONNX Runtime's own retry off."""
    from dscompile.runtime.ort_engine import ProviderUnavailable

    capfd.readouterr()
    with pytest.raises(ProviderUnavailable) as err:
        OrtEngine.load(exported("v3"), provider="cuda")
    message = str(err.value)
    assert "\n" not in message and message.startswith("provider 'cuda' is not usable here: ")
    assert "libcublas.so.13" in message and "gave the session CPUExecutionProvider" in message, message
    assert capfd.readouterr() == ("", "")  # no "Falling back to ['CPUExecutionProvider']", no ORT log lines
    kwargs = gpu_without_libraries[0]
    assert kwargs["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert kwargs["provider_options"][0] == {"use_tf32": "0"} and kwargs["enable_fallback"] == 0
    # TensorRT: listed by get_available_providers, absent here. A float32 engine needs the TF32 opt-in
    # first (TensorRT computes float32 GEMMs in TF32); then the provider itself is refused.
    with pytest.raises(OptionError, match="--tf32"):
        OrtEngine.load(exported("v3"), provider="tensorrt")
    with pytest.raises(ProviderUnavailable, match="provider 'tensorrt' is not usable here: .*libnvinfer.so.10"):
        OrtEngine.load(exported("v3"), provider="tensorrt", tf32=True)
    assert "Falling back" not in capfd.readouterr().out


def test_auto_runs_on_cpu_and_says_why(exported, gpu_without_libraries):
    """"auto" on the same machine tries CUDA, is refused, and reopens on CPU with a note; it steps as the
    CPU engine does."""
    cpu_engine = OrtEngine.load(exported("v3"), provider="cpu")
    engine = OrtEngine.load(exported("v3"), provider="auto")
    assert engine.provider == "CPUExecutionProvider" and engine.device == "cpu"
    assert len(engine.notes) == 1 and "provider 'cuda' is not usable here" in engine.notes[0], engine.notes
    assert engine.notes[0].endswith("running on CPU")
    ids = torch.tensor([[1, 2, 3]])
    inputs = (ids, position_ids(torch.ones_like(ids)), torch.ones_like(ids))
    torch.testing.assert_close(engine.step(*inputs, None)[0], cpu_engine.step(*inputs, None)[0], rtol=0, atol=0)


def test_cuda_refused_on_the_command_line(exported, monkeypatch):
    """`dscompile run --provider cuda` on this CPU machine: exit 2, one stderr line, no traceback, nothing
    run; `auto` runs and names the device it ran on."""
    out = exported("v3")
    result = run_here("run", out, "--provider", "cuda", "--input-ids", "1,2,3", "--max-new-tokens", "2")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == "", result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: provider 'cuda' is not usable here: "), lines
    result = run_here("run", out, "--input-ids", "1,2,3", "--max-new-tokens", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["device"] == "cpu"
    # --tf32 is ONNX Runtime's option: the other backends refuse it in one line
    result = run_here("run", out, "--backend", "torch", "--tf32", "--input-ids", "1,2")
    assert result.returncode == 2 and result.stderr.startswith("error: --tf32 is an option of --backend onnxruntime")


def test_compare_with_tf32_judges_with_the_tf32_tolerance(exported, exported_ckpt):
    """compare's bound with the TF32 opt-in is tolerance.TF32's, for the same steps (here on CPU, where the
    engine computes IEEE float32 either way, so only the bound differs)."""
    import dscompile
    from dscompile.tolerance import TF32, TOLERANCE

    plain = dscompile.compare(exported_ckpt("v3"), exported("v3"), decode_steps=1)
    tf32 = dscompile.compare(exported_ckpt("v3"), exported("v3"), decode_steps=1, tf32=True)
    assert plain["passed"] and tf32["passed"]
    ratio = TF32[torch.float32] / TOLERANCE[torch.float32]
    for p, t in zip(plain["steps"], tf32["steps"]):
        assert t["atol"] == pytest.approx(p["atol"] * ratio), (p["atol"], t["atol"])


@pytest.mark.parametrize("dtype,onnx_type", [(torch.float32, 1), (torch.bfloat16, 16)])
def test_capacity_buffers_hold_the_rows_then_zeros(dtype, onnx_type):
    # CacheBuffers.holding copies through numpy byte views (one thread: runtime/ort_cache.py); bfloat16
    # has no numpy dtype, and a cache row may come strided (a slice of a wider tensor)
    import onnxruntime as ort

    from dscompile.runtime.ort_cache import CacheBuffers

    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 5, 24, generator=gen).to(dtype)
    rows = [wide[:, :, :16], torch.randn(2, 5, 8, generator=gen).to(dtype)]  # the first strided
    buffers = CacheBuffers.holding(ort, rows, 12, onnx_type)
    for buffer, t in zip(buffers.tensors, rows):
        assert buffer.shape == (2, 12, t.shape[-1]) and buffer.dtype == dtype
        assert torch.equal(buffer[:, :5], t) and not buffer[:, 5:].any()
    empty = CacheBuffers.holding(ort, [r[:, :0] for r in rows], 4, onnx_type)
    assert all(not b.any() and b.shape[1] == 4 for b in empty.tensors)
