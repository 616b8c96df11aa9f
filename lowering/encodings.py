"""How quantized weights are stored: each weight encoded once into the two tensors a kernel reads.

- `_Parts`: the base: one weight, two stored tensors, each a lazy `derive` of the weight (computed when
  written, once for both).
- `_Quantization`: ONNX Runtime's MatMulNBits/QMoE layout: packed bits and scales.
- `_Panels` / `panels`: dscompile's native MatMulQ4/Q6/Q8 and MoEQ4/Q8 (runtime/native/matmul.cc gives
  the layout): the scheme's integers in panels of 16 output rows, float16 scales.
- `_HeadsInt8`: the native HeadsMatMulQ8's absorbed per-head products in int8.
The checker's schemas of the native ops are registered here too (float32 ones included). lowering/quantize.py
and lowering/native_f32.py write the nodes.
"""

from __future__ import annotations

import onnx
import torch

from dscompile.model.quant import Scheme, pack, quantize
from dscompile.runtime.native import DOMAIN as NATIVE_DOMAIN


def _register_native_schema() -> None:
    """The checker's schemas of ai.dscompile's ops (runtime/native/): HeadsMatMulQ8, MatMulQ4/Q6/Q8 and MoEQ4/Q8
    (lowering/quantize.py writes them), ExpertsQ4/Q8 (lowering/fuse_experts.py), LatentAttention
    (lowering/fuse_attention.py), QueryRope and LatentKey (lowering/fuse_query_key.py), MatMulF32, LinearF32 and
    MoEF32 (lowering/native_f32.py)."""
    P = onnx.defs.OpSchema.FormalParameter
    A, AT = onnx.defs.OpSchema.Attribute, onnx.defs.OpSchema.AttrType
    float_only = [("T", ["tensor(float)"], "activations and weights")]
    panel_types = [("T", ["tensor(float)"], "activations"), ("TW", ["tensor(uint8)"], "panels"),
                   ("TS", ["tensor(float16)"], "scales")]

    def parameter(spec: str):
        """"name:T", or "name:T?" for an optional input."""
        name, type_str = spec.rstrip("?").split(":")
        options = onnx.defs.OpSchema.FormalParameterOption
        option = options.Optional if spec.endswith("?") else options.Single
        return P(name, type_str, param_option=option)

    def register(op: str, doc: str, inputs: list[str], types: list, attributes=(), outputs=("y",)) -> None:
        """`inputs`: "name:T" each (optional: "name:T?"); `outputs` of type T."""
        try:
            onnx.defs.get_schema(op, 1, NATIVE_DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(onnx.defs.OpSchema(
                op, NATIVE_DOMAIN, 1, doc=f"dscompile native op: {doc}.",
                inputs=[parameter(i) for i in inputs], outputs=[P(o, "T") for o in outputs], type_constraints=types,
                attributes=list(attributes)))

    register("HeadsMatMulQ8", "per-head matmul with int8 weights", ["x:T", "w:T8", "scales:T"],
             [("T", ["tensor(float)"], "activations and scales"), ("T8", ["tensor(int8)"], "weights")])
    for bits in PANEL_BITS:
        register(f"MatMulQ{bits}", f"linear layer with int{bits} weights in row panels", ["x:T", "w:TW", "scales:TS"],
                 panel_types, [A("K", AT.INT, "input features"), A("N", AT.INT, "output features")])
    for bits in EXPERT_BITS:
        register(f"MoEQ{bits}", f"routed experts with int{bits} weights in row panels",
                 ["x:T", "router:T", "fc1:TW", "fc1_scales:TS", "fc2:TW", "fc2_scales:TS"], panel_types,
                 [A("k", AT.INT, "experts per token"), A("I", AT.INT, "expert intermediate size")])
        register(f"ExpertsQ{bits}", f"a MoE layer's chosen routed experts and shared MLP with int{bits} weights in row "
                 "panels", ["x:T", "weights:T", "experts:TI", "fc1:TW", "fc1_scales:TS", "fc2:TW", "fc2_scales:TS",
                            "shared_gate:TW?", "shared_gate_scales:TS?", "shared_up:TW?", "shared_up_scales:TS?",
                            "shared_down:TW?", "shared_down_scales:TS?"],
                 panel_types + [("TI", ["tensor(int64)"], "expert indices")],
                 [A("I", AT.INT, "expert intermediate size"), A("shared_I", AT.INT, "shared MLP width (0: none)")])
    register("LatentAttention", "MLA attention over the compressed cache",
             ["q_latent:T", "q_rope:T", "kv_latent:T", "k_rope:T", "mask:T"], float_only,
             [A("scale", AT.FLOAT, "score scale")])
    register("QueryRope", "MLA query split into its parts, the rotary part rotated, heads first",
             ["q:T", "cos:T", "sin:T"], float_only, [A("heads", AT.INT, "heads"), A("nope", AT.INT, "unrotated part"),
                                                     A("interleaved", AT.INT, "rotary pairs interleaved")],
             outputs=("q_nope", "q_rope"))
    register("LatentKey", "MLA latent RMS-normalized and shared key rotated", ["kv:T", "scale:T", "cos:T", "sin:T"],
             float_only, [A("epsilon", AT.FLOAT, "normalization epsilon"),
                          A("interleaved", AT.INT, "rotary pairs interleaved")], outputs=("kv_latent", "k_rope"))
    register("MatMulF32", "linear layer over a float32 weight [K, N]", ["x:T", "w:T"], float_only)
    register("LinearF32", "linear layer over a float32 weight [N, K]", ["x:T", "w:T"], float_only)
    register("MoEF32", "routed experts with float32 weights", ["x:T", "router:T", "fc1:T", "fc2:T"], float_only,
             [A("k", AT.INT, "experts per token")])


HEADS_BLOCK = 32  # values per scale of the native per-head weights (runtime/native/heads_q8.cc)
PANEL_BLOCK = 32  # values per scale of the native linear layers' and experts' weights (runtime/native/matmul.cc)
PANEL_BITS = (4, 6, 8)  # linear layers (6: lm_head's own bits, model/quant.py)
EXPERT_BITS = (4, 8)  # routed experts
# The native panel ops (they quantize activations to int8 per block): linear layers, and routed experts
# (QMoE's inputs and sum).
NATIVE_LINEAR_OPS = tuple(f"MatMulQ{bits}" for bits in PANEL_BITS)
# MoEQ4/Q8 take QMoE's router input; ExpertsQ4/Q8 (lowering/fuse_experts.py) TopK's choice and the shared MLP.
NATIVE_EXPERT_OPS = tuple(f"MoEQ{bits}" for bits in EXPERT_BITS) + tuple(f"ExpertsQ{bits}" for bits in EXPERT_BITS)
NATIVE_PANEL_OPS = NATIVE_LINEAR_OPS + NATIVE_EXPERT_OPS
HEADS_MAX_K = 4096  # the kernel's row buffer
_register_native_schema()


class _Parts:
    """One weight encoded once into two stored tensors (`part`s), each one `derive` of the weight.

    `derive` calls the functions on meta tensors for shapes (`_meta`); on real values the first
    request encodes (`_encode`) and keeps the result until the other part has been taken."""

    def __init__(self):
        self._result: dict[str, torch.Tensor] | None = None

    def _meta(self, w: torch.Tensor, part: str) -> torch.Tensor:
        raise NotImplementedError

    def _encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _take(self, w: torch.Tensor, part: str) -> torch.Tensor:
        if w.is_meta:
            return self._meta(w, part)
        if self._result is None:
            self._result = self._encode(w)
        out = self._result.pop(part)
        if not self._result:
            self._result = None
        return out

    def scales(self, w: torch.Tensor) -> torch.Tensor:
        return self._take(w, "scales")


class _Quantization(_Parts):
    """One checkpoint weight's quantization as MatMulNBits/QMoE store it: bits ("packed") and scales."""

    stores_weight = True  # its outputs are the weight it reads, encoded (lower._origins: not "computed")

    def __init__(self, scheme: Scheme, transpose: bool, flat: bool, scale_dtype: torch.dtype = torch.float32):
        super().__init__()
        # The weight arrives fake-quantized: quantizing it again needs no scale search (same result).
        self.scheme = Scheme(scheme.bits, scheme.block_size, search=False)
        self.scale_dtype = scale_dtype
        self.transpose, self.flat = transpose, flat  # flat: bytes [..., rows, K·bits/8] (QMoE)

    def _meta(self, w: torch.Tensor, part: str) -> torch.Tensor:
        lead = list(w.shape[:-2]) + [int(w.shape[-1] if self.transpose else w.shape[-2])]
        K = int(w.shape[-2] if self.transpose else w.shape[-1])
        blocks, block = K // self.scheme.block_size, self.scheme.block_size
        if part == "scales":
            return torch.empty(lead + [blocks], dtype=self.scale_dtype, device="meta")
        packed = lead + ([blocks * block * self.scheme.bits // 8] if self.flat else [blocks, block * self.scheme.bits // 8])
        return torch.empty(packed, dtype=torch.uint8, device="meta")

    def _encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = w.transpose(-1, -2) if self.transpose else w
        q, d = quantize(rows, self.scheme)
        packed = pack(q, self.scheme.bits)
        if self.flat:
            packed = packed.reshape(*packed.shape[:-2], -1)
        return {"packed": packed, "scales": d.to(self.scale_dtype)}

    def packed(self, w: torch.Tensor) -> torch.Tensor:
        return self._take(w, "packed")


class _Panels(_Parts):
    """A checkpoint weight [..., N, K] (rows = outputs; `transpose`: stored [K, N]; leading dims: stacked
    experts) as the native MatMulQ4/Q6/Q8 and MoEQ4/Q8 store it: its scheme's integers (4, 6 or 8 bits, blocks
    of 32) in panels of 16 rows, uint8 [..., N16, K/32, bits * 64], and float16 scales [..., N16, K/32, 16]
    (runtime/native/matmul.cc gives the layout): each scale is the scheme's float32 scale rounded once to
    float16."""

    def __init__(self, scheme: Scheme, transpose: bool):
        super().__init__()
        self.scheme = Scheme(scheme.bits, scheme.block_size, search=False)
        self.transpose = transpose

    def _meta(self, w: torch.Tensor, part: str) -> torch.Tensor:
        lead, (N, K) = list(w.shape[:-2]), (int(d) for d in (w.shape[-2:][::-1] if self.transpose else w.shape[-2:]))
        panels, blocks = (N + 15) // 16, K // 32
        if part == "scales":
            return torch.empty(lead + [panels, blocks, 16], dtype=torch.float16, device="meta")
        return torch.empty(lead + [panels, blocks, self.scheme.bits * 64], dtype=torch.uint8, device="meta")

    def _encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = w.transpose(-1, -2) if self.transpose else w
        return dict(zip(("panels", "scales"), panels(*quantize(rows, self.scheme), self.scheme.bits)))

    def panels(self, w: torch.Tensor) -> torch.Tensor:
        return self._take(w, "panels")


def panels(q: torch.Tensor, d: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`bits` (4, 6 or 8) values q [..., N, K/32, 32] (quantize's) and float32 scales d [..., N, K/32] in the
    native kernels' layout (runtime/native/matmul.cc): (uint8 [..., N16, K/32, bits * 64], float16
    [..., N16, K/32, 16]); each matrix's rows padded to a multiple of 16 with zeros (leading dims:
    stacked matrices, e.g. experts)."""
    lead, N, blocks = tuple(q.shape[:-3]), int(q.shape[-3]), int(q.shape[-2])
    q, d = q.reshape(-1, N, blocks * 32), d.reshape(-1, N, blocks)
    G, count, zero = q.shape[0], (N + 15) // 16, 1 << (bits - 1)
    u = torch.full((G, count * 16, blocks * 32), zero, dtype=torch.uint8)
    u[:, :N] = (q.to(torch.int16) + zero).to(torch.uint8)
    # [g, p, r, b, j, e] -> [g, p, b, j, r, e]: V_j of block b holds row r's values 4j..4j+3 at bytes 4r..4r+3
    v = u.reshape(G, count, 16, blocks, 8, 4).permute(0, 1, 3, 4, 2, 5).reshape(G, count, blocks, 8, 64)
    if bits == 4:  # V_c in the low nibbles, V_{c+4} in the high ones
        v = v[:, :, :, :4] | (v[:, :, :, 4:] << 4)
    elif bits == 6:  # the low 4 bits as int4's, then each V_j's top 2 bits at bits 2(j%4) of chunk j//4
        low, top = v & 0x0F, v >> 4
        tops = top[:, :, :, 0::4] | (top[:, :, :, 1::4] << 2) | (top[:, :, :, 2::4] << 4) | (top[:, :, :, 3::4] << 6)
        v = torch.cat([low[:, :, :, :4] | (low[:, :, :, 4:] << 4), tops], dim=3)
    packed = v.reshape(*lead, count, blocks, bits * 64)
    scales = torch.zeros(G, count * 16, blocks, dtype=torch.float32)
    scales[:, :N] = d
    scales = scales.reshape(G, count, 16, blocks).permute(0, 1, 3, 2).reshape(*lead, count, blocks, 16)
    return packed.contiguous(), scales.to(torch.float16).contiguous()


class _HeadsInt8(_Parts):
    """A computed per-head weight [H, K, N] as HeadsMatMulQ8 stores it: int8 [H, N, K] (rows along K) and
    float32 scales [H, N, K/32]."""

    def _meta(self, w: torch.Tensor, part: str) -> torch.Tensor:
        H, K, N = (int(d) for d in w.shape)
        if part == "scales":
            return torch.empty([H, N, K // HEADS_BLOCK], dtype=torch.float32, device="meta")
        return torch.empty([H, N, K], dtype=torch.int8, device="meta")

    def _encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        H, K, N = (int(d) for d in w.shape)
        q, d = quantize(w.transpose(-1, -2).float(), Scheme(8, HEADS_BLOCK, search=False))
        return {"int8": q.reshape(H, N, K).contiguous(), "scales": d.contiguous()}

    def int8(self, w: torch.Tensor) -> torch.Tensor:
        return self._take(w, "int8")
