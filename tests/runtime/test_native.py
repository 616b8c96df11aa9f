"""runtime/native: dscompile's own ONNX Runtime kernels (ai.dscompile: the quantized HeadsMatMulQ8,
MatMulQ4/Q8 and MoEQ4/Q8; the float32 MatMulF32, LinearF32 and MoEF32) and `export --native-kernels`.

The kernel and the engines that use it need the library built here: g++, ONNX Runtime's C/C++ API
headers (DSCOMPILE_ORT_INCLUDE, or /usr/include/onnxruntime) and an AVX-512 CPU; those tests skip
with `unavailable()`'s reason elsewhere. The refusals run everywhere.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from dscompile.errors import EngineError, OptionError
from dscompile.exporter.export import export_checkpoint
from dscompile.cli.inspect import report_lines
from dscompile.exporter.options import ExportOptions
from dscompile.inspect import inspect
from dscompile.lowering.encodings import panels
from dscompile.lowering.fuse_experts import SHARED_MLPS
from dscompile.model.quant import Scheme, quantize
from dscompile.runtime import native
from dscompile.runtime.native import DOMAIN

WHY = native.unavailable()
needs_library = pytest.mark.skipif(WHY is not None, reason=f"the native kernel library cannot be built here: {WHY}")


def _session(op: str, inputs: dict[str, list[int] | None], weights: dict[str, np.ndarray], types=None, **attrs):
    """An ONNX Runtime session (2 threads, the library registered) of one `op` node over `inputs` (name:
    shape; float32 unless `types` names another TensorProto type) and the constant `weights`, output "y"."""
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    types = types or {}
    graph = h.make_graph([h.make_node(op, [*inputs, *weights], ["y"], domain=DOMAIN, **attrs)], "g",
                         [h.make_tensor_value_info(n, types.get(n, TP.FLOAT), shape) for n, shape in inputs.items()],
                         [h.make_tensor_value_info("y", TP.FLOAT, None)],
                         [nh.from_array(a, n) for n, a in weights.items()])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    native.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@needs_library
@pytest.mark.parametrize("K,N,B,S", [(128, 512, 1, 1), (512, 128, 1, 1), (128, 512, 2, 3), (96, 40, 1, 5), (32, 16, 2, 1)])
def test_kernel_equals_the_dequantized_product(K, N, B, S):
    # one token (the widening path) and several (the panel path, with rows past a multiple of 16 and
    # token groups short of 4), against float64 numpy on the very integers and scales the export stores
    H = 4
    rng = np.random.default_rng(K + N + S)
    w = rng.standard_normal((H, N, K)).astype(np.float32)
    q, d = quantize(torch.from_numpy(w), Scheme(8, 32, search=False))
    q, d = q.reshape(H, N, K).numpy(), d.numpy()
    x = rng.standard_normal((B, H, S, K)).astype(np.float32)
    y = _session("HeadsMatMulQ8", {"x": [B, H, S, K]}, {"q": q, "s": d}).run(None, {"x": x})[0]
    dequantized = (q.reshape(H, N, K // 32, 32).astype(np.float64) * d[..., None]).reshape(H, N, K)
    ref = np.einsum("bhsk,hnk->bhsn", x.astype(np.float64), dequantized)
    assert y.shape == (B, H, S, N) and np.abs(ref).max() > 1
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5
    plain = np.einsum("bhsk,hnk->bhsn", x, w)  # against float32 weights: the int8 rounding, far from nothing
    assert 1e-4 < np.abs(y - plain).max() / np.abs(plain).max() < 2e-2


def _int8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [M, K] as the native kernels quantize them: int8 per block of 32, and each block's scale."""
    blocks = x.reshape(x.shape[0], -1, 32)
    top = np.abs(blocks).max(-1, keepdims=True)
    q = np.rint(blocks * np.where(top > 0, np.float32(127) / top, 0).astype(np.float32))
    return q.astype(np.float64), (top[..., 0] / 127).astype(np.float64)


