"""Named numerical tolerances: max |Δ| <= TOL[dtype] · max(1, max|ref|).

One table for whole programs (an engine or a rewritten graph against eager: errors accumulate
through every layer) and one for a single op against its reference implementation.
"""

from __future__ import annotations

import torch

from dscompile.dtypes import DTYPES

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
OP_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# A quantized engine against the eager model with the same quantized weights, where its kernels
# quantize activations to int8 per block (MatMulNBits/QMoE accuracy_level 4, the CPU choice):
# whole programs, float32 activations otherwise. Measured on the bench config (V2-Lite widths,
# 4 layers; a 32-token prompt, then 64 teacher-forced decode steps): worst max |Δ| / max(1, max|ref|)
# 0.049 (int8) and 0.045 (int4) for the logits, 0.032 / 0.055 for the cache; logits relative RMS
# error 0.019 / 0.021 on average. The bound is about twice the worst.
QUANTIZED_ACTIVATIONS = {torch.float32: 1e-1}
# A float32 engine whose GEMMs take TF32 inputs (opted in: ONNX Runtime's CUDA provider with
# use_tf32, TensorRT built with BuilderFlag.TF32): each GEMM input is rounded to 10 mantissa bits
# (unit roundoff 2^-11 ~ 4.9e-4, ~5e-4 relative per product), accumulated in float32. The bound
# allows about 20 of those roundings through the layers; it is half of float16's, whose 10-bit
# mantissa also rounds activations, norms and softmax, which TF32 leaves in float32. Set from
# that arithmetic, not yet measured on a GPU. Other dtypes keep their own bounds (TF32 does not
# touch them).
TF32 = {**TOLERANCE, torch.float32: 1e-2}


def bound(dtype: torch.dtype | str, ref_max: float, table: dict = TOLERANCE) -> float:
    """The largest allowed max |Δ| for outputs whose reference peaks at `ref_max`."""
    dtype = DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype
    return table.get(dtype, table[torch.float32]) * max(1.0, ref_max)
