"""Export to OUT (exporter/export.py, lowering/): files, ONNX checker, absorbed decode
graph, manifest, byte-reproducibility, half precision.

Exports are expensive (~15 s each), so each (variant, dtype) is exported once per test session
by the `exported` fixture (tests/conftest.py), which other test files share.

Shapes: B batch, S new tokens, P past, H heads, C kv_lora_rank, R rope dim, N/V nope/value dims.
"""

from __future__ import annotations


import onnx
import pytest
import torch

from dscompile.tolerance import bound as tolerance_bound

from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.options import ExportOptions
from dscompile.lowering.graph import check_model
from dscompile.model.args import ModelArgs
from dscompile.model.checkpoint import load_checkpoint
from dscompile.errors import OptionError
from dscompile.runtime.manifest import MANIFEST_FORMAT, read_manifest

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

VARIANTS = ("v3", "v2", "v2-lite")
FILES = {"prefill.onnx", "decode.onnx", "decode_inplace.onnx", "weights.bin", "manifest.json", "prefill.pt2",
         "decode.pt2", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}

@pytest.fixture(scope="module")
def args_of(exported_ckpt):
    """args_of(variant) -> the ModelArgs of `exported`'s checkpoint of `variant`."""
    return lambda variant: ModelArgs.from_json(exported_ckpt(variant) / "config.json")


