"""Lowering: optimized ExportedPrograms -> ONNX graphs and the weights file.

    graph.py     lower(): torch.onnx.export with the dsc op translations, then tidy the graph
    ops.py       the translations of dsc::latent_attention and dsc::moe (standard ONNX or ORT contrib ops)
    weights.py   lazy weights, weight folds, and writing graphs with one shared weights file
    in_place.py  the decode graph's variant that writes its cache into capacity buffers
    quantize.py  int8/int4: MatMul/Gemm -> MatMulNBits, MoE -> QMoE over the lowered graphs (with
                 --native-kernels: dscompile's MatMulQ4/Q8, MoEQ4/Q8, HeadsMatMulQ8)
    encodings.py how those kernels store each weight (bits and scales, the native panels)
    fuse_experts.py, fuse_attention.py, fuse_query_key.py   with --native-kernels: a MoE layer's experts
                 (TopK's choice and the shared MLP) as one ExpertsQ4/Q8, the decode graph's attention as one
                 LatentAttention, and its inputs as one QueryRope and one LatentKey
    fuse_rope.py, static_reshapes.py   fewer small nodes: RotaryEmbedding, constant Reshape targets
    logits.py    the optional logits_from input (the last tokens' logits only)
    _ir.py       small onnx-ir helpers the rewrites share
"""

from dscompile.errors import DscompileError


class LoweringError(DscompileError):
    """A graph could not be translated to ONNX or the result fails the ONNX checker."""
