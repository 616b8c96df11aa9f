"""Weight-only int8/int4 engines: the quantizer, the lowering to MatMulNBits/QMoE, both distances.

The int4 exports keep activations in float32 (accuracy_level 0), so the engine must compute what
the eager model with the same fake-quantized weights computes, within the float32 tolerance: a
wrong packing, scale layout, transposition or routing (QMoE's top-k, its mixing weights, V2's
scaling without renormalization, V3's sigmoid + bias + group limit + renormalization) is far
outside it. ONNX Runtime's 8-bit QMoE quantizes activations at every level, so the int8 export is
held to the measured QUANTIZED_ACTIVATIONS bound instead (its linear layers stay exact).
One export per routing method: v2 (group-limited greedy softmax, not renormalized, scaled), v2-lite
(greedy), v3 from a block-scaled FP8 checkpoint (noaux_tc with groups, renormalized).
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import onnx
import pytest
import torch

from dscompile.verify.compare import eager_for, lowering_table, run_compare, scheme_cost, scheme_of
from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.options import ExportOptions
from dscompile.model import quant
from dscompile.model.checkpoint import load_checkpoint
from dscompile.model.quant import Scheme, dequantize, fake_quantize, pack, quantize, unpack
from dscompile.errors import EngineError
from dscompile.runtime.contract import position_ids
from dscompile.runtime.ort_engine import OrtEngine
from dscompile.tolerance import QUANTIZED_ACTIVATIONS, TOLERANCE
from dscompile.tolerance import bound as tolerance_bound

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

BLOCK = 16  # the tiny configs' q_lora_rank (48) and kv_lora_rank (32) are multiples of 16, not of 32
CASES = {  # name: (variant, checkpoint options, bits)
    "v2-int4": ("v2", {}, 4),
    "v2-lite-int8": ("v2-lite", {}, 8),
    "v3-fp8-int4": ("v3", {"fp8": True}, 4),
}


# ---------------------------------------------------------------- the quantizer


@pytest.mark.parametrize("bits", [4, 8])
def test_quantizer_roundtrip(bits):
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    scheme = Scheme(bits, 32)
    q, d = quantize(w, scheme)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert q.shape == (48, 4, 32) and d.shape == (48, 4)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    assert torch.equal(unpack(pack(q, bits), bits), q)
    assert pack(q, bits).shape == (48, 4, 32 * bits // 8)
    fake = dequantize(q, d)
    # the error of a value is at most half a step, or where it is clamped (the value of the peak's
    # magnitude on the other side, or values beyond a peak the search clipped) |lo|/factor - hi steps
    step = d.abs().repeat_interleave(32, dim=1)
    factor = min(quant.SEARCH_FACTORS) if scheme.searches else 1.0
    limit = max(0.5, -lo / factor - hi)
    assert ((fake - w).abs() <= step * limit + 1e-7).all()
    # quantizing the quantized weight again gives the same integers and scales (the engine's bits)
    q2, d2 = quantize(fake, Scheme(bits, 32, search=False))
    assert torch.equal(q2, q) and torch.equal(d2, d)
    assert torch.equal(fake_quantize(fake, scheme), fake)
    rel = float((fake - w).norm() / w.norm())
    assert rel < (0.1 if bits == 4 else 0.006), rel


def test_scale_search_lowers_the_error():
    torch.manual_seed(1)
    w = torch.randn(256, 256)
    plain = fake_quantize(w, Scheme(4, 32, search=False))
    searched = fake_quantize(w, Scheme(4, 32, search=True))
    assert float((searched - w).pow(2).sum()) < 0.95 * float((plain - w).pow(2).sum())


def test_which_weights_are_quantized():
    yes = ["layers.0.self_attn.q_a_proj.weight", "model.layers.3.self_attn.kv_b_proj.weight",
           "layers.1.mlp.experts.gate_proj", "layers.1.mlp.shared_experts.down_proj.weight",
           "layers.0.mlp.up_proj.weight", "lm_head.weight"]
    no = ["embed_tokens.weight", "layers.1.mlp.gate.weight", "layers.1.mlp.gate.e_score_correction_bias",
          "layers.0.input_layernorm.weight", "layers.0.self_attn.kv_a_layernorm.weight"]
    assert all(quant.is_quantized(n) for n in yes)
    assert not any(quant.is_quantized(n) for n in no)


# ---------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def quantized(make_ckpt, tmp_path_factory):
    """name -> (checkpoint, OUT) of every case, exported once; also records the peak float32 bytes
    that fake-quantized weights held at once while the FP8 one was exported."""
    built: dict[str, tuple[Path, Path]] = {}
    live = {"bytes": 0, "peak": 0}
    load = quant.FakeQuantized.load

    def tracking(self):
        out = load(self)
        live["bytes"] += out.numel() * out.element_size()
        live["peak"] = max(live["peak"], live["bytes"])
        weakref.finalize(out, lambda n=out.numel() * out.element_size(): live.__setitem__("bytes", live["bytes"] - n))
        return out

    def build(name: str) -> tuple[Path, Path]:
        if name not in built:
            variant, options, bits = CASES[name]
            # vocab 256: the size and error bounds below were measured with it (the embedding stays float32)
            ckpt = make_ckpt(variant, layers=4, vocab=256, **options) if options else make_ckpt(variant, vocab=256)
            out = tmp_path_factory.mktemp("quant") / name
            quant.FakeQuantized.load = tracking
            try:
                live.update(bytes=0, peak=0)
                # one export also runs --verify: the engine checked against eager before OUT is published
                export_checkpoint(ckpt, out, ExportOptions(weights=f"int{bits}", block_size=BLOCK, accuracy_level=0,
                                                           verify=name == "v2-lite-int8"))
                built[name] = (ckpt, out)
                built[name + ":peak"] = live["peak"]
            finally:
                quant.FakeQuantized.load = load
        return built[name]

    build.peaks = built
    return build


@pytest.mark.parametrize("name", list(CASES))
def test_engine_matches_eager_with_the_same_quantized_weights(quantized, name):
    """The lowering's distance: fp32 tolerance (activations stay float32 at accuracy_level 0)."""
    ckpt, out = quantized(name)
    manifest = json.loads((out / "manifest.json").read_text())
    bits = CASES[name][2]
    table = lowering_table(manifest)
    assert table == (QUANTIZED_ACTIVATIONS if bits == 8 else None)  # level 0; int8 QMoE quantizes anyway
    engine = OrtEngine.load(out, provider="cpu")
    eager = eager_for(ckpt, engine.info.max_positions, scheme_of(manifest))
    report = run_compare(engine, eager, decode_steps=3, table=table)
    worst = max(s["logits"]["max_abs"] / max(1.0, s["logits"]["ref_max"]) for s in report["steps"])
    bound = (table or TOLERANCE)[torch.float32]
    assert report["passed"], f"{name}: max |Δ| / max(1, |ref|) = {worst:.3g} > {bound}"
    # ...and the scheme's distance is a real one: the engine is not the fp32 model, yet close to it
    # (logits of an unrelated model would be ~1.4 away: two independent vectors of equal norm). The
    # tiny random models are harsh on int4 (block 16 of FP8-rounded weights: ~0.6).
    cost = scheme_cost(engine, ckpt, decode_steps=3)
    assert 1e-3 < cost["mean"]["logits_rel_rms"] < (0.05 if bits == 8 else 0.9), cost["mean"]
    assert 0.0 < cost["mean"]["kl"] and 0.0 <= cost["mean"]["top1_agreement"] <= 1.0