@pytest.mark.parametrize("variant", VARIANTS)
def test_files_and_checker(variant, exported):
    out = exported(variant)
    assert {p.name for p in out.iterdir()} == FILES
    for graph in ("prefill", "decode", "decode_inplace"):
        check_model(out / f"{graph}.onnx")  # full_check: strict shape inference included


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_in_place_decode_graph(variant, exported, args_of):
    """decode_inplace.onnx is decode.onnx with each cache Concat replaced by a TensorScatter at
    write_index, writing the same weights (references into the same weights.bin)."""
    out = exported(variant)
    L = args_of(variant).num_hidden_layers
    base = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    model = onnx.load(str(out / "decode_inplace.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == [i.name for i in base.graph.input] + ["write_index"]
    assert [o.name for o in model.graph.output] == [o.name for o in base.graph.output]
    ops, base_ops = [n.op_type for n in model.graph.node], [n.op_type for n in base.graph.node]
    assert ops.count("TensorScatter") == 2 * L and base_ops.count("TensorScatter") == 0
    assert ops.count("Concat") == base_ops.count("Concat") - 2 * L
    producers = {o: n for n in model.graph.node for o in n.output}
    for out_value in model.graph.output[1:]:
        node = producers[out_value.name]
        assert node.op_type == "TensorScatter" and node.input[0] == out_value.name.replace("present", "past")
        assert node.input[2] == "write_index"
    assert {i.name for i in model.graph.initializer} == {i.name for i in base.graph.initializer}
    assert next(o.version for o in model.opset_import if o.domain == "") == 24
    m = read_manifest(out)["graphs"]["decode"]["in_place"]
    assert m["file"] == "decode_inplace.onnx" and m["op_counts"]["TensorScatter"] == 2 * L and m["opset"] == 24
    assert {i["name"]: i["shape"] for i in m["inputs"]}["attention_mask"] == ["batch", "past"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_attends_in_latent_space(variant, exported, args_of):
    """No matmul against kv_b_proj [H*(N+V), C] over the cache; the latent composite instead."""
    a = args_of(variant)
    H, N, V, C, R = a.num_attention_heads, a.qk_nope_head_dim, a.v_head_dim, a.kv_lora_rank, a.qk_rope_head_dim
    model = onnx.load(str(exported(variant) / "decode.onnx"), load_external_data=False)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    kv_b = {(H * (N + V), C), (C, H * (N + V))}
    expanding = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Einsum")
                 and any(shapes.get(i) in kv_b for i in n.input)]
    assert not expanding, f"decode graph still expands the latent cache with kv_b_proj: {expanding}"
    ops = [n.op_type for n in model.graph.node]
    assert "Attention" not in ops
    # the absorbed W_UK/W_UV products are MatMuls: ONNX Runtime's CPU Einsum ran them ~10x under bandwidth
    assert "Einsum" not in ops
    assert ops.count("Softmax") >= a.num_hidden_layers  # one latent-attention composite per layer
    for out in model.graph.output[1:]:
        last = out.type.tensor_type.shape.dim[-1].dim_value
        assert last == (C if out.name.endswith("kv_latent") else R), f"{out.name}: last dim {last}"
    prefill = onnx.load(str(exported(variant) / "prefill.onnx"), load_external_data=False)
    assert [o.name for o in prefill.graph.output] == [o.name for o in model.graph.output]


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_float32_moe_is_one_com_microsoft_moe_per_layer_in_both_graphs(variant, exported, args_of):
    """Prefill as decode: one com.microsoft.MoE per MoE layer and nothing per expert (an expert
    loop has NonZero/ScatterND and slices of the stacked weights), both graphs reading the same
    fc1 and fc2 bytes of weights.bin."""
    out = exported(variant)
    a = args_of(variant)
    manifest = read_manifest(out)
    moe_weights = {}
    for graph in ("prefill", "decode"):
        model = onnx.load(str(out / f"{graph}.onnx"), load_external_data=False)
        moes = [n for n in model.graph.node if n.domain == "com.microsoft" and n.op_type == "MoE"]
        assert len(moes) == a.num_moe_layers and manifest["graphs"][graph]["moe_lowering"] == "moe_op"
        ops = [n.op_type for n in model.graph.node]
        assert "NonZero" not in ops and "ScatterND" not in ops
        # The stacked expert weights [E, ...] are read by the MoE ops alone (an expert loop would
        # slice them per expert).
        stacked = {t.name for t in model.graph.initializer if len(t.dims) == 3 and t.dims[0] == a.n_routed_experts}
        readers = {n.op_type for n in model.graph.node if stacked & set(n.input)}
        assert len(stacked) == 2 * a.num_moe_layers and readers == {"MoE"}, readers
        places = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer}
        moe_weights[graph] = [(places[n.input[2]]["offset"], places[n.input[4]]["offset"]) for n in moes]
    assert moe_weights["prefill"] == moe_weights["decode"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifest(variant, exported, args_of):
    out = exported(variant)
    m = read_manifest(out)
    a = args_of(variant)
    assert m["format_version"] == MANIFEST_FORMAT and m["target"] == "onnxruntime" and m["runtime"] == "onnxruntime" and m["dtype"] == "float32"
    assert m["opset"] == 23 and m["model"] == a.to_config()
    assert m["limits"] == {"max_batch": 8, "max_prompt_tokens": 128, "max_context": 256}
    cache = m["cache"]
    L, C, R = a.num_hidden_layers, a.kv_lora_rank, a.qk_rope_head_dim
    assert cache["per_layer"] == {"kv_latent": C, "k_rope": R}
    assert cache["bytes_per_token"] == L * (C + R) * 4
    H, N, V = a.num_attention_heads, a.qk_nope_head_dim, a.v_head_dim
    assert cache["mha_equivalent_bytes_per_token"] == L * H * (N + R + V) * 4
    for graph in ("prefill", "decode"):
        g = m["graphs"][graph]
        assert g["file"] == f"{graph}.onnx" and g["program"] == f"{graph}.pt2"
        ins = {i["name"]: i for i in g["inputs"]}
        assert ins["input_ids"]["shape"] == ["batch", "seq"] and ins["input_ids"]["dtype"] == "int64"
        assert ins["attention_mask"]["shape"] == ["batch", "past + seq"]
        assert ins["past.0.kv_latent"]["shape"] == ["batch", "past", C]
        outs = {o["name"]: o for o in g["outputs"]}
        # S rows, or S - logits_from where the caller feeds the optional input (lowering/logits.py)
        assert outs["logits"]["dtype"] == "float32" and outs["logits"]["shape"] == ["batch", "logits_tokens", a.vocab_size]
        assert "logits_from" in g and "logits_from" not in ins
        names = [p["name"] for p in g["passes"]["passes"]]
        assert names == ["squeeze_cache_append", "absorb_mla", "fuse_moe"]
        assert {p["name"]: p["count"] for p in g["passes"]["passes"]}["fuse_moe"] == a.num_moe_layers
    assert {p["name"]: p["count"] for p in m["graphs"]["decode"]["passes"]["passes"]}["absorb_mla"] == L
    assert set(m["files"]) == FILES - {"manifest.json"}
    for name, info in m["files"].items():
        assert (out / name).stat().st_size == info["bytes"]
    assert m["weights"]["shared_tensors"] > 0  # prefill and decode share their weights in weights.bin


def test_float16_export_loads_and_runs(exported, exported_ckpt):
    """A float16 engine keeps float32 logits and a float16 cache; its prefill and the decode step
    after it are within float16's tolerance of the float32 eager model."""
    from dscompile.runtime.ort_engine import OrtEngine

    out = exported("v3", "float16")  # the session's float16 export (tests/runtime/test_fp16_generation.py runs it too)
    m = read_manifest(out)
    assert m["dtype"] == "float16" and m["cache"]["dtype"] == "float16"
    assert m["graphs"]["decode"]["outputs"][0]["dtype"] == "float32"  # logits stay float32
    engine = OrtEngine.load(out, provider="cpu")
    ids = torch.tensor([[5, 17, 42, 7], [1, 2, 3, 4]])
    pos = torch.arange(4).expand(2, 4)
    mask = torch.ones(2, 4, dtype=torch.int64)
    logits, cache = engine.step(ids, pos, mask, None)
    logits2, _ = engine.step(ids[:, :1], pos[:, -1:] + 1, torch.ones(2, 5, dtype=torch.int64), cache)
    assert logits.dtype == torch.float32 and logits2.dtype == torch.float32
    assert cache.layers[0][0].dtype == torch.float16
    ref = load_checkpoint(exported_ckpt("v3"), dtype=torch.float32)
    with torch.no_grad():
        want, past = ref(ids, pos, mask)
        want2, _ = ref(ids[:, :1], pos[:, -1:] + 1, torch.ones(2, 5, dtype=torch.int64), past)
    for step, got, ref_logits in (("prefill", logits, want), ("decode", logits2, want2)):
        err = (got - ref_logits).abs()
        bound = tolerance_bound(torch.float16, ref_logits.abs().max().item())
        assert err.max() <= bound, (f"float16 {step} vs float32 eager: max|Δ|={err.max():.3e} "
                                    f"mean|Δ|={err.mean():.3e} > {bound:.3e}")


def test_refuses_a_non_empty_out(tmp_path, exported_ckpt, export_limits):
    ckpt = exported_ckpt("v3")
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(OptionError, match="not empty"):
        export_checkpoint(ckpt, tmp_path, ExportOptions.within(export_limits))
    with pytest.raises(OptionError, match="--dtype"):
        export_checkpoint(ckpt, tmp_path / "new", ExportOptions(dtype="float8"))
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
