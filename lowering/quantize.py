"""Weight-only quantization of lowered graphs: linear layers to `MatMulNBits`, routed experts to `QMoE`.

Runs on the ONNX model after `lowering.graph.lower` (weights still lazy). The model was loaded with
its quantized weights fake-quantized (model.quant.FakeQuantized: each such weight loads as
dequantize(quantize(w))), so every weight a pass computes from them (absorb_mla's products)
already holds the quantized values, and the eager reference loaded the same way computes exactly
what the engine does. This pass then stores the quantizable weights as bits + scales:

- `MatMul(x, Wᵀ)` (torch's linear: the weight folded transposed) and `Gemm(x, W, transB=1)` over a
  weight that is a layout of ONE quantized checkpoint weight -> `com.microsoft.MatMulNBits(x, q, d)`;
- `com.microsoft.MoE` (both phases: lowering/ops.py) -> `com.microsoft.QMoE` with the same
  routing: router_probs are the log mixing weights on the chosen experts (the rest -1e30), so
  `router_weights = Softmax(router_probs)` is w/Σw on them and 0 elsewhere, what MoE mixes with
  (the graph multiplies by Σw after the op, as before). One QMoE per layer whatever the expert count.

Weights a pass computed (absorb_mla's W_UK/W_UV products, per head: [H, N, C] batched MatMuls that
MatMulNBits cannot take) stay in float32, as do embeddings, the router and norms (model/quant.py).
With `native=True` (`export --native-kernels`) those batched MatMuls become dscompile's own
`ai.dscompile.HeadsMatMulQ8` (runtime/native): the product stored in int8, one float32 scale per 32
values along its input dimension, activations left in float32. These integers are the product's
own rounding, not the checkpoint's: the one place where the engine stores what the fake-quantized
eager model does not compute, judged by the same quantized-engine bound.
Quantizing the fake-quantized values again gives the same integers and scales (the block's largest
value is on the grid), so the stored bits are those of the scheme on the checkpoint's weights.

Each quantized weight is computed once per export: prefill and decode get the same lazy tensors
(`memo`, keyed by what the weight is, see lower._fold_key), and the bits and scales of one weight
come from one quantization (`_Quantization` hands the first result to the second request).

`accuracy_level` (MatMulNBits and QMoE attribute) says whether the kernels may quantize
activations to int8 per block; chosen per provider by measurement (`ACCURACY_LEVELS`).

For ONNX Runtime's CUDA provider (`provider="cuda"`, `export --device cuda --dtype float16|bfloat16`)
the same two ops run with half-precision activations; what its kernels (onnxruntime 1.31.1) expect:
- scales in the activation dtype (MatMulNBits' T1 is A's type; CUDA QMoE registers T and its scales'
  T2 for float16/bfloat16 only, and requires bfloat16 scales with bfloat16 activations). The float32
  scale of each block is rounded once to that dtype when stored;
- QMoE `weights_prepacked=0`: fc1/fc2 are the raw [E, N, K·bits/8] bytes (the MatMulNBits layout, the
  same bytes the CPU kernel reads), which the CUDA provider repacks at session creation into the
  CUTLASS layout of the GPU it runs on (SM75+). The attribute's default, -1, means a layout already
  prepacked for the provider's architecture; a file written here would then depend on the GPU;
- `swiglu_fusion=1` (gate and up rows interleaved in fc1, as lowering/ops.py builds it for MoE),
  `block_size` and `expert_weight_bits` as on CPU, no fc3 (the CUDA QMoE takes none);
- `accuracy_level` 0 (`ACCURACY_LEVELS["cuda"]`): the CUDA kernels dequantize to the activation dtype
  and never quantize activations, so the attribute only documents that; 0 also keeps the graph's
  meaning exact wherever else it runs (on CPU, 8-bit QMoE still quantizes activations at every level).
CUDA has no float32 QMoE kernel, so float32 quantized exports for CUDA are refused
(exporter/options.py): their routed experts would run on the CPU provider.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx
import onnx_ir as ir
import torch

from dscompile.lowering import fuse_experts
from dscompile.lowering._ir import replace_node
from dscompile.lowering.encodings import (EXPERT_BITS, HEADS_BLOCK, HEADS_MAX_K, NATIVE_EXPERT_OPS, NATIVE_PANEL_OPS,
                                          PANEL_BITS, PANEL_BLOCK, _HeadsInt8, _Panels, _Quantization)
from dscompile.lowering.weights import _MetaWeight, _fold_key, _origins, _unique_name
from dscompile.lowering.ops import MSFT_DOMAIN
from dscompile.model.quant import Scheme
from dscompile.lazy import derive
from dscompile.runtime.native import DOMAIN as NATIVE_DOMAIN

# accuracy_level per op and bits on ONNX Runtime's CPU provider, measured with
# benchmarks/quant_kernels.py (ORT 1.31.1, 2 threads, 2026-12-01; ms, median of 9 alternating rounds):
#                          fp32   int8 L0  int8 L4  int4 L0  int4 L4
#   linear 2048->10944, 1   10.8    204.1      2.1     10.0      1.4
#   linear ..., 128 tokens  62.8    161.2     73.9     66.2     54.8
#   experts (16, K=6), 1    24.1     12.7     10.8     23.2      3.2
#   experts ..., 128       211.3    168.1    195.7    151.0    161.1
# Level 4 (activations quantized to int8 per block, ~0.5% relative error per linear op and ~1.2%
# per expert op) is the fast one at decode for every kernel; QMoE int8 errs by ~1.2% at level 0 too.
# On the CUDA provider (float16/bfloat16 activations) the MatMulNBits and QMoE kernels dequantize the
# weights to the activation dtype and ignore accuracy_level (not measured here: no GPU; read from
# onnxruntime 1.31.1's op schemas, where QMoE's attribute is documented for CPU only, and its CUDA
# kernels). Level 0 says so, and a GPU engine is then judged with the dtype's own tolerance.
ACCURACY_LEVELS = {"cpu": {"MatMulNBits": {4: 4, 8: 4}, "QMoE": {4: 4, 8: 4}},
                   "cuda": {"MatMulNBits": {4: 0, 8: 0}, "QMoE": {4: 0, 8: 0}}}
SCALE_DTYPES = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
                torch.bfloat16: ir.DataType.BFLOAT16}  # scales are stored in the activation dtype
STORED_DTYPES = {torch.uint8: ir.DataType.UINT8, torch.int8: ir.DataType.INT8, **SCALE_DTYPES}  # bits, int8, scales


def quantizes_activations(op: str, bits: int, level: int, provider: str = "cpu") -> bool:
    """Whether a kernel quantizes its activations: on CPU at accuracy_level 4, and QMoE's 8-bit CPU kernel
    at every level (measured: its error vanishes for inputs on an int8 grid, ~1.2% otherwise, level 0
    or 4); on CUDA never (its kernels compute in the activation dtype)."""
    if provider == "cuda":
        return False
    return level == 4 or (op == "QMoE" and bits == 8)


def _register_schemas() -> None:
    """onnx does not know these ORT contrib ops: register them so the checker accepts the graphs."""
    P = onnx.defs.OpSchema.FormalParameter
    opt = onnx.defs.OpSchema.FormalParameterOption.Optional
    A, AT = onnx.defs.OpSchema.Attribute, onnx.defs.OpSchema.AttrType
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    try:
        onnx.defs.get_schema("MatMulNBits", 1, MSFT_DOMAIN)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(onnx.defs.OpSchema(
            "MatMulNBits", MSFT_DOMAIN, 1, doc="ONNX Runtime contrib op: matmul with block-quantized B.",
            inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=opt),
                    P("g_idx", "T4", param_option=opt), P("bias", "T1", param_option=opt)],
            outputs=[P("Y", "T1")],
            type_constraints=[("T1", floats, "float"), ("T2", ["tensor(uint8)", "tensor(int32)"], "packed"),
                              ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float)", "tensor(float16)",
                                      "tensor(bfloat16)"], "zp"),
                              ("T4", ["tensor(int32)"], "g_idx")],
            attributes=[A("K", AT.INT, "input features"), A("N", AT.INT, "output features"),
                        A("bits", AT.INT, "bits per weight"), A("block_size", AT.INT, "values per block"),
                        A("accuracy_level", AT.INT, "activation precision", required=False)]))
    try:
        onnx.defs.get_schema("QMoE", 1, MSFT_DOMAIN)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(onnx.defs.OpSchema(
            "QMoE", MSFT_DOMAIN, 1, doc="ONNX Runtime contrib op: mixture of experts with quantized weights.",
            inputs=[P("input", "T"), P("router_probs", "T"), P("fc1_experts_weights", "T1"), P("fc1_scales", "T2"),
                    P("fc1_experts_bias", "T", param_option=opt), P("fc2_experts_weights", "T1"),
                    P("fc2_scales", "T2"), P("fc2_experts_bias", "T", param_option=opt),
                    P("fc3_experts_weights", "T1", param_option=opt), P("fc3_scales", "T2", param_option=opt),
                    P("fc3_experts_bias", "T", param_option=opt), P("fc1_zero_points", "T1", param_option=opt),
                    P("fc2_zero_points", "T1", param_option=opt), P("fc3_zero_points", "T1", param_option=opt),
                    P("router_weights", "T", param_option=opt)],
            outputs=[P("output", "T")],
            type_constraints=[("T", floats, "float"), ("T1", ["tensor(uint8)"], "packed"), ("T2", floats, "scales")],
            attributes=[A(n, t, n, required=False) for n, t in (
                ("k", AT.INT), ("activation_type", AT.STRING), ("activation_alpha", AT.FLOAT),
                ("activation_beta", AT.FLOAT), ("swiglu_fusion", AT.INT), ("swiglu_limit", AT.FLOAT),
                ("normalize_routing_weights", AT.INT), ("use_sparse_mixer", AT.INT),
                ("expert_weight_bits", AT.INT), ("block_size", AT.INT), ("accuracy_level", AT.INT),
                ("weights_prepacked", AT.INT))]))


_register_schemas()


def _weight(value: ir.Value | None) -> torch.Tensor | None:
    if value is None or not value.is_initializer() or not isinstance(value.const_value, _MetaWeight):
        return None
    return value.const_value.weight


def weight_scheme(weight: torch.Tensor) -> Scheme:
    """The scheme a quantizable stored weight's checkpoint weights were marked with (all the same)."""
    leaves, _ = _origins(weight)
    schemes = {t.dsc_quantize for t in leaves}
    if len(schemes) != 1:
        raise ValueError(f"a stored weight mixes quantization schemes: {sorted(map(str, schemes))}")
    return schemes.pop()