@pytest.mark.parametrize("name", list(CASES))
def test_graphs_use_the_quantized_kernels(quantized, name):
    """Every linear layer is a MatMulNBits, each MoE layer one QMoE; only the float parts stay float."""
    ckpt, out = quantized(name)
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = manifest["model"]
    moe_layers = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    for phase in ("prefill", "decode"):
        model = onnx.load(str(out / manifest["graphs"][phase]["file"]), load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("QMoE") == moe_layers and "MoE" not in ops
        assert ops.count("MatMulNBits") >= 3 * cfg["num_hidden_layers"] + 1  # q, kv_a, o per layer; lm_head
        bits = {}
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                bits.setdefault(attrs["N"] == cfg["vocab_size"], set()).add(attrs["bits"])
        # lm_head keeps 8 bits (its error goes straight into the logits: model/quant.py), the rest the scheme's
        assert bits == {True: {8}, False: {CASES[name][2]}} and manifest["quantization"]["lm_head_bits"] == 8
        float_inits = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                       and int(torch.tensor(list(t.dims)).prod()) >= 1024}
        for name_ in float_inits:
            assert (name_.endswith(".scales") or "embed_tokens" in name_ or ".mlp.gate.weight" in name_
                    or ".absorb." in name_ or "norm" in name_), f"{phase}: float weight {name_}"
    assert not list(out.glob("*.pt2"))  # no float programs beside a quantized engine
    # the one session runs prefills too: a generation's prefill computes the last token's logits only
    engine = OrtEngine.load(out, provider="cpu")
    ids = torch.randint(0, engine.info.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(1, 6, dtype=torch.int64)
    full, _ = engine.step(ids, position_ids(mask), mask, None)
    last, _ = engine.step(ids, position_ids(mask), mask, None, last_only=True)
    assert engine._logits_from["prefill"] and last.shape == (1, 1, engine.info.vocab_size)
    assert (last[:, 0] - full[:, -1]).abs().max() <= tolerance_bound(torch.float32, full[:, -1].abs().max().item())


def test_verify_runs_the_quantized_engine(quantized):
    _, out = quantized("v2-lite-int8")
    verified = json.loads((out / "manifest.json").read_text())["quantization"]["verified"]
    assert verified["passed"] and verified["steps"] == 3 and verified["max_abs"] <= verified["atol"]


def test_manifest_records_the_scheme_and_errors(quantized):
    ckpt, out = quantized("v2-int4")
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    assert (q["scheme"], q["bits"], q["block_size"]) == ("int4", 4, BLOCK)
    assert q["bits_per_weight"] == 4 + 32 / BLOCK
    assert q["accuracy_level"] == {"MatMulNBits": 0, "QMoE": 0}
    assert q["quantized_activations"] == {"MatMulNBits": False, "QMoE": False}
    model = load_checkpoint(ckpt, device="meta")
    expected = {("model." + n if n != "lm_head.weight" else n) for n, _ in model.named_parameters()
                if quant.is_quantized(n)}
    assert set(q["weights_error"]) == expected
    for name, e in q["weights_error"].items():
        assert 0 < e["max_rel"] < 0.15 and e["max_abs"] > 0, (name, e)
    # weights.bin is about a quarter of the float32 parameters (plus the float parts)
    assert manifest["weights"]["bytes"] < 0.45 * manifest["weights"]["parameter_bytes"]


def test_stored_bits_are_the_checkpoint_weight_quantized(quantized):
    """An int4 weight in weights.bin, read back, is pack(quantize(checkpoint weight)) byte for byte."""
    ckpt, out = quantized("v2-int4")
    model = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    name = "model.layers.0.self_attn.o_proj.weight"
    raw = (out / "weights.bin").read_bytes()

    def read(tensor, dtype):
        where = {e.key: e.value for e in tensor.external_data}
        start, length = int(where["offset"]), int(where["length"])
        return torch.frombuffer(bytearray(raw[start:start + length]), dtype=dtype).reshape(list(tensor.dims))

    packed, scales = read(inits[f"{name}.int4"], torch.uint8), read(inits[f"{name}.scales"], torch.float32)
    w = load_checkpoint(ckpt).layers[0].self_attn.o_proj.weight.detach()
    q, d = quantize(w, Scheme(4, BLOCK))
    assert torch.equal(packed, pack(q, 4)) and torch.equal(scales, d)


def test_fp8_checkpoint_streams_through_quantization(quantized):
    """FP8 -> int4 one tensor at a time: fake-quantized float32 weights alive at once stay a small
    part of the model (no full-precision copy of it), and the engine passed against eager above."""
    ckpt, out = quantized("v3-fp8-int4")
    peak = quantized.peaks["v3-fp8-int4:peak"]
    model = load_checkpoint(ckpt, device="meta")
    sizes = [p.numel() * 4 for n, p in model.named_parameters() if quant.is_quantized(n)]
    assert peak > 0
    assert peak <= 3 * max(sizes) and peak < 0.5 * sum(sizes), (peak, max(sizes), sum(sizes))


def test_torch_backend_and_other_providers_refuse_a_quantized_engine(quantized):
    from dscompile.runtime.torch_engine import TorchEngine

    _, out = quantized("v2-int4")
    with pytest.raises(EngineError, match="int4 engine runs on ONNX Runtime only"):
        TorchEngine.load(out)
    with pytest.raises(EngineError):
        OrtEngine.load(out, provider="cuda")  # no GPU here, or float32 QMoE has no CUDA kernel