def _product(x: np.ndarray, q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """x [M, K] (rounded to int8 per block) through integers q [N, K/32, 32] with scales d [N, K/32] (rounded
    to float16), in float64."""
    xq, xs = _int8_rows(x)
    dots = np.einsum("mbk,nbk->mnb", xq, q.numpy().astype(np.float64))
    return np.einsum("mnb,mb,nb->mn", dots, xs, d.to(torch.float16).double().numpy())


@needs_library
@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("N,K,x_shape", [(40, 64, (1, 64)), (2048, 1024, (1, 1, 1024)), (37, 96, (3, 5, 96)),
                                         (512, 1408, (7, 1408)), (16, 32, (130, 32))])
def test_matmul_q_equals_the_integer_product_it_defines(bits, N, K, x_shape):
    # one token (panels per task) and many (token groups of 4, a short last group), rows past a multiple
    # of 16, inputs of rank 2 and 3; against float64 numpy on the same integers: the weights' int4/6/8 and
    # float16 scales, and the activations rounded to int8 per block of 32 as the kernels define them
    rng = np.random.default_rng(N + K)
    w = torch.from_numpy(rng.standard_normal((N, K)).astype(np.float32))
    q, d = quantize(w, Scheme(bits, 32, search=False))
    packed, scales = panels(q, d, bits)
    assert packed.shape == ((N + 15) // 16, K // 32, bits * 64) and scales.dtype == torch.float16
    x = rng.standard_normal(x_shape).astype(np.float32) * np.linspace(0.1, 3, K, dtype=np.float32)
    y = _session(f"MatMulQ{bits}", {"x": list(x_shape)}, {"q": packed.numpy(), "s": scales.numpy()}, K=K,
                 N=N).run(None, {"x": x})[0]
    ref = _product(x.reshape(-1, K), q, d).reshape(*x_shape[:-1], N)
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5
    plain = x @ w.numpy().T  # against the float weights and activations: the rounding's error, far from nothing
    error = np.abs(y - plain).max() / np.abs(plain).max()
    assert {4: 1e-2, 6: 3e-3, 8: 1e-3}[bits] < error < {4: 0.3, 6: 0.1, 8: 0.05}[bits], error


@needs_library
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("T,E,k,D,I", [(1, 16, 6, 256, 96), (1, 8, 3, 64, 32), (1, 4, 1, 64, 32), (9, 4, 2, 64, 32),
                                         (5, 8, 8, 32, 64)])
def test_moe_q_sums_the_chosen_experts_as_it_defines(bits, T, E, k, D, I):
    # one token (a task per chosen expert; with k = 1 the stepwise path) and several, every expert chosen
    # (k = E), slots grouped per expert in any number; against
    # float64 numpy on the same integers: each expert's int4/int8 and float16 scales, activations rounded to
    # int8 per block before fc1 and again before fc2, the mixing weights softmax(router) over the chosen
    rng = np.random.default_rng(T + E + D)
    w1 = torch.from_numpy(rng.standard_normal((E, 2 * I, D)).astype(np.float32))  # rows g0 u0 g1 u1 ...
    w2 = torch.from_numpy(rng.standard_normal((E, D, I)).astype(np.float32) / 4)
    (q1, d1), (q2, d2) = quantize(w1, Scheme(bits, 32, search=False)), quantize(w2, Scheme(bits, 32, search=False))
    (p1, s1), (p2, s2) = panels(q1, d1, bits), panels(q2, d2, bits)
    x = rng.standard_normal((T, D)).astype(np.float32)
    router = np.full((T, E), -1e30, np.float32)
    chosen = np.stack([rng.permutation(E)[:k] for _ in range(T)])
    np.put_along_axis(router, chosen, np.log(rng.random((T, k)).astype(np.float32) + 0.1), axis=1)
    weights = {n: t.numpy() for n, t in zip(("w1", "s1", "w2", "s2"), (p1, s1, p2, s2))}
    session = _session(f"MoEQ{bits}", {"x": None, "router": None}, weights, k=k, I=I)
    y = session.run(None, {"x": x, "router": router})[0]
    ref = np.zeros((T, D))
    for t in range(T):
        mix = np.exp(router[t, chosen[t]].astype(np.float64) - router[t, chosen[t]].max())
        for e, weight in zip(chosen[t], mix / mix.sum()):
            a = _swiglu(_product(x[t:t + 1], q1[e], d1[e])[0])
            ref[t] += weight * _product(a[None], q2[e], d2[e])[0]
    assert y.shape == (T, D) and np.abs(ref).max() > 0.1
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-4


def _swiglu(gu: np.ndarray) -> np.ndarray:
    """silu(g) * u of gate and up values interleaved (g0 u0 g1 u1 ...), rounded to float32 as the kernels keep it."""
    return (gu[0::2] / (1 + np.exp(-gu[0::2])) * gu[1::2]).astype(np.float32)


@needs_library
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("T,E,k,D,I,Is", [(1, 16, 6, 256, 96, 192), (1, 8, 3, 64, 32, 0), (1, 4, 1, 64, 32, 64),
                                            (9, 4, 2, 64, 32, 64), (5, 8, 8, 32, 64, 0), (3, 8, 2, 96, 64, 128)])
def test_experts_q_sums_the_given_experts_and_the_shared_mlp_as_it_defines(bits, T, E, k, D, I, Is):
    # ExpertsQ4/Q8 take TopK's choice (experts and weights, summed as given) and the shared MLP's three panel
    # matrices: one token (a task per chosen expert, the shared MLP one more; k = 1 the stepwise path) and
    # several; against float64 numpy on the same integers, activations rounded to int8 per block as the
    # kernels define them
    from onnx import TensorProto as TP

    rng = np.random.default_rng(T + E + D + Is)
    scheme = Scheme(bits, 32, search=False)
    w1 = torch.from_numpy(rng.standard_normal((E, 2 * I, D)).astype(np.float32))  # rows g0 u0 g1 u1 ...
    w2 = torch.from_numpy(rng.standard_normal((E, D, I)).astype(np.float32) / 4)
    (q1, d1), (q2, d2) = quantize(w1, scheme), quantize(w2, scheme)
    weights = dict(zip(("w1", "s1", "w2", "s2"), (t.numpy() for t in (*panels(q1, d1, bits), *panels(q2, d2, bits)))))
    shared = {}
    for name, shape in (("gate", (Is, D)), ("up", (Is, D)), ("down", (D, Is))) if Is else ():
        q, d = quantize(torch.from_numpy(rng.standard_normal(shape).astype(np.float32) / 2), scheme)
        shared[name] = q, d
        weights[name], weights[f"{name}_scales"] = (t.numpy() for t in panels(q, d, bits))
    x = rng.standard_normal((T, D)).astype(np.float32)
    chosen = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
    mix = (rng.random((T, k)) + 0.1).astype(np.float32)
    session = _session(f"ExpertsQ{bits}", {"x": None, "weights": None, "experts": None}, weights,
                       types={"experts": TP.INT64}, I=I, shared_I=Is)
    y = session.run(None, {"x": x, "weights": mix, "experts": chosen})[0]
    ref = np.zeros((T, D))
    for t in range(T):
        for e, weight in zip(chosen[t], mix[t].astype(np.float64)):
            a = _swiglu(_product(x[t:t + 1], q1[e], d1[e])[0])
            ref[t] += weight * _product(a[None], q2[e], d2[e])[0]
        if Is:
            g, u = (_product(x[t:t + 1], *shared[n])[0] for n in ("gate", "up"))
            gu = np.stack([g, u], 1).reshape(-1)
            ref[t] += _product(_swiglu(gu)[None], *shared["down"])[0]
    assert y.shape == (T, D) and np.abs(ref).max() > 0.1
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-4
    bad = chosen.copy()
    bad[-1, -1] = E  # an expert the stacks do not hold
    with pytest.raises(Exception, match="expert index is out of range"):
        session.run(None, {"x": x, "weights": mix, "experts": bad})


@needs_library
@pytest.mark.parametrize("B,H,S,C,R,T,mask_shape", [(1, 16, 1, 512, 64, 1030, "b1st"), (2, 4, 3, 64, 16, 70, "bhst"),
                                                     (3, 16, 1, 32, 8, 5, "11st"), (1, 40, 2, 96, 32, 300, "b1st")])
def test_latent_attention_is_the_softmax_over_the_compressed_cache(B, H, S, C, R, T, mask_shape):
    # one new token and several, a cache of one chunk and many (merged), more rows than a task takes
    # (H * S > 16), masks broadcast over heads or batch rows, padding masked with the dtype's most negative
    # value (as the model masks); against float64 numpy
    rng = np.random.default_rng(B + H + S + T)
    q, qr = rng.standard_normal((B, H, S, C)).astype(np.float32), rng.standard_normal((B, H, S, R)).astype(np.float32)
    kv, kr = rng.standard_normal((B, T, C)).astype(np.float32), rng.standard_normal((B, T, R)).astype(np.float32)
    shape = [{"b": B, "h": H, "1": 1, "s": S, "t": T}[d] for d in mask_shape]
    mask = np.zeros(shape, np.float32)
    mask[..., : T // 3] = np.finfo(np.float32).min  # left padding
    mask[..., -1] = rng.standard_normal(shape[:-1]).astype(np.float32)  # any additive value
    scale = 0.07
    session = _session("LatentAttention", {n: None for n in ("q", "qr", "kv", "kr", "mask")}, {}, scale=scale)
    y = session.run(None, {"q": q, "qr": qr, "kv": kv, "kr": kr, "mask": mask})[0]
    d = np.float64
    scores = (np.einsum("bhsc,btc->bhst", q.astype(d), kv.astype(d))
              + np.einsum("bhsr,btr->bhst", qr.astype(d), kr.astype(d))) * scale + mask.astype(d)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    ref = np.einsum("bhst,btc->bhsc", p / p.sum(-1, keepdims=True), kv.astype(d))
    assert y.shape == (B, H, S, C) and np.abs(ref).max() > 0.1
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5


@needs_library
def test_latent_attention_refuses_a_cache_that_does_not_match_the_query():
    session = _session("LatentAttention", {n: None for n in ("q", "qr", "kv", "kr", "mask")}, {}, scale=1.0)
    shapes = {"q": (1, 2, 1, 32), "qr": (1, 2, 1, 8), "kv": (1, 5, 16), "kr": (1, 5, 8), "mask": (1, 1, 1, 5)}
    x = {name: np.ones(shape, np.float32) for name, shape in shapes.items()}  # kv's 16 against q_latent's 32
    with pytest.raises(Exception, match="LatentAttention: expected q_latent"):
        session.run(None, x)


@needs_library
def test_a_shape_the_kernel_does_not_take_is_refused_by_the_kernel():
    q, d = np.ones((2, 64, 32), np.int8), np.ones((2, 64, 1), np.float32)
    with pytest.raises(Exception, match="HeadsMatMulQ8: expected"):
        session = _session("HeadsMatMulQ8", {"x": [1, 2, 1, 48]}, {"q": q, "s": d})
        session.run(None, {"x": np.ones((1, 2, 1, 48), np.float32)})


@needs_library
@pytest.mark.parametrize("op", ["MatMulF32", "LinearF32"])
@pytest.mark.parametrize("K,N,x_shape", [(64, 40, (1, 64)), (2048, 576, (1, 1, 2048)), (1037, 100, (3, 5, 1037)),
                                         (130, 7, (7, 130)), (16, 3, (2, 16)), (512, 33, (0, 512))])
def test_float32_linear_kernels_equal_the_product(op, K, N, x_shape):
    # one row and several; K in one part and in several (MatMulF32 splits it into parts of 128 rows or more,
    # summed after), K and N not multiples of 16 or 4 (the kernels' masked tails and groups of 4 weight
    # rows), inputs of rank 2 and 3, and no rows at all; against float64 numpy
    rng = np.random.default_rng(K + N)
    w = (rng.standard_normal((K, N)) * np.linspace(0.1, 2, N)).astype(np.float32)  # MatMulF32's [K, N]
    x = rng.standard_normal(x_shape).astype(np.float32)
    weight = w if op == "MatMulF32" else np.ascontiguousarray(w.T)  # LinearF32's [N, K]
    y = _session(op, {"x": list(x_shape)}, {"w": weight}).run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert y.shape == (*x_shape[:-1], N)
    if x.size:
        assert np.abs(ref).max() > 1
        assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5


@needs_library
@pytest.mark.parametrize("op, weight, what", [("MatMulF32", (48, 8), r"MatMulF32: expected x \[\.\.\., K\] and w \[K, N\]"),
                                             ("LinearF32", (8, 48), r"LinearF32: expected x \[\.\.\., K\] and w \[N, K\]"),
                                             ("MatMulF32", (2, 24, 8), r"MatMulF32: expected w \[K, N\]")])
def test_float32_linear_kernels_refuse_shapes_they_do_not_take(op, weight, what):
    with pytest.raises(Exception, match=what):
        session = _session(op, {"x": [1, 24]}, {"w": np.ones(weight, np.float32)})
        session.run(None, {"x": np.ones((1, 24), np.float32)})


@needs_library
@pytest.mark.parametrize("T,E,k,D,I", [(1, 16, 6, 256, 96), (9, 4, 2, 72, 40), (5, 8, 8, 32, 20)])
def test_moe_f32_computes_what_onnxruntime_moe_does(T, E, k, D, I):
    # com.microsoft.MoE as lowering/ops.py writes it (swiglu, interleaved fc1, routing weights as given) is
    # the reference MoEF32 takes its place for; one token and several, every expert chosen (k = E), widths
    # not multiples of 16
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(T + E + D)
    w1 = (rng.standard_normal((E, 2 * I, D)) / np.sqrt(D)).astype(np.float32)
    w2 = (rng.standard_normal((E, D, I)) / np.sqrt(I)).astype(np.float32)
    x = rng.standard_normal((T, D)).astype(np.float32)
    router = np.full((T, E), -1e30, np.float32)
    chosen = np.stack([rng.permutation(E)[:k] for _ in range(T)])
    np.put_along_axis(router, chosen, np.log(rng.random((T, k)).astype(np.float32) + 0.1), axis=1)
    y = _session("MoEF32", {"x": None, "router": None}, {"w1": w1, "w2": w2}, k=k).run(None, {"x": x, "router": router})[0]
    node = h.make_node("MoE", ["x", "router", "w1", "", "w2"], ["y"], domain="com.microsoft", k=k,
                       activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                       normalize_routing_weights=0)
    graph = h.make_graph([node], "g", [h.make_tensor_value_info(n, TP.FLOAT, None) for n in ("x", "router")],
                         [h.make_tensor_value_info("y", TP.FLOAT, None)], [nh.from_array(w1, "w1"), nh.from_array(w2, "w2")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "router": router})[0]
    assert y.shape == (T, D) and np.abs(ref).max() > 0.1
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5


# ---------------------------------------------------------------- engines exported with --native-kernels


def _with_and_without(make_ckpt, small_limits, tmp_path_factory, name: str, **options) -> list:
    """(OUT exported with --native-kernels, the same export without) of a one-layer V2-Lite-like checkpoint (no
    q_lora: its dims are multiples of MatMulQ4's blocks of 32), with the export `options`."""
    ckpt = make_ckpt("v2-lite", layers=1, experts=4, hidden=32, vocab=64)
    if WHY is not None:
        pytest.skip(f"the native kernel library cannot be built here: {WHY}")
    outs = []
    for flag in (True, False):
        out = tmp_path_factory.mktemp("native") / f"{name}-{flag}"
        export_checkpoint(ckpt, out, ExportOptions.within(small_limits, native_kernels=flag, **options))
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def engines(make_ckpt, small_limits, tmp_path_factory):
    """int4 (with and without --native-kernels)."""
    return _with_and_without(make_ckpt, small_limits, tmp_path_factory, "int4", weights="int4", block_size=32)


@needs_library
def test_the_export_writes_the_absorbed_product_as_a_native_node(engines):
    out, plain = engines
    manifest = json.loads((out / "manifest.json").read_text())
    written = ["ExpertsQ4", "HeadsMatMulQ8", "LatentAttention", "LatentKey", "MatMulQ4", "MatMulQ8", "QueryRope"]
    assert manifest["native_ops"] == {"domain": DOMAIN, "ops": written}
    assert "native_ops" not in json.loads((plain / "manifest.json").read_text())
    plain_ops = json.loads((plain / "manifest.json").read_text())["graphs"]["decode"]["quantized_ops"]
    ops = manifest["graphs"]["decode"]["quantized_ops"]
    layers = plain_ops["QMoE"]
    assert layers >= 1 and ops["ExpertsQ4"] == layers and ops[SHARED_MLPS] == layers
    for name in ("decode.onnx", manifest["graphs"]["decode"]["in_place"]["file"]):
        graph = onnx.load(str(out / name), load_external_data=False).graph
        weights = {t.name: t for t in graph.initializer}
        # the tiny model: W_UV (kv_lora_rank 32 -> v 16) qualifies; W_UK's input (nope 16) is not a multiple of 32
        heads = [n for n in graph.node if n.op_type == "HeadsMatMulQ8" and n.domain == DOMAIN]
        assert len(heads) == 1 and weights[heads[0].input[1]].data_type == onnx.TensorProto.INT8
        # every linear layer but the shared experts' (in ExpertsQ4): the int4 ones, and lm_head in its 8 bits
        linears = [n for n in graph.node if n.op_type in ("MatMulQ4", "MatMulQ8") and n.domain == DOMAIN]
        assert [n.op_type for n in linears].count("MatMulQ8") == 1
        assert len(linears) == plain_ops["MatMulNBits"] - 3 * layers
        assert not [n for n in graph.node if n.op_type in ("MatMulNBits", "QMoE", "MoEQ4", "Log", "ScatterElements")]
        for n in linears:
            assert weights[n.input[1]].data_type == onnx.TensorProto.UINT8
            assert weights[n.input[2]].data_type == onnx.TensorProto.FLOAT16
        # each MoE layer's experts: one ExpertsQ4 over TopK's choice, its routed stacks and its shared MLP's panels
        experts = [n for n in graph.node if n.op_type == "ExpertsQ4"]
        assert len(experts) == layers
        for n in experts:
            producers = {o: m.op_type for m in graph.node for o in m.output}
            assert producers[n.input[2]] == "TopK" and len(n.input) == 13
            assert [weights[i].data_type for i in n.input[3:]] == [onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT16] * 5
            width = next(onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "shared_I")
            assert "shared_experts" in n.input[7] and width > 0 and weights[n.input[11]].dims[1] * 32 == width
        # each layer's attention over the cache: one LatentAttention over the cache buffers; the only Softmax
        # left is the MoE router's
        attention = [n for n in graph.node if n.op_type == "LatentAttention" and n.domain == DOMAIN]
        assert len(attention) == ops["LatentAttention"] >= 1
        assert [n.op_type for n in graph.node].count("Softmax") == layers
        assert all(n.input[2].startswith("present.") and n.input[3].startswith("present.") for n in attention)
        # and its inputs: one QueryRope and one LatentKey a layer, no rotation or normalization of them left
        assert ops["QueryRope"] == ops["LatentKey"] == len(attention)
        assert [n.op_type for n in graph.node].count("QueryRope") == len(attention)
        assert not [n for n in graph.node if n.op_type == "RotaryEmbedding" or _deinterleaves(n)]
    # (the plain graph de-interleaves both rotations' input: the checkpoint's rotary pairs are interleaved)
    assert sum(map(_deinterleaves, onnx.load(str(plain / "decode.onnx"), load_external_data=False).graph.node)) \
        == 2 * ops["QueryRope"]
    assert ops["HeadsMatMulQ8"] == 1 and ops["QMoE"] == ops["MoEQ4"] == 0
    assert manifest["quantization"]["quantized_activations"] == {"ExpertsQ4": True, "MatMulQ4": True, "MatMulQ8": True}


def _deinterleaves(node) -> bool:
    """Whether `node` is lowering/fuse_rope.py's Gather of a rotation's interleaved pairs."""
    return node.op_type == "Gather" and node.input[1].startswith("rope.deinterleave")


def _generated(folder) -> torch.Tensor:
    """The logits of a prefill of 2 rows of 5 tokens and two decode steps of batch 2 through the engine at
    `folder`, flattened."""
    from dscompile.runtime.contract import position_ids
    from dscompile.runtime.ort_engine import OrtEngine

    engine = OrtEngine.load(folder, provider="cpu")
    ids = torch.tensor([[5, 9, 2, 33, 7], [1, 4, 60, 8, 12]])
    mask = torch.ones_like(ids)
    logits, cache = engine.step(ids, position_ids(mask), mask, None)
    steps = [logits]
    for token in ([[3], [11]], [[21], [40]]):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        logits, cache = engine.step(torch.tensor(token), position_ids(mask)[:, -1:], mask, cache)
        steps.append(logits)
    return torch.cat([s.reshape(-1) for s in steps])


@needs_library
def test_a_native_engine_computes_what_the_plain_one_does_up_to_the_int8_product(engines):
    mine, theirs = (_generated(folder) for folder in engines)
    rel = float((mine - theirs).norm() / theirs.norm())
    assert 1e-7 < rel < 0.05, rel  # the product's int8 rounding and float16 scales: small, and there


@pytest.fixture(scope="module")
def float_engines(make_ckpt, small_limits, tmp_path_factory):
    """float32 (with and without --native-kernels)."""
    return _with_and_without(make_ckpt, small_limits, tmp_path_factory, "float32")


def _ops(path) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node]


@needs_library
def test_a_float32_export_puts_the_decode_steps_weights_on_native_kernels_and_keeps_one_copy(float_engines):
    out, plain = float_engines
    manifest, theirs = (json.loads((o / "manifest.json").read_text()) for o in (out, plain))
    assert manifest["native_ops"] == {"domain": DOMAIN,
                                      "ops": ["LatentAttention", "LatentKey", "LinearF32", "MatMulF32", "MoEF32",
                                              "QueryRope"]}
    counts = manifest["graphs"]["decode"]["native_ops"]
    plain_decode = _ops(plain / "decode.onnx")
    assert counts["MoEF32"] == plain_decode.count(("com.microsoft", "MoE")) >= 1
    # each layer's attention over the cache: one LatentAttention, where the plain graph has its Softmax
    assert counts["LatentAttention"] == plain_decode.count(("", "Softmax")) - counts["MoEF32"] >= 1
    # and its inputs: a QueryRope and a LatentKey where the plain graph has its two rotations
    assert counts["QueryRope"] == counts["LatentKey"] == plain_decode.count(("", "RotaryEmbedding")) // 2 >= 1
    assert counts["LinearF32"] >= 1 and counts["MatMulF32"] >= 3
    for name in ("decode.onnx", manifest["graphs"]["decode"]["in_place"]["file"]):
        graph = onnx.load(str(out / name), load_external_data=False).graph
        weights = {t.name for t in graph.initializer}
        # every 2-D weight's MatMul and Gemm and the experts moved; the absorbed per-head (3-D) MatMuls stay
        left = [n for n in graph.node if n.op_type in ("Gemm", "MoE") or (n.op_type == "MatMul" and n.input[1] in weights
                and len(next(t for t in graph.initializer if t.name == n.input[1]).dims) == 2)]
        assert not left, [n.name for n in left]
        assert sum(n.domain == DOMAIN for n in graph.node) == sum(counts.values())
    # prefill keeps ONNX Runtime's kernels; the native nodes read the same initializers: one weights.bin
    assert (DOMAIN, "MatMulF32") not in _ops(out / "prefill.onnx") and "native_ops" not in manifest["graphs"]["prefill"]
    assert manifest["weights"]["bytes"] == theirs["weights"]["bytes"]
    assert (out / "weights.bin").stat().st_size == (plain / "weights.bin").stat().st_size
    assert "native_ops" not in theirs


@needs_library
def test_verify_runs_a_float32_native_engine_against_eager_and_stops_a_wrong_one(make_ckpt, small_limits, tmp_path,
                                                                               monkeypatch):
    from dscompile.lowering import LoweringError, fuse_query_key

    ckpt = make_ckpt("v2-lite", layers=1, experts=4, hidden=32, vocab=64)
    options = ExportOptions.within(small_limits, native_kernels=True, verify=True)
    manifest = export_checkpoint(ckpt, tmp_path / "good", options)
    verified = manifest["native_ops"]["verified"]
    assert verified["passed"] and verified["steps"] == 3 and 0 < verified["max_abs"] <= verified["atol"]
    assert json.loads((tmp_path / "good" / "manifest.json").read_text())["native_ops"]["verified"] == verified
    # the key rotated as halves where the checkpoint's pairs are interleaved: the engine runs, and is wrong
    replace = fuse_query_key._replace

    def wrong(graph, op, inputs, attrs, outputs, nodes):
        replace(graph, op, inputs, {**attrs, "interleaved": 0} if op == "LatentKey" else attrs, outputs, nodes)

    monkeypatch.setattr(fuse_query_key, "_replace", wrong)
    with pytest.raises(LoweringError, match="the engine's native kernels differ from eager: max"):
        export_checkpoint(ckpt, tmp_path / "bad", options)
    assert not (tmp_path / "bad").exists()


@needs_library
def test_a_float32_native_engine_computes_what_the_plain_one_does(float_engines):
    mine, theirs = (_generated(folder) for folder in float_engines)  # its decode steps: the native kernels
    assert float(theirs.abs().max()) > 0.1
    assert float((mine - theirs).abs().max() / theirs.abs().max()) < 1e-5  # float32 both: the sums' order only


@needs_library
def test_a_six_bit_lm_head_runs_as_matmul_q6_and_verifies_against_eager(make_ckpt, small_limits, tmp_path):
    # --lm-head-bits 6: lm_head's panels in 6 bits (384 bytes a block), checked by the export against eager
    # with the same fake-quantized weights (lm_head's in 6 bits)
    ckpt = make_ckpt("v2-lite", layers=1, experts=4, hidden=32, vocab=64)
    out = tmp_path / "int4-head6"
    export_checkpoint(ckpt, out, ExportOptions.within(small_limits, weights="int4", block_size=32, native_kernels=True,
                                                      lm_head_bits=6, verify=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["native_ops"]["ops"] == ["ExpertsQ4", "HeadsMatMulQ8", "LatentAttention", "LatentKey", "MatMulQ4",
                                            "MatMulQ6", "QueryRope"]
    assert manifest["quantization"]["lm_head_bits"] == 6 and manifest["quantization"]["verified"]["passed"]
    graph = onnx.load(str(out / "decode.onnx"), load_external_data=False).graph
    weights = {t.name: t for t in graph.initializer}
    (head,) = [n for n in graph.node if n.op_type == "MatMulQ6"]
    assert list(weights[head.input[1]].dims) == [64 // 16, 32 // 32, 6 * 64]
    quant_line = next(line for line in report_lines(inspect(out)) if line.startswith("quant"))
    assert "4.5 bits per weight with scales), lm_head 6 bits;" in quant_line


def test_a_six_bit_lm_head_needs_the_native_kernels():
    with pytest.raises(OptionError, match=r"^--lm-head-bits 6 is stored for dscompile's native kernels only"):
        ExportOptions(weights="int4", lm_head_bits=6)
    with pytest.raises(OptionError, match=r"^--lm-head-bits 5 is not one of 4, 6, 8"):
        ExportOptions(weights="int4", lm_head_bits=5)


def test_a_native_engine_where_the_library_cannot_be_built_is_refused_in_one_line(one_layer_ckpt, small_limits,
                                                                                 tmp_path, monkeypatch):
    # writing the graphs needs no library (the export is told it could build one); loading does
    from dscompile.runtime.ort_engine import OrtEngine

    monkeypatch.setattr(native, "unavailable", lambda: None)
    export_checkpoint(one_layer_ckpt, tmp_path / "out", ExportOptions.within(small_limits, weights="int8",
                                                                              block_size=16, native_kernels=True))
    monkeypatch.setattr(native, "unavailable", lambda: "no headers (patched)")
    with pytest.raises(EngineError, match=r"native kernels \(HeadsMatMulQ8, LatentAttention, LatentKey, QueryRope\), "
                                          r"which cannot be "
                                          r"loaded here: no headers \(patched\); or re-export it without "
                                          r"--native-kernels"):
        OrtEngine.load(tmp_path / "out", provider="cpu")


# ---------------------------------------------------------------- refusals (everywhere)


@pytest.mark.parametrize("options, what", [
    (dict(native_kernels=True, weights="int4", device="cuda", dtype="float16"), "--device cpu"),
    (dict(native_kernels=True, dtype="bfloat16"), "--dtype float32"),
    (dict(native_kernels=True, weights="int8", tp=2), "no --tp/--ep"),
])
def test_native_kernels_serve_float32_cpu_engines_only(options, what):
    with pytest.raises(OptionError, match=f"--native-kernels: .*{what}"):
        ExportOptions(**options)


def test_native_kernels_that_cannot_be_built_are_refused_at_export(monkeypatch):
    monkeypatch.setattr(native, "unavailable", lambda: "g++ is not installed (patched)")
    with pytest.raises(OptionError, match=r"^--native-kernels: cannot build them here: g\+\+ is not installed"):
        ExportOptions(weights="int4", native_kernels=True)
    ExportOptions(weights="int4", native_kernels=True, graphs_only=True)  # graphs alone run nothing


def test_unavailable_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_cpu_lacks", lambda: [])
    monkeypatch.setenv("DSCOMPILE_ORT_INCLUDE", str(tmp_path))
    monkeypatch.setattr(native, "INCLUDE_DIRS", ())
    why = native.unavailable()
    if native.shutil.which("g++") is None:
        assert why.startswith("g++ is not installed")
    else:
        assert why.startswith("ONNX Runtime's C/C++ API headers") and f"DSCOMPILE_ORT_INCLUDE={tmp_path} has no" in why
    with pytest.raises(native.NativeKernelsUnavailable):
        native.library()
    monkeypatch.setattr(native, "_cpu_lacks", lambda: ["avx512bw"])
    assert native.unavailable() == "this CPU lacks avx512bw (the native kernels are written for AVX-512)"


def test_headers_newer_than_the_running_onnxruntime_are_refused(monkeypatch, tmp_path):
    # the library asks the runtime for its headers' API version: a runtime older than them would have none
    (tmp_path / "onnxruntime_lite_custom_op.h").write_text("")
    (tmp_path / "onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 21\n")
    monkeypatch.setattr(native, "_cpu_lacks", lambda: [])
    monkeypatch.setenv("DSCOMPILE_ORT_INCLUDE", str(tmp_path))
    monkeypatch.setattr(native.shutil, "which", lambda name: "/usr/bin/g++")
    monkeypatch.setattr(native, "_runtime_api_version", lambda: 20)
    assert native.unavailable() == (f"the headers in {tmp_path} are of ONNX Runtime API version 21, newer than the "
                                    "running ONNX Runtime's (20): use headers of version 20 or older")
    monkeypatch.setattr(native, "_runtime_api_version", lambda: 31)
    assert native.unavailable() is None