def quantizable(weight: torch.Tensor | None) -> bool:
    """Whether a stored weight is a layout of one quantized checkpoint weight (not a computed one)."""
    if weight is None:
        return False
    leaves, computed = _origins(weight)
    return not computed and len(leaves) >= 1 and all(getattr(t, "dsc_quantize", None) is not None for t in leaves)


class GraphQuantizer:
    """Rewrites graphs for one scheme; shares the quantized tensors between the graphs it rewrites."""

    def __init__(self, scheme: Scheme, provider: str = "cpu", accuracy_level: int | None = None,
                 dtype: torch.dtype = torch.float32, native: bool = False):
        """`accuracy_level` overrides the provider's measured choice for every kernel (0: activations
        stay in their dtype, so the engine computes what the fake-quantized eager model does).
        `dtype`: the activations' (the export's); scales are stored in it (module docstring).
        `native`: absorbed per-head MatMuls to ai.dscompile.HeadsMatMulQ8 (CPU, float32 only)."""
        if dtype not in SCALE_DTYPES:
            raise ValueError(f"quantized graphs compute in {', '.join(map(str, SCALE_DTYPES))}, not {dtype}")
        if native and (provider != "cpu" or dtype != torch.float32):
            raise ValueError("the native kernels run on ONNX Runtime's CPU provider in float32 only")
        self.scheme, self.provider, self.dtype, self.native = scheme, provider, dtype, native
        self.levels = ACCURACY_LEVELS[provider]
        if accuracy_level is not None:
            self.levels = {op: {bits: accuracy_level for bits in per} for op, per in self.levels.items()}
        self.memo: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def _scale_dtype(self, activations: ir.Value) -> torch.dtype:
        """The scales' dtype for a kernel: its activations' (the export dtype where the graph does not say)."""
        found = {v: k for k, v in SCALE_DTYPES.items()}.get(activations.dtype)
        return found if found is not None else self.dtype

    def _stored(self, graph: ir.Graph, value: ir.Value, transpose: bool, name: str,
                scale_dtype: torch.dtype = torch.float32) -> tuple[ir.Value, ir.Value, Scheme]:
        """(bits, scales, the weight's scheme: the export's, or lm_head's own bits) of a stored weight."""
        # The block size divides every quantized weight's input dimension: checked when the weights
        # were marked (model.checkpoint.apply_quantization), naming the checkpoint weight.
        weight = value.const_value.weight
        scheme = weight_scheme(weight)
        flat = weight.dim() == 3
        packed, scales = self._encoded(graph, (_fold_key(weight), transpose, flat, scale_dtype),
                                       lambda: _Quantization(scheme, transpose, flat, scale_dtype), weight,
                                       ("packed", "scales"), (f"{name}.int{scheme.bits}", f"{name}.scales"))
        return packed, scales, scheme

    def _encoded(self, graph: ir.Graph, key: Any, encoding, weight: torch.Tensor, parts: tuple[str, str],
                 names: tuple[str, str]) -> list[ir.Value]:
        """Initializers of `graph` holding the two `parts` of `weight` as `encoding()` (a _Parts) stores them,
        lazy, derived once per `key` for every graph this quantizer rewrites."""
        if key not in self.memo:
            e = encoding()
            self.memo[key] = tuple(derive(getattr(e, part), weight) for part in parts)
        values = []
        for tensor, name in zip(self.memo[key], names):
            vname = _unique_name(graph, name)
            v = ir.Value(name=vname, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(STORED_DTYPES[tensor.dtype]),
                         const_value=_MetaWeight(tensor, vname))
            graph.register_initializer(v)
            values.append(v)
        return values

    def __call__(self, model: ir.Model) -> dict[str, int]:
        """Rewrite `model` in place; returns counts of rewritten nodes."""
        graph = model.graph
        counts = {"MatMulNBits": 0, "QMoE": 0}
        if self.native:
            counts.update({op: 0 for op in ("HeadsMatMulQ8",) + NATIVE_PANEL_OPS})
        for node in list(graph):
            if not node.domain and node.op_type == "MatMul":
                b = node.inputs[1]
                w = _weight(b)
                if self.native and self._heads(graph, node, w):
                    counts["HeadsMatMulQ8"] += 1
                    continue
                if w is None or w.dim() != 2 or not quantizable(w):
                    continue
                K, N = (int(d) for d in w.shape)
                name, transpose = b.name.removesuffix(".transpose"), True
            elif not node.domain and node.op_type == "Gemm":
                attrs = {k: a.value for k, a in node.attributes.items()}
                b = node.inputs[1]
                w = _weight(b)
                if (w is None or w.dim() != 2 or len(node.inputs) > 2 or attrs.get("transA", 0) or
                        attrs.get("transB", 0) != 1 or attrs.get("alpha", 1.0) != 1.0 or not quantizable(w)):
                    continue
                N, K = (int(d) for d in w.shape)
                name, transpose = b.name, False
            elif node.domain == MSFT_DOMAIN and node.op_type == "MoE":
                fc1, fc2 = node.inputs[2], node.inputs[4]
                if not (quantizable(_weight(fc1)) and quantizable(_weight(fc2))):
                    continue
                counts[self._moe(graph, node)] += 1
                continue
            else:
                continue
            op = self._panels(graph, node, b, transpose, name) if self.native else None
            if op is not None:
                counts[op] += 1
                continue
            packed, scales, scheme = self._stored(graph, b, transpose, name, self._scale_dtype(node.inputs[0]))
            new = ir.node("MatMulNBits", [node.inputs[0], packed, scales], domain=MSFT_DOMAIN,
                          attributes={"K": K, "N": N, "bits": scheme.bits, "block_size": scheme.block_size,
                                      "accuracy_level": self.levels["MatMulNBits"][scheme.bits]},
                          name=f"{node.name}.nbits" if node.name else None)
            replace_node(graph, node, new)
            counts["MatMulNBits"] += 1
        model.opset_imports.setdefault(MSFT_DOMAIN, 1)
        if any(counts.get(op) for op in ("HeadsMatMulQ8",) + NATIVE_PANEL_OPS):
            model.opset_imports.setdefault(NATIVE_DOMAIN, 1)
        if self.native and any(counts.get(op) for op in NATIVE_EXPERT_OPS):
            fused = fuse_experts.run(model)
            if any(fused[op] for op in fuse_experts.OPS):  # the counts of what the graph now holds
                held = Counter(n.op_type for n in graph if n.domain in (MSFT_DOMAIN, NATIVE_DOMAIN))
                counts = {op: held[op] for op in counts} | fused
        return counts

    def _panels(self, graph: ir.Graph, node: ir.Node, b: ir.Value, transpose: bool, name: str) -> str | None:
        """A linear layer whose weight's scheme is 4, 6 or 8 bits in blocks of 32 -> MatMulQ4, Q6 or Q8 (its
        integers in panels of 16 rows, float16 scales); the op written, or None (nothing done) for others."""
        weight = b.const_value.weight
        scheme = weight_scheme(weight)
        if scheme.bits not in PANEL_BITS or scheme.block_size != PANEL_BLOCK:
            return None
        N, K = (int(d) for d in (weight.shape[::-1] if transpose else weight.shape))
        values = self._encoded(graph, ("panels", _fold_key(weight), transpose), lambda: _Panels(scheme, transpose),
                               weight, ("panels", "scales"), (f"{name}.int{scheme.bits}_panels", f"{name}.scales"))
        op = f"MatMulQ{scheme.bits}"
        new = ir.node(op, [node.inputs[0], *values], domain=NATIVE_DOMAIN, attributes={"K": K, "N": N},
                      name=f"{node.name}.q{scheme.bits}" if node.name else None)
        replace_node(graph, node, new)
        return op

    def _heads(self, graph: ir.Graph, node: ir.Node, w: torch.Tensor | None) -> bool:
        """A batched MatMul of [B, H, S, K] activations over a computed per-head weight [H, K, N] ->
        HeadsMatMulQ8 with the weight in int8; False (nothing done) for any other MatMul."""
        x = node.inputs[0]
        if w is None or w.dim() != 3 or quantizable(w) or x.shape is None or len(x.shape) != 4:
            return False
        H, K, _ = (int(d) for d in w.shape)
        if K % HEADS_BLOCK or K > HEADS_MAX_K or x.shape[1] != H or x.shape[3] != K:
            return False
        name = node.inputs[1].name
        values = self._encoded(graph, ("heads", _fold_key(w)), _HeadsInt8, w, ("int8", "scales"),
                               (f"{name}.int8", f"{name}.scales"))
        new = ir.node("HeadsMatMulQ8", [x, *values], domain=NATIVE_DOMAIN,
                      name=f"{node.name}.q8" if node.name else None)
        replace_node(graph, node, new)
        return True

    def _moe(self, graph: ir.Graph, node: ir.Node) -> str:
        """com.microsoft.MoE -> QMoE, or with native kernels and 4 or 8 bits in blocks of 32, MoEQ4/MoEQ8; the op
        written."""
        fc1, fc2 = node.inputs[2], node.inputs[4]
        op = self._moe_panels(graph, node) if self.native else None
        if op is not None:
            return op
        prefix = fc2.name.rsplit(".", 1)[0] if fc2.name else node.name
        scale_dtype = self._scale_dtype(node.inputs[0])
        q1, s1, _ = self._stored(graph, fc1, False, f"{prefix}.gate_up_interleaved", scale_dtype)
        q2, s2, _ = self._stored(graph, fc2, False, fc2.name or f"{prefix}.down_proj", scale_dtype)
        router = node.inputs[1]
        mix = ir.node("Softmax", [router], attributes={"axis": -1}, name=f"{node.name}.mixing_weights")
        graph.insert_before(node, mix)
        attrs = {k: a.value for k, a in node.attributes.items()}
        attrs.update(expert_weight_bits=self.scheme.bits, block_size=self.scheme.block_size,
                     accuracy_level=self.levels["QMoE"][self.scheme.bits], normalize_routing_weights=0)
        if self.provider == "cuda":  # raw bytes, repacked by the provider for its GPU (module docstring)
            attrs["weights_prepacked"] = 0
        inputs = [node.inputs[0], router, q1, s1, None, q2, s2] + [None] * 7 + [mix.outputs[0]]
        new = ir.node("QMoE", inputs, domain=MSFT_DOMAIN, attributes=attrs, name=f"{node.name}.q")
        replace_node(graph, node, new)
        return "QMoE"

    def _moe_panels(self, graph: ir.Graph, node: ir.Node) -> str | None:
        """com.microsoft.MoE whose experts are 4 or 8 bits in blocks of 32 -> MoEQ4 or MoEQ8
        (runtime/native/moe.cc: the same routing input and sum, each expert's matrices in panels); the op
        written, or None for other schemes."""
        fc1, fc2 = node.inputs[2], node.inputs[4]
        w1, w2 = fc1.const_value.weight, fc2.const_value.weight
        s1, s2 = weight_scheme(w1), weight_scheme(w2)
        if s1.bits != s2.bits or any(sc.bits not in EXPERT_BITS or sc.block_size != PANEL_BLOCK for sc in (s1, s2)):
            return None
        bits = s1.bits
        prefix = fc2.name.rsplit(".", 1)[0] if fc2.name else node.name
        values = []
        for w, scheme, name in ((w1, s1, f"{prefix}.gate_up_interleaved"), (w2, s2, fc2.name or f"{prefix}.down_proj")):
            values += self._encoded(graph, ("panels", _fold_key(w), False), lambda s=scheme: _Panels(s, False),
                                    w, ("panels", "scales"), (f"{name}.int{bits}_panels", f"{name}.scales"))
        attrs = {k: a.value for k, a in node.attributes.items()}
        op = f"MoEQ{bits}"
        new = ir.node(op, [node.inputs[0], node.inputs[1], *values], domain=NATIVE_DOMAIN,
                      attributes={"k": attrs["k"], "I": int(w2.shape[-1])}, name=f"{node.name}.q{bits}")
        replace_node(graph, node, new)
        return op
